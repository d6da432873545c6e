//! gpt-oss (OpenAI, 2025): pre-norm blocks with biased q/k/v/o projections, YaRN RoPE, attention
//! sinks (one learned logit per head that joins each softmax denominator), layers alternating
//! between a sliding window and full attention (`layer_types`), and a mixture of experts in
//! every layer: a biased router, top-k over its logits with the softmax over the chosen ones,
//! experts with biases and a clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`).
//!
//! Reference: Hugging Face `models/gpt_oss/modeling_gpt_oss.py` and
//! `configuration_gpt_oss.py` (transformers 5.24), mlx-lm `mlx_lm/models/gpt_oss.py`.
//!
//! Weights, from either form:
//! - transformers' `save_pretrained`: `mlp.experts.gate_up_proj` `[experts, hidden,
//!   2 · intermediate]` (the input axis first; gate and up columns interleaved: gate in the even
//!   ones), `gate_up_proj_bias` `[experts, 2 · intermediate]`, `down_proj` `[experts,
//!   intermediate, hidden]`, `down_proj_bias` `[experts, hidden]`;
//! - mlx-lm's `sanitize` output (its conversions): `mlp.experts.{gate,up,down}_proj` stacked
//!   `[experts, out, in]` (float, MLX affine or MXFP4 quantized) with `.bias` `[experts, out]`;
//! - the Hub's openai/gpt-oss checkpoints: MXFP4 `mlp.experts.{gate_up,down}_proj_blocks` u8
//!   `[experts, out, in / 32, 16]` (two E2M1 codes a byte, the low nibble first; `gate_up` rows
//!   interleaved gate, up) and `*_scales` u8 `[experts, out, in / 32]` (E8M0), with the fused
//!   biases above (transformers `integrations/mxfp4.py`, `convert_moe_packed_tensors`). The
//!   bytes are those of MLX's `mxfp4` words, so each expert becomes a [`Linear::MlxFp`] layer as
//!   it is (CPU; dequantized to f32 on other devices).
//!
//! The router is `mlp.router` `[experts, hidden]` with a bias, and `self_attn.sinks` `[heads]`.
//!
//! GGUF files of llama.cpp's converter (`gpt-oss`, `conversion/gpt_oss.py`) load through
//! [`GGUF_NAMES`] and [`config_from_gguf`]: experts stacked as mlx-lm's (`ffn_*_exps`, with
//! `.bias`), MXFP4 (ggml type 39) where the checkpoint was, read by [`crate::gguf::mxfp4`].

use std::sync::Arc;

use candle_core::Tensor;
use serde::Deserialize;

use crate::gguf::names::{self, NameTable};
use crate::gguf::GgufFile;
use crate::models::build::{self, ExpertShape};
use crate::models::decoder::Mlp;
use crate::models::llama::{LayerHooks, Llama, LlamaConfig, LlamaVariant};
use crate::models::CausalLM;
use crate::nn::{Activation, Attention, GateUp, GatedMlp, Linear, Moe, Router, Scoring};
use crate::quant::mlx_fp::{FpMode, FpQuantized};
use crate::weights::Weights;
use crate::{Error, Result};

/// Llama's layers with biases on q/k/v and o (mlx-lm builds them biased whatever
/// `attention_bias` says).
pub const VARIANT: LlamaVariant = LlamaVariant {
    name: "gpt_oss",
    qkv_bias: true,
    o_bias: true,
    ..LlamaVariant::LLAMA
};

/// GGUF tensor names of llama.cpp's `gpt-oss` (`llama-arch.cpp` `LLM_ARCH_OPENAI_MOE`): the
/// router `ffn_gate_inp`, the stacked experts `ffn_{gate,up,down}_exps` `[n_experts, out, in]`
/// with `.bias` `[n_experts, out]` (named as mlx-lm's stacked `mlp.experts.*_proj`), the sinks
/// `self_attn.sinks` as `attn_sinks.weight`, and `post_attention_norm` before the experts.
pub static GGUF_NAMES: NameTable = NameTable {
    name: "gpt-oss",
    global: names::GLOBAL,
    block: &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.sinks", "attn_sinks.weight"),
        ("mlp.router", "ffn_gate_inp"),
        ("mlp.experts.gate_proj", "ffn_gate_exps"),
        ("mlp.experts.up_proj", "ffn_up_exps"),
        ("mlp.experts.down_proj", "ffn_down_exps"),
    ],
    gguf_only: &[],
};

/// An HF-style gpt-oss config from the metadata of a GGUF `gpt-oss` file: the common keys
/// ([`super::gguf_config::common`]: YaRN, the window) plus the expert counts
/// ([`super::gguf_config::with_experts`]; each expert's width is `intermediate_size` here). Layer types: `{arch}.attention.sliding_window_pattern` when the
/// file has it, else every even layer slides (llama.cpp's `load_swa_pattern(ml, 2)`, as
/// transformers' default). The clamped SwiGLU keeps its defaults, which llama.cpp hard-codes.
///
/// Errors: a missing or mistyped key, naming the file.
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let mut c = super::gguf_config::with_experts(
        g,
        [
            "num_local_experts",
            "num_experts_per_tok",
            "intermediate_size",
        ],
    )?;
    let key = format!("{}.attention.sliding_window_pattern", g.architecture()?);
    let pattern = match g.has(&key) {
        true => Some(g.get_bool_array(&key)?),
        false => None,
    };
    let o = c
        .as_object_mut()
        .ok_or_else(|| Error::Model("gpt-oss GGUF config is not an object".into()))?;
    o.insert("model_type".into(), "gpt_oss".into());
    if let Some(p) = pattern {
        let types: Vec<&str> = p
            .iter()
            .map(|&s| {
                if s {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        o.insert("layer_types".into(), types.into());
    }
    Ok(c)
}

/// The gpt-oss fields of config.json (`GptOssConfig`); the rest is [`LlamaConfig`]
/// (`intermediate_size` there is each expert's inner width).
#[derive(Debug, Clone, Deserialize)]
pub struct GptOssConfig {
    /// Experts per layer (`num_experts` is transformers' alias).
    #[serde(alias = "num_experts")]
    pub num_local_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Per layer, `"sliding_attention"` or `"full_attention"`; without it, even layers slide
    /// and odd ones attend fully (transformers' `GptOssConfig.__post_init__`).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// The window of the sliding layers, in tokens.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// The clamped SwiGLU's sigmoid gain.
    #[serde(default = "default_alpha")]
    pub swiglu_alpha: f32,
    /// The clamped SwiGLU's limit.
    #[serde(default = "default_limit")]
    pub swiglu_limit: f32,
}

fn default_alpha() -> f32 {
    1.702
}

fn default_limit() -> f32 {
    7.0
}

impl GptOssConfig {
    /// Whether each of `n_layers` layers uses the sliding window.
    ///
    /// Errors: [`Error::Model`] naming `layer_types` when its length is not `n_layers` or an
    /// entry is neither `sliding_attention` nor `full_attention`, `sliding_window` when a
    /// layer slides without one, `num_experts_per_tok` when it is 0 or more than the experts.
    pub fn sliding_layers(&self, n_layers: usize) -> Result<Vec<bool>> {
        let bad = |f: &str, m: String| Err(Error::Model(format!("config field `{f}`: {m}")));
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_local_experts {
            return bad(
                "num_experts_per_tok",
                format!(
                    "{} must be between 1 and num_local_experts {}",
                    self.num_experts_per_tok, self.num_local_experts
                ),
            );
        }
        let sliding = match &self.layer_types {
            None => (0..n_layers).map(|i| i % 2 == 0).collect::<Vec<_>>(),
            Some(t) if t.len() != n_layers => {
                return bad(
                    "layer_types",
                    format!("{} entries for {n_layers} layers", t.len()),
                )
            }
            Some(t) => t
                .iter()
                .map(|s| match s.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(Error::Model(format!(
                        "config field `layer_types`: `{other}` is neither `sliding_attention` \
                         nor `full_attention`"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?,
        };
        if sliding.iter().any(|&s| s) && self.sliding_window.is_none_or(|w| w == 0) {
            return bad(
                "sliding_window",
                "a positive window is needed by the sliding layers".into(),
            );
        }
        Ok(sliding)
    }
}

/// Builds a gpt-oss model from an HF-style config and weights (`GptOssForCausalLM` names, or
/// mlx-lm's conversion of them).
///
/// Errors: [`Error::Model`] naming a missing or invalid config field; [`Error::Tensor`] naming a
/// missing or misshapen weight.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    let parse = |e: serde_json::Error| Error::Model(format!("config.json: {e}"));
    let oss: GptOssConfig = serde_json::from_value(config.clone()).map_err(parse)?;
    let mut config = config.clone();
    if let Some(o) = config.as_object_mut() {
        o.remove("sliding_window"); // per layer, through `layer_types`
    }
    let cfg: LlamaConfig = serde_json::from_value(config).map_err(parse)?;
    let sliding = oss.sliding_layers(cfg.num_hidden_layers)?;
    let n_heads = cfg.num_attention_heads;
    let shape = ExpertShape {
        n_experts: oss.num_local_experts,
        intermediate: cfg.intermediate_size,
        hidden: cfg.hidden_size,
    };
    let activation = Activation::SwigluOai {
        alpha: oss.swiglu_alpha,
        limit: oss.swiglu_limit,
    };
    let attn = |i: usize, p: &str, a: &mut Attention| -> Result<()> {
        a.window = if sliding[i] { oss.sliding_window } else { None };
        a.sinks = Some(w.tensor(&format!("{p}.self_attn.sinks"), &[n_heads])?);
        Ok(())
    };
    let mlp = |_: usize, p: &str| -> Result<Option<Mlp>> {
        let gate = w.linear(
            &format!("{p}.mlp.router"),
            shape.n_experts,
            shape.hidden,
            true,
        )?;
        Ok(Some(Mlp::Moe(Box::new(Moe {
            // Softmax over all experts, renormalized over the top-k: the softmax over the
            // top-k logits that transformers' `GptOssTopKRouter` computes (the same numbers
            // up to rounding).
            router: Router {
                gate,
                scoring: Scoring::Softmax,
                top_k: oss.num_experts_per_tok,
                norm_topk_prob: true,
                selection_bias: None,
                expert_scale: None,
                scale: 1.0,
                groups: None,
            },
            experts: experts(w, p, shape, activation)?,
            shared: None,
            kernels: Default::default(),
        }))))
    };
    let hooks = LayerHooks {
        mlp: &mlp,
        attn: &attn,
        ..LayerHooks::default()
    };
    Ok(Box::new(Llama::with_layers(cfg, w, VARIANT, &hooks)?))
}

/// The experts of block `p` with their biases, from mlx-lm's stacked
/// `{p}.mlp.experts.{gate,up,down}_proj` or transformers' fused `{p}.mlp.experts.gate_up_proj`
/// (see the module documentation).
///
/// Errors: a missing or misshapen weight, named.
fn experts(
    w: &dyn Weights,
    p: &str,
    shape: ExpertShape,
    activation: Activation,
) -> Result<Vec<GatedMlp>> {
    let ExpertShape {
        n_experts: n,
        intermediate: inter,
        hidden: h,
    } = shape;
    let q = format!("{p}.mlp.experts");
    let numerics = w.layout().numerics;
    let mlp = |gate, up, down_proj| GatedMlp {
        gate_up: GateUp::Separate { gate, up },
        down_proj,
        activation,
        numerics,
    };
    if let Some(e) = build::stacked_experts(w, &q, shape, true, activation, numerics)? {
        return Ok(e);
    }
    // transformers' fused layout: `x @ gate_up_proj[e] + bias`, columns gate, up, gate, ...
    let gate_up_b = w.tensor(&format!("{q}.gate_up_proj_bias"), &[n, 2 * inter])?;
    let down_b = w.tensor(&format!("{q}.down_proj_bias"), &[n, h])?;
    // [n, inter, 2]: index 0 of the last axis is the gate.
    let gate_up_b = gate_up_b.reshape((n, inter, 2))?;
    let bias = |e: usize, j: usize| -> Result<Tensor> {
        Ok(gate_up_b
            .get(e)?
            .narrow(1, j, 1)?
            .squeeze(1)?
            .contiguous()?)
    };
    if w.contains(&format!("{q}.gate_up_proj_blocks")) {
        let gate_up = Mxfp4Experts::read(w, &format!("{q}.gate_up_proj"), n, 2 * inter, h)?;
        let down = Mxfp4Experts::read(w, &format!("{q}.down_proj"), n, h, inter)?;
        let dev = w.device();
        let even: Vec<usize> = (0..inter).map(|r| 2 * r).collect();
        let odd: Vec<usize> = (0..inter).map(|r| 2 * r + 1).collect();
        let all: Vec<usize> = (0..h).collect();
        return (0..n)
            .map(|e| {
                let layer = |m: &Mxfp4Experts, rows: &[usize], b: Tensor| -> Result<Linear> {
                    Linear::mlx_fp_on(Arc::new(m.expert(e, rows)?), Some(b), dev)
                };
                Ok(mlp(
                    layer(&gate_up, &even, bias(e, 0)?)?,
                    layer(&gate_up, &odd, bias(e, 1)?)?,
                    layer(&down, &all, down_b.get(e)?)?,
                ))
            })
            .collect();
    }
    let gate_up = w.tensor(&format!("{q}.gate_up_proj"), &[n, h, 2 * inter])?;
    let down = w.tensor(&format!("{q}.down_proj"), &[n, inter, h])?;
    // [n, h, inter, 2]: index 0 of the last axis is the gate.
    let gate_up = gate_up.reshape((n, h, inter, 2))?;
    let half = |t: &Tensor, e: usize, j: usize| -> Result<Tensor> {
        Ok(t.get(e)?.narrow(2, j, 1)?.squeeze(2)?.t()?.contiguous()?)
    };
    (0..n)
        .map(|e| {
            Ok(mlp(
                Linear::dense(half(&gate_up, e, 0)?, Some(bias(e, 0)?)),
                Linear::dense(half(&gate_up, e, 1)?, Some(bias(e, 1)?)),
                Linear::dense(down.get(e)?.t()?.contiguous()?, Some(down_b.get(e)?)),
            ))
        })
        .collect()
}

/// The MXFP4 experts of one projection as the Hub's checkpoints store them: `{name}_blocks`
/// `[n, rows, cols / 32, 16]` and `{name}_scales` `[n, rows, cols / 32]`, both u8, rows the
/// output features.
struct Mxfp4Experts {
    name: String,
    blocks: Vec<u8>,
    scales: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Mxfp4Experts {
    /// Reads `{name}_blocks` and `{name}_scales` for `n` experts of `[rows, cols]`.
    ///
    /// Errors: `cols` not a multiple of 32, or a tensor missing, not U8 or misshapen, named.
    fn read(w: &dyn Weights, name: &str, n: usize, rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(32) {
            return Err(Error::tensor(
                format!("{name}_blocks"),
                format!("MXFP4 needs an input width that is a multiple of 32, not {cols}"),
            ));
        }
        let g = cols / 32;
        Ok(Self {
            name: name.to_string(),
            blocks: w.u8_tensor(&format!("{name}_blocks"), &[n, rows, g, 16])?,
            scales: w.u8_tensor(&format!("{name}_scales"), &[n, rows, g])?,
            rows,
            cols,
        })
    }

    /// Expert `e`'s rows `rows` (in that order) as an MLX `mxfp4` weight: each row's bytes
    /// read as little-endian words of eight codes, the low nibble first, as MLX packs them.
    fn expert(&self, e: usize, rows: &[usize]) -> Result<FpQuantized> {
        let (row_bytes, g) = (self.cols / 2, self.cols / 32);
        let mut words = Vec::with_capacity(rows.len() * row_bytes / 4);
        let mut scales = Vec::with_capacity(rows.len() * g);
        for &r in rows {
            let at = e * self.rows + r;
            let bytes = &self.blocks[at * row_bytes..(at + 1) * row_bytes];
            words.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            scales.extend_from_slice(&self.scales[at * g..(at + 1) * g]);
        }
        FpQuantized::from_parts(words, scales, rows.len(), self.cols, FpMode::Mxfp4).map_err(
            |err| {
                Error::tensor(
                    format!("{}_blocks", self.name),
                    format!("expert {e}: {err}"),
                )
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: serde_json::Value) -> GptOssConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn layer_types_default_and_checks() {
        let base = serde_json::json!({"num_local_experts": 4, "num_experts_per_tok": 2,
                                      "sliding_window": 8});
        assert_eq!(
            cfg(base.clone()).sliding_layers(4).unwrap(),
            [true, false, true, false]
        );
        let mut v = base.clone();
        v["layer_types"] = serde_json::json!(["full_attention", "sliding_attention"]);
        assert_eq!(cfg(v.clone()).sliding_layers(2).unwrap(), [false, true]);
        let e = cfg(v).sliding_layers(3).unwrap_err().to_string();
        assert!(e.contains("layer_types"), "{e}");
        let mut v = base.clone();
        v["layer_types"] = serde_json::json!(["chunked_attention"]);
        let e = cfg(v).sliding_layers(1).unwrap_err().to_string();
        assert!(e.contains("chunked_attention"), "{e}");
        let mut v = base.clone();
        v["sliding_window"] = serde_json::Value::Null;
        let e = cfg(v).sliding_layers(2).unwrap_err().to_string();
        assert!(e.contains("sliding_window"), "{e}");
        let mut v = base;
        v["num_experts_per_tok"] = 5.into();
        let e = cfg(v).sliding_layers(2).unwrap_err().to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");
        let c = cfg(serde_json::json!({"num_experts": 4, "num_experts_per_tok": 2}));
        assert_eq!(
            (c.num_local_experts, c.swiglu_alpha, c.swiglu_limit),
            (4, 1.702, 7.0)
        );
    }
}
