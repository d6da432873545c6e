//! Prompt caches on the real default model: a saved cache reloads and continues with the same
//! greedy tokens as a run without it, prefilling only what the cache lacks; files made by
//! another model or not made by us are refused with a clear error.

use std::sync::Arc;

use pocketlm::chat_template::Message;
use pocketlm::generate::{generate, GenerateParams};
use pocketlm::kv_cache::KvCacheConfig;
use pocketlm::loader::{LoadedModel, Prompt};
use pocketlm::prompt_cache::{self, ModelIdentity};
use pocketlm::session::{ChatSession, SessionOptions};

fn model() -> Arc<LoadedModel> {
    // f32 weights: the cached and the fresh run prefill in different chunks, and with Q4_1
    // weights 8-bit activation quantization can turn that into different greedy paths at
    // near-ties (see tests/session.rs).
    pocketlm_testutil::default_model(true)
}

const SYSTEM: &str = "You are a librarian. The library opens at 9 am and closes at 6 pm on \
weekdays, 10 am to 4 pm on Saturdays, and is closed on Sundays. Members may borrow up to \
eight books for three weeks; late returns cost 20 cents per book per day. The reading room \
on the second floor is silent; group study rooms can be booked at the front desk.";

fn params() -> GenerateParams {
    GenerateParams {
        max_tokens: 24,
        ..Default::default()
    }
}

#[test]
fn saved_prompt_cache_continues_with_the_same_tokens() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("library.safetensors");
    // Cache the system prompt's rendering (as `pocketlm cache-prompt` does with a prompt).
    let prefix = m
        .encode(&Prompt::Chat(vec![
            Message::system(SYSTEM),
            Message::user("Hello"),
        ]))
        .unwrap();
    let cache = prompt_cache::prefill(&m, &prefix, &KvCacheConfig::default(), 64).unwrap();
    prompt_cache::save(&file, &m, &cache, &prefix).unwrap();

    let question = vec![
        Message::system(SYSTEM),
        Message::user("When does the library close on Saturdays?"),
    ];
    let ids = m.encode(&Prompt::Chat(question.clone())).unwrap();
    let mut fresh_cache = m.model.new_cache();
    let fresh = generate(
        m.model.as_ref(),
        &m.tokenizer,
        &mut fresh_cache,
        &ids,
        params(),
    )
    .unwrap()
    .collect_output()
    .unwrap();

    for cfg in [
        KvCacheConfig::default(),
        KvCacheConfig {
            kv_bits: Some(8),
            ..Default::default()
        },
    ] {
        let mut loaded = prompt_cache::load(&file, &m, &cfg).unwrap();
        assert_eq!(loaded.token_ids, prefix);
        assert_eq!(loaded.cache.offset(), prefix.len());
        let common = prompt_cache::reuse_prefix(&mut loaded.cache, &loaded.token_ids, &ids);
        // Everything up to the user message's text is reused.
        assert!(common + 20 > prefix.len(), "{common} of {}", prefix.len());
        let out = generate(
            m.model.as_ref(),
            &m.tokenizer,
            &mut loaded.cache,
            &ids[common..],
            params(),
        )
        .unwrap()
        .collect_output()
        .unwrap();
        assert_eq!(out.stats.prompt_tokens, ids.len() - common);
        if cfg.kv_bits.is_none() {
            assert_eq!(out.token_ids, fresh.token_ids);
        }
        eprintln!(
            "kv_bits {:?}: reused {common} of {} tokens, {:?}",
            cfg.kv_bits,
            ids.len(),
            out.text
        );
    }

    // A chat session started from the cache prefills only what follows the shared prefix.
    let loaded = prompt_cache::load(&file, &m, &KvCacheConfig::default()).unwrap();
    let mut s = ChatSession::new(
        m.clone(),
        SessionOptions {
            system: Some(SYSTEM.into()),
            params: params(),
            ..Default::default()
        },
    )
    .unwrap();
    s.with_cache(loaded.cache, loaded.token_ids).unwrap();
    let out = s
        .respond("When does the library close on Saturdays?")
        .unwrap();
    assert!(out.stats.prompt_tokens < 25, "{}", out.stats.prompt_tokens);
    assert_eq!(out.token_ids, fresh.token_ids);
}

#[test]
fn mismatched_or_foreign_files_are_refused() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let ids = m
        .tokenizer
        .encode("A short prompt to cache.", true)
        .unwrap();
    let cache = prompt_cache::prefill(&m, &ids, &KvCacheConfig::default(), 512).unwrap();
    let me = ModelIdentity::of(&m).unwrap();

    let other = dir.path().join("other.safetensors");
    let mut id = me.clone();
    id.size += 1;
    prompt_cache::save_with_identity(&other, &id, &cache, &ids).unwrap();
    let e = prompt_cache::load(&other, &m, &KvCacheConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another model") && e.contains("model.size") && e.contains("other.safetensors"),
        "{e}"
    );

    let mut id = me.clone();
    id.architecture = "gemma2".into();
    prompt_cache::save_with_identity(&other, &id, &cache, &ids).unwrap();
    let e = prompt_cache::load(&other, &m, &KvCacheConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.architecture") && e.contains("gemma2"),
        "{e}"
    );

    // Token ids that do not match the cache are refused at save time.
    assert!(prompt_cache::save_with_identity(&other, &me, &cache, &ids[1..]).is_err());

    // A safetensors file that is not a prompt cache.
    let foreign = dir.path().join("weights.safetensors");
    let t = candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    candle_core::safetensors::save(&[("w", t)].into_iter().collect(), &foreign).unwrap();
    let e = prompt_cache::load(&foreign, &m, &KvCacheConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a pocketlm prompt cache"), "{e}");

    // Not a safetensors file at all, and a missing file.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"hello").unwrap();
    let e = prompt_cache::load(&junk, &m, &KvCacheConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.safetensors"), "{e}");
    let e = prompt_cache::load(dir.path().join("missing"), &m, &KvCacheConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing"), "{e}");
}

// mlx-lm's prompt-cache files (`mlx_lm cache_prompt`), against
// `scripts/golden/mlx_cache_prompt_cli.py` on the tiny Qwen3 folder of archs/ (bfloat16 weights, ChatML; mlx-lm reads its
// transformers-5 `rope_parameters`, which its Llama does not).

mod mlx_lm {
    use std::path::{Path, PathBuf};

    use candle_core::Device;
    use pocketlm::generate::{generate, GenerateParams};
    use pocketlm::kv_cache::{KvCache, KvCacheConfig};
    use pocketlm::loader::{load, LoadOptions, LoadedModel};
    use pocketlm::mlx_prompt_cache;
    use pocketlm::prompt_cache;

    #[derive(serde::Deserialize)]
    struct Golden {
        model: String,
        prefix: String,
        suffix: String,
        cache_ids: Vec<u32>,
        continuation_ids: Vec<u32>,
        tokens: Vec<u32>,
    }

    fn golden_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
    }

    fn mlx_file() -> PathBuf {
        golden_dir().join("kv_cache/mlx_cache_prompt.safetensors")
    }

    fn golden() -> Golden {
        let text = std::fs::read_to_string(golden_dir().join("kv_cache/mlx_cache_prompt.json"))
            .expect("the golden json");
        serde_json::from_str(&text).expect("golden json")
    }

    fn tiny_qwen3() -> LoadedModel {
        let opts = LoadOptions {
            device: pocketlm::device::DeviceSpec::Cpu,
            dequantize: false,
            ..Default::default()
        };
        load(golden_dir().join("archs/qwen3"), &opts).expect("the tiny Qwen3 folder")
    }

    fn greedy(m: &LoadedModel, cache: &mut KvCache, ids: &[u32], n: usize) -> Vec<u32> {
        let params = GenerateParams {
            max_tokens: n,
            ..Default::default()
        };
        generate(m.model.as_ref(), &m.tokenizer, cache, ids, params)
            .unwrap()
            .collect_output()
            .unwrap()
            .token_ids
    }

    /// A cache written by `mlx_lm cache_prompt` loads here, the continuation prompt is
    /// tokenized as `mlx_lm generate --prompt-cache-file` does, and greedy decoding gives
    /// mlx-lm's 16 tokens (also through an 8-bit quantized KV cache: the file's keys and values
    /// are quantized as they enter). A file of another shape is refused naming the tensor and the file.
    #[test]
    fn mlx_lm_cache_file_continues_with_mlx_lm_tokens() {
        let g = golden();
        let m = tiny_qwen3();
        assert!(mlx_prompt_cache::is_mlx_prompt_cache(&mlx_file()).unwrap());
        let mut cache =
            mlx_prompt_cache::load_for_model(&mlx_file(), &m, &KvCacheConfig::default()).unwrap();
        assert_eq!(cache.offset(), g.cache_ids.len());
        let ids = mlx_prompt_cache::continuation_ids(&m, None, &g.suffix, true).unwrap();
        assert_eq!(ids, g.continuation_ids);
        let got = greedy(&m, &mut cache, &ids, g.tokens.len());
        assert_eq!(got, g.tokens, "ours from mlx-lm's cache vs mlx-lm");

        // Into an 8-bit quantized cache (groups of 32: the head dim): the file's keys and values
        // are quantized as they enter.
        let q8 = KvCacheConfig {
            kv_bits: Some(8),
            kv_group_size: 32,
            ..Default::default()
        };
        let mut cache = mlx_prompt_cache::load_for_model(&mlx_file(), &m, &q8).unwrap();
        assert_eq!(cache.offset(), g.cache_ids.len());
        let got = greedy(&m, &mut cache, &ids, g.tokens.len());
        eprintln!("8-bit KV cache from mlx-lm's file: {got:?}");
        assert_eq!(
            got, g.tokens,
            "ours from mlx-lm's cache, 8-bit KV, vs mlx-lm"
        );

        // Our own prompt cache is not taken for an mlx-lm one.
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.safetensors");
        let c = prompt_cache::prefill(&m, &g.cache_ids, &KvCacheConfig::default(), 64).unwrap();
        prompt_cache::save(&ours, &m, &c, &g.cache_ids).unwrap();
        assert!(!mlx_prompt_cache::is_mlx_prompt_cache(&ours).unwrap());

        // Another head dim: refused, naming the tensor and the file.
        let mut wrong = KvCache::growing(2);
        for i in 0..2 {
            let t = candle_core::Tensor::zeros((1, 2, 3, 8), candle_core::DType::F32, &Device::Cpu)
                .unwrap();
            wrong.layer(i).unwrap().update(&t, &t).unwrap();
        }
        let bad = dir.path().join("wrong.safetensors");
        mlx_prompt_cache::save(&bad, &wrong, &Default::default()).unwrap();
        let e = mlx_prompt_cache::load_for_model(&bad, &m, &KvCacheConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("0.0") && e.contains("wrong.safetensors"), "{e}");
    }

    /// Max |ours - mlx-lm| over the keys and values of two mlx-lm cache files.
    fn max_diff(a: &Path, b: &Path) -> f32 {
        let (a, b) = (
            mlx_prompt_cache::load(a, &Device::Cpu).unwrap(),
            mlx_prompt_cache::load(b, &Device::Cpu).unwrap(),
        );
        assert_eq!(a.layers.len(), b.layers.len());
        let mut worst = 0f32;
        for ((ka, va), (kb, vb)) in a.layers.iter().zip(&b.layers) {
            for (x, y) in [(ka, kb), (va, vb)] {
                assert_eq!(x.dims(), y.dims());
                let d = (x - y).unwrap().abs().unwrap().flatten_all().unwrap();
                worst = worst.max(d.max(0).unwrap().to_scalar::<f32>().unwrap());
            }
        }
        worst
    }

    /// `cache-prompt --format mlx`'s steps: the prefix is tokenized as `mlx_lm cache_prompt`
    /// does, and the file we write holds mlx-lm's keys and values and its metadata. mlx-lm
    /// computes in bfloat16 (relative step 2^-8) through the 2 layers, we in f32: measured max
    /// |difference| 0.027 (layer 0) and 0.080 (layer 1) on values up to 5.6; bound 0.1. With `POCKETLM_MLX_CACHE_OUT` set,
    /// the file is copied there for `mlx_cache_prompt_cli.py check` (mlx-lm continuing from it).
    #[test]
    fn mlx_lm_cache_written_here_matches_mlx_lm_file() {
        let g = golden();
        let m = tiny_qwen3();
        let ids = mlx_prompt_cache::cache_prompt_ids(&m, None, &g.prefix, true).unwrap();
        assert_eq!(ids, g.cache_ids);
        let cache = prompt_cache::prefill(&m, &ids, &KvCacheConfig::default(), 512).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.safetensors");
        let meta = mlx_prompt_cache::cache_prompt_metadata(&g.model);
        mlx_prompt_cache::save(&ours, &cache, &meta).unwrap();
        let theirs = mlx_prompt_cache::load(&mlx_file(), &Device::Cpu).unwrap();
        assert_eq!(theirs.metadata, meta);
        if let Some(out) = std::env::var_os("POCKETLM_MLX_CACHE_OUT") {
            std::fs::copy(&ours, out).unwrap();
        }
        let diff = max_diff(&ours, &mlx_file());
        eprintln!("max |ours - mlx-lm| over the cached keys and values: {diff}");
        assert!(diff < 0.1, "{diff}");
    }
}
