#!/usr/bin/env python3
"""Golden model folders for pocketlm's Hugging Face / MLX folder loading
(`crates/pocketlm/tests/it/folders_golden.rs`).

Reference: Hugging Face transformers (`LlamaForCausalLM`, `save_pretrained`) and Apple MLX
(`mx.quantize` / `mx.dequantize`, affine mode, the format mlx-lm writes).

How to run (from the repository root):

    python3 -m venv /root/ref
    /root/ref/bin/pip install "torch==2.15.0" "transformers==5.23.0" "tokenizers==0.23.3" \
        "safetensors==0.8.0" "mlx[cpu]==0.32.4" numpy
    /root/ref/bin/python scripts/golden/tiny_folders.py

Versions used for the committed files: torch 2.15.0, transformers 5.23.0, tokenizers 0.23.3,
safetensors 0.8.0, mlx 0.32.4, Python 3.11, Linux x86_64 (CPU).

Output under `crates/pocketlm/tests/golden/folders/`:

- `tiny_llama/`: a random Llama (vocab 320, hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 128,
  untied lm_head), written by `save_pretrained` in bfloat16 (safetensors), with a byte-level
  BPE tokenizer trained here (tokenizer.json, tokenizer_config.json with a ChatML template).
- `tiny_llama_q8/`: the same weights quantized like `mlx_lm.convert -q --q-bits 8
  --q-group-size 64` would: every Linear and the embedding through `mx.quantize` on the
  bfloat16 weights, except `model.layers.0.mlp.down_proj` at 4 bits / group 32 and
  `model.layers.1.self_attn.o_proj` left in bfloat16 (per-layer overrides in config.json
  `quantization`, as mlx-lm's mixed quantization writes them). Saved with
  `mx.save_safetensors` (metadata format=mlx).
- `logits.safetensors`: `ids` `[20]` (u32, a 20-token prompt), `float` `[20, 320]` f32: the
  logits of transformers in float32 on the bfloat16 weights, `q8` `[20, 320]` f32: the same
  model whose quantized weights are replaced by their MLX dequantization as pocketlm computes
  it (Linear: `scale * q + bias` with scales/biases widened to f32, as `mx.quantized_matmul`
  with an f32 input does; Embedding: `mx.dequantize` in bfloat16, as `QuantizedEmbedding`).
"""
import json
import os
import shutil

import mlx.core as mx
import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "pocketlm", "tests",
                    "golden", "folders")
FLOAT = os.path.join(ROOT, "tiny_llama")
Q8 = os.path.join(ROOT, "tiny_llama_q8")
VOCAB = 320
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pack my box with five dozen liquor jugs, said the wizard.",
    "Rust is a systems programming language focused on safety and speed.",
    "Small language models run on laptops and phones without a network.",
    "Quantization stores weights in fewer bits: 8, 6, 5, 4, 3 or 2 per value.",
]


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def main():
    torch.manual_seed(0)
    for d in (FLOAT, Q8):
        shutil.rmtree(d, ignore_errors=True)
    tok = tokenizer()
    assert len(tok) <= VOCAB, len(tok)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=50000.0,
                      tie_word_embeddings=False, initializer_range=0.2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    model.save_pretrained(FLOAT, safe_serialization=True)
    tok.save_pretrained(FLOAT)

    ids = tok("Small models run on laptops: the quick brown fox jumps over a lazy wizard.")[
        "input_ids"][:20]
    assert len(ids) == 20, len(ids)
    # Reload from disk in float32 (exact widening of the bfloat16 weights). Casting the
    # in-memory model back with `.float()` would keep its RoPE `inv_freq` buffer rounded to
    # bfloat16 by the earlier `.to(torch.bfloat16)`.
    model = LlamaForCausalLM.from_pretrained(FLOAT, dtype=torch.float32).eval()
    with torch.no_grad():
        logits_float = model(torch.tensor([ids])).logits[0].float().contiguous()

    # MLX quantized copy.
    state = {k: v for k, v in model.state_dict().items()}
    bf16 = {k: mx.array(v.float().numpy()).astype(mx.bfloat16) for k, v in state.items()}
    overrides = {"model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 4},
                 "model.layers.1.self_attn.o_proj": False}
    out = {}
    quantized_state = {}
    for k, w in bf16.items():
        prefix = k[: -len(".weight")] if k.endswith(".weight") else None
        if prefix is None or w.ndim != 2 or overrides.get(prefix) is False:
            out[k] = w
            continue
        p = overrides.get(prefix, {"group_size": 64, "bits": 8})
        wq, s, b = mx.quantize(w, group_size=p["group_size"], bits=p["bits"])
        out[k] = wq
        out[prefix + ".scales"] = s
        out[prefix + ".biases"] = b
        if prefix == "model.embed_tokens":
            deq = mx.dequantize(wq, s, b, group_size=p["group_size"], bits=p["bits"])
        else:
            deq = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32),
                                group_size=p["group_size"], bits=p["bits"])
        quantized_state[k] = torch.from_numpy(np.array(deq.astype(mx.float32)))
    os.makedirs(Q8)
    mx.save_safetensors(os.path.join(Q8, "model.safetensors"), out, metadata={"format": "mlx"})
    with open(os.path.join(FLOAT, "config.json")) as f:
        qcfg = json.load(f)
    qcfg["quantization"] = {"group_size": 64, "bits": 8, **overrides}
    qcfg["quantization_config"] = qcfg["quantization"]
    with open(os.path.join(Q8, "config.json"), "w") as f:
        json.dump(qcfg, f, indent=2)
    for name in os.listdir(FLOAT):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json",
                                                    "chat_template.jinja"):
            shutil.copy(os.path.join(FLOAT, name), Q8)

    with torch.no_grad():
        sd = model.state_dict()
        for k, v in quantized_state.items():
            sd[k].copy_(v)
        logits_q8 = model(torch.tensor([ids])).logits[0].float().contiguous()

    save_file({"ids": torch.tensor(ids, dtype=torch.int64).to(torch.uint32),
               "float": logits_float, "q8": logits_q8},
              os.path.join(ROOT, "logits.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__,
                        "mlx": mx.__version__})
    print("ids", ids)
    print("max |float - q8|", (logits_float - logits_q8).abs().max().item())


if __name__ == "__main__":
    main()
