//! Decode accelerators (feature `cuda`): a model whose one-token steps run through the fused
//! CUDA decoder ([`CudaDecoder`]) when its [`DecodePlan`] has a shape the decoder takes, and
//! through the model itself otherwise. The loader wraps every model placed on a CUDA device in
//! it, so any architecture that exports a plan gets the fused step.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::cuda::{
    kv_address, CudaDecoder, CudaQMatrix, DecoderFfn, DecoderLayer, DecoderSpec, SeqStep, MAX_BATCH,
};
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::kv_pool::BLOCK;
use crate::models::{
    BatchRow, CausalLM, DecodePlan, Logits, ModelInfo, ModelInput, PlanMlp, Prefill, Trainable,
    VisionInfo,
};
use crate::nn::{Activation, GateUp, Linear, QkvProj, RmsNorm, RotaryEmbedding};
use crate::{Error, Result};

/// Positions the fused decode step's RoPE tables cover at most.
const MAX_POSITIONS: usize = 32768;

/// Whether the fused decode step has been built.
#[derive(Debug, Default)]
enum State {
    /// Not tried yet.
    #[default]
    Untried,
    /// The model's plan has layers or settings the decoder does not take.
    Unavailable,
    /// Built.
    Ready(Box<CudaDecoder>),
}

/// A model with the fused CUDA decode step in front of it (see the module docs).
pub struct Accelerated {
    inner: Box<dyn CausalLM>,
    /// Built at the first one-token step; reset when adapters change the layers.
    state: Mutex<State>,
}

impl std::fmt::Debug for Accelerated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accelerated")
            .field("model", &self.inner.info().architecture)
            .field("state", &self.state)
            .finish()
    }
}

impl Accelerated {
    /// Wraps `inner` (weights on a CUDA device).
    pub fn new(inner: Box<dyn CausalLM>) -> Self {
        Self {
            inner,
            state: Mutex::new(State::Untried),
        }
    }

    /// `f` with the model's plan and the fused step (built at the first call); `None` when the
    /// model exports no plan or the step does not take it.
    ///
    /// Errors: a poisoned lock, building the step, and `f`'s.
    fn with_decoder<R>(
        &self,
        f: impl FnOnce(&DecodePlan<'_>, &mut CudaDecoder) -> Result<Option<R>>,
    ) -> Result<Option<R>> {
        let Some(plan) = self.inner.decode_plan() else {
            return Ok(None);
        };
        let mut state = self
            .state
            .lock()
            .map_err(|_| Error::Model("the CUDA decoder lock is poisoned".into()))?;
        if matches!(*state, State::Untried) {
            *state = self.build(&plan)?;
        }
        let State::Ready(dec) = &mut *state else {
            return Ok(None);
        };
        f(&plan, dec)
    }

    /// Whether the model has a fused decode step (built here when untried).
    ///
    /// Errors: as [`Self::with_decoder`].
    fn has_fused_step(&self) -> Result<bool> {
        Ok(self.with_decoder(|_, _| Ok(Some(())))?.is_some())
    }

    /// Whether the model has a fused decode step that runs one sequence at a time only (a
    /// mixture of experts under `POCKETLM_MOE_BATCH=0`: the batched step refuses it).
    ///
    /// Errors: as [`Self::with_decoder`].
    fn fused_step_is_single(&self) -> Result<bool> {
        Ok(self.with_decoder(|_, dec| Ok(Some(!dec.batches())))? == Some(true))
    }

    /// One batch row of one token through the fused step ([`Self::fused_step`]); `None` when
    /// the row has more tokens, its cache other layers, or the step does not take it.
    fn fused_row(&self, row: &mut BatchRow<'_>) -> Result<Option<Tensor>> {
        if row.ids.len() != 1 || row.cache.n_layers() != self.inner.info().n_layers {
            return Ok(None);
        }
        let ids = Tensor::new(&[[row.ids[0]]], self.inner.device())?;
        self.fused_step(&ids, row.cache)
    }

    /// One token through the fused step, appending to `cache` in place; `None` when the step
    /// does not apply (no plan or one it does not take, caches that do not append in place,
    /// positions past its tables), and the caller takes the model's own path.
    fn fused_step(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Option<Tensor>> {
        self.with_decoder(|plan, dec| {
            let pos = cache.offset();
            let Some(rope_pos) = rope_position(cache) else {
                return Ok(None);
            };
            let Some(bufs) = self.kv_buffers(dec, cache, plan.blocks.len())? else {
                return Ok(None);
            };
            let x = plan.embed_tokens.forward(input_ids)?;
            let out = dec.step(&x, &bufs.step(pos, rope_pos))?;
            commit_one(cache, plan.blocks.len())?;
            finish_logits(plan, dec, out).map(Some)
        })
    }

    /// The key/value buffers of each of the `n_layers` layers of `cache`, with room made for
    /// one more position appended in place ([`KvBuffers`]): a cache's own growing buffers, or
    /// for a cache paged in a [`crate::kv_pool::KvBlockPool`] on the GPU the pool layers'
    /// blocks and the block table. `None` when the fused step does not take the cache (layers
    /// at other offsets or not appending in place, other dtypes or shapes, paged layers whose
    /// tables differ, positions past the step's RoPE tables).
    ///
    /// Errors: the cache's, while making room (a block pool out of blocks).
    fn kv_buffers(
        &self,
        dec: &CudaDecoder,
        cache: &mut KvCache,
        n_layers: usize,
    ) -> Result<Option<KvBuffers>> {
        let pos = cache.offset();
        if pos + 1 >= dec.spec().max_positions() || cache.n_layers() != n_layers || n_layers == 0 {
            return Ok(None);
        }
        let (nkv, hd) = (dec.spec().n_kv_heads, dec.spec().head_dim);
        let kv_dtype = if dec.spec().kv_f16 {
            DType::F16
        } else {
            DType::F32
        };
        let dtype_ok = |k: &Tensor, v: &Tensor| k.dtype() == kv_dtype && v.dtype() == kv_dtype;
        let mut ptrs = Vec::with_capacity(n_layers);
        let mut capacity = None;
        let mut blocks: Option<Vec<u32>> = None;
        for i in 0..n_layers {
            let Some(layer) = cache.layer(i) else {
                return Ok(None);
            };
            if layer.offset() != pos {
                return Ok(None);
            }
            // Every layer the way the first goes: its own buffers, or blocks of a pool.
            if i == 0 || blocks.is_none() {
                if let Some((k, v)) = layer.reserve_in_place(1, nkv, hd, self.inner.device())? {
                    let cap = k.dim(2)?;
                    if *capacity.get_or_insert(cap) != cap || v.dim(2)? != cap || !dtype_ok(&k, &v)
                    {
                        return Ok(None);
                    }
                    ptrs.push((kv_address(&k)?, kv_address(&v)?));
                    continue;
                }
                if i > 0 {
                    return Ok(None);
                }
            }
            let Some((k, v, table)) = layer.reserve_paged(1)? else {
                return Ok(None);
            };
            let pool_shape = |t: &Tensor| {
                t.dims4()
                    .is_ok_and(|(_, h, b, d)| (h, b, d) == (nkv, BLOCK, hd))
            };
            if !pool_shape(&k) || !pool_shape(&v) || !dtype_ok(&k, &v) {
                return Ok(None);
            }
            match &blocks {
                Some(b) if *b != table => return Ok(None),
                Some(_) => {}
                None => blocks = Some(table),
            }
            ptrs.push((kv_address(&k)?, kv_address(&v)?));
        }
        let capacity = match &blocks {
            Some(b) => b.len() * BLOCK,
            None => capacity.unwrap_or(0),
        };
        Ok(Some(KvBuffers {
            ptrs,
            capacity,
            blocks,
        }))
    }

    /// One token of each row through the fused step at once ([`CudaDecoder::step_batch`]);
    /// `None` when it does not apply: fewer than 2 or more than [`MAX_BATCH`] rows, a row of
    /// more than one token, no plan or one the step does not take (or does not batch:
    /// [`CudaDecoder::batches`]), a cache [`Self::kv_buffers`] refuses, or
    /// `POCKETLM_FUSED_BATCH=0`.
    fn fused_batch(&self, rows: &mut [BatchRow<'_>]) -> Result<Option<Tensor>> {
        if !(2..=MAX_BATCH).contains(&rows.len())
            || rows.iter().any(|r| r.ids.len() != 1)
            || crate::switches::switched_off("POCKETLM_FUSED_BATCH")
        {
            return Ok(None);
        }
        self.with_decoder(|plan, dec| {
            if !dec.batches() {
                return Ok(None);
            }
            let n_layers = plan.blocks.len();
            let mut bufs = Vec::with_capacity(rows.len());
            for r in rows.iter_mut() {
                let pos = r.cache.offset();
                let Some(rope_pos) = rope_position(r.cache) else {
                    return Ok(None);
                };
                match self.kv_buffers(dec, r.cache, n_layers)? {
                    Some(kv) => bufs.push((pos, rope_pos, kv)),
                    None => return Ok(None),
                }
            }
            let ids: Vec<u32> = rows.iter().map(|r| r.ids[0]).collect();
            let x = plan
                .embed_tokens
                .forward(&Tensor::new(ids.as_slice(), self.inner.device())?)?;
            let seqs: Vec<SeqStep<'_>> = bufs
                .iter()
                .map(|(pos, rope_pos, kv)| kv.step(*pos, *rope_pos))
                .collect();
            let out = dec.step_batch(&x, &seqs)?;
            for r in rows.iter_mut() {
                commit_one(r.cache, n_layers)?;
            }
            finish_logits(plan, dec, out).map(Some)
        })
    }

    /// The fused step for `plan`, or [`State::Unavailable`] when it does not take the model
    /// (logged, with the architecture, at info level).
    fn build(&self, plan: &DecodePlan<'_>) -> Result<State> {
        let arch = &self.inner.info().architecture;
        Ok(match spec(plan, self.inner.device())? {
            Some(spec) => {
                tracing::info!("{arch}: one-token decode steps run on the fused CUDA decoder");
                State::Ready(Box::new(CudaDecoder::new(spec)?))
            }
            None => {
                tracing::info!(
                    "{arch}: the fused CUDA decoder does not take this model's layers; \
                     decode steps run layer by layer"
                );
                State::Unavailable
            }
        })
    }

    fn reset(&mut self) {
        if let Ok(state) = self.state.get_mut() {
            *state = State::Untried;
        }
    }

    /// The dtype the fused step wants the KV cache in (f16 unless `POCKETLM_KV_F16=0`), when
    /// the step applies to this model (building it now if not tried yet); `None` otherwise or
    /// when building it fails (the first step reports the error).
    fn kv_storage(&self) -> Option<DType> {
        let plan = self.inner.decode_plan()?;
        let mut state = self.state.lock().ok()?;
        if matches!(*state, State::Untried) {
            *state = self.build(&plan).ok()?;
        }
        match &*state {
            State::Ready(dec) if dec.spec().kv_f16 => Some(DType::F16),
            _ => None,
        }
    }

    /// `cache` set to store what the fused step reads ([`Self::kv_storage`]) when it is a
    /// fresh cache of growing layers (other kinds keep their own storage).
    fn for_fused_step(&self, mut cache: KvCache) -> KvCache {
        if let Some(dtype) = self.kv_storage() {
            cache.set_storage_dtype(dtype);
        }
        cache
    }
}

/// The RoPE position of the next token of `cache`: its offset plus its RoPE delta (Qwen2-VL's
/// text after images; 0 for other models), `None` if that is negative.
fn rope_position(cache: &KvCache) -> Option<usize> {
    usize::try_from(cache.offset() as i64 + cache.rope_delta()).ok()
}

/// The logits from the fused step's output `out`: the output layer applied when it is not one
/// of the step's, then the plan's final soft-cap (Gemma 2), if any.
///
/// Errors: the layers'.
fn finish_logits(plan: &DecodePlan<'_>, dec: &CudaDecoder, out: Tensor) -> Result<Tensor> {
    let logits = if dec.spec().lm_head.is_some() {
        out
    } else {
        plan.lm_head.forward(&out)?
    };
    match plan.final_softcap {
        Some(c) => crate::nn::softcap(&logits, c),
        None => Ok(logits),
    }
}

/// A cache's buffers for the fused step ([`SeqStep`]).
struct KvBuffers {
    /// Per layer the key and value buffer addresses (a paged cache's: its pool layers').
    ptrs: Vec<(u64, u64)>,
    /// Positions the buffers hold (a paged cache: its table's blocks times [`BLOCK`]).
    capacity: usize,
    /// A paged cache's block table, the same in every layer.
    blocks: Option<Vec<u32>>,
}

impl KvBuffers {
    /// The step's view of the buffers for the token at `pos` (RoPE position `rope_pos`).
    fn step(&self, pos: usize, rope_pos: usize) -> SeqStep<'_> {
        SeqStep {
            pos,
            rope_pos,
            kv: &self.ptrs,
            capacity: self.capacity,
            blocks: self.blocks.as_deref(),
        }
    }
}

/// Marks the position the fused step wrote into each of the `n_layers` layers of `cache` as
/// filled.
///
/// Errors: the cache's.
fn commit_one(cache: &mut KvCache, n_layers: usize) -> Result<()> {
    for i in 0..n_layers {
        if let Some(layer) = cache.layer(i) {
            layer.commit(1)?;
        }
    }
    Ok(())
}

/// The decoder's weights and tables from a plan, or `None` when the plan has something the
/// fused step does not take: layers other than our CUDA quantized matrices (or adapters),
/// biases other than the q/k/v projection's, a value norm, an output gate, attention sinks, a
/// query temperature, an activation other than SiLU or GELU-tanh, LongRoPE or partial rotary,
/// head_dim other than 64/96/128/256. It takes the q/k/v bias (Qwen2), per-head q/k RMSNorm
/// (Qwen3, Gemma 3), sliding windows (Mistral, Phi-3, Gemma 2/3), Gemma's post norms and
/// Gemma 2's attention and logit soft-caps, GeGLU, embedding scale, query scale, RoPE at a
/// position offset (Qwen2-VL's text after images), per-layer RoPE (one table per
/// rotary embedding), and mixtures of experts with softmax top-k routing and no shared expert
/// (Qwen3-MoE; see [`ffn`]). `POCKETLM_FUSED_DECODE=0` turns it off. The KV cache is kept in f16
/// for it (as llama.cpp's default), `POCKETLM_KV_F16=0` keeps f32.
fn spec(plan: &DecodePlan<'_>, device: &Device) -> Result<Option<DecoderSpec>> {
    if crate::switches::switched_off("POCKETLM_FUSED_DECODE")
        || !device.is_cuda()
        || !plan.rope.offset_independent()
    {
        return Ok(None);
    }
    let f32_vec = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    // The rotary embeddings the blocks use (the plan's first), each given one table.
    let mut ropes: Vec<&RotaryEmbedding> = vec![plan.rope];
    let mut layers = Vec::with_capacity(plan.blocks.len());
    let mut dims = None;
    let mut dense_inter = None;
    for b in &plan.blocks {
        let a = b.attention;
        let QkvProj::Fused(qkv) = &a.qkv else {
            return Ok(None);
        };
        let Some((ffn, activation)) = ffn(b.mlp, &mut dense_inter)? else {
            return Ok(None);
        };
        let rope = b.rope.unwrap_or(plan.rope);
        let norm_eps: Vec<f32> = [&a.q_norm, &a.k_norm]
            .into_iter()
            .flatten()
            .map(|n| n.eps())
            .collect();
        // The decoder applies one RMSNorm epsilon (the final norm's) to every block norm.
        let mut block_norm_eps = [
            Some(b.attn_norm),
            Some(b.mlp_norm),
            b.post_attn_norm,
            b.post_mlp_norm,
        ]
        .into_iter()
        .flatten()
        .map(RmsNorm::eps);
        if a.v_norm.is_some()
            || block_norm_eps.any(|e| e != plan.norm.eps())
            || a.output_gate
            || norm_eps.windows(2).any(|e| e[0] != e[1])
            || a.query_temperature.is_some()
            || a.sinks.is_some()
            || !matches!(activation, Activation::Silu | Activation::GeluTanh)
            || !rope.offset_independent()
            || rope.rotary_dim() != a.head_dim
            || rope.interleaved() != plan.rope.interleaved()
        {
            return Ok(None);
        }
        let rope_index = match ropes.iter().position(|r| std::ptr::eq(*r, rope)) {
            Some(i) => i,
            None => {
                ropes.push(rope);
                ropes.len() - 1
            }
        };
        let (qkv, qkv_bias) = match qkv {
            Linear::Cuda { weight, bias } => (Some(weight.clone()), bias.clone()),
            _ => (None, None),
        };
        let (Some(qkv), Some(o)) = (qkv, ours(&a.o_proj)) else {
            return Ok(None);
        };
        dims = Some((a.n_heads, a.n_kv_heads, a.head_dim));
        let norm = |n: &Option<RmsNorm>| n.as_ref().map(|n| f32_vec(n.weight()));
        layers.push(DecoderLayer {
            attn_norm: b.attn_norm.weight().clone(),
            qkv,
            qkv_bias: qkv_bias.as_ref().map(f32_vec).transpose()?,
            q_norm: norm(&a.q_norm).transpose()?,
            k_norm: norm(&a.k_norm).transpose()?,
            qk_norm_eps: norm_eps.first().copied().unwrap_or(1e-6),
            window: a.window.unwrap_or(0),
            // Where the scale applies (scores or queries) changes rounding only.
            scale: a.scale as f32,
            softcap: a.softcap.unwrap_or(0.0) as f32,
            rope: rope_index,
            post_attn_norm: b.post_attn_norm.map(|n| f32_vec(n.weight())).transpose()?,
            post_mlp_norm: b.post_mlp_norm.map(|n| f32_vec(n.weight())).transpose()?,
            gelu: activation == Activation::GeluTanh,
            o,
            ffn_norm: b.mlp_norm.weight().clone(),
            ffn,
        });
    }
    let Some((n_heads, n_kv_heads, head_dim)) = dims else {
        return Ok(None);
    };
    let intermediate = dense_inter.unwrap_or(0);
    let hidden = plan.norm.weight().dim(0)?;
    let positions = plan.context_length.clamp(1, MAX_POSITIONS);
    let ropes = ropes
        .iter()
        .map(|r| r.cos_sin(0, positions))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(DecoderSpec {
        layers,
        norm: plan.norm.weight().clone(),
        lm_head: ours(plan.lm_head),
        eps: plan.norm.eps(),
        n_heads,
        n_kv_heads,
        head_dim,
        hidden,
        intermediate,
        interleaved: plan.rope.interleaved(),
        kv_f16: !crate::switches::switched_off("POCKETLM_KV_F16"),
        ropes,
        embed_scale: plan.embed_scale,
    }))
}

/// The matrix of a bias-free layer of our CUDA kernels' formats, else `None`.
fn ours(l: &Linear) -> Option<Arc<CudaQMatrix>> {
    l.cuda_matrix().cloned()
}

/// A plan's feed-forward layer as the decoder takes it, with its activation; `None` when it
/// has layers other than ours: a dense MLP whose gate and up are not stacked, or whose dense
/// width differs from the other dense layers' (`dense_inter`, set by the first); a mixture of
/// experts with shared experts, routing other than softmax top-k (a selection bias, groups, a
/// scale, per-expert scales), a router that is not a bias-free float matrix, experts not of
/// our CUDA kernels' formats, or more experts or a larger top-k than the kernels take.
fn ffn(
    mlp: PlanMlp<'_>,
    dense_inter: &mut Option<usize>,
) -> Result<Option<(DecoderFfn, Activation)>> {
    match mlp {
        PlanMlp::Dense(m) => {
            let GateUp::Fused {
                gate_up,
                intermediate,
            } = &m.gate_up
            else {
                return Ok(None);
            };
            if *dense_inter.get_or_insert(*intermediate) != *intermediate {
                return Ok(None);
            }
            let (Some(gate_up), Some(down)) = (ours(gate_up), ours(&m.down_proj)) else {
                return Ok(None);
            };
            Ok(Some((DecoderFfn::Dense { gate_up, down }, m.activation)))
        }
        PlanMlp::Moe(moe) => Ok(moe
            .decoder_moe()?
            .map(|(m, activation)| (DecoderFfn::Moe(Box::new(m)), activation))),
    }
}

impl CausalLM for Accelerated {
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if b == 1 && s == 1 && cache.n_layers() == self.inner.info().n_layers {
            if let Some(out) = self.fused_step(input_ids, cache)? {
                return Ok(match logits {
                    Logits::Last => out,
                    Logits::All => out.unsqueeze(1)?,
                });
            }
        }
        self.inner.forward(input_ids, cache, logits)
    }

    fn forward_batch(&self, rows: &mut [BatchRow<'_>]) -> Result<Tensor> {
        // One sequence's one token (a server with one request running) takes the fused
        // one-sequence step, as `forward` does; its logits are `[1, vocab]` either way.
        if let [row] = rows {
            if let Some(out) = self.fused_row(row)? {
                return Ok(out);
            }
        }
        if let Some(out) = self.fused_batch(rows)? {
            return Ok(out);
        }
        // Decoding rows of a model whose fused step runs one sequence at a time (a mixture of
        // experts under POCKETLM_MOE_BATCH=0): that step once per row, instead of one
        // layer-by-layer pass for all.
        if rows.len() > 1
            && rows.iter().all(|r| r.ids.len() == 1)
            && !crate::switches::switched_off("POCKETLM_FUSED_ROWS")
            && self.fused_step_is_single()?
        {
            return crate::models::forward_each(
                rows,
                |row| self.fused_row(row),
                |rest| self.inner.forward_batch(rest),
            );
        }
        // One-token rows beside prompt chunks (a server admitting requests while others
        // decode): the one-token rows take the fused step and the chunks the model's own
        // batched pass, instead of one layer-by-layer pass for all.
        if !crate::switches::switched_off("POCKETLM_SPLIT_MIXED") && self.has_fused_step()? {
            let split = crate::models::forward_split(
                rows,
                |one| self.forward_batch(one),
                |more| self.inner.forward_batch(more),
            )?;
            if let Some(out) = split {
                return Ok(out);
            }
        }
        self.inner.forward_batch(rows)
    }

    fn new_cache(&self) -> KvCache {
        self.for_fused_step(self.inner.new_cache())
    }

    fn make_cache(&self, config: &KvCacheConfig) -> Result<KvCache> {
        Ok(self.for_fused_step(self.inner.make_cache(config)?))
    }

    fn cache_shapes(&self) -> Vec<(usize, usize)> {
        self.inner.cache_shapes()
    }

    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn vision(&self) -> Option<&VisionInfo> {
        self.inner.vision()
    }

    fn prefill(&self, input: &ModelInput, cache: &mut KvCache, chunk: usize) -> Result<Prefill> {
        self.inner.prefill(input, cache, chunk)
    }

    fn trainable(&self) -> Option<&dyn Trainable> {
        self.inner.trainable()
    }

    fn trainable_mut(&mut self) -> Option<&mut dyn Trainable> {
        // Adapters may swap layers: build the fused step again at the next token.
        self.reset();
        self.inner.trainable_mut()
    }

    fn decode_plan(&self) -> Option<DecodePlan<'_>> {
        self.inner.decode_plan()
    }
}
