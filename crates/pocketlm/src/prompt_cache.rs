//! Prompt caches: the KV cache of a prompt prefix (a system prompt, a document) saved to a
//! safetensors file, so that later runs skip its prefill (mlx-lm `cache_prompt` /
//! `--prompt-cache-file`, `save_prompt_cache` / `load_prompt_cache`).
//!
//! File layout: tensors `layers.{i}.keys` and `layers.{i}.values`
//! (`[batch, kv_heads, tokens, head_dim]`, the model's cache dtype, f32 here) for every layer
//! `i` that holds keys and values; for a layer that holds an array state instead (an
//! [`ArraysCache`](crate::kv_cache::ArraysCache): LFM2's convolution layers), its arrays
//! `layers.{i}.arrays.{j}` as the layer keeps them (LFM2: `[batch, L_cache - 1, hidden]`), which
//! summarize all the tokens; and string metadata:
//! - `format` = `pocketlm.prompt_cache`, `format_version` = `1`;
//! - `model.path` (absolute), `model.size` (bytes), `model.architecture`: the identity of the
//!   model that computed the cache; loading with another model is refused;
//! - `token_ids`: the cached prompt's token ids as a JSON array (one per position).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::kv_cache::{ArraysCache, KvCache, KvCacheConfig, LayerKvCache};
use crate::loader::LoadedModel;
use crate::models::Logits;
use crate::{Error, Result};

const FORMAT: &str = "pocketlm.prompt_cache";
const FORMAT_VERSION: &str = "1";

/// What identifies the model a cache belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIdentity {
    /// Absolute path of the model file.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// The architecture (`model_type`).
    pub architecture: String,
}

impl ModelIdentity {
    /// The identity of a loaded model (its file is read for its size).
    ///
    /// Errors: [`Error::Io`] when the model file cannot be read.
    pub fn of(model: &LoadedModel) -> Result<Self> {
        let path = std::fs::canonicalize(&model.path).map_err(|e| Error::io(&model.path, e))?;
        let size = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        Ok(Self {
            path: path.display().to_string(),
            size,
            architecture: model.model.info().architecture.clone(),
        })
    }
}

/// Runs `token_ids` through the model into a fresh cache of kind `config` (prefill in chunks
/// of `chunk` tokens) and returns it.
///
/// Errors: [`Error::InvalidArgument`] for an empty prompt or one outside the vocabulary;
/// [`Error::ContextOverflow`] when it does not fit in the model's context; model errors.
pub fn prefill(
    model: &LoadedModel,
    token_ids: &[u32],
    config: &KvCacheConfig,
    chunk: usize,
) -> Result<KvCache> {
    let info = model.model.info();
    if token_ids.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt to cache is empty".into(),
        ));
    }
    if token_ids.len() >= info.context_length {
        return Err(Error::ContextOverflow {
            prompt_tokens: token_ids.len(),
            context_length: info.context_length,
            max_tokens: 0,
        });
    }
    if let Some(bad) = token_ids.iter().find(|&&t| t as usize >= info.vocab_size) {
        return Err(Error::InvalidArgument(format!(
            "token id {bad} is outside the vocabulary ({})",
            info.vocab_size
        )));
    }
    let mut cache = model.model.make_cache(config)?;
    for part in token_ids.chunks(chunk.max(1)) {
        let ids = Tensor::new(part, model.model.device())?.unsqueeze(0)?;
        model.model.forward(&ids, &mut cache, Logits::Last)?;
    }
    Ok(cache)
}

/// Saves `cache` (holding the keys/values of `token_ids`, computed by `model`) to `path`.
///
/// Errors: [`Error::InvalidArgument`] when the cache does not hold exactly `token_ids.len()`
/// positions (e.g. a rotating cache that dropped some); [`Error::Io`] on write failure.
pub fn save(
    path: impl AsRef<Path>,
    model: &LoadedModel,
    cache: &KvCache,
    token_ids: &[u32],
) -> Result<()> {
    save_with_identity(path, &ModelIdentity::of(model)?, cache, token_ids)
}

/// [`save`] with an explicit model identity.
pub fn save_with_identity(
    path: impl AsRef<Path>,
    identity: &ModelIdentity,
    cache: &KvCache,
    token_ids: &[u32],
) -> Result<()> {
    let path = path.as_ref();
    if cache.offset() != token_ids.len() {
        return Err(Error::InvalidArgument(format!(
            "the KV cache holds {} positions but {} token ids were given",
            cache.offset(),
            token_ids.len()
        )));
    }
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * cache.n_layers());
    for i in 0..cache.n_layers() {
        if let Some(a) = cache.layer_ref(i).and_then(|l| l.arrays()) {
            save_arrays(i, a, token_ids.len(), &mut tensors)?;
            continue;
        }
        let Some((k, v)) = cache.layer_state(i)? else {
            return Err(Error::InvalidArgument(format!(
                "layer {i} of the KV cache is empty"
            )));
        };
        if k.dim(2)? != token_ids.len() {
            return Err(Error::InvalidArgument(format!(
                "layer {i} of the KV cache holds {} of its {} positions (a rotating cache that \
                 dropped positions cannot be saved)",
                k.dim(2)?,
                token_ids.len()
            )));
        }
        tensors.push((format!("layers.{i}.keys"), k.contiguous()?));
        tensors.push((format!("layers.{i}.values"), v.contiguous()?));
    }
    let ids = serde_json::to_string(token_ids)
        .map_err(|e| Error::InvalidArgument(format!("token ids: {e}")))?;
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("format_version", FORMAT_VERSION.to_string()),
        ("model.path", identity.path.clone()),
        ("model.size", identity.size.to_string()),
        ("model.architecture", identity.architecture.clone()),
        ("n_layers", cache.n_layers().to_string()),
        ("token_ids", ids),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::serialize_to_file(tensors, Some(meta), path).map_err(|e| {
        Error::io(
            path,
            std::io::Error::other(format!("writing the prompt cache: {e}")),
        )
    })
}

/// Appends the arrays of layer `i`'s array state `a` (which must summarize `n` tokens, every
/// array set) to `tensors` as `layers.{i}.arrays.{j}`.
fn save_arrays(
    i: usize,
    a: &ArraysCache,
    n: usize,
    tensors: &mut Vec<(String, Tensor)>,
) -> Result<()> {
    if a.offset() != n {
        return Err(Error::InvalidArgument(format!(
            "layer {i} of the cache (an ArraysCache) summarizes {} positions, not the {n} tokens",
            a.offset()
        )));
    }
    for j in 0..a.size() {
        let t = a.get(j).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "array {j} of layer {i} of the cache (an ArraysCache) is empty"
            ))
        })?;
        tensors.push((format!("layers.{i}.arrays.{j}"), t.contiguous()?));
    }
    Ok(())
}

/// A prompt cache read back from a file.
#[derive(Debug)]
pub struct LoadedPromptCache {
    /// The cache, holding `token_ids.len()` positions.
    pub cache: KvCache,
    /// The cached prompt's token ids.
    pub token_ids: Vec<u32>,
    /// The file it came from.
    pub path: PathBuf,
}

/// Loads a prompt cache saved by [`save`] for `model` into a cache of kind `config`.
///
/// Errors: [`Error::Io`] when the file cannot be read; [`Error::Model`] naming the file and the
/// field when it is not a prompt cache, when it was made by another model (path, size or
/// architecture differ) or for another layer count; [`Error::Tensor`] for a missing or
/// misshapen tensor.
pub fn load(
    path: impl AsRef<Path>,
    model: &LoadedModel,
    config: &KvCacheConfig,
) -> Result<LoadedPromptCache> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Model(format!("{}: {msg}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |k: &str| -> Result<&str> {
        meta.get(k)
            .map(String::as_str)
            .ok_or_else(|| bad(format!("not a pocketlm prompt cache (no `{k}` metadata)")))
    };
    if field("format")? != FORMAT {
        return Err(bad(format!(
            "not a pocketlm prompt cache (`format` is `{}`)",
            field("format")?
        )));
    }
    if field("format_version")? != FORMAT_VERSION {
        return Err(bad(format!(
            "prompt cache format version {} is not supported (expected {FORMAT_VERSION})",
            field("format_version")?
        )));
    }
    let me = ModelIdentity::of(model)?;
    let size: u64 = field("model.size")?
        .parse()
        .map_err(|_| bad("`model.size` is not a number".into()))?;
    let theirs = ModelIdentity {
        path: field("model.path")?.to_string(),
        size,
        architecture: field("model.architecture")?.to_string(),
    };
    for (name, a, b) in [
        ("model.path", theirs.path.clone(), me.path.clone()),
        ("model.size", theirs.size.to_string(), me.size.to_string()),
        (
            "model.architecture",
            theirs.architecture.clone(),
            me.architecture.clone(),
        ),
    ] {
        if a != b {
            return Err(bad(format!(
                "the prompt cache was made by another model (`{name}` is `{a}`, the loaded model's is `{b}`)"
            )));
        }
    }
    let token_ids: Vec<u32> = serde_json::from_str(field("token_ids")?)
        .map_err(|e| bad(format!("`token_ids` is not a list of token ids ({e})")))?;
    let n_layers: usize = field("n_layers")?
        .parse()
        .map_err(|_| bad("`n_layers` is not a number".into()))?;
    let shapes = model.model.cache_shapes();
    if n_layers != shapes.len() {
        return Err(bad(format!(
            "the prompt cache has {n_layers} layers, the model {}",
            shapes.len()
        )));
    }
    if token_ids.is_empty() {
        return Err(bad("the prompt cache holds no tokens".into()));
    }
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, model.model.device())
        .map_err(|e| bad(format!("reading tensors: {e}")))?;
    let mut cache = model.model.make_cache(config)?;
    for (i, &(kv_heads, head_dim)) in shapes.iter().enumerate() {
        let layer = cache.layer_for_pass(i)?;
        if let Some(a) = layer.arrays_mut() {
            let arrays = (0..a.size())
                .map(|j| {
                    let name = format!("layers.{i}.arrays.{j}");
                    tensors.remove(&name).ok_or_else(|| {
                        Error::tensor(
                            &name,
                            format!(
                                "missing in {} (layer {i} of the model keeps an array state, an \
                                 ArraysCache)",
                                path.display()
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            a.restore(arrays, token_ids.len())?;
            continue;
        }
        let want = [1, kv_heads, token_ids.len(), head_dim];
        let mut get = |kind: &str| -> Result<Tensor> {
            let name = format!("layers.{i}.{kind}");
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::tensor(&name, format!("missing in {}", path.display())))?;
            if t.dims() != want {
                return Err(Error::tensor(
                    &name,
                    format!(
                        "shape {:?} in {}, expected {want:?} (batch, kv heads, tokens, head dim)",
                        t.dims(),
                        path.display()
                    ),
                ));
            }
            Ok(t)
        };
        let (k, v) = (get("keys")?, get("values")?);
        layer.update(&k, &v)?;
    }
    Ok(LoadedPromptCache {
        cache,
        token_ids,
        path: path.to_path_buf(),
    })
}

/// Cuts `cache` (holding `cached_ids`) back to the longest prefix it shares with `ids`, at most
/// `ids.len() - 1` so that at least one token remains to prefill, and returns that length:
/// prefill `ids[returned..]` next. When the cache cannot be cut there (a rotating cache that
/// dropped those positions) or nothing is shared, the cache is emptied and 0 returned.
pub fn reuse_prefix(cache: &mut KvCache, cached_ids: &[u32], ids: &[u32]) -> usize {
    let held = cache.offset().min(cached_ids.len());
    let mut common = common_prefix_len(&cached_ids[..held], ids).min(ids.len().saturating_sub(1));
    if common < cache.offset() && cache.truncate(common).is_err() {
        common = 0;
    }
    if common == 0 {
        cache.reset();
    }
    common
}

/// Length of the longest common prefix of `a` and `b` (token ids).
pub fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
