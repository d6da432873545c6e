#!/usr/bin/env bash
# Side-by-side speed of pocketlm and llama.cpp on the same GGUF files, same threads, one run.
#   scripts/bench-vs-llamacpp.sh [MODEL.gguf | default | 1b-q4_0 | 1b-q4_k | 1b-q5_k | 1b-q8_0
#                                 | 8b-q4_0 | 1b-iq4_xs | 1b-iq4_nl ...]
# With no model named it runs the suite of issue #21: the default model, 1B-shaped random
# models in Q4_0, Q4_K and Q8_0 (pp512/tg128) and an 8B-shaped Q4_0 (pp128/tg32), at each of
# $DEPTHS. Random models (Llama-3 shapes, random weights: speed only) are written once by
# scripts/make_random_gguf.py (or $MAKE_RANDOM_GGUF) into $POCKETLM_HOME/models. Named only
# (not in the suite): any other shape or type of that script, e.g. `1b-q5_k` (Q5_K with a Q6_K
# output layer, as a Q5_K_M file), `1b-iq4_xs` and `1b-iq4_nl` (IQ4_XS / IQ4_NL with a Q6_K
# output layer, issue #21), or the mixture of experts of issue #25,
# `qwen3-30b-a3b-q4_0` (Qwen3-30B-A3B shape, 17 GB; pp512/tg128; MLX=0 skips its 17 GB MLX
# conversion).
# For each Q4_0 and Q4_1 model the MLX 4-bit g64 conversion (`pocketlm convert -q --q-bits 4
# --q-group-size 64 --dtype f16`, cached next to the GGUF) is measured against llama.cpp's GGUF.
# Settings (environment): THREADS (2), REPS (3), DEPTHS (0; e.g. "0,4096"), PP and TG (override
# every model's lengths), MLX=0 to skip the conversions, POCKETLM_BIN to measure that binary
# instead of building this checkout, LLAMA_BENCH to measure that llama-bench instead of the
# script's build (e.g. a GGML_NATIVE build with AMX).
# Builds llama.cpp's llama-bench once from the llama-cpp-python 0.3.36 sdist (PyPI; it vendors
# llama.cpp build 0c1e570) into ${POCKETLM_HOME:-~/.cache/pocketlm}/llama.cpp. Needs cmake, a C++
# compiler, pip and python3. Prints one table of ratios pocketlm / llama.cpp and peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
reps=${REPS:-3}
depths=${DEPTHS:-0}
out=$(mktemp -d)
. scripts/llamacpp-common.sh
build_llamacpp llama-bench
bench_bin=${LLAMA_BENCH:-$lc/build/bin/llama-bench}

pocketlm=$(pocketlm_bin release)

# Appends to rows.jsonl one row per test of pl.json (pocketlm) with its llama-bench twin in
# lc.json (same lengths and depth): rows LABEL KIND.
rows() {
  python3 - "$out" "$1" "$2" >> "$out/rows.jsonl" <<'PY'
import json, sys
out, label, kind = sys.argv[1:4]
lc = json.load(open(f"{out}/lc.json"))
pl = json.load(open(f"{out}/pl.json"))
lc_rss = int(open(f"{out}/lc.rss").read().split()[-1]) * 1024
for t in pl["tests"]:
    n, d = t["n_tokens"], t["depth"]
    is_pp = t["name"].startswith("pp")
    ref = [r for r in lc if r["n_prompt"] == (n if is_pp else 0) and r["n_gen"] == (0 if is_pp else n)
           and r.get("n_depth", 0) == d]
    if ref:
        print(json.dumps({"model": label, "kind": kind, "test": t["name"], "lc": ref[0]["avg_ts"],
                          "lc_sd": ref[0]["stddev_ts"], "pl": t["mean_tps"], "pl_sd": t["stddev_tps"],
                          "pl_rss": pl["peak_resident_bytes"], "lc_rss": lc_rss}))
PY
}

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(default 1b-q4_0 1b-q4_k 1b-q8_0 8b-q4_0)
: > "$out/rows.jsonl"
for name in "${models[@]}"; do
  case "$name" in
    default) model=$("$pocketlm" fetch) ;;
    *.gguf) model=$name ;;
    *) model=$(random_model "$name") ;;
  esac
  # The issue's lengths: pp128/tg32 for 8B shapes (2 cores), pp512/tg128 otherwise.
  case "$name" in 8b-*) pp=${PP:-128} tg=${TG:-32} ;; *) pp=${PP:-512} tg=${TG:-128} ;; esac
  label=$(basename "$model" .gguf)
  echo "== $label: llama.cpp llama-bench (-p $pp -n $tg -d $depths, $threads threads)" >&2
  /usr/bin/time -f "%M" -o "$out/lc.rss" "$bench_bin" -m "$model" -t "$threads" -p "$pp" -n "$tg" \
    -d "$depths" -r "$reps" -o json > "$out/lc.json"
  echo "== $label: pocketlm bench" >&2
  "$pocketlm" -t "$threads" bench --model "$model" -p "$pp" -n "$tg" -d "$depths" -r "$reps" --json > "$out/pl.json"
  rows "$label" GGUF
  if [ "${MLX:-1}" = 1 ] && [[ "$label" == *[Qq]4_[01]* || "$name" == *q4_0 || "$name" == default ]]; then
    mlx_dir="${model%.gguf}-mlx-4bit"
    if [ -d "$mlx_dir" ] || "$pocketlm" convert --model "$model" --out "$mlx_dir" -q --q-bits 4 --q-group-size 64 --dtype f16 >&2; then
      echo "== $label: pocketlm bench, MLX 4-bit g64 conversion" >&2
      "$pocketlm" -t "$threads" bench --model "$mlx_dir" -p "$pp" -n "$tg" -d "$depths" -r "$reps" --json > "$out/pl.json"
      rows "$label" "MLX 4-bit"
    fi
  fi
done

echo
isa=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|avx_vnni|amx_int8|asimddp|i8mm' | xargs || true)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $threads threads; ISA: $isa"
python3 - "$out/rows.jsonl" <<'PY'
import json, sys
mib = 1024 * 1024
print("| model | weights | test | llama.cpp t/s | pocketlm t/s | ratio | peak RSS pocketlm / llama.cpp (MiB) |")
print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
for line in open(sys.argv[1]):
    r = json.loads(line)
    rss = f"{(r['pl_rss'] or 0) / mib:.0f} / {r['lc_rss'] / mib:.0f}"
    print(f"| {r['model']} | {r['kind']} | {r['test']} | {r['lc']:.2f} ± {r['lc_sd']:.2f} | "
          f"{r['pl']:.2f} ± {r['pl_sd']:.2f} | {r['pl'] / r['lc']:.2f} | {rss} |")
PY
rm -rf "$out"
