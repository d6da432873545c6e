//! Constrained decoding: what the generated text must match (a JSON Schema, any JSON object, a
//! regular expression or a Lark grammar), as llama.cpp's and mistral.rs's structured outputs do
//! with `llguidance`.
//!
//! [`Constraint`] is the request; [`crate::generate::GenerateParams::constraint`] carries it.

use serde::{Deserialize, Serialize};

/// What the generated text must match.
///
/// The grammar dialect is llguidance's (<https://github.com/guidance-ai/llguidance>,
/// `docs/syntax.md`): Lark with `%json { <JSON Schema> }` to embed a schema and `%regex`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Constraint {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON that validates against this JSON Schema (OpenAI's `json_schema` response format).
    JsonSchema(serde_json::Value),
    /// Text that the whole of matches this regular expression (Rust `regex` syntax, anchored).
    Regex(String),
    /// Text that this Lark grammar (llguidance's dialect) accepts.
    Lark(String),
}
