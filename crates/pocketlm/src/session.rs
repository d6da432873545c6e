//! Multi-turn chat that never re-encodes what the KV cache already holds.
//!
//! A [`ChatSession`] keeps the conversation (system prompt and messages), the generation
//! parameters and a [`KvCache`] between turns, with the token ids that cache holds. Each turn
//! renders the whole history with the model's chat template (so the prompt is exactly what a
//! fresh run would see), tokenizes it, and compares it with the cached ids: the cache is cut
//! back to the longest common prefix ([`KvCache::truncate`]) and only the rest is prefilled.
//! The previous reply's tokens are in the cache, so a turn normally prefills only the
//! template's end-of-turn tokens and the new user message. When the template rewrites history
//! (or the cache cannot be cut back) nothing is shared and the turn falls back to a full
//! prefill.
//!
//! The shape follows MLX Swift's `ChatSession` (`respond(to:)`, `streamResponse(to:)`); mlx-lm's
//! `chat` keeps a prompt cache the same way but re-encodes the history.

use std::sync::Arc;

use crate::chat_template::Message;
use crate::generate::{
    generate_input, Event, FinishReason, GenerateParams, Generation, GenerationOutput,
};
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::loader::{LoadedModel, Prompt};
use crate::{Error, Result};

pub use crate::prompt_cache::common_prefix_len;

/// What a session does when the conversation no longer fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowStrategy {
    /// Refuse the turn with [`Error::ContextOverflow`] when its prompt does not fit in the
    /// context ([`SessionOptions::context_length`]).
    #[default]
    Error,
    /// Keep the whole history but let a rotating cache ([`KvCacheConfig::max_kv_size`], 2048
    /// when unset) hold only its first tokens and a sliding window. Memory stays bounded; the
    /// model's context length still bounds the positions (RoPE), beyond which the turn is
    /// refused as with [`OverflowStrategy::Error`].
    Rotate,
    /// Drop the oldest messages after the system prompt (a user message and the replies that
    /// follow it) until the prompt plus `max_tokens` fits in the context
    /// ([`SessionOptions::context_length`]). The turn is refused when even its own message does
    /// not fit.
    TruncateOldestTurns,
}

/// How to set a session up.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// A system message that starts every rendering of the conversation.
    pub system: Option<String>,
    /// Generation parameters of every turn.
    pub params: GenerateParams,
    /// The KV cache kind.
    pub cache: KvCacheConfig,
    /// What to do when the conversation fills the context.
    pub overflow: OverflowStrategy,
    /// Tokens a turn's prompt (plus `max_tokens` with [`OverflowStrategy::TruncateOldestTurns`])
    /// may use; `None` or more than the model's context length: the model's context length.
    pub context_length: Option<usize>,
}

/// A conversation with a loaded model that keeps its KV cache between turns.
pub struct ChatSession {
    model: Arc<LoadedModel>,
    system: Option<String>,
    history: Vec<Message>,
    params: GenerateParams,
    overflow: OverflowStrategy,
    context_length: usize,
    cache_config: KvCacheConfig,
    cache: KvCache,
    /// Token ids whose keys/values the cache holds (a superset after a cancelled or failed
    /// stream; cut to `cache.offset()` at the next turn).
    cached_ids: Vec<u32>,
    /// Set when a forward pass failed: the layers may disagree, start over.
    poisoned: bool,
}

impl std::fmt::Debug for ChatSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatSession")
            .field("model", &self.model.path)
            .field("messages", &self.history.len())
            .field("cached_tokens", &self.cached_ids.len())
            .finish()
    }
}

impl ChatSession {
    /// A new, empty conversation.
    ///
    /// Errors: [`Error::Model`] when the model has no chat template; bad cache options (see
    /// [`crate::models::CausalLM::make_cache`]).
    pub fn new(model: Arc<LoadedModel>, options: SessionOptions) -> Result<Self> {
        if model.chat_template.is_none() {
            return Err(Error::Model(format!(
                "{}: the model has no chat template, so it cannot hold a chat session",
                model.path.display()
            )));
        }
        let mut cache_config = options.cache;
        if options.overflow == OverflowStrategy::Rotate && cache_config.max_kv_size.is_none() {
            cache_config.max_kv_size = Some(2048);
        }
        let cache = model.model.make_cache(&cache_config)?;
        let context_length = options
            .context_length
            .unwrap_or(usize::MAX)
            .min(model.model.info().context_length);
        Ok(Self {
            model,
            system: options.system,
            history: Vec::new(),
            params: options.params,
            overflow: options.overflow,
            context_length,
            cache_config,
            cache,
            cached_ids: Vec::new(),
            poisoned: false,
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// The conversation so far (without the system message).
    pub fn history(&self) -> &[Message] {
        &self.history
    }

    /// The messages a turn renders: the system message, then the history.
    pub fn messages(&self) -> Vec<Message> {
        self.system
            .iter()
            .map(Message::system)
            .chain(self.history.iter().cloned())
            .collect()
    }

    /// The generation parameters (changes apply from the next turn).
    pub fn params_mut(&mut self) -> &mut GenerateParams {
        &mut self.params
    }

    /// Token ids the KV cache holds (positions `0..len`).
    pub fn cached_token_ids(&self) -> &[u32] {
        let n = self.cache.offset().min(self.cached_ids.len());
        &self.cached_ids[..n]
    }

    /// Bytes held by the KV cache.
    pub fn kv_cache_bytes(&self) -> usize {
        self.cache.nbytes()
    }

    /// The KV cache configuration in use.
    pub fn cache_config(&self) -> &KvCacheConfig {
        &self.cache_config
    }

    /// Forgets the conversation and the cache (the system message stays).
    pub fn reset(&mut self) {
        self.history.clear();
        self.cache.reset();
        self.cached_ids.clear();
        self.poisoned = false;
    }

    /// Starts the session from a cache that already holds `ids` (e.g. a reloaded prompt
    /// cache, see [`crate::prompt_cache`]); the next turn reuses whatever prefix of its prompt
    /// matches `ids`.
    ///
    /// Errors: [`Error::InvalidArgument`] when `cache.offset() != ids.len()` or the cache has
    /// a different number of layers than the model.
    pub fn with_cache(&mut self, cache: KvCache, ids: Vec<u32>) -> Result<()> {
        if cache.offset() != ids.len() || cache.n_layers() != self.model.model.info().n_layers {
            return Err(Error::InvalidArgument(format!(
                "the given KV cache holds {} positions in {} layers but {} token ids were given for a {}-layer model",
                cache.offset(),
                cache.n_layers(),
                ids.len(),
                self.model.model.info().n_layers
            )));
        }
        self.cache = cache;
        self.cached_ids = ids;
        self.poisoned = false;
        Ok(())
    }

    /// Answers `text` (a user message) and returns the whole reply.
    ///
    /// Errors: as [`ChatSession::respond_stream`], plus errors during generation.
    pub fn respond(&mut self, text: &str) -> Result<GenerationOutput> {
        let mut reply = String::new();
        let mut token_ids = Vec::new();
        for ev in self.respond_stream(text)? {
            match ev? {
                Event::Token { id, text, .. } => {
                    token_ids.push(id);
                    reply.push_str(&text);
                }
                Event::Text(t) => reply.push_str(&t),
                Event::Finished { reason, stats } => {
                    return Ok(GenerationOutput {
                        text: reply,
                        token_ids,
                        finish_reason: reason,
                        stats,
                    })
                }
            }
        }
        Err(Error::InvalidArgument(
            "generation ended without a finish event".into(),
        ))
    }

    /// Answers `text` (a user message) as a stream of [`Event`]s. The reply joins the history
    /// when the stream finishes or is dropped (a cancelled reply keeps the text produced so
    /// far; one dropped before its first event is forgotten with its user message).
    ///
    /// Errors: template or tokenizer errors; [`Error::ContextOverflow`] when the conversation
    /// does not fit (see [`OverflowStrategy`]). On error the history is unchanged.
    pub fn respond_stream(&mut self, text: &str) -> Result<SessionStream<'_>> {
        self.respond_stream_with_images(text, Vec::new())
    }

    /// As [`ChatSession::respond_stream`], with `images` attached to the user message
    /// (vision-language models; they stay in the history for later turns).
    ///
    /// Errors: as [`ChatSession::respond_stream`]; images for a model that takes none.
    pub fn respond_stream_with_images(
        &mut self,
        text: &str,
        images: Vec<crate::image_processor::RgbImage>,
    ) -> Result<SessionStream<'_>> {
        self.history.push(Message::user(text).with_images(images));
        let (ids, images) = match self.prompt_ids() {
            Ok(p) => (p.ids, p.images),
            Err(e) => {
                self.history.pop();
                return Err(e);
            }
        };
        let mut common = self.reuse_prefix(&ids);
        let mut suffix_images = Vec::new();
        if let Some(v) = self.model.model.vision() {
            // Image k's placeholders are the k-th run of its tokens. A reused prefix may not end
            // inside one; the RoPE delta is that of the images before the cut.
            let mut spans = Vec::with_capacity(images.len());
            let mut i = 0;
            for img in &images {
                while i < ids.len() && ids[i] != v.image_token_id {
                    i += 1;
                }
                spans.push(i);
                i += img.n_tokens();
            }
            if let Some(&start) = images
                .iter()
                .zip(&spans)
                .find(|(img, &s)| common > s && common < s + img.n_tokens())
                .map(|(_, s)| s)
            {
                if self.cache.truncate(start).is_err() {
                    self.cache.reset();
                    common = 0;
                } else {
                    common = start;
                }
                self.cached_ids.truncate(common);
            }
            let mut delta = 0i64;
            for (img, &s) in images.iter().zip(&spans) {
                if s + img.n_tokens() <= common {
                    let [_, h, w] = img.grid_thw;
                    let (lh, lw) = (h / img.merge_size, w / img.merge_size);
                    delta += lh.max(lw) as i64 - img.n_tokens() as i64;
                } else {
                    suffix_images.push(img.clone());
                }
            }
            self.cache.set_rope_delta(delta);
        }
        let Self {
            model,
            history,
            params,
            cache,
            cached_ids,
            poisoned,
            ..
        } = self;
        let input = crate::models::ModelInput {
            ids: ids[common..].to_vec(),
            images: suffix_images,
        };
        let gen = match generate_input(
            model.model.as_ref(),
            &model.tokenizer,
            cache,
            input,
            params.clone(),
        ) {
            Ok(g) => g,
            Err(e) => {
                history.pop();
                return Err(e);
            }
        };
        cached_ids.extend_from_slice(&ids[common..]);
        Ok(SessionStream {
            inner: gen,
            history,
            cached_ids,
            poisoned,
            reply: String::new(),
            started: false,
            finished: false,
        })
    }

    /// The token ids of the whole conversation (with the generation prompt), after applying
    /// the overflow strategy. The history is changed (oldest turns dropped) only on success.
    fn prompt_ids(&mut self) -> Result<crate::loader::EncodedPrompt> {
        let ctx = self.context_length;
        let mut history = self.history.clone();
        loop {
            let messages: Vec<Message> = self
                .system
                .iter()
                .map(Message::system)
                .chain(history.iter().cloned())
                .collect();
            let p = self.model.encode_multimodal(&Prompt::Chat(messages))?;
            let ids = &p.ids;
            match self.overflow {
                OverflowStrategy::Error | OverflowStrategy::Rotate => {
                    if ids.len() >= ctx {
                        return Err(self.overflow_error(ids.len(), ctx));
                    }
                    return Ok(p);
                }
                OverflowStrategy::TruncateOldestTurns => {
                    if ids.len() + self.params.max_tokens <= ctx {
                        self.history = history;
                        return Ok(p);
                    }
                    if !drop_oldest_turn(&mut history) {
                        return Err(self.overflow_error(ids.len(), ctx));
                    }
                }
            }
        }
    }

    fn overflow_error(&self, prompt_tokens: usize, context_length: usize) -> Error {
        Error::ContextOverflow {
            prompt_tokens,
            context_length,
            max_tokens: self.params.max_tokens,
        }
    }

    /// Cuts the cache back to the longest prefix it shares with `ids` and returns that length
    /// (at most `ids.len() - 1`, so that at least one token is prefilled).
    fn reuse_prefix(&mut self, ids: &[u32]) -> usize {
        if self.poisoned {
            self.cache.reset();
            self.cached_ids.clear();
            self.poisoned = false;
        }
        self.cached_ids.truncate(self.cache.offset());
        let common = crate::prompt_cache::reuse_prefix(&mut self.cache, &self.cached_ids, ids);
        self.cached_ids.truncate(common);
        common
    }
}

/// Removes the oldest user message and the messages up to the next user message; never the
/// last user message. Returns whether anything was removed.
fn drop_oldest_turn(history: &mut Vec<Message>) -> bool {
    let Some(last_user) = history.iter().rposition(|m| m.role == "user") else {
        return false;
    };
    if last_user == 0 {
        return false;
    }
    let end = history[1..]
        .iter()
        .position(|m| m.role == "user")
        .map_or(last_user, |p| p + 1)
        .min(last_user);
    history.drain(..end.max(1));
    true
}

/// A reply being generated by a [`ChatSession`]: iterate it for [`Event`]s. Dropping it
/// early cancels the reply and leaves the session usable.
pub struct SessionStream<'a> {
    inner: Generation<'a>,
    history: &'a mut Vec<Message>,
    cached_ids: &'a mut Vec<u32>,
    poisoned: &'a mut bool,
    reply: String,
    started: bool,
    finished: bool,
}

impl SessionStream<'_> {
    fn close(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.started {
            self.history
                .push(Message::assistant(std::mem::take(&mut self.reply)));
        } else {
            // Cancelled before anything was produced: forget the turn.
            self.history.pop();
        }
    }
}

impl Iterator for SessionStream<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        let ev = self.inner.next()?;
        self.started = true;
        match &ev {
            Ok(Event::Token { id, text, .. }) => {
                // Fed to the cache unless it is the last token; the next turn cuts the
                // list to the cache's length.
                self.cached_ids.push(*id);
                self.reply.push_str(text);
            }
            Ok(Event::Text(t)) => self.reply.push_str(t),
            Ok(Event::Finished { reason, .. }) => {
                if *reason == FinishReason::ContextFull {
                    tracing::debug!("chat session: the context is full");
                }
                self.close();
            }
            Err(_) => {
                *self.poisoned = true;
                self.close();
            }
        }
        Some(ev)
    }
}

impl Drop for SessionStream<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix() {
        assert_eq!(common_prefix_len(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix_len(&[], &[1]), 0);
        assert_eq!(common_prefix_len(&[1, 2], &[1, 2, 3]), 2);
    }
}
