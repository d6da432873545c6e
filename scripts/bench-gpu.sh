#!/usr/bin/env bash
# pocketlm vs llama.cpp on an NVIDIA GPU, in one run, on random-weight models of real shapes
# (Llama-3-8B by default; Qwen2.5-7B, Qwen3-8B/1.7B and Phi-3-mini by name, see MODELS).
# Meant for one `device` call (the GPU machine has no Rust and no network), from the repo root:
#   run: bash scripts/bench-gpu.sh        carry: [".gpu"]
# .gpu/ must hold `pocketlm` or `pocketlm.xz` (a stripped release build with --features cuda,
# see README "Building with CUDA") and `lc.tgz` (../shared/tools/llamacpp-src.sh .gpu/lc.tgz), and
# for the Qwen and Phi-3 shapes llama.cpp's vocabularies `ggml-vocab-qwen2.gguf` and
# `ggml-vocab-phi-3.gguf` (from the sdist's vendor/llama.cpp/models/). The script
#  1. builds llama.cpp's llama-bench with CUDA (sm_90) from lc.tgz, in the background;
#  2. runs `pocketlm gpu-selftest` (each CUDA kernel vs the CPU reference);
#  3. writes a random-weight Llama-3.2-1B-shaped Q4_0 GGUF, converts it to MLX 4-bit g64
#     (`pocketlm convert`) and runs `pocketlm agree` on both and on the other GGUFs of MODELS
#     but the 8B Llama ones (greedy tokens and logits, CPU vs GPU, same binary: 5 prompts, 32
#     steps; then the 5 prompts decoded together on the GPU, batched, against the CPU again);
#  4. writes the GGUFs of MODELS, `SHAPE-TYPE.gguf` (scripts/make_random_gguf.py, with a context
#     of 32768 so that the deep tests fit; SHAPE one of its shapes, TYPE q4_0, q8_0 or q4_k), and
#     MLX 4-bit and 8-bit g64 folders of the 8B shapes (scripts/make_random_mlx.py, from the 1B
#     conversion);
#  5. runs `pocketlm bench` on them (pp512, tg128 at depth 0 and at $DEPTHS, and tg128 again
#     with sampling: temperature 0.7, top-p 0.9, top-k 40), then `llama-bench` on the GGUFs at
#     the same depths;
#  6. measures HBM read bandwidth (torch, sum over 8 GiB) and prints, per test, pocketlm's mean
#     against llama.cpp's mean and median (its first pp sample is often slow), fractions of the
#     bound (tg bound = bandwidth / bytes of weights read per token) and sampled / greedy decode.
# Knobs (environment): MODELS (default: 8b-q4_0.gguf 8b-mlx4 8b-q8_0.gguf 8b-mlx8; 1b-q4_0.gguf
# and 1b-mlx4 of step 3 may be named too, and e.g. qwen2-7b-q4_0.gguf, qwen3-8b-q4_0.gguf,
# phi3-mini-q4_0.gguf, gemma2-2b-q4_0.gguf, qwen3-30b-a3b-q4_0.gguf (a mixture of experts, 17 GB; `agree` runs on its
# first 4 layers); every GGUF named is also run by llama-bench), DEPTHS
# (default 4096,16384; empty: depth 0 only), REPS (3), SKIP_CHECKS, BUDGET (seconds, 560), NCU
# (with NCU_MODELS, NCU_KERNELS, NCU_SKIP, NCU_COUNT, NCU_PREFILL), VARIANTS, BATCHES and
# BATCH_VARIANTS (see step 5).
# Models already in $WORK (a warm machine keeps it) are not written again.
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
MODELS=${MODELS:-8b-q4_0.gguf 8b-mlx4 8b-q8_0.gguf 8b-mlx8}
DEPTHS=${DEPTHS-4096,16384}
D="0${DEPTHS:+,$DEPTHS}"
# Random GGUFs with a context of 32768, for the deep tests.
TOOLS=$PWD/scripts; export CTX=32768
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# 1. llama.cpp, in the background (about 4.5 minutes on 16 cores).
( cd "$W" && tar xzf "$OLDPWD/${GPU_DIR:-.gpu}/lc.tgz" && cmake -S lc -B lc/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null &&
  cmake --build lc/build --target llama-bench ${BATCHES:+llama-batched-bench} -j 14 >/dev/null && echo built ) > "$OUT/lc-build.log" 2>&1 &
lc_pid=$!
while [ ! -f "$W/lc/models/ggml-vocab-llama-bpe.gguf" ]; do sleep 1; done; sleep 1
cp ${GPU_DIR:-.gpu}/ggml-vocab-*.gguf "$W/lc/models/" 2>/dev/null
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py

# 2. kernel tests (SKIP_CHECKS=1 skips 2 and 3).
if [ -z "${SKIP_CHECKS:-}" ]; then
  stamp selftest; "$PL" gpu-selftest > "$OUT/selftest.txt" 2>&1; tail -1 "$OUT/selftest.txt"
  grep -E "FAIL|^timing" "$OUT/selftest.txt" | cut -c1-600
  # A tensor-core decode attention that failed its checks is not measured: the SIMT one is.
  if grep -q "f16 mma cache vs float.*FAIL" "$OUT/selftest.txt"; then
    echo "attn_mma failed the selftest: POCKETLM_ATTN_KERNEL=simt"; export POCKETLM_ATTN_KERNEL=simt
  fi
  if grep -q "^flash prefill.*FAIL" "$OUT/selftest.txt"; then
    echo "flash prefill failed the selftest: POCKETLM_FLASH_ATTN=0"; export POCKETLM_FLASH_ATTN=0
  fi
fi

# 3. a 1B-shaped random model, its MLX 4-bit conversion (the template of the 8B MLX folders
# below), and agreement CPU vs GPU on both.
stamp 1b; [ -f "$W/1b-q4_0.gguf" ] || (cd "$W" && python3 "$TOOLS/make_random_gguf.py" 1b-q4_0.gguf q4_0 --shape 1b >/dev/null)
[ -d "$W/1b-mlx4" ] || "$PL" convert -m "$W/1b-q4_0.gguf" --out "$W/1b-mlx4" -q --q-bits 4 --q-group-size 64 >/dev/null 2>&1

# 4. The GGUFs of MODELS (SHAPE-TYPE.gguf), and MLX 4-bit and 8-bit g64 folders of the 8B shapes
# (scripts/make_random_mlx.py: converting an 8B GGUF takes longer than one call allows).
stamp "make models"
pids=()
for m in $MODELS; do
  case $m in *.gguf) ;; *) continue;; esac
  [ -f "$W/$m" ] && continue
  q=${m%.gguf}; q=${q##*-}
  (cd "$W" && python3 "$TOOLS/make_random_gguf.py" "$m" "$q" --shape "${m%-$q.gguf}" >/dev/null) & pids+=($!)
done
for b in 4 8; do [ -d "$W/8b-mlx$b" ] && continue; case " $MODELS " in *" 8b-mlx$b "*)
  python3 scripts/make_random_mlx.py "$W/1b-mlx4" "$W/8b-mlx$b" --bits $b --group-size 64 & pids+=($!);; esac; done
[ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"  # not the llama.cpp build
if [ -z "${SKIP_CHECKS:-}" ]; then
  stamp agree
  for m in 1b-q4_0.gguf 1b-mlx4 $MODELS; do
    case $m in 8b-*|1b-*.gguf) [ "$m" = 1b-q4_0.gguf ] || continue;; *.gguf|1b-mlx4) ;; *) continue;; esac
    # A mixture of experts of real size takes minutes on the CPU: its first 4 layers instead.
    case $m in *-a3b-*.gguf)
      q=${m%.gguf}; q=${q##*-}; s4=${m%-$q.gguf}; m=$s4-4layers-$q.gguf
      [ -f "$W/$m" ] || (cd "$W" && LAYERS=4 python3 "$TOOLS/make_random_gguf.py" "$m" "$q" --shape "$s4" >/dev/null);;
    esac
    echo "== $m"; POCKETLM_LOG=info "$PL" agree -m "$W/$m" --device cuda -n 32 --batch
  done > "$OUT/agree.txt" 2>&1
  grep -E "^==|all equal|fused CUDA decoder|^batched" "$OUT/agree.txt" | sed 's/.*INFO //'
fi
# 5. pocketlm bench on the four, then llama-bench on the two GGUFs once its build is done.
BUDGET=${BUDGET:-560}; left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
plbench() {
  stamp "pocketlm bench $1"
  timeout "$(left)" "$PL" bench -m "$W/$1" --device cuda -p 512 -n 128 -d "$D" -r "$REPS" \
    --sample --temp 0.7 --top-p 0.9 --top-k 40 --min-p 0 --repetition-penalty 1 --seed 1 \
    --json > "$OUT/bench-$1.json" 2> "$OUT/bench-$1.err" || tail -3 "$OUT/bench-$1.err"
}
for m in $MODELS; do plbench $m; done
# Optional: VARIANTS="label:VAR=V VAR2=V;label2:..." measures tg128 at depth 0 of the first of
# MODELS again under each setting (a fusion or kernel switched off, a launch shape), in the same
# call as the default: variant-LABEL.json, and one line each.
if [ -n "${VARIANTS:-}" ]; then
  IFS=';' read -ra vs <<< "$VARIANTS"
  for v in "${vs[@]}"; do
    label=${v%%:*}; m1=${MODELS%% *}
    stamp "variant $label (${v#*:})"
    env ${v#*:} timeout "$(left)" "$PL" bench -m "$W/$m1" --device cuda -p 0 -n 128 -r "$REPS" --json \
      > "$OUT/variant-$label.json" 2> "$OUT/variant-$label.err" || tail -3 "$OUT/variant-$label.err"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], ' '.join(f\"{t['name']} {t['mean_tps']:.1f} ± {t['stddev_tps']:.1f}\" for t in r['tests']))" "$OUT/variant-$label.json" "$label" 2>/dev/null
  done
fi
# Optional: BATCHES="8,32" measures batched decode on the first of MODELS: each of B sequences'
# cache filled with 128 tokens, then 128 tokens decoded for all of them together, aggregate
# tokens/s (`pocketlm bench -p 0 -n 128 -d 128 --batch $BATCHES`, with B = 1 as its tg128 @
# d128), against llama-batched-bench -npp 128 -ntg 128 -npl 1,$BATCHES (its S_TG) below.
if [ -n "${BATCHES:-}" ]; then
  m1=${MODELS%% *}; stamp "pocketlm batched $m1 ($BATCHES)"
  timeout "$(left)" "$PL" bench -m "$W/$m1" --device cuda -p 0 -n 128 -d 128 -r "$REPS" --batch "$BATCHES" \
    --json > "$OUT/batched-$m1.json" 2> "$OUT/batched-$m1.err" || tail -3 "$OUT/batched-$m1.err"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('\n'.join(f\"pocketlm {t['name']}: {t['mean_tps']:.1f} ± {t['stddev_tps']:.1f} t/s\" for t in r['tests']))" "$OUT/batched-$m1.json" 2>/dev/null
fi
# Optional: BATCH_VARIANTS="label:VAR=V;..." measures the batched rows of BATCHES again under each
# setting, in the same call: batched-LABEL.json, and one line each.
if [ -n "${BATCHES:-}" ] && [ -n "${BATCH_VARIANTS:-}" ]; then
  IFS=';' read -ra vs <<< "$BATCH_VARIANTS"
  for v in "${vs[@]}"; do
    label=${v%%:*}; m1=${MODELS%% *}
    stamp "batched variant $label (${v#*:})"
    env ${v#*:} timeout "$(left)" "$PL" bench -m "$W/$m1" --device cuda -p 0 -n 128 -d 128 -r "$REPS" \
      --batch "$BATCHES" --json > "$OUT/batched-$label.json" 2> "$OUT/batched-$label.err" || tail -3 "$OUT/batched-$label.err"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], ' '.join(f\"{t['name']} {t['mean_tps']:.1f} ± {t['stddev_tps']:.1f}\" for t in r['tests']))" "$OUT/batched-$label.json" "$label" 2>/dev/null
  done
fi
stamp "waiting for llama.cpp"; wait $lc_pid; tail -2 "$OUT/lc-build.log"
LB=$W/lc/build/bin/llama-bench
if [ -n "${BATCHES:-}" ]; then
  m1=${MODELS%% *}; stamp "llama-batched-bench $m1"
  timeout "$(left)" "$W/lc/build/bin/llama-batched-bench" -m "$W/$m1" -ngl 99 -c 20480 -npp 128 -ntg 128 \
    -npl "1,$BATCHES" > "$OUT/llama-batched.txt" 2>&1 || tail -3 "$OUT/llama-batched.txt"
  # Its table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
  awk -F'|' '$2 ~ /^ *[0-9]+ *$/ {gsub(/ /,""); printf "llama.cpp tg%s x%s @ d%s (S_TG): %s t/s\n", $3, $4, $2, $9}' "$OUT/llama-batched.txt"
fi
for m in $MODELS; do
  case $m in *.gguf) ;; *) continue;; esac
  [ -f "$W/$m" ] || continue
  stamp "llama-bench $m"; timeout "$(left)" "$LB" -m "$W/$m" -ngl 99 -p 512 -n 128 -d "$D" -r "$REPS" -o json > "$OUT/llama-${m%.gguf}.json" 2> "$OUT/llama-${m%.gguf}.err" || tail -3 "$OUT/llama-${m%.gguf}.err"
done
# Optional: NCU=1 profiles the decode kernels of about one token (the first NCU_SKIP matching
# launches skipped, NCU_COUNT profiled; kernels matching NCU_KERNELS) at depth 0 and at the first
# of $DEPTHS, on each of NCU_MODELS (the first of MODELS by default): Nsight Compute, speed-of-light
# section, per-kernel summary. NCU_PREFILL=0 skips the prefill profile.
if [ "${NCU:-0}" != 0 ] && command -v ncu >/dev/null; then
  for m1 in ${NCU_MODELS:-${MODELS%% *}}; do
  for d in 0 ${DEPTHS%%,*}; do
    stamp "ncu $m1 d$d"
    timeout "$(left)" ncu --clock-control none --section SpeedOfLight --print-summary per-kernel \
      -k "regex:${NCU_KERNELS:-qgemv|attn_|rmsnorm_q8|swiglu|quantize_q8|moe_}" --launch-skip "${NCU_SKIP:-400}" --launch-count "${NCU_COUNT:-400}" \
      "$PL" bench -m "$W/$m1" --device cuda -p 0 -n 64 -d "$d" -r 1 > "$OUT/ncu-${m1%.gguf}-d$d.txt" 2>&1 || tail -3 "$OUT/ncu-${m1%.gguf}-d$d.txt"
    [ "${NCU_PREFILL:-1}" = 0 ] && continue
    # Prefill: every kernel's time (one metric, one pass) over the depth fill and one pp512.
    stamp "ncu prefill $m1 d$d"
    timeout "$(left)" ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
      "$PL" bench -m "$W/$m1" --device cuda -p 512 -n 0 -d "$d" -r 1 > "$OUT/ncu-pp-${m1%.gguf}-d$d.txt" 2>&1 || tail -3 "$OUT/ncu-pp-${m1%.gguf}-d$d.txt"
  done
  done
fi

# 6. HBM read bandwidth, and the summary.
stamp hbm
python3 - "$OUT" "$W" "$MODELS" <<'PY'
import json, os, statistics, sys, torch
out, w, models = sys.argv[1], sys.argv[2], sys.argv[3].split()
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
def test_name(t):  # llama-bench's row -> pocketlm's test name
    n = f"pp{t['n_prompt']}" if t["n_prompt"] else f"tg{t['n_gen']}"
    return n + (f" @ d{t['n_depth']}" if t.get("n_depth") else "")
def lc(q):
    r = load(f"llama-{q}.json") or []
    return ({test_name(t): (t["avg_ts"], t["stddev_ts"], statistics.median(t.get("samples_ts") or [t["avg_ts"]])) for t in r},
            (r[0]["model_size"] if r else None))
def pl(m):
    r = load(f"bench-{m}.json")
    if not r: return {}, None, None
    return ({t["name"]: (t["mean_tps"], t["stddev_tps"]) for t in r["tests"]}, r["weights_bytes"], r.get("gpu_memory_used_bytes"))
# Bytes read per generated token: all weights except the token-embedding table (one row is read).
def per_token(size, m):
    if m.endswith(".gguf"):
        import gguf
        emb = next(int(t.n_bytes) for t in gguf.GGUFReader(os.path.join(w, m)).tensors
                   if t.name == "token_embd.weight")
    else:
        import struct
        f = open(os.path.join(w, m, "model.safetensors"), "rb")
        hdr = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        emb = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in hdr.items() if k.startswith("model.embed_tokens."))
    return size - emb
lines = [f"GPU: {open(os.path.join(out,'gpu.txt')).read().strip()}; HBM read {bw/1e9:.0f} GB/s (torch sum, 8 GiB, median of 10)", "",
         "| model | test | pocketlm t/s | llama.cpp mean t/s | llama.cpp median t/s | vs mean | vs median | tg / bound | sampled / greedy |",
         "|---|---|---|---|---|---|---|---|---|"]
for m in models:
    shape = m.split("-")[0]
    q = m[:-5] if m.endswith(".gguf") else f"{shape}-{'q4_0' if m.endswith('mlx4') else 'q8_0'}"
    l, lsize = lc(q)
    p, size, mem = pl(m)
    if not p: lines.append(f"| {m} | failed | | | | | | | |"); continue
    b = bw / per_token(size, m)
    for name, (mean, sd) in p.items():
        base = name.replace(" +sampling", "")
        lm = l.get(base)
        bound = f"{mean/b:.0%}" if name.startswith("tg") else ""
        sg = f"{mean/p[base][0]:.2f}" if name.endswith("+sampling") and base in p else ""
        if lm and not name.endswith("+sampling"):
            lines.append(f"| {m} | {name} | {mean:.1f} ± {sd:.1f} | {lm[0]:.1f} ± {lm[1]:.1f} | {lm[2]:.1f} | {mean/lm[0]:.2f}x | {mean/lm[2]:.2f}x | {bound} | {sg} |")
        else:
            lines.append(f"| {m} | {name} | {mean:.1f} ± {sd:.1f} | | | | | {bound} | {sg} |")
    lines.append(f"| {m} | weights {size/2**30:.2f} GiB, GPU memory {mem/2**30 if mem else 0:.2f} GiB, tg bound {b:.0f} t/s | | | | | | | |")
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
stamp done
