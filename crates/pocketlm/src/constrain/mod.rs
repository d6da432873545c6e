//! Constrained decoding: what the generated text must match (a JSON Schema, any JSON object, a
//! regular expression or a Lark grammar), as llama.cpp's and mistral.rs's structured outputs do
//! with `llguidance`.
//!
//! [`Constraint`] is the request; [`crate::generate::GenerateParams::constraint`] carries it.
//! [`GrammarEnv`] is the vocabulary side (the bytes of every token, built once per tokenizer
//! and cached), [`GrammarMask`] the logits processor that masks disallowed tokens, and
//! [`crate::structured::generate_json`] a typed call on top.

pub mod closing;
mod env;
mod mask;

pub use env::{GrammarEnv, TokenBytes, TokenSpelling};
pub use mask::{apply_mask, GrammarMask};

use llguidance::api::TopLevelGrammar;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

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

impl Constraint {
    /// The llguidance grammar of this constraint.
    ///
    /// JSON (both variants) gets llama.cpp's whitespace between tokens
    /// (`common/json-schema-to-grammar.cpp` `SPACE_RULE`: one space, or one or two newlines and
    /// up to 20 spaces or tabs) instead of llguidance's unbounded default, so that a model
    /// cannot pad forever; a schema's own `x-guidance` options
    /// (llguidance `docs/json_schema.md`) replace that default.
    pub fn to_llguidance(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(with_json_whitespace(json!({"type": "object"})))
            }
            Constraint::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(with_json_whitespace(schema.clone()))
            }
            Constraint::Regex(re) => TopLevelGrammar::from_regex(re),
            Constraint::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }

    /// A short description for messages: `JSON schema`, `regex`...
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonObject => "JSON object",
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::Regex(_) => "regular expression",
            Constraint::Lark(_) => "Lark grammar",
        }
    }
}

/// llama.cpp's JSON whitespace rule as an llguidance whitespace pattern.
pub const JSON_WHITESPACE: &str = r"(?:\x20|\n{1,2}[\x20\x09]{0,20})";

/// `schema` with `x-guidance: {"whitespace_pattern": JSON_WHITESPACE}` unless it has its own
/// `x-guidance` (a non-object schema, such as `true`, is left as is).
fn with_json_whitespace(mut schema: Value) -> Value {
    if let Value::Object(o) = &mut schema {
        o.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// Errors of constrained decoding.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The grammar, JSON Schema or regular expression does not compile.
    #[error("the grammar does not compile: {0}")]
    Grammar(String),
    /// The grammar environment cannot be built from the model's tokenizer.
    #[error("constrained decoding: the tokenizer cannot be used: {0}")]
    Tokenizer(String),
    /// During generation, the grammar allowed no token (or rejected the one drawn).
    #[error("constrained decoding failed: {0}")]
    Rejected(String),
    /// The output does not parse as JSON, or does not deserialize into the requested type
    /// ([`crate::structured::generate_json`]); `text` is the output.
    #[error("the output does not deserialize ({msg}): {text}")]
    Deserialize {
        /// serde_json's message.
        msg: String,
        /// The generated text.
        text: String,
    },
    /// Generation stopped before the grammar was complete (`max_tokens` or a full context);
    /// `text` is the partial output.
    #[error("generation ended ({reason}) before the output was complete: {text}")]
    Incomplete {
        /// The finish reason (`length`).
        reason: String,
        /// The generated text.
        text: String,
    },
}

impl From<ConstraintError> for crate::Error {
    fn from(e: ConstraintError) -> Self {
        crate::Error::Constraint(e)
    }
}
