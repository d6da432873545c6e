//! MLX affine quantization against Python `mlx` (golden files from
//! `scripts/golden/mlx_quant.py`, mlx 0.32.4 on CPU).
//!
//! - `quantize` must equal `mx.quantize` bit for bit: packed words, scales, biases.
//! - `dequantize` must equal `mx.dequantize` bit for bit (MLX computes in the dtype of the
//!   scales; we round each operation the same way).
//! - `quantized_matmul` (f32 `x`) must be within float tolerance of `mx.quantized_matmul`:
//!   `|y - y_mlx| <= 2 * k * 2^-24 * Σ_l |x_l w_l|` (k = 256). Both compute the same f32
//!   products `x_l * (scale * q_l + bias)`; MLX sums them sequentially, we with eight partial
//!   sums, and each summation order is within `k * 2^-24 * Σ|x_l w_l|` of the exact sum.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use pocketlm::quant::mlx_affine::{
    dequantize_tensor, quantize, quantize_tensor, quantized_matmul, AffineQuantized, ParamDtype,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn load(name: &str) -> Res<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/mlx_quant")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| format!("{}: {e} (run scripts/golden/mlx_quant.py)", path.display()).into())
}

fn get<'a>(t: &'a HashMap<String, Tensor>, key: &str) -> Res<&'a Tensor> {
    t.get(key)
        .ok_or_else(|| format!("golden file has no tensor `{key}`").into())
}

fn f32s(t: &Tensor) -> Res<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Bit patterns of a float tensor in its own dtype (exact comparison, -0.0 != 0.0).
fn bits(t: &Tensor) -> Res<Vec<u32>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .map(|v| u32::from(v.to_bits()))
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|v| u32::from(v.to_bits()))
            .collect(),
        other => return Err(format!("unexpected dtype {other:?}").into()),
    })
}

/// Index and values of the first difference, for a readable failure.
fn first_diff<T: PartialEq + Copy + std::fmt::Debug>(a: &[T], b: &[T]) -> Option<(usize, T, T)> {
    if a.len() != b.len() {
        panic!("length {} != {}", a.len(), b.len());
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .map(|i| (i, a[i], b[i]))
}

/// Runs every check on one golden file; returns the number of (bits, group_size) cases.
fn check_file(name: &str, dtype: ParamDtype, bits_list: &[usize]) -> Res<usize> {
    let t = load(name)?;
    let w_t = get(&t, "w")?;
    assert_eq!(w_t.dtype(), dtype.to_candle(), "{name}: dtype of `w`");
    let (rows, cols) = w_t.dims2()?;
    let w = f32s(w_t)?;
    let x_t = get(&t, "x")?;
    let (m, k) = x_t.dims2()?;
    assert_eq!(k, cols);
    let x = f32s(x_t)?;
    let mut cases = 0;
    for &b in bits_list {
        for gs in [32usize, 64, 128] {
            let case = format!("{name} bits {b} group_size {gs}");
            let p = format!("b{b}_g{gs}.");
            let g_weight = get(&t, &(p.clone() + "weight"))?;
            let g_scales = get(&t, &(p.clone() + "scales"))?;
            let g_biases = get(&t, &(p.clone() + "biases"))?;
            let g_deq = get(&t, &(p.clone() + "dequantized"))?;
            let g_mm = get(&t, &(p.clone() + "matmul"))?;
            let g_words = g_weight.flatten_all()?.to_vec1::<u32>()?;

            // quantize, slice API
            let q = quantize(&w, rows, cols, gs, b, dtype)?;
            assert_eq!(
                first_diff(q.weight(), &g_words),
                None,
                "{case}: packed words"
            );
            let (_, s, bi) = q.to_tensors(&Device::Cpu)?;
            assert_eq!(
                first_diff(&bits(&s)?, &bits(g_scales)?),
                None,
                "{case}: scales"
            );
            assert_eq!(
                first_diff(&bits(&bi)?, &bits(g_biases)?),
                None,
                "{case}: biases"
            );

            // quantize, tensor API (same dtype and shapes as MLX)
            let (tw, ts, tb) = quantize_tensor(w_t, gs, b)?;
            assert_eq!(tw.dims(), g_weight.dims(), "{case}: weight shape");
            assert_eq!(ts.dims(), g_scales.dims(), "{case}: scales shape");
            assert_eq!(ts.dtype(), g_scales.dtype(), "{case}: scales dtype");
            assert_eq!(
                tw.flatten_all()?.to_vec1::<u32>()?,
                g_words,
                "{case}: tensor words"
            );
            assert_eq!(bits(&ts)?, bits(g_scales)?, "{case}: tensor scales");
            assert_eq!(bits(&tb)?, bits(g_biases)?, "{case}: tensor biases");

            // dequantize MLX's own quantization, exact
            let d = dequantize_tensor(g_weight, g_scales, g_biases, gs, b)?;
            assert_eq!(d.dtype(), g_deq.dtype(), "{case}: dequantized dtype");
            assert_eq!(d.dims(), g_deq.dims(), "{case}: dequantized shape");
            assert_eq!(
                first_diff(&bits(&d)?, &bits(g_deq)?),
                None,
                "{case}: dequantized"
            );

            // quantized matmul on MLX's quantization, float tolerance
            let gq = AffineQuantized::from_tensors(g_weight, g_scales, g_biases, gs, b)?;
            let y = quantized_matmul(&x, m, &gq)?;
            let y_ref = f32s(g_mm)?;
            assert_eq!(g_mm.dims(), &[m, rows]);
            let wd = gq.dequantize();
            for i in 0..m {
                for j in 0..rows {
                    let mag: f64 = (0..k)
                        .map(|l| (f64::from(x[i * k + l]) * f64::from(wd[j * k + l])).abs())
                        .sum();
                    let tol = 2.0 * k as f64 * f64::from(f32::EPSILON) / 2.0 * mag;
                    let (a, r) = (y[i * rows + j], y_ref[i * rows + j]);
                    let diff = f64::from((a - r).abs());
                    assert!(
                        diff <= tol,
                        "{case}: y[{i}, {j}] = {a} vs mlx {r}, |diff| {diff} > {tol}"
                    );
                }
            }
            cases += 1;
        }
    }
    Ok(cases)
}

#[test]
fn f32_all_bits_and_group_sizes() -> Res<()> {
    assert_eq!(check_file("f32", ParamDtype::F32, &[2, 3, 4, 5, 6, 8])?, 18);
    Ok(())
}

#[test]
fn f16_bits_4_and_8() -> Res<()> {
    assert_eq!(check_file("f16", ParamDtype::F16, &[4, 8])?, 6);
    Ok(())
}

#[test]
fn bf16_bits_4_and_8() -> Res<()> {
    assert_eq!(check_file("bf16", ParamDtype::BF16, &[4, 8])?, 6);
    Ok(())
}
