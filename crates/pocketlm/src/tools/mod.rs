//! Tool (function) calling: the call formats of the model families we run, parsed from
//! generated text ([`parse_tool_calls`], and incrementally [`stream::ToolCallStreamParser`]),
//! a fallback prompt for chat templates that know no tools ([`fallback_system_prompt`]), and
//! the grammar that makes a model call a tool ([`grammar::tool_call_grammar`]).
//!
//! Formats ([`ToolCallFormat`]), as the models' own chat templates teach them and as vLLM's
//! tool parsers (`hermes`, `llama3_json`, `mistral`) read them:
//!
//! - **Hermes** (Qwen2.5, Qwen3, NousResearch Hermes, and our fallback): one
//!   `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` block per call; several
//!   blocks in a row are parallel calls. Text outside the blocks is the message content.
//! - **Llama 3.1+ JSON**: the whole answer is `{"name": ..., "parameters": {...}}` (optionally
//!   after `<|python_tag|>`), several separated by `;`.
//! - **Mistral**: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers), or
//!   `[TOOL_CALLS]name[ARGS]{...}` once per call (v11+ tokenizers). `[TOOL_CALLS]` is a control
//!   token that a decoder skipping special tokens drops, so a bare `[{"name": ...}]` answer is
//!   read as calls too.
//!
//! Calls are OpenAI's shape ([`ToolCall`]): `arguments` is JSON text, ids are `call_` and 24
//! random alphanumerics (9 alphanumerics for Mistral, whose templates require that).

pub mod grammar;
pub mod stream;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// One tool call, as OpenAI's chat API carries it in `message.tool_calls[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id (`call_...`); a `tool` message answers it with `tool_call_id`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// Which function, with what arguments.
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".into()
}

/// The function part of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// The arguments as JSON text (OpenAI's shape: a string holding a JSON object).
    pub arguments: String,
}

impl ToolCall {
    /// A `function` call with a fresh id for `format`.
    pub fn new(format: ToolCallFormat, name: impl Into<String>, arguments: String) -> Self {
        ToolCall {
            id: format.new_call_id(),
            kind: function_type(),
            function: FunctionCall {
                name: name.into(),
                arguments,
            },
        }
    }

    /// The arguments parsed as JSON (a mapping for chat templates, which expect one); the text
    /// itself as a JSON string when it is not valid JSON.
    pub fn arguments_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.function.arguments)
            .unwrap_or_else(|_| serde_json::Value::String(self.function.arguments.clone()))
    }
}

/// How a model writes its tool calls (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolCallFormat {
    /// `<tool_call>{"name": .., "arguments": ..}</tool_call>` (Qwen2.5/Qwen3, Hermes, fallback).
    #[default]
    Hermes,
    /// `{"name": .., "parameters": ..}` (Llama 3.1, 3.2, 3.3).
    Llama3Json,
    /// `[TOOL_CALLS][{"name": .., "arguments": ..}]` (Mistral).
    Mistral,
}

impl ToolCallFormat {
    /// The format a chat template teaches, read from its source: `[TOOL_CALLS]` is Mistral,
    /// `<tool_call>` Hermes, `<|python_tag|>` or Llama's `"parameters"` instruction Llama 3 JSON;
    /// anything else (also templates without tools) Hermes, the fallback's format.
    pub fn detect(template_source: &str) -> Self {
        if template_source.contains("[TOOL_CALLS]") {
            ToolCallFormat::Mistral
        } else if template_source.contains("<tool_call>") {
            ToolCallFormat::Hermes
        } else if template_source.contains("<|python_tag|>")
            || (template_source.contains("<|eot_id|>") && template_source.contains("parameters"))
        {
            ToolCallFormat::Llama3Json
        } else {
            ToolCallFormat::Hermes
        }
    }

    /// A fresh call id: `call_` and 24 random alphanumerics, or 9 alphanumerics for Mistral
    /// (its templates refuse other ids).
    pub fn new_call_id(self) -> String {
        let n = if self == ToolCallFormat::Mistral {
            9
        } else {
            24
        };
        let mut rng = rand::rng();
        let tail: String = (0..n)
            .map(|_| rng.sample(rand::distr::Alphanumeric) as char)
            .collect();
        if self == ToolCallFormat::Mistral {
            tail
        } else {
            format!("call_{tail}")
        }
    }

    /// The text that starts a call in this format (what a streaming parser must hold back).
    pub fn call_marker(self) -> &'static str {
        match self {
            ToolCallFormat::Hermes => "<tool_call>",
            ToolCallFormat::Llama3Json => "<|python_tag|>",
            ToolCallFormat::Mistral => "[TOOL_CALLS]",
        }
    }
}

/// Generated text split into the message content and the tool calls it makes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOutput {
    /// Text outside the calls, trimmed (empty when the answer is only calls).
    pub content: String,
    /// The calls, in order.
    pub tool_calls: Vec<ToolCall>,
}

/// Whether a chat template renders the `tools` variable itself (its source mentions it).
/// Templates that do not get [`fallback_system_prompt`] instead.
pub fn template_knows_tools(template_source: &str) -> bool {
    template_source.contains("tools")
}

/// The system-prompt text that teaches tools to a model whose chat template knows none (the
/// default SmolLM2's): Qwen2.5's own tool instructions, i.e. the Hermes format, with the tool
/// definitions one JSON object per line inside `<tools></tools>`. `tools`: OpenAI tool
/// definitions (`{"type": "function", "function": {...}}`), written as given.
pub fn fallback_system_prompt(tools: &[serde_json::Value]) -> String {
    let mut out = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools {
        out.push('\n');
        out.push_str(&serde_json::to_string(t).unwrap_or_default());
    }
    out.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    out
}

/// The Hermes text of a call, as the fallback renders an assistant turn's `tool_calls`:
/// `<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>`.
pub fn hermes_call_text(call: &ToolCall) -> String {
    let name = serde_json::Value::String(call.function.name.clone());
    let args = call.arguments_value();
    format!("<tool_call>\n{{\"name\": {name}, \"arguments\": {args}}}\n</tool_call>")
}

/// Splits a whole generated answer into content and tool calls in `format`. Text that looks
/// like a call but does not parse (bad JSON, no `name`) stays content: nothing is dropped. An
/// answer without calls is returned as it is (content untrimmed, as a stream shows it); with
/// calls, the content around them is trimmed.
pub fn parse_tool_calls(format: ToolCallFormat, text: &str) -> ParsedOutput {
    let parsed = match format {
        ToolCallFormat::Hermes => parse_hermes(text),
        ToolCallFormat::Llama3Json => parse_llama(text),
        ToolCallFormat::Mistral => parse_mistral(text),
    };
    if parsed.tool_calls.is_empty() {
        return ParsedOutput {
            content: text.to_owned(),
            tool_calls: Vec::new(),
        };
    }
    parsed
}

/// One call object `{"name": .., "arguments"|"parameters": ..}` -> a call. Arguments given as
/// a JSON string (some models do) are kept as that text when it holds JSON.
fn call_from_object(format: ToolCallFormat, v: &serde_json::Value) -> Option<ToolCall> {
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?;
    let args = obj
        .get("arguments")
        .or_else(|| obj.get("parameters"))
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    let arguments = match &args {
        serde_json::Value::String(s) if serde_json::from_str::<serde_json::Value>(s).is_ok() => {
            s.clone()
        }
        other => other.to_string(),
    };
    let mut call = ToolCall::new(format, name, arguments);
    if let Some(id) = obj.get("id").and_then(|i| i.as_str()) {
        call.id = id.to_owned();
    }
    Some(call)
}

/// `call` with its arguments as the model wrote them in `body` (its spacing kept), when they
/// are a JSON object: the text a stream sends piece by piece ([`stream`]), so that a streamed
/// and a whole answer carry the same `arguments` string.
fn with_raw_arguments(mut call: ToolCall, body: &str) -> ToolCall {
    type Fields = std::collections::HashMap<String, Box<serde_json::value::RawValue>>;
    if let Ok(fields) = serde_json::from_str::<Fields>(body.trim()) {
        if let Some(raw) = fields.get("arguments").or_else(|| fields.get("parameters")) {
            if raw.get().starts_with('{') {
                call.function.arguments = raw.get().to_owned();
            }
        }
    }
    call
}

fn parse_hermes(text: &str) -> ParsedOutput {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let (body, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        match serde_json::from_str::<serde_json::Value>(body.trim())
            .ok()
            .and_then(|v| call_from_object(ToolCallFormat::Hermes, &v))
            .map(|call| with_raw_arguments(call, body))
        {
            Some(call) => calls.push(call),
            None => content.push_str(&rest[start..rest.len() - next.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    ParsedOutput {
        content: content.trim().to_owned(),
        tool_calls: calls,
    }
}

/// JSON values one after another, separated by whitespace and `sep` characters; `None` when
/// anything else is in between or a value is not a call object.
fn call_sequence(format: ToolCallFormat, text: &str, sep: char) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
        let value = stream.next()?.ok()?;
        let used = stream.byte_offset();
        calls.push(call_from_object(format, &value)?);
        rest = rest[used..].trim_start();
        rest = rest.strip_prefix(sep).unwrap_or(rest).trim_start();
    }
    (!calls.is_empty()).then_some(calls)
}

fn parse_llama(text: &str) -> ParsedOutput {
    let trimmed = text.trim_start();
    let body = trimmed.strip_prefix("<|python_tag|>").unwrap_or(trimmed);
    if body.trim_start().starts_with('{') {
        if let Some(calls) = call_sequence(ToolCallFormat::Llama3Json, body, ';') {
            return ParsedOutput {
                content: String::new(),
                tool_calls: calls,
            };
        }
    }
    ParsedOutput {
        content: text.trim().to_owned(),
        tool_calls: Vec::new(),
    }
}

/// The calls after a Mistral `[TOOL_CALLS]` marker (marker already removed).
fn mistral_calls(body: &str) -> Option<Vec<ToolCall>> {
    let f = ToolCallFormat::Mistral;
    let body = body.trim();
    if body.starts_with('[') {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let calls: Option<Vec<ToolCall>> = v
            .as_array()?
            .iter()
            .map(|c| call_from_object(f, c))
            .collect();
        return calls.filter(|c| !c.is_empty());
    }
    // Newer form: name[ARGS]{...}, one per [TOOL_CALLS] (split by the caller).
    let (name, args) = body.split_once("[ARGS]")?;
    let args = args.trim();
    serde_json::from_str::<serde_json::Value>(args).ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| vec![ToolCall::new(f, name, args.to_owned())])
}

fn parse_mistral(text: &str) -> ParsedOutput {
    const MARK: &str = "[TOOL_CALLS]";
    let none = || ParsedOutput {
        content: text.trim().to_owned(),
        tool_calls: Vec::new(),
    };
    let Some(start) = text.find(MARK) else {
        // The marker was dropped as a special token: a bare list of call objects.
        let t = text.trim_start();
        if t.starts_with("[{") {
            if let Some(calls) = mistral_calls(t) {
                return ParsedOutput {
                    content: String::new(),
                    tool_calls: calls,
                };
            }
        }
        return none();
    };
    let mut calls = Vec::new();
    for part in text[start + MARK.len()..].split(MARK) {
        match mistral_calls(part) {
            Some(c) => calls.extend(c),
            None => return none(),
        }
    }
    ParsedOutput {
        content: text[..start].trim().to_owned(),
        tool_calls: calls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &ParsedOutput) -> Vec<(&str, serde_json::Value)> {
        p.tool_calls
            .iter()
            .map(|c| (c.function.name.as_str(), c.arguments_value()))
            .collect()
    }

    #[test]
    fn hermes_blocks_are_calls_and_the_rest_is_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let p = parse_tool_calls(ToolCallFormat::Hermes, text);
        assert_eq!(p.content, "Let me check.");
        assert_eq!(
            names(&p),
            vec![
                ("get_weather", serde_json::json!({"city": "Paris"})),
                ("get_time", serde_json::json!({}))
            ]
        );
        assert!(p.tool_calls[0].id.starts_with("call_"));
        assert_eq!(p.tool_calls[0].id.len(), 29);
        assert_ne!(p.tool_calls[0].id, p.tool_calls[1].id);
        assert_eq!(p.tool_calls[0].kind, "function");
        // Arguments given as a JSON string, and a call cut off before its closing tag.
        let p = parse_tool_calls(
            ToolCallFormat::Hermes,
            "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}",
        );
        assert_eq!(names(&p), vec![("f", serde_json::json!({"a": 1}))]);
    }

    #[test]
    fn hermes_text_that_does_not_parse_stays_content() {
        for text in [
            "Plain answer.",
            " Plain answer with spaces.\n",
            "<tool_call>\nnot json\n</tool_call> after",
            "<tool_call>{\"arguments\": {}}</tool_call>",
        ] {
            let p = parse_tool_calls(ToolCallFormat::Hermes, text);
            assert!(p.tool_calls.is_empty(), "{text}");
            assert_eq!(p.content, text, "{text}");
        }
    }

    #[test]
    fn llama_json_calls() {
        let p = parse_tool_calls(
            ToolCallFormat::Llama3Json,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
        );
        assert_eq!(
            names(&p),
            vec![("get_weather", serde_json::json!({"city": "Oslo"}))]
        );
        assert_eq!(p.content, "");
        let p = parse_tool_calls(
            ToolCallFormat::Llama3Json,
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": [1]}}",
        );
        assert_eq!(
            names(&p),
            vec![
                ("a", serde_json::json!({})),
                ("b", serde_json::json!({"x": [1]}))
            ]
        );
        for text in [
            "The answer is {x}.",
            "{\"name\": \"a\"} trailing words",
            "{not json",
        ] {
            let p = parse_tool_calls(ToolCallFormat::Llama3Json, text);
            assert!(p.tool_calls.is_empty(), "{text}");
            assert_eq!(p.content, text);
        }
    }

    #[test]
    fn mistral_calls_old_and_new_forms() {
        let p = parse_tool_calls(
            ToolCallFormat::Mistral,
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}, \"id\": \"abcDEF123\"}, {\"name\": \"get_time\", \"arguments\": {}}]",
        );
        assert_eq!(
            names(&p),
            vec![
                ("get_weather", serde_json::json!({"city": "Rome"})),
                ("get_time", serde_json::json!({}))
            ]
        );
        assert_eq!(p.tool_calls[0].id, "abcDEF123", "the model's id is kept");
        assert_eq!(p.tool_calls[1].id.len(), 9);
        assert!(p.tool_calls[1]
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric()));
        let p = parse_tool_calls(
            ToolCallFormat::Mistral,
            "Sure.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Rome\"}[TOOL_CALLS]get_time[ARGS]{}",
        );
        assert_eq!(p.content, "Sure.");
        assert_eq!(
            names(&p),
            vec![
                ("get_weather", serde_json::json!({"city": "Rome"})),
                ("get_time", serde_json::json!({}))
            ]
        );
        let p = parse_tool_calls(
            ToolCallFormat::Mistral,
            "[{\"name\": \"f\", \"arguments\": {}}]",
        );
        assert_eq!(
            names(&p),
            vec![("f", serde_json::json!({}))],
            "marker dropped"
        );
        let p = parse_tool_calls(ToolCallFormat::Mistral, "[TOOL_CALLS] nonsense");
        assert!(p.tool_calls.is_empty());
        assert_eq!(p.content, "[TOOL_CALLS] nonsense");
    }

    #[test]
    fn format_is_detected_from_the_template() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/chat_template/");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}{f}")).expect("template");
        assert_eq!(
            ToolCallFormat::detect(&read("qwen3-0.6b.jinja")),
            ToolCallFormat::Hermes
        );
        assert_eq!(
            ToolCallFormat::detect(&read("llama-3.2-3b-instruct.jinja")),
            ToolCallFormat::Llama3Json
        );
        assert_eq!(
            ToolCallFormat::detect(&read("mistral-nemo-instruct-2407.jinja")),
            ToolCallFormat::Mistral
        );
        assert_eq!(
            ToolCallFormat::detect(&read("gemma-2-2b-it.jinja")),
            ToolCallFormat::Hermes,
            "no tools: the fallback"
        );
        assert!(!template_knows_tools(&read("gemma-2-2b-it.jinja")));
        assert!(template_knows_tools(&read("qwen3-0.6b.jinja")));
    }

    #[test]
    fn fallback_prompt_lists_the_tools_and_the_format() {
        let tool = serde_json::json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}});
        let p = fallback_system_prompt(std::slice::from_ref(&tool));
        assert!(p.contains(&format!("<tools>\n{tool}\n</tools>")), "{p}");
        assert!(p.ends_with("</tool_call>"), "{p}");
        let call = ToolCall::new(
            ToolCallFormat::Hermes,
            "get_time",
            "{\"tz\":\"UTC\"}".into(),
        );
        assert_eq!(
            hermes_call_text(&call),
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\":\"UTC\"}}\n</tool_call>"
        );
    }
}
