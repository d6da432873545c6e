//! The C API of pocketlm: `include/pocketlm.h`, generated from this file by cbindgen.
//!
//! A thin layer over the library's public API (`pocketlm::loader::load`,
//! `pocketlm::generate::generate`, `pocketlm::session::ChatSession`): it converts C strings,
//! structs and callbacks to the library's types and the library's errors to status codes.
//!
//! Conventions (as `llama.h`'s):
//! - Handles are opaque pointers ([`PocketlmModel`], [`PocketlmChat`],
//!   [`PocketlmEmbeddingModel`]) made by a `*_load` /
//!   `*_new` function and released by the matching `*_free` (NULL is accepted and ignored).
//! - Every fallible function returns a [`PocketlmStatus`]; on failure
//!   [`pocketlm_last_error`] gives the message (per thread), and out-parameters are left
//!   untouched.
//! - Strings in are NUL-terminated UTF-8: a NULL where one is required is
//!   [`PocketlmStatus::NullArgument`], invalid UTF-8 is [`PocketlmStatus::InvalidUtf8`], each
//!   naming the parameter. Strings out are allocated here and released with
//!   [`pocketlm_string_free`]; token arrays with [`pocketlm_tokens_free`].
//! - No panic crosses the boundary: every entry point runs under `catch_unwind` and reports a
//!   panic as [`PocketlmStatus::Panic`].
//! - A model handle may be used by several threads at once (generations share the weights,
//!   each has its own KV cache); a chat handle by one thread at a time.
//!
//! Sentence embeddings (`pocketlm::embed`): [`PocketlmEmbeddingModel`] from
//! [`pocketlm_embedding_model_load`], vectors written into a caller's float array by
//! [`pocketlm_embed`].

#![allow(clippy::missing_safety_doc)] // Each function's safety contract is in its doc comment.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use pocketlm::chat_template::Message;
use pocketlm::device::DeviceSpec;
use pocketlm::generate::{self, Event, FinishReason, GenerateParams, GenerationStats};
use pocketlm::loader::{self, LoadOptions, LoadedModel, Prompt};
use pocketlm::sampling::SamplingParams;
use pocketlm::session::{ChatSession, SessionOptions};

/// Result of every fallible call. `POCKETLM_STATUS_OK` (0) is success; any other value is a
/// failure whose message [`pocketlm_last_error`] returns.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PocketlmStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument is NULL (the message names it).
    NullArgument = 1,
    /// A string argument is not valid UTF-8 (the message names it and the byte offset).
    InvalidUtf8 = 2,
    /// An argument is out of range or does not fit the model (bad sampling values, an empty
    /// prompt, a token id outside the vocabulary, a chat prompt for a model without a chat
    /// template, an unknown device name).
    InvalidArgument = 3,
    /// A file or folder does not exist (the message names it).
    NotFound = 4,
    /// Any other I/O error on a named file.
    Io = 5,
    /// A model file or folder is malformed or of an unsupported architecture, or an adapter
    /// does not fit the model.
    Model = 6,
    /// The tokenizer failed.
    Tokenizer = 7,
    /// The chat template failed to compile or render.
    Template = 8,
    /// Downloading the default model (or a hub model) failed.
    Fetch = 9,
    /// The prompt does not fit in the model's context.
    ContextOverflow = 10,
    /// The tensor library (candle) failed.
    Backend = 11,
    /// A bug: the library panicked. The message says where; the handle used may be in an
    /// inconsistent state and should be freed.
    Panic = 12,
}

/// Why a generation ended ([`PocketlmGenerateStats::finish_reason`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PocketlmFinishReason {
    /// The model produced an end-of-generation token.
    Eos = 0,
    /// A stop string was produced (it is not part of the text).
    Stop = 1,
    /// `max_tokens` tokens were generated.
    MaxTokens = 2,
    /// The context is full.
    ContextFull = 3,
    /// The callback returned non-zero.
    Cancelled = 4,
}

/// How to load a model. Zero-initialised (`PocketlmLoadOptions o = {0};`) or NULL means the
/// defaults: device "auto", repacked weights, fast MLX kernels, no adapter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PocketlmLoadOptions {
    /// "auto", "cpu", "cuda", "cuda:N" or "metal"; NULL is "auto".
    pub device: *const c_char,
    /// A LoRA adapter folder in mlx-lm's format (`adapter_config.json`,
    /// `adapters.safetensors`) to apply after loading; NULL for none.
    pub adapter_path: *const c_char,
    /// Keep GGUF weights in their file layout (llama.cpp's `--no-repack`).
    pub no_repack: bool,
    /// Run MLX 2- to 6-bit layers with the f32 arithmetic of `mx.quantized_matmul`.
    pub exact_mlx_matmul: bool,
}

/// What to generate. Fill it with [`pocketlm_generate_params_default`] (the model's default
/// sampling, as the CLI's `generate` uses) and change fields; a NULL params pointer means
/// those defaults.
///
/// Greedy decoding as the CLI's `--temp 0`: `temperature = 0` and `repetition_penalty = 1`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PocketlmGenerateParams {
    /// Most new tokens. Default 256.
    pub max_tokens: u32,
    /// Softmax temperature, >= 0; 0 is greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling mass in [0, 1]; 0 and 1 are off.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 is off.
    pub top_k: u32,
    /// Keep tokens at least `min_p` times as likely as the top one, in [0, 1]; 0 is off.
    pub min_p: f32,
    /// CTRL repetition penalty (> 0); 1 is off.
    pub repetition_penalty: f32,
    /// Recent tokens the repetition penalty looks at.
    pub repetition_context_size: u32,
    /// Seed of the sampler's random generator, used when `use_seed` is true (else a new
    /// random seed each call).
    pub seed: u64,
    /// Whether `seed` is used.
    pub use_seed: bool,
    /// Stop strings (`n_stop` of them, NULL when `n_stop` is 0): generation ends before the
    /// first occurrence of any, which is not part of the text.
    pub stop: *const *const c_char,
    /// Number of stop strings.
    pub n_stop: usize,
    /// [`pocketlm_generate`]: feed the prompt as plain text (with BOS if the model adds one)
    /// instead of as a user message through the model's chat template. Models without a
    /// template always get plain text. Ignored by chat sessions.
    pub raw_prompt: bool,
    /// A system message (NULL for none): [`pocketlm_generate`] puts it before the user
    /// message (chat template only); [`pocketlm_chat_new`] starts every turn with it.
    pub system: *const c_char,
}

/// Figures about one generation, filled by [`pocketlm_generate`] and [`pocketlm_chat_send`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PocketlmGenerateStats {
    /// Why it ended.
    pub finish_reason: PocketlmFinishReason,
    /// Prompt tokens prefilled (in a chat session: those the KV cache did not already hold).
    pub prompt_tokens: u64,
    /// Tokens generated (end-of-generation token excluded).
    pub generated_tokens: u64,
    /// Wall time of the prefill, seconds (0 when cancelled).
    pub prefill_seconds: f64,
    /// Wall time of decoding, seconds (0 when cancelled).
    pub decode_seconds: f64,
    /// Prefill tokens per second (0 when cancelled).
    pub prefill_tokens_per_second: f64,
    /// Decode tokens per second: tokens after the first over the decode time (0 when
    /// cancelled).
    pub decode_tokens_per_second: f64,
}

/// Called with each piece of generated text as it becomes final: `piece` points to `len`
/// bytes of UTF-8 (whole characters), followed by a NUL, valid only during the call.
/// Return 0 to continue, non-zero to stop the generation (reported as
/// `POCKETLM_FINISH_REASON_CANCELLED`, not as an error).
pub type PocketlmTextCallback =
    Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user_data: *mut c_void) -> i32>;

/// A loaded model: network, tokenizer and chat template (`pocketlm::loader::LoadedModel`).
/// Thread-safe; chat sessions keep it alive after [`pocketlm_model_free`].
pub struct PocketlmModel {
    inner: Arc<LoadedModel>,
}

/// A multi-turn conversation that keeps its KV cache between turns
/// (`pocketlm::session::ChatSession`). Use from one thread at a time.
pub struct PocketlmChat {
    session: ChatSession,
}

// ---------------------------------------------------------------------------------------------
// Errors and the boundary.

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// A failed call: its status and message.
struct Failure {
    status: PocketlmStatus,
    message: String,
}

impl Failure {
    fn new(status: PocketlmStatus, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<pocketlm::Error> for Failure {
    fn from(e: pocketlm::Error) -> Self {
        use pocketlm::Error as E;
        use PocketlmStatus as S;
        let status = match &e {
            E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => S::NotFound,
            E::Io { .. } => S::Io,
            E::Model(_) | E::Tensor { .. } | E::UnsupportedArchitecture { .. } | E::Quant(_) => {
                S::Model
            }
            E::Tokenizer(_) => S::Tokenizer,
            E::Template(_) => S::Template,
            E::Fetch(_) => S::Fetch,
            E::Image(_) | E::InvalidArgument(_) => S::InvalidArgument,
            E::ContextOverflow { .. } => S::ContextOverflow,
            E::Candle(_) => S::Backend,
            #[allow(unreachable_patterns)] // Variants the library may add later.
            _ => S::Model,
        };
        Failure::new(status, e.to_string())
    }
}

fn set_last_error(message: Option<String>) {
    let c =
        message.map(|m| CString::new(m.replace('\0', "\\0")).expect("interior NULs were replaced"));
    LAST_ERROR.with(|slot| *slot.borrow_mut() = c);
}

/// Runs one entry point: clears the thread's last error, catches panics, and turns a failure
/// into its status code and message.
fn boundary(f: impl FnOnce() -> Result<(), Failure>) -> PocketlmStatus {
    set_last_error(None);
    let failure = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return PocketlmStatus::Ok,
        Ok(Err(f)) => f,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            Failure::new(
                PocketlmStatus::Panic,
                format!("internal error (a panic in pocketlm): {what}"),
            )
        }
    };
    set_last_error(Some(failure.message));
    failure.status
}

/// A required `*const c_char` argument as `&str`.
unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Result<&'a str, Failure> {
    opt_str_arg(p, name)?
        .ok_or_else(|| Failure::new(PocketlmStatus::NullArgument, format!("`{name}` is NULL")))
}

/// An optional `*const c_char` argument (NULL is `None`).
unsafe fn opt_str_arg<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    CStr::from_ptr(p).to_str().map(Some).map_err(|e| {
        Failure::new(
            PocketlmStatus::InvalidUtf8,
            format!("`{name}` is not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })
}

/// A required pointer argument as a reference.
unsafe fn ref_arg<'a, T>(p: *const T, name: &str) -> Result<&'a T, Failure> {
    p.as_ref()
        .ok_or_else(|| Failure::new(PocketlmStatus::NullArgument, format!("`{name}` is NULL")))
}

/// A required out-pointer.
fn out_arg<T>(p: *mut T, name: &str) -> Result<(), Failure> {
    if p.is_null() {
        return Err(Failure::new(
            PocketlmStatus::NullArgument,
            format!("`{name}` is NULL"),
        ));
    }
    Ok(())
}

fn c_string(s: String) -> *mut c_char {
    CString::new(s.replace('\0', "\\0"))
        .expect("interior NULs were replaced")
        .into_raw()
}

// ---------------------------------------------------------------------------------------------
// Version, errors, memory.

/// The library version ("0.1.0"), a static string.
#[no_mangle]
pub extern "C" fn pocketlm_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread, or NULL when the last call succeeded
/// (every call but this one clears it first). Valid until the next pocketlm call on this
/// thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn pocketlm_last_error() -> *const c_char {
    LAST_ERROR.with(|slot| {
        slot.borrow()
            .as_ref()
            .map_or(std::ptr::null(), |c| c.as_ptr())
    })
}

/// Releases a string returned by this library. NULL is ignored.
///
/// Safety: `s` must come from this library and not be freed twice.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_string_free(s: *mut c_char) {
    if !s.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(CString::from_raw(s))));
    }
}

/// Releases a token array returned by [`pocketlm_tokenize`] (`len` as returned). NULL is
/// ignored.
///
/// Safety: `ids`/`len` must come from [`pocketlm_tokenize`] and not be freed twice.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_tokens_free(ids: *mut u32, len: usize) {
    if !ids.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(ids, len)))
        }));
    }
}

// ---------------------------------------------------------------------------------------------
// Models.

/// Loads a model (`pocketlm::loader::load`).
///
/// `model`: a `.gguf` file, a Hugging Face / MLX model folder or a hub id
/// `org/name[@revision]`; NULL loads the default model (SmolLM2-135M-Instruct Q4_1), downloaded
/// into `$POCKETLM_HOME` (default `~/.cache/pocketlm`) on first use as the CLI does.
/// `options`: NULL for the defaults. On success `*out_model` is a new handle.
///
/// Errors: `NOT_FOUND` (no such path, and not a hub id), `MODEL` (malformed or unsupported;
/// an adapter that does not fit), `FETCH`, `INVALID_ARGUMENT` (unknown device), `NULL_ARGUMENT`
/// (`out_model`), `INVALID_UTF8`.
///
/// Safety: string arguments NUL-terminated or NULL; `out_model` writable.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_model_load(
    model: *const c_char,
    options: *const PocketlmLoadOptions,
    out_model: *mut *mut PocketlmModel,
) -> PocketlmStatus {
    boundary(|| {
        out_arg(out_model, "out_model")?;
        let spec = opt_str_arg(model, "model")?;
        let (device, adapter, no_repack, exact) = match options.as_ref() {
            Some(o) => (
                opt_str_arg(o.device, "options.device")?,
                opt_str_arg(o.adapter_path, "options.adapter_path")?,
                o.no_repack,
                o.exact_mlx_matmul,
            ),
            None => (None, None, false, false),
        };
        let device: DeviceSpec = device.unwrap_or("auto").parse().map_err(|e| {
            Failure::new(
                PocketlmStatus::InvalidArgument,
                format!("`options.device`: {e}"),
            )
        })?;
        let path = match spec {
            Some(s) => loader::resolve_model(s)?,
            None => {
                pocketlm::fetch::ensure_default_model(&mut |_| {}).map_err(pocketlm::Error::from)?
            }
        };
        let opts = LoadOptions {
            device,
            exact_mlx_matmul: exact,
            no_repack,
            ..Default::default()
        };
        let mut m = loader::load(&path, &opts)?;
        if let Some(dir) = adapter {
            pocketlm::lora::Adapter::load(PathBuf::from(dir))?.apply(m.model.as_mut())?;
        }
        let handle = Box::new(PocketlmModel { inner: Arc::new(m) });
        *out_model = Box::into_raw(handle);
        Ok(())
    })
}

/// Releases a model handle. NULL is ignored. Chat sessions made from it stay usable (they
/// hold the model until they are freed).
///
/// Safety: `model` from [`pocketlm_model_load`], not used afterwards, not freed twice.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_model_free(model: *mut PocketlmModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(model))));
    }
}

/// Tokenizes `text` (UTF-8) into `*out_ids` / `*out_len` (release with
/// [`pocketlm_tokens_free`]). `add_special_tokens`: add BOS/EOS as the model's tokenizer
/// defines (as transformers' `encode`).
///
/// Errors: `NULL_ARGUMENT`, `INVALID_UTF8`, `TOKENIZER`.
///
/// Safety: `model` a live handle; `text` NUL-terminated; out-pointers writable.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_tokenize(
    model: *const PocketlmModel,
    text: *const c_char,
    add_special_tokens: bool,
    out_ids: *mut *mut u32,
    out_len: *mut usize,
) -> PocketlmStatus {
    boundary(|| {
        let m = ref_arg(model, "model")?;
        let text = str_arg(text, "text")?;
        out_arg(out_ids, "out_ids")?;
        out_arg(out_len, "out_len")?;
        let ids = m
            .inner
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(pocketlm::Error::from)?
            .into_boxed_slice();
        *out_len = ids.len();
        *out_ids = Box::into_raw(ids).cast();
        Ok(())
    })
}

/// Decodes `len` token ids into `*out_text` (NUL-terminated UTF-8; release with
/// [`pocketlm_string_free`]). `skip_special_tokens`: leave out special tokens such as
/// `<|im_end|>`. `ids` may be NULL when `len` is 0.
///
/// Errors: `NULL_ARGUMENT`, `TOKENIZER` (an id outside the vocabulary).
///
/// Safety: `model` a live handle; `ids` points to `len` ids; `out_text` writable.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_detokenize(
    model: *const PocketlmModel,
    ids: *const u32,
    len: usize,
    skip_special_tokens: bool,
    out_text: *mut *mut c_char,
) -> PocketlmStatus {
    boundary(|| {
        let m = ref_arg(model, "model")?;
        out_arg(out_text, "out_text")?;
        let ids: &[u32] = if len == 0 {
            &[]
        } else {
            std::slice::from_raw_parts(ref_arg(ids, "ids")?, len)
        };
        let text = m
            .inner
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(pocketlm::Error::from)?;
        *out_text = c_string(text);
        Ok(())
    })
}

/// Fills `*out_params` with the model's defaults (`LoadedModel::default_sampling`: the
/// folder's `generation_config.json`, else temperature 0.8, top-k 40, top-p 0.95, min-p 0.05,
/// repetition penalty 1.1 over 64 tokens), `max_tokens` 256, no seed, no stop strings, the
/// chat template on, no system message.
///
/// Errors: `NULL_ARGUMENT`.
///
/// Safety: `model` a live handle; `out_params` writable.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_generate_params_default(
    model: *const PocketlmModel,
    out_params: *mut PocketlmGenerateParams,
) -> PocketlmStatus {
    boundary(|| {
        let m = ref_arg(model, "model")?;
        out_arg(out_params, "out_params")?;
        *out_params = default_params(&m.inner);
        Ok(())
    })
}

fn default_params(m: &LoadedModel) -> PocketlmGenerateParams {
    let s = m.default_sampling();
    PocketlmGenerateParams {
        max_tokens: GenerateParams::default().max_tokens as u32,
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k as u32,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        repetition_context_size: s.repetition_context_size as u32,
        seed: s.seed.unwrap_or(0),
        use_seed: s.seed.is_some(),
        stop: std::ptr::null(),
        n_stop: 0,
        raw_prompt: false,
        system: std::ptr::null(),
    }
}

/// The library's parameters for `p`, and its system message.
unsafe fn generate_params(
    p: &PocketlmGenerateParams,
) -> Result<(GenerateParams, Option<String>), Failure> {
    let stop = if p.n_stop == 0 {
        Vec::new()
    } else {
        let ptrs = std::slice::from_raw_parts(ref_arg(p.stop, "params.stop")?, p.n_stop);
        ptrs.iter()
            .enumerate()
            .map(|(i, &s)| str_arg(s, &format!("params.stop[{i}]")).map(str::to_string))
            .collect::<Result<_, _>>()?
    };
    let params = GenerateParams {
        max_tokens: p.max_tokens as usize,
        sampling: SamplingParams {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k as usize,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            repetition_context_size: p.repetition_context_size as usize,
            seed: p.use_seed.then_some(p.seed),
            ..SamplingParams::default()
        },
        stop,
        ..Default::default()
    };
    let system = opt_str_arg(p.system, "params.system")?.map(str::to_string);
    Ok((params, system))
}

/// Feeds a generation's events to the callback; collects the text and the stats.
unsafe fn drive(
    events: impl Iterator<Item = pocketlm::Result<Event>>,
    callback: PocketlmTextCallback,
    user_data: *mut c_void,
    text: &mut String,
) -> Result<PocketlmGenerateStats, Failure> {
    let mut generated = 0u64;
    for ev in events {
        let piece = match ev? {
            Event::Token { text, .. } => {
                generated += 1;
                text
            }
            Event::Text(t) => t,
            Event::Finished { reason, stats } => return Ok(stats_of(reason, &stats)),
        };
        if piece.is_empty() {
            continue;
        }
        text.push_str(&piece);
        if let Some(cb) = callback {
            let mut bytes = piece.into_bytes();
            let len = bytes.len();
            bytes.push(0);
            if cb(bytes.as_ptr().cast(), len, user_data) != 0 {
                return Ok(PocketlmGenerateStats {
                    finish_reason: PocketlmFinishReason::Cancelled,
                    prompt_tokens: 0,
                    generated_tokens: generated,
                    prefill_seconds: 0.0,
                    decode_seconds: 0.0,
                    prefill_tokens_per_second: 0.0,
                    decode_tokens_per_second: 0.0,
                });
            }
        }
    }
    Err(Failure::new(
        PocketlmStatus::Panic,
        "internal error: the generation ended without a finish event",
    ))
}

fn stats_of(reason: FinishReason, s: &GenerationStats) -> PocketlmGenerateStats {
    PocketlmGenerateStats {
        finish_reason: match reason {
            FinishReason::Eos => PocketlmFinishReason::Eos,
            FinishReason::Stop(_) => PocketlmFinishReason::Stop,
            FinishReason::MaxTokens => PocketlmFinishReason::MaxTokens,
            FinishReason::ContextFull => PocketlmFinishReason::ContextFull,
        },
        prompt_tokens: s.prompt_tokens as u64,
        generated_tokens: s.generated_tokens as u64,
        prefill_seconds: s.prefill_time.as_secs_f64(),
        decode_seconds: s.decode_time.as_secs_f64(),
        prefill_tokens_per_second: s.prefill_tokens_per_second(),
        decode_tokens_per_second: s.decode_tokens_per_second(),
    }
}

/// Generates an answer to `prompt` (`pocketlm::generate::generate` with a fresh KV cache),
/// calling `callback` (may be NULL) with each piece of text as it becomes final.
///
/// The prompt is a user message rendered with the model's chat template (after
/// `params->system` when set), or plain text with `params->raw_prompt` or for a model without
/// a template: the CLI's `generate` with the same settings gives the same text.
/// `params`: NULL for [`pocketlm_generate_params_default`]. `out_stats` (may be NULL): how
/// it ended. `out_text` (may be NULL): the whole text (release with [`pocketlm_string_free`]).
///
/// Errors: `NULL_ARGUMENT`, `INVALID_UTF8`, `INVALID_ARGUMENT` (sampling values out of range,
/// an empty prompt), `CONTEXT_OVERFLOW`, `TEMPLATE`, `TOKENIZER`, `BACKEND`. A cancel by the
/// callback is success, with `finish_reason` `CANCELLED`.
///
/// Safety: `model` a live handle; strings NUL-terminated; `params->stop` holds `n_stop`
/// strings; `out_*` writable or NULL.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_generate(
    model: *const PocketlmModel,
    prompt: *const c_char,
    params: *const PocketlmGenerateParams,
    callback: PocketlmTextCallback,
    user_data: *mut c_void,
    out_stats: *mut PocketlmGenerateStats,
    out_text: *mut *mut c_char,
) -> PocketlmStatus {
    boundary(|| {
        let m = &ref_arg(model, "model")?.inner;
        let prompt = str_arg(prompt, "prompt")?;
        let p = match params.as_ref() {
            Some(p) => *p,
            None => default_params(m),
        };
        let (params, system) = generate_params(&p)?;
        let prompt = if p.raw_prompt || m.chat_template.is_none() {
            Prompt::Text(prompt.to_string())
        } else {
            Prompt::Chat(
                system
                    .map(Message::system)
                    .into_iter()
                    .chain([Message::user(prompt)])
                    .collect(),
            )
        };
        let ids = m.encode(&prompt)?;
        let mut cache = m.model.new_cache();
        let events = generate::generate(m.model.as_ref(), &m.tokenizer, &mut cache, &ids, params)?;
        let mut text = String::new();
        let stats = drive(events, callback, user_data, &mut text)?;
        if !out_stats.is_null() {
            *out_stats = stats;
        }
        if !out_text.is_null() {
            *out_text = c_string(text);
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Chat sessions.

/// Starts a chat session on `model` (`pocketlm::session::ChatSession`): `params->system` (may
/// be NULL) starts every turn; the other fields apply to every reply (`raw_prompt` is
/// ignored). `params`: NULL for [`pocketlm_generate_params_default`]. On success `*out_chat`
/// is a new handle, which keeps the model alive.
///
/// Errors: `NULL_ARGUMENT`, `INVALID_UTF8`, `MODEL` (the model has no chat template).
///
/// Safety: `model` a live handle; `params` valid or NULL; `out_chat` writable.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_chat_new(
    model: *const PocketlmModel,
    params: *const PocketlmGenerateParams,
    out_chat: *mut *mut PocketlmChat,
) -> PocketlmStatus {
    boundary(|| {
        let m = &ref_arg(model, "model")?.inner;
        out_arg(out_chat, "out_chat")?;
        let p = match params.as_ref() {
            Some(p) => *p,
            None => default_params(m),
        };
        let (params, system) = generate_params(&p)?;
        let session = ChatSession::new(
            m.clone(),
            SessionOptions {
                system,
                params,
                ..Default::default()
            },
        )?;
        *out_chat = Box::into_raw(Box::new(PocketlmChat { session }));
        Ok(())
    })
}

/// Sends a user message and generates the reply (`ChatSession::respond_stream`), calling
/// `callback` (may be NULL) with each piece. The reply joins the history, also when cancelled
/// (the part produced so far). Only the new part of the conversation is prefilled: the KV
/// cache is kept between turns. `out_stats`, `out_reply`: as in [`pocketlm_generate`].
///
/// Errors: `NULL_ARGUMENT`, `INVALID_UTF8`, `CONTEXT_OVERFLOW` (the conversation no longer
/// fits; [`pocketlm_chat_reset`] starts over), `TEMPLATE`, `BACKEND`. On error the history is
/// unchanged.
///
/// Safety: `chat` a live handle used by no other thread now; `text` NUL-terminated; `out_*`
/// writable or NULL.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_chat_send(
    chat: *mut PocketlmChat,
    text: *const c_char,
    callback: PocketlmTextCallback,
    user_data: *mut c_void,
    out_stats: *mut PocketlmGenerateStats,
    out_reply: *mut *mut c_char,
) -> PocketlmStatus {
    boundary(|| {
        let chat = chat
            .as_mut()
            .ok_or_else(|| Failure::new(PocketlmStatus::NullArgument, "`chat` is NULL"))?;
        let text = str_arg(text, "text")?;
        let events = chat.session.respond_stream(text)?;
        let mut reply = String::new();
        let stats = drive(events, callback, user_data, &mut reply)?;
        if !out_stats.is_null() {
            *out_stats = stats;
        }
        if !out_reply.is_null() {
            *out_reply = c_string(reply);
        }
        Ok(())
    })
}

/// Forgets the conversation and the KV cache (the system message stays).
///
/// Errors: `NULL_ARGUMENT`.
///
/// Safety: `chat` a live handle used by no other thread now.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_chat_reset(chat: *mut PocketlmChat) -> PocketlmStatus {
    boundary(|| {
        let chat = chat
            .as_mut()
            .ok_or_else(|| Failure::new(PocketlmStatus::NullArgument, "`chat` is NULL"))?;
        chat.session.reset();
        Ok(())
    })
}

/// Number of messages in the conversation (user and assistant, without the system message).
/// 0 for NULL.
///
/// Safety: `chat` a live handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_chat_message_count(chat: *const PocketlmChat) -> usize {
    catch_unwind(AssertUnwindSafe(|| {
        chat.as_ref().map_or(0, |c| c.session.history().len())
    }))
    .unwrap_or(0)
}

/// Releases a chat session. NULL is ignored.
///
/// Safety: `chat` from [`pocketlm_chat_new`], not used afterwards, not freed twice.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_chat_free(chat: *mut PocketlmChat) {
    if !chat.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(chat))));
    }
}

// ---------------------------------------------------------------------------------------------
// Embeddings.

/// [`PocketlmEmbedParams::normalize`]: follow the model (all-MiniLM-L6-v2 and Qwen3-Embedding
/// normalize; a folder without a `Normalize` module does not).
pub const POCKETLM_NORMALIZE_DEFAULT: i32 = 0;
/// [`PocketlmEmbedParams::normalize`]: L2-normalize every embedding (unit length).
pub const POCKETLM_NORMALIZE_ON: i32 = 1;
/// [`PocketlmEmbedParams::normalize`]: leave the pooled vectors as they are.
pub const POCKETLM_NORMALIZE_OFF: i32 = 2;

/// A loaded sentence-embedding model (`pocketlm::embed::EmbeddingModel`: encoder, tokenizer,
/// pooling, normalization). Thread-safe: several threads may embed with one handle at once.
pub struct PocketlmEmbeddingModel {
    inner: pocketlm::embed::EmbeddingModel,
}

/// How to load an embedding model. Zero-initialised (`PocketlmEmbeddingLoadOptions o = {0};`)
/// or NULL means the defaults: device "auto", the folder's longest input.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PocketlmEmbeddingLoadOptions {
    /// "auto", "cpu", "cuda", "cuda:N" or "metal"; NULL is "auto".
    pub device: *const c_char,
    /// Longest input in tokens (1 to the model's positions); 0 is the folder's
    /// (`max_seq_length`, 256 for all-MiniLM-L6-v2).
    pub max_tokens: u32,
}

/// How to embed. Zero-initialised (`PocketlmEmbedParams p = {0};`) or NULL means the
/// defaults: the model's normalization, its full dimension, batches of 32, long inputs
/// truncated.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PocketlmEmbedParams {
    /// [`POCKETLM_NORMALIZE_DEFAULT`] (0), [`POCKETLM_NORMALIZE_ON`] or
    /// [`POCKETLM_NORMALIZE_OFF`].
    pub normalize: i32,
    /// Values per embedding: 0 is the model's dimension ([`pocketlm_embedding_dimension`]);
    /// a smaller value only for models trained for it (Matryoshka: Qwen3-Embedding), which
    /// keep the first `dimensions` values and normalize again.
    pub dimensions: u32,
    /// Texts per forward pass; 0 is 32. Results do not depend on it beyond float rounding.
    pub batch_size: u32,
    /// Refuse (`INVALID_ARGUMENT`) a text longer than the model's longest input instead of
    /// truncating it (the default, as sentence-transformers does).
    pub no_truncate: bool,
}

/// Loads a sentence-embedding model (`pocketlm::embed::EmbeddingModel::load`).
///
/// `model`: a sentence-transformers / Hugging Face folder (BERT or Qwen3-Embedding:
/// `config.json`, `model.safetensors`, `tokenizer.json`, optionally `modules.json` and
/// `1_Pooling/config.json`), a hub id `org/name[@revision]`, or the name `all-minilm-l6-v2`;
/// NULL is `all-minilm-l6-v2` (sentence-transformers/all-MiniLM-L6-v2, 384 dimensions),
/// downloaded into `$POCKETLM_HOME` (default `~/.cache/pocketlm`) on first use as the CLI's
/// `embed` does. `options`: NULL for the defaults. On success `*out_model` is a new handle,
/// released with [`pocketlm_embedding_model_free`].
///
/// Errors: `NOT_FOUND` (no such path, and not a hub id), `MODEL` (a missing or malformed file,
/// an unsupported architecture or sentence-transformers module), `FETCH`, `INVALID_ARGUMENT`
/// (unknown device, `max_tokens` above the model's positions), `NULL_ARGUMENT` (`out_model`),
/// `INVALID_UTF8`.
///
/// Safety: string arguments NUL-terminated or NULL; `options` valid or NULL; `out_model`
/// writable.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_embedding_model_load(
    model: *const c_char,
    options: *const PocketlmEmbeddingLoadOptions,
    out_model: *mut *mut PocketlmEmbeddingModel,
) -> PocketlmStatus {
    boundary(|| {
        out_arg(out_model, "out_model")?;
        let spec = opt_str_arg(model, "model")?.unwrap_or("all-minilm-l6-v2");
        let mut opts = pocketlm::embed::LoadEmbeddingOptions::default();
        if let Some(o) = options.as_ref() {
            if let Some(d) = opt_str_arg(o.device, "options.device")? {
                opts.device = d.parse::<DeviceSpec>().map_err(|e| {
                    Failure::new(
                        PocketlmStatus::InvalidArgument,
                        format!("`options.device`: {e}"),
                    )
                })?;
            }
            opts.max_tokens = (o.max_tokens != 0).then_some(o.max_tokens as usize);
        }
        let inner = pocketlm::embed::EmbeddingModel::load(spec, &opts)?;
        *out_model = Box::into_raw(Box::new(PocketlmEmbeddingModel { inner }));
        Ok(())
    })
}

/// Releases an embedding model handle. NULL is ignored.
///
/// Safety: `model` from [`pocketlm_embedding_model_load`], not used afterwards (by any
/// thread), not freed twice.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_embedding_model_free(model: *mut PocketlmEmbeddingModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(model))));
    }
}

/// Length of the model's embeddings (floats per text with the default
/// `PocketlmEmbedParams::dimensions`): 384 for all-MiniLM-L6-v2. 0 for NULL.
///
/// Safety: `model` a live handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_embedding_dimension(
    model: *const PocketlmEmbeddingModel,
) -> usize {
    catch_unwind(AssertUnwindSafe(|| {
        model.as_ref().map_or(0, |m| m.inner.dimension())
    }))
    .unwrap_or(0)
}

/// Embeds `n_texts` texts (`pocketlm::embed::EmbeddingModel::embed`): row `i` of `out`,
/// `out[i * d .. (i + 1) * d]`, is the embedding of `texts[i]` (f32), where `d` is
/// `params->dimensions` or, when that is 0, [`pocketlm_embedding_dimension`]. `out_len` is the
/// number of floats `out` holds: at least `n_texts * d`; only those are written.
/// `params`: NULL for the defaults. `n_texts` 0 writes nothing (`texts` and `out` may then be
/// NULL).
///
/// Errors: `NULL_ARGUMENT` (`model`, `texts`, `texts[i]`, `out`), `INVALID_UTF8` (`texts[i]`),
/// `INVALID_ARGUMENT` (`out_len` too small, naming both numbers; `params.dimensions` the model
/// does not support; `params.normalize` not one of the `POCKETLM_NORMALIZE_*` values; a text
/// too long with `params.no_truncate`), `TOKENIZER`/`MODEL`, `BACKEND`. On error `out` is left
/// untouched.
///
/// Safety: `model` a live handle; `texts` points to `n_texts` NUL-terminated strings; `out`
/// points to `out_len` writable floats; `params` valid or NULL.
#[no_mangle]
pub unsafe extern "C" fn pocketlm_embed(
    model: *const PocketlmEmbeddingModel,
    texts: *const *const c_char,
    n_texts: usize,
    params: *const PocketlmEmbedParams,
    out: *mut f32,
    out_len: usize,
) -> PocketlmStatus {
    boundary(|| {
        let m = &ref_arg(model, "model")?.inner;
        let p = params.as_ref().copied().unwrap_or(PocketlmEmbedParams {
            normalize: POCKETLM_NORMALIZE_DEFAULT,
            dimensions: 0,
            batch_size: 0,
            no_truncate: false,
        });
        let normalize = match p.normalize {
            POCKETLM_NORMALIZE_DEFAULT => None,
            POCKETLM_NORMALIZE_ON => Some(true),
            POCKETLM_NORMALIZE_OFF => Some(false),
            other => {
                return Err(Failure::new(
                    PocketlmStatus::InvalidArgument,
                    format!(
                        "`params.normalize` is {other}: POCKETLM_NORMALIZE_DEFAULT (0), \
                         POCKETLM_NORMALIZE_ON (1) or POCKETLM_NORMALIZE_OFF (2)"
                    ),
                ))
            }
        };
        let dimensions = (p.dimensions != 0).then_some(p.dimensions as usize);
        m.check_dimensions(dimensions).map_err(|e| {
            let why = match e {
                pocketlm::Error::InvalidArgument(why) => why,
                e => e.to_string(),
            };
            Failure::new(
                PocketlmStatus::InvalidArgument,
                format!("`params.dimensions`: {why}"),
            )
        })?;
        if n_texts == 0 {
            return Ok(());
        }
        let ptrs = std::slice::from_raw_parts(ref_arg(texts, "texts")?, n_texts);
        let texts: Vec<&str> = ptrs
            .iter()
            .enumerate()
            .map(|(i, &t)| str_arg(t, &format!("texts[{i}]")))
            .collect::<Result<_, _>>()?;
        out_arg(out, "out")?;
        let d = dimensions.unwrap_or_else(|| m.dimension());
        let needed = n_texts.checked_mul(d).ok_or_else(|| {
            Failure::new(PocketlmStatus::InvalidArgument, "`n_texts` is too large")
        })?;
        if out_len < needed {
            return Err(Failure::new(
                PocketlmStatus::InvalidArgument,
                format!(
                    "`out_len` is {out_len}, but {n_texts} text(s) of {d} dimensions need \
                     {needed} floats"
                ),
            ));
        }
        let opts = pocketlm::embed::EmbedOptions {
            dimensions,
            truncate: !p.no_truncate,
            batch_size: if p.batch_size == 0 {
                pocketlm::embed::EmbedOptions::default().batch_size
            } else {
                p.batch_size as usize
            },
            normalize,
        };
        let vectors = m.embed(&texts, &opts)?;
        if vectors.len() != n_texts || vectors.iter().any(|v| v.len() != d) {
            return Err(Failure::new(
                PocketlmStatus::Panic,
                format!("internal error: the embeddings are not {n_texts} x {d} values"),
            ));
        }
        let out = std::slice::from_raw_parts_mut(out, needed);
        for (row, v) in out.chunks_exact_mut(d).zip(&vectors) {
            row.copy_from_slice(v);
        }
        Ok(())
    })
}
