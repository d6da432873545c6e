//! MLX affine kernels against naive references: every backend this CPU runs, bits 2-6 and 8,
//! group sizes 32/64/128, parameters in f32/f16/bf16, many shapes (including row counts that
//! exercise the 4-row blocking and its remainders, and products large enough to be split over
//! threads).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::mlx::{matmul_fused_with, matmul_with};
use super::{quantize_acts, ActFormat, Backend};
use crate::quant::mlx_affine::{AffineQuantized, GroupParams, ParamDtype};

const PARAMS: [ParamDtype; 3] = [ParamDtype::F32, ParamDtype::F16, ParamDtype::BF16];

/// Every width MLX quantizes to.
const BITS: [usize; 6] = [2, 3, 4, 5, 6, 8];

fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A weight `[n, k]`: quantized from random values, or (`arbitrary`) random words and
/// parameters, so that every code appears, extremes included.
fn weight(
    rng: &mut StdRng,
    n: usize,
    k: usize,
    gs: usize,
    bits: usize,
    dtype: ParamDtype,
    arbitrary: bool,
) -> AffineQuantized {
    if arbitrary {
        let words = (0..n * k * bits / 32)
            .map(|_| rng.random::<u32>())
            .collect();
        let groups = n * k / gs;
        let scales = GroupParams::from_f32(dtype, &rand_vec(rng, groups, 0.02));
        let biases = GroupParams::from_f32(dtype, &rand_vec(rng, groups, 0.5));
        AffineQuantized::from_parts(words, scales, biases, n, k, gs, bits).unwrap()
    } else {
        let w = rand_vec(rng, n * k, 1.0);
        AffineQuantized::quantize(&w, n, k, gs, bits, dtype).unwrap()
    }
}

/// The activation format of the kernels for `bits`, unpermuted.
fn act_format(bits: usize) -> ActFormat {
    if bits == 4 {
        ActFormat::Q8_32
    } else {
        ActFormat::Q8_32F
    }
}

/// Code `c` of row `r` (MLX packing: a little-endian bit stream, low bits first; codes of 3,
/// 5 and 6 bits may straddle two words).
fn code(q: &AffineQuantized, r: usize, c: usize) -> i64 {
    let bit = c * q.bits();
    let row = &q.weight()[r * q.packed_cols()..(r + 1) * q.packed_cols()];
    let lo = u64::from(row[bit / 32]);
    let hi = row.get(bit / 32 + 1).map_or(0, |&w| u64::from(w));
    (((hi << 32 | lo) >> (bit % 32)) & ((1 << q.bits()) - 1)) as i64
}

/// The kernels' integers and scales, summed in f64 one term at a time (activations from the
/// scalar quantizer, which the SIMD ones equal byte for byte: `Q8_32`, i.e. `Q8_32Nib`
/// unpermuted, for 4 bits and `Q8_32F` for 8), and the sum of the
/// magnitudes of the terms the kernels may form, for the tolerance (for 8 bits that includes
/// `128·scale·s`, which the `q - 128` paths add and subtract).
fn naive(q: &AffineQuantized, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let (n, k, gs) = (q.rows(), q.cols(), q.group_size());
    let acts = quantize_acts(Backend::Scalar, act_format(q.bits()), x, m, k);
    let (scales, biases) = (q.scales().to_f32_vec(), q.biases().to_f32_vec());
    let nb = k / 32;
    let mut y = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for b in 0..nb {
                let g = j * (k / gs) + 32 * b / gs;
                let sumi: i64 = (0..32)
                    .map(|c| code(q, j, 32 * b + c) * i64::from(acts.qs[i * k + 32 * b + c]))
                    .sum();
                let t1 = scales[g] as f64 * acts.d[i * nb + b] as f64 * sumi as f64;
                let t2 = biases[g] as f64 * acts.s[i * nb + b] as f64;
                y[i * n + j] += t1 + t2;
                let t3 = if q.bits() == 8 {
                    128.0 * (scales[g] as f64 * acts.s[i * nb + b] as f64).abs()
                } else {
                    0.0
                };
                mag[i * n + j] += t1.abs() + t2.abs() + t3;
            }
        }
    }
    (y, mag)
}

fn check(rng: &mut StdRng, q: &AffineQuantized, m: usize, backend: Backend) {
    let (n, k) = (q.rows(), q.cols());
    let x = rand_vec(rng, m * k, 2.0);
    let mut got = vec![f32::NAN; m * n];
    matmul_with(backend, q, &x, m, &mut got).unwrap();
    let (want, mag) = naive(q, &x, m);
    for (idx, ((&g, &w), &a)) in got.iter().zip(&want).zip(&mag).enumerate() {
        // f32 accumulation over k / 32 blocks, a few roundings each.
        let tol = 4.0 * (k as f64 / 32.0 + 4.0) * f32::EPSILON as f64 * a + 1e-30;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{backend:?} bits {} gs {} {:?} n {n} k {k} m {m} out {idx}: {g} vs {w} (tol {tol})",
            q.bits(),
            q.group_size(),
            q.dtype()
        );
    }
}

#[test]
fn mlx_kernels_match_naive_over_shapes() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut cases = 0;
    for backend in Backend::available() {
        for bits in BITS {
            for gs in [32, 64, 128] {
                for (pi, dtype) in PARAMS.into_iter().enumerate() {
                    for (si, (n, groups, m)) in [(1, 1, 1), (3, 2, 5), (17, 3, 4), (9, 4, 11)]
                        .into_iter()
                        .enumerate()
                    {
                        let q = weight(
                            &mut rng,
                            n,
                            gs * groups,
                            gs,
                            bits,
                            dtype,
                            (si + pi) % 2 == 1,
                        );
                        check(&mut rng, &q, m, backend);
                        cases += 1;
                    }
                }
            }
        }
    }
    assert!(cases >= 216);
}

#[test]
fn mlx_kernels_match_naive_on_model_shapes_and_threads() {
    // Large enough to be split over threads, in decode (m = 1) and prefill (m = 70) tiling.
    let mut rng = StdRng::seed_from_u64(11);
    for backend in Backend::available() {
        for (bits, gs, dtype) in [
            (4, 64, ParamDtype::F16),
            (4, 32, ParamDtype::F32),
            (8, 64, ParamDtype::BF16),
            (8, 128, ParamDtype::F16),
            (2, 64, ParamDtype::F16),
            (3, 64, ParamDtype::BF16),
            (5, 32, ParamDtype::F16),
            (6, 128, ParamDtype::F32),
        ] {
            let q = weight(&mut rng, 640, 640, gs, bits, dtype, false);
            for m in [1, 70] {
                check(&mut rng, &q, m, backend);
            }
        }
    }
}

#[test]
fn extreme_codes_and_activations_do_not_saturate() {
    // All codes at their maximum against activations that all quantize to ±127: each
    // `vpmaddubsw` pair would be 2·255·127 > i16::MAX without the `q - 128` path.
    for bits in BITS {
        let (n, k, gs) = (3, 128, 32);
        let words = vec![u32::MAX; n * k * bits / 32];
        let ones = GroupParams::from_f32(ParamDtype::F32, &vec![1.0; n * k / gs]);
        let zeros = GroupParams::from_f32(ParamDtype::F32, &vec![0.0; n * k / gs]);
        let q = AffineQuantized::from_parts(words, ones, zeros, n, k, gs, bits).unwrap();
        let max = ((1u32 << bits) - 1) as f32;
        for sign in [1.0f32, -1.0] {
            let x = vec![sign; k];
            for backend in Backend::available() {
                let mut y = vec![0f32; n];
                matmul_with(backend, &q, &x, 1, &mut y).unwrap();
                for v in y {
                    // Only the (f16, for 4 bits) rounding of dy = 1 / 127: saturation would
                    // be off by a third or more.
                    let want = sign * max * k as f32;
                    assert!(
                        (v - want).abs() <= 1e-3 * want.abs(),
                        "{backend:?} bits {bits}: {v}"
                    );
                }
            }
        }
    }
}

#[test]
fn error_vs_f32_product_is_the_activation_rounding() {
    // The bound of the module docs, computed from the quantized activations.
    let mut rng = StdRng::seed_from_u64(3);
    let (n, k, m) = (24, 384, 3);
    for bits in BITS {
        for gs in [32, 64, 128] {
            let q = weight(&mut rng, n, k, gs, bits, ParamDtype::F16, false);
            let x = rand_vec(&mut rng, m * k, 3.0);
            let exact = q.matmul(&x, m).unwrap();
            let mut got = vec![0f32; m * n];
            matmul_with(Backend::detect(), &q, &x, m, &mut got).unwrap();
            let w = q.dequantize();
            let acts = quantize_acts(Backend::Scalar, act_format(bits), &x, m, k);
            let biases = q.biases().to_f32_vec();
            let nb = k / 32;
            let mut worst = 0f64;
            for i in 0..m {
                for j in 0..n {
                    let mut bound = 0f64;
                    let mut mag = 0f64;
                    for b in 0..nb {
                        let xb = &x[i * k + 32 * b..][..32];
                        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                        let dy = amax / 127.0;
                        let wsum: f64 = (0..32).map(|c| (w[j * k + 32 * b + c] as f64).abs()).sum();
                        bound += dy / 2.0 * wsum;
                        if bits == 4 {
                            // ggml's f16 rounding of dy (<= 2^-11·dy per unit of q·y, |qy| <=
                            // 127) and of s (<= 2^-11·|s|, through the bias).
                            let bias = biases[j * (k / gs) + 32 * b / gs] as f64;
                            let s = acts.s[i * nb + b].abs() as f64;
                            bound += dy * 127.0 / 2048.0 * wsum + bias.abs() * s / 2048.0;
                        }
                        mag += (0..32)
                            .map(|c| (w[j * k + 32 * b + c] as f64 * xb[c] as f64).abs())
                            .sum::<f64>();
                    }
                    bound += 1e-5 * mag;
                    let err = (got[i * n + j] as f64 - exact[i * n + j] as f64).abs();
                    assert!(
                        err <= bound,
                        "bits {bits} gs {gs}: error {err} > bound {bound}"
                    );
                    worst = worst.max(err / bound);
                }
            }
            eprintln!("bits {bits} gs {gs}: largest error / bound = {worst:.3}");
            assert!(worst > 0.0);
        }
    }
}

/// The NEON MLX kernels sum the same integers with `dotprod` as without and do the same float
/// operations, so the two agree bit for bit; those of 2 to 6 bits also do the portable
/// kernel's float operations in its order, so they equal [`Backend::Scalar`] bit for bit (the
/// 8-bit one folds `128·scale` into the bias, see `mlx_kernels_match_naive_over_shapes`).
#[test]
fn neon_mlx_kernels_are_bit_exact() {
    if !Backend::Neon.is_available() {
        return;
    }
    let dotprod = Backend::NeonDotprod.is_available();
    let mut rng = StdRng::seed_from_u64(13);
    for bits in BITS {
        for (gs, dtype) in [
            (32, ParamDtype::F16),
            (64, ParamDtype::BF16),
            (128, ParamDtype::F32),
        ] {
            for (n, arbitrary) in [(5, false), (3, true)] {
                let k = 256;
                let q = weight(&mut rng, n, k, gs, bits, dtype, arbitrary);
                for m in (1..=9).chain([64, 65]) {
                    let x = rand_vec(&mut rng, m * k, 2.0);
                    let run = |backend| {
                        let mut y = vec![f32::NAN; m * n];
                        matmul_with(backend, &q, &x, m, &mut y).unwrap();
                        y.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
                    };
                    let neon = run(Backend::Neon);
                    let what = format!("bits {bits} gs {gs} {dtype:?} n {n} m {m}");
                    if bits != 8 {
                        assert_eq!(neon, run(Backend::Scalar), "Neon vs Scalar, {what}");
                    }
                    if dotprod {
                        assert_eq!(
                            neon,
                            run(Backend::NeonDotprod),
                            "NeonDotprod vs Neon, {what}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rows_do_not_depend_on_batching_or_fusing() {
    let mut rng = StdRng::seed_from_u64(5);
    let (k, m) = (256, 7);
    let a = weight(&mut rng, 40, k, 64, 4, ParamDtype::F16, false);
    let b = weight(&mut rng, 24, k, 32, 8, ParamDtype::F32, false);
    let x = rand_vec(&mut rng, m * k, 1.0);
    for backend in Backend::available() {
        let mut ya = vec![0f32; m * 40];
        let mut yb = vec![0f32; m * 24];
        matmul_fused_with(backend, &[&a, &b], &x, m, &mut [&mut ya, &mut yb]).unwrap();
        for i in 0..m {
            let mut ra = vec![0f32; 40];
            matmul_with(backend, &a, &x[i * k..(i + 1) * k], 1, &mut ra).unwrap();
            assert_eq!(ra, ya[i * 40..(i + 1) * 40], "{backend:?} row {i}");
            let mut rb = vec![0f32; 24];
            matmul_with(backend, &b, &x[i * k..(i + 1) * k], 1, &mut rb).unwrap();
            assert_eq!(rb, yb[i * 24..(i + 1) * 24], "{backend:?} row {i}");
        }
    }
}

#[test]
fn bad_lengths_are_errors() {
    let mut rng = StdRng::seed_from_u64(9);
    for bits in BITS {
        let q = weight(&mut rng, 2, 64, 64, bits, ParamDtype::F32, false);
        assert!(super::mlx::supports(&q));
    }
    let mut y = vec![0f32; 2];
    let q4 = weight(&mut rng, 2, 64, 64, 4, ParamDtype::F32, false);
    assert!(matmul_with(Backend::Scalar, &q4, &[0.0; 63], 1, &mut y).is_err());
    assert!(matmul_with(Backend::Scalar, &q4, &[0.0; 64], 1, &mut y[..1]).is_err());
}

/// A packed product on `backend` (the AVX-512 kernel on `Avx512Vnni`, else the portable twin).
fn packed_matmul(backend: Backend, p: &super::PackedMlx, x: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * p.rows()];
    super::run_products(backend, &[p.mat_ref()], x, m, &mut [&mut out]).unwrap();
    out
}

#[test]
fn packed_mlx_round_trips_and_matches_naive() {
    let mut rng = StdRng::seed_from_u64(23);
    for (bits, gs) in [32, 64, 128].into_iter().map(|gs| (4, gs)).chain([
        (2, 64),
        (3, 32),
        (5, 128),
        (6, 64),
        (3, 128),
        (6, 32),
    ]) {
        for (pi, dtype) in PARAMS.into_iter().enumerate() {
            for (si, (n, groups)) in [(16, 1), (48, 3), (32, 2)].into_iter().enumerate() {
                let k = gs * groups;
                let q = weight(&mut rng, n, k, gs, bits, dtype, (si + pi) % 2 == 1);
                let p = super::PackedMlx::pack(&q).expect("2-6 bits, rows % 16 == 0");
                assert_eq!(p.unpack(), q, "bits {bits} gs {gs} {dtype:?} n {n}");
                assert_eq!(p.dequantize(), q.dequantize());
                let (n, k) = (q.rows(), q.cols());
                for m in [1, 2, 3, 4, 7, 8, 9, 12, 15, 16, 17, 23, 64, 65, 70] {
                    let x = rand_vec(&mut rng, m * k, 2.0);
                    let (want, mag) = naive(&q, &x, m);
                    let reference = packed_matmul(Backend::Scalar, &p, &x, m);
                    for backend in Backend::available() {
                        let got = packed_matmul(backend, &p, &x, m);
                        // Every backend runs the packed twin or the AVX-512 kernel, which
                        // perform the same float operations: bit for bit equal.
                        assert_eq!(
                            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{backend:?} bits {bits} gs {gs} {dtype:?} n {n} k {k} m {m}"
                        );
                    }
                    for (idx, ((&g, &w), &a)) in reference.iter().zip(&want).zip(&mag).enumerate() {
                        let tol = 4.0 * (k as f64 / 32.0 + 4.0) * f32::EPSILON as f64 * a + 1e-30;
                        assert!(
                            (g as f64 - w).abs() <= tol,
                            "bits {bits} gs {gs} {dtype:?} n {n} k {k} m {m} out {idx}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn packed_mlx_on_model_shapes_and_threads_matches_unpacked() {
    // Split over threads in decode (m = 1) and prefill (m = 70) tiling; the packed and unpacked
    // kernels share the integers and differ only in float summation order.
    let mut rng = StdRng::seed_from_u64(29);
    for (bits, dtype) in PARAMS.into_iter().map(|d| (4, d)).chain([
        (2, ParamDtype::F16),
        (3, ParamDtype::BF16),
        (5, ParamDtype::F32),
        (6, ParamDtype::F16),
    ]) {
        let q = weight(&mut rng, 640, 1024, 64, bits, dtype, false);
        let p = super::PackedMlx::pack(&q).unwrap();
        for m in [1, 70] {
            let x = rand_vec(&mut rng, m * 1024, 2.0);
            let (want, mag) = naive(&q, &x, m);
            for backend in Backend::available() {
                let got = packed_matmul(backend, &p, &x, m);
                for (idx, ((&g, &w), &a)) in got.iter().zip(&want).zip(&mag).enumerate() {
                    let tol = 4.0 * (1024.0 / 32.0 + 4.0) * f32::EPSILON as f64 * a + 1e-30;
                    assert!(
                        (g as f64 - w).abs() <= tol,
                        "{backend:?} bits {bits} m {m} out {idx}"
                    );
                }
            }
        }
    }
}

#[test]
fn packing_takes_2_to_6_bits_in_whole_row_groups() {
    let mut rng = StdRng::seed_from_u64(31);
    let q8 = weight(&mut rng, 16, 64, 64, 8, ParamDtype::F16, false);
    assert!(super::PackedMlx::pack(&q8).is_none());
    for bits in [2, 3, 4, 5, 6] {
        let q = weight(&mut rng, 24, 64, 64, bits, ParamDtype::F16, false);
        assert!(super::PackedMlx::pack(&q).is_none());
        let q = weight(&mut rng, 32, 64, 64, bits, ParamDtype::F16, false);
        assert_eq!(super::PackedMlx::pack(&q).map(|p| p.bits()), Some(bits));
    }
}
