//! MLX float quantization modes (`mxfp4`, `mxfp8`, `nvfp4`) against Python `mlx` (golden
//! files from `scripts/golden/mlx_quant_modes.py`, mlx 0.32.4 on CPU). Each mode allows one
//! group size (the script checks that mlx refuses all others), so every allowed group size is
//! covered.
//!
//! - `quantize` must equal `mx.quantize(w, mode=...)` bit for bit (packed words and uint8
//!   scales) for f32, f16 and bf16 inputs.
//! - `dequantize` must equal `mx.dequantize(..., mode=..., dtype=...)` bit for bit, for f32,
//!   f16 and bf16 outputs (NaN equal to NaN whatever its payload: f16 outputs overflow on
//!   some of the subnormal-input groups, where mlx and we both make `0 * inf`).
//! - `mx.to_fp8` on 4096 values equals our E4M3 rounding.
//! - `quantized_matmul` (f32 `x`) within float tolerance of `mx.quantized_matmul`:
//!   `|y - y_mlx| <= 2 * k * 2^-24 * Σ_l |x_l w_l|` (k = 256; summation order only).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use pocketlm::quant::mlx_affine::ParamDtype;
use pocketlm::quant::mlx_fp::{
    dequantize_tensor, f32_to_e4m3, quantize_tensor, FpMode, FpQuantized,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn load(name: &str) -> Res<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/mlx_quant_modes")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
        format!(
            "{}: {e} (run scripts/golden/mlx_quant_modes.py)",
            path.display()
        )
        .into()
    })
}

fn get<'a>(t: &'a HashMap<String, Tensor>, key: &str) -> Res<&'a Tensor> {
    t.get(key)
        .ok_or_else(|| format!("golden file has no tensor `{key}`").into())
}

fn f32s(t: &Tensor) -> Res<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Bit patterns of f32 values, every NaN mapped to one pattern.
fn canon_bits(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|x| if x.is_nan() { 0x7FC0_0000 } else { x.to_bits() })
        .collect()
}

fn first_diff<T: PartialEq + Copy + std::fmt::Debug>(a: &[T], b: &[T]) -> Option<(usize, T, T)> {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .map(|i| (i, a[i], b[i]))
}

fn check_file(name: &str, dtype: ParamDtype) -> Res<()> {
    let t = load(name)?;
    let w_t = get(&t, "w")?;
    assert_eq!(w_t.dtype(), dtype.to_candle(), "{name}: dtype of `w`");
    let (rows, cols) = w_t.dims2()?;
    let w = f32s(w_t)?;
    for mode in FpMode::ALL {
        let p = format!("{}.", mode.name());
        let gw = get(&t, &format!("{p}weight"))?;
        let gs = get(&t, &format!("{p}scales"))?;
        let q = FpQuantized::quantize(&w, rows, cols, mode, dtype)?;
        let want_w = gw.flatten_all()?.to_vec1::<u32>()?;
        let want_s = gs.flatten_all()?.to_vec1::<u8>()?;
        assert_eq!(
            first_diff(q.weight(), &want_w),
            None,
            "{name} {mode}: packed words (index, ours, mlx)"
        );
        assert_eq!(
            first_diff(q.scales(), &want_s),
            None,
            "{name} {mode}: scales (index, ours, mlx)"
        );
        // The tensor API gives the same.
        let (tw, ts) = quantize_tensor(w_t, mode)?;
        assert_eq!(
            tw.flatten_all()?.to_vec1::<u32>()?,
            want_w,
            "{name} {mode}: tensor"
        );
        assert_eq!(
            ts.flatten_all()?.to_vec1::<u8>()?,
            want_s,
            "{name} {mode}: tensor"
        );

        let from_mlx = FpQuantized::from_tensors(gw, gs, mode)?;
        let mut outs = vec![(format!("{p}dequantized"), dtype)];
        if name == "f32" {
            outs.push((format!("{p}dequantized_f16"), ParamDtype::F16));
            outs.push((format!("{p}dequantized_bf16"), ParamDtype::BF16));
        }
        for (key, odt) in outs {
            let want = get(&t, &key)?;
            assert_eq!(want.dtype(), odt.to_candle(), "{key}: dtype");
            let ours = canon_bits(&from_mlx.dequantize(odt));
            assert_eq!(
                first_diff(&ours, &canon_bits(&f32s(want)?)),
                None,
                "{name} {key}: bits (index, ours, mlx)"
            );
            let dt = dequantize_tensor(gw, gs, mode, odt)?;
            assert_eq!(dt.dtype(), odt.to_candle());
            assert_eq!(canon_bits(&f32s(&dt)?), ours, "{name} {key}: tensor API");
        }
        if name == "f32" {
            let x_t = get(&t, "x")?;
            let (m, k) = x_t.dims2()?;
            let x = f32s(x_t)?;
            let y = from_mlx.matmul(&x, m)?;
            let want = f32s(get(&t, &format!("{p}matmul"))?)?;
            let d = from_mlx.dequantize(ParamDtype::F32);
            for i in 0..m {
                for j in 0..rows {
                    let mag: f32 = (0..k).map(|l| (x[i * k + l] * d[j * k + l]).abs()).sum();
                    let tol = 2.0 * k as f32 * f32::EPSILON / 2.0 * mag;
                    let (a, b) = (y[i * rows + j], want[i * rows + j]);
                    // Infinite on both sides where an f32-subnormal group's scale byte
                    // wrapped past 2^127 (as mlx stores it).
                    let same = a == b || (a.is_nan() && b.is_nan());
                    assert!(
                        same || (a - b).abs() <= tol,
                        "{name} {mode} matmul ({i}, {j}): ours {a}, mlx {b}, tolerance {tol}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn f32_inputs_quantize_and_dequantize_bit_exact() -> Res<()> {
    check_file("f32", ParamDtype::F32)
}

#[test]
fn f16_inputs_quantize_and_dequantize_bit_exact() -> Res<()> {
    check_file("f16", ParamDtype::F16)
}

#[test]
fn bf16_inputs_quantize_and_dequantize_bit_exact() -> Res<()> {
    check_file("bf16", ParamDtype::BF16)
}

#[test]
fn e4m3_rounding_equals_mx_to_fp8() -> Res<()> {
    let t = load("f32")?;
    let x = f32s(get(&t, "fp8.x")?)?;
    let want = get(&t, "fp8.bits")?.flatten_all()?.to_vec1::<u8>()?;
    let ours: Vec<u8> = x.iter().map(|&v| f32_to_e4m3(v)).collect();
    if let Some((i, a, b)) = first_diff(&ours, &want) {
        panic!("to_fp8({}) : ours {a:#04x}, mlx {b:#04x} (index {i})", x[i]);
    }
    Ok(())
}

// ---- End to end with mlx-lm (`scripts/golden/mlx_quant_modes_e2e.py`) ----------------------
//
// mlx-lm converted the tiny Llama of `tests/golden/folders/tiny_llama` with `--q-mode` each
// mode (float32 folders) and recorded its logits of a 12-token prompt and 16 greedy tokens.
// - Our `convert` with the same mode writes exactly mlx-lm's tensors (dtype, shape, sha256
//   prefix of every tensor) and the same config.json `quantization`; mlx-lm therefore loads our
//   folder as its own.
// - pocketlm on our folder, and on the committed mlx-lm `tiny_llama_mxfp4/` folder: greedy
//   tokens equal to mlx-lm's, logits within 1e-4 of mlx-lm's (both compute in f32 on the same
//   weights; the products differ by summation order only, measured below 1e-5).

mod e2e {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use candle_core::{Device, Tensor};
    use pocketlm::convert::{convert, ConvertOptions};
    use pocketlm::loader::{load, LoadOptions, LoadedModel};
    use pocketlm::models::Logits;
    use pocketlm::quant::mlx_fp::FpMode;
    use pocketlm::quant::QuantMode;
    use pocketlm::safetensors_weights::QuantParams;
    use sha2::{Digest, Sha256};

    use super::Res;

    const LOGITS_TOL: f32 = 1e-4;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/mlx_quant_modes")
    }

    fn golden() -> Res<(std::collections::HashMap<String, Tensor>, serde_json::Value)> {
        let t = candle_core::safetensors::load(dir().join("e2e.safetensors"), &Device::Cpu)
            .map_err(|e| {
                format!("e2e.safetensors: {e} (run scripts/golden/mlx_quant_modes_e2e.py)")
            })?;
        let j = serde_json::from_str(&std::fs::read_to_string(dir().join("e2e.json"))?)?;
        Ok((t, j))
    }

    fn cpu() -> LoadOptions {
        LoadOptions {
            device: pocketlm::device::DeviceSpec::Cpu,
            dequantize: false,
            ..Default::default()
        }
    }

    fn digests(dir: &Path) -> Res<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.extension().is_none_or(|x| x != "safetensors") {
                continue;
            }
            let bytes = std::fs::read(&p)?;
            let st = safetensors::SafeTensors::deserialize(&bytes)?;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => "float32",
                    safetensors::Dtype::F16 => "float16",
                    safetensors::Dtype::BF16 => "bfloat16",
                    safetensors::Dtype::U32 => "uint32",
                    safetensors::Dtype::U8 => "uint8",
                    d => return Err(format!("{name}: unexpected dtype {d:?}").into()),
                };
                let shape: Vec<String> = view.shape().iter().map(|d| d.to_string()).collect();
                let hash = Sha256::digest(view.data());
                let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
                out.insert(name, format!("{dtype}[{}]:{hex}", shape.join(",")));
            }
        }
        Ok(out)
    }

    /// Checks pocketlm's logits and greedy tokens on `folder` against mlx-lm's for `mode`;
    /// returns the largest logit difference.
    fn check_model(folder: &Path, mode: &str) -> Res<f32> {
        let (g, _) = golden()?;
        let ids = &g["ids"];
        let prompt: Vec<u32> = ids.to_vec1::<i64>()?.iter().map(|&i| i as u32).collect();
        let m: LoadedModel = load(folder, &cpu())?;
        let mut cache = m.model.new_cache();
        let x = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = m.model.forward(&x, &mut cache, Logits::All)?.squeeze(0)?;
        let want = &g[&format!("{mode}.logits")];
        assert_eq!(logits.dims(), want.dims(), "{mode}: logits shape");
        let d = (logits - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(
            d <= LOGITS_TOL,
            "{mode}: max |logits - mlx-lm| = {d} > {LOGITS_TOL}"
        );
        let want_tokens: Vec<u32> = g[&format!("{mode}.tokens")]
            .to_vec1::<i64>()?
            .iter()
            .map(|&t| t as u32)
            .collect();
        let tokens = pocketlm_testutil::greedy(m.model.as_ref(), &prompt, want_tokens.len())?;
        assert_eq!(
            tokens, want_tokens,
            "{mode}: greedy tokens (pocketlm, mlx-lm)"
        );
        Ok(d)
    }

    #[test]
    fn mlx_lm_mxfp4_folder_runs_like_mlx_lm() -> Res<()> {
        let d = check_model(&dir().join("tiny_llama_mxfp4"), "mxfp4")?;
        eprintln!("mlx-lm mxfp4 folder: max |logits - mlx-lm| = {d:e}");
        Ok(())
    }

    #[test]
    fn our_conversion_writes_mlx_lm_tensors_in_every_mode() -> Res<()> {
        let (_, j) = golden()?;
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/folders/tiny_llama");
        let tmp = tempfile::tempdir()?;
        for mode in FpMode::ALL {
            let out = tmp.path().join(mode.name());
            let opts = ConvertOptions {
                quantize: Some(QuantParams {
                    group_size: mode.group_size(),
                    bits: mode.bits(),
                }),
                q_mode: QuantMode::Fp(mode),
                dtype: Some(candle_core::DType::F32),
                ..Default::default()
            };
            convert(&src, &out, &opts, &mut |_| {})?;
            let want: BTreeMap<String, String> =
                serde_json::from_value(j["modes"][mode.name()]["digests"].clone())?;
            let got = digests(&out)?;
            let differ: Vec<&String> = want
                .keys()
                .chain(got.keys())
                .filter(|k| want.get(*k) != got.get(*k))
                .collect();
            assert!(
                differ.is_empty(),
                "{mode}: {} tensors differ from mlx_lm.convert's, e.g. {:?}",
                differ.len(),
                differ
                    .iter()
                    .take(3)
                    .map(|k| (k, want.get(*k), got.get(*k)))
                    .collect::<Vec<_>>()
            );
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
            assert_eq!(
                config["quantization"],
                j["modes"][mode.name()]["quantization"],
                "{mode}: config.json quantization"
            );
            let d = check_model(&out, mode.name())?;
            eprintln!("{mode}: our folder, max |logits - mlx-lm| = {d:e}");
        }
        Ok(())
    }
}
