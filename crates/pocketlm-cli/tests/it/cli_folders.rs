//! The `pocketlm` binary with model folders and hub ids: `convert` with per-layer quantization,
//! and `--model org/name` resolved through the Hugging Face cache (offline: a clear error).

use std::path::PathBuf;
use std::process::{Command, Output};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pocketlm/tests/golden/folders/tiny_llama")
}

fn pocketlm(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pocketlm"));
    cmd.args(args);
    for v in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running pocketlm")
}

#[test]
fn convert_writes_recipe_and_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mixed");
    let o = pocketlm(
        &[
            "convert",
            "--model",
            tiny().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-q",
            "--quant-predicate",
            "mixed_4_6",
            "--q-override",
            "model.layers.0.mlp.*=8:32",
            "--q-override",
            "model.embed_tokens=off",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let q = &cfg["quantization"];
    assert_eq!(q["bits"], 4);
    assert_eq!(q["model.embed_tokens"], false);
    assert_eq!(
        q["model.layers.0.mlp.up_proj"],
        serde_json::json!({"group_size": 32, "bits": 8})
    );
    assert_eq!(q["model.layers.1.mlp.down_proj"]["bits"], 6);
    assert_eq!(q["lm_head"]["bits"], 6);
    // Overrides without -q are refused by the argument parser.
    let o = pocketlm(
        &[
            "convert",
            "--model",
            tiny().to_str().unwrap(),
            "--out",
            tmp.path().join("x").to_str().unwrap(),
            "--q-override",
            "lm_head=8",
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--quantize"));
}

#[test]
fn hub_id_offline_without_cache_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().display().to_string();
    for args in [
        &[
            "generate",
            "--model",
            "some-org/some-model",
            "--prompt",
            "hi",
        ][..],
        &[
            "convert",
            "--model",
            "some-org/some-model@v1",
            "--out",
            "/nonexistent/x",
        ][..],
    ] {
        let o = pocketlm(args, &[("HF_HOME", &home), ("HF_HUB_OFFLINE", "1")]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for needle in ["some-org/some-model", "HF_HUB_OFFLINE", home.as_str()] {
            assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
        }
    }
}

/// `pocketlm generate` on each architecture's tiny model, from its Hugging Face folder and from
/// the GGUF llama.cpp's converter made of it (`scripts/golden/tiny_gguf.py`): exits 0 and
/// reports its generation (random weights: the text itself means nothing; the logits are
/// checked in `archs_golden.rs`).
#[test]
fn generate_runs_on_every_architecture_folder_and_gguf() {
    let archs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pocketlm/tests/golden/archs");
    for name in ["qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mistral"] {
        for model in [archs.join(name), archs.join(format!("{name}.gguf"))] {
            let o = pocketlm(
                &[
                    "generate",
                    "--model",
                    model.to_str().unwrap(),
                    "--prompt",
                    "hello world",
                    "--max-tokens",
                    "4",
                    "--temp",
                    "0",
                    "--no-chat-template",
                    "--verbose",
                ],
                &[],
            );
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{}: {err}", model.display());
            assert!(
                err.contains("Generation: "),
                "{}: no generation statistics in {err}",
                model.display()
            );
        }
    }
}
