//! The library's error type. Each concern has its own error enum (in its module); this enum
//! gathers them so that callers can use one `Result`. Messages name the file, tensor or field.

use std::path::PathBuf;

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A model file or folder is malformed or not what the code expects.
    #[error("{0}")]
    Model(String),
    /// A tensor is missing or has the wrong shape or dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor {
        /// Tensor name (Hugging Face naming, or the file's own naming when it has no mapping).
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// The configuration names an architecture that has no implementation here.
    #[error("unsupported architecture `{name}`; supported: {supported}")]
    UnsupportedArchitecture {
        /// The `model_type` / `general.architecture` found.
        name: String,
        /// Comma-separated list of supported ones.
        supported: String,
    },
    /// A tokenizer could not be built or used.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A chat template could not be compiled or rendered.
    #[error(transparent)]
    Template(#[from] crate::chat_template::TemplateError),
    /// Downloading a model failed.
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    /// A quantization routine got bad input.
    #[error(transparent)]
    Quant(#[from] crate::quant::QuantError),
    /// An image could not be decoded or preprocessed.
    #[error(transparent)]
    Image(#[from] crate::image_processor::ImageError),
    /// The prompt does not fit in the model's context.
    #[error("the prompt has {prompt_tokens} tokens but the context holds {context_length} (with room for {max_tokens} new tokens requested)")]
    ContextOverflow {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The context length in use.
        context_length: usize,
        /// New tokens requested.
        max_tokens: usize,
    },
    /// A bad argument from the caller.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A tensor-level error.
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }
}
