#!/usr/bin/env bash
# The batched-decode sweep behind the batched attention split and the split gated product (one
# `device` call, run from the repo root; carry: [".gpu"], holding `pocketlm.xz`, a stripped
# `--features cuda` build, and `lc.tgz`, ../shared/tools/llamacpp-src.sh): the matrix-kernel
# self-test, batched agreement on a 1B Q4_0 (fused and split gated product), tg64 of an 8B Q4_0
# at 8 and 32 sequences under each setting, then tg128 at 8 to 64 sequences with the gated
# product fused and split, and llama-batched-bench built in the same call. About 320 s on an
# H200 (2026-12-05; its output is in stop 46's closing note and README's batched table).
. scripts/gpu-setup.sh
(cd $W && tar xzf $R/.gpu/lc.tgz)
build_llama llama-batched-bench
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py CTX=8192
(cd $W && python3 $R/scripts/make_random_gguf.py 8b.gguf q4_0 --shape 8b >/dev/null) & p8=$!
(cd $W && python3 $R/scripts/make_random_gguf.py 1b.gguf q4_0 --shape 1b >/dev/null)
stamp selftest; POCKETLM_SELFTEST=matmul $PL gpu-selftest > $W/selftest.txt 2>&1; tail -1 $W/selftest.txt
grep FAIL $W/selftest.txt | head -5; grep "split4" $W/selftest.txt | head -8
stamp agree
POCKETLM_MMQ_GATED_SPLITS=1 $PL agree -m $W/1b.gguf --device cuda -n 32 --batch 2>&1 | grep -E "tokens equal|all equal|max"| tail -3
POCKETLM_MMQ_GATED_SPLITS=4 $PL agree -m $W/1b.gguf --device cuda -n 32 --batch 2>&1 | grep -E "tokens equal|all equal|max" | tail -3
wait $p8; M=$W/8b.gguf
stamp sweep
run() { echo "$1: $(env $2 $PL bench -m $M --device cuda -p 0 -n 64 -d ${D:-128} -r 2 --batch ${BS:-8,32} 2>&1 | grep '^|' | tail -3 | awk -F'|' '{printf "%s=%s ", $5, $6}')"; }
F="POCKETLM_MMQ_GATED_SPLITS=1"
run base "$F POCKETLM_ATTN_BATCH_SPLITS=8"
run attn4 "$F POCKETLM_ATTN_BATCH_SPLITS=4"
run attn16 "$F POCKETLM_ATTN_BATCH_SPLITS=16"
run gated2 "POCKETLM_ATTN_BATCH_SPLITS=8 POCKETLM_MMQ_GATED_SPLITS=2"
run gated4 "POCKETLM_ATTN_BATCH_SPLITS=8 POCKETLM_MMQ_GATED_SPLITS=4"
run gated8 "POCKETLM_ATTN_BATCH_SPLITS=8 POCKETLM_MMQ_GATED_SPLITS=8"
D=1024 run d1024-attn8 "$F POCKETLM_ATTN_BATCH_SPLITS=8"
D=1024 run d1024-attn32 "$F POCKETLM_ATTN_BATCH_SPLITS=32"
stamp final
for v in POCKETLM_MMQ_GATED_SPLITS=1 POCKETLM_MMQ_GATED_SPLITS=4; do
  echo "== $v"; env $v $PL bench -m $M --device cuda -p 0 -n 128 -d 128 -r 2 --batch 8,16,32,64 2>&1 | grep "^|"
done
stamp "waiting for llama.cpp"
while ! grep -q built $W/lc-build.log && [ $(( $(date +%s) - t0 )) -lt 480 ]; do sleep 2; done
if grep -q built $W/lc-build.log; then
  stamp llama-batched-bench
  $W/lc/build/bin/llama-batched-bench -m $M -ngl 99 -c 20480 -npp 128 -ntg 128 -npl 1,8,16,32,64 2>&1 | grep -E "^\|"
else
  echo "llama.cpp not built in time"; tail -3 $W/lc-build.log
fi
stamp done
