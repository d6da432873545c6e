//! Batched generation with continuous batching (mlx-lm's `BatchGenerator`, llama.cpp's server
//! slots, vLLM's scheduler): many sequences share one forward pass per step
//! ([`CausalLM::forward_batch`]), each with its own KV cache, position, sampler chain
//! (grammar included), stop strings, `max_tokens`, log-probabilities and seed.
//!
//! Sequences join ([`BatchGenerator::insert`]) and leave (finished, or
//! [`BatchGenerator::remove`] to cancel) between steps. At most
//! [`BatchConfig::max_batch`] run at once; the others wait in arrival order. Each
//! [`BatchGenerator::step`] runs one pass over:
//! - every running sequence that is decoding: its last token (or, with a grammar's
//!   fast-forward, the forced tokens after it);
//! - chunks of the prompts being prefilled, in arrival order, within a budget of
//!   [`BatchConfig::tokens_per_step`] tokens per step (less the decode rows, but never less
//!   than a quarter of it), so that a long prompt is prefilled over several steps while the
//!   running streams keep getting a token every step (chunked prefill, as vLLM's and
//!   SGLang's schedulers do). A prompt with images is prefilled whole, in a pass of its own
//!   ([`CausalLM::prefill`]).
//!
//! Each sequence is driven by the same per-sequence code as a single generation
//! ([`TokenState`] for the tokens, the text layer of [`super::Generation`] for the events), so a
//! sequence yields the same [`Event`]s batched as alone, up to the float summation order of
//! batched products (see [`crate::models::decoder::Decoder::forward_batch`]).
//!
//! With a [`PrefixCache`] ([`BatchGenerator::with_prefix_cache`]), [`BatchGenerator::insert`]
//! starts a text prompt from the longest cached prefix of it (only the rest is prefilled;
//! [`BatchGenerator::cached_tokens`] says how many were reused), and every sequence that
//! finishes normally adds the tokens it fed to the model (prompt and generated) to the cache.
//!
//! With a KV memory budget ([`BatchConfig::kv_memory`]) on the CPU or a CUDA GPU, the
//! sequences' keys and values live in one [`KvBlockPool`] of `kv_memory / block_bytes` blocks
//! of [`crate::kv_pool::BLOCK`] positions (vLLM's PagedAttention, Kwon et al. 2023): each
//! sequence's attention layers are [`crate::kv_pool::PagedKvCache`]s, block tables into the pool, and decode
//! reads the blocks in place (on the CPU the paged attention kernel, on CUDA the fused decode
//! step; on the GPU the pool holds f16 and is allocated whole when the generator is made).
//! Caches are accounted in the pool's blocks, a block in the tables of
//! several sequences (a prefix shared through the prefix cache) once (on other devices, where
//! caches stay growing ones, in blocks of [`KV_BLOCK`] positions, the step by which a growing
//! cache allocates): a waiting
//! sequence is admitted only when the blocks of its whole prompt fit next to what the running
//! ones hold and will hold up to their next token and [`BatchConfig::kv_reserve`] positions
//! past it (decode headroom, so that an admission does not force a preemption a few steps
//! later), and when the running ones' next step would
//! not fit, the latest admitted is preempted: its cache is dropped and it waits at the head of
//! the queue, to be resumed later by recomputing its cache from the token ids it had fed (the
//! prefix cache, when there is one, gives back what it holds of them), as vLLM's recompute
//! preemption does; a preempted sequence's blocks go back to the pool. Nothing fails for want
//! of memory but a sequence that alone does not fit. With [`BatchConfig::kv_f16`] the pool's
//! blocks (or, without a budget, the growing caches) hold f16, half the bytes. A cache given
//! back by [`BatchGenerator::remove`] keeps its blocks until it is dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::DType;

use super::{
    sequence_parts, Event, GenerateParams, Next, PrefillStats, TextState, Token, TokenState,
};
use crate::kv_cache::KvCache;
use crate::kv_pool::{KvBlockPool, BLOCK};
use crate::models::{BatchRow, CausalLM, ModelInput};
use crate::prefix_cache::PrefixCache;
use crate::sampling::DeviceDrawn;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The scheduler's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Sequences that run (decode or prefill) at once; more wait. At least 1. Default 16.
    pub max_batch: usize,
    /// Tokens one step's pass may take: decode rows count one each (more with fast-forward);
    /// prompt chunks take what is left, at least a quarter of it. At least 1. Default 256.
    pub tokens_per_step: usize,
    /// Bytes the sequences' KV caches may hold together (running and waiting; the prefix
    /// cache has its own bound), counted in blocks of f32 keys and values for every layer of
    /// [`CausalLM::cache_shapes`] (f16 with [`Self::kv_f16`] or on a CUDA GPU): on the CPU
    /// and on CUDA the blocks of one shared [`KvBlockPool`]
    /// ([`crate::kv_pool::BLOCK`] positions, `kv_memory / block_bytes` of them), elsewhere
    /// [`KV_BLOCK`]-position blocks of each sequence's own cache; `None` (the default): no
    /// bound. See the module documentation.
    pub kv_memory: Option<usize>,
    /// Under [`Self::kv_memory`], positions of decode headroom kept at admission for every
    /// running sequence and the one admitted (a per-sequence form of vLLM's block-manager
    /// watermark): a waiting sequence is admitted only when, with it, each running sequence
    /// could still add this many positions past its next token. It trades a smaller batch
    /// for fewer preemptions (each recomputes the preempted cache). 0: admit as soon as the
    /// prompt fits. Default [`KV_RESERVE`].
    pub kv_reserve: usize,
    /// Store the sequences' keys and values in f16 instead of f32: half the bytes a position,
    /// so twice the positions under [`Self::kv_memory`] (llama.cpp's default KV cache type,
    /// `-ctk f16 -ctv f16`). The block pool is then an f16 one
    /// ([`KvBlockPool::new_f16`]), and growing caches store f16
    /// ([`KvCache::set_storage_dtype`]); attention reads the f16 values widened to f32, as a
    /// single generation with [`crate::kv_cache::KvCacheConfig::kv_f16`] does, so a sequence's
    /// tokens equal that generation's. Default `false`.
    pub kv_f16: bool,
}

/// Default [`BatchConfig::kv_reserve`], in positions: four pool blocks. Measured on
/// `serve` of the default model (2-core Xeon, 16 clients, 32 requests of 280 tokens,
/// `--kv-memory 72MiB`, 2026-12-05): 0 gave 165 tokens/s with 55 preemptions; 32, 64 and 96
/// gave 205-233 tokens/s with 12-25; 280 (each request's whole answer) 190 with none.
pub const KV_RESERVE: usize = 64;

/// Positions per block of the KV memory budget ([`BatchConfig::kv_memory`]) where there is no
/// block pool (a model on neither the CPU nor CUDA): the step by which [`KvCache::growing`] caches allocate.
pub const KV_BLOCK: usize = 256;

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            tokens_per_step: 256,
            kv_memory: None,
            kv_reserve: KV_RESERVE,
            kv_f16: false,
        }
    }
}

/// A sequence of a [`BatchGenerator`], as [`BatchGenerator::insert`] returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// An event of one sequence, from [`BatchGenerator::step`]. A sequence's events come in the
/// order [`super::Generation`] would yield them; its last is [`Event::Finished`] or an error,
/// after which the sequence is gone.
#[derive(Debug)]
pub struct BatchEvent {
    /// The sequence.
    pub id: SeqId,
    /// The event, or the error that ended the sequence.
    pub event: Result<Event>,
}

/// Where a sequence is between steps.
enum Phase {
    /// Waiting to be admitted: its token state has not been asked anything yet.
    New,
    /// Prefilling `input` (the prompt and the tokens forced at the start); `done` ids of it
    /// are in the cache.
    Prefill {
        input: ModelInput,
        done: usize,
        prompt_tokens: usize,
        started: Option<Instant>,
    },
    /// Decoding: these ids go into the next pass.
    Decode(Vec<u32>),
    /// Preempted (its cache dropped) or starting from a prefix-cache hit under a KV budget:
    /// `replay` (the ids its cache held) is fed again, `done` of them are in the cache, and
    /// then the sequence goes on in phase `then` (never [`Phase::Resume`]; [`Phase::New`] only
    /// until it is admitted). The logits of these passes are not used.
    Resume {
        replay: Vec<u32>,
        done: usize,
        then: Box<Phase>,
    },
    /// Finished or failed: removed at the end of the step.
    Done,
}

struct Seq<'a> {
    id: SeqId,
    cache: KvCache,
    tokens: TokenState,
    text: TextState<'a>,
    phase: Phase,
    /// The token ids the cache holds, in order, while they are all known (a text prompt
    /// inserted through [`BatchGenerator::insert`]); `None` otherwise.
    fed: Option<Vec<u32>>,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
    /// Finished normally (not failed): its tokens may join the prefix cache.
    finished: bool,
    /// Prompt tokens to prefill, as inserted (what [`Phase::New`] will ask for).
    prompt_len: usize,
    /// Its cache is kept when it ends, for [`BatchGenerator::take_cache`].
    keep: bool,
}

impl Phase {
    /// Positions a sequence in this phase adds to its cache before its next token is drawn;
    /// `prompt_len` for [`Phase::New`].
    fn pending(&self, prompt_len: usize) -> usize {
        match self {
            Phase::New => prompt_len,
            Phase::Prefill { input, done, .. } => input.ids.len() - done,
            Phase::Decode(ids) => ids.len(),
            Phase::Resume {
                replay, done, then, ..
            } => replay.len() - done + then.pending(prompt_len),
            Phase::Done => 0,
        }
    }
}

impl Seq<'_> {
    /// Moves the queued events of the text layer to `out`.
    fn drain(&mut self, out: &mut Vec<BatchEvent>) {
        while let Some(e) = self.text.pop() {
            out.push(BatchEvent {
                id: self.id,
                event: Ok(e),
            });
        }
    }

    /// Ends the sequence with `e` (after its queued events).
    fn fail(&mut self, e: Error, out: &mut Vec<BatchEvent>) {
        self.drain(out);
        self.text.fail();
        self.phase = Phase::Done;
        out.push(BatchEvent {
            id: self.id,
            event: Err(e),
        });
    }

    /// Passes a drawn token to the text layer; returns whether the sequence goes on.
    fn push(&mut self, tok: super::Token, out: &mut Vec<BatchEvent>) -> bool {
        let positions = self.tokens.positions(self.cache.offset());
        match self.text.push(tok, positions, self.tokens.decode_passes()) {
            Ok(done) => {
                self.drain(out);
                if done {
                    self.phase = Phase::Done;
                    self.finished = true;
                }
                !done
            }
            Err(e) => {
                self.fail(e, out);
                false
            }
        }
    }

    /// Asks the token state what comes next, yielding forced tokens, until the sequence needs
    /// a pass (or ends).
    fn advance(&mut self, out: &mut Vec<BatchEvent>) {
        loop {
            match self.tokens.next_need() {
                Err(e) => return self.fail(e, out),
                Ok(Next::Token(t)) => {
                    if !self.push(t, out) {
                        return;
                    }
                }
                Ok(Next::Prompt {
                    input,
                    prompt_tokens,
                }) => {
                    self.phase = Phase::Prefill {
                        input,
                        done: 0,
                        prompt_tokens,
                        started: None,
                    };
                    return;
                }
                Ok(Next::Feed(ids)) => {
                    self.phase = Phase::Decode(ids);
                    return;
                }
            }
        }
    }

    /// Draws the next token from the logits `[1, vocab]` after the sequence's part of a pass
    /// (its sampler, grammar and prefill statistics); [`Self::emit`] then yields it. The draws
    /// of a step's sequences are independent, so they run in parallel.
    fn draw(&mut self, logits: &candle_core::Tensor, drawn: Option<DeviceDrawn>) -> Result<Token> {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        let tok = match phase {
            Phase::Decode(_) => self.tokens.accept_drawn(logits, drawn),
            Phase::Prefill {
                prompt_tokens,
                started,
                ..
            } => {
                let stats = PrefillStats {
                    prompt_tokens,
                    ..Default::default()
                };
                let started = started.unwrap_or_else(Instant::now);
                let tok = self
                    .tokens
                    .accept_prefill_drawn(logits, stats, started, drawn);
                crate::memory::release_free_heap();
                if let Some(p) = self.tokens.prefill_stats() {
                    self.text.set_prefill(p);
                }
                tok
            }
            Phase::New | Phase::Done | Phase::Resume { .. } => Err(Error::InvalidArgument(
                "the batch generator got logits for a sequence that asked for none".into(),
            )),
        };
        tok
    }

    /// Yields the token [`Self::draw`] drew (its text, stops and finish) or its error.
    fn emit(&mut self, tok: Result<Token>, out: &mut Vec<BatchEvent>) {
        match tok {
            Ok(t) => {
                if self.push(t, out) {
                    self.advance(out);
                }
            }
            Err(e) => self.fail(e, out),
        }
    }
}

/// Generates for many sequences at once; see the module documentation.
pub struct BatchGenerator<'a> {
    model: &'a dyn CausalLM,
    tokenizer: &'a Tokenizer,
    config: BatchConfig,
    running: Vec<Seq<'a>>,
    waiting: VecDeque<Seq<'a>>,
    next_id: u64,
    prefix: Option<Arc<Mutex<PrefixCache>>>,
    /// Bytes of one cached position, all layers (f32 keys and values of
    /// [`CausalLM::cache_shapes`]): the unit of the KV budget.
    position_bytes: usize,
    /// Sequences preempted so far.
    preemptions: u64,
    /// Caches of ended sequences inserted by [`BatchGenerator::insert_keeping`].
    kept: std::collections::HashMap<SeqId, KvCache>,
    /// The blocks of the sequences' keys and values under a KV budget on the CPU or CUDA.
    pool: Option<Arc<KvBlockPool>>,
}

impl<'a> BatchGenerator<'a> {
    /// An empty generator over `model` and `tokenizer`; `config`'s bounds are raised to 1.
    /// With [`BatchConfig::kv_memory`] and a model on the CPU or a CUDA GPU, the KV block pool
    /// is made here (on the CPU its blocks' storage is allocated as they are first used, on
    /// the GPU all of it now).
    pub fn new(model: &'a dyn CausalLM, tokenizer: &'a Tokenizer, config: BatchConfig) -> Self {
        let device = model.device();
        let kv_dtype = KvBlockPool::dtype_for(device, config.kv_f16);
        let pool = config
            .kv_memory
            .filter(|_| device.is_cpu() || device.is_cuda())
            .and_then(|bytes| {
                match KvBlockPool::with_bytes_on(&model.cache_shapes(), bytes, kv_dtype, device) {
                    Ok(p) => Some(Arc::new(p)),
                    Err(e) => {
                        tracing::warn!("no KV block pool, caches are accounted instead: {e}");
                        None
                    }
                }
            });
        Self {
            model,
            tokenizer,
            config: BatchConfig {
                max_batch: config.max_batch.max(1),
                tokens_per_step: config.tokens_per_step.max(1),
                kv_memory: config.kv_memory,
                kv_reserve: config.kv_reserve,
                kv_f16: config.kv_f16,
            },
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_id: 0,
            prefix: None,
            position_bytes: model
                .cache_shapes()
                .iter()
                .map(|&(heads, dim)| 2 * heads * dim * kv_dtype.size_in_bytes())
                .sum(),
            preemptions: 0,
            kept: std::collections::HashMap::new(),
            pool,
        }
    }

    /// The KV block pool of the sequences' caches (see the module documentation); `None`
    /// without a KV budget or on a device other than the CPU and CUDA.
    pub fn kv_pool(&self) -> Option<&Arc<KvBlockPool>> {
        self.pool.as_ref()
    }

    /// A fresh cache for a sequence ([`CausalLM::new_cache`]), its growing key/value layers
    /// replaced by [`crate::kv_pool::PagedKvCache`]s of the pool when there is one (layers with an array
    /// state stay as they are).
    fn fresh_cache(&self) -> KvCache {
        let mut cache = self.new_cache();
        if let Some(pool) = &self.pool {
            cache.page_into(pool);
        }
        cache
    }

    /// The model's fresh cache ([`CausalLM::new_cache`]), its growing layers storing f16
    /// under [`BatchConfig::kv_f16`].
    fn new_cache(&self) -> KvCache {
        let mut cache = self.model.new_cache();
        if self.config.kv_f16 {
            // Layers that cannot store f16 (an array state) keep their own.
            cache.set_storage_dtype(DType::F16);
        }
        cache
    }

    /// Positions per block of the budget's accounting: the pool's blocks, else [`KV_BLOCK`].
    fn unit(&self) -> usize {
        if self.pool.is_some() {
            BLOCK
        } else {
            KV_BLOCK
        }
    }

    /// The KV budget in bytes: [`BatchConfig::kv_memory`], down to the pool's whole blocks
    /// where there is a pool.
    fn budget(&self) -> Option<usize> {
        let b = self.config.kv_memory?;
        Some(match &self.pool {
            Some(p) => b.min(p.n_blocks() * p.block_bytes()),
            None => b,
        })
    }

    /// Uses `prefix` (shared, e.g. with a thread that saves it) for the sequences inserted from
    /// now on: see the module documentation. Only models whose fresh cache
    /// ([`CausalLM::new_cache`]) is [`KvCache::sliceable`] use it.
    pub fn with_prefix_cache(mut self, prefix: Arc<Mutex<PrefixCache>>) -> Self {
        self.prefix = Some(prefix);
        self
    }

    /// The bounds in use.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// Adds a sequence generating after `input` under `params`, with a fresh cache
    /// ([`CausalLM::new_cache`]); it joins the running ones at the next step with room.
    ///
    /// Errors: as [`super::generate_input`] (the prompt is checked now).
    ///
    /// With a prefix cache, a text prompt starts from its longest cached prefix (at least one
    /// token is still prefilled) and the sampler's history still holds the whole prompt.
    pub fn insert(&mut self, mut input: ModelInput, params: GenerateParams) -> Result<SeqId> {
        if !input.images.is_empty() {
            return self.insert_with_cache(self.fresh_cache(), input, params);
        }
        let budget = self.config.kv_memory.is_some();
        // Under a budget the hit is only counted here, in a cache outside the block pool (the
        // waiting sequence holds none; see below).
        let mut cache = if budget {
            self.new_cache()
        } else {
            self.fresh_cache()
        };
        let all = input.ids.clone();
        let mut cached = 0;
        if let Some(p) = self.prefix.as_ref().filter(|_| cache.sliceable()) {
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            match p.lookup_into(&all, &mut cache) {
                Ok(n) => cached = n,
                Err(e) => {
                    tracing::warn!("prefix cache lookup failed, prefilling the whole prompt: {e}");
                    cache.reset();
                }
            }
        }
        input.ids.drain(..cached);
        let (tokens, text) =
            sequence_parts(self.model, self.tokenizer, cache.offset(), input, params)?;
        let tokens = tokens.with_history_prefix(&all[..cached]);
        let fresh = budget.then(|| self.fresh_cache());
        let id = self.push_waiting(cache, tokens, text);
        if let Some(s) = self.waiting.back_mut() {
            s.cached = cached;
            s.fed = Some(all[..cached].to_vec());
            match fresh {
                Some(fresh) if cached == 0 => s.cache = fresh,
                Some(fresh) => {
                    // Under a budget a waiting sequence holds no cache: the hit is looked up
                    // again when it is admitted.
                    s.cache = fresh;
                    s.fed = Some(Vec::new());
                    s.phase = Phase::Resume {
                        replay: all[..cached].to_vec(),
                        done: 0,
                        then: Box::new(Phase::New),
                    };
                }
                None => {}
            }
        }
        Ok(id)
    }

    /// Prompt tokens sequence `id` took from the prefix cache (0 without a hit); `None` for
    /// an unknown or finished sequence.
    pub fn cached_tokens(&self, id: SeqId) -> Option<usize> {
        self.running
            .iter()
            .chain(&self.waiting)
            .find(|s| s.id == id)
            .map(|s| s.cached)
    }

    /// As [`Self::insert`], appending to `cache` (which may already hold a prefix of the
    /// sequence, as [`super::generate_input`]'s cache may).
    ///
    /// Errors: as [`super::generate_input`].
    pub fn insert_with_cache(
        &mut self,
        cache: KvCache,
        input: ModelInput,
        params: GenerateParams,
    ) -> Result<SeqId> {
        let (tokens, text) =
            sequence_parts(self.model, self.tokenizer, cache.offset(), input, params)?;
        Ok(self.push_waiting(cache, tokens, text))
    }

    /// As [`Self::insert_with_cache`], but when the sequence ends (finished, failed or ended
    /// by a failed pass) its cache is kept for [`Self::take_cache`], and a refused input gives
    /// the cache back with the error. For a caller that holds a conversation's cache between
    /// turns ([`crate::generate::engine::Engine`]).
    pub fn insert_keeping(
        &mut self,
        cache: KvCache,
        input: ModelInput,
        params: GenerateParams,
    ) -> std::result::Result<SeqId, Box<(Error, KvCache)>> {
        match sequence_parts(self.model, self.tokenizer, cache.offset(), input, params) {
            Ok((tokens, text)) => {
                let id = self.push_waiting(cache, tokens, text);
                if let Some(s) = self.waiting.back_mut() {
                    s.keep = true;
                }
                Ok(id)
            }
            Err(e) => Err(Box::new((e, cache))),
        }
    }

    /// The cache of sequence `id` (inserted by [`Self::insert_keeping`]) once it has ended:
    /// every position fed to the model (the prompt and the generated tokens but the last);
    /// `None` before it ends, for another sequence, or when taken already.
    pub fn take_cache(&mut self, id: SeqId) -> Option<KvCache> {
        self.kept.remove(&id)
    }

    fn push_waiting(&mut self, cache: KvCache, tokens: TokenState, text: TextState<'a>) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let prompt_len = tokens.positions(cache.offset()) - cache.offset();
        self.waiting.push_back(Seq {
            prompt_len,
            keep: false,
            id,
            cache,
            tokens,
            text,
            phase: Phase::New,
            fed: None,
            cached: 0,
            finished: false,
        });
        id
    }

    /// Cancels a sequence (running or waiting): it is dropped without further events. Returns
    /// its cache (the prompt and the tokens fed so far), or `None` for an unknown or finished
    /// sequence.
    pub fn remove(&mut self, id: SeqId) -> Option<KvCache> {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            return Some(self.running.remove(i).cache);
        }
        let i = self.waiting.iter().position(|s| s.id == id)?;
        self.waiting.remove(i).map(|s| s.cache)
    }

    /// Sequences running (prefilling or decoding).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting for room.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether no sequence is running or waiting.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Bytes the sequences' KV caches hold now, running and waiting ([`KvCache::nbytes`]).
    pub fn kv_bytes(&self) -> usize {
        let held: usize = self
            .running
            .iter()
            .chain(&self.waiting)
            .map(|s| s.cache.nbytes())
            .sum();
        held.saturating_sub(self.shared_bytes())
    }

    /// Bytes that summing the sequences' caches counts more than once: with the pool, every
    /// block in the tables of `n > 1` sequences (a prefix taken from the prefix cache by
    /// reference, a fork) counts `n - 1` times too many, one block in every layer
    /// ([`KvBlockPool::block_bytes`]). The first paged layer's tables stand for all (the
    /// layers of a sequence take, share and copy their blocks in step).
    fn shared_bytes(&self) -> usize {
        let Some(pool) = &self.pool else {
            return 0;
        };
        let mut holders = std::collections::HashMap::<u32, usize>::new();
        for s in self.running.iter().chain(&self.waiting) {
            let table =
                (0..s.cache.n_layers()).find_map(|i| s.cache.layer_ref(i).and_then(|l| l.paged()));
            for &id in table.iter().flat_map(|t| t.table()) {
                *holders.entry(id).or_default() += 1;
            }
        }
        let extra: usize = holders.values().map(|n| n - 1).sum();
        extra * pool.block_bytes()
    }

    /// Sequences preempted for the KV budget so far (each resumed later; see the module
    /// documentation).
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Bytes `s`'s cache holds once `extra` more positions are in it: its blocks of
    /// [`Self::unit`] positions, or what it holds now if that is more.
    fn reserve(&self, s: &Seq<'_>, extra: usize) -> usize {
        let unit = self.unit();
        let blocks = (s.cache.offset() + extra).div_ceil(unit);
        s.cache.nbytes().max(blocks * unit * self.position_bytes)
    }

    /// Bytes the running sequences need up to their next token and `ahead` positions past
    /// it, plus what the waiting ones hold, a block shared by several counted once.
    fn committed(&self, ahead: usize) -> usize {
        let running: usize = self
            .running
            .iter()
            .map(|r| self.reserve(r, r.phase.pending(r.prompt_len) + 1 + ahead))
            .sum();
        (running + self.waiting_bytes()).saturating_sub(self.shared_bytes())
    }

    /// Bytes the waiting sequences' caches hold: none for a preempted one, the cached prefix for
    /// one inserted with a prefix-cache hit, the cache given to [`Self::insert_with_cache`].
    fn waiting_bytes(&self) -> usize {
        self.waiting.iter().map(|s| s.cache.nbytes()).sum()
    }

    /// Admits waiting sequences, runs one forward pass over the running ones (see the module
    /// documentation) and returns the events it produced, in the order of the running
    /// sequences. Nothing runs when no sequence is there.
    ///
    /// An error of the pass itself ends every sequence that was in it, each with an error
    /// event; an error of one sequence (its grammar, its tokenizer) ends only that one.
    pub fn step(&mut self) -> Vec<BatchEvent> {
        let mut out = Vec::new();
        self.admit(&mut out);
        self.fit_budget(&mut out);
        self.reclaim_blocks();
        if let Some(i) = self.running.iter().position(
            |s| matches!(&s.phase, Phase::Prefill { input, .. } if !input.images.is_empty()),
        ) {
            // A prompt with images: the vision tower and the whole prompt, in a pass of its own.
            self.prefill_whole(i, &mut out);
        } else {
            let started = Instant::now();
            let plan = self.plan();
            self.batched_pass(&plan, &mut out);
            // The tokens drawn (copied back from a GPU) end the pass: its whole time.
            tracing::debug!(
                rows = plan.iter().filter(|&&n| n > 0).count(),
                one_token_rows = plan.iter().filter(|&&n| n == 1).count(),
                tokens = plan.iter().sum::<usize>(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "batched pass"
            );
        }
        if let Some(p) = &self.prefix {
            for s in &self.running {
                let Some(fed) = &s.fed else { continue };
                if matches!(s.phase, Phase::Done)
                    && s.finished
                    && s.cache.sliceable()
                    && fed.len() == s.cache.offset()
                {
                    let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
                    match p.insert(fed, &s.cache) {
                        Ok(n) => tracing::debug!(
                            tokens = fed.len(),
                            new = n,
                            bytes = p.nbytes(),
                            "prefix cache: inserted a finished sequence"
                        ),
                        Err(e) => tracing::warn!("prefix cache insert failed: {e}"),
                    }
                }
            }
        }
        let (ended, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| matches!(s.phase, Phase::Done));
        self.running = running;
        for s in ended {
            self.retire(s);
        }
        out
    }

    /// Moves waiting sequences into the running ones, in order, while there is room (and,
    /// under a KV budget, memory for the whole prompt), asking each what it needs first (a
    /// grammar may force tokens before the prompt is prefilled). A sequence that needs more
    /// than the whole budget fails.
    fn admit(&mut self, out: &mut Vec<BatchEvent>) {
        while self.running.len() < self.config.max_batch {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            if let Some(budget) = self.budget() {
                let pending = s.phase.pending(s.prompt_len) + 1;
                let need = self.reserve(&s, pending);
                let ahead = self.config.kv_reserve;
                if self.committed(ahead) + self.reserve(&s, pending + ahead) > budget {
                    if need > budget {
                        let positions = s.cache.offset() + s.phase.pending(s.prompt_len) + 1;
                        s.fail(
                            Error::InvalidArgument(format!(
                                "the sequence needs {need} bytes of KV cache ({positions} \
                                 positions), more than the KV memory budget of {budget} bytes"
                            )),
                            out,
                        );
                        self.retire(s);
                        continue;
                    }
                    if !self.running.is_empty() {
                        self.waiting.push_front(s);
                        break;
                    }
                    // Nothing runs: only waiting sequences' own caches are in the way.
                }
            }
            self.restore(&mut s, out);
            if matches!(s.phase, Phase::Done) {
                self.retire(s);
            } else {
                self.running.push(s);
            }
        }
    }

    /// Drops an ended sequence, keeping its cache when it was inserted by
    /// [`Self::insert_keeping`].
    fn retire(&mut self, s: Seq<'a>) {
        if s.keep {
            self.kept.insert(s.id, s.cache);
        }
    }

    /// Readies an admitted sequence: a resumed one takes what the prefix cache holds of its
    /// ids, and a new one (or the one a resume leads to) asks its token state what it needs.
    fn restore(&mut self, s: &mut Seq<'_>, out: &mut Vec<BatchEvent>) {
        if let Phase::Resume { replay, done, .. } = &mut s.phase {
            if let Some(p) = self.prefix.as_ref().filter(|_| *done == 0) {
                let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(pool) = &self.pool {
                    // Blocks the lookup may copy into (none for blocks it shares).
                    p.reclaim_pool_blocks(pool, replay.len().div_ceil(BLOCK));
                }
                // More tokens follow the replayed ones: every whole cached block may match.
                match p.resume_into(replay, &mut s.cache) {
                    Ok(n) => {
                        *done = n;
                        s.fed = Some(replay[..n].to_vec());
                    }
                    Err(e) => {
                        tracing::warn!("prefix cache lookup failed, recomputing: {e}");
                        s.cache = self.fresh_cache();
                    }
                }
            }
        }
        match &s.phase {
            Phase::New => s.advance(out),
            Phase::Resume { then, .. } if matches!(**then, Phase::New) => {
                let Phase::Resume { replay, done, .. } =
                    std::mem::replace(&mut s.phase, Phase::New)
                else {
                    unreachable!("matched above")
                };
                s.advance(out);
                if !matches!(s.phase, Phase::Done) {
                    let then = std::mem::replace(&mut s.phase, Phase::Done);
                    s.phase = Phase::Resume {
                        replay,
                        done,
                        then: Box::new(then),
                    };
                }
            }
            _ => {}
        }
        if matches!(&s.phase, Phase::Resume { replay, done, .. } if *done >= replay.len()) {
            if let Phase::Resume { then, .. } = std::mem::replace(&mut s.phase, Phase::Done) {
                s.phase = *then;
            }
        }
    }

    /// Under a KV budget, preempts the latest admitted sequences until the next pass's caches
    /// fit (see the module documentation). A sequence that cannot be recomputed (its ids are
    /// not all known: images, or a cache given to [`Self::insert_with_cache`]) is never
    /// preempted; when no other can be and the pass still does not fit, the latest fails.
    fn fit_budget(&mut self, out: &mut Vec<BatchEvent>) {
        let Some(budget) = self.budget() else {
            return;
        };
        loop {
            let plan = self.plan();
            let running: usize = self
                .running
                .iter()
                .zip(&plan)
                .map(|(s, &n)| self.reserve(s, n))
                .sum();
            let used = (running + self.waiting_bytes()).saturating_sub(self.shared_bytes());
            if used <= budget || self.running.is_empty() {
                return;
            }
            let victim = (0..self.running.len())
                .rev()
                .find(|&i| self.running.len() > 1 && self.running[i].fed.is_some());
            match victim {
                Some(i) => self.preempt(i),
                None => {
                    let mut s = self.running.pop().expect("not empty");
                    let positions = s.cache.offset();
                    s.fail(
                        Error::InvalidArgument(format!(
                            "the KV memory budget of {budget} bytes cannot hold the next step of \
                             this sequence ({positions} positions cached; {used} bytes needed \
                             with the other running sequences)"
                        )),
                        out,
                    );
                    self.retire(s);
                }
            }
        }
    }

    /// With a block pool and a prefix cache: evicts prefix-cache leaves holding pool blocks
    /// until the pool has the blocks the next pass takes (the budget counts the sequences'
    /// blocks, not those only the prefix cache holds).
    fn reclaim_blocks(&self) {
        let (Some(pool), Some(prefix)) = (&self.pool, &self.prefix) else {
            return;
        };
        let need: usize = self
            .running
            .iter()
            .zip(self.plan())
            .map(|(s, n)| {
                let at = s.cache.offset();
                (at + n).div_ceil(BLOCK) - at.div_ceil(BLOCK)
            })
            .sum();
        if pool.free_blocks() < need {
            let mut p = prefix.lock().unwrap_or_else(|e| e.into_inner());
            let n = p.reclaim_pool_blocks(pool, need);
            tracing::debug!(need, evicted = n, "KV pool: prefix-cache blocks reclaimed");
        }
    }

    /// Drops running sequence `i`'s cache and puts it at the head of the waiting queue, to be
    /// recomputed from its fed ids when it is admitted again.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        let fed = s.fed.replace(Vec::new()).unwrap_or_default();
        let phase = std::mem::replace(&mut s.phase, Phase::Done);
        s.phase = match phase {
            // Preempted again while resuming: the same ids, from the start.
            Phase::Resume { replay, then, .. } => Phase::Resume {
                replay,
                done: 0,
                then,
            },
            then if fed.is_empty() => then,
            then => Phase::Resume {
                replay: fed,
                done: 0,
                then: Box::new(then),
            },
        };
        tracing::debug!(
            id = s.id.0,
            positions = s.cache.offset(),
            bytes = s.cache.nbytes(),
            "KV budget: preempted a sequence"
        );
        s.cache = self.fresh_cache();
        self.preemptions += 1;
        self.waiting.push_front(s);
    }

    /// Prefills running sequence `i`'s prompt (with images) whole.
    fn prefill_whole(&mut self, i: usize, out: &mut Vec<BatchEvent>) {
        let model = self.model;
        let s = &mut self.running[i];
        let Phase::Prefill {
            input,
            prompt_tokens,
            ..
        } = std::mem::replace(&mut s.phase, Phase::Done)
        else {
            return;
        };
        s.fed = None; // images: not cached
        let t0 = Instant::now();
        let chunk = s.text.params().prefill_chunk.max(1);
        let r = model.prefill(&input, &mut s.cache, chunk).and_then(|p| {
            let stats = PrefillStats {
                prompt_tokens,
                time: Duration::ZERO,
                vision_time: p.vision_time,
                image_tokens: p.image_tokens,
            };
            s.tokens.accept_prefill(&p.logits, stats, t0)
        });
        crate::memory::release_free_heap();
        match r {
            Ok(t) => {
                if let Some(p) = s.tokens.prefill_stats() {
                    s.text.set_prefill(p);
                }
                if s.push(t, out) {
                    s.advance(out);
                }
            }
            Err(e) => s.fail(e, out),
        }
    }

    /// Rows of the next pass per running sequence: all of a decoding sequence's ids, and
    /// prompt chunks within the budget, in arrival order.
    fn plan(&self) -> Vec<usize> {
        let decode: usize = self
            .running
            .iter()
            .map(|s| match &s.phase {
                Phase::Decode(ids) => ids.len(),
                _ => 0,
            })
            .sum();
        let per_step = self.config.tokens_per_step;
        let mut budget = per_step.saturating_sub(decode).max(per_step / 4).max(1);
        self.running
            .iter()
            .map(|s| {
                let left = match &s.phase {
                    Phase::Decode(ids) => return ids.len(),
                    Phase::Prefill { input, done, .. } if input.images.is_empty() => {
                        input.ids.len() - done
                    }
                    Phase::Resume { replay, done, .. } => replay.len() - done,
                    _ => return 0,
                };
                let chunk = s.text.params().prefill_chunk.max(1);
                let n = left.min(chunk).min(budget);
                budget -= n;
                n
            })
            .collect()
    }

    /// On a GPU, the tokens of the sequences drawing from `logits` (`row_of`: each running
    /// sequence's row) drawn there together ([`crate::device::draw_rows_on_device`]), for
    /// the sequences whose choice runs there; `None` for the others and off a GPU. A failed
    /// draw fails the sequences that took part (their uniform draws are spent) and takes
    /// their rows out of `row_of`.
    fn draw_on_device(
        &mut self,
        logits: &candle_core::Tensor,
        row_of: &mut [Option<usize>],
        out: &mut Vec<BatchEvent>,
    ) -> Vec<Option<DeviceDrawn>> {
        let mut pre = vec![None; row_of.len()];
        if logits.device().is_cpu() {
            return pre;
        }
        let Ok(vocab) = logits.dim(1) else {
            return pre;
        };
        let mut picks = Vec::new();
        for (i, (s, k)) in self.running.iter_mut().zip(row_of.iter()).enumerate() {
            if let Some(k) = k {
                if let Some(p) = s.tokens.device_pick(vocab) {
                    picks.push((i, *k, p));
                }
            }
        }
        let rows: Vec<_> = picks.iter().map(|(_, k, p)| (*k, p)).collect();
        match crate::device::draw_rows_on_device(logits, &rows) {
            Ok(ids) => {
                for ((i, _, pick), id) in picks.into_iter().zip(ids) {
                    pre[i] = Some(DeviceDrawn { pick, id });
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (i, ..) in picks {
                    let err = Error::Model(format!("drawing the batch's tokens failed: {msg}"));
                    self.running[i].fail(err, out);
                    row_of[i] = None;
                }
            }
        }
        pre
    }

    /// One forward pass over the rows of `plan` ([`Self::plan`]), then each sequence takes its
    /// logits.
    fn batched_pass(&mut self, plan: &[usize], out: &mut Vec<BatchEvent>) {
        let now = Instant::now();
        let mut rows = Vec::new();
        let mut members = Vec::new();
        for (i, (s, &n)) in self.running.iter_mut().zip(plan).enumerate() {
            if n == 0 {
                continue;
            }
            let ids = match &mut s.phase {
                Phase::Decode(ids) => ids.as_slice(),
                Phase::Prefill {
                    input,
                    done,
                    started,
                    ..
                } => {
                    started.get_or_insert(now);
                    &input.ids[*done..*done + n]
                }
                Phase::Resume { replay, done, .. } => &replay[*done..*done + n],
                Phase::New | Phase::Done => continue,
            };
            rows.push(BatchRow {
                ids,
                cache: &mut s.cache,
            });
            members.push(i);
        }
        if rows.is_empty() {
            return;
        }
        let model = self.model;
        let logits = crate::kernels::in_pool_on(model.device(), || model.forward_batch(&mut rows));
        drop(rows);
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                let msg = e.to_string();
                let mut e = Some(e);
                for &i in &members {
                    let err = e.take().unwrap_or_else(|| {
                        Error::Model(format!("the batched forward pass failed: {msg}"))
                    });
                    self.running[i].fail(err, out);
                }
                return;
            }
        };
        // Which member's logits row each running sequence takes now (none while a prompt has
        // chunks to go).
        let mut row_of = vec![None; self.running.len()];
        for (k, &i) in members.iter().enumerate() {
            let s = &mut self.running[i];
            if let Some(fed) = &mut s.fed {
                match &s.phase {
                    Phase::Decode(ids) => fed.extend_from_slice(ids),
                    Phase::Prefill { input, done, .. } => {
                        fed.extend_from_slice(&input.ids[*done..*done + plan[i]])
                    }
                    Phase::Resume { replay, done, .. } => {
                        fed.extend_from_slice(&replay[*done..*done + plan[i]])
                    }
                    Phase::New | Phase::Done => {}
                }
            }
            if let Phase::Resume { replay, done, .. } = &mut s.phase {
                *done += plan[i];
                if *done >= replay.len() {
                    if let Phase::Resume { then, .. } = std::mem::replace(&mut s.phase, Phase::Done)
                    {
                        s.phase = *then;
                    }
                }
                continue; // recomputing the cache: these logits are not needed
            }
            if let Phase::Prefill { input, done, .. } = &mut s.phase {
                *done += plan[i];
                if *done < input.ids.len() {
                    continue; // more chunks to come; these logits are not needed
                }
            }
            row_of[i] = Some(k);
        }
        let pre = self.draw_on_device(&logits, &mut row_of, out);
        let draw = |s: &mut Seq<'a>, (k, pre): &(Option<usize>, Option<DeviceDrawn>)| {
            k.map(|k| {
                logits
                    .get(k)
                    .and_then(|l| l.unsqueeze(0))
                    .map_err(Error::from)
                    .and_then(|row| s.draw(&row, pre.clone()))
            })
        };
        let with: Vec<_> = row_of.into_iter().zip(pre).collect();
        let drawn = crate::kernels::zip_map_on(logits.device(), &mut self.running, &with, draw);
        for (s, tok) in self.running.iter_mut().zip(drawn) {
            if let Some(tok) = tok {
                s.emit(tok, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::DefaultHasher;
    use std::collections::HashMap;
    use std::hash::{Hash, Hasher};

    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::generate::{generate, FinishReason};
    use crate::kernels::GgufMatrix;
    use crate::models::Logits;
    use crate::nn::{Embedding, Linear};
    use crate::sampling::SamplingParams;
    use crate::tokenizer::test_util::single_byte_gpt2;
    use crate::weights::{WeightLayout, Weights};

    /// Random weights named on demand, the same for the same name; linear layers dense or
    /// GGUF `Q4_1` on our CPU kernels (the quantized GEMM path of the default model).
    struct RandomWeights {
        quantized: bool,
        device: Device,
    }

    impl RandomWeights {
        fn values(name: &str, n: usize, scale: f32) -> Vec<f32> {
            let mut h = DefaultHasher::new();
            name.hash(&mut h);
            let mut rng = rand::rngs::StdRng::seed_from_u64(h.finish());
            (0..n).map(|_| rng.random_range(-scale..scale)).collect()
        }
    }

    impl Weights for RandomWeights {
        fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
            assert!(!bias, "the test model has no biases");
            let scale = 2.0 / (inp as f32).sqrt();
            let w = Tensor::from_vec(
                Self::values(prefix, out * inp, scale),
                (out, inp),
                &self.device,
            )?;
            if !self.quantized {
                return Ok(Linear::dense(w, None));
            }
            let q = QTensor::quantize(&w, GgmlDType::Q4_1)?;
            let weight = GgufMatrix::from_qtensor(prefix, &q)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            Ok(Linear::Kernel { weight, bias: None })
        }
        fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
            let v = Self::values(name, vocab * hidden, 1.0);
            Ok(Embedding::Dense(Tensor::from_vec(
                v,
                (vocab, hidden),
                &self.device,
            )?))
        }
        fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
            let n = shape.iter().product();
            // Norm weights near 1.
            let v = Self::values(name, n, 0.2)
                .into_iter()
                .map(|x| 1.0 + x)
                .collect();
            Ok(Tensor::from_vec(v, shape, &self.device)?)
        }
        fn contains(&self, _: &str) -> bool {
            true
        }
        fn device(&self) -> &Device {
            &self.device
        }
        fn layout(&self) -> WeightLayout {
            WeightLayout::REFERENCE
        }
    }

    /// max |a - b| over two f32 tensors of one shape.
    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("f32 tensors of one shape")
    }

    /// A tiny random Llama (2 layers, 4 heads over 2 KV heads, hidden 64) over the
    /// single-byte tokenizer's 257 tokens.
    fn tiny_llama(quantized: bool) -> Box<dyn CausalLM> {
        let config = serde_json::json!({
            "vocab_size": 257, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        });
        let w = RandomWeights {
            quantized,
            device: Device::Cpu,
        };
        crate::models::llama::build(&config, &w).expect("tiny llama")
    }

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_gguf_metadata(&single_byte_gpt2()).expect("tokenizer")
    }

    fn prompt(n: usize, seed: u64) -> Vec<u32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(0..256)).collect()
    }

    /// A cache per prompt, each holding its prompt (prefilled by `m`).
    fn prefilled(m: &dyn CausalLM, prompts: &[Vec<u32>]) -> Vec<KvCache> {
        prompts
            .iter()
            .map(|p| {
                let mut c = m.new_cache();
                crate::models::prefill_text(m, p, &mut c, 512).expect("prefill");
                c
            })
            .collect()
    }

    /// The batch rows feeding `feeds[i]` to `caches[i]`.
    fn rows_of<'a, F: AsRef<[u32]>>(
        caches: &'a mut [KvCache],
        feeds: &'a [F],
    ) -> Vec<BatchRow<'a>> {
        caches
            .iter_mut()
            .zip(feeds)
            .map(|(cache, ids)| BatchRow {
                ids: ids.as_ref(),
                cache,
            })
            .collect()
    }

    fn params(max_tokens: usize, sampling: SamplingParams) -> GenerateParams {
        GenerateParams {
            max_tokens,
            sampling,
            ignore_eos: true,
            ..Default::default()
        }
    }

    /// The token ids one sequence generates alone ([`generate`]).
    fn alone(model: &dyn CausalLM, tok: &Tokenizer, prompt: &[u32], p: GenerateParams) -> Vec<u32> {
        alone_in(model.new_cache(), model, tok, prompt, p)
    }

    /// [`alone`] in `cache` (an f16 one, say).
    fn alone_in(
        mut cache: KvCache,
        model: &dyn CausalLM,
        tok: &Tokenizer,
        prompt: &[u32],
        p: GenerateParams,
    ) -> Vec<u32> {
        let out = generate(model, tok, &mut cache, prompt, p)
            .expect("starts")
            .collect_output()
            .expect("generates");
        out.token_ids
    }

    /// Runs steps until every sequence finished, inserting `joins[k] = (step, prompt,
    /// params)` at its step; returns each sequence's token ids and finish reason, and how
    /// many steps each spent before its first token.
    fn run_batch(
        gen: &mut BatchGenerator<'_>,
        joins: Vec<(usize, Vec<u32>, GenerateParams)>,
    ) -> HashMap<SeqId, (Vec<u32>, Option<FinishReason>)> {
        let mut out: HashMap<SeqId, (Vec<u32>, Option<FinishReason>)> = HashMap::new();
        let mut joins: VecDeque<_> = joins.into();
        let mut step = 0;
        while !joins.is_empty() || !gen.is_empty() {
            while joins.front().is_some_and(|j| j.0 <= step) {
                let (_, p, params) = joins.pop_front().expect("a join");
                let id = gen.insert(ModelInput::text(p), params).expect("insert");
                out.insert(id, (Vec::new(), None));
            }
            for e in gen.step() {
                let entry = out.get_mut(&e.id).expect("a known sequence");
                match e.event.expect("no error") {
                    Event::Token { id, .. } => entry.0.push(id),
                    Event::Finished { reason, .. } => entry.1 = Some(reason),
                    Event::Text(_) => {}
                }
            }
            step += 1;
            assert!(step < 1000, "the batch never finishes");
        }
        out
    }

    /// Inserts `prompts` (each with `p`) and steps `gen` until every sequence has ended (at
    /// most 3,000 steps, none failing), calling `after_step` after each step; returns each
    /// sequence's token ids, in the order of `prompts`.
    fn run_to_end(
        gen: &mut BatchGenerator<'_>,
        prompts: &[Vec<u32>],
        p: &GenerateParams,
        mut after_step: impl FnMut(&BatchGenerator<'_>),
    ) -> Vec<Vec<u32>> {
        let ids: Vec<SeqId> = prompts
            .iter()
            .map(|q| gen.insert(ModelInput::text(q.clone()), p.clone()).unwrap())
            .collect();
        let mut toks: HashMap<SeqId, Vec<u32>> = HashMap::new();
        for _ in 0..3000 {
            if gen.is_empty() {
                break;
            }
            for e in gen.step() {
                if let Event::Token { id, .. } = e.event.expect("no sequence fails") {
                    toks.entry(e.id).or_default().push(id);
                }
            }
            after_step(gen);
        }
        assert!(gen.is_empty(), "the batch never finishes");
        ids.iter()
            .map(|id| toks.remove(id).unwrap_or_default())
            .collect()
    }

    /// A batch of at most 4 sequences and 512 tokens a step under a KV budget of `budget`
    /// bytes with a decode headroom of `reserve` positions.
    fn four_under<'a>(
        m: &'a dyn CausalLM,
        tok: &'a Tokenizer,
        budget: usize,
        reserve: usize,
    ) -> BatchGenerator<'a> {
        BatchGenerator::new(m, tok, four_under_config(budget, reserve))
    }

    /// The configuration of [`four_under`] (f32 caches).
    fn four_under_config(budget: usize, reserve: usize) -> BatchConfig {
        BatchConfig {
            max_batch: 4,
            tokens_per_step: 512,
            kv_memory: Some(budget),
            kv_reserve: reserve,
            kv_f16: false,
        }
    }

    /// The four prompts of 64 tokens and greedy 150-token answers of the KV headroom tests,
    /// whose caches end at 214 positions (14 pool blocks).
    fn four_long_answers() -> (Vec<Vec<u32>>, GenerateParams) {
        let prompts = (0..4).map(|i| prompt(64, 60 + i)).collect();
        (prompts, params(150, SamplingParams::default()))
    }

    /// [`run_to_end`], also returning the most KV bytes held after a step and the most
    /// sequences running at once.
    fn run_measured(
        gen: &mut BatchGenerator<'_>,
        prompts: &[Vec<u32>],
        p: &GenerateParams,
    ) -> (Vec<Vec<u32>>, usize, usize) {
        let (mut peak, mut most_running) = (0, 0);
        let toks = run_to_end(gen, prompts, p, |gen| {
            peak = peak.max(gen.kv_bytes());
            most_running = most_running.max(gen.running());
        });
        (toks, peak, most_running)
    }

    /// A pass split into its one-token rows and its prompt chunks
    /// ([`crate::models::forward_split`], what the CUDA accelerator runs) gives every row the
    /// logits of the one pass over all of them, in the rows' order, and appends each row's
    /// tokens to its own cache; nothing is split when one group is empty, and a group's wrong
    /// row count is an error.
    #[test]
    fn a_split_pass_keeps_each_rows_logits_and_cache() {
        let m = tiny_llama(true);
        let m = m.as_ref();
        let prompts = [prompt(3, 11), prompt(9, 12), prompt(5, 13), prompt(7, 14)];
        let feeds: [Vec<u32>; 4] = [vec![7], prompt(4, 15), vec![9], prompt(6, 16)];
        let caches = || prefilled(m, &prompts);
        let (mut whole, mut split) = (caches(), caches());
        let mut rows = rows_of(&mut whole, &feeds);
        let reference = m.forward_batch(&mut rows).expect("one pass");
        drop(rows);
        let mut groups = Vec::new();
        let mut rows = rows_of(&mut split, &feeds);
        let out = crate::models::forward_split(
            &mut rows,
            |one| {
                groups.push(one.iter().map(|r| r.ids.len()).collect::<Vec<_>>());
                m.forward_batch(one)
            },
            |more| m.forward_batch(more),
        )
        .expect("two passes")
        .expect("both groups have rows");
        drop(rows);
        assert_eq!(groups, [vec![1, 1]]);
        assert_eq!(out.dims(), reference.dims());
        // The packed products sum each row alone: the same logits whichever rows share a pass.
        let diff = max_abs_diff(&out, &reference);
        assert!(diff <= 1e-5, "split logits differ by {diff}");
        for ((a, b), (p, f)) in whole.iter().zip(&split).zip(prompts.iter().zip(&feeds)) {
            assert_eq!(
                (a.offset(), b.offset()),
                (p.len() + f.len(), p.len() + f.len())
            );
        }

        // Nothing to split: every row one token, or none; a closure's wrong row count.
        let mut rows: Vec<BatchRow<'_>> = split
            .iter_mut()
            .map(|cache| BatchRow { ids: &[3], cache })
            .collect();
        let none =
            crate::models::forward_split(&mut rows[..2], |_| unreachable!(), |_| unreachable!());
        assert!(none.expect("no pass").is_none());
        rows[1].ids = &[3, 4];
        let e = crate::models::forward_split(
            &mut rows[..2],
            |one| m.forward_batch(one),
            |_| {
                Ok(Tensor::zeros(
                    (3, 257),
                    candle_core::DType::F32,
                    &Device::Cpu,
                )?)
            },
        )
        .expect_err("three logits rows for one row");
        assert!(e.to_string().contains("for 1 rows"), "{e}");
    }

    /// A batched pass run row by row ([`crate::models::forward_each`], what the CUDA
    /// accelerator runs for a mixture of experts) gives every row the logits of the one pass
    /// over all of them and appends to each row's cache; a row the step refuses runs with the
    /// rows after it through the other closure, and a wrong row count is an error.
    #[test]
    fn a_pass_row_by_row_keeps_each_rows_logits_and_cache() {
        let m = tiny_llama(true);
        let m = m.as_ref();
        let prompts = [prompt(3, 21), prompt(9, 22), prompt(5, 23), prompt(7, 24)];
        let caches = || prefilled(m, &prompts);
        let feeds = [[7u32], [9], [11], [13]];
        let mut whole = caches();
        let mut rows = rows_of(&mut whole, &feeds);
        let reference = m.forward_batch(&mut rows).expect("one pass");
        drop(rows);
        // Every row stepped alone, then the step refusing the third row: the last two go
        // through `rest` together.
        for refuse in [None, Some(2usize)] {
            let mut each = caches();
            let mut rows = rows_of(&mut each, &feeds);
            let (mut stepped, mut rest_rows) = (0usize, Vec::new());
            let out = crate::models::forward_each(
                &mut rows,
                |row| {
                    if Some(stepped) == refuse {
                        return Ok(None);
                    }
                    stepped += 1;
                    let ids = Tensor::new(&[[row.ids[0]]], &Device::Cpu)?;
                    Ok(Some(m.forward(&ids, row.cache, Logits::Last)?))
                },
                |rest| {
                    rest_rows.push(rest.len());
                    m.forward_batch(rest)
                },
            )
            .expect("row by row");
            drop(rows);
            assert_eq!(out.dims(), reference.dims());
            let diff = max_abs_diff(&out, &reference);
            assert!(diff <= 1e-5, "refuse {refuse:?}: logits differ by {diff}");
            let want_rest: Vec<usize> = refuse.map(|r| feeds.len() - r).into_iter().collect();
            assert_eq!(rest_rows, want_rest);
            for (c, p) in each.iter().zip(&prompts) {
                assert_eq!(c.offset(), p.len() + 1);
            }
        }
        // A step giving two rows for one.
        let mut each = caches();
        let mut rows = rows_of(&mut each, &feeds);
        let e = crate::models::forward_each(
            &mut rows[..2],
            |_| {
                Ok(Some(Tensor::zeros(
                    (2, 257),
                    candle_core::DType::F32,
                    &Device::Cpu,
                )?))
            },
            |_| unreachable!(),
        )
        .expect_err("two logits rows for one row");
        assert!(e.to_string().contains("for 1 rows"), "{e}");
    }

    /// Logits of one batched pass against each sequence's own passes, on caches holding
    /// prompts of different lengths; then greedy tokens of three sequences of different
    /// prompt lengths joining at different steps (one prefilled over several steps, the
    /// budget being 8 tokens) are those each generates alone.
    ///
    /// Tolerance: the dense model's batched logits equal the single path's up to 1e-4
    /// (candle's f32 matmul may tile 3 rows differently than 1); the Q4_1 kernels quantize
    /// each activation row on its own and sum each row's blocks in the same order whatever
    /// the row count, so there they are equal bit for bit.
    #[test]
    fn batched_greedy_decoding_matches_each_sequence_alone() {
        let tok = tokenizer();
        for quantized in [false, true] {
            let model = tiny_llama(quantized);
            let m = model.as_ref();
            let prompts = [prompt(3, 1), prompt(9, 2), prompt(17, 3)];
            // One batched pass of one token each vs one pass each.
            let mut single = Vec::new();
            let mut caches = Vec::new();
            for p in &prompts {
                let mut c = m.new_cache();
                crate::models::prefill_text(m, p, &mut c, 512).expect("prefill");
                let mut c2 = m.new_cache();
                crate::models::prefill_text(m, p, &mut c2, 512).expect("prefill");
                let ids = Tensor::new(&[7u32], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                single.push(m.forward(&ids, &mut c2, Logits::Last).expect("forward"));
                caches.push(c);
            }
            let next = [7u32];
            let mut rows: Vec<BatchRow<'_>> = caches
                .iter_mut()
                .map(|cache| BatchRow { ids: &next, cache })
                .collect();
            let batched = m.forward_batch(&mut rows).expect("batched pass");
            assert_eq!(batched.dims(), &[3, 257]);
            let single = Tensor::cat(&single, 0).unwrap();
            let diff = max_abs_diff(&batched, &single);
            let tol = if quantized { 0.0 } else { 1e-4 };
            assert!(
                diff <= tol,
                "quantized={quantized}: batched logits differ by {diff}"
            );
            assert!(caches
                .iter()
                .zip(&prompts)
                .all(|(c, p)| c.offset() == p.len() + 1));

            let greedy = || params(12, SamplingParams::default());
            let mut gen = BatchGenerator::new(
                m,
                &tok,
                BatchConfig {
                    max_batch: 4,
                    tokens_per_step: 8,
                    kv_memory: None,
                    kv_reserve: 0,
                    kv_f16: false,
                },
            );
            let joins = vec![
                (0, prompts[0].clone(), greedy()),
                (2, prompts[1].clone(), greedy()),
                (3, prompts[2].clone(), greedy()),
            ];
            let got = run_batch(&mut gen, joins);
            let mut ids: Vec<_> = got.into_iter().collect();
            ids.sort_by_key(|(id, _)| *id);
            for ((_, (toks, reason)), p) in ids.iter().zip(&prompts) {
                assert_eq!(reason, &Some(FinishReason::MaxTokens));
                assert_eq!(toks, &alone(m, &tok, p, greedy()), "quantized={quantized}");
            }
        }
    }

    /// Per-sequence parameters, leaving mid-run, cancelling and a prefill interleaved with
    /// decode steps, in one batch.
    #[test]
    fn the_scheduler_keeps_each_sequence_its_own() {
        let tok = tokenizer();
        let model = tiny_llama(true);
        let m = model.as_ref();
        let greedy = params(10, SamplingParams::default());
        let sampled = params(
            10,
            SamplingParams {
                temperature: 0.9,
                top_k: 40,
                seed: Some(11),
                ..Default::default()
            },
        );
        let short = params(3, SamplingParams::default());
        let (pa, pb, pc, pd) = (prompt(5, 4), prompt(6, 5), prompt(4, 6), prompt(40, 7));
        let mut gen = BatchGenerator::new(
            m,
            &tok,
            BatchConfig {
                max_batch: 3,
                tokens_per_step: 8,
                kv_memory: None,
                kv_reserve: 0,
                kv_f16: false,
            },
        );
        let a = gen
            .insert(ModelInput::text(pa.clone()), greedy.clone())
            .unwrap();
        let b = gen
            .insert(ModelInput::text(pb.clone()), sampled.clone())
            .unwrap();
        let c = gen
            .insert(ModelInput::text(pc.clone()), short.clone())
            .unwrap();
        let cancelled = gen
            .insert(ModelInput::text(prompt(8, 8)), greedy.clone())
            .unwrap();
        let mut toks: HashMap<SeqId, Vec<u32>> = HashMap::new();
        let mut finished = Vec::new();
        let mut d = None;
        // Steps (while the long prompt prefills) in which `a` got no token.
        let mut a_stalled = 0;
        let mut d_first_token_step = None;
        for step in 0..200 {
            if gen.is_empty() {
                break;
            }
            if step == 2 {
                // Waiting behind max_batch: cancelled before it ever ran.
                assert_eq!(gen.waiting(), 1);
                assert!(gen.remove(cancelled).is_some());
                assert!(gen.remove(cancelled).is_none());
            }
            if step == 3 {
                d = Some(
                    gen.insert(ModelInput::text(pd.clone()), greedy.clone())
                        .unwrap(),
                );
            }
            let events = gen.step();
            let mut a_got = false;
            for e in events {
                assert_ne!(e.id, cancelled);
                match e.event.expect("no error") {
                    Event::Token { id, .. } => {
                        a_got |= e.id == a;
                        if Some(e.id) == d && d_first_token_step.is_none() {
                            d_first_token_step = Some(step);
                        }
                        toks.entry(e.id).or_default().push(id);
                    }
                    Event::Finished { reason, .. } => finished.push((e.id, reason)),
                    Event::Text(_) => {}
                }
            }
            if d.is_some() && d_first_token_step.is_none() && !finished.iter().any(|f| f.0 == a) {
                a_stalled += usize::from(!a_got);
            }
        }
        assert!(gen.is_empty());
        // `c` left first (3 tokens), then `d` joined in its place.
        assert_eq!(finished[0], (c, FinishReason::MaxTokens));
        assert_eq!(finished.len(), 4);
        // The long prompt (40 tokens, budget 8 less the decode rows) took several steps, and
        // the running stream got a token at every one of them.
        let d = d.expect("d joined");
        assert!(
            d_first_token_step.expect("d generated") >= 3 + 40 / 8,
            "{d_first_token_step:?}"
        );
        assert_eq!(a_stalled, 0);
        assert_eq!(toks[&a], alone(m, &tok, &pa, greedy.clone()));
        assert_eq!(toks[&b], alone(m, &tok, &pb, sampled.clone()));
        assert_eq!(toks[&c], alone(m, &tok, &pc, short));
        assert_eq!(toks[&d], alone(m, &tok, &pd, greedy));
        // The seeded sampled sequence is not the greedy one.
        assert_ne!(
            toks[&b],
            alone(m, &tok, &pb, params(10, SamplingParams::default()))
        );
    }

    /// A prompt sharing a cached prefix starts from it (only the rest is prefilled) and
    /// yields the tokens it yields alone from scratch; the previous turn's generated tokens
    /// are reused too.
    ///
    /// Tolerance: the logits after a cache hit equal those of a full prefill within 1e-4
    /// (the hit's prompt is prefilled in other chunks, so the attention products over the
    /// cached keys are computed with other row counts); greedy tokens are equal.
    #[test]
    fn a_prefix_cache_hit_yields_the_tokens_of_a_full_prefill() {
        use crate::prefix_cache::{PrefixCache, PrefixCacheConfig};
        let tok = tokenizer();
        for quantized in [false, true] {
            let model = tiny_llama(quantized);
            let m = model.as_ref();
            let prefix = Arc::new(Mutex::new(PrefixCache::new(PrefixCacheConfig {
                block_size: 8,
                max_bytes: 1 << 24,
            })));
            let mut gen = BatchGenerator::new(
                m,
                &tok,
                BatchConfig {
                    max_batch: 4,
                    tokens_per_step: 16,
                    kv_memory: None,
                    kv_reserve: 0,
                    kv_f16: false,
                },
            )
            .with_prefix_cache(prefix.clone());
            let greedy = || params(10, SamplingParams::default());
            let system = prompt(45, 21);
            let with = |tail: Vec<u32>| {
                let mut p = system.clone();
                p.extend(tail);
                p
            };
            // First turn: a miss; the finished sequence (45 + 5 prompt + 9 fed generated
            // tokens = 59, 56 in whole blocks) joins the cache.
            let first = with(prompt(5, 22));
            let got = run_batch(&mut gen, vec![(0, first.clone(), greedy())]);
            let (toks1, _) = got.values().next().expect("one sequence").clone();
            assert_eq!(toks1, alone(m, &tok, &first, greedy()));
            assert_eq!(prefix.lock().unwrap().n_tokens(), 56);
            // Two requests sharing the system prompt, together: 40 tokens from the cache.
            let (p2, p3) = (with(prompt(7, 23)), with(prompt(30, 24)));
            let id2 = gen.insert(ModelInput::text(p2.clone()), greedy()).unwrap();
            let id3 = gen.insert(ModelInput::text(p3.clone()), greedy()).unwrap();
            assert_eq!(gen.cached_tokens(id2), Some(40));
            assert_eq!(gen.cached_tokens(id3), Some(40));
            assert!(gen.remove(id2).is_some() && gen.remove(id3).is_some());
            let got = run_batch(
                &mut gen,
                vec![(0, p2.clone(), greedy()), (1, p3.clone(), greedy())],
            );
            let mut ids: Vec<_> = got.into_iter().collect();
            ids.sort_by_key(|(id, _)| *id);
            assert_eq!(
                ids[0].1 .0,
                alone(m, &tok, &p2, greedy()),
                "quantized={quantized}"
            );
            assert_eq!(
                ids[1].1 .0,
                alone(m, &tok, &p3, greedy()),
                "quantized={quantized}"
            );
            // The next turn: the first prompt, its answer and more: the answer is reused.
            let mut turn2 = first.clone();
            turn2.extend_from_slice(&toks1);
            turn2.extend(prompt(6, 25));
            let id = gen
                .insert(ModelInput::text(turn2.clone()), greedy())
                .unwrap();
            assert_eq!(gen.cached_tokens(id), Some(56));
            gen.remove(id);
            let got = run_batch(&mut gen, vec![(0, turn2.clone(), greedy())]);
            assert_eq!(
                got.values().next().unwrap().0,
                alone(m, &tok, &turn2, greedy()),
                "quantized={quantized}"
            );

            // Logits: the cached prefix plus the rest against a full prefill.
            let mut full = m.new_cache();
            crate::models::prefill_text(m, &p3[..p3.len() - 1], &mut full, 512).unwrap();
            let (n, mut hit) = prefix.lock().unwrap().lookup(&p3, m).unwrap();
            // `p3` itself was cached when it finished: all its whole blocks but the last token.
            assert_eq!(n, (p3.len() - 1) / 8 * 8);
            crate::models::prefill_text(m, &p3[n..p3.len() - 1], &mut hit, 512).unwrap();
            let last = Tensor::new(&p3[p3.len() - 1..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let a = m.forward(&last, &mut full, Logits::Last).unwrap();
            let b = m.forward(&last, &mut hit, Logits::Last).unwrap();
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-4,
                "quantized={quantized}: logits differ by {diff}"
            );
            eprintln!("quantized={quantized}: cache-hit logits differ by {diff}");
        }
    }

    /// Under a KV budget on the CPU the sequences' caches are block tables into one pool of
    /// `kv_memory / block_bytes` blocks: after every step the blocks in use are exactly those
    /// the sequences' caches hold (none leaks, a preempted sequence's come back), never more
    /// than the pool has, the pool does fill up, and every block is back when all are done;
    /// no sequence fails and the greedy tokens are each one's alone.
    #[test]
    fn the_kv_pool_holds_the_sequences_blocks_and_never_overflows() {
        let tok = tokenizer();
        let model = tiny_llama(true);
        let m = model.as_ref();
        let greedy = params(24, SamplingParams::default());
        let prompts: Vec<Vec<u32>> = [50, 130, 17, 90, 64, 33]
            .iter()
            .enumerate()
            .map(|(i, &n)| prompt(n, 70 + i as u64))
            .collect();
        // 2 layers x 2 KV heads x 16 wide, f32 keys and values: 8 KiB a block of 16.
        let block_bytes = 16 * 512;
        // 30 blocks and a few bytes: 480 positions, the pool rounds down.
        let budget = 30 * block_bytes + 100;
        let mut gen = BatchGenerator::new(
            m,
            &tok,
            BatchConfig {
                max_batch: 6,
                tokens_per_step: 64,
                kv_memory: Some(budget),
                kv_reserve: 0,
                kv_f16: false,
            },
        );
        let pool = gen.kv_pool().expect("a pool on the CPU").clone();
        assert_eq!((pool.n_blocks(), pool.block_bytes()), (30, block_bytes));
        let mut peak = 0;
        let toks = run_to_end(&mut gen, &prompts, &greedy, |gen| {
            let used = pool.used_blocks();
            assert!(
                used <= pool.n_blocks(),
                "{used} blocks of {}",
                pool.n_blocks()
            );
            assert_eq!(used * block_bytes, gen.kv_bytes(), "blocks in use vs held");
            peak = peak.max(used);
        });
        assert!(gen.preemptions() > 0, "the budget never bound");
        assert!(
            peak >= 25,
            "the pool never filled: peak {peak} of 30 blocks"
        );
        assert_eq!(pool.used_blocks(), 0, "every block is back");
        for (t, p) in toks.iter().zip(&prompts) {
            assert_eq!(t, &alone(m, &tok, p, greedy.clone()));
        }
    }

    /// With a KV budget and a prefix cache, a finished sequence's blocks stay in the pool
    /// under the prefix cache, and two later sequences starting with the same 64 tokens take
    /// those blocks into their tables by reference: together they hold fewer pool blocks than
    /// twice what one sequence takes, and each generates its tokens alone.
    #[test]
    fn sequences_with_a_cached_prefix_share_its_pool_blocks() {
        use crate::kv_pool::BLOCK;
        use crate::prefix_cache::{PrefixCache, PrefixCacheConfig};
        let tok = tokenizer();
        let model = tiny_llama(true);
        let m = model.as_ref();
        let greedy = params(8, SamplingParams::default());
        let prefix = prompt(64, 90);
        let with = |seed: u64| {
            let mut p = prefix.clone();
            p.extend(prompt(10, seed));
            p
        };
        let cache = Arc::new(Mutex::new(PrefixCache::new(PrefixCacheConfig {
            block_size: BLOCK,
            max_bytes: 1 << 26,
        })));
        let mut gen = BatchGenerator::new(
            m,
            &tok,
            BatchConfig {
                max_batch: 4,
                tokens_per_step: 256,
                kv_memory: Some(64 * BLOCK * 512),
                kv_reserve: 0,
                kv_f16: false,
            },
        )
        .with_prefix_cache(cache.clone());
        let pool = gen.kv_pool().expect("a pool on the CPU").clone();
        // The most pool blocks in use, and the most the sequences' caches hold (`kv_bytes`).
        let run = |gen: &mut BatchGenerator<'_>, prompts: &[Vec<u32>]| {
            let (mut peak, mut held) = (0, 0);
            let toks = run_to_end(gen, prompts, &greedy, |gen| {
                peak = peak.max(pool.used_blocks());
                held = held.max(gen.kv_bytes());
            });
            (toks, peak, held)
        };
        // One sequence alone, between steps: at most 74 prompt tokens and 6 more fed, 5 blocks
        // (it ends within the step that would take a sixth).
        let (_, one, _) = run(&mut gen, &[with(91)]);
        assert_eq!(one, (74 + 6usize).div_ceil(BLOCK));
        // The prefix cache keeps its 5 whole blocks in the pool.
        assert_eq!(pool.used_blocks(), 5);
        let (b, c) = (with(92), with(93));
        let (toks, two, held) = run(&mut gen, &[b.clone(), c.clone()]);
        // 5 blocks of the prefix cache (4 of them in both tables) and one of each's own.
        assert_eq!(two, 5 + 1 + 1);
        // The budget counts the 4 shared blocks once: 6 blocks, not 10.
        assert_eq!(held, (4 + 1 + 1) * pool.block_bytes());
        assert!(
            two < 2 * one,
            "{two} blocks for two sequences, {one} for one"
        );
        assert_eq!(toks[0], alone(m, &tok, &b, greedy.clone()));
        assert_eq!(toks[1], alone(m, &tok, &c, greedy.clone()));
    }

    /// A model decoding over paged caches (the attention reading the block table in place)
    /// gives the logits of growing caches bit for bit, and so the same greedy tokens: a prompt
    /// prefilled in chunks that straddle block edges, then 45 tokens one at a time.
    #[test]
    fn a_paged_cache_decodes_as_a_growing_cache_bit_for_bit() {
        use crate::kv_cache::LayerKvCache;
        use crate::kv_pool::{KvBlockPool, PagedKvCache, BLOCK};
        for quantized in [false, true] {
            let model = tiny_llama(quantized);
            let m = model.as_ref();
            let shapes = m.cache_shapes();
            let pool = Arc::new(KvBlockPool::new(&shapes, 8).unwrap());
            let mut paged = KvCache::from_layers(
                (0..shapes.len())
                    .map(|i| {
                        Box::new(PagedKvCache::new(pool.clone(), i).unwrap())
                            as Box<dyn LayerKvCache>
                    })
                    .collect(),
            );
            let mut grow = m.new_cache();
            let p = prompt(21, 7);
            let bits = |t: &Tensor| crate::gguf::tests::bits(&crate::gguf::tests::f32s(t));
            let a = crate::models::prefill_text(m, &p, &mut paged, 6).unwrap();
            let b = crate::models::prefill_text(m, &p, &mut grow, 6).unwrap();
            assert_eq!(bits(&a), bits(&b), "quantized={quantized}: prefill");
            let mut next = b.flatten_all().unwrap().argmax(0).unwrap();
            let mut tokens = Vec::new();
            for i in 0..45 {
                let id = next.to_scalar::<u32>().unwrap();
                tokens.push(id);
                let x = Tensor::new(&[id], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let a = m.forward(&x, &mut paged, Logits::Last).unwrap();
                let b = m.forward(&x, &mut grow, Logits::Last).unwrap();
                assert_eq!(bits(&a), bits(&b), "quantized={quantized}: token {i}");
                next = b.flatten_all().unwrap().argmax(0).unwrap();
            }
            assert_eq!(paged.offset(), 21 + 45);
            assert_eq!(pool.used_blocks(), (21 + 45usize).div_ceil(BLOCK));
            assert!(
                tokens
                    .iter()
                    .collect::<std::collections::HashSet<_>>()
                    .len()
                    > 3,
                "a decode that does not move: {tokens:?}"
            );
            drop(paged);
            assert_eq!(pool.used_blocks(), 0);
        }
    }

    /// Under a KV budget too small for every sequence at once, sequences wait and are
    /// preempted and resumed (their caches recomputed), none fails, the caches never hold more
    /// than the budget between steps, and each sequence's greedy and seeded tokens are the
    /// ones it generates alone; with a prefix cache, a resumed sequence takes back what it
    /// holds of its ids. A prompt that alone needs more than the budget fails with an error
    /// naming the budget.
    ///
    /// Tolerance: the Q4_1 kernels sum each row's blocks in the same order whatever the row
    /// count, so a recomputed cache equals the one built token by token bit for bit.
    #[test]
    fn a_kv_budget_preempts_and_resumes_without_changing_tokens() {
        use crate::prefix_cache::{PrefixCache, PrefixCacheConfig};
        let tok = tokenizer();
        let model = tiny_llama(true);
        let m = model.as_ref();
        // 2 layers x 2 KV heads x 16 wide, keys and values, f32: 512 bytes a position.
        let block = KV_BLOCK * 512;
        let sampled = params(
            30,
            SamplingParams {
                temperature: 0.8,
                seed: Some(5),
                ..Default::default()
            },
        );
        let greedy = params(30, SamplingParams::default());
        // Prompts of 240 tokens: one block each at first, two once 16 tokens are generated.
        let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(240, 40 + i)).collect();
        let wanted: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let pr = if i % 2 == 0 { &greedy } else { &sampled };
                alone(m, &tok, p, pr.clone())
            })
            .collect();
        for with_prefix in [false, true] {
            // 48 pool blocks of 16 positions: three 240-token prompts fit (16 blocks each up to
            // their 16th token), the fourth waits, and growing past 256 positions preempts.
            let budget = 3 * block;
            let mut gen = four_under(m, &tok, budget, 0);
            if with_prefix {
                gen = gen.with_prefix_cache(Arc::new(Mutex::new(PrefixCache::new(
                    PrefixCacheConfig {
                        block_size: 16,
                        max_bytes: 1 << 26,
                    },
                ))));
            }
            let mut ids = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                let pr = if i % 2 == 0 { &greedy } else { &sampled };
                ids.push(gen.insert(ModelInput::text(p.clone()), pr.clone()).unwrap());
            }
            let mut toks: HashMap<SeqId, Vec<u32>> = HashMap::new();
            let mut finished = 0;
            let mut peak = 0;
            let mut most_running = 0;
            for _ in 0..2000 {
                if gen.is_empty() {
                    break;
                }
                for e in gen.step() {
                    match e.event.expect("no sequence fails") {
                        Event::Token { id, .. } => toks.entry(e.id).or_default().push(id),
                        Event::Finished { reason, .. } => {
                            assert_eq!(reason, FinishReason::MaxTokens);
                            finished += 1;
                        }
                        Event::Text(_) => {}
                    }
                }
                peak = peak.max(gen.kv_bytes());
                most_running = most_running.max(gen.running());
            }
            assert!(gen.is_empty());
            assert_eq!(finished, 4);
            assert!(peak <= budget, "peak {peak} over the budget {budget}");
            assert!(
                gen.preemptions() > 0,
                "with_prefix={with_prefix}: no preemption"
            );
            assert!(most_running >= 2);
            for (id, want) in ids.iter().zip(&wanted) {
                assert_eq!(&toks[id], want, "with_prefix={with_prefix}");
            }
            eprintln!(
                "with_prefix={with_prefix}: {} preemptions, peak {peak} of {budget} bytes",
                gen.preemptions()
            );
        }
        // A prompt of 300 tokens needs 2 blocks; the budget is 1.
        let mut gen = BatchGenerator::new(
            m,
            &tok,
            BatchConfig {
                kv_memory: Some(block),
                ..Default::default()
            },
        );
        let id = gen
            .insert(ModelInput::text(prompt(300, 50)), greedy.clone())
            .unwrap();
        let events = gen.step();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id, id);
        let err = events[0].event.as_ref().expect_err("too big").to_string();
        assert!(err.contains("KV memory budget of 131072 bytes"), "{err}");
        assert!(gen.is_empty());
    }

    /// A decode headroom at admission ([`BatchConfig::kv_reserve`]) keeps a waiting sequence
    /// out until the running ones could grow by it: four sequences whose caches end at 214
    /// positions (14 pool blocks) under a budget of 48 blocks preempt without it (all four
    /// are admitted at 5 blocks each) and never with a headroom of 150 positions (three run,
    /// the fourth starts when one ends); the tokens are the ones each generates alone, and
    /// the caches stay under the budget.
    #[test]
    fn a_kv_reserve_admits_fewer_and_spares_preemptions() {
        let tok = tokenizer();
        let model = tiny_llama(true);
        let m = model.as_ref();
        let (prompts, greedy) = four_long_answers();
        let wanted: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| alone(m, &tok, p, greedy.clone()))
            .collect();
        // 2 layers x 2 KV heads x 16 wide, keys and values, f32: 512 bytes a position.
        let budget = 48 * BLOCK * 512;
        for (reserve, preempts) in [(0, true), (150, false)] {
            let mut gen = four_under(m, &tok, budget, reserve);
            let (toks, peak, most_running) = run_measured(&mut gen, &prompts, &greedy);
            assert!(
                peak <= budget,
                "reserve {reserve}: peak {peak} over {budget}"
            );
            assert_eq!(gen.preemptions() > 0, preempts, "reserve {reserve}");
            assert_eq!(
                most_running,
                if preempts { 4 } else { 3 },
                "reserve {reserve}"
            );
            assert_eq!(toks, wanted, "reserve {reserve}");
        }
    }

    /// `kv_f16`: the pool stores f16, so half the bytes of the f32 test above hold as many
    /// blocks (three sequences run, none is preempted), and each sequence's tokens are the
    /// ones it generates alone with an f16 cache.
    #[test]
    fn an_f16_pool_holds_twice_the_positions_in_the_same_bytes() {
        let tok = tokenizer();
        let model = tiny_llama(true);
        let m = model.as_ref();
        let (prompts, greedy) = four_long_answers();
        let wanted: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut cache = m.new_cache();
                assert!(cache.set_storage_dtype(DType::F16));
                alone_in(cache, m, &tok, p, greedy.clone())
            })
            .collect();
        // 2 layers x 2 KV heads x 16 wide, keys and values, f16: 256 bytes a position.
        let budget = 48 * BLOCK * 256;
        let config = BatchConfig {
            kv_f16: true,
            ..four_under_config(budget, 150)
        };
        let mut gen = BatchGenerator::new(m, &tok, config);
        let pool = gen.kv_pool().expect("a pool").clone();
        assert_eq!((pool.dtype(), pool.n_blocks()), (DType::F16, 48));
        let (toks, peak, most_running) = run_measured(&mut gen, &prompts, &greedy);
        assert!(peak <= budget, "peak {peak} over {budget}");
        assert_eq!((gen.preemptions(), most_running), (0, 3));
        assert_eq!(toks, wanted);
        // Without a budget the growing caches store f16 alike.
        let mut gen = BatchGenerator::new(
            m,
            &tok,
            BatchConfig {
                kv_memory: None,
                ..config
            },
        );
        assert!(gen.kv_pool().is_none());
        assert_eq!(run_to_end(&mut gen, &prompts, &greedy, |_| {}), wanted);
    }
}
