//! `examples/c/generate.c`, built with `cc` against `libpocketlm_capi` and run on the default
//! model: its greedy answer equals the Rust API's for the same request.

use std::path::{Path, PathBuf};
use std::process::Command;

use pocketlm::chat_template::Message;
use pocketlm::generate::{generate, GenerateParams};
use pocketlm::loader::Prompt;
use pocketlm::sampling::SamplingOverrides;

/// The folder that holds this profile's build outputs (`target/ci`): the test binary is
/// `<it>/deps/it-<hash>`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary lies in <profile>/deps")
        .to_path_buf()
}

/// The folder holding `libpocketlm_capi.so` (or `.dylib`). `cargo build` copies the cdylib up
/// into the profile folder; `cargo test` alone leaves it in `<profile>/deps`, beside the test
/// binary. Of the two, the newer file wins, so a stale copy from an earlier `cargo build` is not
/// linked against today's header.
fn shared_library_dir() -> PathBuf {
    let profile = profile_dir();
    let candidates = [profile.join("deps"), profile.clone()];
    let newest = candidates
        .iter()
        .filter_map(|dir| {
            ["libpocketlm_capi.so", "libpocketlm_capi.dylib"]
                .iter()
                .map(|name| dir.join(name))
                .find(|p| p.is_file())
                .and_then(|p| p.metadata().and_then(|m| m.modified()).ok())
                .map(|t| (t, dir.clone()))
        })
        .max_by_key(|(t, _)| *t);
    match newest {
        Some((_, dir)) => dir,
        None => panic!(
            "no libpocketlm_capi shared library in {} or its deps/ folder",
            profile.display()
        ),
    }
}

/// Compiles the example with the system C compiler (`$CC`, else `cc`) into the test tmpdir,
/// once per test process.
fn build_example() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(compile).clone()
}

fn compile() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = shared_library_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pocketlm-c-generate");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg("-std=c11")
        .arg("-Wall")
        .arg("-Wextra")
        .arg("-Werror")
        .arg(crate_dir.join("examples/c/generate.c"))
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lpocketlm_capi")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(
        out.status.success(),
        "{cc} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// The Rust API's greedy answer (the CLI's `generate --temp 0`: chat template, argmax, no
/// repetition penalty).
fn rust_greedy(prompt: &str, max_tokens: usize) -> String {
    let m = pocketlm_testutil::default_model(false);
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

#[test]
fn c_example_streams_the_rust_apis_greedy_answer() {
    let prompt = "What is the capital of France?";
    let max_tokens = 12;
    let model = pocketlm_testutil::default_model_path();
    let exe = build_example();
    let out = Command::new(&exe)
        .arg("--model")
        .arg(&model)
        .arg("--max-tokens")
        .arg(max_tokens.to_string())
        .arg("--greedy")
        .arg(prompt)
        .output()
        .expect("running the C example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the C example failed:\n{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 answer");
    let answer = stdout.strip_suffix('\n').expect("a final newline");
    assert!(!answer.trim().is_empty(), "empty answer; stderr:\n{stderr}");
    assert_eq!(answer, rust_greedy(prompt, max_tokens));
    assert!(
        stderr.contains(&format!("pocketlm {}", env!("CARGO_PKG_VERSION"))),
        "{stderr}"
    );
}

#[test]
fn c_example_reports_a_missing_model_with_its_path() {
    let exe = build_example();
    let out = Command::new(&exe)
        .args(["--model", "/nonexistent/model.gguf", "Hi"])
        .output()
        .expect("running the C example");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: loading the model: /nonexistent/model.gguf"),
        "{stderr}"
    );
}
