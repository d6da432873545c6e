//! `pocketlm generate`: one prompt, one streamed answer.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use pocketlm::chat_template::Message;
use pocketlm::generate::{generate, Event, GenerateParams, GenerationStats};
use pocketlm::loader::Prompt;

use super::cache::KvArgs;
use super::model::{load, ModelArgs, SamplingArgs};

/// Arguments of `generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// A system message (chat template only).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Feed the prompt as plain text instead of through the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Print load and generation statistics to stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// Builds the prompt: chat-templated unless disabled or the model has no template.
pub fn build_prompt(
    has_template: bool,
    no_template: bool,
    system: Option<&str>,
    text: &str,
) -> Prompt {
    if no_template || !has_template {
        return Prompt::Text(text.to_string());
    }
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message::new("system", s));
    }
    messages.push(Message::new("user", text));
    Prompt::Chat(messages)
}

/// Prints generation statistics the way `mlx_lm.generate --verbose` does.
pub fn print_stats(stats: &GenerationStats, reason: &str) {
    eprintln!("==========");
    eprintln!(
        "Prompt: {} tokens, {:.3} tokens-per-sec",
        stats.prompt_tokens,
        stats.prefill_tokens_per_second()
    );
    eprintln!(
        "Generation: {} tokens, {:.3} tokens-per-sec (finished: {reason})",
        stats.generated_tokens,
        stats.decode_tokens_per_second()
    );
    if let Some(p) = stats.peak_memory_bytes {
        eprintln!("Peak memory: {:.3} GB", p as f64 / 1e9);
    }
}

/// Runs `generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let m = load(&args.model, args.verbose)?;
    let prompt = build_prompt(
        m.chat_template.is_some(),
        args.no_chat_template,
        args.system.as_deref(),
        &args.prompt,
    );
    let ids = m.encode(&prompt)?;
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params(&m.default_sampling()),
        stop: args.stop.clone(),
        ..Default::default()
    };
    let (mut cache, cached) = args.kv.cache(&m, args.verbose)?;
    let reused = pocketlm::prompt_cache::reuse_prefix(&mut cache, &cached, &ids);
    if args.verbose && args.kv.prompt_cache_file.is_some() {
        eprintln!("reusing {reused} cached prompt tokens");
    }
    let stream = generate(
        m.model.as_ref(),
        &m.tokenizer,
        &mut cache,
        &ids[reused..],
        params,
    )?;
    let mut out = std::io::stdout().lock();
    for ev in stream {
        match ev? {
            Event::Token { text, .. } | Event::Text(text) => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            Event::Finished { reason, stats } => {
                writeln!(out)?;
                if args.verbose {
                    print_stats(&stats, reason.as_openai());
                }
            }
        }
    }
    Ok(())
}
