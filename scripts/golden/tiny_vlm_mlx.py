#!/usr/bin/env python3
"""mlx-vlm interop goldens for `crates/pocketlm/tests/it/vlm_golden.rs`: the tiny Qwen2-VL and
Qwen2.5-VL of `tiny_vlm.py` converted by `mlx_vlm.convert -q --q-bits 8 --q-group-size 64`,
and `mlx_vlm`'s greedy tokens on them.

How to run (after `tiny_vlm.py`, from the repository root):

    /root/ref/bin/pip install "mlx-vlm==0.7.10"
    /root/ref/bin/python scripts/golden/tiny_vlm_mlx.py

Versions used for the committed files: mlx-vlm 0.7.10, mlx 0.32.4, transformers 5.23.0, Linux
x86_64 (CPU).

Output under `crates/pocketlm/tests/golden/vlm/`:
- `mlx_<model>_q8/`: the folder `mlx_vlm.convert` writes (its tensor names: `language_model.*`,
  `vision_tower.*`, the patch embedding channels-last; the language model 8-bit, the vision
  tower bfloat16).
- `mlx_<model>.golden.safetensors`: `ids` `[n]` u32 (mlx-vlm's prompt ids for its own chat
  template: "Describe this image." with the astronaut), `grid_thw` `[3]` u32, `greedy` `[16]` u32 (`mlx_vlm.stream_generate`,
  temperature 0), `logits` `[16, 320]` f32 (mlx-vlm's model over the prompt and those tokens,
  teacher-forced: the logits of each greedy step; its activations are bfloat16), `logits_f32`
  (the same with the model's bfloat16 parameters widened to float32, float32 activations, the
  quantized embedding's lookup still dequantized in bfloat16 as mlx does), `greedy_f32` `[16]`
  u32 (`mlx_vlm.stream_generate` with that float32 model) and `margins_f32` `[16]` f32 (its
  top-1 / top-2 logit margin at each of those steps, teacher-forced).
- `mlx_astronaut.pixels.safetensors`: `pixel_values` `[64, 1176]` f32, mlx-vlm's preprocessing of
  the astronaut (it differs from transformers' by a uint8 step in a few values; the models are
  compared on these pixels).
"""
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
from safetensors.numpy import save_file
from mlx_vlm import apply_chat_template, load, prepare_inputs, stream_generate

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "pocketlm", "tests",
                    "golden", "vlm")


def main():
    image = os.path.join(ROOT, "images", "astronaut.png")
    for kind in ("qwen2_vl", "qwen2_5_vl"):
        out = os.path.join(ROOT, f"mlx_{kind}_q8")
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mlx_vlm", "convert", "--hf-path",
                        os.path.join(ROOT, kind), "--mlx-path", out, "-q", "--q-bits", "8",
                        "--q-group-size", "64"], check=True)
        for f in ("README.md",):
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        model, processor = load(out)
        prompt = apply_chat_template(processor, model.config, "Describe this image.",
                                     num_images=1)
        inputs = prepare_inputs(processor, images=[image], prompts=prompt,
                                image_token_index=getattr(model.config, "image_token_index",
                                                          None))
        toks = [r.token for r in stream_generate(model, processor, prompt, image=[image],
                                                 max_tokens=16, temperature=0.0)][:16]
        ids = np.array(inputs["input_ids"])[0].astype(np.uint32)
        # mlx-vlm's own preprocessing differs from transformers' (a uint8 step here and there):
        # the model is compared on mlx-vlm's pixels, stored once.
        from safetensors.numpy import load_file
        want = load_file(os.path.join(ROOT, "pixels.golden.safetensors"))
        pix = np.array(inputs["pixel_values"]).astype(np.float32)
        d = np.abs(pix - want["astronaut.pixel_values"])
        print(f"mlx-vlm pixels vs transformers: max diff {d.max():.4f}, {(d > 1e-5).sum()} of "
              f"{d.size} values differ")
        save_file({"pixel_values": pix}, os.path.join(ROOT, "mlx_astronaut.pixels.safetensors"))
        grid = np.array(inputs["image_grid_thw"])[0].astype(np.uint32)
        # Teacher-forced logits of mlx-vlm's own model over the prompt and its greedy tokens.
        full = mx.array(np.concatenate([ids, np.array(toks[:-1], dtype=np.uint32)])[None]
                        .astype(np.int32))
        out = model(full, mx.array(inputs["pixel_values"]),
                    image_grid_thw=mx.array(inputs["image_grid_thw"]))
        logits = np.array(out.logits.astype(mx.float32))[0, len(ids) - 1:]
        assert [int(i) for i in logits.argmax(-1)] == toks, (logits.argmax(-1), toks)
        # The same with the bfloat16 parameters (norms, biases, scales, the vision tower) widened
        # to float32, so that activations are float32 as pocketlm's; except the quantized
        # embedding's scales and biases: a lookup is `mx.dequantize` in the dtype of its scales
        # (bfloat16), as mlx runs it and as pocketlm does. (Widening them too moves the logits of
        # this small random model by about 0.6: it is that sensitive to one bfloat16 ulp.)
        from mlx.utils import tree_flatten, tree_unflatten
        widened = [(k, v.astype(mx.float32) if v.dtype == mx.bfloat16 and
                    not k.startswith("language_model.model.embed_tokens.") else v)
                   for k, v in tree_flatten(model.parameters())]
        model.update(tree_unflatten(widened))
        out = model(full, mx.array(inputs["pixel_values"]),
                    image_grid_thw=mx.array(inputs["image_grid_thw"]))
        logits32 = np.array(out.logits.astype(mx.float32))[0, len(ids) - 1:]
        # mlx_vlm's own greedy generation with that float32 model.
        toks32 = [r.token for r in stream_generate(model, processor, prompt, image=[image],
                                                   max_tokens=16, temperature=0.0)][:16]
        full32 = mx.array(np.concatenate([ids, np.array(toks32[:-1], dtype=np.uint32)])[None]
                          .astype(np.int32))
        out32 = model(full32, mx.array(inputs["pixel_values"]),
                      image_grid_thw=mx.array(inputs["image_grid_thw"]))
        l32 = np.array(out32.logits.astype(mx.float32))[0, len(ids) - 1:]
        top2 = np.sort(l32, axis=-1)[:, -2:]
        print(f"{kind}: float32 greedy {toks32}, smallest top-1/top-2 margin "
              f"{(top2[:, 1] - top2[:, 0]).min():.4f}")
        print(f"{kind}: mlx-vlm bfloat16 vs float32 logits: max diff "
              f"{np.abs(logits - logits32).max():.3f}")
        save_file({"ids": ids, "grid_thw": grid, "greedy": np.array(toks, dtype=np.uint32),
                   "logits": logits.astype(np.float32), "logits_f32": logits32,
                   "greedy_f32": np.array(toks32, dtype=np.uint32),
                   "margins_f32": (top2[:, 1] - top2[:, 0]).astype(np.float32)},
                  os.path.join(ROOT, f"mlx_{kind}.golden.safetensors"))
        print(kind, len(ids), "ids, grid", grid.tolist(), "greedy", toks)


if __name__ == "__main__":
    main()
