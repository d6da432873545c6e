# Sourced by the one-call GPU scripts (prof-batched-gpu.sh, sweep-batched-gpu.sh, ...) from the
# repo root on the device machine: CUDA's libraries on the path, R (the repo), W (a work folder),
# PL (the pocketlm binary unpacked there from .gpu/pocketlm.xz), `stamp` (seconds since the
# start), `build_llama` (below) and the card's name printed.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
R=$PWD; W=/tmp/pl-gpu; mkdir -p $W; PL=$W/pocketlm
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" .gpu/pocketlm.xz $PL; chmod +x $PL
nvidia-smi --query-gpu=name --format=csv,noheader
# build_llama TARGET...: llama.cpp for CUDA (sm_90) from $W/lc (unpacked from .gpu/lc.tgz), only
# the targets named, in the background; its log $W/lc-build.log ends with "built" on success,
# its pid is in $lc.
build_llama() {
  ( cd $W && cmake -S lc -B lc/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >/dev/null &&
    cmake --build lc/build --target "$@" -j 12 >/dev/null && echo built ) > $W/lc-build.log 2>&1 &
  lc=$!
}
