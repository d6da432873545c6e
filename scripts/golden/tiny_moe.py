#!/usr/bin/env python3
"""Tiny random-weight models of the 2026 architectures (issue #25: `qwen3_moe`, `smollm3`), with
transformers' logits and greedy tokens, mlx-lm's greedy tokens on its own 4-bit conversion and
llama.cpp's greedy tokens on its own GGUF conversion, for
`crates/pocketlm/tests/it/archs_2026.rs`.

References: Hugging Face transformers (`Qwen3MoeForCausalLM`, `SmolLM3ForCausalLM`, built from
their real config classes with reduced sizes), mlx-lm (`mlx_lm.convert -q --q-bits 4`,
`mlx_lm.load`), llama.cpp as vendored by llama-cpp-python 0.3.36 (`convert_hf_to_gguf.py`, and
the library for evaluation).

How to run (from the repository root):

    python3 -m venv /tmp/venv-moe
    /tmp/venv-moe/bin/pip install "torch==2.15.0" "transformers==5.24.0" "tokenizers==0.23.3" \
        "safetensors==0.8.0" "mlx[cpu]==0.32.4" "mlx-lm==0.32.2" numpy scikit-build-core cmake
    /tmp/venv-moe/bin/pip install --no-build-isolation llama-cpp-python==0.3.36   # for --gguf
    /tmp/venv-moe/bin/python scripts/golden/tiny_moe.py [--gguf [--only NAME ...]]

Without `--gguf` it clears the whole output folder first (the other scripts writing there then
have to run again); `--gguf` writes only the GGUF files below and clears nothing.

Versions used for the committed files: torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, mlx 0.32.4, mlx-lm 0.32.2, llama-cpp-python 0.3.36, Python 3.11, Linux
x86_64 (CPU).

Output under `crates/pocketlm/tests/golden/archs_2026/` (its own folder: `tiny_archs.py` clears
`archs/` when it runs):

- `<name>/`: `config.json`, `model.safetensors` (bfloat16, `save_pretrained`, which writes the
  experts under their original per-expert names `mlp.experts.{e}.{gate,up,down}_proj.weight`),
  the byte-level BPE tokenizer of `tiny_archs.py` (vocabulary 320, ChatML specials).
- `<name>.golden.safetensors`: for prompts p = 0, 1, 2 `ids{p}` u32 and `logits{p}`
  `[len, 320]` f32 (transformers' float32 forward over the bfloat16 weights, every position);
  `greedy` `[16]` u32 (16 greedy tokens after prompt 0, each step a full forward pass) and
  `greedy_margin` `[16]` f32 (top-1 minus top-2 logit of each step).
- `<name>_mlx_q4/` (qwen3_moe only): `mlx_lm.convert(quantize=True, q_bits=4, q_group_size=32,
  dtype="float32")` of the folder: experts stacked as `mlp.switch_mlp.*` and quantized 4-bit,
  the router `mlp.gate` 8-bit by the model's `quant_predicate`, float32 scales and norms
  (mlx-lm computes in the weights' dtype; in bfloat16 its greedy tokens part from its own
  float32 run on the same dequantized weights at the first step; pocketlm computes in f32).
  `mlx_greedy` in the golden file: mlx-lm's 16 greedy tokens after prompt 1 on it (KV cache,
  argmax; prompt 1 because its steps keep a top-1/top-2 margin of 0.39 or more, where prompt 0
  meets a 0.05 near-tie).
- `--gguf`: `<name>.gguf` from llama.cpp's converter (`--outtype q8_0`, so that the experts run
  on our Q8_0 kernels one expert slice at a time; qwen3_moe_sparse and
  smollm3, which llama.cpp's `qwen3moe` / `smollm3` graphs accept: every layer MoE, NoPE every
  4th layer), and `<name>.gguf_llamacpp.safetensors`: llama.cpp on that file after prompt 0
  (f32 KV cache, no flash attention, `logits_all=True`: without it llama-cpp-python 0.3.36
  leaves `scores` at zero and every token came out 0): `logits` `[20, 320]` f32 at every
  prompt position, `greedy` `[16]` u32 and `greedy_margin` `[16]` f32 (top-1 minus top-2).

Models (hidden 64, heads 4 of width 16, KV heads 2, vocab 320, dense MLP width 64, an
untied output layer of std 1.0 so that greedy steps are far from ties; folders under 400 KB):
- qwen3_moe: 2 layers, 8 experts, top-2, `moe_intermediate_size` 32, `mlp_only_layers` [1]
  (layer 0 MoE, layer 1 a dense MLP), `norm_topk_prob` false; its MLX folder uses group size
  32 (the experts' `down_proj` is 32 wide).
- qwen3_moe_sparse: 2 layers, both MoE (`decoder_sparse_step` 1), `norm_topk_prob` true
  (llama.cpp's qwen3moe graph has no dense layers and always normalizes the top-k weights).
- smollm3: 4 layers, `no_rope_layers` [1, 1, 1, 0] (transformers' default from
  `no_rope_layer_interval` 4: layer 3 has no RoPE).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import (Qwen3MoeConfig, Qwen3MoeForCausalLM, SmolLM3Config,
                          SmolLM3ForCausalLM)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_archs import greedy, randomize, tokenizer  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "crates", "pocketlm",
                    "tests", "golden", "archs_2026")
PROMPTS = [
    ("Small models run on laptops: the quick brown fox jumps over a lazy wizard.", 20),
    ("Rust is a systems programming language focused on safety.", 12),
    ("Pack my box with five dozen jugs.", 7),
]
SDIST_DIR = os.environ.get("SDIST_DIR", "/tmp/moe-sdist")
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              initializer_range=0.2)


def archs():
    yield "qwen3_moe", Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **COMMON, num_hidden_layers=2, head_dim=16, rope_theta=1e6, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
        mlp_only_layers=[1], norm_topk_prob=False, tie_word_embeddings=False)
    yield "qwen3_moe_sparse", Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **COMMON, num_hidden_layers=2, head_dim=16, rope_theta=1e6, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False)
    yield "smollm3", SmolLM3ForCausalLM, SmolLM3Config(
        **COMMON, num_hidden_layers=4, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False)


def mlx_readable(folder):
    """A copy of `folder` whose config.json also has `num_experts` and `rope_theta`: mlx-lm
    0.32.2's `qwen3_moe.ModelArgs` requires both, and transformers 5.24 writes them as
    `num_local_experts` and `rope_parameters.rope_theta` (checkpoints on the Hub, written by
    transformers 4, have both names)."""
    import json
    import tempfile
    dst = os.path.join(tempfile.mkdtemp(prefix="tiny-moe-"), os.path.basename(folder))
    shutil.copytree(folder, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg.setdefault("num_experts", cfg.get("num_local_experts"))
    cfg.setdefault("rope_theta", cfg["rope_parameters"]["rope_theta"])
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return dst


def mlx_greedy(folder, ids, n):
    import mlx.core as mx
    mx.set_default_device(mx.cpu)
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache
    model, _ = load(folder)
    cache = make_prompt_cache(model)
    x = mx.array([ids])
    out = []
    for _ in range(n):
        t = int(mx.argmax(model(x, cache=cache)[0, -1]).item())
        out.append(t)
        x = mx.array([[t]])
    return out


def vendored_llama_cpp():
    found = glob.glob(os.path.join(SDIST_DIR, "llama_cpp_python-0.3.36", "vendor", "llama.cpp"))
    if found:
        return found[0]
    os.makedirs(SDIST_DIR, exist_ok=True)
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                           "--no-binary", ":all:", "--no-build-isolation", "-d", SDIST_DIR,
                           "llama-cpp-python==0.3.36"])
    with tarfile.open(os.path.join(SDIST_DIR, "llama_cpp_python-0.3.36.tar.gz")) as t:
        t.extractall(SDIST_DIR)
    return os.path.join(SDIST_DIR, "llama_cpp_python-0.3.36", "vendor", "llama.cpp")


# As tiny_gguf.py: the tiny tokenizer is byte-level BPE with GPT-2's split regex.
CONVERT = r'''
import sys
sys.path.insert(0, {llama!r} + "/gguf-py")
sys.path.insert(0, {llama!r})
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outtype", "q8_0", "--outfile", {out!r},
            "--model-name", "tiny-random"]
import convert_hf_to_gguf as c
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
c.main()
'''


def llamacpp_run(path, ids, n):
    """llama.cpp on GGUF `path` (f32 KV cache, no flash attention): the logits of every
    position of prompt `ids`, then `n` greedy tokens with each step's top-1/top-2 margin.
    `logits_all=True`: llama-cpp-python 0.3.36 keeps no logits in `scores` otherwise (its
    `eval` leaves them to the sampler), and the argmax of zeros is token 0."""
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                flash_attn=False, type_k=0, type_v=0, seed=0)  # type 0 = GGML_TYPE_F32
    llm.eval(ids)
    prompt_logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
    toks, margins = [], []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1])
        assert np.abs(logits).max() > 0, "llama.cpp returned no logits"
        top = np.sort(logits)[::-1]
        toks.append(int(np.argmax(logits)))
        margins.append(float(top[0] - top[1]))
        llm.eval([toks[-1]])
    return prompt_logits, toks, margins


def float_goldens(model, tok):
    """The golden tensors of a float model (`ids{p}`, `logits{p}`, `greedy`, `greedy_margin`,
    see the module docstring), with the greedy tokens and margins."""
    tensors = {}
    for p, (text, n) in enumerate(PROMPTS):
        ids = tok(text, add_special_tokens=False)["input_ids"][:n]
        assert len(ids) == n, (text, len(ids))
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
        tensors[f"ids{p}"] = torch.tensor(ids, dtype=torch.int64).to(torch.uint32)
        tensors[f"logits{p}"] = logits.contiguous()
    ids0 = tensors["ids0"].to(torch.int64).tolist()
    toks, margins = greedy(model, ids0, 16)
    tensors["greedy"] = torch.tensor(toks, dtype=torch.int64).to(torch.uint32)
    tensors["greedy_margin"] = torch.tensor(margins, dtype=torch.float32)
    return tensors, toks, margins


def make_hf():
    torch.manual_seed(0)
    shutil.rmtree(ROOT, ignore_errors=True)
    for name, cls, cfg in archs():
        out = os.path.join(ROOT, name)
        tok = tokenizer("chatml")
        cfg.bos_token_id = tok.bos_token_id
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
        model = cls(cfg)
        randomize(model, name)
        model = model.to(torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        model = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        tensors, toks, margins = float_goldens(model, tok)
        if name == "qwen3_moe":
            from mlx_lm.convert import convert as mlx_convert
            q4 = os.path.join(ROOT, f"{name}_mlx_q4")
            mlx_convert(mlx_readable(out), q4, quantize=True, q_group_size=32, q_bits=4,
                        dtype="float32")
            # Prompt 1: its greedy steps keep a margin of at least 0.39 on this 4-bit model;
            # prompt 0 meets a near-tie (0.05) at step 6, where rounding decides.
            mt = mlx_greedy(q4, tensors["ids1"].to(torch.int64).tolist(), 16)
            tensors["mlx_greedy"] = torch.tensor(mt, dtype=torch.int64).to(torch.uint32)
            agree = next((i for i, (a, b) in enumerate(zip(toks, mt)) if a != b), 16)
            print(f"{name}: mlx-lm q4 greedy {mt} ({agree} leading tokens equal transformers')")
        save_file(tensors, os.path.join(ROOT, f"{name}.golden.safetensors"),
                  metadata={"transformers": transformers.__version__, "torch": torch.__version__})
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{name}: folder {size // 1024} KB, greedy {toks}, min margin {min(margins):.3f}")
        assert size < 400 * 1024, size


def make_gguf(only):
    llama = vendored_llama_cpp()
    from safetensors.numpy import load_file, save_file as save_numpy
    for name in ["qwen3_moe_sparse", "smollm3"]:
        if only and name not in only:
            continue
        src = os.path.join(ROOT, name)
        gguf = os.path.join(ROOT, f"{name}.gguf")
        if os.path.exists(gguf):
            os.remove(gguf)
        subprocess.check_call([sys.executable, "-c",
                               CONVERT.format(llama=llama, src=src, out=gguf)])
        ids0 = load_file(os.path.join(ROOT, f"{name}.golden.safetensors"))["ids0"]
        logits, toks, margins = llamacpp_run(gguf, [int(i) for i in ids0], 16)
        save_numpy({"logits": logits, "greedy": np.array(toks, dtype=np.uint32),
                 "greedy_margin": np.array(margins, dtype=np.float32)},
                os.path.join(ROOT, f"{name}.gguf_llamacpp.safetensors"))
        print(f"{name}: llama.cpp greedy {toks}, min margin {min(margins):.3f}; "
              f"gguf {os.path.getsize(gguf) // 1024} KB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", action="store_true", help="only the GGUF files and llama.cpp tokens")
    ap.add_argument("--only", action="append",
                    help="with --gguf: only this model's files (repeatable)")
    args = ap.parse_args()
    if args.gguf:
        make_gguf(args.only)
    else:
        make_hf()


if __name__ == "__main__":
    main()
