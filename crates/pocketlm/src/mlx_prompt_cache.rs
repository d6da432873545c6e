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

use crate::chat_template::{ChatTemplate, Message};
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::loader::LoadedModel;
use crate::{Error, Result};

/// Writes `cache` (every layer holding the same positions, float keys and values) as mlx-lm's
/// `save_prompt_cache` would, with the user `metadata` (`0.{key}` entries). Keys and values are
/// written as f32 `[1, kv_heads, offset, head_dim]` (mlx-lm writes the model's dtype, in a
/// buffer of a multiple of 256 positions; its loader takes either). The file is written to a
/// temporary file beside `path` and renamed over it.
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
    // A temporary file beside `path`, renamed over it once complete: a reader never sees half
    // a cache, and a failed write leaves an older file in place.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let written = safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| {
        Error::io(
            path,
            std::io::Error::other(format!("writing the mlx-lm prompt cache: {e}")),
        )
    });
    if let Err(e) =
        written.and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)))
    {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
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

/// Whether `path` is an mlx-lm prompt cache rather than a pocketlm one: a safetensors file
/// whose metadata names layer 0's cache class (`1.0`) and has no pocketlm `format` entry. Only
/// the header is read.
///
/// Errors: [`Error::Io`] when the file cannot be read; [`Error::Model`] naming the file when it
/// is not a safetensors file.
pub fn is_mlx_prompt_cache(path: &Path) -> Result<bool> {
    use std::io::Read;
    let bad = |msg: &str| {
        Error::Model(format!(
            "{}: not a safetensors file ({msg})",
            path.display()
        ))
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("shorter than 8 bytes"))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(bad("header longer than 100 MB"));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|_| bad("the header is cut short"))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| bad("the header is not JSON"))?;
    let meta = header.get("__metadata__");
    let has = |k: &str| meta.and_then(|m| m.get(k)).is_some();
    Ok(has("1.0") && !has("format"))
}

/// Loads the mlx-lm prompt cache at `path` for `model` into a cache of kind `config` (growing,
/// rotating or quantized, as [`crate::models::CausalLM::make_cache`] makes it), holding the
/// file's positions.
///
/// Each layer `i`'s keys `{i}.0` and values `{i}.1` must be `[1, kv_heads, _, head_dim]` with
/// the model's `(kv_heads, head_dim)` of that layer
/// ([`crate::models::CausalLM::cache_shapes`]); they are read as f32.
///
/// Errors: as [`load`]; [`Error::Model`] naming the file when its layer count differs from
/// the model's or the model keeps an array state in a layer (mlx-lm's `ArraysCache` is not
/// read); [`Error::Tensor`] naming the tensor and the file for another shape.
pub fn load_for_model(path: &Path, model: &LoadedModel, config: &KvCacheConfig) -> Result<KvCache> {
    let file = load(path, model.model.device())?;
    let shapes = model.model.cache_shapes();
    if file.layers.len() != shapes.len() {
        return Err(Error::Model(format!(
            "{}: the mlx-lm prompt cache has {} layers, the model {}",
            path.display(),
            file.layers.len(),
            shapes.len()
        )));
    }
    let mut cache = model.model.make_cache(config)?;
    for (i, ((k, v), &(kv_heads, head_dim))) in file.layers.iter().zip(&shapes).enumerate() {
        for (j, t) in [(0, k), (1, v)] {
            let d = t.dims();
            if d[0] != 1 || d[1] != kv_heads || d[3] != head_dim {
                return Err(Error::tensor(
                    format!("{i}.{j}"),
                    format!(
                        "shape {d:?} in {}, the model's layer {i} needs [1, {kv_heads}, \
                         positions, {head_dim}] (batch, kv heads, positions, head dim)",
                        path.display()
                    ),
                ));
            }
        }
        let layer = cache.layer_for_pass(i)?;
        if layer.arrays_mut().is_some() {
            return Err(Error::Model(format!(
                "{}: layer {i} of the model keeps an array state; mlx-lm prompt caches are \
                 read for attention layers only",
                path.display()
            )));
        }
        layer.update(k, v)?;
    }
    Ok(cache)
}

/// The metadata mlx-lm 0.32's `cache_prompt` writes: `model` (the model as given on its
/// command line; `mlx_lm generate` refuses another `--model` string) and `tokenizer_config`
/// (JSON, `{"trust_remote_code": false}`), both of which `mlx_lm generate` reads.
pub fn cache_prompt_metadata(model_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("model".to_string(), model_name.to_string()),
        (
            "tokenizer_config".to_string(),
            r#"{"trust_remote_code": false}"#.to_string(),
        ),
    ])
}

/// The tag transformers appends to the final message to find where it ends
/// (`continue_final_message`, `transformers/utils/chat_template_utils.py`).
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// `[system?, user: content]` rendered by `tpl`.
fn render_turn(
    tpl: &ChatTemplate,
    system: Option<&str>,
    content: &str,
    add_generation_prompt: bool,
) -> Result<String> {
    let mut messages: Vec<Message> = system.map(Message::system).into_iter().collect();
    messages.push(Message::user(content));
    Ok(tpl.render(&messages, add_generation_prompt)?)
}

/// The token ids `mlx_lm cache_prompt --prompt PROMPT` feeds (mlx-lm 0.32 `cache_prompt.py`):
/// with the model's chat template (and `use_chat_template`), `[system?, user: prompt]` rendered
/// without a generation prompt and cut right after the prompt (transformers'
/// `continue_final_message=True`), encoded without special tokens; otherwise the prompt encoded
/// with them (BOS where the tokenizer adds one). mlx-lm has no system prompt here; `system` is
/// ours (the continuation rule below holds with it).
///
/// Errors: template errors; [`Error::InvalidArgument`] when the template drops the prompt's end.
pub fn cache_prompt_ids(
    model: &LoadedModel,
    system: Option<&str>,
    prompt: &str,
    use_chat_template: bool,
) -> Result<Vec<u32>> {
    let Some(tpl) = model.chat_template.as_ref().filter(|_| use_chat_template) else {
        return Ok(model.tokenizer.encode(prompt, true)?);
    };
    let text = render_turn(tpl, system, &format!("{prompt}{CONTINUE_TAG}"), false)?;
    let tag = CONTINUE_TAG.trim_end();
    let Some(at) = text.rfind(tag) else {
        return Err(Error::InvalidArgument(
            "the chat template drops the end of the prompt, so it cannot be continued".into(),
        ));
    };
    let text = if text[at..].starts_with(CONTINUE_TAG) {
        &text[..at]
    } else {
        text[..at].trim_end()
    };
    Ok(model.tokenizer.encode(text, false)?)
}

/// The token ids `mlx_lm generate --prompt-cache-file F --prompt PROMPT` feeds after the
/// cache (mlx-lm 0.32 `generate.py` `main`): with the model's chat template (and
/// `use_chat_template`), `[system?, user: prompt]` rendered with the generation prompt, from
/// where the prompt starts (found as `<query>` in the same render of `<query>`: the cached
/// prefix is everything before the user's text), encoded without special tokens; otherwise
/// the prompt encoded with special tokens (so a BOS is fed again where the tokenizer adds one,
/// as mlx-lm does).
///
/// Errors: template errors; [`Error::InvalidArgument`] when the template does not show the
/// user's text.
pub fn continuation_ids(
    model: &LoadedModel,
    system: Option<&str>,
    prompt: &str,
    use_chat_template: bool,
) -> Result<Vec<u32>> {
    let Some(tpl) = model.chat_template.as_ref().filter(|_| use_chat_template) else {
        return Ok(model.tokenizer.encode(prompt, true)?);
    };
    let text = render_turn(tpl, system, prompt, true)?;
    let at = render_turn(tpl, system, "<query>", true)?
        .find("<query>")
        .ok_or_else(|| {
            Error::InvalidArgument("the chat template does not show the user's message".into())
        })?;
    let rest = text.get(at..).ok_or_else(|| {
        Error::InvalidArgument("the chat template renders the prompt before the user's text".into())
    })?;
    Ok(model.tokenizer.encode(rest, false)?)
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
