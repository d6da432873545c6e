"""Golden file of mlx-lm's prompt-cache format, and a check of ours.

    python -m venv /tmp/mlxvenv && /tmp/mlxvenv/bin/pip install "mlx[cpu]" mlx-lm
    /tmp/mlxvenv/bin/python scripts/golden/mlx_prompt_cache.py write scripts/golden/mlx_prompt_cache.safetensors
    POCKETLM_MLX_CACHE_OUT=/tmp/ours.safetensors cargo test --profile ci -p pocketlm --lib mlx_prompt_cache
    /tmp/mlxvenv/bin/python scripts/golden/mlx_prompt_cache.py check /tmp/ours.safetensors

`write`: 2 layers of mlx-lm `KVCache`, 2 KV heads, 5 positions (in mlx-lm's 256-position
buffer), head dim 4, f16, value (l*1000 + kv*500 + h*100 + p*10 + d) / 8, metadata
{"model": "golden"}, saved with `mlx_lm.models.cache.save_prompt_cache` (mlx-lm 0.32.2).
`check`: loads FILE with `load_prompt_cache` and checks the same values (as f32 or f16).
"""

import sys

import mlx.core as mx
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache

LAYERS, HEADS, LEN, DIM = 2, 2, 5, 4


def value(l, kv, h, p, d):
    return (l * 1000 + kv * 500 + h * 100 + p * 10 + d) / 8.0


def tensor(l, kv):
    return mx.array(
        [[[[value(l, kv, h, p, d) for d in range(DIM)] for p in range(LEN)] for h in range(HEADS)]],
        dtype=mx.float16,
    )


def write(path):
    caches = []
    for l in range(LAYERS):
        c = KVCache()
        c.update_and_fetch(tensor(l, 0), tensor(l, 1))
        caches.append(c)
    save_prompt_cache(path, caches, {"model": "golden"})


def check(path):
    caches, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"model": "golden"}, meta
    assert len(caches) == LAYERS and all(type(c).__name__ == "KVCache" for c in caches)
    for l, c in enumerate(caches):
        assert c.offset == LEN, c.offset
        k, v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        for kv, t in ((0, k), (1, v)):
            want = tensor(l, kv).astype(mx.float32)
            assert t.shape == want.shape, (t.shape, want.shape)
            assert mx.array_equal(t.astype(mx.float32), want).item(), (l, kv)
        # mlx-lm can keep appending to it.
        c.update_and_fetch(tensor(l, 0)[..., :1, :], tensor(l, 1)[..., :1, :])
        assert c.offset == LEN + 1
    print(f"ok: {path} loads in mlx-lm: {LAYERS} KVCache layers, offset {LEN}, values equal")


if __name__ == "__main__":
    {"write": write, "check": check}[sys.argv[1]](sys.argv[2])
