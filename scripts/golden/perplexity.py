#!/usr/bin/env python3
"""Golden perplexities of the default model on a short text, for
`crates/pocketlm/tests/it/perplexity.rs`.

References (nobody here wrote them):
- transformers: the loop of its guide "Perplexity of fixed-length models"
  (`docs/source/en/perplexity.md`: windows every `stride` tokens, at most `max_length` long,
  labels of the tokens earlier windows scored set to -100, `outputs.loss * num_loss_tokens`
  summed), on the default GGUF dequantized to float32 by transformers itself
  (`from_pretrained(gguf_file=...)`, the route of `llamacpp_greedy.py`).
- llama.cpp's `llama-perplexity` (build 0c1e570, vendored in the llama-cpp-python 0.3.36
  sdist) on the default GGUF (Q4_1) as it is: windows of `-c` tokens, BOS at each window's
  start, the second half of each window scored; f32 KV cache, no flash attention (the
  configuration our quantized logits equal bit for bit).

The text is `crates/pocketlm/tests/golden/perplexity/stdlib_excerpt.txt`, written here from
`data/stdlib-docs/test.jsonl` (the first records, one line each: `name: first docstring
sentence`), a few hundred tokens so that the test stays fast.

Setup (versions used for the committed file):
    python3 -m venv /root/ref-ppl && /root/ref-ppl/bin/pip install "torch==2.15.0" \
        "transformers==5.23.0" "tokenizers==0.23.3" "safetensors==0.8.0" "gguf==0.19.0" "accelerate==1.16.0" numpy
    # llama-perplexity: as scripts/bench-vs-llamacpp.sh builds llama-bench, into
    # ~/.cache/pocketlm/llama.cpp-ppl, with `--target llama-perplexity` (on CPUs with AMX:
    # GGML_NATIVE=OFF and the AVX flags listed there).
Run:
    /root/ref-ppl/bin/python scripts/golden/perplexity.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import os
import re
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
HOME = os.environ.get("POCKETLM_HOME", os.path.expanduser("~/.cache/pocketlm"))
MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HOME, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA_PPL = os.environ.get("LLAMA_PERPLEXITY") or os.path.join(HOME, "llama.cpp-ppl", "build", "bin", "llama-perplexity")
OUT_DIR = os.path.join(ROOT, "crates", "pocketlm", "tests", "golden", "perplexity")
N_RECORDS = 40

# transformers' windows (the guide's max_length and stride).
MAX_LENGTH = 256
STRIDE = 128
# llama-perplexity's window (-c).
LLAMA_CTX = 256


def write_text():
    lines = []
    with open(os.path.join(ROOT, "data", "stdlib-docs", "test.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            name = re.match(r"In Python, what does (\S+) do\?", r["prompt"]).group(1)
            lines.append(f"{name}: {r['completion']}\n")
            if len(lines) == N_RECORDS:
                break
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, "stdlib_excerpt.txt")
    with open(path, "w") as f:
        f.write("".join(lines))
    return path


def transformers_ppl(text):
    d, name = os.path.dirname(MODEL), os.path.basename(MODEL)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    encodings = tok(text, return_tensors="pt")
    # The guide's loop, with each window's sum and count kept.
    seq_len = encodings.input_ids.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    windows = []
    for begin_loc in range(0, seq_len, STRIDE):
        end_loc = min(begin_loc + MAX_LENGTH, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # subtract batch_size due to internal label shift
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        # The tokens the loss is the mean of: labels other than -100 after the model's shift
        # (`labels[..., 1:]`). For the first window that is num_loss_tokens; for the others,
        # whose first label is already -100, it is trg_len, one more than the guide counts.
        scored = (target_ids[:, 1:] != -100).sum().item()
        loss = float(neg_log_likelihood)
        windows.append({"begin": begin_loc, "end": end_loc, "trg_len": trg_len, "loss": loss,
                        "scored": scored, "nll_sum": loss * scored, "guide_num_loss_tokens": num_loss_tokens})
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    avg_nll = nll_sum / n_tokens
    guide_ppl = float(torch.exp(torch.tensor(float(avg_nll), dtype=torch.float64)))
    # Every token but the text's first, each once, weighted equally.
    scored = sum(w["scored"] for w in windows)
    mean_nll = sum(w["nll_sum"] for w in windows) / scored
    return {
        "model": f"transformers {__import__('transformers').__version__}, AutoModelForCausalLM.from_pretrained(gguf_file={name}, dtype=float32)",
        "max_length": MAX_LENGTH,
        "stride": STRIDE,
        "text_tokens": seq_len,
        "ids_head": encodings.input_ids[0, :8].tolist(),
        "windows": windows,
        "tokens_scored": scored,
        "mean_nll": mean_nll,
        "perplexity": float(torch.exp(torch.tensor(mean_nll, dtype=torch.float64))),
        "guide_tokens": n_tokens,
        "guide_perplexity": guide_ppl,
    }


def llama_ppl(text_path):
    cmd = [LLAMA_PPL, "-m", MODEL, "-f", text_path, "-c", str(LLAMA_CTX), "-b", str(LLAMA_CTX),
           "-t", "2", "-ctk", "f32", "-ctv", "f32", "-fa", "off"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        sys.exit(out)
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    chunks = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+),", out)]
    n_tokens = re.search(r"tokenizes to only (\d+)|have (\d+) tokens", out)
    return {
        "command": "llama-perplexity " + " ".join(c if c not in (MODEL, text_path) else os.path.basename(c) for c in cmd[1:]),
        "context": LLAMA_CTX,
        "chunks": len(chunks),
        "cumulative_perplexity": chunks,
        "perplexity": float(final.group(1)),
        "perplexity_uncertainty": float(final.group(2)),
    }


def main():
    path = write_text()
    text = open(path).read()
    golden = {
        "text": os.path.basename(path),
        "transformers": transformers_ppl(text),
        "llama_perplexity": llama_ppl(path),
    }
    with open(os.path.join(OUT_DIR, "smollm2.json"), "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(json.dumps(golden, indent=1))


if __name__ == "__main__":
    main()
