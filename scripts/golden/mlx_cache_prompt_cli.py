#!/usr/bin/env python3
"""Golden of mlx-lm's `cache_prompt` + `generate --prompt-cache-file` on a real (tiny) model,
and a check that a cache pocketlm writes continues the same way in mlx-lm
(`crates/pocketlm/tests/it/prompt_cache.rs`, tests `mlx_lm_*`).

How to run (from the repository root; the model folder is made by tiny_folders.py):

    /tmp/venv-moe/bin/python scripts/golden/mlx_cache_prompt_cli.py gen
    POCKETLM_MLX_CACHE_OUT=/tmp/ours.safetensors cargo test --profile ci -p pocketlm \
        --test it prompt_cache::mlx_lm
    /tmp/venv-moe/bin/python scripts/golden/mlx_cache_prompt_cli.py check /tmp/ours.safetensors

Versions used for the committed files: mlx 0.32.4 (mlx[cpu]), mlx-lm 0.32.2, transformers
5.24.0, Python 3.11, Linux x86_64 (CPU).

`gen` writes, under `crates/pocketlm/tests/golden/kv_cache/` (only these two files):
- `mlx_cache_prompt.safetensors`: what `mlx_lm cache_prompt --model
  crates/pocketlm/tests/golden/archs/qwen3 --prompt PREFIX --prompt-cache-file F` writes
  (the real command, run as a subprocess). The folder has a chat template, so mlx-lm renders
  `[{"role": "user", "content": PREFIX}]` with `continue_final_message=True` and no generation
  prompt; the cache is bfloat16 (the model's dtype), in mlx-lm's 256-position buffer.
- `mlx_cache_prompt.json`: the prompts, `cache_ids` (the ids cache_prompt fed: the encoded
  render), `continuation_ids` (what `mlx_lm generate --prompt-cache-file F --prompt SUFFIX`
  feeds after the cache: the render of `[{"role": "user", "content": SUFFIX}]` with the
  generation prompt, from where `<query>` stands in the same render of `<query>`, encoded
  without special tokens; mirrored from mlx_lm/generate.py `main`), and `tokens`: the 16 greedy
  (temperature 0) tokens mlx-lm generates from there. The script also runs the real
  `mlx_lm generate` command and checks that its text is the decoding of `tokens`.

`check FILE`: loads FILE with mlx-lm's `load_prompt_cache`, continues from it with the same
suffix, and checks the 16 greedy tokens against `tokens` of the golden (exit status 1 if not).
"""

import json
import os
import subprocess
import sys

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache
from mlx_lm.utils import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = "crates/pocketlm/tests/golden/archs/qwen3"
OUT = os.path.join(ROOT, "crates/pocketlm/tests/golden/kv_cache")
CACHE = os.path.join(OUT, "mlx_cache_prompt.safetensors")
JSON = os.path.join(OUT, "mlx_cache_prompt.json")
PREFIX = "The library opens at nine and closes at six on weekdays. Members may borrow eight books"
SUFFIX = " for three weeks. When does the library close?"
TOKENS = 16


def continuation_ids(tokenizer, prompt):
    """The ids mlx_lm generate feeds after a prompt cache (generate.py `main`, no system
    prompt, no prefill response)."""
    if tokenizer.has_chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, continue_final_message=False, add_generation_prompt=True
        )
        messages[-1]["content"] = "<query>"
        test = tokenizer.apply_chat_template(
            messages, tokenize=False, continue_final_message=False, add_generation_prompt=True
        )
        text = text[test.index("<query>") :]
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt, add_special_tokens=True)


def greedy(model, cache_file, ids):
    cache = load_prompt_cache(cache_file)
    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=TOKENS, prompt_cache=cache):
        out.append(int(tok))
    return out


def main():
    os.chdir(ROOT)
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    model, tokenizer = load(MODEL)
    cont = continuation_ids(tokenizer, SUFFIX)
    if mode == "gen":
        subprocess.run(
            [sys.executable, "-m", "mlx_lm", "cache_prompt", "--model", MODEL,
             "--prompt", PREFIX, "--prompt-cache-file", CACHE],
            check=True,
        )
        tokens = greedy(model, CACHE, cont)
        run = subprocess.run(
            [sys.executable, "-m", "mlx_lm", "generate", "--model", MODEL,
             "--prompt-cache-file", CACHE, "--prompt", SUFFIX, "--max-tokens", str(TOKENS),
             "--temp", "0"],
            check=True, capture_output=True, text=True,
        )
        text = tokenizer.decode(tokens)
        assert text in run.stdout, (text, run.stdout)
        msgs = [{"role": "user", "content": PREFIX}]
        cache_ids = tokenizer.apply_chat_template(
            msgs, add_generation_prompt=False, continue_final_message=True
        )
        with open(JSON, "w") as f:
            json.dump(
                {"model": MODEL, "prefix": PREFIX, "suffix": SUFFIX,
                 "cache_ids": [int(t) for t in cache_ids],
                 "continuation_ids": [int(t) for t in cont], "tokens": tokens, "text": text},
                f,
            )
            f.write("\n")
        print(f"wrote {CACHE} ({os.path.getsize(CACHE)} bytes) and {JSON}: {tokens}")
    elif mode == "check" and len(sys.argv) == 3:
        want = json.load(open(JSON))["tokens"]
        got = greedy(model, sys.argv[2], cont)
        print("mlx-lm from", sys.argv[2], got)
        print("golden (mlx-lm's own cache)", want)
        sys.exit(0 if got == want else 1)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
