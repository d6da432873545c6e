//! Benchmark of the GGUF CPU kernels (`pocketlm::kernels`) against candle's `QMatMul` on the
//! same data, in the same run, for the default model's shapes (SmolLM2-135M: hidden 576,
//! kv 192, ffn 1536, vocab 49152; Q4_1 matrices and a Q8_0 tied output).
//!
//! Run: `cargo bench -p pocketlm --bench gguf_kernels` (add `-- quick` to skip the candle
//! prefill rows, which take a while with candle's scalar `Q4_1`, and/or section names
//! `bandwidth`, `table`, `backends`, `sweeps`, `kquants`, `q4_0`, `output`, `q4_1`, `iq4`, `q5k` to run only those). Numbers are noisy when other
//! processes share the cores: each row is the best of several runs (median in brackets).
//!
//! Prints, per shape and batch `m`: time per call, GB/s of weight bytes streamed (bytes /
//! time), GFLOP/s (`2·m·n·k / time`) and candle's time / ours. Beside them, the machine's
//! memory bandwidth (sum of a 512 MiB buffer; memcpy of 256 MiB counted as read + write).
//! Then whole-model sweeps: every matrix of 30 layers plus the output, as one decode token
//! (`m = 1`, weights far larger than the caches, as in real decode) and as a 512-token prefill.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use pocketlm::kernels::{in_pool, matmul_fused, Backend, GgufMatrix, GgufType, WeightBytes};
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

fn quantize(rng: &mut StdRng, dtype: GgmlDType, n: usize, k: usize) -> QTensor {
    let t = Tensor::from_vec(rand_vec(rng, n * k), (n, k), &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

/// The activation row counts to run: the `m=N` arguments, else `default`.
fn row_counts(args: &[String], default: &[usize]) -> Vec<usize> {
    let ms: Vec<usize> = args
        .iter()
        .filter_map(|a| a.strip_prefix("m=")?.parse().ok())
        .collect();
    if ms.is_empty() {
        default.to_vec()
    } else {
        ms
    }
}

/// [`time`] of `w.matmul` on `m` rows of `x` into `out`, on the whole pool from inside it: 20
/// runs within 400 ms below 10^9 multiply-adds, else 3 within 1.5 s.
fn time_matmul(w: &GgufMatrix, x: &[f32], m: usize, out: &mut [f32]) -> (Duration, Duration) {
    let small = m * w.rows() * w.cols() < 1_000_000_000;
    in_pool(|| {
        time(
            || w.matmul(x, m, out).unwrap(),
            if small { 20 } else { 3 },
            Duration::from_millis(if small { 400 } else { 1500 }),
        )
    })
}

fn memory_bandwidth() {
    const LEN: usize = 512 << 20;
    let src: Vec<u64> = (0..LEN / 8).map(|i| i as u64).collect();
    let mut dst = vec![0u64; LEN / 16];
    let sum1 = || src.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    let (b1, _) = time(
        || {
            black_box(sum1());
        },
        3,
        Duration::from_secs(2),
    );
    let sum_n = || {
        src.par_chunks(1 << 20)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add)
    };
    let (bn, _) = time(
        || {
            black_box(sum_n());
        },
        3,
        Duration::from_secs(2),
    );
    let half = LEN / 16;
    let (bc, _) = time(
        || {
            dst.copy_from_slice(&src[..half]);
            black_box(&dst);
        },
        3,
        Duration::from_secs(2),
    );
    let gbs = |bytes: usize, d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
    println!(
        "memory bandwidth: read 1 thread {:.1} GB/s, read {} threads {:.1} GB/s, memcpy 1 thread {:.1} GB/s (read + write)",
        gbs(LEN, b1),
        rayon::current_num_threads(),
        gbs(LEN, bn),
        gbs(2 * half * 8, bc)
    );
}

fn shape_table(quick: bool) {
    let mut rng = StdRng::seed_from_u64(1);
    let shapes = [
        ("attn_q/o", GgmlDType::Q4_1, HIDDEN, HIDDEN),
        ("attn_k/v", GgmlDType::Q4_1, KV, HIDDEN),
        ("ffn_gate/up", GgmlDType::Q4_1, FFN, HIDDEN),
        ("ffn_down", GgmlDType::Q4_1, HIDDEN, FFN),
        ("output", GgmlDType::Q8_0, VOCAB, HIDDEN),
    ];
    println!(
        "\n{:<12} {:>5} {:>12} {:>2} | {:>23} {:>8} {:>8} | {:>23} {:>8} | {:>7}",
        "matrix",
        "type",
        "n x k",
        "m",
        "ours best [median]",
        "GB/s",
        "GFLOP/s",
        "candle best [median]",
        "GFLOP/s",
        "candle/ours"
    );
    for (name, dtype, n, k) in shapes {
        let q = quantize(&mut rng, dtype, n, k);
        let ours = GgufMatrix::from_qtensor(name, &q).unwrap();
        let bytes = ours.bytes().len();
        let candle = QMatMul::from_qtensor(q).unwrap();
        for m in [1usize, 512] {
            let x = rand_vec(&mut rng, m * k);
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let mut out = vec![0f32; m * n];
            let budget = Duration::from_millis(if m == 1 { 400 } else { 1500 });
            let (ob, om) = time(
                || ours.matmul(&x, m, &mut out).unwrap(),
                if m == 1 { 50 } else { 3 },
                budget,
            );
            std::thread::sleep(Duration::from_millis(50));
            let flops = 2.0 * (m * n * k) as f64;
            let skip_candle = quick && m > 1;
            let (cb, cm) = if skip_candle {
                (Duration::ZERO, Duration::ZERO)
            } else {
                time(
                    || drop(black_box(candle.forward(&xt).unwrap())),
                    if m == 1 { 20 } else { 2 },
                    budget,
                )
            };
            std::thread::sleep(Duration::from_millis(50));
            let candle_cols = if skip_candle {
                format!("{:>23} {:>8} | {:>7}", "skipped", "", "")
            } else {
                format!(
                    "{} [{}] {:8.1} | {:6.1}x",
                    fmt_dur(cb),
                    fmt_dur(cm),
                    flops / cb.as_secs_f64() / 1e9,
                    cb.as_secs_f64() / ob.as_secs_f64()
                )
            };
            println!(
                "{:<12} {:>5} {:>12} {:>3} | {} [{}] {:8.1} {:8.1} | {}",
                name,
                format!("{dtype:?}"),
                format!("{n}x{k}"),
                m,
                fmt_dur(ob),
                fmt_dur(om),
                bytes as f64 / ob.as_secs_f64() / 1e9,
                flops / ob.as_secs_f64() / 1e9,
                candle_cols
            );
        }
    }
}

/// Scalar vs SIMD and thread scaling on the largest Q4_1 matrix and on the output matrix.
fn backends_and_threads() {
    {
        // Per-call cost of a small product (attn_k, 69 KB) on 1 thread vs handed to the pool.
        let mut rng = StdRng::seed_from_u64(4);
        let q = quantize(&mut rng, GgmlDType::Q4_1, KV, HIDDEN);
        let w = GgufMatrix::from_qtensor("attn_k", &q).unwrap();
        let x = rand_vec(&mut rng, HIDDEN);
        let mut out = vec![0f32; KV];
        println!("\nattn_k 192x576 Q4_1, m = 1 (per-call overhead):");
        for threads in [1, rayon::current_num_threads()] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (b, m) = pool.install(|| {
                time(
                    || w.matmul(&x, 1, &mut out).unwrap(),
                    100,
                    Duration::from_millis(200),
                )
            });
            println!(
                "  {threads} thread(s), called inside the pool: {} [{}]",
                fmt_dur(b),
                fmt_dur(m)
            );
        }
        let (b, m) = time(
            || w.matmul(&x, 1, &mut out).unwrap(),
            100,
            Duration::from_millis(200),
        );
        println!(
            "  global pool, called from outside it: {} [{}]",
            fmt_dur(b),
            fmt_dur(m)
        );
    }
    let mut rng = StdRng::seed_from_u64(2);
    for (name, dtype, n, k, ms) in [
        ("ffn_up", GgmlDType::Q4_1, FFN, HIDDEN, &[1usize, 512][..]),
        ("output", GgmlDType::Q8_0, VOCAB, HIDDEN, &[1usize][..]),
    ] {
        let q = quantize(&mut rng, dtype, n, k);
        let w = GgufMatrix::from_qtensor(name, &q).unwrap();
        backends_for(&mut rng, &w, ms);
    }
}

fn backends_for(rng: &mut StdRng, w: &GgufMatrix, ms: &[usize]) {
    let (n, k) = (w.rows(), w.cols());
    let backends = Backend::available();
    for &m in ms {
        let x = rand_vec(rng, m * k);
        let mut out = vec![0f32; m * n];
        println!("\n{} {n}x{k} {:?}, m = {m}:", w.name(), w.dtype());
        for &backend in &backends {
            if backend == Backend::Scalar && m > 1 {
                continue;
            }
            for threads in [1, rayon::current_num_threads()] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let (b, med) = pool.install(|| {
                    time(
                        || w.matmul_with(backend, &x, m, &mut out).unwrap(),
                        if m == 1 { 30 } else { 3 },
                        Duration::from_millis(if m == 1 { 300 } else { 1000 }),
                    )
                });
                println!(
                    "  {backend:?} {threads} thread(s): {} [{}]  {:.1} GB/s  {:.1} GFLOP/s",
                    fmt_dur(b),
                    fmt_dur(med),
                    w.bytes().len() as f64 / b.as_secs_f64() / 1e9,
                    2.0 * (m * n * k) as f64 / b.as_secs_f64() / 1e9
                );
            }
        }
    }
}

struct Layer {
    q: GgufMatrix,
    k: GgufMatrix,
    v: GgufMatrix,
    o: GgufMatrix,
    gate: GgufMatrix,
    up: GgufMatrix,
    down: GgufMatrix,
    cq: [QMatMul; 7],
}

fn model_sweeps(quick: bool) {
    let mut rng = StdRng::seed_from_u64(3);
    let mut layers = Vec::new();
    for _ in 0..LAYERS {
        let shapes = [
            (HIDDEN, HIDDEN),
            (KV, HIDDEN),
            (KV, HIDDEN),
            (HIDDEN, HIDDEN),
            (FFN, HIDDEN),
            (FFN, HIDDEN),
            (HIDDEN, FFN),
        ];
        let qs: Vec<QTensor> = shapes
            .iter()
            .map(|&(n, k)| quantize(&mut rng, GgmlDType::Q4_1, n, k))
            .collect();
        let m: Vec<GgufMatrix> = qs
            .iter()
            .map(|q| GgufMatrix::from_qtensor("w", q).unwrap())
            .collect();
        let cq: Vec<QMatMul> = qs
            .into_iter()
            .map(|q| QMatMul::from_qtensor(q).unwrap())
            .collect();
        let mut it = m.into_iter();
        let mut next = || it.next().unwrap();
        layers.push(Layer {
            q: next(),
            k: next(),
            v: next(),
            o: next(),
            gate: next(),
            up: next(),
            down: next(),
            cq: cq.try_into().ok().unwrap(),
        });
    }
    let oq = quantize(&mut rng, GgmlDType::Q8_0, VOCAB, HIDDEN);
    let out_w = GgufMatrix::from_qtensor("output", &oq).unwrap();
    let out_c = QMatMul::from_qtensor(oq).unwrap();
    let total: usize = layers
        .iter()
        .map(|l| {
            [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                .iter()
                .map(|w| w.bytes().len())
                .sum::<usize>()
        })
        .sum::<usize>()
        + out_w.bytes().len();
    println!(
        "\nwhole-model sweeps (30 layers × q,k,v,o,gate,up,down Q4_1 + output Q8_0 = {:.1} MB of weights, synthetic):",
        total as f64 / 1e6
    );

    // Decode: one token.
    let x = rand_vec(&mut rng, HIDDEN);
    let xf = rand_vec(&mut rng, FFN);
    let (mut q, mut k, mut v, mut o) = (
        vec![0f32; HIDDEN],
        vec![0f32; KV],
        vec![0f32; KV],
        vec![0f32; HIDDEN],
    );
    let (mut g, mut u, mut d) = (vec![0f32; FFN], vec![0f32; FFN], vec![0f32; HIDDEN]);
    let mut logits = vec![0f32; VOCAB];
    let (b, m) = time(
        || {
            for l in &layers {
                matmul_fused(&[&l.q, &l.k, &l.v], &x, 1, &mut [&mut q, &mut k, &mut v]).unwrap();
                l.o.matmul(&x, 1, &mut o).unwrap();
                matmul_fused(&[&l.gate, &l.up], &x, 1, &mut [&mut g, &mut u]).unwrap();
                l.down.matmul(&xf, 1, &mut d).unwrap();
            }
            out_w.matmul(&x, 1, &mut logits).unwrap();
        },
        10,
        Duration::from_secs(2),
    );
    println!(
        "  decode, ours (fused qkv and gate/up): {} [{}] per token = {:.0} tok/s from matmuls alone, {:.1} GB/s",
        fmt_dur(b),
        fmt_dur(m),
        1.0 / b.as_secs_f64(),
        total as f64 / b.as_secs_f64() / 1e9
    );
    let (b2, m2) = time(
        || {
            for l in &layers {
                l.q.matmul(&x, 1, &mut q).unwrap();
                l.k.matmul(&x, 1, &mut k).unwrap();
                l.v.matmul(&x, 1, &mut v).unwrap();
                l.o.matmul(&x, 1, &mut o).unwrap();
                l.gate.matmul(&x, 1, &mut g).unwrap();
                l.up.matmul(&x, 1, &mut u).unwrap();
                l.down.matmul(&xf, 1, &mut d).unwrap();
            }
            out_w.matmul(&x, 1, &mut logits).unwrap();
        },
        10,
        Duration::from_secs(2),
    );
    println!(
        "  decode, ours (one call per matrix):   {} [{}] per token = {:.0} tok/s",
        fmt_dur(b2),
        fmt_dur(m2),
        1.0 / b2.as_secs_f64()
    );
    // The same token with the whole pass inside the pool (`in_pool` runs its body on a
    // worker): the kernels' parallel loops then start on a worker instead of handing each call
    // from this thread to the pool.
    let (b3, m3) = time(
        || {
            in_pool(|| {
                for l in &layers {
                    matmul_fused(&[&l.q, &l.k, &l.v], &x, 1, &mut [&mut q, &mut k, &mut v])
                        .unwrap();
                    l.o.matmul(&x, 1, &mut o).unwrap();
                    matmul_fused(&[&l.gate, &l.up], &x, 1, &mut [&mut g, &mut u]).unwrap();
                    l.down.matmul(&xf, 1, &mut d).unwrap();
                }
                out_w.matmul(&x, 1, &mut logits).unwrap();
            })
        },
        10,
        Duration::from_secs(2),
    );
    println!(
        "  decode, ours (fused, inside in_pool):  {} [{}] per token = {:.0} tok/s",
        fmt_dur(b3),
        fmt_dur(m3),
        1.0 / b3.as_secs_f64()
    );
    std::thread::sleep(Duration::from_millis(50));
    let xt = Tensor::from_vec(x.clone(), (1, HIDDEN), &Device::Cpu).unwrap();
    let xft = Tensor::from_vec(xf.clone(), (1, FFN), &Device::Cpu).unwrap();
    let (cb, cm) = time(
        || {
            for l in &layers {
                for (i, c) in l.cq.iter().enumerate() {
                    let inp = if i == 6 { &xft } else { &xt };
                    black_box(c.forward(inp).unwrap());
                }
            }
            black_box(out_c.forward(&xt).unwrap());
        },
        5,
        Duration::from_secs(2),
    );
    println!(
        "  decode, candle QMatMul:               {} [{}] per token = {:.0} tok/s  (candle/ours {:.1}x)",
        fmt_dur(cb),
        fmt_dur(cm),
        1.0 / cb.as_secs_f64(),
        cb.as_secs_f64() / b.as_secs_f64()
    );
    std::thread::sleep(Duration::from_millis(50));

    // Prefill: 512 tokens through every layer (the output only for the last token).
    let mt = 512;
    let x = rand_vec(&mut rng, mt * HIDDEN);
    let xf = rand_vec(&mut rng, mt * FFN);
    let mut q = vec![0f32; mt * HIDDEN];
    let (mut k, mut v) = (vec![0f32; mt * KV], vec![0f32; mt * KV]);
    let mut o = vec![0f32; mt * HIDDEN];
    let (mut g, mut u) = (vec![0f32; mt * FFN], vec![0f32; mt * FFN]);
    let mut d = vec![0f32; mt * HIDDEN];
    let (pb, pm) = time(
        || {
            for l in &layers {
                matmul_fused(&[&l.q, &l.k, &l.v], &x, mt, &mut [&mut q, &mut k, &mut v]).unwrap();
                l.o.matmul(&x, mt, &mut o).unwrap();
                matmul_fused(&[&l.gate, &l.up], &x, mt, &mut [&mut g, &mut u]).unwrap();
                l.down.matmul(&xf, mt, &mut d).unwrap();
            }
            out_w.matmul(&x[..HIDDEN], 1, &mut logits).unwrap();
        },
        2,
        Duration::from_secs(3),
    );
    let flops = 2.0
        * mt as f64
        * LAYERS as f64
        * (2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * FFN * HIDDEN) as f64;
    println!(
        "  prefill 512, ours: {} [{}] = {:.0} tok/s from matmuls alone, {:.1} GFLOP/s",
        fmt_dur(pb),
        fmt_dur(pm),
        mt as f64 / pb.as_secs_f64(),
        flops / pb.as_secs_f64() / 1e9
    );
    if !quick {
        std::thread::sleep(Duration::from_millis(50));
        // Candle on 1 layer (compute-bound, so it scales linearly), extrapolated to 30.
        let xt = Tensor::from_vec(x.clone(), (mt, HIDDEN), &Device::Cpu).unwrap();
        let xft = Tensor::from_vec(xf.clone(), (mt, FFN), &Device::Cpu).unwrap();
        let (cb, _) = time(
            || {
                for l in &layers[..1] {
                    for (i, c) in l.cq.iter().enumerate() {
                        let inp = if i == 6 { &xft } else { &xt };
                        black_box(c.forward(inp).unwrap());
                    }
                }
            },
            1,
            Duration::ZERO,
        );
        let cb = cb * LAYERS as u32;
        println!(
            "  prefill 512, candle (1 layer × 30): {} = {:.0} tok/s  (candle/ours {:.1}x)",
            fmt_dur(cb),
            mt as f64 / cb.as_secs_f64(),
            cb.as_secs_f64() / pb.as_secs_f64()
        );
    }
}

/// The k-quant kernels on Llama-3.2-1B shapes (hidden 2048, kv 512, ffn 8192; `Q4_K` layers and
/// a `Q6_K` output, cut to 32768 of its 128256 rows): repacked matrices (on CPUs with the packed
/// kernels), 1 thread and the whole pool, decode (`m = 1..4`) and prefill (`m = 512`), in GB/s
/// of weight bytes. The `L2` rows use a matrix small enough to stay in the cache (kernel
/// throughput without memory stalls).
fn kquants(quick: bool) {
    let mut rng = StdRng::seed_from_u64(5);
    let shapes = [
        ("L2 q4k", GgmlDType::Q4K, 256, 2048),
        ("ffn_up", GgmlDType::Q4K, 8192, 2048),
        ("ffn_down", GgmlDType::Q4K, 2048, 8192),
        ("DRAM q4k", GgmlDType::Q4K, 49152, 2048),
        ("L2 q6k", GgmlDType::Q6K, 256, 2048),
        ("output", GgmlDType::Q6K, 32768, 2048),
        ("DRAM q4_0", GgmlDType::Q4_0, 49152, 2048),
        ("DRAM q4_1", GgmlDType::Q4_1, 49152, 2048),
        ("DRAM q8_0", GgmlDType::Q8_0, 32768, 2048),
    ];
    println!(
        "\nk-quants, Llama-3.2-1B shapes (repacked: {}):",
        GgufMatrix::packed_kernels_here()
    );
    for (name, dtype, n, k) in shapes {
        let q = quantize(&mut rng, dtype, n, k);
        let w = GgufMatrix::from_qtensor(name, &q).unwrap().repacked();
        let ms: &[usize] = if quick { &[1] } else { &[1, 2, 4, 512] };
        for &m in ms {
            if m == 512 && name.starts_with("L2") {
                continue;
            }
            let x = rand_vec(&mut rng, m * k);
            let mut out = vec![0f32; m * n];
            for threads in [1, rayon::current_num_threads()] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let (b, med) = pool.install(|| {
                    time(
                        || w.matmul(&x, m, &mut out).unwrap(),
                        if m < 8 { 30 } else { 3 },
                        Duration::from_millis(if m < 8 { 300 } else { 1500 }),
                    )
                });
                println!(
                    "  {name:<10} {dtype:?} {n}x{k} m={m:<3} {threads}t: {} [{}] {:6.1} GB/s {:7.1} GFLOP/s",
                    fmt_dur(b),
                    fmt_dur(med),
                    w.bytes().len() as f64 / b.as_secs_f64() / 1e9,
                    2.0 * (m * n * k) as f64 / b.as_secs_f64() / 1e9
                );
            }
        }
    }
}

/// The packed `Q4_0` product on Llama-3.2-1B shapes (`ffn_down` 2048x8192, `ffn_up` 8192x2048,
/// the output 128256x2048) at `m = 1, 4, 16, 64, 512` activation rows (decode, the server's
/// batched decode of 16 clients, prefill), on the whole pool: time per call, GOP/s
/// (`2·m·n·k / time`) and activation rows per second. Rows to run can be narrowed with
/// `m=16` style arguments.
fn q4_0(args: &[String]) {
    let mut rng = StdRng::seed_from_u64(7);
    let shapes = [
        ("ffn_down", 2048, 8192),
        ("ffn_up", 8192, 2048),
        ("output", 128256, 2048),
    ];
    let ms = row_counts(args, &[1, 4, 16, 64, 512]);
    println!(
        "\npacked Q4_0, Llama-3.2-1B shapes (repacked: {}), {} threads:",
        GgufMatrix::packed_kernels_here(),
        rayon::current_num_threads()
    );
    for (name, n, k) in shapes {
        let q = quantize(&mut rng, GgmlDType::Q4_0, n, k);
        let w = GgufMatrix::from_qtensor(name, &q).unwrap().repacked();
        for &m in &ms {
            let x = rand_vec(&mut rng, m * k);
            let mut out = vec![0f32; m * n];
            let work = (m * n * k) as f64;
            let (b, med) = time_matmul(&w, &x, m, &mut out);
            println!(
                "  {name:<8} {n}x{k} m={m:<3}: {} [{}] {:7.1} GOP/s {:8.1} rows/s",
                fmt_dur(b),
                fmt_dur(med),
                2.0 * work / b.as_secs_f64() / 1e9,
                m as f64 / b.as_secs_f64()
            );
        }
    }
}

/// `IQ4_NL` and `IQ4_XS` (random codes and scales, small `f16` scales `d`) beside `Q4_0` on the
/// Llama-3.2-1B feed-forward shapes (`ffn_down` 2048x8192, `ffn_up` 8192x2048), each in the
/// file layout and repacked, at `m = 1, 64, 512` activation rows (narrowed with `m=64` style
/// arguments), on the whole pool from inside it: time per call and GOP/s (`2·m·n·k / time`).
fn iq4(args: &[String]) {
    let mut rng = StdRng::seed_from_u64(9);
    let ms = row_counts(args, &[1, 64, 512]);
    println!(
        "\nIQ4 vs Q4_0, Llama-3.2-1B shapes (packed kernels here: {}), {} threads:",
        GgufMatrix::packed_kernels_here(),
        rayon::current_num_threads()
    );
    for (name, n, k) in [("ffn_down", 2048, 8192), ("ffn_up", 8192, 2048)] {
        for ty in [GgufType::Q4_0, GgufType::Iq4Nl, GgufType::Iq4Xs] {
            let blocks = n * k / ty.block_size();
            let mut bytes: Vec<u8> = (0..blocks * ty.type_size()).map(|_| rng.random()).collect();
            for blk in bytes.chunks_exact_mut(ty.type_size()) {
                let d = half::f16::from_f32(rng.random_range(-0.01f32..0.01));
                blk[..2].copy_from_slice(&d.to_le_bytes());
            }
            let plain = GgufMatrix::new(name, WeightBytes::owned(bytes), ty, n, k).unwrap();
            let packed = plain.clone().repacked();
            for &m in &ms {
                let x = rand_vec(&mut rng, m * k);
                let mut out = vec![0f32; m * n];
                let work = (m * n * k) as f64;
                for (label, w) in [("file", &plain), ("packed", &packed)] {
                    let (b, med) = time_matmul(w, &x, m, &mut out);
                    println!(
                        "  {name:<8} {n}x{k} {:<6} {label:<6} m={m:<3}: {} [{}] {:7.1} GOP/s",
                        ty.ggml_name(),
                        fmt_dur(b),
                        fmt_dur(med),
                        2.0 * work / b.as_secs_f64() / 1e9,
                    );
                }
            }
        }
    }
}

/// The packed `Q5_K` product on Llama-3.2-1B shapes (`ffn_up` 8192x2048, `ffn_down` 2048x8192,
/// and a 256x2048 matrix that stays in the L2), beside `Q4_K` on the same shapes, at `m = 1,
/// 16, 512` activation rows (decode, a small batch, prefill), on the whole pool: time per call,
/// GOP/s (`2·m·n·k / time`) and activation rows per second. Rows to run can be narrowed with
/// `m=16` style arguments.
fn q5k(args: &[String]) {
    let mut rng = StdRng::seed_from_u64(9);
    let shapes = [
        ("L2", 256, 2048),
        ("ffn_up", 8192, 2048),
        ("ffn_down", 2048, 8192),
    ];
    let ms = row_counts(args, &[1, 16, 512]);
    println!(
        "\npacked Q5_K and Q4_K, Llama-3.2-1B shapes (repacked: {}), {} threads:",
        GgufMatrix::packed_kernels_here(),
        rayon::current_num_threads()
    );
    for (name, n, k) in shapes {
        for dtype in [GgmlDType::Q5K, GgmlDType::Q4K] {
            let q = quantize(&mut rng, dtype, n, k);
            let w = GgufMatrix::from_qtensor(name, &q).unwrap().repacked();
            for &m in &ms {
                let x = rand_vec(&mut rng, m * k);
                let mut out = vec![0f32; m * n];
                let work = (m * n * k) as f64;
                let (b, med) = time_matmul(&w, &x, m, &mut out);
                println!(
                    "  {name:<8} {dtype:?} {n}x{k} m={m:<3}: {} [{}] {:7.1} GOP/s {:8.1} rows/s",
                    fmt_dur(b),
                    fmt_dur(med),
                    2.0 * work / b.as_secs_f64() / 1e9,
                    m as f64 / b.as_secs_f64()
                );
            }
        }
    }
}

/// The default model's tied `Q8_0` output layer (49152x576) in the file's layout and packed
/// in ggml's float order (`GgufMatrix::repacked_keeping_order`, the same bits), at `m = 1, 2,
/// 4, 8, 16, 32, 64` activation rows (decode of one client up to the server's batches), on the
/// whole pool from inside it: time per call and activation rows per second. Rows to run can be
/// narrowed with `m=16` style arguments.
fn tied_output(args: &[String]) {
    let ms = row_counts(args, &[1, 2, 4, 8, 16, 32, 64]);
    packed_keeping_order("tied output", GgmlDType::Q8_0, VOCAB, HIDDEN, &ms, 8);
}

/// The default model's `Q4_1` matrices (`ffn_gate/up` 1536x576, `ffn_down` 576x1536, `attn_q/o`
/// 576x576) in the file layout and packed, at `m = 1, 2, 4, 8, 16, 32, 64` activation rows,
/// as [`tied_output`]; the packed kernel keeps ggml's float order, so the bits must match.
fn q4_1(args: &[String]) {
    let ms = row_counts(args, &[1, 2, 4, 8, 16, 32, 64]);
    for (label, n, k) in [
        ("ffn_gate/up", FFN, HIDDEN),
        ("ffn_down", HIDDEN, FFN),
        ("attn_q/o", HIDDEN, HIDDEN),
    ] {
        packed_keeping_order(label, GgmlDType::Q4_1, n, k, &ms, 9);
    }
}

/// Times an `n x k` matrix of `dtype` in the file layout and repacked in ggml's float order
/// (`repacked_keeping_order`) at each of `ms` activation rows, on the whole pool from inside it,
/// and checks that both give the same bits.
fn packed_keeping_order(
    label: &str,
    dtype: GgmlDType,
    n: usize,
    k: usize,
    ms: &[usize],
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let q = quantize(&mut rng, dtype, n, k);
    let plain = GgufMatrix::from_qtensor(label, &q).unwrap();
    let packed = plain.clone().repacked_keeping_order();
    println!(
        "
{label} {n}x{k} {dtype:?} (packed: {}), {} threads:",
        packed.is_packed(),
        rayon::current_num_threads()
    );
    for &m in ms {
        let x = rand_vec(&mut rng, m * k);
        let mut want = vec![0f32; m * n];
        plain.matmul(&x, m, &mut want).unwrap();
        for (layout, w) in [("file layout", &plain), ("packed", &packed)] {
            let mut out = vec![0f32; m * n];
            let (b, med) = in_pool(|| {
                time(
                    || w.matmul(&x, m, &mut out).unwrap(),
                    10,
                    Duration::from_millis(300),
                )
            });
            assert_eq!(out, want, "the packed product changed the bits");
            println!(
                "  m={m:<3} {layout:<11}: {} [{}] {:8.1} rows/s",
                fmt_dur(b),
                fmt_dur(med),
                m as f64 / b.as_secs_f64()
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "quick");
    // Optional section names (`bandwidth`, `table`, `backends`, `sweeps`, `kquants`, `q4_0`,
    // `output`, `q4_1`, `iq4`, `q5k`); all by default.
    let sections = [
        "bandwidth",
        "table",
        "backends",
        "sweeps",
        "kquants",
        "q4_0",
        "output",
        "q4_1",
        "iq4",
        "q5k",
    ];
    let chosen: Vec<&str> = sections
        .iter()
        .copied()
        .filter(|s| args.iter().any(|a| a == s))
        .collect();
    let run = |s: &str| chosen.is_empty() || chosen.contains(&s);
    println!(
        "pocketlm GGUF kernels: backend {:?}, {} rayon threads",
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
        backends_and_threads();
    }
    if run("sweeps") {
        model_sweeps(quick);
    }
    if run("kquants") {
        kquants(quick);
    }
    if run("q4_0") {
        q4_0(&args);
    }
    if run("output") {
        tied_output(&args);
    }
    if run("q4_1") {
        q4_1(&args);
    }
    if run("iq4") {
        iq4(&args);
    }
    if run("q5k") {
        q5k(&args);
    }
}
