#!/usr/bin/env python3
"""Tiny random-weight models of more 2026 architectures (issue #25: `gemma4_text`), with
transformers' logits and greedy tokens and mlx-lm's greedy tokens on its own 4-bit conversion,
for `crates/pocketlm/tests/it/archs_2026.rs` (also `ministral3`). Same tokenizer and golden file layout as
`tiny_moe.py` (read its docstring); this script writes only its own entries under
`crates/pocketlm/tests/golden/archs_2026/` (tiny_moe.py clears that folder: run it first).

References: Hugging Face transformers (`Gemma4ForCausalLM` from `Gemma4TextConfig`,
`Ministral3ForCausalLM` from `Ministral3Config`, reduced sizes), mlx-lm (`mlx_lm.convert -q
--q-bits 4`, `mlx_lm.load`, `models/gemma4_text.py`, `models/ministral3.py`).

How to run (from the repository root, with the venv of tiny_moe.py):

    /tmp/venv-moe/bin/python scripts/golden/tiny_2026b.py

Versions used for the committed files: torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, mlx 0.32.4, mlx-lm 0.32.2, Python 3.11, Linux x86_64 (CPU).

Models (vocab 320, hidden 64, 4 query heads):
- gemma4_text: 5 layers `[sliding, sliding, full, sliding, full]`, sliding window 8 (prompts of 20 and 12
  tokens reach past it); sliding layers: head width 16, 2 KV heads, RoPE theta 1e4; full
  layers: head width 32 (`global_head_dim`), 1 KV head (`num_global_key_value_heads`), keys
  equal values (`attention_k_eq_v`: no `v_proj`), proportional RoPE (theta 1e6, a quarter of
  the frequencies rotate); per-layer embeddings of width 16 (`hidden_size_per_layer_input`);
  MLP width 32; the last 2 layers reuse the keys and values of layers 1 and 2
  (`num_kv_shared_layers`) and have double-width MLPs (`use_double_wide_mlp`); final logit
  soft-cap 30; tied output layer (std 0.3). Norm weights and `layer_scalar` are drawn around 1
  (Gemma 4 norms scale by `w`, not `1 + w`), the post-attention and post-MLP norms around 5
  (smaller block outputs let the tied embedding dominate: every position then predicts its
  own input token and greedy decoding repeats one token). config.json also carries `global_head_dim` and `num_global_key_value_heads`, as
  the Hub checkpoints do (transformers 5.24 writes only `per_layer_config`; mlx-lm reads only
  the former). The MoE block (`enable_moe_block`): `tiny_gemma4_moe.py`, which uses
  `make_one` from here.
- gemma4_text_mlx_q4: `mlx_lm.convert(quantize=True, q_bits=4, q_group_size=32,
  dtype="float32")` of gemma4_text (`per_layer_projection`, 16 wide, and the per-layer
  embedding, 80 wide, stay float); in gemma4_text.golden.safetensors `mlx_greedy`: mlx-lm's
  16 greedy tokens after prompt 1 (KV cache, argmax), and `mlx_logits1` `[12, 320]` f32:
  mlx-lm's logits over prompt 1 on that folder (one pass). Its greedy steps come within 0.01
  of a tie (top-1 minus top-2), so pocketlm's 4-bit kernels, which round activations to 8
  bits, are compared on logits with a loose bound and the exact check runs on the weights
  dequantized at load (mlx's f32 arithmetic).
- ministral3: 2 layers, head width 16, 2 KV heads, MLP width 64, untied output layer (std 1.0,
  norms around 1: `tiny_archs.randomize`); YaRN RoPE (theta 1e6, factor 16) over an original
  context of 8 tokens (`original_max_position_embeddings`), so that the prompts reach the
  Llama-4 query temperature `1 + 0.1 ln(1 + floor(pos / 8))` at positions 8 and 16.
- ministral3_mlx_q4: as gemma4_text_mlx_q4 (group size 32), with `mlx_greedy` and
  `mlx_logits1` in ministral3.golden.safetensors.
- The multimodal `gemma4` and `mistral3` folders are not generated: the tests rewrite the text
  folders into their layout (`text_config`, weights under `model.language_model.` or
  `language_model.model.`).
"""
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import (Gemma4ForCausalLM, Gemma4TextConfig, Ministral3Config,
                          Ministral3ForCausalLM)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_archs import greedy, randomize, tokenizer  # noqa: E402
from tiny_moe import ROOT, float_goldens, mlx_greedy  # noqa: E402

SLIDING, FULL = "sliding_attention", "full_attention"


def archs():
    """(name, class, config, extra config.json fields, mlx group size or None)."""
    yield "gemma4_text", Gemma4ForCausalLM, Gemma4TextConfig(
        vocab_size=320, hidden_size=64, intermediate_size=32, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, FULL], sliding_window=8,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=320,
        num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=30.0,
        max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2,
        tie_word_embeddings=True), {"global_head_dim": 32, "num_global_key_value_heads": 1}, 32
    yield "ministral3", Ministral3ForCausalLM, Ministral3Config(
        vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                         "original_max_position_embeddings": 8, "max_position_embeddings": 128,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}), {}, 32


def randomize_gemma4(model):
    """Norm weights and layer scalars around 1, post-block norms around 5 (the tied embedding
    would otherwise dominate the residual stream), a tied embedding of std 0.3."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "post_attention" in pname or "post_feedforward" in pname:
                p.copy_(5.0 + 0.5 * torch.randn_like(p))
            elif pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for pname, b in model.named_buffers():
            if pname.endswith("layer_scalar"):
                b.copy_(0.75 + 0.5 * torch.rand_like(b))
        out = model.get_output_embeddings().weight
        out.copy_(0.3 * torch.randn_like(out))


def mlx_logits(folder, ids):
    """mlx-lm's logits `[len, vocab]` f32 over `ids` (one forward pass, no cache)."""
    import mlx.core as mx
    import numpy as np
    mx.set_default_device(mx.cpu)
    from mlx_lm import load
    model, _ = load(folder)
    out = model(mx.array([ids]))[0].astype(mx.float32)
    return torch.from_numpy(np.array(out)).contiguous()


def make_one(name, cls, cfg, extra, mlx_group, randomizer):
    """Writes model `name` (`cls` from `cfg`, randomized by `randomizer(model)`, `extra` added
    to config.json), its golden file and, with `mlx_group`, its mlx-lm 4-bit folder."""
    out = os.path.join(ROOT, name)
    tok = tokenizer("chatml")
    cfg.bos_token_id = tok.bos_token_id
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    model = cls(cfg)
    randomizer(model)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cpath = os.path.join(out, "config.json")
    with open(cpath) as f:
        c = json.load(f)
    c.update(extra)
    with open(cpath, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    model = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    tensors, toks, margins = float_goldens(model, tok)
    if mlx_group:
        from mlx_lm.convert import convert as mlx_convert
        q4 = os.path.join(ROOT, f"{name}_mlx_q4")
        shutil.rmtree(q4, ignore_errors=True)
        mlx_convert(out, q4, quantize=True, q_group_size=mlx_group, q_bits=4,
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
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{name}: folder {size // 1024} KB, greedy {toks}, min margin {min(margins):.3f}")
    assert size < 400 * 1024, size


def make():
    torch.manual_seed(0)
    for name, cls, cfg, extra, mlx_group in archs():
        randomizer = randomize_gemma4 if name.startswith("gemma4") else (
            lambda model: randomize(model, name))
        make_one(name, cls, cfg, extra, mlx_group, randomizer)

if __name__ == "__main__":
    make()
