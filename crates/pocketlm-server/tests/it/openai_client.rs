//! The server against real clients: the official `openai` Python package
//! (`scripts/test_openai_client.py`), `curl` (`scripts/test_curl.sh`), and tools through
//! `openai` and `anthropic` (`scripts/test_tools_client.py`), on a free loopback port with the
//! real default model.
//!
//! Needs python3 (with `venv`), curl, and PyPI through pip's usual configuration: the test
//! creates a virtual environment under the target dir (`CARGO_TARGET_TMPDIR`, reused while it
//! holds the pinned versions) and installs `openai==3.54.0`, `anthropic==2.16.0` and
//! `jsonschema==4.26.0` there. It is skipped, with a printed
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

/// A venv holding the pinned `openai`, `anthropic` and `jsonschema`; returns its python.
fn openai_venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "venv-clients-{OPENAI_VERSION}-{ANTHROPIC_VERSION}-{JSONSCHEMA_VERSION}"
    ));
    let python = dir.join("bin").join("python");
    let has_it = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                &format!(
                    "import openai, anthropic, sys; from importlib.metadata import version; \
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
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            &format!("openai=={OPENAI_VERSION}"),
            &format!("anthropic=={ANTHROPIC_VERSION}"),
            &format!("jsonschema=={JSONSCHEMA_VERSION}"),
        ]),
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
        ..ServerConfig::default()
    });
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts");

    let out = run(
        "the openai client script",
        Command::new(&python)
            .arg(scripts.join("test_openai_client.py"))
            .args(["--base-url", &format!("{base}/v1"), "--api-key", KEY]),
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

/// Runs `scripts/test_tools_client.py --part PART` against a fresh server.
fn tools_client(part: &str) {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED tools client ({part}): python3 is not installed");
        return;
    }
    let python = openai_venv();
    let base = start(ServerConfig {
        port: 0,
        api_key: Some(KEY.into()),
        queue_size: 64,
        ..ServerConfig::default()
    });
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
    tools_client("basic");
}

/// Forced tool calls (full round trips, streamed and not; responses; anthropic) and 100 prompts
/// each with `tool_choice: "required"` and `response_format` json_schema, validated with
/// `jsonschema`.
#[test]
#[ignore = "needs the grammar engine (branch grammar)"]
fn enforced_tools_and_schemas_with_official_clients() {
    tools_client("enforced");
}
