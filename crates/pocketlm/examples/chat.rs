//! A chat session: each turn prefills only the tokens it adds to the conversation.
//!
//! Run: `cargo run --release -p pocketlm --example chat`

use std::sync::Arc;

use pocketlm::generate::{Event, GenerateParams};
use pocketlm::kv_cache::KvCacheConfig;
use pocketlm::loader::{load, LoadOptions};
use pocketlm::session::{ChatSession, OverflowStrategy, SessionOptions};

fn main() -> pocketlm::Result<()> {
    let path = pocketlm::fetch::ensure_default_model(&mut |_| {})?;
    let model = Arc::new(load(&path, &LoadOptions::default())?);
    let mut session = ChatSession::new(
        model,
        SessionOptions {
            system: Some("You are a friendly travel guide. Answer briefly.".into()),
            params: GenerateParams {
                max_tokens: 64,
                ..Default::default()
            },
            // Long conversations keep the first tokens and a sliding window of 1024.
            cache: KvCacheConfig {
                max_kv_size: Some(1024),
                ..Default::default()
            },
            overflow: OverflowStrategy::Rotate,
            context_length: None,
            engine: None,
        },
    )?;
    // Whole replies.
    for question in ["What should I see in Rome?", "And where should I eat?"] {
        let out = session.respond(question)?;
        println!("> {question}\n{}", out.text);
        eprintln!("  ({} new prompt tokens)", out.stats.prompt_tokens);
    }
    // A streamed reply.
    println!("> How do I get from the airport to the centre?");
    for ev in session.respond_stream("How do I get from the airport to the centre?")? {
        match ev? {
            Event::Token { text, .. } | Event::Text(text) => print!("{text}"),
            Event::Finished { stats, .. } => {
                println!();
                eprintln!("  ({} new prompt tokens)", stats.prompt_tokens)
            }
        }
    }
    eprintln!(
        "{} messages, {} tokens cached, {} bytes of KV cache",
        session.history().len(),
        session.cached_token_ids().len(),
        session.kv_cache_bytes()
    );
    Ok(())
}
