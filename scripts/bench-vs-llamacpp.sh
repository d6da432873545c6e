#!/usr/bin/env bash
# Side-by-side speed of pocketlm and llama.cpp on the same GGUF, same threads, in one run.
#   scripts/bench-vs-llamacpp.sh [MODEL.gguf] [THREADS] [PP] [TG] [REPS]
# Builds llama.cpp's llama-bench once from the llama-cpp-python 0.3.36 sdist (PyPI; it vendors
# llama.cpp build 0c1e570) into ${POCKETLM_HOME:-~/.cache/pocketlm}/llama.cpp, builds pocketlm in
# release mode, runs both (llama-bench first, then pocketlm bench) and prints the ratios
# pocketlm / llama.cpp for pp and tg. Needs cmake, a C++ compiler, pip and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
home=${POCKETLM_HOME:-$HOME/.cache/pocketlm}
model=${1:-}
threads=${2:-2}
pp=${3:-512}
tg=${4:-128}
reps=${5:-3}
lc="$home/llama.cpp"
bench_bin="$lc/build/bin/llama-bench"

if [ ! -x "$bench_bin" ]; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
  # `pip download` of an sdist without build isolation needs its build backend installed.
  python3 -c "import scikit_build_core" 2>/dev/null || python3 -m pip install -q scikit-build-core
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$tmp" llama-cpp-python==0.3.36
  tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
  rm -rf "$lc" && mkdir -p "$home" && mv "$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp" "$lc"
  rm -rf "$tmp"
  cmake -S "$lc" -B "$lc/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$lc/build" --target llama-bench -j "$(nproc)" >/dev/null
fi

cargo build --release -q -p pocketlm-cli
pocketlm=${CARGO_TARGET_DIR:-target}/release/pocketlm
if [ -z "$model" ]; then model=$("$pocketlm" fetch); fi

echo "== llama.cpp llama-bench ($model, $threads threads)"
"$bench_bin" -m "$model" -t "$threads" -p "$pp" -n "$tg" -r "$reps" -o json > /tmp/llama-bench.json
echo "== pocketlm bench"
"$pocketlm" -t "$threads" bench --model "$model" -p "$pp" -n "$tg" -r "$reps" --json > /tmp/pocketlm-bench.json

python3 - "$pp" "$tg" <<'PY'
import json, sys
pp, tg = int(sys.argv[1]), int(sys.argv[2])
lc = json.load(open("/tmp/llama-bench.json"))
pl = json.load(open("/tmp/pocketlm-bench.json"))
def lc_tps(n_prompt, n_gen):
    for r in lc:
        if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen:
            return r["avg_ts"], r["stddev_ts"]
ours = {t["name"]: (t["mean_tps"], t["stddev_tps"]) for t in pl["tests"]}
print(f"| test | llama.cpp t/s | pocketlm t/s | pocketlm / llama.cpp |")
print(f"| --- | ---: | ---: | ---: |")
for name, key in ((f"pp{pp}", (pp, 0)), (f"tg{tg}", (0, tg))):
    a, b = lc_tps(*key), ours.get(name)
    if a and b:
        print(f"| {name} | {a[0]:.2f} ± {a[1]:.2f} | {b[0]:.2f} ± {b[1]:.2f} | {b[0] / a[0]:.2f} |")
mib = 1024 * 1024
print(f"\npocketlm: weights {pl['weights_bytes'] / mib:.1f} MiB, KV cache {pl['kv_cache_bytes'] / mib:.1f} MiB, "
      f"peak RSS during tg {(pl['tg_peak_resident_bytes'] or 0) / mib:.1f} MiB, load {pl['load_seconds']:.3f} s")
PY
