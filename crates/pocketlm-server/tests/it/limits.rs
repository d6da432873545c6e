//! Limits that protect the server from slow clients and impossible requests: the header and
//! idle timeouts close connections, and `max_tokens` beyond the room the prompt leaves in the
//! context is refused. On loopback, with the real default model.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use pocketlm_server::{ServerConfig, Timeouts};
use serde_json::{json, Value};

/// Starts a server with `timeouts` on a free loopback port; returns `host:port`.
fn start(timeouts: Timeouts) -> String {
    super::start_server(ServerConfig {
        port: 0,
        timeouts,
        ..ServerConfig::default()
    })
    .to_string()
}

/// Reads until the server closes the connection (at most 30 s); returns what came and when
/// the connection closed, counted from `t0`.
fn read_to_close(s: &mut TcpStream, t0: Instant) -> (String, Duration) {
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection stayed open: {e}"),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), t0.elapsed())
}

#[test]
fn half_a_header_is_closed_after_the_header_timeout() {
    let addr = start(Timeouts {
        header: Duration::from_secs(1),
        keep_alive: Duration::from_secs(600),
    });
    let mut s = TcpStream::connect(&addr).expect("connect");
    let t0 = Instant::now();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .expect("write");
    let (got, after) = read_to_close(&mut s, t0);
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(10),
        "closed after {after:?}"
    );
    assert!(!got.contains("200 OK"), "{got}");
}

#[test]
fn an_idle_kept_alive_connection_is_closed() {
    let addr = start(Timeouts {
        header: Duration::from_secs(600),
        keep_alive: Duration::from_secs(1),
    });
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .expect("write");
    let t0 = Instant::now();
    let (got, after) = read_to_close(&mut s, t0);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains(r#"{"status":"ok","#), "{got}");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(10),
        "closed after {after:?}"
    );
}

#[test]
fn max_tokens_beyond_the_context_is_refused() {
    let addr = start(Timeouts::default());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 100000}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi!"}], "max_completion_tokens": 8192}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 100000, "stream": true}),
        ),
    ] {
        let mut r = agent
            .post(format!("http://{addr}{path}"))
            .send(body.to_string().as_bytes())
            .expect("POST");
        let status = r.status().as_u16();
        let v: Value =
            serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("json");
        assert_eq!(status, 400, "{body}: {v}");
        let e = &v["error"];
        let param = if body.get("max_completion_tokens").is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        assert_eq!(e["param"], param, "{v}");
        assert_eq!(e["code"], "context_length_exceeded", "{v}");
        let msg = e["message"].as_str().expect("message");
        assert!(msg.contains("8192"), "{msg}");
        assert!(
            msg.contains(&body[param].to_string()),
            "names the amount asked: {msg}"
        );
    }
    // What fits is served.
    let mut r = agent
        .post(format!("http://{addr}/v1/completions"))
        .send(
            json!({"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0})
                .to_string()
                .as_bytes(),
        )
        .expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    let v: Value =
        serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
}

#[test]
fn chat_without_a_chat_template_is_a_bad_request() {
    let mut m = pocketlm_testutil::load_default_model(false);
    m.chat_template = None;
    let addr = super::start_server_with(
        std::sync::Arc::new(m),
        ServerConfig {
            port: 0,
            ..ServerConfig::default()
        },
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let post = |path: &str, body: Value| {
        let mut r = agent
            .post(format!("http://{addr}{path}"))
            .send(body.to_string().as_bytes())
            .expect("POST");
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().expect("body");
        (status, serde_json::from_str::<Value>(&text).expect("json"))
    };
    for (path, field, body) in [
        (
            "/v1/chat/completions",
            "messages",
            json!({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 2}),
        ),
        (
            "/v1/responses",
            "input",
            json!({"input": "Hi!", "max_output_tokens": 2}),
        ),
    ] {
        let (status, v) = post(path, body);
        assert_eq!(status, 400, "{path}: {v}");
        assert_eq!(v["error"]["param"], field, "{path}: {v}");
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(msg.contains("no chat template"), "{msg}");
    }
    // A plain prompt is still served.
    let (status, v) = post(
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
}

/// Under a KV memory budget of two 256-position blocks of the default model's cache (256
/// positions x 30 layers x 3 KV heads x 64 x keys and values x 4 bytes = 11.8 MB a block),
/// which the CPU's KV block pool holds as 32 blocks of 16 positions, three concurrent requests
/// all succeed with the texts each gets alone; with `kv_f16` too (64 blocks of half the
/// bytes: the same requests alone peak at half the bytes).
#[test]
fn requests_beyond_the_kv_memory_budget_wait_and_succeed() {
    let f32_peak = kv_budget_run(false);
    let f16_peak = kv_budget_run(true);
    assert_eq!(f32_peak, 2 * f16_peak);
}

/// The run of [`requests_beyond_the_kv_memory_budget_wait_and_succeed`] on a server with
/// `kv_f16`; returns the KV peak after the requests ran one at a time.
fn kv_budget_run(kv_f16: bool) -> u64 {
    let addr = super::start_server(ServerConfig {
        port: 0,
        kv_memory: Some(24_000_000),
        kv_f16,
        ..ServerConfig::default()
    });
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let complete = |prompt: &str| {
        let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
        let mut r = agent
            .post(format!("http://{addr}/v1/completions"))
            .send(body.to_string().as_bytes())
            .expect("POST");
        let status = r.status().as_u16();
        let v: Value =
            serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("json");
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["text"].as_str().expect("text").to_string()
    };
    let engine = || {
        let mut r = agent
            .get(format!("http://{addr}/health"))
            .call()
            .expect("GET /health");
        let v: Value =
            serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("json");
        v["engine"].clone()
    };
    let prompts = [
        "The capital of France is",
        "Once upon a time, in a small village,",
        "def fibonacci(n):",
    ];
    let alone: Vec<String> = prompts.iter().map(|p| complete(p)).collect();
    let alone_peak = engine()["kv_peak_bytes"].as_u64().expect("peak");
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(move || complete(p)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    assert_eq!(together, alone, "kv_f16 {kv_f16}");
    // The measured peak stayed within the budget; two blocks at most were ever held.
    let e = engine();
    assert_eq!(e["kv_budget_bytes"], 24_000_000, "{e}");
    let peak = e["kv_peak_bytes"].as_u64().expect("peak");
    assert!(peak > 0 && peak <= 2 * 11_796_480, "{e}");
    assert_eq!(e["running"], 0, "{e}");
    alone_peak
}
