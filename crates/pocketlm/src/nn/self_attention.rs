//! The self-attention layer of the decoder blocks, shared by every architecture: q/k/v
//! projections (separate or fused, with or without biases), optional per-head q/k RMSNorm
//! (Qwen3, Gemma 3), RoPE, the KV cache, grouped-query attention with an optional sliding
//! window and logit soft-cap (Gemma 2), and the output projection. The layer decides which mask
//! it needs. Reference: Hugging Face `LlamaAttention` / `Gemma2Attention`, mlx-lm
//! `models/llama.py` `Attention`.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use super::attention::{
    causal_attention_capped, causal_attention_diff, causal_attention_paged, causal_mask,
};
use super::{Linear, Mla, Mode, RmsNorm, RotaryEmbedding};
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
    /// `q_proj` and `k_proj` only: the values are the key projection's output, before the key
    /// norm (Gemma 4's full-attention layers with `attention_k_eq_v`, HF
    /// `Gemma4TextAttention.use_alternative_attention`).
    KeyIsValue {
        /// `q_proj`.
        q: Linear,
        /// `k_proj`, also giving the values.
        k: Linear,
    },
    /// `q_proj` only: the layer attends over the keys and values of an earlier layer (Gemma 4's
    /// KV-shared layers, `num_kv_shared_layers`), given to [`Attention::forward_kv`].
    QueryOnly(Linear),
    /// Multi-head latent attention (DeepSeek-V3): queries, keys and values from a compressed
    /// latent, rotary only on part of each head ([`Mla::heads`], expanded per head or
    /// compressed to one shared head); the layer's `head_dim` is [`Mla::padded_head_dim`], its
    /// key/value heads [`Mla::kv_heads`], and RoPE is applied by [`Mla::heads`] itself.
    Latent(Box<Mla>),
}

/// Where [`Attention::forward_kv`] takes its keys and values from.
#[derive(Debug)]
pub enum KvSource<'c> {
    /// The layer's own projections, appended to this cache.
    Cache(&'c mut (dyn LayerKvCache + 'static)),
    /// Keys and values `[batch, kv_heads, len, head_dim]` an earlier layer attended over (its
    /// [`Attention::forward_kv`] result), at the same positions; no cache is touched.
    Shared(Tensor, Tensor),
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
    /// Per-head RMSNorm of the values `[head_dim]` (Gemma 4: without a learned scale).
    pub v_norm: Option<RmsNorm>,
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
    /// A position-dependent factor on the rotated queries (Ministral 3's Llama-4 attention
    /// temperature).
    pub query_temperature: Option<QueryTemperature>,
    /// Attention sinks `[heads]` f32 (gpt-oss's `self_attn.sinks`): one learned logit per head
    /// that joins each softmax denominator and has no value
    /// ([`super::attention::softmax_with_sinks`]), in every path (prefill, cached decode,
    /// batched decode, training).
    pub sinks: Option<Tensor>,
    /// An output gate in the query projection (Qwen3-Next / Qwen3.5, HF `Qwen3_5Attention`,
    /// mlx-lm `Qwen3NextAttention`): `q_proj` gives `[heads, 2 · head_dim]` per token, each
    /// head's queries then its gate, and the attention output is multiplied by
    /// `sigmoid(gate)` before `o_proj`.
    pub output_gate: bool,
}

/// Llama 4's position-dependent attention temperature, which Ministral 3 applies to its rotated
/// queries (HF `get_llama_4_attn_scale` in `modeling_ministral3.py`, mlx-lm
/// `_get_llama_4_attn_scale` in `models/ministral3.py`): the query at position `p` is
/// multiplied by `1 + beta · ln(1 + floor(p / original_max_position_embeddings))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueryTemperature {
    /// `llama_4_scaling_beta`.
    pub beta: f64,
    /// `original_max_position_embeddings` of the RoPE parameters (positive).
    pub original_max_position_embeddings: usize,
}

impl QueryTemperature {
    /// The factor at position `pos`.
    pub fn factor(&self, pos: usize) -> f64 {
        let steps = pos / self.original_max_position_embeddings.max(1);
        1.0 + self.beta * (1.0 + steps as f64).ln()
    }
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
    masks: Mutex<Vec<(MaskKey, Tensor)>>,
    /// For a pass over several sequences ([`Self::batched`]): the rows of each, in order.
    segments: Vec<usize>,
    /// `(first position, rows)` of each sequence, in order; empty when the tables were given
    /// ([`Self::with_tables`]).
    spans: Vec<(usize, usize)>,
}

/// A mask's query count, key count and window.
type MaskKey = (usize, usize, Option<usize>);

impl<'a> AttentionPass<'a> {
    /// A pass over positions `offset..offset + seq` with `rope`'s own tables.
    pub fn new(rope: &'a RotaryEmbedding, offset: usize, seq: usize) -> Result<Self> {
        let (cos, sin) = rope.cos_sin(offset, seq)?;
        let mut pass = Self::with_tables(rope, cos, sin);
        pass.spans = vec![(offset, seq)];
        Ok(pass)
    }

    /// A pass with tables computed by the model (`cos`, `sin: [seq, rotary_dim / 2]`, e.g.
    /// Qwen2-VL's multimodal RoPE); `rope` only says how pairs are rotated.
    pub fn with_tables(rope: &'a RotaryEmbedding, cos: Tensor, sin: Tensor) -> Self {
        Self {
            rope,
            cos,
            sin,
            masks: Mutex::new(Vec::new()),
            segments: Vec::new(),
            spans: Vec::new(),
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
        pass.spans = segments.to_vec();
        Ok(pass)
    }

    /// The factors `[1, 1, rows, 1]` f32 of `t` at the pass's positions.
    ///
    /// Errors: [`Error::InvalidArgument`] for a pass made from given tables, whose positions
    /// are not known.
    fn temperature(&self, t: &QueryTemperature, device: &Device) -> Result<Tensor> {
        if self.spans.is_empty() {
            return Err(Error::InvalidArgument(
                "a query temperature needs a pass with known positions".into(),
            ));
        }
        let f: Vec<f32> = self
            .spans
            .iter()
            .flat_map(|&(o, n)| (o..o + n).map(|p| t.factor(p) as f32))
            .collect();
        let rows = f.len();
        Ok(Tensor::from_vec(f, (1, 1, rows, 1), device)?)
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
        // Sequences of a batched pass attend on several threads; a poisoned lock only means
        // another thread panicked while holding it, and the list stays valid.
        let mut masks = self.masks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = masks.iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let m = causal_mask(q_len, kv_len, window, device)?;
        masks.push((key, m.clone()));
        Ok(m)
    }
}

impl Attention {
    /// A plain attention layer over `qkv` and `o_proj`: no q/k/v norms, the scores scaled by
    /// `head_dim^-0.5`, RoPE, no window, soft-cap, query temperature or sinks. Architectures
    /// set the fields they differ in (`Attention { q_norm, ..Attention::plain(..) }`).
    pub fn plain(
        qkv: QkvProj,
        o_proj: Linear,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            qkv,
            o_proj,
            q_norm: None,
            k_norm: None,
            v_norm: None,
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            softcap: None,
            window: None,
            scale_at: ScaleAt::Scores,
            rope: true,
            query_temperature: None,
            sinks: None,
            output_gate: false,
        }
    }

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
        if mode.is_training() {
            return Ok(self.forward_train_kv(x, pass, None, mode)?.0);
        }
        let (q, kv, gate) = self.heads(x, pass, mode)?;
        let (k, v) = kv.ok_or_else(|| {
            Error::InvalidArgument(
                "this attention layer has no key/value projections: it attends over shared keys \
                 and values (Attention::forward_kv)"
                    .into(),
            )
        })?;
        let cache = cache.ok_or_else(|| {
            Error::InvalidArgument("attention for inference needs a KV cache".into())
        })?;
        let o = self.attend_cached(q, &k, &v, pass, cache)?;
        self.output(&o, gate.as_ref(), mode)
    }

    /// Training attention of `x: [batch, seq, hidden]` f32 over positions `0..seq` (no cache),
    /// from differentiable ops, over the layer's own keys and values or, with `shared`, over
    /// an earlier layer's `[batch, kv_heads, seq, head_dim]` (Gemma 4's KV sharing, as
    /// [`Self::forward_kv`] in inference). Returns the output `[batch, seq, hidden]` and the
    /// keys and values attended over.
    ///
    /// Errors: [`Error::InvalidArgument`] for a layer without key/value projections and no
    /// `shared`; shapes that do not agree with the weights.
    pub fn forward_train_kv(
        &self,
        x: &Tensor,
        pass: &AttentionPass<'_>,
        shared: Option<(Tensor, Tensor)>,
        mode: Mode,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let s = x.dim(1)?;
        let (q, kv, gate) = self.heads(x, pass, mode)?;
        let (k, v) = shared.or(kv).ok_or_else(|| {
            Error::InvalidArgument(
                "this attention layer has no key/value projections: it needs shared keys and \
                 values"
                    .into(),
            )
        })?;
        let mask = pass.mask(s, s, self.window, x.device())?;
        let o = causal_attention_diff(
            &q,
            &k,
            &v,
            self.scale,
            self.softcap,
            self.sinks.as_ref(),
            &mask,
        )?;
        Ok((self.output(&o, gate.as_ref(), mode)?, (k, v)))
    }

    /// Inference attention whose keys and values may be shared between layers (Gemma 4's
    /// `num_kv_shared_layers`, HF `Gemma4TextAttention` `shared_kv_states`, mlx-lm
    /// `gemma4_text.py` `previous_kvs`). `x: [batch, seq, hidden]` f32 at the pass's positions
    /// -> (`[batch, seq, hidden]`, the keys and values attended over `[batch, kv_heads, len,
    /// head_dim]`). With [`KvSource::Cache`] the layer's keys and values are appended to the
    /// cache first (as [`Self::forward`]); with [`KvSource::Shared`] only queries are
    /// projected and they attend over the given keys and values.
    ///
    /// Errors: [`Error::InvalidArgument`] for a layer without key/value projections given a
    /// cache; shapes that do not agree with the weights.
    pub fn forward_kv(
        &self,
        x: &Tensor,
        pass: &AttentionPass<'_>,
        source: KvSource<'_>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let mode = Mode::Inference;
        let (q, kv, gate) = self.heads(x, pass, mode)?;
        let (k, v) = match (source, kv) {
            (KvSource::Shared(k, v), _) => (k, v),
            (KvSource::Cache(cache), Some((k, v))) => cache.update(&k, &v)?,
            (KvSource::Cache(_), None) => {
                return Err(Error::InvalidArgument(
                    "this attention layer has no key/value projections: it needs shared keys \
                     and values (KvSource::Shared)"
                        .into(),
                ))
            }
        };
        let o = self.attend_general(q, &k, &v, pass)?;
        Ok((self.output(&o, gate.as_ref(), mode)?, (k, v)))
    }

    /// The queries `[batch, heads, seq, head_dim]` and (unless the layer only has `q_proj`)
    /// the keys and values `[batch, kv_heads, seq, head_dim]` of `x: [batch, seq, hidden]`:
    /// projected, split into heads, normed per head where the layer has norms, queries and keys
    /// rotated at the pass's positions; and with [`Self::output_gate`] the gate `[batch, seq,
    /// heads · head_dim]`.
    #[allow(clippy::type_complexity)]
    fn heads(
        &self,
        x: &Tensor,
        pass: &AttentionPass<'_>,
        mode: Mode,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>, Option<Tensor>)> {
        if let QkvProj::Latent(m) = &self.qkv {
            let rotate = |t: &Tensor| pass.rope.apply_mode(t, &pass.cos, &pass.sin, mode);
            let (q, k, v) = m.heads(x, &rotate, mode)?;
            return Ok((q, Some((k, v)), None));
        }
        let (b, s, _) = x.dims3()?;
        let (q, kv) = self.project(x, mode)?;
        let (q, gate) = if self.output_gate {
            let qg = q.reshape((b, s, self.n_heads, 2 * self.head_dim))?;
            let gate = qg.narrow(3, self.head_dim, self.head_dim)?;
            let gate = gate.reshape((b, s, self.n_heads * self.head_dim))?;
            let q = qg.narrow(3, 0, self.head_dim)?;
            (q.reshape((b, s, self.n_heads * self.head_dim))?, Some(gate))
        } else {
            (q, None)
        };
        let shape = |t: Tensor, h: usize| -> Result<Tensor> {
            let t = t.reshape((b, s, h, self.head_dim))?.transpose(1, 2)?;
            Ok(if mode.is_training() {
                t
            } else {
                t.contiguous()?
            })
        };
        let norm = |t: Tensor, n: &Option<RmsNorm>| -> Result<Tensor> {
            match n {
                Some(n) => n.forward_mode(&t, mode),
                None => Ok(t),
            }
        };
        let rope = |t: Tensor| -> Result<Tensor> {
            if self.rope {
                pass.rope.apply_mode(&t, &pass.cos, &pass.sin, mode)
            } else {
                Ok(t)
            }
        };
        let mut q = rope(norm(shape(q, self.n_heads)?, &self.q_norm)?)?;
        if let Some(t) = &self.query_temperature {
            q = q.broadcast_mul(&pass.temperature(t, q.device())?)?;
        }
        let kv = match kv {
            Some((k, v)) => Some((
                rope(norm(shape(k, self.n_kv_heads)?, &self.k_norm)?)?,
                norm(shape(v, self.n_kv_heads)?, &self.v_norm)?,
            )),
            None => None,
        };
        Ok((q, kv, gate))
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
            // A cache paged in a pool on the GPU: the kernel reads its blocks in place through
            // the block table (no gathered copy).
            if crate::cuda::flash_paged_applies(&q) {
                if let Some(b) = cache.append_device(k, v)? {
                    let scale = self.scale as f32;
                    return crate::cuda::flash_attention_paged(
                        &q, &b.k, &b.v, &b.table, b.len, scale,
                    );
                }
            }
            let (ks, vs) = cache.update_stored(k, v)?;
            // Either scale placement is the same product here (the kernel scales q in f32).
            if let Some(o) = crate::cuda::flash_attention(&q, &ks, &vs, self.scale as f32)? {
                return Ok(o);
            }
            let (k, v) = (ks.to_dtype(k.dtype())?, vs.to_dtype(v.dtype())?);
            return self.attend_general(q, &k, &v, pass);
        }
        // One-token decode over a paged cache on the CPU: the kernel walks the block table
        // (vLLM's PagedAttention), with no gathered copy of the keys and values.
        if q.device().is_cpu()
            && q.dtype() == DType::F32
            && q.dims()[..3] == [1, self.n_heads, 1]
            && cache.append_paged(k, v)?
        {
            let kv = cache.paged().ok_or_else(|| {
                Error::InvalidArgument("a paged KV cache gave no block table".into())
            })?;
            let (q, scale) = match self.scale_at {
                ScaleAt::Scores => (q, self.scale),
                ScaleAt::Queries => ((q * self.scale)?, 1.0),
            };
            return causal_attention_paged(
                &q,
                &kv,
                scale,
                self.softcap,
                self.window,
                self.sinks.as_ref(),
            );
        }
        // On the CPU the f32 kernel also reads an f16 cache's own buffers (no f32 copy).
        let (k, v) = if q.device().is_cpu() && q.dtype() == DType::F32 {
            cache.update_stored(k, v)?
        } else {
            cache.update(k, v)?
        };
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
        let (q, kv, gate) = self.heads(x, pass, mode)?;
        let (k, v) = kv.ok_or_else(|| {
            Error::InvalidArgument("batched attention needs the layer's own keys and values".into())
        })?;
        let mut starts = Vec::with_capacity(caches.len());
        let mut start = 0;
        for &n in pass.segments.iter() {
            starts.push((start, n));
            start += n;
        }
        let one = |&(start, n): &(usize, usize), cache: &mut (dyn LayerKvCache + 'static)| {
            let part = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, start, n)?.contiguous()?) };
            self.attend_cached(part(&q)?, &part(&k)?, &part(&v)?, pass, cache)
        };
        // On the CPU the sequences attend in parallel: one decode row each is too little work
        // to split inside, and 16 of them one after the other were a tenth of a batched step.
        let outs = crate::kernels::zip_map_on(x.device(), caches, &starts, |cache, se| {
            one(se, &mut **cache)
        })
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
        let o = Tensor::cat(&outs, 1)?;
        self.output(&o, gate.as_ref(), mode)
    }

    /// The output projection of the attention output `o: [batch, seq, heads · head_dim]` (for
    /// latent attention of its per-head values, [`Mla::values_out`]), after `o ⊙ sigmoid(gate)`
    /// when the layer has an output gate.
    fn output(&self, o: &Tensor, gate: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        let gated;
        let o = match gate {
            Some(g) => {
                gated = (o * candle_nn::ops::sigmoid(g)?)?;
                &gated
            }
            None => o,
        };
        match &self.qkv {
            QkvProj::Latent(m) => self.o_proj.forward_mode(&m.values_out(o)?, mode),
            _ => self.o_proj.forward_mode(o, mode),
        }
    }

    /// q and (unless the layer only has `q_proj`) k and v `[batch, seq, heads · head_dim]`
    /// (before the head split).
    #[allow(clippy::type_complexity)]
    fn project(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        match &self.qkv {
            QkvProj::Separate { q, k, v } => match mode {
                Mode::Inference => {
                    let qkv = Linear::forward_many(&[q, k, v], x)?;
                    <[Tensor; 3]>::try_from(qkv)
                        .map(|[q, k, v]| (q, Some((k, v))))
                        .map_err(|_| Error::InvalidArgument("q/k/v projection missing".into()))
                }
                Mode::Training { .. } => Ok((
                    q.forward_mode(x, mode)?,
                    Some((k.forward_mode(x, mode)?, v.forward_mode(x, mode)?)),
                )),
            },
            QkvProj::Fused(l) => {
                let y = l.forward_mode(x, mode)?;
                // With an output gate the query rows carry each head's gate too.
                let (nq, nk) = (
                    self.n_heads * self.head_dim * if self.output_gate { 2 } else { 1 },
                    self.n_kv_heads * self.head_dim,
                );
                Ok((
                    y.narrow(2, 0, nq)?,
                    Some((y.narrow(2, nq, nk)?, y.narrow(2, nq + nk, nk)?)),
                ))
            }
            QkvProj::KeyIsValue { q, k } => {
                let k = k.forward_mode(x, mode)?;
                Ok((q.forward_mode(x, mode)?, Some((k.clone(), k))))
            }
            QkvProj::QueryOnly(q) => Ok((q.forward_mode(x, mode)?, None)),
            QkvProj::Latent(_) => Err(Error::InvalidArgument(
                "latent attention projects its heads itself (Mla::heads)".into(),
            )),
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
            QkvProj::KeyIsValue { q, k } => {
                out.push(("self_attn.q_proj", q, Some(nh)));
                out.push(("self_attn.k_proj", k, Some(nkv)));
            }
            QkvProj::QueryOnly(q) => out.push(("self_attn.q_proj", q, Some(nh))),
            QkvProj::Latent(m) => {
                out.extend(m.linears_mut().into_iter().map(|(n, l)| (n, l, None)))
            }
        }
        out.push(("self_attn.o_proj", &mut self.o_proj, None));
        out
    }
}
