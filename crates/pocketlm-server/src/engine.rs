//! Runs generations for the handlers with continuous batching: one scheduler thread owns a
//! [`BatchGenerator`] over the shared model and steps it while any request runs; every step is
//! one forward pass over all running sequences (at most `max_batch`; prompt chunks within
//! `max_tokens_per_step`). Handlers take a place in a bounded queue ([`Engine::admit`], 503
//! beyond it), submit ([`Engine::start`]) and receive their text as [`Msg`]s through a channel.
//! Requests start in arrival order. A request whose receiver is gone (the client
//! disconnected) is dropped from the batch before the next step.
//!
//! With a prefix cache ([`EngineConfig::prefix_cache`], [`pocketlm::prefix_cache`]), a prompt
//! starts from its longest cached prefix and every finished sequence joins the cache. The
//! cache is loaded from its directory when the engine starts (a file of another model is
//! refused with a warning), written there by a background thread at most every
//! [`PrefixCacheSettings::save_interval`] while it changes, and written once more when the
//! engine is dropped (its scheduler thread is joined then).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pocketlm::generate::batch::{BatchConfig, BatchEvent, BatchGenerator, SeqId};
use pocketlm::generate::{Event, GenerateParams};
use pocketlm::loader::{EncodedPrompt, LoadedModel, Prompt};
use pocketlm::prefix_cache::{LoadOutcome, PrefixCache, PrefixCacheConfig};
use pocketlm::prompt_cache::ModelIdentity;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::logprobs::StepLogprobs;

/// Messages from a generation to its handler.
#[derive(Debug)]
pub enum Msg {
    /// Newly final text, and the log-probabilities of the token that produced it when they
    /// were asked for. The text may be empty only when `logprobs` is set (a token whose text
    /// is held back: part of a character or of a possible stop string).
    Delta {
        /// The text.
        text: String,
        /// The generated token's log-probabilities (`GenerateParams::logprobs` set).
        logprobs: Option<Box<StepLogprobs>>,
    },
    /// The generation ended normally.
    Done {
        /// `stop` or `length`.
        finish_reason: &'static str,
        /// Tokens generated.
        completion_tokens: usize,
        /// Prompt tokens taken from the prefix cache; `None` without a prefix cache.
        cached_tokens: Option<usize>,
    },
    /// The generation failed.
    Error(ApiError),
}

/// Messages buffered in a request's channel; beyond it the scheduler keeps them in the
/// request's own outbox (generation never waits for a slow client: it would stall the batch).
const CHANNEL_CAPACITY: usize = 32;

/// How long the idle scheduler waits for a new request before it retries sending to a client
/// whose channel was full.
const FLUSH_RETRY: Duration = Duration::from_millis(5);

/// The engine's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences decoded together (at least 1).
    pub max_batch: usize,
    /// Tokens one forward pass may take (decode rows plus prompt chunks; at least 1).
    pub max_tokens_per_step: usize,
    /// Requests that may wait beyond the running ones.
    pub queue_size: usize,
    /// The prefix cache across requests; `None` (or a budget of 0 bytes) for none.
    pub prefix_cache: Option<PrefixCacheSettings>,
    /// Bytes the running and waiting requests' KV caches may hold together
    /// ([`BatchConfig::kv_memory`]: requests wait, and running ones are preempted and resumed,
    /// rather than go over it); `None`: no bound.
    pub kv_memory: Option<usize>,
    /// Decode headroom kept at admission under `kv_memory`, in positions
    /// ([`BatchConfig::kv_reserve`]).
    pub kv_reserve: usize,
    /// Keys and values in f16, half the bytes a position ([`BatchConfig::kv_f16`]).
    pub kv_f16: bool,
}

/// Settings of the engine's prefix cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixCacheSettings {
    /// Most bytes of keys and values held (least recently used prefixes are evicted beyond
    /// it); 0 disables the cache.
    pub max_bytes: usize,
    /// Where the cache is loaded from at start and saved to; `None`: memory only.
    pub dir: Option<PathBuf>,
    /// Shortest time between two background saves while the cache changes.
    pub save_interval: Duration,
}

/// What the scheduler reports after every step (`GET /health` shows it).
#[derive(Debug, Default)]
struct Counters {
    running: AtomicUsize,
    waiting: AtomicUsize,
    kv_bytes: AtomicUsize,
    kv_peak_bytes: AtomicUsize,
    preemptions: AtomicU64,
}

/// A snapshot of the engine's state ([`Engine::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    /// Sequences running (prefilling or decoding) after the last step.
    pub running: usize,
    /// Sequences waiting for room (a batch place or KV memory) after the last step.
    pub waiting: usize,
    /// Bytes the sequences' KV caches held after the last step.
    pub kv_bytes: usize,
    /// The most bytes they held after any step since the start.
    pub kv_peak_bytes: usize,
    /// The KV memory budget in bytes (`--kv-memory`); `None`: no bound.
    pub kv_budget_bytes: Option<usize>,
    /// Sequences preempted for the KV budget since the start (each resumed later).
    pub preemptions: u64,
}

/// The model, the admission bound and the scheduler, shared by all requests.
#[derive(Debug)]
pub struct Engine {
    model: Arc<LoadedModel>,
    counters: Arc<Counters>,
    kv_memory: Option<usize>,
    admitted: Arc<AtomicUsize>,
    capacity: usize,
    /// `None` once the engine is being dropped.
    submit: Mutex<Option<std_mpsc::Sender<Request>>>,
    scheduler: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Engine {
    /// Closes the submission channel and waits for the scheduler thread: it finishes the
    /// requests still there and saves the prefix cache.
    fn drop(&mut self) {
        if let Ok(mut s) = self.submit.lock() {
            s.take();
        }
        let handle = self.scheduler.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// The prefix cache of the scheduler and how it is saved.
struct Persist {
    cache: Arc<Mutex<PrefixCache>>,
    /// The directory and the model identity written into the file; `None`: memory only.
    target: Option<(PathBuf, ModelIdentity)>,
    interval: Duration,
    last: Instant,
    writer: Option<JoinHandle<()>>,
}

impl Persist {
    /// Builds the cache, loading it from `settings.dir` when there is one; `None` when the
    /// budget is 0 or the model's caches cannot be sliced (rotating, quantized).
    fn open(model: &LoadedModel, settings: &PrefixCacheSettings) -> Option<Self> {
        if settings.max_bytes == 0 || !model.model.new_cache().sliceable() {
            return None;
        }
        let config = PrefixCacheConfig {
            max_bytes: settings.max_bytes,
            ..PrefixCacheConfig::default()
        };
        let mut cache = PrefixCache::new(config);
        let mut target = None;
        if let Some(dir) = &settings.dir {
            match ModelIdentity::of(model) {
                Ok(id) => {
                    match PrefixCache::load(dir, &id, config, model.model.device()) {
                        Ok((c, LoadOutcome::Loaded { nodes, tokens })) => {
                            tracing::info!(
                                dir = %dir.display(),
                                nodes,
                                tokens,
                                bytes = c.nbytes(),
                                "prefix cache loaded"
                            );
                            cache = c;
                        }
                        Ok((_, LoadOutcome::Missing)) => {
                            tracing::info!(dir = %dir.display(), "prefix cache: no file yet")
                        }
                        Ok((_, LoadOutcome::Refused(why))) => {
                            tracing::warn!("prefix cache not loaded, starting empty: {why}")
                        }
                        Err(e) => {
                            tracing::warn!("prefix cache not loaded, starting empty: {e}")
                        }
                    }
                    target = Some((dir.clone(), id));
                }
                Err(e) => tracing::warn!(
                    "prefix cache kept in memory only (the model file's identity is unknown: {e})"
                ),
            }
        }
        Some(Self {
            cache: Arc::new(Mutex::new(cache)),
            target,
            interval: settings.save_interval,
            last: Instant::now(),
            writer: None,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PrefixCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long the idle scheduler may wait before the next save is due; `None`: no save
    /// pending.
    fn wait_hint(&self) -> Option<Duration> {
        (self.target.is_some() && self.lock().is_dirty()).then(|| {
            self.interval
                .saturating_sub(self.last.elapsed())
                .max(Duration::from_millis(100))
        })
    }

    /// Starts a background save when one is due, the cache changed and no save runs.
    fn maybe_save(&mut self) {
        let Some((dir, id)) = &self.target else {
            return;
        };
        if self.last.elapsed() < self.interval
            || self.writer.as_ref().is_some_and(|w| !w.is_finished())
        {
            return;
        }
        let snap = {
            let mut c = self.lock();
            if !c.is_dirty() {
                return;
            }
            match c.snapshot() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("saving the prefix cache failed: {e}");
                    return;
                }
            }
        };
        self.last = Instant::now();
        let (dir, id) = (dir.clone(), id.clone());
        self.writer = std::thread::Builder::new()
            .name("pocketlm-prefix-save".into())
            .spawn(move || {
                let t0 = Instant::now();
                match snap.write(&dir, &id) {
                    Ok(path) => tracing::info!(
                        path = %path.display(),
                        nodes = snap.n_nodes(),
                        ms = t0.elapsed().as_millis() as u64,
                        "prefix cache saved"
                    ),
                    Err(e) => tracing::warn!("saving the prefix cache failed: {e}"),
                }
            })
            .ok();
    }

    /// Waits for a background save, then writes the cache if it changed since.
    fn final_save(&mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        let Some((dir, id)) = &self.target else {
            return;
        };
        let mut c = self.lock();
        if !c.is_dirty() {
            return;
        }
        match c.save(dir, id) {
            Ok(path) => tracing::info!(
                path = %path.display(),
                nodes = c.n_nodes(),
                "prefix cache saved at shutdown"
            ),
            Err(e) => tracing::warn!("saving the prefix cache failed: {e}"),
        }
    }
}

/// A place in the queue (running or waiting); given back when dropped.
#[derive(Debug)]
pub struct Slot {
    admitted: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A submitted request, as the scheduler holds it.
struct Request {
    _slot: Slot,
    prompt: EncodedPrompt,
    /// The choices not started yet, in order.
    params: VecDeque<GenerateParams>,
    tx: mpsc::Sender<Msg>,
    /// Messages the channel had no room for yet, oldest first.
    outbox: VecDeque<Msg>,
    /// The running (or waiting) choice.
    seq: Option<SeqId>,
    /// Prompt tokens the running choice took from the prefix cache (`None`: no prefix cache).
    cached: Option<usize>,
    /// No more messages will be made (finished, failed or cancelled).
    ended: bool,
}

impl Engine {
    /// An engine over `model` with `config`'s bounds; loads the prefix cache (see the module
    /// documentation) and starts the scheduler thread, which ends when the engine is dropped
    /// and its requests are done.
    pub fn new(model: Arc<LoadedModel>, config: EngineConfig) -> Self {
        let max_batch = config.max_batch.max(1);
        let (submit, requests) = std_mpsc::channel();
        let batch = BatchConfig {
            max_batch,
            tokens_per_step: config.max_tokens_per_step.max(1),
            kv_memory: config.kv_memory,
            kv_reserve: config.kv_reserve,
            kv_f16: config.kv_f16,
        };
        let persist = config
            .prefix_cache
            .as_ref()
            .and_then(|s| Persist::open(&model, s));
        let m = model.clone();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let scheduler = std::thread::Builder::new()
            .name("pocketlm-scheduler".into())
            .spawn(move || schedule(&m, batch, &requests, persist, &c))
            .expect("spawning the scheduler thread");
        Engine {
            model,
            counters,
            kv_memory: config.kv_memory,
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity: max_batch.saturating_add(config.queue_size),
            submit: Mutex::new(Some(submit)),
            scheduler: Mutex::new(Some(scheduler)),
        }
    }

    /// The loaded model.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// The scheduler's state after its last step.
    pub fn stats(&self) -> EngineStats {
        let c = &self.counters;
        EngineStats {
            running: c.running.load(Ordering::Relaxed),
            waiting: c.waiting.load(Ordering::Relaxed),
            kv_bytes: c.kv_bytes.load(Ordering::Relaxed),
            kv_peak_bytes: c.kv_peak_bytes.load(Ordering::Relaxed),
            kv_budget_bytes: self.kv_memory,
            preemptions: c.preemptions.load(Ordering::Relaxed),
        }
    }

    /// Takes a place in the queue. Errors: 503 `queue_full` when `max_batch + queue_size`
    /// requests are already running or waiting.
    pub fn admit(&self) -> Result<Slot, ApiError> {
        let cap = self.capacity;
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .map_err(|_| ApiError::queue_full(cap))?;
        Ok(Slot {
            admitted: self.admitted.clone(),
        })
    }

    /// Token ids of a prompt (chat template applied), computed on a blocking thread.
    ///
    /// Errors: 400 when the template refuses the conversation or the prompt leaves no room
    /// in the context (`code: context_length_exceeded`).
    pub async fn encode(&self, prompt: Prompt) -> Result<EncodedPrompt, ApiError> {
        let model = self.model.clone();
        let encoded = tokio::task::spawn_blocking(move || model.encode_multimodal(&prompt))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizing the prompt failed: {e}")))?
            .map_err(ApiError::from_library)?;
        let ids = &encoded.ids;
        let ctx = self.model.model.info().context_length;
        if ids.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty"));
        }
        if ids.len() >= ctx {
            return Err(ApiError::bad_param(
                "messages",
                format!(
                    "the prompt has {} tokens but the model's context holds {ctx}",
                    ids.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Ok(encoded)
    }

    /// Starts generations of one prompt, one per entry of `params` (OpenAI's `n` choices), one
    /// after another: the request joins the scheduler's batch in arrival order. The returned
    /// receiver yields, for each choice in order, [`Msg::Delta`]s (one per generated token when
    /// `logprobs` is set) then one [`Msg::Done`]; or a [`Msg::Error`] that ends it all.
    /// Dropping the receiver cancels the generation (or its wait).
    pub fn start(
        &self,
        slot: Slot,
        prompt: EncodedPrompt,
        params: Vec<GenerateParams>,
    ) -> mpsc::Receiver<Msg> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let req = Request {
            _slot: slot,
            prompt,
            params: params.into(),
            tx,
            outbox: VecDeque::new(),
            seq: None,
            cached: None,
            ended: false,
        };
        let sent = match self.submit.lock() {
            Ok(s) => match s.as_ref() {
                Some(s) => s.send(req).map_err(|e| e.0),
                None => Err(req),
            },
            Err(_) => Err(req),
        };
        if let Err(req) = sent {
            let _ = req.tx.try_send(Msg::Error(ApiError::internal(
                "the generation scheduler has stopped",
            )));
        }
        rx
    }
}

/// The scheduler thread: takes requests, steps the batch, routes events, until the engine is
/// gone and nothing runs; then saves the prefix cache.
fn schedule(
    model: &LoadedModel,
    config: BatchConfig,
    requests: &std_mpsc::Receiver<Request>,
    mut persist: Option<Persist>,
    counters: &Counters,
) {
    let prefix = persist.as_ref().map(|p| p.cache.clone());
    let new_gen = || {
        let g = BatchGenerator::new(model.model.as_ref(), &model.tokenizer, config);
        match &prefix {
            Some(p) => g.with_prefix_cache(p.clone()),
            None => g,
        }
    };
    let mut gen = new_gen();
    let mut reqs: Vec<Request> = Vec::new();
    let mut open = true;
    loop {
        // New requests: wait for one when there is nothing else to do (idle, at most until
        // the next prefix-cache save is due).
        if open && gen.is_empty() {
            let wait = if reqs.is_empty() {
                persist.as_ref().and_then(Persist::wait_hint)
            } else {
                Some(FLUSH_RETRY)
            };
            let got = match wait {
                None => requests
                    .recv()
                    .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
                Some(d) => requests.recv_timeout(d),
            };
            match got {
                Ok(r) => reqs.push(r),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => open = false,
            }
        }
        while open {
            match requests.try_recv() {
                Ok(r) => reqs.push(r),
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        if !open && reqs.is_empty() {
            if let Some(p) = &mut persist {
                p.final_save();
            }
            return;
        }
        for r in &mut reqs {
            if r.tx.is_closed() {
                // The client is gone: cancel.
                if let Some(id) = r.seq.take() {
                    gen.remove(id);
                }
                r.ended = true;
                r.outbox.clear();
            } else if r.seq.is_none() && !r.ended {
                start_next(&mut gen, r, prefix.is_some());
            }
        }
        if !gen.is_empty() {
            match catch_unwind(AssertUnwindSafe(|| gen.step())) {
                Ok(events) => {
                    // Counted before the events go out, so a client that got its answer
                    // sees the step's state.
                    let kv = gen.kv_bytes();
                    counters.kv_bytes.store(kv, Ordering::Relaxed);
                    counters.kv_peak_bytes.fetch_max(kv, Ordering::Relaxed);
                    counters.running.store(gen.running(), Ordering::Relaxed);
                    counters.waiting.store(gen.waiting(), Ordering::Relaxed);
                    let pre = gen.preemptions();
                    if pre > counters.preemptions.swap(pre, Ordering::Relaxed) {
                        tracing::info!(
                            preemptions = pre,
                            kv_bytes = kv,
                            running = gen.running(),
                            waiting = gen.waiting(),
                            "KV memory budget full: preempted the latest sequence"
                        );
                    }
                    route(model, &mut gen, &mut reqs, events, prefix.is_some());
                }
                Err(_) => {
                    // A bug in a step: every running request gets an error; the generator
                    // starts over.
                    gen = new_gen();
                    for r in reqs.iter_mut().filter(|r| r.seq.is_some()) {
                        r.seq = None;
                        r.ended = true;
                        r.outbox.push_back(Msg::Error(ApiError::internal(
                            "the generation step failed",
                        )));
                    }
                }
            }
        }
        for r in &mut reqs {
            flush(r);
        }
        reqs.retain(|r| !(r.ended && r.outbox.is_empty()));
        if let Some(p) = &mut persist {
            p.maybe_save();
        }
    }
}

/// Puts the request's next choice into the batch; with none left, the request has ended.
/// `prefix`: whether the generator has a prefix cache (the hit is recorded and logged).
fn start_next(gen: &mut BatchGenerator<'_>, r: &mut Request, prefix: bool) {
    let Some(p) = r.params.pop_front() else {
        r.ended = true;
        return;
    };
    match gen.insert(r.prompt.clone(), p) {
        Ok(id) => {
            r.seq = Some(id);
            r.cached = None;
            if prefix {
                let cached = gen.cached_tokens(id).unwrap_or(0);
                r.cached = Some(cached);
                let prompt_tokens = r.prompt.ids.len();
                if cached > 0 {
                    tracing::info!(prompt_tokens, cached_tokens = cached, "prefix cache hit");
                } else {
                    tracing::debug!(prompt_tokens, "prefix cache miss");
                }
            }
        }
        Err(e) => {
            r.ended = true;
            r.outbox.push_back(Msg::Error(ApiError::from_library(e)));
        }
    }
}

/// Turns a step's events into messages of their requests.
fn route(
    model: &LoadedModel,
    gen: &mut BatchGenerator<'_>,
    reqs: &mut [Request],
    events: Vec<BatchEvent>,
    prefix: bool,
) {
    for BatchEvent { id, event } in events {
        let Some(r) = reqs.iter_mut().find(|r| r.seq == Some(id)) else {
            continue;
        };
        let Some(mut msg) = to_msg(model, event) else {
            continue;
        };
        match &mut msg {
            Msg::Delta { .. } => {}
            Msg::Done { cached_tokens, .. } => {
                *cached_tokens = r.cached;
                r.seq = None;
                r.outbox.push_back(msg);
                start_next(gen, r, prefix);
                continue;
            }
            Msg::Error(_) => {
                r.seq = None;
                r.ended = true;
            }
        }
        r.outbox.push_back(msg);
    }
}

/// The message for a handler of one generation event; `None` for nothing to send (an empty
/// text without log-probabilities).
fn to_msg(model: &LoadedModel, event: pocketlm::Result<Event>) -> Option<Msg> {
    Some(match event {
        Ok(Event::Token { text, logprobs, .. }) => {
            let logprobs = logprobs.map(|lp| Box::new(StepLogprobs::new(&model.tokenizer, &lp)));
            if text.is_empty() && logprobs.is_none() {
                return None;
            }
            Msg::Delta { text, logprobs }
        }
        Ok(Event::Text(text)) => {
            if text.is_empty() {
                return None;
            }
            Msg::Delta {
                text,
                logprobs: None,
            }
        }
        Ok(Event::Finished { reason, stats }) => Msg::Done {
            finish_reason: reason.as_openai(),
            completion_tokens: stats.generated_tokens,
            cached_tokens: None,
        },
        Err(e) => Msg::Error(ApiError::from_library(e)),
    })
}

/// Sends what the request's channel has room for.
fn flush(r: &mut Request) {
    while let Some(msg) = r.outbox.pop_front() {
        match r.tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                r.outbox.push_front(msg);
                return;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                r.outbox.clear();
                return;
            }
        }
    }
}
