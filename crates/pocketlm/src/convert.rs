//! `convert`: a GGUF file or a Hugging Face / MLX folder to an MLX-format folder
//! (config.json, safetensors with Hugging Face names, tokenizer files), optionally MLX affine
//! quantized, or back to float with `dequantize`.
//!
//! Follows mlx-lm's `mlx_lm/convert.py` + `utils.py` (`quantize_model`, `save_model`): every
//! 2-D `*.weight` whose last dimension is a multiple of the group size (the `Linear` and
//! `Embedding` layers) is quantized with `mx.quantize` semantics
//! ([`crate::quant::mlx_affine::quantize_tensor`], on the weight cast to the output dtype, so
//! scales and biases come out in that dtype), config.json gets
//! `"quantization": {"group_size", "bits"}` (also as `quantization_config`), and the weights
//! are written as `model.safetensors` or `model-0000i-of-0000n.safetensors` shards of at most
//! 5 GiB, with `model.safetensors.index.json`.
//!
//! GGUF sources are dequantized to f32 first and their Llama q/k projection rows are
//! un-permuted back to the Hugging Face layout (llama.cpp's `convert_hf_to_gguf.py`
//! `LlamaModel.permute` reorders them for its interleaved RoPE).
//!
//! The output is written into a temporary directory next to `out` and renamed at the end, so
//! `out` either does not exist or is complete.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::chat_template::ChatTemplate;
use crate::gguf::GgufFile;
use crate::loader::read_json;
use crate::models;
use crate::quant::mlx_affine::{dequantize_tensor, quantize_tensor};
use crate::safetensors_weights::{QuantParams, SafetensorsWeights, INDEX_FILE};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use crate::{Error, Result};

/// Largest shard written, in bytes (mlx-lm's `MAX_FILE_SIZE_GB = 5`).
pub const MAX_SHARD_BYTES: usize = 5 << 30;

/// Files copied from a Hugging Face source folder when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// What to convert to.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// MLX affine quantization of the `Linear` / `Embedding` weights.
    pub quantize: Option<QuantParams>,
    /// Float dtype of the written float tensors (F32, F16 or BF16). `None`: keep each tensor's
    /// dtype for a safetensors source, F16 for a GGUF source (mlx-lm's default).
    pub dtype: Option<DType>,
    /// Dequantize MLX quantized layers of the source to float (into the dtype of their scales,
    /// or `dtype`) instead of copying them.
    pub dequantize: bool,
    /// Largest shard in bytes; `None`: [`MAX_SHARD_BYTES`].
    pub max_shard_bytes: Option<usize>,
}

/// Progress of a conversion, for a progress bar.
#[derive(Debug, Clone)]
pub enum ConvertEvent {
    /// Conversion starts; `tensors` source tensors will be processed.
    Begin {
        /// Number of source tensors (a quantized layer counts once).
        tensors: usize,
    },
    /// Tensor `index` (0-based) of the source, by Hugging Face name, is done.
    Tensor {
        /// Position in the source order.
        index: usize,
        /// Hugging Face name.
        name: String,
    },
}

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    /// The output folder.
    pub out: PathBuf,
    /// Tensors written (weights, scales and biases counted separately).
    pub tensors_written: usize,
    /// Layers written MLX-quantized.
    pub quantized_layers: usize,
    /// Bytes of safetensors written.
    pub weight_bytes: u64,
}

/// Parses a dtype name as the CLI gives it: `f32`/`float32`, `f16`/`float16`,
/// `bf16`/`bfloat16`.
///
/// Errors: [`Error::InvalidArgument`] for other names.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(Error::InvalidArgument(format!(
            "unknown dtype `{s}` (expected f32, f16 or bf16)"
        ))),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Where the tensors come from.
enum Source {
    Gguf {
        file: GgufFile,
        /// Hugging Face name -> GGUF name.
        names: Vec<(String, String)>,
        n_heads: usize,
        n_kv_heads: usize,
    },
    Folder {
        weights: SafetensorsWeights,
        /// Layer prefixes that are MLX quantized, and the plain tensor names, in order.
        items: Vec<Item>,
    },
}

enum Item {
    Plain(String),
    Quantized(String),
}

/// Converts `src` (a `.gguf` file or a model folder) into an MLX-format folder `out`, which
/// must not exist. `progress` is called as tensors are done.
///
/// Errors: [`Error::InvalidArgument`] when `out` exists or `dtype` is not a float type;
/// everything loading `src` can return (unsupported architecture, malformed files, tensors);
/// [`Error::Io`] writing.
pub fn convert(
    src: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(ConvertEvent),
) -> Result<ConvertSummary> {
    if let Some(d) = opts.dtype {
        if !matches!(d, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::InvalidArgument(format!(
                "output dtype {d:?} is not f32, f16 or bf16"
            )));
        }
    }
    if out.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} already exists; give a new folder",
            out.display()
        )));
    }
    let meta = std::fs::metadata(src).map_err(|e| Error::io(src, e))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".pocketlm-convert-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;

    let (mut config, source) = if meta.is_dir() {
        open_folder(src)?
    } else {
        open_gguf(src)?
    };
    let default_dtype = match source {
        Source::Gguf { .. } => Some(DType::F16),
        Source::Folder { .. } => None,
    };
    let out_dtype = opts.dtype.or(default_dtype);

    let mut writer = ShardWriter::new(
        tmp.path().to_path_buf(),
        opts.max_shard_bytes.unwrap_or(MAX_SHARD_BYTES),
    );
    let mut quantized_layers = 0;
    let src_quant = match &source {
        Source::Folder { weights, .. } => weights.quant_config().cloned(),
        Source::Gguf { .. } => None,
    };
    let keep_source_quant = !opts.dequantize && opts.quantize.is_none();
    let total = match &source {
        Source::Gguf { names, .. } => names.len(),
        Source::Folder { items, .. } => items.len(),
    };
    progress(ConvertEvent::Begin { tensors: total });

    // Float tensors on their way out: cast, then maybe quantize.
    let emit_float = |name: &str, t: Tensor, w: &mut ShardWriter| -> Result<bool> {
        let t = match out_dtype {
            Some(d) => t.to_dtype(d)?,
            None => t,
        };
        if let Some(p) = opts.quantize {
            if let Some(prefix) = quantizable(name, &t, p.group_size) {
                let (qw, s, b) = quantize_tensor(&t, p.group_size, p.bits)
                    .map_err(|e| Error::tensor(name, e.to_string()))?;
                w.add(format!("{prefix}.weight"), qw)?;
                w.add(format!("{prefix}.scales"), s)?;
                w.add(format!("{prefix}.biases"), b)?;
                return Ok(true);
            }
        }
        w.add(name.to_string(), t)?;
        Ok(false)
    };

    match &source {
        Source::Gguf {
            file,
            names,
            n_heads,
            n_kv_heads,
        } => {
            for (i, (hf, g)) in names.iter().enumerate() {
                let (dims, _) = file.tensor_info(g)?;
                let mut t = file.tensor_f32(g, &dims, &Device::Cpu)?;
                if hf.ends_with("self_attn.q_proj.weight") {
                    t = unpermute(&t, *n_heads, hf)?;
                } else if hf.ends_with("self_attn.k_proj.weight") {
                    t = unpermute(&t, *n_kv_heads, hf)?;
                }
                quantized_layers += usize::from(emit_float(hf, t, &mut writer)?);
                progress(ConvertEvent::Tensor {
                    index: i,
                    name: hf.clone(),
                });
            }
        }
        Source::Folder { weights, items } => {
            for (i, item) in items.iter().enumerate() {
                let name = match item {
                    Item::Plain(name) => {
                        // F32 / F16 / BF16 only; other dtypes are an error naming the tensor.
                        let t = weights.float(name, None)?;
                        quantized_layers += usize::from(emit_float(name, t, &mut writer)?);
                        name.clone()
                    }
                    Item::Quantized(prefix) => {
                        let (wn, sn, bn) = (
                            format!("{prefix}.weight"),
                            format!("{prefix}.scales"),
                            format!("{prefix}.biases"),
                        );
                        if keep_source_quant {
                            for n in [&wn, &sn, &bn] {
                                writer.add(n.clone(), weights.raw(n, None)?)?;
                            }
                            quantized_layers += 1;
                        } else {
                            let p = src_quant
                                .as_ref()
                                .and_then(|q| q.for_layer(prefix))
                                .ok_or_else(|| {
                                    Error::tensor(
                                        &sn,
                                        "exists but config.json gives no quantization for the layer",
                                    )
                                })?;
                            let t = dequantize_tensor(
                                &weights.raw(&wn, None)?,
                                &weights.float(&sn, None)?,
                                &weights.float(&bn, None)?,
                                p.group_size,
                                p.bits,
                            )
                            .map_err(|e| Error::tensor(prefix, e.to_string()))?;
                            quantized_layers += usize::from(emit_float(&wn, t, &mut writer)?);
                        }
                        wn
                    }
                };
                progress(ConvertEvent::Tensor { index: i, name });
            }
        }
    }
    let (tensors_written, weight_bytes) = writer.finish()?;

    // config.json
    if let Some(obj) = config.as_object_mut() {
        obj.remove("quantization");
        obj.remove("quantization_config");
        obj.remove("rope_freq_factors");
        if let Some(p) = opts.quantize {
            let q = serde_json::json!({"group_size": p.group_size, "bits": p.bits});
            obj.insert("quantization".into(), q.clone());
            obj.insert("quantization_config".into(), q);
        } else if keep_source_quant {
            if let Some(q) = &src_quant {
                obj.insert("quantization".into(), q.to_json());
                obj.insert("quantization_config".into(), q.to_json());
            }
        }
        if let Some(d) = out_dtype {
            obj.insert("torch_dtype".into(), dtype_name(d).into());
        }
    }
    write_json(&tmp.path().join("config.json"), &config)?;

    match &source {
        Source::Folder { .. } => {
            for f in TOKENIZER_FILES {
                let p = src.join(f);
                if p.is_file() {
                    let dst = tmp.path().join(f);
                    std::fs::copy(&p, &dst).map_err(|e| Error::io(&dst, e))?;
                }
            }
        }
        Source::Gguf { file, .. } => write_gguf_tokenizer(file, &config, tmp.path())?,
    }

    open_permissions(tmp.path())?;
    let kept = tmp.keep();
    if let Err(e) = std::fs::rename(&kept, out) {
        let _ = std::fs::remove_dir_all(&kept);
        return Err(Error::io(out, e));
    }
    Ok(ConvertSummary {
        out: out.to_path_buf(),
        tensors_written,
        quantized_layers,
        weight_bytes,
    })
}

/// The layer prefix when `name` is a 2-D `*.weight` whose last dimension is a multiple of
/// `group_size` (mlx-lm quantizes exactly the `Linear` / `Embedding` layers; norms are 1-D).
fn quantizable<'a>(name: &'a str, t: &Tensor, group_size: usize) -> Option<&'a str> {
    let prefix = name.strip_suffix(".weight")?;
    let dims = t.dims();
    (dims.len() == 2 && dims[1].is_multiple_of(group_size)).then_some(prefix)
}

/// Undoes llama.cpp's q/k row permutation: `w: [n_head * head_dim, in]` stored as
/// `reshape(n_head, 2, head_dim / 2, in).swapaxes(1, 2)`; returns the Hugging Face order.
fn unpermute(w: &Tensor, n_head: usize, name: &str) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if n_head == 0 || !out.is_multiple_of(2 * n_head) {
        return Err(Error::tensor(
            name,
            format!("{out} rows cannot be split into {n_head} heads of even width"),
        ));
    }
    Ok(w.reshape((n_head, out / n_head / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn open_folder(src: &Path) -> Result<(serde_json::Value, Source)> {
    let config = read_json(&src.join("config.json"))?.ok_or_else(|| {
        Error::Model(format!(
            "{}: not a model folder (no config.json)",
            src.display()
        ))
    })?;
    let weights = SafetensorsWeights::open_folder(src, &config, Device::Cpu)?;
    let mut items = Vec::new();
    let names: Vec<String> = weights.names().map(str::to_string).collect();
    for n in &names {
        if let Some(prefix) = n.strip_suffix(".weight") {
            if weights.contains(&format!("{prefix}.scales")) {
                items.push(Item::Quantized(prefix.to_string()));
                continue;
            }
        }
        let is_param = ["scales", "biases"].iter().any(|s| {
            n.strip_suffix(s)
                .and_then(|p| p.strip_suffix('.'))
                .is_some_and(|p| weights.contains(&format!("{p}.scales")))
        });
        if !is_param {
            items.push(Item::Plain(n.clone()));
        }
    }
    Ok((config, Source::Folder { weights, items }))
}

/// GGUF tensor names for the Hugging Face names of [`crate::gguf::hf_to_gguf_name`].
const GGUF_LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The Hugging Face name of a GGUF tensor name (inverse of [`crate::gguf::hf_to_gguf_name`]).
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = GGUF_LAYER_NAMES.iter().find(|(g, _)| *g == module)?.1;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

fn open_gguf(src: &Path) -> Result<(serde_json::Value, Source)> {
    let file = GgufFile::open(src)?;
    let arch_name = file.architecture()?;
    let arch = models::by_gguf_architecture(&arch_name)?;
    if arch.model_types.first() != Some(&"llama") {
        return Err(Error::Model(format!(
            "{}: converting `{arch_name}` GGUF files is not supported (only llama)",
            src.display()
        )));
    }
    let mut config = (arch.config_from_gguf)(&file)?;
    if !config["rope_freq_factors"].is_null() {
        return Err(Error::Model(format!(
            "{}: `rope_freqs.weight` (Llama 3 RoPE scaling) has no config.json equivalent \
             here; converting this file is not supported",
            src.display()
        )));
    }
    let mut names = Vec::new();
    let mut gnames: Vec<&str> = file.tensor_names().collect();
    gnames.sort_by_key(|n| sort_key(n));
    for g in gnames {
        if g == "rope_freqs.weight" {
            continue;
        }
        let hf = gguf_to_hf_name(g).ok_or_else(|| {
            Error::tensor(
                g,
                format!("has no Hugging Face name (in {})", src.display()),
            )
        })?;
        names.push((hf, g.to_string()));
    }
    let n_heads = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let n_kv_heads = config["num_key_value_heads"]
        .as_u64()
        .unwrap_or(n_heads as u64) as usize;
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        obj.insert("model_type".into(), "llama".into());
        if obj.get("rope_scaling").is_some_and(|v| v.is_null()) {
            obj.remove("rope_scaling");
        }
        if obj.get("sliding_window").is_some_and(|v| v.is_null()) {
            obj.remove("sliding_window");
        }
    }
    Ok((
        config,
        Source::Gguf {
            file,
            names,
            n_heads,
            n_kv_heads,
        },
    ))
}

/// Orders GGUF names as `save_pretrained` would list them: by layer number, then name.
fn sort_key(name: &str) -> (usize, String) {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, _)| l.parse::<usize>().ok())
        .map_or(0, |l| l + 1);
    (layer, name.to_string())
}

/// Writes tokenizer.json (the GGUF vocabulary as a Hugging Face tokenizer),
/// tokenizer_config.json (BOS/EOS/UNK/PAD tokens, `add_bos_token` / `add_eos_token`, the chat
/// template) and generation_config.json (BOS/EOS ids), and adds `bos_token_id` /
/// `eos_token_id` to nothing else.
fn write_gguf_tokenizer(file: &GgufFile, config: &serde_json::Value, dir: &Path) -> Result<()> {
    let tok = Tokenizer::from_gguf_metadata(file.metadata())?;
    let p = dir.join("tokenizer.json");
    tok.inner()
        .save(&p, false)
        .map_err(|e| Error::Model(format!("{}: writing the tokenizer: {e}", p.display())))?;
    let name = |id: Option<u32>| id.and_then(|id| tok.id_to_token(id));
    let mut tc = serde_json::Map::new();
    tc.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    tc.insert("add_bos_token".into(), tok.add_bos().into());
    tc.insert("add_eos_token".into(), tok.add_eos().into());
    for (key, id) in [
        ("bos_token", tok.bos_token_id()),
        ("eos_token", tok.eos_token_id()),
        ("unk_token", tok.unk_token_id()),
        ("pad_token", tok.pad_token_id()),
    ] {
        if let Some(t) = name(id) {
            tc.insert(key.into(), t.into());
        }
    }
    if let Some(n) = config["max_position_embeddings"].as_u64() {
        tc.insert("model_max_length".into(), n.into());
    }
    if let Some(src) = file.opt_str("tokenizer.chat_template")? {
        // Compile it once so that a broken template fails here, not in the user's chat.
        ChatTemplate::new(
            &src,
            tok.bos_token().unwrap_or(""),
            tok.eos_token().unwrap_or(""),
        )?;
        tc.insert("chat_template".into(), src.into());
    }
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::Value::Object(tc),
    )?;
    let mut gc = serde_json::Map::new();
    if let Some(b) = tok.bos_token_id() {
        gc.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = tok.eos_token_id() {
        gc.insert("eos_token_id".into(), e.into());
    }
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::Value::Object(gc),
    )
}

/// Gives the output the usual permissions (the temporary directory and candle's safetensors
/// writer create owner-only entries): folder 0755, files 0644, on Unix.
fn open_permissions(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(p, e))
        };
        set(dir, 0o755)?;
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let p = e.map_err(|e| Error::io(dir, e))?.path();
            set(&p, 0o644)?;
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Accumulates tensors into shards of at most `max_bytes` (a larger single tensor gets a shard
/// of its own).
struct ShardWriter {
    dir: PathBuf,
    max_bytes: usize,
    current: HashMap<String, Tensor>,
    current_bytes: usize,
    /// Per shard written: the names it holds.
    shards: Vec<Vec<String>>,
    total_bytes: u64,
    count: usize,
}

impl ShardWriter {
    fn new(dir: PathBuf, max_bytes: usize) -> Self {
        Self {
            dir,
            max_bytes,
            current: HashMap::new(),
            current_bytes: 0,
            shards: Vec::new(),
            total_bytes: 0,
            count: 0,
        }
    }

    fn add(&mut self, name: String, t: Tensor) -> Result<()> {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if self.current_bytes + bytes > self.max_bytes && !self.current.is_empty() {
            self.flush()?;
        }
        self.current_bytes += bytes;
        self.total_bytes += bytes as u64;
        self.count += 1;
        self.current.insert(name, t);
        Ok(())
    }

    fn shard_tmp_name(i: usize) -> String {
        format!("shard-{i}.safetensors")
    }

    fn flush(&mut self) -> Result<()> {
        let p = self.dir.join(Self::shard_tmp_name(self.shards.len()));
        candle_core::safetensors::save(&self.current, &p)
            .map_err(|e| Error::Model(format!("{}: writing safetensors: {e}", p.display())))?;
        let mut names: Vec<String> = self.current.drain().map(|(k, _)| k).collect();
        names.sort();
        self.shards.push(names);
        self.current_bytes = 0;
        Ok(())
    }

    /// Writes the last shard, names the shards as mlx-lm does and writes the index.
    /// Returns (tensors written, bytes of tensor data).
    fn finish(mut self) -> Result<(usize, u64)> {
        if !self.current.is_empty() || self.shards.is_empty() {
            self.flush()?;
        }
        let n = self.shards.len();
        let mut weight_map = BTreeMap::new();
        for (i, names) in self.shards.iter().enumerate() {
            let final_name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            };
            let from = self.dir.join(Self::shard_tmp_name(i));
            let to = self.dir.join(&final_name);
            std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
            for name in names {
                weight_map.insert(name.clone(), final_name.clone());
            }
        }
        let index = serde_json::json!({
            "metadata": {"total_size": self.total_bytes},
            "weight_map": weight_map,
        });
        write_json(&self.dir.join(INDEX_FILE), &index)?;
        Ok((self.count, self.total_bytes))
    }
}
