#!/usr/bin/env bash
# One `device` call (run from the repo root; carry: [".gpu"], holding `pocketlm.xz` and `lc.tgz`):
# where the 8B decode token goes against the HBM bound, and the GPU serving path with a KV budget
# and a shared prefix.
# 1. scripts/bench-gpu.sh on 8B-shaped Q4_0 and MLX 4-bit models at depth 0 (pp512, tg128,
#    sampled; llama-bench built in the same call; the HBM read bound), with its checks
#    (`gpu-selftest`'s matrix part, `agree` on the 1B shapes), VARIANTS (none by default; e.g.
#    "r4w2:POCKETLM_GEMV=4,2") and NCU=1 (speed of light of one token's decode kernels: DRAM,
#    L2 and L1 throughput).
# 2. `agree --batch --paged` on a 1B-shaped Q4_0 (the paged decode step's params rows).
# 3. `serve --device cuda` of the 1B with `--kv-memory $KV` (64MiB) and the prefix cache on,
#    under $CLIENTS clients (32) whose prompts share a $PREFIX-word start (200), twice (the
#    second run finds the prefix cached): tokens/s, TTFT, failed requests, KV peak, preemptions.
# BENCH=0 runs 2 and 3 only; SERVE=0 runs 1 only.
set -uo pipefail
export MODELS=${MODELS:-8b-q4_0.gguf 8b-mlx4} DEPTHS=${DEPTHS-} NCU=${NCU-1} NCU_PREFILL=0
export NCU_MODELS=${NCU_MODELS:-8b-q4_0.gguf} NCU_SKIP=${NCU_SKIP:-2000} NCU_COUNT=${NCU_COUNT:-260}
export BUDGET=${BUDGET:-470} REPS=${REPS:-3} POCKETLM_SELFTEST=${POCKETLM_SELFTEST-matmul}
export VARIANTS=${VARIANTS-}
OUT=${OUT:-$PWD/gpu-out}; export OUT WORK=/tmp/pl-gpu
[ "${BENCH:-1}" = 0 ] || bash scripts/bench-gpu.sh
for f in "$OUT"/ncu-*-d0.txt; do
  [ -f "$f" ] || continue
  echo "== $f"
  grep -E "^  [a-z_0-9]+.*\(|Duration|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\)" "$f" | head -120
done
[ "${SERVE:-1}" = 0 ] && exit 0
. scripts/gpu-setup.sh
clients=${CLIENTS:-32} requests=${REQUESTS:-64} tokens=${TOKENS:-128} kv=${KV:-64MiB} port=18474
[ -d $W/lc ] || (cd $W && tar xzf $R/.gpu/lc.tgz)
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py CTX=8192
[ -f $W/1b.gguf ] || (cd $W && python3 $R/scripts/make_random_gguf.py 1b.gguf q4_0 --shape 1b >/dev/null)
stamp "agree --batch --paged"
$PL agree -m $W/1b.gguf --device cuda -n 32 --batch --paged 2>&1 | grep -E "tokens equal|all equal"
$PL -t 8 serve --port $port --model $W/1b.gguf --device cuda --max-batch $clients --queue-size 256 \
  --kv-memory $kv > $W/serve.log 2>&1 &
ps=$!
wait_health $port
for run in 1 2; do
  stamp "serve, --kv-memory $kv, shared prefix, run $run"
  python3 scripts/loadtest.py --url http://127.0.0.1:$port --clients $clients --requests $requests \
    --max-tokens $tokens --ignore-eos --completions --shared-prefix ${PREFIX:-200} --deadline 45 \
    --label "run $run" 2>&1 | tail -4
  python3 -c 'import json, sys, urllib.request
e = json.load(urllib.request.urlopen(sys.argv[1]))["engine"]
print("  engine:", {k: v for k, v in e.items() if "kv" in k or "preempt" in k or "prefix" in k})' \
    http://127.0.0.1:$port/health
done
kill $ps; wait $ps 2>/dev/null
grep -aiE "panic|error" $W/serve.log | head -3
stamp done
