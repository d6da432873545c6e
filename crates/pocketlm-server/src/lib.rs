//! An OpenAI-compatible HTTP server over one loaded model (`pocketlm serve`).
//!
//! Routes: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions` (non-streamed, or streamed as server-sent events:
//! `data: {json}\n\n` chunks then `data: [DONE]\n\n`, as OpenAI's API reference describes;
//! optional per-token log-probabilities, see [`logprobs`]); `POST /v1/responses` (OpenAI's
//! Responses API, [`responses`]) and `POST /v1/messages` (Anthropic's Messages API,
//! [`messages`]), both on the chat path. Chat requests take `tools` / `tool_choice`, answer
//! `tool_calls`, and `response_format` constrains the output ([`pocketlm::constrain`]).
//! Every request field is honoured or refused with a 400 naming it ([`api::check_fields`]).
//! Errors are OpenAI's JSON shape with the matching status (400, 401, 404, 405, 413, 503).
//!
//! Requests are admitted into a bounded queue (503 beyond it), then run in arrival order with
//! continuous batching: one scheduler thread decodes up to `max_concurrency` (`--max-batch`)
//! sequences together, one forward pass per step, each with its own KV cache, prompts
//! prefilled in chunks between decode steps ([`engine`]). A client that disconnects stops its
//! generation.

pub mod api;
mod chat;
pub mod embeddings;
pub mod engine;
pub mod error;
pub mod logprobs;
pub mod messages;
pub mod responses;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pocketlm::loader::{LoadedModel, Prompt};
use pocketlm::sampling::SamplingParams;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::api::*;
use crate::engine::{Engine, EngineConfig, Msg};
pub use crate::error::ApiError;
use crate::logprobs::{ChatLogprobs, CompletionLogprobs, StepLogprobs};
use pocketlm::tools::stream::{ToolCallStreamParser, ToolStreamEvent};
use pocketlm::tools::ToolCallFormat;

/// Server settings (the flags of `pocketlm serve`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind; loopback by default.
    pub host: String,
    /// TCP port; 0 picks a free one.
    pub port: u16,
    /// Sequences decoded together in one batch (`serve --max-batch`; default 16); more
    /// requests wait in the queue.
    pub max_concurrency: usize,
    /// Tokens one forward pass may take: one per running sequence, plus chunks of prompts
    /// being prefilled (`serve --max-tokens-per-step`; default 256). Bounds how long a new
    /// long prompt stalls the running streams.
    pub max_tokens_per_step: usize,
    /// Requests that may wait beyond the running ones; more get 503.
    pub queue_size: usize,
    /// When set, `/v1/*` requires `Authorization: Bearer <api_key>` (401 otherwise).
    pub api_key: Option<String>,
    /// Largest request body, bytes (413 beyond). Default 1 MiB.
    pub body_limit: usize,
    /// Model id reported by `/v1/models` and in answers; default the file name without
    /// extension.
    pub model_id: Option<String>,
    /// How long clients may be slow or idle (see [`Timeouts`]).
    pub timeouts: Timeouts,
    /// The embedding model `POST /v1/embeddings` uses (`serve --embedding-model`); `None`:
    /// the route answers 404.
    pub embeddings: Option<Arc<embeddings::EmbeddingService>>,
    /// Bytes of keys and values the prefix cache across requests may hold
    /// (`serve --prefix-cache-memory`; default 1 GiB); 0 disables it. Prompts starting with a
    /// cached prefix prefill only the rest; answers report the reused tokens in
    /// `usage.prompt_tokens_details.cached_tokens` ([`pocketlm::prefix_cache`]).
    pub prefix_cache_memory: usize,
    /// Where the prefix cache is loaded from at start and saved to (periodically and when the
    /// server's router is dropped) (`serve --prefix-cache-dir`; the CLI's default is
    /// [`pocketlm::prefix_cache::default_dir`]); `None` (this struct's default): memory only.
    pub prefix_cache_dir: Option<std::path::PathBuf>,
    /// Shortest time between two saves of a changing prefix cache. Default 60 s.
    pub prefix_cache_save_interval: Duration,
    /// Bytes the requests' KV caches may hold together (`serve --kv-memory`); when full, new
    /// requests wait and running ones are preempted and later resumed, none fails
    /// ([`pocketlm::generate::batch::BatchConfig::kv_memory`]). `None` (the default): no bound.
    pub kv_memory: Option<usize>,
    /// Under `kv_memory`, positions of decode headroom each running request keeps when another
    /// is admitted (`serve --kv-reserve`;
    /// [`pocketlm::generate::batch::BatchConfig::kv_reserve`]).
    pub kv_reserve: usize,
    /// Store the requests' keys and values in f16, half the bytes of f32 (`serve --kv-f16`;
    /// [`pocketlm::generate::batch::BatchConfig::kv_f16`]). Default `false`.
    pub kv_f16: bool,
}

/// Connection timeouts: slow or idle clients do not hold connections open forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest time a client may take to send a request's whole header, counted from when
    /// the connection is ready for it (a new connection, or a kept-alive one after its last
    /// answer); the connection is closed after it. Default 30 s (hyper's).
    pub header: Duration,
    /// A connection on which nothing is read or written for this long is closed once it has
    /// no request in flight (a request waiting in the queue or generating keeps it open).
    /// Default 60 s.
    pub keep_alive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(30),
            keep_alive: Duration::from_secs(60),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            max_concurrency: 16,
            max_tokens_per_step: 256,
            queue_size: 64,
            api_key: None,
            body_limit: 1 << 20,
            model_id: None,
            timeouts: Timeouts::default(),
            embeddings: None,
            prefix_cache_memory: 1 << 30,
            prefix_cache_dir: None,
            prefix_cache_save_interval: Duration::from_secs(60),
            kv_memory: None,
            kv_reserve: pocketlm::generate::batch::KV_RESERVE,
            kv_f16: false,
        }
    }
}

/// Errors of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address could not be bound or served.
    #[error("{addr}: {source}")]
    Io {
        /// `host:port`.
        addr: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    model_id: Arc<str>,
    created: u64,
    api_key: Option<Arc<str>>,
    /// The sampling of fields a request leaves out ([`LoadedModel::default_sampling`]).
    sampling_defaults: SamplingParams,
    embeddings: Option<Arc<embeddings::EmbeddingService>>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The id a model is served under: `config.model_id`, else the file name without `.gguf`.
pub fn model_id(model: &LoadedModel, config: &ServerConfig) -> String {
    config.model_id.clone().unwrap_or_else(|| {
        model
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pocketlm".into())
    })
}

/// The application: every route, the body limit, authentication and the JSON fallbacks.
pub fn router(model: Arc<LoadedModel>, config: &ServerConfig) -> Router {
    let state = AppState {
        sampling_defaults: model.default_sampling(),
        model_id: model_id(&model, config).into(),
        engine: Arc::new(Engine::new(
            model,
            EngineConfig {
                max_batch: config.max_concurrency,
                max_tokens_per_step: config.max_tokens_per_step,
                queue_size: config.queue_size,
                prefix_cache: Some(engine::PrefixCacheSettings {
                    max_bytes: config.prefix_cache_memory,
                    dir: config.prefix_cache_dir.clone(),
                    save_interval: config.prefix_cache_save_interval,
                }),
                kv_memory: config.kv_memory,
                kv_reserve: config.kv_reserve,
                kv_f16: config.kv_f16,
            },
        )),
        created: unix_now(),
        api_key: config.api_key.as_deref().map(Arc::from),
        embeddings: config.embeddings.clone(),
    };
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route(
            "/v1/embeddings",
            post(|State(s): State<AppState>, body| embeddings::create(s.embeddings, body)),
        )
        .route("/v1/responses", post(responses::create_response))
        .route("/v1/messages", post(messages::create_message))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route(
            "/health",
            get(|State(s): State<AppState>| async move {
                Json(serde_json::json!({"status": "ok", "engine": s.engine.stats()}))
            }),
        )
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.body_limit))
        .with_state(state)
}

/// Serves `app` on `listener` (HTTP/1.1) until `shutdown` completes, then lets open
/// connections finish their requests. Each connection is closed when a client takes longer
/// than `timeouts.header` to send a request header, or stays silent for
/// `timeouts.keep_alive` with no request in flight.
///
/// Errors: none today (accept errors such as too many open files are logged and retried);
/// the `Result` leaves room for them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Dropped at shutdown: every connection sees it and shuts down gracefully.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    // Each connection holds a clone; `closed()` resolves when the last one is dropped.
    let (done_tx, done_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let stream = match stream {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(serve_connection(
            stream,
            app.clone(),
            timeouts,
            stop_rx.clone(),
            done_rx.clone(),
        ));
    }
    drop(stop_tx);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// One connection, with the header timeout (hyper's, on a tokio timer) and the idle watch.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    timeouts: Timeouts,
    mut stop: tokio::sync::watch::Receiver<()>,
    _done: tokio::sync::watch::Receiver<()>,
) {
    let started = tokio::time::Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = hyper_util::rt::TokioIo::new(Watched {
        inner: stream,
        started,
        last: last.clone(),
    });
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeouts.header);
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        let idle_until = started
            + Duration::from_millis(last.load(AtomicOrdering::Relaxed))
            + timeouts.keep_alive;
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection closed: {e}");
                }
                break;
            }
            _ = stop.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep_until(idle_until), if !closing => {
                let idle_since = started
                    + Duration::from_millis(last.load(AtomicOrdering::Relaxed));
                if idle_since + timeouts.keep_alive <= tokio::time::Instant::now() {
                    // Closes now when no request is in flight, else after its answer.
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// A TCP stream that notes when it last read or wrote anything (milliseconds since
/// `started`).
struct Watched {
    inner: tokio::net::TcpStream,
    started: tokio::time::Instant,
    last: Arc<AtomicU64>,
}

impl Watched {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, AtomicOrdering::Relaxed);
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Binds `config.host:config.port` and serves `model` until Ctrl-C, on a new multi-threaded
/// tokio runtime. Prints the base URL on stderr.
///
/// Errors: [`ServerError::Io`] when the runtime cannot start or the address cannot be bound.
pub fn run(model: LoadedModel, config: ServerConfig) -> Result<(), ServerError> {
    let addr = format!("{}:{}", config.host, config.port);
    let io = |source| ServerError::Io {
        addr: addr.clone(),
        source,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(io)?;
        let local: SocketAddr = listener.local_addr().map_err(io)?;
        let app = router(Arc::new(model), &config);
        eprintln!("pocketlm: serving on http://{local}/v1 (Ctrl-C to stop)");
        serve(listener, app, config.timeouts, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(io)
    })
}

/// The credentials of an `Authorization: Bearer <token>` header value; the scheme is matched
/// without regard to case (RFC 9110 section 11.1: `bearer`, `BEARER` are the same scheme).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn authenticate(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        match given {
            None => {
                return ApiError::unauthorized(
                    "missing API key: send the header `Authorization: Bearer <key>`",
                )
                .into_response()
            }
            Some(g) if !constant_time_eq(g.as_bytes(), key.as_bytes()) => {
                return ApiError::unauthorized("incorrect API key").into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("unknown route: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(format!("method {method} is not allowed on {}", uri.path()))
}

/// `GET /v1/models`: the chat model, then the embedding model when `serve` has one
/// (`--embedding-model`), each under the id its answers carry.
async fn list_models(State(s): State<AppState>) -> Json<ModelList> {
    let card = |id: &str| ModelCard {
        id: id.to_string(),
        object: "model",
        created: s.created,
        owned_by: "pocketlm",
    };
    let mut data = vec![card(&s.model_id)];
    data.extend(s.embeddings.as_deref().map(|e| card(e.id())));
    Json(ModelList {
        object: "list",
        data,
    })
}

/// Reads a JSON body, refuses fields outside `known` ([`api::check_fields`]) and parses it:
/// 413 over the limit, 400 for anything unreadable or unknown.
pub(crate) fn parse_checked<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    known: &[&[&str]],
) -> Result<T, ApiError> {
    let value: serde_json::Value = parse_body(body)?;
    api::check_fields(&value, known)?;
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

/// Reads and parses a JSON body: 413 over the limit, 400 for anything unreadable.
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(format!("the request body is too large: {}", r.body_text()))
        } else {
            ApiError::bad_request(format!(
                "could not read the request body: {}",
                r.body_text()
            ))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

pub(crate) fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{:x}{nanos:08x}{n:x}", unix_now())
}

async fn chat_completions(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse_checked(body, &[&COMMON_FIELDS, &CHAT_FIELDS])?;
    if let Some(m) = &req.modalities {
        if m.iter().any(|x| x != "text") {
            return Err(ApiError::bad_param(
                "modalities",
                "`modalities`: only `text` output is supported",
            ));
        }
    }
    let logprobs = req.logprobs()?;
    let spec = chat::ChatSpec {
        messages: req.messages()?,
        tools: req.tools.clone().unwrap_or_default(),
        tool_choice: match &req.tool_choice {
            Some(v) => parse_tool_choice(v)?,
            None => Default::default(),
        },
        parallel: req.parallel_tool_calls.unwrap_or(true),
        response_constraint: match &req.response_format {
            Some(f) => f.constraint()?,
            None => None,
        },
        common: req.common.clone(),
        logprobs,
        messages_field: "messages",
        tools_field: "tools",
    };
    let started = chat::start_chat(&s, spec).await?;
    let prompt_tokens = started.prompt_tokens;
    let id = new_id("chatcmpl");
    let created = unix_now();
    if req.common.stream() {
        let fmt = ChatStream {
            id,
            created,
            model: s.model_id.to_string(),
            include_usage: req.common.include_usage(),
            prompt_tokens,
            logprobs: logprobs.is_some(),
            n: started.n,
            index: 0,
            completion_tokens: 0,
            cached_tokens: None,
            tool_format: started.tool_format,
            parser: started.tool_format.map(ToolCallStreamParser::new),
        };
        return Ok(chat_sse(started.rx, fmt));
    }
    let outs = chat::collect_choices(started).await?;
    let completion_tokens = outs.iter().map(|o| o.completion_tokens).sum();
    let cached_tokens = outs.first().and_then(|o| o.cached_tokens);
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| ChatChoice {
            index: i as u32,
            logprobs: logprobs.map(|_| {
                let mut c = ChatLogprobs::default();
                o.steps.iter().for_each(|st| c.push(st));
                c
            }),
            message: AssistantMessage {
                role: "assistant",
                content: (!o.content.is_empty() || o.tool_calls.is_empty()).then_some(o.content),
                tool_calls: o.tool_calls,
            },
            finish_reason: o.finish_reason,
        })
        .collect();
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model: s.model_id.to_string(),
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens).with_cached(cached_tokens),
    })
    .into_response())
}

/// Writes the server-sent events of one streamed chat completion (`n` choices one after
/// another, each `role` chunk, content / tool-call chunks, finish chunk).
struct ChatStream {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    prompt_tokens: usize,
    /// Whether chunks carry log-probabilities.
    logprobs: bool,
    n: usize,
    /// The choice being streamed.
    index: usize,
    /// Tokens of the choices finished so far.
    completion_tokens: usize,
    /// Prompt tokens the first choice took from the prefix cache (`None`: no prefix cache).
    cached_tokens: Option<usize>,
    tool_format: Option<ToolCallFormat>,
    /// The current choice's tool-call parser.
    parser: Option<ToolCallStreamParser>,
}

impl ChatStream {
    fn chunk(
        &self,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> String {
        event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: self.index as u32,
                delta,
                logprobs,
                finish_reason,
            }],
            usage: None,
        })
    }

    /// The first chunk of a choice: the assistant role.
    fn start(&self) -> String {
        self.chunk(
            Delta {
                role: Some("assistant"),
                content: Some(String::new()),
                tool_calls: None,
            },
            None,
            None,
        )
    }

    /// Chunks for tool-parser events; the first carries `logprobs` (or an empty content chunk
    /// does, when there is none).
    fn events(&self, events: Vec<ToolStreamEvent>, mut logprobs: Option<ChatLogprobs>) -> String {
        let mut out = String::new();
        for e in events {
            let delta = match e {
                ToolStreamEvent::Content(t) => Delta {
                    content: Some(t),
                    ..Delta::default()
                },
                ToolStreamEvent::CallStart { index, id, name } => Delta {
                    tool_calls: Some(vec![ToolCallDelta {
                        index,
                        id: Some(id),
                        kind: Some("function"),
                        function: FunctionDelta {
                            name: Some(name),
                            arguments: String::new(),
                        },
                    }]),
                    ..Delta::default()
                },
                ToolStreamEvent::CallArguments { index, fragment } => Delta {
                    tool_calls: Some(vec![ToolCallDelta {
                        index,
                        id: None,
                        kind: None,
                        function: FunctionDelta {
                            name: None,
                            arguments: fragment,
                        },
                    }]),
                    ..Delta::default()
                },
            };
            out.push_str(&self.chunk(delta, logprobs.take(), None));
        }
        if let Some(lp) = logprobs {
            out.push_str(&self.chunk(
                Delta {
                    content: Some(String::new()),
                    ..Delta::default()
                },
                Some(lp),
                None,
            ));
        }
        out
    }

    fn delta(&mut self, text: String, step: Option<Box<StepLogprobs>>) -> String {
        let lp = self.logprobs.then(|| {
            let mut c = ChatLogprobs::default();
            step.iter().for_each(|st| c.push(st));
            c
        });
        let events = match &mut self.parser {
            Some(p) => p.push(&text),
            None if text.is_empty() && lp.is_none() => Vec::new(),
            None => vec![ToolStreamEvent::Content(text)],
        };
        self.events(events, lp)
    }

    /// The end of a choice: held-back text, the finish chunk; then the next choice's start, or
    /// (after the last) the usage chunk when asked for and `[DONE]`.
    fn done(&mut self, finish_reason: &'static str, completion_tokens: usize) -> String {
        let (rest, calls) = match &mut self.parser {
            Some(p) => (p.finish(), p.calls()),
            None => (Vec::new(), 0),
        };
        let mut out = self.events(rest, None);
        let reason = if calls > 0 {
            "tool_calls"
        } else {
            finish_reason
        };
        out.push_str(&self.chunk(Delta::default(), None, Some(reason)));
        self.completion_tokens += completion_tokens;
        if self.index + 1 < self.n {
            self.index += 1;
            self.parser = self.tool_format.map(ToolCallStreamParser::new);
            out.push_str(&self.start());
            return out;
        }
        if self.include_usage {
            out.push_str(&event(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(
                    Usage::new(self.prompt_tokens, self.completion_tokens)
                        .with_cached(self.cached_tokens),
                ),
            }));
        }
        out.push_str("data: [DONE]\n\n");
        out
    }
}

/// A streamed chat completion; the body owns the receiver (a client that goes away stops the
/// generation).
fn chat_sse(rx: mpsc::Receiver<Msg>, fmt: ChatStream) -> Response {
    struct St {
        rx: mpsc::Receiver<Msg>,
        fmt: ChatStream,
        started: bool,
        finished: bool,
    }
    let st = St {
        rx,
        fmt,
        started: false,
        finished: false,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if !st.started {
            st.started = true;
            return Some((Ok::<_, std::convert::Infallible>(st.fmt.start()), st));
        }
        if st.finished {
            return None;
        }
        let out = match st.rx.recv().await {
            Some(Msg::Delta { text, logprobs }) => st.fmt.delta(text, logprobs),
            Some(Msg::Done {
                finish_reason,
                completion_tokens,
                cached_tokens,
            }) => {
                if st.fmt.index == 0 {
                    st.fmt.cached_tokens = cached_tokens;
                }
                let out = st.fmt.done(finish_reason, completion_tokens);
                st.finished = out.ends_with("data: [DONE]\n\n");
                out
            }
            Some(Msg::Error(e)) => {
                st.finished = true;
                format!("data: {}\n\ndata: [DONE]\n\n", e.to_json())
            }
            None => {
                st.finished = true;
                let e = ApiError::internal("the generation ended without an answer");
                format!("data: {}\n\ndata: [DONE]\n\n", e.to_json())
            }
        };
        Some((Ok(out), st))
    });
    sse_response(Body::from_stream(stream))
}

/// The headers of a server-sent-events answer around `body`.
pub(crate) fn sse_response(body: Body) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (headers, body).into_response()
}

async fn completions(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_checked(body, &[&COMMON_FIELDS, &COMPLETION_FIELDS])?;
    req.check_unsupported()?;
    let prompt = req.prompt()?;
    let info = s.engine.model().model.info();
    let ctx = info.context_length;
    let n = req.common.n()?;
    let mut params = req.common.to_generate_params(ctx, &s.sampling_defaults)?;
    if let Some(bias) = req.common.logit_bias(info.vocab_size)? {
        params.sampling.logit_bias = bias;
    }
    params.logprobs = req.logprobs()?;
    let logprobs = params.logprobs.is_some();
    let slot = s.engine.admit()?;
    let ids =
        s.engine
            .encode(Prompt::Text(prompt))
            .await
            .map_err(|e| match e.param.as_deref() {
                Some("messages") => e.with_param("prompt"),
                _ => e,
            })?;
    let prompt_tokens = ids.ids.len();
    params.max_tokens = req.common.fit_max_tokens(prompt_tokens, ctx)?;
    let all = (0..n)
        .map(|i| {
            let mut p = params.clone();
            p.sampling.seed = p.sampling.seed.map(|seed| seed.wrapping_add(i as u64));
            p
        })
        .collect();
    let rx = s.engine.start(slot, ids, all);
    let fmt = StreamFormat {
        id: new_id("cmpl"),
        created: unix_now(),
        model: s.model_id.to_string(),
        include_usage: req.common.include_usage(),
        prompt_tokens,
        logprobs,
        text_offset: 0,
        n,
        index: 0,
        completion_tokens: 0,
        cached_tokens: None,
    };
    if req.common.stream() {
        return Ok(sse(rx, fmt));
    }
    let outs = collect(rx, n).await?;
    let completion_tokens = outs.iter().map(|o| o.completion_tokens).sum();
    let cached_tokens = outs.first().and_then(|o| o.cached_tokens);
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, out)| {
            let lp = logprobs.then(|| {
                let mut c = CompletionLogprobs::default();
                let mut offset = 0;
                for st in &out.steps {
                    c.push(st, offset);
                    offset += st.chosen.token.chars().count();
                }
                c
            });
            CompletionChoice {
                text: out.text,
                index: i as u32,
                logprobs: lp,
                finish_reason: Some(out.finish_reason),
            }
        })
        .collect();
    Ok(Json(Completion {
        id: fmt.id,
        object: "text_completion",
        created: fmt.created,
        model: fmt.model,
        choices,
        usage: Some(Usage::new(prompt_tokens, completion_tokens).with_cached(cached_tokens)),
    })
    .into_response())
}

/// A whole answer.
struct Collected {
    text: String,
    finish_reason: &'static str,
    completion_tokens: usize,
    /// Prompt tokens taken from the prefix cache (`None`: no prefix cache).
    cached_tokens: Option<usize>,
    /// One per generated token when log-probabilities were asked for.
    steps: Vec<StepLogprobs>,
}

/// Gathers the `n` whole answers, one after another.
async fn collect(mut rx: mpsc::Receiver<Msg>, n: usize) -> Result<Vec<Collected>, ApiError> {
    let mut out = Vec::with_capacity(n);
    let mut text = String::new();
    let mut steps = Vec::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Delta { text: t, logprobs } => {
                text.push_str(&t);
                steps.extend(logprobs.map(|b| *b));
            }
            Msg::Done {
                finish_reason,
                completion_tokens,
                cached_tokens,
            } => {
                out.push(Collected {
                    text: std::mem::take(&mut text),
                    finish_reason,
                    completion_tokens,
                    cached_tokens,
                    steps: std::mem::take(&mut steps),
                });
                if out.len() == n {
                    return Ok(out);
                }
            }
            Msg::Error(e) => return Err(e),
        }
    }
    Err(ApiError::internal("the generation ended without an answer"))
}

/// Writes the server-sent events of one streamed text completion (`n` choices one after
/// another).
struct StreamFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    prompt_tokens: usize,
    /// Whether chunks carry log-probabilities.
    logprobs: bool,
    /// Characters of token text streamed so far in this choice (legacy `text_offset`).
    text_offset: usize,
    n: usize,
    /// The choice being streamed.
    index: usize,
    /// Tokens of the choices finished so far.
    completion_tokens: usize,
    /// Prompt tokens the first choice took from the prefix cache (`None`: no prefix cache).
    cached_tokens: Option<usize>,
}

pub(crate) fn event<T: Serialize>(value: &T) -> String {
    match serde_json::to_string(value) {
        Ok(json) => format!("data: {json}\n\n"),
        Err(e) => format!(
            "data: {}\n\n",
            ApiError::internal(format!("serializing a chunk failed: {e}")).to_json()
        ),
    }
}

impl StreamFormat {
    fn completion_chunk(
        &self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> String {
        event(&Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![CompletionChoice {
                text,
                index: self.index as u32,
                logprobs,
                finish_reason,
            }],
            usage: None,
        })
    }

    /// A content chunk; with log-probabilities on, `step` (the token of this text) fills the
    /// chunk's `logprobs` (an empty list for text without a token, flushed at the end).
    fn delta(&mut self, text: String, step: Option<Box<StepLogprobs>>) -> String {
        let lp = self.logprobs.then(|| {
            let mut c = CompletionLogprobs::default();
            if let Some(st) = &step {
                c.push(st, self.text_offset);
                self.text_offset += st.chosen.token.chars().count();
            }
            c
        });
        self.completion_chunk(text, lp, None)
    }

    /// The finish chunk of a choice; after the last, the usage chunk when asked for and
    /// `[DONE]`.
    fn done(&mut self, finish_reason: &'static str, completion_tokens: usize) -> String {
        let mut out = self.completion_chunk(String::new(), None, Some(finish_reason));
        self.completion_tokens += completion_tokens;
        if self.index + 1 < self.n {
            self.index += 1;
            self.text_offset = 0;
            return out;
        }
        if self.include_usage {
            out.push_str(&event(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(
                    Usage::new(self.prompt_tokens, self.completion_tokens)
                        .with_cached(self.cached_tokens),
                ),
            }));
        }
        out.push_str("data: [DONE]\n\n");
        out
    }
}

/// A streamed text completion. The body owns the receiver: when the client goes away the body
/// is dropped, the generating thread's next send fails and it stops.
fn sse(rx: mpsc::Receiver<Msg>, fmt: StreamFormat) -> Response {
    struct St {
        rx: mpsc::Receiver<Msg>,
        fmt: StreamFormat,
        finished: bool,
    }
    let st = St {
        rx,
        fmt,
        finished: false,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        let out = match st.rx.recv().await {
            Some(Msg::Delta { text, logprobs }) => st.fmt.delta(text, logprobs),
            Some(Msg::Done {
                finish_reason,
                completion_tokens,
                cached_tokens,
            }) => {
                if st.fmt.index == 0 {
                    st.fmt.cached_tokens = cached_tokens;
                }
                let out = st.fmt.done(finish_reason, completion_tokens);
                st.finished = out.ends_with("data: [DONE]\n\n");
                out
            }
            Some(Msg::Error(e)) => {
                st.finished = true;
                format!("data: {}\n\ndata: [DONE]\n\n", e.to_json())
            }
            None => {
                st.finished = true;
                let e = ApiError::internal("the generation ended without an answer");
                format!("data: {}\n\ndata: [DONE]\n\n", e.to_json())
            }
        };
        Some((Ok::<_, std::convert::Infallible>(out), st))
    });
    sse_response(Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_events(sse: &str) -> Vec<serde_json::Value> {
        sse.split("\n\n")
            .filter_map(|b| b.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("chunk JSON"))
            .collect()
    }

    /// A Hermes answer streamed token by token becomes content, then OpenAI `tool_calls`
    /// deltas (index, id, type and name first, then arguments), then `finish_reason:
    /// tool_calls`; with `n = 2` the second choice follows under index 1.
    #[test]
    fn chat_stream_turns_hermes_calls_into_tool_call_deltas() {
        let mut fmt = ChatStream {
            id: "chatcmpl-1".into(),
            created: 0,
            model: "m".into(),
            include_usage: true,
            prompt_tokens: 10,
            logprobs: false,
            n: 2,
            index: 0,
            completion_tokens: 0,
            cached_tokens: None,
            tool_format: Some(ToolCallFormat::Hermes),
            parser: Some(ToolCallStreamParser::new(ToolCallFormat::Hermes)),
        };
        let answer = "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let mut sse = fmt.start();
        for piece in answer.as_bytes().chunks(3) {
            sse.push_str(&fmt.delta(String::from_utf8_lossy(piece).into_owned(), None));
        }
        sse.push_str(&fmt.done("stop", 20));
        sse.push_str(&fmt.delta("Plain.".into(), None));
        sse.push_str(&fmt.done("length", 2));
        assert!(sse.ends_with("data: [DONE]\n\n"), "{sse}");
        let events = data_events(&sse);
        let mut content = [String::new(), String::new()];
        let mut name = String::new();
        let mut arguments = String::new();
        let mut finish = Vec::new();
        for e in &events {
            let Some(c) = e["choices"].get(0) else {
                assert_eq!(e["usage"]["completion_tokens"], 22, "{e}");
                continue;
            };
            let i = c["index"].as_u64().unwrap() as usize;
            content[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
            if let Some(tc) = c["delta"]["tool_calls"].as_array() {
                assert_eq!(tc[0]["index"], 0);
                if let Some(n) = tc[0]["function"]["name"].as_str() {
                    assert!(tc[0]["id"].as_str().unwrap().starts_with("call_"), "{e}");
                    assert_eq!(tc[0]["type"], "function");
                    name.push_str(n);
                }
                arguments.push_str(tc[0]["function"]["arguments"].as_str().unwrap());
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish.push((i, f.to_owned()));
            }
        }
        assert_eq!(content, ["Sure.\n".to_string(), "Plain.".to_string()]);
        assert_eq!(name, "get_weather");
        let args: serde_json::Value = serde_json::from_str(&arguments).unwrap();
        assert_eq!(args, serde_json::json!({"city": "Paris"}));
        assert_eq!(
            finish,
            vec![(0, "tool_calls".to_string()), (1, "length".to_string())]
        );
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(super::bearer_token("Bearer sk-1"), Some("sk-1"));
        assert_eq!(super::bearer_token("bearer sk-1"), Some("sk-1"));
        assert_eq!(super::bearer_token("BEARER  sk-1 "), Some("sk-1"));
        assert_eq!(super::bearer_token("Basic sk-1"), None);
        assert_eq!(super::bearer_token("Bearer"), None);
    }
}
