//! `pocketlm convert`: a GGUF file or a Hugging Face / MLX folder to an MLX-format folder.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pocketlm::convert::{
    convert, parse_dtype, ConvertEvent, ConvertOptions, QuantOverride, QuantRecipe,
};
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
    /// Quantize Linear and Embedding weights (MLX affine).
    #[arg(long, short = 'q')]
    pub quantize: bool,
    /// Bits per weight when quantizing: 2, 3, 4, 5, 6 or 8.
    #[arg(long, default_value_t = 4)]
    pub q_bits: usize,
    /// Weights per quantization group: 32, 64 or 128.
    #[arg(long, default_value_t = 64)]
    pub q_group_size: usize,
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
    let opts = ConvertOptions {
        quantize: a.quantize.then_some(QuantParams {
            group_size: a.q_group_size,
            bits: a.q_bits,
        }),
        recipe: a
            .quant_predicate
            .as_deref()
            .map(str::parse::<QuantRecipe>)
            .transpose()?,
        overrides: a
            .q_override
            .iter()
            .map(|o| QuantOverride::parse(o, a.q_group_size))
            .collect::<Result<_, _>>()?,
        dtype: a.dtype.as_deref().map(parse_dtype).transpose()?,
        dequantize: a.dequantize,
        max_shard_bytes: None,
        quantize_vision: a.quantize_vision,
        weight_deltas: Default::default(),
    };
    if let Some(p) = opts.quantize {
        pocketlm::quant::mlx_affine::check_params(p.group_size, p.bits)?;
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
