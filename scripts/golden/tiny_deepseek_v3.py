#!/usr/bin/env python3
"""Tiny random-weight `deepseek_v3` models (issue #25: multi-head latent attention, MoE with
shared experts and group-limited sigmoid routing) with transformers' logits and greedy tokens,
and mlx-lm's logits and greedy tokens on its own 4-bit conversion, for
`crates/pocketlm/tests/it/archs_2026.rs` (`deepseek_v3_*`).

References: Hugging Face transformers `models/deepseek_v3/modeling_deepseek_v3.py`
(`DeepseekV3ForCausalLM` built from its real `DeepseekV3Config` with reduced sizes, eager
attention), mlx-lm `mlx_lm/models/deepseek_v3.py` (`mlx_lm.convert`, `mlx_lm.load`).

How to run (from the repository root, with the venv of tiny_moe.py, AFTER tiny_moe.py, which
clears the golden folder):

    /tmp/venv-moe/bin/python scripts/golden/tiny_deepseek_v3.py

Versions used for the committed files: torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, mlx 0.32.4, mlx-lm 0.32.2, Python 3.11, Linux x86_64 (CPU).

Output under `crates/pocketlm/tests/golden/archs_2026/` (only the `deepseek_v3*` entries are
replaced; golden file layout as `tiny_moe.py`'s docstring says):

- `deepseek_v3/`: hidden 32, 2 heads, `q_lora_rank` 32 (`q_a_proj`, `q_a_layernorm`,
  `q_b_proj`), `kv_lora_rank` 32, `qk_nope_head_dim` 32, `qk_rope_head_dim` 16, `v_head_dim`
  16 (the value heads are narrower than the query/key heads of 48); 3 layers: 1 dense
  (`first_k_dense_replace`, MLP width 64) then 2 MoE layers with 8 routed experts of width 32
  in 4 groups (`n_group` 4, `topk_group` 2), top-2, sigmoid scores with a random
  `e_score_correction_bias` (std 0.3, so that it changes choices), `norm_topk_prob`,
  `routed_scaling_factor` 2.5 and 1 shared expert; YaRN as in deepseek-ai/DeepSeek-V3's config
  (beta 32/1, `mscale` = `mscale_all_dim` = 1, interleaved RoPE) with factor 32 over an original
  context of 8 (so the softmax scale is 48^-0.5 * (1 + 0.1 ln 32)^2); an untied output layer
  of std 1.0 (`tiny_archs.randomize`). Weights bfloat16, experts under the per-expert names
  `mlp.experts.{e}.{gate,up,down}_proj.weight` (`save_pretrained`).
- `deepseek_v3.golden.safetensors`: `ids{p}`, `logits{p}`, `greedy`, `greedy_margin` as
  tiny_moe.py; `mlx_greedy` `[16]` u32 and `mlx_logits1` `[12, 320]` f32: mlx-lm's greedy
  tokens (its KV cache) and logits (one pass) after / over prompt 1 on `deepseek_v3_mlx_q4/`.
- `deepseek_v3_mlx_q4/`: `mlx_lm.convert(quantize=True, q_bits=4, q_group_size=32,
  dtype="float32")` of `deepseek_v3/` (config.json given `rope_theta` and `rope_scaling`, which
  mlx-lm reads and transformers 5 writes as `rope_parameters`): mlx-lm's `sanitize` splits
  `kv_b_proj` into per-head `self_attn.embed_q` `[heads, kv_lora_rank, qk_nope_head_dim]` and
  `self_attn.unembed_out` `[heads, v_head_dim, kv_lora_rank]`, stacks the experts as
  `mlp.switch_mlp.*`, and quantizes both 4-bit; the router `mlp.gate` stays float.
- `deepseek_v3_lite/` + `deepseek_v3_lite.golden.safetensors`: the variant without a query
  low-rank (`q_lora_rank` null: one `q_proj`, as Moonlight / DeepSeek-V2-Lite-style configs),
  plain RoPE (no scaling), hidden 32, 2 heads, `kv_lora_rank` 16, head widths 16 + 8 (nope +
  rope) and 8 (values), 2 layers (1 dense of width 32, 1 MoE with 4 experts of width 16, one
  group), `norm_topk_prob` false, `routed_scaling_factor` 1.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_2026b import mlx_logits  # noqa: E402
from tiny_archs import greedy, randomize, tokenizer  # noqa: E402
from tiny_moe import ROOT, float_goldens, mlx_greedy  # noqa: E402

COMMON = dict(vocab_size=320, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
              rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False,
              n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
              rope_interleave=True, max_position_embeddings=256)


def archs():
    """(name, config, mlx group size or None)."""
    yield "deepseek_v3", DeepseekV3Config(
        **COMMON, num_hidden_layers=3, intermediate_size=64, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=16, moe_intermediate_size=32,
        n_routed_experts=8, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 32.0,
                         "original_max_position_embeddings": 8, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}), 32
    yield "deepseek_v3_lite", DeepseekV3Config(
        **COMMON, num_hidden_layers=2, intermediate_size=32, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=4, n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), None


def randomize_router(model):
    """A selection bias that matters next to sigmoid scores in (0, 1)."""
    with torch.no_grad():
        for pname, b in model.named_buffers():
            if pname.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))


def mlx_readable(folder):
    """A copy of `folder` whose config.json also has `rope_theta` and `rope_scaling` (mlx-lm
    0.32.2's `deepseek_v3.ModelArgs` reads these; transformers 5.24 writes `rope_parameters`,
    Hub checkpoints have both)."""
    dst = os.path.join(tempfile.mkdtemp(prefix="tiny-dsv3-"), os.path.basename(folder))
    shutil.copytree(folder, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    rp = dict(cfg["rope_parameters"])
    cfg.setdefault("rope_theta", rp.pop("rope_theta"))
    if rp.get("rope_type", "default") != "default":
        cfg.setdefault("rope_scaling", rp)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return dst


def make():
    torch.manual_seed(0)
    for name, cfg, mlx_group in archs():
        out = os.path.join(ROOT, name)
        shutil.rmtree(out, ignore_errors=True)
        tok = tokenizer("chatml")
        cfg.bos_token_id = tok.bos_token_id
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
        model = DeepseekV3ForCausalLM(cfg)
        randomize(model, name)
        randomize_router(model)
        model = model.to(torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        model = DeepseekV3ForCausalLM.from_pretrained(
            out, dtype=torch.float32, attn_implementation="eager").eval()
        tensors, toks, margins = float_goldens(model, tok)
        if mlx_group:
            from mlx_lm.convert import convert as mlx_convert
            q4 = os.path.join(ROOT, f"{name}_mlx_q4")
            shutil.rmtree(q4, ignore_errors=True)
            mlx_convert(mlx_readable(out), q4, quantize=True, q_group_size=mlx_group, q_bits=4,
                        dtype="float32")
            ids1 = tensors["ids1"].to(torch.int64).tolist()
            mt = mlx_greedy(q4, ids1, 16)
            tensors["mlx_greedy"] = torch.tensor(mt, dtype=torch.int64).to(torch.uint32)
            tensors["mlx_logits1"] = mlx_logits(q4, ids1)
            ft, _ = greedy(model, ids1, 16)
            agree = next((i for i, (a, b) in enumerate(zip(ft, mt)) if a != b), 16)
            print(f"{name}: mlx-lm q4 greedy {mt} ({agree} leading tokens equal transformers')")
            qsize = sum(os.path.getsize(os.path.join(q4, f)) for f in os.listdir(q4))
            print(f"{name}_mlx_q4: folder {qsize // 1024} KB")
        save_file(tensors, os.path.join(ROOT, f"{name}.golden.safetensors"),
                  metadata={"transformers": transformers.__version__, "torch": torch.__version__})
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{name}: folder {size // 1024} KB, greedy {toks}, min margin {min(margins):.3f}")
        assert size < 250 * 1024, size


if __name__ == "__main__":
    make()
