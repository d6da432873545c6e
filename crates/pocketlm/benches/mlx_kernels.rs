//! Benchmark of the MLX affine CPU kernels (`pocketlm::kernels::mlx`) for the default model's
//! shapes (SmolLM2-135M: hidden 576, kv 192, ffn 1536, vocab 49152), beside the f32 reference
//! product (`quant::mlx_affine::quantized_matmul`, what the layer used before) and our GGUF
//! `Q4_1` kernel on the same shape, in the same run.
//!
//! Run: `cargo bench -p pocketlm --bench mlx_kernels` (add `-- quick` to skip the slow f32
//! reference at m = 512, and/or `bandwidth`, `table`, `backends`, `sweeps` to run only those
//! sections). Each row is the best of several runs (median in brackets); numbers are noisy
//! when other processes share the cores.
//!
//! Prints, per format, shape and batch `m`: time per call, GB/s of weight bytes streamed
//! (codes + scales + biases, / time), GFLOP/s (`2·m·n·k / time`), and the machine's memory
//! bandwidth for scale. Then whole-model sweeps (every matrix of 30 layers plus the tied
//! output, as one decode token and as a 512-token prefill) for MLX 4-bit (f16 and f32
//! parameters), MLX 8-bit and GGUF `Q4_1` (with the `Q8_0` output of the GGUF file).

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use pocketlm::kernels::{self, mlx, Backend, GgufMatrix};
use pocketlm::quant::mlx_affine::{AffineQuantized, ParamDtype};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

const LAYERS: usize = 30;
const HIDDEN: usize = 576;
const KV: usize = 192;
const FFN: usize = 1536;
const VOCAB: usize = 49152;

/// Best and median of timed runs of `f`: at least `min_runs`, and until `budget` has passed.
fn time<F: FnMut()>(mut f: F, min_runs: usize, budget: Duration) -> (Duration, Duration) {
    f(); // warm-up
    let mut v = Vec::new();
    let start = Instant::now();
    while v.len() < min_runs || (start.elapsed() < budget && v.len() < 10_000) {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    v.sort();
    (v[0], v[v.len() / 2])
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:8.1} µs")
    } else {
        format!("{:8.2} ms", us / 1000.0)
    }
}

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn memory_bandwidth() {
    const LEN: usize = 512 << 20;
    let src: Vec<u64> = (0..LEN / 8).map(|i| i as u64).collect();
    let (b1, _) = time(
        || {
            black_box(src.iter().fold(0u64, |a, &b| a.wrapping_add(b)));
        },
        3,
        Duration::from_secs(2),
    );
    let (bn, _) = time(
        || {
            black_box(
                src.par_chunks(1 << 20)
                    .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
                    .reduce(|| 0, u64::wrapping_add),
            );
        },
        3,
        Duration::from_secs(2),
    );
    let gbs = |d: Duration| LEN as f64 / d.as_secs_f64() / 1e9;
    println!(
        "memory bandwidth (sum of a 512 MiB buffer): 1 thread {:.1} GB/s, {} threads {:.1} GB/s",
        gbs(b1),
        rayon::current_num_threads(),
        gbs(bn)
    );
}

/// A weight in one of the benchmarked formats.
enum W {
    Mlx(AffineQuantized),
    Gguf(GgufMatrix),
    /// The f32 reference product on an MLX weight.
    Ref(AffineQuantized),
}

impl W {
    fn mlx(
        rng: &mut StdRng,
        n: usize,
        k: usize,
        bits: usize,
        dtype: ParamDtype,
    ) -> AffineQuantized {
        AffineQuantized::quantize(&rand_vec(rng, n * k), n, k, 64, bits, dtype).unwrap()
    }

    fn gguf(rng: &mut StdRng, dtype: GgmlDType, n: usize, k: usize) -> GgufMatrix {
        let t = Tensor::from_vec(rand_vec(rng, n * k), (n, k), &Device::Cpu).unwrap();
        GgufMatrix::from_qtensor("w", &QTensor::quantize(&t, dtype).unwrap()).unwrap()
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Mlx(q) | Self::Ref(q) => {
                let p = match q.dtype() {
                    ParamDtype::F32 => 4,
                    _ => 2,
                };
                q.weight().len() * 4 + 2 * p * q.scales().len()
            }
            Self::Gguf(g) => g.bytes().len(),
        }
    }

    fn rows(&self) -> usize {
        match self {
            Self::Mlx(q) | Self::Ref(q) => q.rows(),
            Self::Gguf(g) => g.rows(),
        }
    }

    fn run(&self, backend: Backend, x: &[f32], m: usize, out: &mut [f32]) {
        match self {
            Self::Mlx(q) => mlx::matmul_with(backend, q, x, m, out).unwrap(),
            Self::Gguf(g) => g.matmul_with(backend, x, m, out).unwrap(),
            Self::Ref(q) => out.copy_from_slice(&q.matmul(x, m).unwrap()),
        }
    }
}

fn row(label: &str, w: &W, k: usize, m: usize, backend: Backend) {
    let mut rng = StdRng::seed_from_u64(9);
    let x = rand_vec(&mut rng, m * k);
    let mut out = vec![0f32; m * w.rows()];
    let (best, med) = time(
        || w.run(backend, &x, m, &mut out),
        5,
        Duration::from_millis(if m > 1 { 1500 } else { 400 }),
    );
    let s = best.as_secs_f64();
    // Weight bytes streamed from memory: once per call at m = 1 (at larger m tiles are
    // re-read from cache, so GFLOP/s is the measure).
    let gbs = if m == 1 {
        format!("{:6.1} GB/s", w.bytes() as f64 / s / 1e9)
    } else {
        "       -   ".to_string()
    };
    println!(
        "  {label:<28} m {m:>3}: {} [{}]  {gbs}  {:6.1} GFLOP/s",
        fmt_dur(best),
        fmt_dur(med),
        2.0 * (m * w.rows() * k) as f64 / s / 1e9
    );
}

fn shape_table(quick: bool) {
    let mut rng = StdRng::seed_from_u64(1);
    let backend = Backend::detect();
    for (name, n, k) in [
        ("attn_q/o", HIDDEN, HIDDEN),
        ("attn_k/v", KV, HIDDEN),
        ("ffn_gate/up", FFN, HIDDEN),
        ("ffn_down", HIDDEN, FFN),
        ("output (tied)", VOCAB, HIDDEN),
    ] {
        println!("{name} [{n}, {k}]:");
        let formats = [
            (
                "mlx 4-bit g64 f16",
                W::Mlx(W::mlx(&mut rng, n, k, 4, ParamDtype::F16)),
            ),
            (
                "mlx 4-bit g64 f32",
                W::Mlx(W::mlx(&mut rng, n, k, 4, ParamDtype::F32)),
            ),
            (
                "mlx 8-bit g64 f16",
                W::Mlx(W::mlx(&mut rng, n, k, 8, ParamDtype::F16)),
            ),
            (
                "gguf Q4_1",
                W::Gguf(W::gguf(&mut rng, GgmlDType::Q4_1, n, k)),
            ),
            (
                "f32 reference, 4-bit f16",
                W::Ref(W::mlx(&mut rng, n, k, 4, ParamDtype::F16)),
            ),
        ];
        for (label, w) in &formats {
            for m in [1, 512] {
                // Prefill computes the tied output for the last position only.
                if m == 512 && (n == VOCAB || (quick && matches!(w, W::Ref(_)))) {
                    continue;
                }
                row(label, w, k, m, backend);
            }
        }
    }
}

fn backends() {
    let mut rng = StdRng::seed_from_u64(2);
    println!("backends, mlx 4-bit g64 f16 and 8-bit g64 f16, ffn_gate [{FFN}, {HIDDEN}]:");
    let w4 = W::Mlx(W::mlx(&mut rng, FFN, HIDDEN, 4, ParamDtype::F16));
    let w8 = W::Mlx(W::mlx(&mut rng, FFN, HIDDEN, 8, ParamDtype::F16));
    for backend in Backend::available() {
        for m in [1, 64] {
            row(&format!("{backend:?} 4-bit"), &w4, HIDDEN, m, backend);
            row(&format!("{backend:?} 8-bit"), &w8, HIDDEN, m, backend);
        }
    }
}

/// Every matrix of the model as (n, k), per layer, plus the output.
fn model_shapes() -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for _ in 0..LAYERS {
        v.extend([
            (HIDDEN, HIDDEN),
            (KV, HIDDEN),
            (KV, HIDDEN),
            (HIDDEN, HIDDEN),
            (FFN, HIDDEN),
            (FFN, HIDDEN),
            (HIDDEN, FFN),
        ]);
    }
    v
}

fn sweeps() {
    let mut rng = StdRng::seed_from_u64(3);
    let backend = Backend::detect();
    println!("whole model (30 layers + tied output), inside the pool (`kernels::in_pool`):");
    let build =
        |rng: &mut StdRng, f: &dyn Fn(&mut StdRng, usize, usize, bool) -> W| -> Vec<(W, usize)> {
            let mut v: Vec<(W, usize)> = model_shapes()
                .into_iter()
                .map(|(n, k)| (f(rng, n, k, false), k))
                .collect();
            v.push((f(rng, VOCAB, HIDDEN, true), HIDDEN));
            v
        };
    let models: Vec<(&str, Vec<(W, usize)>)> = vec![
        (
            "mlx 4-bit g64 f16",
            build(&mut rng, &|r, n, k, _| {
                W::Mlx(W::mlx(r, n, k, 4, ParamDtype::F16))
            }),
        ),
        (
            "mlx 4-bit g64 f32",
            build(&mut rng, &|r, n, k, _| {
                W::Mlx(W::mlx(r, n, k, 4, ParamDtype::F32))
            }),
        ),
        (
            "mlx 8-bit g64 f16",
            build(&mut rng, &|r, n, k, _| {
                W::Mlx(W::mlx(r, n, k, 8, ParamDtype::F16))
            }),
        ),
        (
            "gguf Q4_1 + Q8_0 output",
            build(&mut rng, &|r, n, k, out| {
                let t = if out {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::Q4_1
                };
                W::Gguf(W::gguf(r, t, n, k))
            }),
        ),
    ];
    for (label, mats) in &models {
        let bytes: usize = mats.iter().map(|(w, _)| w.bytes()).sum();
        let flops: usize = mats.iter().map(|(w, k)| 2 * w.rows() * k).sum();
        for m in [1usize, 512] {
            let xs: Vec<Vec<f32>> = [HIDDEN, FFN]
                .iter()
                .map(|&k| rand_vec(&mut rng, m * k))
                .collect();
            let mut outs: Vec<Vec<f32>> =
                mats.iter().map(|(w, _)| vec![0f32; m * w.rows()]).collect();
            let (best, med) = time(
                || {
                    kernels::in_pool(|| {
                        for ((w, k), out) in mats.iter().zip(outs.iter_mut()) {
                            // Prefill computes the output only for the last position.
                            let (mm, xo) = if w.rows() == VOCAB {
                                (1, (m - 1) * k)
                            } else {
                                (m, 0)
                            };
                            let x = &xs[usize::from(*k == FFN)][xo..xo + mm * k];
                            w.run(backend, x, mm, &mut out[..mm * w.rows()]);
                        }
                    })
                },
                3,
                Duration::from_secs(if m > 1 { 6 } else { 2 }),
            );
            let s = best.as_secs_f64();
            let f = if m == 1 {
                flops
            } else {
                (flops - 2 * VOCAB * HIDDEN) * m + 2 * VOCAB * HIDDEN
            };
            println!(
                "  {label:<24} m {m:>3}: {} [{}] = {:7.1} tok/s  {:5.1} GB/s of {:.1} MB  {:6.1} GFLOP/s",
                fmt_dur(best),
                fmt_dur(med),
                m as f64 / s,
                // Bytes streamed per call (once, whatever m).
                bytes as f64 / s / 1e9,
                bytes as f64 / 1e6,
                f as f64 / s / 1e9
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "quick");
    let sections = ["bandwidth", "table", "backends", "sweeps"];
    let chosen: Vec<&str> = sections
        .iter()
        .copied()
        .filter(|s| args.iter().any(|a| a == s))
        .collect();
    let run = |s: &str| chosen.is_empty() || chosen.contains(&s);
    println!(
        "pocketlm MLX affine kernels: backend {:?}, {} rayon threads",
        Backend::detect(),
        rayon::current_num_threads()
    );
    if run("bandwidth") {
        memory_bandwidth();
    }
    if run("table") {
        shape_table(quick);
    }
    if run("backends") {
        backends();
    }
    if run("sweeps") {
        sweeps();
    }
}
