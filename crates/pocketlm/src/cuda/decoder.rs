//! The fused decode step on a CUDA device of a model with Llama's block shape (Llama, Mistral,
//! Qwen2/3, Phi-3, Gemma 3, ...): one token through every block with our kernels
//! (`src/cuda/qmatrix.cu`), seven to nine launches a block, recorded once into a CUDA graph
//! and replayed for each token.
//!
//! Per block: RMSNorm + 8-bit activation quantization; the stacked q/k/v GEMV with its bias,
//! RoPE and the key/value append into the KV cache in its epilogue (with per-head q/k norms: a
//! plain GEMV, then `qkv_post` normalizes, rotates and appends); attention (over a sliding
//! window where the layer has one) split across blocks over the cached positions
//! (flash-decoding), then a second kernel merging the splits and quantizing (at short
//! contexts one split finishes and quantizes the output itself and the merge exits); the output
//! projection added to the residual; RMSNorm + quantization; the stacked gate/up GEMV with
//! SwiGLU or GeGLU; quantization; the down projection added to the residual. With Gemma's post
//! norms, the output and down projections are written instead, and the next RMSNorm kernel
//! normalizes and adds them to the residual first. Then the final RMSNorm and, when the output
//! layer is one of ours, its GEMV into the logits.
//!
//! The graph reads the position, the attended length and the cache capacity from a small device
//! buffer and the cache addresses from a device table, both written before each replay, so one
//! graph serves every position and survives the cache growing.
//!
//! [`CudaDecoder::step_batch`] runs the same step for up to [`MAX_BATCH`] sequences at once
//! (batched decode, as llama.cpp's server decodes its slots): each sequence has its own row of
//! every activation buffer, its own position and its own KV cache buffers (per sequence a
//! params row and a run of the address table), every projection is one small-batch GEMM on the
//! tensor cores over all rows (`qmmq_*`: each weight block read once), and attention runs per
//! sequence over its own cache on the grid's last dimension. One graph is recorded per batch
//! size.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaGraph, CudaSlice, DevicePtr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Storage, Tensor};

use super::launch::Launch;
use super::modules::{kernel, QMATRIX};
use super::qmatrix::{quantize_q8, CudaQMatrix, Epilogue, RopeArgs};
use crate::{Error, Result};

/// Most blocks the attention of one key/value head is split over (`ATTN_MAX_SPLITS` in
/// qmatrix.cu caps it), and the fewest positions a split takes: each split takes
/// `max(min_chunk, ceil(len / splits))` positions and the blocks past the last split exit at
/// once, so one recorded graph serves every length; a short context uses few blocks (and the
/// merge few partial results), a long one `splits` blocks per key/value head.
/// `POCKETLM_ATTN_SPLITS` and `POCKETLM_ATTN_MIN_CHUNK` override the defaults (64 and 16: the
/// fastest decode of five settings on the H200, 8B Q4_0 tg128 389.1 t/s at depth 4096 and
/// 292.4 at 16384, against 381.5 and 273.6 with 32 splits; with the merge in its own kernel,
/// more splits no longer cost a longer serial merge).
/// With an f16 cache the splits run on the tensor cores (`attn_mma_*`) unless
/// `POCKETLM_ATTN_KERNEL=simt` (`attn_gqa_*`, which an f32 cache always takes).
///
/// A batched step ([`CudaDecoder::step_batch`]) of `b` sequences already has a block per
/// sequence and key/value head, so it splits less: at most `max(batch_splits, 64 / b)`
/// (`POCKETLM_ATTN_BATCH_SPLITS`, default 4; the `64 / b` keeps 8 splits at 8 sequences and
/// more for fewer, so that a few sequences deep in a long context stay on enough blocks) of at
/// least `batch_min_chunk` positions (`POCKETLM_ATTN_BATCH_MIN_CHUNK`, default 16). With the
/// one-sequence rule, 32 sequences 128 to 192 positions deep spent 20% of a step in the
/// attention and its merge (H100, 8B Q4_0: 36 + 15 µs a layer, Nsight Compute); capped at 8
/// splits the step gave 4,219 aggregate tokens/s against 3,902 (H100). On the H200, tg64 after
/// 128 tokens, aggregate tokens/s at 8 / 32 sequences: at most 16 splits 1,837 / 4,170, 8
/// splits 1,824 / 4,121, 4 splits 1,881 / 4,396; after 1,024 tokens, 8 splits 1,708 / 3,658
/// against 32 splits 1,596 / 3,084. With the split gated product (H100, tg128 after 128
/// tokens, 8 / 16 / 32 / 64 sequences): 4 splits 1,739 / 2,976 / 4,345 / 5,146 against 8
/// splits 1,726 / 2,933 / 4,243 / 5,159.
///
/// Up to `direct` attended positions (`POCKETLM_ATTN_DIRECT`, default [`DIRECT`]; a batched
/// step `batch_direct`, `POCKETLM_ATTN_BATCH_DIRECT`, default [`BATCH_DIRECT`]) take one split,
/// which normalizes and quantizes its heads' outputs itself, so that the merge kernel exits at
/// once: at short contexts the merge was a fixed cost of about 5 µs a layer (H200, Nsight
/// Compute, 8B Q4_0 at depth 0: `attn_merge` 5.0 µs beside the split kernel's 5.2 µs). On the
/// H100 (8B Q4_0, tg128 after 128 tokens, aggregate t/s at 16 / 32 / 64 sequences) it gave
/// 3,028.9 / 4,530.6 / 5,477.2 against 2,992.2 / 4,408.2 / 5,212.2 with the batch's direct
/// length 0; one sequence's tg128 did not move (427.6, 422.2 against 425.6, 415.8 t/s).
///
/// `short`: every step launched with this split attends at most `direct` positions, so the
/// attention takes one split block per head group and no merge kernel is launched (the
/// one-token step's second graph, used while the attended length is at most `direct`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AttnSplit {
    short: bool,
    splits: usize,
    min_chunk: usize,
    tensor_cores: bool,
    batch_splits: usize,
    batch_min_chunk: usize,
    direct: usize,
    batch_direct: usize,
}

/// Attended positions up to which one sequence's decode attention takes one split (see
/// [`AttnSplit`]).
const DIRECT: usize = 128;
/// The same for a batched step's sequences.
const BATCH_DIRECT: usize = 256;

/// The largest split count the kernel's merge takes (`ATTN_MAX_SPLITS`).
const MAX_SPLITS: usize = 256;

/// Threads of an `attn_merge` block (`ATTN_MERGE_THREADS`, which its loops stride by).
const MERGE_THREADS: u32 = 512;

impl AttnSplit {
    fn from_env() -> Self {
        let var = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(default)
        };
        let simt = std::env::var("POCKETLM_ATTN_KERNEL").is_ok_and(|v| v == "simt");
        let mut s = Self::new(
            var("POCKETLM_ATTN_SPLITS", 64),
            var("POCKETLM_ATTN_MIN_CHUNK", 16),
            !simt,
        );
        s.batch_splits = var("POCKETLM_ATTN_BATCH_SPLITS", 4).clamp(1, s.splits);
        s.batch_min_chunk = var("POCKETLM_ATTN_BATCH_MIN_CHUNK", 16).max(1);
        s.direct = var("POCKETLM_ATTN_DIRECT", DIRECT);
        s.batch_direct = var("POCKETLM_ATTN_BATCH_DIRECT", BATCH_DIRECT);
        s
    }

    fn new(splits: usize, min_chunk: usize, tensor_cores: bool) -> Self {
        let splits = splits.clamp(1, MAX_SPLITS);
        Self {
            short: false,
            splits,
            min_chunk: min_chunk.max(1),
            tensor_cores,
            batch_splits: splits,
            batch_min_chunk: min_chunk.max(1),
            direct: 0,
            batch_direct: 0,
        }
    }

    /// The split a step of `batch` sequences takes: this one for one sequence, else at most
    /// `max(batch_splits, 64 / batch)` of at least `batch_min_chunk` positions (never more
    /// splits than the buffers were sized for).
    fn for_batch(self, batch: usize) -> Self {
        if batch <= 1 {
            return self;
        }
        Self {
            splits: self.batch_splits.max(64 / batch).min(self.splits),
            min_chunk: self.batch_min_chunk,
            direct: self.batch_direct,
            ..self
        }
    }
}

/// Query heads one attention block takes (they share a key/value head, whose rows it loads
/// once): the largest of 8, 4, 2, 1 that divides `n_heads / n_kv_heads`.
fn heads_per_block(n_heads: usize, n_kv_heads: usize) -> usize {
    let group = n_heads / n_kv_heads.max(1);
    [8, 4, 2, 1]
        .into_iter()
        .find(|g| group.is_multiple_of(*g))
        .unwrap_or(1)
}

/// One transformer block's weights for [`CudaDecoder`].
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// RMSNorm weight before attention, `[hidden]` f32 on the device.
    pub attn_norm: Tensor,
    /// q, k and v projections stacked by rows: `[(n_heads + 2 n_kv_heads) head_dim, hidden]`.
    pub qkv: Arc<CudaQMatrix>,
    /// Its bias `[(n_heads + 2 n_kv_heads) head_dim]` f32 (Qwen2), if any.
    pub qkv_bias: Option<Tensor>,
    /// Per-head RMSNorm weight `[head_dim]` f32 of the queries, before RoPE (Qwen3), if any.
    pub q_norm: Option<Tensor>,
    /// The same for the keys.
    pub k_norm: Option<Tensor>,
    /// Epsilon of `q_norm` and `k_norm`.
    pub qk_norm_eps: f32,
    /// Sliding window in tokens (a query sees itself and the `window - 1` keys before it);
    /// 0 for none.
    pub window: usize,
    /// The scores' scale (`head_dim^-0.5`, or Gemma's `query_pre_attn_scalar^-0.5`).
    pub scale: f32,
    /// The scores' soft-cap `c` (Gemma 2's `attn_logit_softcapping`: `c · tanh(s / c)` after
    /// the scale), 0 for none.
    pub softcap: f32,
    /// Which of [`DecoderSpec::ropes`] rotates this block's queries and keys.
    pub rope: usize,
    /// RMSNorm weight `[hidden]` f32 of the attention output before the residual add (Gemma),
    /// if any.
    pub post_attn_norm: Option<Tensor>,
    /// The same for the MLP output.
    pub post_mlp_norm: Option<Tensor>,
    /// GELU (tanh) instead of SiLU on the gate: GeGLU (Gemma).
    pub gelu: bool,
    /// Output projection `[hidden, n_heads head_dim]`.
    pub o: Arc<CudaQMatrix>,
    /// RMSNorm weight before the MLP, `[hidden]` f32.
    pub ffn_norm: Tensor,
    /// The feed-forward layer.
    pub ffn: DecoderFfn,
}

/// The feed-forward layer of a [`DecoderLayer`].
#[derive(Debug, Clone)]
pub enum DecoderFfn {
    /// A gated MLP.
    Dense {
        /// Gate then up projections stacked by rows: `[2 intermediate, hidden]`.
        gate_up: Arc<CudaQMatrix>,
        /// Down projection `[hidden, intermediate]`.
        down: Arc<CudaQMatrix>,
    },
    /// A mixture of experts with softmax routing and no shared expert (Qwen3-MoE).
    Moe(Box<DecoderMoe>),
}

/// A mixture-of-experts layer of the fused step: the router's logits (f32, on the normalized
/// f32 input), the top-k choice with softmax weights, the chosen experts' gate/up GEMVs with
/// SwiGLU (or GeGLU), and their down GEMVs summed with the weights into the residual, reading
/// only the chosen experts' weights (`moe_router`, `moe_gate_up_*`, `moe_down_*` in
/// qmatrix.cu). The weights are as transformers' `Qwen3MoeSparseMoeBlock` computes them:
/// `softmax(logits)` over all experts, the `top_k` highest (lower index first among equals),
/// divided by their sum when `norm_topk_prob`.
#[derive(Debug, Clone)]
pub struct DecoderMoe {
    /// Router weight `[n_experts, hidden]` f32 on the device.
    pub router: Tensor,
    /// Per expert its gate `[intermediate, hidden]`, up `[intermediate, hidden]` and down
    /// `[hidden, intermediate]` projections, all of one quantized format.
    pub experts: Vec<[Arc<CudaQMatrix>; 3]>,
    /// Experts per token (at most [`MOE_MAX_TOPK`]).
    pub top_k: usize,
    /// Divide the chosen experts' weights by their sum.
    pub norm_topk_prob: bool,
}

/// Most experts a [`DecoderMoe`] may have (`MOE_MAX_EXPERTS` in qmatrix.cu).
pub const MOE_MAX_EXPERTS: usize = 512;
/// Most experts a token may take in a [`DecoderMoe`] (`MOE_MAX_TOPK` in qmatrix.cu).
pub const MOE_MAX_TOPK: usize = 16;
/// u32 words of one row's choice in `sel` (`MOE_SEL_WORDS` in qmatrix.cu): a block counter,
/// then [`MOE_MAX_TOPK`] expert ids and as many weights.
const MOE_SEL_WORDS: usize = 1 + 2 * MOE_MAX_TOPK;
/// u32 words of the batched step's grouped choices (`moe_group` in qmatrix.cu): a counter, the
/// number of chosen experts, their ids, their entries' offsets, then up to [`MAX_BATCH`] rows'
/// entries.
const MOE_GRP_WORDS: usize = 2 + 2 * MOE_MAX_EXPERTS + 1 + MAX_BATCH * MOE_MAX_TOPK;

impl DecoderMoe {
    /// The expert width.
    fn intermediate(&self) -> usize {
        self.experts.first().map_or(0, |e| e[0].dims().0)
    }

    /// Whether the shapes fit `hidden` and the kernels: one format, widths multiples of 32.
    fn fits(&self, hidden: usize) -> bool {
        let inter = self.intermediate();
        let kernel = self.experts.first().map(|e| e[0].kernel_name());
        let group = self.experts.first().map(|e| e[0].group());
        !self.experts.is_empty()
            && self.experts.len() <= MOE_MAX_EXPERTS
            && (1..=MOE_MAX_TOPK.min(self.experts.len())).contains(&self.top_k)
            && inter.is_multiple_of(32)
            && self.router.dims() == [self.experts.len(), hidden]
            && self.experts.iter().all(|[g, u, d]| {
                g.dims() == (inter, hidden)
                    && u.dims() == (inter, hidden)
                    && d.dims() == (hidden, inter)
                    && [g, u, d]
                        .iter()
                        .all(|m| Some(m.kernel_name()) == kernel && Some(m.group()) == group)
            })
    }

    /// The device table the kernels read: per expert the codes, scales and biases addresses
    /// of its gate, up and down matrices (9 u64).
    fn table(&self, dev: &CudaDevice) -> Result<CudaSlice<u64>> {
        let host: Vec<u64> = self
            .experts
            .iter()
            .flat_map(|e| e.iter().flat_map(|m| m.raw_ptrs()))
            .collect();
        Ok(dev.cuda_stream().clone_htod(&host).w()?)
    }
}

/// A mixture of experts run over many token rows at once (a prompt's, in the general forward
/// pass) on the batched decode step's kernels ([`DecoderMoe`]'s grouped path): per chunk of
/// up to [`MAX_BATCH`] rows, the rows quantized to 8 bits (`quantize_q8`), the router and the
/// choice, each chosen expert's gate/up and down GEMVs over the rows that chose it, and the
/// weighted sum. In place of one product per expert over its gathered rows, a gather and a
/// scatter per expert and a host synchronization for the routing.
pub struct MoeRows {
    moe: DecoderMoe,
    table: CudaSlice<u64>,
    gelu: bool,
    dev: CudaDevice,
}

impl std::fmt::Debug for MoeRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeRows")
            .field("experts", &self.moe.experts.len())
            .field("top_k", &self.moe.top_k)
            .finish()
    }
}

impl MoeRows {
    /// The kernels for `moe` (SwiGLU, or GeGLU with `gelu`) on `device`; `None` when its
    /// shapes or formats do not fit them (see [`CudaDecoder::new`]'s) or `device` is not CUDA.
    ///
    /// Errors: the driver's, copying the expert table.
    pub fn new(moe: DecoderMoe, gelu: bool, device: &Device) -> Result<Option<Self>> {
        let Device::Cuda(dev) = device else {
            return Ok(None);
        };
        let hidden = moe.router.dims().get(1).copied().unwrap_or(0);
        if hidden == 0 || !hidden.is_multiple_of(32) || !moe.fits(hidden) {
            return Ok(None);
        }
        let table = moe.table(dev)?;
        Ok(Some(Self {
            moe,
            table,
            gelu,
            dev: dev.clone(),
        }))
    }

    /// The layer on `x: [n, hidden]` (f32, or converted to it) on the CUDA device: `[n,
    /// hidden]` f32, each row `Σ_k w_k · expert_k(row)` over its `top_k` chosen experts, as
    /// [`DecoderMoe`] computes one row of the decode step.
    ///
    /// Errors: [`Error::InvalidArgument`] for another width; the driver's.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let m = &self.moe;
        let h = m.router.dims()[1];
        let (n, w) = x.dims2()?;
        if w != h {
            return Err(Error::InvalidArgument(format!(
                "mixture of experts of width {h} on rows of {w} values"
            )));
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let dev = &self.dev;
        let stream = dev.cuda_stream();
        let (r, k, inter, n_exp) = (
            MAX_BATCH.min(n.max(1)),
            m.top_k,
            m.intermediate(),
            m.experts.len(),
        );
        let xq = dev.alloc_zeros::<i8>(r * h)?;
        let hq = dev.alloc_zeros::<i8>(r * k * inter)?;
        let f = |n: usize| dev.alloc_zeros::<f32>(n);
        let (xd, logits, hd, part) = (
            f(r * h / 16)?,
            f(r * n_exp)?,
            f(r * k * inter / 16)?,
            f(r * k * h)?,
        );
        let sel = dev.alloc_zeros::<u32>(r * MOE_SEL_WORDS)?;
        let grp = dev.alloc_zeros::<u32>(MOE_GRP_WORDS)?;
        let y = f(n * h)?;
        let (x0, y0) = (tensor_ptr(&x, &stream)?, y.ptr(&stream));
        let mut p = Ptrs {
            xq: xq.ptr(&stream),
            xd: xd.ptr(&stream),
            logits: logits.ptr(&stream),
            hq: hq.ptr(&stream),
            hd: hd.ptr(&stream),
            sel: sel.ptr(&stream),
            grp: grp.ptr(&stream),
            part: part.ptr(&stream),
            ..Ptrs::default()
        };
        let table = self.table.ptr(&stream);
        for c0 in (0..n).step_by(MAX_BATCH) {
            let rows = MAX_BATCH.min(n - c0);
            let at = (c0 * h * 4) as u64;
            quantize_q8(dev, x0 + at, p.xq, p.xd, rows * h)?;
            p.xn = x0 + at;
            p.y = y0 + at;
            m.launch(dev, h, &p, table, (self.gelu, false), rows)?;
        }
        Ok(super::qmatrix::into_tensor(y, dev, (n, h)))
    }
}

/// What [`CudaDecoder::new`] needs: weights, shapes and the RoPE tables.
#[derive(Debug, Clone)]
pub struct DecoderSpec {
    /// The blocks in order.
    pub layers: Vec<DecoderLayer>,
    /// Final RMSNorm weight `[hidden]` f32.
    pub norm: Tensor,
    /// The output layer `[vocab, hidden]` when it is one of ours; else the step returns the
    /// normalized hidden state and the caller applies its output layer.
    pub lm_head: Option<Arc<CudaQMatrix>>,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Head dimension (64, 96, 128 or 256).
    pub head_dim: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Dense MLP intermediate size (any, when every layer is a mixture of experts).
    pub intermediate: usize,
    /// RoPE pairs adjacent values (GGUF Llama) rather than halves.
    pub interleaved: bool,
    /// The KV cache buffers hold f16 (else f32): half the bytes attention reads at depth.
    pub kv_f16: bool,
    /// RoPE tables `(cos, sin)`, each `[positions, head_dim / 2]` f32 on the device: one per
    /// rotary embedding the blocks use (Gemma 3: global and local), at least one.
    pub ropes: Vec<(Tensor, Tensor)>,
    /// A factor on the embedding rows before the first block (Gemma), if any.
    pub embed_scale: Option<f64>,
}

impl DecoderSpec {
    /// Over the mixture-of-experts layers, the most of `f` (0 with none).
    fn moe_max(&self, f: impl Fn(&DecoderMoe) -> usize) -> usize {
        self.layers
            .iter()
            .map(|l| match &l.ffn {
                DecoderFfn::Dense { .. } => 0,
                DecoderFfn::Moe(m) => f(m),
            })
            .max()
            .unwrap_or(0)
    }

    /// Positions the RoPE tables cover (the fewest of any table).
    pub fn max_positions(&self) -> usize {
        self.ropes
            .iter()
            .map(|(c, _)| c.dims().first().copied().unwrap_or(0))
            .min()
            .unwrap_or(0)
    }
}

/// One sequence's part of a decode step ([`CudaDecoder::step`], [`CudaDecoder::step_batch`]):
/// the position of its new token, the position RoPE rotates it at, its cache buffers per layer
/// as device addresses `(keys, values)` (each `[n_kv_heads, capacity, head_dim]`, f16 when
/// [`DecoderSpec::kv_f16`], else f32, holding positions `0..pos`; the kernels write position
/// `pos`), and their capacity. For a paged cache ([`crate::kv_pool::PagedKvCache`]) the
/// addresses are the pool layers' blocks (`[n_blocks, n_kv_heads, BLOCK, head_dim]` each) and
/// `blocks` the block table every layer shares (position `t` in block `blocks[t / BLOCK]`,
/// row `t % BLOCK`); the capacity is then `blocks.len() · BLOCK`.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    /// Position of the new token in the cache (`< capacity`).
    pub pos: usize,
    /// Its RoPE position: `pos` for text models; a vision-language model's text after images
    /// runs at `pos` plus the cache's RoPE delta (Qwen2-VL's M-RoPE, where all three axes of a
    /// text token share one position). Below the tables' `max_positions`.
    pub rope_pos: usize,
    /// Per layer the key and value buffer addresses.
    pub kv: &'a [(u64, u64)],
    /// Positions the buffers hold.
    pub capacity: usize,
    /// The block table of a paged cache (ids of [`crate::kv_pool::BLOCK`]-position blocks in
    /// position order); `None` for contiguous buffers.
    pub blocks: Option<&'a [u32]>,
}

impl SeqStep<'_> {
    /// Whether it fits a decoder of `n_layers` layers whose RoPE tables cover `max_positions`.
    pub fn fits(&self, n_layers: usize, max_positions: usize) -> bool {
        self.kv.len() == n_layers
            && self.pos < self.capacity
            && self.pos < max_positions
            && self.rope_pos < max_positions
            && i32::try_from(self.capacity).is_ok()
            && self.blocks.is_none_or(|b| {
                b.len() * BLOCK == self.capacity
                    && b.len() <= table_row(max_positions)
                    && b.iter().all(|&id| i32::try_from(id).is_ok())
            })
    }

    /// The kernels' `params` row ([`KV_PARAMS`] i32): position, attended length, capacity,
    /// RoPE offset, the block table's device address `table` (low and high words; 0 for
    /// contiguous buffers), two unused.
    fn params(&self, table: u64) -> [i32; KV_PARAMS] {
        let t = if self.blocks.is_some() { table } else { 0 };
        params_row(self.pos, self.capacity, self.rope_pos, t)
    }
}

/// A sequence's `params` row as the kernels read it (see "The fused decode step" in
/// qmatrix.cu): the new token's position `pos`, the attended length `pos + 1`, the buffers'
/// `capacity`, the RoPE position's offset from `pos`, the block table's device address
/// `table` (low, high word; 0: contiguous buffers), two unused.
fn params_row(pos: usize, capacity: usize, rope_pos: usize, table: u64) -> [i32; KV_PARAMS] {
    let p = pos as i32;
    [
        p,
        p + 1,
        capacity as i32,
        rope_pos as i32 - p,
        table as u32 as i32,
        (table >> 32) as u32 as i32,
        0,
        0,
    ]
}

/// Ints of a sequence's `params` row (`KV_PARAMS` in qmatrix.cu).
const KV_PARAMS: usize = 8;

/// Positions of a block of a paged cache (`KV_BLOCK` in qmatrix.cu).
const BLOCK: usize = crate::kv_pool::BLOCK;
const _: () = assert!(BLOCK == 16, "qmatrix.cu's KV_BLOCK is 16");

/// Entries of a sequence's row of the block tables: blocks of `max_positions`, and one more (a
/// block a cache reserved ahead).
fn table_row(max_positions: usize) -> usize {
    max_positions.div_ceil(BLOCK) + 1
}

/// The paged caches' block tables on the device, a row of [`table_row`] entries for each of
/// [`MAX_BATCH`] sequences, and what each row last received (rows are uploaded when they
/// change: every [`BLOCK`] positions).
struct BlockTables {
    buf: CudaSlice<i32>,
    row: usize,
    host: Vec<Vec<u32>>,
}

impl BlockTables {
    fn new(dev: &CudaDevice, max_positions: usize) -> Result<Self> {
        let row = table_row(max_positions);
        Ok(Self {
            buf: dev.alloc_zeros::<i32>(MAX_BATCH * row)?,
            row,
            host: vec![Vec::new(); MAX_BATCH],
        })
    }

    /// The device address of row `z` holding `blocks` (uploaded when it differs from what the
    /// row holds; `blocks.len() <= row`, checked by [`SeqStep::fits`]).
    fn put(
        &mut self,
        z: usize,
        blocks: &[u32],
        stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    ) -> Result<u64> {
        let addr = self.buf.ptr(stream) + (z * self.row * 4) as u64;
        if self.host[z] != blocks {
            let ids: Vec<i32> = blocks.iter().map(|&b| b as i32).collect();
            // SAFETY: row z holds `self.row >= blocks.len()` i32 (z < MAX_BATCH).
            unsafe { htod(addr, &ids, stream)? };
            self.host[z] = blocks.to_vec();
        }
        Ok(addr)
    }
}

/// Scratch buffers of the decode step (device memory).
struct Buffers {
    x: CudaSlice<f32>,
    xq: CudaSlice<i8>,
    xd: CudaSlice<f32>,
    q: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    y: CudaSlice<f32>,
    part_o: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    ffh: CudaSlice<f32>,
    /// The normalized input of a mixture of experts in f32 (the router reads it).
    xn: CudaSlice<f32>,
    /// A mixture of experts' router logits.
    logits: CudaSlice<f32>,
    /// The chosen experts' hidden activations, quantized: codes `[top_k, intermediate]` and
    /// per-32 (d, d·Σq) pairs.
    hq: CudaSlice<i8>,
    hd: CudaSlice<f32>,
    /// The router's block counter, then the chosen experts' ids and weights (`moe_router`).
    sel: CudaSlice<u32>,
    out: CudaSlice<f32>,
    params: CudaSlice<i32>,
    kv: CudaSlice<u64>,
}

/// Most sequences [`CudaDecoder::step_batch`] takes (the small-batch GEMM's
/// [`super::qmatrix::MMQ_MAX_ROWS`]).
pub const MAX_BATCH: usize = super::qmatrix::MMQ_MAX_ROWS;

/// The batched step's device buffers, held for the addresses in its [`Ptrs`]: (x, xd, q, qkv,
/// y, part_o, part_ml, ffh, out, xn, logits, hd, part; xq, hq; params; kv; sel, grp).
type BatchBuffers = (
    Vec<CudaSlice<f32>>,
    Vec<CudaSlice<i8>>,
    CudaSlice<i32>,
    CudaSlice<u64>,
    Vec<CudaSlice<u32>>,
);

/// Buffers and graphs of the batched step, made at its first use for [`MAX_BATCH`] rows.
struct BatchState {
    /// The device buffers `ptr` points into.
    _bufs: BatchBuffers,
    params: u64,
    kv: u64,
    out: u64,
    x: u64,
    ptr: Ptrs,
    kv_host: Vec<u64>,
    /// Per batch size its graph and the steps run at that size.
    graphs: std::collections::HashMap<usize, (usize, Option<CudaGraph>)>,
}

/// The fused decode step (see the module documentation). Not thread-safe: hold it behind a
/// lock.
pub struct CudaDecoder {
    spec: DecoderSpec,
    /// The expert tables `ptr.moe_tables` points into.
    _moe_tables: Vec<Option<CudaSlice<u64>>>,
    dev: CudaDevice,
    buf: Buffers,
    /// Raw addresses of the buffers and weights the kernels take.
    ptr: Ptrs,
    kv_host: Vec<u64>,
    /// The step's graphs: for any attended length, and for lengths up to the split's
    /// `direct` (no merge kernel, [`AttnSplit`]'s `short`).
    graphs: [Option<CudaGraph>; 2],
    /// Steps run so far; a graph is captured from the second on (the first loads the kernels).
    steps: usize,
    use_graph: bool,
    /// Whether short contexts take their own graph (`POCKETLM_SHORT_GRAPH=0`: no).
    short_graph: bool,
    /// The decode attention's split of the cached positions over blocks.
    split: AttnSplit,
    /// The batched step's buffers and graphs, once used.
    batch: Option<BatchState>,
    /// The block tables of paged caches (the one-token step uses row 0).
    tables: BlockTables,
}

// SAFETY: the CUDA graph handles (raw pointers) are only used through `&mut self`, so never
// from two threads at once; the context is bound to the calling thread before each use
// (cudarc's `CudaGraph::launch` binds it).
unsafe impl Send for CudaDecoder {}

impl std::fmt::Debug for CudaDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDecoder")
            .field("layers", &self.spec.layers.len())
            .field("graph", &self.uses_graph())
            .finish()
    }
}

#[derive(Clone, Default)]
struct Ptrs {
    x: u64,
    xq: u64,
    xd: u64,
    q: u64,
    qkv: u64,
    y: u64,
    part_o: u64,
    part_ml: u64,
    ffh: u64,
    xn: u64,
    logits: u64,
    hq: u64,
    hd: u64,
    sel: u64,
    /// The batched step's choices grouped by expert (`moe_group` in qmatrix.cu); 0 in the
    /// one-token step.
    grp: u64,
    /// The batched step's unweighted expert outputs `[rows * top_k, hidden]` f32; 0 in the
    /// one-token step.
    part: u64,
    out: u64,
    params: u64,
    kv: u64,
    /// (cos, sin) of each of the spec's RoPE tables.
    ropes: Vec<(u64, u64)>,
    /// Per layer the device address of its expert table (`DecoderMoe::table`), 0 for a dense
    /// layer.
    moe_tables: Vec<u64>,
}

pub(crate) fn tensor_ptr(
    t: &Tensor,
    stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(s) = &*s else {
        return Err(Error::InvalidArgument(
            "decoder tensor is not on CUDA".into(),
        ));
    };
    if t.dtype() != DType::F32 || !l.is_contiguous() {
        return Err(Error::InvalidArgument(format!(
            "decoder tensor must be contiguous f32, got {:?}",
            t.dtype()
        )));
    }
    let v = s.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
    let (ptr, _sync) = v.device_ptr(stream);
    Ok(ptr)
}

impl CudaDecoder {
    /// Allocates the scratch buffers for `spec` on its device.
    ///
    /// Errors: [`Error::InvalidArgument`] for shapes the kernels do not take (head_dim other
    /// than 64, 96 or 128, sizes not multiples of 32, mismatched matrices, biases or norms)
    /// or tensors off CUDA.
    pub fn new(spec: DecoderSpec) -> Result<Self> {
        let Device::Cuda(dev) = spec.norm.device().clone() else {
            return Err(Error::InvalidArgument(
                "decoder weights are not on CUDA".into(),
            ));
        };
        let (nh, nkv, hd, h, inter) = (
            spec.n_heads,
            spec.n_kv_heads,
            spec.head_dim,
            spec.hidden,
            spec.intermediate,
        );
        let qkv_rows = (nh + 2 * nkv) * hd;
        let dims_ok = |t: &Option<Tensor>, n: usize| t.as_ref().is_none_or(|t| t.dims() == [n]);
        let ok_shapes = matches!(hd, 64 | 96 | 128 | 256)
            && !spec.ropes.is_empty()
            && nkv > 0
            && nh % nkv == 0
            && h % 32 == 0
            && h <= 16384
            && inter % 32 == 0
            && spec.layers.iter().all(|l| {
                l.qkv.dims() == (qkv_rows, h)
                    && dims_ok(&l.qkv_bias, qkv_rows)
                    && dims_ok(&l.q_norm, hd)
                    && dims_ok(&l.k_norm, hd)
                    && dims_ok(&l.post_attn_norm, h)
                    && dims_ok(&l.post_mlp_norm, h)
                    && l.rope < spec.ropes.len()
                    && l.o.dims() == (h, nh * hd)
                    && match &l.ffn {
                        DecoderFfn::Dense { gate_up, down } => {
                            gate_up.dims() == (2 * inter, h) && down.dims() == (h, inter)
                        }
                        DecoderFfn::Moe(m) => m.fits(h),
                    }
            })
            && spec.lm_head.as_ref().is_none_or(|m| m.dims().1 == h);
        if !ok_shapes {
            return Err(Error::InvalidArgument(
                "the fused CUDA decode step does not take this model's shapes".into(),
            ));
        }
        // The chosen experts' hidden activations, top_k experts' widths (quantized).
        let moe_width = spec.moe_max(|m| m.top_k * m.intermediate());
        let n_experts = spec.moe_max(|m| m.experts.len());
        let moe_tables = spec
            .layers
            .iter()
            .map(|l| match &l.ffn {
                DecoderFfn::Dense { .. } => Ok(None),
                DecoderFfn::Moe(m) => m.table(&dev).map(Some),
            })
            .collect::<Result<Vec<_>>>()?;
        let widest = h.max(nh * hd).max(inter);
        let out_len = spec.lm_head.as_ref().map_or(h, |m| m.dims().0);
        let split = AttnSplit::from_env();
        let buf = Buffers {
            x: dev.alloc_zeros::<f32>(h)?,
            xq: dev.alloc_zeros::<i8>(widest)?,
            xd: dev.alloc_zeros::<f32>(widest / 16)?,
            q: dev.alloc_zeros::<f32>(nh * hd)?,
            qkv: dev.alloc_zeros::<f32>(qkv_rows)?,
            y: dev.alloc_zeros::<f32>(h)?,
            part_o: dev.alloc_zeros::<f32>(nh * split.splits * hd)?,
            part_ml: dev.alloc_zeros::<f32>(2 * nh * split.splits)?,
            ffh: dev.alloc_zeros::<f32>(inter.max(1))?,
            xn: dev.alloc_zeros::<f32>(h)?,
            logits: dev.alloc_zeros::<f32>(n_experts.max(1))?,
            hq: dev.alloc_zeros::<i8>(moe_width.max(32))?,
            hd: dev.alloc_zeros::<f32>(moe_width.max(32) / 16)?,
            sel: dev.alloc_zeros::<u32>(MOE_SEL_WORDS)?,
            out: dev.alloc_zeros::<f32>(out_len)?,
            params: dev.alloc_zeros::<i32>(KV_PARAMS)?,
            kv: dev.alloc_zeros::<u64>(2 * spec.layers.len())?,
        };
        let stream = dev.cuda_stream();
        let p = |s: &dyn DevicePtrU64| s.ptr(&stream);
        let ptr = Ptrs {
            x: p(&buf.x),
            xq: p(&buf.xq),
            xd: p(&buf.xd),
            q: p(&buf.q),
            qkv: p(&buf.qkv),
            y: p(&buf.y),
            part_o: p(&buf.part_o),
            part_ml: p(&buf.part_ml),
            ffh: p(&buf.ffh),
            xn: p(&buf.xn),
            logits: p(&buf.logits),
            hq: p(&buf.hq),
            hd: p(&buf.hd),
            sel: p(&buf.sel),
            grp: 0,
            part: 0,
            out: p(&buf.out),
            params: p(&buf.params),
            kv: p(&buf.kv),
            moe_tables: moe_tables
                .iter()
                .map(|t| t.as_ref().map_or(0, |t| p(t)))
                .collect(),
            ropes: spec
                .ropes
                .iter()
                .map(|(c, s)| Ok((tensor_ptr(c, &stream)?, tensor_ptr(s, &stream)?)))
                .collect::<Result<_>>()?,
        };
        let use_graph = !crate::switches::switched_off("POCKETLM_CUDA_GRAPH");
        let tables = BlockTables::new(&dev, spec.max_positions())?;
        Ok(Self {
            tables,
            _moe_tables: moe_tables,
            kv_host: vec![0; 2 * spec.layers.len()],
            spec,
            dev,
            buf,
            ptr,
            graphs: [None, None],
            steps: 0,
            split,
            use_graph,
            short_graph: !crate::switches::switched_off("POCKETLM_SHORT_GRAPH"),
            batch: None,
        })
    }

    /// The spec it runs.
    pub fn spec(&self) -> &DecoderSpec {
        &self.spec
    }

    /// Whether [`Self::step_batch`] takes this model: always, but a model with a mixture of
    /// experts under `POCKETLM_MOE_BATCH=0` (its rows then take [`Self::step`] one by one).
    pub fn batches(&self) -> bool {
        self.spec
            .layers
            .iter()
            .all(|l| matches!(l.ffn, DecoderFfn::Dense { .. }))
            || !crate::switches::switched_off("POCKETLM_MOE_BATCH")
    }

    /// Whether the step runs as a captured CUDA graph.
    pub fn uses_graph(&self) -> bool {
        self.graphs.iter().any(Option::is_some)
    }

    /// Runs one token: `x: [1, 1, hidden]` (or `[hidden]`) f32, its embedding, for the
    /// sequence `seq` (its position, RoPE position and cache buffers, see [`SeqStep`]).
    /// Returns the logits `[1, vocab]` f32, or with no output layer of ours the final
    /// normalized hidden state `[1, hidden]`.
    ///
    /// Errors: [`Error::InvalidArgument`] when `x`, the cache or the positions do not fit
    /// ([`SeqStep::fits`]); the driver's errors.
    pub fn step(&mut self, x: &Tensor, seq: &SeqStep<'_>) -> Result<Tensor> {
        let h = self.spec.hidden;
        let SeqStep {
            pos, kv, capacity, ..
        } = *seq;
        if x.elem_count() != h || !seq.fits(self.spec.layers.len(), self.spec.max_positions()) {
            return Err(Error::InvalidArgument(format!(
                "decode step at position {pos} (capacity {capacity}, tables {}) with {} values \
                 and {} cache layers",
                self.spec.max_positions(),
                x.elem_count(),
                kv.len()
            )));
        }
        let stream = self.dev.cuda_stream();
        let table = match seq.blocks {
            Some(b) => self.tables.put(0, b, &stream)?,
            None => 0,
        };
        {
            let mut x = x.to_dtype(DType::F32)?.flatten_all()?;
            if let Some(f) = self.spec.embed_scale {
                x = (x * f)?;
            }
            let x = x.contiguous()?;
            let (s, l) = x.storage_and_layout();
            let Storage::Cuda(s) = &*s else {
                return Err(Error::InvalidArgument("decode input is not on CUDA".into()));
            };
            let src = s
                .as_cuda_slice::<f32>()?
                .slice(l.start_offset()..l.start_offset() + h);
            stream.memcpy_dtod(&src, &mut self.buf.x).w()?;
        }
        stream
            .memcpy_htod(&seq.params(table), &mut self.buf.params)
            .w()?;
        let table: Vec<u64> = kv.iter().flat_map(|&(k, v)| [k, v]).collect();
        if table != self.kv_host {
            stream.memcpy_htod(&table, &mut self.buf.kv).w()?;
            self.kv_host = table;
        }
        self.steps += 1;
        let short = self.short_graph && pos < self.split.direct;
        if self.graphs[short as usize].is_none() && self.use_graph && self.steps >= 2 {
            self.capture(short)?;
        }
        match &self.graphs[short as usize] {
            Some(g) => g.launch().w()?,
            None => self.record_with(&self.ptr, 1, short)?,
        }
        let n = self.buf.out.len();
        let mut out = unsafe { self.dev.alloc::<f32>(n) }?;
        stream.memcpy_dtod(&self.buf.out, &mut out).w()?;
        Ok(super::qmatrix::into_tensor(out, &self.dev, (1, n)))
    }

    /// Records the launches into a CUDA graph; on failure keeps launching them one by one.
    fn capture(&mut self, short: bool) -> Result<()> {
        match self.capture_with(&self.ptr, 1, short)? {
            Some(g) => self.graphs[short as usize] = Some(g),
            None => self.use_graph = false,
        }
        Ok(())
    }

    /// The launches of [`Self::record_with`] captured into a CUDA graph, or `None` (logged)
    /// when capture fails.
    fn capture_with(&self, p: &Ptrs, batch: usize, short: bool) -> Result<Option<CudaGraph>> {
        let stream = self.dev.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let recorded = self.record_with(p, batch, short);
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        match graph {
            Ok(Some(g)) => Ok(Some(g)),
            Ok(None) | Err(_) => {
                tracing::warn!("CUDA graph capture failed; the decode step launches its kernels");
                Ok(None)
            }
        }
    }

    /// Runs one token of each of `seqs.len()` sequences (2 to [`MAX_BATCH`]) together: `x:
    /// [batch, hidden]` f32 (row i the embedding of sequence i's token), `seqs[i]` its position,
    /// its cache buffers per layer (as [`Self::step`]'s `kv`) and their capacity. Returns the
    /// logits `[batch, vocab]` f32 (row i sequence i's), or with no output layer of ours the
    /// final normalized hidden states `[batch, hidden]`.
    ///
    /// Errors: [`Error::InvalidArgument`] for a batch out of range, shapes or positions the
    /// step does not take, or a model [`Self::batches`] refuses; the driver's errors.
    pub fn step_batch(&mut self, x: &Tensor, seqs: &[SeqStep<'_>]) -> Result<Tensor> {
        let (h, n_layers, b) = (self.spec.hidden, self.spec.layers.len(), seqs.len());
        let moe = !self.batches();
        let bad = seqs
            .iter()
            .find(|q| !q.fits(n_layers, self.spec.max_positions()));
        if !(2..=MAX_BATCH).contains(&b) || x.elem_count() != b * h || moe || bad.is_some() {
            return Err(Error::InvalidArgument(format!(
                "batched decode step of {b} sequences (2..={MAX_BATCH}) with {} values{}{}",
                x.elem_count(),
                if moe {
                    ", a mixture of experts (POCKETLM_MOE_BATCH=0)"
                } else {
                    ""
                },
                bad.map_or(String::new(), |q| format!(
                    ", a sequence at position {} (RoPE position {}, capacity {}, tables {}) with \
                     {} cache layers",
                    q.pos,
                    q.rope_pos,
                    q.capacity,
                    self.spec.max_positions(),
                    q.kv.len()
                )),
            )));
        }
        if self.batch.is_none() {
            self.batch = Some(self.batch_state()?);
        }
        let stream = self.dev.cuda_stream();
        let st = self.batch.as_mut().expect("made above");
        {
            let mut x = x.to_dtype(DType::F32)?.flatten_all()?;
            if let Some(f) = self.spec.embed_scale {
                x = (x * f)?;
            }
            let x = x.contiguous()?;
            let src = tensor_ptr(&x, &stream)?;
            // SAFETY: both buffers hold at least b * h f32 (x checked above, st.x MAX_BATCH rows).
            unsafe {
                sys::cuMemcpyDtoDAsync_v2(st.x, src, b * h * 4, stream.cu_stream())
                    .result()
                    .w()?;
            }
        }
        let mut params = Vec::with_capacity(b * KV_PARAMS);
        for (z, q) in seqs.iter().enumerate() {
            let table = match q.blocks {
                Some(ids) => self.tables.put(z, ids, &stream)?,
                None => 0,
            };
            params.extend(q.params(table));
        }
        let st = self.batch.as_mut().expect("made above");
        let table: Vec<u64> = seqs
            .iter()
            .flat_map(|q| q.kv.iter().flat_map(|&(k, v)| [k, v]))
            .collect();
        // SAFETY: params holds MAX_BATCH * KV_PARAMS i32 and kv MAX_BATCH * 2 n_layers u64 on the
        // device (b <= MAX_BATCH, each sequence n_layers pairs).
        unsafe {
            htod(st.params, &params, &stream)?;
            if st.kv_host.get(..table.len()) != Some(&table[..]) {
                htod(st.kv, &table, &stream)?;
                st.kv_host.clear();
                st.kv_host.extend_from_slice(&table);
            }
        }
        let (steps, graph) = st.graphs.entry(b).or_insert((0, None));
        *steps += 1;
        let capture = graph.is_none() && self.use_graph && *steps >= 2;
        let ptr = st.ptr.clone();
        let out_ptr = st.out;
        if capture {
            let g = self.capture_with(&ptr, b, false)?;
            if let Some(st) = self.batch.as_mut() {
                if let Some(e) = st.graphs.get_mut(&b) {
                    e.1 = g;
                }
            }
        }
        let st = self.batch.as_ref().expect("made above");
        match st.graphs.get(&b).and_then(|e| e.1.as_ref()) {
            Some(g) => g.launch().w()?,
            None => self.record_with(&ptr, b, false)?,
        }
        let n = b * self.out_len();
        let out = unsafe { self.dev.alloc::<f32>(n) }?;
        // SAFETY: out holds n f32, the step's output buffer MAX_BATCH rows of out_len.
        unsafe {
            sys::cuMemcpyDtoDAsync_v2(out.ptr(&stream), out_ptr, n * 4, stream.cu_stream())
                .result()
                .w()?;
        }
        Ok(super::qmatrix::into_tensor(
            out,
            &self.dev,
            (b, self.out_len()),
        ))
    }

    /// Values of the step's output row: the vocabulary with an output layer of ours, else the
    /// hidden size.
    fn out_len(&self) -> usize {
        self.spec
            .lm_head
            .as_ref()
            .map_or(self.spec.hidden, |m| m.dims().0)
    }

    /// The batched step's buffers for [`MAX_BATCH`] rows.
    fn batch_state(&self) -> Result<BatchState> {
        let s = &self.spec;
        let (nh, nkv, hd, h, inter) = (
            s.n_heads,
            s.n_kv_heads,
            s.head_dim,
            s.hidden,
            s.intermediate,
        );
        let widest = h.max(nh * hd).max(inter);
        let qkv_rows = (nh + 2 * nkv) * hd;
        // The chosen experts' hidden activations of a row, quantized.
        let moe_width = s.moe_max(|m| m.top_k * m.intermediate());
        let r = MAX_BATCH;
        let dev = &self.dev;
        let f = |n: usize| dev.alloc_zeros::<f32>(n.max(1));
        let floats = vec![
            f(r * h)?,
            f(r * widest / 16)?,
            f(r * nh * hd)?,
            f(r * qkv_rows)?,
            f(r * h)?,
            f(r * nh * self.split.splits * hd)?,
            f(r * 2 * nh * self.split.splits)?,
            // Room for the gate and up halves of a gated product split over its columns.
            f(r * 2 * inter)?,
            f(r * self.out_len())?,
            // A mixture of experts' buffers (one value each without one).
            f(r * s.moe_max(|_| h))?,
            f(r * s.moe_max(|m| m.experts.len()))?,
            f(r * moe_width / 16)?,
            f(r * s.moe_max(|m| m.top_k) * h)?,
        ];
        let bytes = vec![
            dev.alloc_zeros::<i8>(r * widest)?,
            dev.alloc_zeros::<i8>((r * moe_width).max(1))?,
        ];
        let words = vec![
            dev.alloc_zeros::<u32>(r * MOE_SEL_WORDS)?,
            dev.alloc_zeros::<u32>(MOE_GRP_WORDS)?,
        ];
        let params = dev.alloc_zeros::<i32>(r * KV_PARAMS)?;
        let kv = dev.alloc_zeros::<u64>(r * 2 * s.layers.len())?;
        let stream = dev.cuda_stream();
        let fp: Vec<u64> = floats.iter().map(|b| b.ptr(&stream)).collect();
        let ptr = Ptrs {
            x: fp[0],
            xq: bytes[0].ptr(&stream),
            xd: fp[1],
            q: fp[2],
            qkv: fp[3],
            y: fp[4],
            part_o: fp[5],
            part_ml: fp[6],
            ffh: fp[7],
            xn: fp[9],
            logits: fp[10],
            hq: bytes[1].ptr(&stream),
            hd: fp[11],
            sel: words[0].ptr(&stream),
            grp: words[1].ptr(&stream),
            part: fp[12],
            out: fp[8],
            params: params.ptr(&stream),
            kv: kv.ptr(&stream),
            ropes: self.ptr.ropes.clone(),
            moe_tables: self.ptr.moe_tables.clone(),
        };
        Ok(BatchState {
            params: ptr.params,
            kv: ptr.kv,
            out: ptr.out,
            x: ptr.x,
            ptr,
            _bufs: (floats, bytes, params, kv, words),
            kv_host: Vec::new(),
            graphs: std::collections::HashMap::new(),
        })
    }

    /// Launches the kernels of one step of `batch` sequences on the buffers at `p` (the
    /// one-token step's, or [`BatchState`]'s): every per-token buffer holds a row per sequence,
    /// `params` [`KV_PARAMS`] i32 and `kv` `2 n_layers` addresses per sequence. A batch takes the
    /// small-batch GEMM for every projection, and its mixtures of experts read each chosen
    /// expert once for all rows ([`DecoderMoe::launch`]). With `short`, every step it is
    /// launched for attends at most the split's `direct` positions ([`AttnSplit`]).
    fn record_with(&self, p: &Ptrs, batch: usize, short: bool) -> Result<()> {
        let s = &self.spec;
        let kv_stride = 2 * s.layers.len();
        // A projection of the step's rows: the GEMV for one, the small-batch GEMM for more.
        let project = |m: &CudaQMatrix, epi: Epilogue, y: u64| -> Result<()> {
            if batch == 1 {
                m.launch_gemv(epi, p.xq, p.xd, y, 1)
            } else {
                m.launch_mmq(epi, p.xq, p.xd, y, batch)
            }
        };
        let (nh, nkv, hd, h, inter) = (
            s.n_heads,
            s.n_kv_heads,
            s.head_dim,
            s.hidden,
            s.intermediate,
        );
        let func = |name: &str| kernel(&self.dev, &QMATRIX, name);
        let rmsnorm = func("rmsnorm_q8")?;
        let stream = self.dev.cuda_stream();
        let (eps, hi) = (s.eps, h as i32);
        // rmsnorm_q8 holds up to 4 runs of 4 values a thread.
        let norm_threads = (h.div_ceil(16).div_ceil(32) * 32).clamp(32, 1024) as u32;
        // RMSNorm + quantization of the residual; with `post` (a post-norm weight), the
        // projection waiting in `y` is first normalized by it and added to the residual; with
        // `xn` (else 0) the normalized values are also written there in f32.
        let norm_to = |w: u64, post: Option<u64>, xn: u64| -> Result<()> {
            let mut b = Launch::new(&rmsnorm);
            b.arg(p.x).arg(w).arg(eps).arg(hi).arg(p.xq).arg(p.xd);
            b.arg(post.map_or(0, |_| p.y)).arg(post.unwrap_or(0));
            b.arg(xn);
            let cfg = LaunchConfig {
                grid_dim: (1, batch as u32, 1),
                block_dim: (norm_threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: rmsnorm_q8's parameters, in order; the decoder's buffers.
            unsafe { b.launch(&stream, cfg) }
        };
        let norm = |w: u64, post: Option<u64>| norm_to(w, post, 0);
        let norm_f32 = func("rmsnorm_f32")?;
        // rmsnorm_f32 of `x` into `y` (accumulate: added to it).
        let norm_into = |x: u64, w: u64, y: u64, accumulate: bool| -> Result<()> {
            let mut b = Launch::new(&norm_f32);
            b.arg(x)
                .arg(w)
                .arg(eps)
                .arg(hi)
                .arg(y)
                .arg(accumulate as i32);
            let cfg = LaunchConfig {
                grid_dim: (1, batch as u32, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: rmsnorm_f32's parameters, in order; the decoder's buffers.
            unsafe { b.launch(&stream, cfg) }
        };
        // A projection added to the residual: directly, or (Gemma) written to `y`, its post
        // norm's weight returned for the next `norm` to apply and add.
        let add_residual = |m: &CudaQMatrix, post_norm: &Option<Tensor>| -> Result<Option<u64>> {
            match post_norm {
                None => project(m, Epilogue::Add, p.x).map(|_| None),
                Some(w) => {
                    project(m, Epilogue::Write, p.y)?;
                    Ok(Some(tensor_ptr(w, &stream)?))
                }
            }
        };
        let mut pending = None;
        let opt_ptr = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0), |t| tensor_ptr(t, &stream));
        for (li, l) in s.layers.iter().enumerate() {
            let li = li as i32;
            norm(tensor_ptr(&l.attn_norm, &stream)?, pending.take())?;
            let (cos, sin) = p.ropes[l.rope];
            let rope = RopeArgs {
                cos,
                sin,
                params: p.params,
                kv: p.kv,
                layer: li,
                q_out: p.q,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                interleaved: s.interleaved,
                kv_half: s.kv_f16,
                bias: opt_ptr(&l.qkv_bias)?,
                q_norm: opt_ptr(&l.q_norm)?,
                k_norm: opt_ptr(&l.k_norm)?,
                norm_eps: l.qk_norm_eps,
                scratch: p.qkv,
                batch,
                kv_stride,
            };
            l.qkv.launch_gemv_rope(p.xq, p.xd, &rope)?;
            launch_attention(
                &self.dev,
                &AttnArgs {
                    q: p.q,
                    params: p.params,
                    kv: p.kv,
                    layer: li,
                    part_o: p.part_o,
                    part_ml: p.part_ml,
                    xq: p.xq,
                    xd: p.xd,
                    batch,
                    kv_stride,
                },
                (nh, nkv, hd),
                (l.window, l.scale, l.softcap),
                s.kv_f16,
                AttnSplit {
                    short,
                    ..self.split.for_batch(batch)
                },
            )?;
            let post = add_residual(&l.o, &l.post_attn_norm)?;
            let ffn_norm = tensor_ptr(&l.ffn_norm, &stream)?;
            match &l.ffn {
                DecoderFfn::Dense { gate_up, down } => {
                    norm(ffn_norm, post)?;
                    let gated = if l.gelu {
                        Epilogue::GeGlu
                    } else {
                        Epilogue::SwiGlu
                    };
                    match gate_up.gated_splits(batch) {
                        1 => {
                            project(gate_up, gated, p.ffh)?;
                            quantize_q8(&self.dev, p.ffh, p.xq, p.xd, batch * inter)?;
                        }
                        // ffh holds 2 inter values a row in the batched step's buffers.
                        splits => {
                            let io = [p.xq, p.xd, p.ffh];
                            gate_up.launch_gated_split(l.gelu, io, batch, splits)?;
                        }
                    }
                    pending = add_residual(down, &l.post_mlp_norm)?;
                }
                DecoderFfn::Moe(m) => {
                    norm_to(ffn_norm, post, p.xn)?;
                    let table = p.moe_tables[li as usize];
                    let add = l.post_mlp_norm.is_none();
                    m.launch(&self.dev, s.hidden, p, table, (l.gelu, add), batch)?;
                    pending = l
                        .post_mlp_norm
                        .as_ref()
                        .map(|w| tensor_ptr(w, &stream))
                        .transpose()?;
                }
            }
        }
        let wn = tensor_ptr(&s.norm, &stream)?;
        match &s.lm_head {
            Some(m) => {
                norm(wn, pending)?;
                project(m, Epilogue::Write, p.out)
            }
            None => {
                if let Some(w) = pending {
                    norm_into(p.y, w, p.x, true)?;
                }
                norm_into(p.x, wn, p.out, false)
            }
        }
    }
}

impl DecoderMoe {
    /// Launches the mixture of experts over the normalized input of `batch` rows at `p` (`xn`
    /// f32, `xq`/`xd` quantized, a row per token, `hidden` values each): the router's logits
    /// and each row's choice; the chosen experts' gate/up GEMVs with SwiGLU (GeGLU with
    /// `gelu`), quantized into `hq`/`hd`; and the down GEMVs, weighted and summed in slot
    /// order, added to the residual `x` (`add`) or written to `y`. Without `p.grp` (the
    /// one-token step) three kernels index the experts by the row's choice; with it the
    /// router's last block groups the rows' choices by expert and each chosen expert's weights
    /// are read once for all the rows that chose it (`moe_gate_up_rows_*`, `moe_down_rows_*`),
    /// then `moe_combine` weights and sums each row's slots. `table` is the layer's expert
    /// table ([`DecoderMoe::table`]). Safe to capture in a CUDA graph.
    fn launch(
        &self,
        dev: &CudaDevice,
        h: usize,
        p: &Ptrs,
        table: u64,
        (gelu, add): (bool, bool),
        batch: usize,
    ) -> Result<()> {
        let m = self;
        let stream = dev.cuda_stream();
        let func = |name: &str| kernel(dev, &QMATRIX, name);
        let (inter, n_exp, top_k) = (m.intermediate(), m.experts.len(), m.top_k);
        let suffix = m.experts[0][0].kernel_name();
        let group = m.experts[0][0].group() as i32;
        let rows = p.grp != 0;
        let cfg = |grid: (u32, u32), threads: u32| LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // One block per expert's logit and row; the last one of a row makes its choice, the
        // last row's groups the choices.
        let router = func("moe_router")?;
        let mut b = Launch::new(&router);
        b.arg(tensor_ptr(&m.router, &stream)?)
            .arg(p.xn)
            .arg(p.logits)
            .arg(n_exp as i32)
            .arg(h as i32)
            .arg(top_k as i32)
            .arg(m.norm_topk_prob as i32)
            .arg(p.sel)
            .arg(if rows { p.grp } else { 0 });
        // SAFETY: moe_router's parameters, in order; the router weight and the decoder's
        // buffers, `batch` rows of xn, logits and sel (and grp for a batch).
        unsafe { b.launch(&stream, cfg((n_exp as u32, batch as u32), 128)) }?;
        // Gate/up: (table, the choice: sel, or grp and top_k), then these; down: (table, sel
        // or grp, top_k, hq, hd), then its output and these.
        let gate_up_args = |b: &mut Launch<'_>| {
            b.arg(p.xq)
                .arg(p.xd)
                .arg(p.hq)
                .arg(p.hd)
                .arg(inter as i32)
                .arg(h as i32)
                .arg(group)
                .arg(gelu as i32);
        };
        let down_args = |b: &mut Launch<'_>, index: u64| {
            b.arg(table)
                .arg(index)
                .arg(top_k as i32)
                .arg(p.hq)
                .arg(p.hd);
        };
        let y = if add { p.x } else { p.y };
        if !rows {
            let gate_up = func(&format!("moe_gate_up_{suffix}"))?;
            let mut b = Launch::new(&gate_up);
            b.arg(table).arg(p.sel);
            gate_up_args(&mut b);
            // SAFETY: moe_gate_up_*'s parameters, in order; the expert table holds the
            // addresses of matrices of this kernel's format and these shapes
            // (`DecoderMoe::fits`).
            unsafe { b.launch(&stream, cfg(((inter / 32) as u32, top_k as u32), 256)) }?;
            let down = func(&format!("moe_down_{suffix}"))?;
            let mut b = Launch::new(&down);
            down_args(&mut b, p.sel);
            b.arg(y)
                .arg(h as i32)
                .arg(inter as i32)
                .arg(group)
                .arg(add as i32);
            let grid = (h.div_ceil(MOE_DOWN_ROWS) as u32, 1);
            // SAFETY: moe_down_*'s parameters, in order; as above.
            return unsafe { b.launch(&stream, cfg(grid, 32 * top_k as u32)) };
        }
        // Blocks for each expert chosen by any row: at most this many.
        let chosen = n_exp.min(batch * top_k) as u32;
        let gate_up = func(&format!("moe_gate_up_rows_{suffix}"))?;
        let mut b = Launch::new(&gate_up);
        b.arg(table).arg(p.grp).arg(top_k as i32);
        gate_up_args(&mut b);
        // SAFETY: moe_gate_up_rows_*'s parameters, in order; the expert table holds matrices of
        // this kernel's format and these shapes (`DecoderMoe::fits`); hq/hd hold batch * top_k
        // rows.
        unsafe { b.launch(&stream, cfg(((inter / 32) as u32, chosen), 256)) }?;
        let down = func(&format!("moe_down_rows_{suffix}"))?;
        let mut b = Launch::new(&down);
        down_args(&mut b, p.grp);
        b.arg(p.part).arg(h as i32).arg(inter as i32).arg(group);
        let grid = (
            h.div_ceil(MOE_DOWN_WARP_ROWS * MOE_DOWN_WARPS) as u32,
            chosen,
        );
        // SAFETY: moe_down_rows_*'s parameters, in order; as above, part holds batch * top_k
        // rows of h.
        unsafe { b.launch(&stream, cfg(grid, 32 * MOE_DOWN_WARPS as u32)) }?;
        let combine = func("moe_combine")?;
        let mut b = Launch::new(&combine);
        b.arg(p.sel)
            .arg(p.part)
            .arg(y)
            .arg(h as i32)
            .arg(top_k as i32)
            .arg(add as i32);
        // SAFETY: moe_combine's parameters, in order; batch rows of sel, part and x / y.
        unsafe { b.launch(&stream, cfg((h.div_ceil(256) as u32, batch as u32), 256)) }
    }
}

/// Copies `src` to the device address `dst` on `stream`, in stream order. The host slice may be
/// dropped when it returns: from pageable memory the driver stages the bytes before returning
/// (CUDA programming guide, "Asynchronous Concurrent Execution").
///
/// # Safety
/// `dst` must hold `size_of_val(src)` bytes on the stream's device.
///
/// Errors: the driver's.
unsafe fn htod<T: Copy>(
    dst: u64,
    src: &[T],
    stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> Result<()> {
    // SAFETY: as the function's; src is valid for its length.
    unsafe {
        sys::cuMemcpyHtoDAsync_v2(
            dst,
            src.as_ptr() as *const std::ffi::c_void,
            std::mem::size_of_val(src),
            stream.cu_stream(),
        )
        .result()
        .w()?;
    }
    Ok(())
}

/// Output rows of one `moe_down_*` block (`MOE_DOWN_ROWS` in qmatrix.cu).
const MOE_DOWN_ROWS: usize = 4;
/// Output rows of one warp of a `moe_down_rows_*` block (`MOE_DOWN_WARP_ROWS` in qmatrix.cu).
const MOE_DOWN_WARP_ROWS: usize = 8;
/// Warps of a `moe_down_rows_*` block.
const MOE_DOWN_WARPS: usize = 8;

/// Device addresses the decode attention kernels take (see `attn_gqa` and `attn_merge` in
/// qmatrix.cu).
struct AttnArgs {
    q: u64,
    params: u64,
    kv: u64,
    layer: i32,
    part_o: u64,
    part_ml: u64,
    xq: u64,
    xd: u64,
    /// Sequences (1 for the one-token step): each has its own rows of `q`, `part_o`,
    /// `part_ml`, `xq`/`xd`, its own [`KV_PARAMS`] `params` and its own `kv_stride` u64 of
    /// `kv`.
    batch: usize,
    /// See `batch`.
    kv_stride: usize,
}

/// Launches the decode attention over the cached positions (the last `window` of them when
/// `window` > 0), scores scaled by `scale` (and soft-capped, `c tanh(s / c)`, by `softcap` = c
/// when it is above 0): the splits (`attn_mma_d{hd}_g{G}_f16` up to
/// head_dim 128, or `attn_gqa_d{hd}_g{G}_{f32|f16}` for the cache's dtype; grid (n_heads / G,
/// `split.splits`) of 128 threads), then their merge and quantization (`attn_merge_d{hd}`: one
/// block of [`MERGE_THREADS`] a head; up to `split.direct` attended positions the one split
/// writes the quantized output itself and the merge exits). `part_o` holds
/// `n_heads * splits * head_dim` f32,
/// `part_ml` `n_heads * splits` (max, sum) pairs, each times [`AttnArgs::batch`] (a batch's
/// sequences on the grid's last dimension). Safe to capture in a CUDA graph.
fn launch_attention(
    dev: &CudaDevice,
    a: &AttnArgs,
    (nh, nkv, hd): (usize, usize, usize),
    (window, scale, softcap): (usize, f32, f32),
    kv_f16: bool,
    split: AttnSplit,
) -> Result<()> {
    let g = heads_per_block(nh, nkv);
    // The tensor-core kernel's two key/value stages do not fit in shared memory at head_dim 256.
    let mma = kv_f16 && split.tensor_cores && hd <= 128;
    // The tensor-core kernel's scores are in base-2 units.
    let softcap = if mma {
        softcap * std::f32::consts::LOG2_E
    } else {
        softcap
    };
    let name = match (kv_f16, mma) {
        (true, true) => format!("attn_mma_d{hd}_g{g}_f16"),
        (true, false) => format!("attn_gqa_d{hd}_g{g}_f16"),
        (false, _) => format!("attn_gqa_d{hd}_g{g}_f32"),
    };
    let f = kernel(dev, &QMATRIX, &name)?;
    let (nhi, nkvi) = (nh as i32, nkv as i32);
    let (window, min_chunk) = (window as i32, split.min_chunk as i32);
    let direct = split.direct.min(i32::MAX as usize) as i32;
    let mut b = Launch::new(&f);
    b.arg(a.q)
        .arg(a.params)
        .arg(a.kv)
        .arg(a.layer)
        .arg(nhi)
        .arg(nkvi);
    b.arg(scale).arg(window).arg(min_chunk).arg(direct);
    b.arg(a.part_o).arg(a.part_ml).arg(a.xq).arg(a.xd);
    b.arg(a.kv_stride as i32).arg(softcap);
    // Short: one split, which writes the output itself (at most `direct` positions).
    let splits = if split.short { 1 } else { split.splits };
    let cfg = LaunchConfig {
        grid_dim: ((nh / g) as u32, splits as u32, a.batch as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    // SAFETY: attn_*'s parameters, in order; the buffers documented above.
    unsafe { b.launch(&stream, cfg) }?;
    if split.short {
        return Ok(());
    }
    let merge = kernel(dev, &QMATRIX, &format!("attn_merge_d{hd}"))?;
    let mut b = Launch::new(&merge);
    b.arg(a.params)
        .arg(window)
        .arg(min_chunk)
        .arg(direct)
        .arg(split.splits as i32);
    b.arg(a.part_o).arg(a.part_ml).arg(a.xq).arg(a.xd);
    let cfg = LaunchConfig {
        grid_dim: (nh as u32, a.batch as u32, 1),
        block_dim: (MERGE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: attn_merge's parameters, in order; the buffers documented above.
    unsafe { b.launch(&stream, cfg) }
}

/// The inputs of [`AttnTest`], held for the kernels: q, keys, values, params and the block
/// table, the key/value address table.
type AttnTestInputs = (
    CudaSlice<f32>,
    CudaSlice<u8>,
    CudaSlice<u8>,
    (CudaSlice<i32>, CudaSlice<i32>),
    CudaSlice<u64>,
);

/// `x: [n_kv, cap, hd]` laid out as a paged cache's pool: `[n_blocks, n_kv, BLOCK, hd]` with
/// position `t` in block `table[t / BLOCK]`, where the table takes the blocks in a scrambled
/// order (block `i` of the sequence is pool block `(5 i + 3) % n_blocks`, `n_blocks` the
/// sequence's blocks plus 3, coprime with 5) and the other blocks hold a large constant, so
/// that a kernel reading the wrong block, or past the sequence's blocks, goes visibly wrong.
/// Returns the pool and the table.
fn paged_layout(x: &[f32], nkv: usize, cap: usize, hd: usize) -> (Vec<f32>, Vec<i32>) {
    let used = cap.div_ceil(BLOCK);
    let mut n_blocks = used + 3;
    while n_blocks.is_multiple_of(5) {
        n_blocks += 1;
    }
    let table: Vec<i32> = (0..used).map(|i| ((5 * i + 3) % n_blocks) as i32).collect();
    let mut pool = vec![1.0e4f32; n_blocks * nkv * BLOCK * hd];
    for h in 0..nkv {
        for t in 0..cap {
            let b = table[t / BLOCK] as usize;
            let dst = ((b * nkv + h) * BLOCK + t % BLOCK) * hd;
            let src = (h * cap + t) * hd;
            pool[dst..dst + hd].copy_from_slice(&x[src..src + hd]);
        }
    }
    (pool, table)
}

/// Device buffers for one decode attention call of `q: [n_heads, hd]` over `k`, `v: [n_kv, cap,
/// hd]` (f16 when `kv_f16`, else f32) with `len` positions cached, contiguous or (`paged`) in
/// a block pool read through a block table ([`paged_layout`]).
struct AttnTest {
    _bufs: AttnTestInputs,
    _work: (CudaSlice<f32>, CudaSlice<f32>),
    xq: CudaSlice<i8>,
    xd: CudaSlice<f32>,
    args: AttnArgs,
}

impl AttnTest {
    #[allow(clippy::too_many_arguments)]
    fn new(
        dev: &CudaDevice,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (nh, hd): (usize, usize),
        len: usize,
        cap: usize,
        (kv_f16, paged): (bool, bool),
    ) -> Result<Self> {
        let stream = dev.cuda_stream();
        let qb = stream.clone_htod(q).w()?;
        let nkv = k.len() / (cap * hd).max(1);
        let (k, v, table) = if paged {
            let (k, table) = paged_layout(k, nkv, cap, hd);
            let (v, _) = paged_layout(v, nkv, cap, hd);
            (k, v, table)
        } else {
            (k.to_vec(), v.to_vec(), vec![0])
        };
        let upload = |x: &[f32]| -> Result<CudaSlice<u8>> {
            let bytes: Vec<u8> = if kv_f16 {
                x.iter()
                    .flat_map(|&f| half::f16::from_f32(f).to_le_bytes())
                    .collect()
            } else {
                x.iter().flat_map(|f| f.to_le_bytes()).collect()
            };
            Ok(stream.clone_htod(&bytes).w()?)
        };
        let kb = upload(&k)?;
        let vb = upload(&v)?;
        let tb = stream.clone_htod(&table).w()?;
        let t = if paged { tb.ptr(&stream) } else { 0 };
        let params = stream
            .clone_htod(&params_row(len - 1, cap, len - 1, t))
            .w()?;
        let kv = stream.clone_htod(&[kb.ptr(&stream), vb.ptr(&stream)]).w()?;
        let part_o = dev.alloc_zeros::<f32>(nh * MAX_SPLITS * hd)?;
        let part_ml = dev.alloc_zeros::<f32>(2 * nh * MAX_SPLITS)?;
        let xq = dev.alloc_zeros::<i8>(nh * hd)?;
        let xd = dev.alloc_zeros::<f32>(nh * hd / 16)?;
        let args = AttnArgs {
            q: qb.ptr(&stream),
            params: params.ptr(&stream),
            kv: kv.ptr(&stream),
            layer: 0,
            part_o: part_o.ptr(&stream),
            part_ml: part_ml.ptr(&stream),
            xq: xq.ptr(&stream),
            xd: xd.ptr(&stream),
            batch: 1,
            kv_stride: 0,
        };
        Ok(Self {
            _bufs: (qb, kb, vb, (params, tb), kv),
            _work: (part_o, part_ml),
            xq,
            xd,
            args,
        })
    }
}

/// Test helper: the decode attention of `q: [n_heads, hd]` over the first `len` positions of
/// `k`, `v: [n_kv, cap, hd]` (the last `window` of them when `window` > 0; stored on the
/// device as f16 when `kv_f16`, else f32; with `paged` in a block pool read through a block
/// table, [`paged_layout`]), run twice with the default split and once with
/// each of a few others (the returned result is the last: a split count's stale partial
/// results must not leak into the next; up to the split's `direct` positions the last is the
/// short graph's single split), on the tensor cores or not (head_dim 256: never),
/// returned as the 8-bit codes times their block scale: `[n_heads * hd]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_attention(
    dev: &CudaDevice,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (nh, nkv, hd): (usize, usize, usize),
    (len, window): (usize, usize),
    cap: usize,
    (kv_f16, paged): (bool, bool),
    tensor_cores: bool,
) -> Result<Vec<f32>> {
    let t = AttnTest::new(dev, q, k, v, (nh, hd), len, cap, (kv_f16, paged))?;
    let def = AttnSplit {
        tensor_cores,
        ..AttnSplit::from_env()
    };
    let mut splits = vec![
        AttnSplit::new(256, 16, tensor_cores),
        AttnSplit::new(7, 64, tensor_cores),
        def,
        def,
    ];
    // Up to `direct` positions, last the short graph's launch (one split, no merge).
    if len <= def.direct {
        splits.push(AttnSplit { short: true, ..def });
    }
    for split in splits {
        let scale = 1.0 / (hd as f32).sqrt();
        launch_attention(
            dev,
            &t.args,
            (nh, nkv, hd),
            (window, scale, 0.0),
            kv_f16,
            split,
        )?;
    }
    let stream = dev.cuda_stream();
    let codes = stream.clone_dtoh(&t.xq).w()?;
    let scales = stream.clone_dtoh(&t.xd).w()?;
    Ok(codes
        .iter()
        .enumerate()
        .map(|(i, &c)| c as f32 * scales[(i / 32) * 2])
        .collect())
}

/// Microseconds one decode attention call takes at Llama-3-8B shapes (32 heads, 8 key/value
/// heads, head_dim 128, f16 cache) after 4096 and 16384 positions, for several splits: the mean
/// of 50 back-to-back launches after 5 warm-ups, with the bytes of keys and values read over that
/// time. One line per length.
pub(crate) fn attention_timing(dev: &CudaDevice) -> Result<Vec<String>> {
    let (nh, nkv, hd) = (32usize, 8usize, 128usize);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut lines = Vec::new();
    for len in [4096usize, 16384] {
        let q: Vec<f32> = (0..nh * hd)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let kv: Vec<f32> = (0..nkv * len * hd)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let t = AttnTest::new(dev, &q, &kv, &kv, (nh, hd), len, len, (true, false))?;
        let bytes = (2 * nkv * len * hd * 2) as f64;
        for tc in [false, true] {
            let mut line = format!(
                "timing decode attention h{nh} kv{nkv} d{hd} len {len} f16 {}:",
                if tc { "mma" } else { "simt" }
            );
            for (splits, min_chunk) in [
                (32, 16),
                (64, 16),
                (128, 16),
                (256, 16),
                (64, 128),
                (128, 64),
                (64, 64),
                (128, 128),
            ] {
                let split = AttnSplit::new(splits, min_chunk, tc);
                for _ in 0..5 {
                    launch_attention(dev, &t.args, (nh, nkv, hd), (0, scale, 0.0), true, split)?;
                }
                dev.cuda_stream().synchronize().w()?;
                let t0 = std::time::Instant::now();
                for _ in 0..50 {
                    launch_attention(dev, &t.args, (nh, nkv, hd), (0, scale, 0.0), true, split)?;
                }
                dev.cuda_stream().synchronize().w()?;
                let us = t0.elapsed().as_secs_f64() * 1e6 / 50.0;
                line.push_str(&format!(
                    " s{splits}/c{min_chunk} {us:.1} us ({:.0} GB/s)",
                    bytes / us / 1e3
                ));
            }
            lines.push(line);
        }
    }
    Ok(lines)
}

/// The raw device address of a buffer, whatever its element type.
trait DevicePtrU64 {
    fn ptr(&self, stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>) -> u64;
}

impl<T> DevicePtrU64 for CudaSlice<T> {
    fn ptr(&self, stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>) -> u64 {
        self.device_ptr(stream).0
    }
}
