//! Incremental detokenization: generated token ids in, complete text chunks out.
//!
//! Decoding one token at a time is wrong in two ways: a character may be split across tokens
//! (byte-level BPE bytes, SentencePiece `<0xNN>` byte fallback), and a token's text can depend
//! on its neighbours (SentencePiece drops the `▁` of the first token only). [`StreamDecoder`]
//! therefore decodes a short window of previous tokens plus the new ones and emits the
//! difference, holding text back while the decoded window ends in U+FFFD (an incomplete UTF-8
//! sequence). This is the algorithm of Hugging Face `tokenizers`' `DecodeStream`
//! (`step_decode_stream`) and of mlx-lm's `NaiveStreamingDetokenizer`.

use std::ops::Deref;

use super::{Tokenizer, TokenizerError};

/// Streams text out of generated token ids.
///
/// `T` is anything that derefs to a [`Tokenizer`]: `&Tokenizer` or `Arc<Tokenizer>`.
/// The concatenation of every [`StreamDecoder::push`] chunk and the final
/// [`StreamDecoder::flush`] equals `tokenizer.decode(all_ids, skip_special_tokens)`.
#[derive(Debug, Clone)]
pub struct StreamDecoder<T: Deref<Target = Tokenizer>> {
    tokenizer: T,
    skip_special_tokens: bool,
    /// The window: the tokens of the previously emitted chunk, then tokens not yet emitted.
    ids: Vec<u32>,
    /// `decode(ids[..])` as of the last emission: the text already handed out for the window.
    prefix: String,
    /// Where the next emission cuts the window (start of the tokens of the last chunk).
    prefix_index: usize,
}

impl<T: Deref<Target = Tokenizer>> StreamDecoder<T> {
    /// A decoder with nothing pushed yet. `skip_special_tokens` as in [`Tokenizer::decode`].
    pub fn new(tokenizer: T, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.tokenizer.decode(ids, self.skip_special_tokens)
    }

    /// Adds one generated id; returns the text it completes, or `None` while the text so far
    /// ends inside a UTF-8 character (or the token adds no text, e.g. a skipped special token).
    /// A returned chunk never contains the U+FFFD of an incomplete sequence at its end.
    ///
    /// Errors: [`TokenizerError::UnknownTokenId`] for an id outside the vocabulary (the decoder
    /// state is unchanged); [`TokenizerError::Decode`] if the decoded window no longer starts
    /// with the text already emitted (not possible with the decoders built in this module).
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        if self.tokenizer.id_to_token(id).is_none() {
            return Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.tokenizer.vocab_size(),
            });
        }
        if self.prefix.is_empty() && !self.ids.is_empty() {
            let p = self.decode(&self.ids)?;
            if !p.ends_with(char::REPLACEMENT_CHARACTER) {
                self.prefix = p;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = self.decode(&self.ids)?;
        if text.len() <= self.prefix.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let Some(new_text) = text.strip_prefix(self.prefix.as_str()) else {
            return Err(TokenizerError::Decode(format!(
                "stream: decoding {:?} gave {text:?}, which does not extend the text already emitted {:?}",
                self.ids, self.prefix
            )));
        };
        let new_text = new_text.to_string();
        let new_prefix_index = self.ids.len() - self.prefix_index;
        self.ids.drain(..self.prefix_index);
        self.prefix = self.decode(&self.ids)?;
        self.prefix_index = new_prefix_index;
        Ok(Some(new_text))
    }

    /// Ends the stream: returns the text still held back (which may end in U+FFFD if the ids
    /// really end inside a character) and resets the decoder for a new sequence.
    ///
    /// Errors: as [`StreamDecoder::push`].
    pub fn flush(&mut self) -> Result<Option<String>, TokenizerError> {
        let text = self.decode(&self.ids)?;
        let rest = match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                return Err(TokenizerError::Decode(format!(
                    "stream: final text {text:?} does not extend the text already emitted {:?}",
                    self.prefix
                )))
            }
        };
        self.reset();
        Ok((!rest.is_empty()).then_some(rest))
    }

    /// Forgets every pushed id (start of a new sequence).
    pub fn reset(&mut self) {
        self.ids.clear();
        self.prefix.clear();
        self.prefix_index = 0;
    }

    /// The tokenizer this decoder uses.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{single_byte_gpt2, tiny_spm};
    use super::*;
    use std::sync::Arc;

    /// Pushes every id; returns the chunks (push results, then flush) and checks that chunks
    /// hold no U+FFFD unless the full decode has one.
    fn stream_chunks(tok: &Tokenizer, ids: &[u32], skip: bool) -> Vec<String> {
        let full = tok.decode(ids, skip).expect("decode");
        let mut dec = tok.stream_decoder(skip);
        let mut chunks = Vec::new();
        for &id in ids {
            if let Some(c) = dec.push(id).expect("push") {
                assert!(!c.is_empty(), "empty chunk");
                if !full.contains(char::REPLACEMENT_CHARACTER) {
                    assert!(
                        !c.contains(char::REPLACEMENT_CHARACTER),
                        "partial chunk {c:?}"
                    );
                }
                chunks.push(c);
            }
        }
        if let Some(c) = dec.flush().expect("flush") {
            chunks.push(c);
        }
        assert_eq!(chunks.concat(), full, "stream vs full decode of {ids:?}");
        chunks
    }

    const MULTIBYTE: &str = "I love 🦀 and 你好, naïve 👨‍👩‍👧!";

    #[test]
    fn byte_level_bytes_split_across_tokens() {
        let tok = Tokenizer::from_gguf_metadata(&single_byte_gpt2()).expect("tokenizer");
        let ids = tok.encode(MULTIBYTE, false).expect("encode");
        assert_eq!(ids.len(), MULTIBYTE.len(), "one token per byte");
        let chunks = stream_chunks(&tok, &ids, false);
        assert_eq!(chunks.concat(), MULTIBYTE);
        // Every multi-byte character comes out whole: the crab is one chunk of 4 bytes.
        assert!(chunks.iter().any(|c| c == "🦀"), "{chunks:?}");
        assert!(chunks.iter().any(|c| c == "你"), "{chunks:?}");
    }

    #[test]
    fn holds_back_until_the_character_is_complete() {
        let tok = Tokenizer::from_gguf_metadata(&single_byte_gpt2()).expect("tokenizer");
        let ids = tok.encode("🦀", false).expect("encode");
        assert_eq!(ids.len(), 4);
        let mut dec = StreamDecoder::new(Arc::new(tok.clone()), false);
        for &id in &ids[..3] {
            assert_eq!(dec.push(id).expect("push"), None);
        }
        assert_eq!(dec.push(ids[3]).expect("push").as_deref(), Some("🦀"));
        assert_eq!(dec.flush().expect("flush"), None);
    }

    #[test]
    fn flush_returns_truncated_tail_as_decode_does() {
        let tok = Tokenizer::from_gguf_metadata(&single_byte_gpt2()).expect("tokenizer");
        let mut ids = tok.encode("ok 你", false).expect("encode");
        ids.pop(); // cut the last character in the middle
        let chunks = stream_chunks(&tok, &ids, false);
        assert_eq!(chunks.concat(), tok.decode(&ids, false).expect("decode"));
        assert!(chunks
            .last()
            .is_some_and(|c| c.ends_with(char::REPLACEMENT_CHARACTER)));
    }

    #[test]
    fn spm_byte_fallback_and_leading_space() {
        let tok = Tokenizer::from_gguf_metadata(&tiny_spm()).expect("tokenizer");
        let text = "ab a 你好 🦀 b";
        let ids = tok.encode(text, true).expect("encode");
        assert_eq!(ids[0], 1, "BOS");
        // `你` is not a piece: three <0xNN> byte tokens.
        assert!(ids.contains(&(3 + 0xE4)), "{ids:?}");
        assert_eq!(tok.decode(&ids, true).expect("decode"), text);
        let chunks = stream_chunks(&tok, &ids, true);
        assert_eq!(chunks.concat(), text);
        assert!(chunks.iter().any(|c| c == "你"), "{chunks:?}");
        // Keeping special tokens: `<s>` then the text, whose first `▁` the decoder keeps
        // because it is no longer the first token.
        let chunks = stream_chunks(&tok, &ids, false);
        assert_eq!(chunks.concat(), format!("<s> {text}"));
    }

    #[test]
    fn unknown_id_is_an_error_and_keeps_state() {
        let tok = Tokenizer::from_gguf_metadata(&single_byte_gpt2()).expect("tokenizer");
        let mut dec = tok.stream_decoder(false);
        assert_eq!(
            dec.push(tok.token_to_id("h").expect("h"))
                .expect("push")
                .as_deref(),
            Some("h")
        );
        let err = dec.push(100_000).expect_err("out of range");
        assert!(
            matches!(err, TokenizerError::UnknownTokenId { id: 100_000, .. }),
            "{err}"
        );
        assert_eq!(
            dec.push(tok.token_to_id("i").expect("i"))
                .expect("push")
                .as_deref(),
            Some("i")
        );
    }
}
