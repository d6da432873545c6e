//! `pocketlm convert`: a GGUF file or a Hugging Face / MLX folder to an MLX-format folder.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pocketlm::convert::{
    convert, parse_dtype, ConvertEvent, ConvertOptions, QuantOverride, QuantRecipe,
};
use pocketlm::quant::QuantMode;
use pocketlm::safetensors_weights::QuantParams;

/// Arguments of `convert` (mlx-lm's `mlx_lm.convert` names).
#[derive(Args, Debug, Clone)]
pub struct ConvertArgs {
    /// Source: a .gguf file, a Hugging Face / MLX model folder or a hub id
    /// (org/name[@revision]). Omitted: the default model.
    #[arg(long, short = 'm', alias = "hf-path")]
    pub model: Option<String>,
    /// Output folder (must not exist; written atomically).
    #[arg(long = "out", alias = "mlx-path")]
    pub out: PathBuf,
    /// Quantize Linear and Embedding weights (MLX; the mode is `--q-mode`).
    #[arg(long, short = 'q')]
    pub quantize: bool,
    /// Bits per weight when quantizing: affine 2, 3, 4, 5, 6 or 8 (default 4); mxfp4 and
    /// nvfp4 4; mxfp8 8.
    #[arg(long)]
    pub q_bits: Option<usize>,
    /// Weights per quantization group: affine 32, 64 or 128 (default 64); mxfp4 and mxfp8 32;
    /// nvfp4 16.
    #[arg(long)]
    pub q_group_size: Option<usize>,
    /// Quantization mode: affine (scales and biases per group), or the float modes mxfp4,
    /// mxfp8, nvfp4 (`mx.quantize(mode=...)`; uint8 scales, no biases).
    #[arg(long, default_value = "affine", value_parser = ["affine", "mxfp4", "mxfp8", "nvfp4"])]
    pub q_mode: String,
    /// Mixed-precision recipe of mlx-lm: mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6 (with -q;
    /// v_proj / down_proj of some layers and lm_head get the higher bit width).
    #[arg(long, requires = "quantize")]
    pub quant_predicate: Option<String>,
    /// Per-layer choice, repeatable, last match wins: PATTERN=BITS[:GROUP] or PATTERN=off,
    /// PATTERN a glob over layer paths (e.g. 'model.layers.*.mlp.down_proj=8',
    /// 'model.embed_tokens=off'). Needs -q.
    #[arg(long = "q-override", requires = "quantize")]
    pub q_override: Vec<String>,
    /// Float dtype of the written weights: f32, f16 or bf16 (default: the source's; f16 for GGUF).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Dequantize an MLX-quantized source back to float.
    #[arg(long, short = 'd', conflicts_with = "quantize")]
    pub dequantize: bool,
    /// Quantize a vision-language model's vision tower too (by default it stays in float, as
    /// `mlx_vlm.convert` keeps it).
    #[arg(long, requires = "quantize")]
    pub quantize_vision: bool,
}

/// Runs `convert`, with a progress bar on a terminal.
pub fn run(a: ConvertArgs) -> Result<()> {
    let src = super::model::resolve(a.model.as_deref())?;
    let q_mode: QuantMode = a.q_mode.parse()?;
    let (default_group, default_bits) = q_mode.default_params();
    let q_group_size = a.q_group_size.unwrap_or(default_group);
    let opts = ConvertOptions {
        quantize: a.quantize.then_some(QuantParams {
            group_size: q_group_size,
            bits: a.q_bits.unwrap_or(default_bits),
        }),
        q_mode,
        recipe: a
            .quant_predicate
            .as_deref()
            .map(str::parse::<QuantRecipe>)
            .transpose()?,
        overrides: a
            .q_override
            .iter()
            .map(|o| QuantOverride::parse(o, q_group_size))
            .collect::<Result<_, _>>()?,
        dtype: a.dtype.as_deref().map(parse_dtype).transpose()?,
        dequantize: a.dequantize,
        max_shard_bytes: None,
        quantize_vision: a.quantize_vision,
        weight_deltas: Default::default(),
    };
    if let Some(p) = opts.quantize {
        q_mode.check(p.group_size, p.bits)?;
    }
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let summary = convert(&src, &a.out, &opts, &mut |e| match e {
        ConvertEvent::Begin { tensors } => bar.set_length(tensors as u64),
        ConvertEvent::Tensor { index, name } => {
            bar.set_position(index as u64 + 1);
            bar.set_message(name);
        }
    })
    .with_context(|| format!("converting {} to {}", src.display(), a.out.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "pocketlm: wrote {} ({} tensors, {} quantized layers, {:.1} MB of weights)",
        summary.out.display(),
        summary.tensors_written,
        summary.quantized_layers,
        summary.weight_bytes as f64 / 1e6
    );
    Ok(())
}
