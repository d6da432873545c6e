# Sourced by the one-call GPU scripts (prof-batched-gpu.sh, sweep-batched-gpu.sh) from the repo
# root on the device machine: CUDA's libraries on the path, R (the repo), W (a work folder), PL
# (the pocketlm binary unpacked there from .gpu/pocketlm.xz), `stamp` (seconds since the start)
# and the card's name printed.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
R=$PWD; W=/tmp/pl-gpu; mkdir -p $W; PL=$W/pocketlm
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" .gpu/pocketlm.xz $PL; chmod +x $PL
nvidia-smi --query-gpu=name --format=csv,noheader
