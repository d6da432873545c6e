#!/usr/bin/env python3
"""Reference YaRN frequencies from transformers (`_compute_yarn_parameters`, 5.23.0) for the
unit test `nn::rope::tests::yarn_matches_transformers`: prints, for two configurations, the
attention factor and `inv_freq` at indices 0, 8, 16, ..., 56, 63 (head_dim 128).

Run: /root/ref/bin/python scripts/golden/rope_yarn.py
"""
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

CASES = {
    # Qwen2.5-7B-Instruct's documented long-context setting.
    "qwen25": dict(rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768),
    # beta and mscale options, DeepSeek-style.
    "mscale": dict(rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                   beta_fast=16, beta_slow=2, mscale=1.0, mscale_all_dim=0.707),
}
for name, c in CASES.items():
    rp = {"rope_type": "yarn", **c}
    cfg = Qwen2Config(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                      rope_parameters=rp)
    inv, att = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    idx = list(range(0, 64, 8)) + [63]
    print(name, repr(att), [(i, float(inv[i])) for i in idx])
