//! A physical KV block pool shared by many sequences, read through block tables (vLLM's
//! PagedAttention, Kwon et al. 2023, "Efficient Memory Management for Large Language Model
//! Serving with PagedAttention"), on the CPU.
//!
//! - [`KvBlockPool`] holds, for every attention layer of a model, the same number of blocks of
//!   [`BLOCK`] positions of keys and values, each `[kv_heads, BLOCK, head_dim]`, in f32 or
//!   ([`KvBlockPool::new_f16`]) in f16, half the bytes
//!   (head-major inside the block, as a growing cache's buffer is, so that a head's positions
//!   in a block are one contiguous run), with a free list and a reference count per block.
//!   Block ids are `u32` and name a block of one layer: a sequence holds one block table per
//!   layer, the same number of blocks in each (all layers grow in step), so "a block" of the
//!   budget is one block in every layer ([`KvBlockPool::block_bytes`]). Storage is allocated
//!   the first time a block is used and kept when it is freed: memory grows to the most
//!   blocks ever in use, never past the pool's count.
//! - [`PagedKvCache`] is one layer's [`LayerKvCache`] over the pool: a block table and a
//!   length. Appends go into the last block (copied first when it is shared: copy-on-write)
//!   and then into blocks taken from the free list; [`PagedKvCache::fork`] shares every block
//!   (reference counts), truncation and dropping give blocks back.
//! - One-token decode on the CPU reads the blocks in place
//!   ([`crate::kv_cache::LayerKvCache::paged`],
//!   [`crate::kernels::float::attention_paged`]); other callers get the keys and values
//!   gathered into contiguous tensors by [`PagedKvCache::update`].
//! - On a GPU ([`KvBlockPool::on_device`]) each layer's blocks are two device tensors
//!   `[n_blocks, kv_heads, BLOCK, head_dim]` allocated whole when the pool is made (vLLM
//!   allocates its KV blocks up front too), written and copied with tensor operations and
//!   gathered with `index_select`. The fused CUDA decode step reads and appends them in place
//!   through the block table ([`crate::kv_cache::LayerKvCache::reserve_paged`]).
//!
//! Why [`BLOCK`] = 16: it is vLLM's default block size (the paper's trade between the last
//! block's waste, at most 15 positions a sequence, and the length of the table to walk), the
//! 16-value chunk of the CPU attention's softmax ([`crate::kernels::float::LANES`]), and the
//! prefix cache's default block size ([`crate::prefix_cache::PrefixCacheConfig::block_size`]),
//! so that cached prefixes end on block edges and their blocks can be shared as they are.
//!
//! Concurrency: the free lists and reference counts sit behind one mutex per layer; each
//! block's data behind its own read-write lock. A block is written only by the one cache that
//! holds it alone (a shared block is copied before it is written), so sequences attending on
//! several threads take uncontended read locks only.

use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::kernels::float::widen_f16;
use crate::{Error, Result};

/// Positions per block (see the module documentation for why 16).
pub const BLOCK: usize = 16;

/// One block's keys and values, each `[kv_heads, BLOCK, head_dim]`, in f32 or (a pool made
/// with [`KvBlockPool::new_f16`]) in f16 (the other pair stays empty); empty until the block
/// is first used.
#[derive(Debug, Default)]
struct BlockData {
    k: Vec<f32>,
    v: Vec<f32>,
    k16: Vec<f16>,
    v16: Vec<f16>,
}

impl BlockData {
    /// Whether the block's storage is allocated.
    fn is_allocated(&self) -> bool {
        !self.k.is_empty() || !self.k16.is_empty()
    }

    /// Allocates `len` zero values of keys and of values, in f16 or f32.
    fn allocate(&mut self, len: usize, f16: bool) {
        if f16 {
            self.k16 = vec![f16::ZERO; len];
            self.v16 = vec![f16::ZERO; len];
        } else {
            self.k = vec![0.0; len];
            self.v = vec![0.0; len];
        }
    }

    /// Copies values `r` of `src`'s keys and values (a block of the same pool) into this one.
    fn copy_from(&mut self, src: &BlockData, r: Range<usize>) {
        if self.k16.is_empty() {
            self.k[r.clone()].copy_from_slice(&src.k[r.clone()]);
            self.v[r.clone()].copy_from_slice(&src.v[r]);
        } else {
            self.k16[r.clone()].copy_from_slice(&src.k16[r.clone()]);
            self.v16[r.clone()].copy_from_slice(&src.v16[r]);
        }
    }

    /// Writes `k`, `v` (f32) at values `at..`: as they are, or rounded to the nearest f16
    /// (`half::f16::from_f32`, as candle's `to_dtype(F16)` and a growing f16 cache do).
    fn write(&mut self, at: usize, k: &[f32], v: &[f32]) {
        let r = at..at + k.len();
        if self.k16.is_empty() {
            self.k[r.clone()].copy_from_slice(k);
            self.v[r].copy_from_slice(v);
        } else {
            for (d, &x) in self.k16[r.clone()].iter_mut().zip(k) {
                *d = f16::from_f32(x);
            }
            for (d, &x) in self.v16[r].iter_mut().zip(v) {
                *d = f16::from_f32(x);
            }
        }
    }

    /// Reads values `r` of the keys and values into `k`, `v` as f32 (exactly: every f16 is an
    /// f32; [`widen_f16`]).
    fn read(&self, r: Range<usize>, k: &mut [f32], v: &mut [f32]) {
        if self.k16.is_empty() {
            k.copy_from_slice(&self.k[r.clone()]);
            v.copy_from_slice(&self.v[r]);
        } else {
            widen_f16(&self.k16[r.clone()], k);
            widen_f16(&self.v16[r], v);
        }
    }
}

/// Free list and reference counts of one layer's blocks.
#[derive(Debug)]
struct Meta {
    /// Free block ids; the next taken is the last.
    free: Vec<u32>,
    /// References per block (0: free).
    refs: Vec<u32>,
}

/// One layer's blocks on a device: keys and values `[n_blocks, kv_heads, BLOCK, head_dim]` in
/// the pool's dtype.
#[derive(Debug)]
struct DeviceBlocks {
    k: Tensor,
    v: Tensor,
}

/// One layer's blocks: in host memory (`blocks`, allocated block by block), or on a device
/// (`device`; `blocks` then stays empty).
#[derive(Debug)]
struct LayerPool {
    kv_heads: usize,
    head_dim: usize,
    blocks: Vec<RwLock<BlockData>>,
    device: Option<DeviceBlocks>,
    meta: Mutex<Meta>,
}

impl LayerPool {
    fn meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        // A poisoned lock only means a thread panicked holding it; the lists stay consistent
        // (every change is one push or pop plus a count).
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Values per block of keys (or of values).
    fn block_len(&self) -> usize {
        self.kv_heads * BLOCK * self.head_dim
    }

    fn read(&self, id: u32) -> RwLockReadGuard<'_, BlockData> {
        self.blocks[id as usize]
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Copies block `src`'s keys and values into block `dst`: positions `0..held` of each head
    /// in host memory, the whole block on a device.
    fn copy_block(&self, src: u32, dst: u32, held: usize) -> Result<()> {
        if let Some(dev) = &self.device {
            for t in [&dev.k, &dev.v] {
                let block = t.narrow(0, src as usize, 1)?.copy()?;
                t.slice_set(&block, 0, dst as usize)?;
            }
            return Ok(());
        }
        let src = self.read(src);
        let mut dst = self.write(dst);
        let d = self.head_dim;
        for h in 0..self.kv_heads {
            dst.copy_from(&src, (h * BLOCK) * d..(h * BLOCK + held) * d);
        }
        Ok(())
    }

    /// Blocks `ids` gathered into keys and values `[1, kv_heads, len, head_dim]` f32 (the
    /// first `len` positions; f16 values widened): on the CPU from host memory, on the pool's
    /// device from device blocks, there in the blocks' own dtype when `widen` is false (half
    /// the bytes of an f16 pool, for a kernel that reads f16).
    fn gather(&self, ids: &[u32], len: usize, widen: bool) -> Result<(Tensor, Tensor)> {
        let (h, d) = (self.kv_heads, self.head_dim);
        if let Some(dev) = &self.device {
            let idx = Tensor::from_slice(ids, ids.len(), dev.k.device())?;
            let take = |t: &Tensor| -> Result<Tensor> {
                let t = t
                    .index_select(&idx, 0)?
                    .transpose(0, 1)?
                    .reshape((1, h, ids.len() * BLOCK, d))?
                    .narrow(2, 0, len)?;
                let t = if widen { t.to_dtype(DType::F32)? } else { t };
                Ok(t.contiguous()?)
            };
            return Ok((take(&dev.k)?, take(&dev.v)?));
        }
        let mut k = vec![0f32; h * len * d];
        let mut v = vec![0f32; h * len * d];
        for (bi, &id) in ids.iter().enumerate() {
            let take = (len.saturating_sub(bi * BLOCK)).min(BLOCK);
            if take == 0 {
                break;
            }
            let blk = self.read(id);
            for hh in 0..h {
                let src = (hh * BLOCK) * d..(hh * BLOCK + take) * d;
                let dst = (hh * len + bi * BLOCK) * d..(hh * len + bi * BLOCK + take) * d;
                blk.read(src, &mut k[dst.clone()], &mut v[dst]);
            }
        }
        let dev = Device::Cpu;
        Ok((
            Tensor::from_vec(k, (1, h, len, d), &dev)?,
            Tensor::from_vec(v, (1, h, len, d), &dev)?,
        ))
    }

    fn write(&self, id: u32) -> RwLockWriteGuard<'_, BlockData> {
        self.blocks[id as usize]
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// A fixed number of KV blocks for every attention layer of a model, shared by the sequences'
/// [`PagedKvCache`]s (see the module documentation). Shared as `Arc<KvBlockPool>`; all
/// methods take `&self`.
#[derive(Debug)]
pub struct KvBlockPool {
    layers: Vec<LayerPool>,
    n_blocks: usize,
    /// Keys and values stored in f16 ([`Self::new_f16`]) instead of f32.
    f16: bool,
    /// Where the blocks are: the CPU (host memory) or a GPU ([`Self::on_device`]).
    device: Device,
}

impl KvBlockPool {
    /// A pool of `n_blocks` blocks of [`BLOCK`] positions per layer, layer `i` holding
    /// `shapes[i] = (kv_heads, head_dim)` ([`crate::models::CausalLM::cache_shapes`]).
    ///
    /// Errors: [`Error::InvalidArgument`] for no layers, a zero-sized layer, or more blocks
    /// than `u32` ids name.
    pub fn new(shapes: &[(usize, usize)], n_blocks: usize) -> Result<Self> {
        Self::with_dtype(shapes, n_blocks, DType::F32)
    }

    /// [`Self::new`] storing keys and values in f16: half the bytes a block (llama.cpp's
    /// default KV cache type, `-ctk f16 -ctv f16`; a growing cache's
    /// [`crate::kv_cache::KvCacheConfig::kv_f16`]). Values are rounded to the nearest f16 as
    /// they are appended and read back as f32, so attention over the pool equals attention
    /// over a growing f16 cache of the same positions.
    ///
    /// Errors: as [`Self::new`].
    pub fn new_f16(shapes: &[(usize, usize)], n_blocks: usize) -> Result<Self> {
        Self::with_dtype(shapes, n_blocks, DType::F16)
    }

    /// [`Self::new`] (`dtype` f32) or [`Self::new_f16`] (f16).
    ///
    /// Errors: as [`Self::new`], and [`Error::InvalidArgument`] for another dtype.
    pub fn with_dtype(shapes: &[(usize, usize)], n_blocks: usize, dtype: DType) -> Result<Self> {
        Self::on_device(shapes, n_blocks, dtype, &Device::Cpu)
    }

    /// The dtype of a pool on `device` for caches that store f16 when `kv_f16`: f16 then, and
    /// on a CUDA GPU always (what the fused CUDA decode step reads and writes by default; a
    /// step that stores f32, `POCKETLM_KV_F16=0`, leaves such caches to the layer-by-layer
    /// path); f32 otherwise.
    pub fn dtype_for(device: &Device, kv_f16: bool) -> DType {
        if kv_f16 || device.is_cuda() {
            DType::F16
        } else {
            DType::F32
        }
    }

    /// [`Self::with_dtype`] with the blocks on `device`: in host memory for the CPU (allocated
    /// block by block as they are first used), else as two tensors a layer, `[n_blocks,
    /// kv_heads, BLOCK, head_dim]` of `dtype`, allocated (zeroed) here.
    ///
    /// Errors: as [`Self::with_dtype`], and the device's allocation errors.
    pub fn on_device(
        shapes: &[(usize, usize)],
        n_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::build(shapes, n_blocks, dtype, device, !device.is_cpu())
    }

    /// A pool whose blocks are tensors on `device` whatever it is, for tests of the GPU's
    /// storage on the CPU.
    #[cfg(test)]
    pub(crate) fn on_tensors(
        shapes: &[(usize, usize)],
        n_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::build(shapes, n_blocks, dtype, device, true)
    }

    /// [`Self::on_device`], the blocks tensors when `tensors`, else in host memory.
    fn build(
        shapes: &[(usize, usize)],
        n_blocks: usize,
        dtype: DType,
        device: &Device,
        tensors: bool,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16) {
            return Err(Error::InvalidArgument(format!(
                "a KV block pool stores f32 or f16 keys and values, not {dtype:?}"
            )));
        }
        if shapes.is_empty() || shapes.iter().any(|&(h, d)| h == 0 || d == 0) {
            return Err(Error::InvalidArgument(format!(
                "a KV block pool needs layers of at least one head and dimension, got {shapes:?}"
            )));
        }
        if n_blocks > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "a KV block pool of {n_blocks} blocks: at most {} (u32 block ids)",
                u32::MAX
            )));
        }
        let mut layers = Vec::with_capacity(shapes.len());
        for &(kv_heads, head_dim) in shapes {
            let (blocks, device) = if !tensors {
                ((0..n_blocks).map(|_| RwLock::default()).collect(), None)
            } else {
                let shape = (n_blocks, kv_heads, BLOCK, head_dim);
                let k = Tensor::zeros(shape, dtype, device)?;
                let v = Tensor::zeros(shape, dtype, device)?;
                (Vec::new(), Some(DeviceBlocks { k, v }))
            };
            layers.push(LayerPool {
                kv_heads,
                head_dim,
                blocks,
                device,
                meta: Mutex::new(Meta {
                    // Taken from the end: block 0 first.
                    free: (0..n_blocks as u32).rev().collect(),
                    refs: vec![0; n_blocks],
                }),
            });
        }
        Ok(Self {
            layers,
            n_blocks,
            f16: dtype == DType::F16,
            device: device.clone(),
        })
    }

    /// The device the blocks are on ([`Self::on_device`]).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the blocks are in host memory, read in place by the CPU's paged attention
    /// ([`PagedKv::keys`]); `false` for blocks held as device tensors.
    pub fn in_host_memory(&self) -> bool {
        self.layers.iter().all(|l| l.device.is_none())
    }

    /// Layer `layer`'s key and value storage on a device, `[n_blocks, kv_heads, BLOCK,
    /// head_dim]` each in [`Self::dtype`] (block `id` is row `id`); `None` for a pool in host
    /// memory or an unknown layer.
    pub fn device_blocks(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        let d = self.layers.get(layer)?.device.as_ref()?;
        Some((&d.k, &d.v))
    }

    /// The pool of f32 blocks that fit in `bytes` ([`Self::blocks_for`]).
    ///
    /// Errors: as [`Self::new`].
    pub fn with_bytes(shapes: &[(usize, usize)], bytes: usize) -> Result<Self> {
        Self::with_bytes_of(shapes, bytes, DType::F32)
    }

    /// The pool of `dtype` (f32 or f16) blocks that fit in `bytes`.
    ///
    /// Errors: as [`Self::with_dtype`].
    pub fn with_bytes_of(shapes: &[(usize, usize)], bytes: usize, dtype: DType) -> Result<Self> {
        Self::with_bytes_on(shapes, bytes, dtype, &Device::Cpu)
    }

    /// The pool of `dtype` (f32 or f16) blocks on `device` ([`Self::on_device`]) that fit in
    /// `bytes`.
    ///
    /// Errors: as [`Self::on_device`].
    pub fn with_bytes_on(
        shapes: &[(usize, usize)],
        bytes: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let block = Self::shape_block_bytes_of(shapes, dtype).max(1);
        Self::on_device(shapes, bytes / block, dtype, device)
    }

    /// Blocks of f32 layers `shapes` that `bytes` hold: `bytes / block_bytes`, rounded down.
    pub fn blocks_for(shapes: &[(usize, usize)], bytes: usize) -> usize {
        bytes / Self::shape_block_bytes(shapes).max(1)
    }

    /// Bytes of one block in every layer of `shapes`: f32 keys and values of [`BLOCK`]
    /// positions.
    pub fn shape_block_bytes(shapes: &[(usize, usize)]) -> usize {
        Self::shape_block_bytes_of(shapes, DType::F32)
    }

    /// Bytes of one block in every layer of `shapes`, keys and values of [`BLOCK`] positions
    /// in `dtype`.
    pub fn shape_block_bytes_of(shapes: &[(usize, usize)], dtype: DType) -> usize {
        shapes
            .iter()
            .map(|&(h, d)| 2 * h * d * BLOCK * dtype.size_in_bytes())
            .sum()
    }

    /// The dtype keys and values are stored in: f32, or f16 for [`Self::new_f16`].
    pub fn dtype(&self) -> DType {
        if self.f16 {
            DType::F16
        } else {
            DType::F32
        }
    }

    /// Bytes of one block in every layer (the unit of a KV memory budget).
    pub fn block_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| 2 * l.block_len() * self.dtype().size_in_bytes())
            .sum()
    }

    /// Blocks per layer.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Attention layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// `(kv_heads, head_dim)` of layer `layer`, `None` past the last.
    pub fn layer_shape(&self, layer: usize) -> Option<(usize, usize)> {
        self.layers.get(layer).map(|l| (l.kv_heads, l.head_dim))
    }

    /// Free blocks of the layer that has the fewest.
    pub fn free_blocks(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.meta().free.len())
            .min()
            .unwrap_or(0)
    }

    /// Blocks in use in the layer that uses the most (`n_blocks - free_blocks`).
    pub fn used_blocks(&self) -> usize {
        self.n_blocks - self.free_blocks()
    }

    /// References to block `id` of layer `layer` (0: free; `None` for an unknown block).
    pub fn refs(&self, layer: usize, id: u32) -> Option<u32> {
        let l = self.layers.get(layer)?;
        l.meta().refs.get(id as usize).copied()
    }

    /// The layer, or an error naming it.
    fn layer(&self, layer: usize) -> Result<&LayerPool> {
        self.layers.get(layer).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "layer {layer} of a KV block pool of {} layers",
                self.layers.len()
            ))
        })
    }

    /// Takes a free block of layer `layer` (one reference) with its storage allocated.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the layer and the pool's size when no block
    /// is free, or for an unknown layer.
    pub fn allocate(&self, layer: usize) -> Result<u32> {
        let l = self.layer(layer)?;
        let id = {
            let mut m = l.meta();
            let id = m.free.pop().ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "the KV block pool is out of blocks: layer {layer} has all {} blocks of {BLOCK} \
                     positions in use",
                    self.n_blocks
                ))
            })?;
            m.refs[id as usize] = 1;
            id
        };
        if l.device.is_none() {
            // The block was free: no cache reads or writes it.
            let mut b = l.write(id);
            if !b.is_allocated() {
                b.allocate(l.block_len(), self.f16);
            }
        }
        Ok(id)
    }

    /// Adds a reference to block `id` of layer `layer` (a table that shares it).
    ///
    /// Errors: [`Error::InvalidArgument`] for an unknown layer or a free or unknown block.
    pub fn retain(&self, layer: usize, id: u32) -> Result<()> {
        let l = self.layer(layer)?;
        let mut m = l.meta();
        match m.refs.get_mut(id as usize) {
            Some(r) if *r > 0 => {
                *r += 1;
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "KV block {id} of layer {layer} is not in use: it cannot be shared"
            ))),
        }
    }

    /// Drops a reference to block `id` of layer `layer`; the last one frees it. Unknown or
    /// free blocks are ignored (so that dropping a cache never fails).
    pub fn release(&self, layer: usize, id: u32) {
        let Some(l) = self.layers.get(layer) else {
            return;
        };
        let mut m = l.meta();
        let Some(r) = m.refs.get_mut(id as usize) else {
            return;
        };
        match *r {
            0 => {}
            1 => {
                *r = 0;
                m.free.push(id);
            }
            _ => *r -= 1,
        }
    }
}

/// Whole blocks of every layer of a [`KvBlockPool`] held by reference (one each), e.g. a
/// prefix-cache node's run (SGLang's RadixAttention over vLLM's blocks): `ids[i]` are blocks of
/// pool layer `i`, the same number in every layer, in position order. Dropping it releases
/// them; a clone takes one more reference to each.
#[derive(Debug)]
pub struct PoolBlocks {
    pool: Arc<KvBlockPool>,
    ids: Vec<Vec<u32>>,
}

impl PoolBlocks {
    /// Takes one more reference to each of `ids[i]` (blocks of layer `i` of `pool`, in use).
    ///
    /// Errors: [`Error::InvalidArgument`] for a layer count other than the pool's, layers of
    /// different lengths, or a block not in use (no reference is kept then).
    pub fn share(pool: &Arc<KvBlockPool>, ids: Vec<Vec<u32>>) -> Result<Self> {
        if ids.len() != pool.n_layers() || ids.iter().any(|l| l.len() != ids[0].len()) {
            return Err(Error::InvalidArgument(format!(
                "pool blocks: {} layers of {:?} blocks, the pool has {} layers",
                ids.len(),
                ids.iter().map(Vec::len).collect::<Vec<_>>(),
                pool.n_layers()
            )));
        }
        let mut out = Self {
            pool: pool.clone(),
            ids: vec![Vec::new(); ids.len()],
        };
        for (i, layer) in ids.into_iter().enumerate() {
            for id in layer {
                // On error `out` drops and releases what it took.
                pool.retain(i, id)?;
                out.ids[i].push(id);
            }
        }
        Ok(out)
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<KvBlockPool> {
        &self.pool
    }

    /// Blocks per layer.
    pub fn n_blocks(&self) -> usize {
        self.ids.first().map_or(0, Vec::len)
    }

    /// Layer `layer`'s block ids (empty past the last layer).
    pub fn ids(&self, layer: usize) -> &[u32] {
        self.ids.get(layer).map_or(&[], Vec::as_slice)
    }

    /// Bytes of the blocks, all layers.
    pub fn nbytes(&self) -> usize {
        self.n_blocks() * self.pool.block_bytes()
    }

    /// Keeps the first `at` blocks of each layer and returns the others.
    pub fn split_off(&mut self, at: usize) -> Self {
        Self {
            pool: self.pool.clone(),
            ids: self
                .ids
                .iter_mut()
                .map(|l| l.split_off(at.min(l.len())))
                .collect(),
        }
    }

    /// The first `blocks` blocks of layer `layer` gathered into keys and values
    /// `[1, kv_heads, blocks · BLOCK, head_dim]` f32 (an f16 pool's values widened), on the
    /// CPU for a pool in host memory, on its device otherwise.
    ///
    /// Errors: [`Error::InvalidArgument`] for an unknown layer or more blocks than held.
    pub fn gather(&self, layer: usize, blocks: usize) -> Result<(Tensor, Tensor)> {
        let l = self.pool.layer(layer)?;
        let ids = self.ids(layer);
        if blocks > ids.len() {
            return Err(Error::InvalidArgument(format!(
                "pool blocks: {blocks} blocks of layer {layer}, {} held",
                ids.len()
            )));
        }
        l.gather(&ids[..blocks], blocks * BLOCK, true)
    }
}

impl Clone for PoolBlocks {
    fn clone(&self) -> Self {
        for (i, l) in self.ids.iter().enumerate() {
            for &id in l {
                // In use: this value holds a reference to it.
                let _ = self.pool.retain(i, id);
            }
        }
        Self {
            pool: self.pool.clone(),
            ids: self.ids.clone(),
        }
    }
}

impl Drop for PoolBlocks {
    fn drop(&mut self) {
        for (i, l) in self.ids.iter().enumerate() {
            for &id in l {
                self.pool.release(i, id);
            }
        }
    }
}

/// Keys and values of one layer's cache read in place through its block table: block `b`
/// holds positions `b·BLOCK..(b + 1)·BLOCK`, each `[kv_heads, BLOCK, head_dim]` f32, or f16
/// in an f16 pool ([`Self::dtype`]; only the first `len - b·BLOCK` positions of the last
/// block are meaningful). Holds a read lock on each block while it lives.
#[derive(Debug)]
pub struct PagedKv<'a> {
    blocks: Vec<RwLockReadGuard<'a, BlockData>>,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
    pool: &'a Arc<KvBlockPool>,
    table: &'a [u32],
    layer: usize,
}

impl PagedKv<'_> {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Width of a head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Positions per block ([`BLOCK`]).
    pub fn block(&self) -> usize {
        BLOCK
    }

    /// The pool the blocks are in.
    pub fn pool(&self) -> &Arc<KvBlockPool> {
        self.pool
    }

    /// The block table: block ids of layer [`Self::layer`] of the pool, in position order.
    pub fn table(&self) -> &[u32] {
        self.table
    }

    /// The pool layer the blocks belong to.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The dtype of the blocks: [`KvBlockPool::dtype`].
    pub fn dtype(&self) -> DType {
        self.pool.dtype()
    }

    /// Each block's keys, `[kv_heads, BLOCK, head_dim]` f32, in table order (empty slices in
    /// an f16 pool: see [`Self::keys_f16`]).
    pub fn keys(&self) -> Vec<&[f32]> {
        self.blocks.iter().map(|b| b.k.as_slice()).collect()
    }

    /// Each block's values, as [`Self::keys`].
    pub fn values(&self) -> Vec<&[f32]> {
        self.blocks.iter().map(|b| b.v.as_slice()).collect()
    }

    /// Each block's keys in an f16 pool, `[kv_heads, BLOCK, head_dim]` f16, in table order
    /// (empty slices in an f32 pool).
    pub fn keys_f16(&self) -> Vec<&[f16]> {
        self.blocks.iter().map(|b| b.k16.as_slice()).collect()
    }

    /// Each block's values in an f16 pool, as [`Self::keys_f16`].
    pub fn values_f16(&self) -> Vec<&[f16]> {
        self.blocks.iter().map(|b| b.v16.as_slice()).collect()
    }
}

/// A paged cache's keys and values as a kernel reads them in place on a device
/// ([`PagedKvCache::append_device`]).
#[derive(Debug, Clone)]
pub struct PagedBlocks {
    /// The pool layer's keys, `[n_blocks, kv_heads, BLOCK, head_dim]`.
    pub k: Tensor,
    /// The pool layer's values, as `k`.
    pub v: Tensor,
    /// The cache's block ids in position order: `table[t / BLOCK]` holds position `t`.
    pub table: Vec<u32>,
    /// Positions held.
    pub len: usize,
}

/// One attention layer's cache in a [`KvBlockPool`]: a block table and a length (see the
/// module documentation); its [`crate::kv_cache::LayerKvCache`] implementation lives with the
/// trait in `kv_cache` (this module does not depend on it). Keys and values are `[1, kv_heads,
/// seq, head_dim]`, held in the pool's dtype (f32 or f16); the tensors given back are gathered
/// copies on the input's device and in its dtype. [`Self::nbytes`] counts the blocks in the
/// table (shared ones included); dropping the cache gives them back.
#[derive(Debug)]
pub struct PagedKvCache {
    pool: Arc<KvBlockPool>,
    layer: usize,
    table: Vec<u32>,
    len: usize,
}

impl PagedKvCache {
    /// An empty cache of layer `layer` of `pool`.
    ///
    /// Errors: [`Error::InvalidArgument`] for a layer the pool does not have.
    pub fn new(pool: Arc<KvBlockPool>, layer: usize) -> Result<Self> {
        pool.layer(layer)?;
        Ok(Self {
            pool,
            layer,
            table: Vec::new(),
            len: 0,
        })
    }

    /// The block ids of the table, in position order.
    pub fn block_table(&self) -> &[u32] {
        &self.table
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<KvBlockPool> {
        &self.pool
    }

    /// A cache holding the same positions in the same blocks (one more reference each): the
    /// first append to a shared partial block copies it first.
    ///
    /// Errors: as [`KvBlockPool::retain`] (not for a consistent table).
    pub fn fork(&self) -> Result<Self> {
        let mut out = Self {
            pool: self.pool.clone(),
            layer: self.layer,
            table: Vec::with_capacity(self.table.len()),
            len: self.len,
        };
        for &id in &self.table {
            self.pool.retain(self.layer, id)?;
            out.table.push(id);
        }
        Ok(out)
    }

    fn layer_pool(&self) -> &LayerPool {
        &self.pool.layers[self.layer]
    }

    /// Makes table entry `i` a block this cache holds alone, copying a shared one's first
    /// `held` positions into a fresh block.
    fn own(&mut self, i: usize, held: usize) -> Result<()> {
        let old = self.table[i];
        if self.pool.refs(self.layer, old).unwrap_or(0) <= 1 {
            return Ok(());
        }
        let new = self.pool.allocate(self.layer)?;
        if let Err(e) = self.layer_pool().copy_block(old, new, held) {
            self.pool.release(self.layer, new);
            return Err(e);
        }
        self.pool.release(self.layer, old);
        self.table[i] = new;
        Ok(())
    }

    /// Appends `k`, `v` (`[1, kv_heads, n, head_dim]`, any float dtype, any device) without
    /// gathering anything.
    ///
    /// Errors: shapes that are not this layer's; [`Error::InvalidArgument`] when the pool is
    /// out of blocks (the positions that fit are not kept: the cache is as before).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (kv_heads, d) = (self.layer_pool().kv_heads, self.layer_pool().head_dim);
        let (b, h, n, kd) = k.dims4()?;
        if (b, h, kd) != (1, kv_heads, d) || v.dims() != k.dims() {
            return Err(Error::InvalidArgument(format!(
                "a paged KV cache of layer {} holds [1, {kv_heads}, seq, {d}]; appending keys \
                 {:?} and values {:?}",
                self.layer,
                k.dims(),
                v.dims()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let (old_len, old_blocks) = (self.len, self.table.len());
        let r = if self.layer_pool().device.is_some() {
            self.write_device(k, v, n)
        } else {
            let flat = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let (kf, vf) = (flat(k)?, flat(v)?);
            self.write_positions(&kf, &vf, n)
        };
        if r.is_err() {
            // Give back what this append took.
            self.release_from(old_blocks);
            self.len = old_len;
        }
        r
    }

    /// Makes table entry `pos / BLOCK` a block this cache holds alone and may write at
    /// position `pos` (the next one): a new block at a block edge, else the last one (copied
    /// first when shared).
    fn block_for(&mut self, pos: usize) -> Result<usize> {
        let (bi, off) = (pos / BLOCK, pos % BLOCK);
        if bi == self.table.len() {
            let id = self.pool.allocate(self.layer)?;
            self.table.push(id);
        } else {
            self.own(bi, off)?;
        }
        Ok(bi)
    }

    /// Writes `n` positions of `k`, `v` (`[1, kv_heads, n, head_dim]`, any float dtype) after
    /// the held ones into the device blocks, converted to the pool's dtype (rounded to nearest
    /// for f16) and moved to its device. Whole blocks whose ids follow each other in the table
    /// (a fresh pool hands them out in order, [`Self::release_from`] gives them back so) are
    /// written together: one transposing copy and one `slice_set` per run and k/v (one copy
    /// more when the run is only part of the chunk: candle reshapes a strided view by copying
    /// it), instead of two copies per block (on CUDA each copy is a launch; a 512-position
    /// chunk filled 32 blocks one by one).
    fn write_device(&mut self, k: &Tensor, v: &Tensor, n: usize) -> Result<()> {
        let dtype = self.pool.dtype();
        let dev = self.pool.device().clone();
        let k = k.to_device(&dev)?.to_dtype(dtype)?;
        let v = v.to_device(&dev)?.to_dtype(dtype)?;
        let (kv_heads, d) = (self.layer_pool().kv_heads, self.layer_pool().head_dim);
        let mut done = 0;
        while done < n {
            let pos = self.len;
            let off = pos % BLOCK;
            let bi = self.block_for(pos)?;
            // A run of whole blocks with consecutive ids, starting at a block edge.
            let mut run = 1;
            if off == 0 {
                while (run + 1) * BLOCK <= n - done {
                    let next = self.block_for(pos + run * BLOCK)?;
                    if self.table[next] != self.table[bi] + run as u32 {
                        break;
                    }
                    run += 1;
                }
            }
            // A run's blocks are whole: the loop takes one only when the chunk covers it.
            let take = if run > 1 {
                run * BLOCK
            } else {
                (BLOCK - off).min(n - done)
            };
            let id = self.table[bi] as usize;
            let blocks = self.layer_pool().device.as_ref().ok_or_else(|| {
                Error::InvalidArgument("a paged KV cache lost its device blocks".into())
            })?;
            for (src, dst) in [(&k, &blocks.k), (&v, &blocks.v)] {
                let part = src.narrow(2, done, take)?;
                if run > 1 {
                    // [1, kv_heads, run·BLOCK, d] -> [run, kv_heads, BLOCK, d]
                    let part = part
                        .reshape((kv_heads, run, BLOCK, d))?
                        .transpose(0, 1)?
                        .contiguous()?;
                    dst.slice_set(&part, 0, id)?;
                } else {
                    dst.narrow(0, id, 1)?
                        .slice_set(&part.contiguous()?, 2, off)?;
                }
            }
            self.len += take;
            done += take;
        }
        Ok(())
    }

    /// Writes `n` positions of `kf`, `vf` (`[kv_heads, n, head_dim]` f32) after the held ones.
    fn write_positions(&mut self, kf: &[f32], vf: &[f32], n: usize) -> Result<()> {
        let (kv_heads, d) = (self.layer_pool().kv_heads, self.layer_pool().head_dim);
        let mut done = 0;
        while done < n {
            let pos = self.len;
            let off = pos % BLOCK;
            let bi = self.block_for(pos)?;
            let take = (BLOCK - off).min(n - done);
            let l = &self.pool.layers[self.layer];
            let mut blk = l.write(self.table[bi]);
            for h in 0..kv_heads {
                let src = (h * n + done) * d..(h * n + done + take) * d;
                blk.write((h * BLOCK + off) * d, &kf[src.clone()], &vf[src]);
            }
            drop(blk);
            self.len += take;
            done += take;
        }
        Ok(())
    }

    /// The held keys and values gathered into `[1, kv_heads, len, head_dim]` f32 tensors (an
    /// f16 pool's values widened), on the CPU for a pool in host memory, on its device
    /// otherwise; `None` when empty.
    ///
    /// Errors: tensor errors (none for a consistent cache).
    pub fn gather(&self) -> Result<Option<(Tensor, Tensor)>> {
        self.gather_as(true)
    }

    /// [`Self::gather`], with a device pool's values left in its dtype unless `widen`.
    fn gather_as(&self, widen: bool) -> Result<Option<(Tensor, Tensor)>> {
        if self.len == 0 {
            return Ok(None);
        }
        let blocks = self.len.div_ceil(BLOCK);
        self.layer_pool()
            .gather(&self.table[..blocks], self.len, widen)
            .map(Some)
    }

    /// For a kernel that reads the blocks in place on the pool's device (the CUDA flash
    /// prefill): appends `k`, `v` (`[1, kv_heads, new, head_dim]`) and returns the layer's
    /// device storage, the table and the length ([`PagedBlocks`]); `None` (nothing
    /// appended) for a pool in host memory.
    ///
    /// Errors: as [`Self::append`].
    pub fn append_device(&mut self, k: &Tensor, v: &Tensor) -> Result<Option<PagedBlocks>> {
        let Some((kb, vb)) = self.pool.device_blocks(self.layer) else {
            return Ok(None);
        };
        let (kb, vb) = (kb.clone(), vb.clone());
        self.append(k, v)?;
        Ok(Some(PagedBlocks {
            k: kb,
            v: vb,
            table: self.table[..self.len.div_ceil(BLOCK)].to_vec(),
            len: self.len,
        }))
    }

    /// For the fused CUDA decode step, which writes the keys and values of the next `n`
    /// positions itself: makes the table cover them (blocks taken from the pool, a shared
    /// last block copied first) and returns the layer's device storage (keys, values:
    /// [`KvBlockPool::device_blocks`]) and the table; [`Self::commit`] then counts the
    /// positions written. `None` for a pool in host memory.
    ///
    /// Errors: [`Error::InvalidArgument`] when the pool is out of blocks (the blocks taken are
    /// kept: the next append uses them).
    pub fn reserve_device(&mut self, n: usize) -> Result<Option<(Tensor, Tensor, &[u32])>> {
        if self.layer_pool().device.is_none() {
            return Ok(None);
        }
        for pos in self.len..self.len + n {
            self.block_for(pos)?;
        }
        let Some(d) = &self.layer_pool().device else {
            return Ok(None);
        };
        Ok(Some((d.k.clone(), d.v.clone(), &self.table)))
    }

    /// Counts `n` positions written in place after [`Self::reserve_device`].
    ///
    /// Errors: [`Error::InvalidArgument`] when the table does not cover them.
    pub fn commit(&mut self, n: usize) -> Result<()> {
        if self.len + n > self.table.len() * BLOCK {
            return Err(Error::InvalidArgument(format!(
                "a paged KV cache of {} positions in {} blocks: {n} more were not reserved",
                self.len,
                self.table.len()
            )));
        }
        self.len += n;
        Ok(())
    }

    /// The blocks read in place (read locks held while the view lives). For a pool on a
    /// device the view carries the table and shapes only: its [`PagedKv::keys`] and the
    /// like are empty.
    pub fn view(&self) -> PagedKv<'_> {
        let l = self.layer_pool();
        PagedKv {
            blocks: if l.device.is_some() {
                Vec::new()
            } else {
                self.table.iter().map(|&id| l.read(id)).collect()
            },
            len: self.len,
            kv_heads: l.kv_heads,
            head_dim: l.head_dim,
            pool: &self.pool,
            table: &self.table,
            layer: self.layer,
        }
    }

    /// Gives back blocks `from..` of the table.
    fn release_from(&mut self, from: usize) {
        for id in self.table.drain(from..).rev() {
            self.pool.release(self.layer, id);
        }
    }
}

impl Drop for PagedKvCache {
    fn drop(&mut self) {
        self.release_from(0);
    }
}

/// The [`crate::kv_cache::LayerKvCache`] operations (implemented in `kv_cache`, which owns
/// the trait) on the cache's own terms.
impl PagedKvCache {
    /// Appends `k`, `v` and returns every held position gathered into `[1, kv_heads, len,
    /// head_dim]` tensors on `k`'s device, in its dtype.
    ///
    /// Errors: as [`Self::append`].
    pub fn update(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (ko, vo) = self.update_stored(k, v)?;
        Ok((ko.to_dtype(k.dtype())?, vo.to_dtype(v.dtype())?))
    }

    /// As [`Self::update`], but on a device pool the keys and values come back in the pool's
    /// dtype (an f16 pool's blocks gathered as f16, for a kernel that reads f16, such as the
    /// CUDA flash prefill: half the bytes of the f32 copy and no conversion); from a pool in
    /// host memory f32, as [`Self::gather`].
    ///
    /// Errors: as [`Self::update`].
    pub fn update_stored(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.append(k, v)?;
        let (ko, vo) = self.gather_as(false)?.ok_or_else(|| {
            Error::InvalidArgument("a paged KV cache: nothing to attend to".into())
        })?;
        Ok((ko.to_device(k.device())?, vo.to_device(v.device())?))
    }

    /// Appends whole blocks `ids` of layer `layer` of `pool` by reference (one more reference
    /// each, no copy), [`BLOCK`] positions each. Returns whether it did: `false` (nothing
    /// appended) for another pool or layer, or a cache not at a block edge.
    ///
    /// Errors: [`Error::InvalidArgument`] for a block not in use (the cache is as before).
    pub fn share_blocks(
        &mut self,
        pool: &Arc<KvBlockPool>,
        layer: usize,
        ids: &[u32],
    ) -> Result<bool> {
        if !Arc::ptr_eq(pool, &self.pool)
            || layer != self.layer
            || !self.len.is_multiple_of(BLOCK)
            || self.table.len() != self.len / BLOCK
        {
            return Ok(false);
        }
        for (n, &id) in ids.iter().enumerate() {
            if let Err(e) = self.pool.retain(layer, id) {
                // Give back the references taken so far: the cache is as before.
                for &taken in &ids[..n] {
                    self.pool.release(layer, taken);
                }
                return Err(e);
            }
        }
        self.table.extend_from_slice(ids);
        self.len += ids.len() * BLOCK;
        Ok(true)
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the blocks in the table (shared ones included).
    pub fn nbytes(&self) -> usize {
        self.table.len() * 2 * self.layer_pool().block_len() * self.pool.dtype().size_in_bytes()
    }

    /// Gives every block back and forgets all positions.
    pub fn reset(&mut self) {
        self.release_from(0);
        self.len = 0;
    }

    /// Drops the positions from `len` on, giving back the blocks past the last one kept.
    ///
    /// Errors: [`Error::InvalidArgument`] when `len` is more than held.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(Error::InvalidArgument(format!(
                "cannot truncate a KV cache of {} positions to {len}",
                self.len
            )));
        }
        self.release_from(len.div_ceil(BLOCK));
        self.len = len;
        Ok(())
    }
}
