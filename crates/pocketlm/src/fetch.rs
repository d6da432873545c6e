//! Fetching model files from package registries and hubs.

/// Errors while downloading a model.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Any download failure, with context.
    #[error("fetch: {0}")]
    Other(String),
}
