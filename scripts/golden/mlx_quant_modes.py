#!/usr/bin/env python3
"""Golden files for MLX's float quantization modes `mxfp4`, `mxfp8` and `nvfp4`
(pocketlm `quant::mlx_fp`).

Reference: Python `mlx` (Apple), `mx.quantize(w, mode=...)`, `mx.dequantize(..., mode=...,
dtype=...)`, `mx.quantized_matmul(..., mode=...)` and `mx.to_fp8`, on the CPU backend.
Each mode allows exactly one (group_size, bits) pair in mlx 0.32 (`mx.quantize` refuses every
other): mxfp4 (32, 4), mxfp8 (32, 8), nvfp4 (16, 4); the script asserts that too.

How to run (from the repository root):

    python3 -m venv /tmp/venv-mx
    /tmp/venv-mx/bin/pip install "mlx[cpu]==0.32.4" "numpy==2.4.6"
    /tmp/venv-mx/bin/python scripts/golden/mlx_quant_modes.py

Versions used to generate the committed files: mlx 0.32.4 (mlx-cpu 0.32.4), numpy 2.4.6,
Python 3.11.7, Linux x86_64 (the mlx version is also in each file's metadata, `mlx_version`).

Output: `crates/pocketlm/tests/golden/mlx_quant_modes/{f32,f16,bf16}.safetensors`, written with
`mx.save_safetensors`. Each file holds:

- `w`: the input weight `[8, 256]` in the file's dtype (f16 / bf16: the f32 input cast with
  `astype`, round to nearest even; values that overflow f16 are clamped first).
- for each mode, with prefix `{mode}.`:
  - `weight`: `mx.quantize` packed words, `[8, 256 * bits / 32]` uint32,
  - `scales`: `[8, 256 / group_size]` uint8 (E8M0 exponents for mx modes, E4M3 for nvfp4),
  - `dequantized`: `mx.dequantize(weight, scales, mode=mode, dtype=<file dtype>)`.
- f32 file only:
  - `{mode}.dequantized_f16`, `{mode}.dequantized_bf16`: the same words dequantized to f16
    and bf16 (dequantization does not depend on the input dtype, only on the output one),
  - `x`: `[3, 256]` f32 and `{mode}.matmul`: `mx.quantized_matmul(x, weight, scales,
    transpose=True, mode=mode)`, `[3, 8]` f32 (compared with a tolerance: summation order),
  - `fp8.x`: 4096 f32 values (every 24th bf16 bit pattern below infinity, the E4M3
    rounding midpoints and their f32 neighbours, the saturation region, |N(0, 100)| to fill;
    each also negated) and
    `fp8.bits`: `mx.to_fp8(fp8.x)` uint8.

Rows of `w` (cases the Rust port must get right bit for bit):
  0: N(0, 1)                1: N(0, 0.02) (typical LLM weights)
  2: N(0, 1e-3), two outliers
  3: multiples of 0.25 in [-4, 4] (E2M1 rounding ties after scaling)
  4: multiples of 0.125 in [-8, 8] with 6.0 and -448.0 anchors (ties, a saturating nvfp4 scale)
  5: all zeros | every third value zero | constant 0.3 | constant -1.75
  6: |w| = exp(U(-14, 10)), random signs (scales across the f16 range)
  7: per 32-block: amax exactly 6 * 2^k and just above (ceil of log2 of the mx scale),
     tiny values (nvfp4 scale rounding to zero), large values (nvfp4 scale saturating at 448),
     f32 subnormals (the f16 / bf16 files see them flushed by the cast)
"""

import os

import mlx.core as mx
import numpy as np

ROWS, COLS, M = 8, 256, 3
MODES = {"mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}
OUT_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "..",
    "crates",
    "pocketlm",
    "tests",
    "golden",
    "mlx_quant_modes",
)


def make_inputs():
    rng = np.random.default_rng(20261203)
    w = np.zeros((ROWS, COLS), dtype=np.float32)
    w[0] = rng.standard_normal(COLS)
    w[1] = rng.standard_normal(COLS) * 0.02
    w[2] = rng.standard_normal(COLS) * 1e-3
    w[2, 9] = 0.7
    w[2, 201] = -1.3
    w[3] = rng.integers(-16, 17, COLS) * 0.25
    w[4] = rng.integers(-64, 65, COLS) * 0.125
    w[4, ::32] = 6.0
    w[4, 100] = -448.0
    w[5, :64] = 0.0
    w[5, 64:128] = rng.standard_normal(64)
    w[5, 64:128:3] = 0.0
    w[5, 128:192] = 0.3
    w[5, 192:] = -1.75
    w[6] = np.exp(rng.uniform(-14.0, 10.0, COLS)) * rng.choice([-1.0, 1.0], COLS)
    blk = [rng.standard_normal(32).astype(np.float32) for _ in range(8)]
    for b in range(8):
        blk[b] *= 0.1
    blk[0][5] = 6.0  # mx scale exactly 1
    blk[1][7] = np.float32(6.0 * 2.0**-3) * np.float32(1 + 2**-22)  # just above 2^-3 * 6
    blk[2][11] = np.float32(448.0 * 2.0**-4)  # mxfp8 scale exactly 2^-4
    blk[3][:] = rng.standard_normal(32) * 1e-4  # nvfp4 scale rounds to 0 (< 2^-10 * 6)
    blk[4][:] = rng.standard_normal(32) * 2000.0
    blk[4][3] = 4000.0  # nvfp4 scale saturates at 448
    blk[5][:] = rng.standard_normal(32) * 1e-3
    blk[6][:] = rng.standard_normal(32).astype(np.float32) * np.float32(1e-39)  # f32 subnormal
    blk[7][:] = rng.integers(-48, 49, 32) * (1.0 / 8.0)
    blk[7][0] = 5.0  # ties at the E2M1 midpoints with scale 1
    w[7] = np.concatenate(blk)
    x = rng.standard_normal((M, COLS)).astype(np.float32)
    return w, x


def fp8_inputs():
    """Values for `mx.to_fp8`: a sweep of bf16 bit patterns, both signs, and the E4M3
    rounding midpoints (and their neighbours) plus the saturation region."""
    pos = (np.arange(0, 0x7F80, 24, dtype=np.uint32) << 16).view(np.float32)
    codes = mx.from_fp8(mx.arange(0, 127).astype(mx.uint8), dtype=mx.float32)
    c = np.array(codes, dtype=np.float64)
    mids = ((c[:-1] + c[1:]) / 2).astype(np.float32)
    near = np.concatenate(
        [mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))]
    )
    sat = np.array([448.0, 449.0, 463.99, 464.0, 464.01, 479.0, 480.0, 1e6, 3e38], np.float32)
    vals = np.concatenate([pos, near, sat]).astype(np.float32)
    rng = np.random.default_rng(8)
    fill = (rng.standard_normal(2048 - len(vals)) * 100.0).astype(np.float32)
    vals = np.abs(np.concatenate([vals, fill]))
    vals = np.concatenate([vals, -vals])
    assert vals.shape == (4096,)
    return vals


def main():
    mx.set_default_device(mx.cpu)
    w32, x = make_inputs()
    os.makedirs(OUT_DIR, exist_ok=True)
    xa = mx.array(x)
    for name, dtype in (("f32", mx.float32), ("f16", mx.float16), ("bf16", mx.bfloat16)):
        src = np.clip(w32, -60000.0, 60000.0) if dtype == mx.float16 else w32
        w = mx.array(src).astype(dtype)
        tensors = {"w": w}
        for mode, (gs, bits) in MODES.items():
            for other_gs in (16, 32, 64, 128):
                for other_bits in (2, 3, 4, 5, 6, 8):
                    if (other_gs, other_bits) == (gs, bits):
                        continue
                    try:
                        mx.quantize(w, group_size=other_gs, bits=other_bits, mode=mode)
                    except ValueError:
                        continue
                    raise AssertionError(f"{mode} accepts group {other_gs}, bits {other_bits}")
            wq, scales = mx.quantize(w, group_size=gs, bits=bits, mode=mode)
            assert wq.dtype == mx.uint32 and wq.shape == (ROWS, COLS * bits // 32)
            assert scales.dtype == mx.uint8 and scales.shape == (ROWS, COLS // gs)
            p = f"{mode}."
            tensors[p + "weight"] = wq
            tensors[p + "scales"] = scales
            tensors[p + "dequantized"] = mx.dequantize(
                wq, scales, group_size=gs, bits=bits, mode=mode, dtype=dtype
            )
            if name == "f32":
                for dn, dt in (("f16", mx.float16), ("bf16", mx.bfloat16)):
                    tensors[p + "dequantized_" + dn] = mx.dequantize(
                        wq, scales, group_size=gs, bits=bits, mode=mode, dtype=dt
                    )
                y = mx.quantized_matmul(
                    xa, wq, scales, transpose=True, group_size=gs, bits=bits, mode=mode
                )
                assert y.dtype == mx.float32 and y.shape == (M, ROWS)
                tensors[p + "matmul"] = y
        if name == "f32":
            tensors["x"] = xa
            fx = mx.array(fp8_inputs())
            tensors["fp8.x"] = fx
            tensors["fp8.bits"] = mx.to_fp8(fx)
        mx.eval(tensors)
        path = os.path.join(OUT_DIR, f"{name}.safetensors")
        mx.save_safetensors(
            path,
            tensors,
            metadata={"mlx_version": mx.__version__, "source": "scripts/golden/mlx_quant_modes.py"},
        )
        print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
