//! `pocketlm`: the command-line front end. It parses arguments, calls the library and prints;
//! all logic lives in the `pocketlm` library crate.

mod cmd;

use clap::{Parser, Subcommand};

/// Run language models locally: private, offline, on your own machine.
#[derive(Parser, Debug)]
#[command(name = "pocketlm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a reply to one prompt, streamed to stdout.
    Generate(cmd::generate::GenerateArgs),
    /// Chat with a model in the terminal (multi-turn; /reset, /exit).
    Chat(cmd::chat::ChatArgs),
    /// Download the default model (SmolLM2-135M-Instruct, GGUF Q4_1) if it is not cached.
    Fetch,
    /// Convert a GGUF file or Hugging Face folder to an MLX-format folder (optionally quantized).
    Convert(cmd::convert::ConvertArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POCKETLM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Fetch => cmd::model::fetch_default().map(|p| println!("{}", p.display())),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
