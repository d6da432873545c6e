#!/usr/bin/env python3
"""Golden files for MLX affine group quantization (pocketlm `quant::mlx_affine`).

Reference: Python `mlx` (Apple), `mx.quantize`, `mx.dequantize`, `mx.quantized_matmul`
in the default "affine" mode, run on the CPU backend.

How to run (from the repository root):

    python3 -m venv /root/venv-mlxq
    /root/venv-mlxq/bin/pip install "mlx[cpu]==0.32.4" "numpy==2.4.6"
    /root/venv-mlxq/bin/python scripts/golden/mlx_quant.py

Versions used to generate the committed files: mlx 0.32.4 (mlx-cpu 0.32.4), numpy 2.4.6,
Python 3.11.7, Linux x86_64. The mlx version is also written into each file's metadata
(`mlx_version`).

Output: `crates/pocketlm/tests/golden/mlx_quant/{f32,f16,bf16}.safetensors`, written with
`mx.save_safetensors` (numpy cannot hold bfloat16). Each file holds:

- `w`: the input weight, `[10, 256]`, in the file's dtype (f32 / f16 / bf16). The f16 and bf16
  inputs are the f32 input cast with `astype` (round to nearest even).
- `x`: the activation, `[3, 256]`, f32.
- for each `bits` x `group_size` (all of {2,3,4,5,6,8} x {32,64,128} for f32; bits {4,8} for
  f16 and bf16), with prefix `b{bits}_g{group_size}.`:
  - `weight`: `mx.quantize` packed words, `[10, 256 * bits / 32]` uint32,
  - `scales`, `biases`: `[10, 256 / group_size]`, the input's dtype,
  - `dequantized`: `mx.dequantize(weight, scales, biases)`, `[10, 256]`, the input's dtype,
  - `matmul`: `mx.quantized_matmul(x, weight, scales, biases, transpose=True)`, `[3, 10]`, f32
    (x is f32, so MLX promotes the scales and biases to f32 and accumulates in f32).

Rows of `w` (each a case the Rust port must get right bit for bit):
  0: N(0, 1)                       1: N(0, 0.02) (typical LLM weights)
  2: N(0, 1e-3) with two outliers
  3, 8, 9: all non-negative, exact rounding ties for bits 2 | 3, 4 | 5, 6 | 8 (see `ties`)
  4: constant 0.3 | constant -1.75 (every group constant: max == min)
  5: all zeros | N(0, 1) with every third value exactly 0
  6: N(0, 1e4) | N(0, 2e-8) (range below eps: scale clamped to 1e-7) | N(0, 2e-6)
  7: all negative U[-3, -1] | quarter grid | constant -2.5 | eighth grid
"""

import os

import mlx.core as mx
import numpy as np

ROWS, COLS, M = 10, 256, 3
OUT_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "..",
    "crates",
    "pocketlm",
    "tests",
    "golden",
    "mlx_quant",
)


def make_inputs():
    rng = np.random.default_rng(20240611)
    w = np.zeros((ROWS, COLS), dtype=np.float32)
    w[0] = rng.standard_normal(COLS)
    w[1] = rng.standard_normal(COLS) * 0.02
    w[2] = rng.standard_normal(COLS) * 1e-3
    w[2, 7] = 0.5
    w[2, 200] = -0.8
    w[3, :128] = ties(2)
    w[3, 128:] = ties(3)
    w[4, :128] = 0.3
    w[4, 128:] = -1.75
    w[5, :128] = 0.0
    w[5, 128:] = rng.standard_normal(128)
    w[5, 128::3] = 0.0
    w[6, :128] = rng.standard_normal(128) * 1e4
    w[6, 128:192] = rng.standard_normal(64) * 2e-8
    w[6, 192:] = rng.standard_normal(64) * 2e-6
    w[7, :64] = -rng.uniform(1.0, 3.0, 64)
    w[7, 64:128] = (np.arange(64) % 16) * 0.25 - 1.0
    w[7, 128:192] = -2.5
    w[7, 192:] = (np.arange(64) % 7) * 0.125 + 0.0625
    w[8, :128] = ties(4)
    w[8, 128:] = ties(5)
    w[9, :128] = ties(6)
    w[9, 128:] = ties(8)
    x = rng.standard_normal((M, COLS)).astype(np.float32)
    return w, x


def ties(bits):
    """128 values in [0, n], n = 2**bits - 1, every 32-block holding 0 and n, the rest mostly
    half-integers. With `bits` and any group size, scale = -1 and bias = n exactly, so
    (w - bias) / scale = n - w hits exact .5 ties, which `rint` rounds to even."""
    n = (1 << bits) - 1
    out = np.zeros(128, dtype=np.float32)
    for blk in range(4):
        seg = out[blk * 32 : (blk + 1) * 32]
        seg[0], seg[1] = 0.0, n
        for j in range(2, 32):
            k = (j * 37 + blk * 11) % n
            seg[j] = k + (0.0 if j % 5 == 0 else 0.5)
    return out


def main():
    mx.set_default_device(mx.cpu)
    w32, x = make_inputs()
    os.makedirs(OUT_DIR, exist_ok=True)
    xa = mx.array(x)
    plans = [
        ("f32", mx.float32, (2, 3, 4, 5, 6, 8)),
        ("f16", mx.float16, (4, 8)),
        ("bf16", mx.bfloat16, (4, 8)),
    ]
    for name, dtype, bits_list in plans:
        w = mx.array(w32).astype(dtype)
        tensors = {"w": w, "x": xa}
        for bits in bits_list:
            for gs in (32, 64, 128):
                wq, scales, biases = mx.quantize(w, group_size=gs, bits=bits)
                deq = mx.dequantize(wq, scales, biases, group_size=gs, bits=bits)
                y = mx.quantized_matmul(
                    xa, wq, scales, biases, transpose=True, group_size=gs, bits=bits
                )
                assert wq.dtype == mx.uint32 and wq.shape == (ROWS, COLS * bits // 32)
                assert scales.dtype == dtype and deq.dtype == dtype
                assert y.dtype == mx.float32 and y.shape == (M, ROWS)
                p = f"b{bits}_g{gs}."
                tensors[p + "weight"] = wq
                tensors[p + "scales"] = scales
                tensors[p + "biases"] = biases
                tensors[p + "dequantized"] = deq
                tensors[p + "matmul"] = y
        mx.eval(tensors)
        path = os.path.join(OUT_DIR, f"{name}.safetensors")
        mx.save_safetensors(
            path, tensors, metadata={"mlx_version": mx.__version__, "source": "scripts/golden/mlx_quant.py"}
        )
        print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
