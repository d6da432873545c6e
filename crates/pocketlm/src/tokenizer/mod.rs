//! Tokenizers: from `tokenizer.json` (Hugging Face `tokenizers`) or built from GGUF metadata.
//!
//! [`Tokenizer`] wraps a [`tokenizers::Tokenizer`] and adds what generation needs: the BOS/EOS
//! tokens and whether the model wants them added, and the set of end-of-generation ids.
//! - [`Tokenizer::from_gguf_metadata`] (in [`gguf`]) rebuilds the tokenizer a GGUF file describes
//!   under `tokenizer.ggml.*`, as llama.cpp (`src/llama-vocab.cpp`) and transformers
//!   (`integrations/gguf`) read those keys.
//! - [`Tokenizer::from_files`] loads a Hugging Face folder's `tokenizer.json` and
//!   `tokenizer_config.json`.
//! - [`StreamDecoder`] (in [`stream`]) turns generated ids into text chunks that never split a
//!   UTF-8 character.

pub mod gguf;
pub mod stream;
#[cfg(test)]
pub(crate) mod test_util;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use stream::StreamDecoder;

/// Errors building or using a tokenizer. Messages name the GGUF field or the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Any tokenizer failure, with context.
    #[error("tokenizer: {0}")]
    Other(String),
    /// A required GGUF metadata field is absent.
    #[error("GGUF metadata: missing field `{field}`")]
    MissingField {
        /// The metadata key, e.g. `tokenizer.ggml.tokens`.
        field: String,
    },
    /// A GGUF metadata field has the wrong type or a value that contradicts the rest.
    #[error("GGUF metadata: field `{field}`: {msg}")]
    InvalidField {
        /// The metadata key, e.g. `tokenizer.ggml.bos_token_id`.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer family that is not implemented.
    #[error("GGUF metadata: field `tokenizer.ggml.model` = `{model}` is not supported; supported: {supported}")]
    UnsupportedModel {
        /// The value found.
        model: String,
        /// Comma-separated list of supported values.
        supported: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer that is not implemented.
    #[error("GGUF metadata: field `tokenizer.ggml.pre` = `{pre}` is not supported; supported: {supported}")]
    UnsupportedPreTokenizer {
        /// The value found.
        pre: String,
        /// Comma-separated list of supported values.
        supported: String,
    },
    /// A tokenizer file could not be read or is malformed.
    #[error("{}: {msg}", path.display())]
    File {
        /// The file involved (`tokenizer.json` or `tokenizer_config.json`).
        path: PathBuf,
        /// What went wrong, naming the field when one is at fault.
        msg: String,
    },
    /// A token id given to [`Tokenizer::decode`] is not in the vocabulary.
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    UnknownTokenId {
        /// The offending id.
        id: u32,
        /// The tokenizer's vocabulary size, added tokens included.
        vocab_size: usize,
    },
    /// The underlying `tokenizers` library failed to encode.
    #[error("tokenizer: encoding failed: {0}")]
    Encode(String),
    /// The underlying `tokenizers` library failed to decode.
    #[error("tokenizer: decoding failed: {0}")]
    Decode(String),
}

/// Token texts that llama.cpp treats as end of generation whenever they are in the vocabulary
/// (`llama_vocab::impl::load`, the `special_eog_ids` loop in `src/llama-vocab.cpp`).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Fill-in-the-middle pad / repo / file-separator tokens: llama.cpp detects one of each by text
/// and adds it to the end-of-generation set (`special_fim_pad_id`, `special_fim_rep_id`,
/// `special_fim_sep_id` in `src/llama-vocab.cpp`).
const FIM_EOG_TEXTS: &[&[&str]] = &[
    &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ],
    &["<|file_sep|>"],
];

/// How `add_special_tokens = true` is honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpecialsMode {
    /// BOS/EOS are added here, from `add_bos`/`add_eos` (GGUF, or a `tokenizer_config.json` that
    /// sets the flags, as transformers' `update_post_processor` does).
    Manual,
    /// The `tokenizer.json` post-processor adds them.
    PostProcessor,
}

/// A text tokenizer plus the special-token facts generation needs.
///
/// Ids are `u32` indices into the model's embedding matrix (`[vocab_size, hidden]`).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    unk_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eog_token_ids: BTreeSet<u32>,
    add_bos: bool,
    add_eos: bool,
    specials: SpecialsMode,
    /// The grammar environment built from this vocabulary, built on the first constrained
    /// generation (the constrained-decoding module's `GrammarEnv::for_tokenizer`); clones share it.
    grammar_env: GrammarEnvSlot,
}

/// Where a [`Tokenizer`] caches its grammar environment (the constrained-decoding module's
/// `GrammarEnv`, kept opaque here so that the tokenizer does not depend on it).
pub(crate) type GrammarEnvSlot = Arc<Mutex<Option<Arc<dyn std::any::Any + Send + Sync>>>>;

/// The parts a constructor has gathered before [`Tokenizer::assemble`] checks them.
#[derive(Debug, Default)]
struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    /// Extra ids llama.cpp adds to the end-of-generation set (`eot_token_id`, `eom_token_id`).
    extra_eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl Tokenizer {
    fn assemble(
        inner: tokenizers::Tokenizer,
        s: Specials,
        specials: SpecialsMode,
    ) -> Result<Self, TokenizerError> {
        let name = |id: Option<u32>| id.and_then(|id| inner.id_to_token(id));
        let bos_token = name(s.bos);
        let eos_token = name(s.eos);
        let eog_token_ids = eog_ids(&inner, s.eos, &s.extra_eog);
        Ok(Self {
            bos_token,
            eos_token,
            eog_token_ids,
            bos_token_id: s.bos,
            eos_token_id: s.eos,
            unk_token_id: s.unk,
            pad_token_id: s.pad,
            add_bos: s.add_bos,
            add_eos: s.add_eos,
            specials,
            inner,
            grammar_env: GrammarEnvSlot::default(),
        })
    }

    /// Loads a Hugging Face tokenizer folder's files.
    ///
    /// `tokenizer_json` is `tokenizer.json`; `tokenizer_config_json` is the optional
    /// `tokenizer_config.json`, from which `bos_token`, `eos_token`, `unk_token`, `pad_token`
    /// (a string or an `{"content": ...}` object) and `add_bos_token` / `add_eos_token` are read.
    /// As in transformers' `TokenizersBackend`: when the config sets `add_bos_token` or
    /// `add_eos_token`, or `tokenizer.json` has no post-processor, BOS/EOS are added from those
    /// flags (default `false`); otherwise the `tokenizer.json` post-processor decides, and
    /// [`Tokenizer::add_bos`] / [`Tokenizer::add_eos`] report what it does.
    ///
    /// Errors: [`TokenizerError::File`] naming the file (and field) that cannot be read, parsed,
    /// or names a token absent from the vocabulary.
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config_json: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        let file_err = |path: &Path, msg: String| TokenizerError::File {
            path: path.to_path_buf(),
            msg,
        };
        let bytes =
            std::fs::read(tokenizer_json).map_err(|e| file_err(tokenizer_json, e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| file_err(tokenizer_json, format!("not a valid tokenizer.json: {e}")))?;

        let config = match tokenizer_config_json {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| file_err(path, e.to_string()))?;
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| file_err(path, format!("not valid JSON: {e}")))?;
                if !value.is_object() {
                    return Err(file_err(path, "expected a JSON object".into()));
                }
                Some((path, value))
            }
            None => None,
        };

        // Token fields: a string or an AddedToken-like object with `content`; null means none.
        let token_field = |key: &str| -> Result<Option<u32>, TokenizerError> {
            let Some((path, cfg)) = &config else {
                return Ok(None);
            };
            let content = match cfg.get(key) {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => s.as_str(),
                Some(serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => s.as_str(),
                    _ => {
                        return Err(file_err(
                            path,
                            format!("field `{key}`: object without a string `content`"),
                        ))
                    }
                },
                Some(other) => {
                    return Err(file_err(
                        path,
                        format!("field `{key}`: expected a string, found {other}"),
                    ))
                }
            };
            inner.token_to_id(content).map(Some).ok_or_else(|| {
                file_err(
                    path,
                    format!("field `{key}`: token `{content}` is not in the vocabulary"),
                )
            })
        };
        let mut bos = token_field("bos_token")?;
        let mut eos = token_field("eos_token")?;
        let unk = token_field("unk_token")?;
        let pad = token_field("pad_token")?;

        let bool_field = |key: &str| -> Result<Option<bool>, TokenizerError> {
            let Some((path, cfg)) = &config else {
                return Ok(None);
            };
            match cfg.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(file_err(
                    path,
                    format!("field `{key}`: expected a boolean, found {other}"),
                )),
            }
        };
        let cfg_add_bos = bool_field("add_bos_token")?;
        let cfg_add_eos = bool_field("add_eos_token")?;

        let mode = if cfg_add_bos.is_some()
            || cfg_add_eos.is_some()
            || inner.get_post_processor().is_none()
        {
            SpecialsMode::Manual
        } else {
            SpecialsMode::PostProcessor
        };

        let (add_bos, add_eos) = match mode {
            SpecialsMode::Manual => {
                inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
                (cfg_add_bos.unwrap_or(false), cfg_add_eos.unwrap_or(false))
            }
            SpecialsMode::PostProcessor => {
                // Probe what the post-processor adds around a one-token text.
                let probe = |add: bool| {
                    inner
                        .encode_fast("a", add)
                        .map(|e| e.get_ids().to_vec())
                        .map_err(|e| file_err(tokenizer_json, format!("probe encode failed: {e}")))
                };
                let plain = probe(false)?;
                let with = probe(true)?;
                // Where the plain ids sit inside the post-processed ones.
                let at = (0..=with.len().saturating_sub(plain.len()))
                    .find(|&k| with[k..].starts_with(&plain))
                    .ok_or_else(|| {
                        file_err(
                            tokenizer_json,
                            format!("post-processor changed the ids: {plain:?} -> {with:?}"),
                        )
                    })?;
                let front = (at > 0).then(|| with[0]);
                let back = (with.len() > at + plain.len()).then(|| with[with.len() - 1]);
                // Without a configured token, the one the post-processor adds is taken.
                bos = bos.or(front);
                eos = eos.or(back);
                (
                    front.is_some() && front == bos,
                    back.is_some() && back == eos,
                )
            }
        };
        if add_bos && bos.is_none() && mode == SpecialsMode::Manual {
            let path = config.as_ref().map_or(tokenizer_json, |(p, _)| p);
            return Err(file_err(
                path,
                "field `add_bos_token` is true but no `bos_token` is set".into(),
            ));
        }
        if add_eos && eos.is_none() && mode == SpecialsMode::Manual {
            let path = config.as_ref().map_or(tokenizer_json, |(p, _)| p);
            return Err(file_err(
                path,
                "field `add_eos_token` is true but no `eos_token` is set".into(),
            ));
        }
        Self::assemble(
            inner,
            Specials {
                bos,
                eos,
                unk,
                pad,
                extra_eog: Vec::new(),
                add_bos,
                add_eos,
            },
            mode,
        )
    }

    /// Text -> token ids.
    ///
    /// Special and user-defined tokens written in the text (e.g. `<|im_start|>`) are always
    /// matched as single tokens, as transformers does and llama.cpp does with
    /// `parse_special = true`. With `add_special_tokens`, BOS/EOS are added as the model defines
    /// ([`Tokenizer::add_bos`], [`Tokenizer::add_eos`]).
    ///
    /// Errors: [`TokenizerError::Encode`] if the underlying tokenizer fails.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let post = add_special_tokens && self.specials == SpecialsMode::PostProcessor;
        let encoding = self
            .inner
            .encode_fast(text, post)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = encoding.get_ids();
        if !(add_special_tokens && self.specials == SpecialsMode::Manual) {
            return Ok(ids.to_vec());
        }
        let mut out = Vec::with_capacity(ids.len() + 2);
        if let (true, Some(bos)) = (self.add_bos, self.bos_token_id) {
            out.push(bos);
        }
        out.extend_from_slice(ids);
        if let (true, Some(eos)) = (self.add_eos, self.eos_token_id) {
            out.push(eos);
        }
        Ok(out)
    }

    /// Token ids -> text. With `skip_special_tokens`, special (control) tokens such as
    /// `<|im_end|>` are left out; user-defined added tokens are kept, as in transformers.
    ///
    /// Incomplete UTF-8 sequences (e.g. half of an emoji's bytes) decode to U+FFFD; use
    /// [`StreamDecoder`] for incremental output.
    ///
    /// Errors: [`TokenizerError::UnknownTokenId`] for an id outside the vocabulary,
    /// [`TokenizerError::Decode`] if the underlying decoder fails.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size(),
            });
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// A [`StreamDecoder`] borrowing this tokenizer.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder<&Tokenizer> {
        StreamDecoder::new(self, skip_special_tokens)
    }

    /// Number of token ids, added tokens included (may be smaller than the model's embedding
    /// rows, which some models pad).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The vocabulary entry of `id`, as stored (byte-level BPE spells a space `Ġ`, SentencePiece
    /// `▁`); `None` if out of range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry spelled as stored; `None` if absent.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Beginning-of-sequence id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// End-of-sequence id, if the model has one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// Unknown-token id, if the model has one.
    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk_token_id
    }

    /// Padding id, if the model has one.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// The BOS token's text (e.g. `<|im_start|>`, `<s>`), for chat templates' `bos_token`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token's text (e.g. `<|im_end|>`), for chat templates' `eos_token`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Whether `encode(_, true)` starts with the BOS token.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(_, true)` ends with the EOS token.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Ids that end generation: EOS plus the tokens llama.cpp treats as end of generation when
    /// present in the vocabulary (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `<end_of_turn>`,
    /// ... and one fill-in-the-middle pad/repo/file-separator token each), following
    /// `special_eog_ids` in llama.cpp `src/llama-vocab.cpp`.
    pub fn eog_token_ids(&self) -> &BTreeSet<u32> {
        &self.eog_token_ids
    }

    /// Whether `id` ends generation (see [`Tokenizer::eog_token_ids`]).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog_token_ids.contains(&id)
    }

    /// Adds ids to the end-of-generation set ([`Tokenizer::eog_token_ids`]), e.g. a model
    /// folder's `generation_config.json` `eos_token_id` list (transformers stops on any of
    /// them; mlx-lm's `TokenizerWrapper.eos_token_ids` likewise). Ids already present are
    /// ignored; nothing else (EOS, encoding) changes.
    ///
    /// Errors: [`TokenizerError::Other`] naming the first id that is not below
    /// [`Tokenizer::vocab_size`]; the set is then left unchanged.
    pub fn add_eog_token_ids(
        &mut self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<(), TokenizerError> {
        let ids: Vec<u32> = ids.into_iter().collect();
        let vocab = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TokenizerError::Other(format!(
                "end-of-generation id {bad} is outside the vocabulary ({vocab} tokens)"
            )));
        }
        self.eog_token_ids.extend(ids);
        // The grammar environment's EOS set came from the old set.
        self.grammar_env = GrammarEnvSlot::default();
        Ok(())
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The cache slot of the constrained-decoding module's `GrammarEnv::for_tokenizer`.
    pub(crate) fn grammar_env_slot(&self) -> &Mutex<Option<Arc<dyn std::any::Any + Send + Sync>>> {
        &self.grammar_env
    }
}

/// The end-of-generation set, as llama.cpp builds `special_eog_ids`: FIM pad/repo/sep tokens
/// (the lowest id matching each list, where llama.cpp takes whichever its hash map yields
/// first), every token whose text is in [`EOG_TEXTS`], EOS, and the `eot`/`eom` ids; then its
/// two workarounds: `<|end|>` is dropped when `<|return|>` and `<|call|>` (or `<|calls|>` and
/// `<|flush|>`) are present, and `</s>` when `<|tool_response>` is present.
fn eog_ids(inner: &tokenizers::Tokenizer, eos: Option<u32>, extra: &[u32]) -> BTreeSet<u32> {
    let id = |t: &str| inner.token_to_id(t);
    let mut set = BTreeSet::new();
    for list in FIM_EOG_TEXTS {
        if let Some(min) = list.iter().filter_map(|t| id(t)).min() {
            set.insert(min);
        }
    }
    set.extend(EOG_TEXTS.iter().filter_map(|t| id(t)));
    set.extend(eos);
    set.extend(extra.iter().copied());

    let in_set = |set: &BTreeSet<u32>, t: &str| id(t).filter(|i| set.contains(i));
    if let Some(end) = in_set(&set, "<|end|>") {
        let has = |t: &str| in_set(&set, t).is_some();
        let has_call = has("<|call|>") || has("<|calls|>");
        if has_call && (has("<|return|>") || has("<|flush|>")) {
            set.remove(&end);
        }
    }
    if let (Some(s), true) = (
        in_set(&set, "</s>"),
        in_set(&set, "<|tool_response>").is_some(),
    ) {
        set.remove(&s);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokenizers::models::wordlevel::WordLevel;

    fn word_level(tokens: &[&str]) -> tokenizers::Tokenizer {
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .expect("word-level model");
        tokenizers::Tokenizer::new(model)
    }

    /// A `TemplateProcessing` post-processor: `<|endoftext|>` in front, and at the end too if
    /// `both`.
    fn template(both: bool) -> serde_json::Value {
        let special = serde_json::json!({"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}});
        let mut single = vec![
            special.clone(),
            serde_json::json!({"Sequence": {"id": "A", "type_id": 0}}),
        ];
        if both {
            single.push(special);
        }
        serde_json::json!({
            "type": "TemplateProcessing",
            "single": single,
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [256], "tokens": ["<|endoftext|>"]}}
        })
    }

    /// Writes `tokenizer.json` (the single-byte GPT-2 vocabulary, with the given
    /// post-processor) and, if given, `tokenizer_config.json`.
    fn hf_folder(
        post_processor: Option<serde_json::Value>,
        config: Option<&str>,
    ) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let tok = Tokenizer::from_gguf_metadata(&super::test_util::single_byte_gpt2())
            .expect("tokenizer");
        let mut json: serde_json::Value =
            serde_json::from_str(&tok.inner().to_string(false).expect("serialize")).expect("json");
        if let Some(pp) = post_processor {
            json["post_processor"] = pp;
        }
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).expect("write");
        if let Some(cfg) = config {
            std::fs::write(dir.path().join("tokenizer_config.json"), cfg).expect("write");
        }
        dir
    }

    fn load(dir: &tempfile::TempDir, with_config: bool) -> Result<Tokenizer, TokenizerError> {
        let cfg = dir.path().join("tokenizer_config.json");
        Tokenizer::from_files(
            &dir.path().join("tokenizer.json"),
            with_config.then_some(cfg.as_path()),
        )
    }

    #[test]
    fn from_files_reads_specials_from_config() {
        let cfg = r#"{"bos_token": "<|endoftext|>", "add_bos_token": true,
                      "eos_token": {"content": "<|endoftext|>", "special": true}, "pad_token": null}"#;
        let dir = hf_folder(None, Some(cfg));
        let tok = load(&dir, true).expect("tokenizer");
        let h = tok.token_to_id("h").expect("h");
        assert_eq!(tok.encode("h", true).expect("encode"), vec![256, h]);
        assert_eq!(tok.encode("h", false).expect("encode"), vec![h]);
        assert_eq!(tok.bos_token(), Some("<|endoftext|>"));
        assert_eq!(tok.eos_token_id(), Some(256));
        assert!(tok.add_bos() && !tok.add_eos() && tok.is_eog(256));
        assert_eq!(tok.pad_token_id(), None);

        let tok = load(&dir, false).expect("tokenizer without config");
        assert_eq!(tok.encode("h", true).expect("encode"), vec![h]);
        assert!(!tok.add_bos() && tok.bos_token_id().is_none());
        // `<|endoftext|>` ends generation even without a configured EOS (llama.cpp's text rule).
        assert!(tok.is_eog(256));
    }

    #[test]
    fn from_files_keeps_post_processor_unless_config_sets_flags() {
        let dir = hf_folder(
            Some(template(false)),
            Some(r#"{"bos_token": "<|endoftext|>"}"#),
        );
        let tok = load(&dir, true).expect("tokenizer");
        let h = tok.token_to_id("h").expect("h");
        assert_eq!(tok.encode("h", true).expect("encode"), vec![256, h]);
        assert_eq!(tok.encode("h", false).expect("encode"), vec![h]);
        assert!(tok.add_bos() && !tok.add_eos());

        // An explicit flag wins over the post-processor (transformers `update_post_processor`).
        let dir = hf_folder(
            Some(template(false)),
            Some(r#"{"bos_token": "<|endoftext|>", "add_bos_token": false}"#),
        );
        let tok = load(&dir, true).expect("tokenizer");
        assert_eq!(tok.encode("h", true).expect("encode"), vec![h]);
        assert!(!tok.add_bos());

        // BOS and EOS from the post-processor, their tokens taken from it without a config.
        let dir = hf_folder(Some(template(true)), None);
        let tok = load(&dir, false).expect("tokenizer");
        assert_eq!(tok.encode("h", true).expect("encode"), vec![256, h, 256]);
        assert!(tok.add_bos() && tok.add_eos());
        assert_eq!(
            (tok.bos_token_id(), tok.eos_token_id()),
            (Some(256), Some(256))
        );
    }

    #[test]
    fn from_files_errors_name_file_and_field() {
        let dir = hf_folder(None, Some(r#"{"bos_token": "<nope>"}"#));
        let err = load(&dir, true).expect_err("unknown bos token").to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("bos_token"),
            "{err}"
        );

        let dir = hf_folder(None, Some(r#"{"add_bos_token": "yes"}"#));
        let err = load(&dir, true).expect_err("bad flag").to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("add_bos_token"),
            "{err}"
        );

        let dir = hf_folder(None, Some(r#"{"add_bos_token": true}"#));
        let err = load(&dir, true)
            .expect_err("add_bos without bos")
            .to_string();
        assert!(
            err.contains("add_bos_token") && err.contains("bos_token"),
            "{err}"
        );

        let dir = hf_folder(None, Some("{not json"));
        let err = load(&dir, true).expect_err("bad json").to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tokenizer.json"), "{}").expect("write");
        let err = load(&dir, false)
            .expect_err("bad tokenizer.json")
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        let err = Tokenizer::from_files(&dir.path().join("missing.json"), None)
            .expect_err("missing file")
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }

    #[test]
    fn decode_rejects_unknown_ids() {
        let tok = Tokenizer::from_gguf_metadata(&super::test_util::single_byte_gpt2())
            .expect("tokenizer");
        let err = tok.decode(&[1, 257], false).expect_err("out of range");
        assert!(
            matches!(
                err,
                TokenizerError::UnknownTokenId {
                    id: 257,
                    vocab_size: 257
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn eog_follows_llama_cpp_text_rules() {
        let tok = word_level(&[
            "<unk>",
            "<|im_end|>",
            "<|endoftext|>",
            "hello",
            "<reponame>",
        ]);
        let set = eog_ids(&tok, Some(3), &[]);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    }

    #[test]
    fn eog_harmony_workaround_drops_end() {
        let tok = word_level(&["<unk>", "<|end|>", "<|return|>", "<|call|>"]);
        let set = eog_ids(&tok, None, &[]);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![2, 3]);
        let tok = word_level(&["<unk>", "<|end|>", "<|return|>"]);
        let set = eog_ids(&tok, None, &[]);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn eog_gemma4_workaround_drops_eos_s() {
        let tok = word_level(&["<unk>", "</s>", "<|tool_response>", "<eos>"]);
        let set = eog_ids(&tok, None, &[]);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![2, 3]);
    }
}
