//! Qwen3: the Llama architecture with a per-head RMSNorm of queries and keys before RoPE
//! (`q_norm`, `k_norm`, `[head_dim]`) and an explicit `head_dim`. Reference: Hugging Face
//! `modeling_qwen3.py`, mlx-lm `models/qwen3.py`.

use crate::models::llama::{self, LlamaVariant};
use crate::models::{qwen2, CausalLM};
use crate::weights::Weights;
use crate::Result;

/// The Qwen3 switches over Llama (`attention_bias` from config.json still applies).
pub const VARIANT: LlamaVariant = LlamaVariant {
    name: "qwen3",
    qkv_bias: false,
    o_bias: false,
    qk_norm: true,
    fused_qkv: false,
    fused_gate_up: false,
};

/// Builds a Qwen3 model from an HF-style config and weights (`Qwen3ForCausalLM` names).
///
/// Errors: as [`llama::build_variant`]; [`crate::Error::Model`] for `use_sliding_window: true`.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    llama::build_variant(&qwen2::drop_unused_sliding_window(config)?, w, VARIANT)
}
