//! From what the user names (a GGUF file, a Hugging Face / MLX folder or a hub id such as
//! `org/name@revision`) to a ready [`LoadedModel`]: model, tokenizer, chat template and the
//! folder's `generation_config.json` defaults together.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::chat_template::{select_chat_template, ChatTemplate, Message};
use crate::device::DeviceSpec;
use crate::fetch;
use crate::gguf::GgufFile;
use crate::image_processor::ImageProcessorConfig;
pub use crate::json_file::read_json;
use crate::models::{self, CausalLM};
use crate::safetensors_weights::SafetensorsWeights;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::tools::{self, ToolCallFormat};
use crate::{Error, Result};

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Where to run.
    pub device: DeviceSpec,
    /// Dequantize quantized weights to f32 at load (for comparisons with float references;
    /// uses several times the memory).
    pub dequantize: bool,
    /// Run MLX 2- to 6-bit layers with the f32 arithmetic of `mx.quantized_matmul` (dequantized
    /// weights times f32 activations) instead of our CPU kernels, which quantize activations
    /// to 8 bits per block of 32 as ggml does (faster; logits move by ~1e-2..1e-1 on small
    /// models). 8-bit layers always use the f32 arithmetic.
    pub exact_mlx_matmul: bool,
    /// Keep GGUF weights in their file layout instead of repacking them at load for this
    /// CPU's fastest kernels (llama.cpp's `--no-repack`): slower prefill, memory-mapped
    /// weights, and products in the float order of ggml's `vec_dot` kernels, the order
    /// llama.cpp's x86 build uses for `Q8_0` and `Q4_1` (it repacks `Q4_0` and `Q4_K` only):
    /// with it the default model's logits are llama.cpp's bit for bit. MLX 4-bit layers
    /// likewise keep MLX's layout and the unpacked kernels' float order.
    pub no_repack: bool,
}

/// A model with everything needed to prompt it.
pub struct LoadedModel {
    /// The network.
    pub model: Box<dyn CausalLM>,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, when it has one.
    pub chat_template: Option<ChatTemplate>,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Bytes of weights on disk.
    pub weights_bytes: u64,
    /// Time spent loading.
    pub load_time: Duration,
    /// The folder's `generation_config.json`, when it has one (GGUF files have none).
    pub generation_config: Option<GenerationConfig>,
    /// For vision-language models, the image processor settings (`preprocessor_config.json`,
    /// or transformers' defaults when the folder has none).
    pub image_processor: Option<ImageProcessorConfig>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("path", &self.path)
            .field("info", self.model.info())
            .finish()
    }
}

/// A prompt's token ids (image placeholders expanded) and its preprocessed images, in order:
/// the model's input ([`crate::models::ModelInput`]), as [`LoadedModel::encode_multimodal`]
/// returns it.
pub type EncodedPrompt = crate::models::ModelInput;

/// A prompt as the user gives it.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Plain text, tokenized as is (with BOS if the model adds one).
    Text(String),
    /// A conversation, rendered with the model's chat template (with the generation prompt).
    Chat(Vec<Message>),
    /// A conversation with tool (function) definitions, OpenAI's `{"type": "function",
    /// "function": {"name", "description", "parameters"}}`, rendered as
    /// [`LoadedModel::render_chat_with_tools`] does.
    ChatWithTools {
        /// The conversation (may hold `tool_calls` and `tool` turns).
        messages: Vec<Message>,
        /// The tool definitions.
        tools: Vec<serde_json::Value>,
    },
}

/// A hub model id as users write it: `org/name` or `org/name@revision` (branch, tag or commit).
///
/// Returns `(repo_id, revision)` when `spec` has that shape: exactly one `/`, both parts made
/// of `A-Z a-z 0-9 - _ .` and not starting with `.` or `-`, and the name not ending in `.gguf`
/// or `.safetensors` (those are meant as files). Whether it also exists as a local path is
/// [`resolve_model`]'s business.
pub fn parse_hub_id(spec: &str) -> Option<(&str, Option<&str>)> {
    let (repo, revision) = match spec.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, Some(rev)),
        Some(_) => return None,
        None => (spec, None),
    };
    let (org, name) = repo.split_once('/')?;
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let file_like = [".gguf", ".safetensors"]
        .iter()
        .any(|ext| name.to_ascii_lowercase().ends_with(ext));
    (part_ok(org) && part_ok(name) && !file_like).then_some((repo, revision))
}

/// Turns what the user names into a local model path: an existing file or folder is returned
/// as is; otherwise a hub id ([`parse_hub_id`]: `org/name[@revision]`) is downloaded with
/// [`fetch::hub_snapshot`] into the standard Hugging Face cache and its snapshot folder
/// returned. The hub options come from the environment as Python `huggingface_hub` reads them
/// (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`; `HF_HUB_OFFLINE=1` uses the cache
/// only; see [`fetch::HubOptions::from_env`]). Files already cached are not downloaded again.
///
/// Errors: [`Error::Io`] (not found) when `spec` is neither an existing path nor a hub id;
/// [`Error::Fetch`] from the download, e.g. [`fetch::FetchError::NotCached`] offline with an
/// empty cache, [`fetch::FetchError::Http`] 404 for an unknown repository.
pub fn resolve_model(spec: impl AsRef<Path>) -> Result<PathBuf> {
    let path = spec.as_ref();
    match std::fs::metadata(path) {
        Ok(_) => return Ok(path.to_path_buf()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(path, e)),
        Err(_) => {}
    }
    let Some((repo, revision)) = path.to_str().and_then(parse_hub_id) else {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file or folder (and not a hub id of the form org/name[@revision])",
            ),
        ));
    };
    Ok(fetch::hub_snapshot(repo, revision, &[])?)
}

/// Loads a model from a path or a hub id.
///
/// `spec`: a `.gguf` file, a Hugging Face / MLX model folder (see [`load_folder`]), or a hub
/// id `org/name[@revision]` that is not an existing path (downloaded, or found in the cache,
/// by [`resolve_model`]).
/// Errors: [`Error::Io`] if it does not exist; [`Error::Fetch`] for download failures;
/// [`Error::Model`] for a malformed file; [`Error::UnsupportedArchitecture`] listing the
/// supported ones.
pub fn load(spec: impl AsRef<Path>, opts: &LoadOptions) -> Result<LoadedModel> {
    let t0 = Instant::now();
    let resolved = resolve_model(spec)?;
    let path = resolved.as_path();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let mut m = load_folder(path, opts)?;
        crate::memory::release_free_heap();
        m.load_time = t0.elapsed();
        return Ok(m);
    }
    let device = opts.device.open()?;
    let gguf = GgufFile::open(path)?;
    let arch = models::by_gguf_architecture(&gguf.architecture()?)?;
    let config = (arch.config_from_gguf)(&gguf)?;
    let model = (arch.build)(
        &config,
        &arch
            .gguf_weights(&gguf, device)?
            .dequantized(opts.dequantize)
            .repacked(!opts.no_repack),
    )?;
    let tokenizer = Tokenizer::from_gguf_metadata(gguf.metadata())?;
    let template = gguf.opt_str("tokenizer.chat_template")?;
    assemble(
        path,
        model,
        tokenizer,
        template,
        gguf.tensor_data_bytes(),
        t0,
    )
}

/// A folder's `generation_config.json`, as transformers' `GenerationConfig` reads it: the
/// sampling defaults and the end-of-generation ids.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Default sampling; `None` when the file has none of `do_sample`, `temperature`,
    /// `top_p`, `top_k`, `min_p`, `repetition_penalty` (many files hold only token ids), so
    /// that [`SamplingParams::recommended`] applies. With `do_sample` false or absent
    /// (transformers' default) decoding is greedy (`temperature = 0`) whatever `temperature` /
    /// `top_p` / `top_k` say, as in transformers; with `do_sample: true`, `temperature`
    /// (default 1.0), `top_p` (1.0), `top_k` (transformers' default 50; 0 is off) and `min_p`
    /// (off) are taken. `repetition_penalty` (default 1.0, off) applies in both cases. Other
    /// fields are [`SamplingParams::default`].
    pub sampling: Option<SamplingParams>,
    /// `eos_token_id` (an integer or a list of them): ids that end generation, added to the
    /// tokenizer's set ([`Tokenizer::add_eog_token_ids`]) at load. Empty when absent.
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// Parses the JSON of `generation_config.json` (`path` is only used in messages).
    ///
    /// Errors: [`Error::Model`] naming the file and field for a field of the wrong type (e.g.
    /// `temperature: "hot"`, a negative or fractional `eos_token_id`) or sampling values out of
    /// range (negative temperature, `top_p` outside `[0, 1]`, ...).
    pub fn from_json(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let bad = |field: &str, what: &str| {
            Error::Model(format!("{}: `{field}`: {what}", path.display()))
        };
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Model(format!("{}: expected a JSON object", path.display())))?;
        let get = |k: &str| obj.get(k).filter(|x| !x.is_null());
        let float = |k: &str| -> Result<Option<f32>> {
            get(k)
                .map(|x| {
                    x.as_f64()
                        .map(|f| f as f32)
                        .ok_or_else(|| bad(k, "expected a number"))
                })
                .transpose()
        };
        let has_sampling = [
            "do_sample",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
        ]
        .into_iter()
        .any(|k| get(k).is_some());
        let do_sample = match get("do_sample") {
            None => false,
            Some(x) => x
                .as_bool()
                .ok_or_else(|| bad("do_sample", "expected true or false"))?,
        };
        let mut sampling = SamplingParams::default();
        if do_sample {
            sampling.temperature = float("temperature")?.unwrap_or(1.0);
            sampling.top_p = float("top_p")?.unwrap_or(1.0);
            sampling.top_k = match get("top_k") {
                None => 50,
                Some(x) => x
                    .as_u64()
                    .ok_or_else(|| bad("top_k", "expected a non-negative integer"))?
                    as usize,
            };
            sampling.min_p = float("min_p")?.unwrap_or(0.0);
        }
        sampling.repetition_penalty = float("repetition_penalty")?.unwrap_or(1.0);
        sampling
            .validate()
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let id = |x: &serde_json::Value| -> Result<u32> {
            x.as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| bad("eos_token_id", "expected a token id or a list of them"))
        };
        let eos_token_ids = match get("eos_token_id") {
            None => Vec::new(),
            Some(serde_json::Value::Array(a)) => a.iter().map(id).collect::<Result<_>>()?,
            Some(x) => vec![id(x)?],
        };
        Ok(GenerationConfig {
            sampling: has_sampling.then_some(sampling),
            eos_token_ids,
        })
    }

    /// Reads `dir/generation_config.json`; `Ok(None)` when the folder has none.
    ///
    /// Errors: as [`GenerationConfig::from_json`], plus unreadable or invalid JSON.
    pub fn from_folder(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("generation_config.json");
        read_json(&path)?
            .map(|v| Self::from_json(&v, &path))
            .transpose()
    }
}

/// Puts a loaded model together: compiles its chat template (if any) with the tokenizer's
/// BOS/EOS strings and checks the tokenizer fits the model's output layer.
fn assemble(
    path: &Path,
    model: Box<dyn CausalLM>,
    tokenizer: Tokenizer,
    template_source: Option<String>,
    weights_bytes: u64,
    t0: Instant,
) -> Result<LoadedModel> {
    // On a GPU, one-token steps go through the fused decoder where the model's plan allows.
    #[cfg(feature = "cuda")]
    let model: Box<dyn CausalLM> = if model.device().is_cuda() {
        Box::new(crate::accel::Accelerated::new(model))
    } else {
        model
    };
    let chat_template = match template_source {
        Some(src) => Some(ChatTemplate::new(
            &src,
            tokenizer.bos_token().unwrap_or(""),
            tokenizer.eos_token().unwrap_or(""),
        )?),
        None => None,
    };
    if tokenizer.vocab_size() > model.info().vocab_size {
        return Err(Error::Model(format!(
            "{}: the tokenizer has {} tokens but the model's output layer only {}",
            path.display(),
            tokenizer.vocab_size(),
            model.info().vocab_size
        )));
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        path: path.to_path_buf(),
        weights_bytes,
        load_time: t0.elapsed(),
        generation_config: None,
        image_processor: None,
    })
}

/// The chat template source of a Hugging Face folder: `tokenizer_config.json` `chat_template`
/// (a string, or a list of named templates of which `"default"` is taken, see
/// [`select_chat_template`]), else `chat_template.jinja`, else `chat_template.json`
/// (`{"chat_template": ...}`), as transformers looks for them.
///
/// Errors: unreadable files, a `chat_template` field of another shape (named with its file).
pub fn folder_chat_template(dir: &Path) -> Result<Option<String>> {
    for (file, is_json) in [
        ("tokenizer_config.json", true),
        ("chat_template.jinja", false),
        ("chat_template.json", true),
    ] {
        let p = dir.join(file);
        if is_json {
            if let Some(field) = read_json(&p)?.and_then(|v| v.get("chat_template").cloned()) {
                if field.is_null() {
                    continue;
                }
                return select_chat_template(&field, None)
                    .map(Some)
                    .map_err(|e| Error::Model(format!("{}: `chat_template`: {e}", p.display())));
            }
        } else if p.is_file() {
            return std::fs::read_to_string(&p)
                .map(Some)
                .map_err(|e| Error::io(&p, e));
        }
    }
    Ok(None)
}

/// Brings a config.json written by transformers 5 to the field names the architectures read:
/// `rope_parameters` (`{"rope_theta": .., "rope_type": ..}`) fills `rope_theta` and, for a
/// `rope_type` other than `"default"`, `rope_scaling`, when those fields are absent; the same
/// in a multimodal config's `text_config`.
pub fn normalize_config(config: &mut serde_json::Value) {
    let Some(obj) = config.as_object_mut() else {
        return;
    };
    if let Some(text) = obj.get_mut("text_config") {
        normalize_config(text);
    }
    let Some(rp) = obj.get("rope_parameters").cloned() else {
        return;
    };
    if !obj.contains_key("rope_theta") {
        if let Some(theta) = rp.get("rope_theta") {
            obj.insert("rope_theta".into(), theta.clone());
        }
    }
    let non_default = rp
        .get("rope_type")
        .and_then(|t| t.as_str())
        .is_some_and(|t| t != "default");
    if non_default && obj.get("rope_scaling").is_none_or(|v| v.is_null()) {
        obj.insert("rope_scaling".into(), rp);
    }
}

/// Loads a Hugging Face or MLX model folder: `config.json` (`model_type` picks the
/// architecture; `quantization` the MLX affine layers), `*.safetensors` (memory-mapped; shards
/// from `model.safetensors.index.json`), `tokenizer.json` + `tokenizer_config.json`, and the
/// chat template ([`folder_chat_template`]).
///
/// `generation_config.json`, when present, is kept as [`LoadedModel::generation_config`]
/// (default sampling, see [`LoadedModel::default_sampling`]) and its `eos_token_id`s are added
/// to the tokenizer's end-of-generation set.
///
/// Errors: [`Error::Io`] / [`Error::Model`] naming the missing or malformed file, a missing
/// shard, a quantization that does not match the tensors; [`Error::Tensor`] naming a tensor
/// with an unsupported dtype or shape; [`Error::UnsupportedArchitecture`].
pub fn load_folder(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let t0 = Instant::now();
    let config_path = dir.join("config.json");
    let mut config = read_json(&config_path)?.ok_or_else(|| {
        Error::Model(format!(
            "{}: not a model folder (no config.json)",
            dir.display()
        ))
    })?;
    let model_type = config
        .get("model_type")
        .and_then(|m| m.as_str())
        .ok_or_else(|| {
            Error::Model(format!("{}: no string `model_type`", config_path.display()))
        })?;
    let arch = models::by_model_type(model_type)?;
    normalize_config(&mut config);
    let device = opts.device.open()?;
    let weights = SafetensorsWeights::open_folder(dir, &config, device)?
        .dequantized(opts.dequantize)
        .exact_mlx_matmul(opts.exact_mlx_matmul)
        .repacked(!opts.no_repack);
    let model = (arch.build)(&config, &weights)?;
    let tok_json = dir.join("tokenizer.json");
    if !tok_json.is_file() {
        return Err(Error::Model(format!(
            "{}: no tokenizer.json (only fast tokenizers are supported)",
            dir.display()
        )));
    }
    let tok_cfg = dir.join("tokenizer_config.json");
    let mut tokenizer =
        Tokenizer::from_files(&tok_json, tok_cfg.is_file().then_some(tok_cfg.as_path()))?;
    let generation_config = GenerationConfig::from_folder(dir)?;
    if let Some(g) = &generation_config {
        tokenizer
            .add_eog_token_ids(g.eos_token_ids.iter().copied())
            .map_err(|e| {
                Error::Model(format!(
                    "{}: `eos_token_id`: {e}",
                    dir.join("generation_config.json").display()
                ))
            })?;
    }
    let template = folder_chat_template(dir)?;
    let image_processor = match model.vision() {
        Some(v) => {
            let c = ImageProcessorConfig::from_folder(dir)?.unwrap_or_default();
            if c.patch_size != v.patch_size
                || c.merge_size != v.merge_size
                || c.temporal_patch_size != v.temporal_patch_size
            {
                return Err(Error::Model(format!(
                    "{}: the image processor's patch {} / merge {} / temporal patch {} do not \
                     match the model's {} / {} / {}",
                    dir.display(),
                    c.patch_size,
                    c.merge_size,
                    c.temporal_patch_size,
                    v.patch_size,
                    v.merge_size,
                    v.temporal_patch_size
                )));
            }
            Some(c)
        }
        None => None,
    };
    let mut m = assemble(dir, model, tokenizer, template, weights.bytes(), t0)?;
    m.generation_config = generation_config;
    m.image_processor = image_processor;
    Ok(m)
}

impl LoadedModel {
    /// The sampling to use when the caller gives none: the folder's `generation_config.json`
    /// defaults ([`GenerationConfig::sampling`]), else [`SamplingParams::recommended`]
    /// (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition penalty 1.1 over 64
    /// tokens, no seed). The CLI's `generate` and `chat` and the server start from it; fill a
    /// [`crate::sampling::SamplingOverrides`] with what the caller gave and resolve it against
    /// this.
    pub fn default_sampling(&self) -> SamplingParams {
        self.generation_config
            .as_ref()
            .and_then(|g| g.sampling.clone())
            .unwrap_or_else(SamplingParams::recommended)
    }

    /// Runs the model once on throwaway caches and waits for its device, as llama.cpp's
    /// warm-up run does before serving: a two-token prompt of each of two sequences (the
    /// prefill path), one token (the one-sequence decode step), one token of each together
    /// (batched decode), then one token beside a two-token chunk (a pass mixing both, as a
    /// server admitting a request runs). On a GPU the first of these load the kernel modules
    /// and record the decode graphs; on a machine's first run the driver also compiles the
    /// kernel modules that ship as PTX (candle's: 22 s of a warm-up on an H100 with the
    /// driver's cache off), so a server that warms up at start keeps that out of its first
    /// request. Nothing is kept but what the device caches. Returns the time it took.
    ///
    /// Errors: the model's, as [`CausalLM::forward`] and [`CausalLM::forward_batch`].
    pub fn warm_up(&self) -> Result<Duration> {
        let started = Instant::now();
        let m = self.model.as_ref();
        let dev = m.device();
        let (mut a, mut b) = (m.new_cache(), m.new_cache());
        for c in [&mut a, &mut b] {
            m.forward(
                &candle_core::Tensor::new(&[[0u32, 0]], dev)?,
                c,
                models::Logits::Last,
            )?;
        }
        m.forward(
            &candle_core::Tensor::new(&[[0u32]], dev)?,
            &mut a,
            models::Logits::Last,
        )?;
        let mut rows = [
            models::BatchRow {
                ids: &[0],
                cache: &mut a,
            },
            models::BatchRow {
                ids: &[0],
                cache: &mut b,
            },
        ];
        m.forward_batch(&mut rows)?;
        rows[1].ids = &[0, 0];
        m.forward_batch(&mut rows)?;
        dev.synchronize()?;
        Ok(started.elapsed())
    }

    /// Token ids for a prompt. Chat prompts are rendered with the model's template
    /// (`add_generation_prompt = true`) and tokenized without adding BOS again, as
    /// transformers' `apply_chat_template` does; plain text gets BOS/EOS as the model defines.
    ///
    /// Errors: a chat prompt for a model without a template; template or tokenizer errors.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(t) => Ok(self.tokenizer.encode(t, true)?),
            Prompt::Chat(messages) => {
                let text = self.render_chat(messages)?;
                Ok(self.tokenizer.encode(&text, false)?)
            }
            Prompt::ChatWithTools { messages, tools } => {
                let text = self.render_chat_with_tools(messages, tools)?;
                Ok(self.tokenizer.encode(&text, false)?)
            }
        }
    }

    /// How this model writes tool calls: the format its chat template teaches
    /// ([`ToolCallFormat::detect`]), or Hermes `<tool_call>` when the template knows no tools
    /// (the fallback of [`LoadedModel::render_chat_with_tools`]) or there is no template.
    pub fn tool_call_format(&self) -> ToolCallFormat {
        match &self.chat_template {
            Some(t) if tools::template_knows_tools(t.source()) => {
                ToolCallFormat::detect(t.source())
            }
            _ => ToolCallFormat::Hermes,
        }
    }

    /// The text of a chat prompt with tool definitions (OpenAI's function tools). A template
    /// that renders `tools` itself gets them as transformers' `apply_chat_template(tools=...)`
    /// passes them, and the messages' `tool_calls` / `tool_call_id` as they are. A template that
    /// knows no tools (the default SmolLM2's) gets the documented fallback instead:
    /// [`tools::fallback_system_prompt`] appended to the system message (or as a system message
    /// of its own), each assistant `tool_calls` written into its content as Hermes
    /// `<tool_call>` blocks ([`tools::hermes_call_text`]), and `tool` results as a `user` turn
    /// of `<tool_response>\n...\n</tool_response>` blocks (consecutive results in one turn), as
    /// Qwen2.5's template writes them. Empty `tools` renders as [`LoadedModel::render_chat`].
    ///
    /// Errors: as [`LoadedModel::render_chat`].
    pub fn render_chat_with_tools(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
    ) -> Result<String> {
        let tpl = self.template()?;
        let has_tool_turns = messages
            .iter()
            .any(|m| !m.tool_calls.is_empty() || m.role == "tool");
        if tools.is_empty() && !has_tool_turns {
            return self.render_chat(messages);
        }
        let options = crate::chat_template::RenderOptions {
            add_generation_prompt: true,
            tools: (!tools.is_empty()).then(|| tools.to_vec()),
            ..Default::default()
        };
        if tools::template_knows_tools(tpl.source()) {
            let values: Vec<serde_json::Value> =
                messages.iter().map(|m| m.template_value()).collect();
            return Ok(tpl.render_with(&values, &options)?);
        }
        let rewritten = fallback_messages(messages, tools);
        let values: Vec<serde_json::Value> = rewritten.iter().map(|m| m.template_value()).collect();
        let options = crate::chat_template::RenderOptions {
            tools: None,
            ..options
        };
        Ok(tpl.render_with(&values, &options)?)
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| {
            Error::Model(format!(
                "{}: the model has no chat template (use a plain prompt)",
                self.path.display()
            ))
        })
    }

    /// The text of a chat prompt as the model's template renders it (messages with images get
    /// list-valued content, [`Message::template_value`]).
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let tpl = self.template()?;
        if messages.iter().all(|m| m.images.is_empty()) {
            return Ok(tpl.render(messages, true)?);
        }
        let values: Vec<serde_json::Value> = messages.iter().map(|m| m.template_value()).collect();
        let options = crate::chat_template::RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        Ok(tpl.render_with(&values, &options)?)
    }

    /// Token ids and preprocessed images of a prompt, as transformers' processor gives them:
    /// the chat template places one `<|image_pad|>` per image, which is expanded to the image's
    /// number of tokens ([`ProcessedImage::n_tokens`]). Without images this is
    /// [`LoadedModel::encode`].
    ///
    /// Errors: images for a model that takes none; a template that does not place exactly one
    /// placeholder per image; image preprocessing errors; as [`LoadedModel::encode`].
    pub fn encode_multimodal(&self, prompt: &Prompt) -> Result<EncodedPrompt> {
        let (messages, tools) = match prompt {
            Prompt::Chat(m) if m.iter().any(|m| !m.images.is_empty()) => (m, None),
            Prompt::ChatWithTools { messages, tools }
                if messages.iter().any(|m| !m.images.is_empty()) =>
            {
                (messages, Some(tools))
            }
            _ => {
                return Ok(EncodedPrompt {
                    ids: self.encode(prompt)?,
                    images: Vec::new(),
                })
            }
        };
        let (Some(vision), Some(proc)) = (self.model.vision(), self.image_processor.as_ref())
        else {
            return Err(Error::InvalidArgument(format!(
                "{}: the {} model takes no images",
                self.path.display(),
                self.model.info().architecture
            )));
        };
        let images = messages
            .iter()
            .flat_map(|m| m.images.iter())
            .map(|img| proc.preprocess(img))
            .collect::<Result<Vec<_>, _>>()?;
        let text = match tools {
            Some(t) => self.render_chat_with_tools(messages, t)?,
            None => self.render_chat(messages)?,
        };
        let raw = self.tokenizer.encode(&text, false)?;
        let placed = raw.iter().filter(|&&t| t == vision.image_token_id).count();
        if placed != images.len() {
            return Err(Error::Model(format!(
                "{}: the chat template placed {placed} image placeholders for {} images",
                self.path.display(),
                images.len()
            )));
        }
        let mut ids =
            Vec::with_capacity(raw.len() + images.iter().map(|i| i.n_tokens()).sum::<usize>());
        let mut next = images.iter();
        for t in raw {
            if t == vision.image_token_id {
                let n = next.next().map_or(0, |i| i.n_tokens());
                ids.extend(std::iter::repeat_n(t, n));
            } else {
                ids.push(t);
            }
        }
        Ok(EncodedPrompt { ids, images })
    }
}

/// The messages of [`LoadedModel::render_chat_with_tools`]'s fallback for templates that know no
/// tools: the tool prompt in the system message, calls and results as Hermes text.
pub fn fallback_messages(messages: &[Message], tools: &[serde_json::Value]) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        let prompt = tools::fallback_system_prompt(tools);
        match messages.first() {
            Some(m) if m.role == "system" => {}
            _ => out.push(Message::system(prompt.clone())),
        }
        if let Some(m) = messages.first().filter(|m| m.role == "system") {
            let mut m = m.clone();
            m.content = if m.content.is_empty() {
                prompt
            } else {
                format!("{}\n\n{prompt}", m.content)
            };
            out.push(m);
        }
    }
    let skip =
        usize::from(!tools.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        if !m.tool_calls.is_empty() {
            let mut text = m.content.clone();
            for call in &m.tool_calls {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&tools::hermes_call_text(call));
            }
            out.push(Message {
                content: text,
                tool_calls: Vec::new(),
                ..m.clone()
            });
        } else if m.role == "tool" {
            let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
            match out.last_mut() {
                Some(prev) if prev.role == "user" && prev.content.ends_with("</tool_response>") => {
                    prev.content.push('\n');
                    prev.content.push_str(&block);
                }
                _ => out.push(Message::user(block)),
            }
        } else {
            out.push(m.clone());
        }
    }
    out
}
