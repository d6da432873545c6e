//! The hybrid decoder stack of LFM2 and Qwen3.5: pre-norm residual blocks whose token mixer is
//! either attention or a layer that carries a state from token to token (a [`StateMixer`]:
//! LFM2's gated short convolution, Qwen3.5's Gated DeltaNet), each followed by a norm and a
//! feed-forward; then the final norm and the output layer. Its cache is mlx-lm's list of
//! per-layer caches: key/value caches for the attention layers, an [`ArraysCache`] of
//! [`StateMixer::ARRAYS`] arrays for the others.
//!
//! An architecture file keeps what is its own (config, weight names, its mixer layer and its
//! loader, `impl HybridLm<ItsMixer> { pub fn new(..) }`) and names the model as a type alias of
//! [`HybridLm`] (`lfm2::Lfm2`, `qwen3_5::Qwen35`).

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::kv_cache::{ArraysCache, KvCache, KvCacheConfig};
use crate::models::decoder::Mlp;
use crate::models::{
    build, BlockRun, CausalLM, LinearSlot, Logits, ModelInfo, Trainable, TrainableBlocks,
};
use crate::nn::{
    residual, Attention, AttentionPass, Embedding, Linear, Mode, RmsNorm, RotaryEmbedding,
};
use crate::Result;

/// A token mixer that carries a state between passes in an [`ArraysCache`] (mlx-lm's
/// `ArraysCache(size=ARRAYS)`).
pub trait StateMixer: std::fmt::Debug + Send + Sync {
    /// The kind of layer, as errors name it (e.g. `convolution`).
    const KIND: &'static str;
    /// Arrays in the layer's [`ArraysCache`].
    const ARRAYS: usize;

    /// Inference: `x: [batch, seq, hidden]` f32 after the state in `state` (unset arrays:
    /// zeros), which the layer replaces and advances by `seq` positions. Returns `[batch, seq,
    /// hidden]` f32.
    ///
    /// Errors: shapes that do not agree with the weights or the state.
    fn forward_cached(&self, x: &Tensor, state: &mut ArraysCache) -> Result<Tensor>;

    /// Training ([`Mode::Training`]): `x: [batch, seq, hidden]` f32 from a zero state, as
    /// differentiable ops; `dropout` turns adapter dropout on. Returns `[batch, seq, hidden]`
    /// f32.
    ///
    /// Errors: shapes that do not agree with the weights.
    fn forward_train(&self, x: &Tensor, dropout: bool) -> Result<Tensor>;

    /// The linear layers adapters may wrap, by Hugging Face name within the block.
    fn adapter_linears(&mut self) -> Vec<(&'static str, &mut Linear)>;
}

/// A block's token mixer.
#[derive(Debug)]
// One block holds one; boxing the attention would add an indirection to half of them.
#[allow(clippy::large_enum_variant)]
pub enum Mixer<S> {
    /// Attention over a key/value cache.
    Attention(Attention),
    /// A state-carrying layer.
    State(S),
}

/// A hybrid block: `h = x + mixer(mixer_norm(x)); h + mlp(mlp_norm(h))`.
#[derive(Debug)]
pub struct HybridBlock<S> {
    /// RMSNorm before the mixer.
    pub mixer_norm: RmsNorm,
    /// Attention or the state-carrying layer.
    pub mixer: Mixer<S>,
    /// RMSNorm before the feed-forward.
    pub mlp_norm: RmsNorm,
    /// The gated MLP or mixture of experts.
    pub mlp: Mlp,
}

/// A hybrid causal language model whose state-carrying layers are `S`.
#[derive(Debug)]
pub struct HybridLm<S> {
    pub(crate) embed_tokens: Embedding,
    pub(crate) layers: Vec<HybridBlock<S>>,
    /// The final RMSNorm.
    pub(crate) norm: RmsNorm,
    pub(crate) lm_head: Linear,
    pub(crate) rope: RotaryEmbedding,
    /// The adapter name of a block's linear layer from the name the layers give it (e.g.
    /// LFM2's `feed_forward.w1` for `mlp.gate_proj`).
    pub(crate) adapter_key: fn(&'static str) -> &'static str,
    /// Adapter names' prefix ([`crate::models::wrap_slots`]).
    pub(crate) wrapper: Option<&'static str>,
    pub(crate) info: ModelInfo,
    pub(crate) device: Device,
}

impl<S: StateMixer> HybridLm<S> {
    /// The empty state of layer `i` when its mixer is an `S`, `None` for attention layers.
    fn state(&self, i: usize) -> Option<ArraysCache> {
        match self.layers.get(i).map(|l| &l.mixer) {
            Some(Mixer::State(_)) => Some(ArraysCache::new(S::ARRAYS)),
            _ => None,
        }
    }
}

impl<S: StateMixer> CausalLM for HybridLm<S> {
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        cache.check_layers(self.layers.len())?;
        let x = self.embed(input_ids)?;
        let x = self.run_blocks(x, 0..self.layers.len(), BlockRun::Inference(cache))?;
        build::output_logits(&x, &self.norm, &self.lm_head, logits)
    }

    fn trainable(&self) -> Option<&dyn Trainable> {
        Some(self)
    }

    fn trainable_mut(&mut self) -> Option<&mut dyn Trainable> {
        Some(self)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::growing_with_states(self.layers.len(), |i| self.state(i))
    }

    fn make_cache(&self, config: &KvCacheConfig) -> Result<KvCache> {
        KvCache::with_states(self.layers.len(), self.info.head_dim, config, |i| {
            self.state(i)
        })
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

impl<S: StateMixer> TrainableBlocks for HybridLm<S> {
    /// Per block under `model.layers.{i}`: the mixer's linear layers ([`Attention::linears_mut`]
    /// or [`StateMixer::adapter_linears`]) and the dense MLP's, named through `adapter_key`;
    /// then `lm_head`; all under `wrapper` when set.
    fn linear_slots(&mut self) -> Vec<LinearSlot<'_>> {
        let adapter_key = self.adapter_key;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let mixer: Vec<(&'static str, &mut Linear)> = match &mut layer.mixer {
                Mixer::Attention(a) => a
                    .linears_mut()
                    .into_iter()
                    .map(|(k, l, _)| (k, l))
                    .collect(),
                Mixer::State(s) => s.adapter_linears(),
            };
            for (key, linear) in mixer.into_iter().chain(layer.mlp.linears_mut()) {
                out.push(LinearSlot::new(i, adapter_key(key), linear));
            }
        }
        out.push(LinearSlot::output(&mut self.lm_head));
        crate::models::wrap_slots(out, self.wrapper)
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)
    }

    /// For training the state-carrying layers start from zero states
    /// ([`StateMixer::forward_train`]).
    ///
    /// Errors: as [`BlockRun::layer`], [`Attention::forward`], [`StateMixer::forward_cached`]
    /// and [`Mlp::forward`].
    fn run_blocks(&self, x: Tensor, range: Range<usize>, mut run: BlockRun<'_>) -> Result<Tensor> {
        let mut x = x;
        let mode = run.mode();
        let pass = AttentionPass::new(&self.rope, run.offset(), x.dim(1)?)?;
        for i in range.start..range.end.min(self.layers.len()) {
            let layer = &self.layers[i];
            let c = run.layer(i)?;
            let hn = layer.mixer_norm.forward_mode(&x, mode)?;
            let r = match (&layer.mixer, c) {
                (Mixer::Attention(a), c) => a.forward(&hn, &pass, c, mode)?,
                (Mixer::State(s), Some(c)) => s.forward_cached(&hn, c.arrays_for(i, S::KIND)?)?,
                // No layer cache: a training pass.
                (Mixer::State(s), None) => {
                    s.forward_train(&hn, mode == Mode::Training { dropout: true })?
                }
            };
            x = residual(&x, &r, mode)?;
            let hn = layer.mlp_norm.forward_mode(&x, mode)?;
            x = residual(&layer.mlp.forward(&hn, mode)?, &x, mode)?;
        }
        Ok(x)
    }

    fn head(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.lm_head
            .forward_mode(&self.norm.forward_mode(x, mode)?, mode)
    }
}
