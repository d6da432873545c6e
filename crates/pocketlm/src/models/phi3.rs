//! Phi-3 / Phi-3.5 / Phi-4-mini: the Llama architecture with fused projections
//! (`self_attn.qkv_proj`, `mlp.gate_up_proj`), LongRoPE scaling and optionally partial
//! rotary dimensions. Reference: Hugging Face `modeling_phi3.py`, mlx-lm `models/phi3.py`.

use candle_core::Device;

use crate::gguf::names::{self, NameTable};
use crate::gguf::GgufFile;
use crate::models::llama::{self, LlamaVariant};
use crate::models::CausalLM;
use crate::weights::Weights;
use crate::{Error, Result};

/// GGUF tensor names of Phi-3 (llama.cpp's `LLM_ARCH_PHI3`): the fused projections are
/// `attn_qkv` and `ffn_up` (gate rows first, `2 * intermediate` rows); the LongRoPE factors
/// are read into the config.
pub static GGUF_NAMES: NameTable = NameTable {
    name: "phi3",
    global: names::GLOBAL,
    block: &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.qkv_proj", "attn_qkv"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ],
    gguf_only: &["rope_factors_long.weight", "rope_factors_short.weight"],
};

/// The Phi-3 switches over Llama.
pub const VARIANT: LlamaVariant = LlamaVariant {
    name: "phi3",
    qkv_bias: false,
    o_bias: false,
    qk_norm: false,
    fused_qkv: true,
    fused_gate_up: true,
};

/// Brings the RoPE fields of a Phi-3 config to what [`llama::LlamaConfig`] and
/// [`crate::nn::RopeScaling::from_config`] read: `original_max_position_embeddings` and
/// `factor = max_position_embeddings / original_max_position_embeddings` into `rope_scaling`
/// (where HF `_compute_longrope_parameters` takes them from), and `partial_rotary_factor` from
/// `rope_parameters` / `rope_scaling` (transformers 5) to the top level.
pub fn normalize(config: &serde_json::Value) -> serde_json::Value {
    let mut c = config.clone();
    let top_orig = c.get("original_max_position_embeddings").cloned();
    let max_pos = c.get("max_position_embeddings").and_then(|v| v.as_f64());
    let partial = ["rope_parameters", "rope_scaling"].iter().find_map(|k| {
        c.get(*k)
            .and_then(|r| r.get("partial_rotary_factor"))
            .cloned()
    });
    let Some(obj) = c.as_object_mut() else {
        return c;
    };
    if !obj.contains_key("partial_rotary_factor") {
        if let Some(p) = partial {
            obj.insert("partial_rotary_factor".into(), p);
        }
    }
    if let Some(rs) = obj.get_mut("rope_scaling").and_then(|v| v.as_object_mut()) {
        if !rs.contains_key("original_max_position_embeddings") {
            if let Some(o) = top_orig {
                rs.insert("original_max_position_embeddings".into(), o);
            }
        }
        let orig = rs
            .get("original_max_position_embeddings")
            .and_then(|v| v.as_f64());
        if !rs.contains_key("factor") {
            if let (Some(m), Some(o)) = (max_pos, orig) {
                if o > 0.0 {
                    rs.insert("factor".into(), (m / o).into());
                }
            }
        }
    }
    c
}

/// Reads an HF-style Phi-3 config from GGUF metadata, as llama.cpp's converter writes it
/// (`phi3.*` keys; `conversion/phi.py`, `Phi3MiniModel`): the Llama keys, plus
/// - `rope.dimension_count` below the head size: partial rotary dimensions
///   (`partial_rotary_factor = dimension_count / head_dim`, the head size being
///   `embedding_length / head_count`);
/// - LongRoPE: the tensors `rope_factors_long.weight` and `rope_factors_short.weight`
///   (`[dimension_count / 2]` f32), `rope.scaling.original_context_length` and
///   `rope.scaling.attn_factor` (the cos/sin scale);
/// - `attention.sliding_window` 0 means none (the converter writes 0 for Phi-4).
///
/// Which factors apply follows Hugging Face: the long ones once a pass reaches beyond the
/// original context (llama.cpp decides once per context: long whenever its context size
/// exceeds the original one).
///
/// Errors: [`Error::Model`] naming a missing or inconsistent key or tensor.
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let mut c = super::gguf_config::common(g)?;
    let heads = g.get_usize("phi3.attention.head_count")?;
    let hidden = g.get_usize("phi3.embedding_length")?;
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(Error::Model(format!(
            "{}: `phi3.embedding_length` {hidden} is not a multiple of `phi3.attention.head_count` {heads}",
            g.path().display()
        )));
    }
    let head_dim = hidden / heads;
    let rot = g
        .opt_usize("phi3.rope.dimension_count")?
        .unwrap_or(head_dim);
    let o = c
        .as_object_mut()
        .ok_or_else(|| Error::Model("phi3 GGUF config is not an object".into()))?;
    o.insert("head_dim".into(), head_dim.into());
    o.insert(
        "partial_rotary_factor".into(),
        (rot as f64 / head_dim as f64).into(),
    );
    if o.get("sliding_window").and_then(|v| v.as_u64()) == Some(0) {
        o.insert("sliding_window".into(), serde_json::Value::Null);
    }
    let (long, short) = ("rope_factors_long.weight", "rope_factors_short.weight");
    if g.has_tensor(long) || g.has_tensor(short) {
        let factors = |name: &str| -> Result<Vec<f32>> {
            Ok(g.tensor_f32(name, &[rot / 2], &Device::Cpu)?
                .to_vec1::<f32>()?)
        };
        let original = g.get_usize("phi3.rope.scaling.original_context_length")?;
        let max_pos = g.get_usize("phi3.context_length")?;
        let mut scaling = serde_json::json!({
            "rope_type": "longrope",
            "long_factor": factors(long)?,
            "short_factor": factors(short)?,
            "original_max_position_embeddings": original,
            "factor": max_pos as f64 / original.max(1) as f64,
        });
        if let Some(a) = g.opt_f64("phi3.rope.scaling.attn_factor")? {
            scaling["attention_factor"] = a.into();
        }
        o.insert("rope_scaling".into(), scaling);
    }
    Ok(c)
}

/// Builds a Phi-3 model from an HF-style config and weights (`Phi3ForCausalLM` names).
///
/// Errors: as [`llama::build_variant`]; [`crate::Error::Model`] naming a missing LongRoPE field.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    llama::build_variant(&normalize(config), w, VARIANT)
}
