//! The decoder stack that most architectures share (mlx-lm's `LlamaModel` + `Model`): token
//! embedding, pre-norm residual blocks, final RMSNorm and the output layer, with its inference
//! forward, the training entry points and the decode plan. An architecture file builds one
//! from its config and weights and adds what is its own.

use candle_core::Tensor;

use crate::kv_cache::{KvCache, LayerKvCache};
use crate::models::{DecodePlan, LinearSlot, Logits, PlanBlock, PlanMlp};
use crate::nn::{
    residual, Attention, AttentionPass, Embedding, GatedMlp, Linear, Mode, Moe, QkvProj, RmsNorm,
    RotaryEmbedding,
};
use crate::weights::QkRowOrder;
use crate::Result;

/// The feed-forward part of a block: one gated MLP, or a mixture of experts (Qwen3-MoE's
/// sparse layers).
#[derive(Debug)]
// Most blocks are dense: boxing the dense MLP would add an indirection to each of them.
#[allow(clippy::large_enum_variant)]
pub enum Mlp {
    /// A gated MLP.
    Dense(GatedMlp),
    /// A mixture-of-experts layer.
    Moe(Box<Moe>),
}

impl Mlp {
    /// `x: [.., hidden]` f32 -> `[.., hidden]` f32.
    ///
    /// Errors: as [`GatedMlp::forward`] / [`Moe::forward`].
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match self {
            Self::Dense(m) => m.forward(x, mode),
            Self::Moe(m) => m.forward(x, mode),
        }
    }

    /// The dense MLP, if this is one.
    pub fn dense(&self) -> Option<&GatedMlp> {
        match self {
            Self::Dense(m) => Some(m),
            Self::Moe(_) => None,
        }
    }

    /// The linear layers adapters may wrap, by Hugging Face name within the block: a dense
    /// MLP's projections; none for a mixture of experts (adapters there cover attention only).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        match self {
            Self::Dense(m) => m.linears_mut(),
            Self::Moe(_) => Vec::new(),
        }
    }
}

/// A pre-norm residual block (Llama, Qwen, Phi-3):
/// `x += attention(input_layernorm(x)); x += mlp(post_attention_layernorm(x))`.
#[derive(Debug)]
pub struct PreNormBlock {
    /// RMSNorm before attention.
    pub input_layernorm: RmsNorm,
    /// The attention layer.
    pub self_attn: Attention,
    /// RMSNorm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// The gated MLP or mixture of experts.
    pub mlp: Mlp,
}

impl PreNormBlock {
    /// The block on `x: [batch, seq, hidden]` f32 at the pass's positions; `cache` as
    /// [`Attention::forward`] takes it.
    ///
    /// Errors: as [`Attention::forward`] and [`Mlp::forward`].
    pub fn forward(
        &self,
        x: &Tensor,
        pass: &AttentionPass<'_>,
        cache: Option<&mut (dyn LayerKvCache + 'static)>,
        mode: Mode,
    ) -> Result<Tensor> {
        let hn = self.input_layernorm.forward_mode(x, mode)?;
        let attn = self.self_attn.forward(&hn, pass, cache, mode)?;
        let x = residual(&attn, x, mode)?;
        let hn = self.post_attention_layernorm.forward_mode(&x, mode)?;
        residual(&self.mlp.forward(&hn, mode)?, &x, mode)
    }
}

impl PreNormBlock {
    /// The block over the rows of several sequences at once: `x: [1, rows, hidden]` f32, the
    /// rows of each sequence of the `pass` ([`AttentionPass::batched`]) one after another;
    /// `caches[i]` is sequence `i`'s cache of this layer. Norms, projections and the MLP run
    /// over all rows; attention per sequence ([`Attention::forward_batched`]).
    ///
    /// Errors: as [`Attention::forward_batched`] and [`GatedMlp::forward`].
    pub fn forward_batched(
        &self,
        x: &Tensor,
        pass: &AttentionPass<'_>,
        caches: &mut [&mut (dyn LayerKvCache + 'static)],
    ) -> Result<Tensor> {
        let mode = Mode::Inference;
        let hn = self.input_layernorm.forward_mode(x, mode)?;
        let x = crate::nn::add(&self.self_attn.forward_batched(&hn, pass, caches)?, x)?;
        let hn = self.post_attention_layernorm.forward_mode(&x, mode)?;
        crate::nn::add(&self.mlp.forward(&hn, mode)?, &x)
    }
}

/// Embedding, blocks, final norm and output layer of a decoder-only model.
#[derive(Debug)]
pub struct Decoder {
    /// The token embedding `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// The blocks in order.
    pub layers: Vec<PreNormBlock>,
    /// The final RMSNorm.
    pub norm: RmsNorm,
    /// The output layer `[vocab, hidden]` (the embedding when tied).
    pub lm_head: Linear,
}

impl Decoder {
    /// Errors unless `cache` has one layer per block.
    pub fn check_cache(&self, cache: &KvCache) -> Result<()> {
        cache.check_layers(self.layers.len())
    }

    /// Blocks `range` on `x: [batch, seq, hidden]` at the pass's positions: for inference
    /// appending to `cache` (required), for training as differentiable ops (see [`Mode`]).
    ///
    /// Errors: a cache with fewer layers than `range` needs; as [`PreNormBlock::forward`].
    pub fn run_blocks(
        &self,
        mut x: Tensor,
        range: std::ops::Range<usize>,
        pass: &AttentionPass<'_>,
        mut cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        for (i, layer) in self
            .layers
            .iter()
            .enumerate()
            .take(range.end)
            .skip(range.start)
        {
            let c = match cache.as_deref_mut() {
                Some(c) => Some(c.layer_for_pass(i)?),
                None => None,
            };
            x = layer.forward(&x, pass, c, mode)?;
        }
        Ok(x)
    }

    /// Final norm and output layer for inference on the blocks' output `x: [batch, seq,
    /// hidden]`: f32 logits `[batch, vocab]` ([`Logits::Last`]) or `[batch, seq, vocab]`.
    pub fn logits(&self, x: &Tensor, logits: Logits) -> Result<Tensor> {
        let s = x.dim(1)?;
        let x = match logits {
            Logits::Last => x.narrow(1, s - 1, 1)?,
            Logits::All => x.clone(),
        };
        let out = self.lm_head.forward(&self.norm.forward(&x)?)?;
        Ok(match logits {
            Logits::Last => out.squeeze(1)?,
            Logits::All => out,
        })
    }

    /// The final hidden states of `input_ids: [batch, seq]` u32 at positions `0..seq`: the
    /// embedding, every block (causal attention, a fresh cache) and the final norm, without
    /// the output layer; `[batch, seq, hidden]` f32. What decoder-based embedding models pool
    /// (transformers' `Qwen3Model` `last_hidden_state`).
    pub fn final_hidden(&self, input_ids: &Tensor, rope: &RotaryEmbedding) -> Result<Tensor> {
        let mut cache = KvCache::growing(self.layers.len());
        let pass = AttentionPass::new(rope, 0, input_ids.dim(1)?)?;
        let x = self.embed_tokens.forward(input_ids)?;
        let x = self.run_blocks(
            x,
            0..self.layers.len(),
            &pass,
            Some(&mut cache),
            Mode::Inference,
        )?;
        self.norm.forward(&x)
    }

    /// The inference forward pass of `input_ids: [batch, seq]` u32 at positions continuing
    /// from `cache.offset()`, rotated by `rope` (see [`crate::models::CausalLM::forward`]).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        rope: &RotaryEmbedding,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        self.check_cache(cache)?;
        let pass = AttentionPass::new(rope, cache.offset(), input_ids.dim(1)?)?;
        let x = self.embed_tokens.forward(input_ids)?;
        let x = self.run_blocks(x, 0..self.layers.len(), &pass, Some(cache), Mode::Inference)?;
        self.logits(&x, logits)
    }

    /// One forward pass over several sequences ([`crate::models::CausalLM::forward_batch`]):
    /// the rows' ids are concatenated into one `[1, rows, hidden]` activation, so the
    /// embedding, every norm, every linear layer (quantized GEMMs over all rows) and the output
    /// layer run once; RoPE rotates each row at its own position (its sequence's cache offset
    /// plus its index in the row) and attention runs per sequence over its own cache. Returns
    /// f32 logits `[rows.len(), vocab]` of each row's last token.
    ///
    /// Numerics: per row the same operations as [`Self::forward`]; products whose kernels
    /// group activation rows (the GEMM tiles of [`crate::kernels`], candle's matmul for dense
    /// weights) may sum in another order than a one-row pass, so logits may differ from the
    /// single-sequence path in the last bits.
    ///
    /// `device`: where the weights live (the ids are created there).
    ///
    /// Errors: [`Error::InvalidArgument`] for no rows, a row without tokens, or a cache whose
    /// layer count is not the model's; the layers' errors.
    pub fn forward_batch(
        &self,
        rows: &mut [crate::models::BatchRow<'_>],
        rope: &RotaryEmbedding,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        crate::models::check_batch(rows)?;
        for r in rows.iter() {
            self.check_cache(r.cache)?;
        }
        let segments: Vec<(usize, usize)> = rows
            .iter()
            .map(|r| (r.cache.offset(), r.ids.len()))
            .collect();
        let pass = AttentionPass::batched(rope, &segments)?;
        let ids: Vec<u32> = rows.iter().flat_map(|r| r.ids.iter().copied()).collect();
        let ids = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
        let mut x = self.embed_tokens.forward(&ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let mut caches = rows
                .iter_mut()
                .map(|r| r.cache.layer_for_pass(i))
                .collect::<Result<Vec<_>>>()?;
            x = layer.forward_batched(&x, &pass, &mut caches)?;
        }
        // The last row of each sequence.
        let mut end = 0u32;
        let last: Vec<u32> = segments
            .iter()
            .map(|&(_, n)| {
                end += n as u32;
                end - 1
            })
            .collect();
        let last = Tensor::new(last.as_slice(), device)?;
        let x = x.squeeze(0)?.index_select(&last, 0)?.unsqueeze(0)?;
        Ok(self.lm_head.forward(&self.norm.forward(&x)?)?.squeeze(0)?)
    }

    /// Training, first half: the hidden states `[batch, seq, hidden]` after the embedding and
    /// blocks `0..upto` by the inference path (no autograd graph), positions `0..seq`.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        upto: usize,
        rope: &RotaryEmbedding,
    ) -> Result<Tensor> {
        let mut cache = KvCache::growing(self.layers.len());
        let x = self.embed_tokens.forward(input_ids)?;
        let pass = AttentionPass::new(rope, 0, input_ids.dim(1)?)?;
        let upto = upto.min(self.layers.len());
        self.run_blocks(x, 0..upto, &pass, Some(&mut cache), Mode::Inference)
    }

    /// Training: blocks `range` on `hidden: [batch, seq, hidden]` as differentiable ops
    /// (positions `0..seq`); `dropout` turns adapter dropout on.
    pub fn forward_blocks(
        &self,
        hidden: &Tensor,
        range: std::ops::Range<usize>,
        dropout: bool,
        rope: &RotaryEmbedding,
    ) -> Result<Tensor> {
        if range.is_empty() {
            return Ok(hidden.clone());
        }
        let pass = AttentionPass::new(rope, 0, hidden.dim(1)?)?;
        let mode = Mode::Training { dropout };
        self.run_blocks(hidden.clone(), range, &pass, None, mode)
    }

    /// Training: final norm and output layer on `hidden: [batch, seq, hidden]` as
    /// differentiable ops; logits `[batch, seq, vocab]`, or with `select: [n]` u32 (indices
    /// into the flattened `batch · seq` positions) `[n, vocab]`.
    pub fn forward_head(
        &self,
        hidden: &Tensor,
        dropout: bool,
        select: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = crate::models::select_positions(hidden, select)?;
        let mode = Mode::Training { dropout };
        self.lm_head
            .forward_mode(&self.norm.forward_mode(&x, mode)?, mode)
    }

    /// The one-token step as data ([`DecodePlan`]); `None` when a block has no plan form
    /// (attention without RoPE, with sinks, or latent attention).
    pub fn decode_plan<'a>(
        &'a self,
        rope: &'a RotaryEmbedding,
        context_length: usize,
    ) -> Option<DecodePlan<'a>> {
        let blocks = self
            .layers
            .iter()
            .map(|b| {
                Some(PlanBlock {
                    attn_norm: &b.input_layernorm,
                    attention: (b.self_attn.rope
                        && b.self_attn.sinks.is_none()
                        && !matches!(b.self_attn.qkv, QkvProj::Latent(_)))
                    .then_some(&b.self_attn)?,
                    mlp_norm: &b.post_attention_layernorm,
                    mlp: match &b.mlp {
                        Mlp::Dense(m) => PlanMlp::Dense(m),
                        Mlp::Moe(m) => PlanMlp::Moe(m),
                    },
                    post_attn_norm: None,
                    post_mlp_norm: None,
                    rope: None,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(DecodePlan {
            embed_tokens: &self.embed_tokens,
            blocks,
            norm: &self.norm,
            lm_head: &self.lm_head,
            rope,
            context_length,
            embed_scale: None,
            final_softcap: None,
        })
    }

    /// The blocks' linear layers and the output layer by Hugging Face module name, for
    /// adapters; `qk_rows` says how q/k rows are stored (an adapter's columns follow it).
    pub fn linears_mut(&mut self, qk_rows: QkRowOrder) -> Vec<LinearSlot<'_>> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let attn = layer.self_attn.linears_mut().into_iter();
            let attn =
                attn.map(|(key, l, heads)| (key, l, heads.and_then(|h| qk_rows.permuted_heads(h))));
            let mlp = layer
                .mlp
                .linears_mut()
                .into_iter()
                .map(|(key, l)| (key, l, None));
            for (key, linear, permuted_heads) in attn.chain(mlp) {
                out.push(LinearSlot {
                    name: format!("model.layers.{i}.{key}"),
                    layer: Some(i),
                    key: key.to_string(),
                    linear,
                    permuted_heads,
                });
            }
        }
        out.push(LinearSlot {
            name: "lm_head".into(),
            layer: None,
            key: "lm_head".into(),
            linear: &mut self.lm_head,
            permuted_heads: None,
        });
        out
    }
}
