//! Quantization formats.

/// Errors from quantization routines.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// Any quantization failure, with context.
    #[error("quantization: {0}")]
    Other(String),
}
