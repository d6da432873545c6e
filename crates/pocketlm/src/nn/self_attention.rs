//! The self-attention layer of the decoder blocks, shared by every architecture: q/k/v
//! projections (separate or fused, with or without biases), optional per-head q/k RMSNorm
//! (Qwen3, Gemma 3), RoPE, the KV cache, grouped-query attention with an optional sliding
//! window and logit soft-cap (Gemma 2), and the output projection. The layer decides which mask
//! it needs. Reference: Hugging Face `LlamaAttention` / `Gemma2Attention`, mlx-lm
//! `models/llama.py` `Attention`.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};

use super::attention::{causal_attention_capped, causal_attention_diff, causal_mask};
use super::{Linear, Mode, RmsNorm, RotaryEmbedding};
use crate::kv_cache::LayerKvCache;
use crate::{Error, Result};

/// The q/k/v projections.
#[derive(Debug)]
pub enum QkvProj {
    /// `q_proj` `[heads · head_dim, hidden]`, `k_proj` and `v_proj` `[kv_heads · head_dim,
    /// hidden]`.
    Separate {
        /// `q_proj`.
        q: Linear,
        /// `k_proj`.
        k: Linear,
        /// `v_proj`.
        v: Linear,
    },
    /// One `[(heads + 2 · kv_heads) · head_dim, hidden]` layer, rows q, k, v (Phi-3's
    /// `qkv_proj`, or stacked at load for one GPU launch).
    Fused(Linear),
}

/// A self-attention layer. `x: [batch, seq, hidden]` f32 -> `[batch, seq, hidden]` f32.
#[derive(Debug)]
pub struct Attention {
    /// The q/k/v projections.
    pub qkv: QkvProj,
    /// `o_proj` `[hidden, heads · head_dim]`.
    pub o_proj: Linear,
    /// Per-head RMSNorm of the queries `[head_dim]`, before RoPE (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm>,
    /// Per-head RMSNorm of the keys `[head_dim]`, before RoPE.
    pub k_norm: Option<RmsNorm>,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (a divisor of `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// The scores' scale: `head_dim^-0.5`, or Gemma's `query_pre_attn_scalar^-0.5`.
    pub scale: f64,
    /// Gemma 2's `c` in `c · tanh(score / c)`.
    pub softcap: Option<f64>,
    /// Sliding window in tokens (a query sees itself and the `window - 1` keys before it).
    pub window: Option<usize>,
    /// Where `scale` is applied.
    pub scale_at: ScaleAt,
    /// Whether RoPE rotates the queries and keys (`false` on SmolLM3's NoPE layers, HF
    /// `SmolLM3Attention.use_rope`).
    pub rope: bool,
    /// Attention sinks `[heads]` f32 (gpt-oss's `self_attn.sinks`): one learned logit per head
    /// that joins each softmax denominator and has no value
    /// ([`super::attention::softmax_with_sinks`]), in every path (prefill, cached decode,
    /// batched decode, training).
    pub sinks: Option<Tensor>,
}

/// Where an attention layer applies its scale; the two differ in rounding only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleAt {
    /// To the scores `q·k` (Hugging Face; llama.cpp's Llama graph).
    Scores,
    /// To the queries before `q·k` (llama.cpp's Gemma graphs, followed on GGUF weights).
    Queries,
}

/// What the attention layers of one forward pass share: the rotary embedding, its cos/sin
/// tables for the pass's positions, and the masks, built the first time a layer needs one
/// (only on devices and dtypes where the attention kernel does not mask by position itself).
#[derive(Debug)]
pub struct AttentionPass<'a> {
    rope: &'a RotaryEmbedding,
    cos: Tensor,
    sin: Tensor,
    masks: RefCell<Vec<(MaskKey, Tensor)>>,
    /// For a pass over several sequences ([`Self::batched`]): the rows of each, in order.
    segments: Vec<usize>,
}

/// A mask's query count, key count and window.
type MaskKey = (usize, usize, Option<usize>);

impl<'a> AttentionPass<'a> {
    /// A pass over positions `offset..offset + seq` with `rope`'s own tables.
    pub fn new(rope: &'a RotaryEmbedding, offset: usize, seq: usize) -> Result<Self> {
        let (cos, sin) = rope.cos_sin(offset, seq)?;
        Ok(Self::with_tables(rope, cos, sin))
    }

    /// A pass with tables computed by the model (`cos`, `sin: [seq, rotary_dim / 2]`, e.g.
    /// Qwen2-VL's multimodal RoPE); `rope` only says how pairs are rotated.
    pub fn with_tables(rope: &'a RotaryEmbedding, cos: Tensor, sin: Tensor) -> Self {
        Self {
            rope,
            cos,
            sin,
            masks: RefCell::new(Vec::new()),
            segments: Vec::new(),
        }
    }

    /// A pass over several sequences at once (batched decode): `segments[i] = (offset, n)`
    /// says sequence `i` has `n` rows at positions `offset..offset + n`; the rows of the pass
    /// are those of each sequence in turn. Each row is rotated at its own position: the tables
    /// are `rope`'s own for each sequence ([`RotaryEmbedding::cos_sin`]`(offset, n)`),
    /// stacked.
    ///
    /// Errors: [`Error::InvalidArgument`] for no segments or an empty one.
    pub fn batched(rope: &'a RotaryEmbedding, segments: &[(usize, usize)]) -> Result<Self> {
        if segments.is_empty() || segments.iter().any(|&(_, n)| n == 0) {
            return Err(Error::InvalidArgument(format!(
                "a batched attention pass needs non-empty sequences, got {segments:?}"
            )));
        }
        let mut cos = Vec::with_capacity(segments.len());
        let mut sin = Vec::with_capacity(segments.len());
        for &(offset, n) in segments {
            let (c, s) = rope.cos_sin(offset, n)?;
            cos.push(c);
            sin.push(s);
        }
        let mut pass = Self::with_tables(rope, Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?);
        pass.segments = segments.iter().map(|&(_, n)| n).collect();
        Ok(pass)
    }

    /// The additive causal mask `[q_len, kv_len]` for a `window`, built once per pass.
    fn mask(
        &self,
        q_len: usize,
        kv_len: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Tensor> {
        let key = (q_len, kv_len, window);
        if let Some((_, m)) = self.masks.borrow().iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let m = causal_mask(q_len, kv_len, window, device)?;
        self.masks.borrow_mut().push((key, m.clone()));
        Ok(m)
    }
}

impl Attention {
    /// Attention over `x: [batch, seq, hidden]` f32 at the pass's positions.
    ///
    /// [`Mode::Inference`] appends keys and values to `cache` (required) and attends over what
    /// it returns; [`Mode::Training`] attends over the sequence itself with differentiable ops
    /// (`cache` is ignored).
    ///
    /// Errors: no cache for inference; shapes that do not agree with the weights.
    pub fn forward(
        &self,
        x: &Tensor,
        pass: &AttentionPass<'_>,
        cache: Option<&mut (dyn LayerKvCache + 'static)>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (q, k, v) = self.project(x, mode)?;
        let shape = |t: Tensor, h: usize| -> Result<Tensor> {
            let t = t.reshape((b, s, h, self.head_dim))?.transpose(1, 2)?;
            Ok(if mode.is_training() {
                t
            } else {
                t.contiguous()?
            })
        };
        let mut q = shape(q, self.n_heads)?;
        let mut k = shape(k, self.n_kv_heads)?;
        let v = shape(v, self.n_kv_heads)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward_mode(&q, mode)?;
            k = kn.forward_mode(&k, mode)?;
        }
        let (q, k) = if self.rope {
            (
                pass.rope.apply_mode(&q, &pass.cos, &pass.sin, mode)?,
                pass.rope.apply_mode(&k, &pass.cos, &pass.sin, mode)?,
            )
        } else {
            (q, k)
        };
        let o = match mode {
            Mode::Training { .. } => {
                let mask = pass.mask(s, s, self.window, x.device())?;
                causal_attention_diff(
                    &q,
                    &k,
                    &v,
                    self.scale,
                    self.softcap,
                    self.sinks.as_ref(),
                    &mask,
                )?
            }
            Mode::Inference => {
                let cache = cache.ok_or_else(|| {
                    Error::InvalidArgument("attention for inference needs a KV cache".into())
                })?;
                self.attend_cached(q, &k, &v, pass, cache)?
            }
        };
        self.o_proj.forward_mode(&o, mode)
    }

    /// Inference attention of one sequence: appends `k`, `v: [batch, kv_heads, seq, head_dim]`
    /// to `cache` and attends with `q: [batch, heads, seq, head_dim]` (rotated) over what it
    /// returns; `[batch, seq, heads · head_dim]`.
    fn attend_cached(
        &self,
        q: Tensor,
        k: &Tensor,
        v: &Tensor,
        pass: &AttentionPass<'_>,
        cache: &mut (dyn LayerKvCache + 'static),
    ) -> Result<Tensor> {
        // A prompt on CUDA: one fused causal kernel (reading an f16 cache as it is), no mask
        // and no score matrix.
        #[cfg(feature = "cuda")]
        if q.dim(2)? > 1
            && q.device().is_cuda()
            && self.softcap.is_none()
            && self.sinks.is_none()
            && self
                .window
                .is_none_or(|w| cache.attend_len(q.dim(2).unwrap_or(0)) <= w)
        {
            let (ks, vs) = cache.update_stored(k, v)?;
            // Either scale placement is the same product here (the kernel scales q in f32).
            if let Some(o) = crate::cuda::flash_attention(&q, &ks, &vs, self.scale as f32)? {
                return Ok(o);
            }
            let (k, v) = (ks.to_dtype(k.dtype())?, vs.to_dtype(v.dtype())?);
            return self.attend_general(q, &k, &v, pass);
        }
        let (k, v) = cache.update(k, v)?;
        self.attend_general(q, &k, &v, pass)
    }

    /// Attention of `q` over all of `k`, `v` (the cache's keys and values, the last `s` of them
    /// the queries' own positions) with a mask tensor where one is needed.
    fn attend_general(
        &self,
        q: Tensor,
        k: &Tensor,
        v: &Tensor,
        pass: &AttentionPass<'_>,
    ) -> Result<Tensor> {
        let s = q.dim(2)?;
        let kv_len = k.dim(2)?;
        // The CPU f32 kernel masks by position itself.
        let kernel_masks = q.device().is_cpu() && q.dtype() == DType::F32;
        let mask = if !kernel_masks && (s > 1 || self.window.is_some_and(|w| kv_len > w)) {
            Some(pass.mask(s, kv_len, self.window, q.device())?)
        } else {
            None
        };
        let (q, scale) = match self.scale_at {
            ScaleAt::Scores => (q, self.scale),
            ScaleAt::Queries => ((q * self.scale)?, 1.0),
        };
        causal_attention_capped(
            &q,
            k,
            v,
            scale,
            self.softcap,
            self.window,
            self.sinks.as_ref(),
            mask.as_ref(),
        )
    }

    /// Attention over the rows of several sequences at once (batched decode): `x: [1, rows,
    /// hidden]` f32 holds the rows of each sequence of `pass` ([`AttentionPass::batched`]) in
    /// turn, and `caches[i]` is sequence `i`'s cache of this layer. The projections (and q/k
    /// norms) run over all rows, RoPE rotates each row at its own position, and each sequence
    /// attends over its own cache as [`Self::forward`] does for it alone; returns `[1, rows,
    /// hidden]`.
    ///
    /// Errors: a pass that is not batched, or whose rows or sequences do not match `x` and
    /// `caches`; as [`Self::forward`].
    pub fn forward_batched(
        &self,
        x: &Tensor,
        pass: &AttentionPass<'_>,
        caches: &mut [&mut (dyn LayerKvCache + 'static)],
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let rows: usize = pass.segments.iter().sum();
        if b != 1 || rows != s || caches.len() != pass.segments.len() {
            return Err(Error::InvalidArgument(format!(
                "batched attention: input {:?}, {} caches, sequences of {:?} rows",
                x.dims(),
                caches.len(),
                pass.segments
            )));
        }
        let mode = Mode::Inference;
        let (q, k, v) = self.project(x, mode)?;
        let shape = |t: Tensor, h: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, h, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let mut q = shape(q, self.n_heads)?;
        let mut k = shape(k, self.n_kv_heads)?;
        let v = shape(v, self.n_kv_heads)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward_mode(&q, mode)?;
            k = kn.forward_mode(&k, mode)?;
        }
        let (q, k) = if self.rope {
            (
                pass.rope.apply_mode(&q, &pass.cos, &pass.sin, mode)?,
                pass.rope.apply_mode(&k, &pass.cos, &pass.sin, mode)?,
            )
        } else {
            (q, k)
        };
        let mut outs = Vec::with_capacity(caches.len());
        let mut start = 0;
        for (&n, cache) in pass.segments.iter().zip(caches.iter_mut()) {
            let part = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, start, n)?.contiguous()?) };
            outs.push(self.attend_cached(part(&q)?, &part(&k)?, &part(&v)?, pass, &mut **cache)?);
            start += n;
        }
        let o = Tensor::cat(&outs, 1)?;
        self.o_proj.forward_mode(&o, mode)
    }

    /// q, k and v `[batch, seq, heads · head_dim]` (before the head split).
    fn project(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            QkvProj::Separate { q, k, v } => match mode {
                Mode::Inference => {
                    let qkv = Linear::forward_many(&[q, k, v], x)?;
                    <[Tensor; 3]>::try_from(qkv)
                        .map(|[q, k, v]| (q, k, v))
                        .map_err(|_| Error::InvalidArgument("q/k/v projection missing".into()))
                }
                Mode::Training { .. } => Ok((
                    q.forward_mode(x, mode)?,
                    k.forward_mode(x, mode)?,
                    v.forward_mode(x, mode)?,
                )),
            },
            QkvProj::Fused(l) => {
                let y = l.forward_mode(x, mode)?;
                let (nq, nk) = (
                    self.n_heads * self.head_dim,
                    self.n_kv_heads * self.head_dim,
                );
                Ok((
                    y.narrow(2, 0, nq)?,
                    y.narrow(2, nq, nk)?,
                    y.narrow(2, nq + nk, nk)?,
                ))
            }
        }
    }

    /// The linear layers with their Hugging Face names within the block
    /// (`self_attn.q_proj`, ...) and, for q and k, their head counts (adapters on weights
    /// whose q/k rows are stored permuted need them).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear, Option<usize>)> {
        let (nh, nkv) = (self.n_heads, self.n_kv_heads);
        let mut out = Vec::with_capacity(4);
        match &mut self.qkv {
            QkvProj::Separate { q, k, v } => {
                out.push(("self_attn.q_proj", q, Some(nh)));
                out.push(("self_attn.k_proj", k, Some(nkv)));
                out.push(("self_attn.v_proj", v, None));
            }
            QkvProj::Fused(l) => out.push(("self_attn.qkv_proj", l, None)),
        }
        out.push(("self_attn.o_proj", &mut self.o_proj, None));
        out
    }
}
