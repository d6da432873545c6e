//! A model's one-token decode step described as data, for a backend that runs it as fused
//! kernels (the CUDA decoder, `crate::accel::Accelerated`): the embedding (optionally scaled),
//! a stack of pre-norm residual blocks (RMSNorm, [`Attention`], optional RMSNorm of its output,
//! residual add, RMSNorm, a [`GatedMlp`] or a mixture of experts ([`Moe`]), optional RMSNorm of
//! its output, residual add), the final
//! norm and the output layer. A model whose blocks have this shape exports it through
//! [`crate::models::CausalLM::decode_plan`]; the backend checks the layers it can run (weights
//! of its own kinds, no soft-cap, ...) and otherwise leaves the step to the model.

use candle_core::Tensor;

use crate::kv_cache::KvCache;
use crate::nn::ops::residual;
use crate::nn::{
    Attention, AttentionPass, Embedding, GatedMlp, Linear, Mode, Moe, RmsNorm, RotaryEmbedding,
};
use crate::Result;

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
    /// A factor on the embedding rows (Gemma: `sqrt(hidden)`), if any.
    pub embed_scale: Option<f64>,
    /// The logits' soft-cap `c` (Gemma 2's `final_logit_softcapping`: `c · tanh(logits / c)`),
    /// if any.
    pub final_softcap: Option<f64>,
}

/// One pre-norm residual block: `x += post_attn_norm(attention(attn_norm(x)));
/// x += post_mlp_norm(mlp(mlp_norm(x)))`, each post norm only where the block has one.
#[derive(Debug)]
pub struct PlanBlock<'a> {
    /// RMSNorm before attention.
    pub attn_norm: &'a RmsNorm,
    /// The attention layer.
    pub attention: &'a Attention,
    /// RMSNorm before the MLP.
    pub mlp_norm: &'a RmsNorm,
    /// The feed-forward layer.
    pub mlp: PlanMlp<'a>,
    /// RMSNorm of the attention output before the residual add (Gemma's
    /// `post_attention_layernorm`), if any.
    pub post_attn_norm: Option<&'a RmsNorm>,
    /// RMSNorm of the MLP output before the residual add (Gemma's
    /// `post_feedforward_layernorm`), if any.
    pub post_mlp_norm: Option<&'a RmsNorm>,
    /// This block's rotary embedding when it is not the plan's (Gemma 3's sliding-window
    /// layers), else `None`.
    pub rope: Option<&'a RotaryEmbedding>,
}

/// The feed-forward layer of a [`PlanBlock`].
#[derive(Debug, Clone, Copy)]
pub enum PlanMlp<'a> {
    /// A gated MLP (SwiGLU, GeGLU).
    Dense(&'a GatedMlp),
    /// A mixture of experts (Qwen3-MoE's sparse blocks).
    Moe(&'a Moe),
}

impl PlanMlp<'_> {
    /// The layer on `x: [.., hidden]` f32 with its own code ([`GatedMlp::forward`],
    /// [`Moe::forward`]).
    ///
    /// Errors: the layer's.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match self {
            Self::Dense(m) => m.forward(x, mode),
            Self::Moe(m) => m.forward(x, mode),
        }
    }
}

impl DecodePlan<'_> {
    /// Runs the step the plan describes with the layers' own code: `input_ids: [1, seq]` u32
    /// at the positions after those in `cache` (one layer per block), appending to it, rotated
    /// by RoPE at those positions plus the cache's RoPE delta ([`KvCache::rope_delta`]: a
    /// vision-language model's text after its images); returns
    /// the logits of the last position `[1, vocab]` f32. A fused backend must compute the same
    /// (up to its kernels' rounding), and the model's own forward pass must too: the tests
    /// compare the two, which checks that a model's plan describes it.
    ///
    /// Errors: a cache with fewer layers than the plan has blocks; the layers' errors.
    pub fn forward(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, seq) = input_ids.dims2()?;
        let offset = cache.offset();
        let mut x = self.embed_tokens.forward(input_ids)?;
        if let Some(f) = self.embed_scale {
            x = (x * f)?;
        }
        let delta = cache.rope_delta();
        let global = if delta == 0 {
            AttentionPass::new(self.rope, offset, seq)?
        } else {
            let start = usize::try_from(offset as i64 + delta).map_err(|_| {
                crate::Error::InvalidArgument(format!(
                    "RoPE position {offset} + {delta} of the decode plan is negative"
                ))
            })?;
            let (cos, sin) = self.rope.cos_sin(start, seq)?;
            AttentionPass::with_tables(self.rope, cos, sin)
        };
        let mode = Mode::Inference;
        for (i, b) in self.blocks.iter().enumerate() {
            let local = b
                .rope
                .map(|r| AttentionPass::new(r, offset, seq))
                .transpose()?;
            let layer = cache.layer_for_pass(i)?;
            let h = b.attn_norm.forward(&x)?;
            let mut a =
                b.attention
                    .forward(&h, local.as_ref().unwrap_or(&global), Some(layer), mode)?;
            if let Some(n) = b.post_attn_norm {
                a = n.forward(&a)?;
            }
            x = residual(&a, &x, mode)?;
            let mut m = b.mlp.forward(&b.mlp_norm.forward(&x)?, mode)?;
            if let Some(n) = b.post_mlp_norm {
                m = n.forward(&m)?;
            }
            x = residual(&m, &x, mode)?;
        }
        let last = x.narrow(1, seq - 1, 1)?.squeeze(1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        match self.final_softcap {
            Some(c) => crate::nn::ops::softcap(&logits, c),
            None => Ok(logits),
        }
    }
}
