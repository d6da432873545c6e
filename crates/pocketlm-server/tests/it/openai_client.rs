//! The server against real clients: the official `openai` Python package
//! (`scripts/test_openai_client.py`, `embeddings.create` included) and `curl`
//! (`scripts/test_curl.sh`), on a free loopback port with the real default model and
//! all-MiniLM-L6-v2 as the embedding model.
//!
//! Needs python3 (with `venv`), curl, and PyPI through pip's usual configuration: the test
//! creates a virtual environment under the target dir (`CARGO_TARGET_TMPDIR`, reused while it
//! holds the pinned version) and installs `openai==3.54.0` there. It is skipped, with a printed
//! reason, only when `python3` is absent; a failed venv or pip install, a missing curl or a
//! failed check fails it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pocketlm_server::ServerConfig;

/// The pinned client version (the one the script was written against).
const OPENAI_VERSION: &str = "3.54.0";
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

/// A venv holding `openai==OPENAI_VERSION`; returns its python.
fn openai_venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("venv-openai-{OPENAI_VERSION}"));
    let python = dir.join("bin").join("python");
    let has_it = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                &format!("import openai, sys; sys.exit(openai.__version__ != '{OPENAI_VERSION}')"),
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
        ]),
    );
    assert!(
        out.status.success(),
        "{}",
        show(&format!("pip install openai=={OPENAI_VERSION}"), &out)
    );
    assert!(
        has_it(&python),
        "openai {OPENAI_VERSION} is not importable after pip install"
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
