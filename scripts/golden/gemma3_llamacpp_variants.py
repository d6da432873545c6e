"""How much llama.cpp's own greedy tokens on Gemma 3 270M (Q4_K_M) depend on its settings.

For each configuration (KV cache f32 or f16 = llama.cpp's default, flash attention, threads,
prefill in one batch or token by token), prints per prompt: how many of the 24 greedy tokens
of `crates/pocketlm/tests/golden/archs/gemma3_270m_llamacpp.json` (f32 KV cache, no flash
attention, 2 threads) it reproduces, and its largest first-step logit difference from that
golden's top 5. Measured with llama-cpp-python 0.3.36 (2026-11-24):

    f32kv_noflash_t2 [(24, 0.0), (24, 0.0), (24, 0.0)]
    f32kv_noflash_t1 [(24, 0.0), (24, 0.0), (24, 0.0)]
    default_f16kv [(18, 0.3057), (24, 0.403), (3, 0.5348)]
    f16kv_noflash [(18, 0.3057), (24, 0.403), (3, 0.5348)]
    f32kv_flash [(18, 0.2622), (24, 0.6536), (3, 0.6613)]
    f32kv_noflash_batch1 [(5, 0.0986), (24, 0.1326), (24, 0.2366)]

Run: /root/ref/bin/python scripts/golden/gemma3_llamacpp_variants.py
"""
import json
import os

import numpy as np
from llama_cpp import Llama
HOME = os.environ.get("POCKETLM_HOME", os.path.expanduser("~/.cache/pocketlm"))
MODEL = os.path.join(HOME, "models", "gemma-3-270m-q4_k_m.gguf")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
gold = json.load(open(os.path.join(os.path.dirname(__file__), "..", "..", "crates", "pocketlm", "tests",
                             "golden", "archs", "gemma3_270m_llamacpp.json")))
variants = {
  "f32kv_noflash_t2": dict(flash_attn=False, type_k=0, type_v=0, n_threads=2),
  "f32kv_noflash_t1": dict(flash_attn=False, type_k=0, type_v=0, n_threads=1),
  "default_f16kv": dict(n_threads=2),
  "f16kv_noflash": dict(flash_attn=False, n_threads=2),
  "f32kv_flash": dict(flash_attn=True, type_k=0, type_v=0, n_threads=2),
  "f32kv_noflash_batch1": dict(flash_attn=False, type_k=0, type_v=0, n_threads=2, n_batch=1, n_ubatch=1),
}
for name, cfg in variants.items():
    kw = dict(n_ctx=1024, logits_all=True, verbose=False)
    kw.setdefault("n_batch", 512)
    kw.update(cfg)
    llm = Llama(model_path=MODEL, **kw)
    res = []
    for text, case in zip(PROMPTS, gold["cases"]):
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        llm.reset(); llm.eval(ids)
        out = []; first = None
        for s in range(24):
            lg = np.array(llm.scores[llm.n_tokens-1], dtype=np.float32)
            if s == 0: first = lg
            t = int(np.argmax(lg)); out.append(t); llm.eval([t])
        same = next((i for i,(a,b) in enumerate(zip(out, case["greedy_ids"])) if a!=b), 24)
        g0 = dict((i, v) for i, v in case["top5_per_step"][0])
        d0 = max(abs(first[i]-v) for i, v in g0.items())
        res.append((same, round(float(d0),4)))
    print(name, res, flush=True)
    del llm
