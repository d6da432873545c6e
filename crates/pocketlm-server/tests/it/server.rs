//! End-to-end tests of the OpenAI-compatible server on loopback, with the real default model
//! (SmolLM2-135M-Instruct Q4_1, found through `$POCKETLM_HOME` or fetched by
//! `pocketlm::fetch::ensure_default_model`). Answers are kept to a few tokens.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pocketlm::chat_template::Message;
use pocketlm::loader::{LoadedModel, Prompt};
use pocketlm_server::ServerConfig;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const KEY: &str = "sk-test-key";

fn model() -> Arc<LoadedModel> {
    pocketlm_testutil::default_model(false)
}

/// Starts a server on a free loopback port in a background thread; returns its base URL.
fn start(config: ServerConfig) -> String {
    format!("http://{}", super::start_server(config))
}

/// The shared server: API key set, one generation at a time, a deep queue.
fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        start(ServerConfig {
            port: 0,
            api_key: Some(KEY.into()),
            queue_size: 1024,
            ..ServerConfig::default()
        })
    })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// POSTs `body` (raw bytes) with the API key; returns (status, body text).
fn post_raw(agent: &ureq::Agent, path: &str, body: &[u8]) -> (u16, String) {
    let mut resp = agent
        .post(format!("{}{path}", base()))
        .header("Authorization", format!("Bearer {KEY}"))
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .expect("body");
    (status, text)
}

fn post(path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = post_raw(&agent(), path, body.to_string().as_bytes());
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

/// Checks OpenAI's error shape and returns the error object.
fn assert_error(status: u16, expected: u16, body: &Value) -> Value {
    assert_eq!(status, expected, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].as_str().is_some(), "{body}");
    let obj = e.as_object().expect("error object");
    assert!(
        obj.contains_key("param") && obj.contains_key("code"),
        "{body}"
    );
    e.clone()
}

/// The data payloads of a server-sent-event body, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without `data: `: {e:?}"))
                .to_string()
        })
        .collect()
}

fn chat_prompt_tokens(messages: &[Message]) -> usize {
    model()
        .encode(&Prompt::Chat(messages.to_vec()))
        .expect("encode")
        .len()
}

#[test]
fn health_and_models() {
    let a = agent();
    let mut r = a
        .get(format!("{}/health", base()))
        .call()
        .expect("GET /health");
    assert_eq!(r.status().as_u16(), 200);
    let v: Value =
        serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("json");
    assert_eq!(v["status"], "ok");
    let mut r = a
        .get(format!("{}/v1/models", base()))
        .header("Authorization", format!("Bearer {KEY}"))
        .call()
        .expect("GET /v1/models");
    assert_eq!(r.status().as_u16(), 200);
    let v: Value =
        serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("json");
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(v["data"][0]["object"], "model");
    // No embedding model: the chat model alone (embeddings.rs checks the other case).
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{v}");
}

#[test]
fn chat_non_stream_and_stream_agree() {
    let question = "What is the capital of France?";
    let req = json!({
        "model": "anything",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 6,
        "temperature": 0,
        "user": "someone",
        "metadata": {"documented as": "ignorable"},
    });
    let (status, v) = post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "SmolLM2-135M-Instruct.Q4_1");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().expect("content");
    assert!(!content.trim().is_empty(), "{v}");
    let finish = choice["finish_reason"].as_str().expect("finish_reason");
    let usage = &v["usage"];
    let prompt_tokens = chat_prompt_tokens(&[Message::user(question)]);
    assert_eq!(usage["prompt_tokens"], prompt_tokens);
    let completion = usage["completion_tokens"]
        .as_u64()
        .expect("completion_tokens");
    match finish {
        "length" => assert_eq!(completion, 6),
        "stop" => assert!((1..6).contains(&completion)),
        other => panic!("finish_reason {other}"),
    }
    assert_eq!(usage["total_tokens"], prompt_tokens as u64 + completion);
    // The greedy completion decodes back to the same tokens.
    let ids = model().tokenizer.encode(content, false).expect("encode");
    assert!(ids.len() as u64 <= completion, "{content:?}");

    // Streamed: same greedy text, role first, one finish chunk, usage, [DONE].
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (status, text) = post_raw(
        &agent(),
        "/v1/chat/completions",
        sreq.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut finishes = Vec::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        if let Some(ch) = c["choices"].get(0) {
            if let Some(t) = ch["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
            if let Some(f) = ch["finish_reason"].as_str() {
                finishes.push(f.to_string());
            }
        }
    }
    assert_eq!(streamed, content);
    assert_eq!(finishes, vec![finish.to_string()]);
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"].as_array().map(Vec::len), Some(0));
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][k], usage[k], "{k}");
    }
    // The prefix cache: the tokens reused are reported, fewer than the prompt's (the same
    // prompt a second time reuses its whole blocks but the last token).
    for u in [usage, &last["usage"]] {
        let cached = u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached_tokens");
        assert!(cached < prompt_tokens as u64, "{u}");
    }
}

#[test]
fn completions_honour_stop_strings() {
    let base_req = json!({
        "prompt": "The days of the week are Monday, Tuesday,",
        "max_tokens": 8,
        "temperature": 0,
    });
    let (status, v) = post("/v1/completions", &base_req);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let full = v["choices"][0]["text"].as_str().expect("text").to_string();
    assert!(full.chars().count() >= 4, "too short to cut: {full:?}");
    // Stop at a piece of the greedy answer from its middle; the answer ends just before it.
    let cut = full
        .char_indices()
        .nth(full.chars().count() / 2)
        .map(|(i, _)| i)
        .unwrap_or(0);
    let cut = if cut == 0 { 1 } else { cut };
    let stop: String = full[cut..].chars().take(2).collect();
    let expected = &full[..full.find(&stop).expect("stop is in the text")];
    for stop_value in [
        json!(stop.clone()),
        json!(["never-produced-xyz", stop.clone()]),
    ] {
        let mut req = base_req.clone();
        req["stop"] = stop_value;
        let (status, v) = post("/v1/completions", &req);
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["text"], expected,
            "stop {stop:?} in {full:?}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        // Streamed, the stop string is held back and never sent.
        req["stream"] = json!(true);
        let (status, text) = post_raw(&agent(), "/v1/completions", req.to_string().as_bytes());
        assert_eq!(status, 200, "{text}");
        let mut streamed = String::new();
        let mut finish = None;
        for d in sse_data(&text) {
            if d == "[DONE]" {
                break;
            }
            let c: Value = serde_json::from_str(&d).expect("chunk");
            streamed.push_str(c["choices"][0]["text"].as_str().unwrap_or(""));
            if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
        assert_eq!(streamed, expected);
        assert_eq!(finish.as_deref(), Some("stop"));
    }
}

#[test]
fn error_statuses_and_shapes() {
    let a = agent();
    // 401: missing and wrong key.
    let url = format!("{}/v1/chat/completions", base());
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).to_string();
    for auth in [None, Some("Bearer wrong"), Some(KEY)] {
        let mut r = a.post(&url);
        if let Some(h) = auth {
            r = r.header("Authorization", h);
        }
        let mut resp = r.send(body.as_bytes()).expect("send");
        let v: Value =
            serde_json::from_str(&resp.body_mut().read_to_string().expect("body")).expect("json");
        let e = assert_error(resp.status().as_u16(), 401, &v);
        assert_eq!(e["type"], "authentication_error");
    }
    // The scheme is case-insensitive: `bearer KEY` is accepted.
    let resp = a
        .post(&url)
        .header("Authorization", format!("bearer {KEY}"))
        .send(body.as_bytes())
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    // 404: unknown route (JSON, not an empty body).
    let mut resp = a
        .get(format!("{}/v1/nothing-here", base()))
        .call()
        .expect("get");
    let v: Value =
        serde_json::from_str(&resp.body_mut().read_to_string().expect("body")).expect("json");
    assert_error(resp.status().as_u16(), 404, &v);
    // 400s.
    let cases: Vec<(&[u8], Option<&str>)> = vec![
        (b"{\"messages\": [", None),
        (b"not json at all", None),
        (br#"{"messages": "hello"}"#, None),
        (
            br#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
            None,
        ),
        (
            br#"{"messages": [{"role": "user", "content": "x"}], "temperature": 5}"#,
            Some("temperature"),
        ),
        (
            br#"{"messages": [{"role": "user", "content": "x"}], "top_p": -1}"#,
            Some("top_p"),
        ),
        (
            br#"{"messages": [{"role": "user", "content": "x"}], "n": 0}"#,
            Some("n"),
        ),
        (
            br#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}"#,
            Some("max_tokens"),
        ),
        (
            br#"{"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}"#,
            Some("stop"),
        ),
        (br#"{"messages": []}"#, Some("messages")),
        (
            br#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
            Some("messages[0].content[0]"),
        ),
    ];
    for (body, param) in cases {
        let (status, text) = post_raw(&a, "/v1/chat/completions", body);
        let v: Value = serde_json::from_str(&text).expect("json");
        let e = assert_error(status, 400, &v);
        assert_eq!(e["type"], "invalid_request_error");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{v}");
        }
    }
    // A prompt longer than the context: 400 context_length_exceeded.
    let long = "hello ".repeat(model().model.info().context_length + 10);
    let (status, v) = post("/v1/completions", &json!({"prompt": long, "max_tokens": 1}));
    let e = assert_error(status, 400, &v);
    assert_eq!(e["code"], "context_length_exceeded");
    // 413: body over 1 MiB.
    // The server answers once it has read past the limit and closes the connection with the
    // rest of the body unread; the client can then see a reset instead of the answer (or a
    // broken pipe while sending). Such attempts say nothing about the server: try again.
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(2 << 20));
    let (status, v) = (0..10)
        .find_map(|_| post_oversized(big.as_bytes()))
        .expect("an answer to the oversized body in 10 attempts");
    assert_error(status, 413, &v);
}

/// POSTs a body over the size limit on a raw socket; `None` when the connection was reset
/// before an answer could be read.
fn post_oversized(body: &[u8]) -> Option<(u16, Value)> {
    let addr = base().trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .ok()?;
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    // The body may be chunked; the JSON object is the part between the outer braces.
    let json = body.get(body.find('{')?..=body.rfind('}')?)?;
    Some((status, serde_json::from_str(json).ok()?))
}

/// 1,000 malformed bodies of several kinds: every answer is a 4xx JSON error, and the server
/// still answers /health afterwards.
#[test]
fn fuzz_malformed_bodies() {
    let a = agent();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let valid = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0.5,
        "stop": ["x"],
    })
    .to_string();
    let junk_values = [
        json!(null),
        json!(true),
        json!(-1),
        json!("text"),
        json!({"a": [1, {"b": null}]}),
        json!([[[]]]),
        json!(1.5e300),
    ];
    for i in 0..1000 {
        let body: Vec<u8> = match i % 6 {
            // Random bytes.
            0 => (0..rng.random_range(0..300))
                .map(|_| rng.random())
                .collect(),
            // Truncated valid JSON.
            1 => valid.as_bytes()[..rng.random_range(0..valid.len() - 1)].to_vec(),
            // A field of the wrong type.
            2 => {
                let field = [
                    "messages",
                    "temperature",
                    "top_p",
                    "max_tokens",
                    "stop",
                    "seed",
                    "n",
                    "stream",
                ][rng.random_range(0..8)];
                let mut v: Value = serde_json::from_str(&valid).expect("valid");
                let wrong = match field {
                    "messages" => json!({"role": "user"}),
                    "stop" => json!(17),
                    "stream" => json!("yes"),
                    _ => json!({"nested": ["junk"]}),
                };
                v[field] = wrong;
                v.to_string().into_bytes()
            }
            // Huge or out-of-range numbers.
            3 => {
                let (field, num) = [
                    ("max_tokens", "1e400"),
                    ("max_tokens", "-5"),
                    ("temperature", "1e308"),
                    ("temperature", "-0.5"),
                    ("seed", "123456789012345678901234567890"),
                    ("n", "18446744073709551616"),
                    ("top_p", "7"),
                ][rng.random_range(0..7)];
                format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"{field}":{num}}}"#)
                    .into_bytes()
            }
            // Deeply nested junk.
            4 => {
                let depth = rng.random_range(100..5000);
                format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
            }
            // A JSON value that is not a request (no `messages`, junk in its place).
            _ => {
                let j = &junk_values[rng.random_range(0..junk_values.len())];
                json!({"message": j, "content": j, "prompt_": j})
                    .to_string()
                    .into_bytes()
            }
        };
        let path = if rng.random_bool(0.5) {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let (status, text) = post_raw(&a, path, &body);
        assert!(
            (400..500).contains(&status),
            "case {i} {}: {status} {text}",
            String::from_utf8_lossy(&body)
        );
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("case {i}: not JSON ({e}): {text}"));
        assert_error(status, status, &v);
    }
    let r = a
        .get(format!("{}/health", base()))
        .call()
        .expect("GET /health");
    assert_eq!(r.status().as_u16(), 200);
}

/// Sends a raw HTTP/1.1 POST and returns the open connection.
fn raw_post(base: &str, path: &str, body: &str) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    s
}

/// With one generation slot and no queue, a second request gets 503 while a stream runs; when
/// the streaming client disconnects its generation stops and frees the slot.
#[test]
fn queue_full_then_disconnect_frees_the_slot() {
    let base = start(ServerConfig {
        port: 0,
        max_concurrency: 1,
        queue_size: 0,
        ..ServerConfig::default()
    });
    // A long generation (ignore_eos, 4000 tokens: minutes on a CPU).
    let long = json!({
        "messages": [{"role": "user", "content": "Count to ten thousand."}],
        "max_tokens": 4000,
        "ignore_eos": true,
        "stream": true,
    })
    .to_string();
    let mut s = raw_post(&base, "/v1/chat/completions", &long);
    // Wait for the first content chunk: the generation holds the slot.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"delta\":{\"content\"") {
        let n = s.read(&mut buf).expect("read stream");
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    let short = json!({"prompt": "Hello", "max_tokens": 1}).to_string();
    let a = agent();
    let mut resp = a
        .post(format!("{base}/v1/completions"))
        .send(short.as_bytes())
        .expect("send");
    let v: Value =
        serde_json::from_str(&resp.body_mut().read_to_string().expect("body")).expect("json");
    let e = assert_error(resp.status().as_u16(), 503, &v);
    assert_eq!(e["code"], "queue_full");
    // Disconnect; the slot must come back long before 4000 tokens could be generated.
    drop(s);
    wait_for_free_slot(&a, &base);

    // The same for a non-streamed request whose client leaves while it is generating.
    let mut long: Value = serde_json::from_str(&long).expect("json");
    long["stream"] = json!(false);
    let mut s = raw_post(&base, "/v1/chat/completions", &long.to_string());
    let t0 = Instant::now();
    loop {
        let status = a
            .post(format!("{base}/v1/completions"))
            .send(short.as_bytes())
            .expect("send")
            .status()
            .as_u16();
        if status == 503 {
            break;
        }
        // A probe that reached the server first held the slot, so the long request may have
        // been refused meanwhile: if its answer is already there (an early 503), send it again.
        if long_request_refused(&mut s) {
            s = raw_post(&base, "/v1/chat/completions", &long.to_string());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the long request was not admitted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(s);
    wait_for_free_slot(&a, &base);
}

/// Sends a one-token completion until it is answered 200 (at most 60 s of 503s).
/// Whether a response (necessarily an early refusal: a non-streamed generation answers only
/// when done) has already arrived on `s`, without blocking.
fn long_request_refused(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut b = [0u8; 1];
    let arrived = matches!(s.peek(&mut b), Ok(n) if n > 0);
    s.set_nonblocking(false).expect("blocking");
    arrived
}

fn wait_for_free_slot(a: &ureq::Agent, base: &str) {
    let short = json!({"prompt": "Hello", "max_tokens": 1}).to_string();
    let t0 = Instant::now();
    loop {
        let mut resp = a
            .post(format!("{base}/v1/completions"))
            .send(short.as_bytes())
            .expect("send");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().expect("body");
        if status == 200 {
            let v: Value = serde_json::from_str(&text).expect("json");
            assert_eq!(v["usage"]["completion_tokens"], 1);
            break;
        }
        assert_eq!(status, 503, "{text}");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the slot was not freed after the disconnect"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The first generated token's `(text, logprob)` top list, computed by the library directly
/// with greedy decoding (logits before any temperature).
fn library_first_top(messages: &[Message], k: usize) -> Vec<(String, f32)> {
    let m = model();
    let ids = m.encode(&Prompt::Chat(messages.to_vec())).expect("encode");
    let mut cache = m.model.new_cache();
    let params = pocketlm::generate::GenerateParams {
        max_tokens: 1,
        logprobs: Some(k),
        ..Default::default()
    };
    let mut gen =
        pocketlm::generate::generate(m.model.as_ref(), &m.tokenizer, &mut cache, &ids, params)
            .expect("generate");
    let first = gen.next().expect("an event").expect("no error");
    assert!(
        matches!(first, pocketlm::generate::Event::Token { .. }),
        "{first:?}"
    );
    let pocketlm::generate::Event::Token { logprobs, .. } = first else {
        unreachable!("checked above")
    };
    let lp = logprobs.expect("logprobs were asked for");
    lp.top
        .iter()
        .map(|&(id, l)| {
            let (t, _) = pocketlm_server::logprobs::token_text_and_bytes(&m.tokenizer, id);
            (t, l)
        })
        .collect()
}

fn as_f32(v: &Value) -> f32 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")) as f32
}

/// Checks one chat `logprobs.content` entry; returns (token, logprob, bytes).
fn check_chat_entry(e: &Value, k: usize, greedy: bool) -> (String, f32, Vec<u8>) {
    let token = e["token"].as_str().expect("token").to_string();
    let logprob = as_f32(&e["logprob"]);
    assert!(logprob <= 0.0, "{e}");
    let bytes: Vec<u8> = e["bytes"]
        .as_array()
        .expect("bytes")
        .iter()
        .map(|b| b.as_u64().expect("byte") as u8)
        .collect();
    let top = e["top_logprobs"].as_array().expect("top_logprobs");
    assert_eq!(top.len(), k, "{e}");
    let tl: Vec<f32> = top.iter().map(|t| as_f32(&t["logprob"])).collect();
    assert!(tl.windows(2).all(|w| w[0] >= w[1]), "sorted: {e}");
    let mass: f32 = tl.iter().map(|l| l.exp()).sum();
    assert!(mass <= 1.0 + 1e-4, "{e}");
    if let Some(t) = top.iter().find(|t| t["token"] == e["token"]) {
        assert!((as_f32(&t["logprob"]) - logprob).abs() < 1e-6, "{e}");
    }
    if greedy && k > 0 {
        assert_eq!(
            top[0]["token"], e["token"],
            "greedy picks the most likely: {e}"
        );
    }
    (token, logprob, bytes)
}

#[test]
fn chat_logprobs_stream_and_non_stream() {
    let messages = [Message::user("Name three fruits.")];
    let req = json!({
        "messages": [{"role": "user", "content": "Name three fruits."}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": true,
        "top_logprobs": 5,
    });
    let (status, v) = post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let entries = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs.content");
    assert_eq!(
        entries.len() as u64,
        v["usage"]["completion_tokens"].as_u64().expect("usage"),
        "one entry per generated token: {v}"
    );
    let mut bytes = Vec::new();
    let mut tokens = Vec::new();
    for e in entries {
        let (t, l, b) = check_chat_entry(e, 5, true);
        bytes.extend(b);
        tokens.push((t, l));
    }
    if v["choices"][0]["finish_reason"] == "length" {
        assert_eq!(String::from_utf8_lossy(&bytes), content, "{v}");
    }
    // The values are the model's own distribution: the same as the library's at the first
    // position, and unchanged by the temperature.
    let lib = library_first_top(&messages, 5);
    let top0: Vec<(String, f32)> = entries[0]["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .map(|t| {
            (
                t["token"].as_str().expect("t").to_string(),
                as_f32(&t["logprob"]),
            )
        })
        .collect();
    for ((a, la), (b, lb)) in top0.iter().zip(&lib) {
        assert_eq!(a, b);
        assert!((la - lb).abs() < 1e-4, "{la} vs {lb}");
    }
    let mut hot = req.clone();
    hot["temperature"] = json!(1.9);
    hot["seed"] = json!(3);
    hot["max_tokens"] = json!(1);
    let (status, h) = post("/v1/chat/completions", &hot);
    assert_eq!(status, 200, "{h}");
    let e = &h["choices"][0]["logprobs"]["content"][0];
    check_chat_entry(e, 5, false);
    for (t, (a, la)) in e["top_logprobs"].as_array().expect("top").iter().zip(&lib) {
        assert_eq!(t["token"].as_str(), Some(a.as_str()));
        assert!(
            (as_f32(&t["logprob"]) - la).abs() < 1e-4,
            "temperature must not apply"
        );
    }

    // Streamed: the same tokens and values, spread over the chunks.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (status, text) = post_raw(
        &agent(),
        "/v1/chat/completions",
        sreq.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let mut streamed = Vec::new();
    for d in sse_data(&text) {
        if d == "[DONE]" {
            break;
        }
        let c: Value = serde_json::from_str(&d).expect("chunk");
        if let Some(list) = c["choices"][0]["logprobs"]["content"].as_array() {
            for e in list {
                let (t, l, _) = check_chat_entry(e, 5, true);
                streamed.push((t, l));
            }
        }
    }
    assert_eq!(streamed.len(), tokens.len(), "{text}");
    for ((a, la), (b, lb)) in streamed.iter().zip(&tokens) {
        assert_eq!(a, b);
        assert!((la - lb).abs() < 1e-5);
    }

    // Without `logprobs` the field is null; bad values name their field.
    let mut plain = req.clone();
    plain.as_object_mut().expect("obj").remove("logprobs");
    plain.as_object_mut().expect("obj").remove("top_logprobs");
    let (_, p) = post("/v1/chat/completions", &plain);
    assert!(p["choices"][0]["logprobs"].is_null(), "{p}");
    for (field, value) in [("top_logprobs", json!(21)), ("top_logprobs", json!(-1))] {
        let mut bad = req.clone();
        bad[field] = value;
        let (status, b) = post("/v1/chat/completions", &bad);
        assert_error(status, 400, &b);
    }
    let mut bad = plain.clone();
    bad["top_logprobs"] = json!(2);
    let (status, b) = post("/v1/chat/completions", &bad);
    assert_eq!(assert_error(status, 400, &b)["param"], "top_logprobs");
}

#[test]
fn completion_logprobs_legacy_shape() {
    let req = json!({
        "prompt": "One, two, three,",
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": 3,
        "ignore_eos": true,
    });
    let (status, v) = post("/v1/completions", &req);
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    let text = choice["text"].as_str().expect("text");
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("token"))
        .collect();
    assert_eq!(tokens.len(), 5, "{v}");
    assert_eq!(tokens.concat(), text, "{v}");
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("text_offset")
        .iter()
        .map(|o| o.as_u64().expect("offset"))
        .collect();
    let mut at = 0;
    for (t, o) in tokens.iter().zip(&offsets) {
        assert_eq!(*o, at, "{v}");
        at += t.chars().count() as u64;
    }
    for (i, t) in tokens.iter().enumerate() {
        let l = as_f32(&lp["token_logprobs"][i]);
        let top = lp["top_logprobs"][i].as_object().expect("top dict");
        assert!((3..=4).contains(&top.len()), "{v}");
        assert!(
            (as_f32(&top[*t]) - l).abs() < 1e-6,
            "chosen token listed: {v}"
        );
        let best = top.values().map(as_f32).fold(f32::MIN, f32::max);
        assert_eq!(best, l, "greedy picks the most likely: {v}");
    }

    // Streamed: the same lists, concatenated over the chunks, offsets continuing.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (status, body) = post_raw(&agent(), "/v1/completions", sreq.to_string().as_bytes());
    assert_eq!(status, 200, "{body}");
    let (mut st, mut so, mut sl) = (Vec::new(), Vec::new(), Vec::new());
    for d in sse_data(&body) {
        if d == "[DONE]" {
            break;
        }
        let c: Value = serde_json::from_str(&d).expect("chunk");
        let l = &c["choices"][0]["logprobs"];
        if l.is_null() {
            continue;
        }
        for (i, t) in l["tokens"].as_array().expect("tokens").iter().enumerate() {
            st.push(t.as_str().expect("t").to_string());
            so.push(l["text_offset"][i].as_u64().expect("o"));
            sl.push(as_f32(&l["token_logprobs"][i]));
        }
    }
    assert_eq!(st, tokens);
    assert_eq!(so, offsets);
    for (i, l) in sl.iter().enumerate() {
        assert!((l - as_f32(&lp["token_logprobs"][i])).abs() < 1e-5);
    }

    let mut bad = req.clone();
    bad["logprobs"] = json!(21);
    let (status, b) = post("/v1/completions", &bad);
    assert_eq!(assert_error(status, 400, &b)["param"], "logprobs");
}

/// Several streamed completions at once (one batch: continuous batching) each get the greedy
/// tokens that the library generates for its prompt alone.
#[test]
fn concurrent_streams_get_what_each_gets_alone() {
    let prompts = [
        "The capital of France is",
        "Once upon a time, in a land far away, there lived a",
        "1, 2, 3,",
        "def fibonacci(n):",
    ];
    let max_tokens = 8;
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let body = json!({
                "prompt": p,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": true,
                "stream": true,
            })
            .to_string();
            std::thread::spawn(move || {
                let (status, text) = post_raw(&agent(), "/v1/completions", body.as_bytes());
                assert_eq!(status, 200, "{text}");
                let data = sse_data(&text);
                assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
                data[..data.len() - 1]
                    .iter()
                    .map(|d| {
                        let c: Value = serde_json::from_str(d).expect("chunk json");
                        c["choices"][0]["text"].as_str().unwrap_or("").to_string()
                    })
                    .collect::<String>()
            })
        })
        .collect();
    let m = model();
    for (p, h) in prompts.iter().zip(handles) {
        let streamed = h.join().expect("client thread");
        let ids = m.encode(&Prompt::Text(p.to_string())).expect("encode");
        let mut cache = m.model.new_cache();
        let params = pocketlm::generate::GenerateParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        let alone =
            pocketlm::generate::generate(m.model.as_ref(), &m.tokenizer, &mut cache, &ids, params)
                .expect("starts")
                .collect_output()
                .expect("generates");
        assert_eq!(streamed, alone.text, "prompt {p:?}");
    }
}
