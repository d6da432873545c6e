//! KV cache options shared by `generate` and `chat`, and `pocketlm cache-prompt`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pocketlm::kv_cache::{KvCache, KvCacheConfig};
use pocketlm::loader::LoadedModel;
use pocketlm::prompt_cache;

use super::generate::build_prompt;
use super::model::{load, ModelArgs};

/// KV cache kind (mlx-lm's names).
#[derive(Args, Debug, Clone)]
pub struct KvArgs {
    /// Hold at most this many tokens in the KV cache (a rotating cache: the first 4 tokens
    /// and a sliding window over the most recent ones).
    #[arg(long)]
    pub max_kv_size: Option<usize>,
    /// Quantize the KV cache to this many bits (4 or 8; 2, 3, 5, 6 also work).
    #[arg(long)]
    pub kv_bits: Option<usize>,
    /// Group size of the quantized KV cache (32, 64 or 128).
    #[arg(long, default_value_t = 64)]
    pub kv_group_size: usize,
    /// Rotate each head vector by the Walsh-Hadamard matrix before quantizing the KV cache
    /// (QuaRot's rotation; needs --kv-bits): same memory, smaller error. Not an mlx-lm option.
    #[arg(long, requires = "kv_bits")]
    pub kv_hadamard: bool,
    /// A prompt cache made by `pocketlm cache-prompt`: its tokens are not prefilled again.
    #[arg(long)]
    pub prompt_cache_file: Option<PathBuf>,
}

impl KvArgs {
    /// The library's cache configuration.
    pub fn config(&self) -> KvCacheConfig {
        KvCacheConfig {
            max_kv_size: self.max_kv_size,
            kv_bits: self.kv_bits,
            kv_group_size: self.kv_group_size,
            kv_hadamard: self.kv_hadamard,
            ..Default::default()
        }
    }

    /// A fresh cache, or the prompt cache file's, with the token ids it holds.
    pub fn cache(&self, m: &LoadedModel, verbose: bool) -> Result<(KvCache, Vec<u32>)> {
        let cfg = self.config();
        match &self.prompt_cache_file {
            None => Ok((m.model.make_cache(&cfg)?, Vec::new())),
            Some(p) => {
                let c = prompt_cache::load(p, m, &cfg)
                    .with_context(|| format!("loading the prompt cache {}", p.display()))?;
                if verbose {
                    eprintln!("prompt cache {}: {} tokens", p.display(), c.token_ids.len());
                }
                Ok((c.cache, c.token_ids))
            }
        }
    }
}

/// Arguments of `cache-prompt`.
#[derive(Args, Debug)]
pub struct CachePromptArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt to cache (encoded as `generate` encodes it).
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// A system message (chat template only).
    #[arg(long)]
    pub system: Option<String>,
    /// Feed the prompt as plain text instead of through the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Where to write the cache (safetensors).
    #[arg(long)]
    pub prompt_cache_file: PathBuf,
    /// Print statistics to stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// Runs `cache-prompt`: prefills the prompt and saves its KV cache.
pub fn run(args: CachePromptArgs) -> Result<()> {
    let m = load(&args.model, args.verbose)?;
    let prompt = build_prompt(
        m.chat_template.is_some(),
        args.no_chat_template,
        args.system.as_deref(),
        &args.prompt,
    );
    let ids = m.encode(&prompt)?;
    let t0 = std::time::Instant::now();
    let cache = prompt_cache::prefill(&m, &ids, &KvCacheConfig::default(), 512)?;
    prompt_cache::save(&args.prompt_cache_file, &m, &cache, &ids)?;
    eprintln!(
        "cached {} tokens ({:.1} MB) in {} ({:.2}s)",
        ids.len(),
        cache.nbytes() as f64 / 1e6,
        args.prompt_cache_file.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
