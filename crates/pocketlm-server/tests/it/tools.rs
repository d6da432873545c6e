//! Tools, structured output, the request-field policy, `n`, penalties, `/v1/responses` and
//! `/v1/messages` against the server on loopback with the real default model (SmolLM2, whose
//! template knows no tools: the Hermes fallback). Tests that need the grammar engine to force
//! a call or a schema are `#[ignore]`d until it is merged (branch `grammar`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pocketlm::chat_template::Message;
use pocketlm::loader::{LoadedModel, Prompt};
use pocketlm::tools::{FunctionCall, ToolCall};
use pocketlm_server::ServerConfig;
use serde_json::{json, Value};

fn model() -> Arc<LoadedModel> {
    pocketlm_testutil::default_model(false)
}

fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        format!(
            "http://{}",
            super::start_server(ServerConfig {
                port: 0,
                queue_size: 256,
                ..ServerConfig::default()
            })
        )
    })
}

/// POSTs `body`; returns (status, raw body text).
fn post_text(path: &str, body: &Value) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into();
    let mut resp = agent
        .post(format!("{}{path}", base()))
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().expect("body"))
}

fn post(path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = post_text(path, body);
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")),
    )
}

/// The `data:` payloads of a server-sent-events body, with their `event:` names (if any).
fn sse_events(text: &str) -> Vec<(Option<String>, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut name = None;
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_owned());
            } else if let Some(d) = line.strip_prefix("data: ") {
                if d != "[DONE]" {
                    out.push((name.clone(), serde_json::from_str(d).expect("event JSON")));
                }
            }
        }
    }
    out
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}})
}

/// Every field of OpenAI's chat request (API reference, "Create chat completion") is either
/// honoured (or documented as ignorable) and answered 200, or refused with a 400 naming it.
#[test]
fn every_openai_chat_field_is_honoured_or_refused() {
    let all = json!({
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "model": "any",
        "frequency_penalty": 0.1,
        "logit_bias": {"42": -1},
        "logprobs": true,
        "top_logprobs": 2,
        "max_completion_tokens": 3,
        "max_tokens": 3,
        "metadata": {"k": "v"},
        "modalities": ["text"],
        "n": 2,
        "parallel_tool_calls": true,
        "presence_penalty": 0.1,
        "prompt_cache_key": "k",
        "response_format": {"type": "text"},
        "safety_identifier": "s",
        "seed": 1,
        "service_tier": "auto",
        "stop": ["\n\n"],
        "store": false,
        "stream": false,
        "stream_options": {"include_usage": true},
        "temperature": 0.7,
        "tool_choice": "auto",
        "tools": [weather_tool()],
        "top_p": 0.9,
        "user": "u",
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    });
    let (status, v) = post("/v1/chat/completions", &all);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");
    for (i, c) in v["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(c["index"], i, "{v}");
        assert!(c["logprobs"]["content"].is_array(), "{v}");
    }
    for (field, value) in [
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("function_call", json!("auto")),
        ("functions", json!([{"name": "f"}])),
        ("prediction", json!({"type": "content", "content": "x"})),
        ("reasoning_effort", json!("low")),
        ("verbosity", json!("low")),
        ("web_search_options", json!({})),
        ("made_up_field", json!(1)),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1});
        body[field] = value;
        let (status, v) = post("/v1/chat/completions", &body);
        assert_eq!(status, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    for (field, value) in [
        ("modalities", json!(["text", "audio"])),
        ("logit_bias", json!({"99999999": 1})),
        ("presence_penalty", json!(3)),
        ("n", json!(0)),
        ("tool_choice", json!("sometimes")),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
        ),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1});
        body[field] = value;
        let (status, v) = post("/v1/chat/completions", &body);
        assert_eq!(status, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
    // A forced call needs tools; a named function must be among them.
    let (status, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "required"}),
    );
    assert_eq!(
        (status, v["error"]["param"].clone()),
        (400, json!("tool_choice")),
        "{v}"
    );
    let (status, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "tools": [weather_tool()],
                "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    );
    assert_eq!(
        (status, v["error"]["param"].clone()),
        (400, json!("tool_choice")),
        "{v}"
    );
    let (status, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "retrieval"}]}),
    );
    assert_eq!(
        (status, v["error"]["param"].clone()),
        (400, json!("tools")),
        "{v}"
    );
    // Legacy completions: `echo`, `suffix` refused, unknown fields too.
    for (field, value) in [
        ("echo", json!(true)),
        ("suffix", json!("x")),
        ("best_of", json!(3)),
        ("tools", json!([])),
    ] {
        let mut body = json!({"prompt": "Hi", "max_tokens": 1});
        body[field] = value;
        let (status, v) = post("/v1/completions", &body);
        assert_eq!(status, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
}

/// The tools reach the chat template (SmolLM2's fallback puts them in the system turn), and a
/// conversation with an assistant `tool_calls` turn and a `tool` result renders as the library
/// renders it: the prompt tokens the server reports are those of
/// `LoadedModel::render_chat_with_tools`.
#[test]
fn tools_and_tool_turns_reach_the_prompt() {
    let m = model();
    let user = Message::user("What is the weather in Paris?");
    let count = |p: Prompt| m.encode(&p).expect("encode").len();
    let plain = count(Prompt::Chat(vec![user.clone()]));
    let with_tools = count(Prompt::ChatWithTools {
        messages: vec![user.clone()],
        tools: vec![weather_tool()],
    });
    assert!(with_tools > plain + 40, "{with_tools} vs {plain}");
    let (status, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                "tools": [weather_tool()], "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], with_tools, "{v}");
    // tool_choice none: no tools rendered.
    let (_, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                "tools": [weather_tool()], "tool_choice": "none", "max_tokens": 2}),
    );
    assert_eq!(v["usage"]["prompt_tokens"], plain, "{v}");
    // The rest of a round trip: the call and its result go back in; a final answer comes out.
    let call = ToolCall {
        id: "call_abc".into(),
        kind: "function".into(),
        function: FunctionCall {
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        },
    };
    let conversation = vec![
        user.clone(),
        Message::assistant_tool_calls("", vec![call]),
        Message::tool("call_abc", Some("get_weather".into()), r#"{"celsius": 21}"#),
    ];
    let want = count(Prompt::ChatWithTools {
        messages: conversation,
        tools: vec![weather_tool()],
    });
    let (status, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_abc", "name": "get_weather", "content": "{\"celsius\": 21}"}],
          "tools": [weather_tool()], "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], want, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
}

/// `n` choices (streamed and not), and `logit_bias` forcing a token.
#[test]
fn n_choices_and_logit_bias() {
    let (status, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Say something."}], "n": 3,
                "max_tokens": 4, "seed": 5}),
    );
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let total: u64 = choices.len() as u64;
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() >= total,
        "{v}"
    );
    let (status, text) = post_text(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Say something."}], "n": 2,
                "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(status, 200, "{text}");
    let events = sse_events(&text);
    let finished: Vec<u64> = events
        .iter()
        .filter(|(_, e)| e["choices"][0]["finish_reason"].is_string())
        .map(|(_, e)| e["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(finished, vec![0, 1], "{text}");
    assert!(
        events.last().unwrap().1["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            >= 2
    );
    // logit_bias +100 on one token: greedy decoding picks it every time.
    let m = model();
    let id = m.tokenizer.encode("Paris", false).expect("encode")[0];
    let piece = m.tokenizer.decode(&[id], true).expect("decode");
    let (status, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                "temperature": 0, "logit_bias": {id.to_string(): 100}}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        piece.repeat(3),
        "{v}"
    );
}

/// `/v1/responses` and `/v1/messages` answer in their APIs' shapes, streamed and not.
#[test]
fn responses_and_messages_endpoints() {
    let (status, v) = post(
        "/v1/responses",
        &json!({"model": "m", "instructions": "Be brief.", "input": "Say hello.",
                "max_output_tokens": 4, "temperature": 0, "tools": [
                    {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "response");
    assert!(
        ["completed", "incomplete"].contains(&v["status"].as_str().unwrap()),
        "{v}"
    );
    assert_eq!(v["output"][0]["type"], "message", "{v}");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text", "{v}");
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 10, "{v}");
    let (status, text) = post_text(
        "/v1/responses",
        &json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
                "max_output_tokens": 4, "stream": true}),
    );
    assert_eq!(status, 200, "{text}");
    let events = sse_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    assert_eq!(
        names[..2],
        ["response.created", "response.in_progress"],
        "{text}"
    );
    assert!(names.contains(&"response.output_text.delta"), "{text}");
    let last = names.last().unwrap();
    assert!(
        *last == "response.completed" || *last == "response.incomplete",
        "{text}"
    );
    let seq: Vec<u64> = events
        .iter()
        .map(|(_, e)| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seq, (0..seq.len() as u64).collect::<Vec<_>>());
    let delta_text: String = events
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("response.output_text.delta"))
        .map(|(_, e)| e["delta"].as_str().unwrap().to_owned())
        .collect();
    let final_text = &events.last().unwrap().1["response"]["output"][0]["content"][0]["text"];
    assert_eq!(final_text, &json!(delta_text));
    let (status, v) = post(
        "/v1/responses",
        &json!({"input": "x", "previous_response_id": "resp_1"}),
    );
    assert_eq!(
        (status, v["error"]["param"].clone()),
        (400, json!("previous_response_id"))
    );

    let (status, v) = post(
        "/v1/messages",
        &json!({"model": "m", "system": "Be brief.", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
                "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["type"].clone(), v["role"].clone()),
        (json!("message"), json!("assistant"))
    );
    assert_eq!(v["content"][0]["type"], "text", "{v}");
    assert!(
        ["end_turn", "max_tokens"].contains(&v["stop_reason"].as_str().unwrap()),
        "{v}"
    );
    let (status, text) = post_text(
        "/v1/messages",
        &json!({"max_tokens": 4, "stream": true, "messages": [{"role": "user", "content": "Say hello."}]}),
    );
    assert_eq!(status, 200, "{text}");
    let names: Vec<String> = sse_events(&text)
        .into_iter()
        .map(|(n, _)| n.unwrap())
        .collect();
    assert_eq!(
        names.first().map(String::as_str),
        Some("message_start"),
        "{text}"
    );
    assert_eq!(
        names.last().map(String::as_str),
        Some("message_stop"),
        "{text}"
    );
    for n in [
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
    ] {
        assert!(names.iter().any(|x| x == n), "{n}: {text}");
    }
    // Errors in Anthropic's shape, naming the refused field in the message.
    let (status, v) = post(
        "/v1/messages",
        &json!({"max_tokens": 4, "messages": [], "thinking": {}}),
    );
    assert_eq!(
        (status, &v["type"], &v["error"]["type"]),
        (400, &json!("error"), &json!("invalid_request_error")),
        "{v}"
    );
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("thinking"), "{v}");
}

/// With the grammar engine: `tool_choice: "required"` makes even the 135M default model call
/// the tool, with arguments that match the schema, streamed (OpenAI deltas) and not.
#[test]
fn required_tool_call_is_enforced() {
    let body = json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [weather_tool()], "tool_choice": "required", "parallel_tool_calls": false,
        "max_tokens": 48, "temperature": 0});
    let (status, v) = post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    let call = &c["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{v}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{v}");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{v}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, text) = post_text("/v1/chat/completions", &streamed);
    let events = sse_events(&text);
    let mut name = String::new();
    let mut arguments = String::new();
    for (_, e) in &events {
        if let Some(tc) = e["choices"][0]["delta"]["tool_calls"].as_array() {
            name.push_str(tc[0]["function"]["name"].as_str().unwrap_or(""));
            arguments.push_str(tc[0]["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(name, "get_weather", "{text}");
    // The same text: both keep the model's own spacing.
    assert_eq!(
        arguments,
        call["function"]["arguments"].as_str().unwrap(),
        "{text}"
    );
    assert!(!text.contains("\"content\":\"<tool_call>"), "{text}");
    let finish = events
        .iter()
        .rev()
        .find_map(|(_, e)| e["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"), "{text}");
}
