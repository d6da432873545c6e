#!/usr/bin/env bash
# One `device` call (run from the repo root; carry: [".gpu"], holding `pocketlm.xz`, a stripped
# `--features cuda` build, and `lc.tgz`, llama.cpp's source): KV caches paged in one block pool
# on the GPU, read and appended in place by the fused decode step through block tables.
# 1. `gpu-selftest`: its "paged vs contiguous" rows run the decode attention over the same keys
#    and values in scrambled pool blocks and must give the contiguous cache's bits.
# 2. `agree --batch --paged` on a 1B-shaped random Q4_0 (5 prompts, 32 greedy steps): against
#    the CPU, and against the GPU itself (one sequence at a time, growing caches).
# 3. `bench --batch 1,8,32 --paged` on an 8B-shaped Q4_0, tg128 after 128 tokens: aggregate
#    tokens/s with growing and with paged caches; llama-batched-bench at the same batches,
#    built in the same call (LLAMA=0 skips it).
# 4. `serve --device cuda` of the 1B under $CLIENTS clients (32; $REQUESTS requests of exactly
#    $TOKENS tokens): without a KV budget, then with `--kv-memory $KV` (64MiB, less than the
#    clients need together): tokens/s, failed requests, and from /health the peak KV bytes
#    and the preemptions.
. scripts/gpu-setup.sh
clients=${CLIENTS:-32} requests=${REQUESTS:-96} tokens=${TOKENS:-128} kv=${KV:-64MiB} port=18473
(cd $W && tar xzf $R/.gpu/lc.tgz)
[ "${LLAMA:-1}" = 0 ] || build_llama llama-batched-bench
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py CTX=8192
(cd $W && python3 $R/scripts/make_random_gguf.py 8b.gguf q4_0 --shape 8b >/dev/null) & p8=$!
(cd $W && python3 $R/scripts/make_random_gguf.py 1b.gguf q4_0 --shape 1b >/dev/null)
stamp "1b made; gpu-selftest"
selftest "paged vs contiguous"
stamp "agree against the CPU"
$PL agree -m $W/1b.gguf --device cuda -n 32 --batch --paged 2>&1 | grep -E "tokens equal|all equal"
stamp "agree against the GPU"
$PL agree -m $W/1b.gguf --device cuda --reference-device cuda -n 32 --batch --paged 2>&1 |
  grep -E "tokens equal|all equal"
wait $p8
stamp "bench 8b"
$PL bench -m $W/8b.gguf --device cuda -p 0 -n 128 -d 128 -r 2 --batch 1,8,32 --paged 2>&1 | grep "^|"
health() {
  python3 -c 'import json, sys, urllib.request
e = json.load(urllib.request.urlopen(sys.argv[1]))["engine"]
print("  engine:", {k: e[k] for k in ("kv_peak_bytes", "kv_budget_bytes", "preemptions") if k in e})' \
    http://127.0.0.1:$port/health
}
for budget in none $kv; do
  args=()
  [ "$budget" = none ] || args=(--kv-memory "$budget")
  $PL -t 8 serve --port $port --model $W/1b.gguf --device cuda --max-batch $clients --queue-size 256 \
    --prefix-cache-memory 0 "${args[@]}" > $W/serve.log 2>&1 &
  ps=$!
  wait_health $port
  stamp "serve, KV budget $budget"
  python3 scripts/loadtest.py --url http://127.0.0.1:$port --clients $clients --requests $requests \
    --max-tokens $tokens --ignore-eos --completions --deadline 200 --label "kv $budget" 2>&1 | tail -4
  health
  kill $ps; wait $ps 2>/dev/null
  grep -aiE "panic|error" $W/serve.log | head -3
done
[ "${LLAMA:-1}" = 0 ] && { stamp done; exit 0; }
stamp "waiting for llama.cpp"
wait $lc
grep -q built $W/lc-build.log || { echo "llama.cpp did not build"; tail -5 $W/lc-build.log; exit 1; }
stamp llama-batched-bench
$W/lc/build/bin/llama-batched-bench -m $W/8b.gguf -ngl 99 -c 10240 -npp 128 -ntg 128 -npl 1,8,32 2>&1 |
  grep -E "^\|"
stamp done
