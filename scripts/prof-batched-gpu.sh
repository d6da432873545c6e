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
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
R=$PWD; W=/tmp/pl-gpu; mkdir -p $W; PL=$W/pocketlm
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" .gpu/pocketlm.xz $PL; chmod +x $PL
nvidia-smi --query-gpu=name --format=csv,noheader
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
