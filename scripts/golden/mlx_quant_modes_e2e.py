#!/usr/bin/env python3
"""End-to-end golden data for MLX's float quantization modes with mlx-lm: `mlx_lm.convert
--q-mode {mxfp4,mxfp8,nvfp4}` of the tiny Llama folder of `tests/golden/folders/tiny_llama`,
and mlx-lm's logits and greedy tokens on each converted folder.

How to run (from the repository root; a few seconds):

    python3 -m venv /tmp/venv-mx
    /tmp/venv-mx/bin/pip install "mlx[cpu]==0.32.4" "mlx-lm==0.32.2" "numpy==2.4.6"
    /tmp/venv-mx/bin/python scripts/golden/mlx_quant_modes_e2e.py

Versions used for the committed files: mlx 0.32.4, mlx-lm 0.32.2, numpy 2.4.6, Python 3.11.7,
Linux x86_64 (written into the metadata).

Output, under `crates/pocketlm/tests/golden/mlx_quant_modes/`:
- `tiny_llama_mxfp4/`: the folder `mlx_lm.convert(tiny_llama, quantize=True, q_mode="mxfp4",
  dtype="float32")` writes (config.json with `"quantization": {"group_size": 32, "bits": 4,
  "mode": "mxfp4"}`, uint32 weights and uint8 scales, float32 norms);
- `e2e.safetensors`: `ids` (the prompt, int64 [12]); for each mode `{mode}.logits` (mlx-lm's
  float32 logits of the prompt, [12, 320]) and `{mode}.tokens` (16 greedy tokens after the
  prompt, with mlx-lm's KV cache, no EOS stop, int64 [16]);
- `e2e.json`: for each mode the config.json `quantization` mlx-lm wrote and the digest of every
  tensor of its folder (`dtype[shape]:h`, h the first 16 hex digits of the sha256 of the bytes
  as stored), so that the Rust test checks that our own `convert --q-mode` writes the same
  tensors, which mlx-lm therefore loads as its own.

float32 folders: mlx-lm then computes in float32 as pocketlm does (the tiny model is stored in
bfloat16; casting to float32 is exact), so logits can be compared closely.

The source's config.json (transformers 5) has only `rope_parameters`; mlx-lm 0.32.2 reads only
`rope_theta` and would silently use base 10000, so the script converts a copy with
`rope_theta` added (what pocketlm's `convert` writes too, `loader::normalize_config`).
"""

import hashlib
import json
import os
import shutil
import tempfile

import mlx.core as mx

mx.set_default_device(mx.cpu)

import mlx_lm  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.convert import convert as mlx_convert  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "crates/pocketlm/tests/golden/folders/tiny_llama")
OUT = os.path.join(ROOT, "crates/pocketlm/tests/golden/mlx_quant_modes")
PROMPT = [0, 17, 42, 5, 260, 99, 13, 311, 7, 64, 128, 3]
STEPS = 16


def digest(a):
    mx.eval(a)
    raw = memoryview(a).tobytes() if a.dtype != mx.bfloat16 else memoryview(a.view(mx.uint16)).tobytes()
    dtype = str(a.dtype).replace("mlx.core.", "")
    shape = ",".join(str(d) for d in a.shape)
    return f"{dtype}[{shape}]:{hashlib.sha256(raw).hexdigest()[:16]}"


def run(folder):
    model, _ = load(folder)
    x = mx.array([PROMPT])
    logits = model(x)[0].astype(mx.float32)
    cache = make_prompt_cache(model)
    out = []
    for _ in range(STEPS):
        lg = model(x, cache=cache)
        t = int(mx.argmax(lg[0, -1]).item())
        out.append(t)
        x = mx.array([[t]])
    return logits, out


def main():
    work = tempfile.mkdtemp(prefix="mlx-quant-modes-")
    src = os.path.join(work, "src")
    shutil.copytree(SRC, src)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {"ids": mx.array(PROMPT, dtype=mx.int64)}
    meta = {"mlx_version": mx.__version__, "mlx_lm_version": mlx_lm.__version__, "modes": {}}
    for mode in ("mxfp4", "mxfp8", "nvfp4"):
        folder = os.path.join(work, mode)
        mlx_convert(src, folder, quantize=True, q_mode=mode, dtype="float32")
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        weights = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                weights.update(mx.load(os.path.join(folder, name)))
        meta["modes"][mode] = {
            "quantization": config["quantization"],
            "digests": {k: digest(v) for k, v in sorted(weights.items())},
        }
        logits, toks = run(folder)
        tensors[f"{mode}.logits"] = logits
        tensors[f"{mode}.tokens"] = mx.array(toks, dtype=mx.int64)
        print(mode, config["quantization"], toks)
        if mode == "mxfp4":
            dst = os.path.join(OUT, "tiny_llama_mxfp4")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(folder, dst)
    os.makedirs(OUT, exist_ok=True)
    mx.save_safetensors(
        os.path.join(OUT, "e2e.safetensors"),
        tensors,
        metadata={"mlx_version": mx.__version__, "source": "scripts/golden/mlx_quant_modes_e2e.py"},
    )
    with open(os.path.join(OUT, "e2e.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    shutil.rmtree(work)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
