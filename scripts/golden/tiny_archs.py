#!/usr/bin/env python3
"""Tiny random-weight models of each supported architecture, with transformers' logits and greedy
tokens, for `crates/pocketlm/tests/it/archs_golden.rs`.

Reference: Hugging Face transformers (`Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
`Gemma2ForCausalLM`, `Gemma3ForCausalLM`, `Phi3ForCausalLM`, `MistralForCausalLM`), each built
from its real config class with reduced sizes.

How to run (from the repository root):

    python3 -m venv /root/ref
    /root/ref/bin/pip install "torch==2.15.0" "transformers==5.23.0" "tokenizers==0.23.3" \
        "safetensors==0.8.0" "mlx[cpu]==0.32.4" numpy
    /root/ref/bin/python scripts/golden/tiny_archs.py

Versions used for the committed files: torch 2.15.0, transformers 5.23.0, tokenizers 0.23.3,
safetensors 0.8.0, mlx 0.32.4, Python 3.11, Linux x86_64 (CPU).

Output, one folder per architecture under `crates/pocketlm/tests/golden/archs/<name>/`:

- `config.json`, `model.safetensors` (bfloat16, written by `save_pretrained`),
  `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` (a byte-level BPE trained
  here on a few sentences, vocabulary 320, with the architecture's own special tokens and a
  chat template in its family's style).
- `<name>.golden.safetensors` (beside the folder, so that the folder holds only the model):
  `ids` `[20]` u32 (the prompt), `logits` `[20, 320]` f32 (transformers'
  float32 forward pass over the bfloat16 weights, every position), `greedy` `[16]` u32 (16
  greedy tokens after the prompt, each step a full forward pass without cache),
  `greedy_margin` `[16]` f32 (top-1 minus top-2 logit at each greedy step; all are far above
  rounding noise). Phi-3 also has `short_logits` `[10, 320]`: the first 10 prompt tokens alone,
  which stay within `original_max_position_embeddings` (16) and so use LongRoPE's short
  factors, where the 20-token prompt uses the long ones.
  `q8_logits` `[20, 320]` f32 and `q8_greedy` `[16]` u32: the same after MLX 8-bit / group 64
  quantization of every 2-D weight (see `quantize_like_pocketlm`), computed by transformers on
  the dequantized weights.

Features each tiny model exercises (all sizes: hidden 64, heads 4, KV heads 2, vocab 320):
- qwen2: q/k/v biases (no o bias), untied lm_head.
- qwen3: per-head q/k RMSNorm, explicit head_dim 32 (!= hidden / heads), tied embeddings.
- gemma2: embedding scaled by sqrt(hidden), (1 + w) RMSNorm, pre/post attention and FFN norms,
  GELU-tanh MLP, attention soft-capping 10 and final soft-capping 15 (both active at these
  logit sizes), sliding window 6 on alternate layers (prompt 20), query_pre_attn_scalar 24.
- gemma3 (`gemma3_text`): as gemma2 without soft-capping, plus (1 + w) q/k norms, local layers
  (window 6, rope theta 10000) and a global layer (theta 1e6, linear rope scaling x8).
- phi3: fused qkv_proj and gate_up_proj, LongRoPE (short/long factors, attention factor from
  max/original context 64/16), partial rotary factor 0.5.
- mistral: sliding window 6 on every layer.
"""
import json
import math
import os
import shutil

import numpy as np

import mlx.core as mx
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "pocketlm", "tests",
                    "golden", "archs")
VOCAB = 320
PROMPT = "Small models run on laptops: the quick brown fox jumps over a lazy wizard."
TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pack my box with five dozen liquor jugs, said the wizard.",
    "Rust is a systems programming language focused on safety and speed.",
    "Small language models run on laptops and phones without a network.",
    "Quantization stores weights in fewer bits: 8, 6, 5, 4, 3 or 2 per value.",
]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
         "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
         "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
PHI3 = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + "
        "message['content'] + '<|end|>' + '\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
           "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

# name -> (specials, bos, eos, template)
TOKENIZERS = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>",
              "<end_of_turn>", GEMMA),
    "phi3": (["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|end|>",
             PHI3),
    "mistral": (["<unk>", "<s>", "</s>"], "<s>", "</s>", MISTRAL),
}


def tokenizer(kind):
    specials, bos, eos, template = TOKENIZERS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   unk_token=specials[0], pad_token=specials[0])
    fast.chat_template = template
    assert len(fast) <= VOCAB, len(fast)
    return fast


COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, initializer_range=0.2)


def archs():
    yield "qwen2", "chatml", Qwen2ForCausalLM, Qwen2Config(
        **COMMON, rope_theta=1e6, tie_word_embeddings=False)
    yield "qwen3", "chatml", Qwen3ForCausalLM, Qwen3Config(
        **COMMON, head_dim=32, rope_theta=1e6, tie_word_embeddings=True)
    yield "gemma2", "gemma", Gemma2ForCausalLM, Gemma2Config(
        **COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
        attn_logit_softcapping=10.0, final_logit_softcapping=15.0,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
    yield "gemma3", "gemma", Gemma3ForCausalLM, Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=6, layer_types=["sliding_attention", "full_attention",
                                       "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1000000.0}},
        tie_word_embeddings=True)
    half = 16 // 2 // 2  # head_dim 16, partial rotary 0.5 -> rotary dim 8 -> 4 factors
    yield "phi3", "phi3", Phi3ForCausalLM, Phi3Config(
        **{**COMMON, "max_position_embeddings": 64}, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.3, 2.1, 3.7][:half],
                         "long_factor": [1.5, 4.0, 9.0, 20.0][:half],
                         "original_max_position_embeddings": 16},
        tie_word_embeddings=False)
    yield "mistral", "mistral", MistralForCausalLM, MistralConfig(
        **COMMON, head_dim=16, sliding_window=6, rope_theta=10000.0, tie_word_embeddings=False)


def randomize(model, name):
    """Norm weights around their neutral value, a large-std output layer (peaked logits)."""
    unit_offset = name.startswith("gemma")  # Gemma norms scale by (1 + w)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if unit_offset and ("post_attention" in pname or "post_feedforward" in pname):
                # Gemma's tied embedding would otherwise dominate the residual stream, so that
                # every position predicts its own input token: larger block outputs.
                p.copy_(0.7 + 0.5 * torch.randn_like(p))
            elif pname.endswith("norm.weight"):
                p.copy_((0.0 if unit_offset else 1.0) + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
        out = model.get_output_embeddings().weight
        # Gemma ties the output layer to the embedding, which is also scaled by sqrt(hidden)
        # on input: a smaller std there.
        out.copy_((0.3 if unit_offset else 1.0) * torch.randn_like(out))


def greedy(model, ids, n):
    ids = list(ids)
    toks, margins = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            top = torch.topk(logits, 2)
            toks.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(toks[-1])
    return toks, margins


def quantize_like_pocketlm(model):
    """Replaces the weights in place by their MLX affine 8-bit / group 64 dequantization, as
    `pocketlm convert -q --q-bits 8` (= `mlx_lm.convert`) quantizes and pocketlm then computes:
    every 2-D weight whose input width is a multiple of 64, `mx.quantize` on the bfloat16
    weight; Linear layers use `scale * q + bias` with scales/biases widened to f32 (as
    `mx.quantized_matmul` with an f32 input), the embedding lookup `mx.dequantize` in bfloat16
    (`QuantizedEmbedding`), and a tied output layer the embedding's codes as a Linear."""
    tied = model.config.tie_word_embeddings
    emb = model.get_input_embeddings()
    if tied:
        model.lm_head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    n = 0
    with torch.no_grad():
        for pname, p in list(model.named_parameters()):
            if not pname.endswith(".weight") or p.ndim != 2 or p.shape[1] % 64 != 0:
                continue
            if tied and pname == "lm_head.weight":
                continue  # set from the embedding's codes below
            w = mx.array(p.detach().float().numpy()).astype(mx.bfloat16)
            wq, sc, bi = mx.quantize(w, group_size=64, bits=8)
            lin = mx.dequantize(wq, sc.astype(mx.float32), bi.astype(mx.float32),
                                group_size=64, bits=8)
            to_t = lambda a: torch.from_numpy(np.array(a.astype(mx.float32)))
            if p is emb.weight:
                p.copy_(to_t(mx.dequantize(wq, sc, bi, group_size=64, bits=8)))
                if tied:
                    model.lm_head.weight.copy_(to_t(lin))
            else:
                p.copy_(to_t(lin))
            n += 1
    return n


def main():
    torch.manual_seed(0)
    shutil.rmtree(ROOT, ignore_errors=True)
    for name, tok_kind, cls, cfg in archs():
        out = os.path.join(ROOT, name)
        tok = tokenizer(tok_kind)
        cfg.bos_token_id = tok.bos_token_id
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
        model = cls(cfg)
        randomize(model, name)
        model = model.to(torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        ids = tok(PROMPT, add_special_tokens=False)["input_ids"][:20]
        assert len(ids) == 20, len(ids)
        # Reload in float32 from disk (exact widening of the bfloat16 weights; RoPE buffers
        # computed in float32).
        model = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0].float().contiguous()
        toks, margins = greedy(model, ids, 16)
        tensors = {"ids": torch.tensor(ids, dtype=torch.int64).to(torch.uint32),
                   "logits": logits,
                   "greedy": torch.tensor(toks, dtype=torch.int64).to(torch.uint32),
                   "greedy_margin": torch.tensor(margins, dtype=torch.float32)}
        if name == "phi3":
            with torch.no_grad():
                tensors["short_logits"] = model(torch.tensor([ids[:10]]), use_cache=False) \
                    .logits[0].float().contiguous()
        nq = quantize_like_pocketlm(model)
        with torch.no_grad():
            tensors["q8_logits"] = model(torch.tensor([ids]), use_cache=False) \
                .logits[0].float().contiguous()
        q8_toks, _ = greedy(model, ids, 16)
        tensors["q8_greedy"] = torch.tensor(q8_toks, dtype=torch.int64).to(torch.uint32)
        agree = next((i for i, (a, b) in enumerate(zip(toks, q8_toks)) if a != b), 16)
        print(f"{name}: q8 ({nq} layers) max |q8 - float| "
              f"{(tensors['q8_logits'] - logits).abs().max().item():.3f}, "
              f"{agree} leading greedy tokens equal")
        save_file(tensors, os.path.join(ROOT, f"{name}.golden.safetensors"),
                  metadata={"transformers": transformers.__version__,
                            "torch": torch.__version__})
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{name}: folder {size // 1024} KB, greedy {toks}, min margin {min(margins):.3f}, "
              f"logit std {logits.std().item():.2f}")
        assert size < 300 * 1024, size


if __name__ == "__main__":
    main()
