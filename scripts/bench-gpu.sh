#!/usr/bin/env bash
# pocketlm vs llama.cpp on an NVIDIA GPU, in one run, on random-weight Llama-3-8B-shaped models.
# Meant for one `device` call (the GPU machine has no Rust and no network), from the repo root:
#   run: bash scripts/bench-gpu.sh        carry: [".gpu"]
# .gpu/ must hold `pocketlm` or `pocketlm.xz` (a stripped release build with --features cuda,
# see README "Building with CUDA"), `lc.tgz` (../shared/tools/llamacpp-src.sh .gpu/lc.tgz) and a copy of
# ../shared/tools/make_random_gguf.py. The script
#  1. builds llama.cpp's llama-bench with CUDA (sm_90) from lc.tgz, in the background;
#  2. runs `pocketlm gpu-selftest` (each CUDA kernel vs the CPU reference);
#  3. writes a random-weight Llama-3.2-1B-shaped Q4_0 GGUF and runs `pocketlm agree` on it
#     (greedy tokens and logits, CPU vs GPU, same binary);
#  4. writes 8B-shaped Q4_0 and Q8_0 GGUFs (shared/tools/make_random_gguf.py) and their MLX
#     4-bit g64 and 8-bit g64 conversions (`pocketlm convert`);
#  5. runs `pocketlm bench` on the four, then `llama-bench` on the two GGUFs;
#  6. measures HBM read bandwidth (torch, sum over 8 GiB) and prints ratios and fractions of the
#     bound (tg bound = bandwidth / bytes of weights read per token).
# Results: $OUT (or ./gpu-out) gets selftest.txt, agree.txt, bench-*.json, llama-*.json, summary.md.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
W=${WORK:-/tmp/pl-gpu}; mkdir -p "$W"
# The binary travels xz-compressed (62 MB stripped, 9 MB compressed; the carry limit is 64 MiB).
PL=$PWD/${GPU_DIR:-.gpu}/pocketlm
if [ ! -x "$PL" ]; then
  PL=$W/pocketlm
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" ${GPU_DIR:-.gpu}/pocketlm.xz "$PL"
  chmod +x "$PL"
fi
REPS=${REPS:-3}
# make_random_gguf.py: copied into .gpu/ (../shared does not travel), else shared/tools.
TOOLS=$PWD/${GPU_DIR:-.gpu}; [ -f "$TOOLS/make_random_gguf.py" ] || TOOLS=$PWD/../shared/tools
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# 1. llama.cpp, in the background (about 4.5 minutes on 16 cores).
( cd "$W" && tar xzf "$OLDPWD/${GPU_DIR:-.gpu}/lc.tgz" && cmake -S lc -B lc/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null &&
  cmake --build lc/build --target llama-bench -j 14 >/dev/null && echo built ) > "$OUT/lc-build.log" 2>&1 &
lc_pid=$!
while [ ! -f "$W/lc/models/ggml-vocab-llama-bpe.gguf" ]; do sleep 1; done; sleep 1
export VOCAB_GGUF=$W/lc/models/ggml-vocab-llama-bpe.gguf PYTHONPATH=$W/lc/gguf-py

# 2. kernel tests.
stamp selftest; "$PL" gpu-selftest > "$OUT/selftest.txt" 2>&1; tail -1 "$OUT/selftest.txt"

# 3. agreement on a 1B-shaped random model.
stamp 1b; (cd "$W" && python3 "$TOOLS/make_random_gguf.py" 1b-q4_0.gguf q4_0 --shape 1b >/dev/null)
stamp agree; "$PL" agree -m "$W/1b-q4_0.gguf" --device cuda -n 32 > "$OUT/agree.txt" 2>&1; cat "$OUT/agree.txt"

# 4-5. 8B-shaped GGUFs; pocketlm bench on them; llama-bench once its build is done; then the MLX
# conversions and their benches, each only if enough of the time budget is left.
BUDGET=${BUDGET:-540}; left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
for q in q4_0 q8_0; do
  stamp "make $q"; (cd "$W" && python3 "$TOOLS/make_random_gguf.py" 8b-$q.gguf $q --shape 8b >/dev/null)
done
plbench() {
  stamp "pocketlm bench $1"
  timeout "$(left)" "$PL" bench -m "$W/$1" --device cuda -p 512 -n 128 -r "$REPS" --json > "$OUT/bench-$1.json" 2> "$OUT/bench-$1.err" || tail -3 "$OUT/bench-$1.err"
}
plbench 8b-q4_0.gguf; plbench 8b-q8_0.gguf
stamp "waiting for llama.cpp"; wait $lc_pid; tail -2 "$OUT/lc-build.log"
LB=$W/lc/build/bin/llama-bench
for q in q4_0 q8_0; do
  stamp "llama-bench $q"; timeout "$(left)" "$LB" -m "$W/8b-$q.gguf" -ngl 99 -p 512 -n 128 -r "$REPS" -o json > "$OUT/llama-$q.json" 2> "$OUT/llama-$q.err" || tail -3 "$OUT/llama-$q.err"
done
for bq in 4:q4_0 8:q8_0; do
  b=${bq%%:*}; q=${bq##*:}
  [ "$(left)" -gt 60 ] || { stamp "skipping MLX $b-bit: out of time"; continue; }
  stamp "convert $q -> mlx $b-bit g64"
  timeout "$(left)" "$PL" convert -m "$W/8b-$q.gguf" --out "$W/8b-mlx$b" -q --q-bits $b --q-group-size 64 >/dev/null 2>"$OUT/convert-$b.err" || tail -3 "$OUT/convert-$b.err"
  [ "$(left)" -gt 20 ] && plbench 8b-mlx$b
done

# 6. HBM read bandwidth, and the summary.
stamp hbm
python3 - "$OUT" "$W" <<'PY'
import json, os, sys, torch
out, w = sys.argv[1], sys.argv[2]
x = torch.ones(8 << 30 >> 1, dtype=torch.float16, device="cuda")
for _ in range(3): x.sum()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
ts = []
for _ in range(10):
    s.record(); x.sum(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
ts.sort(); bw = x.numel() * 2 / ts[len(ts) // 2]
def load(p):
    try: return json.load(open(os.path.join(out, p)))
    except Exception: return None
def lc(q):
    r = load(f"llama-{q}.json") or []
    return {("pp" if t["n_prompt"] else "tg"): (t["avg_ts"], t["stddev_ts"]) for t in r} , (r[0]["model_size"] if r else None)
def pl(m):
    r = load(f"bench-{m}.json")
    if not r: return {}, None, None
    return ({t["name"][:2]: (t["mean_ts"] if "mean_ts" in t else t["mean_tps"], t["stddev_tps"]) for t in r["tests"]},
            r["weights_bytes"], r.get("gpu_memory_used_bytes"))
# Bytes read per generated token: all weights except the token-embedding table (one row is read).
def per_token(size, q):
    emb = 128256 * 4096 * {"q4_0": 18 / 32, "q8_0": 34 / 32}[q]
    return size - emb
lines = [f"GPU: {open(os.path.join(out,'gpu.txt')).read().strip()}; HBM read {bw/1e9:.0f} GB/s (torch sum, 8 GiB, median of 10)", "",
         "| model | engine | size GiB | pp512 t/s | tg128 t/s | tg bound t/s | tg / bound | vs llama.cpp pp | vs llama.cpp tg | GPU mem GiB |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for q, pms in (("q4_0", ["8b-q4_0.gguf", "8b-mlx4"]), ("q8_0", ["8b-q8_0.gguf", "8b-mlx8"])):
    l, lsize = lc(q)
    if l and lsize:
        b = bw / per_token(lsize, q)
        lines.append(f"| {q} GGUF | llama.cpp | {lsize/2**30:.2f} | {l['pp'][0]:.0f} ± {l['pp'][1]:.0f} | {l['tg'][0]:.1f} ± {l['tg'][1]:.1f} | {b:.0f} | {l['tg'][0]/b:.0%} | 1 | 1 | |")
    for m in pms:
        p, size, mem = pl(m)
        if not p: lines.append(f"| {m} | pocketlm | failed |"); continue
        b = bw / per_token(size, q)
        rp = f"{p['pp'][0]/l['pp'][0]:.2f}x" if l else "-"
        rt = f"{p['tg'][0]/l['tg'][0]:.2f}x" if l else "-"
        lines.append(f"| {m} | pocketlm | {size/2**30:.2f} | {p['pp'][0]:.0f} ± {p['pp'][1]:.0f} | {p['tg'][0]:.1f} ± {p['tg'][1]:.1f} | {b:.0f} | {p['tg'][0]/b:.0%} | {rp} | {rt} | {mem/2**30 if mem else 0:.2f} |")
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
stamp done
