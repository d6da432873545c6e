//! Token log-probabilities as the API reports them: each id of the library's
//! [`TokenLogprobs`] turned into its text and exact bytes, and the two response shapes built
//! from a list of them (OpenAI's API reference: chat `choices[].logprobs.content[]` of
//! `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`; legacy completions
//! `choices[].logprobs` of `{tokens, token_logprobs, top_logprobs, text_offset}`).

use pocketlm::generate::TokenLogprobs;
use pocketlm::tokenizer::Tokenizer;
use serde::ser::{Serialize, SerializeMap, Serializer};

/// The value reported instead of `-inf` (JSON has no infinity), as OpenAI's API does for
/// tokens of vanishing probability.
pub const MIN_LOGPROB: f32 = -9999.0;

/// One token with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's text (decoded alone, special tokens spelled out; a token holding part of
    /// a multi-byte character shows U+FFFD, its exact bytes are in `bytes`).
    pub token: String,
    /// The token's bytes (UTF-8 of `token`, or the raw bytes of a byte-level token).
    pub bytes: Vec<u8>,
    /// Natural log of its probability under the model's raw logits, `>= MIN_LOGPROB`.
    pub logprob: f32,
}

/// Log-probabilities of one generated token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLogprobs {
    /// The generated token.
    pub chosen: TokenLogprob,
    /// The most likely tokens, most likely first (as many as asked for).
    pub top: Vec<TokenLogprob>,
}

impl StepLogprobs {
    /// Decodes every id of `lp` with `tokenizer` (see [`token_text_and_bytes`]).
    pub fn new(tokenizer: &Tokenizer, lp: &TokenLogprobs) -> Self {
        let entry = |id: u32, logprob: f32| {
            let (token, bytes) = token_text_and_bytes(tokenizer, id);
            TokenLogprob {
                token,
                bytes,
                logprob: finite(logprob),
            }
        };
        StepLogprobs {
            chosen: entry(lp.id, lp.logprob),
            top: lp.top.iter().map(|&(id, l)| entry(id, l)).collect(),
        }
    }
}

fn finite(l: f32) -> f32 {
    if l.is_finite() {
        l.max(MIN_LOGPROB)
    } else {
        MIN_LOGPROB
    }
}

/// GPT-2's byte-level alphabet reversed (`bytes_to_unicode` of openai/gpt-2 `encoder.py`,
/// also Hugging Face tokenizers' `ByteLevel`): printable bytes `!..~`, `¡..¬`, `®..ÿ` stand
/// for themselves, the other 68 bytes for U+0100 onwards in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    let c = c as u32;
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    if printable(c) {
        return u8::try_from(c).ok();
    }
    let n = c.checked_sub(0x100)?;
    (0u32..=255)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .and_then(|b| u8::try_from(b).ok())
}

/// The text and bytes of token `id`. The text is `tokenizer.decode([id])` with special
/// tokens kept. When that text is exact (no U+FFFD) the bytes are its UTF-8; otherwise the
/// token holds part of a character and its raw bytes come from the vocabulary entry: a
/// SentencePiece byte-fallback token `<0xHH>`, or a byte-level BPE token read through GPT-2's
/// byte alphabet. An id the tokenizer does not know gives an empty text.
pub fn token_text_and_bytes(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let text = tokenizer.decode(&[id], false).unwrap_or_default();
    if !text.contains('\u{FFFD}') {
        let bytes = text.as_bytes().to_vec();
        return (text, bytes);
    }
    let raw = tokenizer.id_to_token(id).unwrap_or_default();
    if let Some(hex) = raw.strip_prefix("<0x").and_then(|r| r.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return (text, vec![b]);
        }
    }
    let bytes: Option<Vec<u8>> = raw.chars().map(byte_level_byte).collect();
    match bytes {
        Some(b) if !b.is_empty() => (text, b),
        _ => {
            let b = text.as_bytes().to_vec();
            (text, b)
        }
    }
}

/// `{token, logprob, bytes}` of chat `top_logprobs`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatTopLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 (or raw) bytes of the token.
    pub bytes: Vec<u8>,
}

/// One entry of chat `logprobs.content`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 (or raw) bytes of the token.
    pub bytes: Vec<u8>,
    /// The `top_logprobs` most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// Chat `choices[].logprobs`: `{"content": [...]}`, one entry per generated token.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ChatLogprobs {
    /// The generated tokens in order (the end-of-generation token is not one of them).
    pub content: Vec<ChatTokenLogprob>,
}

impl ChatLogprobs {
    /// Appends one generated token.
    pub fn push(&mut self, step: &StepLogprobs) {
        let top = |t: &TokenLogprob| ChatTopLogprob {
            token: t.token.clone(),
            logprob: t.logprob,
            bytes: t.bytes.clone(),
        };
        self.content.push(ChatTokenLogprob {
            token: step.chosen.token.clone(),
            logprob: step.chosen.logprob,
            bytes: step.chosen.bytes.clone(),
            top_logprobs: step.top.iter().map(top).collect(),
        });
    }
}

/// One legacy `top_logprobs` entry: a JSON object `{token: logprob}` in rank order. Tokens
/// whose texts coincide keep the first (more likely) value.
#[derive(Debug, Clone, Default)]
pub struct TopMap(pub Vec<(String, f32)>);

impl Serialize for TopMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<&(String, f32)> = self.0.iter().filter(|(t, _)| seen.insert(t)).collect();
        let mut m = s.serialize_map(Some(unique.len()))?;
        for (t, l) in unique {
            m.serialize_entry(t, l)?;
        }
        m.end()
    }
}

/// Legacy completion `choices[].logprobs` (OpenAI's `/v1/completions` with `logprobs: N`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CompletionLogprobs {
    /// Text of each generated token.
    pub tokens: Vec<String>,
    /// Log-probability of each generated token.
    pub token_logprobs: Vec<f32>,
    /// For each generated token, the `N` most likely tokens and the generated one (so up to
    /// `N + 1` entries, as OpenAI documents).
    pub top_logprobs: Vec<TopMap>,
    /// Offset of each token in the generated text, in characters (Unicode scalar values of
    /// the `tokens` texts, counted as vLLM does); the first token of the answer is at 0 and a
    /// stream continues the count across chunks.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends one generated token at character offset `offset`.
    pub fn push(&mut self, step: &StepLogprobs, offset: usize) {
        let mut top: Vec<(String, f32)> = step
            .top
            .iter()
            .map(|t| (t.token.clone(), t.logprob))
            .collect();
        if !step.top.iter().any(|t| t.token == step.chosen.token) {
            top.push((step.chosen.token.clone(), step.chosen.logprob));
        }
        self.tokens.push(step.chosen.token.clone());
        self.token_logprobs.push(step.chosen.logprob);
        self.top_logprobs.push(TopMap(top));
        self.text_offset.push(offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        // Forward table of GPT-2's bytes_to_unicode, built independently.
        let mut bs: Vec<u32> = (0x21..=0x7e)
            .chain(0xa1..=0xac)
            .chain(0xae..=0xff)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        for (b, c) in bs.iter().zip(&cs) {
            let ch = char::from_u32(*c).expect("char");
            assert_eq!(byte_level_byte(ch), Some(*b as u8), "{ch:?}");
        }
        assert_eq!(byte_level_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_byte('\u{144}'), None);
        assert_eq!(byte_level_byte(' '), None);
    }

    fn tl(token: &str, logprob: f32) -> TokenLogprob {
        TokenLogprob {
            token: token.into(),
            bytes: token.as_bytes().to_vec(),
            logprob,
        }
    }

    #[test]
    fn legacy_shape_adds_the_chosen_token_and_keeps_rank_order() {
        let mut c = CompletionLogprobs::default();
        let step = StepLogprobs {
            chosen: tl(" b", -2.0),
            top: vec![tl("z", -0.5), tl("a", -1.0)],
        };
        c.push(&step, 0);
        c.push(
            &StepLogprobs {
                chosen: tl("z", -0.5),
                top: vec![tl("z", -0.5), tl("z", -0.7)],
            },
            2,
        );
        let v = serde_json::to_string(&c).expect("json");
        assert_eq!(
            v,
            r#"{"tokens":[" b","z"],"token_logprobs":[-2.0,-0.5],"top_logprobs":[{"z":-0.5,"a":-1.0," b":-2.0},{"z":-0.5}],"text_offset":[0,2]}"#
        );
    }

    #[test]
    fn chat_shape_matches_openai() {
        let mut c = ChatLogprobs::default();
        c.push(&StepLogprobs {
            chosen: tl("é", -0.25),
            top: vec![tl("é", -0.25)],
        });
        let v = serde_json::to_value(&c).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"content": [{"token": "é", "logprob": -0.25, "bytes": [195, 169],
                "top_logprobs": [{"token": "é", "logprob": -0.25, "bytes": [195, 169]}]}]})
        );
    }

    #[test]
    fn infinite_logprobs_become_the_floor() {
        assert_eq!(finite(f32::NEG_INFINITY), MIN_LOGPROB);
        assert_eq!(finite(f32::NAN), MIN_LOGPROB);
        assert_eq!(finite(-1e6), MIN_LOGPROB);
        assert_eq!(finite(-1.5), -1.5);
    }
}
