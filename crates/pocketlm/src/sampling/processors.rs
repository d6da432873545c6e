//! Logits processors: the links of the [`super::Sampler`] chain, one small type per step, each
//! a wrapper of one of the pure functions of [`super`] (as mlx-lm's `logits_processors` and
//! the filters of `make_sampler`, llama.cpp's `llama_sampler_chain`).
//!
//! A processor rewrites the `[vocab]` f32 scores of one step in place. More processors (a
//! grammar mask for constrained decoding, logit biases) are added to a sampler with
//! [`super::Sampler::with_processor`].

use super::{
    apply_min_p, apply_repetition_penalty, apply_temperature, log_softmax, sanitize, top_k_with,
    top_p_with,
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
    /// Why the processor cannot go on (a grammar that allows no token), once it cannot; the
    /// draw of that step is then meaningless. The default: never.
    fn failure(&self) -> Option<String> {
        None
    }
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
