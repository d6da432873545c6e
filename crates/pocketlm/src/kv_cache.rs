//! Key/value caches. The model asks its cache to append new keys/values and gets back all
//! keys/values to attend to; it does not know which kind of cache it got (the design of
//! `mlx_lm/models/cache.py` and MLX Swift's `KVCache` protocol).
//!
//! Three kinds: [`GrowingKvCache`] (every position, preallocated in steps),
//! [`RotatingKvCache`] (the first `keep` positions plus a sliding window, at most `max_size`
//! positions held, as mlx-lm's `RotatingKVCache`) and [`QuantizedKvCache`] (keys and values
//! stored with MLX affine group quantization, as mlx-lm's `QuantizedKVCache`).
//!
//! Layers that keep no keys and values but a fixed-size state (the last inputs of a short
//! convolution, a recurrent state) hold an [`ArraysCache`] (mlx-lm's `ArraysCache`) in the same
//! [`KvCache`], so that sessions and prompt caches carry it like the keys and values.

use candle_core::{DType, Tensor};

use crate::kv_pool::{KvBlockPool, PagedBlocks, PagedKv, PagedKvCache};
use crate::quant::hadamard;
use crate::quant::mlx_affine::{self, AffineQuantized, GroupParams, ParamDtype};
use crate::{Error, Result};

/// One attention layer's cache.
///
/// Keys and values are `[batch, kv_heads, seq, head_dim]`.
pub trait LayerKvCache: Send + Sync + std::fmt::Debug {
    /// Appends `k`, `v` (`[batch, kv_heads, new, head_dim]`) and returns the keys and values to
    /// attend to (`[batch, kv_heads, len, head_dim]`).
    fn update(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;
    /// As [`Self::update`], but the returned keys and values may stay in the cache's storage
    /// dtype (an f16 cache's own buffers, for a kernel that reads f16) instead of `k`'s dtype.
    /// Default: [`Self::update`].
    fn update_stored(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.update(k, v)
    }
    /// Number of positions processed so far (the RoPE offset of the next token). A rotating
    /// cache holds fewer positions than this.
    fn offset(&self) -> usize;
    /// How many keys/values the next [`LayerKvCache::update`] with `new` positions returns (the
    /// `kv_len` of the attention mask); the last `new` of them are the new positions and come
    /// after all the others in time. Default: `offset() + new` (every position is kept).
    fn attend_len(&self, new: usize) -> usize {
        self.offset() + new
    }
    /// Bytes held by the cache's buffers.
    fn nbytes(&self) -> usize;
    /// The held keys and values in time order (`[batch, kv_heads, held, head_dim]`, float,
    /// dequantized for a quantized cache), or `None` when empty. `held < offset()` for a
    /// rotating cache that dropped positions.
    fn state(&self) -> Result<Option<(Tensor, Tensor)>>;
    /// Forgets everything.
    fn reset(&mut self);
    /// Drops all positions from `len` on (`len <= offset()`), to resume from a shared prefix.
    ///
    /// Errors: [`Error::InvalidArgument`] when `len > offset()`, or when the positions
    /// before `len` are no longer all held (a rotating cache that dropped some of them).
    fn truncate(&mut self, len: usize) -> Result<()>;
    /// For a fused kernel that appends in place: makes room for `n` more positions of
    /// `kv_heads x head_dim` f32 keys and values on `device` and returns the whole key and value
    /// buffers `[1, kv_heads, capacity, head_dim]` (positions `0..offset()` filled, capacity at
    /// least `offset() + n`). `None` (the default) when this cache cannot be appended in place;
    /// after writing, call [`Self::commit`].
    fn reserve_in_place(
        &mut self,
        n: usize,
        kv_heads: usize,
        head_dim: usize,
        device: &candle_core::Device,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let _ = (n, kv_heads, head_dim, device);
        Ok(None)
    }
    /// For a fused kernel that appends in place through a block table on a device
    /// ([`PagedKvCache::reserve_device`]): makes the table cover `n` more positions and
    /// returns the pool layer's key and value storage (`[n_blocks, kv_heads, BLOCK,
    /// head_dim]` each, [`KvBlockPool::device_blocks`]) and the block table (block ids in
    /// position order). `None` (the default) for a cache that is not paged on a device; after
    /// writing, call [`Self::commit`].
    ///
    /// Errors: [`Error::InvalidArgument`] when the pool is out of blocks.
    fn reserve_paged(&mut self, n: usize) -> Result<Option<(Tensor, Tensor, Vec<u32>)>> {
        let _ = n;
        Ok(None)
    }
    /// For a kernel that reads a paged cache's blocks in place on a device (the CUDA flash
    /// prefill): appends `k`, `v` (`[1, kv_heads, new, head_dim]`) and returns the pool
    /// layer's key and value storage (`[n_blocks, kv_heads, BLOCK, head_dim]` each), the block
    /// table (block ids in position order) and the number of positions held. `None` (the
    /// default; nothing appended) for a cache that is not paged on a device.
    ///
    /// Errors: as [`Self::update`].
    fn append_device(&mut self, k: &Tensor, v: &Tensor) -> Result<Option<PagedBlocks>> {
        let _ = (k, v);
        Ok(None)
    }
    /// Counts `n` positions written in place into the buffers of [`Self::reserve_in_place`]
    /// (or the blocks of [`Self::reserve_paged`]).
    ///
    /// Errors: [`Error::InvalidArgument`] for a cache that does not append in place (the
    /// default) or when `n` exceeds the room reserved.
    fn commit(&mut self, n: usize) -> Result<()> {
        let _ = n;
        Err(Error::InvalidArgument(
            "this KV cache does not take in-place appends".into(),
        ))
    }
    /// For a kernel that reads the cache through its block table ([`Self::paged`]): appends
    /// `k`, `v` (`[1, kv_heads, new, head_dim]`) without gathering anything and returns
    /// `true`; `false` (the default) for a cache that is not paged, which then appends
    /// nothing (the caller uses [`Self::update`]).
    ///
    /// Errors: as [`Self::update`] (for a paged cache: shapes that are not the layer's, a
    /// pool out of blocks).
    fn append_paged(&mut self, k: &Tensor, v: &Tensor) -> Result<bool> {
        let _ = (k, v);
        Ok(false)
    }
    /// The held keys and values read in place through a block table
    /// ([`crate::kv_pool::PagedKvCache`]: vLLM's PagedAttention); `None` (the default) for a
    /// contiguous cache.
    fn paged(&self) -> Option<PagedKv<'_>> {
        None
    }
    /// Appends whole blocks of a KV block pool by reference (one more reference each, no
    /// copy): `ids`, blocks of layer `layer` of `pool`, [`crate::kv_pool::BLOCK`] positions
    /// each (a prefix cache's blocks, SGLang's RadixAttention over vLLM's blocks). Returns
    /// whether it did; `false` (the default; a paged cache of another pool or layer, or not at
    /// a block edge) appends nothing, and the caller copies the blocks' keys and values in
    /// with [`Self::update`].
    ///
    /// Errors: [`Error::InvalidArgument`] for a block that is not in use (the cache is as
    /// before).
    fn share_blocks(
        &mut self,
        pool: &std::sync::Arc<KvBlockPool>,
        layer: usize,
        ids: &[u32],
    ) -> Result<bool> {
        let _ = (pool, layer, ids);
        Ok(false)
    }
    /// Asks an empty cache to store keys and values as `dtype` (f16 for a fused decode kernel
    /// that reads them so, halving the bytes read a token) while [`Self::update`] still takes
    /// and returns its callers' dtype. Returns whether it will; the default: it will not.
    fn set_storage_dtype(&mut self, dtype: DType) -> bool {
        let _ = dtype;
        false
    }
    /// Whether position `p`'s keys and values depend only on the tokens up to `p`, every
    /// position is held, and [`Self::state`] gives them exactly as [`Self::update`] took them,
    /// so that a slice of the state can seed another cache (the prefix cache,
    /// [`crate::prefix_cache`]). True for [`GrowingKvCache`]; the default (rotating and
    /// quantized caches): false.
    fn sliceable(&self) -> bool {
        false
    }
    /// The cache's kind, by mlx-lm's class name (`KVCache`, `RotatingKVCache`,
    /// `QuantizedKVCache`, `ArraysCache`), for messages and prompt-cache files. Default:
    /// `KVCache`.
    fn kind(&self) -> &'static str {
        "KVCache"
    }
    /// The layer's array state when it holds one instead of keys and values
    /// ([`ArraysCache`]); `None` (the default) for key/value caches.
    fn arrays(&self) -> Option<&ArraysCache> {
        None
    }
    /// As [`Self::arrays`], to update the state.
    fn arrays_mut(&mut self) -> Option<&mut ArraysCache> {
        None
    }
    /// The array state of layer `layer`, a `what` layer (e.g. "convolution") of a hybrid
    /// model, which must hold one.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the layer and this cache's kind when it holds
    /// keys and values instead.
    fn arrays_for(&mut self, layer: usize, what: &str) -> Result<&mut ArraysCache> {
        let kind = self.kind();
        self.arrays_mut().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "layer {layer} is a {what} layer: its cache must be an ArraysCache, not a \
                 {kind} (make it with the model's make_cache)"
            ))
        })
    }
}

/// A cache that grows by preallocated steps (`step` positions at a time, 256 by default, as
/// mlx-lm's `KVCache`), so that appending one token does not reallocate.
#[derive(Debug, Default)]
pub struct GrowingKvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    step: usize,
    /// The dtype the buffers hold ([`LayerKvCache::set_storage_dtype`]); `None`: the inputs'.
    store: Option<DType>,
    /// The dtype of the last [`LayerKvCache::update`]'s inputs, given back by it and by
    /// [`LayerKvCache::state`].
    io: Option<DType>,
}

impl GrowingKvCache {
    /// A cache that grows `step` positions at a time.
    pub fn new(step: usize) -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
            step: step.max(1),
            store: None,
            io: None,
        }
    }

    /// `t` in the caller's dtype `io` (a copy when the buffers hold another).
    fn to_io(&self, t: Tensor, io: DType) -> Result<Tensor> {
        Ok(if t.dtype() == io { t } else { t.to_dtype(io)? })
    }

    /// `(batch, heads, head_dim, dtype, device)` of `t: [batch, heads, seq, head_dim]`.
    fn like(t: &Tensor) -> Result<(usize, usize, usize, DType, &candle_core::Device)> {
        let (b, h, _, d) = t.dims4()?;
        Ok((b, h, d, t.dtype(), t.device()))
    }

    /// `buf` with room for `need` positions: itself when it has it, else a buffer of
    /// `[batch, heads, ceil(need / step) * step, head_dim]` (`like = (batch, heads, head_dim,
    /// dtype, device)`) holding its first `len` positions.
    fn grow(
        buf: &Option<Tensor>,
        like: (usize, usize, usize, DType, &candle_core::Device),
        len: usize,
        need: usize,
        step: usize,
    ) -> Result<Tensor> {
        if let Some(b) = buf {
            if need <= b.dim(2)? {
                return Ok(b.clone());
            }
        }
        let (b, h, d, dtype, device) = like;
        let new_cap = need.div_ceil(step) * step;
        let fresh = Tensor::zeros((b, h, new_cap, d), dtype, device)?;
        if let Some(old) = buf {
            if len > 0 {
                fresh.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
        }
        Ok(fresh)
    }
}

impl GrowingKvCache {
    /// Appends `k`, `v` and returns all positions, converted to `k`'s dtype when `convert`,
    /// else as stored (views of the buffers).
    fn append(&mut self, k: &Tensor, v: &Tensor, convert: bool) -> Result<(Tensor, Tensor)> {
        let io = k.dtype();
        self.io = Some(io);
        let (k, v) = match self.store {
            Some(d) if d != io => (k.to_dtype(d)?, v.to_dtype(d)?),
            _ => (k.clone(), v.clone()),
        };
        let n = k.dim(2)?;
        let need = self.len + n;
        let kb = Self::grow(&self.k, Self::like(&k)?, self.len, need, self.step)?;
        let vb = Self::grow(&self.v, Self::like(&v)?, self.len, need, self.step)?;
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        let (ko, vo) = (kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?);
        let out = if convert {
            (self.to_io(ko, io)?, self.to_io(vo, io)?)
        } else {
            (ko, vo)
        };
        self.k = Some(kb);
        self.v = Some(vb);
        Ok(out)
    }
}

impl LayerKvCache for GrowingKvCache {
    fn update(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.append(k, v, true)
    }

    fn update_stored(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.append(k, v, false)
    }

    fn sliceable(&self) -> bool {
        true
    }

    fn set_storage_dtype(&mut self, dtype: DType) -> bool {
        if self.k.is_some() || !dtype.is_float() {
            return false;
        }
        self.store = Some(dtype);
        true
    }

    fn reserve_in_place(
        &mut self,
        n: usize,
        kv_heads: usize,
        head_dim: usize,
        device: &candle_core::Device,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let dtype = self.store.unwrap_or(DType::F32);
        if !matches!(dtype, DType::F32 | DType::F16) {
            return Ok(None);
        }
        if let Some(k) = &self.k {
            let (b, h, _, d) = k.dims4()?;
            if (b, h, d) != (1, kv_heads, head_dim) || k.dtype() != dtype {
                return Ok(None);
            }
        }
        let like = (1, kv_heads, head_dim, dtype, device);
        let need = self.len + n;
        let kb = Self::grow(&self.k, like, self.len, need, self.step)?;
        let vb = Self::grow(&self.v, like, self.len, need, self.step)?;
        self.k = Some(kb.clone());
        self.v = Some(vb.clone());
        Ok(Some((kb, vb)))
    }

    fn commit(&mut self, n: usize) -> Result<()> {
        let cap = self.k.as_ref().map_or(Ok(0), |k| k.dim(2))?;
        if self.len + n > cap {
            return Err(Error::InvalidArgument(format!(
                "KV cache: committing {n} positions past {} with room for {cap}",
                self.len
            )));
        }
        self.len += n;
        Ok(())
    }

    fn offset(&self) -> usize {
        self.len
    }

    fn state(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) if self.len > 0 => {
                let io = match self.store {
                    Some(_) => self.io.unwrap_or(DType::F32),
                    None => k.dtype(),
                };
                Ok(Some((
                    self.to_io(k.narrow(2, 0, self.len)?, io)?,
                    self.to_io(v.narrow(2, 0, self.len)?, io)?,
                )))
            }
            _ => Ok(None),
        }
    }

    fn nbytes(&self) -> usize {
        [&self.k, &self.v]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    fn reset(&mut self) {
        self.k = None;
        self.v = None;
        self.len = 0;
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(crate::Error::InvalidArgument(format!(
                "cannot truncate a KV cache of {} positions to {len}",
                self.len
            )));
        }
        self.len = len;
        Ok(())
    }
}

/// Concatenates along the sequence axis (dim 2), skipping empty parts.
fn cat_seq(parts: &[Tensor]) -> Result<Tensor> {
    let parts: Vec<&Tensor> = parts.iter().filter(|t| t.dims()[2] > 0).collect();
    match parts.as_slice() {
        [] => Err(Error::InvalidArgument(
            "nothing to concatenate in a KV cache".into(),
        )),
        [one] => Ok((*one).clone()),
        many => Ok(Tensor::cat(many, 2)?),
    }
}

/// A cache of bounded size: it keeps the first `keep` positions (the "attention sink", e.g. the
/// system prompt's first tokens) and a sliding window over the most recent ones, holding at most
/// `max_size` positions (mlx-lm `RotatingKVCache`, after StreamingLLM, Xiao et al. 2023).
///
/// Positions keep counting: [`LayerKvCache::offset`] is the total number of positions seen
/// (the RoPE offset), while at most `max_size` are held. Single-token updates on a full cache
/// overwrite the oldest window slot in place (a ring buffer) and return the keys in slot order,
/// which attention does not care about (no mask is needed for one query; RoPE is already
/// applied). Multi-token updates return the held positions in time order, at most
/// `max_size - 1` of them, followed by the new ones, so that each new query sees at least
/// `max_size` keys (its own included), as mlx-lm's `_update_concat`; the cache then keeps
/// `keep` + the newest `max_size - keep`.
///
/// Keys and values are `[batch, kv_heads, seq, head_dim]`; buffers grow in steps of `step`
/// positions up to `max_size`.
#[derive(Debug)]
pub struct RotatingKvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    keep: usize,
    max_size: usize,
    step: usize,
    /// Positions held (<= max_size).
    held: usize,
    /// Total positions seen.
    offset: usize,
    /// Next ring slot to overwrite when full (the oldest window position), in `keep..max_size`.
    idx: usize,
}

impl RotatingKvCache {
    /// A cache holding at most `max_size` positions, the first `keep` of which never leave.
    ///
    /// Errors: [`Error::InvalidArgument`] unless `keep < max_size` and `max_size >= 2`.
    pub fn new(max_size: usize, keep: usize) -> Result<Self> {
        if max_size < 2 || keep >= max_size {
            return Err(Error::InvalidArgument(format!(
                "max_kv_size {max_size} is too small: a rotating KV cache holds the first {keep} positions for good (keep, as mlx-lm's RotatingKVCache) plus a window, so max_kv_size must be at least {}",
                (keep + 1).max(2)
            )));
        }
        Ok(Self {
            k: None,
            v: None,
            keep,
            max_size,
            step: 256,
            held: 0,
            offset: 0,
            idx: 0,
        })
    }

    /// Most positions held.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Positions held now (`<= max_size`).
    pub fn held(&self) -> usize {
        self.held
    }

    /// The held positions in time order.
    fn ordered(&self, buf: &Option<Tensor>) -> Result<Option<Tensor>> {
        let Some(b) = buf else { return Ok(None) };
        if self.held < self.max_size || self.idx == self.keep {
            return Ok(Some(b.narrow(2, 0, self.held)?));
        }
        let parts = [
            b.narrow(2, 0, self.keep)?,
            b.narrow(2, self.idx, self.max_size - self.idx)?,
            b.narrow(2, self.keep, self.idx - self.keep)?,
        ];
        Ok(Some(cat_seq(&parts)?))
    }

    /// Old positions (time order) that a multi-token update of `new` positions attends to.
    fn retained(&self, new: usize) -> usize {
        if self.held + new <= self.max_size {
            self.held
        } else {
            self.held.min(self.max_size - 1)
        }
    }

    /// Stores `t` (time order, `len <= max_size`) as the new buffer contents.
    fn store(&self, t: &Tensor) -> Result<Tensor> {
        let (b, h, len, d) = t.dims4()?;
        let cap = (len.div_ceil(self.step) * self.step)
            .min(self.max_size)
            .max(len);
        let buf = Tensor::zeros((b, h, cap, d), t.dtype(), t.device())?;
        buf.slice_set(&t.contiguous()?, 2, 0)?;
        Ok(buf)
    }

    /// Keeps the first `keep` and the last `max_size - keep` positions of `t` (time order).
    fn trim(&self, t: &Tensor) -> Result<Tensor> {
        let len = t.dim(2)?;
        if len <= self.max_size {
            return Ok(t.clone());
        }
        let tail = self.max_size - self.keep;
        cat_seq(&[t.narrow(2, 0, self.keep)?, t.narrow(2, len - tail, tail)?])
    }

    fn update_concat(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let r = self.retained(n);
        let mut out = Vec::with_capacity(2);
        for (buf, new) in [(&self.k, k), (&self.v, v)] {
            let full = match self.ordered(buf)? {
                Some(old) if r > 0 => {
                    let old = if r < self.held {
                        let tail = r - self.keep.min(r);
                        cat_seq(&[
                            old.narrow(2, 0, self.keep.min(r))?,
                            old.narrow(2, self.held - tail, tail)?,
                        ])?
                    } else {
                        old
                    };
                    cat_seq(&[old, new.contiguous()?])?
                }
                _ => new.contiguous()?,
            };
            out.push(full);
        }
        let (fk, fv) = (out[0].clone(), out[1].clone());
        let (sk, sv) = (self.trim(&fk)?, self.trim(&fv)?);
        self.held = sk.dim(2)?;
        self.k = Some(self.store(&sk)?);
        self.v = Some(self.store(&sv)?);
        self.idx = if self.held == self.max_size {
            self.keep
        } else {
            self.held
        };
        self.offset += n;
        Ok((fk, fv))
    }
}

impl LayerKvCache for RotatingKvCache {
    fn kind(&self) -> &'static str {
        "RotatingKVCache"
    }

    fn update(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let ring = n == 1 && self.held == self.max_size;
        let append = self.held + n <= self.max_size
            && self
                .k
                .as_ref()
                .is_some_and(|b| b.dim(2).is_ok_and(|c| c >= self.held + n))
            && (self.held < self.max_size || self.idx == self.keep);
        if !ring && !append {
            return self.update_concat(k, v);
        }
        let slot = if ring { self.idx } else { self.held };
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else {
            return self.update_concat(k, v);
        };
        kb.slice_set(&k.contiguous()?, 2, slot)?;
        vb.slice_set(&v.contiguous()?, 2, slot)?;
        if ring {
            self.idx += 1;
            if self.idx == self.max_size {
                self.idx = self.keep;
            }
        } else {
            self.held += n;
            self.idx = if self.held == self.max_size {
                self.keep
            } else {
                self.held
            };
        }
        self.offset += n;
        Ok((kb.narrow(2, 0, self.held)?, vb.narrow(2, 0, self.held)?))
    }

    fn offset(&self) -> usize {
        self.offset
    }

    fn attend_len(&self, new: usize) -> usize {
        if new == 1 && self.held == self.max_size {
            self.max_size
        } else {
            self.retained(new) + new
        }
    }

    fn state(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.held == 0 {
            return Ok(None);
        }
        match (self.ordered(&self.k)?, self.ordered(&self.v)?) {
            (Some(k), Some(v)) => Ok(Some((k, v))),
            _ => Ok(None),
        }
    }

    fn nbytes(&self) -> usize {
        [&self.k, &self.v]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    fn reset(&mut self) {
        self.k = None;
        self.v = None;
        self.held = 0;
        self.offset = 0;
        self.idx = 0;
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.offset {
            return Err(Error::InvalidArgument(format!(
                "cannot truncate a KV cache of {} positions to {len}",
                self.offset
            )));
        }
        let dropped = self.offset - self.held;
        let window_start = self.offset - (self.held - self.keep.min(self.held));
        if dropped > 0 && len > self.keep && len < window_start {
            return Err(Error::InvalidArgument(format!(
                "the rotating KV cache no longer holds positions {}..{window_start} (it keeps the first {} and the last {}), so it cannot be cut back to {len}",
                self.keep,
                self.keep,
                self.held - self.keep
            )));
        }
        // Put the held positions in time order, then drop the newest ones.
        let k = self.ordered(&self.k)?;
        let v = self.ordered(&self.v)?;
        let new_held = self.held - (self.offset - len).min(self.held);
        let new_held = if len <= self.keep { len } else { new_held };
        match (k, v) {
            (Some(k), Some(v)) if new_held > 0 => {
                self.k = Some(self.store(&k.narrow(2, 0, new_held)?)?);
                self.v = Some(self.store(&v.narrow(2, 0, new_held)?)?);
            }
            _ => {
                self.k = None;
                self.v = None;
            }
        }
        self.held = new_held;
        self.offset = len;
        self.idx = if self.held == self.max_size {
            self.keep
        } else {
            self.held
        };
        Ok(())
    }
}

/// A cache that stores keys and values with MLX affine group quantization
/// ([`crate::quant::mlx_affine`]: each `group_size` run of a head vector gets an f32 scale and
/// bias, each value a `bits`-bit code), as mlx-lm's `QuantizedKVCache`. `update` quantizes the
/// new positions and returns all keys/values dequantized to the input dtype (so attention
/// sees quantized values for the new positions too, as in mlx-lm).
///
/// With [`QuantizedKvCache::with_rotation`], each head vector is first rotated by the
/// orthonormal Walsh–Hadamard matrix ([`crate::quant::hadamard`], as QuaRot does for its KV
/// cache) and rotated back after dequantization: the same bytes, a smaller rounding error when
/// a few channels are much larger than the rest (RoPE'd keys). Attention sees
/// `H^T deq(q(H k))` instead of `deq(q(k))`.
///
/// Memory per position and head: `head_dim * bits / 8` bytes of codes plus
/// `2 * 4 * head_dim / group_size` bytes of scales and biases, e.g. 28% of f32 at 8 bits and
/// 16% at 4 bits with `group_size = 64`. Quantized data lives in host memory; the returned
/// tensors are on the input's device. Keys and values are `[batch, kv_heads, seq, head_dim]`.
#[derive(Debug)]
pub struct QuantizedKvCache {
    bits: usize,
    group_size: usize,
    /// Rotate head vectors by the Hadamard matrix before quantizing.
    rotate: bool,
    /// `[batch * kv_heads]` streams of keys then values.
    k: Vec<QStream>,
    v: Vec<QStream>,
    shape: Option<(usize, usize, usize)>,
    dtype: DType,
    len: usize,
}

/// The quantized positions of one (batch, head): codes and group parameters, position-major.
#[derive(Debug, Default, Clone)]
struct QStream {
    codes: Vec<u32>,
    scales: Vec<f32>,
    biases: Vec<f32>,
}

impl QuantizedKvCache {
    /// A cache quantizing to `bits` (2, 3, 4, 5, 6 or 8) with groups of `group_size` (32, 64 or
    /// 128) values along the head dimension.
    ///
    /// Errors: [`Error::Quant`] for unsupported `bits` or `group_size`.
    pub fn new(bits: usize, group_size: usize) -> Result<Self> {
        mlx_affine::check_params(group_size, bits)?;
        Ok(Self {
            bits,
            group_size,
            rotate: false,
            k: Vec::new(),
            v: Vec::new(),
            shape: None,
            dtype: DType::F32,
            len: 0,
        })
    }

    /// Rotates head vectors by the Walsh–Hadamard matrix before quantizing them (and back
    /// after dequantizing) when `rotate` is set. The head dimension must then be a power of two
    /// ([`crate::quant::hadamard::supports`]); `update` refuses others.
    pub fn with_rotation(mut self, rotate: bool) -> Self {
        self.rotate = rotate;
        self
    }

    /// Whether head vectors are rotated before quantization.
    pub fn rotates(&self) -> bool {
        self.rotate
    }

    fn words_per_pos(&self, d: usize) -> usize {
        d * self.bits / 32
    }

    /// Appends `t` (`[batch, kv_heads, n, head_dim]`).
    fn push(&self, streams: &mut [QStream], t: &Tensor, name: &str) -> Result<()> {
        let (_, _, n, d) = t.dims4()?;
        let mut flat: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if self.rotate {
            hadamard::rotate(&mut flat, d);
        }
        for (i, s) in streams.iter_mut().enumerate() {
            let part = &flat[i * n * d..(i + 1) * n * d];
            let q =
                AffineQuantized::quantize(part, n, d, self.group_size, self.bits, ParamDtype::F32)
                    .map_err(|e| Error::tensor(name, format!("quantizing the KV cache: {e}")))?;
            s.codes.extend_from_slice(q.weight());
            s.scales.extend(q.scales().to_f32_vec());
            s.biases.extend(q.biases().to_f32_vec());
        }
        Ok(())
    }

    fn dequantize(&self, streams: &[QStream], like: &Tensor) -> Result<Tensor> {
        let Some((b, h, d)) = self.shape else {
            return Err(Error::InvalidArgument("the KV cache is empty".into()));
        };
        let mut out = Vec::with_capacity(b * h * self.len * d);
        for s in streams {
            let q = AffineQuantized::from_parts(
                s.codes.clone(),
                GroupParams::F32(s.scales.clone()),
                GroupParams::F32(s.biases.clone()),
                self.len,
                d,
                self.group_size,
                self.bits,
            )?;
            out.extend(q.dequantize());
        }
        if self.rotate {
            hadamard::rotate(&mut out, d);
        }
        Ok(Tensor::from_vec(out, (b, h, self.len, d), like.device())?.to_dtype(self.dtype)?)
    }
}

impl LayerKvCache for QuantizedKvCache {
    fn kind(&self) -> &'static str {
        "QuantizedKVCache"
    }

    fn update(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, n, d) = k.dims4()?;
        if v.dims() != k.dims() {
            return Err(Error::tensor(
                "values",
                format!("shape {:?} differs from the keys' {:?}", v.dims(), k.dims()),
            ));
        }
        if !d.is_multiple_of(self.group_size) {
            return Err(Error::InvalidArgument(format!(
                "the head dimension {d} is not a multiple of the KV cache group size {}",
                self.group_size
            )));
        }
        if self.rotate && !hadamard::supports(d) {
            return Err(Error::InvalidArgument(format!(
                "the head dimension {d} is not a power of two, which the KV cache's Hadamard rotation needs"
            )));
        }
        match self.shape {
            None => {
                self.shape = Some((b, h, d));
                self.dtype = k.dtype();
                self.k = vec![QStream::default(); b * h];
                self.v = vec![QStream::default(); b * h];
            }
            Some(s) if s != (b, h, d) => {
                return Err(Error::tensor(
                    "keys",
                    format!("shape {:?} does not continue the cached {s:?}", k.dims()),
                ))
            }
            _ => {}
        }
        let mut ks = std::mem::take(&mut self.k);
        let mut vs = std::mem::take(&mut self.v);
        let r = self
            .push(&mut ks, k, "keys")
            .and_then(|_| self.push(&mut vs, v, "values"));
        self.k = ks;
        self.v = vs;
        r?;
        self.len += n;
        Ok((self.dequantize(&self.k, k)?, self.dequantize(&self.v, v)?))
    }

    fn offset(&self) -> usize {
        self.len
    }

    fn state(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.len == 0 {
            return Ok(None);
        }
        let dev = candle_core::Device::Cpu;
        let like = Tensor::zeros(1, self.dtype, &dev)?;
        Ok(Some((
            self.dequantize(&self.k, &like)?,
            self.dequantize(&self.v, &like)?,
        )))
    }

    fn nbytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|s| 4 * (s.codes.len() + s.scales.len() + s.biases.len()))
            .sum()
    }

    fn reset(&mut self) {
        self.k.clear();
        self.v.clear();
        self.shape = None;
        self.len = 0;
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(Error::InvalidArgument(format!(
                "cannot truncate a KV cache of {} positions to {len}",
                self.len
            )));
        }
        if let Some((_, _, d)) = self.shape {
            let words = len * self.words_per_pos(d);
            let groups = len * d / self.group_size;
            for s in self.k.iter_mut().chain(self.v.iter_mut()) {
                s.codes.truncate(words);
                s.scales.truncate(groups);
                s.biases.truncate(groups);
            }
        }
        self.len = len;
        Ok(())
    }
}

/// A layer's array state instead of keys and values (mlx-lm `ArraysCache`): `size` arrays
/// that the layer reads and replaces at each forward pass, e.g. LFM2's convolution state (the
/// last `L_cache - 1` inputs of its short convolution, `[batch, L_cache - 1, hidden]`) or, for
/// Gated DeltaNet layers, a convolution state and a recurrent state. The layer decides the
/// arrays' shapes; the cache holds them and counts the positions they summarize
/// ([`Self::advance`]), so that [`KvCache::offset`] is right whichever layer comes first.
///
/// Such a state summarizes every position before it and cannot be cut back to an earlier
/// position: [`LayerKvCache::truncate`] only accepts the current offset (nothing to do) or 0
/// (forget everything), as mlx-lm's non-trimmable caches; a chat session or prompt cache that
/// needs another prefix starts over. [`LayerKvCache::update`] and [`LayerKvCache::state`]
/// (keys and values) are errors naming the kind.
#[derive(Debug, Clone)]
pub struct ArraysCache {
    arrays: Vec<Option<Tensor>>,
    offset: usize,
}

impl ArraysCache {
    /// An empty state of `size` arrays (all unset: the layer starts from its zero state).
    pub fn new(size: usize) -> Self {
        Self {
            arrays: vec![None; size],
            offset: 0,
        }
    }

    /// Number of arrays.
    pub fn size(&self) -> usize {
        self.arrays.len()
    }

    /// Array `i`, `None` when unset (or `i >= size`).
    pub fn get(&self, i: usize) -> Option<&Tensor> {
        self.arrays.get(i).and_then(Option::as_ref)
    }

    /// Replaces array `i`.
    ///
    /// Errors: [`Error::InvalidArgument`] when `i >= size`.
    pub fn set(&mut self, i: usize, t: Tensor) -> Result<()> {
        let size = self.arrays.len();
        let slot = self.arrays.get_mut(i).ok_or_else(|| {
            Error::InvalidArgument(format!("array {i} of an ArraysCache of {size} arrays"))
        })?;
        *slot = Some(t);
        Ok(())
    }

    /// Counts `n` more positions summarized by the arrays (mlx-lm `ArraysCache.advance`).
    pub fn advance(&mut self, n: usize) {
        self.offset += n;
    }

    /// Restores a saved state: every array set and the positions they summarize.
    ///
    /// Errors: [`Error::InvalidArgument`] when `arrays` does not have [`Self::size`] entries.
    pub fn restore(&mut self, arrays: Vec<Tensor>, offset: usize) -> Result<()> {
        if arrays.len() != self.arrays.len() {
            return Err(Error::InvalidArgument(format!(
                "an ArraysCache of {} arrays restored from {}",
                self.arrays.len(),
                arrays.len()
            )));
        }
        self.arrays = arrays.into_iter().map(Some).collect();
        self.offset = offset;
        Ok(())
    }

    fn not_kv(&self) -> Error {
        Error::InvalidArgument(
            "this layer's cache is an ArraysCache (a convolution or recurrent state), not keys \
             and values"
                .into(),
        )
    }
}

impl LayerKvCache for ArraysCache {
    fn update(&mut self, _k: &Tensor, _v: &Tensor) -> Result<(Tensor, Tensor)> {
        Err(self.not_kv())
    }

    fn offset(&self) -> usize {
        self.offset
    }

    fn nbytes(&self) -> usize {
        self.arrays
            .iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    fn state(&self) -> Result<Option<(Tensor, Tensor)>> {
        Err(self.not_kv())
    }

    fn reset(&mut self) {
        self.arrays.iter_mut().for_each(|a| *a = None);
        self.offset = 0;
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        match len {
            0 => {
                self.reset();
                Ok(())
            }
            l if l == self.offset => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "an ArraysCache (a convolution or recurrent state of {} positions) cannot be cut \
                 back to {len} positions: it is not trimmable",
                self.offset
            ))),
        }
    }

    fn kind(&self) -> &'static str {
        "ArraysCache"
    }

    fn arrays(&self) -> Option<&ArraysCache> {
        Some(self)
    }

    fn arrays_mut(&mut self) -> Option<&mut ArraysCache> {
        Some(self)
    }
}

/// A block table into a shared KV block pool ([`crate::kv_pool`], vLLM's PagedAttention):
/// decode reads the blocks in place ([`LayerKvCache::paged`]), other callers get gathered
/// copies.
impl LayerKvCache for PagedKvCache {
    fn update(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        PagedKvCache::update(self, k, v)
    }

    fn update_stored(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        PagedKvCache::update_stored(self, k, v)
    }

    fn append_paged(&mut self, k: &Tensor, v: &Tensor) -> Result<bool> {
        // Blocks held as device tensors are read by the fused CUDA step, not the CPU kernel.
        if !self.pool().in_host_memory() {
            return Ok(false);
        }
        self.append(k, v)?;
        Ok(true)
    }

    fn paged(&self) -> Option<PagedKv<'_>> {
        Some(self.view())
    }

    fn append_device(&mut self, k: &Tensor, v: &Tensor) -> Result<Option<PagedBlocks>> {
        PagedKvCache::append_device(self, k, v)
    }

    fn reserve_paged(&mut self, n: usize) -> Result<Option<(Tensor, Tensor, Vec<u32>)>> {
        Ok(self
            .reserve_device(n)?
            .map(|(k, v, table)| (k, v, table.to_vec())))
    }

    fn commit(&mut self, n: usize) -> Result<()> {
        PagedKvCache::commit(self, n)
    }

    fn share_blocks(
        &mut self,
        pool: &std::sync::Arc<KvBlockPool>,
        layer: usize,
        ids: &[u32],
    ) -> Result<bool> {
        PagedKvCache::share_blocks(self, pool, layer, ids)
    }

    fn offset(&self) -> usize {
        self.len()
    }

    fn nbytes(&self) -> usize {
        PagedKvCache::nbytes(self)
    }

    fn state(&self) -> Result<Option<(Tensor, Tensor)>> {
        self.gather()
    }

    fn reset(&mut self) {
        PagedKvCache::reset(self)
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        PagedKvCache::truncate(self, len)
    }

    fn sliceable(&self) -> bool {
        true
    }
}

/// Which kind of KV cache to build (mlx-lm's `max_kv_size`, `kv_bits`, `kv_group_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Hold at most this many positions (a [`RotatingKvCache`]); `None`: keep all.
    pub max_kv_size: Option<usize>,
    /// Positions a rotating cache never drops (mlx-lm's default: 4).
    pub keep: usize,
    /// Quantize keys and values to this many bits (a [`QuantizedKvCache`]); `None`: float.
    pub kv_bits: Option<usize>,
    /// Group size of the quantized cache (mlx-lm's default: 64).
    pub kv_group_size: usize,
    /// Rotate head vectors by the Walsh–Hadamard matrix before quantizing them
    /// ([`QuantizedKvCache::with_rotation`]); needs `kv_bits` and a power-of-two head
    /// dimension. mlx-lm does not rotate.
    pub kv_hadamard: bool,
    /// Store the keys and values of growing layers in f16 instead of the model's f32 (half
    /// the bytes, as llama.cpp's default `-ctk f16 -ctv f16`): the CPU attention reads the f16
    /// cache as it is, widening it to f32 a kv head at a time
    /// ([`crate::kernels::float::attention_f16`]), and its result equals the f32 cache's
    /// attention over f16-rounded keys and values. Not combined with `max_kv_size` or `kv_bits`.
    /// Default: `false` (f32).
    pub kv_f16: bool,
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        Self {
            max_kv_size: None,
            keep: 4,
            kv_bits: None,
            kv_group_size: 64,
            kv_hadamard: false,
            kv_f16: false,
        }
    }
}

impl KvCacheConfig {
    /// Checks the combination. Errors: [`Error::InvalidArgument`] for both a size bound and
    /// quantization (not combined here, as in mlx-lm), a bad `keep`/`max_kv_size`,
    /// `kv_hadamard` without `kv_bits`, `kv_f16` with `max_kv_size` or `kv_bits`;
    /// [`Error::Quant`] for unsupported bits or group size.
    pub fn validate(&self) -> Result<()> {
        if self.kv_f16 && (self.max_kv_size.is_some() || self.kv_bits.is_some()) {
            return Err(Error::InvalidArgument(
                "kv_f16 stores a growing KV cache in f16; it does not combine with max_kv_size \
                 or kv_bits"
                    .into(),
            ));
        }
        if self.kv_hadamard && self.kv_bits.is_none() {
            return Err(Error::InvalidArgument(
                "kv_hadamard rotates a quantized KV cache; set kv_bits too".into(),
            ));
        }
        if self.max_kv_size.is_some() && self.kv_bits.is_some() {
            return Err(Error::InvalidArgument(
                "a KV cache cannot be both rotating (max_kv_size) and quantized (kv_bits)".into(),
            ));
        }
        if let Some(m) = self.max_kv_size {
            RotatingKvCache::new(m, self.keep)?;
        }
        if let Some(b) = self.kv_bits {
            QuantizedKvCache::new(b, self.kv_group_size)?;
        }
        Ok(())
    }

    /// Whether every position stays in the cache (a growing or quantized cache).
    pub fn keeps_everything(&self) -> bool {
        self.max_kv_size.is_none()
    }
}

/// The caches of all layers of a model.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Box<dyn LayerKvCache>>,
    /// Multimodal RoPE: the next token's rotary position minus [`KvCache::offset`] (images take
    /// fewer positions than tokens, HF `rope_deltas`); 0 for text-only models.
    rope_delta: i64,
}

impl KvCache {
    /// `n_layers` growing caches.
    pub fn growing(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| Box::new(GrowingKvCache::new(256)) as Box<dyn LayerKvCache>)
                .collect(),
            rope_delta: 0,
        }
    }

    /// A hybrid model's default cache: layer `i` holds the array state `state(i)` gives, the
    /// other layers growing key/value caches (as [`Self::growing`]).
    pub fn growing_with_states(
        n_layers: usize,
        state: impl Fn(usize) -> Option<ArraysCache>,
    ) -> Self {
        Self::from_layers(
            (0..n_layers)
                .map(|i| match state(i) {
                    Some(a) => Box::new(a) as Box<dyn LayerKvCache>,
                    None => Box::new(GrowingKvCache::new(256)),
                })
                .collect(),
        )
    }

    /// The cache `config` describes, one per layer, for `n_layers` attention layers whose heads
    /// are `head_dim` wide (a model's own choice of caches: [`crate::models::CausalLM::make_cache`]).
    ///
    /// Errors: as [`KvCacheConfig::validate`]; a quantized cache whose group size does not
    /// divide the model's head dimension; `kv_hadamard` with a head dimension that is not a
    /// power of two.
    pub fn new(n_layers: usize, head_dim: usize, config: &KvCacheConfig) -> Result<Self> {
        Self::with_states(n_layers, head_dim, config, |_| None)
    }

    /// As [`Self::new`] for a model whose layer `i` keeps an array state instead of keys and
    /// values where `state(i)` gives one ([`ArraysCache`]: LFM2's convolution layers); the
    /// other layers get the cache `config` describes.
    ///
    /// Errors: as [`Self::new`].
    pub fn with_states(
        n_layers: usize,
        head_dim: usize,
        config: &KvCacheConfig,
        state: impl Fn(usize) -> Option<ArraysCache>,
    ) -> Result<Self> {
        config.validate()?;
        if config.kv_bits.is_some() && !head_dim.is_multiple_of(config.kv_group_size) {
            return Err(Error::InvalidArgument(format!(
                "kv_group_size {} does not divide the model's head dimension {}",
                config.kv_group_size, head_dim
            )));
        }
        if config.kv_hadamard && !hadamard::supports(head_dim) {
            return Err(Error::InvalidArgument(format!(
                "kv_hadamard needs a power-of-two head dimension; the model's is {}",
                head_dim
            )));
        }
        let mut layers: Vec<Box<dyn LayerKvCache>> = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            layers.push(match (state(i), config.max_kv_size, config.kv_bits) {
                (Some(a), _, _) => Box::new(a),
                (None, Some(m), _) => Box::new(RotatingKvCache::new(m, config.keep)?),
                (None, None, Some(b)) => Box::new(
                    QuantizedKvCache::new(b, config.kv_group_size)?
                        .with_rotation(config.kv_hadamard),
                ),
                (None, None, None) => {
                    let mut c = GrowingKvCache::new(256);
                    if config.kv_f16 {
                        c.set_storage_dtype(DType::F16);
                    }
                    Box::new(c)
                }
            });
        }
        Ok(Self {
            layers,
            rope_delta: 0,
        })
    }

    /// Asks each layer to store keys and values as `dtype` ([`LayerKvCache::set_storage_dtype`];
    /// on an empty cache); returns whether every layer will.
    pub fn set_storage_dtype(&mut self, dtype: DType) -> bool {
        let mut all = true;
        for l in &mut self.layers {
            all &= l.set_storage_dtype(dtype);
        }
        all
    }

    /// A cache made of the given per-layer caches.
    pub fn from_layers(layers: Vec<Box<dyn LayerKvCache>>) -> Self {
        Self {
            layers,
            rope_delta: 0,
        }
    }

    /// Multimodal RoPE position delta: a text token at cache position `p` has rotary position
    /// `p + rope_delta()` (set by vision-language models after a prompt with images).
    pub fn rope_delta(&self) -> i64 {
        self.rope_delta
    }

    /// Sets the multimodal RoPE position delta (see [`KvCache::rope_delta`]).
    pub fn set_rope_delta(&mut self, delta: i64) {
        self.rope_delta = delta;
    }

    /// Layer `i`'s cache.
    pub fn layer(&mut self, i: usize) -> Option<&mut (dyn LayerKvCache + 'static)> {
        self.layers.get_mut(i).map(|b| b.as_mut())
    }

    /// Layer `i`'s cache, for a forward pass that needs it.
    ///
    /// Errors: [`Error::InvalidArgument`] ("KV cache too short") past the last layer.
    pub fn layer_for_pass(&mut self, i: usize) -> Result<&mut (dyn LayerKvCache + 'static)> {
        self.layer(i)
            .ok_or_else(|| Error::InvalidArgument("KV cache too short".into()))
    }

    /// Checks that the cache has one layer per block of a model of `n_layers` blocks.
    ///
    /// Errors: [`Error::InvalidArgument`] naming both counts.
    pub fn check_layers(&self, n_layers: usize) -> Result<()> {
        if self.n_layers() != n_layers {
            return Err(Error::InvalidArgument(format!(
                "KV cache has {} layers, model has {n_layers}",
                self.n_layers()
            )));
        }
        Ok(())
    }

    /// Replaces layer `i`'s cache with `layer` and returns the old one (e.g. a growing layer
    /// of a fresh cache by a [`crate::kv_pool::PagedKvCache`]).
    ///
    /// Errors: [`Error::InvalidArgument`] past the last layer.
    pub fn set_layer(
        &mut self,
        i: usize,
        layer: Box<dyn LayerKvCache>,
    ) -> Result<Box<dyn LayerKvCache>> {
        let n = self.layers.len();
        let slot = self.layers.get_mut(i).ok_or_else(|| {
            Error::InvalidArgument(format!("layer {i} of a KV cache of {n} layers"))
        })?;
        Ok(std::mem::replace(slot, layer))
    }

    /// Replaces the empty growing key/value layers of this (fresh) cache by
    /// [`crate::kv_pool::PagedKvCache`]s of `pool` (layer `i` in pool layer `i`: vLLM's
    /// PagedAttention); layers of other kinds (an array state, a rotating or quantized cache)
    /// and caches whose layer count is not the pool's stay as they are. Returns the layers
    /// paged.
    pub fn page_into(&mut self, pool: &std::sync::Arc<KvBlockPool>) -> usize {
        if self.n_layers() != pool.n_layers() {
            return 0;
        }
        let mut paged = 0;
        for i in 0..self.n_layers() {
            let growing = self
                .layer_ref(i)
                .is_some_and(|l| l.kind() == "KVCache" && l.sliceable() && l.offset() == 0);
            if !growing {
                continue;
            }
            match PagedKvCache::new(pool.clone(), i) {
                Ok(p) => {
                    // In range: `i < n_layers`.
                    let _ = self.set_layer(i, Box::new(p) as Box<dyn LayerKvCache>);
                    paged += 1;
                }
                Err(e) => tracing::warn!("layer {i} keeps a growing cache: {e}"),
            }
        }
        paged
    }

    /// Layer `i`'s cache, to read.
    pub fn layer_ref(&self, i: usize) -> Option<&(dyn LayerKvCache + 'static)> {
        self.layers.get(i).map(|b| b.as_ref())
    }

    /// Layer `i`'s held keys and values in time order ([`LayerKvCache::state`]); `None` when
    /// empty or past the last layer.
    pub fn layer_state(&self, i: usize) -> Result<Option<(Tensor, Tensor)>> {
        match self.layers.get(i) {
            Some(l) => l.state(),
            None => Ok(None),
        }
    }

    /// Whether every layer is [`LayerKvCache::sliceable`] and no multimodal RoPE delta is set
    /// (a text-only cache whose prefixes can be cut out and reused); false for no layers.
    pub fn sliceable(&self) -> bool {
        !self.layers.is_empty() && self.rope_delta == 0 && self.layers.iter().all(|l| l.sliceable())
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Positions processed so far (layer 0's offset).
    pub fn offset(&self) -> usize {
        self.layers.first().map_or(0, |l| l.offset())
    }

    /// Keys/values the next update of `new` positions attends to (layer 0's
    /// [`LayerKvCache::attend_len`]).
    pub fn attend_len(&self, new: usize) -> usize {
        self.layers.first().map_or(new, |l| l.attend_len(new))
    }

    /// Bytes held by all layers.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(|l| l.nbytes()).sum()
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| l.reset());
        self.rope_delta = 0;
    }

    /// Drops positions from `len` on in every layer.
    ///
    /// Errors: as [`LayerKvCache::truncate`]; a layer with an array state ([`ArraysCache`])
    /// refuses any length but 0 and its offset, checked before any layer changes.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for (i, l) in self.layers.iter().enumerate() {
            if l.arrays().is_some() && len != 0 && len != l.offset() {
                return Err(Error::InvalidArgument(format!(
                    "cannot cut the cache back to {len} of its {} positions: layer {i} is an \
                     ArraysCache (a convolution or recurrent state), which is not trimmable",
                    l.offset()
                )));
            }
        }
        if len == 0 {
            self.rope_delta = 0;
        }
        self.layers.iter_mut().try_for_each(|l| l.truncate(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn in_place_appends_match_update() {
        // What the fused CUDA decode step does: reserve room, write position `offset()` into
        // the returned buffers, commit; the cache must then hold what `update` would have.
        let dev = Device::Cpu;
        let mut plain = GrowingKvCache::new(2);
        let mut inplace = GrowingKvCache::new(2);
        for step in 0..5usize {
            let k = Tensor::full(step as f32, (1, 2, 1, 3), &dev).unwrap();
            let v = Tensor::full(-(step as f32), (1, 2, 1, 3), &dev).unwrap();
            plain.update(&k, &v).unwrap();
            let (kb, vb) = inplace
                .reserve_in_place(1, 2, 3, &dev)
                .unwrap()
                .expect("a growing cache appends in place");
            assert!(
                kb.dim(2).unwrap() > step,
                "capacity covers the new position"
            );
            kb.slice_set(&k, 2, step).unwrap();
            vb.slice_set(&v, 2, step).unwrap();
            inplace.commit(1).unwrap();
            assert_eq!(inplace.offset(), step + 1);
        }
        let (pk, pv) = plain.state().unwrap().unwrap();
        let (ik, iv) = inplace.state().unwrap().unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(pk), flat(ik));
        assert_eq!(flat(pv), flat(iv));
        // Committing past the room reserved is an error, as is a shape the buffers do not hold.
        let cap = inplace.state().unwrap().unwrap().0.dim(2).unwrap();
        assert!(inplace.commit(cap).is_err());
        assert!(inplace.reserve_in_place(1, 4, 3, &dev).unwrap().is_none());
        // Caches that cannot append in place say so.
        let mut rot = RotatingKvCache::new(8, 0).unwrap();
        assert!(rot.reserve_in_place(1, 2, 3, &dev).unwrap().is_none());
        assert!(rot.commit(1).is_err());
    }

    #[test]
    fn update_stored_returns_the_buffers_dtype() {
        // A kernel that reads f16 gets the f16 buffers (all positions so far, in order); the
        // f32 `update` of another cache with the same inputs gives the same values widened.
        let dev = Device::Cpu;
        let (mut c, mut d) = (GrowingKvCache::new(2), GrowingKvCache::new(2));
        assert!(c.set_storage_dtype(DType::F16) && d.set_storage_dtype(DType::F16));
        let a = Tensor::new(&[[[[1.0f32, 0.1], [-2.5, 1e-3], [7.0, -0.3]]]], &dev).unwrap();
        let b = Tensor::new(&[[[[0.2f32, 3.0]]]], &dev).unwrap();
        c.update_stored(&a, &a).unwrap();
        let (k, v) = c.update_stored(&b, &b).unwrap();
        d.update(&a, &a).unwrap();
        let (kw, _) = d.update(&b, &b).unwrap();
        assert_eq!(
            (k.dtype(), v.dtype(), k.dims()),
            (DType::F16, DType::F16, &[1, 1, 4, 2][..])
        );
        let got: Vec<f32> = k
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = kw.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want);
        // Without a storage dtype it is `update`.
        let mut e = GrowingKvCache::new(2);
        let (k, _) = e.update_stored(&a, &a).unwrap();
        assert_eq!(k.dtype(), DType::F32);
        assert_eq!(e.offset(), 3);
    }

    #[test]
    fn kv_f16_config_stores_growing_layers_in_f16() {
        // `KvCacheConfig::kv_f16`: half the bytes; `update_stored` gives the f16 buffers (what
        // the CPU attention reads), `update` the caller's f32; not with rotation or bits.
        let dev = Device::Cpu;
        let cfg = KvCacheConfig {
            kv_f16: true,
            ..KvCacheConfig::default()
        };
        let mut c = KvCache::new(2, 4, &cfg).unwrap();
        let mut f = KvCache::new(2, 4, &KvCacheConfig::default()).unwrap();
        let a = Tensor::new(&[[[[1.0f32, 0.1, -2.5, 1e-3]]]], &dev).unwrap();
        let (ks, vs) = c.layers[0].update_stored(&a, &a).unwrap();
        assert_eq!((ks.dtype(), vs.dtype()), (DType::F16, DType::F16));
        let (k, _) = c.layers[1].update(&a, &a).unwrap();
        assert_eq!(k.dtype(), DType::F32);
        f.layers[0].update(&a, &a).unwrap();
        f.layers[1].update(&a, &a).unwrap();
        assert_eq!(2 * c.nbytes(), f.nbytes());
        for bad in [
            KvCacheConfig {
                kv_bits: Some(8),
                ..cfg.clone()
            },
            KvCacheConfig {
                max_kv_size: Some(64),
                ..cfg.clone()
            },
        ] {
            assert!(KvCache::new(1, 64, &bad).is_err());
        }
    }

    #[test]
    fn f16_storage_takes_and_gives_the_callers_dtype() {
        // The fused CUDA step keeps its cache in f16: updates still take and return f32 (the
        // values rounded to f16), in-place appends see f16 buffers, the state comes back f32.
        let dev = Device::Cpu;
        let mut c = GrowingKvCache::new(4);
        assert!(c.set_storage_dtype(DType::F16));
        let a = Tensor::new(&[[[[1.0f32, 0.1, -2.5, 1e-3]]]], &dev).unwrap();
        let (k, v) = c.update(&a, &a).unwrap();
        assert_eq!((k.dtype(), v.dtype()), (DType::F32, DType::F32));
        let got: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = [1.0f32, 0.1, -2.5, 1e-3]
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        assert_eq!(got, want);
        assert_eq!(c.nbytes(), 2 * 4 * 4 * 2, "two f16 buffers of 4 positions");
        let (kb, _) = c.reserve_in_place(1, 1, 4, &dev).unwrap().unwrap();
        assert_eq!(kb.dtype(), DType::F16);
        kb.slice_set(&a.to_dtype(DType::F16).unwrap(), 2, 1)
            .unwrap();
        c.commit(1).unwrap();
        let (sk, _) = c.state().unwrap().unwrap();
        assert_eq!((sk.dtype(), sk.dim(2).unwrap()), (DType::F32, 2));
        // Only an empty cache changes its storage.
        assert!(!c.set_storage_dtype(DType::F32));
        let mut all = KvCache::growing(2);
        assert!(all.set_storage_dtype(DType::F16));
        let mut rot = KvCache::new(
            1,
            4,
            &KvCacheConfig {
                max_kv_size: Some(8),
                ..KvCacheConfig::default()
            },
        )
        .unwrap();
        assert!(!rot.set_storage_dtype(DType::F16));
    }

    #[test]
    fn growing_cache_appends_and_truncates() {
        let dev = Device::Cpu;
        let mut c = GrowingKvCache::new(4);
        let a = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((1, 1, 3, 4))
            .unwrap();
        let b = Tensor::arange(100f32, 112.0, &dev)
            .unwrap()
            .reshape((1, 1, 3, 4))
            .unwrap();
        let (k, _) = c.update(&a, &a).unwrap();
        assert_eq!(k.dims(), &[1, 1, 3, 4]);
        let (k, v) = c.update(&b, &b).unwrap();
        assert_eq!(k.dims(), &[1, 1, 6, 4]);
        assert_eq!(c.offset(), 6);
        let kv: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(kv[..12], (0..12).map(|x| x as f32).collect::<Vec<_>>()[..]);
        assert_eq!(kv[12], 100.0);
        assert_eq!(v.dims(), k.dims());
        assert_eq!(c.nbytes(), 2 * 8 * 4 * 4); // capacity 8 positions (2 steps), k and v
        c.truncate(2).unwrap();
        let (k, _) = c.update(&b, &b).unwrap();
        let kv: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(kv.len(), 20);
        assert_eq!(kv[8], 100.0);
        assert!(c.truncate(99).is_err());
    }

    /// `[1, 1, n, 1]` tensor whose values are the positions `from..from + n`.
    fn pos(from: usize, n: usize) -> Tensor {
        let v: Vec<f32> = (from..from + n).map(|p| p as f32).collect();
        Tensor::from_vec(v, (1, 1, n, 1), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<usize> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(|x| x as usize).collect()
    }

    /// Reference of what a rotating cache returns for an update of `n` positions after
    /// `seen` positions: multi-token updates attend to `keep` + the newest old positions up to
    /// `max - 1` old ones; single tokens on a full cache to `keep` + the newest `max - keep`.
    fn expected(seen: usize, n: usize, max: usize, keep: usize, held: &[usize]) -> Vec<usize> {
        let retained = if held.len() + n <= max {
            held.len()
        } else {
            held.len().min(max - 1)
        };
        let tail = retained - keep.min(retained);
        let mut out: Vec<usize> = held[..keep.min(retained)].to_vec();
        out.extend(&held[held.len() - tail..]);
        out.extend(seen..seen + n);
        out
    }

    #[test]
    fn rotating_cache_matches_reference() {
        for (max, keep) in [(8, 2), (5, 0), (6, 4)] {
            let mut c = RotatingKvCache::new(max, keep).unwrap();
            let mut held: Vec<usize> = Vec::new();
            let mut seen = 0;
            for n in [
                3, 1, 1, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 7, 1, 1, 2, 1, 1, 1, 9, 1,
            ] {
                assert_eq!(c.attend_len(n), expected(seen, n, max, keep, &held).len());
                let (k, v) = c.update(&pos(seen, n), &pos(seen, n)).unwrap();
                let mut got = values(&k);
                let mut want = expected(seen, n, max, keep, &held);
                assert_eq!(values(&v), got);
                if n == 1 && held.len() == max {
                    // Ring order: same positions, any order.
                    got.sort();
                    want.sort();
                } else {
                    // Time order, the new positions last.
                    assert_eq!(&got[got.len() - n..], &want[want.len() - n..]);
                }
                assert_eq!(got, want, "max {max} keep {keep} after {seen} + {n}");
                held = if want.len() > max {
                    let mut h = want[..keep].to_vec();
                    h.extend(&want[want.len() - (max - keep)..]);
                    h
                } else {
                    want.clone()
                };
                held.sort();
                seen += n;
                assert_eq!(c.offset(), seen);
                assert_eq!(c.held(), held.len());
            }
        }
    }

    #[test]
    fn rotating_cache_truncates_only_to_held_prefixes() {
        let mut c = RotatingKvCache::new(6, 2).unwrap();
        c.update(&pos(0, 4), &pos(0, 4)).unwrap();
        c.truncate(3).unwrap();
        let (k, _) = c.update(&pos(3, 1), &pos(3, 1)).unwrap();
        assert_eq!(values(&k), vec![0, 1, 2, 3]);
        for p in 4..10 {
            c.update(&pos(p, 1), &pos(p, 1)).unwrap();
        }
        // Holds 0, 1 and 6..10; 2..6 are gone.
        assert_eq!(c.offset(), 10);
        assert!(c.truncate(4).is_err());
        assert!(c.truncate(11).is_err());
        c.truncate(8).unwrap();
        let (k, _) = c.update(&pos(8, 2), &pos(8, 2)).unwrap();
        assert_eq!(values(&k), vec![0, 1, 6, 7, 8, 9]);
        c.truncate(2).unwrap();
        let (k, _) = c.update(&pos(2, 1), &pos(2, 1)).unwrap();
        assert_eq!(values(&k), vec![0, 1, 2]);
        assert!(RotatingKvCache::new(4, 4).is_err());
    }

    #[test]
    fn quantized_cache_round_trips_within_the_quantization_bound() {
        let dev = Device::Cpu;
        let (h, d) = (2, 64);
        let data = |n: usize, s: f32| -> Tensor {
            let v: Vec<f32> = (0..h * n * d).map(|i| (i as f32 * s).sin()).collect();
            Tensor::from_vec(v, (1, h, n, d), &dev).unwrap()
        };
        for bits in [4usize, 8] {
            let mut c = QuantizedKvCache::new(bits, 32).unwrap();
            let a = data(5, 0.37);
            let b = data(1, 0.91);
            c.update(&a, &a).unwrap();
            let (k, v) = c.update(&b, &b).unwrap();
            assert_eq!(k.dims(), &[1, h, 6, d]);
            let want = Tensor::cat(&[&a, &b], 2).unwrap();
            // Values in [-1, 1]: |scale| <= 2 / (2^bits - 1); the error is at most |scale|.
            let bound = 2.0 / ((1u32 << bits) - 1) as f32 + 1e-6;
            for t in [&k, &v] {
                let err = max_abs_err(t, &want);
                assert!(err <= bound, "{bits} bits: error {err} > {bound}");
                assert!(err > 0.0);
            }
            // codes + f32 scales and biases, keys and values
            let per_pos = h * (d * bits / 32 + 2 * d / 32) * 4;
            assert_eq!(c.nbytes(), 2 * 6 * per_pos);
            c.truncate(2).unwrap();
            assert_eq!(c.offset(), 2);
            let (k2, _) = c.update(&b, &b).unwrap();
            assert_eq!(k2.dims(), &[1, h, 3, d]);
            let first: Vec<f32> = k2
                .narrow(2, 0, 2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let before: Vec<f32> = k
                .narrow(2, 0, 2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(first, before);
            assert!(c.truncate(9).is_err());
        }
        assert!(QuantizedKvCache::new(7, 64).is_err());
        assert!(QuantizedKvCache::new(4, 48).is_err());
    }

    /// Head vectors with one large channel, as RoPE'd keys often have.
    fn with_outlier(h: usize, n: usize, d: usize) -> Tensor {
        let v: Vec<f32> = (0..h * n * d)
            .map(|i| {
                let base = ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0;
                if i % d == 3 {
                    base * 40.0
                } else {
                    base
                }
            })
            .collect();
        Tensor::from_vec(v, (1, h, n, d), &Device::Cpu).unwrap()
    }

    fn max_abs_err(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn hadamard_rotation_is_undone_and_shrinks_the_error_of_outlier_channels() {
        let (h, n, d) = (2, 9, 64);
        let x = with_outlier(h, n, d);
        for bits in [4usize, 8] {
            let mut plain = QuantizedKvCache::new(bits, 64).unwrap();
            let mut rotated = QuantizedKvCache::new(bits, 64).unwrap().with_rotation(true);
            assert!(rotated.rotates() && !plain.rotates());
            let (kp, _) = plain.update(&x, &x).unwrap();
            // in two updates: rotation is per position, so chunking does not matter
            rotated
                .update(&x.narrow(2, 0, 4).unwrap(), &x.narrow(2, 0, 4).unwrap())
                .unwrap();
            let rest = x.narrow(2, 4, n - 4).unwrap();
            let (kr, vr) = rotated.update(&rest, &rest).unwrap();
            assert_eq!(kr.dims(), x.dims());
            // what the cache should hold: H deq(q(H x)), built from the public pieces
            let mut flat: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            hadamard::rotate(&mut flat, d);
            let q = AffineQuantized::quantize(&flat, h * n, d, 64, bits, ParamDtype::F32).unwrap();
            let mut want = q.dequantize();
            hadamard::rotate(&mut want, d);
            let want = Tensor::from_vec(want, x.dims(), &Device::Cpu).unwrap();
            assert!(max_abs_err(&kr, &want) < 1e-5);
            assert!(max_abs_err(&vr, &want) < 1e-5);
            // The rotation keeps the L2 norm of the error, and the group's range shrinks from
            // the outlier's to about its share over 64 channels (max |error| is not the measure:
            // without rotation the small channels round to 0, within 1 of their values).
            let l2 = |t: &Tensor| -> f32 {
                (t - &x)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt()
            };
            let (ep, er) = (l2(&kp), l2(&kr));
            assert!(er < 0.6 * ep, "{bits} bits: rotated {er} vs plain {ep}");
            assert_eq!(rotated.nbytes(), plain.nbytes());
        }
        // a head dimension that is not a power of two is refused
        let mut c = QuantizedKvCache::new(8, 32).unwrap().with_rotation(true);
        let odd = Tensor::zeros((1, 1, 2, 96), DType::F32, &Device::Cpu).unwrap();
        assert!(c.update(&odd, &odd).is_err());
    }

    #[test]
    fn too_small_rotating_cache_says_what_it_needs() {
        let e = RotatingKvCache::new(2, 4).unwrap_err().to_string();
        assert!(
            e.contains("max_kv_size 2") && e.contains("at least 5"),
            "{e}"
        );
        let e = RotatingKvCache::new(1, 0).unwrap_err().to_string();
        assert!(e.contains("at least 2"), "{e}");
        assert!(RotatingKvCache::new(5, 4).is_ok());
    }

    #[test]
    fn arrays_cache_holds_a_state_that_cannot_be_cut_back() {
        let dev = Device::Cpu;
        let mut a = ArraysCache::new(2);
        assert_eq!((a.size(), a.offset(), a.nbytes()), (2, 0, 0));
        assert!(a.get(0).is_none());
        a.set(0, Tensor::zeros((1, 2, 8), DType::F32, &dev).unwrap())
            .unwrap();
        a.advance(5);
        assert!(a
            .set(2, Tensor::zeros(1, DType::F32, &dev).unwrap())
            .is_err());
        assert_eq!(
            (a.offset(), a.nbytes(), a.kind()),
            (5, 2 * 8 * 4, "ArraysCache")
        );
        // Keys and values are not what it holds.
        let t = Tensor::zeros((1, 1, 1, 4), DType::F32, &dev).unwrap();
        let e = a.update(&t, &t).unwrap_err().to_string();
        assert!(e.contains("ArraysCache"), "{e}");
        assert!(a.state().is_err());
        // Cut back to its own length (nothing to do) or to 0 (forget), nothing else.
        a.truncate(5).unwrap();
        assert!(a.get(0).is_some());
        let e = a.truncate(3).unwrap_err().to_string();
        assert!(e.contains("not trimmable"), "{e}");
        a.truncate(0).unwrap();
        assert!(a.get(0).is_none() && a.offset() == 0);
        assert!(a.restore(vec![t.clone()], 3).is_err());
        a.restore(vec![t.clone(), t], 3).unwrap();
        assert_eq!(a.offset(), 3);
    }

    #[test]
    fn a_cache_with_state_layers_follows_its_state_layers() {
        let dev = Device::Cpu;
        let config = KvCacheConfig {
            kv_bits: Some(8),
            kv_group_size: 32,
            ..Default::default()
        };
        let mut c = KvCache::with_states(3, 32, &config, |i| (i != 1).then(|| ArraysCache::new(1)))
            .unwrap();
        let kinds: Vec<&str> = (0..3).map(|i| c.layer_ref(i).unwrap().kind()).collect();
        assert_eq!(kinds, ["ArraysCache", "QuantizedKVCache", "ArraysCache"]);
        let kv = Tensor::zeros((1, 1, 4, 32), DType::F32, &dev).unwrap();
        c.layer(1).unwrap().update(&kv, &kv).unwrap();
        for i in [0, 2] {
            c.layer(i).unwrap().arrays_mut().unwrap().advance(4);
        }
        assert_eq!(c.offset(), 4);
        // Refused before any layer changes: the quantized layer still holds 4 positions.
        let e = c.truncate(2).unwrap_err().to_string();
        assert!(e.contains("layer 0") && e.contains("not trimmable"), "{e}");
        assert_eq!(c.layer_ref(1).unwrap().offset(), 4);
        c.truncate(4).unwrap();
        c.truncate(0).unwrap();
        assert_eq!((c.offset(), c.layer_ref(1).unwrap().offset()), (0, 0));
        assert!(!c.sliceable());
    }

    #[test]
    fn config_builds_each_kind() {
        let (layers, head_dim) = (3, 64);
        let c = KvCache::new(layers, head_dim, &KvCacheConfig::default()).unwrap();
        assert_eq!(c.n_layers(), 3);
        let rot = KvCacheConfig {
            max_kv_size: Some(16),
            ..Default::default()
        };
        assert!(KvCache::new(layers, head_dim, &rot).is_ok());
        let q = KvCacheConfig {
            kv_bits: Some(8),
            ..Default::default()
        };
        assert!(KvCache::new(layers, head_dim, &q).is_ok());
        let both = KvCacheConfig {
            max_kv_size: Some(16),
            kv_bits: Some(4),
            ..Default::default()
        };
        assert!(KvCache::new(layers, head_dim, &both).is_err());
        let odd = KvCacheConfig {
            kv_bits: Some(4),
            kv_group_size: 128,
            ..Default::default()
        };
        assert!(KvCache::new(layers, head_dim, &odd).is_err());
        let had = KvCacheConfig {
            kv_bits: Some(8),
            kv_hadamard: true,
            ..Default::default()
        };
        assert!(KvCache::new(layers, head_dim, &had).is_ok());
        let had_float = KvCacheConfig {
            kv_hadamard: true,
            ..Default::default()
        };
        assert!(had_float.validate().is_err());
        let had32 = KvCacheConfig {
            kv_group_size: 32,
            ..had
        };
        assert!(KvCache::new(layers, 96, &had32).is_err());
    }
}

#[cfg(test)]
mod paged_tests {
    //! [`PagedKvCache`] through the [`LayerKvCache`] trait, against [`GrowingKvCache`].
    use std::sync::Arc;

    use candle_core::Device;

    use super::*;
    use crate::kv_pool::BLOCK;

    /// `[1, heads, n, d]` of distinct values, from `seed`.
    fn kv(heads: usize, n: usize, d: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..heads * n * d)
            .map(|i| seed + i as f32 * 0.001 + ((i * 7919) % 13) as f32)
            .collect();
        Tensor::from_vec(v, (1, heads, n, d), &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        crate::gguf::tests::bits(&crate::gguf::tests::f32s(t))
    }

    fn assert_same_state(a: &dyn LayerKvCache, b: &dyn LayerKvCache) {
        assert_eq!(a.offset(), b.offset());
        match (a.state().unwrap(), b.state().unwrap()) {
            (Some((ka, va)), Some((kb, vb))) => {
                assert_eq!(ka.dims(), kb.dims());
                assert_eq!(bits(&ka), bits(&kb));
                assert_eq!(bits(&va), bits(&vb));
            }
            (None, None) => {}
            (x, y) => panic!("states differ: {x:?} vs {y:?}"),
        }
    }

    fn pool(n: usize) -> Arc<KvBlockPool> {
        pool_of(n, DType::F32)
    }

    fn pool_of(n: usize, dtype: DType) -> Arc<KvBlockPool> {
        Arc::new(KvBlockPool::with_dtype(&[(2, 8), (3, 4)], n, dtype).unwrap())
    }

    /// [`pool_of`], or with `tensors` a pool holding its blocks as tensors (a GPU's storage,
    /// [`KvBlockPool::on_tensors`]) on the CPU.
    fn pool_in(n: usize, dtype: DType, tensors: bool) -> Arc<KvBlockPool> {
        if !tensors {
            return pool_of(n, dtype);
        }
        let p = KvBlockPool::on_tensors(&[(2, 8), (3, 4)], n, dtype, &Device::Cpu).unwrap();
        assert!(!p.in_host_memory());
        Arc::new(p)
    }

    /// A growing cache storing `dtype` (the twin of a pool of that dtype).
    fn growing_of(dtype: DType) -> GrowingKvCache {
        let mut g = GrowingKvCache::new(256);
        assert!(g.set_storage_dtype(dtype));
        g
    }

    #[test]
    fn pool_allocates_refcounts_and_frees() {
        let p = pool(3);
        assert_eq!(p.block_bytes(), 2 * (2 * 8 + 3 * 4) * BLOCK * 4);
        let half = pool_of(3, DType::F16);
        assert_eq!(2 * half.block_bytes(), p.block_bytes());
        assert_eq!(
            KvBlockPool::with_bytes_of(&[(2, 8), (3, 4)], 7 * half.block_bytes(), DType::F16)
                .unwrap()
                .n_blocks(),
            7
        );
        assert!(KvBlockPool::with_dtype(&[(2, 8)], 1, DType::BF16).is_err());
        assert_eq!(
            KvBlockPool::blocks_for(&[(2, 8), (3, 4)], 7 * p.block_bytes() + 1),
            7
        );
        let a = p.allocate(0).unwrap();
        let b = p.allocate(0).unwrap();
        assert_ne!(a, b);
        assert_eq!((p.refs(0, a), p.refs(1, a)), (Some(1), Some(0)));
        assert_eq!(p.free_blocks(), 1);
        p.retain(0, a).unwrap();
        assert_eq!(p.refs(0, a), Some(2));
        p.release(0, a);
        assert_eq!(p.refs(0, a), Some(1));
        p.release(0, a);
        assert_eq!(p.refs(0, a), Some(0));
        assert!(p.retain(0, a).is_err(), "a free block cannot be shared");
        p.release(0, a); // ignored
        assert_eq!(p.free_blocks(), 2);
        assert!(p.allocate(2).is_err());
        assert!(KvBlockPool::new(&[], 4).is_err());
        assert!(KvBlockPool::new(&[(0, 4)], 4).is_err());
    }

    #[test]
    fn pool_exhaustion_is_an_error_naming_the_pool() {
        let p = Arc::new(KvBlockPool::new(&[(1, 4)], 2).unwrap());
        let mut c = PagedKvCache::new(p.clone(), 0).unwrap();
        c.update(&kv(1, 2 * BLOCK, 4, 0.0), &kv(1, 2 * BLOCK, 4, 1.0))
            .unwrap();
        let before = c.state().unwrap().unwrap();
        let err = c
            .update(&kv(1, 3, 4, 2.0), &kv(1, 3, 4, 3.0))
            .expect_err("no block left");
        let msg = err.to_string();
        assert!(
            msg.contains("out of blocks") && msg.contains("all 2 blocks"),
            "{msg}"
        );
        // The cache is as before and holds its two blocks.
        assert_eq!(c.offset(), 2 * BLOCK);
        assert_eq!(bits(&c.state().unwrap().unwrap().0), bits(&before.0));
        assert_eq!(p.free_blocks(), 0);
        // A failed append that had taken a block gives it back.
        c.truncate(BLOCK).unwrap();
        assert_eq!(p.free_blocks(), 1);
        let err = c.update(&kv(1, BLOCK + 3, 4, 2.0), &kv(1, BLOCK + 3, 4, 3.0));
        assert!(err.is_err());
        assert_eq!((c.offset(), p.free_blocks()), (BLOCK, 1));
        drop(c);
        assert_eq!(p.free_blocks(), 2);
    }

    /// The same appends (1 position, several, across block edges) give the growing cache's
    /// state bit for bit, and the same returned keys and values: an f32 pool an f32 cache's,
    /// an f16 pool an f16 cache's (values rounded to f16 alike, half the bytes); blocks in
    /// host memory and blocks held as tensors (a GPU's storage) alike.
    #[test]
    fn paged_cache_holds_what_a_growing_cache_holds() {
        for dtype in [DType::F32, DType::F16] {
            for tensors in [false, true] {
                paged_cache_holds_what_a_growing_cache_of(dtype, tensors);
            }
        }
    }

    fn paged_cache_holds_what_a_growing_cache_of(dtype: DType, tensors: bool) {
        let p = pool_in(64, dtype, tensors);
        assert_eq!(p.dtype(), dtype);
        for layer in 0..2 {
            let (h, d) = p.layer_shape(layer).unwrap();
            let mut paged = PagedKvCache::new(p.clone(), layer).unwrap();
            let mut grow = growing_of(dtype);
            let mut seed = 0.0;
            for n in [1, 3, 15, 1, 16, 17, 1, 1, 40, 2] {
                let (k, v) = (kv(h, n, d, seed), kv(h, n, d, seed + 0.5));
                seed += 1.0;
                let (kp, vp) = paged.update(&k, &v).unwrap();
                let (kg, vg) = grow.update(&k, &v).unwrap();
                assert_eq!(bits(&kp), bits(&kg));
                assert_eq!(bits(&vp), bits(&vg));
                assert_same_state(&paged, &grow);
                assert_eq!(paged.block_table().len(), paged.offset().div_ceil(BLOCK));
                assert_eq!(
                    paged.nbytes(),
                    paged.block_table().len() * 2 * h * BLOCK * d * dtype.size_in_bytes()
                );
            }
            for len in [90, 64, 33, 32, 0] {
                paged.truncate(len).unwrap();
                grow.truncate(len).unwrap();
                assert_same_state(&paged, &grow);
                assert_eq!(paged.block_table().len(), len.div_ceil(BLOCK));
            }
            assert!(paged.truncate(1).is_err());
            let (k, v) = (kv(h, 20, d, 9.0), kv(h, 20, d, 9.5));
            paged.update(&k, &v).unwrap();
            grow.update(&k, &v).unwrap();
            assert_same_state(&paged, &grow);
            paged.reset();
            assert_eq!((paged.offset(), paged.nbytes()), (0, 0));
            assert!(paged.state().unwrap().is_none());
        }
        assert_eq!(p.used_blocks(), 0);
    }

    /// A fork shares every block; appending to the shared partial block copies it (the
    /// original is unchanged), truncating and dropping give blocks back; in an f32 and in an
    /// f16 pool, in host memory and held as tensors.
    #[test]
    fn forks_share_blocks_and_copy_on_write() {
        for dtype in [DType::F32, DType::F16] {
            for tensors in [false, true] {
                forks_share_blocks_and_copy_on_write_of(dtype, tensors);
            }
        }
    }

    fn forks_share_blocks_and_copy_on_write_of(dtype: DType, tensors: bool) {
        let p = pool_in(16, dtype, tensors);
        let (h, d) = p.layer_shape(0).unwrap();
        let mut a = PagedKvCache::new(p.clone(), 0).unwrap();
        a.update(&kv(h, 40, d, 0.0), &kv(h, 40, d, 0.5)).unwrap();
        assert_eq!(p.refs(0, a.block_table()[0]), Some(1));
        let free0 = p.free_blocks();
        let mut b = a.fork().unwrap();
        assert_eq!(b.block_table(), a.block_table());
        assert!(a.block_table().iter().all(|&id| p.refs(0, id) == Some(2)));
        assert_eq!(p.free_blocks(), free0, "a fork takes no block");
        let a_state = a.state().unwrap().unwrap();
        // b writes into the shared third block (8 of 16 positions held): copied first.
        let mut g = growing_of(dtype);
        g.update(&a_state.0, &a_state.1).unwrap();
        let (k, v) = (kv(h, 5, d, 7.0), kv(h, 5, d, 7.5));
        b.update(&k, &v).unwrap();
        g.update(&k, &v).unwrap();
        assert_same_state(&b, &g);
        assert_eq!(b.block_table()[..2], a.block_table()[..2]);
        assert_ne!(b.block_table()[2], a.block_table()[2]);
        assert_eq!(p.refs(0, a.block_table()[2]), Some(1));
        assert_eq!(p.refs(0, b.block_table()[2]), Some(1));
        assert_eq!(p.free_blocks(), free0 - 1);
        let after = a.state().unwrap().unwrap();
        assert_eq!(
            bits(&after.0),
            bits(&a_state.0),
            "the original is unchanged"
        );
        assert_eq!(bits(&after.1), bits(&a_state.1));
        // Truncating b to one block drops its references to the others.
        b.truncate(BLOCK).unwrap();
        assert_eq!(p.refs(0, a.block_table()[1]), Some(1));
        assert_eq!(p.refs(0, a.block_table()[0]), Some(2));
        assert_eq!(p.free_blocks(), free0);
        // Appending into a full shared block takes a fresh block, leaving the shared one.
        b.update(&kv(h, 1, d, 3.0), &kv(h, 1, d, 3.5)).unwrap();
        assert_eq!(b.block_table()[0], a.block_table()[0]);
        assert_eq!(p.refs(0, a.block_table()[0]), Some(2));
        drop(a);
        assert_eq!(p.refs(0, b.block_table()[0]), Some(1));
        assert_eq!(p.free_blocks(), 16 - 2);
        drop(b);
        assert_eq!(p.used_blocks(), 0);
    }

    #[test]
    fn paged_view_reads_the_blocks_in_place() {
        let p = pool(8);
        let (h, d) = p.layer_shape(1).unwrap();
        let mut c = PagedKvCache::new(p.clone(), 1).unwrap();
        assert!(c
            .append_paged(&kv(h, 20, d, 0.0), &kv(h, 20, d, 0.5))
            .unwrap());
        let (k, v) = c.state().unwrap().unwrap();
        let (kf, vf) = (
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let view = c.paged().expect("a view");
        assert_eq!((view.len(), view.kv_heads(), view.head_dim()), (20, h, d));
        let (kb, vb) = (view.keys(), view.values());
        assert_eq!(kb.len(), 2);
        for hh in 0..h {
            for j in 0..20 {
                let (b, o) = (j / BLOCK, j % BLOCK);
                let at = (hh * BLOCK + o) * d;
                let want = (hh * 20 + j) * d;
                assert_eq!(kb[b][at..at + d], kf[want..want + d]);
                assert_eq!(vb[b][at..at + d], vf[want..want + d]);
            }
        }
        drop(view);
        assert!(c
            .append_paged(&kv(h + 1, 1, d, 0.0), &kv(h + 1, 1, d, 0.0))
            .is_err());
    }

    /// A pool held as tensors (a GPU's storage) serves the fused step's in-place appends: the
    /// reservation covers the next position (a new block at a block edge, a copy of a shared
    /// last block), hands out the pool layer's storage and the table, and the positions
    /// written there (as the kernels write them: block `table[t / BLOCK]`, row `t % BLOCK`)
    /// are the cache's after the commit; the CPU's paged attention does not take such a
    /// cache.
    #[test]
    fn tensor_blocks_take_in_place_appends() {
        let p = pool_in(8, DType::F16, true);
        let (h, d) = p.layer_shape(0).unwrap();
        let mut c = PagedKvCache::new(p.clone(), 0).unwrap();
        let mut g = growing_of(DType::F16);
        let (k, v) = (kv(h, BLOCK - 1, d, 0.0), kv(h, BLOCK - 1, d, 0.5));
        c.update(&k, &v).unwrap();
        g.update(&k, &v).unwrap();
        // A fork shares the partial block: the reservation copies it first.
        let shared = c.fork().unwrap();
        for step in 0..3 {
            let pos = c.offset();
            let (ks, vs, table) = c.reserve_paged(1).unwrap().expect("tensor blocks");
            assert_eq!(ks.dims(), [8, h, BLOCK, d]);
            assert_eq!(table.len(), (pos + 1).div_ceil(BLOCK));
            if step == 0 {
                assert_ne!(table[0], shared.block_table()[0], "copied on write");
            }
            let (kn, vn) = (kv(h, 1, d, 10.0 + step as f32), kv(h, 1, d, 20.0));
            for (src, dst) in [(&kn, &ks), (&vn, &vs)] {
                let row = src.to_dtype(DType::F16).unwrap();
                dst.narrow(0, table[pos / BLOCK] as usize, 1)
                    .unwrap()
                    .slice_set(&row, 2, pos % BLOCK)
                    .unwrap();
            }
            LayerKvCache::commit(&mut c, 1).unwrap();
            g.update(&kn, &vn).unwrap();
            assert_same_state(&c, &g);
        }
        assert_eq!(c.block_table().len(), 2);
        assert!(LayerKvCache::commit(&mut c, BLOCK).is_err(), "not reserved");
        // The fork still holds what it held.
        assert_eq!(shared.offset(), BLOCK - 1);
        assert_eq!(
            bits(&shared.state().unwrap().unwrap().0),
            bits(
                &k.to_dtype(DType::F16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            )
        );
        assert!(!c
            .append_paged(&kv(h, 1, d, 0.0), &kv(h, 1, d, 0.0))
            .unwrap());
        // Host blocks take no such reservation.
        let mut host = PagedKvCache::new(pool(4), 0).unwrap();
        assert!(host.reserve_paged(1).unwrap().is_none());
    }

    /// `append_device` of a cache in device-style blocks appends and hands out the pool
    /// layer's blocks and the table: position `t` of head `h` is row `t % BLOCK` of head `h`
    /// of block `table[t / BLOCK]` (what the CUDA flash prefill reads); host blocks give
    /// `None` and append nothing.
    #[test]
    fn device_appends_hand_out_the_blocks_in_place() {
        let p = pool_in(8, DType::F16, true);
        let (h, d) = p.layer_shape(0).unwrap();
        let mut c = PagedKvCache::new(p, 0).unwrap();
        let n = BLOCK + 3;
        let (k, v) = (kv(h, n, d, 0.0), kv(h, n, d, 0.5));
        let b = LayerKvCache::append_device(&mut c, &k, &v)
            .unwrap()
            .expect("tensor blocks");
        assert_eq!((b.len, c.offset()), (n, n));
        assert_eq!(b.table, c.block_table()[..2]);
        assert_eq!(b.k.dims(), [8, h, BLOCK, d]);
        let half = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        for (blocks, src) in [(&b.k, &k), (&b.v, &v)] {
            let (all, want) = (half(blocks), half(src));
            for hh in 0..h {
                for t in 0..n {
                    let at = ((b.table[t / BLOCK] as usize * h + hh) * BLOCK + t % BLOCK) * d;
                    assert_eq!(
                        all[at..at + d],
                        want[(hh * n + t) * d..][..d],
                        "h {hh} t {t}"
                    );
                }
            }
        }
        let mut host = PagedKvCache::new(pool(4), 0).unwrap();
        assert!(LayerKvCache::append_device(&mut host, &k, &v)
            .unwrap()
            .is_none());
        assert_eq!(host.offset(), 0);
    }

    /// Appends to device-style blocks write each run of whole blocks with consecutive ids at
    /// once and the rest block by block; either way every position lands where the growing
    /// cache has it: chunks that start and end mid-block, runs broken by an id that does not
    /// follow, a run that ends the chunk. A dropped cache's blocks come back to the free list
    /// so that the next cache takes them in order.
    #[test]
    fn device_appends_write_runs_of_consecutive_blocks() {
        let p = pool_in(16, DType::F16, true);
        let (h, d) = p.layer_shape(0).unwrap();
        let fill = |c: &mut PagedKvCache, n: usize, at: f32| {
            c.update(&kv(h, n, d, at), &kv(h, n, d, at + 0.5)).unwrap();
        };
        // Fragment the free list: `a` takes blocks 0-5, `b` 6-7, then `a` is dropped.
        let mut a = PagedKvCache::new(p.clone(), 0).unwrap();
        fill(&mut a, 6 * BLOCK, 0.0);
        let mut b = PagedKvCache::new(p.clone(), 0).unwrap();
        let mut gb = growing_of(DType::F16);
        let (kb, vb) = (kv(h, 2 * BLOCK, d, 1.0), kv(h, 2 * BLOCK, d, 1.5));
        b.update(&kb, &vb).unwrap();
        gb.update(&kb, &vb).unwrap();
        assert_eq!(a.block_table(), [0, 1, 2, 3, 4, 5]);
        drop(a);
        let mut c = PagedKvCache::new(p.clone(), 0).unwrap();
        let mut g = growing_of(DType::F16);
        let mut at = 2.0;
        for n in [BLOCK - 3, 5 * BLOCK + 7, 2 * BLOCK - 4, 2 * BLOCK, 1] {
            let (k, v) = (kv(h, n, d, at), kv(h, n, d, at + 0.5));
            c.update(&k, &v).unwrap();
            g.update(&k, &v).unwrap();
            assert_same_state(&c, &g);
            at += 10.0;
        }
        assert_eq!(c.block_table(), [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12]);
        assert_same_state(&b, &gb);
    }

    /// `update_stored` of a cache in device-style blocks gives the blocks' own dtype (f16, for
    /// the CUDA flash prefill) with the values `update` widens to f32; host blocks give f32.
    #[test]
    fn stored_gathers_keep_the_blocks_dtype() {
        for tensors in [true, false] {
            let p = pool_in(8, DType::F16, tensors);
            let (h, d) = p.layer_shape(0).unwrap();
            let mut c = PagedKvCache::new(p.clone(), 0).unwrap();
            let mut w = PagedKvCache::new(p, 0).unwrap();
            let mut g = growing_of(DType::F16);
            // Past a block edge, so that the gather spans two blocks.
            for (n, at) in [(BLOCK - 3, 0.0), (5, 3.0)] {
                let (k, v) = (kv(h, n, d, at), kv(h, n, d, at + 0.5));
                let (ks, vs) = LayerKvCache::update_stored(&mut c, &k, &v).unwrap();
                let (kw, vw) = w.update(&k, &v).unwrap();
                let (kg, vg) = g.update(&k, &v).unwrap();
                let want = if tensors { DType::F16 } else { DType::F32 };
                assert_eq!((ks.dtype(), vs.dtype()), (want, want));
                assert_eq!(ks.dims(), kw.dims());
                let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                assert_eq!(bits(&wide(&ks)), bits(&kw));
                assert_eq!(bits(&wide(&vs)), bits(&vw));
                assert_eq!(bits(&kw), bits(&kg));
                assert_eq!(bits(&vw), bits(&vg));
            }
        }
    }
}
