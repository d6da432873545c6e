//! The token stepper: the token half of generation (mlx-lm's `generate_step`). Given a
//! model, its KV cache and an encoded prompt, it prefills the prompt ([`CausalLM::prefill`],
//! images included) and then yields one [`Token`] per step: logits -> the [`Sampler`]'s chain of
//! logits processors -> a token id, with the token's log-probabilities when asked for.
//!
//! Forced tokens: when the sampler's grammar forces the next tokens
//! ([`Sampler::forced`], fast-forward), the stepper yields them without drawing them and feeds
//! them, with the drawn token before them, to the model in one forward pass (a small prefill
//! chunk) instead of one pass each; tokens forced at the very start are prefilled with the
//! prompt. Forced tokens carry no log-probabilities (their logits are only computed after they
//! are yielded), so [`super::generate_input`] turns fast-forward off when they are asked for.
//!
//! The per-sequence logic (sampler chain, history, forced tokens, log-probabilities) is a
//! [`TokenState`] that does not own the model: the stepper runs its passes for one sequence, the
//! batched generator ([`super::batch`]) for many in one pass.
//!
//! It knows nothing of text: detokenizing, stop strings, `max_tokens` and end-of-generation
//! tokens belong to the text layer ([`super::Generation`]), which decides whether to ask for
//! another token.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::kv_cache::KvCache;
use crate::models::{CausalLM, Logits, ModelInput};
use crate::sampling::{self, DeviceDrawn, DevicePick, Sampler};
use crate::{Error, Result};

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

/// One token chosen by the [`TokenStepper`].
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// The token id (`< vocab`).
    pub id: u32,
    /// Its log-probabilities under the model's raw logits, when the stepper was asked for
    /// them ([`TokenStepper::new`]'s `logprobs`).
    pub logprobs: Option<TokenLogprobs>,
}

/// What the prefill of a [`TokenStepper`] did.
#[derive(Debug, Clone, Default)]
pub struct PrefillStats {
    /// Tokens prefilled (the prompt given to the stepper).
    pub prompt_tokens: usize,
    /// Wall time of the prefill, the choice of the first token included.
    pub time: Duration,
    /// Wall time of the vision tower (part of `time`; zero without images).
    pub vision_time: Duration,
    /// Image tokens of each image of the prompt (empty without images).
    pub image_tokens: Vec<usize>,
}

/// What a sequence's [`TokenState`] needs before its next token.
#[derive(Debug, Clone)]
pub enum Next {
    /// A token the grammar forced: it is yielded now, without a forward pass (it is fed with
    /// the next [`Next::Feed`]).
    Token(Token),
    /// The prompt, with the tokens forced at the start appended to its ids: prefill it into
    /// the sequence's cache, then pass the logits of its last position to
    /// [`TokenState::accept_prefill`].
    Prompt {
        /// The prompt to prefill (ids and images).
        input: ModelInput,
        /// Tokens of the prompt as given (the forced tokens appended to `input.ids` excluded).
        prompt_tokens: usize,
    },
    /// Feed these ids (the last drawn token, then the forced tokens yielded after it) in one
    /// forward pass, then pass the logits of the last one to [`TokenState::accept`].
    Feed(Vec<u32>),
}

/// The per-sequence half of the [`TokenStepper`], without the model: the sampler chain (grammar
/// masks included), the history the processors see, fast-forward of forced tokens and the
/// log-probabilities. The caller runs the forward passes it asks for ([`Self::next_need`]) and
/// hands back their logits; the single-sequence [`TokenStepper`] and the batched
/// [`super::batch::BatchGenerator`] both drive it, so one sequence draws the same tokens
/// either way.
///
/// Protocol: call [`Self::next_need`]; for [`Next::Token`] the token is final; for
/// [`Next::Prompt`] / [`Next::Feed`] run the pass and call [`Self::accept_prefill`] /
/// [`Self::accept`] with its logits, which returns the token. After any error the state
/// refuses further steps.
pub struct TokenState {
    sampler: Sampler,
    logprobs: Option<usize>,
    /// The prompt, until [`Self::next_need`] hands it out for the prefill.
    pending: Option<ModelInput>,
    /// The prompt's ids and the tokens fed since, oldest first (what the processors see).
    history: Vec<u32>,
    /// Tokens yielded but not fed yet (the last drawn one and the forced ones after it),
    /// fed in one forward pass at the next draw.
    unfed: Vec<u32>,
    /// Forced tokens not yielded yet.
    forced: VecDeque<u32>,
    /// Ask the sampler for forced tokens.
    fast_forward: bool,
    /// Whether the tokens forced at the start were asked for.
    asked_start: bool,
    /// Forward passes after the prefill.
    decode_passes: usize,
    prefill: Option<PrefillStats>,
    failed: bool,
}

impl TokenState {
    /// The state of a sequence that will prefill `input` and draw each token with `sampler`;
    /// `logprobs` as [`TokenStepper::new`] takes it.
    pub fn new(input: ModelInput, sampler: Sampler, logprobs: Option<usize>) -> Self {
        Self {
            sampler,
            logprobs,
            history: input.ids.clone(),
            pending: Some(input),
            unfed: Vec::new(),
            forced: VecDeque::new(),
            fast_forward: false,
            asked_start: false,
            decode_passes: 0,
            prefill: None,
            failed: false,
        }
    }

    /// As [`TokenStepper::with_fast_forward`].
    pub fn with_fast_forward(mut self, on: bool) -> Self {
        self.fast_forward = on && self.logprobs.is_none();
        self
    }

    /// Puts `ids`, tokens already in the sequence's cache before its prompt (a reused prefix),
    /// in front of the history the sampler's processors see (repetition penalties), as if
    /// they had been part of the prompt.
    pub fn with_history_prefix(mut self, ids: &[u32]) -> Self {
        self.history.splice(0..0, ids.iter().copied());
        self
    }

    /// Positions the sequence's cache will hold once every token yielded so far is fed, given
    /// the positions it holds now (`cache_offset`): the prompt if not handed out yet, plus the
    /// tokens yielded since the last pass.
    pub fn positions(&self, cache_offset: usize) -> usize {
        cache_offset + self.pending.as_ref().map_or(0, |p| p.ids.len()) + self.unfed.len()
    }

    /// Forward passes run after the prefill ([`TokenStepper::decode_passes`]).
    pub fn decode_passes(&self) -> usize {
        self.decode_passes
    }

    /// What the prefill did; `None` before the first token was drawn.
    pub fn prefill_stats(&self) -> Option<&PrefillStats> {
        self.prefill.as_ref()
    }

    /// Whether a step failed (the state then refuses further steps).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// What the sequence needs next; see the type's documentation.
    ///
    /// Errors: [`Error::InvalidArgument`] after a failed step, or when a pass is asked for
    /// before the previous one was accepted; [`crate::constrain::ConstraintError::Rejected`]
    /// when the grammar fails.
    pub fn next_need(&mut self) -> Result<Next> {
        let r = self.next_inner();
        self.failed |= r.is_err();
        r
    }

    fn next_inner(&mut self) -> Result<Next> {
        if self.failed {
            return Err(Error::InvalidArgument(
                "the token stepper failed at an earlier step".into(),
            ));
        }
        if self.fast_forward && !self.asked_start {
            self.asked_start = true;
            self.take_forced()?;
        }
        if let Some(id) = self.forced.pop_front() {
            self.unfed.push(id);
            return Ok(Next::Token(Token { id, logprobs: None }));
        }
        if let Some(mut input) = self.pending.take() {
            self.history.extend_from_slice(&self.unfed);
            let prompt_tokens = input.ids.len();
            // Tokens forced at the start are prefilled with the prompt.
            input.ids.append(&mut self.unfed);
            return Ok(Next::Prompt {
                input,
                prompt_tokens,
            });
        }
        if self.unfed.is_empty() {
            return Err(Error::InvalidArgument(
                "the token stepper has no token to feed".into(),
            ));
        }
        Ok(Next::Feed(self.unfed.clone()))
    }

    /// The first token, from the logits of the prompt's last position (`[1, vocab]`, any
    /// float dtype, any device) after a [`Next::Prompt`]. `stats` says what the prefill did;
    /// its `time` is set here, to the time since `started` (the choice of the first token
    /// included).
    ///
    /// Errors: as [`Self::next_need`].
    pub fn accept_prefill(
        &mut self,
        logits: &Tensor,
        stats: PrefillStats,
        started: Instant,
    ) -> Result<Token> {
        self.accept_prefill_drawn(logits, stats, started, None)
    }

    /// [`Self::accept_prefill`] with the token possibly drawn already on the logits' device
    /// (see [`Self::device_pick`]).
    pub(crate) fn accept_prefill_drawn(
        &mut self,
        logits: &Tensor,
        mut stats: PrefillStats,
        started: Instant,
        drawn: Option<DeviceDrawn>,
    ) -> Result<Token> {
        let r = self.choose(logits, drawn);
        self.failed |= r.is_err();
        let tok = r?;
        stats.time = started.elapsed();
        self.prefill = Some(stats);
        self.drawn(tok)
    }

    /// The next token, from the logits of the last fed position (`[1, vocab]`, any float
    /// dtype, any device) after a [`Next::Feed`] whose ids the caller appended to the cache.
    ///
    /// Errors: as [`Self::next_need`].
    pub fn accept(&mut self, logits: &Tensor) -> Result<Token> {
        self.accept_drawn(logits, None)
    }

    /// [`Self::accept`] with the token possibly drawn already on the logits' device (see
    /// [`Self::device_pick`]).
    pub(crate) fn accept_drawn(
        &mut self,
        logits: &Tensor,
        drawn: Option<DeviceDrawn>,
    ) -> Result<Token> {
        if self.unfed.is_empty() || self.pending.is_some() {
            self.failed = true;
            return Err(Error::InvalidArgument(
                "the token stepper got logits it did not ask for".into(),
            ));
        }
        self.history.extend_from_slice(&self.unfed);
        self.decode_passes += 1;
        self.unfed.clear();
        let r = self.choose(logits, drawn);
        self.failed |= r.is_err();
        self.drawn(r?)
    }

    /// Records a drawn token as yielded and queues what the grammar forces after it.
    fn drawn(&mut self, tok: Token) -> Result<Token> {
        self.unfed.push(tok.id);
        if self.fast_forward {
            let r = self.take_forced();
            self.failed |= r.is_err();
            r?;
        }
        Ok(tok)
    }

    /// Queues the tokens the sampler forces now.
    fn take_forced(&mut self) -> Result<()> {
        let f = self.sampler.forced();
        if let Some(why) = self.sampler.failure() {
            return Err(crate::constrain::ConstraintError::Rejected(why).into());
        }
        self.forced.extend(f);
        Ok(())
    }

    /// How the token the next [`Self::accept`] / [`Self::accept_prefill`] chooses can be drawn
    /// on a GPU together with other sequences' (one launch for a batch's rows, not one and a
    /// copy back a row): the argmax when greedy, else the sampler's chain over `vocab` logits
    /// with the uniform draw, which this takes from the sampler's generator now (the caller
    /// then hands the result to [`Self::accept_drawn`] / [`Self::accept_prefill_drawn`]).
    /// `None` when the choice runs on the CPU (log-probabilities asked for, a chain the kernel
    /// does not run), as [`crate::device::sample_on_device`] decides.
    pub(crate) fn device_pick(&mut self, vocab: usize) -> Option<DevicePick> {
        if self.logprobs.is_some() || self.failed {
            return None;
        }
        if self.sampler.is_plain_argmax() {
            return Some(DevicePick::Argmax);
        }
        // The history the choice sees: the tokens fed by this pass join it at `accept`.
        let plan = if self.unfed.is_empty() {
            self.sampler.device_sampling(&self.history, vocab)
        } else {
            let h = [&self.history[..], &self.unfed[..]].concat();
            self.sampler.device_sampling(&h, vocab)
        }?;
        let u = self.sampler.device_uniform();
        Some(DevicePick::Sample(plan, u))
    }

    /// Chooses a token from `logits` (`[1, vocab]`, any float dtype, any device), or takes the
    /// one `drawn` on the device.
    fn choose(&mut self, logits: &Tensor, drawn: Option<DeviceDrawn>) -> Result<Token> {
        if let Some(d) = drawn {
            match (d.pick, d.id) {
                (DevicePick::Argmax, Some(id)) => return Ok(Token { id, logprobs: None }),
                (DevicePick::Sample(_, u), id) => {
                    let id = self
                        .sampler
                        .finish_device_draw(id, logits, &self.history, u)?;
                    return self.drawn_on_device(id);
                }
                (DevicePick::Argmax, None) => {}
            }
        }
        if !logits.device().is_cpu() && self.logprobs.is_none() {
            if self.sampler.is_plain_argmax() {
                // Greedy on a GPU: the argmax runs there and one u32 comes back, not the logits.
                return Ok(Token {
                    id: sampling::argmax_on_device(logits)?,
                    logprobs: None,
                });
            }
            // Sampling on a GPU, when the chain runs there: one u32 comes back.
            if let Some(id) =
                crate::device::sample_on_device(&mut self.sampler, logits, &self.history)?
            {
                return self.drawn_on_device(id);
            }
        }
        let l: Vec<f32> = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?;
        self.choose_from(&l)
    }

    /// The token `id` the sampler's chain drew on the device.
    ///
    /// Errors: [`crate::constrain::ConstraintError::Rejected`] when a processor (a grammar
    /// whose mask went to the device) reports a failure, as [`Self::choose_from`].
    fn drawn_on_device(&mut self, id: u32) -> Result<Token> {
        if let Some(why) = self.sampler.failure() {
            return Err(crate::constrain::ConstraintError::Rejected(why).into());
        }
        Ok(Token { id, logprobs: None })
    }

    /// Chooses a token from `logits` (`[vocab]` f32 raw logits).
    ///
    /// Errors: [`crate::constrain::ConstraintError::Rejected`] when a processor (a grammar)
    /// reports a failure.
    fn choose_from(&mut self, logits: &[f32]) -> Result<Token> {
        let id = self.sampler.sample(logits, &self.history);
        if let Some(why) = self.sampler.failure() {
            return Err(crate::constrain::ConstraintError::Rejected(why).into());
        }
        Ok(Token {
            id,
            logprobs: self.logprobs.map(|k| token_logprobs(logits, id, k)),
        })
    }
}

/// Yields the tokens of a generation one at a time; see the module documentation.
///
/// The first [`TokenStepper::step`] prefills the prompt and samples from its last position;
/// each later step feeds the previous token to the model (one forward pass, appending to the
/// cache) and samples from its logits. A token is fed only when the next one is asked for, so
/// the cache never holds the last yielded token. With fast-forward, forced tokens are yielded
/// without a forward pass and fed together with the token before them at the next pass, so
/// the cache never holds the tokens yielded since the last pass
/// ([`TokenStepper::positions`] counts them). Iterating gives the same tokens and never ends
/// (until an error, which it yields once).
///
/// The sequence's logic is its [`TokenState`]; the stepper adds the model and the cache.
pub struct TokenStepper<'a> {
    model: &'a dyn CausalLM,
    cache: &'a mut KvCache,
    prefill_chunk: usize,
    state: TokenState,
}

impl<'a> TokenStepper<'a> {
    /// A stepper that will prefill `input` into `cache` (after what it already holds) in
    /// forward passes of at most `prefill_chunk` tokens (text prompts; a prompt with images
    /// is one pass, see [`CausalLM::prefill`]), then draw each token with `sampler`.
    /// `logprobs: Some(k)` carries each token's [`TokenLogprobs`] with the `k` most likely
    /// alternatives; `None` computes nothing.
    ///
    /// Nothing runs until the first step. The caller checks that the prompt fits the context
    /// and the vocabulary ([`super::generate_input`] does).
    pub fn new(
        model: &'a dyn CausalLM,
        cache: &'a mut KvCache,
        input: ModelInput,
        sampler: Sampler,
        prefill_chunk: usize,
        logprobs: Option<usize>,
    ) -> Self {
        Self::from_state(
            model,
            cache,
            TokenState::new(input, sampler, logprobs),
            prefill_chunk,
        )
    }

    /// A stepper driving `state` with `model` over `cache`.
    pub fn from_state(
        model: &'a dyn CausalLM,
        cache: &'a mut KvCache,
        state: TokenState,
        prefill_chunk: usize,
    ) -> Self {
        Self {
            model,
            cache,
            prefill_chunk,
            state,
        }
    }

    /// Turns fast-forward on or off (off by default): tokens the sampler's processors force
    /// ([`Sampler::forced`]) are yielded without drawing and fed in one forward pass. Set it
    /// before the first step. With log-probabilities asked for, it stays off.
    pub fn with_fast_forward(mut self, on: bool) -> Self {
        self.state = self.state.with_fast_forward(on);
        self
    }

    /// Positions the cache holds now.
    pub fn cache_offset(&self) -> usize {
        self.cache.offset()
    }

    /// Positions the cache will hold once every token yielded so far is fed (the prompt, if
    /// not prefilled yet, included): the context a next token would take is one more.
    pub fn positions(&self) -> usize {
        self.state.positions(self.cache.offset())
    }

    /// Forward passes run after the prefill: one per drawn token after the first, unless
    /// forced tokens were fed together.
    pub fn decode_passes(&self) -> usize {
        self.state.decode_passes()
    }

    /// What the prefill did; `None` before the first successful step.
    pub fn prefill_stats(&self) -> Option<&PrefillStats> {
        self.state.prefill_stats()
    }

    /// The next token: the prefill and the first token on the first call, then one forward
    /// pass of the previous token and the token after it.
    ///
    /// Errors: the model's ([`CausalLM::prefill`], [`CausalLM::forward`]);
    /// [`Error::InvalidArgument`] when called again after a failed step.
    pub fn step(&mut self) -> Result<Token> {
        let r = self.step_inner();
        self.state.failed |= r.is_err();
        r
    }

    fn step_inner(&mut self) -> Result<Token> {
        match self.state.next_need()? {
            Next::Token(tok) => Ok(tok),
            Next::Prompt {
                input,
                prompt_tokens,
            } => {
                let t0 = Instant::now();
                let (model, cache, chunk) = (self.model, &mut *self.cache, self.prefill_chunk);
                let p = crate::kernels::in_pool_on(model.device(), || {
                    model.prefill(&input, cache, chunk)
                })?;
                crate::memory::release_free_heap();
                let stats = PrefillStats {
                    prompt_tokens,
                    time: Duration::ZERO,
                    vision_time: p.vision_time,
                    image_tokens: p.image_tokens,
                };
                self.state.accept_prefill(&p.logits, stats, t0)
            }
            Next::Feed(ids) => {
                let ids = Tensor::new(ids.as_slice(), self.model.device())?.unsqueeze(0)?;
                let (model, cache) = (self.model, &mut *self.cache);
                let logits = crate::kernels::in_pool_on(model.device(), || {
                    model.forward(&ids, cache, Logits::Last)
                })?;
                self.state.accept(&logits)
            }
        }
    }
}

impl Iterator for TokenStepper<'_> {
    type Item = Result<Token>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.state.failed {
            return None;
        }
        Some(self.step())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelInfo;
    use crate::sampling::{LogitsProcessor, SamplingParams};
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use std::sync::{Arc, Mutex};

    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-20.0f32..20.0)).collect()
    }

    /// A model whose logits depend only on the last input token (a table of rows), and which
    /// records the token ids of each forward pass.
    struct Table {
        rows: Vec<Vec<f32>>,
        calls: Mutex<Vec<Vec<u32>>>,
        info: ModelInfo,
        device: Device,
    }

    impl Table {
        fn new(vocab: usize) -> Self {
            Self {
                rows: (0..vocab).map(|i| random_logits(vocab, i as u64)).collect(),
                calls: Mutex::new(Vec::new()),
                info: ModelInfo {
                    architecture: "table".into(),
                    vocab_size: vocab,
                    n_layers: 0,
                    hidden_size: 1,
                    n_kv_heads: 1,
                    head_dim: 1,
                    context_length: 1024,
                },
                device: Device::Cpu,
            }
        }
    }

    impl CausalLM for Table {
        fn forward(&self, ids: &Tensor, _: &mut KvCache, logits: Logits) -> Result<Tensor> {
            assert_eq!(logits, Logits::Last);
            let ids: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
            let row = &self.rows[*ids.last().expect("no empty pass") as usize];
            self.calls.lock().expect("lock").push(ids);
            Ok(Tensor::new(row.as_slice(), &self.device)?.unsqueeze(0)?)
        }
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn device(&self) -> &Device {
            &self.device
        }
    }

    fn sampler(temperature: f32) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k: 20,
            seed: Some(9),
            ..Default::default()
        })
        .expect("valid")
    }

    /// The token `st` chooses from `l` at `step` (`accept_prefill` at step 0, `accept` after).
    fn accept_at(st: &mut TokenState, step: usize, l: &Tensor) -> u32 {
        if step == 0 {
            st.accept_prefill(l, PrefillStats::default(), Instant::now())
        } else {
            st.accept(l)
        }
        .expect("accept")
        .id
    }

    /// The same for a draw made on the device (`accept_prefill_drawn` / `accept_drawn`).
    fn accept_drawn_at(
        st: &mut TokenState,
        step: usize,
        l: &Tensor,
        drawn: Option<DeviceDrawn>,
    ) -> u32 {
        if step == 0 {
            st.accept_prefill_drawn(l, PrefillStats::default(), Instant::now(), drawn)
        } else {
            st.accept_drawn(l, drawn)
        }
        .expect("accept drawn")
        .id
    }

    /// A batch's draw made on the device ([`TokenState::device_pick`], then the result handed
    /// to `accept_drawn`): the kernel's ids are taken as drawn, and a row the kernel leaves to
    /// the CPU draws, with the uniform the pick took, the token a plain `accept` draws.
    #[test]
    fn device_picks_keep_the_sequences_draws() {
        let vocab = 64;
        let params = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            repetition_penalty: 1.3,
            seed: Some(5),
            ..Default::default()
        };
        let state = || {
            let s = Sampler::new(params.clone()).expect("valid");
            TokenState::new(ModelInput::text(vec![3, 1, 4]), s, None)
        };
        let (mut plain, mut split) = (state(), state());
        let logits =
            |id: u32| Tensor::new(random_logits(vocab, id as u64).as_slice(), &Device::Cpu);
        let mut last = 4;
        for step in 0..40 {
            for st in [&mut plain, &mut split] {
                assert!(matches!(
                    st.next_need().expect("need"),
                    Next::Prompt { .. } | Next::Feed(_)
                ));
            }
            let l = logits(last).expect("tensor").unsqueeze(0).expect("row");
            let want = accept_at(&mut plain, step, &l);
            let pick = split.device_pick(vocab).expect("the chain runs on a GPU");
            let DevicePick::Sample(ref plan, _) = pick else {
                panic!("a sampled chain picked {pick:?}");
            };
            // The plan penalizes the history with this step's fed token in it.
            if step > 0 {
                assert!(plan.penalized.contains(&last), "step {step}");
            }
            // Even steps: the kernel left the row to the CPU; odd: it drew `want` itself.
            let id = (step % 2 == 1).then_some(want);
            let drawn = Some(DeviceDrawn { pick, id });
            let got = accept_drawn_at(&mut split, step, &l, drawn);
            assert_eq!(got, want, "step {step}");
            last = want;
        }
        // Greedy: the argmax, no uniform taken.
        let mut greedy = TokenState::new(ModelInput::text(vec![1]), sampler(0.0), None);
        greedy.next_need().expect("need");
        assert!(matches!(
            greedy.device_pick(vocab),
            Some(DevicePick::Argmax)
        ));
        // Log-probabilities are computed on the CPU.
        let mut lp = TokenState::new(ModelInput::text(vec![1]), sampler(0.7), Some(2));
        lp.next_need().expect("need");
        assert!(lp.device_pick(vocab).is_none());
    }

    /// The same with a grammar in the chain: its mask goes to the device with the plan
    /// (`mask_words`), the kernel's CPU mirror ([`crate::sampling::prefix_sample`]) draws
    /// what a plain `accept` draws, and every token keeps to the grammar.
    #[test]
    fn device_picks_with_a_grammar_keep_the_sequences_draws() {
        use crate::constrain::{Constraint, GrammarEnv, GrammarMask};
        let tok = crate::tokenizer::Tokenizer::from_gguf_metadata(
            &crate::tokenizer::test_util::single_byte_gpt2(),
        )
        .expect("tokenizer");
        let env = GrammarEnv::for_tokenizer(&tok).expect("grammar env");
        let vocab = 257;
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 20,
            seed: Some(8),
            ..Default::default()
        };
        let state = || {
            let c = Constraint::Regex("[a-e]{40}".into());
            let mask = GrammarMask::new(env.clone(), &c).expect("grammar");
            let s = Sampler::new(params.clone())
                .expect("valid")
                .with_processor(Box::new(mask));
            TokenState::new(ModelInput::text(vec![b'x' as u32]), s, None)
        };
        let (mut plain, mut split) = (state(), state());
        let mut last = b'x' as u32;
        for step in 0..24 {
            for st in [&mut plain, &mut split] {
                st.next_need().expect("need");
            }
            let raw = random_logits(vocab, last as u64);
            let l = Tensor::new(raw.as_slice(), &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("row");
            let want = accept_at(&mut plain, step, &l);
            assert!((b'a'..=b'e').contains(&(want as u8)), "step {step}: {want}");
            let pick = split
                .device_pick(vocab)
                .expect("a masked chain runs on a GPU");
            let DevicePick::Sample(ref plan, u) = pick else {
                panic!("a sampled chain picked {pick:?}");
            };
            assert!(plan.mask.is_some());
            // Odd steps: the kernel's draw (its CPU mirror); even: left to the CPU.
            let id = (step % 2 == 1).then(|| crate::sampling::prefix_sample(&raw, plan, u));
            assert!(id.is_none_or(|id| id == want), "step {step}");
            let drawn = Some(DeviceDrawn { pick, id });
            let got = accept_drawn_at(&mut split, step, &l, drawn);
            assert_eq!(got, want, "step {step}");
            last = want;
        }
        // A drawn token the grammar refuses fails it; the next draw made on the device reports
        // that as the CPU path does.
        split.next_need().expect("need");
        let l = Tensor::new(random_logits(vocab, 1).as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("row");
        let pick = split.device_pick(vocab).expect("pick");
        let bad = Some(DeviceDrawn {
            pick,
            id: Some(b'z' as u32),
        });
        split.accept_drawn(&l, bad).expect("taken as drawn");
        split.next_need().expect("need");
        let pick = split.device_pick(vocab).expect("pick");
        let drawn = Some(DeviceDrawn { pick, id: Some(0) });
        let e = split
            .accept_drawn(&l, drawn)
            .expect_err("the grammar failed");
        assert!(matches!(e, crate::Error::Constraint(_)), "{e}");
    }

    #[test]
    fn prefills_in_chunks_then_feeds_each_token_once() {
        let m = Table::new(50);
        let mut cache = m.new_cache();
        let prompt = vec![3, 1, 4, 1, 5];
        let stepper = TokenStepper::new(
            &m,
            &mut cache,
            ModelInput::text(prompt.clone()),
            sampler(0.0),
            2,
            None,
        );
        let toks: Vec<u32> = stepper
            .take(4)
            .map(|t| t.expect("step").id)
            .collect::<Vec<_>>();
        // Greedy over the table: each token is the argmax of the previous one's row.
        let mut want = vec![sampling::argmax(&m.rows[5])];
        for _ in 1..4 {
            want.push(sampling::argmax(&m.rows[*want.last().unwrap() as usize]));
        }
        assert_eq!(toks, want);
        let calls = m.calls.lock().unwrap().clone();
        let mut expected = vec![vec![3, 1], vec![4, 1], vec![5]];
        // The last token is not fed: the cache never holds the last yielded token.
        expected.extend(toks[..3].iter().map(|&t| vec![t]));
        assert_eq!(calls, expected);
    }

    #[test]
    fn logprobs_ride_in_the_token() {
        let m = Table::new(300);
        let mut cache = m.new_cache();
        let mut stepper = TokenStepper::new(
            &m,
            &mut cache,
            ModelInput::text(vec![7]),
            sampler(0.8),
            512,
            Some(5),
        );
        let mut prev = 7u32;
        for _ in 0..6 {
            let t = stepper.step().expect("step");
            let want = token_logprobs(&m.rows[prev as usize], t.id, 5);
            assert_eq!(t.logprobs.as_ref(), Some(&want));
            prev = t.id;
        }
        assert_eq!(stepper.prefill_stats().map(|p| p.prompt_tokens), Some(1));
        // Without the option, nothing is computed.
        let mut cache = m.new_cache();
        let mut plain = TokenStepper::new(
            &m,
            &mut cache,
            ModelInput::text(vec![7]),
            sampler(0.8),
            1,
            None,
        );
        assert_eq!(plain.step().expect("step").logprobs, None);
    }

    /// Records its name in a shared log, then applies `f`.
    struct Probe {
        name: &'static str,
        log: Arc<Mutex<Vec<(&'static str, usize)>>>,
        f: fn(&mut [f32]),
    }

    impl LogitsProcessor for Probe {
        fn name(&self) -> &str {
            self.name
        }
        fn process(&mut self, logits: &mut [f32], history: &[u32]) {
            self.log.lock().unwrap().push((self.name, history.len()));
            (self.f)(logits);
        }
    }

    #[test]
    fn added_processors_run_in_order_with_the_history() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let probe = |name, f| {
            Box::new(Probe {
                name,
                log: log.clone(),
                f,
            })
        };
        // The first makes token 2 the best; the second masks it: in this order token 2 can
        // never be chosen (the other order would always choose it).
        let s = Sampler::new(SamplingParams::default())
            .expect("valid")
            .with_processor(probe("boost", |l| l[2] = 1e6))
            .with_processor(probe("mask", |l| l[2] = f32::NEG_INFINITY));
        assert!(!s.is_plain_argmax());
        assert_eq!(
            format!("{s:?}"),
            "Sampler { params: SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, \
             min_p: 0.0, repetition_penalty: 1.0, repetition_context_size: 64, seed: None, \
             presence_penalty: 0.0, frequency_penalty: 0.0, logit_bias: [] }, \
             chain: [\"sanitize\", \"boost\", \"mask\"] }"
        );
        let m = Table::new(16);
        let mut cache = m.new_cache();
        let mut stepper =
            TokenStepper::new(&m, &mut cache, ModelInput::text(vec![1, 2]), s, 8, None);
        for _ in 0..3 {
            assert_ne!(stepper.step().expect("step").id, 2);
        }
        // The processors see the prompt, then the prompt and each token fed.
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                ("boost", 2),
                ("mask", 2),
                ("boost", 3),
                ("mask", 3),
                ("boost", 4),
                ("mask", 4)
            ]
        );
    }

    #[test]
    fn the_penalty_comes_before_added_processors_and_the_filters_after() {
        let s = Sampler::new(SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 4,
            min_p: 0.1,
            repetition_penalty: 1.1,
            ..Default::default()
        })
        .expect("valid")
        .with_processor(Box::new(sampling::processors::MinP(0.0)));
        let names = format!("{s:?}");
        assert!(
            names.contains(
                "[\"sanitize\", \"repetition_penalty\", \"min_p\", \"log_softmax\", \"top_k\", \
                 \"min_p\", \"top_p\", \"temperature\"]"
            ),
            "{names}"
        );
    }

    #[test]
    fn images_for_a_text_model_are_an_error_and_end_the_steps() {
        let m = Table::new(8);
        let mut cache = m.new_cache();
        let img = crate::image_processor::ProcessedImage {
            pixel_values: vec![0.0; 4],
            grid_thw: [1, 2, 2],
            patch_dim: 1,
            merge_size: 2,
        };
        let input = ModelInput {
            ids: vec![1],
            images: vec![img],
        };
        let mut stepper = TokenStepper::new(&m, &mut cache, input, sampler(0.0), 8, None);
        let e = stepper.next().expect("one item").expect_err("no images");
        assert!(e.to_string().contains("takes no images"), "{e}");
        assert!(stepper.next().is_none());
        assert!(m.calls.lock().unwrap().is_empty());
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
