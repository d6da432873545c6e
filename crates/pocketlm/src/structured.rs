//! Structured output as a typed value: [`generate_json`] generates JSON under a JSON Schema
//! ([`crate::constrain`]) and deserializes it, as OpenAI's structured outputs and Apple's
//! `@Generable` give a typed reply.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::constrain::{Constraint, ConstraintError};
use crate::generate::GenerateParams;
use crate::loader::{LoadedModel, Prompt};

/// A typed reply: generates JSON that validates against `schema` for `prompt` (a chat prompt
/// is rendered with the model's template) and deserializes it into `T`, as OpenAI's structured
/// outputs do with a `json_schema` response format.
///
/// `params` gives the sampling and `max_tokens`; its `constraint` is replaced by
/// `Constraint::JsonSchema(schema)`, its stop strings are dropped (they could cut the JSON) and
/// `ignore_eos` is off. A fresh KV cache is used.
///
/// Errors: the prompt's (template, tokenizer, context); [`ConstraintError::Grammar`] for a
/// schema that does not compile; [`ConstraintError::Incomplete`] when `max_tokens` or the
/// context ran out first; [`ConstraintError::Deserialize`] when the JSON does not fit `T`
/// (a schema that does not describe `T`).
pub fn generate_json<T: DeserializeOwned>(
    model: &LoadedModel,
    prompt: &Prompt,
    schema: &Value,
    params: &GenerateParams,
) -> crate::Result<T> {
    let ids = model.encode(prompt)?;
    let mut cache = model.model.new_cache();
    let params = GenerateParams {
        constraint: Some(Constraint::JsonSchema(schema.clone())),
        stop: Vec::new(),
        ignore_eos: false,
        ..params.clone()
    };
    let out = crate::generate::generate(
        model.model.as_ref(),
        &model.tokenizer,
        &mut cache,
        &ids,
        params,
    )?
    .collect_output()?;
    if out.finish_reason.as_openai() != "stop" {
        return Err(ConstraintError::Incomplete {
            reason: out.finish_reason.as_openai().into(),
            text: out.text,
        }
        .into());
    }
    serde_json::from_str(&out.text).map_err(|e| {
        ConstraintError::Deserialize {
            msg: e.to_string(),
            text: out.text,
        }
        .into()
    })
}
