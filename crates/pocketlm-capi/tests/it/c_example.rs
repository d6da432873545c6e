//! The C examples, built with `cc` against `libpocketlm_capi`: `examples/c/generate.c` on the
//! default model (its greedy answer equals the Rust API's for the same request),
//! `examples/c/embed.c` on all-MiniLM-L6-v2 (its vectors match sentence-transformers'), and
//! both built with AddressSanitizer and run with LeakSanitizer (the memory check).

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

/// Compiles `examples/c/<name>.c` with the system C compiler (`$CC`, else `cc`) into the test
/// tmpdir, once per test process and build kind.
fn build_example(name: &'static str) -> PathBuf {
    built(name, Build::Plain)
}

/// How an example is compiled.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Build {
    /// `-Wall -Wextra -Werror`.
    Plain,
    /// Also `-fsanitize=address -fno-omit-frame-pointer -g`: AddressSanitizer on the C side
    /// and, on Linux, LeakSanitizer over every allocation of the process (the Rust library's
    /// too: ASan's runtime replaces `malloc`).
    Asan,
}

fn built(name: &'static str, build: Build) -> PathBuf {
    static EXES: std::sync::Mutex<Vec<((&str, Build), PathBuf)>> =
        std::sync::Mutex::new(Vec::new());
    let mut exes = EXES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, exe)) = exes.iter().find(|(k, _)| *k == (name, build)) {
        return exe.clone();
    }
    let exe = compile(name, build);
    exes.push(((name, build), exe.clone()));
    exe
}

fn compile(name: &str, build: Build) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let suffix = if build == Build::Asan { "-asan" } else { "" };
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pocketlm-c-{name}{suffix}"));
    compile_source(&crate_dir.join(format!("examples/c/{name}.c")), &exe, build);
    exe
}

/// Compiles and links one C file against the library's header and shared library.
fn compile_source(src: &Path, exe: &Path, build: Build) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = shared_library_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut cmd = Command::new(&cc);
    cmd.arg("-std=c11")
        .arg("-Wall")
        .arg("-Wextra")
        .arg("-Werror");
    if build == Build::Asan {
        cmd.args(["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]);
    }
    cmd.arg(src)
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lpocketlm_capi")
        .arg("-lm")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()));
    if cfg!(target_os = "linux") {
        // DT_RPATH, not DT_RUNPATH: `cargo test` puts `<profile>` and `<profile>/deps` on
        // LD_LIBRARY_PATH, which a RUNPATH yields to, and an older copy of the library in the
        // other folder (from an earlier `cargo build`) would be loaded instead of the one
        // linked against.
        cmd.arg("-Wl,--disable-new-dtags");
    }
    let out = cmd
        .arg("-o")
        .arg(exe)
        .output()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(
        out.status.success(),
        "{cc} failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
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
    let exe = build_example("generate");
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
    let exe = build_example("generate");
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

/// The committed sentences and all-MiniLM-L6-v2 embeddings of sentence-transformers
/// (`crates/pocketlm/tests/golden/embeddings`, from `scripts/golden/embeddings.py`):
/// `(sentences, [20][384] f32 rows)`.
pub fn minilm_goldens() -> (Vec<String>, Vec<Vec<f32>>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pocketlm/tests/golden/embeddings");
    let sentences: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(dir.join("sentences.json")).expect("sentences.json"),
    )
    .expect("sentences.json is a list of strings");
    let file = dir.join("minilm.golden.safetensors");
    let tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let rows: Vec<Vec<f32>> = tensors["embeddings"].to_vec2().expect("[20, 384] f32");
    assert_eq!(rows.len(), sentences.len());
    (sentences, rows)
}

/// Cosine similarity, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The rows `embed.c` printed: one line of space-separated floats per text.
fn parse_vectors(stdout: &[u8]) -> Vec<Vec<f32>> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| {
            l.split(' ')
                .map(|x| x.parse().unwrap_or_else(|e| panic!("{x:?}: {e}")))
                .collect()
        })
        .collect()
}

#[test]
fn c_embed_example_matches_sentence_transformers() {
    let (sentences, golden) = minilm_goldens();
    let model = pocketlm_testutil::minilm_path();
    let exe = build_example("embed");
    // One text per forward pass: a batch pads every text to its longest (the last sentence,
    // 256 tokens), several times slower on two cores; the results do not depend on it beyond
    // rounding (embed.rs checks batch sizes).
    let out = Command::new(&exe)
        .arg("--model")
        .arg(&model)
        .args(["--batch-size", "1"])
        .args(&sentences)
        .output()
        .expect("running the C embed example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the C embed example failed:\n{stderr}"
    );
    let got = parse_vectors(&out.stdout);
    assert_eq!(got.len(), golden.len(), "{stderr}");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&golden).enumerate() {
        assert_eq!(g.len(), 384, "row {i}");
        let c = cosine(g, w);
        assert!(
            c >= 0.9999,
            "sentence {i}: cosine {c} with sentence-transformers"
        );
        let d = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst = worst.max(d);
    }
    eprintln!("embed.c vs sentence-transformers: max abs diff {worst:e} over 20 sentences");
    assert!(stderr.contains("20 texts, 384 dimensions"), "{stderr}");
    // --no-normalize: the pooled vectors as they are, in the same directions.
    let out = Command::new(&exe)
        .arg("--model")
        .arg(&model)
        .arg("--no-normalize")
        .args(&sentences[..2])
        .output()
        .expect("running the C embed example");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, v) in parse_vectors(&out.stdout).iter().enumerate() {
        let norm = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() > 0.01, "row {i} has norm {norm}");
        assert!(cosine(v, &golden[i]) >= 0.9999, "row {i}");
    }
}

#[test]
fn c_embed_example_reports_a_missing_model_with_its_path() {
    let exe = build_example("embed");
    let out = Command::new(&exe)
        .args(["--model", "/nonexistent/embedder", "Hi"])
        .output()
        .expect("running the C embed example");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: loading the embedding model: ")
            && stderr.contains("/nonexistent/embedder"),
        "{stderr}"
    );
}

/// `exe` to run with LeakSanitizer on (and no suppressions); a report makes it exit with 23.
fn asan_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env(
        "ASAN_OPTIONS",
        "detect_leaks=1:abort_on_error=0:exitcode=23",
    )
    .env_remove("LSAN_OPTIONS");
    cmd
}

/// Runs an ASan build of an example with LeakSanitizer on; fails on any report (the process
/// exits non-zero then, and the report is on stderr).
fn run_under_asan(
    name: &'static str,
    args: &[&std::ffi::OsStr],
    exit_code: i32,
) -> std::process::Output {
    let exe = built(name, Build::Asan);
    let out = asan_command(&exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(exit_code)
            && !stderr.contains("AddressSanitizer")
            && !stderr.contains("LeakSanitizer"),
        "{name}.c under AddressSanitizer/LeakSanitizer ({}):\n{stderr}",
        out.status
    );
    out
}

/// The memory check: both examples built with `-fsanitize=address`, run to the end with
/// LeakSanitizer on (the default model for `generate.c`, a few tokens; all-MiniLM-L6-v2 for
/// `embed.c`): no invalid access, and every handle, string and buffer freed, in C and in the
/// library (no report, exit 0). Also the error path (a model that does not load).
#[test]
fn c_examples_run_clean_under_address_and_leak_sanitizer() {
    let t0 = std::time::Instant::now();
    let model = pocketlm_testutil::default_model_path();
    let out = run_under_asan(
        "generate",
        &[
            "--model".as_ref(),
            model.as_os_str(),
            "--max-tokens".as_ref(),
            "4".as_ref(),
            "--greedy".as_ref(),
            "Hi".as_ref(),
        ],
        0,
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let minilm = pocketlm_testutil::minilm_path();
    let out = run_under_asan(
        "embed",
        &[
            "--model".as_ref(),
            minilm.as_os_str(),
            "A man is eating food.".as_ref(),
            "A man is riding a horse.".as_ref(),
        ],
        0,
    );
    // A model that does not load: the error path frees what it made too.
    run_under_asan(
        "embed",
        &[
            "--model".as_ref(),
            "/nonexistent/embedder".as_ref(),
            "x".as_ref(),
        ],
        1,
    );
    run_under_asan(
        "generate",
        &[
            "--model".as_ref(),
            "/nonexistent/model.gguf".as_ref(),
            "x".as_ref(),
        ],
        1,
    );
    assert_eq!(parse_vectors(&out.stdout).len(), 2);
    eprintln!(
        "generate.c and embed.c under ASan/LSan: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// The memory check can fail: a program that loads an embedding model and never frees it is
/// reported by LeakSanitizer, with the library's allocation in the trace (so a clean run of the
/// examples means their handles were freed, not that leak detection was off, as it is for
/// instance under a debugger or where LSan cannot stop the threads).
#[test]
fn leak_sanitizer_reports_a_handle_that_is_not_freed() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let src = dir.join("pocketlm-c-leak.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include "pocketlm.h"
int main(int argc, char **argv) {
  (void)argc;
  PocketlmEmbeddingModel *m = NULL;
  if (pocketlm_embedding_model_load(argv[1], NULL, &m) != POCKETLM_STATUS_OK) return 1;
  printf("%zu\n", pocketlm_embedding_dimension(m));
  m = NULL; /* lost: never freed */
  return 0;
}
"#,
    )
    .expect("write the leak program");
    let exe = dir.join("pocketlm-c-leak-asan");
    compile_source(&src, &exe, Build::Asan);
    let out = asan_command(&exe)
        .arg(pocketlm_testutil::minilm_path())
        .output()
        .expect("running the leak program");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(23), "{stderr}");
    assert!(
        stderr.contains("ERROR: LeakSanitizer: detected memory leaks")
            && stderr.contains("pocketlm_embedding_model_load"),
        "{stderr}"
    );
}
