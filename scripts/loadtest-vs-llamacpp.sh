#!/usr/bin/env bash
# Side-by-side load test of `pocketlm serve` and llama.cpp's `llama-server` (continuous
# batching), same GGUF, same threads, one run, back to back (issue #24):
#   scripts/loadtest-vs-llamacpp.sh [default | 1b-q4_0 | MODEL.gguf ...]   (default: default 1b-q4_0)
# For each model and server: scripts/loadtest.py with $CLIENTS clients (16) and with 1 client,
# every request generating exactly $TOKENS tokens (32, `ignore_eos`), $REQUESTS requests (64;
# 16 for one client). pocketlm runs `serve --max-batch $CLIENTS --prefix-cache-memory 0` and
# llama-server `-np $CLIENTS -c ($CLIENTS x 512) -cb` with its prompt cache off
# (`--cache-ram 0`), so that repeated prompts favour neither. Models without a chat template
# (the random ones) are sent plain prompts on /v1/completions (`loadtest.py --completions`).
# Settings (environment): THREADS (2), CLIENTS, REQUESTS, TOKENS, POCKETLM_BIN (else this
# checkout's `ci` build), DEVICE (cpu; `cuda` runs pocketlm with `--device cuda` and
# llama-server with every layer on the GPU, `-ngl 99`), LLAMA_SERVER (a llama-server binary
# already built, as on the GPU machine; else it is built once by scripts/llamacpp-common.sh).
# Prints one table: aggregate tokens/s, the ratio, TTFT and latency p50/p99.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
clients=${CLIENTS:-16}
requests=${REQUESTS:-64}
tokens=${TOKENS:-32}
out=$(mktemp -d)
. scripts/llamacpp-common.sh
device=${DEVICE:-cpu}
if [ -n "${LLAMA_SERVER:-}" ]; then
  server_bin=$LLAMA_SERVER
else
  build_llamacpp llama-server
  server_bin="$lc/build/bin/llama-server"
fi
pl_device=() lc_device=()
if [ "$device" != cpu ]; then
  pl_device=(--device "$device")
  lc_device=(-ngl 99)
fi
pocketlm=$(pocketlm_bin ci)
port=18471

# load LABEL SERVER MODEL-LABEL ARGS... : runs the server given by ARGS, waits for /health,
# runs the load test with $clients clients and then 1 client, stops the server.
load() {
  local label=$1 server=$2 model=$3 pid n req
  shift 3
  "$@" > "$out/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 240); do
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { cat "$out/server.log" >&2; exit 1; }
    sleep 0.5
  done
  for n in "$clients" 1; do
    req=$requests
    [ "$n" = 1 ] && req=$(( requests < 16 ? requests : 16 ))
    python3 scripts/loadtest.py --url "http://127.0.0.1:$port" --clients "$n" --requests "$req" \
      --max-tokens "$tokens" --ignore-eos --deadline 900 --label "$label, $n clients" \
      --json-out "$out/r.json" $completions >&2 || true
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r.update(server=sys.argv[2], model=sys.argv[3]); print(json.dumps(r))' \
      "$out/r.json" "$server" "$model" >> "$out/rows.jsonl"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(default 1b-q4_0)
: > "$out/rows.jsonl"
for name in "${models[@]}"; do
  case "$name" in
    default) model=$("$pocketlm" fetch) ;;
    *.gguf) model=$name ;;
    *) model=$(random_model "$name") ;;
  esac
  label=$(basename "$model" .gguf)
  completions=
  python3 - "$model" <<'PY' || completions=--completions
import sys
from pathlib import Path
data = Path(sys.argv[1]).read_bytes()[:64 << 20]
sys.exit(0 if b"tokenizer.chat_template" in data else 1)
PY
  load "pocketlm serve, $label" pocketlm "$label" "$pocketlm" -t "$threads" serve --port "$port" \
    --model "$model" "${pl_device[@]}" --max-batch "$clients" --queue-size 256 --prefix-cache-memory 0
  load "llama-server, $label" llama.cpp "$label" "$server_bin" -m "$model" --port "$port" \
    -t "$threads" -tb "$threads" -np "$clients" -c $(( clients * 512 )) -cb --cache-ram 0 "${lc_device[@]}"
done

echo
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $threads threads; $tokens tokens a request"
[ "$device" = cpu ] || echo "device: $device ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
python3 - "$out/rows.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| model | clients | llama-server t/s | pocketlm t/s | ratio | TTFT p50 / p99 s, pocketlm | TTFT p50 / p99 s, llama-server | latency p50 / p99 s, pocketlm | latency p50 / p99 s, llama-server | failed (pocketlm / llama-server) |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    if r["server"] != "pocketlm":
        continue
    l = next((x for x in rows if x["server"] == "llama.cpp" and x["model"] == r["model"]
              and x["clients"] == r["clients"]), None)
    if l is None:
        continue
    print(f"| {r['model']} | {r['clients']} | {l['tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | "
          f"{r['tokens_per_s'] / l['tokens_per_s']:.2f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
          f"{l['ttft_p50']:.2f} / {l['ttft_p99']:.2f} | {r['latency_p50']:.2f} / {r['latency_p99']:.2f} | "
          f"{l['latency_p50']:.2f} / {l['latency_p99']:.2f} | {r['failed']} / {l['failed']} |")
for m in dict.fromkeys(r["model"] for r in rows):
    one = {r["clients"]: r["tokens_per_s"] for r in rows if r["model"] == m and r["server"] == "pocketlm"}
    if 1 in one and len(one) > 1:
        many = max(one)
        print(f"{m}: pocketlm {many} clients / 1 client = {one[many] / one[1]:.2f}x")
PY
rm -rf "$out"
