#!/usr/bin/env bash
# Batched decode of a mixture-of-experts model on CUDA, in one `device` call (run from the repo
# root; carry: [".gpu"], which must hold `pocketlm.xz`, `lc.tgz` and llama.cpp's
# `ggml-vocab-qwen2.gguf`). On a random Qwen3-30B-A3B-shaped Q4_0 (scripts/make_random_gguf.py):
#  1. `agree --batch` on its first 4 layers: greedy tokens and logits, CPU against GPU, one
#     sequence at a time and the 5 prompts decoded together; then the GPU against a second
#     load of itself (`--reference-device cuda`; the small-batch GEMM's split sums by atomicAdd
#     keep even one sequence from giving the same bits twice);
#  2. `bench --batch $BATCHES` (default 8,32; each cache filled with 128 tokens, then $TOKENS
#     decoded for all together, aggregate tokens/s) with the batched fused step, with the rows
#     one by one, and with POCKETLM_FUSED_ROWS=0 as well (the model's own layer-by-layer
#     batched pass; LAYERWISE=1), back to back, $REPS each;
#  3. llama.cpp's llama-batched-bench on the same GGUF (-npp 128 -ntg $TOKENS -npl
#     1,$BATCHES; its S_TG), built in the background from lc.tgz (LLAMA=0 skips it).
#  4. PREFILL=1: pp512 with the mixture of experts on the fused kernels (the default) and on
#     the general path (POCKETLM_MOE_KERNELS=0), against llama-bench -p 512.
# VARIANTS picks the bench runs (default "batched rows batched2 rows2"). NCU=32 (a batch
# size) first profiles the batched step's kernels with Nsight Compute: the mean time of each
# (gpu__time_duration) over a few steps.
set -uo pipefail
. scripts/gpu-setup.sh
BATCHES=${BATCHES:-8,32}; TOKENS=${TOKENS:-32}; REPS=${REPS:-2}
(cd $W && tar xzf $R/.gpu/lc.tgz)
[ "${LLAMA:-1}" = 0 ] || build_llama llama-batched-bench llama-bench
cp $R/.gpu/ggml-vocab-qwen2.gguf $W/lc/models/
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py CTX=4096
M=$W/qwen3-30b-a3b-q4_0.gguf M4=$W/qwen3-30b-a3b-4layers-q4_0.gguf
stamp models
[ -f $M4 ] || (cd $W && LAYERS=4 python3 $R/scripts/make_random_gguf.py $(basename $M4) q4_0 --shape qwen3-30b-a3b >/dev/null)
[ -f $M ] || (cd $W && python3 $R/scripts/make_random_gguf.py $(basename $M) q4_0 --shape qwen3-30b-a3b >/dev/null) &
mk=$!
stamp agree
for r in cpu cuda; do
  echo "agree, reference $r:"
  $PL agree -m $M4 --device cuda --reference-device $r -n 32 --batch 2>&1 | grep -E "all equal|max" | cut -c1-100
done
wait $mk
if [ -n "${NCU:-}" ]; then
  stamp "ncu x$NCU"
  ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
    -k "regex:^(moe_|qmmq|attn_|rmsnorm_q8|qkv_|qgemv|quantize_q8|glu_q8)" --launch-count 1500 \
    $PL bench -m $M --device cuda -p 0 -n 8 -d 128 -r 1 --batch $NCU > $W/ncu.txt 2>&1 || tail -3 $W/ncu.txt
  python3 - $W/ncu.txt <<'PY'
import csv, sys, collections
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
rows = list(csv.reader(lines))
head = next(r for r in rows if r and r[0] == "ID")
k, t = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
unit = rows[rows.index(head) + 1][t]
scale = {"ns": 1e-3, "usecond": 1, "us": 1, "msecond": 1e3, "ms": 1e3}.get(unit, 1e-3)
agg = collections.defaultdict(lambda: [0, 0.0])
for r in rows[rows.index(head) + 2:]:
    if len(r) > t and r[t].replace(".", "").replace(",", "").isdigit():
        name = r[k].split("(")[0].split("<")[0]
        agg[name][0] += 1; agg[name][1] += float(r[t].replace(",", "")) * scale
tot = sum(v[1] for v in agg.values()) or 1
print(f"ncu: {sum(v[0] for v in agg.values())} launches, {tot:.0f} us ({unit})")
for name, (n, us) in sorted(agg.items(), key=lambda x: -x[1][1])[:14]:
    print(f"{name[:40]:40} x{n:5} {us / n:8.1f} us  {100 * us / tot:5.1f}%")
PY
fi
for v in ${VARIANTS:-batched rows batched2 rows2} ${LAYERWISE:+general}; do
  unset POCKETLM_MOE_BATCH POCKETLM_FUSED_ROWS
  case $v in rows*) export POCKETLM_MOE_BATCH=0;; general) export POCKETLM_MOE_BATCH=0 POCKETLM_FUSED_ROWS=0;; esac
  stamp "bench $v"
  $PL bench -m $M --device cuda -p 0 -n $TOKENS -d 128 -r $REPS --batch $BATCHES 2>&1 | grep '^|' | tail -3
done
if [ -n "${PREFILL:-}" ]; then
  for v in kernels general; do
    case $v in general) export POCKETLM_MOE_KERNELS=0;; *) unset POCKETLM_MOE_KERNELS;; esac
    stamp "pp512 $v"
    $PL bench -m $M --device cuda -p 512 -n 0 -r 2 2>&1 | grep '^|' | tail -1
  done
  unset POCKETLM_MOE_KERNELS
fi
if [ "${LLAMA:-1}" != 0 ]; then
  stamp "waiting for llama.cpp"; wait $lc; tail -1 $W/lc-build.log
  $W/lc/build/bin/llama-batched-bench -m $M -ngl 99 -c 8192 -npp 128 -ntg $TOKENS -npl 1,$BATCHES > $W/lb.txt 2>&1 || tail -3 $W/lb.txt
  awk -F'|' '$2 ~ /^ *[0-9]+ *$/ {gsub(/ /,""); printf "llama.cpp tg%s x%s @ d%s (S_TG): %s t/s\n", $3, $4, $2, $9}' $W/lb.txt
  [ -z "${PREFILL:-}" ] || $W/lc/build/bin/llama-bench -m $M -ngl 99 -p 512 -n 0 -r 3 2>&1 | grep -E "^\|.*pp512"
fi
stamp done
