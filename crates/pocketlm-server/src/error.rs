//! Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}` with the
//! matching HTTP status (as documented in OpenAI's API reference, "Error codes").

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answered to a client. Serialized as OpenAI does:
/// `{"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": null}}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// Human-readable message naming the field at fault where known.
    pub message: String,
    /// OpenAI's error `type`: `invalid_request_error`, `authentication_error`,
    /// `not_found_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when known (e.g. `temperature`).
    pub param: Option<String>,
    /// A machine-readable code (e.g. `context_length_exceeded`, `invalid_api_key`).
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInner<'a>,
}

#[derive(Serialize)]
struct ErrorInner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400 `invalid_request_error`: malformed JSON, a field of the wrong type or a bad value.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 for a named field with a bad value.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    /// 401 `authentication_error` (`code: invalid_api_key`).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    /// 404 `not_found_error` for an unknown route.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    /// 405 for a known route with the wrong method.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            message,
        )
    }

    /// 413 `invalid_request_error` (`code: request_too_large`) for a body over the limit.
    pub fn payload_too_large(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            message,
        );
        e.code = Some("request_too_large");
        e
    }

    /// 503 `server_error` (`code: queue_full`) when the request queue is full.
    pub fn queue_full(capacity: usize) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!(
                "the server is busy: {capacity} requests are already running or queued; retry later"
            ),
        );
        e.code = Some("queue_full");
        e
    }

    /// 500 `server_error` for a failure inside the model.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// Sets `param`.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// Sets `code`.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body, `{"error": {...}}`.
    pub fn to_json(&self) -> String {
        let body = ErrorBody {
            error: ErrorInner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        // Serializing plain strings and options cannot fail; fall back to a fixed body anyway.
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#
                .to_string()
        })
    }

    /// Maps a library error met while preparing or running a generation: bad input
    /// (prompt too long, bad sampling value, template refusing the conversation) is a 400,
    /// the rest a 500.
    pub fn from_library(e: pocketlm::Error) -> Self {
        use pocketlm::Error as E;
        match e {
            E::ContextOverflow { .. } => {
                Self::bad_param("messages", e.to_string()).with_code("context_length_exceeded")
            }
            E::InvalidArgument(_) | E::Template(_) | E::Tokenizer(_) => {
                Self::bad_request(e.to_string())
            }
            // A schema, regex or grammar that does not compile is the request's fault (its
            // `response_format` or `tools`); a grammar that dead-ends mid-generation is ours.
            E::Constraint(pocketlm::constrain::ConstraintError::Grammar(_)) => {
                Self::bad_request(e.to_string())
            }
            other => Self::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.to_json(),
        )
            .into_response()
    }
}
