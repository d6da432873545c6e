#!/usr/bin/env python3
"""mlx-lm adapters on two of the 2026 architectures (issue #25: "`convert` and LoRA cover the new
architectures"), for `crates/pocketlm/tests/it/archs_2026.rs` (`lora_*_matches_mlx_lm`).

For each tiny folder (`lfm2` from tiny_lfm2.py, `qwen3_5` from tiny_qwen3_5.py, under
`crates/pocketlm/tests/golden/archs_2026/`; mlx-lm 0.32.2 has no `qwen3_5_text` module, so
`qwen3_5` is read from a temporary copy in the multimodal form it reads, `model_type` `qwen3_5`
with the text config under `text_config`, as tiny_qwen3_5.py's `mlx_source` makes it: its
adapter names the layers `language_model.model.layers.{i}...`):
1. mlx-lm puts LoRA layers on the model itself (`mlx_lm.tuner.utils.linear_to_lora_layers`, the
   function `mlx_lm.lora` and `mlx_lm.load(adapter_path=...)` call) for the last `NUM_LAYERS`
   blocks and the keys below, rank 2, scale 2; `lora_a` and `lora_b` are set to seeded random
   values (B nonzero, so the adapter changes the logits) and saved under mlx-lm's own module
   names with `adapter_config.json`: the folder `<name>_lora/`.
2. `mlx_lm.load(folder, adapter_path=<name>_lora)` (which rejects tensors that name no adapter
   parameter of the model) on a float32 copy of the folder (the folders are bfloat16; mlx-lm's
   `qwen3_5` sanitize adds 1 to norm weights in their dtype, which bfloat16 rounds), the model
   kept in float32 (`set_dtype`), and its logits at every position of `PROMPT`:
   `<name>_lora.golden.safetensors` (`ids` u32, `logits` f32 `[len, vocab]`, and
   `base_logits` the same without the adapter).

How to run (from the repository root; a venv with `mlx[cpu]==0.32.4 mlx-lm==0.32.2`):

    .venv/bin/python scripts/golden/lora_2026.py

Versions used for the committed files: mlx 0.32.4 (mlx[cpu], Linux x86_64), mlx-lm 0.32.2,
Python 3.11.
"""

import json
import os
import shutil
import tempfile

import numpy as np
import mlx.core as mx

mx.set_default_device(mx.cpu)

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLD = os.path.join(ROOT, "crates/pocketlm/tests/golden/archs_2026")
PROMPT = [1, 17, 42, 99, 5, 120]
NUM_LAYERS = 2
MODELS = {
    # Layers 2 (convolution) and 3 (attention): every kind of LFM2 projection name.
    "lfm2": ["self_attn.q_proj", "self_attn.out_proj", "conv.in_proj", "feed_forward.w2"],
    # Layers 2 (Gated DeltaNet) and 3 (gated full attention).
    "qwen3_5": [
        "self_attn.q_proj",
        "self_attn.o_proj",
        "linear_attn.in_proj_qkv",
        "linear_attn.in_proj_a",
        "linear_attn.out_proj",
    ],
}


def mlx_folder(name):
    """The folder mlx-lm reads for `name`: a temporary copy with the weights in float32 (mlx-lm's
    `qwen3_5` sanitize adds 1 to the norm weights in their own dtype, which in bfloat16 rounds;
    tiny_qwen3_5.py's 4-bit conversion is float32 too), for `qwen3_5` with the text config under
    `text_config` (tiny_qwen3_5.py `mlx_source`, without MoE experts to fuse)."""
    dst = os.path.join(tempfile.mkdtemp(prefix="lora-2026-"), name)
    shutil.copytree(os.path.join(GOLD, name), dst)
    st = os.path.join(dst, "model.safetensors")
    mx.save_safetensors(st, {k: v.astype(mx.float32) for k, v in mx.load(st).items()},
                        metadata={"format": "mlx"})
    if name == "qwen3_5":
        with open(os.path.join(dst, "config.json")) as f:
            text = json.load(f)
        cfg = {"model_type": "qwen3_5", "text_config": text,
               "tie_word_embeddings": text["tie_word_embeddings"]}
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    return dst


def make_adapter(folder, keys, out):
    model, _ = load(folder)
    params = {"rank": 2, "scale": 2.0, "dropout": 0.0, "keys": keys}
    model.freeze()
    linear_to_lora_layers(model, NUM_LAYERS, params)
    rng = np.random.default_rng(25)
    weights = {}
    for k, v in sorted(tree_flatten(model.trainable_parameters())):
        weights[k] = mx.array(rng.uniform(-0.3, 0.3, v.shape).astype(np.float32))
    assert weights, "no adapter parameters"
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    mx.save_safetensors(os.path.join(out, "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": NUM_LAYERS, "lora_parameters": params}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return sorted(weights)


def main():
    for name, keys in MODELS.items():
        out = os.path.join(GOLD, f"{name}_lora")
        folder = mlx_folder(name)
        names = make_adapter(folder, keys, out)
        model, _ = load(folder, adapter_path=out)
        model.set_dtype(mx.float32)
        logits = model(mx.array([PROMPT]))[0].astype(mx.float32)
        base, _ = load(folder)
        base.set_dtype(mx.float32)
        base_logits = base(mx.array([PROMPT]))[0].astype(mx.float32)
        moved = mx.abs(base_logits - logits).max().item()
        mx.save_safetensors(
            os.path.join(GOLD, f"{name}_lora.golden.safetensors"),
            {"ids": mx.array(PROMPT, dtype=mx.uint32), "logits": logits,
             "base_logits": base_logits},
        )
        print(f"{name}: {len(names) // 2} adapted layers ({names[0]}, ...), "
              f"logits moved by {moved:.3f} from the base")


if __name__ == "__main__":
    main()
