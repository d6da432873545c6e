//! Tokenizers against references nobody here wrote: Hugging Face transformers (golden files from
//! `scripts/golden/tokenizer.py`), with llama.cpp's ids recorded alongside.
//!
//! - `smollm2.json`: the real default GGUF (byte-level BPE, `tokenizer.ggml.pre = smollm`); the
//!   model is fetched into `$POCKETLM_HOME/models/` on first use.
//! - `tiny_spm.json` + `tiny_spm.gguf`: a tiny SentencePiece vocabulary (byte fallback).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use pocketlm::tokenizer::Tokenizer;
use serde_json::Value as Json;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tokenizer")
}

fn model_path() -> PathBuf {
    pocketlm_testutil::default_model_path()
}

fn metadata(path: &Path) -> HashMap<String, Value> {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Content::read(&mut f)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .metadata
}

fn golden(name: &str) -> Json {
    let path = golden_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn text(v: &Json) -> &str {
    v.as_str().expect("string")
}

/// Texts where transformers' GGUF tokenizer is not the model's tokenizer, and llama.cpp's ids are
/// asserted instead. transformers 5.23 has no `smollm` entry in `GGUF_PRE_TOKENIZER_SPLITS`, so it
/// splits with the plain GPT-2 regex; SmolLM2's own `tokenizer.json` splits every `\p{N}`
/// character first (`Digits(individual_digits = true)`), which is what llama.cpp (`smollm` pre)
/// and we do. The two only differ on numerals the BPE merges could join: here `①②`.
const SMOLLM2_TRANSFORMERS_DEVIATIONS: &[&str] =
    &["e\u{301} (combining acute) vs é, n\u{303} vs ñ, ﬁ ligature, ①②"];

/// Encode / decode / stream-decode every case and compare with the golden values. For texts in
/// `deviations`, the encoding must equal `llama_cpp_ids` and differ from transformers' `ids`.
fn check_cases(tok: &Tokenizer, g: &Json, deviations: &[&str]) -> usize {
    let cases = g["cases"].as_array().expect("cases");
    let mut failures = Vec::new();
    for case in cases {
        let t = text(&case["text"]);
        let want = ids(&case["ids"]);
        let deviation = deviations.contains(&t);
        let (want_encode, want_special) = if deviation {
            let llama = ids(&case["llama_cpp_ids"]);
            assert_ne!(
                llama, want,
                "{t:?} is listed as a deviation but the references agree"
            );
            (llama.clone(), llama)
        } else {
            (want.clone(), ids(&case["ids_with_special"]))
        };
        let got = tok.encode(t, false).expect("encode");
        if got != want_encode {
            failures.push(format!(
                "encode({t:?}):\n  got  {got:?}\n  want {want_encode:?}"
            ));
            continue;
        }
        let got = tok.encode(t, true).expect("encode with specials");
        if got != want_special {
            failures.push(format!(
                "encode({t:?}, specials):\n  got  {got:?}\n  want {want_special:?}"
            ));
        }
        for (skip, key) in [(false, "decoded"), (true, "decoded_skip_special")] {
            let want_text = text(&case[key]);
            let got = tok.decode(&want, skip).expect("decode");
            if got != want_text {
                failures.push(format!(
                    "decode({want:?}, skip={skip}):\n  got  {got:?}\n  want {want_text:?}"
                ));
            }
            // Streaming one id at a time gives the same text, in chunks without U+FFFD.
            let mut stream = tok.stream_decoder(skip);
            let mut streamed = String::new();
            for &id in &want {
                if let Some(chunk) = stream.push(id).expect("push") {
                    assert!(!chunk.contains('\u{FFFD}'), "chunk {chunk:?} of {t:?}");
                    streamed.push_str(&chunk);
                }
            }
            if let Some(rest) = stream.flush().expect("flush") {
                streamed.push_str(&rest);
            }
            if streamed != want_text {
                failures.push(format!(
                    "stream({want:?}, skip={skip}):\n  got  {streamed:?}\n  want {want_text:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    cases.len()
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let md = metadata(&model_path());
    let tok = Tokenizer::from_gguf_metadata(&md).expect("tokenizer from GGUF");
    let g = golden("smollm2.json");
    assert_eq!(
        tok.vocab_size() as u64,
        g["vocab_size"].as_u64().expect("vocab_size")
    );
    assert_eq!(tok.bos_token(), g["bos_token"].as_str());
    assert_eq!(tok.eos_token(), g["eos_token"].as_str());
    assert_eq!(
        tok.bos_token_id().map(u64::from),
        g["bos_token_id"].as_u64()
    );
    assert_eq!(
        tok.eos_token_id().map(u64::from),
        g["eos_token_id"].as_u64()
    );
    assert!(!tok.add_bos() && !tok.add_eos());
    let n = check_cases(&tok, &g, SMOLLM2_TRANSFORMERS_DEVIATIONS);
    assert!(n >= 20, "only {n} cases");
}

#[test]
fn smollm2_matches_llama_cpp_ids_and_eog() {
    let md = metadata(&model_path());
    let tok = Tokenizer::from_gguf_metadata(&md).expect("tokenizer from GGUF");
    let g = golden("smollm2.json");
    let eog = ids(&g["llama_cpp_eog_ids"]);
    assert_eq!(tok.eog_token_ids().iter().copied().collect::<Vec<_>>(), eog);
    for case in g["cases"].as_array().expect("cases") {
        let t = text(&case["text"]);
        assert_eq!(
            tok.encode(t, false).expect("encode"),
            ids(&case["llama_cpp_ids"]),
            "{t:?}"
        );
    }
}

#[test]
fn tiny_spm_gguf_matches_transformers() {
    let md = metadata(&golden_dir().join("tiny_spm.gguf"));
    let tok = Tokenizer::from_gguf_metadata(&md).expect("tokenizer from tiny SPM GGUF");
    let g = golden("tiny_spm.json");
    assert_eq!(
        tok.vocab_size() as u64,
        g["vocab_size"].as_u64().expect("vocab_size")
    );
    assert_eq!(
        tok.bos_token_id().map(u64::from),
        g["bos_token_id"].as_u64()
    );
    assert_eq!(
        tok.eos_token_id().map(u64::from),
        g["eos_token_id"].as_u64()
    );
    assert!(tok.add_bos());
    let n = check_cases(&tok, &g, &[]);
    assert!(n >= 10, "only {n} cases");
}
