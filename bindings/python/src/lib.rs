//! The `pocketlm` Python module: pocketlm's library with mlx-lm's API shape.
//!
//! ```python
//! import pocketlm
//! model, tokenizer = pocketlm.load()            # the default model; or a path / hub id
//! prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
//! text = pocketlm.generate(model, tokenizer, prompt, max_tokens=64, temp=0.0)
//! for r in pocketlm.stream_generate(model, tokenizer, prompt, max_tokens=64):
//!     print(r.text, end="", flush=True)
//! ```
//!
//! A thin layer: each function converts its Python arguments to the library's types and calls
//! the library's public API (`loader::load`, `generate::generate`, `session::ChatSession`,
//! `convert::convert`, `lora::Adapter`, `embed::EmbeddingModel`); library errors become Python
//! exceptions ([`PocketLMError`] and its subclasses). The GIL is released while the model runs
//! (`Python::detach`), so other Python threads go on, and several threads may generate with
//! one model at once. Streams run the generation on a worker thread that hands events over a
//! rendezvous channel; dropping the iterator stops the generation.
//!
//! Sentence embeddings (`pocketlm::embed`):
//!
//! ```python
//! embedder = pocketlm.load_embedding()          # all-MiniLM-L6-v2; or a folder / hub id
//! vectors = embedder.embed(["A man is eating food.", "A man rides a horse."])  # 2 x 384
//! ```

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex, RwLock};

use pocketlm::chat_template::Message;
use pocketlm::convert::{parse_dtype, ConvertOptions, QuantOverride, QuantRecipe};
use pocketlm::device::DeviceSpec;
use pocketlm::generate::{
    self as lib_generate, Event, FinishReason, GenerateParams, GenerationStats,
};
use pocketlm::loader::{self, LoadOptions, LoadedModel, Prompt};
use pocketlm::safetensors_weights::QuantParams;
use pocketlm::sampling::SamplingOverrides;
use pocketlm::session::{ChatSession as LibChatSession, SessionOptions};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyTuple, PyType};

// ---------------------------------------------------------------------------------------------
// Errors.

create_exception!(
    pocketlm,
    PocketLMError,
    PyException,
    "Base class of the errors pocketlm raises (the library's errors, one line, naming the file, \
     tensor or field)."
);

/// `NotFoundError(PocketLMError, FileNotFoundError)`: a model, adapter or other file that
/// does not exist.
static NOT_FOUND_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
/// `InvalidArgumentError(PocketLMError, ValueError)`: bad values (sampling settings, an empty
/// prompt, a prompt longer than the context, a token id outside the vocabulary).
static INVALID_ARGUMENT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A class deriving from `PocketLMError` and a builtin exception (made with `type()`, as a
/// Python `class` statement would).
fn two_base_exception<'py>(
    py: Python<'py>,
    name: &str,
    builtin: Bound<'py, PyType>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    let bases = PyTuple::new(py, [py.get_type::<PocketLMError>(), builtin])?;
    let ns = PyDict::new(py);
    ns.set_item("__module__", "pocketlm")?;
    ns.set_item("__doc__", doc)?;
    let cls = py
        .get_type::<PyType>()
        .call1((name, bases, ns))?
        .cast_into::<PyType>()?;
    Ok(cls.unbind())
}

/// A library error on its way to Python.
struct LibError(pocketlm::Error);

impl From<pocketlm::Error> for LibError {
    fn from(e: pocketlm::Error) -> Self {
        Self(e)
    }
}

impl From<LibError> for PyErr {
    fn from(LibError(e): LibError) -> PyErr {
        use pocketlm::Error as E;
        let msg = e.to_string();
        let slot = match &e {
            E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Some(&NOT_FOUND_ERROR)
            }
            E::InvalidArgument(_) | E::ContextOverflow { .. } | E::Image(_) => {
                Some(&INVALID_ARGUMENT_ERROR)
            }
            _ => None,
        };
        Python::attach(|py| match slot.and_then(|s| s.get(py)) {
            Some(ty) => PyErr::from_type(ty.bind(py).clone(), msg),
            None => PocketLMError::new_err(msg),
        })
    }
}

type LibResult<T> = Result<T, LibError>;

fn invalid_argument(msg: impl Into<String>) -> PyErr {
    LibError(pocketlm::Error::InvalidArgument(msg.into())).into()
}

// ---------------------------------------------------------------------------------------------
// Models and tokenizers.

/// A loaded model, shared by its `Model` and `Tokenizer` objects. The inner `Arc` is what
/// generations and chat sessions hold; `load_adapter` needs it unshared.
type Slot = Arc<RwLock<Arc<LoadedModel>>>;

fn current(slot: &Slot) -> Arc<LoadedModel> {
    slot.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A loaded model (`pocketlm::loader::LoadedModel`): the network with its tokenizer and chat
/// template. Made by `pocketlm.load`; safe to share between threads.
#[pyclass(frozen, module = "pocketlm")]
struct Model {
    slot: Slot,
}

#[pymethods]
impl Model {
    /// Where the model was loaded from.
    #[getter]
    fn path(&self) -> PathBuf {
        current(&self.slot).path.clone()
    }

    /// The architecture (`llama`, `qwen2`, ...).
    #[getter]
    fn architecture(&self) -> String {
        current(&self.slot).model.info().architecture.clone()
    }

    /// Tokens the model can attend to.
    #[getter]
    fn context_length(&self) -> usize {
        current(&self.slot).model.info().context_length
    }

    /// Rows of the output layer.
    #[getter]
    fn vocab_size(&self) -> usize {
        current(&self.slot).model.info().vocab_size
    }

    /// Loads a LoRA adapter folder in mlx-lm's format (`adapter_config.json`,
    /// `adapters.safetensors`) into the model, replacing any adapter already loaded
    /// (`pocketlm::lora::Adapter::apply`). Returns the number of layers adapted.
    ///
    /// Raises `NotFoundError` for a missing folder or file, `PocketLMError` for an adapter that
    /// does not fit the model, or while a `ChatSession` or a running generation uses the model
    /// (delete them first).
    fn load_adapter(&self, py: Python<'_>, path: PathBuf) -> PyResult<usize> {
        let adapter = py
            .detach(|| pocketlm::lora::Adapter::load(&path))
            .map_err(LibError)?;
        let mut guard = self.slot.write().unwrap_or_else(|p| p.into_inner());
        let m = exclusive(&mut guard)?;
        Ok(py
            .detach(|| adapter.apply(m.model.as_mut()))
            .map_err(LibError)?)
    }

    /// Removes the LoRA adapter, restoring the base layers (`pocketlm::lora::unload`).
    /// Returns the number of layers restored (0 when none was loaded).
    ///
    /// Raises `PocketLMError` while a `ChatSession` or a running generation uses the model.
    fn unload_adapter(&self) -> PyResult<usize> {
        let mut guard = self.slot.write().unwrap_or_else(|p| p.into_inner());
        let m = exclusive(&mut guard)?;
        Ok(pocketlm::lora::unload(m.model.as_mut()))
    }

    fn __repr__(&self) -> String {
        let m = current(&self.slot);
        format!(
            "<pocketlm.Model {} ({}) from {}>",
            m.model.info().architecture,
            pocketlm::device::device_name(m.model.device()),
            m.path.display()
        )
    }
}

/// The model behind `guard` for changing, when nothing else holds it.
fn exclusive(guard: &mut Arc<LoadedModel>) -> PyResult<&mut LoadedModel> {
    let users = Arc::strong_count(guard) - 1;
    Arc::get_mut(guard).ok_or_else(|| {
        PocketLMError::new_err(format!(
            "the model is in use by {users} chat session(s) or running generation(s): delete \
             them (or finish their streams) before changing its adapter"
        ))
    })
}

/// The model's tokenizer and chat template, as transformers' tokenizers name their methods.
#[pyclass(frozen, module = "pocketlm")]
struct Tokenizer {
    slot: Slot,
}

/// `[{"role": ..., "content": ...}, ...]` as the library's messages.
fn messages_of(messages: &Bound<'_, PyList>) -> PyResult<Vec<Message>> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |k: &str| -> PyResult<String> {
                m.get_item(k)
                    .map_err(|_| invalid_argument(format!("messages[{i}] has no `{k}`")))?
                    .extract::<String>()
                    .map_err(|_| invalid_argument(format!("messages[{i}].{k} is not a string")))
            };
            Ok(Message::new(field("role")?, field("content")?))
        })
        .collect()
}

#[pymethods]
impl Tokenizer {
    /// Token ids of `text`; `add_special_tokens` adds BOS/EOS as the model defines.
    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let m = current(&self.slot);
        let text = text.to_string();
        Ok(py
            .detach(|| m.tokenizer.encode(&text, add_special_tokens))
            .map_err(|e| LibError(e.into()))?)
    }

    /// The text of `ids`; `skip_special_tokens` leaves out tokens such as `<|im_end|>`.
    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        Ok(current(&self.slot)
            .tokenizer
            .decode(&ids, skip_special_tokens)
            .map_err(|e| LibError(e.into()))?)
    }

    /// Renders `messages` (dicts with `role` and `content` strings) with the model's chat
    /// template, as transformers' `apply_chat_template`: token ids (without a second BOS), or
    /// the text with `tokenize=False`. `add_generation_prompt` ends it with the header of an
    /// assistant turn.
    ///
    /// Raises `PocketLMError` when the model has no chat template or the template fails,
    /// `InvalidArgumentError` for a message without `role` or `content`.
    #[pyo3(signature = (messages, add_generation_prompt = true, tokenize = true))]
    fn apply_chat_template<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyList>,
        add_generation_prompt: bool,
        tokenize: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let messages = messages_of(messages)?;
        let m = current(&self.slot);
        let template = m.chat_template.as_ref().ok_or_else(|| {
            PocketLMError::new_err(format!(
                "{}: the model has no chat template",
                m.path.display()
            ))
        })?;
        let text = template
            .render(&messages, add_generation_prompt)
            .map_err(|e| LibError(e.into()))?;
        if !tokenize {
            return Ok(pyo3::types::PyString::new(py, &text).into_any());
        }
        let ids = m
            .tokenizer
            .encode(&text, false)
            .map_err(|e| LibError(e.into()))?;
        ids.into_pyobject(py).map(|l| l.into_any())
    }

    /// Tokens in the vocabulary.
    #[getter]
    fn vocab_size(&self) -> usize {
        current(&self.slot).tokenizer.vocab_size()
    }

    /// The beginning-of-sequence token id, if any.
    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        current(&self.slot).tokenizer.bos_token_id()
    }

    /// The end-of-sequence token id, if any.
    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        current(&self.slot).tokenizer.eos_token_id()
    }

    /// All ids that end generation (EOS, `<|im_end|>`, ... and `generation_config.json`'s).
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        current(&self.slot)
            .tokenizer
            .eog_token_ids()
            .iter()
            .copied()
            .collect()
    }

    /// The chat template's Jinja source, or None.
    #[getter]
    fn chat_template(&self) -> Option<String> {
        current(&self.slot)
            .chat_template
            .as_ref()
            .map(|t| t.source().to_string())
    }
}

/// Loads a model: `(model, tokenizer)`, as mlx-lm's `load`.
///
/// `path_or_hf_repo`: a `.gguf` file, a Hugging Face / MLX model folder or a hub id
/// `org/name[@revision]` (downloaded into the Hugging Face cache); None loads the default
/// model (SmolLM2-135M-Instruct Q4_1, downloaded into `$POCKETLM_HOME`, default
/// `~/.cache/pocketlm`, on first use, as the CLI does). `adapter_path`: a LoRA adapter folder
/// to load on top. `device`: "auto", "cpu", "cuda", "cuda:N" or "metal".
#[pyfunction]
#[pyo3(signature = (path_or_hf_repo = None, adapter_path = None, *, device = "auto", exact_mlx_matmul = false, no_repack = false))]
fn load(
    py: Python<'_>,
    path_or_hf_repo: Option<PathBuf>,
    adapter_path: Option<PathBuf>,
    device: &str,
    exact_mlx_matmul: bool,
    no_repack: bool,
) -> PyResult<(Model, Tokenizer)> {
    let device: DeviceSpec = device.parse().map_err(LibError)?;
    let m = py.detach(|| -> LibResult<LoadedModel> {
        let path = match path_or_hf_repo {
            Some(p) => loader::resolve_model(p)?,
            None => default_model()?,
        };
        let opts = LoadOptions {
            device,
            exact_mlx_matmul,
            no_repack,
            ..Default::default()
        };
        let mut m = loader::load(&path, &opts)?;
        if let Some(dir) = adapter_path {
            pocketlm::lora::Adapter::load(&dir)?.apply(m.model.as_mut())?;
        }
        Ok(m)
    })?;
    let slot: Slot = Arc::new(RwLock::new(Arc::new(m)));
    Ok((Model { slot: slot.clone() }, Tokenizer { slot }))
}

/// The default model's path, downloaded first when it is not cached (a line on stderr says
/// so, as the CLI's does).
fn default_model() -> pocketlm::Result<PathBuf> {
    let dest = pocketlm::fetch::default_model_path();
    if !matches!(
        pocketlm::fetch::cached_member(&dest, &pocketlm::fetch::DEFAULT_MODEL),
        Ok(pocketlm::fetch::CachedFile::Intact)
    ) {
        eprintln!(
            "pocketlm: downloading the default model (SmolLM2-135M-Instruct, GGUF Q4_1, 98 MB) \
             into {}",
            dest.display()
        );
    }
    Ok(pocketlm::fetch::ensure_default_model(&mut |_| {})?)
}

// ---------------------------------------------------------------------------------------------
// Generation.

/// The sampling and stopping settings a caller gave (mlx-lm's names), the others from the
/// model's defaults (`LoadedModel::default_sampling`, resolved by `SamplingOverrides`).
#[derive(Clone, Default)]
struct Settings {
    max_tokens: usize,
    overrides: SamplingOverrides,
    stop: Vec<String>,
}

impl Settings {
    /// The settings of `generate`, `stream_generate` and `ChatSession` (their keyword
    /// arguments, mlx-lm's names; `temp` is the library's `temperature`).
    #[allow(clippy::too_many_arguments)]
    fn new(
        max_tokens: usize,
        temp: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<usize>,
        min_p: Option<f32>,
        repetition_penalty: Option<f32>,
        repetition_context_size: Option<usize>,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
    ) -> Self {
        Self {
            max_tokens,
            overrides: SamplingOverrides {
                temperature: temp,
                top_p,
                top_k,
                min_p,
                repetition_penalty,
                repetition_context_size,
                seed,
                ..Default::default()
            },
            stop: stop.unwrap_or_default(),
        }
    }

    fn params(&self, m: &LoadedModel) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            sampling: self.overrides.resolve(&m.default_sampling()),
            stop: self.stop.clone(),
            ..Default::default()
        }
    }
}

/// A prompt as mlx-lm takes it: text (tokenized as is, BOS as the model defines) or token ids
/// (e.g. from `apply_chat_template`).
#[derive(FromPyObject)]
enum PromptArg {
    #[pyo3(transparent)]
    Text(String),
    #[pyo3(transparent)]
    Ids(Vec<u32>),
}

impl PromptArg {
    fn ids(&self, tokenizer: &LoadedModel) -> pocketlm::Result<Vec<u32>> {
        match self {
            PromptArg::Text(t) => tokenizer.encode(&Prompt::Text(t.clone())),
            PromptArg::Ids(ids) => Ok(ids.clone()),
        }
    }
}

/// One step of `stream_generate` / `ChatSession.stream`, as mlx-lm's `GenerationResponse`.
#[pyclass(frozen, get_all, skip_from_py_object, module = "pocketlm")]
#[derive(Clone)]
struct GenerationResponse {
    /// Text that became final with this step (may be empty).
    text: String,
    /// The token generated in this step; None on the last response when it carries no new
    /// token (only text held back until the end, or nothing).
    token: Option<u32>,
    /// None until the last response, then "stop" (end-of-generation token or stop string)
    /// or "length" (max_tokens reached or the context full).
    finish_reason: Option<String>,
    /// Prompt tokens prefilled (last response only; 0 before).
    prompt_tokens: usize,
    /// Prefill tokens per second (last response only).
    prompt_tps: f64,
    /// Tokens generated so far.
    generation_tokens: usize,
    /// Decode tokens per second (last response only).
    generation_tps: f64,
    /// Peak resident memory of the process in GB (last response only, Linux).
    peak_memory: f64,
}

#[pymethods]
impl GenerationResponse {
    fn __repr__(&self) -> PyResult<String> {
        Python::attach(|py| {
            let repr = |v: Bound<'_, PyAny>| v.repr().map(|r| r.to_string());
            Ok(format!(
                "GenerationResponse(text={}, token={}, finish_reason={})",
                repr(self.text.clone().into_pyobject(py)?.into_any())?,
                repr(self.token.into_pyobject(py)?.into_any())?,
                repr(self.finish_reason.clone().into_pyobject(py)?.into_any())?
            ))
        })
    }
}

impl GenerationResponse {
    fn step(text: String, token: Option<u32>, generated: usize) -> Self {
        Self {
            text,
            token,
            finish_reason: None,
            prompt_tokens: 0,
            prompt_tps: 0.0,
            generation_tokens: generated,
            generation_tps: 0.0,
            peak_memory: 0.0,
        }
    }

    fn last(text: String, reason: &FinishReason, stats: &GenerationStats) -> Self {
        Self {
            text,
            token: None,
            finish_reason: Some(reason.as_openai().to_string()),
            prompt_tokens: stats.prompt_tokens,
            prompt_tps: stats.prefill_tokens_per_second(),
            generation_tokens: stats.generated_tokens,
            generation_tps: stats.decode_tokens_per_second(),
            peak_memory: stats.peak_memory_bytes.unwrap_or(0) as f64 / 1e9,
        }
    }
}

/// Turns the library's events into responses: a token's event is one response; text held
/// back to the end joins the last response (`finish_reason` set).
#[derive(Default)]
struct Responses {
    pending: String,
    generated: usize,
}

impl Responses {
    /// The response `ev` completes, if any.
    fn push(&mut self, ev: Event) -> Option<GenerationResponse> {
        match ev {
            Event::Token { id, text, .. } => {
                self.generated += 1;
                Some(GenerationResponse::step(text, Some(id), self.generated))
            }
            Event::Text(t) => {
                self.pending.push_str(&t);
                None
            }
            Event::Finished { reason, stats } => Some(GenerationResponse::last(
                std::mem::take(&mut self.pending),
                &reason,
                &stats,
            )),
        }
    }
}

/// Checks for Ctrl-C (and other signals with Python handlers) between tokens; the raised
/// exception (KeyboardInterrupt) ends the generation.
fn check_signals() -> PyResult<()> {
    Python::attach(|py| py.check_signals())
}

/// Prints mlx-lm's `verbose` statistics.
fn print_stats(py: Python<'_>, r: &GenerationResponse) -> PyResult<()> {
    let print = py.import("builtins")?.getattr("print")?;
    print.call1((format!(
        "\n==========\nPrompt: {} tokens, {:.3} tokens-per-sec\nGeneration: {} tokens, {:.3} \
         tokens-per-sec\nPeak memory: {:.3} GB",
        r.prompt_tokens, r.prompt_tps, r.generation_tokens, r.generation_tps, r.peak_memory
    ),))?;
    Ok(())
}

/// The whole answer to `prompt`, as mlx-lm's `generate` (`pocketlm::generate::generate` with
/// a fresh KV cache; the GIL is released while it runs).
///
/// `prompt`: text, tokenized as is (apply `tokenizer.apply_chat_template` first for a chat
/// model), or token ids. Sampling settings left as None take the model's defaults
/// (`generation_config.json`, else temperature 0.8, top-k 40, top-p 0.95, min-p 0.05,
/// repetition penalty 1.1); `temp=0.0` is greedy decoding (the default repetition penalty is
/// dropped with it, as the CLI's `--temp 0`). `stop`: strings that end the answer (not part of
/// it). `verbose`: print the text as it comes, then the statistics.
///
/// Raises `InvalidArgumentError` (bad settings, an empty prompt, a prompt longer than the
/// context), `PocketLMError` for other library errors.
#[pyfunction]
#[pyo3(signature = (model, tokenizer, prompt, max_tokens = 256, *, temp = None, top_p = None, top_k = None, min_p = None, repetition_penalty = None, repetition_context_size = None, seed = None, stop = None, verbose = false))]
#[allow(clippy::too_many_arguments)]
fn generate(
    py: Python<'_>,
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: PromptArg,
    max_tokens: usize,
    temp: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    repetition_context_size: Option<usize>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    verbose: bool,
) -> PyResult<String> {
    let settings = Settings::new(
        max_tokens,
        temp,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        repetition_context_size,
        seed,
        stop,
    );
    let (m, t) = (current(&model.slot), current(&tokenizer.slot));
    let print = if verbose {
        let print = py.import("builtins")?.getattr("print")?;
        print.call1(("==========",))?;
        Some(print.unbind())
    } else {
        None
    };
    let last = py.detach(|| -> PyResult<GenerationResponse> {
        let ids = prompt.ids(&t).map_err(LibError)?;
        let mut cache = m.model.new_cache();
        let params = settings.params(&m);
        let events =
            lib_generate::generate(m.model.as_ref(), &t.tokenizer, &mut cache, &ids, params)
                .map_err(LibError)?;
        let mut text = String::new();
        let mut responses = Responses::default();
        for ev in events {
            let Some(r) = responses.push(ev.map_err(LibError)?) else {
                continue;
            };
            text.push_str(&r.text);
            if let Some(print) = &print {
                Python::attach(|py| {
                    let kwargs = PyDict::new(py);
                    kwargs.set_item("end", "")?;
                    kwargs.set_item("flush", true)?;
                    print.bind(py).call((&r.text,), Some(&kwargs)).map(drop)
                })?;
            }
            if r.finish_reason.is_some() {
                return Ok(GenerationResponse { text, ..r });
            }
            check_signals()?;
        }
        Err(PocketLMError::new_err(
            "the generation ended without a finish event",
        ))
    })?;
    if verbose {
        print_stats(py, &last)?;
    }
    Ok(last.text)
}

/// A running stream of `GenerationResponse`s. The generation runs on a worker thread, one
/// forward pass ahead of the consumer; deleting the iterator stops it.
#[pyclass(frozen, module = "pocketlm")]
struct GenerationStream {
    state: Mutex<StreamState>,
}

struct StreamState {
    rx: Receiver<pocketlm::Result<Event>>,
    responses: Responses,
    done: bool,
    /// The worker thread. After the finish event it still ends the generation (a chat
    /// session records the reply and unlocks), so the last `__next__` waits for it.
    worker: Option<std::thread::JoinHandle<()>>,
}

impl GenerationStream {
    /// Runs `produce` on a worker thread; it sends each event and stops when the receiver is
    /// gone.
    fn spawn(
        produce: impl FnOnce(&mut dyn FnMut(pocketlm::Result<Event>) -> bool) + Send + 'static,
    ) -> Self {
        let (tx, rx) = sync_channel(0);
        let worker = std::thread::spawn(move || produce(&mut |ev| tx.send(ev).is_ok()));
        Self {
            state: Mutex::new(StreamState {
                rx,
                responses: Responses::default(),
                done: false,
                worker: Some(worker),
            }),
        }
    }
}

#[pymethods]
impl GenerationStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<GenerationResponse>> {
        py.detach(|| {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if s.done {
                    return Ok(None);
                }
                let ev = match s.rx.recv() {
                    Ok(ev) => ev,
                    Err(_) => {
                        s.done = true;
                        return Err(PocketLMError::new_err(
                            "the generation stopped without a finish event",
                        ));
                    }
                };
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        s.done = true;
                        return Err(LibError(e).into());
                    }
                };
                if let Some(r) = s.responses.push(ev) {
                    s.done = r.finish_reason.is_some();
                    if s.done {
                        // Nothing follows the finish event; wait (at most 10 s) for the worker
                        // to end, so that the session is unlocked when the caller reads it.
                        if let Some(w) = s.worker.take() {
                            let t0 = std::time::Instant::now();
                            while !w.is_finished() && t0.elapsed().as_secs() < 10 {
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                        }
                    }
                    return Ok(Some(r));
                }
            }
        })
    }
}

/// Sends every event of `events` until the receiver is gone.
fn forward(
    events: impl Iterator<Item = pocketlm::Result<Event>>,
    send: &mut dyn FnMut(pocketlm::Result<Event>) -> bool,
) {
    for ev in events {
        if !send(ev) {
            return;
        }
    }
}

/// The answer to `prompt` as an iterator of `GenerationResponse` (`.text`, `.token`,
/// `.finish_reason`, statistics), as mlx-lm's `stream_generate`. Arguments as `generate`;
/// errors are raised by the iterator. The GIL is free while the model runs.
#[pyfunction]
#[pyo3(signature = (model, tokenizer, prompt, max_tokens = 256, *, temp = None, top_p = None, top_k = None, min_p = None, repetition_penalty = None, repetition_context_size = None, seed = None, stop = None))]
#[allow(clippy::too_many_arguments)]
fn stream_generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: PromptArg,
    max_tokens: usize,
    temp: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    repetition_context_size: Option<usize>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
) -> GenerationStream {
    let settings = Settings::new(
        max_tokens,
        temp,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        repetition_context_size,
        seed,
        stop,
    );
    let (m, t) = (current(&model.slot), current(&tokenizer.slot));
    GenerationStream::spawn(move |send| {
        let ids = match prompt.ids(&t) {
            Ok(ids) => ids,
            Err(e) => {
                send(Err(e));
                return;
            }
        };
        let mut cache = m.model.new_cache();
        match lib_generate::generate(
            m.model.as_ref(),
            &t.tokenizer,
            &mut cache,
            &ids,
            settings.params(&m),
        ) {
            Ok(events) => forward(events, send),
            Err(e) => {
                send(Err(e));
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Chat sessions.

/// A conversation that keeps its KV cache between turns (`pocketlm::session::ChatSession`,
/// MLX Swift's `ChatSession`): each turn prefills only what is new.
///
/// `ChatSession(model, system=None, max_tokens=256, *, temp=None, ...)`: sampling settings as
/// `generate`'s, for every reply. Raises `PocketLMError` when the model has no chat template.
#[pyclass(frozen, module = "pocketlm")]
struct ChatSession {
    session: Arc<Mutex<LibChatSession>>,
}

#[pymethods]
impl ChatSession {
    #[new]
    #[pyo3(signature = (model, system = None, max_tokens = 256, *, temp = None, top_p = None, top_k = None, min_p = None, repetition_penalty = None, repetition_context_size = None, seed = None, stop = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &Model,
        system: Option<String>,
        max_tokens: usize,
        temp: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<usize>,
        min_p: Option<f32>,
        repetition_penalty: Option<f32>,
        repetition_context_size: Option<usize>,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let m = current(&model.slot);
        let settings = Settings::new(
            max_tokens,
            temp,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            repetition_context_size,
            seed,
            stop,
        );
        let options = SessionOptions {
            system,
            params: settings.params(&m),
            ..Default::default()
        };
        let session = LibChatSession::new(m, options).map_err(LibError)?;
        Ok(Self {
            session: Arc::new(Mutex::new(session)),
        })
    }

    /// Answers `text` (a user message) and returns the reply, which joins the history. The
    /// GIL is free while the model runs.
    ///
    /// Raises `InvalidArgumentError` when the conversation no longer fits in the context
    /// (`reset()` starts over), `PocketLMError` while a `stream()` of this session is still
    /// open.
    fn send(&self, py: Python<'_>, text: &str) -> PyResult<String> {
        let session = self.session.clone();
        let text = text.to_string();
        py.detach(|| {
            let Ok(mut s) = session.try_lock() else {
                return Err(busy());
            };
            let out = s.respond(&text).map_err(LibError)?;
            Ok(out.text)
        })
    }

    /// Answers `text` as an iterator of `GenerationResponse`s (`ChatSession.respond_stream`).
    /// The reply joins the history when the stream ends or is deleted (the part produced so
    /// far).
    fn stream(&self, text: &str) -> PyResult<GenerationStream> {
        // Refuse now, not in the worker, while another stream holds the session.
        if self.session.try_lock().is_err() {
            return Err(busy());
        }
        let session = self.session.clone();
        let text = text.to_string();
        Ok(GenerationStream::spawn(move |send| {
            let mut s = session.lock().unwrap_or_else(|p| p.into_inner());
            match s.respond_stream(&text) {
                Ok(events) => forward(events, send),
                Err(e) => {
                    send(Err(e));
                }
            };
        }))
    }

    /// Forgets the conversation and the cache (the system message stays).
    fn reset(&self) -> PyResult<()> {
        match self.session.try_lock() {
            Ok(mut s) => {
                s.reset();
                Ok(())
            }
            Err(_) => Err(busy()),
        }
    }

    /// The conversation so far: `[{"role": ..., "content": ...}, ...]`, without the system
    /// message.
    #[getter]
    fn history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let Ok(s) = self.session.try_lock() else {
            return Err(busy());
        };
        let list = PyList::empty(py);
        for m in s.history() {
            let d = PyDict::new(py);
            d.set_item("role", &m.role)?;
            d.set_item("content", &m.content)?;
            list.append(d)?;
        }
        Ok(list)
    }
}

fn busy() -> PyErr {
    PocketLMError::new_err(
        "a reply of this chat session is still streaming: finish or delete its iterator first",
    )
}

// ---------------------------------------------------------------------------------------------
// Conversion.

/// Converts a GGUF file or a Hugging Face / MLX folder to an MLX-format folder, as mlx-lm's
/// `convert` and the CLI's `pocketlm convert` (`pocketlm::convert::convert`). Returns the
/// output folder.
///
/// `hf_path`: source (file, folder or hub id; None: the default model). `mlx_path`: output
/// folder (must not exist). `quantize`, `q_bits` (2, 3, 4, 5, 6, 8), `q_group_size` (32, 64,
/// 128): MLX affine quantization. `quant_predicate`: mixed_2_6, mixed_3_4, mixed_3_6 or
/// mixed_4_6. `q_overrides`: `PATTERN=BITS[:GROUP]` or `PATTERN=off` per layer. `dtype`:
/// "float32", "float16" or "bfloat16" (short names too). `dequantize`: an MLX-quantized source
/// back to float. `quantize_vision`: quantize a vision tower too.
///
/// Raises `InvalidArgumentError` for bad settings or an existing `mlx_path`, `NotFoundError`
/// for a missing source, `PocketLMError` otherwise.
#[pyfunction]
#[pyo3(signature = (hf_path = None, mlx_path = PathBuf::from("mlx_model"), quantize = false, q_group_size = 64, q_bits = 4, dtype = None, dequantize = false, quant_predicate = None, *, q_overrides = None, quantize_vision = false))]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    hf_path: Option<PathBuf>,
    mlx_path: PathBuf,
    quantize: bool,
    q_group_size: usize,
    q_bits: usize,
    dtype: Option<String>,
    dequantize: bool,
    quant_predicate: Option<String>,
    q_overrides: Option<Vec<String>>,
    quantize_vision: bool,
) -> PyResult<PathBuf> {
    py.detach(|| -> LibResult<PathBuf> {
        let src = match hf_path {
            Some(p) => loader::resolve_model(p)?,
            None => default_model()?,
        };
        if quantize {
            pocketlm::quant::mlx_affine::check_params(q_group_size, q_bits)
                .map_err(pocketlm::Error::from)?;
        }
        let opts = ConvertOptions {
            quantize: quantize.then_some(QuantParams {
                group_size: q_group_size,
                bits: q_bits,
            }),
            recipe: quant_predicate
                .as_deref()
                .map(str::parse::<QuantRecipe>)
                .transpose()?,
            overrides: q_overrides
                .unwrap_or_default()
                .iter()
                .map(|o| QuantOverride::parse(o, q_group_size))
                .collect::<Result<_, _>>()?,
            dtype: dtype.as_deref().map(parse_dtype).transpose()?,
            dequantize,
            quantize_vision,
            ..Default::default()
        };
        Ok(pocketlm::convert::convert(&src, &mlx_path, &opts, &mut |_| {})?.out)
    })
    .map_err(PyErr::from)
}

// ---------------------------------------------------------------------------------------------
// Embeddings.

/// A sentence-embedding model (`pocketlm::embed::EmbeddingModel`: encoder, tokenizer, pooling,
/// normalization), as sentence-transformers computes embeddings. Made by
/// `pocketlm.load_embedding`; safe to share between threads.
#[pyclass(frozen, module = "pocketlm")]
struct EmbeddingModel {
    inner: Arc<pocketlm::embed::EmbeddingModel>,
}

/// `texts` as `embed` takes them: one string or a list of strings.
#[derive(FromPyObject)]
enum TextsArg {
    #[pyo3(transparent)]
    One(String),
    #[pyo3(transparent)]
    Many(Vec<String>),
}

#[pymethods]
impl EmbeddingModel {
    /// Embeds `texts`: one list of `dimension` floats (f32 values) per text, in order. A
    /// single string is one text: the answer is then a list holding one vector too
    /// (`embed("hi")[0]` is its embedding). An empty list gives an empty list.
    ///
    /// `normalize`: L2-normalize (unit length) or not; None follows the model
    /// (all-MiniLM-L6-v2 normalizes). `dimensions`: keep the first `dimensions` values and
    /// normalize again, for models trained for it (Qwen3-Embedding); others accept only their
    /// full `dimension`. `batch_size`: texts per forward pass (at least 1; the results do not
    /// depend on it beyond float rounding). Texts longer than `max_tokens` are truncated, as
    /// sentence-transformers does. The GIL is released while the model runs.
    ///
    /// Raises `InvalidArgumentError` for `dimensions` the model does not support or
    /// `batch_size` 0, `TypeError` for texts that are not strings, `PocketLMError` for other
    /// library errors.
    #[pyo3(signature = (texts, normalize = None, dimensions = None, batch_size = 32))]
    fn embed(
        &self,
        py: Python<'_>,
        texts: TextsArg,
        normalize: Option<bool>,
        dimensions: Option<usize>,
        batch_size: usize,
    ) -> PyResult<Vec<Vec<f32>>> {
        if batch_size == 0 {
            return Err(invalid_argument("batch_size 0: must be at least 1"));
        }
        let texts = match texts {
            TextsArg::One(t) => vec![t],
            TextsArg::Many(t) => t,
        };
        let opts = pocketlm::embed::EmbedOptions {
            dimensions,
            batch_size,
            normalize,
            ..Default::default()
        };
        let m = self.inner.clone();
        Ok(py
            .detach(|| {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                m.embed(&refs, &opts)
            })
            .map_err(LibError)?)
    }

    /// Length of the embeddings (the model's hidden width; 384 for all-MiniLM-L6-v2).
    #[getter]
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    /// Longest input in tokens (special tokens included); longer texts are truncated.
    #[getter]
    fn max_tokens(&self) -> usize {
        self.inner.max_tokens()
    }

    /// Whether `embed` L2-normalizes by default (`normalize=None`).
    #[getter]
    fn normalizes(&self) -> bool {
        self.inner.normalizes()
    }

    /// The architecture (`bert`, `qwen3`).
    #[getter]
    fn architecture(&self) -> String {
        self.inner.architecture().to_string()
    }

    /// The folder the model was loaded from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    fn __repr__(&self) -> String {
        format!(
            "<pocketlm.EmbeddingModel {} ({} dimensions) from {}>",
            self.inner.architecture(),
            self.inner.dimension(),
            self.inner.path().display()
        )
    }
}

/// Loads a sentence-embedding model (`pocketlm::embed::EmbeddingModel::load`).
///
/// `path_or_id`: a sentence-transformers / Hugging Face folder (BERT, or Qwen3 as
/// Qwen3-Embedding), a hub id `org/name[@revision]`, or the name `all-minilm-l6-v2`; None is
/// `all-minilm-l6-v2` (sentence-transformers/all-MiniLM-L6-v2, 384 dimensions, downloaded into
/// `$POCKETLM_HOME`, default `~/.cache/pocketlm`, on first use, as the CLI's `embed` does).
/// `device`: "auto" (None), "cpu", "cuda", "cuda:N" or "metal".
///
/// Raises `NotFoundError` for a path that does not exist, `InvalidArgumentError` for an
/// unknown device, `PocketLMError` for a folder that is not an embedding model.
#[pyfunction]
#[pyo3(signature = (path_or_id = None, *, device = None))]
fn load_embedding(
    py: Python<'_>,
    path_or_id: Option<PathBuf>,
    device: Option<&str>,
) -> PyResult<EmbeddingModel> {
    let device: DeviceSpec = device.unwrap_or("auto").parse().map_err(LibError)?;
    let spec = match path_or_id {
        Some(p) => p
            .into_os_string()
            .into_string()
            .map_err(|p| invalid_argument(format!("path_or_id {p:?} is not valid UTF-8")))?,
        None => "all-minilm-l6-v2".to_string(),
    };
    let opts = pocketlm::embed::LoadEmbeddingOptions {
        device,
        ..Default::default()
    };
    let inner = py
        .detach(|| pocketlm::embed::EmbeddingModel::load(&spec, &opts))
        .map_err(LibError)?;
    Ok(EmbeddingModel {
        inner: Arc::new(inner),
    })
}

// ---------------------------------------------------------------------------------------------
// The module.

/// pocketlm: run language models locally (Rust), with mlx-lm's API.
#[pymodule]
#[pyo3(name = "pocketlm")]
fn pocketlm_py(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PocketLMError", py.get_type::<PocketLMError>())?;
    let not_found = NOT_FOUND_ERROR.get_or_try_init(py, || {
        two_base_exception(
            py,
            "NotFoundError",
            py.get_type::<PyFileNotFoundError>(),
            "A model, adapter or other file that does not exist (also a FileNotFoundError).",
        )
    })?;
    m.add("NotFoundError", not_found.bind(py))?;
    let invalid = INVALID_ARGUMENT_ERROR.get_or_try_init(py, || {
        two_base_exception(
            py,
            "InvalidArgumentError",
            py.get_type::<PyValueError>(),
            "A bad value: sampling settings, an empty prompt, a prompt longer than the context, \
             a token id outside the vocabulary (also a ValueError).",
        )
    })?;
    m.add("InvalidArgumentError", invalid.bind(py))?;
    m.add_class::<Model>()?;
    m.add_class::<Tokenizer>()?;
    m.add_class::<GenerationResponse>()?;
    m.add_class::<GenerationStream>()?;
    m.add_class::<ChatSession>()?;
    m.add_class::<EmbeddingModel>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(generate, m)?)?;
    m.add_function(wrap_pyfunction!(stream_generate, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(load_embedding, m)?)?;
    Ok(())
}
