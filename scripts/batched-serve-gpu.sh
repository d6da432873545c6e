#!/usr/bin/env bash
# One `device` call (run from the repo root; carry: [".gpu"], holding `pocketlm.xz`, a stripped
# `--features cuda` build, and `lc.tgz`, llama.cpp's source with `tools/ui`, which its server
# target needs): the batched decode table of an 8B Q4_0 (tg128 after 128 tokens, 1 to 64
# sequences) with the batched attention split at its default and at 8, llama-batched-bench, then
# `serve` on CUDA against llama.cpp's `llama-server` under 32 clients and one
# (scripts/loadtest-vs-llamacpp.sh with DEVICE=cuda), both llama.cpp programs built in the same
# call. The build runs beside the first rows; the script stops waiting as soon as it ends.
. scripts/gpu-setup.sh
(cd $W && tar xzf $R/.gpu/lc.tgz)
[ -d $W/lc/tools/ui ] || echo "lc.tgz has no tools/ui: llama-server will not configure"
build_llama llama-batched-bench llama-server
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py CTX=8192
(cd $W && python3 $R/scripts/make_random_gguf.py 8b.gguf q4_0 --shape 8b >/dev/null); M=$W/8b.gguf
stamp "batched table, defaults"
$PL bench -m $M --device cuda -p 0 -n 128 -d 128 -r 2 --batch 1,8,16,32,64 2>&1 | grep "^|" | tail -5
stamp "attention <= 8 splits"
POCKETLM_ATTN_BATCH_SPLITS=8 $PL bench -m $M --device cuda -p 0 -n 128 -d 128 -r 2 --batch 16,32 2>&1 | grep "^|" | tail -2
stamp "waiting for llama.cpp"
wait $lc
if ! grep -q built $W/lc-build.log; then
  echo "llama.cpp did not build"; tail -5 $W/lc-build.log; exit 1
fi
stamp llama-batched-bench
$W/lc/build/bin/llama-batched-bench -m $M -ngl 99 -c 20480 -npp 128 -ntg 128 -npl 1,8,16,32,64 2>&1 | grep -E "^\|"
stamp "serve load test"
DEVICE=cuda LLAMA_SERVER=$W/lc/build/bin/llama-server POCKETLM_BIN=$PL THREADS=8 CLIENTS=32 REQUESTS=96 TOKENS=128 \
  timeout 240 bash scripts/loadtest-vs-llamacpp.sh $M 2>$W/lt.err | tail -8
grep -iE "failed|error" $W/lt.err | head -10
stamp done
