//! Runs generations for the handlers with continuous batching: one scheduler thread owns a
//! [`BatchGenerator`] over the shared model and steps it while any request runs; every step is
//! one forward pass over all running sequences (at most `max_batch`; prompt chunks within
//! `max_tokens_per_step`). Handlers take a place in a bounded queue ([`Engine::admit`], 503
//! beyond it), submit ([`Engine::start`]) and receive their text as [`Msg`]s through a channel.
//! Requests start in arrival order. A request whose receiver is gone (the client
//! disconnected) is dropped from the batch before the next step.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;

use pocketlm::generate::batch::{BatchConfig, BatchEvent, BatchGenerator, SeqId};
use pocketlm::generate::{Event, GenerateParams};
use pocketlm::loader::{EncodedPrompt, LoadedModel, Prompt};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences decoded together (at least 1).
    pub max_batch: usize,
    /// Tokens one forward pass may take (decode rows plus prompt chunks; at least 1).
    pub max_tokens_per_step: usize,
    /// Requests that may wait beyond the running ones.
    pub queue_size: usize,
}

/// The model, the admission bound and the scheduler, shared by all requests.
#[derive(Debug)]
pub struct Engine {
    model: Arc<LoadedModel>,
    admitted: Arc<AtomicUsize>,
    capacity: usize,
    submit: Mutex<std_mpsc::Sender<Request>>,
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
    /// No more messages will be made (finished, failed or cancelled).
    ended: bool,
}

impl Engine {
    /// An engine over `model` with `config`'s bounds; starts the scheduler thread, which ends
    /// when the engine is dropped and its requests are done.
    pub fn new(model: Arc<LoadedModel>, config: EngineConfig) -> Self {
        let max_batch = config.max_batch.max(1);
        let (submit, requests) = std_mpsc::channel();
        let batch = BatchConfig {
            max_batch,
            tokens_per_step: config.max_tokens_per_step.max(1),
        };
        let m = model.clone();
        std::thread::Builder::new()
            .name("pocketlm-scheduler".into())
            .spawn(move || schedule(&m, batch, &requests))
            .expect("spawning the scheduler thread");
        Engine {
            model,
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity: max_batch.saturating_add(config.queue_size),
            submit: Mutex::new(submit),
        }
    }

    /// The loaded model.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
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
            ended: false,
        };
        let sent = match self.submit.lock() {
            Ok(s) => s.send(req).map_err(|e| e.0),
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
/// gone and nothing runs.
fn schedule(model: &LoadedModel, config: BatchConfig, requests: &std_mpsc::Receiver<Request>) {
    let mut gen = BatchGenerator::new(model.model.as_ref(), &model.tokenizer, config);
    let mut reqs: Vec<Request> = Vec::new();
    let mut open = true;
    loop {
        // New requests: wait for one when there is nothing else to do.
        if open && gen.is_empty() {
            let first = if reqs.is_empty() {
                requests.recv().ok()
            } else {
                match requests.recv_timeout(FLUSH_RETRY) {
                    Ok(r) => Some(r),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            };
            match first {
                Some(r) => reqs.push(r),
                None if reqs.is_empty() => return,
                None => {}
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
                start_next(&mut gen, r);
            }
        }
        if !gen.is_empty() {
            match catch_unwind(AssertUnwindSafe(|| gen.step())) {
                Ok(events) => route(model, &mut gen, &mut reqs, events),
                Err(_) => {
                    // A bug in a step: every running request gets an error; the generator
                    // starts over.
                    gen = BatchGenerator::new(model.model.as_ref(), &model.tokenizer, config);
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
    }
}

/// Puts the request's next choice into the batch; with none left, the request has ended.
fn start_next(gen: &mut BatchGenerator<'_>, r: &mut Request) {
    let Some(p) = r.params.pop_front() else {
        r.ended = true;
        return;
    };
    match gen.insert(r.prompt.clone(), p) {
        Ok(id) => r.seq = Some(id),
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
) {
    for BatchEvent { id, event } in events {
        let Some(r) = reqs.iter_mut().find(|r| r.seq == Some(id)) else {
            continue;
        };
        let Some(msg) = to_msg(model, event) else {
            continue;
        };
        match &msg {
            Msg::Delta { .. } => {}
            Msg::Done { .. } => {
                r.seq = None;
                r.outbox.push_back(msg);
                start_next(gen, r);
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
