#!/usr/bin/env bash
# One `device` call (run from the repo root; carry: [".gpu"], holding `pocketlm.xz`, a stripped
# `--features cuda` build, and `lc.tgz`, llama.cpp's source, for make_random_gguf.py's
# vocabulary): the small-batch GEMM's column splits added in split order (serial split-K, the
# opt-in mode, POCKETLM_MMQ_DETERMINISTIC=1) against atomically in the order they finish (the
# default).
# 1. `gpu-selftest`: every case, among them each split GEMM in split order against the atomic
#    sums and launched 4 more times (the same bits).
# 2. `agree --reference-device cuda --batch` on a 1B-shaped random Q4_0 (the GPU against a
#    second load of itself; prompts of 5-12 tokens take the split GEMM): both ways.
# 3. `bench` of an 8B-shaped Q4_0 both ways, alternating: pp16 and pp64 (prompts the split GEMM
#    takes), tg128 after 128 tokens at 1, 8 and 32 sequences.
. scripts/gpu-setup.sh
(cd $W && tar xzf $R/.gpu/lc.tgz)
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py CTX=8192
(cd $W && python3 $R/scripts/make_random_gguf.py 8b.gguf q4_0 --shape 8b >/dev/null) & p8=$!
(cd $W && python3 $R/scripts/make_random_gguf.py 1b.gguf q4_0 --shape 1b >/dev/null)
stamp "1b made; gpu-selftest"
selftest "serial"
for serial in 1 0; do
  stamp "agree against the GPU, POCKETLM_MMQ_DETERMINISTIC=$serial"
  POCKETLM_MMQ_DETERMINISTIC=$serial $PL agree -m $W/1b.gguf --device cuda --reference-device cuda -n 32 \
    --batch 2>&1 | grep -E "tokens equal|all equal"
done
wait $p8
for rep in 1 2; do
  for serial in 1 0; do
    stamp "bench 8b, POCKETLM_MMQ_DETERMINISTIC=$serial (round $rep)"
    POCKETLM_MMQ_DETERMINISTIC=$serial $PL bench -m $W/8b.gguf --device cuda -p 16,64 -n 0 -r 5 2>&1 |
      grep "^| 8b"
    POCKETLM_MMQ_DETERMINISTIC=$serial $PL bench -m $W/8b.gguf --device cuda -p 0 -n 128 -d 128 -r 2 \
      --batch 8,32 2>&1 | grep "^| 8b"
  done
done
stamp done
