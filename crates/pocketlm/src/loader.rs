//! From what the user names (a GGUF file, later a Hugging Face folder or hub id, or nothing for
//! the default model) to a ready [`LoadedModel`]: model, tokenizer and chat template together.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::chat_template::{ChatTemplate, Message};
use crate::device::DeviceSpec;
use crate::gguf::GgufFile;
use crate::models::{self, CausalLM};
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
/// `path`: a `.gguf` file. Errors: [`Error::Io`] if it does not exist; [`Error::Model`] for a
/// malformed file; [`Error::UnsupportedArchitecture`] listing the supported ones.
pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<LoadedModel> {
    let path = path.as_ref();
    let t0 = Instant::now();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::Model(format!(
            "{}: loading model folders is not supported by this build; give a .gguf file",
            path.display()
        )));
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
    let chat_template = match gguf.opt_str("tokenizer.chat_template")? {
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
        weights_bytes: gguf.tensor_data_bytes(),
        load_time: t0.elapsed(),
    })
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
