# Shared by scripts/bench-vs-llamacpp.sh and scripts/loadtest-vs-llamacpp.sh (sourced, from the
# repository root): where llama.cpp lives, how it is built, and the random models of real shapes.
#   $home  POCKETLM_HOME (default ~/.cache/pocketlm)
#   $lc    llama.cpp's source and build tree: $home/llama.cpp
#   build_llamacpp TARGET...   builds the named llama.cpp targets that are missing
#   random_model NAME          prints the path of a random-weight GGUF (1b-q4_0, 8b-q4_0, ...)
#   pocketlm_bin PROFILE       prints the pocketlm binary to measure ($POCKETLM_BIN or a build)
home=${POCKETLM_HOME:-$HOME/.cache/pocketlm}
lc="$home/llama.cpp"

# Builds llama.cpp's TARGETs (llama-bench, llama-server, ...) into $lc/build/bin, those not
# there already, from the llama-cpp-python 0.3.36 sdist (PyPI; it vendors llama.cpp build
# 0c1e570). Needs cmake, a C++ compiler, pip and python3.
build_llamacpp() {
  local missing=() t
  for t in "$@"; do [ -x "$lc/build/bin/$t" ] || missing+=("$t"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
  if [ ! -f "$lc/CMakeLists.txt" ]; then
    # `pip download` of an sdist without build isolation needs its build backend installed.
    python3 -c "import scikit_build_core" 2>/dev/null || python3 -m pip install -q scikit-build-core
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$tmp" llama-cpp-python==0.3.36
    tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
    rm -rf "$lc" && mkdir -p "$home" && mv "$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp" "$lc"
    rm -rf "$tmp"
  fi
  # GGML_NATIVE, except on CPUs with AMX: there llama.cpp's AMX matmul (which -march=native
  # turns on) dies with SIGSEGV in this build (seen on a 2-core Sapphire Rapids VM), so the
  # CPU's other extensions are named one by one and AMX stays off.
  local isa=(-DGGML_NATIVE=ON) f
  if grep -qw amx_int8 /proc/cpuinfo; then
    isa=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
    for f in avx_vnni:AVX_VNNI avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
      grep -qw "${f%%:*}" /proc/cpuinfo && isa+=("-DGGML_${f##*:}=ON")
    done
  fi
  cmake -S "$lc" -B "$lc/build" -DCMAKE_BUILD_TYPE=Release "${isa[@]}" -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$lc/build" --target "${missing[@]}" -j "$(nproc)" >/dev/null
}

# Prints the pocketlm binary to measure: $POCKETLM_BIN when set, else this checkout's build of
# cargo profile PROFILE (release, ci, ...), built first.
pocketlm_bin() {
  if [ -n "${POCKETLM_BIN:-}" ]; then
    echo "$POCKETLM_BIN"
    return
  fi
  cargo build --profile "$1" -q -p pocketlm-cli >&2
  echo "${CARGO_TARGET_DIR:-target}/$1/pocketlm"
}

# A random model of a real shape: NAME = SHAPE-TYPE (1b-q4_0 | 1b-q4_k | 1b-q8_0 | 8b-q4_0 |
# qwen3-30b-a3b-q4_0 ...: the shapes of scripts/make_random_gguf.py), written once into
# $home/models by scripts/make_random_gguf.py (or $MAKE_RANDOM_GGUF) with llama.cpp's
# vocabulary of the family. Random weights: for speed only.
random_model() {
  local shape=${1%-*} qtype=${1##*-} path="$home/models/random-$1.gguf"
  if [ ! -f "$path" ]; then
    local py=python3
    if ! python3 -c "import gguf, numpy" 2>/dev/null; then
      [ -x "$home/venv-gguf/bin/python" ] || {
        python3 -m venv "$home/venv-gguf" && "$home/venv-gguf/bin/pip" install -q numpy gguf==0.19.0
      }
      py="$home/venv-gguf/bin/python"
    fi
    mkdir -p "$home/models"
    VOCAB_DIR="$lc/models" "$py" \
      "${MAKE_RANDOM_GGUF:-scripts/make_random_gguf.py}" "$path.tmp" "$qtype" --shape "$shape" >&2
    mv "$path.tmp" "$path"
  fi
  echo "$path"
}
