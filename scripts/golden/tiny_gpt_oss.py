#!/usr/bin/env python3
"""A tiny random-weight `gpt_oss` model (issue #25) with transformers' logits and greedy tokens,
and mlx-lm's greedy tokens on its own 4-bit conversions (affine and MXFP4), for
`crates/pocketlm/tests/it/archs_2026.rs` (`gpt_oss_*`).

References: Hugging Face transformers `models/gpt_oss/modeling_gpt_oss.py` (`GptOssForCausalLM`
built from its real `GptOssConfig` with reduced sizes, eager attention: the one with sinks),
mlx-lm `mlx_lm/models/gpt_oss.py` (`mlx_lm.convert`, `mlx_lm.load`).

How to run (from the repository root; the environment of `tiny_moe.py`):

    /tmp/venv-moe/bin/python scripts/golden/tiny_gpt_oss.py

Versions used for the committed files: torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, mlx 0.32.4, mlx-lm 0.32.2, Python 3.11, Linux x86_64 (CPU).

Output under `crates/pocketlm/tests/golden/archs_2026/` (only the `gpt_oss*` entries are
replaced; the other architectures' files there are `tiny_moe.py`'s):

- `gpt_oss/`: `config.json`, `model.safetensors` (bfloat16, `save_pretrained`: fused experts
  `mlp.experts.gate_up_proj` `[experts, hidden, 2 * intermediate]` with gate and up columns
  interleaved, `gate_up_proj_bias`, `down_proj` `[experts, intermediate, hidden]`,
  `down_proj_bias`; the router `mlp.router.{weight,bias}`; `self_attn.sinks` `[heads]`), the
  byte-level BPE tokenizer of `tiny_archs.py` (vocabulary 320, ChatML specials).
- `gpt_oss.golden.safetensors`: for prompts p = 0, 1, 2 `ids{p}` u32 and `logits{p}`
  `[len, 320]` f32 (transformers' float32 eager forward over the bfloat16 weights, every
  position); `greedy` `[16]` u32 (16 greedy tokens after prompt 0, each step a full forward
  pass) and `greedy_margin` `[16]` f32 (top-1 minus top-2 logit of each step);
  `mlx_greedy` / `mlx_mxfp4_greedy` `[16]` u32: mlx-lm's greedy tokens (its KV caches:
  rotating on the sliding layers) on the two folders below, after prompt 1 / prompt 0
  (`MLX`): the prompts whose greedy steps keep a top-1/top-2 margin (0.10 / 0.31 at least)
  on each folder and do not change when mlx-lm's YaRN is made to follow `truncate: false`.
  mlx-lm 0.32.2's `YarnRoPE` ignores `truncate` (it always floors/ceils the correction range,
  where transformers and OpenAI's reference do not): its logits differ from transformers' by up
  to 0.23 on the float model, and on the MXFP4 folder after prompt 1 a step with a 0.001
  margin flips (with the range untruncated, mlx-lm's tokens there equal ours).
- `gpt_oss_mlx_q4/`: `mlx_lm.convert(quantize=True, q_bits=4, q_group_size=32,
  dtype="float32")`: experts split by mlx-lm's `sanitize` into `switch_mlp`-style stacked
  `mlp.experts.{gate,up,down}_proj` and quantized affine 4-bit, the router 8-bit by the model's
  `quant_predicate`.
- `gpt_oss_mlx_mxfp4/`: the same with `q_mode="mxfp4"` (group 32, E8M0 scales).
- `gpt_oss_mxfp4/`: the layout of the Hub's openai/gpt-oss checkpoints: the experts as MXFP4
  `mlp.experts.{gate_up,down}_proj_blocks` u8 `[experts, out, in / 32, 16]` (two E2M1 codes a
  byte, low nibble first; `gate_up` rows interleaved gate, up, ...) and `*_scales` u8
  `[experts, out, in / 32]` (E8M0), biases and the other weights bfloat16, config.json with
  their `quantization_config` (`quant_method: mxfp4`). The codes are `mx.quantize(...,
  mode="mxfp4")` of the float model's experts (the same bytes in both layouts). In the golden
  file: `mxfp4_logits0` `[20, 320]` f32, transformers' float32 eager forward over prompt 0 with
  the experts dequantized by transformers' own `convert_moe_packed_tensors` (the other weights
  those of `gpt_oss/`), and `mxfp4_greedy` `[16]` u32 after prompt 0, with `mxfp4_margin`.

The model: hidden 64, heads 4 of width 16, KV heads 2, 4 layers `sliding, full, sliding,
full` (transformers' default pattern) with `sliding_window` 8 (prompts of 20 and 12 tokens pass
it, the 7-token one does not), 4 experts of width 32, top-2, YaRN as in openai/gpt-oss-20b's
config (factor 32, beta 32/1, original context 4096, `truncate: false`, theta 150000), sinks
of std 1, biases of std 0.5, an untied output layer of std 1.0.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors.torch import save_file
from transformers import GptOssConfig, GptOssForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_archs import greedy, randomize, tokenizer  # noqa: E402
from tiny_moe import float_goldens, mlx_greedy  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "crates", "pocketlm",
                    "tests", "golden", "archs_2026")
NAME = "gpt_oss"
# mlx-lm golden: key, folder suffix, quantization mode, prompt.
MLX = [("mlx_greedy", "mlx_q4", "affine", 1), ("mlx_mxfp4_greedy", "mlx_mxfp4", "mxfp4", 0)]


def config():
    return GptOssConfig(
        vocab_size=320, hidden_size=64, intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_hidden_layers=4, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 4096})


def mlx_readable(folder):
    """A copy of `folder` that mlx-lm 0.32.2 can load: config.json also has `rope_theta` and
    `rope_scaling` (its `gpt_oss.ModelArgs` reads those; transformers 5.24 writes
    `rope_parameters`), and the experts are in the layout its `sanitize` produces from the Hub's
    MXFP4 `*_blocks` (`mlp.experts.{gate,up}_proj.weight` `[experts, intermediate, hidden]`
    from the even / odd columns of `gate_up_proj`, `down_proj.weight` `[experts, hidden,
    intermediate]`, biases split the same way): its `sanitize` has no branch for the unquantized
    fused `gate_up_proj` `[experts, hidden, 2 * intermediate]` that transformers saves (it
    slices the wrong axis and drops the `.weight` suffix), so the split is done here, once."""
    from safetensors.torch import load_file
    dst = os.path.join(tempfile.mkdtemp(prefix="tiny-gpt-oss-"), os.path.basename(folder))
    shutil.copytree(folder, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    rp = cfg["rope_parameters"]
    cfg.setdefault("rope_theta", rp["rope_theta"])
    cfg.setdefault("rope_scaling", {k: v for k, v in rp.items() if k != "rope_theta"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    w = load_file(os.path.join(dst, "model.safetensors"))
    out = {}
    for k, v in w.items():
        if k.endswith("experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            out[base + "gate_proj.weight"] = v[..., ::2].transpose(1, 2).contiguous()
            out[base + "up_proj.weight"] = v[..., 1::2].transpose(1, 2).contiguous()
        elif k.endswith("experts.gate_up_proj_bias"):
            base = k[: -len("gate_up_proj_bias")]
            out[base + "gate_proj.bias"] = v[..., ::2].contiguous()
            out[base + "up_proj.bias"] = v[..., 1::2].contiguous()
        elif k.endswith("experts.down_proj"):
            out[k + ".weight"] = v.transpose(1, 2).contiguous()
        elif k.endswith("experts.down_proj_bias"):
            out[k[: -len("_bias")] + ".bias"] = v
        else:
            out[k] = v
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def mxfp4_checkpoint(src, model, tok, tensors):
    """`gpt_oss_mxfp4/` and its transformers reference (see the module documentation)."""
    import mlx.core as mx
    import numpy as np
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    dst = os.path.join(ROOT, f"{NAME}_mxfp4")
    shutil.copytree(src, dst)
    w = load_file(os.path.join(dst, "model.safetensors"))
    out = {}
    for k, v in w.items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            rows_out = v.float().transpose(1, 2).contiguous()  # [experts, out, in]
            q, sc = mx.quantize(mx.array(rows_out.numpy()), group_size=32, bits=4, mode="mxfp4")
            e, r, c = rows_out.shape
            blocks = np.array(q).view(np.uint8).reshape(e, r, c // 32, 16)
            out[k + "_blocks"] = torch.from_numpy(blocks.copy())
            out[k + "_scales"] = torch.from_numpy(np.array(sc).astype(np.uint8))
        else:
            out[k] = v
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for proj in ["gate_up_proj", "down_proj"]:
                k = f"model.layers.{i}.mlp.experts.{proj}"
                deq = convert_moe_packed_tensors(out[k + "_blocks"], out[k + "_scales"],
                                                 dtype=torch.float32)
                getattr(layer.mlp.experts, proj).copy_(deq)
        ids = tensors["ids0"].to(torch.int64).tolist()
        tensors["mxfp4_logits0"] = model(torch.tensor([ids]), use_cache=False).logits[0].float()
    toks, margins = greedy(model, ids, 16)
    tensors["mxfp4_greedy"] = torch.tensor(toks, dtype=torch.int64).to(torch.uint32)
    tensors["mxfp4_margin"] = torch.tensor(margins, dtype=torch.float32)
    size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
    print(f"{NAME}_mxfp4: folder {size // 1024} KB, greedy {toks}, min margin {min(margins):.3f}")


def main():
    torch.manual_seed(0)
    for entry in os.listdir(ROOT) if os.path.isdir(ROOT) else []:
        if entry.startswith(NAME):
            p = os.path.join(ROOT, entry)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    out = os.path.join(ROOT, NAME)
    tok = tokenizer("chatml")
    cfg = config()
    cfg.bos_token_id = tok.bos_token_id
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    model = GptOssForCausalLM(cfg)
    randomize(model, NAME)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("sinks"):
                p.copy_(torch.randn_like(p))
            elif pname.endswith("_bias"):  # the experts' gate_up_proj_bias / down_proj_bias
                p.copy_(0.5 * torch.randn_like(p))
            elif pname.endswith("experts.gate_up_proj") or pname.endswith("experts.down_proj"):
                p.copy_(0.2 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    tensors, toks, margins = float_goldens(model, tok)
    from mlx_lm.convert import convert as mlx_convert
    readable = mlx_readable(out)
    for key, folder, mode, prompt in MLX:
        mlx_ids = tensors[f"ids{prompt}"].to(torch.int64).tolist()
        ref, _ = greedy(model, mlx_ids, 16)
        q = os.path.join(ROOT, f"{NAME}_{folder}")
        mlx_convert(readable, q, quantize=True, q_group_size=32, q_bits=4, q_mode=mode,
                    dtype="float32")
        mt = mlx_greedy(q, mlx_ids, 16)
        tensors[key] = torch.tensor(mt, dtype=torch.int64).to(torch.uint32)
        agree = next((i for i, (a, b) in enumerate(zip(ref, mt)) if a != b), 16)
        print(f"{NAME} {mode}: mlx-lm greedy after prompt {prompt} {mt} "
              f"({agree} leading tokens equal transformers' float ones)")
    mxfp4_checkpoint(out, model, tok, tensors)
    save_file(tensors, os.path.join(ROOT, f"{NAME}.golden.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__})
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{NAME}: folder {size // 1024} KB, greedy {toks}, min margin {min(margins):.3f}")
    assert size < 400 * 1024, size


if __name__ == "__main__":
    main()
