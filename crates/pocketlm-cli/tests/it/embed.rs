//! `pocketlm embed` end to end on the tiny Qwen3 embedding model of the library's goldens: the
//! JSON it prints equals the library's embeddings, base64 is the same values, and bad input is
//! a clean error.

use std::path::PathBuf;
use std::process::{Command, Output};

use pocketlm::embed::{EmbedOptions, EmbeddingModel, LoadEmbeddingOptions};

fn tiny_qwen3() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pocketlm/tests/golden/embeddings/tiny_qwen3")
}

fn pocketlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(args)
        .output()
        .expect("running pocketlm")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn embed_prints_the_library_embeddings() {
    let dir = tiny_qwen3();
    let model = dir.to_str().unwrap();
    let texts = [
        "A man is eating food.",
        "Rust is a systems programming language.",
    ];
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{}\n\n", texts[1])).unwrap();
    let out = json(&pocketlm(&[
        "embed",
        "--model",
        model,
        "--device",
        "cpu",
        "--text",
        texts[0],
        "--file",
        file.path().to_str().unwrap(),
    ]));
    let opts = LoadEmbeddingOptions {
        device: pocketlm::device::DeviceSpec::Cpu,
        ..Default::default()
    };
    let lib = EmbeddingModel::load_folder(&dir, &opts).unwrap();
    let want = lib.embed(&texts, &EmbedOptions::default()).unwrap();
    let data = out["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(data[i]["index"], i);
        let got: Vec<f32> = serde_json::from_value(data[i]["embedding"].clone()).unwrap();
        assert_eq!(&got, w, "text {i}");
    }
    let n: usize = lib
        .tokenize(&texts, true)
        .unwrap()
        .iter()
        .map(Vec::len)
        .sum();
    assert_eq!(out["usage"]["prompt_tokens"], n);

    let out = json(&pocketlm(&[
        "embed",
        "--model",
        model,
        "--device",
        "cpu",
        "--text",
        texts[0],
        "--format",
        "base64",
        "--dimensions",
        "8",
    ]));
    let short = EmbedOptions {
        dimensions: Some(8),
        ..Default::default()
    };
    let want = lib.embed(&texts[..1], &short).unwrap();
    assert_eq!(
        out["data"][0]["embedding"],
        pocketlm::embed::to_base64(&want[0])
    );
}

#[test]
fn embed_refuses_bad_input_cleanly() {
    let dir = tiny_qwen3();
    let model = dir.to_str().unwrap();
    for (args, needle) in [
        (vec!["embed", "--model", model], "nothing to embed"),
        (
            vec![
                "embed",
                "--model",
                model,
                "--text",
                "a",
                "--dimensions",
                "99",
            ],
            "dimensions 99",
        ),
        (
            vec!["embed", "--model", model, "--text", "a", "--pooling", "avg"],
            "pooling `avg`",
        ),
        (
            vec!["embed", "--model", "/no/such/folder", "--text", "a"],
            "/no/such/folder",
        ),
    ] {
        let out = pocketlm(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked") && stderr.contains(needle),
            "{stderr}"
        );
    }
}
