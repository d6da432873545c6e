//! Qwen2 / Qwen2.5: the Llama architecture with biases on the q/k/v projections (none on
//! o_proj). Reference: Hugging Face `modeling_qwen2.py`, mlx-lm `models/qwen2.py`.

use crate::models::llama::{self, LlamaVariant};
use crate::models::CausalLM;
use crate::weights::Weights;
use crate::{Error, Result};

/// The Qwen2 switches over Llama.
pub const VARIANT: LlamaVariant = LlamaVariant {
    name: "qwen2",
    qkv_bias: true,
    o_bias: false,
    qk_norm: false,
    fused_qkv: false,
    fused_gate_up: false,
};

/// Qwen configs carry a `sliding_window` that only applies with `use_sliding_window: true`
/// (and then only to layers from `max_window_layers` on). Drops it when unused; a config that
/// turns it on is refused, naming the field (no published Qwen2/Qwen3 checkpoint does).
pub(crate) fn drop_unused_sliding_window(config: &serde_json::Value) -> Result<serde_json::Value> {
    let mut c = config.clone();
    let on = c
        .get("use_sliding_window")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if on {
        return Err(Error::Model(
            "config.json: `use_sliding_window: true` (per-layer sliding windows from \
             `max_window_layers`) is not supported for Qwen models"
                .into(),
        ));
    }
    if let Some(o) = c.as_object_mut() {
        o.remove("sliding_window");
    }
    Ok(c)
}

/// Builds a Qwen2 model from an HF-style config and weights (`Qwen2ForCausalLM` names).
///
/// Errors: as [`llama::build_variant`]; [`Error::Model`] for `use_sliding_window: true`.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    llama::build_variant(&drop_unused_sliding_window(config)?, w, VARIANT)
}
