//! `pocketlm fuse`: merge a LoRA adapter into the base weights (`mlx_lm.fuse`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pocketlm::convert::parse_dtype;
use pocketlm::lora::{fuse, Adapter};

/// Arguments of `fuse`.
#[derive(Args, Debug)]
pub struct FuseArgs {
    /// Base model: a .gguf file, a model folder or a hub id. Omitted: the default model.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Adapter folder (adapter_config.json, adapters.safetensors).
    #[arg(long, default_value = "adapters")]
    pub adapter_path: PathBuf,
    /// Output folder (must not exist).
    #[arg(long = "out", alias = "save-path")]
    pub out: PathBuf,
    /// Write float weights (quantized sources are dequantized); otherwise a quantized source
    /// is re-quantized (GGUF: as MLX 4-bit, group 64).
    #[arg(long)]
    pub dequantize: bool,
    /// Float dtype of the written weights: f32, f16 or bf16.
    #[arg(long)]
    pub dtype: Option<String>,
}

/// Runs `fuse`.
pub fn run(a: FuseArgs) -> Result<()> {
    let src = super::model::resolve(a.model.as_deref())?;
    let adapter = Adapter::load(&a.adapter_path)
        .with_context(|| format!("reading the adapter {}", a.adapter_path.display()))?;
    let dtype = a.dtype.as_deref().map(parse_dtype).transpose()?;
    let s = fuse(&src, &adapter, &a.out, a.dequantize, dtype, &mut |_| {})
        .with_context(|| format!("fusing into {}", a.out.display()))?;
    eprintln!(
        "fused {} adapted layers into {} ({} tensors, {:.1} MB)",
        adapter.weights.len(),
        s.out.display(),
        s.tensors_written,
        s.weight_bytes as f64 / 1e6
    );
    Ok(())
}
