//! Phi-3 / Phi-3.5 / Phi-4-mini: the Llama architecture with fused projections
//! (`self_attn.qkv_proj`, `mlp.gate_up_proj`), LongRoPE scaling and optionally partial
//! rotary dimensions. Reference: Hugging Face `modeling_phi3.py`, mlx-lm `models/phi3.py`.

use crate::models::llama::{self, LlamaVariant};
use crate::models::CausalLM;
use crate::weights::Weights;
use crate::Result;

/// The Phi-3 switches over Llama.
pub const VARIANT: LlamaVariant = LlamaVariant {
    name: "phi3",
    qkv_bias: false,
    o_bias: false,
    qk_norm: false,
    fused_qkv: true,
    fused_gate_up: true,
    gguf_permuted_qk: false,
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

/// Builds a Phi-3 model from an HF-style config and weights (`Phi3ForCausalLM` names).
///
/// Errors: as [`llama::build_variant`]; [`crate::Error::Model`] naming a missing LongRoPE field.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    llama::build_variant(&normalize(config), w, VARIANT)
}
