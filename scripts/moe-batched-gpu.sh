#!/usr/bin/env bash
# Batched decode of a mixture-of-experts model on CUDA, in one `device` call (run from the repo
# root; carry: [".gpu"], which must hold `pocketlm.xz`, `lc.tgz` and llama.cpp's
# `ggml-vocab-qwen2.gguf`). On a random Qwen3-30B-A3B-shaped Q4_0 (scripts/make_random_gguf.py):
#  1. `agree --batch` on its first 4 layers: greedy tokens and logits, CPU against GPU, one
#     sequence at a time and the 5 prompts decoded together (the one-token rows through the
#     fused step one by one);
#  2. `bench --batch $BATCHES` (default 8,32; each cache filled with 128 tokens, then $TOKENS
#     decoded for all together, aggregate tokens/s) with the rows through the fused step one by
#     one (the default) and with POCKETLM_FUSED_ROWS=0 (the model's own layer-by-layer batched
#     pass), back to back, $REPS each.
set -uo pipefail
. scripts/gpu-setup.sh
BATCHES=${BATCHES:-8,32}; TOKENS=${TOKENS:-32}; REPS=${REPS:-2}
(cd $W && tar xzf $R/.gpu/lc.tgz lc/gguf-py lc/models/ggml-vocab-llama-bpe.gguf 2>/dev/null || tar xzf $R/.gpu/lc.tgz)
cp $R/.gpu/ggml-vocab-qwen2.gguf $W/lc/models/
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py CTX=4096
M=$W/qwen3-30b-a3b-q4_0.gguf M4=$W/qwen3-30b-a3b-4layers-q4_0.gguf
stamp models
[ -f $M4 ] || (cd $W && LAYERS=4 python3 $R/scripts/make_random_gguf.py $(basename $M4) q4_0 --shape qwen3-30b-a3b >/dev/null)
[ -f $M ] || (cd $W && python3 $R/scripts/make_random_gguf.py $(basename $M) q4_0 --shape qwen3-30b-a3b >/dev/null) &
mk=$!
stamp agree
POCKETLM_LOG=info $PL agree -m $M4 --device cuda -n 32 --batch 2>&1 | grep -E "all equal|fused CUDA|^batched" | sed 's/.*INFO //'
wait $mk
for v in rows general rows2 general2; do
  case $v in general*) export POCKETLM_FUSED_ROWS=0;; *) unset POCKETLM_FUSED_ROWS;; esac
  stamp "bench $v"
  $PL bench -m $M --device cuda -p 0 -n $TOKENS -d 128 -r $REPS --batch $BATCHES 2>&1 | grep '^|' | tail -3
done
stamp done
