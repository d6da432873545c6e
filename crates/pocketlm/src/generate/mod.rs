//! Text generation: prefill the prompt, then decode token by token with a KV cache, exposed
//! as an iterator of [`Event`]s (the shape of mlx-lm's `stream_generate` and MLX Swift's
//! `generate` stream). The CLI, the chat session and the server all consume it.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::image_processor::ProcessedImage;
use crate::kv_cache::KvCache;
use crate::memory;
use crate::models::{CausalLM, Logits};
use crate::sampling::{self, Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{Error, Result};

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
    /// alternatives ([`TokenLogprobs`], read with [`Generation::logprobs`]). `None` (the
    /// default) computes nothing.
    pub logprobs: Option<usize>,
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
        }
    }
}

/// Log-probabilities at one generation step: `log_softmax` of the model's raw logits (before
/// repetition penalty, temperature and the filters), i.e. the model's own distribution, as
/// OpenAI's API and vLLM report `logprobs`. Natural log, f32; `-inf` for a token the model
/// rules out entirely.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The generated token id.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens `(id, logprob)`, most likely first (lower id first on ties);
    /// as many as asked for, fewer only if the vocabulary is smaller. May or may not contain
    /// `id`.
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities of token `id` and of the `top` most likely tokens under `logits`
/// (`[vocab]` f32 raw logits of one position).
///
/// Formula: `logprob_i = x_i - logsumexp(x)` ([`sampling::log_softmax`], after
/// [`sampling::sanitize`]: NaN counts as `-inf`, `+inf` as `f32::MAX`). The top list is chosen
/// with `select_nth_unstable` (no full sort of the vocabulary) then sorted. An `id` outside
/// `logits` gets `-inf`. Cost: one pass over `vocab` plus `O(top log top)`.
pub fn token_logprobs(logits: &[f32], id: u32, top: usize) -> TokenLogprobs {
    let mut lp = logits.to_vec();
    sampling::sanitize(&mut lp);
    sampling::log_softmax(&mut lp);
    let logprob = lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
    let k = top.min(lp.len());
    // Descending by value, then ascending by id: a total order (no NaN after sanitize).
    let order = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
    }
    idx.truncate(k);
    idx.sort_unstable_by(order);
    TokenLogprobs {
        id,
        logprob,
        top: idx.into_iter().map(|i| (i, lp[i as usize])).collect(),
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
    model: &'a dyn CausalLM,
    tokenizer: &'a Tokenizer,
    cache: &'a mut KvCache,
    params: GenerateParams,
    sampler: Sampler,
    pending_prompt: Vec<u32>,
    pending_images: Vec<ProcessedImage>,
    history: Vec<u32>,
    next_token: Option<u32>,
    /// Log-probabilities of `next_token` (when asked for).
    next_logprobs: Option<TokenLogprobs>,
    /// Log-probabilities of the token of the last [`Event::Token`].
    last_logprobs: Option<TokenLogprobs>,
    decoder: StreamDecoder<&'a Tokenizer>,
    text: String,
    emitted: usize,
    stats: GenerationStats,
    decode_started: Option<Instant>,
    queue: std::collections::VecDeque<Event>,
    done: bool,
}

/// Starts generating after `prompt` (token ids). The prompt is appended to whatever `cache`
/// already holds (pass a fresh `model.new_cache()` for a one-shot generation).
///
/// Errors: [`Error::ContextOverflow`] when the prompt does not fit in the model's context;
/// [`Error::InvalidArgument`] for an empty prompt on an empty cache.
pub fn generate<'a>(
    model: &'a dyn CausalLM,
    tokenizer: &'a Tokenizer,
    cache: &'a mut KvCache,
    prompt: &[u32],
    params: GenerateParams,
) -> Result<Generation<'a>> {
    let ctx = model.info().context_length;
    if prompt.is_empty() && cache.offset() == 0 {
        return Err(Error::InvalidArgument("the prompt is empty".into()));
    }
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt adds no tokens to the cache".into(),
        ));
    }
    if cache.offset() + prompt.len() >= ctx {
        return Err(Error::ContextOverflow {
            prompt_tokens: cache.offset() + prompt.len(),
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
    Ok(Generation {
        model,
        tokenizer,
        cache,
        sampler: Sampler::new(params.sampling.clone())?,
        params,
        pending_prompt: prompt.to_vec(),
        pending_images: Vec::new(),
        history: prompt.to_vec(),
        next_token: None,
        next_logprobs: None,
        last_logprobs: None,
        decoder: StreamDecoder::new(tokenizer, true),
        text: String::new(),
        emitted: 0,
        stats: GenerationStats::default(),
        decode_started: None,
        queue: Default::default(),
        done: false,
    })
}

/// As [`generate`], for a vision-language model: `prompt` holds the images' placeholder tokens
/// (expanded, see [`crate::loader::LoadedModel::encode_multimodal`]) and `images` the
/// preprocessed images in prompt order. The prefill runs the vision tower, then the whole
/// prompt in one forward pass ([`GenerationStats::vision_time`], [`GenerationStats::image_tokens`]).
///
/// Errors: as [`generate`]; [`Error::InvalidArgument`] when the model takes no images.
pub fn generate_with_images<'a>(
    model: &'a dyn CausalLM,
    tokenizer: &'a Tokenizer,
    cache: &'a mut KvCache,
    prompt: &[u32],
    images: Vec<ProcessedImage>,
    params: GenerateParams,
) -> Result<Generation<'a>> {
    if !images.is_empty() && model.vision().is_none() {
        return Err(Error::InvalidArgument(format!(
            "the {} model takes no images",
            model.info().architecture
        )));
    }
    let mut g = generate(model, tokenizer, cache, prompt, params)?;
    g.pending_images = images;
    Ok(g)
}

impl Generation<'_> {
    /// Log-probabilities of the token of the last [`Event::Token`] this generation yielded,
    /// when [`GenerateParams::logprobs`] is set (`None` otherwise, and before the first token).
    /// Read it right after receiving the `Token` event.
    pub fn logprobs(&self) -> Option<&TokenLogprobs> {
        self.last_logprobs.as_ref()
    }

    /// Samples the next token from `logits` (`[1, vocab]`) and, when asked, stores its
    /// log-probabilities in `next_logprobs`.
    fn logits_to_token(&mut self, logits: &Tensor) -> Result<u32> {
        let p = self.sampler.params();
        if !logits.device().is_cpu()
            && p.temperature == 0.0
            && p.repetition_penalty == 1.0
            && self.params.logprobs.is_none()
        {
            // Greedy on a GPU: the argmax runs there and one u32 comes back, not the logits.
            self.next_logprobs = None;
            return crate::sampling::argmax_on_device(logits);
        }
        let l: Vec<f32> = logits
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        let window = self.params.sampling.repetition_context_size;
        let recent = &self.history[self.history.len().saturating_sub(window)..];
        let tok = self.sampler.sample(&l, recent);
        self.next_logprobs = self.params.logprobs.map(|k| token_logprobs(&l, tok, k));
        Ok(tok)
    }

    fn prefill(&mut self) -> Result<u32> {
        let t0 = Instant::now();
        let prompt = std::mem::take(&mut self.pending_prompt);
        let images = std::mem::take(&mut self.pending_images);
        let chunk = self.params.prefill_chunk.max(1);
        let mut last = None;
        if !images.is_empty() {
            let tv = Instant::now();
            let features = self.model.encode_images(&images)?;
            self.stats.vision_time = tv.elapsed();
            self.stats.image_tokens = images.iter().map(|i| i.n_tokens()).collect();
            let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
            let ids = Tensor::new(prompt.as_slice(), self.model_device())?.unsqueeze(0)?;
            last = Some(self.model.forward_with_image_features(
                &ids,
                &features,
                &grids,
                self.cache,
                Logits::Last,
            )?);
        }
        let text_parts = if last.is_none() {
            prompt.chunks(chunk).collect()
        } else {
            Vec::new()
        };
        for part in text_parts {
            let ids = Tensor::new(part, self.model_device())?.unsqueeze(0)?;
            last = Some(self.model.forward(&ids, self.cache, Logits::Last)?);
        }
        let logits = last.ok_or_else(|| Error::InvalidArgument("the prompt is empty".into()))?;
        crate::memory::release_free_heap();
        let tok = self.logits_to_token(&logits)?;
        self.stats.prompt_tokens = prompt.len();
        self.stats.prefill_time = t0.elapsed();
        Ok(tok)
    }

    fn model_device(&self) -> &candle_core::Device {
        self.model.device()
    }

    /// Queues the held-back text (if any) and the final event.
    fn finish(&mut self, reason: FinishReason, flush: bool) -> Result<()> {
        if flush {
            let tail = self.decoder.flush()?.unwrap_or_default();
            self.text.push_str(&tail);
            if self.emitted < self.text.len() {
                self.queue
                    .push_back(Event::Text(self.text[self.emitted..].to_string()));
                self.emitted = self.text.len();
            }
        }
        if let Some(t) = self.decode_started {
            self.stats.decode_time = t.elapsed();
        }
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

    fn step(&mut self) -> Result<()> {
        let tok = match self.next_token.take() {
            Some(t) => t,
            None => self.prefill()?,
        };
        if self.decode_started.is_none() {
            self.decode_started = Some(Instant::now());
        }
        let logprobs = self.next_logprobs.take();
        if !self.params.ignore_eos && self.tokenizer.is_eog(tok) {
            return self.finish(FinishReason::Eos, true);
        }
        self.stats.generated_tokens += 1;
        self.history.push(tok);
        self.last_logprobs = logprobs;
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
            self.queue.push_back(Event::Token { id: tok, text });
            return self.finish(FinishReason::Stop(stop), false);
        }
        let safe = self.text.len() - self.held_back();
        let text = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        self.queue.push_back(Event::Token { id: tok, text });
        if self.stats.generated_tokens >= self.params.max_tokens {
            return self.finish(FinishReason::MaxTokens, true);
        }
        if self.cache.offset() + 1 >= self.model.info().context_length {
            return self.finish(FinishReason::ContextFull, true);
        }
        // Run the next forward pass now, so each event follows one forward pass.
        let ids = Tensor::new(&[tok], self.model_device())?.unsqueeze(0)?;
        let logits = self.model.forward(&ids, self.cache, Logits::Last)?;
        self.next_token = Some(self.logits_to_token(&logits)?);
        Ok(())
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.queue.pop_front() {
            return Some(Ok(e));
        }
        if self.done {
            return None;
        }
        match self.step() {
            Ok(()) => self.queue.pop_front().map(Ok),
            Err(e) => {
                self.done = true;
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
                Event::Token { id, text: t } => {
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
    use rand::{Rng, SeedableRng};

    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-20.0f32..20.0)).collect()
    }

    #[test]
    fn logprobs_are_a_normalized_log_softmax() {
        for (n, seed) in [(1, 0), (7, 1), (1000, 2), (49152, 3)] {
            let logits = random_logits(n, seed);
            let all = token_logprobs(&logits, 0, n);
            assert_eq!(all.top.len(), n);
            let sum: f64 = all.top.iter().map(|&(_, l)| f64::from(l).exp()).sum();
            assert!(
                (sum - 1.0).abs() < 1e-4,
                "n={n}: sum of probabilities {sum}"
            );
            // A shift of the logits changes nothing; differences of logprobs are those of
            // logits.
            let shifted: Vec<f32> = logits.iter().map(|x| x + 3.5).collect();
            let s = token_logprobs(&shifted, 0, 0);
            assert!((s.logprob - all.logprob).abs() < 1e-4);
            for &(i, l) in all.top.iter().take(20) {
                let d = (l - all.logprob) - (logits[i as usize] - logits[0]);
                assert!(d.abs() < 1e-3, "n={n} id={i}: {d}");
            }
        }
    }

    #[test]
    fn top_is_sorted_and_agrees_with_the_chosen_token() {
        let logits = random_logits(5000, 7);
        let full = token_logprobs(&logits, 0, logits.len());
        for k in [0, 1, 5, 20] {
            for id in [0u32, 17, 4999] {
                let t = token_logprobs(&logits, id, k);
                assert_eq!(t.id, id);
                assert_eq!(t.top.len(), k);
                assert!(
                    t.top.windows(2).all(|w| w[0].1 >= w[1].1),
                    "sorted: {:?}",
                    t.top
                );
                // The k best of the full ranking.
                assert_eq!(t.top, full.top[..k].to_vec());
                if let Some(&(_, l)) = t.top.iter().find(|(i, _)| *i == id) {
                    assert_eq!(l, t.logprob);
                }
            }
        }
        // The argmax is first and carries the chosen token's value.
        let best = sampling::argmax(&logits);
        let t = token_logprobs(&logits, best, 3);
        assert_eq!(t.top[0], (best, t.logprob));
    }

    #[test]
    fn ties_order_by_id_and_odd_values_are_safe() {
        let t = token_logprobs(&[1.0, 2.0, 2.0, 1.0], 3, 10);
        let ids: Vec<u32> = t.top.iter().map(|p| p.0).collect();
        assert_eq!(
            ids,
            vec![1, 2, 0, 3],
            "capped at the vocabulary, ties by id"
        );
        let e = (1.0f64.exp() * 2.0 + 2.0f64.exp() * 2.0).ln();
        assert!((f64::from(t.logprob) - (1.0 - e)).abs() < 1e-6);
        // NaN is ruled out (-inf), an id outside the vocabulary too.
        let t = token_logprobs(&[f32::NAN, 0.0, 0.0], 0, 3);
        assert_eq!(t.logprob, f32::NEG_INFINITY);
        assert_eq!(t.top[0], (1, -(2.0f32.ln())));
        assert_eq!(t.top[2].1, f32::NEG_INFINITY);
        assert_eq!(token_logprobs(&[0.0], 5, 1).logprob, f32::NEG_INFINITY);
        assert!(token_logprobs(&[], 0, 4).top.is_empty());
    }
}
