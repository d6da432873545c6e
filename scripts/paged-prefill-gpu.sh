#!/usr/bin/env bash
# One `device` call (run from the repo root; carry: [".gpu"], holding `pocketlm.xz`, `lc.tgz`
# and optionally `pocketlm-before.xz`, a build to compare with): prompts over a KV cache paged
# in a block pool on the GPU (what `serve --kv-memory` prefills through).
# 0. `gpu-selftest` (SELFTEST=0 skips it): its "flash prefill ... paged vs contiguous" rows run
#    the fused prefill attention over the same keys and values in scrambled pool blocks through
#    a block table, and must give the contiguous cache's bits.
# 1. `agree --batch --paged` on a 1B-shaped random Q4_0 (the prompts are prefilled into paged
#    caches, then decoded one by one and batched): tokens and logits against the CPU.
# 2. `bench -p 512 -n 0 -d $DEPTHS --paged` on an 8B-shaped Q4_0: pp512 at each depth with a
#    growing cache and with a paged one, with each binary.
. scripts/gpu-setup.sh
(cd $W && tar xzf $R/.gpu/lc.tgz)
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py CTX=32768
(cd $W && python3 $R/scripts/make_random_gguf.py 8b.gguf q4_0 --shape 8b >/dev/null) & p8=$!
(cd $W && python3 $R/scripts/make_random_gguf.py 1b.gguf q4_0 --shape 1b >/dev/null)
if [ "${SELFTEST:-1}" != 0 ]; then stamp gpu-selftest; selftest "prefill.*paged vs contiguous"; fi
stamp "agree --batch --paged"
$PL agree -m $W/1b.gguf --device cuda -n 32 --batch --paged 2>&1 | grep -E "tokens equal|all equal"
wait $p8
bins=(after:$PL)
if [ -f .gpu/pocketlm-before.xz ]; then
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" \
    .gpu/pocketlm-before.xz $W/pocketlm-before && chmod +x $W/pocketlm-before && bins=(before:$W/pocketlm-before "${bins[@]}")
fi
for b in "${bins[@]}"; do
  stamp "bench ${b%%:*}"
  ${b#*:} bench -m $W/8b.gguf --device cuda -p 512 -n 0 -d ${DEPTHS:-4096,16384} -r ${REPS:-3} --paged 2>&1 | grep "^| 8b"
done
stamp done
