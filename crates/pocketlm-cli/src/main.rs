//! `pocketlm`: the command-line front end. It parses arguments, calls the library and prints;
//! all logic lives in the `pocketlm` library crate.

mod cmd;

use clap::{Parser, Subcommand};

/// Run language models locally: private, offline, on your own machine.
#[derive(Parser, Debug)]
#[command(
    name = "pocketlm",
    version,
    about = "Run language models locally: private, offline, on your own machine."
)]
struct Cli {
    /// Compute threads (default: all cores; sets RAYON_NUM_THREADS).
    #[arg(short = 't', long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a reply to one prompt, streamed to stdout.
    Generate(cmd::generate::GenerateArgs),
    /// Chat with a model in the terminal (multi-turn; /reset, /exit). Ctrl-C stops a reply
    /// (the part shown stays in the conversation); Ctrl-C at the prompt exits.
    Chat(cmd::chat::ChatArgs),
    /// Measure prefill (pp) and decode (tg) speed, like llama-bench.
    Bench(cmd::bench::BenchArgs),
    /// Perplexity of a text file; with --kl-divergence REF, the KL divergence from a reference
    /// model (quantization quality), like llama-perplexity.
    Perplexity(Box<cmd::perplexity::PerplexityArgs>),
    /// Prefill a prompt and save its KV cache (for --prompt-cache-file).
    CachePrompt(cmd::cache::CachePromptArgs),
    /// Sentence embeddings of texts (all-MiniLM-L6-v2 by default), as JSON in OpenAI's
    /// /v1/embeddings shape.
    Embed(cmd::embed::EmbedArgs),
    /// Download the default model (SmolLM2-135M-Instruct, GGUF Q4_1) if it is not cached.
    Fetch,
    /// Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, ...).
    Serve(cmd::serve::ServeArgs),
    /// Convert a GGUF file or Hugging Face folder to an MLX-format folder (optionally quantized).
    Convert(cmd::convert::ConvertArgs),
    /// Check: greedy tokens and logits of the model on the CPU and on --device, in lockstep.
    #[command(hide = true)]
    Agree(cmd::gpu::AgreeArgs),
    /// Check: every CUDA kernel against its CPU reference over many shapes (cuda builds).
    #[cfg(feature = "cuda")]
    #[command(hide = true)]
    GpuSelftest {
        /// CUDA device.
        #[arg(long, default_value = "cuda")]
        device: String,
    },
    /// Fine-tune LoRA adapters (mlx-lm format) and/or measure test loss and perplexity.
    Lora(Box<cmd::lora::LoraArgs>),
    /// Merge a LoRA adapter into the base weights and write an MLX-format folder.
    Fuse(cmd::fuse::FuseArgs),
}

/// Asks glibc's malloc for one arena for the whole process, before any thread starts (every
/// command but `serve`). The forward passes run on the thread pool's workers and glibc gives
/// each worker an arena of its own, which keeps what that worker freed for its own later use:
/// the 1B Q8_0's `bench -d 4096 -p 512 -n 128` peaked at 2,171 MiB with the default arenas and
/// 1,924 MiB with one (llama.cpp 1,926 MiB), at the same speed (2 threads, Xeon VM,
/// 2026-12-05). `serve` keeps glibc's arenas: with one, its HTTP, scheduler and pool threads
/// contended for the lock and 16 clients got 20% fewer tokens/s. Other C libraries: nothing.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets a malloc parameter; no thread has started yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
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
    if !matches!(cli.command, Command::Serve(_)) {
        one_malloc_arena();
    }
    if let Some(t) = cli.threads {
        // Before any compute thread starts: candle and rayon read it when their pools start.
        std::env::set_var("RAYON_NUM_THREADS", t.max(1).to_string());
    }
    let result = match cli.command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Perplexity(a) => cmd::perplexity::run(*a),
        Command::CachePrompt(a) => cmd::cache::run(a),
        Command::Embed(a) => cmd::embed::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Agree(a) => cmd::gpu::run_agree(a),
        #[cfg(feature = "cuda")]
        Command::GpuSelftest { device } => cmd::gpu::run_selftest(&device),
        Command::Lora(a) => cmd::lora::run(*a),
        Command::Fuse(a) => cmd::fuse::run(a),
        Command::Fetch => cmd::model::fetch_default().map(|p| println!("{}", p.display())),
    };
    if let Err(e) = result {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, `outer: inner: ...`, each said once: a cause whose
/// text an outer message already holds (library errors name their file and include their
/// source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn causes_are_said_once() {
        let io = std::io::Error::other("no such file");
        let inner = anyhow::Error::new(io).context("/x.gguf: no such file");
        let e = inner.context("finding the model");
        assert_eq!(one_line(&e), "finding the model: /x.gguf: no such file");
    }
}
