//! The grammar that enforces `tool_choice`: a [`Constraint::Lark`] in llguidance's Lark dialect
//! (<https://github.com/guidance-ai/llguidance>, `docs/syntax.md`), where `%json { <schema> }`
//! is a rule that accepts JSON valid against the embedded JSON Schema.
//!
//! Each call is one JSON object whose `name` is a `const` and whose arguments follow the
//! tool's `parameters` schema; several tools are alternatives (`|`). The call is wrapped as the
//! model's format writes it ([`ToolCallFormat`]):
//!
//! ```text
//! // Hermes, tool_choice "required", parallel calls allowed:
//! start: tool_call ("\n" tool_call)*
//! tool_call: "<tool_call>\n" call "\n</tool_call>"
//! call: call_0 | call_1
//! call_0: %json {"type": "object", "properties": {"name": {"const": "get_weather"},
//!                "arguments": <parameters>}, "required": ["name", "arguments"]}
//! ```
//!
//! Llama 3 JSON calls are the bare objects (key `parameters`), several separated by `; `;
//! Mistral calls a JSON list `[call, ...]` (the `[TOOL_CALLS]` control token before it is left
//! to the model: a decoder that skips special tokens never shows it, and the parser reads the
//! list with or without it).

use super::ToolCallFormat;
use crate::constrain::Constraint;

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// `"none"`: no tools are rendered and the answer is not parsed for calls.
    None,
    /// `"auto"` (the default with tools): the model chooses between text and calls; no grammar.
    #[default]
    Auto,
    /// `"required"`: at least one call to any of the tools (one when parallel calls are off).
    Required,
    /// `{"type": "function", "function": {"name": ...}}`: exactly one call to that function.
    Function(String),
}

/// Errors of the tool definitions or the choice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// A tool definition is malformed (the message names `tools[i]` and what is wrong).
    #[error("{0}")]
    InvalidTool(String),
    /// `tool_choice` names a function that is not among the tools.
    #[error("tool_choice names the function `{0}`, which is not among the tools")]
    UnknownFunction(String),
    /// `tool_choice` is `required` or a function but there are no tools.
    #[error("tool_choice `{0}` needs at least one tool in `tools`")]
    NoTools(String),
}

/// One function of an OpenAI tool definition.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionDef {
    /// The function's name.
    pub name: String,
    /// Its `parameters` JSON Schema (`{"type": "object"}` when absent).
    pub parameters: serde_json::Value,
}

/// Reads OpenAI tool definitions `{"type": "function", "function": {"name", "description",
/// "parameters"}}`.
///
/// Errors: [`ToolError::InvalidTool`] naming `tools[i]` for another `type`, a missing or empty
/// name, a name used twice, or `parameters` that is not a JSON object.
pub fn function_defs(tools: &[serde_json::Value]) -> Result<Vec<FunctionDef>, ToolError> {
    let mut out: Vec<FunctionDef> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let bad = |m: &str| ToolError::InvalidTool(format!("`tools[{i}]`: {m}"));
        match t.get("type").and_then(|k| k.as_str()) {
            Some("function") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "type `{other}` is not supported; only `function` tools are"
                )))
            }
            None => return Err(bad("`type` is missing (expected `function`)")),
        }
        let f = t
            .get("function")
            .ok_or_else(|| bad("`function` is missing"))?;
        let name = f
            .get("name")
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("`function.name` is missing or empty"))?;
        if out.iter().any(|d| d.name == name) {
            return Err(bad(&format!("the function name `{name}` is used twice")));
        }
        let parameters = match f.get("parameters") {
            None | Some(serde_json::Value::Null) => serde_json::json!({"type": "object"}),
            Some(p @ serde_json::Value::Object(_)) => p.clone(),
            Some(_) => return Err(bad("`function.parameters` must be a JSON Schema object")),
        };
        out.push(FunctionDef {
            name: name.to_owned(),
            parameters,
        });
    }
    Ok(out)
}

/// The JSON Schema of one call object of `def` in `format` (`arguments` or, for Llama,
/// `parameters`).
pub fn call_schema(format: ToolCallFormat, def: &FunctionDef) -> serde_json::Value {
    let key = match format {
        ToolCallFormat::Llama3Json => "parameters",
        _ => "arguments",
    };
    let mut properties = serde_json::Map::new();
    properties.insert("name".into(), serde_json::json!({"const": def.name}));
    properties.insert(key.into(), def.parameters.clone());
    serde_json::json!({
        "type": "object",
        "properties": properties,
        "required": ["name", key],
        "additionalProperties": false,
        // How a call's JSON is spaced: `{"name": "f", "arguments": {"a": 1}}` (the Hermes,
        // Llama 3 and Mistral templates' own examples), no other whitespace. llguidance's
        // flexible whitespace may repeat between any two JSON tokens, so that a weak model can
        // pad a call until `max_tokens`; fixed separators cannot, and make more of the call
        // forced tokens (fast-forwarded: `GrammarMask::with_fast_forward`).
        "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
    })
}

/// A Lark string literal: `"..."` with `\`, `"` and newlines escaped.
fn lark_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The constraint that enforces `choice` over `tools` (OpenAI tool definitions) for a model
/// writing calls in `format`; `parallel`: several calls allowed (OpenAI's
/// `parallel_tool_calls`, default true), else exactly one.
///
/// Returns `None` for [`ToolChoice::None`] and [`ToolChoice::Auto`] (free text, parsed
/// afterwards). Errors: as [`function_defs`]; [`ToolError::UnknownFunction`] for a named
/// function not among the tools; [`ToolError::NoTools`] for `required` or a function without
/// tools.
pub fn tool_call_grammar(
    format: ToolCallFormat,
    tools: &[serde_json::Value],
    choice: &ToolChoice,
    parallel: bool,
) -> Result<Option<Constraint>, ToolError> {
    let defs = function_defs(tools)?;
    let (chosen, parallel): (Vec<&FunctionDef>, bool) = match choice {
        ToolChoice::None | ToolChoice::Auto => return Ok(None),
        ToolChoice::Required => {
            if defs.is_empty() {
                return Err(ToolError::NoTools("required".into()));
            }
            (defs.iter().collect(), parallel)
        }
        ToolChoice::Function(name) => {
            if defs.is_empty() {
                return Err(ToolError::NoTools(name.clone()));
            }
            let d = defs
                .iter()
                .find(|d| &d.name == name)
                .ok_or_else(|| ToolError::UnknownFunction(name.clone()))?;
            (vec![d], false)
        }
    };
    let mut g = String::new();
    match (format, parallel) {
        (ToolCallFormat::Hermes, true) => {
            g.push_str("start: tool_call (\"\\n\" tool_call)*\n");
        }
        (ToolCallFormat::Hermes, false) => g.push_str("start: tool_call\n"),
        (ToolCallFormat::Llama3Json, true) => g.push_str("start: call (\"; \" call)*\n"),
        (ToolCallFormat::Llama3Json, false) => g.push_str("start: call\n"),
        (ToolCallFormat::Mistral, true) => g.push_str("start: \"[\" call (\", \" call)* \"]\"\n"),
        (ToolCallFormat::Mistral, false) => g.push_str("start: \"[\" call \"]\"\n"),
    }
    if format == ToolCallFormat::Hermes {
        g.push_str(&format!(
            "tool_call: {} call {}\n",
            lark_string("<tool_call>\n"),
            lark_string("\n</tool_call>")
        ));
    }
    let alternatives: Vec<String> = (0..chosen.len()).map(|i| format!("call_{i}")).collect();
    g.push_str(&format!("call: {}\n", alternatives.join(" | ")));
    for (i, d) in chosen.iter().enumerate() {
        g.push_str(&format!("call_{i}: %json {}\n", call_schema(format, d)));
    }
    Ok(Some(Constraint::Lark(g)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<serde_json::Value> {
        vec![
            serde_json::json!({"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
            serde_json::json!({"type": "function", "function": {"name": "get_time"}}),
        ]
    }

    fn lark(c: Option<Constraint>) -> String {
        match c {
            Some(Constraint::Lark(g)) => g,
            other => panic!("expected a Lark grammar, got {other:?}"),
        }
    }

    #[test]
    fn required_hermes_allows_parallel_calls_to_any_tool() {
        let g = lark(
            tool_call_grammar(
                ToolCallFormat::Hermes,
                &tools(),
                &ToolChoice::Required,
                true,
            )
            .unwrap(),
        );
        let want = concat!(
            "start: tool_call (\"\\n\" tool_call)*\n",
            "tool_call: \"<tool_call>\\n\" call \"\\n</tool_call>\"\n",
            "call: call_0 | call_1\n",
            "call_0: %json {\"type\":\"object\",\"properties\":{\"name\":{\"const\":\"get_weather\"},",
            "\"arguments\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"]}},",
            "\"required\":[\"name\",\"arguments\"],\"additionalProperties\":false,\"x-guidance\":{\"whitespace_flexible\":false,\"item_separator\":\", \",\"key_separator\":\": \"}}\n",
            "call_1: %json {\"type\":\"object\",\"properties\":{\"name\":{\"const\":\"get_time\"},",
            "\"arguments\":{\"type\":\"object\"}},\"required\":[\"name\",\"arguments\"],\"additionalProperties\":false,\"x-guidance\":{\"whitespace_flexible\":false,\"item_separator\":\", \",\"key_separator\":\": \"}}\n",
        );
        assert_eq!(g, want);
    }

    #[test]
    fn named_function_and_no_parallel_give_exactly_one_call() {
        let g = lark(
            tool_call_grammar(
                ToolCallFormat::Hermes,
                &tools(),
                &ToolChoice::Function("get_time".into()),
                true,
            )
            .unwrap(),
        );
        assert!(g.starts_with("start: tool_call\n"), "{g}");
        assert!(g.contains("call: call_0\n"), "{g}");
        assert!(g.contains("\"const\":\"get_time\""), "{g}");
        assert!(!g.contains("get_weather"), "{g}");
        let g = lark(
            tool_call_grammar(
                ToolCallFormat::Hermes,
                &tools(),
                &ToolChoice::Required,
                false,
            )
            .unwrap(),
        );
        assert!(g.starts_with("start: tool_call\n"), "{g}");
        assert!(g.contains("call: call_0 | call_1\n"), "{g}");
    }

    #[test]
    fn llama_and_mistral_wrappers() {
        let g = lark(
            tool_call_grammar(
                ToolCallFormat::Llama3Json,
                &tools(),
                &ToolChoice::Required,
                true,
            )
            .unwrap(),
        );
        assert!(
            g.starts_with("start: call (\"; \" call)*\ncall: call_0 | call_1\n"),
            "{g}"
        );
        assert!(
            g.contains("\"parameters\":{\"type\":\"object\",\"properties\""),
            "{g}"
        );
        assert!(g.contains("\"required\":[\"name\",\"parameters\"]"), "{g}");
        let g = lark(
            tool_call_grammar(
                ToolCallFormat::Mistral,
                &tools(),
                &ToolChoice::Required,
                false,
            )
            .unwrap(),
        );
        assert!(g.starts_with("start: \"[\" call \"]\"\n"), "{g}");
    }

    #[test]
    fn auto_and_none_need_no_grammar_and_errors_name_the_problem() {
        for choice in [ToolChoice::Auto, ToolChoice::None] {
            assert_eq!(
                tool_call_grammar(ToolCallFormat::Hermes, &tools(), &choice, true).unwrap(),
                None
            );
        }
        assert_eq!(
            tool_call_grammar(
                ToolCallFormat::Hermes,
                &tools(),
                &ToolChoice::Function("nope".into()),
                true
            ),
            Err(ToolError::UnknownFunction("nope".into()))
        );
        assert!(matches!(
            tool_call_grammar(ToolCallFormat::Hermes, &[], &ToolChoice::Required, true),
            Err(ToolError::NoTools(_))
        ));
        for (tool, what) in [
            (serde_json::json!({"type": "retrieval"}), "retrieval"),
            (
                serde_json::json!({"type": "function", "function": {}}),
                "name",
            ),
            (
                serde_json::json!({"type": "function", "function": {"name": "f", "parameters": 3}}),
                "parameters",
            ),
        ] {
            let e = function_defs(&[tool]).unwrap_err().to_string();
            assert!(e.contains("tools[0]") && e.contains(what), "{e}");
        }
        let twice = [tools()[1].clone(), tools()[1].clone()];
        assert!(function_defs(&twice)
            .unwrap_err()
            .to_string()
            .contains("tools[1]"));
    }

    #[test]
    fn lark_strings_are_escaped() {
        assert_eq!(lark_string("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }
}
