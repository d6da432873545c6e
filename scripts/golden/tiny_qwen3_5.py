#!/usr/bin/env python3
"""Tiny random-weight Qwen3.5 models (issue #25: `qwen3_5` and `qwen3_5_moe`, Gated DeltaNet
linear attention mixed with gated full attention), with transformers' logits and greedy tokens
and mlx-lm's on its own 4-bit conversion, for `crates/pocketlm/tests/it/archs_2026.rs`. Same
tokenizer and golden file layout as `tiny_moe.py` (read its docstring); this script writes only
its own `qwen3_5*` entries under `crates/pocketlm/tests/golden/archs_2026/` (tiny_moe.py clears
that folder: run this after it).

References: Hugging Face transformers (`Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` from
`Qwen3_5TextConfig` / `Qwen3_5MoeTextConfig`, reduced sizes, `models/qwen3_5/modeling_qwen3_5.py`,
`models/qwen3_5_moe/modeling_qwen3_5_moe.py`), mlx-lm (`mlx_lm.convert -q --q-bits 4`,
`mlx_lm.load`, `models/qwen3_5.py`, `qwen3_5_moe.py`, `gated_delta.py`, whose cache is `KVCache`
for full-attention layers and `ArraysCache(size=2)`: convolution state, recurrent state, for
linear-attention layers).

How to run (from the repository root, with the venv of tiny_moe.py, after tiny_moe.py):

    /tmp/venv-moe/bin/python scripts/golden/tiny_qwen3_5.py

Versions used for the committed files: torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, mlx 0.32.4, mlx-lm 0.32.2, Python 3.11, Linux x86_64 (CPU).

Models (vocab 320; `qwen3_5`: hidden 32, 4 layers `[linear_attention, full_attention,
linear_attention, full_attention]`; `qwen3_5_moe`: hidden 64 (mlx-lm quantizes its router and
shared expert gate with group size 64), 2 layers `[linear_attention, full_attention]`; i.e.
`full_attention_interval` 2, written into config.json too as the Hub checkpoints carry it and
mlx-lm reads only it; layer 0 is a linear-attention layer, so the cache's offset comes from an
`ArraysCache`):
- full attention: 2 query heads of width 16 with an output gate (`q_proj` `[2 * 2 * 16, hidden]`),
  1 KV head, zero-centred (1 + w) q/k RMSNorm, RoPE theta 1e6 on 4 of 16 dimensions
  (`partial_rotary_factor` 0.25);
- Gated DeltaNet: 1 key head and 2 value heads (grouped) of width 16, convolution kernel 4
  (a state of the last 3 inputs of `conv_dim` 64), `A_log` / `dt_bias` randomized;
- `qwen3_5`: a SwiGLU MLP of width 32, untied output layer; `qwen3_5_moe`: 4 experts, top-2
  (always renormalized in transformers' router), expert width 32, a shared expert of width 32
  with its sigmoid gate, output layer tied to the embedding;
- output layer / embedding of std 0.5; zero-centred norms 0.2 * randn, the gated norm
  1 + 0.2 randn; `A_log` = log U(0.5, 8), `dt_bias` 1 + 0.5 randn; other weights of std 0.1
  (`qwen3_5`) or 0.2 (`qwen3_5_moe`). At these scales transformers' float32 logits stay within
  3e-5 of its float64 ones (measured); with std 0.2 the dense model amplified float32 rounding
  to 2.3e-4 over prompt 0, more than the tolerance the tests hold pocketlm to.
transformers' logits and greedy tokens use its token-by-token gated delta rule for prompts too
([`recurrent_rule`]); its greedy tokens are full forward passes without a cache, so pocketlm's
cached decode (convolution and recurrent states, KV cache) is checked against them.

Files:
- `<name>/`: the text-only `*ForCausalLM` folder (`model_type` `qwen3_5_text` /
  `qwen3_5_moe_text`, bfloat16; transformers 5.24 writes the MoE experts per expert,
  `mlp.experts.{e}.{gate,up,down}_proj.weight`);
- `<name>.golden.safetensors`: `ids{p}`, `logits{p}`, `greedy`, `greedy_margin` as in
  tiny_moe.py, and `mlx_greedy` (mlx-lm's 16 greedy tokens after prompt 1 on the 4-bit folder,
  its caches, argmax) and `mlx_logits1` `[12, 320]` f32 (mlx-lm's logits over prompt 1, one
  pass);
- `<name>_mlx_q4/`: `mlx_lm.convert(quantize=True, q_bits=4, q_group_size=32,
  dtype="float32")` of the folder rewritten as the multimodal form mlx-lm reads (`model_type`
  `qwen3_5` / `qwen3_5_moe` with the text config under `text_config`; mlx-lm 0.32.2 has no
  `qwen3_5_text` module), the experts fused as the Hub checkpoints store them
  (`mlp.experts.gate_up_proj` `[4, 64, 64]`, `mlp.experts.down_proj` `[4, 64, 32]`): weights under `language_model.model.`, norms stored as 1 + w, the
  convolution weight as `[64, 4, 1]`, experts stacked as `switch_mlp`, the router and shared
  expert gate 8-bit (its `quant_predicate`).
"""
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors.torch import save_file
from transformers import (Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig,
                          Qwen3_5TextConfig)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_archs import greedy, tokenizer  # noqa: E402
from tiny_moe import ROOT, float_goldens, mlx_greedy  # noqa: E402
from tiny_2026b import mlx_logits  # noqa: E402

import transformers.models.qwen3_5.modeling_qwen3_5 as modeling_dense  # noqa: E402
import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as modeling_moe  # noqa: E402


def recurrent_rule(*args, chunk_size=64, **kwargs):
    """transformers' token-by-token gated delta rule (`torch_recurrent_gated_delta_rule`, the
    form it runs for cached decode) in place of its chunked one for prompts: in float32 the two
    differ by up to 1.5e-4 in these models' logits (measured over prompt 0), as much as the
    tolerance; pocketlm runs the token-by-token form."""
    return modeling_dense.torch_recurrent_gated_delta_rule(*args, **kwargs)


modeling_dense.torch_chunk_gated_delta_rule = recurrent_rule
modeling_moe.torch_chunk_gated_delta_rule = recurrent_rule

LIN, FULL = "linear_attention", "full_attention"
COMMON = dict(
    vocab_size=320, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
    linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_num_key_heads=1, linear_num_value_heads=2, layer_types=[LIN, FULL, LIN, FULL],
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
    initializer_range=0.1)


def archs():
    yield "qwen3_5", "qwen3_5", Qwen3_5ForCausalLM, Qwen3_5TextConfig(
        **COMMON, intermediate_size=32, tie_word_embeddings=False)
    # A larger initializer than the dense model's: with the tied output layer and 0.1 every
    # position predicts one token (the embedding dominates the residual stream).
    moe = dict(COMMON, hidden_size=64, num_hidden_layers=2, layer_types=[LIN, FULL],
               initializer_range=0.2)
    yield "qwen3_5_moe", "qwen3_5_moe", Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig(
        **moe, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, tie_word_embeddings=True)


def randomize(model):
    """Zero-centred norms around 0 (their scale is 1 + w), the gated norm around 1, decay
    parameters spread, a large-std output layer (peaked logits)."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn_like(p))
            elif pname.endswith("dt_bias"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif pname.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(0.5, 8.0)))
        out = model.get_output_embeddings().weight
        out.copy_(0.5 * torch.randn_like(out))


def fuse_experts(path):
    """Rewrites the per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` of a safetensors
    file into the Hub's fused `mlp.experts.gate_up_proj` `[E, 2 * I, H]` (gate rows first) and
    `mlp.experts.down_proj` `[E, H, I]`, the only expert layout mlx-lm's `qwen3_5_moe.sanitize`
    reads."""
    from safetensors.torch import load_file
    w = load_file(path)
    layers = sorted({k.split(".mlp.experts.")[0] for k in w if ".mlp.experts." in k})
    for p in layers:
        n = len({k for k in w if k.startswith(f"{p}.mlp.experts.") and k.endswith("gate_proj.weight")})
        get = lambda e, m: w.pop(f"{p}.mlp.experts.{e}.{m}.weight")
        gate_up = [torch.cat([get(e, "gate_proj"), get(e, "up_proj")], 0) for e in range(n)]
        w[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(gate_up).contiguous()
        w[f"{p}.mlp.experts.down_proj"] = torch.stack(
            [get(e, "down_proj") for e in range(n)]).contiguous()
    save_file(w, path, metadata={"format": "pt"})


def mlx_source(folder, model_type):
    """A copy of `folder` in the multimodal form mlx-lm 0.32.2 reads: `model_type` `qwen3_5` /
    `qwen3_5_moe`, the text config under `text_config` (mlx-lm's `sanitize` prefixes the
    weights with `language_model.`), MoE experts fused ([`fuse_experts`])."""
    dst = os.path.join(tempfile.mkdtemp(prefix="tiny-qwen3_5-"), os.path.basename(folder))
    shutil.copytree(folder, dst)
    fuse_experts(os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        text = json.load(f)
    cfg = {"model_type": model_type, "text_config": text,
           "tie_word_embeddings": text["tie_word_embeddings"]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return dst


def make(name, model_type, cls, cfg):
    torch.manual_seed(0)
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    tok = tokenizer("chatml")
    cfg.bos_token_id = tok.bos_token_id
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    model = cls(cfg)
    randomize(model)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cpath = os.path.join(out, "config.json")
    with open(cpath) as f:
        c = json.load(f)
    c["full_attention_interval"] = 2
    with open(cpath, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    model = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    tensors, toks, margins = float_goldens(model, tok)

    from mlx_lm.convert import convert as mlx_convert
    q4 = os.path.join(ROOT, f"{name}_mlx_q4")
    shutil.rmtree(q4, ignore_errors=True)
    mlx_convert(mlx_source(out, model_type), q4, quantize=True, q_group_size=32, q_bits=4,
                dtype="float32")
    ids1 = tensors["ids1"].to(torch.int64).tolist()
    mt = mlx_greedy(q4, ids1, 16)
    tensors["mlx_greedy"] = torch.tensor(mt, dtype=torch.int64).to(torch.uint32)
    tensors["mlx_logits1"] = mlx_logits(q4, ids1)
    ft, _ = greedy(model, ids1, 16)
    agree = next((i for i, (a, b) in enumerate(zip(ft, mt)) if a != b), 16)
    print(f"{name}: mlx-lm q4 greedy {mt} ({agree} leading tokens equal transformers')")

    save_file(tensors, os.path.join(ROOT, f"{name}.golden.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__})
    size = sum(os.path.getsize(os.path.join(d, f)) for d in (out, q4) for f in os.listdir(d))
    print(f"{name}: folders {size // 1024} KB, greedy {toks}, min margin {min(margins):.3f}")
    assert size < 330 * 1024, size


if __name__ == "__main__":
    only = sys.argv[1:]
    for name, model_type, cls, cfg in archs():
        if not only or name in only:
            make(name, model_type, cls, cfg)
