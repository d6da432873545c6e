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
