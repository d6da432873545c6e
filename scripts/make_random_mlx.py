#!/usr/bin/env python3
"""Writes a random-weight MLX affine-quantized Llama folder of Llama-3-8B shapes, for speed tests.

    python3 scripts/make_random_mlx.py TEMPLATE_DIR OUT_DIR --bits 4 [--group-size 64]

TEMPLATE_DIR is a small MLX folder written by `pocketlm convert` (e.g. of a random 1B-shaped
GGUF): its tokenizer files are copied, its config.json is taken with the 8B shapes put in, and
the dtypes of its tensors (scales, biases, norms) are kept. Codes are uniform random; scales are
0.02 / 2^(bits-1) and biases -0.02, so weights are uniform in about [-0.02, 0.02].

`pocketlm convert` of an 8B GGUF takes minutes on the GPU machine's CPU, more than a benchmark
call can spend; this writes a folder of the same layout and sizes in seconds. numpy only.
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

SHAPE = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256)
DT = {"F16": np.float16, "F32": np.float32, "BF16": None, "U32": np.uint32}


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("template")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for f in os.listdir(a.template):
        if f.startswith("tokenizer") or f in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(os.path.join(a.template, f), a.out)
    cfg = json.load(open(os.path.join(a.template, "config.json")))
    s = SHAPE
    cfg.update(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
               num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
               head_dim=s["head_dim"], vocab_size=s["vocab"], tie_word_embeddings=False,
               quantization={"group_size": a.group_size, "bits": a.bits})
    cfg.pop("quantization_config", None)
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)

    hdr = {}
    for f in os.listdir(a.template):
        if f.endswith(".safetensors"):
            hdr.update(read_header(os.path.join(a.template, f)))
    sdt = hdr["model.layers.0.self_attn.q_proj.scales"]["dtype"]
    ndt = hdr["model.layers.0.input_layernorm.weight"]["dtype"]

    def param(value, dtype, n):
        if dtype == "BF16":  # bf16 = the high half of an f32
            return (np.full(n, value, np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return np.full(n, value, DT[dtype])

    rng = np.random.default_rng(0)
    h, i, hd = s["hidden"], s["inter"], s["head_dim"]
    linears = {"model.embed_tokens": (s["vocab"], h), "lm_head": (s["vocab"], h)}
    for l in range(s["layers"]):
        p = f"model.layers.{l}"
        linears.update({f"{p}.self_attn.q_proj": (s["heads"] * hd, h),
                        f"{p}.self_attn.k_proj": (s["kv_heads"] * hd, h),
                        f"{p}.self_attn.v_proj": (s["kv_heads"] * hd, h),
                        f"{p}.self_attn.o_proj": (h, s["heads"] * hd),
                        f"{p}.mlp.gate_proj": (i, h), f"{p}.mlp.up_proj": (i, h),
                        f"{p}.mlp.down_proj": (h, i)})
    norms = [f"model.layers.{l}.{n}" for l in range(s["layers"])
             for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]

    # Tensors in a stable order: (name, dtype tag, shape, generator of its bytes).
    items = []
    for name, (o, c) in sorted(linears.items()):
        g = c // a.group_size
        items.append((f"{name}.weight", "U32", [o, c * a.bits // 32],
                      lambda o=o, c=c: rng.integers(0, 2**32, size=(o, c * a.bits // 32), dtype=np.uint32)))
        items.append((f"{name}.scales", sdt, [o, g], lambda o=o, g=g: param(0.02 / 2 ** (a.bits - 1), sdt, o * g)))
        items.append((f"{name}.biases", sdt, [o, g], lambda o=o, g=g: param(-0.02, sdt, o * g)))
    for n in norms:
        items.append((f"{n}.weight", ndt, [h], lambda: param(1.0, ndt, h)))
    size = {"U32": 4, "F32": 4, "F16": 2, "BF16": 2}
    header, off = {}, 0
    for name, dt, shape, _ in items:
        nb = int(np.prod(shape)) * size[dt]
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = os.path.join(a.out, "model.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, _, _, gen in items:
            f.write(np.ascontiguousarray(gen()).tobytes())
    os.replace(tmp, os.path.join(a.out, "model.safetensors"))


if __name__ == "__main__":
    main()
