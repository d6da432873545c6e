//! The Python package (`bindings/python`): `pip install` builds it with maturin into a venv,
//! and its test suite (`bindings/python/tests/test_pocketlm.py`) runs against the Rust API's
//! answers, computed here, and sentence-transformers' embeddings (the committed goldens).
//!
//! Needs python3 (with `venv`) and PyPI through pip's usual configuration: the venv lives
//! under `CARGO_TARGET_TMPDIR` and is reused while it holds the pinned maturin. The package is
//! built with this test's profile into the workspace's target folder (`CARGO_TARGET_DIR`,
//! `MATURIN_PEP517_ARGS=--profile <profile>`), so that it reuses the compiled library. Skipped,
//! with a printed reason, only when `python3` is absent; a failed venv, pip install, build or
//! Python test fails it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use candle_core::{Device, Tensor};
use pocketlm::chat_template::Message;
use pocketlm::generate::{generate, GenerateParams};
use pocketlm::loader::{LoadedModel, Prompt};
use pocketlm::lora::{self, Adapter, AdapterConfig, LoraParameters};
use pocketlm::sampling::SamplingOverrides;

use crate::c_example::profile_dir;

/// The maturin the venv gets (the build backend `pyproject.toml` names, `>=1.9,<2`).
const MATURIN_VERSION: &str = "1.16.0";

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

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

/// A venv holding `maturin==MATURIN_VERSION`; returns its python.
fn venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("venv-pocketlm-python");
    let python = dir.join("bin/python");
    let has_maturin = || {
        Command::new(&python)
            .args(["-m", "maturin", "--version"])
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout).contains(&format!(" {MATURIN_VERSION}"))
            })
    };
    if has_maturin() {
        return python;
    }
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
        "installing maturin",
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("maturin=={MATURIN_VERSION}"),
        ]),
    );
    assert!(
        out.status.success(),
        "{}",
        show(&format!("pip install maturin=={MATURIN_VERSION}"), &out)
    );
    assert!(has_maturin(), "maturin is not runnable after pip install");
    python
}

/// `cmd` without the variables cargo sets for the test process (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_NAME`, ...): build scripts that name them in `rerun-if-env-changed` (ring's do)
/// would otherwise see them changed from the outer build's environment, and cargo would
/// rebuild them and everything above them, pocketlm included.
fn without_cargo_test_env(cmd: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let set_by_cargo_test = name == "CARGO"
            || name == "OUT_DIR"
            || [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_BIN_",
                "CARGO_CRATE_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|p| name.starts_with(p))
            || name == "CARGO_TARGET_TMPDIR"
            || name == "CARGO_RUSTC_CURRENT_DIR";
        if set_by_cargo_test {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// `PATH` with the venv's `bin` first (maturin's build backend runs `maturin` from `PATH`, as
/// in an activated venv).
fn venv_path(python: &Path) -> std::ffi::OsString {
    let bin = python.parent().expect("the venv's bin").to_path_buf();
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&rest))).expect("a PATH")
}

/// The Rust API's greedy answer to one user message (the CLI's `generate --temp 0`).
fn greedy(m: &LoadedModel, prompt: &str, max_tokens: usize) -> String {
    let ids = m
        .encode(&Prompt::Chat(vec![Message::user(prompt)]))
        .expect("encode");
    let params = GenerateParams {
        max_tokens,
        sampling: SamplingOverrides {
            temperature: Some(0.0),
            ..Default::default()
        }
        .resolve(&m.default_sampling()),
        ..Default::default()
    };
    let mut cache = m.model.new_cache();
    generate(m.model.as_ref(), &m.tokenizer, &mut cache, &ids, params)
        .expect("generate")
        .collect_output()
        .expect("output")
        .text
}

/// Writes a LoRA adapter for the default model (mlx-lm format; rank 4 on the attention's
/// q/v projections of the last 8 blocks, `B` a fixed non-zero pattern so that it changes the answers) into
/// `dir`, and returns the default model with it loaded.
fn write_adapter(dir: &Path) -> LoadedModel {
    let mut m = pocketlm_testutil::load_default_model(false);
    let config = AdapterConfig::new(
        8,
        LoraParameters {
            rank: 4,
            keys: Some(vec!["self_attn.q_proj".into(), "self_attn.v_proj".into()]),
            ..Default::default()
        },
    );
    lora::attach_new(m.model.as_mut(), &config, 1).expect("attach adapters");
    let mut adapter = Adapter::from_model(m.model.as_mut(), config).expect("read adapters");
    for (a, b) in adapter.weights.values_mut() {
        // A fixed pattern (not random: the answer must change on every run), amplitude 0.1.
        let n = b.elem_count();
        *b = (Tensor::arange(0u32, n as u32, &Device::Cpu)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| (t * 0.37)?.sin())
            .and_then(|t| t * 0.1)
            .and_then(|t| t.reshape(b.dims())))
        .expect("B");
        *a = a.to_dtype(candle_core::DType::F32).expect("f32 A");
    }
    adapter.save(dir).expect("write the adapter");
    Adapter::load(dir)
        .expect("read the adapter back")
        .apply(m.model.as_mut())
        .expect("apply the adapter");
    m
}

#[test]
fn python_package_builds_and_passes_its_tests() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED python_package_builds_and_passes_its_tests: python3 is not installed");
        return;
    }
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let root = workspace_root();

    // What the Python tests compare with.
    let (prompt, max_tokens) = ("What is the capital of France?", 16);
    let base = pocketlm_testutil::default_model(false);
    let adapter_dir = tmp.join("python-test-adapter");
    let _ = std::fs::remove_dir_all(&adapter_dir);
    let adapted = write_adapter(&adapter_dir);
    let expected = serde_json::json!({
        "prompt": prompt,
        "max_tokens": max_tokens,
        "text": greedy(&base, prompt, max_tokens),
        "adapter_text": greedy(&adapted, prompt, max_tokens),
    });
    drop(adapted);
    let expected_file = tmp.join("python-test-expected.json");
    std::fs::write(&expected_file, expected.to_string()).expect("write the expected answers");

    // all-MiniLM-L6-v2, fetched into $POCKETLM_HOME on first use: the embedding tests load
    // it by path, by name and as the default.
    let minilm = pocketlm_testutil::minilm_path();

    let python = venv();
    // `pip install ./bindings/python`, built by maturin with this profile in this target dir.
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("the target dir");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => panic!("no profile folder in {}", profile_dir.display()),
    };
    let t0 = Instant::now();
    let out = run(
        "pip install ./bindings/python",
        without_cargo_test_env(&mut Command::new(&python))
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-build-isolation",
                "--no-deps",
                "--no-index",
                "--force-reinstall",
                "-v",
            ])
            .arg(root.join("bindings/python"))
            .env("PATH", venv_path(&python))
            .env("CARGO_TARGET_DIR", target_dir)
            .env("MATURIN_PEP517_ARGS", format!("--profile {profile}")),
    );
    let build_time = t0.elapsed();
    assert!(
        out.status.success(),
        "{}",
        show("pip install ./bindings/python", &out)
    );
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let compiled: Vec<&str> = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Compiling "))
        .collect();
    eprintln!(
        "pip install ./bindings/python: {:.1} s, compiled {} crates: {}",
        build_time.as_secs_f64(),
        compiled.len(),
        compiled.join(", ")
    );

    let out = run(
        "the Python tests",
        Command::new(&python)
            .args(["-m", "unittest", "-v", "test_pocketlm"])
            .current_dir(root.join("bindings/python/tests"))
            .env("POCKETLM_TEST_EXPECTED", &expected_file)
            .env("POCKETLM_TEST_ADAPTER", &adapter_dir)
            .env("POCKETLM_TEST_MINILM", &minilm),
    );
    let report = show("python -m unittest -v test_pocketlm", &out);
    assert!(out.status.success(), "{report}");
    assert!(
        !report.contains("skipped"),
        "a Python test was skipped:\n{report}"
    );
    eprintln!("{report}");
}

/// Every compiled unit that pocketlm needs under maturin's build of the extension
/// (`cargo rustc -p pocketlm-python`) is one the workspace's test build also makes: same
/// crate, same features (cargo compiles a crate again for another feature set of its
/// dependencies, and then pocketlm again). Checked on `cargo tree`'s resolution of the two.
#[test]
fn extension_build_reuses_the_workspace_build() {
    let root = workspace_root();
    let tree = |args: &[&str]| -> Vec<(String, String)> {
        let out = run(
            "cargo tree",
            Command::new(env!("CARGO"))
                .current_dir(&root)
                .args([
                    "tree",
                    "--offline",
                    "-e",
                    "normal,build",
                    "--prefix",
                    "none",
                ])
                .args(["-f", "{p}|{f}"])
                .args(args),
        );
        assert!(out.status.success(), "{}", show("cargo tree", &out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (p, f) = l.split_once('|')?;
                let p = p.split(" (").next().unwrap_or(p).to_string();
                let f = f.trim_end_matches(" (*)").to_string();
                Some((p, f))
            })
            .collect()
    };
    let lib: std::collections::BTreeSet<String> = tree(&["-p", "pocketlm"])
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let workspace: std::collections::BTreeSet<(String, String)> =
        tree(&["--workspace", "-e", "dev"]).into_iter().collect();
    let missing: Vec<String> = tree(&["-p", "pocketlm-python"])
        .into_iter()
        .filter(|(p, _)| lib.contains(p))
        .filter(|u| !workspace.contains(u))
        .map(|(p, f)| {
            let have: Vec<&str> = workspace
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, g)| g.as_str())
                .collect();
            format!("{p}: extension [{f}], workspace {have:?}")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "maturin's build of bindings/python would compile pocketlm's dependencies with other \
         features than the workspace's build (and so pocketlm a second time): enable the \
         workspace's features in bindings/python/Cargo.toml's alignment block:\n{}",
        missing.join("\n")
    );
}
