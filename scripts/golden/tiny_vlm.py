#!/usr/bin/env python3
"""Tiny random-weight Qwen2-VL and Qwen2.5-VL models with transformers' pixel values, logits and
greedy tokens, for `crates/pocketlm/tests/it/vlm_golden.rs`.

Reference: Hugging Face transformers (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`, `Qwen2VLProcessor` with the torchvision
`Qwen2VLImageProcessor`), each model built from its real config classes with reduced sizes.

How to run (from the repository root), in the venv of `tiny_archs.py` plus:

    /root/ref/bin/pip install --no-deps "torchvision==0.29.2"
    /root/ref/bin/pip install "scikit-image==0.26.0" "pillow==13.0.0"
    /root/ref/bin/python scripts/golden/tiny_vlm.py

Versions used for the committed files: torch 2.15.0, torchvision 0.29.2, transformers 5.23.0,
scikit-image 0.26.0, pillow 13.0.0, mlx 0.32.4, Python 3.11, Linux x86_64 (CPU).

Output under `crates/pocketlm/tests/golden/vlm/`:

- `images/`: real photographs from scikit-image's data folder, as downsized PNG copies (made
  here with PIL's LANCZOS): `astronaut.png` 192x192, `coffee.png` 150x225 (h x w),
  `chelsea.png` 40x60 (a crop, smaller than `min_pixels`: upscaled by the processor).
- `pixels.golden.safetensors`: for each image `<name>.pixel_values` `[patches, 1176]` f32 and
  `<name>.grid_thw` `[3]` u32 from the processor (min_pixels 3136, max_pixels 18816, the
  folders' `preprocessor_config.json`).
- `qwen2_vl/`, `qwen2_5_vl/`: model folders laid out as published checkpoints are (text fields
  at the top level of config.json, `rope_scaling: {"type": "mrope", ...}`), bfloat16
  safetensors, a byte-level BPE tokenizer trained here (vocabulary 320) with Qwen's special
  tokens, Qwen2-VL's chat template, `preprocessor_config.json`.
- `<model>.golden.safetensors`, for prompt `one` (astronaut, "Describe this image.") and `two`
  (coffee and chelsea, "What differs?"), each rendered with the chat template:
  `<p>.ids` `[n]` u32 (the processor's ids, image pads expanded), `<p>.logits` `[n, 320]`
  (transformers' float32 forward pass over the bfloat16 weights), `<p>.greedy` `[16]` u32 and
  `<p>.greedy_margin` `[16]` (transformers' `generate`, greedy, with its KV cache and M-RoPE
  deltas), `<p>.q8_logits` / `<p>.q8_greedy`: the same after MLX 8-bit / group 64 quantization
  of the language model's 2-D weights (the vision tower stays float), as `pocketlm convert -q
  --q-bits 8` does.

Sizes: LM hidden 64, 2 layers, heads 4, KV heads 2, head_dim 16, mrope_section [2, 3, 3];
vision embed 32, depth 2, heads 2; Qwen2.5-VL window 56 (2x2 merged tokens per window) with
block 1 full attention.
"""
import json
import os
import shutil
import sys

import numpy as np
import mlx.core as mx
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import (AutoProcessor, Qwen2VLForConditionalGeneration,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2_5_VLConfig,
                          Qwen2VLImageProcessor, Qwen2VLProcessor)

sys.path.insert(0, os.path.dirname(__file__))
import tiny_archs  # noqa: E402

ROOT = os.environ.get("TINY_VLM_OUT") or os.path.join(
    os.path.dirname(__file__), "..", "..", "crates", "pocketlm", "tests", "golden", "vlm")
# Chosen so that every greedy step of both models, float and 8-bit, has a top-1 / top-2 logit
# margin far above rounding noise (random weights otherwise give near-ties).
SEED = int(os.environ.get("TINY_VLM_SEED", "3"))
VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template (as published with Qwen/Qwen2-VL-2B-Instruct).
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 24
PROMPTS = {
    "one": (["astronaut"], "Describe this image."),
    "two": (["coffee", "chelsea"], "What differs?"),
}


def images():
    import skimage
    src = os.path.dirname(skimage.data.__file__)
    out = os.path.join(ROOT, "images")
    os.makedirs(out, exist_ok=True)
    specs = {"astronaut": ((192, 192), None), "coffee": ((225, 150), None),
             "chelsea": ((60, 40), (100, 40, 220, 120))}
    for name, (size, crop) in specs.items():
        im = Image.open(os.path.join(src, f"{name}.png")).convert("RGB")
        if crop:
            im = im.crop(crop)
        im.resize(size, Image.LANCZOS).save(os.path.join(out, f"{name}.png"), optimize=True)
    return {n: Image.open(os.path.join(out, f"{n}.png")) for n in specs}


def tokenizer():
    tiny_archs.TOKENIZERS["qwen_vl"] = (SPECIALS, None, "<|im_end|>", TEMPLATE)
    tok = tiny_archs.tokenizer("qwen_vl")
    tok.pad_token = "<|endoftext|>"
    tok.unk_token = None
    return tok


def config(kind, tok):
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "mrope", "rope_theta": 1e6,
                                                    "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2,
                      spatial_merge_size=2, patch_size=14, temporal_patch_size=2,
                      initializer_range=0.2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                  spatial_merge_size=2, patch_size=14, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1], tokens_per_second=2, initializer_range=0.2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)


def randomize(model):
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or ".norm1." in pname or ".norm2." in pname \
                    or "ln_q.weight" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.copy_(0.2 * torch.randn_like(p))
        model.lm_head.weight.copy_(1.0 * torch.randn_like(model.lm_head.weight))


def published_layout(folder, kind):
    """config.json as published checkpoints (and mlx-vlm) have it: text fields at the top."""
    p = os.path.join(folder, "config.json")
    cfg = json.load(open(p))
    text = cfg.pop("text_config")
    for k in ("model_type", "architectures", "dtype", "transformers_version"):
        text.pop(k, None)
    rp = text.pop("rope_parameters")
    text["rope_theta"] = rp["rope_theta"]
    text["rope_scaling"] = {"type": "mrope", "mrope_section": rp["mrope_section"]}
    vision = cfg["vision_config"]
    vision.pop("model_type", None)
    vision.pop("rope_parameters", None)
    for k in ("dtype", "transformers_version", "architectures"):
        vision.pop(k, None)
    out = {**cfg, **text, "vision_config": vision, "model_type": kind}
    json.dump(out, open(p, "w"), indent=2)


def quantize_lm(model):
    """MLX affine 8-bit / group 64 round trip of the language model's 2-D weights (embedding
    looked up in bfloat16 as `QuantizedEmbedding`, linears with f32 scales), in place."""
    n = 0
    emb = model.get_input_embeddings()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "visual" in pname or p.ndim != 2 or p.shape[1] % 64 != 0:
                continue
            w = mx.array(p.detach().float().numpy()).astype(mx.bfloat16)
            wq, sc, bi = mx.quantize(w, group_size=64, bits=8)
            if p is emb.weight:
                d = mx.dequantize(wq, sc, bi, group_size=64, bits=8)
            else:
                d = mx.dequantize(wq, sc.astype(mx.float32), bi.astype(mx.float32),
                                  group_size=64, bits=8)
            p.copy_(torch.from_numpy(np.array(d.astype(mx.float32))))
            n += 1
    return n


def run(model, inputs):
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0].float().contiguous()
        g = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    n = inputs["input_ids"].shape[1]
    toks = g.sequences[0, n:].tolist()
    margins = []
    for l in g.logits:
        top = torch.topk(l[0].float(), 2)
        margins.append(float(top.values[0] - top.values[1]))
    return logits, toks, margins


def main():
    torch.manual_seed(SEED)
    margins_all = []
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    ims = images()
    tok = tokenizer()
    improc = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    pix = {}
    for name, im in ims.items():
        r = improc(images=[im], return_tensors="pt")
        pix[f"{name}.pixel_values"] = r["pixel_values"].float().contiguous()
        pix[f"{name}.grid_thw"] = r["image_grid_thw"][0].to(torch.int64).to(torch.uint32)
        print(name, im.size, "grid", r["image_grid_thw"][0].tolist())
    save_file(pix, os.path.join(ROOT, "pixels.golden.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__})
    for kind, cls in (("qwen2_vl", Qwen2VLForConditionalGeneration),
                      ("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration)):
        out = os.path.join(ROOT, kind)
        model = cls(config(kind, tok))
        randomize(model)
        model = model.to(torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        from transformers import Qwen2VLVideoProcessor
        proc = Qwen2VLProcessor(image_processor=improc, tokenizer=tok,
                                video_processor=Qwen2VLVideoProcessor(), chat_template=TEMPLATE)
        proc.save_pretrained(out)
        published_layout(out, kind)
        # Published checkpoints carry the image processor as preprocessor_config.json.
        json.dump({"image_processor_type": "Qwen2VLImageProcessor",
                   "processor_class": "Qwen2VLProcessor", "min_pixels": MIN_PIXELS,
                   "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": improc.image_mean, "image_std": improc.image_std,
                   "do_convert_rgb": True, "resample": 3, "rescale_factor": 1 / 255},
                  open(os.path.join(out, "preprocessor_config.json"), "w"), indent=2)
        for f in ("generation_config.json",):
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        model = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        proc = AutoProcessor.from_pretrained(out)
        tensors = {}
        for pname, (names, text) in PROMPTS.items():
            content = [{"type": "image"} for _ in names] + [{"type": "text", "text": text}]
            msgs = [{"role": "user", "content": content}]
            prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            inputs = proc(text=[prompt], images=[ims[n] for n in names], return_tensors="pt")
            logits, toks, margins = run(model, inputs)
            ids = inputs["input_ids"][0]
            tensors[f"{pname}.ids"] = ids.to(torch.int64).to(torch.uint32)
            tensors[f"{pname}.logits"] = logits
            tensors[f"{pname}.greedy"] = torch.tensor(toks, dtype=torch.int64).to(torch.uint32)
            tensors[f"{pname}.greedy_margin"] = torch.tensor(margins, dtype=torch.float32)
            print(f"{kind} {pname}: {len(ids)} ids, {int((ids == model.config.image_token_id).sum())}"
                  f" image tokens, greedy {toks}, min margin {min(margins):.3f}")
        nq = quantize_lm(model)
        for pname, (names, text) in PROMPTS.items():
            content = [{"type": "image"} for _ in names] + [{"type": "text", "text": text}]
            msgs = [{"role": "user", "content": content}]
            prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            inputs = proc(text=[prompt], images=[ims[n] for n in names], return_tensors="pt")
            logits, toks, margins = run(model, inputs)
            tensors[f"{pname}.q8_logits"] = logits
            tensors[f"{pname}.q8_greedy"] = torch.tensor(toks, dtype=torch.int64).to(torch.uint32)
            tensors[f"{pname}.q8_greedy_margin"] = torch.tensor(margins, dtype=torch.float32)
            margins_all += margins + tensors[f"{pname}.greedy_margin"].tolist()
            d = (logits - tensors[f"{pname}.logits"]).abs().max().item()
            print(f"{kind} {pname} q8 ({nq} layers): max |q8 - float| {d:.3f}, greedy {toks}, "
                  f"min margin {min(margins):.3f}")
        save_file(tensors, os.path.join(ROOT, f"{kind}.golden.safetensors"),
                  metadata={"transformers": transformers.__version__, "torch": torch.__version__})
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{kind}: folder {size // 1024} KB: {sorted(os.listdir(out))}")
    print(f"seed {SEED}: smallest greedy margin {min(margins_all):.3f}")


if __name__ == "__main__":
    main()
