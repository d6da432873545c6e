//! From what the user names (a GGUF file, later a Hugging Face folder or hub id, or nothing for
//! the default model) to a ready [`LoadedModel`]: model, tokenizer and chat template together.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::chat_template::{select_chat_template, ChatTemplate, Message};
use crate::device::DeviceSpec;
use crate::gguf::GgufFile;
use crate::models::{self, CausalLM};
use crate::safetensors_weights::SafetensorsWeights;
use crate::tokenizer::Tokenizer;
use crate::weights::GgufWeights;
use crate::{Error, Result};

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Where to run.
    pub device: DeviceSpec,
    /// Dequantize quantized weights to f32 at load (for comparisons with float references;
    /// uses several times the memory).
    pub dequantize: bool,
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
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("path", &self.path)
            .field("info", self.model.info())
            .finish()
    }
}

/// A prompt as the user gives it.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Plain text, tokenized as is (with BOS if the model adds one).
    Text(String),
    /// A conversation, rendered with the model's chat template (with the generation prompt).
    Chat(Vec<Message>),
}

/// Loads a model from a path.
///
/// `path`: a `.gguf` file, or a Hugging Face / MLX model folder (see [`load_folder`]).
/// Errors: [`Error::Io`] if it does not exist; [`Error::Model`] for a malformed file;
/// [`Error::UnsupportedArchitecture`] listing the supported ones.
pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<LoadedModel> {
    let path = path.as_ref();
    let t0 = Instant::now();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return load_folder(path, opts);
    }
    let device = opts.device.open()?;
    let gguf = GgufFile::open(path)?;
    let arch = models::by_gguf_architecture(&gguf.architecture()?)?;
    let config = (arch.config_from_gguf)(&gguf)?;
    let model = (arch.build)(
        &config,
        &GgufWeights::new(&gguf, device).dequantized(opts.dequantize),
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
    })
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
///
/// Errors: [`Error::Io`] when it cannot be read, [`Error::Model`] naming the file when it is not
/// valid JSON.
pub fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Model(format!("{}: not valid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
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
/// `rope_type` other than `"default"`, `rope_scaling`, when those fields are absent.
pub fn normalize_config(config: &mut serde_json::Value) {
    let Some(obj) = config.as_object_mut() else {
        return;
    };
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
/// `generation_config.json` is not read: the tokenizer's end-of-generation set (EOS plus the
/// usual end-of-turn tokens) is used as is.
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
    let weights =
        SafetensorsWeights::open_folder(dir, &config, device)?.dequantized(opts.dequantize);
    let model = (arch.build)(&config, &weights)?;
    let tok_json = dir.join("tokenizer.json");
    if !tok_json.is_file() {
        return Err(Error::Model(format!(
            "{}: no tokenizer.json (only fast tokenizers are supported)",
            dir.display()
        )));
    }
    let tok_cfg = dir.join("tokenizer_config.json");
    let tokenizer =
        Tokenizer::from_files(&tok_json, tok_cfg.is_file().then_some(tok_cfg.as_path()))?;
    let template = folder_chat_template(dir)?;
    assemble(dir, model, tokenizer, template, weights.bytes(), t0)
}

impl LoadedModel {
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
        }
    }

    /// The text of a chat prompt as the model's template renders it.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let tpl = self.chat_template.as_ref().ok_or_else(|| {
            Error::Model(format!(
                "{}: the model has no chat template (use a plain prompt)",
                self.path.display()
            ))
        })?;
        Ok(tpl.render(messages, true)?)
    }
}
