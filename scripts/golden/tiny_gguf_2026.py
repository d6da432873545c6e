#!/usr/bin/env python3
"""llama.cpp's GGUF conversions of this round's tiny models (issue #25: `ministral3`,
`gemma4_text`, `gpt_oss`, `deepseek_v3`, `qwen3_5`, `qwen3_5_moe`) and llama.cpp's greedy
tokens on them, for
`crates/pocketlm/tests/it/archs_2026.rs` (`*_gguf_matches_llama_cpp`).

References: llama.cpp as vendored by llama-cpp-python 0.3.36: its converter
(`convert_hf_to_gguf.py`, architectures `mistral3`, `gemma4`, `gpt-oss`, `deepseek2`, `qwen35`,
`qwen35moe`) and the
library (`llama_cpp.Llama`) for the greedy tokens.

How to run (from the repository root, after `tiny_moe.py` (which clears the folder),
`tiny_2026b.py`, `tiny_gemma4_moe.py`, `tiny_gpt_oss.py`, `tiny_deepseek_v3.py` and
`tiny_qwen3_5.py`, in the
environment of `tiny_moe.py`; `--only NAME` (repeatable) makes only those files):

    /tmp/venv-moe/bin/pip install --no-build-isolation llama-cpp-python==0.3.36
    /tmp/venv-moe/bin/python scripts/golden/tiny_gguf_2026.py [--only qwen3_5 ...]

Versions used for the committed files: llama-cpp-python 0.3.36 (its vendored llama.cpp and
gguf-py), torch 2.15.0, transformers 5.24.0, safetensors 0.8.0, Python 3.11, Linux x86_64 (CPU).

Output under `crates/pocketlm/tests/golden/archs_2026/` (only these files are written; nothing
else there is touched):

- `<name>.gguf`: `convert_hf_to_gguf.py --outtype q8_0` of the folder `<src>/` for
  (name, src) = (ministral3, ministral3), (gemma4_text, gemma4_text),
  (gemma4_moe, gemma4_moe: experts kept fused as `ffn_gate_up_exps`), (gpt_oss_mxfp4, gpt_oss_mxfp4), (qwen3_5, qwen3_5), (qwen3_5_moe, qwen3_5_moe),
  (qwen3_5_tiled, a variant of qwen3_5 made here: `TILED`), and `--outtype f16` for
  (deepseek_v3, deepseek_v3) (why: `MODELS`). The Qwen3.5 folders are converted with
  `--no-mtp` (they have no multi-token-prediction layers, and without the flag the converter
  asserts it finds some); the converter stores their DeltaNet's value heads tiled
  (`_LinearAttentionVReorderBase`), a reordering that is the identity for the tiny folders'
  one key head, hence `qwen3_5_tiled`: 2 key heads, 4 value heads. Matrices Q8_0 (f16 where the converter cannot quantize a 16-wide row), norms f32;
  gpt-oss's experts, MXFP4 in the Hub layout folder, are kept MXFP4 (ggml type 39) by the
  converter; DeepSeek-V3's `kv_b_proj` is split by the converter into `attn_k_b` (transposed,
  per head) and `attn_v_b`; its folder is converted with `scoring_func: sigmoid` added to
  config.json (see `MODELS`).
- `<name>.gguf_llamacpp.safetensors`, llama.cpp on that file (f32 KV cache, no flash
  attention) after prompt `prompt` `[1]` u32 (`ids{prompt}` of `<golden>.golden.safetensors`;
  gpt_oss_mxfp4: `gpt_oss.golden`): `logits` `[len, 320]` f32 at every prompt position,
  `greedy` `[16]` u32 (argmax of each step's logits) and `greedy_margin` `[16]` f32 (top-1
  minus top-2 logit). qwen3_5_tiled uses qwen3_5's prompts. Of prompts 0, 1, 2 the one whose smallest margin is largest: on a
  near-tie the rounding of llama.cpp's 8-bit activations (its Q8_0 and MXFP4 dot products
  quantize them) picks the token, not the model.

Two things are patched in the converter, neither touching the weights or model metadata: the
tiny byte-level BPE tokenizer (`tiny_archs.py`) is declared `gpt-2` pre-tokenizer (as
`tiny_moe.py` does), and Gemma 4's `set_vocab`, which accepts only a SentencePiece-style BPE
tokenizer (`LlamaHfVocab`: byte fallback), writes it as a GPT-2 BPE vocabulary instead. The
tokens are fed as ids, so the tokenizer does not change them.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_moe import ROOT, llamacpp_run, vendored_llama_cpp  # noqa: E402

# (GGUF / golden name, source folder (None: made by `make_source`), golden file with the
# prompts, `--outtype`, config.json fields added to a copy of the folder before converting,
# further converter arguments)
# Qwen3.5's multimodal RoPE sections (rotary pairs per position component), which the tiny
# folders do not set: the converter then writes the Hub's [11, 11, 10], more than their 2
# rotary pairs (4 of 16 dimensions), and ggml asserts. [1, 1, 0] fits; for text every component
# is the token's position, so the sections do not change the rotation.
QWEN35_ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                   "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0]}}

MODELS = [
    ("ministral3", "ministral3", "ministral3", "q8_0", {}, []),
    ("gemma4_text", "gemma4_text", "gemma4_text", "q8_0", {}, []),
    ("gemma4_moe", "gemma4_moe", "gemma4_moe", "q8_0", {}, []),
    ("gpt_oss_mxfp4", "gpt_oss_mxfp4", "gpt_oss", "q8_0", {}, []),
    # f16: on the q8_0 conversion llama.cpp runs the split `attn_k_b` / `attn_v_b` as Q8_0 dot
    # products over 8-bit-rounded activations, where pocketlm joins them back into one f32
    # `kv_b_proj` at load; the logits then part by up to 1.1 and the greedy steps come within
    # 0.08 of a tie. The Hub's DeepSeek-V3 config.json says `scoring_func: sigmoid` (what
    # transformers' router computes); transformers 5 does not write the field, and without it
    # llama.cpp's converter writes no `expert_gating_func` and llama.cpp routes by softmax.
    ("deepseek_v3", "deepseek_v3", "deepseek_v3", "f16", {"scoring_func": "sigmoid"}, []),
    ("qwen3_5", "qwen3_5", "qwen3_5", "q8_0", QWEN35_ROPE, ["--no-mtp"]),
    ("qwen3_5_moe", "qwen3_5_moe", "qwen3_5_moe", "q8_0", QWEN35_ROPE, ["--no-mtp"]),
    ("qwen3_5_tiled", None, "qwen3_5", "q8_0", QWEN35_ROPE, ["--no-mtp"]),
]

# qwen3_5_tiled: `tiny_qwen3_5.py`'s dense model with 2 DeltaNet key heads and 4 value heads
# (the converter's value-head reordering is then not the identity), made here by transformers
# with that script's initialisation, seed 0, bfloat16.
TILED = dict(linear_num_key_heads=2, linear_num_value_heads=4)

CONVERT = r'''
import sys
sys.path.insert(0, {llama!r} + "/gguf-py")
sys.path.insert(0, {llama!r})
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outtype", {outtype!r}, "--outfile", {out!r},
            "--model-name", "tiny-random"] + {args!r}
import convert_hf_to_gguf as c
import conversion.base as base
import conversion.gemma as gemma
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
gemma.Gemma4Model.set_vocab = lambda self: self._set_vocab_gpt2()
c.main()
'''


def patched_copy(folder, extra):
    """A temporary copy of `folder` with `extra` added to its config.json."""
    dst = os.path.join(tempfile.mkdtemp(prefix="tiny-gguf-"), os.path.basename(folder))
    shutil.copytree(folder, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(extra)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return dst


def make_source(name):
    """A temporary folder of the model `name` that has no folder of its own (`TILED`)."""
    assert name == "qwen3_5_tiled", name
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    from tiny_archs import tokenizer
    from tiny_qwen3_5 import COMMON, randomize
    torch.manual_seed(0)
    cfg = Qwen3_5TextConfig(**dict(COMMON, **TILED), intermediate_size=32,
                            tie_word_embeddings=False)
    tok = tokenizer("chatml")
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    model = Qwen3_5ForCausalLM(cfg)
    randomize(model)
    dst = os.path.join(tempfile.mkdtemp(prefix="tiny-gguf-"), name)
    model.to(torch.bfloat16).save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    return dst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", action="append", help="make only this GGUF (repeatable)")
    only = ap.parse_args().only
    llama = vendored_llama_cpp()
    for name, src, golden, outtype, extra, args in MODELS:
        if only and name not in only:
            continue
        gguf = os.path.join(ROOT, f"{name}.gguf")
        if os.path.exists(gguf):
            os.remove(gguf)
        folder = os.path.join(ROOT, src) if src else make_source(name)
        if extra:
            folder = patched_copy(folder, extra)
        subprocess.check_call([sys.executable, "-c", CONVERT.format(
            llama=llama, src=folder, out=gguf, outtype=outtype, args=args)])
        g = load_file(os.path.join(ROOT, f"{golden}.golden.safetensors"))
        # The prompt whose 16 greedy steps keep the widest top-1/top-2 margin: on near-ties
        # the rounding of 8-bit weights and activations, not the model, picks the token.
        runs = [llamacpp_run(gguf, [int(i) for i in g[f"ids{p}"]], 16) for p in range(3)]
        p = max(range(3), key=lambda p: min(runs[p][2]))
        logits, toks, margins = runs[p]
        save_file({"prompt": np.array([p], dtype=np.uint32),
                   "logits": logits,
                   "greedy": np.array(toks, dtype=np.uint32),
                   "greedy_margin": np.array(margins, dtype=np.float32)},
                  os.path.join(ROOT, f"{name}.gguf_llamacpp.safetensors"))
        print(f"{name}: llama.cpp greedy after prompt {p} {toks}, min margin "
              f"{min(margins):.3f} (prompts: {[round(min(r[2]), 3) for r in runs]}); "
              f"gguf {os.path.getsize(gguf) // 1024} KB")


if __name__ == "__main__":
    main()
