#!/usr/bin/env python3
"""A tiny random-weight LFM2 model (issue #25: `lfm2`, Liquid AI's short gated convolutions mixed
with GQA attention), with transformers' logits and greedy tokens and mlx-lm's on its own 4-bit
conversion, for `crates/pocketlm/tests/it/archs_2026.rs`. Same tokenizer and golden file layout
as `tiny_moe.py` (read its docstring); this script writes only its own `lfm2*` entries under
`crates/pocketlm/tests/golden/archs_2026/` (tiny_moe.py clears that folder: run this after it).

References: Hugging Face transformers (`Lfm2ForCausalLM` from `Lfm2Config`, reduced sizes,
`models/lfm2/modeling_lfm2.py`), mlx-lm (`mlx_lm.convert -q --q-bits 4`, `mlx_lm.load`,
`models/lfm2.py`, whose cache is `KVCache` for attention layers and `ArraysCache(size=1)` for
convolution layers).

How to run (from the repository root, with the venv of tiny_moe.py):

    /tmp/venv-moe/bin/python scripts/golden/tiny_lfm2.py
    /tmp/venv-moe/bin/python scripts/golden/tiny_lfm2.py --gguf

Versions used for the committed files: torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, mlx 0.32.4, mlx-lm 0.32.2, Python 3.11, Linux x86_64 (CPU).

Model `lfm2` (vocab 320, hidden 64): 4 layers `[conv, full_attention, conv, full_attention]`
(layer 0 is a convolution layer, so the cache's offset comes from a
convolution state); convolution kernel `conv_L_cache` 3 (a state of the last 2 inputs);
attention: 4 query heads of width 16, 2 KV heads, q/k RMSNorm, RoPE theta 1e6;
`intermediate_size` 70 with `block_auto_adjust_ff_dim` (int(2 * 70 / 3) = 46, times
`block_ffn_dim_multiplier` 1.0, rounded up to `block_multiple_of` 32: 64); tied output layer
(std 1.0, norms around 1: `tiny_archs.randomize`). transformers' greedy tokens are full forward
passes without a cache, so pocketlm's cached decode (convolution state and KV cache) is checked
against them. config.json also carries `block_dim` (64), as the Hub checkpoints do (mlx-lm
requires it; transformers 5.24 does not write it).

- `lfm2_mlx_q4/`: `mlx_lm.convert(quantize=True, q_bits=4, q_group_size=32, dtype="float32")`
  of `lfm2/` (mlx-lm's `sanitize` stores `conv.conv.weight` as `[hidden, 3, 1]`, unquantized);
  in `lfm2.golden.safetensors`: `mlx_greedy` (mlx-lm's 16 greedy tokens after prompt 1, its
  caches, argmax) and `mlx_logits1` `[12, 320]` f32 (mlx-lm's logits over prompt 1, one pass).

With `--gguf` (after the above; needs a llama.cpp checkout with LFM2 support, built with
`cmake -B build && cmake --build build --target llama`, at `$LLAMA_CPP`, default
`~/.cache/pocketlm/llama.cpp`, and a C compiler):

- `lfm2.gguf`: llama.cpp's `convert_hf_to_gguf.py --outtype q8_0` of `lfm2/` (the convolution
  weight squeezed to `[hidden, 3]` and kept float; the per-layer
  `lfm2.attention.head_count_kv` is 0 on convolution layers);
- `lfm2.gguf_llamacpp.safetensors`: `greedy` `[16]` u32, llama.cpp's greedy tokens after prompt
  0 on that file (its library through a small C driver compiled here: f32 KV cache, no flash
  attention, one thread). On an f32 conversion of the same folder (not committed) llama.cpp's
  greedy tokens equal transformers'; Q8_0 rounding moves them from step 2 on.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import save_file
from transformers import Lfm2Config, Lfm2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_archs import greedy, randomize, tokenizer  # noqa: E402
from tiny_moe import CONVERT, ROOT, float_goldens, mlx_greedy  # noqa: E402
from tiny_2026b import mlx_logits  # noqa: E402

NAME = "lfm2"
CONV, FULL = "conv", "full_attention"


def make():
    torch.manual_seed(0)
    out = os.path.join(ROOT, NAME)
    shutil.rmtree(out, ignore_errors=True)
    tok = tokenizer("chatml")
    cfg = Lfm2Config(
        vocab_size=320, hidden_size=64, intermediate_size=70, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        norm_eps=1e-5, conv_L_cache=3, conv_bias=False, block_multiple_of=32,
        block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=True,
        layer_types=[CONV, FULL, CONV, FULL], initializer_range=0.2,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    model = Lfm2ForCausalLM(cfg)
    randomize(model, NAME)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # mlx-lm 0.32.2's `lfm2.ModelArgs` requires `block_dim` (the hidden width), which the Hub
    # checkpoints carry and transformers 5.24 does not write.
    cpath = os.path.join(out, "config.json")
    with open(cpath) as f:
        c = json.load(f)
    c["block_dim"] = cfg.hidden_size
    with open(cpath, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    model = Lfm2ForCausalLM.from_pretrained(out, dtype=torch.float32,
                                            attn_implementation="eager").eval()
    assert model.model.layers[0].feed_forward.w1.weight.shape == (64, 64)
    tensors, toks, margins = float_goldens(model, tok)

    from mlx_lm.convert import convert as mlx_convert
    q4 = os.path.join(ROOT, f"{NAME}_mlx_q4")
    shutil.rmtree(q4, ignore_errors=True)
    mlx_convert(out, q4, quantize=True, q_group_size=32, q_bits=4, dtype="float32")
    ids1 = tensors["ids1"].to(torch.int64).tolist()
    mt = mlx_greedy(q4, ids1, 16)
    tensors["mlx_greedy"] = torch.tensor(mt, dtype=torch.int64).to(torch.uint32)
    tensors["mlx_logits1"] = mlx_logits(q4, ids1)
    ft, _ = greedy(model, ids1, 16)
    agree = next((i for i, (a, b) in enumerate(zip(ft, mt)) if a != b), 16)
    print(f"{NAME}: mlx-lm q4 greedy {mt} ({agree} leading tokens equal transformers')")

    save_file(tensors, os.path.join(ROOT, f"{NAME}.golden.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__})
    size = sum(os.path.getsize(os.path.join(d, f)) for d in (out, q4) for f in os.listdir(d))
    print(f"{NAME}: folders {size // 1024} KB, greedy {toks}, min margin {min(margins):.3f}")
    assert size < 600 * 1024, size


GREEDY_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include "llama.h"

/* argv[1] = GGUF, argv[2] = steps, then the prompt's token ids; prints the greedy ids. */
int main(int argc, char **argv) {
    int steps = atoi(argv[2]), n = argc - 3;
    llama_token *ids = malloc(sizeof(llama_token) * n), tok;
    for (int i = 0; i < n; i++) ids[i] = atoi(argv[3 + i]);
    llama_backend_init();
    struct llama_model *model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) return 1;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64; cp.n_batch = 64; cp.n_ubatch = 64; cp.n_threads = 1; cp.n_threads_batch = 1;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) return 1;
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_batch batch = llama_batch_get_one(ids, n);
    for (int s = 0; s < steps; s++) {
        if (llama_decode(ctx, batch) != 0) return 1;
        float *l = llama_get_logits_ith(ctx, -1);
        int best = 0;
        for (int v = 1; v < n_vocab; v++) if (l[v] > l[best]) best = v;
        printf(s ? " %d" : "%d", best);
        tok = best;
        batch = llama_batch_get_one(&tok, 1);
    }
    printf("\n");
    return 0;
}
"""

def make_gguf():
    import numpy as np
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_np
    llama = os.environ.get("LLAMA_CPP", os.path.expanduser("~/.cache/pocketlm/llama.cpp"))
    src = os.path.join(ROOT, NAME)
    gguf = os.path.join(ROOT, f"{NAME}.gguf")
    if os.path.exists(gguf):
        os.remove(gguf)
    subprocess.check_call([sys.executable, "-c", CONVERT.format(llama=llama, src=src, out=gguf)])
    tmp = tempfile.mkdtemp(prefix="tiny-lfm2-")
    with open(os.path.join(tmp, "greedy.c"), "w") as f:
        f.write(GREEDY_C)
    lib = os.path.join(llama, "build", "bin")
    exe = os.path.join(tmp, "greedy")
    subprocess.check_call(["cc", "-O1", "-o", exe, os.path.join(tmp, "greedy.c"),
                           f"-I{llama}/include", f"-I{llama}/ggml/include", f"-L{lib}",
                           "-lllama", f"-Wl,-rpath,{lib}"])
    ids0 = load_file(os.path.join(ROOT, f"{NAME}.golden.safetensors"))["ids0"]
    out = subprocess.check_output([exe, gguf, "16"] + [str(int(i)) for i in ids0],
                                  stderr=subprocess.DEVNULL, text=True)
    toks = [int(t) for t in out.split()]
    assert len(toks) == 16, out
    save_np({"greedy": np.array(toks, dtype=np.uint32)},
            os.path.join(ROOT, f"{NAME}.gguf_llamacpp.safetensors"))
    print(f"{NAME}: llama.cpp greedy {toks}; gguf {os.path.getsize(gguf) // 1024} KB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", action="store_true", help="only the GGUF file and llama.cpp tokens")
    if ap.parse_args().gguf:
        make_gguf()
    else:
        make()
