//! One-shot generation: load the default model, encode a chat prompt, collect the whole reply.
//!
//! Run: `cargo run --release -p pocketlm --example generate -- "Why is the sky blue?"`
//! (the default model is downloaded into $POCKETLM_HOME on first use).

use pocketlm::chat_template::Message;
use pocketlm::generate::{generate, GenerateParams};
use pocketlm::loader::{load, LoadOptions, Prompt};

fn main() -> pocketlm::Result<()> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Why is the sky blue?".into());
    let path = pocketlm::fetch::ensure_default_model(&mut |_| {})?;
    let m = load(&path, &LoadOptions::default())?;
    let ids = m.encode(&Prompt::Chat(vec![Message::user(question)]))?;
    let mut cache = m.model.new_cache();
    let params = GenerateParams {
        max_tokens: 128,
        ..Default::default()
    };
    let out =
        generate(m.model.as_ref(), &m.tokenizer, &mut cache, &ids, params)?.collect_output()?;
    println!("{}", out.text);
    eprintln!(
        "{} prompt tokens, {} generated ({:.1} tokens/s), finished: {}",
        out.stats.prompt_tokens,
        out.stats.generated_tokens,
        out.stats.decode_tokens_per_second(),
        out.finish_reason.as_openai()
    );
    Ok(())
}
