//! Building a [`Tokenizer`] from the `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! A GGUF file has no `tokenizer.json`: it stores the vocabulary (`tokens`, `token_type`,
//! `scores`, `merges`) and the special-token ids under llama.cpp's key names. We rebuild the
//! equivalent Hugging Face pipeline, following the two readers of these keys:
//! - llama.cpp `src/llama-vocab.cpp` (`llama_vocab::impl::load` and `llm_tokenizer_bpe`): the
//!   pre-tokenizer regexes for each `tokenizer.ggml.pre`, `ignore_merges`, the default of
//!   `add_bos`, which token types are matched whole in text;
//! - transformers `integrations/gguf/gguf_tokenizer_mapping.py` (v5): control (type 3) tokens as
//!   special added tokens, user-defined (type 4) ones as plain added tokens, and for
//!   SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`) a BPE with byte fallback
//!   whose merges are derived from the scores (`generate_merges`), Metaspace pre-tokenizer and
//!   the Llama/Gemma/Phi-3 decoders.
//!
//! Supported `tokenizer.ggml.model` values: `gpt2` (byte-level BPE) and `llama` (SentencePiece).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::{Specials, SpecialsMode, Tokenizer, TokenizerError};

/// GGUF token types (`llama_token_type` in llama.cpp `include/llama.h`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The SentencePiece whitespace marker U+2581.
const SPIECE_SPACE: char = '\u{2581}';

// Pre-tokenizer regexes, from llama.cpp `llm_tokenizer_bpe::llm_tokenizer_bpe` (C escapes
// undone). Where llama.cpp rewrote a tokenizer.json regex only because `std::regex` lacks a
// feature (`(?i:`, `\p{Lu}`), the original tokenizer.json regex is used: Oniguruma has both.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_DEEPSEEK3: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const RE_BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// What a `tokenizer.ggml.pre` value means for a byte-level BPE vocabulary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PreTokenizerSpec {
    /// Regexes applied in turn, each splitting the pieces of the previous one (matches and the
    /// text between them both kept, i.e. `Split(..., behavior = "isolated")`).
    regexes: &'static [&'static str],
    /// A piece that is itself in the vocabulary becomes one token without merging (Llama 3).
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` when `tokenizer.ggml.add_bos_token` is absent.
    add_bos_default: bool,
}

const fn spec(regexes: &'static [&'static str]) -> PreTokenizerSpec {
    PreTokenizerSpec {
        regexes,
        ignore_merges: false,
        add_bos_default: false,
    }
}

/// `tokenizer.ggml.pre` values and their pre-tokenizers, grouped as in llama.cpp
/// `llama_vocab::impl::load` (pre-type) and `llm_tokenizer_bpe` (regexes).
const PRE_TOKENIZERS: &[(&[&str], PreTokenizerSpec)] = &[
    (
        &["default"],
        spec(&[
            r"[\p{P}\$\+<=>\^~\|]+",
            RE_GPT2,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ]),
    ),
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        PreTokenizerSpec {
            regexes: &[RE_LLAMA3],
            ignore_merges: true,
            add_bos_default: true,
        },
    ),
    (
        &["dbrx", "smaug-bpe", "glm4", "chatglm-bpe"],
        spec(&[RE_LLAMA3]),
    ),
    (
        &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ],
        spec(&[RE_GPT2]),
    ),
    (
        &[
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        spec(&[r"\p{N}", RE_GPT2]),
    ),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
            "grok-2",
        ],
        spec(&[RE_QWEN2]),
    ),
    (&["qwen35"], spec(&[RE_QWEN35])),
    (&["seed-coder"], spec(&[RE_SEED_CODER])),
    (
        &["falcon"],
        spec(&[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"]),
    ),
    (
        &["deepseek-coder"],
        spec(&[
            "[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            "[一-龥ࠀ-一가-퟿]+",
            r"\p{N}",
        ]),
    ),
    (
        &["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"],
        spec(&[r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", RE_DEEPSEEK3]),
    ),
    (
        &["tekken"],
        PreTokenizerSpec {
            regexes: &[RE_TEKKEN],
            ignore_merges: true,
            add_bos_default: true,
        },
    ),
    (
        &["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
        spec(&[RE_GPT4O]),
    ),
    (&["bloom", "poro-chat", "gpt3-finnish"], spec(&[RE_BLOOM])),
    (&["viking"], spec(&[RE_BLOOM, r"\p{N}"])),
];

/// The pre-tokenizer for a `tokenizer.ggml.pre` value; a missing value means `default`, as in
/// llama.cpp (which warns that quality degrades).
pub(crate) fn pre_tokenizer_spec(pre: Option<&str>) -> Result<PreTokenizerSpec, TokenizerError> {
    let pre = pre.unwrap_or("default");
    PRE_TOKENIZERS
        .iter()
        .find(|(names, _)| names.contains(&pre))
        .map(|(_, spec)| *spec)
        .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer {
            pre: pre.to_string(),
            supported: supported_pre_tokenizers().join(", "),
        })
}

/// Every supported `tokenizer.ggml.pre` value.
pub fn supported_pre_tokenizers() -> Vec<&'static str> {
    PRE_TOKENIZERS
        .iter()
        .flat_map(|(names, _)| names.iter().copied())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Typed access to metadata values; every error names the key.

type Metadata = HashMap<String, Value>;

fn invalid(field: &str, msg: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidField {
        field: field.to_string(),
        msg: msg.into(),
    }
}

fn type_name(v: &Value) -> String {
    format!("{:?}", v.value_type())
}

fn as_int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn opt_str<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a str>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(invalid(
            key,
            format!("expected a string, found {}", type_name(v)),
        )),
    }
}

fn opt_bool(md: &Metadata, key: &str) -> Result<Option<bool>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(
            key,
            format!("expected a bool, found {}", type_name(v)),
        )),
    }
}

/// An optional token id, checked against the vocabulary size.
fn opt_token_id(md: &Metadata, key: &str, n_tokens: usize) -> Result<Option<u32>, TokenizerError> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let id = as_int(v)
        .ok_or_else(|| invalid(key, format!("expected an integer, found {}", type_name(v))))?;
    if id < 0 || id as u64 >= n_tokens as u64 {
        return Err(invalid(
            key,
            format!("token id {id} is outside the vocabulary (size {n_tokens})"),
        ));
    }
    Ok(Some(id as u32))
}

fn opt_array<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a [Value]>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(v) => Err(invalid(
            key,
            format!("expected an array, found {}", type_name(v)),
        )),
    }
}

fn str_array<'a>(md: &'a Metadata, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
    let Some(arr) = opt_array(md, key)? else {
        return Ok(None);
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            v => Err(invalid(
                key,
                format!("element {i}: expected a string, found {}", type_name(v)),
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// An optional per-token array of at least `n` entries (llama.cpp accepts longer ones).
fn per_token<T>(
    md: &Metadata,
    key: &str,
    n: usize,
    conv: impl Fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<Option<Vec<T>>, TokenizerError> {
    let Some(arr) = opt_array(md, key)? else {
        return Ok(None);
    };
    if arr.len() < n {
        return Err(invalid(
            key,
            format!(
                "has {} entries but tokenizer.ggml.tokens has {n}",
                arr.len()
            ),
        ));
    }
    arr[..n]
        .iter()
        .enumerate()
        .map(|(i, v)| {
            conv(v).ok_or_else(|| {
                invalid(
                    key,
                    format!("element {i}: expected {expected}, found {}", type_name(v)),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

// ---------------------------------------------------------------------------------------------

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata
    /// (`md` is `candle_core::quantized::gguf_file::Content::metadata`).
    ///
    /// Reads `model`, `pre`, `tokens`, `token_type`, `merges`, `scores`, `bos_token_id`,
    /// `eos_token_id`, `unknown_token_id`, `padding_token_id`, `eot_token_id`, `eom_token_id`,
    /// `add_bos_token`, `add_eos_token`, `add_space_prefix` (all under `tokenizer.ggml.`), and
    /// `general.architecture` (Gemma and Phi-3 SentencePiece variants, as transformers).
    ///
    /// - `model = "gpt2"`: byte-level BPE with the pre-tokenizer regexes llama.cpp uses for
    ///   `pre` (see [`supported_pre_tokenizers`]); `add_bos` defaults to `false` except for the
    ///   Llama 3 and Tekken families (llama.cpp).
    /// - `model = "llama"`: SentencePiece BPE with `<0xNN>` byte fallback and `▁` for spaces;
    ///   merges from `tokenizer.ggml.merges` or derived from `scores` (transformers
    ///   `generate_merges`); `add_bos` defaults to `true`; a leading `▁` is added to the text
    ///   unless `add_space_prefix = false`.
    ///
    /// Control (type 3) and unknown (type 2) tokens become special tokens (matched whole in
    /// text, dropped by `decode(_, true)`); user-defined (type 4) tokens are matched whole and
    /// always decoded.
    ///
    /// Errors: [`TokenizerError::MissingField`] / [`TokenizerError::InvalidField`] naming the key
    /// that is absent, mistyped, too short, out of range or inconsistent (duplicate tokens,
    /// merges of unknown tokens); [`TokenizerError::UnsupportedModel`] /
    /// [`TokenizerError::UnsupportedPreTokenizer`].
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        const K_MODEL: &str = "tokenizer.ggml.model";
        const K_TOKENS: &str = "tokenizer.ggml.tokens";
        const K_TYPES: &str = "tokenizer.ggml.token_type";

        let model = opt_str(md, K_MODEL)?.ok_or_else(|| TokenizerError::MissingField {
            field: K_MODEL.into(),
        })?;
        let raw_tokens = str_array(md, K_TOKENS)?.ok_or_else(|| TokenizerError::MissingField {
            field: K_TOKENS.into(),
        })?;
        if raw_tokens.is_empty() {
            return Err(invalid(K_TOKENS, "the vocabulary is empty"));
        }
        let n = raw_tokens.len();
        if n > u32::MAX as usize {
            return Err(invalid(K_TOKENS, format!("{n} tokens do not fit u32 ids")));
        }
        // llama.cpp renames empty tokens so that every id keeps a distinct text.
        let tokens: Vec<String> = raw_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.to_string()
                }
            })
            .collect();
        let token_types = per_token(md, K_TYPES, n, as_int, "an integer")?;

        let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            if let Some(prev) = vocab.insert(t.as_str(), i as u32) {
                return Err(invalid(
                    K_TOKENS,
                    format!("duplicate token `{t}` at ids {prev} and {i}"),
                ));
            }
        }

        let bos = opt_token_id(md, "tokenizer.ggml.bos_token_id", n)?;
        let eos = opt_token_id(md, "tokenizer.ggml.eos_token_id", n)?;
        let unk = opt_token_id(md, "tokenizer.ggml.unknown_token_id", n)?;
        let pad = opt_token_id(md, "tokenizer.ggml.padding_token_id", n)?;
        let eot = opt_token_id(md, "tokenizer.ggml.eot_token_id", n)?;
        let eom = opt_token_id(md, "tokenizer.ggml.eom_token_id", n)?;
        let add_bos_md = opt_bool(md, "tokenizer.ggml.add_bos_token")?;
        let add_eos = opt_bool(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let architecture = opt_str(md, "general.architecture")?.unwrap_or("");

        let (mut inner, add_bos_default, vocab_for_user) = match model {
            "gpt2" => {
                let spec = pre_tokenizer_spec(opt_str(md, "tokenizer.ggml.pre")?)?;
                let inner = byte_level_bpe(md, &tokens, &spec)?;
                (inner, spec.add_bos_default, None)
            }
            "llama" => {
                let (inner, respelled) = sentencepiece_bpe(md, &tokens, &vocab, architecture)?;
                (inner, true, respelled)
            }
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    model: other.to_string(),
                    supported: "gpt2, llama".into(),
                })
            }
        };

        // Control and unknown tokens: special. User-defined: matched whole, not special. For a
        // respelled (Gemma) vocabulary only those still present are added, as transformers.
        if let Some(types) = &token_types {
            let special: Vec<AddedToken> = tokens
                .iter()
                .zip(types)
                .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_UNKNOWN)
                .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
                .collect();
            inner
                .add_special_tokens(special)
                .map_err(|e| invalid(K_TYPES, format!("adding control tokens: {e}")))?;
            let user: Vec<AddedToken> = tokens
                .iter()
                .zip(types)
                .filter(|(t, &ty)| {
                    ty == TOKEN_TYPE_USER_DEFINED
                        && vocab_for_user
                            .as_ref()
                            .is_none_or(|v: &HashMap<String, u32>| v.contains_key(t.as_str()))
                })
                .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
                .collect();
            inner
                .add_tokens(user)
                .map_err(|e| invalid(K_TYPES, format!("adding user-defined tokens: {e}")))?;
        }
        if inner.get_vocab_size(true) != n {
            return Err(invalid(
                K_TOKENS,
                format!(
                    "the rebuilt tokenizer has {} ids but the file lists {n} tokens",
                    inner.get_vocab_size(true)
                ),
            ));
        }

        let add_bos = add_bos_md.unwrap_or(add_bos_default);
        if add_bos && bos.is_none() {
            return Err(invalid(
                "tokenizer.ggml.add_bos_token",
                "BOS is to be added but tokenizer.ggml.bos_token_id is not set",
            ));
        }
        if add_eos && eos.is_none() {
            return Err(invalid(
                "tokenizer.ggml.add_eos_token",
                "EOS is to be added but tokenizer.ggml.eos_token_id is not set",
            ));
        }
        Self::assemble(
            inner,
            Specials {
                bos,
                eos,
                unk,
                pad,
                extra_eog: eot.into_iter().chain(eom).collect(),
                add_bos,
                add_eos,
            },
            SpecialsMode::Manual,
        )
    }
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): the GGUF tokens are already spelled in the
/// GPT-2 byte alphabet (`Ġ` for a space), as in `tokenizer.json`.
fn byte_level_bpe(
    md: &Metadata,
    tokens: &[String],
    spec: &PreTokenizerSpec,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    const K_MERGES: &str = "tokenizer.ggml.merges";
    let merges = str_array(md, K_MERGES)?.ok_or_else(|| TokenizerError::MissingField {
        field: K_MERGES.into(),
    })?;
    let merges = parse_merges(&merges)?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| invalid(K_MERGES, e.to_string()))?;

    let mut pieces: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.regexes.len() + 1);
    for re in spec.regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| invalid("tokenizer.ggml.pre", format!("regex `{re}`: {e}")))?;
        pieces.push(split.into());
    }
    pieces.push(ByteLevel::new(false, false, false).into());

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(pieces)));
    inner.with_decoder(Some(ByteLevel::default()));
    Ok(inner)
}

/// `"a b"` -> `("a", "b")`, split at the first space after the first byte (llama.cpp
/// `word.find(' ', 1)`).
fn parse_merges(merges: &[&str]) -> Result<Vec<(String, String)>, TokenizerError> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                // The space is ASCII, so both sides are on char boundaries.
                .map(|p| (m[..p + 1].to_string(), m[p + 2..].to_string()))
                .ok_or_else(|| {
                    invalid(
                        "tokenizer.ggml.merges",
                        format!("entry {i} `{m}` is not two tokens separated by a space"),
                    )
                })
        })
        .collect()
}

/// SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`) as transformers rebuilds it:
/// BPE with byte fallback, merges from the file or derived from the scores. Returns the
/// tokenizer and, for Gemma, the respelled vocabulary (user-defined tokens must be in it).
#[allow(clippy::type_complexity)]
fn sentencepiece_bpe(
    md: &Metadata,
    tokens: &[String],
    vocab: &HashMap<&str, u32>,
    architecture: &str,
) -> Result<(tokenizers::Tokenizer, Option<HashMap<String, u32>>), TokenizerError> {
    const K_SCORES: &str = "tokenizer.ggml.scores";
    let n = tokens.len();
    let gemma = matches!(architecture, "gemma" | "gemma2" | "gemma3");
    let phi3 = architecture == "phi3";

    // Gemma stores whitespace-only tokens with real spaces; its tokenizer looks them up as `▁`.
    let (tokens, respelled): (Vec<String>, bool) = if gemma {
        let t = tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.trim().is_empty() {
                    SPIECE_SPACE.to_string().repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect();
        (t, true)
    } else {
        (tokens.to_vec(), false)
    };
    let respelled_vocab: Option<HashMap<String, u32>> = respelled.then(|| {
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect()
    });
    let lookup = |t: &str| -> Option<u32> {
        match &respelled_vocab {
            Some(v) => v.get(t).copied(),
            None => vocab.get(t).copied(),
        }
    };

    let merges = match str_array(md, "tokenizer.ggml.merges")? {
        Some(m) => parse_merges(&m)?,
        None => {
            // Gemma's scores do not follow its merge order; the file order does (transformers).
            let scores: Vec<f64> = if gemma {
                (0..n).map(|i| -(i as f64)).collect()
            } else {
                per_token(
                    md,
                    K_SCORES,
                    n,
                    |v| match v {
                        Value::F32(x) => Some(*x as f64),
                        Value::F64(x) => Some(*x),
                        v => as_int(v).map(|x| x as f64),
                    },
                    "a number",
                )?
                .ok_or_else(|| TokenizerError::MissingField {
                    field: format!(
                        "{K_SCORES} (needed to derive merges: no tokenizer.ggml.merges)"
                    ),
                })?
            };
            merges_from_scores(&tokens, &scores, lookup)
        }
    };

    let bpe_vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(bpe_vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if gemma && lookup("<unk>").is_some() {
        builder = builder.unk_token("<unk>".into());
    }
    let bpe = builder.build().map_err(|e| {
        invalid(
            "tokenizer.ggml.merges",
            format!("building the SentencePiece BPE: {e}"),
        )
    })?;
    let mut inner = tokenizers::Tokenizer::new(bpe);

    let space = SPIECE_SPACE.to_string();
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| TokenizerError::Other(format!("replace {from:?}: {e}")))
    };
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(&space, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if gemma {
        // GemmaTokenizer: spaces -> `▁` by a normalizer, no prefix space.
        inner
            .with_normalizer(Some(replace(" ", &space)?))
            .map_err(|e| TokenizerError::Other(e.to_string()))?;
        let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false)
            .map_err(|e| TokenizerError::Other(e.to_string()))?;
        inner.with_pre_tokenizer(Some(split));
    } else {
        let add_prefix = opt_bool(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
        if phi3 {
            // transformers `phi3_tokenizer`: the prefix comes from a normalizer.
            let norm: Vec<NormalizerWrapper> = vec![
                Prepend::new(space.clone()).into(),
                replace(" ", &space)?.into(),
            ];
            inner
                .with_normalizer(Some(NormalizerSequence::new(norm)))
                .map_err(|e| TokenizerError::Other(e.to_string()))?;
        } else {
            // LlamaTokenizer (legacy = false): prepend `▁` to the first piece only.
            let scheme = if add_prefix {
                PrependScheme::First
            } else {
                PrependScheme::Never
            };
            inner.with_pre_tokenizer(Some(Metaspace::new(SPIECE_SPACE, scheme, false)));
        }
        if add_prefix || phi3 {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok((inner, respelled_vocab))
}

/// Merges implied by a SentencePiece vocabulary, as transformers `generate_merges` derives them:
/// for each token (in file order) every split into two in-vocabulary pieces (ordered by the
/// pieces' ids), then all pairs stably sorted by (score of the merged token, char length of the
/// left piece, of the right piece), descending.
fn merges_from_scores(
    tokens: &[String],
    scores: &[f64],
    lookup: impl Fn(&str) -> Option<u32>,
) -> Vec<(String, String)> {
    struct Cand {
        l: u32,
        r: u32,
        score: f64,
        l_len: usize,
        r_len: usize,
    }
    let mut all: Vec<Cand> = Vec::new();
    let mut local: Vec<Cand> = Vec::new();
    for (tok, &score) in tokens.iter().zip(scores) {
        local.clear();
        for (byte_idx, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(byte_idx);
            if let (Some(li), Some(ri)) = (lookup(l), lookup(r)) {
                local.push(Cand {
                    l: li,
                    r: ri,
                    score,
                    l_len: l.chars().count(),
                    r_len: r.chars().count(),
                });
            }
        }
        local.sort_by_key(|c| (c.l, c.r));
        all.append(&mut local);
    }
    all.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.l_len.cmp(&a.l_len))
            .then(b.r_len.cmp(&a.r_len))
    });
    all.into_iter()
        .map(|c| (tokens[c.l as usize].clone(), tokens[c.r as usize].clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::String(x.to_string())
    }

    fn arr(xs: &[&str]) -> Value {
        Value::Array(xs.iter().map(|x| s(x)).collect())
    }

    /// A tiny byte-level vocabulary: the bytes of "ab c" plus merges `a b` and `Ġ c`.
    fn tiny_gpt2() -> Metadata {
        let mut md = Metadata::new();
        md.insert("tokenizer.ggml.model".into(), s("gpt2"));
        md.insert("tokenizer.ggml.pre".into(), s("gpt-2"));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            arr(&[
                "<|endoftext|>",
                "a",
                "b",
                "c",
                "Ġ",
                "ab",
                "Ġc",
                "<|im_end|>",
            ]),
        );
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                [3, 1, 1, 1, 1, 1, 1, 3]
                    .iter()
                    .map(|&t| Value::I32(t))
                    .collect(),
            ),
        );
        md.insert("tokenizer.ggml.merges".into(), arr(&["a b", "Ġ c"]));
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(7));
        md
    }

    #[test]
    fn every_pre_tokenizer_regex_compiles() {
        for (names, spec) in PRE_TOKENIZERS {
            for re in spec.regexes {
                Split::new(
                    SplitPattern::Regex((*re).to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap_or_else(|e| panic!("{names:?}: regex {re}: {e}"));
            }
        }
    }

    #[test]
    fn tiny_byte_level_roundtrip() {
        let tok = Tokenizer::from_gguf_metadata(&tiny_gpt2()).expect("tokenizer");
        let ids = tok.encode("ab c<|im_end|>", true).expect("encode");
        assert_eq!(ids, vec![5, 6, 7]);
        assert_eq!(tok.decode(&ids, false).expect("decode"), "ab c<|im_end|>");
        assert_eq!(tok.decode(&ids, true).expect("decode"), "ab c");
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert!(tok.is_eog(7) && tok.is_eog(0) && !tok.is_eog(5));
        assert!(!tok.add_bos());
    }

    #[test]
    fn missing_and_bad_fields_are_named() {
        let mut md = tiny_gpt2();
        md.remove("tokenizer.ggml.merges");
        let err = Tokenizer::from_gguf_metadata(&md).expect_err("no merges");
        assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

        let mut md = tiny_gpt2();
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(99));
        let err = Tokenizer::from_gguf_metadata(&md).expect_err("bos out of range");
        assert!(
            err.to_string().contains("tokenizer.ggml.bos_token_id"),
            "{err}"
        );

        let mut md = tiny_gpt2();
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        let err = Tokenizer::from_gguf_metadata(&md).expect_err("add_bos without bos");
        assert!(err.to_string().contains("add_bos_token"), "{err}");

        let mut md = tiny_gpt2();
        md.insert("tokenizer.ggml.pre".into(), s("no-such-pre"));
        let err = Tokenizer::from_gguf_metadata(&md).expect_err("unknown pre");
        assert!(err.to_string().contains("tokenizer.ggml.pre"), "{err}");

        let mut md = tiny_gpt2();
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(vec![Value::I32(1)]),
        );
        let err = Tokenizer::from_gguf_metadata(&md).expect_err("short token_type");
        assert!(
            err.to_string().contains("tokenizer.ggml.token_type"),
            "{err}"
        );

        let mut md = tiny_gpt2();
        md.insert("tokenizer.ggml.merges".into(), arr(&["a b", "x y"]));
        let err = Tokenizer::from_gguf_metadata(&md).expect_err("merge of unknown tokens");
        assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

        let mut md = tiny_gpt2();
        md.insert("tokenizer.ggml.tokens".into(), arr(&["a", "a"]));
        md.remove("tokenizer.ggml.token_type");
        let err = Tokenizer::from_gguf_metadata(&md).expect_err("duplicate");
        assert!(err.to_string().contains("duplicate"), "{err}");

        let mut md = tiny_gpt2();
        md.insert("tokenizer.ggml.model".into(), s("rwkv"));
        let err = Tokenizer::from_gguf_metadata(&md).expect_err("unsupported model");
        assert!(err.to_string().contains("tokenizer.ggml.model"), "{err}");

        let mut md = tiny_gpt2();
        md.remove("tokenizer.ggml.model");
        let err = Tokenizer::from_gguf_metadata(&md).expect_err("no model");
        assert!(err.to_string().contains("tokenizer.ggml.model"), "{err}");
    }

    #[test]
    fn merges_split_at_first_space_after_first_byte() {
        let m = parse_merges(&["Ġ t", "  x"]).expect("merges");
        assert_eq!(m[0], ("Ġ".to_string(), "t".to_string()));
        // A merge whose left piece is a space itself (non-byte-level vocabularies).
        assert_eq!(m[1], (" ".to_string(), "x".to_string()));
        assert!(parse_merges(&["ab"]).is_err());
    }

    #[test]
    fn generated_merges_follow_scores_then_lengths() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "abc", "bc"]
            .iter()
            .map(|t| t.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0];
        let ids: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i as u32))
            .collect();
        let merges = merges_from_scores(&tokens, &scores, |t| ids.get(t).copied());
        let got: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        // "ab" (-1), "bc" (-2), then "abc" (-3) as "ab"+"c" (left longer) before "a"+"bc".
        assert_eq!(got, vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
