//! Streaming generation: print text as it is produced, stop early from the consumer's side
//! (dropping the stream cancels), and use a quantized KV cache.
//!
//! Run: `cargo run --release -p pocketlm --example stream -- "Tell me a story."`

use std::io::Write;

use pocketlm::chat_template::Message;
use pocketlm::generate::{generate, Event, GenerateParams};
use pocketlm::kv_cache::KvCacheConfig;
use pocketlm::loader::{load, LoadOptions, Prompt};
use pocketlm::sampling::SamplingParams;

fn main() -> pocketlm::Result<()> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Tell me a story about a lighthouse.".into());
    let path = pocketlm::fetch::ensure_default_model(&mut |_| {})?;
    let m = load(&path, &LoadOptions::default())?;
    let ids = m.encode(&Prompt::Chat(vec![Message::user(prompt)]))?;
    // Keys and values stored at 8 bits (about 28% of the float cache's bytes).
    let config = KvCacheConfig {
        kv_bits: Some(8),
        ..Default::default()
    };
    let mut cache = m.model.make_cache(&config)?;
    let params = GenerateParams {
        max_tokens: 200,
        sampling: SamplingParams {
            temperature: 0.7,
            seed: Some(42),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut out = std::io::stdout();
    let mut chars = 0;
    for ev in generate(m.model.as_ref(), &m.tokenizer, &mut cache, &ids, params)? {
        match ev? {
            Event::Token { text, .. } | Event::Text(text) => {
                chars += text.chars().count();
                print!("{text}");
                out.flush().ok();
                if chars > 400 {
                    // A length guard: leaving the loop drops the stream and cancels it.
                    println!(" [...]");
                    break;
                }
            }
            Event::Finished { reason, stats } => {
                println!();
                eprintln!(
                    "finished ({}): {} tokens, {:.1} tokens/s",
                    reason.as_openai(),
                    stats.generated_tokens,
                    stats.decode_tokens_per_second()
                );
            }
        }
    }
    eprintln!(
        "KV cache: {} positions, {} bytes",
        cache.offset(),
        cache.nbytes()
    );
    Ok(())
}
