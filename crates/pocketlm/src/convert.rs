//! `convert`: a GGUF file or a Hugging Face / MLX folder to an MLX-format folder
//! (config.json, safetensors with Hugging Face names, tokenizer files), optionally MLX
//! quantized (affine, or the float modes `mxfp4` / `mxfp8` / `nvfp4` of `mlx_lm.convert
//! --q-mode`: [`crate::quant::mlx_fp`], uint8 scales and no biases, config.json
//! `"quantization": {"group_size", "bits", "mode"}`), or back to float with `dequantize`.
//!
//! Follows mlx-lm's `mlx_lm/convert.py` + `utils.py` (`quantize_model`, `save_model`): every
//! 2-D `*.weight` whose last dimension is a multiple of the group size (the `Linear` and
//! `Embedding` layers) is quantized with `mx.quantize` semantics
//! ([`crate::quant::mlx_affine::quantize_tensor`], on the weight cast to the output dtype, so
//! scales and biases come out in that dtype), config.json gets
//! `"quantization": {"group_size", "bits"}` (also as `quantization_config`), and the weights
//! are written as `model.safetensors` or `model-0000i-of-0000n.safetensors` shards of at most
//! 5 GiB, with `model.safetensors.index.json`.
//!
//! Per-layer choices, written to config.json as overrides (`"quantization": {"group_size": 64,
//! "bits": 4, "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6}, ...}`, `false`
//! for a layer kept in float), come from mlx-lm's mixed recipes ([`QuantRecipe`],
//! `--quant-predicate mixed_3_6`) and from explicit [`QuantOverride`]s
//! (`--q-override PATTERN=BITS[:GROUP]`).
//!
//! GGUF sources are dequantized to f32 first, renamed by the architecture's name table
//! ([`crate::gguf::names`]), and their q/k projection rows brought back to the Hugging Face
//! order where the architecture's GGUF layout permutes them ([`QkRowOrder`]: llama.cpp's
//! `convert_hf_to_gguf.py` `LlamaModel.permute` reorders Llama's for its interleaved RoPE).
//!
//! The output is written into a temporary directory next to `out` and renamed at the end, so
//! `out` either does not exist or is complete.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::chat_template::ChatTemplate;
use crate::fetch::hub::glob_match;
use crate::gguf::GgufFile;
use crate::loader::{normalize_config, read_json};
use crate::models;
use crate::quant::mlx_affine::check_params;
use crate::quant::mlx_affine::{dequantize_tensor, quantize_tensor, ParamDtype};
use crate::quant::mlx_fp::{self, FpMode};
use crate::quant::QuantMode;
use crate::safetensors_weights::{
    LayerQuant, QuantConfig, QuantParams, SafetensorsWeights, INDEX_FILE,
};
use crate::tokenizer::Tokenizer;
use crate::weights::{QkRowOrder, Weights};
use crate::{Error, Result};

/// Largest shard written, in bytes (mlx-lm's `MAX_FILE_SIZE_GB = 5`).
pub const MAX_SHARD_BYTES: usize = 5 << 30;

/// Files copied from a Hugging Face source folder when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
];

/// mlx-lm's mixed-precision recipes (`mlx_lm.convert --quant-predicate mixed_X_Y`,
/// `mixed_quant_predicate_builder` in `mlx_lm/convert.py`, after llama.cpp's `Q4_K_M` choices):
/// `lm_head` and, in the first eighth, the last eighth and every third layer in between, the
/// `v_proj` and `down_proj` layers get the high bit width; every other layer the low one. The
/// group size is the conversion's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantRecipe {
    /// 2 / 6 bits.
    Mixed2_6,
    /// 3 / 4 bits.
    Mixed3_4,
    /// 3 / 6 bits.
    Mixed3_6,
    /// 4 / 6 bits.
    Mixed4_6,
}

impl QuantRecipe {
    /// `(low_bits, high_bits)`.
    pub fn bits(self) -> (usize, usize) {
        match self {
            QuantRecipe::Mixed2_6 => (2, 6),
            QuantRecipe::Mixed3_4 => (3, 4),
            QuantRecipe::Mixed3_6 => (3, 6),
            QuantRecipe::Mixed4_6 => (4, 6),
        }
    }
}

impl std::str::FromStr for QuantRecipe {
    type Err = Error;

    /// `mixed_2_6`, `mixed_3_4`, `mixed_3_6` or `mixed_4_6` (mlx-lm's `QUANT_RECIPES`).
    ///
    /// Errors: [`Error::InvalidArgument`] listing the names.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mixed_2_6" => Ok(QuantRecipe::Mixed2_6),
            "mixed_3_4" => Ok(QuantRecipe::Mixed3_4),
            "mixed_3_6" => Ok(QuantRecipe::Mixed3_6),
            "mixed_4_6" => Ok(QuantRecipe::Mixed4_6),
            _ => Err(Error::InvalidArgument(format!(
                "unknown quantization recipe `{s}` (expected mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6)"
            ))),
        }
    }
}

/// One per-layer quantization choice: layers whose Hugging Face path (e.g.
/// `model.layers.0.mlp.down_proj`, no `.weight`) matches `pattern` (`*` any run of
/// characters, `?` one character) are quantized with `params`, or kept in float when it is
/// `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantOverride {
    /// Glob over layer paths.
    pub pattern: String,
    /// Bits and group size, or `None` for float.
    pub params: Option<QuantParams>,
}

impl QuantOverride {
    /// Parses `PATTERN=BITS[:GROUP]` or `PATTERN=off` (also `float`, `false`); `GROUP`
    /// defaults to `default_group_size`.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the text for a missing `=`, an empty
    /// pattern, or bits / group size MLX affine quantization does not support.
    pub fn parse(s: &str, default_group_size: usize) -> Result<Self> {
        let bad =
            |why: String| Error::InvalidArgument(format!("quantization override `{s}`: {why}"));
        let (pattern, value) = s
            .rsplit_once('=')
            .ok_or_else(|| bad("expected PATTERN=BITS[:GROUP] or PATTERN=off".into()))?;
        if pattern.trim().is_empty() {
            return Err(bad("empty pattern".into()));
        }
        let params = match value.trim() {
            "off" | "float" | "false" => None,
            v => {
                let (bits, group) = match v.split_once(':') {
                    Some((b, g)) => (b, Some(g)),
                    None => (v, None),
                };
                let num = |t: &str| {
                    t.trim()
                        .parse::<usize>()
                        .map_err(|_| bad(format!("`{t}` is not a number")))
                };
                let p = QuantParams {
                    bits: num(bits)?,
                    group_size: group.map(num).transpose()?.unwrap_or(default_group_size),
                };
                check_params(p.group_size, p.bits).map_err(|e| bad(e.to_string()))?;
                Some(p)
            }
        };
        Ok(QuantOverride {
            pattern: pattern.trim().to_string(),
            params,
        })
    }
}

/// What to convert to.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// MLX quantization of the `Linear` / `Embedding` weights: the defaults, which `recipe` and
    /// `overrides` refine per layer (in mode `q_mode`).
    pub quantize: Option<QuantParams>,
    /// The mode of `quantize` (`mlx_lm.convert --q-mode`): affine (the default) or a float mode,
    /// whose one allowed group size and bits `quantize` must hold. Recipes need affine;
    /// overrides give affine layers (or float ones with `off`).
    pub q_mode: QuantMode,
    /// A mixed-precision recipe (needs `quantize`).
    pub recipe: Option<QuantRecipe>,
    /// Per-layer choices (need `quantize`), applied after `recipe`; the last one matching a
    /// layer wins.
    pub overrides: Vec<QuantOverride>,
    /// Float dtype of the written float tensors (F32, F16 or BF16). `None`: keep each tensor's
    /// dtype for a safetensors source, F16 for a GGUF source (mlx-lm's default).
    pub dtype: Option<DType>,
    /// Dequantize MLX quantized layers of the source to float (into the dtype of their scales,
    /// or `dtype`) instead of copying them.
    pub dequantize: bool,
    /// Largest shard in bytes; `None`: [`MAX_SHARD_BYTES`].
    pub max_shard_bytes: Option<usize>,
    /// Quantize a vision-language model's vision tower too (by default it stays in float, as
    /// `mlx_vlm.convert` keeps it).
    pub quantize_vision: bool,
    /// Float deltas `[out, in]` added to the named weights (Hugging Face names and row order,
    /// e.g. `model.layers.0.self_attn.q_proj.weight`) before casting and quantizing: LoRA
    /// fusion ([`crate::lora::Adapter::deltas`]). A quantized source layer with a delta is
    /// dequantized first.
    pub weight_deltas: HashMap<String, Tensor>,
}

/// Progress of a conversion, for a progress bar.
#[derive(Debug, Clone)]
pub enum ConvertEvent {
    /// Conversion starts; `tensors` source tensors will be processed.
    Begin {
        /// Number of source tensors (a quantized layer counts once).
        tensors: usize,
    },
    /// Tensor `index` (0-based) of the source, by Hugging Face name, is done.
    Tensor {
        /// Position in the source order.
        index: usize,
        /// Hugging Face name.
        name: String,
    },
}

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    /// The output folder.
    pub out: PathBuf,
    /// Tensors written (weights, scales and biases counted separately).
    pub tensors_written: usize,
    /// Layers written MLX-quantized.
    pub quantized_layers: usize,
    /// Bytes of safetensors written.
    pub weight_bytes: u64,
}

/// Parses a dtype name as the CLI gives it: `f32`/`float32`, `f16`/`float16`,
/// `bf16`/`bfloat16`.
///
/// Errors: [`Error::InvalidArgument`] for other names.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(Error::InvalidArgument(format!(
            "unknown dtype `{s}` (expected f32, f16 or bf16)"
        ))),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Where the tensors come from.
enum Source {
    Gguf {
        file: GgufFile,
        /// Hugging Face name -> GGUF name.
        names: Vec<(String, String)>,
        /// Row order of the q/k projections in the file.
        qk_rows: QkRowOrder,
        n_heads: usize,
        n_kv_heads: usize,
    },
    Folder {
        weights: SafetensorsWeights,
        /// Layer prefixes that are MLX quantized, and the plain tensor names, in order.
        items: Vec<Item>,
    },
}

enum Item {
    Plain(String),
    Quantized(String),
    /// A stack of per-expert float weights (`parts`, expert order) written as one
    /// `[n_experts, out, in]` tensor `name` ([`stack_experts`]).
    Experts {
        name: String,
        parts: Vec<String>,
    },
    /// A float tensor that mlx-lm's `sanitize` rewrites into others ([`sanitized`]).
    Derived(String),
}

/// `config.json`'s `model_type` (`""` when missing).
fn model_type(config: &serde_json::Value) -> &str {
    config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
}

/// Whether `model_type` is DeepSeek-V3's architecture (multi-head latent attention with a
/// `MoEGate` router), whose mlx-lm module rewrites `kv_b_proj`, keeps the router in float and
/// its correction bias in its own dtype.
fn is_deepseek_v3(model_type: &str) -> bool {
    matches!(model_type, "deepseek_v3" | "kimi_k2")
}

/// Whether `model_type` is Qwen3.5's (dense or MoE; the text config's type or the wrapper's),
/// whose mlx-lm modules (`qwen3_5.py`, `qwen3_5_moe.py`) hold the text model under
/// `language_model.`.
fn is_qwen3_5(model_type: &str) -> bool {
    matches!(
        model_type,
        "qwen3_5" | "qwen3_5_text" | "qwen3_5_moe" | "qwen3_5_moe_text"
    )
}

/// The norms whose weights Qwen3.5's Hugging Face checkpoints store zero-centred (the layer
/// computes `1 + w`) and mlx-lm's `qwen3_5.py` `sanitize` stores as `1 + w`: its `norm_keys`
/// (not the DeltaNet's gated `linear_attn.norm`).
const QWEN3_5_SHIFTED_NORMS: &[&str] = &[
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
];

/// Whether mlx-lm's `sanitize` of `model_type` rewrites the float tensor `name` ([`sanitized`]).
/// `hf_qwen3_5`: a Qwen3.5 folder in Hugging Face's layout (a DeltaNet `conv1d.weight` of
/// shape `[channels, 1, kernel]`, mlx-lm's `has_unsanitized_conv1d`), whose convolutions and
/// zero-centred norms mlx-lm rewrites.
fn rewritten(model_type: &str, name: &str, hf_qwen3_5: bool) -> bool {
    match model_type {
        m if is_deepseek_v3(m) => name.ends_with(".self_attn.kv_b_proj.weight"),
        m if is_qwen3_5(m) => {
            name.ends_with(".mlp.experts.gate_up_proj")
                || name.ends_with(".mlp.experts.down_proj")
                || (hf_qwen3_5
                    && (name.ends_with(".linear_attn.conv1d.weight")
                        || QWEN3_5_SHIFTED_NORMS.iter().any(|s| name.ends_with(s))))
        }
        "gpt_oss" => [
            ".mlp.experts.gate_up_proj",
            ".mlp.experts.gate_up_proj_bias",
            ".mlp.experts.down_proj",
            ".mlp.experts.down_proj_bias",
        ]
        .iter()
        .any(|s| name.ends_with(s)),
        "gemma4" | "gemma4_text" => [".experts.gate_up_proj", ".experts.down_proj"]
            .iter()
            .any(|s| name.ends_with(s)),
        _ => false,
    }
}

/// The tensors mlx-lm's `sanitize` makes of the float tensor `name` (`t`, in its dtype) of a
/// `model_type` model where [`rewritten`]:
/// - DeepSeek-V3 (`deepseek_v3.py`): `kv_b_proj` -> `embed_q`, `unembed_out` ([`split_kv_b`]).
/// - gpt-oss (`gpt_oss.py`): transformers' `experts.gate_up_proj` `[experts, hidden, 2 · inter]`
///   (gate and up columns interleaved) -> `experts.gate_proj.weight` / `experts.up_proj.weight`
///   `[experts, inter, hidden]` (even / odd columns, transposed), its bias likewise into
///   `experts.{gate,up}_proj.bias`; `experts.down_proj` `[experts, inter, hidden]` ->
///   `experts.down_proj.weight` `[experts, hidden, inter]`, `down_proj_bias` -> `.bias`.
/// - Gemma 4 (`gemma4_text.py`): `experts.gate_up_proj` `[experts, 2 · inter, hidden]` (gate
///   rows first) -> `experts.switch_glu.{gate,up}_proj.weight`; `experts.down_proj` ->
///   `experts.switch_glu.down_proj.weight`.
/// - Qwen3.5 (`qwen3_5.py`, `qwen3_5_moe.py`): the fused `mlp.experts.gate_up_proj` likewise
///   -> `mlp.switch_mlp.{gate,up}_proj.weight`, `mlp.experts.down_proj` ->
///   `mlp.switch_mlp.down_proj.weight`; the DeltaNet's `conv1d.weight` `[channels, 1, kernel]`
///   -> `[channels, kernel, 1]`; the zero-centred norms ([`QWEN3_5_SHIFTED_NORMS`]) -> `1 + w`,
///   rounded to their own dtype (mlx-lm adds in the checkpoint's dtype before any cast).
///
/// Errors: [`Error::Tensor`] naming `name` for a shape the rewrite does not fit.
fn sanitized(
    config: &serde_json::Value,
    model_type: &str,
    name: &str,
    t: Tensor,
) -> Result<Vec<(String, Tensor)>> {
    let err = |e: candle_core::Error| Error::tensor(name, format!("rewriting as mlx-lm: {e}"));
    // Even and odd positions of the last dimension.
    let deinterleave = |t: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
        let mut d = t.dims().to_vec();
        let n = d.pop().unwrap_or(0);
        d.extend([n / 2, 2]);
        let t = t.reshape(d.as_slice())?;
        let last = d.len() - 1;
        Ok((
            t.narrow(last, 0, 1)?.squeeze(last)?,
            t.narrow(last, 1, 1)?.squeeze(last)?,
        ))
    };
    let base = |suffix: &str| name.strip_suffix(suffix).unwrap_or(name).to_string();
    Ok(match model_type {
        m if is_deepseek_v3(m) => {
            let (embed_q, unembed_out) = split_kv_b(config, name, t)?;
            let p = base("kv_b_proj.weight");
            vec![
                (format!("{p}embed_q.weight"), embed_q),
                (format!("{p}unembed_out.weight"), unembed_out),
            ]
        }
        "gpt_oss" if name.ends_with("gate_up_proj") => {
            let p = base("gate_up_proj");
            let (g, u) = deinterleave(&t).map_err(err)?;
            let tr = |x: Tensor| x.transpose(1, 2).and_then(|x| x.contiguous());
            vec![
                (format!("{p}gate_proj.weight"), tr(g).map_err(err)?),
                (format!("{p}up_proj.weight"), tr(u).map_err(err)?),
            ]
        }
        "gpt_oss" if name.ends_with("gate_up_proj_bias") => {
            let p = base("gate_up_proj_bias");
            let (g, u) = deinterleave(&t).map_err(err)?;
            let c = |x: Tensor| x.contiguous();
            vec![
                (format!("{p}gate_proj.bias"), c(g).map_err(err)?),
                (format!("{p}up_proj.bias"), c(u).map_err(err)?),
            ]
        }
        "gpt_oss" if name.ends_with("down_proj") => {
            let p = base("down_proj");
            let w = t
                .transpose(1, 2)
                .and_then(|x| x.contiguous())
                .map_err(err)?;
            vec![(format!("{p}down_proj.weight"), w)]
        }
        "gpt_oss" => vec![(format!("{}down_proj.bias", base("down_proj_bias")), t)],
        m if is_qwen3_5(m) && name.ends_with(".linear_attn.conv1d.weight") => {
            let w = t
                .transpose(1, 2)
                .and_then(|x| x.contiguous())
                .map_err(err)?;
            vec![(name.to_string(), w)]
        }
        m if is_qwen3_5(m) && QWEN3_5_SHIFTED_NORMS.iter().any(|s| name.ends_with(s)) => {
            vec![(name.to_string(), t.affine(1.0, 1.0).map_err(err)?)]
        }
        _ if name.ends_with("gate_up_proj") => {
            // Gemma 4: `{p}.experts.switch_glu.*`; Qwen3.5: `{p}.mlp.switch_mlp.*`.
            let (p, glu) = if is_qwen3_5(model_type) {
                (base("experts.gate_up_proj"), "switch_mlp")
            } else {
                (base("gate_up_proj"), "switch_glu")
            };
            let (_, rows, _) = t.dims3().map_err(err)?;
            let half = |i: usize| {
                t.narrow(1, i * rows / 2, rows / 2)
                    .and_then(|x| x.contiguous())
            };
            vec![
                (format!("{p}{glu}.gate_proj.weight"), half(0).map_err(err)?),
                (format!("{p}{glu}.up_proj.weight"), half(1).map_err(err)?),
            ]
        }
        m if is_qwen3_5(m) => vec![(
            format!("{}switch_mlp.down_proj.weight", base("experts.down_proj")),
            t,
        )],
        _ => vec![(
            format!("{}switch_glu.down_proj.weight", base("down_proj")),
            t,
        )],
    })
}

/// mlx-lm's `deepseek_v3.py` `sanitize` of `kv_b_proj` (`w: [heads · (qk_nope + v), kv_lora_rank]`
/// from `config`'s `num_attention_heads`, `qk_nope_head_dim`, `v_head_dim`): `embed_q` `[heads,
/// kv_lora_rank, qk_nope]` (each head's key rows, transposed) and `unembed_out` `[heads, v,
/// kv_lora_rank]` (its value rows), in `w`'s dtype.
///
/// Errors: [`Error::Tensor`] naming `name` when `w` does not have that shape.
fn split_kv_b(config: &serde_json::Value, name: &str, w: Tensor) -> Result<(Tensor, Tensor)> {
    let get = |k: &str| config.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    let (Some(heads), Some(nope), Some(v)) = (
        get("num_attention_heads"),
        get("qk_nope_head_dim"),
        get("v_head_dim"),
    ) else {
        return Err(Error::tensor(
            name,
            "config.json lacks num_attention_heads, qk_nope_head_dim or v_head_dim",
        ));
    };
    let split = || -> candle_core::Result<(Tensor, Tensor)> {
        let (_, rank) = w.dims2()?;
        let w = w.reshape((heads, nope + v, rank))?;
        let wk = w.narrow(1, 0, nope)?.transpose(1, 2)?.contiguous()?;
        let wv = w.narrow(1, nope, v)?.contiguous()?;
        Ok((wk, wv))
    };
    split().map_err(|e| {
        Error::tensor(
            name,
            format!(
                "splitting into embed_q / unembed_out ({heads} heads of {nope} + {v} rows): {e}"
            ),
        )
    })
}

/// Model types whose mlx-lm `sanitize` stacks Hugging Face's per-expert weights
/// `{p}.mlp.experts.{e}.{gate,up,down}_proj.weight` into `{p}.mlp.switch_mlp.{...}.weight`
/// `[n_experts, out, in]` (`qwen3_moe.py`, `qwen2_moe.py`, `deepseek_v3.py`), the layout
/// `mlx_lm.convert` writes and `mlx_lm.load` expects.
const STACKED_EXPERT_TYPES: &[&str] = &[
    "qwen3_moe",
    "qwen2_moe",
    "deepseek_v3",
    "kimi_k2",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
];

/// [`stack_experts`], after which the float tensors that mlx-lm's `sanitize` rewrites
/// ([`rewritten`]) become [`Item::Derived`].
///
/// Errors: those of [`stack_experts`]; a tensor of `weights` whose header cannot be read.
fn mlx_layout(
    items: Vec<Item>,
    config: &serde_json::Value,
    weights: &SafetensorsWeights,
) -> Result<Vec<Item>> {
    let model_type = model_type(config);
    let mut hf_qwen3_5 = false;
    if is_qwen3_5(model_type) {
        for n in weights.names() {
            if n.ends_with(".linear_attn.conv1d.weight")
                && weights.info(n)?.0.last().is_some_and(|&k| k != 1)
            {
                hf_qwen3_5 = true;
            }
        }
    }
    Ok(stack_experts(items, model_type)?
        .into_iter()
        .map(|item| match item {
            Item::Plain(n) if rewritten(model_type, &n, hf_qwen3_5) => Item::Derived(n),
            other => other,
        })
        .collect())
}

/// Whether a folder of `config` with tensors `names` is written as mlx-lm's Qwen3.5 modules
/// hold it: a text-only Qwen3.5 folder (no `text_config`, names not yet under
/// `language_model.`), whose tensors mlx-lm's `sanitize` moves under `language_model.` and
/// whose config it reads as `{"model_type": "qwen3_5[_moe]", "text_config": ...}`.
fn wraps_qwen3_5_text(config: &serde_json::Value, names: &[&str]) -> bool {
    is_qwen3_5(model_type(config))
        && config.get("text_config").is_none()
        && !names.iter().any(|n| n.starts_with("language_model."))
}

/// mlx-lm's config.json for a text-only Qwen3.5 folder's `config` ([`wraps_qwen3_5_text`]):
/// `model_type` `qwen3_5_moe` (with experts) or `qwen3_5`, the text config under
/// `text_config`, `tie_word_embeddings` and `eos_token_id` beside it, and the quantization
/// (already in `config`, its layer paths under `language_model.`) at the top.
fn qwen3_5_wrapper_config(mut config: serde_json::Value) -> serde_json::Value {
    let Some(obj) = config.as_object_mut() else {
        return config;
    };
    let mut top = serde_json::Map::new();
    for k in ["quantization", "quantization_config", "torch_dtype"] {
        if let Some(v) = obj.remove(k) {
            top.insert(k.into(), v);
        }
    }
    for k in ["tie_word_embeddings", "eos_token_id"] {
        if let Some(v) = obj.get(k) {
            top.insert(k.into(), v.clone());
        }
    }
    let experts = obj.get("num_experts").and_then(|v| v.as_u64()).unwrap_or(0);
    let wrapper = if experts > 0 {
        "qwen3_5_moe"
    } else {
        "qwen3_5"
    };
    top.insert("model_type".into(), wrapper.into());
    top.insert("text_config".into(), config);
    serde_json::Value::Object(top)
}

/// `items` of a model in [`STACKED_EXPERT_TYPES`] with the float per-expert weights replaced
/// by one [`Item::Experts`] per layer and projection (at the place of expert 0). Other
/// models, and weights already quantized, are left as they are.
///
/// Errors: [`Error::Model`] naming the layer when its experts are not numbered `0..n`.
fn stack_experts(items: Vec<Item>, model_type: &str) -> Result<Vec<Item>> {
    if !STACKED_EXPERT_TYPES.contains(&model_type) {
        return Ok(items);
    }
    // `{p}.mlp.experts.{e}.{proj}.weight` -> (`{p}.mlp.switch_mlp.{proj}.weight`, e).
    let split = |name: &str| -> Option<(String, usize)> {
        let rest = name.strip_suffix(".weight")?;
        let (head, proj) = rest.rsplit_once('.')?;
        let (p, e) = head.rsplit_once(".mlp.experts.")?;
        let e = e.parse::<usize>().ok()?;
        Some((format!("{p}.mlp.switch_mlp.{proj}.weight"), e))
    };
    let mut groups: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    for item in &items {
        if let Item::Plain(n) = item {
            if let Some((stacked, e)) = split(n) {
                groups.entry(stacked).or_default().push((e, n.clone()));
            }
        }
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Item::Plain(n) = &item else {
            out.push(item);
            continue;
        };
        let Some((stacked, e)) = split(n) else {
            out.push(item);
            continue;
        };
        if e != 0 {
            continue;
        }
        let mut parts = groups.remove(&stacked).unwrap_or_default();
        parts.sort();
        if parts.iter().enumerate().any(|(i, (e, _))| *e != i) {
            return Err(Error::Model(format!(
                "{stacked}: the experts are not numbered 0..{} (have {:?})",
                parts.len(),
                parts.iter().map(|(e, _)| *e).collect::<Vec<_>>()
            )));
        }
        out.push(Item::Experts {
            name: stacked,
            parts: parts.into_iter().map(|(_, n)| n).collect(),
        });
    }
    Ok(out)
}

/// Converts `src` (a `.gguf` file or a model folder) into an MLX-format folder `out`, which
/// must not exist. `progress` is called as tensors are done.
///
/// Errors: [`Error::InvalidArgument`] when `out` exists or `dtype` is not a float type;
/// everything loading `src` can return (unsupported architecture, malformed files, tensors);
/// [`Error::Io`] writing.
pub fn convert(
    src: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(ConvertEvent),
) -> Result<ConvertSummary> {
    if let Some(d) = opts.dtype {
        if !matches!(d, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::InvalidArgument(format!(
                "output dtype {d:?} is not f32, f16 or bf16"
            )));
        }
    }
    if out.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} already exists; give a new folder",
            out.display()
        )));
    }
    let meta = std::fs::metadata(src).map_err(|e| Error::io(src, e))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".pocketlm-convert-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;

    let (mut config, source) = if meta.is_dir() {
        open_folder(src)?
    } else {
        open_gguf(src)?
    };
    let default_dtype = match source {
        Source::Gguf { .. } => Some(DType::F16),
        Source::Folder { .. } => None,
    };
    let out_dtype = opts.dtype.or(default_dtype);
    let hf_names: Vec<&str> = match &source {
        Source::Gguf { names, .. } => names.iter().map(|(hf, _)| hf.as_str()).collect(),
        Source::Folder { items, .. } => items
            .iter()
            .map(|i| match i {
                Item::Plain(n)
                | Item::Quantized(n)
                | Item::Derived(n)
                | Item::Experts { name: n, .. } => n.as_str(),
            })
            .collect(),
    };
    let plan = QuantPlan::new(opts, &hf_names, &config)?;
    // Per-layer entries for config.json: layers whose parameters differ from the defaults, and
    // `None` for candidate layers kept in float.
    let mut layer_overrides: HashMap<String, Option<LayerQuant>> = HashMap::new();

    let mut writer = ShardWriter::new(
        tmp.path().to_path_buf(),
        opts.max_shard_bytes.unwrap_or(MAX_SHARD_BYTES),
    );
    let mut quantized_layers = 0;
    let src_quant = match &source {
        Source::Folder { weights, .. } => weights.quant_config().cloned(),
        Source::Gguf { .. } => None,
    };
    let keep_source_quant = !opts.dequantize && opts.quantize.is_none();
    let total = match &source {
        Source::Gguf { names, .. } => names.len(),
        Source::Folder { items, .. } => items.len(),
    };
    progress(ConvertEvent::Begin { tensors: total });

    // Float tensors on their way out: cast, then maybe quantize.
    let mut deltas_used = 0usize;
    // By canonical name, so that an adapter of a wrapped model's text layers fuses into any
    // layout of the same weights (`crate::models::canonical_name`).
    let deltas: HashMap<String, &Tensor> = opts
        .weight_deltas
        .iter()
        .map(|(k, v)| (crate::models::canonical_name(k), v))
        .collect();
    // Weights mlx-lm's `cast_predicate` leaves in their own dtype (DeepSeek-V3's router
    // correction bias).
    let model_type = model_type(&config).to_string();
    let deepseek = is_deepseek_v3(&model_type);
    let qwen3_5 = is_qwen3_5(&model_type);
    // mlx-lm's `cast_predicate`s: DeepSeek-V3's router correction bias, Qwen3.5's `A_log`.
    let keeps_dtype = |n: &str| {
        (deepseek && n.ends_with(".e_score_correction_bias")) || (qwen3_5 && n.ends_with(".A_log"))
    };
    // Output names: a text-only Qwen3.5 folder goes under `language_model.`, as mlx-lm holds it.
    let wrap = matches!(source, Source::Folder { .. }) && wraps_qwen3_5_text(&config, &hf_names);
    let out_name = |n: &str| -> String {
        if wrap {
            format!("language_model.{n}")
        } else {
            n.to_string()
        }
    };
    let mut emit_float = |name: &str, t: Tensor, w: &mut ShardWriter| -> Result<bool> {
        let t = match deltas.get(&crate::models::canonical_name(name)) {
            Some(d) => {
                deltas_used += 1;
                // Rounded once, to the output dtype (the source's when none is asked for, as
                // mlx-lm's `fuse` rounds to the weight's dtype).
                let dt = out_dtype.unwrap_or(t.dtype());
                (t.to_dtype(DType::F32)? + d.to_device(t.device())?)
                    .map_err(|e| Error::tensor(name, format!("adding the LoRA delta: {e}")))?
                    .to_dtype(dt)?
            }
            None => t,
        };
        let t = match out_dtype {
            Some(d) if !keeps_dtype(name) => t.to_dtype(d)?,
            _ => t,
        };
        if let Some(plan) = &plan {
            if let Some(prefix) =
                quantizable(name, &t, plan.default.group_size, opts.quantize_vision)
                    .filter(|p| plan.candidate(p))
            {
                let chosen = plan.for_layer(prefix, t.dims())?;
                if chosen != Some(plan.default_layer()) {
                    layer_overrides.insert(out_name(prefix), chosen);
                }
                let prefix = out_name(prefix);
                if let Some(lq) = chosen {
                    let p = lq.params;
                    match lq.mode {
                        QuantMode::Affine => {
                            let (qw, s, b) = quantize_tensor(&t, p.group_size, p.bits)
                                .map_err(|e| Error::tensor(name, e.to_string()))?;
                            w.add(format!("{prefix}.weight"), qw)?;
                            w.add(format!("{prefix}.scales"), s)?;
                            w.add(format!("{prefix}.biases"), b)?;
                        }
                        QuantMode::Fp(mode) => {
                            let (qw, s) = mlx_fp::quantize_tensor(&t, mode)
                                .map_err(|e| Error::tensor(name, e.to_string()))?;
                            w.add(format!("{prefix}.weight"), qw)?;
                            w.add(format!("{prefix}.scales"), s)?;
                        }
                    }
                    return Ok(true);
                }
            }
        }
        w.add(out_name(name), t)?;
        Ok(false)
    };

    match &source {
        Source::Gguf {
            file,
            names,
            qk_rows,
            n_heads,
            n_kv_heads,
        } => {
            for (i, (hf, g)) in names.iter().enumerate() {
                let dims = file.tensor_dims(g)?;
                let mut t = file.tensor_f32(g, &dims, &Device::Cpu)?;
                if hf.ends_with("self_attn.q_proj.weight") {
                    t = qk_rows.to_hf(&t, *n_heads, hf)?;
                } else if hf.ends_with("self_attn.k_proj.weight") {
                    t = qk_rows.to_hf(&t, *n_kv_heads, hf)?;
                }
                quantized_layers += usize::from(emit_float(hf, t, &mut writer)?);
                progress(ConvertEvent::Tensor {
                    index: i,
                    name: hf.clone(),
                });
            }
        }
        Source::Folder { weights, items } => {
            for (i, item) in items.iter().enumerate() {
                let name = match item {
                    Item::Plain(name) => {
                        // F32 / F16 / BF16 only; other dtypes are an error naming the tensor.
                        let t = weights.float(name, None)?;
                        quantized_layers += usize::from(emit_float(name, t, &mut writer)?);
                        name.clone()
                    }
                    Item::Experts { name, parts } => {
                        let ts = parts
                            .iter()
                            .map(|n| weights.float(n, None))
                            .collect::<Result<Vec<_>>>()?;
                        let t = Tensor::stack(&ts, 0)
                            .map_err(|e| Error::tensor(name, format!("stacking experts: {e}")))?;
                        quantized_layers += usize::from(emit_float(name, t, &mut writer)?);
                        name.clone()
                    }
                    Item::Derived(name) => {
                        let t = weights.float(name, None)?;
                        // A LoRA delta to fuse keeps the tensor as it is (our loader reads
                        // either layout).
                        let out = if deltas.contains_key(&crate::models::canonical_name(name)) {
                            vec![(name.clone(), t)]
                        } else {
                            sanitized(&config, &model_type, name, t)?
                        };
                        for (n, t) in out {
                            quantized_layers += usize::from(emit_float(&n, t, &mut writer)?);
                        }
                        name.clone()
                    }
                    Item::Quantized(prefix) => {
                        let (wn, sn, bn) = (
                            format!("{prefix}.weight"),
                            format!("{prefix}.scales"),
                            format!("{prefix}.biases"),
                        );
                        let fp_mode = fp_source_mode(weights, &wn, &sn)?;
                        if keep_source_quant
                            && !deltas.contains_key(&crate::models::canonical_name(&wn))
                        {
                            for n in [&wn, &sn, &bn] {
                                if fp_mode.is_none() || weights.contains(n) {
                                    writer.add(out_name(n), weights.raw(n, None)?)?;
                                }
                            }
                            quantized_layers += 1;
                        } else if let Some(mode) = fp_mode {
                            // As mlx-lm's `dequantize_model`: `mx.dequantize`'s default, bf16
                            // (exact for these modes), then the output dtype.
                            let t = mlx_fp::dequantize_tensor(
                                &weights.raw(&wn, None)?,
                                &weights.raw(&sn, None)?,
                                mode,
                                ParamDtype::BF16,
                            )
                            .map_err(|e| Error::tensor(prefix, e.to_string()))?;
                            quantized_layers += usize::from(emit_float(&wn, t, &mut writer)?);
                        } else {
                            let p = src_quant
                                .as_ref()
                                .and_then(|q| q.for_layer(prefix))
                                .map(|lq| lq.params)
                                .ok_or_else(|| {
                                    Error::tensor(
                                        &sn,
                                        "exists but config.json gives no quantization for the layer",
                                    )
                                })?;
                            let t = dequantize_tensor(
                                &weights.raw(&wn, None)?,
                                &weights.float(&sn, None)?,
                                &weights.float(&bn, None)?,
                                p.group_size,
                                p.bits,
                            )
                            .map_err(|e| Error::tensor(prefix, e.to_string()))?;
                            quantized_layers += usize::from(emit_float(&wn, t, &mut writer)?);
                        }
                        wn
                    }
                };
                progress(ConvertEvent::Tensor { index: i, name });
            }
        }
    }
    let (tensors_written, weight_bytes) = writer.finish()?;
    if deltas_used != opts.weight_deltas.len() {
        let mut names: Vec<&String> = opts.weight_deltas.keys().collect();
        names.sort();
        return Err(Error::InvalidArgument(format!(
            "{} of {} weight deltas name no weight of {} (e.g. {:?})",
            opts.weight_deltas.len() - deltas_used,
            opts.weight_deltas.len(),
            src.display(),
            names.first()
        )));
    }

    // config.json
    if let Some(obj) = config.as_object_mut() {
        obj.remove("quantization");
        obj.remove("quantization_config");
        obj.remove("rope_freq_factors");
        if let Some(p) = opts.quantize {
            let q = QuantConfig {
                default: p,
                mode: opts.q_mode,
                overrides: layer_overrides,
            }
            .to_json();
            obj.insert("quantization".into(), q.clone());
            obj.insert("quantization_config".into(), q);
        } else if keep_source_quant {
            if let Some(q) = &src_quant {
                obj.insert("quantization".into(), q.to_json());
                obj.insert("quantization_config".into(), q.to_json());
            }
        }
        if let Some(d) = out_dtype {
            obj.insert("torch_dtype".into(), dtype_name(d).into());
        }
    }
    if wrap {
        config = qwen3_5_wrapper_config(config);
    }
    write_json(&tmp.path().join("config.json"), &config)?;

    match &source {
        Source::Folder { .. } => {
            for f in TOKENIZER_FILES {
                let p = src.join(f);
                if p.is_file() {
                    let dst = tmp.path().join(f);
                    std::fs::copy(&p, &dst).map_err(|e| Error::io(&dst, e))?;
                }
            }
        }
        Source::Gguf { file, .. } => write_gguf_tokenizer(file, &config, tmp.path())?,
    }

    open_permissions(tmp.path())?;
    let kept = tmp.keep();
    if let Err(e) = std::fs::rename(&kept, out) {
        let _ = std::fs::remove_dir_all(&kept);
        return Err(Error::io(out, e));
    }
    Ok(ConvertSummary {
        out: out.to_path_buf(),
        tensors_written,
        quantized_layers,
        weight_bytes,
    })
}

/// The layer prefix when `name` is a 2-D `*.weight` whose last dimension is a multiple of
/// `group_size` (mlx-lm quantizes exactly the `Linear` / `Embedding` layers; norms are 1-D).
///
/// A vision-language model's vision tower (`visual.*`, `model.visual.*`, `vision_tower.*`)
/// stays in float unless `vision` is set, as `mlx_vlm.convert` does.
fn quantizable<'a>(name: &'a str, t: &Tensor, group_size: usize, vision: bool) -> Option<&'a str> {
    let prefix = name.strip_suffix(".weight")?;
    if !vision && is_vision_tower(name) {
        return None;
    }
    quantizable_shape(prefix, t.dims(), group_size).then_some(prefix)
}

/// Whether layer `prefix` of weight shape `dims` is one mlx-lm quantizes: a 2-D `Linear` /
/// `Embedding`, or a 3-D stack of experts (`SwitchLinear`: `switch_mlp`, `switch_glu`,
/// gpt-oss's `mlp.experts`) or of heads (DeepSeek-V3's `MultiLinear` `embed_q` /
/// `unembed_out`), with the last dimension a multiple of `group_size`.
fn quantizable_shape(prefix: &str, dims: &[usize], group_size: usize) -> bool {
    let stacked = [".switch_mlp.", ".switch_glu.", ".mlp.experts."]
        .iter()
        .any(|s| prefix.contains(s))
        || [".embed_q", ".unembed_out"]
            .iter()
            .any(|s| prefix.ends_with(s));
    let rank_ok = dims.len() == 2 || (dims.len() == 3 && stacked);
    rank_ok && dims.last().is_some_and(|c| c.is_multiple_of(group_size))
}

/// Whether a tensor belongs to a vision tower (Qwen2-VL `visual.*` and its other spellings).
pub fn is_vision_tower(name: &str) -> bool {
    ["visual.", "model.visual.", "vision_tower."]
        .iter()
        .any(|p| name.starts_with(p))
}

/// The mode of a quantized source layer: `Some` for a float mode (uint8 `scales`; which one
/// from the shapes, as mlx-lm's `infer_quant_config`), `None` for affine.
///
/// Errors: [`Error::Tensor`] for uint8 scales whose shape fits no float mode.
fn fp_source_mode(weights: &SafetensorsWeights, wn: &str, sn: &str) -> Result<Option<FpMode>> {
    let (sshape, sdt) = weights.info(sn)?;
    if sdt != "U8" {
        return Ok(None);
    }
    let (wshape, _) = weights.info(wn)?;
    let (w_last, s_last) = (
        wshape.last().copied().unwrap_or(0),
        sshape.last().copied().unwrap_or(0),
    );
    FpMode::ALL
        .into_iter()
        .find(|m| s_last > 0 && s_last * m.group_size() == w_last * 32 / m.bits())
        .map(Some)
        .ok_or_else(|| {
            Error::tensor(
                sn,
                format!(
                    "uint8 scales {sshape:?} with weight {wshape:?} fit no float quantization \
                     mode (mxfp4, mxfp8, nvfp4)"
                ),
            )
        })
}

/// The per-layer quantization decisions of one conversion.
struct QuantPlan {
    default: QuantParams,
    mode: QuantMode,
    /// The recipe, the position of the layer index in a layer path, and the layer count.
    recipe: Option<(QuantRecipe, usize, usize)>,
    /// Module-path suffixes of the layers the model's own `quant_predicate` in mlx-lm keeps
    /// at 8 bits, group 64 ([`router_suffixes`]); not used with a recipe (mlx-lm's recipe
    /// predicate replaces the model's).
    routers: &'static [&'static str],
    /// Module-path suffixes of 2-D weights that are not `Linear` layers in mlx-lm, so never
    /// quantized ([`float_layer_suffixes`]).
    float_layers: &'static [&'static str],
    overrides: Vec<QuantOverride>,
}

/// Weights of `config`'s architecture that mlx-lm keeps in float whatever the quantization,
/// because its module there is no `Linear`: DeepSeek-V3's router `mlp.gate` (`MoEGate`, a
/// plain weight) in `deepseek_v3.py`.
fn float_layer_suffixes(config: &serde_json::Value) -> &'static [&'static str] {
    if is_deepseek_v3(model_type(config)) {
        &["mlp.gate"]
    } else {
        &[]
    }
}

/// The layers that mlx-lm 0.32.2's `quant_predicate` of the architecture of `config` quantizes
/// at 8 bits with group size 64 instead of the default, by module-path suffix: the MoE
/// routers (`qwen3_moe.py` `mlp.gate`; `qwen3_5.py` with experts `mlp.gate` and
/// `mlp.shared_expert_gate`; `gemma4_text.py` `router.proj`; `gpt_oss.py` `mlp.router`).
/// Dense models and the other architectures: none (`deepseek_v3.py` and `lfm2.py` have no
/// `quant_predicate`).
fn router_suffixes(config: &serde_json::Value) -> &'static [&'static str] {
    let text = config.get("text_config").unwrap_or(config);
    let experts = text
        .get("num_experts")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    match model_type(config) {
        "qwen3_moe" => &["mlp.gate"],
        "qwen3_5" | "qwen3_5_text" | "qwen3_5_moe" | "qwen3_5_moe_text" if experts > 0 => {
            &["mlp.gate", "mlp.shared_expert_gate"]
        }
        "gemma4" | "gemma4_text" => &["router.proj"],
        "gpt_oss" => &["mlp.router"],
        _ => &[],
    }
}

impl QuantPlan {
    /// Whether layer `prefix` is a module mlx-lm could quantize at all (not one of the
    /// architecture's [`float_layer_suffixes`]).
    fn candidate(&self, prefix: &str) -> bool {
        !self
            .float_layers
            .iter()
            .any(|f| prefix == *f || prefix.ends_with(&format!(".{f}")))
    }

    /// The default layer quantization (params and mode).
    fn default_layer(&self) -> LayerQuant {
        LayerQuant {
            params: self.default,
            mode: self.mode,
        }
    }

    /// `names`: the source's Hugging Face tensor names (to find the layer index position as
    /// mlx-lm does: the first all-digit component of the first `down_proj` path);
    /// `config`: for `num_hidden_layers`.
    fn new(
        opts: &ConvertOptions,
        names: &[&str],
        config: &serde_json::Value,
    ) -> Result<Option<Self>> {
        let Some(default) = opts.quantize else {
            if opts.recipe.is_some() || !opts.overrides.is_empty() {
                return Err(Error::InvalidArgument(
                    "a quantization recipe or per-layer override needs quantization (-q)".into(),
                ));
            }
            return Ok(None);
        };
        opts.q_mode
            .check(default.group_size, default.bits)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if opts.recipe.is_some() && opts.q_mode != QuantMode::Affine {
            return Err(Error::InvalidArgument(format!(
                "mixed quantization recipes need affine quantization, not {} (as mlx-lm)",
                opts.q_mode
            )));
        }
        let recipe = match opts.recipe {
            None => None,
            Some(r) => {
                let location = names
                    .iter()
                    .find(|n| n.contains("down_proj"))
                    .and_then(|n| {
                        n.split('.')
                            .position(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .ok_or_else(|| {
                        Error::Model(
                            "the model has no `*.N.*down_proj` layers, which mixed quantization recipes need"
                                .into(),
                        )
                    })?;
                let text = config.get("text_config").unwrap_or(config);
                let layers = config
                    .get("num_hidden_layers")
                    .or_else(|| text.get("num_hidden_layers"))
                    .and_then(|v| v.as_u64())
                    .ok_or_else(|| {
                        Error::Model(
                            "config.json has no integer `num_hidden_layers` (needed by mixed quantization recipes)"
                                .into(),
                        )
                    })? as usize;
                Some((r, location, layers))
            }
        };
        Ok(Some(QuantPlan {
            default,
            mode: opts.q_mode,
            recipe,
            routers: router_suffixes(config),
            float_layers: float_layer_suffixes(config),
            overrides: opts.overrides.clone(),
        }))
    }

    /// The quantization of layer `prefix` with weight `dims`; `None` keeps it in float. As
    /// mlx-lm's `quantize_model`: only 2-D weights whose last dimension is a multiple of the
    /// default group size are candidates; then the recipe, or without one the model's own
    /// predicate (routers at 8 bits, group 64: [`router_suffixes`]; affine, as mlx-lm's
    /// per-layer dict), then the overrides decide.
    ///
    /// Errors: [`Error::Tensor`] when the chosen group size does not divide the last dimension,
    /// or the recipe finds no layer index in the path.
    fn for_layer(&self, prefix: &str, dims: &[usize]) -> Result<Option<LayerQuant>> {
        if !quantizable_shape(prefix, dims, self.default.group_size) {
            return Ok(None);
        }
        let mut p = Some(self.default_layer());
        if let Some((recipe, location, n)) = self.recipe {
            let parts: Vec<&str> = prefix.split('.').collect();
            let index = match parts.get(location) {
                None => 0,
                Some(c) => c.parse::<usize>().map_err(|_| {
                    Error::tensor(
                        prefix,
                        format!(
                            "mixed recipe: component {location} of the path is not a layer index"
                        ),
                    )
                })?,
            };
            let (index, n) = (index as i64, n as i64);
            let more = index < n / 8 || index >= 7 * n / 8 || (index - n / 8).rem_euclid(3) == 2;
            let (low, high) = recipe.bits();
            let high_layer = (more
                && ["v_proj", "v_a_proj", "v_b_proj", "down_proj"]
                    .iter()
                    .any(|k| prefix.contains(k)))
                || prefix.contains("lm_head");
            p = Some(LayerQuant::affine(QuantParams {
                group_size: self.default.group_size,
                bits: if high_layer { high } else { low },
            }));
        }
        let router = self
            .routers
            .iter()
            .any(|r| prefix == *r || prefix.ends_with(&format!(".{r}")));
        if self.recipe.is_none() && router {
            p = Some(LayerQuant::affine(QuantParams {
                group_size: 64,
                bits: 8,
            }));
        }
        if let Some(o) = self
            .overrides
            .iter()
            .rev()
            .find(|o| glob_match(&o.pattern, prefix))
        {
            p = o.params.map(LayerQuant::affine);
        }
        if let Some(q) = p.map(|lq| lq.params) {
            let last = dims.last().copied().unwrap_or(0);
            if !last.is_multiple_of(q.group_size) {
                return Err(Error::tensor(
                    format!("{prefix}.weight"),
                    format!(
                        "the last dimension {last} is not a multiple of the group size {}",
                        q.group_size
                    ),
                ));
            }
        }
        Ok(p)
    }
}

/// Reads the source folder. A transformers 5 config.json that has only `rope_parameters`
/// gets the top-level `rope_theta` (and `rope_scaling` for a rope type other than `default`)
/// that older readers look for ([`crate::loader::normalize_config`], also on a nested
/// `text_config`): mlx-lm 0.32.2 reads only `rope_theta` and silently uses base 10000 without
/// it.
fn open_folder(src: &Path) -> Result<(serde_json::Value, Source)> {
    let mut config = read_json(&src.join("config.json"))?.ok_or_else(|| {
        Error::Model(format!(
            "{}: not a model folder (no config.json)",
            src.display()
        ))
    })?;
    normalize_config(&mut config);
    if let Some(text) = config.get_mut("text_config") {
        normalize_config(text);
    }
    let weights = SafetensorsWeights::open_folder(src, &config, Device::Cpu)?;
    let mut items = Vec::new();
    let names: Vec<String> = weights.names().map(str::to_string).collect();
    for n in &names {
        if let Some(prefix) = n.strip_suffix(".weight") {
            if weights.contains(&format!("{prefix}.scales")) {
                items.push(Item::Quantized(prefix.to_string()));
                continue;
            }
        }
        let is_param = ["scales", "biases"].iter().any(|s| {
            n.strip_suffix(s)
                .and_then(|p| p.strip_suffix('.'))
                .is_some_and(|p| weights.contains(&format!("{p}.scales")))
        });
        if !is_param {
            items.push(Item::Plain(n.clone()));
        }
    }
    let items = mlx_layout(items, &config, &weights)?;
    Ok((config, Source::Folder { weights, items }))
}

fn open_gguf(src: &Path) -> Result<(serde_json::Value, Source)> {
    let file = GgufFile::open(src)?;
    let arch_name = file.architecture()?;
    let arch = models::by_gguf_architecture(&arch_name)?;
    if arch.model_types.first() != Some(&"llama") {
        return Err(Error::Model(format!(
            "{}: converting `{arch_name}` GGUF files is not supported (only llama)",
            src.display()
        )));
    }
    let mut config = (arch.config_from_gguf)(&file)?;
    if !config["rope_freq_factors"].is_null() {
        return Err(Error::Model(format!(
            "{}: `rope_freqs.weight` (Llama 3 RoPE scaling) has no config.json equivalent \
             here; converting this file is not supported",
            src.display()
        )));
    }
    let table = arch.gguf_name_table(&file)?;
    let mut names = Vec::new();
    let mut gnames: Vec<&str> = file.tensor_names().collect();
    gnames.sort_by_key(|n| sort_key(n));
    for g in gnames {
        if table.is_gguf_only(g) {
            continue;
        }
        let hf = table.to_hf(g, src)?;
        names.push((hf, g.to_string()));
    }
    let n_heads = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let n_kv_heads = config["num_key_value_heads"]
        .as_u64()
        .unwrap_or(n_heads as u64) as usize;
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        obj.insert("model_type".into(), "llama".into());
        if obj.get("rope_scaling").is_some_and(|v| v.is_null()) {
            obj.remove("rope_scaling");
        }
        if obj.get("sliding_window").is_some_and(|v| v.is_null()) {
            obj.remove("sliding_window");
        }
    }
    Ok((
        config,
        Source::Gguf {
            file,
            names,
            qk_rows: arch.gguf_qk_rows,
            n_heads,
            n_kv_heads,
        },
    ))
}

/// Orders GGUF names as `save_pretrained` would list them: by layer number, then name.
fn sort_key(name: &str) -> (usize, String) {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, _)| l.parse::<usize>().ok())
        .map_or(0, |l| l + 1);
    (layer, name.to_string())
}

/// Writes tokenizer.json (the GGUF vocabulary as a Hugging Face tokenizer),
/// tokenizer_config.json (BOS/EOS/UNK/PAD tokens, `add_bos_token` / `add_eos_token`, the chat
/// template) and generation_config.json (BOS/EOS ids), and adds `bos_token_id` /
/// `eos_token_id` to nothing else.
fn write_gguf_tokenizer(file: &GgufFile, config: &serde_json::Value, dir: &Path) -> Result<()> {
    let tok = Tokenizer::from_gguf_metadata(file.metadata())?;
    let p = dir.join("tokenizer.json");
    tok.inner()
        .save(&p, false)
        .map_err(|e| Error::Model(format!("{}: writing the tokenizer: {e}", p.display())))?;
    let name = |id: Option<u32>| id.and_then(|id| tok.id_to_token(id));
    let mut tc = serde_json::Map::new();
    tc.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    tc.insert("add_bos_token".into(), tok.add_bos().into());
    tc.insert("add_eos_token".into(), tok.add_eos().into());
    for (key, id) in [
        ("bos_token", tok.bos_token_id()),
        ("eos_token", tok.eos_token_id()),
        ("unk_token", tok.unk_token_id()),
        ("pad_token", tok.pad_token_id()),
    ] {
        if let Some(t) = name(id) {
            tc.insert(key.into(), t.into());
        }
    }
    if let Some(n) = config["max_position_embeddings"].as_u64() {
        tc.insert("model_max_length".into(), n.into());
    }
    if let Some(src) = file.opt_str("tokenizer.chat_template")? {
        // Compile it once so that a broken template fails here, not in the user's chat.
        ChatTemplate::new(
            &src,
            tok.bos_token().unwrap_or(""),
            tok.eos_token().unwrap_or(""),
        )?;
        tc.insert("chat_template".into(), src.into());
    }
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::Value::Object(tc),
    )?;
    let mut gc = serde_json::Map::new();
    if let Some(b) = tok.bos_token_id() {
        gc.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = tok.eos_token_id() {
        gc.insert("eos_token_id".into(), e.into());
    }
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::Value::Object(gc),
    )
}

/// Gives the output the usual permissions (the temporary directory and candle's safetensors
/// writer create owner-only entries): folder 0755, files 0644, on Unix.
fn open_permissions(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(p, e))
        };
        set(dir, 0o755)?;
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let p = e.map_err(|e| Error::io(dir, e))?.path();
            set(&p, 0o644)?;
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Accumulates tensors into shards of at most `max_bytes` (a larger single tensor gets a shard
/// of its own).
struct ShardWriter {
    dir: PathBuf,
    max_bytes: usize,
    current: HashMap<String, Tensor>,
    current_bytes: usize,
    /// Per shard written: the names it holds.
    shards: Vec<Vec<String>>,
    total_bytes: u64,
    count: usize,
}

impl ShardWriter {
    fn new(dir: PathBuf, max_bytes: usize) -> Self {
        Self {
            dir,
            max_bytes,
            current: HashMap::new(),
            current_bytes: 0,
            shards: Vec::new(),
            total_bytes: 0,
            count: 0,
        }
    }

    fn add(&mut self, name: String, t: Tensor) -> Result<()> {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if self.current_bytes + bytes > self.max_bytes && !self.current.is_empty() {
            self.flush()?;
        }
        self.current_bytes += bytes;
        self.total_bytes += bytes as u64;
        self.count += 1;
        self.current.insert(name, t);
        Ok(())
    }

    fn shard_tmp_name(i: usize) -> String {
        format!("shard-{i}.safetensors")
    }

    fn flush(&mut self) -> Result<()> {
        let p = self.dir.join(Self::shard_tmp_name(self.shards.len()));
        candle_core::safetensors::save(&self.current, &p)
            .map_err(|e| Error::Model(format!("{}: writing safetensors: {e}", p.display())))?;
        let mut names: Vec<String> = self.current.drain().map(|(k, _)| k).collect();
        names.sort();
        self.shards.push(names);
        self.current_bytes = 0;
        Ok(())
    }

    /// Writes the last shard, names the shards as mlx-lm does and writes the index.
    /// Returns (tensors written, bytes of tensor data).
    fn finish(mut self) -> Result<(usize, u64)> {
        if !self.current.is_empty() || self.shards.is_empty() {
            self.flush()?;
        }
        let n = self.shards.len();
        let mut weight_map = BTreeMap::new();
        for (i, names) in self.shards.iter().enumerate() {
            let final_name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            };
            let from = self.dir.join(Self::shard_tmp_name(i));
            let to = self.dir.join(&final_name);
            std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
            for name in names {
                weight_map.insert(name.clone(), final_name.clone());
            }
        }
        let index = serde_json::json!({
            "metadata": {"total_size": self.total_bytes},
            "weight_map": weight_map,
        });
        write_json(&self.dir.join(INDEX_FILE), &index)?;
        Ok((self.count, self.total_bytes))
    }
}
