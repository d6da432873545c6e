//! Kernel tests: every backend against two references on random data over many shapes.
//!
//! 1. The exact product of the same quantized operands, in `f64`: weights dequantized by
//!    candle's `QTensor::dequantize` (exact up to one `f32` rounding per value; for `IQ4_NL`
//!    and `IQ4_XS`, which candle lacks, by our decoder, itself checked bit for bit against
//!    gguf-py in `crate::gguf`'s tests), activations
//!    `d·q` from our `Q8` quantization. The kernels compute this sum with integer dot products
//!    and `f32` block accumulation, so the tolerance is a few `f32` roundings per block
//!    relative to the magnitude of the terms the kernel adds (`(k/32 + 16)·ε·Σ|terms|`).
//! 2. The `f32` product with the dequantized weight and the *unquantized* activations. Each
//!    activation moves by at most half a quantization step `d/2` (`d = amax/127` of its block,
//!    plus `2e-5·d` for the rounding of `x·(1/d)`), so `|y - y_ref| <= Σ_j |w_j|·d_j·(0.5 + 2e-5)`
//!    plus the tolerance of (1).

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::act::quantize_block_scalar;
use super::*;

const TYPES: [GgufType; 9] = [
    GgufType::Q4_0,
    GgufType::Q4_1,
    GgufType::Q5_0,
    GgufType::Q8_0,
    GgufType::Q4K,
    GgufType::Q5K,
    GgufType::Q6K,
    GgufType::Iq4Nl,
    GgufType::Iq4Xs,
];

/// The x86-64 backends (they share ggml's eight-lane float order).
const X86: [Backend; 3] = [Backend::Avx2, Backend::Avx512Vnni, Backend::AvxVnni];

/// Uniform values in `[-1, 1)` with an occasional outlier (as real activations have).
fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if rng.random_range(0..64) == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

struct Weight {
    mat: GgufMatrix,
    /// candle's dequantization, `[n, k]`.
    deq: Vec<f32>,
    /// Per element, the size of the offset the kernels subtract or add (see `offsets`).
    off: Vec<f64>,
}

/// A random `[n, k]` weight of `dtype`: candle's quantization of random values, or for the
/// types candle lacks (`IQ4_NL`, `IQ4_XS`) random block bytes ([`random_weight`]).
fn quantized_weight(rng: &mut StdRng, dtype: GgufType, n: usize, k: usize) -> Weight {
    let Some(ggml) = dtype.to_ggml() else {
        return random_weight(rng, dtype, n, k);
    };
    let w = rand_vec(rng, n * k);
    let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, ggml).unwrap();
    weight_from_qtensor(&q)
}

/// A weight of random block bytes ([`random_block_bytes`]), dequantized by our decoder.
fn random_weight(rng: &mut StdRng, dtype: GgufType, n: usize, k: usize) -> Weight {
    let bytes = random_block_bytes(rng, dtype, n * k / dtype.block_size());
    let mat = GgufMatrix::new("test.weight", WeightBytes::owned(bytes), dtype, n, k).unwrap();
    let off = offsets(dtype, mat.bytes());
    let deq = mat.dequantize();
    Weight { mat, deq, off }
}

fn weight_from_qtensor(q: &QTensor) -> Weight {
    let deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mat = GgufMatrix::from_qtensor("test.weight", q).unwrap();
    let off = offsets(mat.dtype(), mat.bytes());
    Weight { mat, deq, off }
}

/// Per element, the magnitude of the offset term that the kernels handle separately from the
/// integer products (`Q4_0`: `8|d|`, `Q4_1`: `|m|`, `Q4_K` and `Q5_K`: `|dmin·m_s|`,
/// `Q6_K`: `32|d·sc_s|`; none for `Q5_0`, `Q8_0`, `IQ4_NL` and `IQ4_XS`, whose signed values go
/// into the integer products),
/// decoded here straight from ggml's block layouts.
fn offsets(dtype: GgufType, bytes: &[u8]) -> Vec<f64> {
    let h = |b: &[u8], p: usize| half::f16::from_le_bytes([b[p], b[p + 1]]).to_f64();
    let mut out = Vec::new();
    for blk in bytes.chunks_exact(dtype.type_size()) {
        match dtype {
            GgufType::Q4_0 => out.extend([8.0 * h(blk, 0).abs(); 32]),
            GgufType::Q4_1 => out.extend([h(blk, 2).abs(); 32]),
            GgufType::Q5_0 | GgufType::Q8_0 | GgufType::Iq4Nl => out.extend([0.0; 32]),
            GgufType::Iq4Xs => out.extend([0.0; 256]),
            GgufType::Q4K | GgufType::Q5K => {
                let sc = &blk[4..16];
                for s in 0..8 {
                    let m = if s < 4 {
                        sc[s + 4] & 63
                    } else {
                        (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4)
                    };
                    out.extend([(h(blk, 2) * m as f64).abs(); 32]);
                }
            }
            GgufType::Q6K => {
                for s in 0..16 {
                    out.extend([32.0 * (h(blk, 208) * blk[192 + s] as i8 as f64).abs(); 16]);
                }
            }
        }
    }
    out
}

/// Checks one product on one backend against both references.
fn check(rng: &mut StdRng, w: &Weight, m: usize, backend: Backend) {
    let (n, k) = (w.mat.rows(), w.mat.cols());
    let x = rand_vec(rng, m * k);
    let mut out = vec![f32::NAN; m * n];
    w.mat.matmul_with(backend, &x, m, &mut out).unwrap();
    let fmt = w.mat.dtype().act_format();
    let acts = quantize_acts(Backend::Scalar, fmt, &x, m, k);
    let bs = fmt.block();
    for r in 0..m {
        let xq: Vec<f64> = (0..k)
            .map(|j| acts.d[(r * k + j) / bs] as f64 * acts.qs[r * k + j] as f64)
            .collect();
        for c in 0..n {
            let wr = &w.deq[c * k..(c + 1) * k];
            let or = &w.off[c * k..(c + 1) * k];
            let (mut exact, mut mag, mut naive, mut act_err) = (0f64, 0f64, 0f64, 0f64);
            // The activation scale `d` and block sum `s = d * Σq` are stored as f16 (as ggml
            // does): `|x - d q| <= d (1/2 + 127 * 2^-11)`, and the offset term of Q4_1 uses the
            // rounded `s`, off by at most `2^-11 * |m| * Σ|d q|` per block.
            let (f16_rel, mut s_err) = (2f64.powi(-11), 0f64);
            for j in 0..k {
                let wj = wr[j] as f64;
                exact += wj * xq[j];
                mag += (wj.abs() + 2.0 * or[j]) * xq[j].abs();
                naive += wj * x[r * k + j] as f64;
                act_err +=
                    wj.abs() * acts.d[(r * k + j) / bs] as f64 * (0.5 + 127.0 * f16_rel + 2e-5);
                s_err += or[j] * xq[j].abs() * f16_rel;
            }
            let got = out[r * n + c] as f64;
            let tol = (k / 32 + 16) as f64 * f32::EPSILON as f64 * mag + s_err + 1e-30;
            assert!(
                (got - exact).abs() <= tol,
                "{:?} {backend:?} m={m} n={n} k={k} [{r},{c}]: {got} vs exact {exact} (tol {tol:e})",
                w.mat.dtype()
            );
            assert!(
                (got - naive).abs() <= act_err + tol,
                "{:?} {backend:?} m={m} n={n} k={k} [{r},{c}]: {got} vs f32 {naive} (tol {:e})",
                w.mat.dtype(),
                act_err + tol
            );
        }
    }
}

#[test]
fn kernels_match_references_over_shapes() {
    let mut rng = StdRng::seed_from_u64(7);
    for dtype in TYPES {
        let ks: &[usize] = if dtype.block_size() == 32 {
            &[32, 256, 576, 1536]
        } else {
            &[256, 512, 1536]
        };
        for &k in ks {
            for n in [1, 6, 33] {
                let w = quantized_weight(&mut rng, dtype, n, k);
                for m in [1, 2, 3, 4, 5, 7, 64] {
                    for backend in Backend::available() {
                        check(&mut rng, &w, m, backend);
                    }
                }
            }
        }
    }
}

/// The NEON kernels, with and without `dotprod`, do the float operations of the portable
/// kernels in the same order on the same integers, so they equal [`Backend::Scalar`] bit for
/// bit: every type, weights quantized by candle and of arbitrary block bytes, odd weight row
/// counts, activation rows `m = 1..=9` (4-row groups and each remainder, and the `m >= 8`
/// tiled orders of `Q5_K` and `Q6_K`), 13, 64 and 65. (The x86 kernels keep eight float lanes
/// as ggml's AVX2 ones do; the other tests compare them with the references within a
/// tolerance.)
#[test]
fn neon_kernels_equal_the_portable_kernels_bit_for_bit() {
    let neon: Vec<Backend> = Backend::available()
        .into_iter()
        .filter(|b| matches!(b, Backend::Neon | Backend::NeonDotprod))
        .collect();
    if neon.is_empty() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(31);
    for dtype in TYPES {
        let k = if dtype.block_size() == 32 { 160 } else { 512 };
        for n in [1, 3, 17] {
            for arbitrary in [false, true] {
                let w = if arbitrary {
                    random_weight(&mut rng, dtype, n, k)
                } else {
                    quantized_weight(&mut rng, dtype, n, k)
                };
                for m in (1..=9).chain([13, 64, 65]) {
                    let x = rand_vec(&mut rng, m * k);
                    let mut want = vec![f32::NAN; m * n];
                    w.mat
                        .matmul_with(Backend::Scalar, &x, m, &mut want)
                        .unwrap();
                    for &backend in &neon {
                        let mut got = vec![f32::NAN; m * n];
                        w.mat.matmul_with(backend, &x, m, &mut got).unwrap();
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{dtype:?} {backend:?} arbitrary={arbitrary} n={n} m={m}: {got:?} vs \
                             {want:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn kernels_match_references_on_wide_matrices() {
    // Enough rows that decode (m = 1) and prefill (m = 64) split into several parallel tiles.
    let mut rng = StdRng::seed_from_u64(8);
    for (dtype, n, k) in [
        (GgufType::Q4_1, 577, 576),
        (GgufType::Q8_0, 400, 576),
        (GgufType::Q4_0, 130, 1536),
        (GgufType::Q5_0, 129, 640),
        (GgufType::Q4K, 130, 1536),
        (GgufType::Q5K, 129, 1280),
        (GgufType::Q6K, 131, 768),
        (GgufType::Iq4Nl, 129, 1056),
        (GgufType::Iq4Xs, 130, 1536),
    ] {
        let w = quantized_weight(&mut rng, dtype, n, k);
        for m in [1, 13] {
            for backend in Backend::available() {
                check(&mut rng, &w, m, backend);
            }
        }
    }
}

/// Random bytes with finite scales: bit patterns `QTensor::quantize` never writes (`Q8_0`
/// weights of -128, all 6-bit `Q4_K`/`Q5_K` scales and mins, negative `Q6_K` scales); for
/// `IQ4_NL` and `IQ4_XS` every code and (`IQ4_XS`) every 6-bit sub-block scale.
fn random_block_bytes(rng: &mut StdRng, dtype: GgufType, blocks: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..blocks * dtype.type_size())
        .map(|_| rng.random())
        .collect();
    let f16 = |rng: &mut StdRng| half::f16::from_f32(rng.random_range(-0.05..0.05)).to_le_bytes();
    for blk in bytes.chunks_exact_mut(dtype.type_size()) {
        let fields: &[usize] = match dtype {
            GgufType::Q4_0 | GgufType::Q5_0 | GgufType::Q8_0 => &[0],
            GgufType::Iq4Nl | GgufType::Iq4Xs => &[0],
            GgufType::Q4_1 | GgufType::Q4K | GgufType::Q5K => &[0, 2],
            GgufType::Q6K => &[208],
        };
        for &p in fields {
            blk[p..p + 2].copy_from_slice(&f16(rng));
        }
    }
    bytes
}

#[test]
fn kernels_match_references_on_arbitrary_block_bytes() {
    let mut rng = StdRng::seed_from_u64(9);
    for dtype in TYPES {
        let (n, k) = (9, 512);
        let Some(ggml) = dtype.to_ggml() else {
            // No candle decoder to compare with (see `random_weight`).
            let w = random_weight(&mut rng, dtype, n, k);
            for m in [1, 5] {
                for backend in Backend::available() {
                    check(&mut rng, &w, m, backend);
                }
            }
            continue;
        };
        let bytes = random_block_bytes(&mut rng, dtype, n * k / dtype.block_size());
        let storage =
            QStorage::from_data(std::borrow::Cow::Borrowed(&bytes[..]), &Device::Cpu, ggml)
                .unwrap();
        let q = QTensor::new(storage, (n, k)).unwrap();
        let w = weight_from_qtensor(&q);
        // Our decoder gives candle's values exactly.
        assert_eq!(w.mat.dequantize(), w.deq, "{dtype:?} dequantize");
        for m in [1, 5] {
            for backend in Backend::available() {
                check(&mut rng, &w, m, backend);
            }
        }
    }
}

#[test]
fn simd_activation_quantization_is_bit_identical() {
    let mut rng = StdRng::seed_from_u64(10);
    let mut x = rand_vec(&mut rng, 4 * 512);
    x[..32].fill(0.0); // an all-zero block
    for (i, v) in x[32..64].iter_mut().enumerate() {
        *v = i as f32 * 0.5 - 8.0; // ties at .5 steps
    }
    for backend in Backend::available() {
        for fmt in [
            ActFormat::Q8_32,
            ActFormat::Q8_32F,
            ActFormat::Q8_32Nib,
            ActFormat::Q8K,
        ] {
            let a = quantize_acts(backend, fmt, &x, 4, 512);
            let s = quantize_acts(Backend::Scalar, fmt, &x, 4, 512);
            assert_eq!(a, s, "{backend:?} {fmt:?}");
        }
    }
    // The formula: d = amax / 127 (here 1.0), q = x / d rounded half to even.
    let mut q = [0i8; 32];
    let mut xs = [0f32; 32];
    xs[..8].copy_from_slice(&[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -126.6]);
    let (d, id, sum) = quantize_block_scalar(&xs, &mut q);
    assert_eq!((d, id), (1.0, 1.0));
    assert_eq!(q[..8], [127, 0, 2, 2, 0, -2, -2, -127]);
    assert_eq!(sum, 127 + 2 + 2 - 2 - 2 - 127);
    let (d0, id0, s0) = quantize_block_scalar(&[0.0; 32], &mut q);
    assert_eq!((d0, id0, s0, q), (0.0, 0.0, 0, [0i8; 32]));
}

#[test]
fn rows_do_not_depend_on_batching_fusing_or_threads() {
    let mut rng = StdRng::seed_from_u64(11);
    let (k, m) = (576, 7);
    let q = quantized_weight(&mut rng, GgufType::Q4_1, 96, k).mat;
    let kk = quantized_weight(&mut rng, GgufType::Q8_0, 32, k).mat;
    let x = rand_vec(&mut rng, m * k);
    for backend in Backend::available() {
        let mut batched = vec![0f32; m * 96];
        q.matmul_with(backend, &x, m, &mut batched).unwrap();
        for r in 0..m {
            let mut one = vec![0f32; 96];
            q.matmul_with(backend, &x[r * k..(r + 1) * k], 1, &mut one)
                .unwrap();
            assert_eq!(one, batched[r * 96..(r + 1) * 96], "{backend:?} row {r}");
        }
        let (mut fq, mut fk) = (vec![0f32; m * 96], vec![0f32; m * 32]);
        matmul_fused_with(backend, &[&q, &kk], &x, m, &mut [&mut fq, &mut fk]).unwrap();
        let mut sk = vec![0f32; m * 32];
        kk.matmul_with(backend, &x, m, &mut sk).unwrap();
        assert_eq!((&fq, &fk), (&batched, &sk), "{backend:?} fused");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut serial = vec![0f32; m * 96];
        pool.install(|| q.matmul_with(backend, &x, m, &mut serial))
            .unwrap();
        assert_eq!(serial, batched, "{backend:?} one thread");
    }
}

#[test]
fn forward_and_embedding_match_candle() {
    let mut rng = StdRng::seed_from_u64(12);
    for dtype in [GgufType::Q8_0, GgufType::Q4_1, GgufType::Q5K, GgufType::Q6K] {
        let (n, k) = (40, 256);
        let w = quantized_weight(&mut rng, dtype, n, k);
        // embedding: exactly candle's dequantized rows.
        let ids = [3u32, 0, 39, 3];
        let e = w.mat.embedding(&ids).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert_eq!(
                e[i * k..(i + 1) * k],
                w.deq[id * k..(id + 1) * k],
                "{dtype:?}"
            );
        }
        // forward over a [2, 3, k] tensor equals the slice product.
        let x = rand_vec(&mut rng, 6 * k);
        let xt = Tensor::from_vec(x.clone(), (2, 3, k), &Device::Cpu).unwrap();
        let y = w.mat.forward(&xt).unwrap();
        assert_eq!(y.dims(), &[2, 3, n]);
        let mut want = vec![0f32; 6 * n];
        w.mat.matmul(&x, 6, &mut want).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        // and a non-contiguous input (a transposed view) gives the same as its copy.
        let xt2 = Tensor::from_vec(x.clone(), (k, 6), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        let y2 = w.mat.forward(&xt2).unwrap();
        let y3 = w.mat.forward(&xt2.contiguous().unwrap()).unwrap();
        assert_eq!(
            y2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y3.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let ys = forward_fused(&[&w.mat, &w.mat], &xt).unwrap();
        assert_eq!(ys.len(), 2);
        assert_eq!(ys[1].flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }
}

/// CPU ticks (utime + stime) used so far by this process's threads whose name starts with
/// `prefix` (Linux `/proc/self/task/*/stat`, fields 14 and 15).
#[cfg(target_os = "linux")]
fn thread_cpu_ticks(prefix: &str) -> (usize, u64) {
    let mut found = 0;
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
        let f: Vec<u64> = after
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // `after` starts at field 3 (state), so fields 14 and 15 are at 11 and 12.
        ticks += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        found += 1;
    }
    (found, ticks)
}

#[cfg(target_os = "linux")]
#[test]
fn idle_workers_do_not_spin() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .thread_name(|i| format!("kidle{i}"))
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(14);
    let w = quantized_weight(&mut rng, GgufType::Q4_1, 512, 576).mat;
    let x = rand_vec(&mut rng, 64 * 576);
    let mut out = vec![0f32; 64 * 512];
    for _ in 0..5 {
        pool.install(|| w.matmul(&x, 64, &mut out)).unwrap();
    }
    // `in_pool` keeps the other worker polling while its body runs: it must stop when the
    // body returns, before the measurement below.
    for _ in 0..5 {
        pool.install(|| in_pool(|| w.matmul(&x[..576], 1, &mut out[..512])))
            .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (n0, t0) = thread_cpu_ticks("kidle");
    std::thread::sleep(std::time::Duration::from_millis(600));
    let (n1, t1) = thread_cpu_ticks("kidle");
    assert_eq!((n0, n1), (2, 2));
    // A spinning worker would use ~60 ticks (at 100 Hz) in 600 ms; sleeping ones use none.
    assert!(
        t1 - t0 <= 3,
        "idle workers used {} CPU ticks in 600 ms",
        t1 - t0
    );
}

#[test]
fn in_pool_runs_on_a_worker_and_returns_the_result() {
    assert!(rayon::current_thread_index().is_none());
    let mut rng = StdRng::seed_from_u64(15);
    let w = quantized_weight(&mut rng, GgufType::Q4_1, 300, 576).mat;
    let x = rand_vec(&mut rng, 576);
    let mut outside = vec![0f32; 300];
    w.matmul(&x, 1, &mut outside).unwrap();
    let (on_worker, inside) = in_pool(|| {
        let mut o = vec![0f32; 300];
        w.matmul(&x, 1, &mut o).unwrap();
        (rayon::current_thread_index().is_some(), o)
    });
    assert!(on_worker);
    assert_eq!(inside, outside);
}

#[test]
fn empty_shapes_are_handled() {
    // k = 0: every output is an empty sum.
    let w = GgufMatrix::new("w", WeightBytes::owned(Vec::new()), GgufType::Q8_0, 2, 0).unwrap();
    let x = Tensor::zeros((3, 0), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = w.forward(&x).unwrap();
    assert_eq!(y.dims(), &[3, 2]);
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.0; 6]
    );
    // m = 0 and n = 0.
    let mut rng = StdRng::seed_from_u64(13);
    let w = quantized_weight(&mut rng, GgufType::Q4_1, 3, 64).mat;
    w.matmul(&[], 0, &mut []).unwrap();
    let x = Tensor::zeros((0, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(w.forward(&x).unwrap().dims(), &[0, 3]);
    let e = GgufMatrix::new("e", WeightBytes::owned(Vec::new()), GgufType::Q4K, 0, 256).unwrap();
    e.matmul(&[0.5; 256], 1, &mut []).unwrap();
    assert_eq!(e.embedding(&[]).unwrap(), Vec::<f32>::new());
}

#[test]
fn bad_input_gives_typed_errors_naming_the_tensor() {
    let bytes = vec![0u8; 2 * 18 * 3];
    // 2 rows × 96 cols of Q4_0 need 2 × 3 blocks of 18 bytes: one byte short.
    let e = GgufMatrix::new(
        "blk.0.attn_q.weight",
        WeightBytes::owned(bytes[1..].to_vec()),
        GgufType::Q4_0,
        2,
        96,
    )
    .unwrap_err();
    assert!(matches!(
        e,
        KernelError::ByteLength {
            expected: 108,
            got: 107,
            ..
        }
    ));
    assert!(e.to_string().contains("blk.0.attn_q.weight"), "{e}");
    let e = GgufMatrix::new(
        "w",
        WeightBytes::owned(bytes.clone()),
        GgufType::Q4_0,
        2,
        100,
    )
    .unwrap_err();
    assert!(
        matches!(e, KernelError::NotBlockAligned { cols: 100, .. }),
        "{e}"
    );
    let w = GgufMatrix::new("w", WeightBytes::owned(bytes), GgufType::Q4_0, 2, 96).unwrap();
    let mut out = vec![0f32; 2];
    let e = w.matmul(&[0.0; 95], 1, &mut out).unwrap_err();
    assert!(matches!(e, KernelError::ArgLength { arg: "x", .. }), "{e}");
    let e = w.matmul(&[0.0; 96], 1, &mut out[..1]).unwrap_err();
    assert!(
        matches!(e, KernelError::ArgLength { arg: "out", .. }),
        "{e}"
    );
    let e = w.embedding(&[2]).unwrap_err();
    assert!(
        matches!(e, KernelError::IdOutOfRange { id: 2, rows: 2, .. }),
        "{e}"
    );
    let x = Tensor::zeros((1, 95), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = w.forward(&x).unwrap_err();
    assert!(
        e.to_string().contains("`w`") && e.to_string().contains("95"),
        "{e}"
    );
    let x = Tensor::zeros((1, 96), candle_core::DType::F16, &Device::Cpu).unwrap();
    assert!(w.forward(&x).is_err());
    let other = GgufMatrix::new(
        "w2",
        WeightBytes::owned(vec![0u8; 34 * 2]),
        GgufType::Q8_0,
        1,
        64,
    )
    .unwrap();
    let e = matmul_fused(
        &[&w, &other],
        &[0.0; 96],
        1,
        &mut [&mut [0.0; 2], &mut [0.0; 1]],
    )
    .unwrap_err();
    assert!(e.to_string().contains("w2"), "{e}");
    let t = Tensor::zeros((4, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q2 = QTensor::quantize(&t, GgmlDType::Q2K).unwrap();
    let e = GgufMatrix::from_qtensor("w2k", &q2).unwrap_err();
    assert!(matches!(e, KernelError::UnsupportedType { .. }), "{e}");
    assert!(
        e.to_string().contains("w2k") && e.to_string().contains("Q5_K"),
        "{e}"
    );
    let q5 = QTensor::quantize(&t, GgmlDType::Q5_1).unwrap();
    let e = GgufMatrix::from_qtensor("w5", &q5).unwrap_err();
    assert!(matches!(e, KernelError::UnsupportedType { .. }), "{e}");
    let e: crate::Error = e.into();
    assert!(
        matches!(e, crate::Error::Tensor { ref name, .. } if name == "w5"),
        "{e}"
    );
}

/// The weight with its rows repacked in 16-row groups (whatever this CPU's kernels are).
fn packed_weight(w: &Weight) -> Weight {
    let mat = w.mat.clone().into_packed();
    assert!(mat.is_packed(), "{:?} {} rows", mat.dtype(), mat.rows());
    Weight {
        mat,
        deq: w.deq.clone(),
        off: w.off.clone(),
    }
}

#[test]
fn packed_kernels_match_references_over_shapes() {
    let mut rng = StdRng::seed_from_u64(21);
    for dtype in [GgufType::Q4_0, GgufType::Q4_1, GgufType::Q8_0] {
        for (n, k) in [(16, 32), (48, 576), (32, 1536), (400, 256)] {
            let w = packed_weight(&quantized_weight(&mut rng, dtype, n, k));
            for m in [1, 2, 3, 5, 13, 64] {
                for backend in Backend::available() {
                    check(&mut rng, &w, m, backend);
                }
            }
        }
    }
}

/// The packed SIMD `Q4_0`/`Q8_0` kernels equal the portable packed kernel bit for bit at every
/// activation row count around their blockings: 8 rows a pass (`m % 8` = 0..7 remainders),
/// prefill tiles of 64 rows (and the halved tiles of multi-threaded plans), and `k` long
/// enough for several weight groups' prefetch to run past a group.
#[test]
fn packed_simd_equals_packed_scalar_at_every_row_count() {
    let mut rng = StdRng::seed_from_u64(23);
    for dtype in [GgufType::Q4_0, GgufType::Q8_0] {
        for (n, k) in [(48, 256), (32, 4096)] {
            let bytes = random_block_bytes(&mut rng, dtype, n * k / 32);
            let plain = GgufMatrix::new("w", WeightBytes::owned(bytes), dtype, n, k).unwrap();
            let packed = plain.into_packed();
            for m in (1..=20).chain(60..=70) {
                let x = rand_vec(&mut rng, m * k);
                let mut want = vec![0f32; m * n];
                packed
                    .matmul_with(Backend::Scalar, &x, m, &mut want)
                    .unwrap();
                for backend in Backend::available() {
                    if !GgufMatrix::packs_on(backend) {
                        continue;
                    }
                    let mut got = vec![0f32; m * n];
                    packed.matmul_with(backend, &x, m, &mut got).unwrap();
                    assert_eq!(got, want, "{dtype:?} {backend:?} n {n} k {k} m {m}");
                }
            }
        }
    }
}

#[test]
fn packed_simd_equals_packed_scalar_bit_for_bit_and_unpacked_closely() {
    // The portable packed kernel does the SIMD one's float operations in the same order; the
    // unpacked kernels sum in another order, so they agree to rounding only.
    let mut rng = StdRng::seed_from_u64(22);
    for dtype in [GgufType::Q4_0, GgufType::Q4_1, GgufType::Q8_0] {
        let (n, k, m) = (64, 2048, 9);
        let bytes = random_block_bytes(&mut rng, dtype, n * k / 32);
        let plain = GgufMatrix::new("w", WeightBytes::owned(bytes), dtype, n, k).unwrap();
        let packed = plain.clone().into_packed();
        let x = rand_vec(&mut rng, m * k);
        let mut want = vec![0f32; m * n];
        packed
            .matmul_with(Backend::Scalar, &x, m, &mut want)
            .unwrap();
        for backend in Backend::available() {
            let mut got = vec![0f32; m * n];
            packed.matmul_with(backend, &x, m, &mut got).unwrap();
            if GgufMatrix::packs_on(backend) || backend == Backend::Scalar {
                assert_eq!(got, want, "{dtype:?} {backend:?}");
            }
            // The unpacked Q4_0 kernels take the `-8·Σy` offset from the f16-rounded block
            // sums (as ggml does); the packed ones from the exact integer sums.
            let mut unpacked = vec![0f32; m * n];
            plain.matmul_with(backend, &x, m, &mut unpacked).unwrap();
            let scale = unpacked.iter().fold(1f32, |a, v| a.max(v.abs()));
            for (a, b) in got.iter().zip(&unpacked) {
                assert!(
                    (a - b).abs() <= 2e-3 * scale,
                    "{dtype:?} {backend:?}: {a} vs {b}"
                );
            }
        }
        // Dequantized rows and embedding lookups are exactly those of the GGUF layout.
        assert_eq!(packed.dequantize(), plain.dequantize(), "{dtype:?}");
        let ids = [0u32, 17, 63, 5];
        assert_eq!(
            packed.embedding(&ids).unwrap(),
            plain.embedding(&ids).unwrap()
        );
    }
}

/// Packs random k-quant matrices of three shapes and checks that every backend's packed
/// product equals the portable unpacked product bit for bit for each row count of `ms`, and
/// that dequantized rows and embedding lookups are the unpacked ones; with `same_bytes`, also
/// that the packed layout is as long as GGUF's.
fn check_packed_bit_exact(dtype: GgufType, seed: u64, ms: &[usize], same_bytes: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (n, k) in [(16, 256), (48, 512), (32, 2048)] {
        let bytes = random_block_bytes(&mut rng, dtype, n * k / 256);
        let plain = GgufMatrix::new("w", WeightBytes::owned(bytes), dtype, n, k).unwrap();
        let packed = plain.clone().into_packed();
        assert!(packed.is_packed());
        if same_bytes {
            assert_eq!(packed.bytes().len(), plain.bytes().len());
        }
        for &m in ms {
            let x = rand_vec(&mut rng, m * k);
            let mut want = vec![0f32; m * n];
            plain
                .matmul_with(Backend::Scalar, &x, m, &mut want)
                .unwrap();
            for backend in Backend::available() {
                let mut got = vec![0f32; m * n];
                packed.matmul_with(backend, &x, m, &mut got).unwrap();
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?} {n}x{k} m={m} {backend:?}");
            }
        }
        assert_eq!(packed.dequantize(), plain.dequantize());
        let ids = [0u32, 15, n as u32 / 2, n as u32 - 1];
        assert_eq!(
            packed.embedding(&ids).unwrap(),
            plain.embedding(&ids).unwrap()
        );
    }
}

#[test]
fn packed_q4k_equals_unpacked_q4k_bit_for_bit() {
    // The packed Q4_K kernels compute the unpacked kernels' integers and apply them with the
    // same fused multiply-adds in the same order, GEMM rows (groups of 4) and GEMV rows alike.
    check_packed_bit_exact(GgufType::Q4K, 24, &[1, 2, 3, 4, 5, 7, 9, 13, 64, 70], false);
}

#[test]
fn packed_q5k_equals_unpacked_q5k_bit_for_bit() {
    // The packed Q5_K kernels compute the unpacked kernels' integers and apply them with the
    // portable kernel's float operations (ggml's tiled order for 8+ rows), on every backend.
    check_packed_bit_exact(
        GgufType::Q5K,
        27,
        &[1, 2, 3, 4, 5, 7, 8, 9, 13, 64, 70],
        false,
    );
}

#[test]
fn q5k_x86_kernels_sum_in_ggml_vec_dot_order() {
    // Below 8 activation rows the unpacked x86 Q5_K kernels do the float operations of ggml's
    // AVX2 `ggml_vec_dot_q5_K_q8_K` (llama.cpp repacks Q5_K only on aarch64): eight f32 lanes,
    // lane `l` taking `fma(d·dy, Σ_s sc_s·Σ q·y over values 32s + 4l..32s + 4l + 4, acc_l)` per
    // super-block, then `hsum_float_8`, then the minimums' chain `fma(dmin·dy, msum, accm)`.
    let mut rng = StdRng::seed_from_u64(28);
    let (n, k) = (5, 1024);
    let nb = k / 256;
    let bytes = random_block_bytes(&mut rng, GgufType::Q5K, n * nb);
    let w = GgufMatrix::new("w", WeightBytes::owned(bytes.clone()), GgufType::Q5K, n, k).unwrap();
    for m in [1, 3, 7] {
        let x = rand_vec(&mut rng, m * k);
        let a = quantize_acts(Backend::Scalar, ActFormat::Q8K, &x, m, k);
        let mut want = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let (mut acc, mut accm) = ([0f32; 8], 0f32);
                for (b, blk) in bytes[j * nb * 176..(j + 1) * nb * 176]
                    .chunks_exact(176)
                    .enumerate()
                {
                    let q = scalar::q5k_codes(blk);
                    let y = &a.qs[r * k + 256 * b..][..256];
                    let bs = &a.bsums[r * (k / 16) + 16 * b..][..16];
                    let dy = a.d[r * nb + b];
                    let (d, dmin) = (scalar::f16_at(blk, 0), scalar::f16_at(blk, 2));
                    let (mut lanes, mut msum) = ([0i32; 8], 0i32);
                    for s in 0..8 {
                        let (sc, mn) = scalar::scale_min_k4(s, &blk[4..16]);
                        for t in 0..32 {
                            lanes[t / 4] += sc as i32 * q[32 * s + t] as i32 * y[32 * s + t] as i32;
                        }
                        msum += mn as i32 * (bs[2 * s] as i32 + bs[2 * s + 1] as i32);
                    }
                    for l in 0..8 {
                        acc[l] = (d * dy).mul_add(lanes[l] as f32, acc[l]);
                    }
                    accm = (msum as f32).mul_add(dmin * dy, accm);
                }
                let h = ((acc[4] + acc[0]) + (acc[6] + acc[2]))
                    + ((acc[5] + acc[1]) + (acc[7] + acc[3]));
                want[r * n + j] = h - accm;
            }
        }
        for backend in Backend::available().into_iter().filter(|b| X86.contains(b)) {
            let mut got = vec![0f32; m * n];
            w.matmul_with(backend, &x, m, &mut got).unwrap();
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "m={m} {backend:?}: {got:?} vs {want:?}");
        }
    }
}

#[test]
fn packed_q6k_equals_the_portable_unpacked_q6k_bit_for_bit() {
    // The packed Q6_K kernels compute the unpacked kernels' integers and apply them with the
    // portable kernel's float operations (ggml's tiled order for 8+ rows), on every backend.
    check_packed_bit_exact(GgufType::Q6K, 25, &[1, 2, 3, 5, 7, 8, 9, 13, 64, 70], true);
}

#[test]
fn packing_keeps_shapes_it_cannot_pack_unchanged() {
    let mut rng = StdRng::seed_from_u64(23);
    // 33 and 40 rows are not whole numbers of groups; Q5_0 has no packed layout.
    for (dtype, n) in [
        (GgufType::Q4_0, 33),
        (GgufType::Iq4Nl, 40),
        (GgufType::Iq4Xs, 33),
        (GgufType::Q5_0, 32),
    ] {
        let w = quantized_weight(&mut rng, dtype, n, 256);
        assert!(!w.mat.clone().into_packed().is_packed(), "{dtype:?} {n}");
    }
}

/// The packed `IQ4_NL` / `IQ4_XS` products against the exact product of the dequantized weight
/// and quantized activations, and against the plain f32 product, within [`check`]'s bounds
/// (`(k/32 + 16)·ε_f32·Σ|w·x|` for the float summation; plus the activations' quantization
/// error `Σ|w|·d_x·(1/2 + 127·2^-11)` against f32).
#[test]
fn packed_iq4_kernels_match_references() {
    let mut rng = StdRng::seed_from_u64(27);
    for dtype in [GgufType::Iq4Nl, GgufType::Iq4Xs] {
        for (n, k) in [(16, 256), (48, 1024)] {
            let w = packed_weight(&quantized_weight(&mut rng, dtype, n, k));
            for m in [1, 3, 13] {
                for backend in Backend::available() {
                    check(&mut rng, &w, m, backend);
                }
            }
        }
    }
}

/// The packed `IQ4_NL` / `IQ4_XS` / `Q4_1` kernels equal their portable twin
/// ([`packed::tile_fn`]) bit for bit on every backend that runs them, for activation rows
/// `m = 1..=20` and `64..=66` (the passes of 8 rows and their remainders, prefill tiles) on shapes of one and three
/// groups, and at `k = 4096` (block chunks of more than 8 rows, prefetch past a group) for a
/// few row counts; with the unpacked kernels (another
/// float order) they agree to `2e-5` of the largest output (the naive references and their
/// bounds are [`check`]'s, in `packed_iq4_kernels_match_references`). Row counts that
/// are not whole 16-row groups stay in GGUF's layout
/// (`packing_keeps_shapes_it_cannot_pack_unchanged`) and go through the unpacked kernels,
/// checked here against the packed part of the same matrix. The portable twin sums each row
/// alone, so the rows of every product are the bits each row gets alone (`m = 1`): a batch of
/// sequences decodes as each sequence alone.
#[test]
fn packed_kernels_equal_the_portable_twin_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(26);
    for dtype in [GgufType::Iq4Nl, GgufType::Iq4Xs, GgufType::Q4_1] {
        for (n, k) in [(16, 256), (48, 512), (16, 4096)] {
            let ms: Vec<usize> = if k > 512 {
                vec![1, 9, 20, 65]
            } else {
                (1..=20).chain(64..=66).collect()
            };
            let bytes = random_block_bytes(&mut rng, dtype, n * k / dtype.block_size());
            let plain = GgufMatrix::new("w", WeightBytes::owned(bytes), dtype, n, k).unwrap();
            let packed = plain.clone().into_packed();
            assert!(packed.is_packed());
            // The first `n - 9` rows alone (7, 39, 7): not whole groups, so not packed.
            let tail_rows = n - 9;
            let tail_bytes = plain.bytes()[..tail_rows * plain.row_bytes()].to_vec();
            let tail = GgufMatrix::new("t", WeightBytes::owned(tail_bytes), dtype, tail_rows, k)
                .unwrap()
                .into_packed();
            assert!(!tail.is_packed());
            for m in ms {
                let x = rand_vec(&mut rng, m * k);
                let mut want = vec![0f32; m * n];
                packed
                    .matmul_with(Backend::Scalar, &x, m, &mut want)
                    .unwrap();
                let mut unpacked = vec![0f32; m * n];
                plain
                    .matmul_with(Backend::Scalar, &x, m, &mut unpacked)
                    .unwrap();
                let scale = unpacked.iter().fold(1f32, |a, v| a.max(v.abs()));
                for backend in Backend::available() {
                    let mut got = vec![0f32; m * n];
                    packed.matmul_with(backend, &x, m, &mut got).unwrap();
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dtype:?} {backend:?} n {n} k {k} m {m}");
                    for (a, b) in got.iter().zip(&unpacked) {
                        assert!(
                            (a - b).abs() <= 2e-5 * scale,
                            "{dtype:?} {backend:?} m {m}: {a} vs unpacked {b}"
                        );
                    }
                    let mut t = vec![0f32; m * tail_rows];
                    tail.matmul_with(backend, &x, m, &mut t).unwrap();
                    for r in 0..m {
                        for (j, v) in t[r * tail_rows..][..tail_rows].iter().enumerate() {
                            let u = unpacked[r * n + j];
                            assert!((v - u).abs() <= 2e-5 * scale, "{dtype:?} tail {v} vs {u}");
                        }
                    }
                }
            }
            assert_eq!(packed.dequantize(), plain.dequantize(), "{dtype:?}");
            let ids = [0u32, 15, n as u32 / 2, n as u32 - 1];
            assert_eq!(
                packed.embedding(&ids).unwrap(),
                plain.embedding(&ids).unwrap()
            );
        }
    }
}

#[test]
fn packed_keeping_order_equals_the_unpacked_x86_kernels_bit_for_bit() {
    // `repacked_keeping_order`'s `Q8_0` kernel sums in ggml's `vec_dot_q8_0_q8_0` order (8
    // lanes of 4 values, then `hsum_float_8`), as the unpacked x86 kernels do, for every row
    // count around its pairs of activation rows and the planner's tiles (m = 1..20, 60..70),
    // on shapes that are not multiples of the planner's row split or of 8 blocks; the portable
    // packed kernel (any backend without the AVX-512 kernels) gives the same bits. The tied
    // `Q8_0` output layer of the default model stays bit for bit with llama.cpp through it.
    let mut rng = StdRng::seed_from_u64(26);
    let Some(reference) = Backend::available().into_iter().find(|b| X86.contains(b)) else {
        return;
    };
    for dtype in [GgufType::Q8_0, GgufType::Q4_1] {
        for (n, k) in [(16, 32), (48, 576), (400, 96), (208, 1504)] {
            let bytes = random_block_bytes(&mut rng, dtype, n * k / 32);
            let plain = GgufMatrix::new("w", WeightBytes::owned(bytes), dtype, n, k).unwrap();
            let packed = plain.clone().into_packed_keeping_order();
            assert!(packed.is_packed() && packed.vec_dot_order, "{dtype:?}");
            assert_eq!(packed.bytes().len(), plain.bytes().len());
            assert_eq!(packed.dequantize(), plain.dequantize(), "{dtype:?}");
            let ms: Vec<usize> = if n * k > 100_000 {
                vec![1, 2, 3, 16, 17, 61]
            } else {
                (1..=20).chain(60..=70).collect()
            };
            for m in ms {
                let x = rand_vec(&mut rng, m * k);
                let mut want = vec![0f32; m * n];
                plain.matmul_with(reference, &x, m, &mut want).unwrap();
                for backend in Backend::available() {
                    let mut got = vec![0f32; m * n];
                    packed.matmul_with(backend, &x, m, &mut got).unwrap();
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dtype:?} {n}x{k} m={m} {backend:?}");
                    if X86.contains(&backend) {
                        let mut unpacked = vec![0f32; m * n];
                        plain.matmul_with(backend, &x, m, &mut unpacked).unwrap();
                        assert_eq!(unpacked, want, "{dtype:?} {n}x{k} m={m} {backend:?}");
                    }
                }
            }
        }
    }
    // Types without such a kernel stay in the file's layout.
    let w = quantized_weight(&mut rng, GgufType::Q4_0, 32, 64);
    assert!(!w.mat.clone().into_packed_keeping_order().is_packed());
}
