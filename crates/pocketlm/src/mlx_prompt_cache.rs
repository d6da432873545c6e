//! Prompt-cache files in mlx-lm's format (`mlx_lm.models.cache.save_prompt_cache` /
//! `load_prompt_cache`, mlx-lm 0.32; what `mlx_lm.cache_prompt` writes), read and written.
//!
//! Layout (safetensors): for layer `i` of a cache of `KVCache`s, tensors `{i}.0` (keys),
//! `{i}.1` (values), `[batch, kv_heads, n, head_dim]` where `n` may exceed the positions held
//! (mlx-lm saves its whole preallocated buffer), and `{i}.2`, a 0-d integer array: the offset
//! (positions held). String metadata is mlx's `tree_flatten` of
//! `[metadata, classes, scalars]`: `0.{key}` = the user metadata (mlx-lm's `cache_prompt`
//! stores `model`, `chat_template`, `tokenizer_config`), `1.{i}` = the cache class of layer `i`
//! (`KVCache`), `2.0` = `""` then `2.{j}.0` = `{i}.2`, `2.{j}.1` = `scalar` (`j` from 1) for each
//! offset stored as an array. Only `KVCache` layers are read or written here (mlx-lm's rotating
//! and quantized caches are refused by name).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::kv_cache::KvCache;
use crate::{Error, Result};

/// Writes `cache` (every layer holding the same positions, float keys and values) as mlx-lm's
/// `save_prompt_cache` would, with the user `metadata` (`0.{key}` entries).
///
/// Errors: [`Error::InvalidArgument`] for an empty layer or layers of different lengths;
/// [`Error::Io`] naming the file when it cannot be written.
pub fn save(path: &Path, cache: &KvCache, metadata: &BTreeMap<String, String>) -> Result<()> {
    let mut bufs: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = Vec::new();
    let mut meta: HashMap<String, String> = HashMap::new();
    for (k, v) in metadata {
        meta.insert(format!("0.{k}"), v.clone());
    }
    meta.insert("2.0".into(), String::new());
    let offset = cache.offset();
    for i in 0..cache.n_layers() {
        if let Some(l) = cache.layer_ref(i).filter(|l| l.arrays().is_some()) {
            return Err(Error::InvalidArgument(format!(
                "layer {i} of the cache is an {}: only KVCache layers are written in mlx-lm's \
                 prompt-cache format here",
                l.kind()
            )));
        }
        let Some((k, v)) = cache.layer_state(i)? else {
            return Err(Error::InvalidArgument(format!(
                "layer {i} of the KV cache is empty"
            )));
        };
        if k.dim(2)? != offset {
            return Err(Error::InvalidArgument(format!(
                "layer {i} of the KV cache holds {} positions, layer 0 {offset}",
                k.dim(2)?
            )));
        }
        for (j, t) in [(0, k), (1, v)] {
            let dims = t.dims().to_vec();
            let data: Vec<u8> = t
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .flat_map(f32::to_le_bytes)
                .collect();
            bufs.push((format!("{i}.{j}"), data, dims, Dtype::F32));
        }
        bufs.push((
            format!("{i}.2"),
            (offset as i32).to_le_bytes().to_vec(),
            Vec::new(),
            Dtype::I32,
        ));
        meta.insert(format!("1.{i}"), "KVCache".into());
        meta.insert(format!("2.{}.0", i + 1), format!("{i}.2"));
        meta.insert(format!("2.{}.1", i + 1), "scalar".into());
    }
    let views = bufs
        .iter()
        .map(|(name, data, shape, dtype)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::InvalidArgument(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| {
        Error::io(
            path,
            std::io::Error::other(format!("writing the mlx-lm prompt cache: {e}")),
        )
    })
}

/// An mlx-lm prompt cache read back: per layer keys and values `[batch, kv_heads, offset,
/// head_dim]` (f32, on the device asked for) and the user metadata.
#[derive(Debug)]
pub struct MlxPromptCache {
    /// Per layer: keys and values, cut to the layer's offset.
    pub layers: Vec<(Tensor, Tensor)>,
    /// The user metadata (`0.{key}` entries, keys without the `0.`).
    pub metadata: BTreeMap<String, String>,
}

impl MlxPromptCache {
    /// Positions held (layer 0's; 0 for no layers).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A growing cache of `n_layers` layers holding these keys and values.
    ///
    /// Errors: [`Error::InvalidArgument`] when the file has another layer count.
    pub fn to_kv_cache(&self, n_layers: usize) -> Result<KvCache> {
        if n_layers != self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "the mlx-lm prompt cache has {} layers, the model {n_layers}",
                self.layers.len()
            )));
        }
        let mut c = KvCache::growing(n_layers);
        for (i, (k, v)) in self.layers.iter().enumerate() {
            if let Some(l) = c.layer(i) {
                l.update(k, v)?;
            }
        }
        Ok(c)
    }
}

/// Reads an mlx-lm prompt cache (see the module documentation) onto `device`.
///
/// Errors: [`Error::Io`] when the file cannot be read; [`Error::Model`] naming the file and
/// the entry when it is not an mlx-lm prompt cache, a layer is not a `KVCache`, a tensor is
/// missing, of another dtype than f32/f16/bf16 (keys, values) or an integer (offset), or
/// misshapen.
pub fn load(path: &Path, device: &Device) -> Result<MlxPromptCache> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Model(format!("{}: {msg}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let mut classes: BTreeMap<usize, String> = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (k, v) in &meta {
        if let Some(user) = k.strip_prefix("0.") {
            metadata.insert(user.to_string(), v.clone());
        } else if let Some(i) = k.strip_prefix("1.") {
            let i: usize = i
                .parse()
                .map_err(|_| bad(format!("metadata `{k}` is not a layer's class")))?;
            classes.insert(i, v.clone());
        }
    }
    if classes.is_empty() {
        return Err(bad(
            "not an mlx-lm prompt cache (no `1.{layer}` class metadata)".into(),
        ));
    }
    let mut layers = Vec::with_capacity(classes.len());
    for (n, (&i, class)) in classes.iter().enumerate() {
        if i != n {
            return Err(bad(format!(
                "metadata `1.{n}` (layer {n}'s class) is missing"
            )));
        }
        if class != "KVCache" {
            return Err(bad(format!(
                "layer {i} is a `{class}`; only mlx-lm's `KVCache` is read"
            )));
        }
        let get = |j: usize| {
            let name = format!("{i}.{j}");
            st.tensor(&name)
                .map_err(|_| bad(format!("tensor `{name}` is missing")))
                .map(|t| (name, t))
        };
        let (oname, off) = get(2)?;
        let ob = off.data();
        let offset = match (off.dtype(), off.shape().iter().product::<usize>()) {
            (Dtype::I32, 1) => i32::from_le_bytes(ob[..4].try_into().unwrap_or_default()) as i64,
            (Dtype::U32, 1) => u32::from_le_bytes(ob[..4].try_into().unwrap_or_default()) as i64,
            (Dtype::I64, 1) => i64::from_le_bytes(ob[..8].try_into().unwrap_or_default()),
            (Dtype::U64, 1) => u64::from_le_bytes(ob[..8].try_into().unwrap_or_default()) as i64,
            (d, n) => {
                return Err(bad(format!(
                    "tensor `{oname}` (the offset) is {n} values of {d:?}, expected one integer"
                )))
            }
        };
        let mut kv = Vec::with_capacity(2);
        for j in 0..2 {
            let (name, t) = get(j)?;
            let dtype = match t.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                d => {
                    return Err(bad(format!(
                        "tensor `{name}` is {d:?}; expected f32, f16 or bf16"
                    )))
                }
            };
            let shape = t.shape().to_vec();
            if shape.len() != 4 || offset < 0 || offset as usize > shape[2] {
                return Err(bad(format!(
                    "tensor `{name}` has shape {shape:?} for offset {offset}; expected [batch, kv_heads, >= offset, head_dim]"
                )));
            }
            let full = Tensor::from_raw_buffer(t.data(), dtype, &shape, device)?;
            kv.push(
                full.narrow(2, 0, offset as usize)?
                    .to_dtype(DType::F32)?
                    .contiguous()?,
            );
        }
        let v = kv.pop().unwrap_or_else(|| unreachable!());
        let k = kv.pop().unwrap_or_else(|| unreachable!());
        layers.push((k, v));
    }
    Ok(MlxPromptCache { layers, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value mlx-lm's golden script (`scripts/golden/mlx_prompt_cache.py`) puts at layer
    /// `l`, keys (`kv = 0`) or values (1), head `h`, position `p`, dimension `d`.
    fn golden_value(l: usize, kv: usize, h: usize, p: usize, d: usize) -> f32 {
        (l * 1000 + kv * 500 + h * 100 + p * 10 + d) as f32 / 8.0
    }

    fn check_golden(c: &MlxPromptCache, layers: usize, heads: usize, len: usize, dim: usize) {
        assert_eq!(c.layers.len(), layers);
        for (l, (k, v)) in c.layers.iter().enumerate() {
            for (kv, t) in [(0, k), (1, v)] {
                assert_eq!(t.dims(), &[1, heads, len, dim]);
                let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                let mut want = Vec::new();
                for h in 0..heads {
                    for p in 0..len {
                        for d in 0..dim {
                            want.push(golden_value(l, kv, h, p, d));
                        }
                    }
                }
                assert_eq!(got, want, "layer {l} kv {kv}");
            }
        }
    }

    /// A file written by mlx-lm 0.32.2's `save_prompt_cache` (2 layers of `KVCache`, 2 KV
    /// heads, 5 positions in a 256-position buffer, head dim 4, f16) reads back with its
    /// values and metadata; what we write from it reads back the same.
    #[test]
    fn reads_mlx_lm_files_and_writes_what_it_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scripts/golden/mlx_prompt_cache.safetensors");
        let c = load(&path, &Device::Cpu).expect("the golden file");
        check_golden(&c, 2, 2, 5, 4);
        assert_eq!(c.metadata.get("model").map(String::as_str), Some("golden"));
        assert_eq!(c.len(), 5);

        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.safetensors");
        let kv = c.to_kv_cache(2).unwrap();
        save(&ours, &kv, &c.metadata).unwrap();
        // For `scripts/golden/mlx_prompt_cache.py check`: a copy of ours where asked.
        if let Some(out) = std::env::var_os("POCKETLM_MLX_CACHE_OUT") {
            std::fs::copy(&ours, out).unwrap();
        }
        let back = load(&ours, &Device::Cpu).unwrap();
        check_golden(&back, 2, 2, 5, 4);
        assert_eq!(back.metadata, c.metadata);
        assert!(c.to_kv_cache(3).is_err());

        // Not an mlx-lm cache: a clear error naming the file.
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"junk").unwrap();
        let e = load(&junk, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("junk.safetensors"), "{e}");
    }
}
