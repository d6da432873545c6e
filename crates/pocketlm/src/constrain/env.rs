//! The llguidance tokenizer environment built from our [`Tokenizer`]: the byte string of every
//! token id, the special tokens, the end-of-generation tokens, and the token trie and parser
//! factory llguidance compiles grammars against.
//!
//! The token bytes follow `toktrie_hf_tokenizers` (`ByteTokenizer::from_tokenizer`, llguidance
//! 1.9), rewritten here because that crate pins `tokenizers` 0.21 and we use 0.23:
//! - byte-level BPE (GPT-2, the `ByteLevel` decoder): each character of the vocabulary entry is
//!   one byte through the inverse of GPT-2's `bytes_to_unicode` table (`Ġ` is `0x20`);
//! - SentencePiece (the `ByteFallback` decoder): `<0xNN>` is the byte `NN`, other entries are
//!   their UTF-8 with the space marker `▁` (the character the decoder's `Replace` maps to a
//!   space) replaced by a space;
//! - added tokens marked special (`"special": true` in `tokenizer.json`, control tokens of a
//!   GGUF) and end-of-generation tokens are special: their bytes are
//!   [`TokTrie::SPECIAL_TOKEN_MARKER`] (`0xFF`, never valid UTF-8) then their text, so that no
//!   grammar over text can produce them (llguidance `docs/special_tokens.md`) and no string of a
//!   JSON value can end generation; other added tokens (Qwen's `<tool_call>`, `"special":
//!   false`) are their text, so that a grammar holding the literal `<tool_call>` can produce the
//!   token the model was trained to write.
//!
//! Ids with no vocabulary entry (holes, and the model's padded embedding rows past the table,
//! which the mask never allows: [`super::apply_mask`]) have no bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::ParserFactory;
use tokenizers::{
    normalizers, pre_tokenizers, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper,
};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::ConstraintError;
use crate::tokenizer::Tokenizer;

/// How a vocabulary spells bytes, read from the tokenizer's decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSpelling {
    /// GPT-2 byte-level BPE: one printable character per byte (`Ġ` = space).
    ByteLevel,
    /// SentencePiece with byte fallback: `<0xNN>` tokens, `space` (usually `▁`) for a space.
    ByteFallback {
        /// The character that stands for a space.
        space: char,
    },
}

/// The byte string of every token id of a tokenizer and which ids are special.
#[derive(Debug, Clone)]
pub struct TokenBytes {
    /// `bytes[id]`: the bytes token `id` stands for (`[vocab]`); special tokens start with
    /// [`TokTrie::SPECIAL_TOKEN_MARKER`]; an id with no vocabulary entry is empty.
    pub bytes: Vec<Vec<u8>>,
    /// Whether each id is special (`[vocab]`).
    pub special: Vec<bool>,
    /// How the vocabulary spells bytes.
    pub spelling: TokenSpelling,
}

/// GPT-2's printable characters that stand for themselves (`bytes_to_unicode` in
/// `openai/gpt-2` `src/encoder.py`): `!`..`~`, `¡`..`¬`, `®`..`ÿ`.
fn is_self_mapped(c: char) -> bool {
    matches!(c, '!'..='~' | '\u{00A1}'..='\u{00AC}' | '\u{00AE}'..='\u{00FF}')
}

/// The inverse of GPT-2's `bytes_to_unicode`: character -> byte. The other 68 bytes map to
/// `U+0100` upwards, in byte order.
fn gpt2_char_to_byte() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let c = b as char;
        if is_self_mapped(c) {
            map.insert(c, b);
        } else {
            map.insert(char::from_u32(next).expect("below U+0200"), b);
            next += 1;
        }
    }
    map
}

fn spelling_of(d: &DecoderWrapper, found: &mut Option<TokenSpelling>, space: &mut char) {
    match d {
        DecoderWrapper::ByteLevel(_) => *found = Some(TokenSpelling::ByteLevel),
        DecoderWrapper::ByteFallback(_) => {
            *found = Some(TokenSpelling::ByteFallback { space: ' ' });
        }
        DecoderWrapper::Metaspace(m) => {
            *space = m.get_replacement();
            found.get_or_insert(TokenSpelling::ByteFallback { space: ' ' });
        }
        DecoderWrapper::Replace(r) if r.content == " " => {
            // The pattern is private; its serialized form is `{"pattern": {"String": "▁"}}`.
            if let Ok(v) = serde_json::to_value(r) {
                if let Some(s) = v["pattern"]["String"].as_str() {
                    let mut chars = s.chars();
                    if let (Some(c), None) = (chars.next(), chars.next()) {
                        *space = c;
                    }
                }
            }
        }
        DecoderWrapper::Sequence(seq) => {
            for d in seq.get_decoders() {
                spelling_of(d, found, space);
            }
        }
        _ => {}
    }
}

impl TokenBytes {
    /// Reads the byte string of every id of `tokenizer` (see the module documentation).
    ///
    /// The table has `max(vocab_size, highest added id + 1)` entries.
    ///
    /// Errors: [`ConstraintError::Tokenizer`] when the decoder is neither byte-level nor
    /// byte-fallback (a vocabulary whose bytes cannot be known), or a byte-level entry holds a
    /// character outside GPT-2's byte alphabet.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self, ConstraintError> {
        let hf = tokenizer.inner();
        let mut found = None;
        let mut space = '\u{2581}';
        if let Some(d) = hf.get_decoder() {
            spelling_of(d, &mut found, &mut space);
        }
        let spelling = match found {
            Some(TokenSpelling::ByteFallback { .. }) => TokenSpelling::ByteFallback { space },
            Some(s) => s,
            None => {
                return Err(ConstraintError::Tokenizer(format!(
                    "cannot tell the bytes of its tokens: the decoder is neither ByteLevel nor \
                     ByteFallback ({:?})",
                    hf.get_decoder().map(|_| "another decoder")
                )))
            }
        };
        let added = hf.get_added_tokens_decoder();
        let n = added
            .keys()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0)
            .max(hf.get_vocab_size(true));
        let mut bytes = vec![Vec::new(); n];
        let mut special = vec![false; n];
        for (&id, tok) in &added {
            let c = &tok.content;
            if tok.special || tokenizer.is_eog(id) {
                let mut b = Vec::with_capacity(c.len() + 1);
                b.push(TokTrie::SPECIAL_TOKEN_MARKER);
                b.extend_from_slice(c.as_bytes());
                bytes[id as usize] = b;
                special[id as usize] = true;
            } else {
                bytes[id as usize] = c.as_bytes().to_vec();
            }
        }
        let char_map = gpt2_char_to_byte();
        for id in 0..n as u32 {
            if added.contains_key(&id) {
                continue;
            }
            let Some(name) = hf.id_to_token(id) else {
                continue;
            };
            bytes[id as usize] = match spelling {
                TokenSpelling::ByteFallback { space } => match byte_fallback(&name) {
                    Some(b) => vec![b],
                    None => name.replace(space, " ").into_bytes(),
                },
                TokenSpelling::ByteLevel => name
                    .chars()
                    .map(|c| {
                        char_map.get(&c).copied().ok_or_else(|| {
                            ConstraintError::Tokenizer(format!(
                                "token {id} `{name}` holds `{c}`, not a byte-level character"
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?,
            };
        }
        Ok(TokenBytes {
            bytes,
            special,
            spelling,
        })
    }
}

/// `<0xNN>` -> `NN`.
fn byte_fallback(name: &str) -> Option<u8> {
    let hex = name.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The grammar environment of one tokenizer: the token trie and llguidance's parser factory
/// (which compiles a grammar into a parser). Built once per loaded model by
/// [`GrammarEnv::for_tokenizer`] and shared by every constrained generation.
pub struct GrammarEnv {
    factory: ParserFactory,
    /// The end-of-generation ids the trie treats as EOS.
    eos: Vec<u32>,
    /// [`super::closing::closing_tokens`] of the vocabulary.
    closers: Vec<u32>,
    build_time: Duration,
}

impl std::fmt::Debug for GrammarEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarEnv")
            .field("vocab_size", &self.vocab_size())
            .field("eos", &self.eos)
            .field("build_time", &self.build_time)
            .finish()
    }
}

/// [`TokenizerEnv`] over our tokenizer: llguidance tokenizes text it forces (fast-forward
/// tokens, literal lexemes) with it.
struct Env {
    trie: TokTrie,
    /// Our tokenizer with the prefix space turned off (a `Prepend` normalizer dropped,
    /// `Metaspace` prepending never), as `toktrie_hf_tokenizers` does: llguidance tokenizes
    /// pieces from the middle of a text.
    hf: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            // A failed encode falls back to the trie's greedy tokenization of the same text.
            self.hf
                .encode_fast(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s.as_bytes()))
        })
    }
}

fn without_prepend(n: NormalizerWrapper) -> Option<NormalizerWrapper> {
    match n {
        NormalizerWrapper::Prepend(_) => None,
        NormalizerWrapper::Sequence(seq) => {
            let kept: Vec<_> = seq
                .as_ref()
                .iter()
                .filter_map(|n| without_prepend(n.clone()))
                .collect();
            (!kept.is_empty())
                .then(|| NormalizerWrapper::Sequence(normalizers::Sequence::new(kept)))
        }
        other => Some(other),
    }
}

fn never_prepend(p: PreTokenizerWrapper) -> PreTokenizerWrapper {
    match p {
        PreTokenizerWrapper::Metaspace(mut m) => {
            m.prepend_scheme = pre_tokenizers::metaspace::PrependScheme::Never;
            PreTokenizerWrapper::Metaspace(m)
        }
        PreTokenizerWrapper::Sequence(seq) => {
            PreTokenizerWrapper::Sequence(pre_tokenizers::sequence::Sequence::new(
                seq.as_ref()
                    .iter()
                    .map(|p| never_prepend(p.clone()))
                    .collect(),
            ))
        }
        other => other,
    }
}

impl GrammarEnv {
    /// Builds the environment of `tokenizer`: [`TokenBytes`], the token trie with the
    /// tokenizer's end-of-generation ids ([`Tokenizer::eog_token_ids`]; EOS first) as its EOS
    /// tokens, and a parser factory with llguidance's general token slices. Costs tens to
    /// hundreds of milliseconds (see [`GrammarEnv::build_time`]); use
    /// [`GrammarEnv::for_tokenizer`], which caches it.
    ///
    /// Errors: [`ConstraintError::Tokenizer`] as [`TokenBytes::from_tokenizer`], or when the
    /// tokenizer has no end-of-generation token (a grammar could never end).
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, ConstraintError> {
        let t0 = Instant::now();
        let table = TokenBytes::from_tokenizer(tokenizer)?;
        let mut eos: Vec<u32> = tokenizer.eos_token_id().into_iter().collect();
        eos.extend(
            tokenizer
                .eog_token_ids()
                .iter()
                .filter(|&&id| Some(id) != tokenizer.eos_token_id()),
        );
        eos.retain(|&id| (id as usize) < table.bytes.len());
        let Some(&first) = eos.first() else {
            return Err(ConstraintError::Tokenizer(
                "it has no end-of-generation token, so a grammar could not end".into(),
            ));
        };
        let mut info = TokRxInfo::new(table.bytes.len() as u32, first);
        info.tok_bos = tokenizer.bos_token_id();
        info.tok_pad = tokenizer.pad_token_id();
        info.tok_unk = tokenizer.unk_token_id();
        let mut trie = TokTrie::from(&info, &table.bytes);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        let mut hf = tokenizer.inner().clone();
        if let Some(n) = hf.get_normalizer().cloned() {
            hf.with_normalizer(without_prepend(n))
                .map_err(|e| ConstraintError::Tokenizer(format!("normalizer: {e}")))?;
        }
        if let Some(p) = hf.get_pre_tokenizer().cloned() {
            hf.with_pre_tokenizer(Some(never_prepend(p)));
        }
        let env: TokEnv = Arc::new(Env { trie, hf });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Tokenizer(format!("llguidance: {e}")))?;
        // Grammar errors come back as values; llguidance's own stderr logging stays off.
        factory.quiet();
        let closers = super::closing::closing_tokens(factory.tok_env().tok_trie());
        Ok(GrammarEnv {
            factory,
            eos,
            closers,
            build_time: t0.elapsed(),
        })
    }

    /// The environment of `tokenizer`, built on first use and cached in it (clones of a
    /// tokenizer share the cache; [`Tokenizer::add_eog_token_ids`] clears it).
    ///
    /// Errors: as [`GrammarEnv::new`].
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Result<Arc<GrammarEnv>, ConstraintError> {
        let slot = tokenizer.grammar_env_slot();
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(env) = guard.clone().and_then(|a| a.downcast::<GrammarEnv>().ok()) {
            return Ok(env);
        }
        let env = Arc::new(GrammarEnv::new(tokenizer)?);
        *guard = Some(env.clone() as Arc<dyn std::any::Any + Send + Sync>);
        Ok(env)
    }

    /// llguidance's parser factory (compiles grammars against this vocabulary).
    pub fn factory(&self) -> &ParserFactory {
        &self.factory
    }

    /// The token trie: the byte string of each id ([`TokTrie::token`]).
    pub fn trie(&self) -> &TokTrie {
        self.factory.tok_env().tok_trie()
    }

    /// Entries of the token table (the tokenizer's vocabulary, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.trie().vocab_size()
    }

    /// The end-of-generation ids a grammar may end with (EOS first).
    pub fn eos_tokens(&self) -> &[u32] {
        &self.eos
    }

    /// The vocabulary's closing tokens in preference order
    /// ([`super::closing::closing_tokens`]), for budget-aware closing.
    pub fn closing_tokens(&self) -> &[u32] {
        &self.closers
    }

    /// How long [`GrammarEnv::new`] took (token table, trie and parser factory).
    pub fn build_time(&self) -> Duration {
        self.build_time
    }
}
