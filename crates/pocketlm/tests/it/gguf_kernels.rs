//! The GGUF kernels on the real default model (SmolLM2-135M-Instruct, Q4_1 + Q8_0), mapped
//! zero-copy from the file, against candle's own reading and dequantization of the same
//! tensors.
//!
//! Needs `$POCKETLM_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf` (default
//! `POCKETLM_HOME=$HOME/.cache/pocketlm`); CI fetches it first.

use std::path::PathBuf;

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use pocketlm::kernels::{mmap_gguf, Backend, GgufMatrix, GgufType, KernelError};

fn model_path() -> PathBuf {
    pocketlm_testutil::default_model_path()
}

/// candle's dequantization of a tensor, read through its own file reader.
fn candle_f32(content: &Content, path: &PathBuf, name: &str) -> Vec<f32> {
    let mut f = std::fs::File::open(path).unwrap();
    let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
    q.dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Deterministic activations with an outlier channel, as hidden states have.
fn activations(m: usize, k: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| {
            let v = ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.7;
            if i % k == 17 {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn default_model_matrices_map_without_copy() {
    let path = model_path();
    let (map, content) = mmap_gguf(&path).unwrap();
    let mut counts = std::collections::HashMap::new();
    for (name, info) in &content.tensor_infos {
        if info.shape.rank() != 2 {
            continue;
        }
        let w = GgufMatrix::from_gguf(&map, &content, name).unwrap();
        assert!(w.weight_bytes().is_mapped());
        assert_eq!(w.bytes().len(), w.rows() * w.row_bytes(), "{name}");
        *counts.entry(w.dtype()).or_insert(0usize) += 1;
    }
    assert_eq!(counts.get(&GgufType::Q4_1), Some(&210), "{counts:?}");
    let emb = GgufMatrix::from_gguf(&map, &content, "token_embd.weight").unwrap();
    assert_eq!(
        (emb.dtype(), emb.rows(), emb.cols()),
        (GgufType::Q8_0, 49152, 576)
    );
    let e = GgufMatrix::from_gguf(&map, &content, "blk.0.attn_q.missing").unwrap_err();
    assert!(matches!(e, KernelError::Missing { .. }), "{e}");
    let e = GgufMatrix::from_gguf(&map, &content, "blk.0.attn_norm.weight").unwrap_err();
    assert!(e.to_string().contains("blk.0.attn_norm.weight"), "{e}");
}

#[test]
fn default_model_products_match_candle_dequantized() {
    let path = model_path();
    let (map, content) = mmap_gguf(&path).unwrap();
    for name in [
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.29.ffn_down.weight",
        "blk.15.ffn_gate.weight",
        "token_embd.weight",
    ] {
        let w = GgufMatrix::from_gguf(&map, &content, name).unwrap();
        let deq = candle_f32(&content, &path, name);
        let (n, k) = (w.rows(), w.cols());
        let m = if n > 10_000 { 1 } else { 5 };
        let x = activations(m, k);
        for backend in [Backend::Scalar, Backend::detect()] {
            let mut out = vec![0f32; m * n];
            w.matmul_with(backend, &x, m, &mut out).unwrap();
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                // Half a quantization step per activation: amax(block)/127/2.
                let steps: Vec<f64> = xr
                    .chunks(32)
                    .map(|b| b.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0)
                    .collect();
                for c in 0..n {
                    let wr = &deq[c * k..(c + 1) * k];
                    let (mut want, mut bound, mut mag) = (0f64, 0f64, 0f64);
                    for j in 0..k {
                        want += wr[j] as f64 * xr[j] as f64;
                        bound += (wr[j] as f64).abs() * steps[j / 32] * 0.50002;
                        mag += (wr[j] as f64 * xr[j] as f64).abs();
                    }
                    let tol = bound + 1e-5 * mag + 1e-6;
                    let got = out[r * n + c] as f64;
                    assert!(
                        (got - want).abs() <= tol,
                        "{name} {backend:?} [{r},{c}]: {got} vs {want} (tol {tol})"
                    );
                }
            }
        }
    }
}

#[test]
fn default_model_embedding_is_candles_dequantization() {
    let path = model_path();
    let (map, content) = mmap_gguf(&path).unwrap();
    let w = GgufMatrix::from_gguf(&map, &content, "token_embd.weight").unwrap();
    let deq = candle_f32(&content, &path, "token_embd.weight");
    let ids = [0u32, 1, 2, 1234, 49151];
    let e = w.embedding(&ids).unwrap();
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        assert_eq!(e[i * 576..(i + 1) * 576], deq[id * 576..(id + 1) * 576]);
    }
    let err = w.embedding(&[49152]).unwrap_err();
    assert!(err.to_string().contains("token_embd.weight"), "{err}");
}
