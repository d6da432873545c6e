//! `pocketlm perplexity`: perplexity of a text file, and with `--kl-divergence REF` the KL
//! divergence from a reference model (`llama-perplexity`'s measure of quantization quality).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pocketlm::perplexity::{self, Convention, KlReport, PerplexityParams, PerplexityReport};

use super::model::{load, ModelArgs};

/// Arguments of `perplexity`.
#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to measure (UTF-8, tokenized whole, with the tokenizer's BOS if it adds one).
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Tokens per window (at most the model's context length).
    #[arg(long, short = 'c', default_value_t = 512)]
    pub context: usize,
    /// Tokens between window starts (transformers' "perplexity of fixed-length models"
    /// convention): each window scores the tokens no earlier window scored. Default: the
    /// context (non-overlapping windows, each scoring all but its first token).
    #[arg(long, conflicts_with = "llama_cpp")]
    pub stride: Option<usize>,
    /// llama-perplexity's convention instead: non-overlapping windows of --context tokens, BOS
    /// as each window's first token (when the tokenizer adds one), only the second half of
    /// each window scored. `llama-perplexity -c N` gives the same windows.
    #[arg(long)]
    pub llama_cpp: bool,
    /// Use only the first N windows (llama-perplexity's --chunks).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Tokens per forward pass within a window.
    #[arg(long, short = 'b', default_value_t = 512)]
    pub batch: usize,
    /// Reference model (a .gguf file, a model folder or a hub id; the float model, say): run
    /// it on the same windows and report KL(reference || this model) per token and the
    /// top-1 agreement. Both models must share the tokenizer.
    #[arg(long, value_name = "REF")]
    pub kl_divergence: Option<String>,
    /// Print the report as JSON (with per-window sums).
    #[arg(long)]
    pub json: bool,
}

/// Runs `perplexity`.
pub fn run(args: PerplexityArgs) -> Result<()> {
    let text = perplexity::read_text(&args.file)?;
    let params = PerplexityParams {
        context: args.context,
        convention: if args.llama_cpp {
            Convention::LlamaCpp
        } else {
            Convention::Sliding {
                stride: args.stride.unwrap_or(args.context),
            }
        },
        batch: args.batch,
        max_windows: args.chunks,
    };
    let m = load(&args.model, false)?;
    let what = || format!("measuring {}", args.file.display());
    match &args.kl_divergence {
        None => {
            let r = perplexity::perplexity(&m, &text, &params).with_context(what)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("model: {}", m.path.display());
                print_windows(&args, &r);
                print_ppl("", &r);
            }
        }
        Some(reference) => {
            let ref_args = ModelArgs {
                model: Some(reference.clone()),
                adapter_path: None,
                ..args.model.clone()
            };
            let rm = load(&ref_args, false).context("the reference model")?;
            let r = perplexity::kl_divergence(&rm, &m, &text, &params).with_context(what)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_kl(&args, &rm, &m, &r);
            }
        }
    }
    Ok(())
}

fn print_windows(args: &PerplexityArgs, r: &PerplexityReport) {
    let conv = match r.convention {
        Convention::Sliding { stride } => format!("stride {stride}"),
        Convention::LlamaCpp => "llama-perplexity's (second half scored)".into(),
    };
    println!(
        "text: {} ({} tokens), {} windows of up to {} tokens, {conv}",
        args.file.display(),
        r.text_tokens,
        r.windows.len(),
        r.context
    );
}

fn print_ppl(prefix: &str, r: &PerplexityReport) {
    println!("{prefix}tokens scored: {}", r.tokens_scored);
    println!("{prefix}mean NLL: {:.6}", r.mean_nll);
    println!("{prefix}perplexity: {:.4}", r.perplexity);
    println!(
        "{prefix}tokens/s: {:.1} ({} tokens in {:.2} s)",
        r.tokens_per_second, r.tokens_evaluated, r.seconds
    );
}

fn print_kl(
    args: &PerplexityArgs,
    reference: &pocketlm::loader::LoadedModel,
    test: &pocketlm::loader::LoadedModel,
    r: &KlReport,
) {
    println!("reference: {}", reference.path.display());
    println!("model: {}", test.path.display());
    print_windows(args, &r.test);
    println!("tokens scored: {}", r.test.tokens_scored);
    println!(
        "perplexity: reference {:.4}, model {:.4} (mean NLL {:.6}, {:.6})",
        r.reference.perplexity, r.test.perplexity, r.reference.mean_nll, r.test.mean_nll
    );
    println!("mean KLD: {:.6}", r.kl.mean);
    println!("median KLD: {:.6}", r.kl.median);
    println!("99.0% KLD: {:.6}", r.kl.p99);
    println!("maximum KLD: {:.6}", r.kl.max);
    println!("same top-1: {:.3} %", r.top1_agreement_percent);
    println!(
        "tokens/s (both models): {:.1} ({} tokens each in {:.2} s)",
        2.0 * r.test.tokens_evaluated as f64 / r.test.seconds.max(1e-9),
        r.test.tokens_evaluated,
        r.test.seconds
    );
}
