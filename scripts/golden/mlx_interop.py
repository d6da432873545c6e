#!/usr/bin/env python3
"""Golden data for interop with mlx-lm on the real default model (SmolLM2-135M-Instruct).

Run (about 2 minutes on 2 CPU cores):
    python3 -m venv /root/ref && /root/ref/bin/pip install "mlx[cpu]==0.32.4" "mlx-lm==0.32.2"
    cargo build --release -p pocketlm-cli
    /root/ref/bin/python scripts/golden/mlx_interop.py [--pocketlm target/release/pocketlm]

Versions used for the committed file: mlx 0.32.4 (mlx[cpu], Linux x86_64), mlx-lm 0.32.2,
transformers as pulled in by mlx-lm (printed into the output).

What it does, in a temporary folder (no model folder is committed):
1. `pocketlm convert` of the default GGUF (dequantized to f32 first) into
   - `ours_q4`:    `-q --q-bits 4 --q-group-size 64 --dtype f32`
   - `ours_mixed`: `-q --q-bits 4 --q-group-size 64 --quant-predicate mixed_3_6 --dtype f32`
   - `float`:      `--dtype f32` (a float Hugging Face folder of the same model);
2. `mlx_lm.convert` of `float` into `mlx_q4` (`-q --q-bits 4 --q-group-size 64 --dtype float32`)
   and `mlx_mixed` (the same plus `--quant-predicate mixed_3_6`);
3. checks that our quantized tensors equal mlx-lm's bit for bit (same names, dtypes, shapes,
   bytes) and that both config.json `quantization` objects give every layer the same
   bits / group size;
4. greedy-decodes 32 tokens with mlx-lm (`mlx_lm.load` + a manual argmax loop with mlx-lm's
   KV cache, no EOS stop) after a chat prompt, on all four quantized folders.

Output `crates/pocketlm/tests/golden/mlx_interop/golden.json`: the prompt and its token ids,
mlx-lm's 32 greedy tokens per folder, and for each mlx-lm-written folder its config.json and
a digest of every tensor (dtype, shape, 64 bits of the sha256 of its bytes; so that `tests/it/mlx_interop.rs` can check, without Python,
that its own conversion reproduces mlx-lm's weights, then compare its tokens with mlx-lm's).

Why f32 and not the usual f16: on Linux CPU, mlx 0.32.4's quantized matmul with float16
scales / activations is very slow (measured here: 4.3 s per decoded token for this 135M
model, against 0.13 s with float32 scales and 0.5 s for the f16 float model); that is why
`mlx_lm.generate` on our default f16 4-bit folder ran past 300 s. It is not a thread or OMP
issue (user time equals wall time either way). With f32 folders both directions run in
seconds, and pocketlm computes in f32 anyway.
"""

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import mlx.core as mx

mx.set_default_device(mx.cpu)

import mlx_lm  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.convert import convert as mlx_convert  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "crates/pocketlm/tests/golden/mlx_interop/golden.json")
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
STEPS = 32


def tensors(folder):
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(mx.load(f))
    return out


def tensor_digest(a):
    """`dtype[shape]:h`, h the first 16 hex digits of the sha256 of the tensor's little-endian
    bytes as safetensors stores them."""
    mx.eval(a)
    raw = memoryview(a).tobytes() if a.dtype != mx.bfloat16 else memoryview(a.view(mx.uint16)).tobytes()
    dtype = str(a.dtype).replace("mlx.core.", "")
    shape = ",".join(str(d) for d in a.shape)
    return f"{dtype}[{shape}]:{hashlib.sha256(raw).hexdigest()[:16]}"


def effective_quant(config, prefixes):
    q = config.get("quantization", {})
    default = {"group_size": q.get("group_size"), "bits": q.get("bits")}
    out = {}
    for p in prefixes:
        v = q.get(p, default)
        out[p] = None if v is False else (v["group_size"], v["bits"])
    return out


def greedy(folder, prompt_ids):
    model, tok = load(folder)
    cache = make_prompt_cache(model)
    x = mx.array([prompt_ids])
    out = []
    t0 = time.time()
    for _ in range(STEPS):
        logits = model(x, cache=cache)
        t = int(mx.argmax(logits[0, -1]).item())
        out.append(t)
        x = mx.array([[t]])
    print(f"{os.path.basename(folder)}: {STEPS} tokens in {time.time() - t0:.1f}s: {tok.decode(out)!r}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pocketlm", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "pocketlm"))
    home = os.environ.get("POCKETLM_HOME", os.path.expanduser("~/.cache/pocketlm"))
    ap.add_argument("--gguf", default=os.path.join(home, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--work", default=None, help="keep the folders here (default: a temporary folder)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="mlx-interop-")
    os.makedirs(work, exist_ok=True)
    q = ["-q", "--q-bits", "4", "--q-group-size", "64", "--dtype", "f32"]
    ours = {"ours_q4": q, "ours_mixed": q + ["--quant-predicate", "mixed_3_6"], "float": ["--dtype", "f32"]}
    for name, flags in ours.items():
        dst = os.path.join(work, name)
        if not os.path.exists(dst):
            subprocess.run([args.pocketlm, "convert", "-m", args.gguf, "--out", dst] + flags, check=True)
    theirs = {"mlx_q4": None, "mlx_mixed": "mixed_3_6"}
    for name, predicate in theirs.items():
        dst = os.path.join(work, name)
        if not os.path.exists(dst):
            mlx_convert(os.path.join(work, "float"), dst, quantize=True, q_group_size=64, q_bits=4,
                        dtype="float32", quant_predicate=predicate)

    result = {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "messages": MESSAGES,
              "steps": STEPS, "tokens": {}, "mlx_folders": {}, "bit_identical": {}}
    for ours_name, mlx_name in [("ours_q4", "mlx_q4"), ("ours_mixed", "mlx_mixed")]:
        a, b = tensors(os.path.join(work, ours_name)), tensors(os.path.join(work, mlx_name))
        da = {k: tensor_digest(v) for k, v in a.items()}
        db = {k: tensor_digest(v) for k, v in b.items()}
        diff = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
        with open(os.path.join(work, ours_name, "config.json")) as f:
            ca = json.load(f)
        with open(os.path.join(work, mlx_name, "config.json")) as f:
            cb = json.load(f)
        prefixes = sorted(k[: -len(".scales")] for k in db if k.endswith(".scales"))
        same_q = effective_quant(ca, prefixes) == effective_quant(cb, prefixes)
        print(f"{ours_name} vs {mlx_name}: {len(db)} tensors, {len(diff)} differ {diff[:5]}; "
              f"per-layer quantization equal: {same_q}")
        result["bit_identical"][ours_name] = {"tensors": len(db), "differ": diff,
                                              "quantization_equal": same_q}
        result["mlx_folders"][mlx_name] = {"config": cb, "tensors": db}

    _, tok = load(os.path.join(work, "ours_q4"))
    prompt_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    if isinstance(prompt_ids, dict):
        prompt_ids = prompt_ids["input_ids"]
    result["prompt_ids"] = [int(i) for i in prompt_ids]
    for name in ["ours_q4", "mlx_q4", "ours_mixed", "mlx_mixed"]:
        result["tokens"][name] = greedy(os.path.join(work, name), result["prompt_ids"])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", OUT, os.path.getsize(OUT), "bytes; work folder", work)


if __name__ == "__main__":
    sys.exit(main())
