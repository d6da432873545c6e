//! `pocketlm chat`: an interactive multi-turn conversation in the terminal.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Result};
use clap::Args;
use pocketlm::chat_template::Message;
use pocketlm::generate::{generate, Event, GenerateParams};
use pocketlm::loader::Prompt;

use super::generate::print_stats;
use super::model::{load, ModelArgs, SamplingArgs};

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
    /// Print statistics after each reply.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// Runs `chat`: reads user turns from stdin until `/exit` or end of input.
pub fn run(args: ChatArgs) -> Result<()> {
    let m = load(&args.model, args.verbose)?;
    if m.chat_template.is_none() {
        bail!(
            "{} has no chat template; use `pocketlm generate`",
            m.path.display()
        );
    }
    let interactive = std::io::stdin().is_terminal();
    let start: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    let mut history = start.clone();
    if interactive {
        eprintln!(
            "Chatting with {}. Type /reset to start over, /exit to quit.",
            m.path.display()
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout();
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
                history = start.clone();
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", text));
        let ids = m.encode(&Prompt::Chat(history.clone()))?;
        let params = GenerateParams {
            max_tokens: args.max_tokens,
            sampling: args.sampling.params(),
            ..Default::default()
        };
        let mut cache = m.model.new_cache();
        let mut reply = String::new();
        for ev in generate(m.model.as_ref(), &m.tokenizer, &mut cache, &ids, params)? {
            match ev? {
                Event::Token { text, .. } | Event::Text(text) => {
                    reply.push_str(&text);
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
        history.push(Message::new("assistant", reply.trim()));
    }
    Ok(())
}
