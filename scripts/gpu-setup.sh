# Sourced by the one-call GPU scripts (prof-batched-gpu.sh, sweep-batched-gpu.sh, ...) from the
# repo root on the device machine: CUDA's libraries on the path, R (the repo), W (a work folder),
# PL (the pocketlm binary unpacked there from .gpu/pocketlm.xz), `stamp` (seconds since the
# start), `build_llama`, `selftest` and `wait_health` (below) and the card's name printed.
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
# selftest [PATTERN]: `gpu-selftest` into $W/selftest.log; prints the counts of passed and
# failed cases, the first failures, the cases matching PATTERN and the summary line.
selftest() {
  $PL gpu-selftest > $W/selftest.log 2>&1
  echo "PASS $(grep -c PASS $W/selftest.log), FAIL $(grep -c FAIL $W/selftest.log)"
  grep FAIL $W/selftest.log | head -5
  [ -z "${1:-}" ] || grep -- "$1" $W/selftest.log | head -8
  tail -1 $W/selftest.log
}
# wait_health PORT: waits up to 120 s for a server's /health on 127.0.0.1:PORT to answer.
wait_health() {
  for _ in $(seq 1 240); do
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      http://127.0.0.1:$1/health >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}
