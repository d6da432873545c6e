#!/usr/bin/env bash
# Side-by-side speed of pocketlm and llama.cpp on the same GGUF, same threads, in one run.
#   scripts/bench-vs-llamacpp.sh [MODEL.gguf] [THREADS] [PP] [TG] [REPS]
# Builds llama.cpp's llama-bench once from the llama-cpp-python 0.3.36 sdist (PyPI; it vendors
# llama.cpp build 0c1e570) into ${POCKETLM_HOME:-~/.cache/pocketlm}/llama.cpp, builds pocketlm in
# release mode, converts the GGUF once to MLX 4-bit (`pocketlm convert -q --q-bits 4
# --q-group-size 64`, f16 scales and biases; cached next to the GGUF as NAME-mlx-4bit), then
# runs llama-bench on the GGUF, pocketlm bench on the GGUF and pocketlm bench on the MLX
# folder, and prints the ratios pocketlm / llama.cpp for pp and tg (both pocketlm rows against
# llama.cpp on the GGUF). Needs cmake, a C++ compiler, pip and python3.
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
  # GGML_NATIVE, except on CPUs with AMX: there llama.cpp's AMX matmul (which -march=native
  # turns on) dies with SIGSEGV in this build (seen on a 2-core Sapphire Rapids VM), so the
  # CPU's other extensions are named one by one and AMX stays off.
  isa=(-DGGML_NATIVE=ON)
  if grep -qw amx_int8 /proc/cpuinfo; then
    isa=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
    for f in avx_vnni:AVX_VNNI avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
      grep -qw "${f%%:*}" /proc/cpuinfo && isa+=("-DGGML_${f##*:}=ON")
    done
  fi
  cmake -S "$lc" -B "$lc/build" -DCMAKE_BUILD_TYPE=Release "${isa[@]}" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$lc/build" --target llama-bench -j "$(nproc)" >/dev/null
fi

# POCKETLM_BIN: measure that binary instead of building this checkout (an older build, say).
if [ -n "${POCKETLM_BIN:-}" ]; then
  pocketlm=$POCKETLM_BIN
else
  cargo build --release -q -p pocketlm-cli
  pocketlm=${CARGO_TARGET_DIR:-target}/release/pocketlm
fi
if [ -z "$model" ]; then model=$("$pocketlm" fetch); fi

echo "== llama.cpp llama-bench ($model, $threads threads)"
"$bench_bin" -m "$model" -t "$threads" -p "$pp" -n "$tg" -r "$reps" -o json > /tmp/llama-bench.json
mlx_dir="${model%.gguf}-mlx-4bit"
rm -f /tmp/pocketlm-bench-mlx.json
if [ ! -d "$mlx_dir" ] && ! "$pocketlm" convert --model "$model" --out "$mlx_dir" -q --q-bits 4 --q-group-size 64 --dtype f16; then
  echo "(no MLX 4-bit conversion of this GGUF: its rows are left out)"
  mlx_dir=""
fi
echo "== pocketlm bench (GGUF)"
"$pocketlm" -t "$threads" bench --model "$model" -p "$pp" -n "$tg" -r "$reps" --json > /tmp/pocketlm-bench.json
if [ -n "$mlx_dir" ]; then
  echo "== pocketlm bench (MLX 4-bit, $mlx_dir)"
  "$pocketlm" -t "$threads" bench --model "$mlx_dir" -p "$pp" -n "$tg" -r "$reps" --json > /tmp/pocketlm-bench-mlx.json
fi

python3 - "$pp" "$tg" <<'PY'
import json, sys
pp, tg = int(sys.argv[1]), int(sys.argv[2])
lc = json.load(open("/tmp/llama-bench.json"))
import os
runs = [("GGUF", json.load(open("/tmp/pocketlm-bench.json")))]
if os.path.exists("/tmp/pocketlm-bench-mlx.json"):
    runs.append(("MLX 4-bit", json.load(open("/tmp/pocketlm-bench-mlx.json"))))
def lc_tps(n_prompt, n_gen):
    for r in lc:
        if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen:
            return r["avg_ts"], r["stddev_ts"]
print("| test | llama.cpp t/s (GGUF) | pocketlm | pocketlm t/s | pocketlm / llama.cpp |")
print("| --- | ---: | --- | ---: | ---: |")
for name, key in ((f"pp{pp}", (pp, 0)), (f"tg{tg}", (0, tg))):
    a = lc_tps(*key)
    for label, pl in runs:
        ours = {t["name"]: (t["mean_tps"], t["stddev_tps"]) for t in pl["tests"]}
        b = ours.get(name)
        if a and b:
            print(f"| {name} | {a[0]:.2f} ± {a[1]:.2f} | {label} | {b[0]:.2f} ± {b[1]:.2f} | {b[0] / a[0]:.2f} |")
mib = 1024 * 1024
for label, pl in runs:
    w, kv = pl["weights_bytes"], pl["kv_cache_bytes"]
    peak = pl["tg_peak_resident_bytes"] or 0
    limit = 1.2 * (w + kv) + 50 * mib
    print(f"\npocketlm {label}: weights {w / mib:.1f} MiB, KV cache {kv / mib:.1f} MiB, "
          f"peak RSS during tg {peak / mib:.1f} MiB (1.2 x (weights + KV) + 50 MiB = {limit / mib:.1f}), "
          f"load {pl['load_seconds']:.3f} s")
PY
