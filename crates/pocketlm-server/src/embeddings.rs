//! `POST /v1/embeddings`, as OpenAI's API reference ("Create embeddings") describes it:
//! `input` a string, an array of strings, an array of token ids or an array of token arrays;
//! `model`; `encoding_format` `float` (default) or `base64` (the little-endian f32 bytes,
//! base64-encoded); `dimensions`; `user` (ignored). The answer is
//! `{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
//! "usage": {"prompt_tokens", "total_tokens"}}`. The embedding model is the one `serve` was
//! given (`--embedding-model`); without one the route answers 404 `model_not_found`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::Json;
use pocketlm::embed::{EmbedOptions, EmbeddingModel};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The embedding model a server holds, with the id it is served under.
#[derive(Debug)]
pub struct EmbeddingService {
    model: Arc<EmbeddingModel>,
    id: String,
    /// One embedding batch at a time: on a CPU one already uses every core.
    running: tokio::sync::Semaphore,
}

impl EmbeddingService {
    /// Serves `model` under `id` (answers name it in `model`).
    pub fn new(model: Arc<EmbeddingModel>, id: impl Into<String>) -> Self {
        Self {
            model,
            id: id.into(),
            running: tokio::sync::Semaphore::new(1),
        }
    }

    /// The id answers carry.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Most inputs one request may hold (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// `input`: what OpenAI accepts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One input as token ids.
    Tokens(Vec<u32>),
    /// Several inputs as token ids.
    TokenArrays(Vec<Vec<u32>>),
}

/// The request body.
#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    /// What to embed. Token ids are used as they are (no special tokens added).
    pub input: EmbeddingInput,
    /// Model id; any value is accepted (the server holds one embedding model) and the answer
    /// names the loaded one.
    #[serde(default)]
    pub model: Option<String>,
    /// `float` (default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Keep the first `dimensions` values, normalized again: only for models trained for it
    /// (Qwen3-Embedding); others accept only their full dimension.
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// Ignored (OpenAI's end-user id).
    #[serde(default)]
    pub user: Option<String>,
}

/// One embedding: an array of numbers, or base64 of its little-endian f32 bytes.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `encoding_format: "float"`.
    Float(Vec<f32>),
    /// `encoding_format: "base64"`.
    Base64(String),
}

/// One entry of `data`.
#[derive(Debug, Serialize)]
pub struct EmbeddingData {
    /// Always `"embedding"`.
    pub object: &'static str,
    /// Position of the input in the request.
    pub index: usize,
    /// The vector.
    pub embedding: EmbeddingVector,
}

/// Token counts of the inputs.
#[derive(Debug, Serialize)]
pub struct EmbeddingUsage {
    /// Tokens of all inputs, special tokens included, after truncation.
    pub prompt_tokens: usize,
    /// The same (embeddings generate nothing).
    pub total_tokens: usize,
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct EmbeddingResponse {
    /// Always `"list"`.
    pub object: &'static str,
    /// One entry per input, in order.
    pub data: Vec<EmbeddingData>,
    /// The served embedding model's id.
    pub model: String,
    /// Token counts.
    pub usage: EmbeddingUsage,
}

/// Handles `POST /v1/embeddings` with the server's embedding model, if any.
///
/// Errors: 404 `model_not_found` when the server has no embedding model; 400 naming `input`
/// (empty, more than [`MAX_INPUTS`], an empty text, bad token ids, not a string or array),
/// `encoding_format` or `dimensions`; 413 for a body over the limit.
pub async fn create(
    service: Option<Arc<EmbeddingService>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    let Some(service) = service else {
        return Err(ApiError::not_found(
            "this server has no embedding model: start it with `pocketlm serve \
             --embedding-model MODEL` (e.g. all-minilm-l6-v2)",
        )
        .with_param("model")
        .with_code("model_not_found"));
    };
    let req: EmbeddingRequest = crate::parse_body(body).map_err(|e| {
        if e.message.contains("did not match any variant") {
            ApiError::bad_param(
                "input",
                "`input` must be a string, an array of strings, an array of token ids or an \
                 array of token-id arrays",
            )
        } else {
            e
        }
    })?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_param(
                "encoding_format",
                format!("`encoding_format` {other:?}: expected \"float\" or \"base64\""),
            ))
        }
    };
    let n = match &req.input {
        EmbeddingInput::Text(_) | EmbeddingInput::Tokens(_) => 1,
        EmbeddingInput::Texts(t) => t.len(),
        EmbeddingInput::TokenArrays(t) => t.len(),
    };
    if n == 0 || n > MAX_INPUTS {
        return Err(ApiError::bad_param(
            "input",
            format!("`input` holds {n} inputs; 1 to {MAX_INPUTS} are accepted"),
        ));
    }
    let model = service.model.clone();
    model
        .check_dimensions(req.dimensions)
        .map_err(|e| ApiError::bad_param("dimensions", e.to_string()))?;
    let _turn = service
        .running
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the embedding model is shutting down"))?;
    let opts = EmbedOptions {
        dimensions: req.dimensions,
        ..EmbedOptions::default()
    };
    let input = req.input;
    let (vectors, prompt_tokens) = tokio::task::spawn_blocking(move || {
        let ids = match input {
            EmbeddingInput::Text(t) => tokenize(&model, &[t])?,
            EmbeddingInput::Texts(t) => tokenize(&model, &t)?,
            EmbeddingInput::Tokens(t) => vec![t],
            EmbeddingInput::TokenArrays(t) => t,
        };
        let vectors = model
            .embed_tokens(&ids, &opts)
            .map_err(|e| ApiError::from_library(e).with_param("input"))?;
        let tokens = ids.iter().map(|t| t.len().min(model.max_tokens())).sum();
        Ok::<_, ApiError>((vectors, tokens))
    })
    .await
    .map_err(|e| ApiError::internal(format!("the embedding task failed: {e}")))??;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| EmbeddingData {
            object: "embedding",
            index,
            embedding: if base64 {
                EmbeddingVector::Base64(pocketlm::embed::to_base64(&v))
            } else {
                EmbeddingVector::Float(v)
            },
        })
        .collect();
    Ok(Json(EmbeddingResponse {
        object: "list",
        data,
        model: service.id.clone(),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    }))
}

/// Tokens of `texts` (truncated to the model's limit, as OpenAI-compatible servers for these
/// models do); an empty text is refused, as OpenAI refuses it.
fn tokenize(model: &EmbeddingModel, texts: &[String]) -> Result<Vec<Vec<u32>>, ApiError> {
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ApiError::bad_param(
            "input",
            format!("`input[{i}]` is an empty string"),
        ));
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    model
        .tokenize(&refs, true)
        .map_err(|e| ApiError::from_library(e).with_param("input"))
}
