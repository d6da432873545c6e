//! Text generation, in two layers as mlx-lm's `generate_step` / `stream_generate`:
//! - [`stepper`]: the tokens. The model prefills the encoded prompt (images included), then
//!   each step is one forward pass, the sampler's chain of logits processors and a token id,
//!   with its log-probabilities when asked for.
//! - this module: the text. [`Generation`] consumes the stepper and turns tokens into an
//!   iterator of [`Event`]s (the shape of mlx-lm's `stream_generate` and MLX Swift's `generate`
//!   stream): detokenizing, stop strings and held-back text, `max_tokens`, end-of-generation
//!   tokens, a full context, statistics. The CLI, the chat session and the server all consume
//!   it.

pub mod batch;
pub mod engine;
pub mod stepper;

#[cfg(test)]
mod constrained_tests;

use std::time::{Duration, Instant};

use crate::constrain::{Constraint, GrammarEnv, GrammarMask};
use crate::kv_cache::KvCache;
use crate::memory;
use crate::models::{CausalLM, ModelInput};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{Error, Result};

pub use stepper::{
    token_logprobs, Next, PrefillStats, Token, TokenLogprobs, TokenState, TokenStepper,
};

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most new tokens to generate.
    pub max_tokens: usize,
    /// Sampler settings.
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first occurrence of any of them, which is not
    /// part of the returned text.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens (for benchmarks and reference comparisons).
    pub ignore_eos: bool,
    /// Prompt tokens processed per forward pass during prefill (bounds activation memory).
    pub prefill_chunk: usize,
    /// `Some(k)`: compute each generated token's log-probability and the `k` most likely
    /// alternatives ([`TokenLogprobs`], carried by [`Event::Token`]). `None` (the default)
    /// computes nothing.
    pub logprobs: Option<usize>,
    /// What the generated text must match ([`Constraint`]): a grammar masks the logits at
    /// every step. `None` (the default): unconstrained. The output is closed within
    /// `max_tokens` where the budget allows: once the tokens left barely cover a way to the
    /// end of the grammar, only that way is allowed ([`crate::constrain::closing`]), so a
    /// model that loops inside a JSON string still ends with a complete value.
    pub constraint: Option<Constraint>,
    /// With a constraint: tokens the grammar forces (the fixed `{"name": "` of a tool call,
    /// a schema's property names) are appended without sampling and fed to the model in one
    /// forward pass instead of one pass each ([`TokenStepper::with_fast_forward`]). Greedy
    /// output is the same either way. Default `true`; off when [`GenerateParams::logprobs`]
    /// are asked for (a forced token's log-probability would need the pass after it).
    pub fast_forward: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            prefill_chunk: 512,
            logprobs: None,
            constraint: None,
            fast_forward: true,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// A stop string was produced (the string is given).
    Stop(String),
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
}

impl FinishReason {
    /// The OpenAI-style name: `stop` or `length`.
    pub fn as_openai(&self) -> &'static str {
        match self {
            Self::Eos | Self::Stop(_) => "stop",
            Self::MaxTokens | Self::ContextFull => "length",
        }
    }
}

/// Figures about one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    /// Tokens prefilled (the prompt, less what the cache already held).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Wall time of the prefill.
    pub prefill_time: Duration,
    /// Wall time of decoding (from the first generated token's forward pass on).
    pub decode_time: Duration,
    /// Peak resident memory of the process, bytes (Linux).
    pub peak_memory_bytes: Option<u64>,
    /// Image tokens of each image of the prompt (vision-language models).
    pub image_tokens: Vec<usize>,
    /// Wall time of the vision tower over the prompt's images (part of the prefill).
    pub vision_time: Duration,
    /// Forward passes after the prefill: `generated_tokens - 1` (or one less, at a stop),
    /// fewer when a grammar's forced tokens were fed together
    /// ([`GenerateParams::fast_forward`]).
    pub decode_passes: usize,
}

impl GenerationStats {
    /// Prefill tokens per second.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_time)
    }
    /// Decode tokens per second: tokens after the first over the decode time (the first token
    /// comes out of the prefill).
    pub fn decode_tokens_per_second(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// One step of a generation stream.
#[derive(Debug, Clone)]
pub enum Event {
    /// A token was generated. `text` is the text that became final with it (may be empty when
    /// bytes of a multi-byte character or a possible stop string are held back).
    Token {
        /// The token id.
        id: u32,
        /// Newly final text.
        text: String,
        /// The token's log-probabilities, when [`GenerateParams::logprobs`] asks for them.
        logprobs: Option<TokenLogprobs>,
    },
    /// Text held back earlier (a possible stop-string prefix or an incomplete character)
    /// that became final when generation ended. Comes just before [`Event::Finished`].
    Text(String),
    /// Generation ended.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Counts and speeds.
        stats: GenerationStats,
    },
}

/// A running generation: iterate it for [`Event`]s. Dropping it early cancels; the cache then
/// holds the prompt and the tokens generated so far.
pub struct Generation<'a> {
    stepper: TokenStepper<'a>,
    /// The token chosen after the last [`Event::Token`] (that event's token was fed to the
    /// model to choose it).
    next_token: Option<Token>,
    text: TextState<'a>,
}

/// The text half of one sequence's generation, without the model: detokenizing, stop strings
/// and held-back text, `max_tokens`, end-of-generation tokens, a full context, statistics.
/// Fed one [`Token`] at a time ([`Self::push`]), it queues the [`Event`]s they make. Shared by
/// [`Generation`] and the batched [`batch::BatchGenerator`].
pub(crate) struct TextState<'a> {
    tokenizer: &'a Tokenizer,
    context_length: usize,
    params: GenerateParams,
    decoder: StreamDecoder<&'a Tokenizer>,
    text: String,
    emitted: usize,
    stats: GenerationStats,
    decode_started: Option<Instant>,
    queue: std::collections::VecDeque<Event>,
    done: bool,
}

/// Starts generating after `prompt` (token ids), a text prompt: [`generate_input`] with
/// [`ModelInput::text`].
///
/// Errors: as [`generate_input`].
pub fn generate<'a>(
    model: &'a dyn CausalLM,
    tokenizer: &'a Tokenizer,
    cache: &'a mut KvCache,
    prompt: &[u32],
    params: GenerateParams,
) -> Result<Generation<'a>> {
    generate_input(
        model,
        tokenizer,
        cache,
        ModelInput::text(prompt.to_vec()),
        params,
    )
}

/// Starts generating after `input`, an encoded prompt: token ids and, for a vision-language
/// model, the preprocessed images whose placeholder tokens the ids hold (expanded, see
/// [`crate::loader::LoadedModel::encode_multimodal`]), in prompt order. The prompt is appended
/// to whatever `cache` already holds (pass a fresh `model.new_cache()` for a one-shot
/// generation). Nothing runs until the first event is asked for: the model then prefills the
/// prompt ([`CausalLM::prefill`]: chunks of [`GenerateParams::prefill_chunk`] tokens, or with
/// images the vision tower and the whole prompt in one pass, see
/// [`GenerationStats::vision_time`], [`GenerationStats::image_tokens`]).
///
/// With [`GenerateParams::constraint`], the tokenizer's grammar environment is built on first
/// use ([`GrammarEnv::for_tokenizer`], cached), the grammar compiled and a [`GrammarMask`]
/// added to the sampler; generation then ends with [`FinishReason::Eos`] once the grammar is
/// complete (only end-of-generation tokens are allowed there).
///
/// Errors: [`Error::InvalidArgument`] when the model takes no images and `input` has some,
/// for an empty prompt, a token id outside the vocabulary or invalid sampling parameters;
/// [`Error::ContextOverflow`] when the prompt does not fit in the model's context;
/// [`Error::Constraint`] when the constraint does not compile or the tokenizer's vocabulary
/// cannot be read as bytes. During generation, [`Error::Constraint`] when the grammar allows
/// no token.
pub fn generate_input<'a>(
    model: &'a dyn CausalLM,
    tokenizer: &'a Tokenizer,
    cache: &'a mut KvCache,
    input: ModelInput,
    params: GenerateParams,
) -> Result<Generation<'a>> {
    let (state, text) = sequence_parts(model, tokenizer, cache.offset(), input, params)?;
    let chunk = text.params.prefill_chunk.max(1);
    Ok(Generation {
        stepper: TokenStepper::from_state(model, cache, state, chunk),
        next_token: None,
        text,
    })
}

/// Checks a prompt that will be appended after `cache_offset` positions and builds the two
/// halves of its generation: the token state (the sampler chain with the grammar mask of
/// [`GenerateParams::constraint`], fast-forward) and the text state. What
/// [`generate_input`] and [`batch::BatchGenerator::insert`] share.
///
/// Errors: as [`generate_input`].
pub(crate) fn sequence_parts<'a>(
    model: &dyn CausalLM,
    tokenizer: &'a Tokenizer,
    cache_offset: usize,
    input: ModelInput,
    params: GenerateParams,
) -> Result<(TokenState, TextState<'a>)> {
    if !input.images.is_empty() && model.vision().is_none() {
        return Err(Error::InvalidArgument(format!(
            "the {} model takes no images",
            model.info().architecture
        )));
    }
    let prompt = &input.ids;
    let ctx = model.info().context_length;
    if prompt.is_empty() && cache_offset == 0 {
        return Err(Error::InvalidArgument("the prompt is empty".into()));
    }
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt adds no tokens to the cache".into(),
        ));
    }
    if cache_offset + prompt.len() >= ctx {
        return Err(Error::ContextOverflow {
            prompt_tokens: cache_offset + prompt.len(),
            context_length: ctx,
            max_tokens: params.max_tokens,
        });
    }
    let vocab = model.info().vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::InvalidArgument(format!(
            "token id {bad} is outside the vocabulary ({vocab})"
        )));
    }
    let mut sampler = Sampler::new(params.sampling.clone())?;
    if let Some(c) = &params.constraint {
        let env = GrammarEnv::for_tokenizer(tokenizer)?;
        // Steps left: `max_tokens`, or fewer when the context fills first.
        let budget = params.max_tokens.min(ctx - cache_offset - prompt.len());
        let fast_forward = params.fast_forward && params.logprobs.is_none();
        let mask = GrammarMask::with_options(env, c, fast_forward, Some(budget))?;
        sampler = sampler.with_processor(Box::new(mask));
    }
    let state = TokenState::new(input, sampler, params.logprobs)
        .with_fast_forward(params.fast_forward && params.constraint.is_some());
    Ok((state, TextState::new(tokenizer, ctx, params)))
}

impl Generation<'_> {
    /// The next token from the stepper; the prefill's figures join the stats once it ran
    /// (the first step, or later when the grammar forces the first tokens).
    fn draw(&mut self) -> Result<Token> {
        let tok = self.stepper.step()?;
        if let Some(p) = self.stepper.prefill_stats() {
            self.text.set_prefill(p);
        }
        Ok(tok)
    }

    fn step(&mut self) -> Result<()> {
        let tok = match self.next_token.take() {
            Some(t) => t,
            None => self.draw()?,
        };
        let (positions, passes) = (self.stepper.positions(), self.stepper.decode_passes());
        if self.text.push(tok, positions, passes)? {
            return Ok(());
        }
        // Run the next forward pass now, so each event follows one forward pass.
        self.next_token = Some(self.draw()?);
        Ok(())
    }
}

impl<'a> TextState<'a> {
    /// The text state of a generation under `params` in a context of `context_length`.
    pub(crate) fn new(
        tokenizer: &'a Tokenizer,
        context_length: usize,
        params: GenerateParams,
    ) -> Self {
        Self {
            tokenizer,
            context_length,
            params,
            decoder: StreamDecoder::new(tokenizer, true),
            text: String::new(),
            emitted: 0,
            stats: GenerationStats::default(),
            decode_started: None,
            queue: Default::default(),
            done: false,
        }
    }

    /// The generation's parameters.
    pub(crate) fn params(&self) -> &GenerateParams {
        &self.params
    }

    /// Whether the [`Event::Finished`] (or an error) was queued.
    pub(crate) fn done(&self) -> bool {
        self.done
    }

    /// Marks the generation ended by an error: nothing more is queued.
    pub(crate) fn fail(&mut self) {
        self.done = true;
    }

    /// The next queued event.
    pub(crate) fn pop(&mut self) -> Option<Event> {
        self.queue.pop_front()
    }

    /// Takes the prefill's figures into the stats (once).
    pub(crate) fn set_prefill(&mut self, p: &PrefillStats) {
        if self.stats.prefill_time.is_zero() {
            self.stats.prompt_tokens = p.prompt_tokens;
            self.stats.prefill_time = p.time;
            self.stats.vision_time = p.vision_time;
            self.stats.image_tokens = p.image_tokens.clone();
        }
    }

    /// Queues the held-back text (if any) and the final event.
    fn finish(&mut self, reason: FinishReason, flush: bool, decode_passes: usize) -> Result<()> {
        if flush {
            let tail = self.decoder.flush()?.unwrap_or_default();
            // A reply cut inside a character (max_tokens, EOS or a full context after part of
            // an emoji's bytes) decodes to trailing U+FFFD: those bytes are dropped, never
            // shown as a broken character.
            self.text
                .push_str(tail.trim_end_matches(char::REPLACEMENT_CHARACTER));
            if self.emitted < self.text.len() {
                self.queue
                    .push_back(Event::Text(self.text[self.emitted..].to_string()));
                self.emitted = self.text.len();
            }
        }
        if let Some(t) = self.decode_started {
            self.stats.decode_time = t.elapsed();
        }
        self.stats.decode_passes = decode_passes;
        self.stats.peak_memory_bytes = memory::snapshot().peak_resident_bytes;
        self.queue.push_back(Event::Finished {
            reason,
            stats: self.stats.clone(),
        });
        self.done = true;
        Ok(())
    }

    /// Length of the longest suffix of `self.text` that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for s in &self.params.stop {
            for (i, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        hold
    }

    /// Takes the next generated token and queues its events. `positions`: the positions the
    /// sequence's cache will hold once every token yielded so far (this one included) is fed
    /// ([`TokenStepper::positions`]); `decode_passes`: the forward passes after the prefill so
    /// far (for the stats). Returns whether the generation ended (its
    /// [`Event::Finished`] is queued).
    ///
    /// Errors: the tokenizer's (decoding).
    pub(crate) fn push(
        &mut self,
        tok: Token,
        positions: usize,
        decode_passes: usize,
    ) -> Result<bool> {
        if self.decode_started.is_none() {
            self.decode_started = Some(Instant::now());
        }
        let Token { id: tok, logprobs } = tok;
        if !self.params.ignore_eos && self.tokenizer.is_eog(tok) {
            self.finish(FinishReason::Eos, true, decode_passes)?;
            return Ok(true);
        }
        self.stats.generated_tokens += 1;
        let piece = self.decoder.push(tok)?.unwrap_or_default();
        self.text.push_str(&piece);
        // Stop strings: search only the region that the new text could complete.
        let longest = self.params.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .params
            .stop
            .iter()
            .filter_map(|s| {
                self.text[from..]
                    .find(s.as_str())
                    .map(|p| (from + p, s.clone()))
            })
            .min_by_key(|(p, _)| *p);
        if let Some((pos, stop)) = hit {
            let text = self.text[self.emitted.min(pos)..pos].to_string();
            self.emitted = pos;
            self.queue.push_back(Event::Token {
                id: tok,
                text,
                logprobs,
            });
            self.finish(FinishReason::Stop(stop), false, decode_passes)?;
            return Ok(true);
        }
        let safe = self.text.len() - self.held_back();
        let text = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        self.queue.push_back(Event::Token {
            id: tok,
            text,
            logprobs,
        });
        if self.stats.generated_tokens >= self.params.max_tokens {
            self.finish(FinishReason::MaxTokens, true, decode_passes)?;
            return Ok(true);
        }
        if positions >= self.context_length {
            self.finish(FinishReason::ContextFull, true, decode_passes)?;
            return Ok(true);
        }
        Ok(false)
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.text.pop() {
            return Some(Ok(e));
        }
        if self.text.done() {
            return None;
        }
        match self.step() {
            Ok(()) => self.text.pop().map(Ok),
            Err(e) => {
                self.text.fail();
                Some(Err(e))
            }
        }
    }
}

/// The whole result of a generation, for callers that do not stream.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// The generated text (stop string excluded).
    pub text: String,
    /// The generated token ids (end-of-generation token excluded).
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Counts and speeds.
    pub stats: GenerationStats,
}

impl Generation<'_> {
    /// Runs the generation to its end and collects the result.
    pub fn collect_output(self) -> Result<GenerationOutput> {
        let mut text = String::new();
        let mut token_ids = Vec::new();
        for ev in self {
            match ev? {
                Event::Token { id, text: t, .. } => {
                    token_ids.push(id);
                    text.push_str(&t);
                }
                Event::Text(t) => text.push_str(&t),
                Event::Finished { reason, stats } => {
                    return Ok(GenerationOutput {
                        text,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Logits, ModelInfo};
    use crate::tokenizer::test_util::single_byte_gpt2;
    use candle_core::{Device, Tensor};

    /// A model that answers each token with a fixed next token (`next[id]`).
    struct Chain {
        next: Vec<u32>,
        info: ModelInfo,
    }

    impl CausalLM for Chain {
        fn forward(&self, ids: &Tensor, _: &mut KvCache, _: Logits) -> Result<Tensor> {
            let ids: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
            let mut row = vec![0f32; self.info.vocab_size];
            row[self.next[*ids.last().expect("a token") as usize] as usize] = 10.0;
            Ok(Tensor::new(row.as_slice(), &Device::Cpu)?.unsqueeze(0)?)
        }
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn device(&self) -> &Device {
            &Device::Cpu
        }
    }

    /// max_tokens ends the reply after two of the crab's four bytes: the text stops before it,
    /// with no U+FFFD.
    #[test]
    fn a_reply_cut_inside_a_character_never_ends_in_a_broken_one() {
        let tok = Tokenizer::from_gguf_metadata(&single_byte_gpt2()).expect("tokenizer");
        let ids = tok.encode("ok \u{1F980}", false).expect("encode");
        assert_eq!(ids.len(), 7, "one token per byte");
        let vocab = tok.vocab_size();
        let mut next: Vec<u32> = (0..vocab as u32).collect();
        for w in ids.windows(2) {
            next[w[0] as usize] = w[1];
        }
        let model = Chain {
            next,
            info: ModelInfo {
                architecture: "chain".into(),
                vocab_size: vocab,
                n_layers: 0,
                hidden_size: 1,
                n_kv_heads: 1,
                head_dim: 1,
                context_length: 64,
            },
        };
        let mut cache = model.new_cache();
        let params = GenerateParams {
            max_tokens: 4,
            ..Default::default()
        };
        let mut text = String::new();
        let mut reason = None;
        for e in generate(&model, &tok, &mut cache, &ids[..1], params).expect("starts") {
            match e.expect("event") {
                Event::Token { text: t, .. } | Event::Text(t) => text.push_str(&t),
                Event::Finished { reason: r, .. } => reason = Some(r),
            }
        }
        assert_eq!(reason, Some(FinishReason::MaxTokens));
        assert_eq!(text, "k ");
    }
}
