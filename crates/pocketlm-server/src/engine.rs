//! Runs generations for the handlers: a bounded, first-come-first-served queue in front of a
//! semaphore of `max_concurrency` permits; each admitted request generates on a blocking
//! thread (`tokio::task::spawn_blocking`) with its own KV cache over the shared model, and
//! sends its text through a channel. A request whose receiver is gone (the client
//! disconnected) stops generating at the next token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pocketlm::generate::{generate_input, Event, GenerateParams};
use pocketlm::loader::{EncodedPrompt, LoadedModel, Prompt};
use tokio::sync::{mpsc, Semaphore};

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

/// Text chunks buffered per request before the generating thread waits for the client.
const CHANNEL_CAPACITY: usize = 32;

/// The model and the admission bounds, shared by all requests.
#[derive(Debug)]
pub struct Engine {
    model: Arc<LoadedModel>,
    permits: Arc<Semaphore>,
    admitted: Arc<AtomicUsize>,
    capacity: usize,
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

impl Engine {
    /// `max_concurrency` generations run at once (at least 1); `queue_size` more wait.
    pub fn new(model: Arc<LoadedModel>, max_concurrency: usize, queue_size: usize) -> Self {
        let max_concurrency = max_concurrency.max(1);
        Engine {
            model,
            permits: Arc::new(Semaphore::new(max_concurrency)),
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity: max_concurrency.saturating_add(queue_size),
        }
    }

    /// The loaded model.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// Takes a place in the queue. Errors: 503 `queue_full` when `max_concurrency +
    /// queue_size` requests are already running or waiting.
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
    /// after another under one permit: waits (in arrival order) for the permit, then generates
    /// on a blocking thread. The returned receiver yields, for each choice in order,
    /// [`Msg::Delta`]s (one per generated token when `logprobs` is set) then one [`Msg::Done`];
    /// or a [`Msg::Error`] that ends it all. Dropping the receiver cancels the generation (or
    /// its wait).
    pub fn start(
        &self,
        slot: Slot,
        prompt: EncodedPrompt,
        params: Vec<GenerateParams>,
    ) -> mpsc::Receiver<Msg> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let permits = self.permits.clone();
        let model = self.model.clone();
        tokio::spawn(async move {
            let permit = tokio::select! {
                p = permits.acquire_owned() => p,
                () = tx.closed() => return,
            };
            let Ok(permit) = permit else {
                let _ = tx
                    .send(Msg::Error(ApiError::internal(
                        "the server is shutting down",
                    )))
                    .await;
                return;
            };
            let worker_tx = tx.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let _slot = slot;
                for p in params {
                    if !run_generation(&model, prompt.clone(), p, &worker_tx) {
                        return;
                    }
                }
            })
            .await;
            if let Err(e) = joined {
                let _ = tx
                    .send(Msg::Error(ApiError::internal(format!(
                        "the generation thread failed: {e}"
                    ))))
                    .await;
            }
        });
        rx
    }
}

/// Generates on the current (blocking) thread, sending text as it becomes final. Returns
/// whether it ended with [`Msg::Done`] (false: the receiver is gone or an error was sent).
fn run_generation(
    model: &LoadedModel,
    prompt: EncodedPrompt,
    params: GenerateParams,
    tx: &mpsc::Sender<Msg>,
) -> bool {
    if tx.is_closed() {
        return false;
    }
    let mut cache = model.model.new_cache();
    let gen = match generate_input(
        model.model.as_ref(),
        &model.tokenizer,
        &mut cache,
        prompt,
        params,
    ) {
        Ok(g) => g,
        Err(e) => {
            let _ = tx.blocking_send(Msg::Error(ApiError::from_library(e)));
            return false;
        }
    };
    for ev in gen {
        if tx.is_closed() {
            return false;
        }
        let msg = match ev {
            Ok(Event::Token { text, logprobs, .. }) => {
                let logprobs =
                    logprobs.map(|lp| Box::new(StepLogprobs::new(&model.tokenizer, &lp)));
                if text.is_empty() && logprobs.is_none() {
                    continue;
                }
                Msg::Delta { text, logprobs }
            }
            Ok(Event::Text(text)) => {
                if text.is_empty() {
                    continue;
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
        };
        let done = matches!(msg, Msg::Done { .. });
        let last = !matches!(msg, Msg::Delta { .. });
        if tx.blocking_send(msg).is_err() {
            return false;
        }
        if last {
            return done;
        }
    }
    false
}
