#!/usr/bin/env python3
"""Embedding throughput of all-MiniLM-L6-v2: `pocketlm embed` against sentence-transformers on
the same machine, batch 32, side by side (runs alternate, best of `--repeats` each).

Texts: the first sentence of the docstring of every public function and class of a fixed list
of standard-library modules (real English of typical sentence length), the first `--n`.

How to run (from the repository root, after `cargo build --release -p pocketlm-cli`):

    /root/ref-ppl/bin/pip install "sentence-transformers==6.3.0"
    /root/ref-ppl/bin/python scripts/bench_embeddings.py --pocketlm target/release/pocketlm \\
        --model-dir ~/.cache/pocketlm/models/all-MiniLM-L6-v2

Both use every core (torch's default intra-op threads, pocketlm's rayon pool); loading is not
timed (pocketlm's `--verbose` timing covers tokenizing and embedding; sentence-transformers'
is `encode`, which tokenizes too).
"""
import argparse
import inspect
import importlib
import re
import subprocess
import tempfile
import time

MODULES = ["os", "json", "collections", "itertools", "functools", "pathlib", "re", "string",
           "textwrap", "argparse", "logging", "subprocess", "shutil", "random", "statistics",
           "datetime", "calendar", "heapq", "bisect", "typing", "dataclasses", "enum", "csv",
           "zipfile", "tarfile", "gzip", "hashlib", "base64", "socket", "threading", "asyncio",
           "unittest", "difflib", "email", "html", "urllib.parse", "http.client", "decimal",
           "fractions", "math", "tempfile", "glob", "fnmatch", "inspect", "ast", "tokenize"]


def sentences(n):
    out = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None)) or ""
            first = re.split(r"(?<=[.!?])\s", " ".join(doc.split("\n\n")[0].split()))[0]
            if 20 <= len(first) <= 300 and first not in out:
                out.append(first)
    assert len(out) >= n, f"only {len(out)} sentences"
    return out[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pocketlm", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    texts = sentences(args.n)
    from sentence_transformers import SentenceTransformer
    import torch
    st = SentenceTransformer(args.model_dir, device="cpu")
    st.encode(texts[:64], batch_size=32)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(texts) + "\n")
    cmd = [args.pocketlm, "embed", "--model", args.model_dir, "--device", "cpu", "--file", f.name,
           "--batch-size", "32", "--verbose"]
    best_st, best_pl = 0.0, 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        st.encode(texts, batch_size=32)
        best_st = max(best_st, len(texts) / (time.perf_counter() - t0))
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rate = float(re.search(r"([0-9.]+) texts/s", r.stderr).group(1))
        best_pl = max(best_pl, rate)
    print(r.stderr.strip())
    print(f"{len(texts)} texts, batch 32, torch threads {torch.get_num_threads()}")
    print(f"sentence-transformers: {best_st:.1f} texts/s")
    print(f"pocketlm embed:        {best_pl:.1f} texts/s")


if __name__ == "__main__":
    main()
