//! A model folder's `generation_config.json`: default sampling as transformers'
//! `GenerationConfig` reads it, and `eos_token_id` (an integer or a list) ending generation.
//! Uses the tiny Llama folder of `tests/golden/folders/tiny_llama` (from
//! `scripts/golden/tiny_folders.py`) with edited copies of the file.

use std::path::{Path, PathBuf};

use pocketlm::device::DeviceSpec;
use pocketlm::generate::{generate, FinishReason, GenerateParams};
use pocketlm::loader::{load, GenerationConfig, LoadOptions, LoadedModel};
use pocketlm::sampling::SamplingParams;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/folders/tiny_llama")
}

fn cpu() -> LoadOptions {
    LoadOptions {
        device: DeviceSpec::Cpu,
        dequantize: false,
        ..Default::default()
    }
}

/// A copy of the tiny folder with `generation_config.json` replaced by `json` (removed when
/// `None`).
fn with_generation_config(json: Option<&str>) -> Res<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    for e in std::fs::read_dir(tiny())? {
        let e = e?;
        std::fs::copy(e.path(), tmp.path().join(e.file_name()))?;
    }
    let p = tmp.path().join("generation_config.json");
    match json {
        Some(j) => std::fs::write(&p, j)?,
        None => std::fs::remove_file(&p)?,
    }
    Ok(tmp)
}

/// Greedy generation of up to 12 tokens after a fixed prompt, stopping at end of generation.
fn greedy(m: &LoadedModel) -> Res<(Vec<u32>, FinishReason)> {
    let mut cache = m.model.new_cache();
    let params = GenerateParams {
        max_tokens: 12,
        ..Default::default()
    };
    let out = generate(
        m.model.as_ref(),
        &m.tokenizer,
        &mut cache,
        &[1, 5, 9, 42, 7],
        params,
    )?
    .collect_output()?;
    Ok((out.token_ids, out.finish_reason))
}

#[test]
fn sampling_defaults_follow_transformers() -> Res<()> {
    let p = Path::new("generation_config.json");
    let parse = |j: &str| GenerationConfig::from_json(&serde_json::from_str(j).unwrap(), p);

    // do_sample absent or false: greedy whatever the other fields say; the penalty applies.
    let g = parse(r#"{"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.2}"#)?;
    assert_eq!(
        g.sampling,
        Some(SamplingParams {
            repetition_penalty: 1.2,
            ..Default::default()
        })
    );
    assert!(g.eos_token_ids.is_empty());

    // No sampling field at all (a file of token ids): no sampling defaults of its own.
    let g = parse(r#"{"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.46"}"#)?;
    assert_eq!(g.sampling, None);
    assert_eq!(g.eos_token_ids, vec![2]);

    // do_sample true: the fields, with transformers' defaults for the missing ones.
    let g = parse(
        r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "min_p": 0.05, "eos_token_id": [2, 7], "max_length": 100}"#,
    )?;
    assert_eq!(
        g.sampling,
        Some(SamplingParams {
            temperature: 0.6,
            top_p: 0.9,
            top_k: 50,
            min_p: 0.05,
            ..Default::default()
        })
    );
    assert_eq!(g.eos_token_ids, vec![2, 7]);
    let g = parse(r#"{"do_sample": true, "top_k": 0, "eos_token_id": 3}"#)?;
    let s = g.sampling.ok_or("sampling fields given")?;
    assert_eq!((s.temperature, s.top_k), (1.0, 0));
    assert_eq!(g.eos_token_ids, vec![3]);

    // Bad fields are named with the file.
    for (json, field) in [
        (
            r#"{"do_sample": true, "temperature": "hot"}"#,
            "temperature",
        ),
        (r#"{"eos_token_id": -1}"#, "eos_token_id"),
        (r#"{"eos_token_id": [2, 1.5]}"#, "eos_token_id"),
        (r#"{"do_sample": "yes"}"#, "do_sample"),
        (r#"{"do_sample": true, "top_p": 1.5}"#, "top_p"),
    ] {
        let msg = parse(json).unwrap_err().to_string();
        assert!(
            msg.contains("generation_config.json") && msg.contains(field),
            "{json}: {msg}"
        );
    }
    Ok(())
}

#[test]
fn folder_generation_config_sets_defaults_and_end_ids() -> Res<()> {
    // Without the file: the library's recommended sampling; greedy generation runs to
    // max_tokens.
    let plain = with_generation_config(None)?;
    let m = load(plain.path(), &cpu())?;
    assert!(m.generation_config.is_none());
    assert_eq!(m.default_sampling(), SamplingParams::recommended());
    let (ids, reason) = greedy(&m)?;
    assert_eq!(ids.len(), 12, "{ids:?}");
    assert_eq!(reason, FinishReason::MaxTokens);

    // A token greedy decoding reaches (at step 4) becomes an extra end-of-generation id.
    let stop = ids[3];
    assert!(
        !m.tokenizer.is_eog(stop),
        "pick another prompt: {stop} already ends"
    );
    assert!(
        !ids[..3].contains(&stop),
        "pick another prompt: {stop} comes earlier: {ids:?}"
    );
    let json = format!(
        r#"{{"do_sample": true, "temperature": 0.7, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.05, "eos_token_id": [2, {stop}]}}"#
    );
    let dir = with_generation_config(Some(&json))?;
    let m = load(dir.path(), &cpu())?;
    let d = m.default_sampling();
    assert_eq!(
        (d.temperature, d.top_k, d.top_p, d.repetition_penalty),
        (0.7, 20, 0.95, 1.05)
    );
    assert!(m.tokenizer.is_eog(stop) && m.tokenizer.is_eog(2));
    let (ids2, reason) = greedy(&m)?;
    assert_eq!(ids2, ids[..3].to_vec());
    assert_eq!(reason, FinishReason::Eos);

    // An id outside the vocabulary is an error naming the file and field.
    let dir = with_generation_config(Some(r#"{"eos_token_id": [2, 100000]}"#))?;
    let msg = load(dir.path(), &cpu()).unwrap_err().to_string();
    assert!(
        msg.contains("generation_config.json")
            && msg.contains("eos_token_id")
            && msg.contains("100000"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn add_eog_token_ids_extends_the_set_only() -> Res<()> {
    let m = load(tiny(), &cpu())?;
    let mut tok = m.tokenizer.clone();
    let before = tok.eog_token_ids().clone();
    let new_id = (0..tok.vocab_size() as u32)
        .find(|i| !before.contains(i))
        .ok_or("every id ends generation")?;
    tok.add_eog_token_ids([new_id])?;
    assert!(tok.is_eog(new_id));
    assert_eq!(tok.eog_token_ids().len(), before.len() + 1);
    assert_eq!(tok.eos_token_id(), m.tokenizer.eos_token_id());
    let vocab = tok.vocab_size() as u32;
    assert!(tok.add_eog_token_ids([new_id, vocab]).is_err());
    assert_eq!(tok.eog_token_ids().len(), before.len() + 1);
    Ok(())
}
