//! Chat templates: the model's own Jinja template rendered with `minijinja`.

/// Errors compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// Any template failure, with context.
    #[error("chat template: {0}")]
    Other(String),
}
