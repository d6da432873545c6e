//! `pocketlm chat`: an interactive multi-turn conversation in the terminal. The conversation
//! is a library `ChatSession`, which keeps its KV cache between turns and prefills only the
//! tokens each turn adds.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use pocketlm::generate::{Event, GenerateParams};
use pocketlm::session::{ChatSession, OverflowStrategy, SessionOptions};

use super::cache::KvArgs;
use super::generate::print_stats;
use super::model::{load, ModelArgs, SamplingArgs};

/// What to do when the conversation fills the context.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse the turn.
    Error,
    /// Keep the first tokens and a sliding window in a rotating cache (--max-kv-size, 2048 by
    /// default).
    Rotate,
    /// Drop the oldest turns.
    Truncate,
}

/// Arguments of `chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system message that starts the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// What to do when the conversation no longer fits in the context.
    #[arg(long, value_enum, default_value_t = Overflow::Error)]
    pub overflow: Overflow,
    /// Tokens the conversation may use (default: the model's context length).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Print statistics after each reply.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// Runs `chat`: reads user turns from stdin until `/exit` or end of input.
pub fn run(args: ChatArgs) -> Result<()> {
    let m = Arc::new(load(&args.model, args.verbose)?);
    if m.chat_template.is_none() {
        bail!(
            "{} has no chat template; use `pocketlm generate`",
            m.path.display()
        );
    }
    let options = SessionOptions {
        system: args.system.clone(),
        params: GenerateParams {
            max_tokens: args.max_tokens,
            sampling: args.sampling.params(&m.default_sampling()),
            ..Default::default()
        },
        cache: args.kv.config(),
        overflow: match args.overflow {
            Overflow::Error => OverflowStrategy::Error,
            Overflow::Rotate => OverflowStrategy::Rotate,
            Overflow::Truncate => OverflowStrategy::TruncateOldestTurns,
        },
        context_length: args.max_context,
    };
    let mut session = ChatSession::new(m.clone(), options)?;
    let load_prompt_cache = |session: &mut ChatSession| -> Result<()> {
        if args.kv.prompt_cache_file.is_some() {
            let (cache, ids) = args.kv.cache(&m, args.verbose)?;
            session.with_cache(cache, ids)?;
        }
        Ok(())
    };
    load_prompt_cache(&mut session)?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "Chatting with {}. Type /image PATH to attach an image to your next message, \
             /reset to start over, /exit to quit.",
            m.path.display()
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout();
    let mut pending_images = Vec::new();
    loop {
        if interactive {
            eprint!(">> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                session.reset();
                load_prompt_cache(&mut session)?;
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        if let Some(path) = text.strip_prefix("/image ") {
            if m.model.vision().is_none() {
                eprintln!("(this model takes no images)");
                continue;
            }
            match pocketlm::image_processor::load_image(std::path::Path::new(path.trim())) {
                Ok(img) => {
                    eprintln!(
                        "(image attached to your next message: {}x{})",
                        img.width, img.height
                    );
                    pending_images.push(img);
                }
                Err(e) => eprintln!("(image not attached: {e})"),
            }
            continue;
        }
        let stream = session.respond_stream_with_images(text, std::mem::take(&mut pending_images));
        for ev in stream? {
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
    }
    Ok(())
}
