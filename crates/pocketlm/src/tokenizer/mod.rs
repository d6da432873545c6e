//! Tokenizers: from `tokenizer.json` (Hugging Face `tokenizers`) or built from GGUF metadata.

/// Errors building or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Any tokenizer failure, with context.
    #[error("tokenizer: {0}")]
    Other(String),
}
