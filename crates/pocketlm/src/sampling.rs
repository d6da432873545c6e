//! Sampling: a chain of logit processors, then a draw.
//!
//! Each step is a small pure function over a `&mut [f32]` of length `vocab` (f32 logits or
//! log-probabilities); [`Sampler`] chains them in the order of mlx-lm
//! (`mlx_lm/sample_utils.py`: `make_logits_processors`, then `make_sampler`; `generate_step`
//! in between turns logits into log-probabilities):
//!
//! 1. NaN logits become `-inf` (never drawn), `+inf` becomes `f32::MAX` (see [`sanitize`]);
//! 2. [`apply_repetition_penalty`] on the raw logits (when `repetition_penalty != 1`), then
//!    OpenAI's presence / frequency penalties ([`apply_presence_frequency_penalty`]) and
//!    `logit_bias` ([`apply_logit_bias`]) when set;
//! 3. `temperature == 0`: [`argmax`] (lowest index on ties), done;
//! 4. [`log_softmax`] (a constant shift: [`Sampler`] computes it only when top-p needs
//!    probabilities, the other steps do not change under a shift);
//! 5. [`apply_top_p`], [`apply_min_p`], [`apply_top_k`] on those untempered log-probabilities
//!    (each masks tokens to `-inf`, none renormalizes, as in mlx-lm);
//! 6. [`apply_temperature`] (multiply by `1 / temperature`) and a [`categorical`] draw.
//!
//! Each step is a [`LogitsProcessor`] link ([`processors`]); more links (a grammar mask) go
//! after step 2, added with [`Sampler::with_processor`].
//!
//! [`Sampler::sample`] runs the links of steps 1-2 one by one but steps 3-6 fused (the
//! [`fused`] module): sanitizing fused with the copy of the logits, the filters run over a
//! few candidates instead of the vocabulary when top-k binds or min-p is on, and one
//! `exp` pass for the draw. It computes the same thing, bit for bit, as running every link in
//! turn (the same f32 roundings and sums, and the log-softmax's vectorized log-sum-exp shared
//! with the link; tested against the links).
//!
//! Note that, as in mlx-lm, the top-p mass is measured at temperature 1, before the
//! temperature is applied (Hugging Face applies the temperature first).
//!
//! All three filters of step 5 keep a prefix of the same ranking (log-probability descending,
//! lower token id first on ties) and measure probabilities against the full vocabulary, so
//! [`Sampler`] may run them in any order with the same result; it runs top-k and min-p first so
//! that top-p sees few survivors. Nothing sorts the whole vocabulary: top-k uses
//! `select_nth_unstable` on the values, top-p a bucketed pass that sorts one bucket.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod device;
mod fused;
pub mod processors;

pub use device::{prefix_sample, DeviceSampling};
pub(crate) use device::{DeviceDrawn, DevicePick};
pub use processors::LogitsProcessor;

/// Sampling parameters, as mlx-lm's `generate` / MLX Swift's `GenerateParameters`.
///
/// [`Default`] is mlx-lm's CLI defaults (`mlx_lm/generate.py`: `DEFAULT_TEMP = 0.0`,
/// `DEFAULT_TOP_P = 1.0`, `DEFAULT_MIN_P = 0.0`, `DEFAULT_TOP_K = 0`, `DEFAULT_SEED = None`),
/// i.e. greedy decoding, plus repetition penalty off (`1.0`, mlx-lm's CLI does not apply one)
/// with a window of 64 tokens (mlx-lm's library default window is 20).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature, `>= 0`; `0` means greedy (argmax). Default `0.0`.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of most probable tokens whose probability mass
    /// reaches `top_p` (always at least one). In `[0, 1]`; `0` and `1` are off. Default `1.0`.
    pub top_p: f32,
    /// Keep only the `top_k` most probable tokens; `0` is off. Default `0`.
    pub top_k: usize,
    /// Keep tokens whose probability is at least `min_p` times the top token's. In `[0, 1]`;
    /// `0` is off. Default `0.0`.
    pub min_p: f32,
    /// CTRL repetition penalty (`> 0`): logits of recently seen tokens are divided by it when
    /// positive, multiplied when negative; `1` is off. Default `1.0`.
    pub repetition_penalty: f32,
    /// How many of the most recent tokens the repetition penalty looks at (`0`: none).
    /// Default `64`.
    pub repetition_context_size: usize,
    /// Seed of the random generator; `None` seeds from the operating system. Default `None`.
    pub seed: Option<u64>,
    /// OpenAI's presence penalty, in `[-2, 2]`: subtracted once from the logit of every token
    /// that occurs among the generated tokens (not the prompt; as vLLM). `0` is off. Default `0`.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in `[-2, 2]`: subtracted from a token's logit once per
    /// occurrence among the generated tokens. `0` is off. Default `0`.
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: `(token id, bias)` pairs, each bias in `[-100, 100]` added to that
    /// token's logit before any filter (`-100` in effect bans it, `100` forces it). Ids outside
    /// the vocabulary are ignored here (the server refuses them). Default empty.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_context_size: 64,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// The sampling used when neither the caller nor the model's `generation_config.json`
    /// says otherwise (the CLI's `generate` and `chat`, and the server), chosen as llama.cpp
    /// and Ollama choose theirs: temperature `0.8`, top-k `40`, top-p `0.95`, min-p `0.05`
    /// (llama.cpp's), and a mild repetition penalty `1.1` over the last `64` tokens (Ollama's
    /// `repeat_penalty` / `repeat_last_n`). No seed: each run draws differently.
    ///
    /// Measured on the default model (SmolLM2-135M-Instruct Q4_1), greedy decoding without a
    /// penalty loops ("Write a haiku about the sea." repeats one line up to the token limit);
    /// with these values the five prompts of the CLI test `default_sampling_gives_clean_answers`
    /// end by themselves without a repeated line.
    pub fn recommended() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repetition_penalty: 1.1,
            repetition_context_size: 64,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }

    /// Checks every field's range.
    ///
    /// Errors: [`SamplingError::InvalidParameter`] naming the field, e.g. a negative or NaN
    /// temperature, `top_p` outside `[0, 1]`, a repetition penalty `<= 0`.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |name: &'static str, value: f32, expected: &'static str| {
            Err(SamplingError::InvalidParameter {
                name,
                value: value.to_string(),
                expected,
            })
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", self.temperature, "a finite number >= 0");
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad("top_p", self.top_p, "a number in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "a number in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number > 0",
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, v, "a number in [-2, 2]");
            }
        }
        if let Some((_, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad("logit_bias", *b, "biases in [-100, 100]");
        }
        Ok(())
    }
}

/// The sampling settings a caller gave, field by field; `None` takes the default (see
/// [`SamplingOverrides::resolve`]). The CLI's flags and the server's request fields fill one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingOverrides {
    /// [`SamplingParams::temperature`].
    pub temperature: Option<f32>,
    /// [`SamplingParams::top_p`].
    pub top_p: Option<f32>,
    /// [`SamplingParams::top_k`].
    pub top_k: Option<usize>,
    /// [`SamplingParams::min_p`].
    pub min_p: Option<f32>,
    /// [`SamplingParams::repetition_penalty`].
    pub repetition_penalty: Option<f32>,
    /// [`SamplingParams::repetition_context_size`].
    pub repetition_context_size: Option<usize>,
    /// [`SamplingParams::seed`].
    pub seed: Option<u64>,
    /// [`SamplingParams::presence_penalty`].
    pub presence_penalty: Option<f32>,
    /// [`SamplingParams::frequency_penalty`].
    pub frequency_penalty: Option<f32>,
    /// [`SamplingParams::logit_bias`].
    pub logit_bias: Option<Vec<(u32, f32)>>,
}

impl SamplingOverrides {
    /// The settings given, the others from `defaults` (usually
    /// [`crate::loader::LoadedModel::default_sampling`]). One exception: a temperature of `0`
    /// given explicitly asks for plain greedy decoding, so the default repetition penalty is
    /// dropped with it (a penalty given explicitly stays). Values are not checked here;
    /// [`SamplingParams::validate`] (or [`Sampler::new`]) does.
    pub fn resolve(&self, defaults: &SamplingParams) -> SamplingParams {
        let default_penalty = if self.temperature == Some(0.0) {
            1.0
        } else {
            defaults.repetition_penalty
        };
        SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(default_penalty),
            repetition_context_size: self
                .repetition_context_size
                .unwrap_or(defaults.repetition_context_size),
            seed: self.seed.or(defaults.seed),
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            logit_bias: self
                .logit_bias
                .clone()
                .unwrap_or_else(|| defaults.logit_bias.clone()),
        }
    }
}

/// Errors of the sampling parameters.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// A parameter is out of its range.
    #[error("sampling parameter `{name}` is {value}; expected {expected}")]
    InvalidParameter {
        /// The field of [`SamplingParams`].
        name: &'static str,
        /// The value given.
        value: String,
        /// The accepted range.
        expected: &'static str,
    },
}

impl From<SamplingError> for crate::Error {
    fn from(e: SamplingError) -> Self {
        crate::Error::InvalidArgument(e.to_string())
    }
}

/// Draws one token per step from a model's logits with [`SamplingParams`]: a chain of
/// [`LogitsProcessor`]s, then a draw (argmax when `temperature == 0`, else a categorical draw
/// from its own random generator, `StdRng` seeded from `seed`). Scratch buffers are reused
/// across steps.
///
/// The chain built by [`Sampler::new`] is the one of the module documentation:
/// [`processors::Sanitize`], [`processors::RepetitionPenalty`] (when not `1`),
/// [`processors::PresenceFrequencyPenalty`] (when either is not `0`), [`processors::LogitBias`]
/// (when not empty), then, unless
/// greedy, [`processors::LogSoftmax`] (when top-p is on), [`processors::TopK`],
/// [`processors::MinP`], [`processors::TopP`] (each when on) and [`processors::Temperature`].
/// Processors added with [`Sampler::with_processor`] run after the repetition penalty and
/// before the filters, on logits.
pub struct Sampler {
    params: SamplingParams,
    chain: Vec<Box<dyn LogitsProcessor>>,
    /// Where [`Sampler::with_processor`] inserts (after the built-in logit processors and the
    /// ones added before).
    insert_at: usize,
    /// Processors added with [`Sampler::with_processor`].
    added: usize,
    /// `None`: greedy.
    rng: Option<StdRng>,
    buf: Vec<f32>,
    /// Scratch of the fused filters and draw, reused across steps.
    scratch: fused::Scratch,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field(
                "chain",
                &self.chain.iter().map(|p| p.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Sampler {
    /// A sampler for `params`; the same seed gives the same tokens for the same logits.
    ///
    /// Errors: [`SamplingError`] when a parameter is out of range (see
    /// [`SamplingParams::validate`]).
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let p = &params;
        let mut chain: Vec<Box<dyn LogitsProcessor>> = vec![Box::new(processors::Sanitize)];
        if p.repetition_penalty != 1.0 {
            chain.push(Box::new(processors::RepetitionPenalty {
                penalty: p.repetition_penalty,
                context_size: p.repetition_context_size,
            }));
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            chain.push(Box::new(processors::PresenceFrequencyPenalty::new(
                p.presence_penalty,
                p.frequency_penalty,
            )));
        }
        if !p.logit_bias.is_empty() {
            chain.push(Box::new(processors::LogitBias(p.logit_bias.clone())));
        }
        let insert_at = chain.len();
        let rng = if p.temperature == 0.0 {
            None
        } else {
            let top_p_on = p.top_p > 0.0 && p.top_p < 1.0;
            if top_p_on {
                // Only top-p needs normalized probabilities; the other steps are shift-invariant.
                chain.push(Box::new(processors::LogSoftmax));
            }
            // Same result as mlx-lm's top_p -> min_p -> top_k (see the module docs), cheaper.
            if p.top_k > 0 {
                chain.push(Box::new(processors::TopK::new(p.top_k)));
            }
            if p.min_p > 0.0 {
                chain.push(Box::new(processors::MinP(p.min_p)));
            }
            if top_p_on {
                chain.push(Box::new(processors::TopP::new(p.top_p)));
            }
            chain.push(Box::new(processors::Temperature(p.temperature)));
            Some(match p.seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_os_rng(),
            })
        };
        Ok(Sampler {
            params,
            chain,
            insert_at,
            added: 0,
            rng,
            buf: Vec::new(),
            scratch: fused::Scratch::default(),
        })
    }

    /// Adds `processor` to the chain, after the repetition penalty and the processors added
    /// before it, before the filters (it sees logits, not log-probabilities). A grammar mask
    /// for constrained decoding is one such processor.
    pub fn with_processor(mut self, processor: Box<dyn LogitsProcessor>) -> Self {
        self.chain.insert(self.insert_at, processor);
        self.insert_at += 1;
        self.added += 1;
        self
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the whole chain amounts to the argmax of the raw logits (greedy, no repetition
    /// penalty, no added processor), so that [`argmax_on_device`] may replace [`Sampler::sample`]
    /// (it differs only on NaN logits).
    pub fn is_plain_argmax(&self) -> bool {
        self.rng.is_none() && self.chain.len() == 1
    }

    /// Picks the next token id from `logits` (`[vocab]` f32, the model's last position) given
    /// `recent_tokens` (ids of the prompt and generated text so far, oldest first; only the last
    /// `repetition_context_size` matter to the repetition penalty). The chain is described in
    /// the module documentation; each processor is then told the id
    /// ([`LogitsProcessor::accept`]).
    ///
    /// Never panics: NaN logits are never drawn, ids in `recent_tokens` beyond the vocabulary
    /// are ignored, and if every logit is `-inf`/NaN (or `logits` is empty) it returns 0.
    pub fn sample(&mut self, logits: &[f32], recent_tokens: &[u32]) -> u32 {
        let greedy = self.rng.is_none();
        let mut rng = self.rng.take();
        let id = self.choose(logits, recent_tokens, greedy, || {
            rng.as_mut().map_or(0.0, |r| r.random::<f64>())
        });
        self.rng = rng;
        self.accept(id);
        id
    }

    /// The chain and the draw of [`Sampler::sample`] (`greedy`: argmax, else the uniform draw
    /// comes from `draw`, called once, only when something is drawable), without telling the
    /// processors the id: the sanitize link fused with the copy into the scratch buffer,
    /// the other logit processors in turn, then the filter links and the draw fused
    /// ([`fused::filter_and_draw`]), which computes what running them one by one does.
    fn choose(
        &mut self,
        logits: &[f32],
        recent_tokens: &[u32],
        greedy: bool,
        draw: impl FnOnce() -> f64,
    ) -> u32 {
        // chain[0] is always `Sanitize`.
        fused::copy_sanitized(logits, &mut self.buf);
        for p in &mut self.chain[1..self.insert_at] {
            p.process(&mut self.buf, recent_tokens);
        }
        if greedy {
            return argmax(&self.buf);
        }
        let p = &self.params;
        let filters = fused::Filters {
            top_p: if p.top_p > 0.0 && p.top_p < 1.0 {
                p.top_p
            } else {
                1.0
            },
            top_k: p.top_k,
            min_p: p.min_p,
            temperature: p.temperature,
        };
        fused::filter_and_draw(&mut self.buf, &filters, &mut self.scratch, draw)
    }

    /// The old step by step path: every link of the chain over the whole vocabulary, then
    /// [`argmax`] or [`categorical`]; what [`Sampler::sample`] must draw.
    #[cfg(test)]
    fn sample_by_links(&mut self, logits: &[f32], recent_tokens: &[u32]) -> u32 {
        self.buf.clear();
        self.buf.extend_from_slice(logits);
        for p in &mut self.chain {
            p.process(&mut self.buf, recent_tokens);
        }
        let id = match &mut self.rng {
            None => argmax(&self.buf),
            Some(rng) => categorical_in_place(&mut self.buf, rng),
        };
        self.accept(id);
        id
    }

    /// Tokens a processor forces next, after the last drawn token or, before the first draw,
    /// at the start ([`LogitsProcessor::forced`]: a grammar with fast-forward); the other
    /// processors are told each of them ([`LogitsProcessor::accept`]), as if drawn. Empty when
    /// nothing is forced. Check [`Sampler::failure`] after it.
    pub fn forced(&mut self) -> Vec<u32> {
        for i in 0..self.chain.len() {
            let f = self.chain[i].forced();
            if f.is_empty() {
                continue;
            }
            for (j, p) in self.chain.iter_mut().enumerate() {
                if j != i {
                    f.iter().for_each(|&t| p.accept(t));
                }
            }
            return f;
        }
        Vec::new()
    }

    /// The first failure a processor reports ([`LogitsProcessor::failure`]), e.g. a grammar
    /// that allows no token; check it after [`Sampler::sample`].
    pub fn failure(&self) -> Option<String> {
        self.chain.iter().find_map(|p| p.failure())
    }
}

/// Greedy choice on the logits' own device: `logits: [1, vocab]` or `[vocab]` (any float dtype)
/// -> the id of the largest, as [`argmax`] picks it for finite logits (ties: the lowest id).
/// On a GPU only the one id is copied back. NaN logits are not filtered here; the greedy path
/// of [`Sampler::sample`] does. The token stepper ([`crate::generate::stepper`]) uses it for
/// logits on a GPU when [`Sampler::is_plain_argmax`] and no log-probabilities are asked for.
pub fn argmax_on_device(logits: &candle_core::Tensor) -> crate::Result<u32> {
    let l = logits.flatten_all()?;
    Ok(l.argmax(0)?.to_scalar::<u32>()?)
}

/// Makes logits safe for the chain: NaN becomes `-inf` (never drawn) and `+inf` becomes
/// `f32::MAX` (so `+inf` tokens share the whole probability, without `inf - inf = NaN`).
pub fn sanitize(logits: &mut [f32]) {
    for l in logits.iter_mut() {
        *l = fused::sanitize_one(*l);
    }
}

/// CTRL repetition penalty (Keskar et al. 2019, arXiv:1909.05858; as Hugging Face's
/// `RepetitionPenaltyLogitsProcessor` and mlx-lm's `make_repetition_penalty`): for each distinct
/// id among the last `context_size` of `recent_tokens`, a logit `< 0` is multiplied by
/// `penalty` and a logit `>= 0` divided by it, once however often the id occurs.
/// `logits`: `[vocab]`; ids `>= vocab` are ignored.
pub fn apply_repetition_penalty(
    logits: &mut [f32],
    recent_tokens: &[u32],
    penalty: f32,
    context_size: usize,
) {
    let start = recent_tokens.len().saturating_sub(context_size);
    let mut ids: Vec<u32> = recent_tokens[start..].to_vec();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// OpenAI's presence and frequency penalties (API reference, "Create chat completion"; the
/// formula of OpenAI's former "Parameter details" guide and of vLLM's `apply_penalties`):
/// `logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`, where
/// `count[j]` is how often token `j` occurs in `generated` (the tokens generated so far, not the
/// prompt). `logits`: `[vocab]`; ids `>= vocab` are ignored.
pub fn apply_presence_frequency_penalty(
    logits: &mut [f32],
    generated: &[u32],
    presence_penalty: f32,
    frequency_penalty: f32,
) {
    let mut ids: Vec<u32> = generated.to_vec();
    ids.sort_unstable();
    for run in ids.chunk_by(|a, b| a == b) {
        if let Some(l) = logits.get_mut(run[0] as usize) {
            *l -= run.len() as f32 * frequency_penalty + presence_penalty;
        }
    }
}

/// OpenAI's `logit_bias`: adds each `(id, bias)` to `logits[id]` (`[vocab]`; ids `>= vocab`
/// are ignored), before any filter, as OpenAI documents it ("added to the logits generated by
/// the model prior to sampling") and vLLM applies it.
pub fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(id, b) in bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += b;
        }
    }
}

/// `x - logsumexp(x)` in place (mlx-lm's `generate_step`): logits `[vocab]` to
/// log-probabilities: `lse` by the vectorized log-sum-exp of the fused chain (terms
/// `exp(x - max)` in f32 by a polynomial within 4e-7 relative, summed in f64 over 16 lanes;
/// within 4e-7 of the std-`exp`, index-order sum used before, see `fused::log_sum_exp`), then
/// `(x - lse)` in f64 rounded to f32. All `-inf` input is left as it is.
pub fn log_softmax(logits: &mut [f32]) {
    let max = fused::max_value(logits);
    if max == f32::NEG_INFINITY {
        return;
    }
    let lse = fused::log_sum_exp(logits, max);
    for l in logits.iter_mut() {
        *l = (f64::from(*l) - lse) as f32;
    }
}

/// Divides by the temperature (mlx-lm's `categorical_sampling`: `logits * (1 / temp)`).
/// `temperature` must be `> 0`; other values leave `logits` unchanged.
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    // Also catches NaN: it is neither `> 0` nor anything else.
    if temperature.is_nan() || temperature <= 0.0 || temperature == 1.0 {
        return;
    }
    let inv = 1.0 / temperature;
    for l in logits.iter_mut() {
        *l *= inv;
    }
}

/// Ranking used by every filter: larger value first, then lower token id.
fn rank(values: &[f32]) -> impl Fn(&u32, &u32) -> std::cmp::Ordering + '_ {
    move |a: &u32, b: &u32| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    }
}

/// Keeps the `k` largest entries of `logits` (`[vocab]`; ties go to the lower id), sets the
/// others to `-inf` (mlx-lm's `apply_top_k`). `k == 0` or `k >=` the number of
/// entries above `-inf`: unchanged. Linear time: `select_nth_unstable` finds the k-th value,
/// one pass masks.
pub fn apply_top_k(logits: &mut [f32], k: usize) {
    top_k_with(logits, k, &mut Vec::new());
}

fn top_k_with(logits: &mut [f32], k: usize, values: &mut Vec<f32>) {
    if k == 0 {
        return;
    }
    values.clear();
    values.extend(logits.iter().copied().filter(|l| *l > f32::NEG_INFINITY));
    if values.len() <= k {
        return;
    }
    let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    let greater = logits.iter().filter(|l| **l > kth).count();
    let mut ties_left = k - greater;
    for l in logits.iter_mut() {
        if *l > kth {
            continue;
        }
        if *l == kth && ties_left > 0 {
            ties_left -= 1;
            continue;
        }
        *l = f32::NEG_INFINITY;
    }
}

/// Min-p (Nguyen et al. 2024, arXiv:2407.01082; mlx-lm's `apply_min_p` with
/// `min_tokens_to_keep = 1`): sets to `-inf` every token whose probability is below
/// `min_p * p_max`, i.e. `x < max(x) + ln(min_p)`. Works on logits or log-probabilities
/// (`[vocab]`); the top token always stays. `min_p <= 0`: unchanged.
pub fn apply_min_p(logprobs: &mut [f32], min_p: f32) {
    if min_p.is_nan() || min_p <= 0.0 {
        return;
    }
    let max = logprobs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY || max.is_nan() {
        return;
    }
    let threshold = max + min_p.ln();
    for l in logprobs.iter_mut() {
        if *l < threshold {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Nucleus (top-p) filtering (Holtzman et al. 2019, arXiv:1904.09751; mlx-lm's
/// `apply_top_p`, Hugging Face's `TopPLogitsWarper`): `logprobs` are log-probabilities
/// (`[vocab]`, normalized over the vocabulary: use [`log_softmax`] first). Ranked by
/// probability (ties: lower id first), a token is kept when the probability of the tokens
/// ranked above it is `< top_p`: the smallest set whose mass reaches `top_p`, at least one
/// token. Others become `-inf`. `top_p` outside `(0, 1)`: unchanged. Masses are `exp` in f32
/// summed in f64.
///
/// Linear time: tokens go to [`TOP_P_BUCKETS`] buckets by distance to the top log-probability;
/// only the bucket where the cumulative mass crosses `top_p` is sorted.
pub fn apply_top_p(logprobs: &mut [f32], top_p: f32) {
    top_p_with(logprobs, top_p, &mut Vec::new());
}

/// Number of buckets of [`apply_top_p`]; they split the `TOP_P_RANGE` nats below the top
/// log-probability evenly, the last one also holds everything further down.
pub const TOP_P_BUCKETS: usize = 1024;
const TOP_P_RANGE: f32 = 32.0;

fn top_p_with(logprobs: &mut [f32], top_p: f32, idx: &mut Vec<u32>) {
    if !(top_p > 0.0 && top_p < 1.0) {
        return;
    }
    let max = logprobs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY || max.is_nan() {
        return;
    }
    let target = f64::from(top_p);
    let scale = (TOP_P_BUCKETS - 1) as f32 / TOP_P_RANGE;
    let bucket_of = |l: f32| (((max - l) * scale) as usize).min(TOP_P_BUCKETS - 1);
    let mut mass = [0.0f64; TOP_P_BUCKETS];
    for &l in logprobs.iter() {
        if l > f32::NEG_INFINITY {
            mass[bucket_of(l)] += f64::from(l.exp());
        }
    }
    // The bucket where the mass of everything ranked above reaches `target`.
    let mut above = 0.0f64;
    let mut crossing = None;
    for (b, m) in mass.iter().enumerate() {
        if above + m >= target {
            crossing = Some(b);
            break;
        }
        above += m;
    }
    let Some(crossing) = crossing else {
        return; // (rounding) the whole vocabulary is below `target`: keep all
    };
    idx.clear();
    idx.extend(
        (0..logprobs.len() as u32)
            .filter(|&i| logprobs[i as usize] > f32::NEG_INFINITY)
            .filter(|&i| bucket_of(logprobs[i as usize]) == crossing),
    );
    idx.sort_unstable_by(rank(logprobs));
    // Inside the crossing bucket: keep while the mass ranked above is < target.
    let mut first_dropped = idx.len();
    for (pos, &i) in idx.iter().enumerate() {
        if above >= target {
            first_dropped = pos;
            break;
        }
        above += f64::from(logprobs[i as usize].exp());
    }
    for &i in &idx[first_dropped..] {
        logprobs[i as usize] = f32::NEG_INFINITY;
    }
    for l in logprobs.iter_mut() {
        if *l > f32::NEG_INFINITY && bucket_of(*l) > crossing {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Index of the largest value, the lowest index on ties; NaN never wins. Returns 0 when there
/// is no value above `-inf` (or `logits` is empty).
pub fn argmax(logits: &[f32]) -> u32 {
    fused::argmax(logits)
}

/// Draws an index with probability `softmax(logits)` (`[vocab]`; `-inf` and NaN have
/// probability 0) from one uniform `f64` of `rng`, by inverse CDF in index order (weights
/// `exp(x - max)` in f32, summed in f64). Falls back to [`argmax`] when nothing is drawable.
pub fn categorical<R: Rng + ?Sized>(logits: &[f32], rng: &mut R) -> u32 {
    categorical_in_place(&mut logits.to_vec(), rng)
}

/// [`categorical`], overwriting `logits` with the unnormalized weights (no allocation).
fn categorical_in_place<R: Rng + ?Sized>(logits: &mut [f32], rng: &mut R) -> u32 {
    categorical_draw(logits, || rng.random::<f64>())
}

/// [`categorical_in_place`] with the uniform draw from `draw` (called only when something is
/// drawable).
fn categorical_draw(logits: &mut [f32], draw: impl FnOnce() -> f64) -> u32 {
    let fallback = argmax(logits);
    let max = logits
        .get(fallback as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    if max == f32::NEG_INFINITY || max.is_nan() {
        return fallback;
    }
    let mut total = 0.0f64;
    for l in logits.iter_mut() {
        // NaN and -inf give weight 0.
        *l = if *l > f32::NEG_INFINITY {
            (*l - max).exp()
        } else {
            0.0
        };
        total += f64::from(*l);
    }
    if !(total > 0.0 && total.is_finite()) {
        return fallback;
    }
    let target = draw() * total;
    let mut acc = 0.0f64;
    let mut last = fallback;
    for (i, &w) in logits.iter().enumerate() {
        if w > 0.0 {
            acc += f64::from(w);
            last = i as u32;
            if target < acc {
                return last;
            }
        }
    }
    // Rounding left `target` at the very end: the last drawable index.
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG: f32 = f32::NEG_INFINITY;

    fn kept(values: &[f32]) -> Vec<usize> {
        values
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > NEG)
            .map(|(i, _)| i)
            .collect()
    }

    fn logprobs_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    /// A pseudo-random logit vector (fixed seed) with ties and a wide range.
    fn random_logits(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let x: f32 = rng.random_range(-8.0..8.0);
                if rng.random_bool(0.05) {
                    1.5 // deliberate ties
                } else {
                    x
                }
            })
            .collect()
    }

    #[test]
    fn overrides_win_and_an_explicit_zero_temperature_is_plain_greedy() {
        let d = SamplingParams::recommended();
        assert!(d.validate().is_ok());
        assert_eq!(SamplingOverrides::default().resolve(&d), d);
        let o = SamplingOverrides {
            top_p: Some(0.5),
            seed: Some(7),
            ..Default::default()
        };
        let p = o.resolve(&d);
        assert_eq!((p.top_p, p.seed, p.temperature), (0.5, Some(7), 0.8));
        assert_eq!(p.repetition_penalty, d.repetition_penalty);
        // Temperature 0 given: argmax of the raw logits, the default penalty dropped ...
        let greedy = SamplingOverrides {
            temperature: Some(0.0),
            ..Default::default()
        };
        let p = greedy.resolve(&d);
        assert_eq!((p.temperature, p.repetition_penalty), (0.0, 1.0));
        assert!(Sampler::new(p).unwrap().is_plain_argmax());
        // ... unless a penalty is given too.
        let p = SamplingOverrides {
            repetition_penalty: Some(1.3),
            ..greedy
        }
        .resolve(&d);
        assert_eq!(p.repetition_penalty, 1.3);
    }

    #[test]
    fn default_params_are_mlx_cli_defaults_and_greedy() {
        let p = SamplingParams::default();
        assert_eq!(
            (p.temperature, p.top_p, p.top_k, p.min_p),
            (0.0, 1.0, 0, 0.0)
        );
        assert_eq!(
            (p.repetition_penalty, p.repetition_context_size, p.seed),
            (1.0, 64, None)
        );
        let mut s = Sampler::new(p).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0], &[]), 1);
    }

    #[test]
    fn invalid_params_are_typed_errors() {
        let cases = [
            (
                SamplingParams {
                    temperature: -0.5,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: -0.1,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
        ];
        for (params, field) in cases {
            match Sampler::new(params) {
                Err(SamplingError::InvalidParameter { name, .. }) => assert_eq!(name, field),
                Ok(_) => panic!("{field}: accepted"),
            }
        }
        let e: crate::Error = SamplingParams {
            top_p: 2.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .into();
        assert!(e.to_string().contains("top_p"), "{e}");
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative_once() {
        let mut l = vec![2.0, -2.0, 4.0, 1.0, 0.0];
        // Token 0 appears three times, token 7 is beyond the vocabulary.
        apply_repetition_penalty(&mut l, &[0, 1, 0, 7, 0, 4], 2.0, 64);
        assert_eq!(l, vec![1.0, -4.0, 4.0, 1.0, 0.0]);
    }

    #[test]
    fn repetition_penalty_only_looks_at_the_last_context_tokens() {
        let mut l = vec![2.0, 2.0, 2.0, 2.0];
        apply_repetition_penalty(&mut l, &[0, 1, 2, 3], 2.0, 2);
        assert_eq!(l, vec![2.0, 2.0, 1.0, 1.0]);
        let mut l = vec![2.0, 2.0];
        apply_repetition_penalty(&mut l, &[0, 1], 2.0, 0);
        assert_eq!(l, vec![2.0, 2.0]);
    }

    #[test]
    fn temperature_scales_by_inverse() {
        let mut l = vec![1.0, -2.0, NEG];
        apply_temperature(&mut l, 0.5);
        assert_eq!(l, vec![2.0, -4.0, NEG]);
        let mut same = vec![1.0, 2.0];
        apply_temperature(&mut same, 0.0);
        assert_eq!(same, vec![1.0, 2.0]);
    }

    #[test]
    fn log_softmax_normalizes() {
        let mut l = vec![1.0, 2.0, 3.0, NEG];
        log_softmax(&mut l);
        let total: f64 = l.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        let e = (1.0f64.exp() + 2.0f64.exp() + 3.0f64.exp()).ln();
        assert!((f64::from(l[2]) - (3.0 - e)).abs() < 1e-6);
        assert_eq!(l[3], NEG);
    }

    #[test]
    fn top_k_keeps_k_largest_lowest_index_on_ties() {
        let mut l = vec![1.0, 5.0, 3.0, 5.0, 3.0, NEG];
        apply_top_k(&mut l, 3);
        assert_eq!(kept(&l), vec![1, 2, 3]);
        let mut all = vec![1.0, 2.0];
        apply_top_k(&mut all, 5);
        assert_eq!(kept(&all), vec![0, 1]);
        apply_top_k(&mut all, 0);
        assert_eq!(kept(&all), vec![0, 1]);
        let mut ties = vec![3.0, 1.0, 3.0, f32::NAN, 3.0, 3.0, 4.0];
        apply_top_k(&mut ties, 3);
        assert_eq!(kept(&ties), vec![0, 2, 6]);
        // against a full sort on random vectors with ties
        let mut rng = StdRng::seed_from_u64(11);
        for n in [2usize, 10, 500, 20_000] {
            let l = random_logits(&mut rng, n);
            for k in [1usize, 2, 7, 64, n - 1].into_iter().filter(|&k| k <= n) {
                let mut fast = l.clone();
                apply_top_k(&mut fast, k);
                let mut order: Vec<u32> = (0..n as u32).collect();
                order.sort_by(rank(&l));
                let mut want: Vec<usize> = order[..k].iter().map(|&i| i as usize).collect();
                want.sort_unstable();
                assert_eq!(kept(&fast), want, "n={n} k={k}");
            }
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        // probabilities 0.5, 0.3, 0.15, 0.05 (shuffled ids)
        let lp = logprobs_of(&[0.15, 0.5, 0.05, 0.3]);
        let run = |p: f32| {
            let mut v = lp.clone();
            apply_top_p(&mut v, p);
            kept(&v)
        };
        assert_eq!(run(0.4), vec![1]); // 0.5 >= 0.4 already
        assert_eq!(run(0.55), vec![1, 3]); // mass above id 3 is 0.5 < 0.55
        assert_eq!(run(0.85), vec![0, 1, 3]);
        assert_eq!(run(0.9), vec![0, 1, 3]); // mass above id 2 is 0.95
        assert_eq!(run(0.96), vec![0, 1, 2, 3]);
        assert_eq!(run(0.01), vec![1]); // always at least one
        assert_eq!(run(1.0), vec![0, 1, 2, 3]); // off
    }

    #[test]
    fn top_p_buckets_match_full_sort() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut inputs: Vec<Vec<f32>> = [1usize, 5, 63, 64, 65, 300, 5000]
            .iter()
            .map(|&n| random_logits(&mut rng, n))
            .collect();
        // flat (one bucket), and spread far beyond the bucket range (tail bucket)
        inputs.push(vec![0.25; 3000]);
        inputs.push((0..3000).map(|i| -0.05 * i as f32).collect());
        for mut l in inputs {
            let n = l.len();
            log_softmax(&mut l);
            for p in [0.05f32, 0.3, 0.9, 0.999, 0.999999] {
                let mut fast = l.clone();
                apply_top_p(&mut fast, p);
                // reference: full sort, cumulative mass before each token
                let mut order: Vec<u32> = (0..n as u32).collect();
                order.sort_by(rank(&l));
                let mut mass = 0.0f64;
                let mut want = vec![false; n];
                for &i in &order {
                    if mass < f64::from(p) {
                        want[i as usize] = true;
                    }
                    mass += f64::from(l[i as usize].exp());
                }
                let want: Vec<usize> = (0..n).filter(|&i| want[i]).collect();
                assert_eq!(kept(&fast), want, "n={n} p={p}");
            }
        }
    }

    #[test]
    fn min_p_keeps_tokens_above_fraction_of_max() {
        let mut lp = logprobs_of(&[0.5, 0.3, 0.05, 0.15]);
        apply_min_p(&mut lp, 0.25); // threshold 0.125
        assert_eq!(kept(&lp), vec![0, 1, 3]);
        let mut lp = logprobs_of(&[0.5, 0.5]);
        apply_min_p(&mut lp, 1.0);
        assert_eq!(kept(&lp), vec![0, 1]);
    }

    #[test]
    fn argmax_lowest_index_on_ties_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 2.0, f32::NAN]), 1);
        assert_eq!(argmax(&[NEG, NEG]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn categorical_frequencies_follow_softmax() {
        let logits = logprobs_of(&[0.1, 0.6, 0.3]);
        let mut rng = StdRng::seed_from_u64(1234);
        let mut counts = [0usize; 3];
        let draws = 60_000;
        for _ in 0..draws {
            counts[categorical(&logits, &mut rng) as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.1, 0.6, 0.3]) {
            let f = *c as f64 / draws as f64;
            assert!((f - p).abs() < 0.01, "{counts:?}");
        }
        // -inf and NaN are never drawn
        let masked = [NEG, 0.0, f32::NAN, 0.0];
        for _ in 0..1000 {
            let t = categorical(&masked, &mut rng);
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let run = |params: SamplingParams| {
            let mut s = Sampler::new(params).unwrap();
            (0..50).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(params.clone()), run(params.clone()));
        assert_ne!(
            run(params.clone()),
            run(SamplingParams {
                seed: Some(43),
                ..params
            })
        );
    }

    #[test]
    fn sampler_chain_matches_mlx_order() {
        // mlx-lm: processors on logits, log_softmax, top_p -> min_p -> top_k, temperature,
        // categorical. The Sampler runs the filters in another order; the kept set and the draw
        // must be identical.
        let mut rng = StdRng::seed_from_u64(99);
        for trial in 0..40 {
            let n = [10usize, 100, 2000][trial % 3];
            let logits = random_logits(&mut rng, n);
            let recent: Vec<u32> = (0..20).map(|_| rng.random_range(0..n as u32 + 5)).collect();
            let params = SamplingParams {
                temperature: [0.3f32, 0.7, 1.0, 1.8][trial % 4],
                top_p: [0.0f32, 0.5, 0.9, 0.95][trial % 4],
                top_k: [0usize, 1, 5, 50][(trial / 4) % 4],
                min_p: [0.0f32, 0.05, 0.2][trial % 3],
                repetition_penalty: [1.0f32, 1.3][trial % 2],
                repetition_context_size: 10,
                seed: Some(trial as u64),
                ..SamplingParams::default()
            };
            let mut reference = logits.clone();
            sanitize(&mut reference);
            if params.repetition_penalty != 1.0 {
                apply_repetition_penalty(&mut reference, &recent, params.repetition_penalty, 10);
            }
            log_softmax(&mut reference);
            apply_top_p(&mut reference, params.top_p);
            apply_min_p(&mut reference, params.min_p);
            apply_top_k(&mut reference, params.top_k);
            apply_temperature(&mut reference, params.temperature);
            let mut ref_rng = StdRng::seed_from_u64(trial as u64);
            let mut sampler = Sampler::new(params).unwrap();
            for _ in 0..5 {
                let want = categorical(&reference, &mut ref_rng);
                assert_eq!(sampler.sample(&logits, &recent), want, "trial {trial}");
            }
        }
    }

    /// Logits for the fused-path tests: N(0, 2)-like noise with peaks, ties, NaN, `±inf`, or a
    /// cluster of distinct logits whose log-probabilities round to the same f32 (a peak at 100
    /// makes `x - lse` about -100, where an f32 step is 2^-17, while the cluster's logits differ
    /// by 2^-20): top-k must then break the ties by id, not by logit.
    fn fused_test_logits(rng: &mut StdRng, n: usize, kind: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n)
            .map(|_| {
                let a: f32 = rng.random_range(-1.0..1.0);
                let b: f32 = rng.random_range(-1.0..1.0);
                2.0 * (a + b)
            })
            .collect();
        match kind {
            0 => {}
            1 => {
                for _ in 0..5 {
                    let i = rng.random_range(0..n);
                    v[i] = rng.random_range(8.0..14.0);
                }
                for _ in 0..n / 20 {
                    let i = rng.random_range(0..n);
                    v[i] = 1.5; // ties
                }
            }
            2 => {
                for (j, x) in [f32::NAN, NEG, f32::INFINITY, NEG, f32::NAN]
                    .into_iter()
                    .enumerate()
                {
                    let i = (j * 7919) % n;
                    v[i] = x;
                }
            }
            _ => {
                let peak = rng.random_range(0..n);
                for (i, x) in v.iter_mut().enumerate() {
                    *x = if i == peak {
                        100.0
                    } else if rng.random_bool(0.5) {
                        (rng.random_range(0..64) as f32) * (-20f32).exp2()
                    } else {
                        -*x - 10.0
                    };
                }
            }
        }
        v
    }

    /// The fused chain ([`Sampler::sample`]: candidates when top-k binds or min-p is on, one
    /// pass otherwise) draws exactly the ids of running every link over the whole vocabulary,
    /// for many seeds, parameter sets and logit shapes.
    #[test]
    fn fused_chain_draws_what_the_links_draw() {
        let mut rng = StdRng::seed_from_u64(2024);
        let mut candidate_draws = 0;
        for trial in 0..600 {
            let n = [3usize, 17, 300, 2500, 20_000][trial % 5];
            let kind = (trial / 5) % 4;
            let logits = fused_test_logits(&mut rng, n, kind);
            let history: Vec<u32> = (0..40).map(|_| rng.random_range(0..n as u32 + 3)).collect();
            let params = SamplingParams {
                temperature: [0.3f32, 0.7, 1.0, 1.8][trial % 4],
                top_p: [1.0f32, 0.5, 0.9, 0.95, 0.999][(trial / 3) % 5],
                top_k: [0usize, 1, 2, 5, 40, n - 1, n, n + 5][(trial / 7) % 8],
                min_p: [0.0f32, 0.05, 0.2][(trial / 11) % 3],
                repetition_penalty: [1.0f32, 1.3][(trial / 2) % 2],
                repetition_context_size: 16,
                seed: Some(trial as u64),
                ..SamplingParams::default()
            };
            candidate_draws +=
                usize::from(params.top_k > 0 && params.top_k < n || params.min_p > 0.0);
            let mut fused = Sampler::new(params.clone()).unwrap();
            let mut links = Sampler::new(params.clone()).unwrap();
            for step in 0..6 {
                let want = links.sample_by_links(&logits, &history);
                let got = fused.sample(&logits, &history);
                assert_eq!(
                    got, want,
                    "trial {trial} step {step} n {n} kind {kind} {params:?}"
                );
            }
        }
        assert!(candidate_draws > 300, "{candidate_draws}");
    }

    /// The candidate path of top-k against the whole-vocabulary links on a large vocabulary,
    /// the ranking decided by the f32 log-probabilities (ties inside the cluster of
    /// [`fused_test_logits`]' last kind), many seeds.
    #[test]
    fn top_k_candidates_draw_what_the_full_vocabulary_draws() {
        let mut rng = StdRng::seed_from_u64(77);
        for trial in 0..40 {
            let n = 40_000;
            let logits = fused_test_logits(&mut rng, n, [1, 3][trial % 2]);
            for (top_k, top_p, min_p) in [
                (1usize, 1.0f32, 0.0f32),
                (3, 0.9, 0.0),
                (40, 0.95, 0.05),
                (40, 1.0, 0.0),
                (200, 0.5, 0.0),
                (1000, 0.999, 0.01),
            ] {
                let params = SamplingParams {
                    temperature: 0.7,
                    top_k,
                    top_p,
                    min_p,
                    seed: Some(1000 + trial as u64),
                    ..SamplingParams::default()
                };
                let mut fused = Sampler::new(params.clone()).unwrap();
                let mut links = Sampler::new(params.clone()).unwrap();
                for _ in 0..8 {
                    let want = links.sample_by_links(&logits, &[]);
                    assert_eq!(fused.sample(&logits, &[]), want, "trial {trial} {params:?}");
                }
            }
        }
    }

    #[test]
    fn greedy_with_repetition_penalty() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        // token 0 would win, but it was just generated: 3.0 / 2 < 2.0
        assert_eq!(s.sample(&[3.0, 2.0, -1.0], &[0]), 1);
    }

    #[test]
    fn nan_and_inf_logits_do_not_panic() {
        let params = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 3,
            min_p: 0.1,
            repetition_penalty: 1.2,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        assert_eq!(s.sample(&[f32::NAN, f32::NAN], &[0, 1]), 0);
        assert_eq!(s.sample(&[NEG, NEG, NEG], &[]), 0);
        assert_eq!(s.sample(&[], &[5]), 0);
        for _ in 0..20 {
            let t = s.sample(&[f32::NAN, 1.0, f32::INFINITY, NEG, f32::INFINITY], &[9]);
            assert!(t == 2 || t == 4, "{t}");
        }
        let mut greedy = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(greedy.sample(&[f32::NAN, 1.0, f32::INFINITY], &[]), 2);
    }

    #[test]
    fn large_vocabulary_top_k_small() {
        let n = 150_000;
        let mut rng = StdRng::seed_from_u64(5);
        let logits = random_logits(&mut rng, n);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.7,
            top_k: 20,
            top_p: 0.95,
            seed: Some(3),
            ..Default::default()
        })
        .unwrap();
        let mut top: Vec<u32> = (0..n as u32).collect();
        top.sort_by(rank(&logits));
        let allowed: std::collections::HashSet<u32> = top[..20].iter().copied().collect();
        for _ in 0..10 {
            assert!(allowed.contains(&s.sample(&logits, &[])));
        }
    }
}
