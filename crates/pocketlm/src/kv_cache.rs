//! Key/value caches. The model asks its cache to append new keys/values and gets back all
//! keys/values to attend to; it does not know which kind of cache it got (the design of
//! `mlx_lm/models/cache.py` and MLX Swift's `KVCache` protocol).

use candle_core::Tensor;

use crate::Result;

/// One attention layer's cache.
///
/// Keys and values are `[batch, kv_heads, seq, head_dim]`.
pub trait LayerKvCache: Send + Sync + std::fmt::Debug {
    /// Appends `k`, `v` (`[batch, kv_heads, new, head_dim]`) and returns the keys and values to
    /// attend to (`[batch, kv_heads, len, head_dim]`).
    fn update(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;
    /// Number of positions processed so far (the RoPE offset of the next token).
    fn offset(&self) -> usize;
    /// Bytes held by the cache's buffers.
    fn nbytes(&self) -> usize;
    /// Forgets everything.
    fn reset(&mut self);
    /// Drops all positions from `len` on (`len <= offset()`), to resume from a shared prefix.
    fn truncate(&mut self, len: usize) -> Result<()>;
}

/// A cache that grows by preallocated steps (`step` positions at a time, 256 by default, as
/// mlx-lm's `KVCache`), so that appending one token does not reallocate.
#[derive(Debug, Default)]
pub struct GrowingKvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    step: usize,
}

impl GrowingKvCache {
    /// A cache that grows `step` positions at a time.
    pub fn new(step: usize) -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
            step: step.max(1),
        }
    }

    fn grow(
        buf: &Option<Tensor>,
        new: &Tensor,
        len: usize,
        need: usize,
        step: usize,
    ) -> Result<Tensor> {
        if let Some(b) = buf {
            if need <= b.dim(2)? {
                return Ok(b.clone());
            }
        }
        let (b, h, _, d) = new.dims4()?;
        let new_cap = need.div_ceil(step) * step;
        let fresh = Tensor::zeros((b, h, new_cap, d), new.dtype(), new.device())?;
        if let Some(old) = buf {
            if len > 0 {
                fresh.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
        }
        Ok(fresh)
    }
}

impl LayerKvCache for GrowingKvCache {
    fn update(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let need = self.len + n;
        let kb = Self::grow(&self.k, k, self.len, need, self.step)?;
        let vb = Self::grow(&self.v, v, self.len, need, self.step)?;
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        let out = (kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?);
        self.k = Some(kb);
        self.v = Some(vb);
        Ok(out)
    }

    fn offset(&self) -> usize {
        self.len
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

/// The caches of all layers of a model.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Box<dyn LayerKvCache>>,
}

impl KvCache {
    /// `n_layers` growing caches.
    pub fn growing(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| Box::new(GrowingKvCache::new(256)) as Box<dyn LayerKvCache>)
                .collect(),
        }
    }

    /// A cache made of the given per-layer caches.
    pub fn from_layers(layers: Vec<Box<dyn LayerKvCache>>) -> Self {
        Self { layers }
    }

    /// Layer `i`'s cache.
    pub fn layer(&mut self, i: usize) -> Option<&mut (dyn LayerKvCache + 'static)> {
        self.layers.get_mut(i).map(|b| b.as_mut())
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Positions processed so far (layer 0's offset).
    pub fn offset(&self) -> usize {
        self.layers.first().map_or(0, |l| l.offset())
    }

    /// Bytes held by all layers.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(|l| l.nbytes()).sum()
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| l.reset());
    }

    /// Drops positions from `len` on in every layer.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.truncate(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
}
