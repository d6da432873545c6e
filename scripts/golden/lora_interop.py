#!/usr/bin/env python3
"""Golden data for LoRA interop with mlx-lm on the real default model (SmolLM2-135M-Instruct).

Run (a few minutes on 2 CPU cores):
    cargo build --release -p pocketlm-cli
    /root/ref/bin/python scripts/golden/lora_interop.py [--pocketlm target/release/pocketlm]

Versions of the committed files: mlx 0.32.4 (mlx[cpu], Linux x86_64), mlx-lm 0.32.2.

In a temporary folder:
1. `pocketlm convert --dtype f32` of the default GGUF: `float`, a float32 Hugging Face folder
   of the model (f32 because mlx's CPU kernels are very slow in f16, see mlx_interop.py).
2. `mlx_lm.lora --train` on `float` with `data/stdlib-docs` (only 4 steps of batch 1 at lr 2e-3,
   last 2 blocks, rank 4, keys q/k/v/down: mlx 0.32.4's CPU backend took about 50 s per
   forward pass of 2 x 97 tokens on the shared 2-core machine, so a longer run did not fit): the adapter `mlx_adapter`, copied into
   `crates/pocketlm/tests/golden/lora/mlx_adapter/`.
3. `pocketlm lora --train` on the quantized GGUF itself (QLoRA), 20 steps of 4 at lr 2e-4, same
   blocks, rank and keys: the
   adapter `our_adapter`, copied into `crates/pocketlm/tests/golden/lora/our_adapter/`.
4. `pocketlm fuse` of `float` + `mlx_adapter` (f32) and `mlx_lm.fuse` of the same; the
   largest difference between their fused weights is recorded (the fusion formula is the same).
5. mlx-lm's greedy tokens (manual argmax loop with its KV cache, no EOS stop) after a chat
   prompt: base `float`, `float` + `mlx_adapter` (`mlx_lm.load(adapter_path=...)`, what
   `mlx_lm.generate --adapter-path` runs), `float` + `our_adapter`, our fused folder and
   mlx-lm's fused folder.

Output: `crates/pocketlm/tests/golden/lora/golden.json` and the two adapter folders.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import mlx.core as mx

mx.set_default_device(mx.cpu)

import mlx_lm  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLD = os.path.join(ROOT, "crates/pocketlm/tests/golden/lora")
DATA = os.path.join(ROOT, "data/stdlib-docs")
MESSAGES = [{"role": "user", "content": "In Python, what does os.path.basename do?"}]
STEPS = 24
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"]


def greedy(folder, prompt_ids, adapter=None):
    model, tok = load(folder, adapter_path=adapter)
    cache = make_prompt_cache(model)
    x = mx.array([prompt_ids])
    out = []
    t0 = time.time()
    for _ in range(STEPS):
        logits = model(x, cache=cache)
        t = int(mx.argmax(logits[0, -1]).item())
        out.append(t)
        x = mx.array([[t]])
    name = os.path.basename(folder) + (f" + {os.path.basename(adapter)}" if adapter else "")
    print(f"{name}: {time.time() - t0:.1f}s: {tok.decode(out)!r}")
    return out


def tensors(folder):
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(mx.load(f))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pocketlm", default=os.path.join(ROOT, "target/release/pocketlm"))
    ap.add_argument("--gguf", default=os.path.expanduser("~/.cache/pocketlm/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="lora-interop-")
    os.makedirs(work, exist_ok=True)
    run = lambda cmd: subprocess.run(cmd, check=True)
    float_dir = os.path.join(work, "float")
    if not os.path.isdir(float_dir):
        run([args.pocketlm, "convert", "-m", args.gguf, "--out", float_dir, "--dtype", "f32"])

    # 2. mlx-lm trains an adapter on the float folder.
    mlx_adapter = os.path.join(work, "mlx_adapter")
    cfg = {
        "model": float_dir, "train": True, "data": DATA, "fine_tune_type": "lora",
        "num_layers": 2, "batch_size": 1, "iters": 4, "learning_rate": 2e-3,
        "val_batches": 1, "steps_per_eval": 1000, "steps_per_report": 10, "save_every": 1000,
        "adapter_path": mlx_adapter, "mask_prompt": True, "seed": 0,
        "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": KEYS},
    }
    cfg_path = os.path.join(work, "mlx_lora.yaml")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    t0 = time.time()
    run([sys.executable, "-m", "mlx_lm", "lora", "-c", cfg_path])
    print(f"mlx_lm.lora: {time.time() - t0:.1f}s")

    # 3. pocketlm trains an adapter on the quantized GGUF.
    our_adapter = os.path.join(work, "our_adapter")
    t0 = time.time()
    run([args.pocketlm, "lora", "-m", args.gguf, "--train", "--data", DATA, "--num-layers", "2",
         "--batch-size", "4", "--iters", "20", "--learning-rate", "2e-4", "--val-batches", "2",
         "--steps-per-eval", "1000", "--save-every", "0", "--mask-prompt", "--rank", "4",
         "--keys", ",".join(KEYS), "--adapter-path", our_adapter])
    print(f"pocketlm lora: {time.time() - t0:.1f}s")

    # 4. Fusion, both ways.
    ours_fused = os.path.join(work, "ours_fused")
    mlx_fused = os.path.join(work, "mlx_fused")
    for d in (ours_fused, mlx_fused):
        shutil.rmtree(d, ignore_errors=True)
    run([args.pocketlm, "fuse", "-m", float_dir, "--adapter-path", mlx_adapter, "--out", ours_fused,
         "--dtype", "f32"])
    run([sys.executable, "-m", "mlx_lm", "fuse", "--model", float_dir, "--adapter-path", mlx_adapter,
         "--save-path", mlx_fused])
    a, b = tensors(ours_fused), tensors(mlx_fused)
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    fuse_diff = max(float(mx.abs(a[k].astype(mx.float32) - b[k].astype(mx.float32)).max()) for k in a)
    print(f"largest difference between the fused folders: {fuse_diff:g}")

    _, tok = load(float_dir)
    prompt_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    golden = {
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "messages": MESSAGES,
        "prompt_ids": prompt_ids,
        "steps": STEPS,
        "fuse_max_abs_diff": fuse_diff,
        "tokens": {
            "base": greedy(float_dir, prompt_ids),
            "mlx_adapter": greedy(float_dir, prompt_ids, mlx_adapter),
            "our_adapter": greedy(float_dir, prompt_ids, our_adapter),
            "ours_fused": greedy(ours_fused, prompt_ids),
            "mlx_fused": greedy(mlx_fused, prompt_ids),
        },
    }
    for name, src in (("mlx_adapter", mlx_adapter), ("our_adapter", our_adapter)):
        dst = os.path.join(GOLD, name)
        os.makedirs(dst, exist_ok=True)
        for f in ("adapter_config.json", "adapters.safetensors"):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    with open(os.path.join(GOLD, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(f"wrote {GOLD}")


if __name__ == "__main__":
    main()
