//! A prompt cache: prefill a long system prompt once, save its KV cache to a safetensors file,
//! then answer questions that start with it, prefilling only what follows.
//!
//! Run: `cargo run --release -p pocketlm --example prompt_cache`

use pocketlm::chat_template::Message;
use pocketlm::generate::{generate, GenerateParams};
use pocketlm::kv_cache::KvCacheConfig;
use pocketlm::loader::{load, LoadOptions, Prompt};
use pocketlm::prompt_cache;

const MANUAL: &str = "You answer questions about the Model K kettle. It holds 1.7 litres, \
boils in about three minutes, switches off by itself when the water boils or when it is \
lifted from its base, and must be descaled monthly with white vinegar in hard-water areas.";

fn main() -> pocketlm::Result<()> {
    let path = pocketlm::fetch::ensure_default_model(&mut |_| {})?;
    let m = load(&path, &LoadOptions::default())?;
    let file = std::env::temp_dir().join("pocketlm-kettle.safetensors");

    // Once: the system prompt's tokens (up to the user's turn) into a cache file.
    let prefix = m.encode(&Prompt::Chat(vec![
        Message::system(MANUAL),
        Message::user(""),
    ]))?;
    let cache = prompt_cache::prefill(&m, &prefix, &KvCacheConfig::default(), 512)?;
    prompt_cache::save(&file, &m, &cache, &prefix)?;
    eprintln!("saved {} tokens to {}", prefix.len(), file.display());

    // Later: reload it and prefill only what differs.
    for q in [
        "How much water does it hold?",
        "How often should I descale it?",
    ] {
        let mut loaded = prompt_cache::load(&file, &m, &KvCacheConfig::default())?;
        let ids = m.encode(&Prompt::Chat(vec![
            Message::system(MANUAL),
            Message::user(q),
        ]))?;
        let reused = prompt_cache::reuse_prefix(&mut loaded.cache, &loaded.token_ids, &ids);
        let params = GenerateParams {
            max_tokens: 48,
            ..Default::default()
        };
        let out = generate(
            m.model.as_ref(),
            &m.tokenizer,
            &mut loaded.cache,
            &ids[reused..],
            params,
        )?
        .collect_output()?;
        println!("> {q}\n{}", out.text);
        eprintln!(
            "  (reused {reused} tokens, prefilled {})",
            out.stats.prompt_tokens
        );
    }
    Ok(())
}
