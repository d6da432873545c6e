//! The library's error type. Each concern has its own error enum (in its module); this enum
//! gathers them so that callers can use one `Result`. Messages name the file, tensor or field.

use std::path::PathBuf;

pub use crate::candle_errors::candle_message;

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
    /// Constrained decoding failed: a grammar that does not compile, a tokenizer it cannot
    /// use, a grammar that allows no token, or a typed output that does not deserialize.
    #[error(transparent)]
    Constraint(crate::constrain::ConstraintError),
    /// A bad argument from the caller.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error from the tensor library, shown on one line by [`candle_message`] (without
    /// the backtrace candle captures when `RUST_BACKTRACE` is set).
    #[error("{}", candle_message(.0))]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_are_one_line_without_a_backtrace() {
        let inner = candle_core::Error::Msg("unexpected end of file".into());
        let bt = candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert!(
            bt.to_string().lines().count() > 1,
            "candle prints the backtrace"
        );
        let e = Error::from(bt.context("reading tensor `x`").with_path("/m.gguf"));
        assert_eq!(
            e.to_string(),
            "/m.gguf: reading tensor `x`: unexpected end of file"
        );
        assert!(std::error::Error::source(&e).is_none());
    }
}
