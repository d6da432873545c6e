#!/usr/bin/env python3
"""A tiny random-weight Gemma 4 text model with the mixture-of-experts block
(`enable_moe_block: true`, the layout of Gemma-4-26B-A4B), with transformers' logits and greedy
tokens and mlx-lm's on its own 4-bit conversion, for `crates/pocketlm/tests/it/archs_2026.rs`
(`gemma4_moe_*`). Same tokenizer and golden file layout as `tiny_moe.py` (read its
docstring); this script writes only its own `gemma4_moe*` entries under
`crates/pocketlm/tests/golden/archs_2026/` (tiny_moe.py clears that folder: run this after
it).

References: Hugging Face transformers 5.24 (`Gemma4ForCausalLM` from `Gemma4TextConfig`,
`models/gemma4/modeling_gemma4.py`: `Gemma4TextRouter`, `Gemma4TextExperts`, the MoE branch
of `Gemma4TextDecoderLayer.forward`), mlx-lm 0.32.2 (`mlx_lm.convert -q --q-bits 4`,
`models/gemma4_text.py`: `Router`, `Experts` over `SwitchGLU` with GeGLU, `sanitize`).

How to run (from the repository root, with the venv of tiny_moe.py, after tiny_moe.py):

    /tmp/venv-moe/bin/python scripts/golden/tiny_gemma4_moe.py

Versions used for the committed files: torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, mlx 0.32.4, mlx-lm 0.32.2, Python 3.11, Linux x86_64 (CPU).

Model `gemma4_moe` (vocab 320, hidden 64, 4 query heads): 2 layers `[sliding, full]`,
sliding window 8; sliding layers head width 16 with 2 KV heads, the full layer head width 32
with 1 KV head and keys as values (`attention_k_eq_v`), as `gemma4_text` of `tiny_2026b.py`;
no per-layer embeddings, no KV sharing; every layer has the dense GELU-tanh MLP of width 32
and beside it 4 experts (top 2, width 32) behind a router that RMS-normalizes the block's
residual, scales it by `scale · hidden^-0.5`, takes the softmax top-k renormalized and
multiplies each weight by the expert's `per_expert_scale`; the MLP's output goes through
`post_feedforward_layernorm_1`, the experts' (on `pre_feedforward_layernorm_2` of the
residual) through `post_feedforward_layernorm_2`, their sum through
`post_feedforward_layernorm`. Norms drawn as `tiny_2026b.py`'s `randomize_gemma4` does, the
router's `scale` around 1 and `per_expert_scale` in [0.5, 1.5]. transformers saves the experts
fused (`experts.gate_up_proj` `[4, 64, 64]`, gate rows first; `experts.down_proj` `[4, 64,
32]`).

Files: `gemma4_moe/` (bfloat16), `gemma4_moe.golden.safetensors` (`ids{p}`, `logits{p}`,
`greedy`, `greedy_margin`, `mlx_greedy`, `mlx_logits1` as for `gemma4_text`) and
`gemma4_moe_mlx_q4/` (`mlx_lm.convert(quantize=True, q_bits=4, q_group_size=32,
dtype="float32")`: experts stacked as `experts.switch_glu.{gate,up,down}_proj`, 4-bit; the
router's `proj` 8-bit, group size 64, by the model's `quant_predicate`).
"""
import os
import sys

import torch
from transformers import Gemma4ForCausalLM, Gemma4TextConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_2026b import FULL, SLIDING, make_one, randomize_gemma4  # noqa: E402


def randomize(model):
    randomize_gemma4(model)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("router.scale"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("per_expert_scale"):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))


def main():
    torch.manual_seed(0)
    cfg = Gemma4TextConfig(
        vocab_size=320, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True,
        layer_types=[SLIDING, FULL], sliding_window=8,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
        final_logit_softcapping=30.0, max_position_embeddings=256, rms_norm_eps=1e-6,
        initializer_range=0.2, tie_word_embeddings=True)
    extra = {"global_head_dim": 32, "num_global_key_value_heads": 1}
    make_one("gemma4_moe", Gemma4ForCausalLM, cfg, extra, 32, randomize)


if __name__ == "__main__":
    main()
