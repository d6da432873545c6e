#!/usr/bin/env bash
# One `device` call (run from the repo root; carry: [".gpu"], holding `pocketlm.xz`, a stripped
# `--features cuda` build, and `lc.tgz`, llama.cpp's source with `tools/ui`): `serve --device
# cuda` under $CLIENTS clients (32; $REQUESTS requests of exactly $TOKENS tokens, temperature
# 0.7, seeded; random Q4_0 weights of make_random_gguf.py's shape $SHAPE, 8b), each server
# loaded twice in a row (cold, then warm), with the mixed passes split (the default) and not
# (`POCKETLM_SPLIT_MIXED=0`; SPLITS="1" runs only the first), with a summary of the engine's
# passes from its debug log (`batched pass`: rows, one-token rows, tokens, ms) by kind (all
# one-token rows, prompt chunks only, both), the slowest and the longest gap between log lines,
# and the server's warm-up time. Then scripts/loadtest-vs-llamacpp.sh against llama-server
# built in the same call (it builds beside the first runs). Options: SELFTEST=1 runs
# `gpu-selftest` first; NOCACHE=1 starts a server with the driver's PTX cache off (its warm-up
# time); BENCH=1 runs `bench` tg128, greedy and sampled; LLAMA=0 skips llama.cpp (its source
# still gives make_random_gguf.py its vocabulary).
. scripts/gpu-setup.sh
clients=${CLIENTS:-32} requests=${REQUESTS:-96} tokens=${TOKENS:-128} port=18472
(cd $W && tar xzf $R/.gpu/lc.tgz)
[ "${LLAMA:-1}" = 0 ] || build_llama llama-server
if [ -n "${SELFTEST:-}" ]; then
  stamp "gpu-selftest"
  $PL gpu-selftest > $W/selftest.log 2>&1
  grep FAIL $W/selftest.log | head -5; grep -iE "sampl" $W/selftest.log | tail -3; tail -2 $W/selftest.log
fi
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py
shape=${SHAPE:-8b}
(cd $W && python3 $R/scripts/make_random_gguf.py $shape.gguf q4_0 --shape $shape >/dev/null); M=$W/$shape.gguf
stamp "model made"

passes() { # summary of the `batched pass` lines of a server log
  python3 - "$1" <<'PY'
import re, sys
from datetime import datetime
kinds, prev, gap = {}, None, (0.0, "")
for line in open(sys.argv[1], errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    t = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)", line)
    if t:
        t = datetime.fromisoformat(t.group(1)[:26]).timestamp()
        if prev is not None and t - prev > gap[0]:
            gap = (t - prev, line.strip()[:160])
        prev = t
    if "batched pass" not in line:
        continue
    f = dict(re.findall(r"(\w+)=([\d.]+)", line))
    rows, one, ms = int(f["rows"]), int(f["one_token_rows"]), float(f["ms"])
    kind = "one-token rows" if one == rows else ("prompt chunks" if one == 0 else "mixed")
    kinds.setdefault(kind, []).append((ms, rows, int(f["tokens"])))
print(f"  longest gap between log lines: {gap[0]:.2f} s, before: {gap[1]}")
every = sorted((m, k, r, t) for k, v in kinds.items() for m, r, t in v)
print("  slowest: " + ", ".join(f"{m:.0f} ms ({k}, {r} rows, {t} tokens)" for m, k, r, t in every[-3:]))
for kind, v in kinds.items():
    v.sort()
    tot = sum(m for m, _, _ in v)
    print(f"  {kind}: {len(v)} passes, {tot / 1e3:.2f} s, median {v[len(v) // 2][0]:.1f} ms, "
          f"max {v[-1][0]:.1f} ms ({v[-1][1]} rows, {v[-1][2]} tokens)")
PY
}

for split in ${SPLITS:-1 0}; do
  : > $W/serve.log
  POCKETLM_SPLIT_MIXED=$split POCKETLM_LOG=pocketlm=debug,pocketlm_server=info $PL -t 8 serve --port $port \
    --model $M --device cuda --max-batch $clients --queue-size 256 --prefix-cache-memory 0 >> $W/serve.log 2>&1 &
  ps=$!
  wait_health $port
  stamp "server up"
  sed 's/\x1b\[[0-9;]*m//g' $W/serve.log | grep -a "warm-up run" | sed 's/^/  /'
  for run in cold warm; do
    : > $W/serve.log
    stamp "split=$split, $run"
    python3 scripts/loadtest.py --url http://127.0.0.1:$port --clients $clients --requests $requests \
      --max-tokens $tokens --ignore-eos --completions --deadline 200 --label "split=$split $run" 2>&1 | tail -4
    passes $W/serve.log
  done
  kill $ps; wait $ps 2>/dev/null
done
if [ -n "${NOCACHE:-}" ]; then # the warm-up with the driver's PTX cache off (each module compiled again)
  stamp "a server with CUDA_CACHE_DISABLE=1"
  CUDA_CACHE_DISABLE=1 POCKETLM_LOG=pocketlm=info $PL -t 8 serve --port $port --model $M --device cuda \
    --prefix-cache-memory 0 > $W/nocache.log 2>&1 &
  ps=$!
  for _ in $(seq 1 240); do
    grep -aq "serving on" $W/nocache.log && break; sleep 0.5
  done
  sed 's/\x1b\[[0-9;]*m//g' $W/nocache.log | grep -a "warm-up run" | sed 's/^/  /'
  kill $ps; wait $ps 2>/dev/null
fi
if [ -n "${BENCH:-}" ]; then # one sequence, greedy and sampled (the single-row sampling path)
  $PL bench -m $M --device cuda -p 0 -n 128 -r 3 --sample --temp 0.7 --top-p 0.9 --top-k 40 \
    --min-p 0 --repetition-penalty 1 --seed 1 2>&1 | grep "^|" | tail -3
  stamp "bench done"
fi
[ "${LLAMA:-1}" = 0 ] && { stamp done; exit 0; }
stamp "waiting for llama.cpp"
wait $lc
grep -q built $W/lc-build.log || { echo "llama.cpp did not build"; tail -5 $W/lc-build.log; exit 1; }
stamp "against llama-server"
DEVICE=cuda LLAMA_SERVER=$W/lc/build/bin/llama-server POCKETLM_BIN=$PL THREADS=8 CLIENTS=$clients \
  REQUESTS=$requests TOKENS=$tokens timeout 240 bash scripts/loadtest-vs-llamacpp.sh $M 2>$W/lt.err | tail -8
grep -iE "failed|error" $W/lt.err | head -10
stamp done
