//! `POST /v1/responses`: OpenAI's Responses API (what Codex-style clients speak), on the chat
//! generation path ([`crate::chat`]). Shapes from OpenAI's API reference "Responses": `input`
//! (a string, or items: messages with `input_text` / `output_text` parts, `function_call`,
//! `function_call_output`), `instructions` (a system message first), function `tools`
//! (`{"type": "function", "name", "description", "parameters"}`), `tool_choice`,
//! `parallel_tool_calls`, `max_output_tokens`, `temperature`, `top_p`, `text.format`
//! (`text`, `json_object`, `json_schema`), `stream`. The answer's `output` holds a `message`
//! item with one `output_text` part and one `function_call` item per call; streamed, the
//! events `response.created`, `response.in_progress`, `response.output_item.added`,
//! `response.content_part.added`, `response.output_text.delta`, `response.output_text.done`,
//! `response.content_part.done`, `response.function_call_arguments.delta`,
//! `response.function_call_arguments.done`, `response.output_item.done`,
//! `response.completed`, each an SSE `event:` line and its JSON `data:` with `type` and
//! `sequence_number`.

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

use crate::api::ResponseFormat;
use crate::chat::{self, BasicSampling, ChatEvent, ChatSpec};
use crate::error::ApiError;
use crate::{new_id, parse_checked, sse_response, unix_now, AppState};

/// Fields of `POST /v1/responses` this server honours (plus [`crate::api::IGNORED_FIELDS`]).
pub const RESPONSES_FIELDS: [&str; 13] = [
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "text",
    "truncation",
    "top_k",
];

/// Body of `POST /v1/responses`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponsesRequest {
    /// Model id (any; the loaded model answers).
    #[serde(default)]
    pub model: Option<String>,
    /// A user message as a string, or a list of input items.
    pub input: Value,
    /// A system message put first.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Tools; only `function` tools.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required` or `{"type": "function", "name": ...}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether several calls may come in one answer (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Most output tokens.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// Temperature in `[0, 2]`.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Extension (as vLLM's): top-k.
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Stream events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`.
    #[serde(default)]
    pub text: Option<Value>,
    /// Only `disabled` (the default) is supported.
    #[serde(default)]
    pub truncation: Option<String>,
}

fn text_of(content: &Value, param: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(|t| t.as_str()), p.get("text").and_then(|t| t.as_str())) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::bad_param(
                            &format!("{param}[{j}]"),
                            format!(
                                "`{param}[{j}]` is a `{}` part; only `input_text` and `output_text` parts are supported",
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
            format!("`{param}` must be a string or a list of parts"),
        )),
    }
}

/// Converts OpenAI's Responses-API function tool `{"type": "function", "name", ...}` to the chat
/// shape `{"type": "function", "function": {...}}`.
fn chat_tool(t: &Value, i: usize) -> Result<Value, ApiError> {
    let bad = |m: &str| ApiError::bad_param(&format!("tools[{i}]"), format!("`tools[{i}]`: {m}"));
    match t.get("type").and_then(|k| k.as_str()) {
        Some("function") => {}
        Some(other) => {
            return Err(bad(&format!(
                "type `{other}` is not supported; only `function` tools are"
            )))
        }
        None => return Err(bad("`type` is missing")),
    }
    let mut f = serde_json::Map::new();
    for key in ["name", "description", "parameters"] {
        if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
            f.insert(key.into(), v.clone());
        }
    }
    Ok(json!({"type": "function", "function": f}))
}

impl ResponsesRequest {
    /// The conversation: `instructions` as a system message, then the input items in order
    /// (consecutive `function_call` items form one assistant turn with several calls).
    ///
    /// Errors: 400 naming `input[i]` for an item of another type or role.
    pub fn messages(&self) -> Result<Vec<Message>, ApiError> {
        let mut out = Vec::new();
        if let Some(i) = &self.instructions {
            out.push(Message::system(i.clone()));
        }
        let items = match &self.input {
            Value::String(s) => {
                return Ok({
                    out.push(Message::user(s.clone()));
                    out
                })
            }
            Value::Array(items) => items,
            _ => {
                return Err(ApiError::bad_param(
                    "input",
                    "`input` must be a string or a list of items",
                ))
            }
        };
        for (i, item) in items.iter().enumerate() {
            let param = format!("input[{i}]");
            let kind = item
                .get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("message");
            match kind {
                "message" => {
                    let role = match item.get("role").and_then(|r| r.as_str()) {
                        Some("developer") | Some("system") => "system",
                        Some(r @ ("user" | "assistant")) => r,
                        other => {
                            return Err(ApiError::bad_param(
                                &format!("{param}.role"),
                                format!("`{param}.role` is {other:?}; expected user, assistant, system or developer"),
                            ))
                        }
                    };
                    let text = text_of(item.get("content").unwrap_or(&Value::Null), &format!("{param}.content"))?;
                    out.push(Message::new(role, text));
                }
                "function_call" => {
                    let get = |k: &str| {
                        item.get(k).and_then(|v| v.as_str()).map(str::to_owned).ok_or_else(|| {
                            ApiError::bad_param(&format!("{param}.{k}"), format!("`{param}.{k}` is missing"))
                        })
                    };
                    let call = ToolCall {
                        id: get("call_id")?,
                        kind: "function".into(),
                        function: FunctionCall {
                            name: get("name")?,
                            arguments: get("arguments")?,
                        },
                    };
                    match out.last_mut() {
                        Some(m) if m.role == "assistant" && !m.tool_calls.is_empty() => m.tool_calls.push(call),
                        Some(m) if m.role == "assistant" && m.tool_calls.is_empty() && i > 0
                            && items[i - 1].get("type").and_then(|t| t.as_str()).unwrap_or("message") == "message" =>
                        {
                            m.tool_calls.push(call)
                        }
                        _ => out.push(Message::assistant_tool_calls("", vec![call])),
                    }
                }
                "function_call_output" => {
                    let call_id = item.get("call_id").and_then(|v| v.as_str()).ok_or_else(|| {
                        ApiError::bad_param(&format!("{param}.call_id"), format!("`{param}.call_id` is missing"))
                    })?;
                    let output = match item.get("output") {
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => text_of(v, &format!("{param}.output"))?,
                        None => String::new(),
                    };
                    out.push(Message::tool(call_id, None, output));
                }
                other => {
                    return Err(ApiError::bad_param(
                        &format!("{param}.type"),
                        format!("`{param}.type` is `{other}`; only `message`, `function_call` and `function_call_output` items are supported"),
                    ))
                }
            }
        }
        Ok(out)
    }
}

fn tool_choice(v: &Value) -> Result<ToolChoice, ApiError> {
    crate::api::parse_tool_choice(v)
}

/// The response object (`status` `in_progress` with empty output while streaming starts).
fn response_object(
    id: &str,
    created: u64,
    model: &str,
    req: &ResponsesRequest,
    status: &str,
    output: Vec<Value>,
    usage: Option<(usize, usize)>,
) -> Value {
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": output,
        "error": null,
        "incomplete_details": null,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": {},
        "parallel_tool_calls": req.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": null,
        "reasoning": null,
        "store": false,
        "temperature": req.temperature,
        "text": req.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        "tool_choice": req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        "tools": req.tools.clone().unwrap_or_default(),
        "top_p": req.top_p,
        "truncation": "disabled",
        "user": null,
        "usage": usage.map(|(i, o)| json!({
            "input_tokens": i,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": o,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": i + o,
        })),
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "in_progress" {
        json!([])
    } else {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
           "arguments": arguments, "status": status})
}

/// `POST /v1/responses`.
pub(crate) async fn create_response(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ResponsesRequest = parse_checked(body, &[&RESPONSES_FIELDS])?;
    if req.truncation.as_deref().is_some_and(|t| t != "disabled") {
        return Err(ApiError::bad_param(
            "truncation",
            "only `truncation: disabled` is supported",
        ));
    }
    let tools = req
        .tools
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| chat_tool(t, i))
        .collect::<Result<Vec<_>, _>>()?;
    let response_constraint = match req.text.as_ref().and_then(|t| t.get("format")) {
        None => None,
        Some(f) => {
            // The Responses API flattens json_schema's fields into `format`.
            let f = match f.get("type").and_then(|t| t.as_str()) {
                Some("json_schema") if f.get("json_schema").is_none() => {
                    json!({"type": "json_schema", "json_schema": f})
                }
                _ => f.clone(),
            };
            let rf: ResponseFormat = serde_json::from_value(f)
                .map_err(|e| ApiError::bad_param("text.format", format!("`text.format`: {e}")))?;
            rf.constraint().map_err(|e| e.with_param("text.format"))?
        }
    };
    let choice = match &req.tool_choice {
        Some(v) => tool_choice(v)?,
        None => ToolChoice::Auto,
    };
    let spec = ChatSpec::single(
        req.messages()?,
        "input",
        tools,
        (choice, req.parallel_tool_calls.unwrap_or(true)),
        response_constraint,
        BasicSampling {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            max_tokens: req.max_output_tokens,
            stop: None,
            stream: req.stream,
        },
    );
    let started = chat::start_chat(&s, spec).await?;
    let prompt_tokens = started.prompt_tokens;
    let id = new_id("resp");
    let created = unix_now();
    let model = s.model_id.to_string();
    if req.stream.unwrap_or(false) {
        return Ok(stream_response(started, id, created, model, req));
    }
    let out = chat::collect_choices(started).await?.remove(0);
    let mut output = Vec::new();
    if !out.content.is_empty() || out.tool_calls.is_empty() {
        output.push(message_item(&new_id("msg"), &out.content, "completed"));
    }
    for c in &out.tool_calls {
        output.push(call_item(
            &new_id("fc"),
            &c.id,
            &c.function.name,
            &c.function.arguments,
            "completed",
        ));
    }
    let mut resp = response_object(
        &id,
        created,
        &model,
        &req,
        "completed",
        output,
        Some((prompt_tokens, out.completion_tokens)),
    );
    if out.finish_reason == "length" {
        resp["status"] = json!("incomplete");
        resp["incomplete_details"] = json!({"reason": "max_output_tokens"});
    }
    Ok(Json(resp).into_response())
}

/// The state of a streamed response: the open output item and what it has said.
struct Streamer {
    seq: u64,
    id: String,
    created: u64,
    model: String,
    req: ResponsesRequest,
    prompt_tokens: usize,
    /// Finished output items.
    output: Vec<Value>,
    /// The open message item: (item id, text so far).
    message: Option<(String, String)>,
    /// The open call item: (item id, call id, name, arguments so far).
    call: Option<(String, String, String, String)>,
}

impl Streamer {
    fn ev(&mut self, kind: &str, mut data: Value) -> String {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        format!("event: {kind}\ndata: {data}\n\n")
    }

    fn close_message(&mut self) -> String {
        let Some((item_id, text)) = self.message.take() else {
            return String::new();
        };
        let index = self.output.len();
        let mut out = self.ev(
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": index, "content_index": 0, "text": text}),
        );
        out += &self.ev(
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": index, "content_index": 0,
            "part": {"type": "output_text", "text": text, "annotations": []}}),
        );
        let item = message_item(&item_id, &text, "completed");
        out += &self.ev(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.output.push(item);
        out
    }

    fn close_call(&mut self) -> String {
        let Some((item_id, call_id, name, args)) = self.call.take() else {
            return String::new();
        };
        let index = self.output.len();
        let mut out = self.ev(
            "response.function_call_arguments.done",
            json!({"item_id": item_id, "output_index": index, "arguments": args}),
        );
        let item = call_item(&item_id, &call_id, &name, &args, "completed");
        out += &self.ev(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.output.push(item);
        out
    }

    fn on(&mut self, e: ChatEvent) -> String {
        match e {
            ChatEvent::Content(text) => {
                let mut out = self.close_call();
                let index = self.output.len();
                if self.message.is_none() {
                    let item_id = new_id("msg");
                    out += &self.ev("response.output_item.added", json!({"output_index": index, "item": message_item(&item_id, "", "in_progress")}));
                    out += &self.ev(
                        "response.content_part.added",
                        json!({"item_id": item_id, "output_index": index, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": []}}),
                    );
                    self.message = Some((item_id, String::new()));
                }
                let item_id = self
                    .message
                    .as_ref()
                    .map(|m| m.0.clone())
                    .unwrap_or_default();
                if let Some(m) = &mut self.message {
                    m.1.push_str(&text);
                }
                out += &self.ev("response.output_text.delta", json!({"item_id": item_id, "output_index": index, "content_index": 0, "delta": text}));
                out
            }
            ChatEvent::CallStart { id, name, .. } => {
                let mut out = self.close_message();
                out += &self.close_call();
                let item_id = new_id("fc");
                let index = self.output.len();
                out += &self.ev("response.output_item.added", json!({"output_index": index, "item": call_item(&item_id, &id, &name, "", "in_progress")}));
                self.call = Some((item_id, id, name, String::new()));
                out
            }
            ChatEvent::CallArguments { fragment, .. } => {
                let index = self.output.len();
                let Some(call) = &mut self.call else {
                    return String::new();
                };
                call.3.push_str(&fragment);
                let item_id = call.0.clone();
                self.ev(
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": index, "delta": fragment}),
                )
            }
            ChatEvent::Done {
                finish_reason,
                completion_tokens,
            } => {
                let mut out = self.close_message();
                out += &self.close_call();
                if self.output.is_empty() {
                    // An empty answer is still one (empty) message.
                    out += &self.on(ChatEvent::Content(String::new()));
                    out += &self.close_message();
                }
                let mut resp = response_object(
                    &self.id,
                    self.created,
                    &self.model,
                    &self.req,
                    "completed",
                    self.output.clone(),
                    Some((self.prompt_tokens, completion_tokens)),
                );
                let kind = if finish_reason == "length" {
                    resp["status"] = json!("incomplete");
                    resp["incomplete_details"] = json!({"reason": "max_output_tokens"});
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                out += &self.ev(kind, json!({"response": resp}));
                out
            }
            ChatEvent::Error(e) => {
                let mut resp = response_object(
                    &self.id,
                    self.created,
                    &self.model,
                    &self.req,
                    "failed",
                    self.output.clone(),
                    None,
                );
                resp["error"] = json!({"code": "server_error", "message": e.message});
                self.ev("response.failed", json!({"response": resp}))
            }
        }
    }
}

fn stream_response(
    started: chat::Started,
    id: String,
    created: u64,
    model: String,
    req: ResponsesRequest,
) -> Response {
    let mut st = Streamer {
        seq: 0,
        id,
        created,
        model,
        req,
        prompt_tokens: started.prompt_tokens,
        output: Vec::new(),
        message: None,
        call: None,
    };
    let initial = response_object(
        &st.id,
        st.created,
        &st.model,
        &st.req,
        "in_progress",
        Vec::new(),
        None,
    );
    let mut head = st.ev("response.created", json!({"response": initial.clone()}));
    head += &st.ev("response.in_progress", json!({"response": initial}));
    let st = std::sync::Arc::new(std::sync::Mutex::new(st));
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

    fn request(v: Value) -> ResponsesRequest {
        serde_json::from_value(v).expect("request parses")
    }

    /// Content then a call: a message item with text deltas, then a function_call item with
    /// argument deltas, then `response.completed` holding both items; sequence numbers count up.
    #[test]
    fn stream_events_follow_the_responses_api() {
        let mut st = Streamer {
            seq: 0,
            id: "resp_1".into(),
            created: 0,
            model: "m".into(),
            req: request(json!({"input": "x"})),
            prompt_tokens: 3,
            output: Vec::new(),
            message: None,
            call: None,
        };
        let mut sse = String::new();
        for e in [
            ChatEvent::Content("Hi".into()),
            ChatEvent::CallStart {
                id: "call_1".into(),
                name: "f".into(),
            },
            ChatEvent::CallArguments {
                fragment: "{}".into(),
            },
            ChatEvent::Done {
                finish_reason: "tool_calls",
                completion_tokens: 4,
            },
        ] {
            sse.push_str(&st.on(e));
        }
        let ev: Vec<(String, Value)> = sse
            .split("\n\n")
            .filter(|b| !b.is_empty())
            .map(|b| {
                let (n, d) = b.split_once('\n').unwrap();
                (
                    n.trim_start_matches("event: ").to_owned(),
                    serde_json::from_str(d.trim_start_matches("data: ")).unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        for (i, (name, data)) in ev.iter().enumerate() {
            assert_eq!(data["type"], name.as_str());
            assert_eq!(data["sequence_number"], i);
        }
        let done = &ev.last().unwrap().1["response"];
        assert_eq!(done["output"][0]["content"][0]["text"], "Hi");
        assert_eq!(done["output"][1]["type"], "function_call");
        assert_eq!(done["output"][1]["call_id"], "call_1");
        assert_eq!(ev[7].1["output_index"], 1);
        assert_eq!(done["usage"]["total_tokens"], 7);
    }

    #[test]
    fn input_items_become_chat_messages() {
        let r = request(json!({"instructions": "Be brief.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_2", "output": "noon"}
        ]}));
        let m = r.messages().unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "tool"]);
        assert_eq!(m[2].tool_calls.len(), 2, "consecutive calls are one turn");
        assert_eq!(m[4].tool_call_id.as_deref(), Some("call_2"));
        let bad = request(json!({"input": [{"type": "web_search_call"}]}));
        assert_eq!(
            bad.messages().unwrap_err().param.as_deref(),
            Some("input[0].type")
        );
        assert_eq!(
            chat_tool(&json!({"type": "function", "name": "f"}), 0).unwrap(),
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert!(chat_tool(&json!({"type": "file_search"}), 2).is_err());
    }
}
