#!/usr/bin/env bash
# Where a batched decode step's time goes on the GPU, in one `device` call (run from the repo
# root; carry: [".gpu"], which must hold `pocketlm.xz` (a stripped `--features cuda` build, see
# README "Building with CUDA") and `lc.tgz` (../shared/tools/llamacpp-src.sh: only its gguf-py
# and Llama-3 vocabulary are used here)). On a random Llama-3-8B-shaped Q4_0:
#  1. `bench --batch 8,32` under POCKETLM_MMQ_SPLITS = the default rule, 1, 2, 4 and 16;
#  2. Nsight Compute over one batched step at 8 and at 32 sequences (the second step's 129
#     `qmmq_*` launches: 4 a layer and the LM head), per kernel and grid: time, DRAM and L2
#     bytes, SM throughput and instructions.
# About 330 s on an H100 (2026-12-05; its output is in stop 45's closing note).
# With ALL_KERNELS=1, step 2 instead times every decode kernel (one metric, Nsight Compute) of a
# whole 32-sequence run (-n 2), grouped by kernel and grid: the batched step's kernels are those
# whose grid holds 32 on its sequence dimension, and the qmmq ones (stop 46's closing note).
. scripts/gpu-setup.sh
(cd $W && tar xzf $R/.gpu/lc.tgz lc/gguf-py lc/models/ggml-vocab-llama-bpe.gguf 2>/dev/null || tar xzf $R/.gpu/lc.tgz)
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py CTX=4096
[ -f $W/8b.gguf ] || (cd $W && python3 $R/scripts/make_random_gguf.py 8b.gguf q4_0 --shape 8b >/dev/null)
stamp model
M=$W/8b.gguf
for s in default 1 2 4 16; do
  if [ $s = default ]; then unset POCKETLM_MMQ_SPLITS; else export POCKETLM_MMQ_SPLITS=$s; fi
  echo "splits=$s: $($PL bench -m $M --device cuda -p 0 -n 64 -d 128 -r 2 --batch 8,32 2>&1 | grep '^|' | tail -3 | awk -F'|' '{printf "%s=%s ", $5, $6}')"
done
unset POCKETLM_MMQ_SPLITS
stamp ncu
if [ "${ALL_KERNELS:-0}" = 1 ]; then
  ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
    -k 'regex:rmsnorm|qmmq|attn_|quantize_q8|glu_q8|qkv_post|qgemv|argmax' \
    $PL bench -m $M --device cuda -p 0 -n 2 -d 128 -r 1 --batch 32 > $W/ncuall.csv 2> $W/ncuall.err
  python3 - $W/ncuall.csv <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
h = rows[0]; data = [dict(zip(h, r)) for r in rows[2:]]
agg = collections.defaultdict(lambda: [0, 0.0])
for d in data:
    key = (d["Kernel Name"].split("(")[0][:40], d.get("Grid Size", ""), d.get("Block Size", ""))
    agg[key][0] += 1; agg[key][1] += float(d["gpu__time_duration.sum"].replace(",", ""))
print("units", rows[1][h.index("gpu__time_duration.sum")], "kernels", len(data))
for (n, g, b), a in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"  {n} grid {g} block {b}: n={a[0]} mean={a[1]/a[0]:.1f} total={a[1]:.0f}")
PY
  stamp done; exit 0
fi
NCUM=gpu__time_duration.sum,dram__bytes_read.sum,lts__t_bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum
for b in 8 32; do
  ncu --clock-control none --metrics $NCUM --csv --page raw -k regex:qmmq --launch-skip 129 --launch-count 129 \
    $PL bench -m $M --device cuda -p 0 -n 4 -d 128 -r 1 --batch $b > $W/ncu$b.csv 2> $W/ncu$b.err
  python3 - $W/ncu$b.csv $b <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
h = rows[0]; data = [dict(zip(h, r)) for r in rows[2:] if r[0].isdigit() or r[0].strip('"').isdigit()]
agg = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0, 0.0])
for d in data:
    name = d["Kernel Name"].split("(")[0]; key = (name, d.get("Grid Size", ""))
    a = agg[key]; a[0] += 1
    a[1] += float(d["gpu__time_duration.sum"].replace(",", "")); a[2] += float(d["dram__bytes_read.sum"].replace(",", ""))
    a[3] += float(d["lts__t_bytes.sum"].replace(",", "")); a[4] += float(d["sm__throughput.avg.pct_of_peak_sustained_elapsed"].replace(",", "")); a[5] += float(d["smsp__inst_executed.sum"].replace(",", ""))
print(f"B={sys.argv[2]}: units {rows[1][h.index('gpu__time_duration.sum')]} / {rows[1][h.index('dram__bytes_read.sum')]}")
tot = 0
for (n, g), a in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    tot += a[1]
    print(f"  {n} grid {g}: n={a[0]} time={a[1]/a[0]:.1f} dram={a[2]/a[0]:.3g} l2={a[3]/a[0]:.3g} sm%={a[4]/a[0]:.1f} inst={a[5]/a[0]:.3g}")
print(f"  total time {tot:.1f}")
PY
  tail -2 $W/ncu$b.err
done
stamp done
