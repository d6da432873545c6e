#!/usr/bin/env bash
# One `device` call (repo root; carry: [".gpu"]): the one-token decode against the HBM bound on
# this card, with the checks that cover the decode graphs.
# 1. scripts/bound-gpu.sh with SERVE=0 NCU=0 SKIP_CHECKS=1: 8B-shaped Q4_0 and MLX 4-bit at
#    depth 0 (pp512, tg128, sampled), llama-bench built in the same call, HBM read bound, and
#    VARIANTS (default: the short-context graph off, and GEMV launch shapes).
# 2. pp512 at depth 4096 into a growing cache and into a paged one (`bench --paged`: a prompt
#    under `serve --kv-memory`), 8B Q4_0.
# 3. The full `gpu-selftest` (every kernel, the short attention launch among them).
# 4. `agree -n $STEPS` (160) on the 1B Q4_0 and MLX 4-bit of step 1, three prompts, single,
#    batched and paged (the prompts appended to pool blocks): the decode crosses from the
#    short-context graph to the long one at position 128.
# 5. With time left (of LIMIT, 580 s): ncu speed of light of one token's decode kernels on the
#    8B Q4_0 (where the bound is missed).
set -uo pipefail
t0=$(date +%s)
export OUT=${OUT:-$PWD/gpu-out} MODELS=${MODELS:-8b-q4_0.gguf 8b-mlx4} SERVE=0 NCU=0 SKIP_CHECKS=1
export BUDGET=${BUDGET:-360}
export VARIANTS=${VARIANTS-one:POCKETLM_SHORT_GRAPH=0;g21:POCKETLM_GEMV=2,1;g12:POCKETLM_GEMV=1,2;g24:POCKETLM_GEMV=2,4;gw24:POCKETLM_GEMV_WIDE=2,4}
bash scripts/bound-gpu.sh
W=/tmp/pl-gpu; PL=$W/pocketlm; export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
limit=${LIMIT:-580}; left() { echo $(( limit - ($(date +%s) - t0) )); }
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
stamp "pp512 @ d4096, growing and paged"
timeout 90 "$PL" bench -m "$W/8b-q4_0.gguf" --device cuda -p 512 -n 0 -d 4096 -r 3 --paged --json \
  > "$OUT/paged.json" 2> "$OUT/paged.err" || tail -3 "$OUT/paged.err"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('\n'.join(f\"{t['name']}: {t['mean_tps']:.1f} ± {t['stddev_tps']:.1f} t/s\" for t in r['tests']))" "$OUT/paged.json"
stamp "gpu-selftest (all)"
timeout 150 "$PL" gpu-selftest > "$OUT/selftest-all.txt" 2>&1
echo "PASS $(grep -c PASS "$OUT/selftest-all.txt"), FAIL $(grep -c FAIL "$OUT/selftest-all.txt")"
grep FAIL "$OUT/selftest-all.txt" | head -5
grep -iE "short|len 1[0-6][0-9]" "$OUT/selftest-all.txt" | head -12
tail -1 "$OUT/selftest-all.txt"
# About 60 tokens: appended to a paged cache as a run of whole blocks and a partial one.
LONG="In the small coastal town where the lighthouse keeper had lived for forty years, every \
evening began the same way: he climbed the ninety-seven steps, polished the great lens, checked \
the oil, and wrote three lines in the logbook about the wind, the waves and the ships that passed."
for m in 1b-q4_0.gguf 1b-mlx4; do
  stamp "agree $m -n ${STEPS:-160}"
  timeout 90 "$PL" agree -m "$W/$m" --device cuda -n "${STEPS:-160}" -p "The capital of France is" \
    -p "def fibonacci(n):" -p "$LONG" --batch --paged > "$OUT/agree-$m.txt" 2>&1
  grep -E "tokens equal|all equal" "$OUT/agree-$m.txt"
done
if [ "$(left)" -gt 40 ] && command -v ncu >/dev/null; then
  stamp "ncu 8b-q4_0 d0"
  timeout "$(left)" ncu --clock-control none --section SpeedOfLight --print-summary per-kernel \
    -k "regex:qgemv|attn_|rmsnorm_q8|quantize_q8" --launch-skip 2000 --launch-count 260 \
    "$PL" bench -m "$W/8b-q4_0.gguf" --device cuda -p 0 -n 64 -r 1 > "$OUT/ncu-d0.txt" 2>&1
  grep -E "^  [a-z_0-9]+.*\(|Duration|DRAM Throughput" "$OUT/ncu-d0.txt" | head -60
fi
stamp done
