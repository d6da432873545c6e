//! `pocketlm chat`: an interactive multi-turn conversation in the terminal. The conversation
//! is a library `ChatSession`, which keeps its KV cache between turns and prefills only the
//! tokens each turn adds.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use pocketlm::generate::batch::BatchConfig;
use pocketlm::generate::engine::Engine;
use pocketlm::generate::GenerateParams;
use pocketlm::session::{ChatSession, OverflowStrategy, SessionOptions};

use super::cache::KvArgs;
use super::generate::write_event;
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

/// The commands `chat` takes, as one line (`/image` only for vision-language models).
fn commands_help(vision: bool) -> &'static str {
    if vision {
        "Type /image PATH to attach an image to your next message, /reset to start over, /exit to quit."
    } else {
        "Type /reset to start over, /exit to quit."
    }
}

/// `Some(command)` when `line` is a command (`/word`, a slash then letters, alone or before a
/// space) that `chat` does not know; `None` for known commands and for ordinary messages (a
/// path such as `/usr/bin/env` is a message).
fn unknown_command(line: &str, vision: bool) -> Option<&str> {
    let word = line.strip_prefix('/')?.split(' ').next()?;
    if word.is_empty() || !word.chars().all(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    let known = matches!(word, "exit" | "quit" | "reset") || (vision && word == "image");
    (!known).then(|| &line[..word.len() + 1])
}

/// What Ctrl-C does in `chat`: during a reply it stops the reply (the signal handler sets
/// `stop`, the reply loop sees it before its next chunk); anywhere else (at the prompt) it
/// ends the program with status 130.
#[derive(Default)]
struct Interrupt {
    /// A reply is being generated.
    generating: AtomicBool,
    /// Ctrl-C came during the reply.
    stop: AtomicBool,
}

impl Interrupt {
    /// Installs the Ctrl-C handler (the `ctrlc` crate: SIGINT on Unix, console events on
    /// Windows).
    fn install() -> Result<Arc<Self>> {
        let state = Arc::new(Interrupt::default());
        let s = state.clone();
        ctrlc::set_handler(move || {
            if s.generating.load(Ordering::SeqCst) {
                s.stop.store(true, Ordering::SeqCst);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl-C handler")?;
        Ok(state)
    }

    /// Marks the start (`true`) or end of a reply; a start clears an earlier stop.
    fn set_generating(&self, on: bool) {
        self.stop.store(false, Ordering::SeqCst);
        self.generating.store(on, Ordering::SeqCst);
    }

    /// Whether Ctrl-C asked to stop the reply.
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Runs `chat`: reads user turns from stdin until `/exit`, end of input or Ctrl-C at the
/// prompt. Ctrl-C during a reply stops it and keeps the conversation, with the part of the
/// reply already shown recorded as the assistant's answer (a reply stopped before its first
/// token is dropped, with the user message that asked for it).
pub fn run(args: ChatArgs) -> Result<()> {
    let interrupt = Interrupt::install()?;
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
        // The library's continuous batch, as `serve` runs it (here for one conversation).
        engine: Some(Arc::new(Engine::new(m.clone(), BatchConfig::default())?)),
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
    let vision = m.model.vision().is_some();
    if interactive {
        eprintln!(
            "Chatting with {}. {}",
            m.path.display(),
            commands_help(vision)
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
        if let Some(cmd) = unknown_command(text, vision) {
            eprintln!("(unknown command {cmd}) {}", commands_help(vision));
            continue;
        }
        if let Some(path) = text.strip_prefix("/image ") {
            if !vision {
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
        interrupt.set_generating(true);
        let result = (|| -> Result<()> {
            let mut stream =
                session.respond_stream_with_images(text, std::mem::take(&mut pending_images))?;
            loop {
                // Checked before each token is computed, so the session records exactly the
                // text shown.
                if interrupt.stopped() {
                    // Dropping the stream ends the reply (the engine hands the cache back);
                    // the session keeps what was shown. Only then is the reply over and the
                    // notice shown: a Ctrl-C after it is one at the prompt.
                    drop(stream);
                    interrupt.set_generating(false);
                    writeln!(out)?;
                    eprintln!(
                        "(reply stopped; the conversation goes on. Ctrl-C at the prompt exits)"
                    );
                    return Ok(());
                }
                let Some(ev) = stream.next() else { break };
                write_event(&mut out, ev?, args.verbose)?;
            }
            Ok(())
        })();
        interrupt.set_generating(false);
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::unknown_command;

    #[test]
    fn unknown_commands_are_caught_and_messages_pass() {
        assert_eq!(unknown_command("/foo", false), Some("/foo"));
        assert_eq!(unknown_command("/help me", false), Some("/help"));
        assert_eq!(unknown_command("/image cat.png", false), Some("/image"));
        assert_eq!(unknown_command("/image cat.png", true), None);
        assert_eq!(unknown_command("/reset", false), None);
        assert_eq!(unknown_command("/usr/bin/env is a path", false), None);
        assert_eq!(unknown_command("hello /foo", false), None);
        assert_eq!(unknown_command("/", false), None);
    }
}
