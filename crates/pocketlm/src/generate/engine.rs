//! One loaded model shared by many callers at once: an [`Engine`] runs a [`BatchGenerator`]
//! (continuous batching) on a scheduler thread of its own, and any thread submits generations
//! to it ([`Engine::submit`]) and iterates their [`Event`]s ([`EngineStream`]). Sequences
//! submitted from different threads (several [`crate::session::ChatSession`]s, the CLI's
//! `chat`) share its forward passes, as the requests of `serve` do.
//!
//! A submission may bring a KV cache that already holds a prefix of its sequence (a chat
//! session's earlier turns); the engine hands it back, holding everything fed to the model,
//! once the sequence has ended or been cancelled ([`EngineStream::into_cache`]).
//!
//! The shape follows the engines of mistral.rs (`MistralRs` with its scheduler thread and a
//! channel per request) and vLLM's `LLMEngine`; the scheduling itself is the
//! [`BatchGenerator`]'s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use super::batch::{BatchConfig, BatchGenerator, SeqId};
use super::{Event, GenerateParams};
use crate::kv_cache::KvCache;
use crate::loader::LoadedModel;
use crate::models::ModelInput;
use crate::{Error, Result};

/// What the scheduler sends a stream: its events, then (when the submission gave a cache) the
/// cache.
enum Out {
    Event(Result<Event>),
    Cache(KvCache),
}

/// A generation submitted to the scheduler.
struct Job {
    input: ModelInput,
    params: GenerateParams,
    cache: Option<KvCache>,
    out: mpsc::Sender<Out>,
    cancel: Arc<AtomicBool>,
}

/// A generation the scheduler runs.
struct Running {
    out: mpsc::Sender<Out>,
    cancel: Arc<AtomicBool>,
    /// The submission gave a cache: send it back at the end.
    keep: bool,
}

/// A model served to many callers through one continuous batch; see the module documentation.
/// Dropping the engine lets its running generations finish, then ends the scheduler thread.
pub struct Engine {
    model: Arc<LoadedModel>,
    submit: Mutex<Option<mpsc::Sender<Job>>>,
    scheduler: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model.path)
            .finish()
    }
}

impl Engine {
    /// An engine over `model` with the scheduler's bounds `config` (see [`BatchConfig`]);
    /// starts its scheduler thread.
    ///
    /// Errors: [`Error::Model`] when the thread cannot be started.
    pub fn new(model: Arc<LoadedModel>, config: BatchConfig) -> Result<Self> {
        let (submit, jobs) = mpsc::channel();
        let m = model.clone();
        let scheduler = std::thread::Builder::new()
            .name("pocketlm-engine".into())
            .spawn(move || schedule(&m, config, &jobs))
            .map_err(|e| Error::Model(format!("starting the engine's scheduler thread: {e}")))?;
        Ok(Self {
            model,
            submit: Mutex::new(Some(submit)),
            scheduler: Mutex::new(Some(scheduler)),
        })
    }

    /// The model it serves.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// Starts generating after `input` under `params`, appending to `cache` (which may hold
    /// a prefix of the sequence already, as [`super::generate_input`]'s may) or to a fresh
    /// cache of the model ([`crate::models::CausalLM::new_cache`]) when `None`. The sequence
    /// joins the batch at the scheduler's next step with room.
    ///
    /// Errors: [`Error::Model`] when the engine is shutting down (`cache` is lost then). An
    /// input the model refuses (as [`super::generate_input`] refuses it) is the stream's first
    /// and only event; the cache comes back with it.
    pub fn submit(
        &self,
        input: ModelInput,
        params: GenerateParams,
        cache: Option<KvCache>,
    ) -> Result<EngineStream> {
        let (out, events) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let keep = cache.is_some();
        let job = Job {
            input,
            params,
            cache,
            out,
            cancel: cancel.clone(),
        };
        let submit = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        submit
            .as_ref()
            .and_then(|s| s.send(job).ok())
            .ok_or_else(|| Error::Model("the engine is shutting down".into()))?;
        Ok(EngineStream {
            events,
            cancel,
            ended: false,
            keep,
            cache: None,
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel ends the scheduler once its generations are done.
        self.submit.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self
            .scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = t.join();
        }
    }
}

/// The events of one generation of an [`Engine`], in the order [`super::Generation`] yields
/// them; the last is [`Event::Finished`] or an error. Dropping the stream early cancels the
/// generation.
pub struct EngineStream {
    events: mpsc::Receiver<Out>,
    cancel: Arc<AtomicBool>,
    /// The last event was yielded (or the scheduler is gone).
    ended: bool,
    /// The submission gave a cache, which the scheduler sends back.
    keep: bool,
    /// The cache, once it came back.
    cache: Option<KvCache>,
}

impl std::fmt::Debug for EngineStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineStream")
            .field("ended", &self.ended)
            .finish()
    }
}

impl EngineStream {
    /// Cancels the generation (if it has not ended) and returns the cache the submission
    /// gave, holding every position fed to the model (the prompt and the tokens generated
    /// but the last), once the scheduler gives it back; `None` when the submission gave none
    /// or a step of the batch failed (a panic: the generation then ended with an error).
    pub fn into_cache(mut self) -> Option<KvCache> {
        self.take_cache()
    }

    fn take_cache(&mut self) -> Option<KvCache> {
        if !self.keep {
            return None;
        }
        if !self.ended {
            self.cancel.store(true, Ordering::Relaxed);
        }
        while self.cache.is_none() {
            match self.events.recv() {
                Ok(Out::Cache(c)) => self.cache = Some(c),
                Ok(Out::Event(_)) => {}
                Err(_) => break,
            }
        }
        self.keep = false;
        self.ended = true;
        self.cache.take()
    }
}

impl Iterator for EngineStream {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        loop {
            match self.events.recv() {
                Ok(Out::Event(e)) => {
                    if matches!(e, Ok(Event::Finished { .. }) | Err(_)) {
                        self.ended = true;
                    }
                    return Some(e);
                }
                Ok(Out::Cache(c)) => self.cache = Some(c),
                Err(_) => {
                    self.ended = true;
                    return Some(Err(Error::Model(
                        "the engine's scheduler stopped before the generation ended".into(),
                    )));
                }
            }
        }
    }
}

impl Drop for EngineStream {
    fn drop(&mut self) {
        if !self.ended {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
}

/// The scheduler thread: takes submissions, steps the batch, routes events, hands caches back
/// and cancels generations whose stream was dropped; ends when the engine is dropped and
/// nothing runs.
fn schedule(model: &LoadedModel, config: BatchConfig, jobs: &mpsc::Receiver<Job>) {
    let mut gen = BatchGenerator::new(model.model.as_ref(), &model.tokenizer, config);
    let mut running: HashMap<SeqId, Running> = HashMap::new();
    let mut open = true;
    loop {
        let mut new = Vec::new();
        if open && gen.is_empty() {
            match jobs.recv() {
                Ok(j) => new.push(j),
                Err(_) => open = false,
            }
        }
        while open {
            match jobs.try_recv() {
                Ok(j) => new.push(j),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        if !open && gen.is_empty() {
            return;
        }
        for j in new {
            let keep = j.cache.is_some();
            let cache = j.cache.unwrap_or_else(|| model.model.new_cache());
            match gen.insert_keeping(cache, j.input, j.params) {
                Ok(id) => {
                    running.insert(
                        id,
                        Running {
                            out: j.out,
                            cancel: j.cancel,
                            keep,
                        },
                    );
                }
                Err(refused) => {
                    let (e, cache) = *refused;
                    let _ = j.out.send(Out::Event(Err(e)));
                    if keep {
                        let _ = j.out.send(Out::Cache(cache));
                    }
                }
            }
        }
        let cancelled: Vec<SeqId> = running
            .iter()
            .filter(|(_, r)| r.cancel.load(Ordering::Relaxed))
            .map(|(&id, _)| id)
            .collect();
        for id in cancelled {
            if let (Some(r), Some(cache)) = (running.remove(&id), gen.remove(id)) {
                if r.keep {
                    let _ = r.out.send(Out::Cache(cache));
                }
            }
        }
        if gen.is_empty() {
            continue;
        }
        let events = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gen.step())) {
            Ok(events) => events,
            Err(_) => {
                // A bug in a step: every running generation ends with an error (their caches
                // are lost); the generator starts over and the engine serves on.
                gen = BatchGenerator::new(model.model.as_ref(), &model.tokenizer, config);
                for (_, r) in running.drain() {
                    let _ = r.out.send(Out::Event(Err(Error::Model(
                        "the engine's generation step failed".into(),
                    ))));
                }
                continue;
            }
        };
        for e in events {
            let end = matches!(e.event, Ok(Event::Finished { .. }) | Err(_));
            if let Some(r) = running.get(&e.id) {
                let _ = r.out.send(Out::Event(e.event));
            }
            if end {
                if let (Some(r), Some(cache)) = (running.remove(&e.id), gen.take_cache(e.id)) {
                    if r.keep {
                        let _ = r.out.send(Out::Cache(cache));
                    }
                }
            }
        }
    }
}
