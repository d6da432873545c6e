//! A model's one-token decode step described as data, for a backend that runs it as fused
//! kernels (the CUDA decoder, `crate::accel::Accelerated`): the embedding, a stack of pre-norm
//! residual blocks (RMSNorm, [`Attention`], residual add, RMSNorm, [`GatedMlp`], residual add),
//! the final norm and the output layer. A model whose blocks have this shape exports it through
//! [`crate::models::CausalLM::decode_plan`]; the backend checks the layers it can run (weights
//! of its own kinds, no q/k norm, no window, ...) and otherwise leaves the step to the model.

use crate::nn::{Attention, Embedding, GatedMlp, Linear, RmsNorm, RotaryEmbedding};

/// The layers of a decode step, borrowed from the model.
#[derive(Debug)]
pub struct DecodePlan<'a> {
    /// The token embedding `[vocab, hidden]`.
    pub embed_tokens: &'a Embedding,
    /// The blocks in order.
    pub blocks: Vec<PlanBlock<'a>>,
    /// The final RMSNorm.
    pub norm: &'a RmsNorm,
    /// The output layer `[vocab, hidden]`.
    pub lm_head: &'a Linear,
    /// The rotary embedding every block's attention uses.
    pub rope: &'a RotaryEmbedding,
    /// Longest context, in tokens (how far RoPE tables need to reach).
    pub context_length: usize,
}

/// One pre-norm residual block: `x += attention(attn_norm(x)); x += mlp(mlp_norm(x))`.
#[derive(Debug)]
pub struct PlanBlock<'a> {
    /// RMSNorm before attention.
    pub attn_norm: &'a RmsNorm,
    /// The attention layer.
    pub attention: &'a Attention,
    /// RMSNorm before the MLP.
    pub mlp_norm: &'a RmsNorm,
    /// The gated MLP.
    pub mlp: &'a GatedMlp,
}
