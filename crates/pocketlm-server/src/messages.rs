//! `POST /v1/messages`: Anthropic's Messages API (what Claude-Code-style clients speak), on the
//! chat generation path ([`crate::chat`]). Shapes from Anthropic's API reference "Messages":
//! `system` (a string or text blocks), `messages` (`user` / `assistant`, content a string or
//! blocks: `text`, `tool_use` `{id, name, input}`, `tool_result` `{tool_use_id, content,
//! is_error}`), `tools` (`{name, description, input_schema}`), `tool_choice` (`auto`, `any`,
//! `tool` with `name`, `none`; `disable_parallel_tool_use`), `max_tokens` (required),
//! `stop_sequences`, `temperature`, `top_p`, `top_k`, `stream`. The answer's `content` holds a
//! `text` block and one `tool_use` block per call, `stop_reason` `end_turn`, `max_tokens`,
//! `stop_sequence` or `tool_use`; streamed, the events `message_start`, `content_block_start`,
//! `content_block_delta` (`text_delta`, `input_json_delta`), `content_block_stop`,
//! `message_delta` and `message_stop`. Errors keep OpenAI's JSON shape (status codes as
//! Anthropic's: 400 for a bad request).

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use pocketlm::chat_template::Message;
use pocketlm::tools::grammar::ToolChoice;
use pocketlm::tools::{FunctionCall, ToolCall};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::chat::{self, BasicSampling, ChatEvent, ChatSpec};
use crate::error::ApiError;
use crate::{new_id, parse_checked, sse_response, AppState};

/// Fields of `POST /v1/messages` this server honours (plus [`crate::api::IGNORED_FIELDS`];
/// Anthropic's `metadata` and `service_tier` are among them).
pub const MESSAGES_FIELDS: [&str; 11] = [
    "model",
    "messages",
    "system",
    "max_tokens",
    "tools",
    "tool_choice",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "stream",
];

/// Body of `POST /v1/messages`.
#[derive(Debug, Clone, Deserialize)]
pub struct MessagesRequest {
    /// Model id (any; the loaded model answers).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<AnthropicMessage>,
    /// A system prompt: a string or text blocks.
    #[serde(default)]
    pub system: Option<Value>,
    /// Most output tokens (required by Anthropic's API).
    pub max_tokens: u64,
    /// `{name, description, input_schema}` tools.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `{"type": "auto" | "any" | "tool" | "none", "name", "disable_parallel_tool_use"}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Stop strings.
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    /// Temperature in `[0, 1]` (Anthropic's range; up to 2 accepted).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Top-k.
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Stream events.
    #[serde(default)]
    pub stream: Option<bool>,
}

/// One message of the conversation.
#[derive(Debug, Clone, Deserialize)]
pub struct AnthropicMessage {
    /// `user` or `assistant`.
    pub role: String,
    /// A string or content blocks.
    pub content: Value,
}

fn block_text(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (j, b) in blocks.iter().enumerate() {
                match (
                    b.get("type").and_then(|t| t.as_str()),
                    b.get("text").and_then(|t| t.as_str()),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::bad_param(
                            &format!("{param}[{j}]"),
                            format!(
                            "`{param}[{j}]` is a `{}` block; only `text` blocks are supported here",
                            kind.unwrap_or("?")
                        ),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::bad_param(
            param,
            format!("`{param}` must be a string or a list of blocks"),
        )),
    }
}

impl MessagesRequest {
    /// The conversation as chat messages: `system` first; in a user turn, `tool_result` blocks
    /// become `tool` messages (before the turn's text); in an assistant turn, `tool_use`
    /// blocks become its `tool_calls`.
    ///
    /// Errors: 400 naming `messages[i].role` or `messages[i].content[j]` for another role or
    /// block type (images are not supported here).
    pub fn chat_messages(&self) -> Result<Vec<Message>, ApiError> {
        let mut out = Vec::new();
        if let Some(sys) = &self.system {
            out.push(Message::system(block_text(sys, "system")?));
        }
        if self.messages.is_empty() {
            return Err(ApiError::bad_param("messages", "`messages` is empty"));
        }
        for (i, m) in self.messages.iter().enumerate() {
            if m.role != "user" && m.role != "assistant" {
                return Err(ApiError::bad_param(
                    &format!("messages[{i}].role"),
                    format!(
                        "`messages[{i}].role` is `{}`; expected user or assistant",
                        m.role
                    ),
                ));
            }
            let blocks = match &m.content {
                Value::String(s) => {
                    out.push(Message::new(m.role.clone(), s.clone()));
                    continue;
                }
                Value::Array(b) => b,
                _ => {
                    return Err(ApiError::bad_param(
                        &format!("messages[{i}].content"),
                        format!("`messages[{i}].content` must be a string or a list of blocks"),
                    ))
                }
            };
            let mut text = String::new();
            let mut calls = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                let param = format!("messages[{i}].content[{j}]");
                let missing =
                    |k: &str| ApiError::bad_param(&param, format!("`{param}.{k}` is missing"));
                match b.get("type").and_then(|t| t.as_str()) {
                    Some("text") => text.push_str(b.get("text").and_then(|t| t.as_str()).ok_or_else(|| missing("text"))?),
                    Some("tool_use") if m.role == "assistant" => calls.push(ToolCall {
                        id: b.get("id").and_then(|v| v.as_str()).ok_or_else(|| missing("id"))?.to_owned(),
                        kind: "function".into(),
                        function: FunctionCall {
                            name: b.get("name").and_then(|v| v.as_str()).ok_or_else(|| missing("name"))?.to_owned(),
                            arguments: b.get("input").cloned().unwrap_or_else(|| json!({})).to_string(),
                        },
                    }),
                    Some("tool_result") if m.role == "user" => {
                        let id = b.get("tool_use_id").and_then(|v| v.as_str()).ok_or_else(|| missing("tool_use_id"))?;
                        let mut content = block_text(b.get("content").unwrap_or(&Value::Null), &format!("{param}.content"))?;
                        if b.get("is_error").and_then(|e| e.as_bool()) == Some(true) {
                            content = format!("Error: {content}");
                        }
                        out.push(Message::tool(id, None, content));
                    }
                    other => {
                        return Err(ApiError::bad_param(
                            &param,
                            format!("`{param}` is a `{}` block; supported: text, tool_use (assistant), tool_result (user)", other.unwrap_or("?")),
                        ))
                    }
                }
            }
            if !calls.is_empty() {
                out.push(Message::assistant_tool_calls(text, calls));
            } else if !text.is_empty()
                || m.role == "assistant"
                || !blocks
                    .iter()
                    .any(|b| b.get("type").and_then(|t| t.as_str()) == Some("tool_result"))
            {
                out.push(Message::new(m.role.clone(), text));
            }
        }
        Ok(out)
    }

    /// `tools` in the chat shape. Errors: 400 naming `tools[i]` without a `name`.
    pub fn chat_tools(&self) -> Result<Vec<Value>, ApiError> {
        self.tools
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, t)| {
                let name = t.get("name").and_then(|n| n.as_str()).ok_or_else(|| {
                    ApiError::bad_param(
                        &format!("tools[{i}]"),
                        format!("`tools[{i}].name` is missing"),
                    )
                })?;
                let mut f = serde_json::Map::new();
                f.insert("name".into(), json!(name));
                if let Some(d) = t.get("description") {
                    f.insert("description".into(), d.clone());
                }
                f.insert(
                    "parameters".into(),
                    t.get("input_schema")
                        .cloned()
                        .unwrap_or_else(|| json!({"type": "object"})),
                );
                Ok(json!({"type": "function", "function": f}))
            })
            .collect()
    }

    /// `(tool_choice, parallel)`. Errors: 400 naming `tool_choice` for another shape.
    pub fn choice(&self) -> Result<(ToolChoice, bool), ApiError> {
        let Some(v) = &self.tool_choice else {
            return Ok((ToolChoice::Auto, true));
        };
        let parallel = v.get("disable_parallel_tool_use").and_then(|d| d.as_bool()) != Some(true);
        let choice = match v.get("type").and_then(|t| t.as_str()) {
            Some("auto") => ToolChoice::Auto,
            Some("any") => ToolChoice::Required,
            Some("none") => ToolChoice::None,
            Some("tool") => ToolChoice::Function(
                v.get("name")
                    .and_then(|n| n.as_str())
                    .ok_or_else(|| {
                        ApiError::bad_param("tool_choice", "`tool_choice.name` is missing")
                    })?
                    .to_owned(),
            ),
            _ => {
                return Err(ApiError::bad_param(
                    "tool_choice",
                    format!("`tool_choice` is {v}; expected type auto, any, tool or none"),
                ))
            }
        };
        Ok((choice, parallel))
    }
}

fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "tool_calls" => "tool_use",
        "length" => "max_tokens",
        _ => "end_turn",
    }
}

/// Anthropic's error type for `e` (`docs.anthropic.com` "Errors": `invalid_request_error`,
/// `authentication_error`, `not_found_error`, `request_too_large`, `overloaded_error`,
/// `api_error`).
fn anthropic_error_type(e: &ApiError) -> &'static str {
    match (e.status.as_u16(), e.kind) {
        (413, _) => "request_too_large",
        (503, _) => "overloaded_error",
        (_, "invalid_request_error") => "invalid_request_error",
        (_, "authentication_error") => "authentication_error",
        (_, "not_found_error") => "not_found_error",
        _ => "api_error",
    }
}

/// `e` as Anthropic's error body: `{"type": "error", "error": {"type": ..., "message": ...}}`.
fn anthropic_error_body(e: &ApiError) -> Value {
    json!({"type": "error", "error": {"type": anthropic_error_type(e), "message": e.message}})
}

/// `POST /v1/messages`; errors in Anthropic's shape ([`anthropic_error_body`]), with the
/// same status codes (an API key refused before the handler keeps OpenAI's shape).
pub(crate) async fn create_message(
    state: State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match create_message_inner(state, body).await {
        Ok(r) => r,
        Err(e) => (e.status, Json(anthropic_error_body(&e))).into_response(),
    }
}

async fn create_message_inner(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: MessagesRequest = parse_checked(body, &[&MESSAGES_FIELDS])?;
    let (tool_choice, parallel) = req.choice()?;
    let spec = ChatSpec::single(
        req.chat_messages()?,
        "messages",
        req.chat_tools()?,
        (tool_choice, parallel),
        None,
        BasicSampling {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            max_tokens: Some(req.max_tokens),
            stop: req.stop_sequences.clone(),
            stream: req.stream,
        },
    );
    let started = chat::start_chat(&s, spec).await?;
    let prompt_tokens = started.prompt_tokens;
    let id = new_id("msg");
    let model = s.model_id.to_string();
    if req.stream.unwrap_or(false) {
        return Ok(stream_message(started, id, model));
    }
    let out = chat::collect_choices(started).await?.remove(0);
    let mut content = Vec::new();
    if !out.content.is_empty() || out.tool_calls.is_empty() {
        content.push(json!({"type": "text", "text": out.content}));
    }
    for c in &out.tool_calls {
        let input: Value =
            serde_json::from_str(&c.function.arguments).unwrap_or_else(|_| json!({}));
        content
            .push(json!({"type": "tool_use", "id": c.id, "name": c.function.name, "input": input}));
    }
    Ok(Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(out.finish_reason),
        "stop_sequence": null,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": out.completion_tokens},
    }))
    .into_response())
}

/// The state of a streamed message: the open content block.
struct Streamer {
    /// Index of the open block, if any, and whether it is text.
    open: Option<(usize, bool)>,
    next: usize,
}

fn ev(kind: &str, data: Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

impl Streamer {
    fn close(&mut self) -> String {
        match self.open.take() {
            Some((i, _)) => ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": i}),
            ),
            None => String::new(),
        }
    }

    fn on(&mut self, e: ChatEvent) -> String {
        match e {
            ChatEvent::Content(text) => {
                let mut out = String::new();
                let index = match self.open {
                    Some((i, true)) => i,
                    _ => {
                        out += &self.close();
                        let i = self.next;
                        self.next += 1;
                        self.open = Some((i, true));
                        out += &ev(
                            "content_block_start",
                            json!({"type": "content_block_start", "index": i,
                            "content_block": {"type": "text", "text": ""}}),
                        );
                        i
                    }
                };
                out += &ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
                );
                out
            }
            ChatEvent::CallStart { id, name, .. } => {
                let mut out = self.close();
                let i = self.next;
                self.next += 1;
                self.open = Some((i, false));
                out += &ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i,
                    "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
                );
                out
            }
            ChatEvent::CallArguments { fragment, .. } => match self.open {
                Some((i, false)) => ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i,
                    "delta": {"type": "input_json_delta", "partial_json": fragment}}),
                ),
                _ => String::new(),
            },
            ChatEvent::Done {
                finish_reason,
                completion_tokens,
            } => {
                let mut out = String::new();
                if self.next == 0 {
                    out += &self.on(ChatEvent::Content(String::new()));
                }
                out += &self.close();
                out += &ev(
                    "message_delta",
                    json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason(finish_reason), "stop_sequence": null},
                    "usage": {"output_tokens": completion_tokens}}),
                );
                out += &ev("message_stop", json!({"type": "message_stop"}));
                out
            }
            ChatEvent::Error(e) => ev("error", anthropic_error_body(&e)),
        }
    }
}

fn stream_message(started: chat::Started, id: String, model: String) -> Response {
    let head = ev(
        "message_start",
        json!({"type": "message_start", "message": {
        "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": started.prompt_tokens, "output_tokens": 0}}}),
    );
    let st = std::sync::Arc::new(std::sync::Mutex::new(Streamer {
        open: None,
        next: 0,
    }));
    let events = chat::chat_events(started).map(move |e| {
        let text = match st.lock() {
            Ok(mut s) => s.on(e),
            Err(_) => String::new(),
        };
        Ok::<_, std::convert::Infallible>(text)
    });
    let stream = futures_util::stream::once(async move { Ok(head) }).chain(events);
    sse_response(Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(sse: &str) -> Vec<(String, Value)> {
        sse.split("\n\n")
            .filter(|b| !b.is_empty())
            .map(|b| {
                let (name, data) = b.split_once('\n').expect("event and data lines");
                let name = name.strip_prefix("event: ").expect("event line").to_owned();
                let data = data.strip_prefix("data: ").expect("data line");
                (name, serde_json::from_str(data).expect("JSON"))
            })
            .collect()
    }

    #[test]
    fn errors_have_anthropics_shape() {
        let e = ApiError::bad_param("max_tokens", "`max_tokens` must be at least 1");
        assert_eq!(
            anthropic_error_body(&e),
            json!({"type": "error", "error": {"type": "invalid_request_error",
                "message": "`max_tokens` must be at least 1"}})
        );
        assert_eq!(
            anthropic_error_type(&ApiError::queue_full(4)),
            "overloaded_error"
        );
        assert_eq!(anthropic_error_type(&ApiError::internal("x")), "api_error");
        assert_eq!(
            anthropic_error_type(&ApiError::payload_too_large("x")),
            "request_too_large"
        );
        assert_eq!(
            anthropic_error_type(&ApiError::not_found("x")),
            "not_found_error"
        );
    }

    /// Text, then a call: a text block, then a tool_use block with its input as
    /// `input_json_delta`s, then `message_delta` with `stop_reason: tool_use`.
    #[test]
    fn stream_blocks_follow_anthropics_event_order() {
        let mut st = Streamer {
            open: None,
            next: 0,
        };
        let mut sse = String::new();
        for e in [
            ChatEvent::Content("Let me ".into()),
            ChatEvent::Content("check.".into()),
            ChatEvent::CallStart {
                id: "call_1".into(),
                name: "get_weather".into(),
            },
            ChatEvent::CallArguments {
                fragment: "{\"city\": \"Paris\"}".into(),
            },
            ChatEvent::Done {
                finish_reason: "tool_calls",
                completion_tokens: 9,
            },
        ] {
            sse.push_str(&st.on(e));
        }
        let ev = events(&sse);
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(ev[4].1["content_block"]["type"], "tool_use");
        assert_eq!(ev[4].1["index"], 1);
        assert_eq!(ev[5].1["delta"]["type"], "input_json_delta");
        assert_eq!(ev[7].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(ev[7].1["usage"]["output_tokens"], 9);
        for (name, data) in &ev {
            assert_eq!(data["type"], name.as_str());
        }
    }

    #[test]
    fn requests_map_to_chat_messages_and_tools() {
        let req: MessagesRequest = serde_json::from_value(json!({
            "max_tokens": 5, "system": [{"type": "text", "text": "Be brief."}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Rome"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}
            ]}))
        .unwrap();
        let m = req.chat_messages().unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(m[2].content, "Checking.");
        assert_eq!(
            m[2].tool_calls[0].arguments_value(),
            json!({"city": "Rome"})
        );
        assert_eq!(m[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(m[3].content, "sunny");
        assert_eq!(
            req.chat_tools().unwrap()[0]["function"]["parameters"],
            json!({"type": "object"})
        );
        assert_eq!(
            req.choice().unwrap(),
            (ToolChoice::Function("get_weather".into()), false)
        );
        let bad: MessagesRequest = serde_json::from_value(json!({"max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}))
        .unwrap();
        assert_eq!(
            bad.chat_messages().unwrap_err().param.as_deref(),
            Some("messages[0].content[0]")
        );
    }
}
