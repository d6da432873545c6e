//! Logits processors: the links of the [`super::Sampler`] chain, one small type per step, each
//! a wrapper of one of the pure functions of [`super`] (as mlx-lm's `logits_processors` and
//! the filters of `make_sampler`, llama.cpp's `llama_sampler_chain`).
//!
//! A processor rewrites the `[vocab]` f32 scores of one step in place. More processors (a
//! grammar mask for constrained decoding, logit biases) are added to a sampler with
//! [`super::Sampler::with_processor`].

use super::{
    apply_logit_bias, apply_min_p, apply_presence_frequency_penalty, apply_repetition_penalty,
    apply_temperature, log_softmax, sanitize, top_k_with, top_p_with,
};

/// One step of the sampling chain: rewrites the scores of the next token in place.
pub trait LogitsProcessor: Send {
    /// A short name for debugging output (`"top_k"`).
    fn name(&self) -> &str;
    /// Rewrites `logits` (`[vocab]` f32: raw logits or log-probabilities, depending on where
    /// the processor sits in the chain) given `history`, the token ids of the prompt and of
    /// the tokens generated so far, oldest first. A token set to `-inf` is never drawn.
    fn process(&mut self, logits: &mut [f32], history: &[u32]);
    /// Told the token the sampler drew at this step (after every processor's `process`). A
    /// stateful processor (a grammar) advances here. The default does nothing.
    fn accept(&mut self, _token: u32) {}
    /// Tokens that must come next, after the last accepted one (or first, before any), which
    /// this processor has already advanced past as if each had been accepted: a grammar whose
    /// next bytes are fixed ([`crate::constrain::GrammarMask::with_fast_forward`]). The caller
    /// appends them to the output without drawing them. Asked at most once after each
    /// `accept` (and once at the start); the default: none.
    fn forced(&mut self) -> Vec<u32> {
        Vec::new()
    }
    /// Why the processor cannot go on (a grammar that allows no token), once it cannot; the
    /// draw of that step is then meaningless. The default: never.
    fn failure(&self) -> Option<String> {
        None
    }
    /// This step's effect when the processor is a mask and nothing else (a grammar): the ids it
    /// lets through as bits (bit `i % 32` of word `i / 32` set when id `i` may be drawn; ids
    /// past the words may not), so that the mask can be applied where the logits are (the GPU
    /// sampler) in place of [`Self::process`]; asked instead of `process`, at most once a step.
    /// `None` (the default): not a mask, the logits must go through `process`.
    fn mask_words(&mut self) -> Option<Vec<u32>> {
        None
    }
}

/// Sets `logits[i]` to `-inf` for every id `i` whose bit is not set in `words` (bit `i % 32` of
/// word `i / 32`, as [`LogitsProcessor::mask_words`] gives them; ids past the words included).
pub fn apply_mask_words(words: &[u32], logits: &mut [f32]) {
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if bits & (1 << b) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// The mask words ([`LogitsProcessor::mask_words`]) letting through exactly `ids`.
// Built by the test masks of the sampler and of the GPU selftest.
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn mask_words_of(ids: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut w = Vec::new();
    for i in ids {
        let k = i as usize / 32;
        if w.len() <= k {
            w.resize(k + 1, 0);
        }
        w[k] |= 1 << (i % 32);
    }
    w
}

/// [`sanitize`]: NaN to `-inf`, `+inf` to `f32::MAX`. Always the first link.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sanitize;

impl LogitsProcessor for Sanitize {
    fn name(&self) -> &str {
        "sanitize"
    }
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        sanitize(logits);
    }
}

/// [`apply_repetition_penalty`] over the last `context_size` ids of the history.
#[derive(Debug, Clone, Copy)]
pub struct RepetitionPenalty {
    /// The penalty (`> 0`; `1` is off).
    pub penalty: f32,
    /// How many of the most recent tokens count.
    pub context_size: usize,
}

impl LogitsProcessor for RepetitionPenalty {
    fn name(&self) -> &str {
        "repetition_penalty"
    }
    fn process(&mut self, logits: &mut [f32], history: &[u32]) {
        apply_repetition_penalty(logits, history, self.penalty, self.context_size);
    }
}

/// [`apply_presence_frequency_penalty`] over the tokens generated so far. The history it is
/// given holds the prompt then the generated tokens; the prompt's length is taken from the
/// first call (made before the first token is drawn), so one processor serves one generation.
#[derive(Debug, Clone, Copy)]
pub struct PresenceFrequencyPenalty {
    /// Subtracted once from each token that was generated, in `[-2, 2]`.
    pub presence: f32,
    /// Subtracted per occurrence, in `[-2, 2]`.
    pub frequency: f32,
    prompt_len: Option<usize>,
}

impl PresenceFrequencyPenalty {
    /// Penalties for one generation.
    pub fn new(presence: f32, frequency: f32) -> Self {
        Self {
            presence,
            frequency,
            prompt_len: None,
        }
    }
}

impl LogitsProcessor for PresenceFrequencyPenalty {
    fn name(&self) -> &str {
        "presence_frequency_penalty"
    }
    fn process(&mut self, logits: &mut [f32], history: &[u32]) {
        let start = (*self.prompt_len.get_or_insert(history.len())).min(history.len());
        apply_presence_frequency_penalty(logits, &history[start..], self.presence, self.frequency);
    }
}

/// [`apply_logit_bias`]: `(token id, bias)` pairs added to the logits.
#[derive(Debug, Clone, Default)]
pub struct LogitBias(pub Vec<(u32, f32)>);

impl LogitsProcessor for LogitBias {
    fn name(&self) -> &str {
        "logit_bias"
    }
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        apply_logit_bias(logits, &self.0);
    }
}

/// [`log_softmax`]: logits to log-probabilities (needed before [`TopP`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSoftmax;

impl LogitsProcessor for LogSoftmax {
    fn name(&self) -> &str {
        "log_softmax"
    }
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        log_softmax(logits);
    }
}

/// [`super::apply_top_k`] with a scratch buffer reused across steps.
#[derive(Debug, Clone, Default)]
pub struct TopK {
    /// How many tokens to keep (`0` is off).
    pub k: usize,
    values: Vec<f32>,
}

impl TopK {
    /// Keeps the `k` most likely tokens.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            values: Vec::new(),
        }
    }
}

impl LogitsProcessor for TopK {
    fn name(&self) -> &str {
        "top_k"
    }
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        top_k_with(logits, self.k, &mut self.values);
    }
}

/// [`apply_min_p`].
#[derive(Debug, Clone, Copy)]
pub struct MinP(pub f32);

impl LogitsProcessor for MinP {
    fn name(&self) -> &str {
        "min_p"
    }
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        apply_min_p(logits, self.0);
    }
}

/// [`super::apply_top_p`] (on log-probabilities) with a scratch buffer reused across steps.
#[derive(Debug, Clone, Default)]
pub struct TopP {
    /// The probability mass to keep, in `(0, 1)` (other values are off).
    pub p: f32,
    idx: Vec<u32>,
}

impl TopP {
    /// Keeps the smallest set of most likely tokens whose mass reaches `p`.
    pub fn new(p: f32) -> Self {
        Self { p, idx: Vec::new() }
    }
}

impl LogitsProcessor for TopP {
    fn name(&self) -> &str {
        "top_p"
    }
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        top_p_with(logits, self.p, &mut self.idx);
    }
}

/// [`apply_temperature`].
#[derive(Debug, Clone, Copy)]
pub struct Temperature(pub f32);

impl LogitsProcessor for Temperature {
    fn name(&self) -> &str {
        "temperature"
    }
    fn process(&mut self, logits: &mut [f32], _history: &[u32]) {
        apply_temperature(logits, self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_and_frequency_penalties_follow_openai_formula() {
        // Token 1 generated twice, token 3 once; token 0 only in the prompt.
        let mut logits = vec![1.0f32, 2.0, 3.0, 4.0];
        apply_presence_frequency_penalty(&mut logits, &[1, 3, 1, 9], 0.5, 0.25);
        // 2 - (2 * 0.25 + 0.5) = 1; 4 - (0.25 + 0.5) = 3.25; id 9 is outside: ignored.
        assert_eq!(logits, vec![1.0, 1.0, 3.0, 3.25]);
        // Negative penalties encourage repetition.
        let mut logits = vec![0.0f32; 3];
        apply_presence_frequency_penalty(&mut logits, &[2], -1.0, -0.5);
        assert_eq!(logits, vec![0.0, 0.0, 1.5]);
    }

    #[test]
    fn penalty_processor_counts_generated_tokens_only() {
        let mut p = PresenceFrequencyPenalty::new(1.0, 0.0);
        let prompt = [0u32, 0, 1];
        let mut logits = vec![5.0f32; 3];
        p.process(&mut logits, &prompt);
        assert_eq!(
            logits,
            vec![5.0; 3],
            "nothing generated yet: the prompt is not penalized"
        );
        let mut history = prompt.to_vec();
        history.push(2);
        history.push(2);
        let mut logits = vec![5.0f32; 3];
        p.process(&mut logits, &history);
        assert_eq!(logits, vec![5.0, 5.0, 4.0]);
    }

    #[test]
    fn logit_bias_adds_to_the_named_tokens() {
        let mut logits = vec![0.5f32, 0.5, 0.5];
        LogitBias(vec![(0, -100.0), (2, 3.0), (7, 1.0)]).process(&mut logits, &[]);
        assert_eq!(logits, vec![-99.5, 0.5, 3.5]);
    }
}
