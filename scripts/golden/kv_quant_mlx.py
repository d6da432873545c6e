"""How far mlx-lm's own quantized KV cache moves greedy decoding of the default model.

Reference for tests/it/session.rs (`quantized_cache_is_small_and_follows_the_float_cache`): the
same three chat prompts, the default model's weights dequantized to float32 (an MLX folder
written by `pocketlm convert --dtype f32`), a float `KVCache` against mlx-lm's
`QuantizedKVCache` (keys and values quantized from the first token on, as ours). For each
prompt and (bits, group_size): the float greedy path, the first step where the quantized
cache's free-running greedy tokens differ, the float top-2 gap there, and over the float path
teacher-forced: how many steps pick the same token and the largest |logit difference|.

    python scripts/golden/kv_quant_mlx.py FOLDER [OUT.json]

Needs `mlx[cpu]` and `mlx-lm` (0.32.2 was used).
"""

import json
import sys

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how photosynthesis works.",
    "List five tips for learning a new language.",
]
STEPS = 32


def logits(model, tokens, cache):
    out = model(mx.array([tokens]), cache=cache)[0, -1].astype(mx.float32)
    mx.eval(out)
    return out


def top2(l):
    order = mx.argsort(-l)
    a, b = order[0].item(), order[1].item()
    return a, (l[a] - l[b]).item()


def main():
    folder = sys.argv[1]
    model, tok = load(folder)
    n_layers = len(model.layers)
    result = {"mlx_lm_steps": STEPS, "prompts": []}
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        # float path: greedy tokens and their top-2 gaps
        cache = make_prompt_cache(model)
        inp, path, gaps = ids, [], []
        for _ in range(STEPS):
            t, g = top2(logits(model, inp, cache))
            path.append(t)
            gaps.append(g)
            inp = [t]
        entry = {"prompt": p, "prompt_ids": ids, "float_tokens": path, "float_gaps": gaps, "quantized": []}
        for bits, group in [(8, 64), (8, 32), (4, 64)]:
            # teacher-forced along the float path
            fc = make_prompt_cache(model)
            qc = [QuantizedKVCache(group_size=group, bits=bits) for _ in range(n_layers)]
            inp, agree, worst = ids, 0, 0.0
            for t in path:
                lf = logits(model, inp, fc)
                lq = logits(model, inp, qc)
                worst = max(worst, mx.max(mx.abs(lf - lq)).item())
                agree += int(top2(lq)[0] == top2(lf)[0])
                inp = [t]
            # free-running greedy with the quantized cache
            qc = [QuantizedKVCache(group_size=group, bits=bits) for _ in range(n_layers)]
            inp, free = ids, []
            for _ in range(STEPS):
                t, _ = top2(logits(model, inp, qc))
                free.append(t)
                inp = [t]
            same = next((i for i, (a, b) in enumerate(zip(free, path)) if a != b), STEPS)
            q = {
                "bits": bits,
                "group_size": group,
                "same_prefix": same,
                "gap_at_parting": gaps[same] if same < STEPS else None,
                "teacher_forced_agree": agree,
                "max_abs_logit_diff": worst,
            }
            entry["quantized"].append(q)
            print(p[:30], q, file=sys.stderr)
        result["prompts"].append(entry)
    text = json.dumps(result, indent=1)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
