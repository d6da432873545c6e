//! LoRA interop with mlx-lm on the real default model, against
//! `tests/golden/lora/golden.json` and the adapters beside it (from
//! `scripts/golden/lora_interop.py`, mlx 0.32.4 / mlx-lm 0.32.2):
//!
//! - an adapter trained by `mlx_lm.lora` on a float32 folder of the model, loaded here on the
//!   same folder, gives mlx-lm's greedy tokens (`mlx_lm.load(adapter_path=...)`);
//! - an adapter trained by `pocketlm lora` on the Q4_1 GGUF gives, on the float folder, the
//!   tokens mlx-lm gives with it;
//! - `lora::fuse` of the float folder and the mlx-lm adapter gives a folder on which pocketlm
//!   gives the tokens mlx-lm gives on it (and the script checked that `mlx_lm.fuse` writes the
//!   same weights up to rounding);
//! - on the GGUF (whose q/k rows are in llama.cpp's permuted order), the adapter gives the
//!   logits of the float folder (dequantized GGUF vs float folder);
//! - the two adapters hot-swap on one loaded Q4_1 base, each giving the tokens it gives alone,
//!   and unloading gives the base's tokens again.

use std::path::PathBuf;

use candle_core::Tensor;
use pocketlm::convert::{convert, ConvertOptions};
use pocketlm::loader::{load, LoadOptions, LoadedModel};
use pocketlm::lora::{fuse, unload, Adapter};
use pocketlm::models::Logits;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn gold_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/lora")
}

fn golden() -> Res<serde_json::Value> {
    let p = gold_dir().join("golden.json");
    let text = std::fs::read_to_string(&p)
        .map_err(|e| format!("{}: {e} (run scripts/golden/lora_interop.py)", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn ids(v: &serde_json::Value) -> Res<Vec<u32>> {
    v.as_array()
        .ok_or("expected a list of ids")?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|i| i as u32)
                .ok_or_else(|| "expected an id".into())
        })
        .collect()
}

fn default_gguf() -> PathBuf {
    pocketlm_testutil::default_model_path()
}

/// `steps` greedy tokens after `prompt`, no end-of-generation stop (as the script's loop).
fn greedy(m: &LoadedModel, prompt: &[u32], steps: usize) -> Res<Vec<u32>> {
    Ok(pocketlm_testutil::greedy(m.model.as_ref(), prompt, steps)?)
}

fn last_logits(m: &LoadedModel, prompt: &[u32]) -> Res<Vec<f32>> {
    let mut cache = m.model.new_cache();
    let x = Tensor::new(prompt, m.model.device())?.unsqueeze(0)?;
    Ok(m.model
        .forward(&x, &mut cache, Logits::Last)?
        .flatten_all()?
        .to_vec1()?)
}

#[test]
fn adapters_and_fused_folders_interoperate_with_mlx_lm() -> Res<()> {
    let g = golden()?;
    let prompt = ids(&g["prompt_ids"])?;
    let steps = g["steps"].as_u64().ok_or("steps")? as usize;
    let want = |k: &str| ids(&g["tokens"][k]);
    let mlx_adapter = Adapter::load(gold_dir().join("mlx_adapter"))?;
    let our_adapter = Adapter::load(gold_dir().join("our_adapter"))?;

    let tmp = tempfile::tempdir()?;
    let float_dir = tmp.path().join("float");
    let opts = ConvertOptions {
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    };
    convert(&default_gguf(), &float_dir, &opts, &mut |_| {})?;
    let mut float = load(&float_dir, &LoadOptions::default())?;

    assert_eq!(greedy(&float, &prompt, steps)?, want("base")?, "base");
    mlx_adapter.apply(float.model.as_mut())?;
    let with_mlx_adapter = last_logits(&float, &prompt)?;
    assert_eq!(
        greedy(&float, &prompt, steps)?,
        want("mlx_adapter")?,
        "mlx-lm's adapter"
    );
    our_adapter.apply(float.model.as_mut())?;
    assert_eq!(
        greedy(&float, &prompt, steps)?,
        want("our_adapter")?,
        "our adapter"
    );
    unload(float.model.as_mut());
    assert_eq!(greedy(&float, &prompt, steps)?, want("base")?, "unloaded");
    drop(float);

    // Fused folder.
    let fused_dir = tmp.path().join("fused");
    fuse(
        &float_dir,
        &mlx_adapter,
        &fused_dir,
        true,
        Some(candle_core::DType::F32),
        &mut |_| {},
    )?;
    let fused = load(&fused_dir, &LoadOptions::default())?;
    assert_eq!(
        greedy(&fused, &prompt, steps)?,
        want("ours_fused")?,
        "fused"
    );
    drop(fused);

    // The GGUF's permuted q/k rows: the adapter's lora_b columns follow them.
    let dq = LoadOptions {
        dequantize: true,
        ..Default::default()
    };
    let mut gguf_f32 = load(default_gguf(), &dq)?;
    mlx_adapter.apply(gguf_f32.model.as_mut())?;
    let l = last_logits(&gguf_f32, &prompt)?;
    let scale = with_mlx_adapter.iter().fold(0f32, |a, x| a.max(x.abs()));
    let d = l
        .iter()
        .zip(&with_mlx_adapter)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        d < 1e-3 * scale,
        "GGUF (dequantized) vs float folder with the adapter: {d}"
    );
    Ok(())
}

#[test]
fn adapters_hot_swap_on_one_quantized_base() -> Res<()> {
    let g = golden()?;
    let prompt = ids(&g["prompt_ids"])?;
    let a = Adapter::load(gold_dir().join("mlx_adapter"))?;
    let b = Adapter::load(gold_dir().join("our_adapter"))?;
    let steps = 16;
    let alone = |ad: &Adapter| -> Res<Vec<u32>> {
        let mut m = load(default_gguf(), &LoadOptions::default())?;
        ad.apply(m.model.as_mut())?;
        greedy(&m, &prompt, steps)
    };
    let (ta, tb) = (alone(&a)?, alone(&b)?);
    let mut m = load(default_gguf(), &LoadOptions::default())?;
    let base = greedy(&m, &prompt, steps)?;
    assert_ne!(ta, base);
    assert_ne!(tb, ta);
    for _ in 0..2 {
        a.apply(m.model.as_mut())?;
        assert_eq!(greedy(&m, &prompt, steps)?, ta);
        b.apply(m.model.as_mut())?;
        assert_eq!(greedy(&m, &prompt, steps)?, tb);
    }
    unload(m.model.as_mut());
    assert_eq!(greedy(&m, &prompt, steps)?, base);
    Ok(())
}
