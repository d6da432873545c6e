#!/usr/bin/env python3
"""Golden file for GGUF's IQ4_NL and IQ4_XS blocks (issue #21): random blocks and gguf-py's
dequantization of them, for pocketlm's own IQ4 decoder (`kernels::scalar::dequantize_row`,
read through `gguf::GgufFile`), checked bit for bit in `crates/pocketlm/src/gguf/mod.rs`'s
tests (`iq4_golden_*`).

Reference: gguf-py (`gguf.quants.dequantize`, classes `IQ4_NL` and `IQ4_XS`), the Python
twin of ggml's `dequantize_row_iq4_nl` / `dequantize_row_iq4_xs` (`ggml-quants.c`):
IQ4_NL value = `d * kvalues_iq4nl[q]`; IQ4_XS value = `d * (ls - 32) * kvalues_iq4nl[q]` with
the 6-bit sub-block scale `ls`. Both compute in f32 (`d` widened from f16, one product per
value for IQ4_NL; for IQ4_XS `dl = d * (ls - 32)` first, then `dl * kvalue`), as ggml does.

How to run (from the repository root), with gguf-py 0.19.0 and numpy 2.4.6 (Python 3.11):

    /root/.cache/pocketlm/venv-gguf/bin/python scripts/golden/make_iq4_golden.py

Output: `crates/pocketlm/tests/golden/iq4/iq4.gguf` (about 12 KB, written with gguf-py's
`GGUFWriter`; architecture `iq4-golden`, no other metadata), tensors in this order:

- `iq4_nl.deq` `[4, 128]` f32 and `iq4_xs.deq` `[4, 512]` f32: gguf-py's dequantization of
- `iq4_nl.weight` `[4, 128]` IQ4_NL (16 blocks of 18 bytes) and
- `iq4_xs.weight` `[4, 512]` IQ4_XS (8 blocks of 136 bytes), the last tensor of the file (the
  Rust tests truncate a copy to cut into it).

Blocks: uniformly random bytes (every code in every position), with the f16 scale `d` set to
N(0, 0.02) values except for a few special ones (0, -0, a negative power of two, a subnormal,
65504, -1.5); the 64 IQ4_XS sub-block scales `ls` are a random permutation of 0..63, so every
6-bit scale occurs once.
"""

import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..", "..", "crates", "pocketlm", "tests", "golden", "iq4", "iq4.gguf",
)
SPECIAL_D = [0.0, -0.0, -0.125, 2.0 ** -20, 65504.0, -1.5]


def scales_d(rng, n):
    d = (rng.standard_normal(n) * 0.02).astype(np.float16)
    d[: len(SPECIAL_D)] = np.array(SPECIAL_D, dtype=np.float16)
    return d


def iq4_nl(rng, rows, cols):
    nb = rows * cols // 32
    blocks = rng.integers(0, 256, size=(nb, 18), dtype=np.uint8)
    blocks[:, 0:2] = scales_d(rng, nb).view(np.uint8).reshape(nb, 2)
    return blocks.reshape(rows, cols // 32 * 18)


def iq4_xs(rng, rows, cols):
    nb = rows * cols // 256
    blocks = rng.integers(0, 256, size=(nb, 136), dtype=np.uint8)
    blocks[:, 0:2] = scales_d(rng, nb).view(np.uint8).reshape(nb, 2)
    ls = rng.permutation(64).reshape(nb, 8)
    for b in range(nb):
        scales_h = 0
        scales_l = [0, 0, 0, 0]
        for s in range(8):
            scales_l[s // 2] |= (int(ls[b, s]) & 0xF) << (4 * (s % 2))
            scales_h |= (int(ls[b, s]) >> 4) << (2 * s)
        blocks[b, 2:4] = np.array([scales_h], dtype="<u2").view(np.uint8)
        blocks[b, 4:8] = scales_l
    return blocks.reshape(rows, cols // 256 * 136)


def main():
    rng = np.random.default_rng(21)
    nl = iq4_nl(rng, 4, 128)
    xs = iq4_xs(rng, 4, 512)
    nl_deq = dequantize(nl, Q.IQ4_NL).astype(np.float32)
    xs_deq = dequantize(xs, Q.IQ4_XS).astype(np.float32)
    assert nl_deq.shape == (4, 128) and xs_deq.shape == (4, 512)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    w = gguf.GGUFWriter(OUT, "iq4-golden")
    w.add_tensor("iq4_nl.deq", nl_deq)
    w.add_tensor("iq4_xs.deq", xs_deq)
    w.add_tensor("iq4_nl.weight", nl, raw_dtype=Q.IQ4_NL)
    w.add_tensor("iq4_xs.weight", xs, raw_dtype=Q.IQ4_XS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
