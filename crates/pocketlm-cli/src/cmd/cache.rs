//! KV cache options shared by `generate` and `chat`, and `pocketlm cache-prompt`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use pocketlm::kv_cache::{KvCache, KvCacheConfig};
use pocketlm::loader::LoadedModel;
use pocketlm::{mlx_prompt_cache, prompt_cache};

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
    /// Store the KV cache in f16 instead of f32: half the memory (llama.cpp's default cache
    /// type, `-ctk f16 -ctv f16`), logits within f16 rounding of the keys and values. Not with
    /// --max-kv-size or --kv-bits. Not an mlx-lm option.
    #[arg(long, conflicts_with_all = ["max_kv_size", "kv_bits"])]
    pub kv_f16: bool,
    /// A prompt cache made by `pocketlm cache-prompt`: its tokens are not prefilled again.
    /// `generate` also takes mlx-lm's (`mlx_lm cache_prompt`, or `cache-prompt --format mlx`):
    /// as in `mlx_lm generate`, the prompt is then the text after the cached one.
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
            kv_f16: self.kv_f16,
            ..Default::default()
        }
    }

    /// A fresh cache, or the prompt cache file's, with the token ids it holds.
    pub fn cache(&self, m: &LoadedModel, verbose: bool) -> Result<(KvCache, Vec<u32>)> {
        let cfg = self.config();
        match &self.prompt_cache_file {
            None => Ok((m.model.make_cache(&cfg)?, Vec::new())),
            Some(p) => {
                if mlx_prompt_cache::is_mlx_prompt_cache(p)? {
                    bail!(
                        "{} is an mlx-lm prompt cache, which holds no token ids: use it with \
                         `generate` (the prompt is then the text after the cached one)",
                        p.display()
                    );
                }
                let c = prompt_cache::load(p, m, &cfg)
                    .with_context(|| format!("loading the prompt cache {}", p.display()))?;
                if verbose {
                    eprintln!("prompt cache {}: {} tokens", p.display(), c.token_ids.len());
                }
                Ok((c.cache, c.token_ids))
            }
        }
    }

    /// The prompt cache file's cache when it is an mlx-lm one (see
    /// [`mlx_prompt_cache::load_for_model`]), `None` for none or a pocketlm one.
    pub fn mlx_cache(&self, m: &LoadedModel, verbose: bool) -> Result<Option<KvCache>> {
        let Some(p) = &self.prompt_cache_file else {
            return Ok(None);
        };
        if !mlx_prompt_cache::is_mlx_prompt_cache(p)? {
            return Ok(None);
        }
        let c = mlx_prompt_cache::load_for_model(p, m, &self.config())
            .with_context(|| format!("loading the mlx-lm prompt cache {}", p.display()))?;
        if verbose {
            eprintln!("mlx-lm prompt cache {}: {} tokens", p.display(), c.offset());
        }
        Ok(Some(c))
    }
}

/// The layout `cache-prompt` writes.
#[derive(ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheFormat {
    /// Ours: keys, values and the token ids (reused by any prompt that starts with them).
    #[default]
    Pocketlm,
    /// mlx-lm's `save_prompt_cache` layout and `cache_prompt` metadata (loads in
    /// `mlx_lm generate --prompt-cache-file`; holds no token ids).
    Mlx,
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
    /// The file's layout: ours, or mlx-lm's (the prompt then encoded as `mlx_lm cache_prompt`
    /// does: chat-templated without closing the user's turn).
    #[arg(long, value_enum, default_value_t = CacheFormat::Pocketlm)]
    pub format: CacheFormat,
    /// Print statistics to stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// Runs `cache-prompt`: prefills the prompt and saves its KV cache.
pub fn run(args: CachePromptArgs) -> Result<()> {
    let m = load(&args.model, args.verbose)?;
    let t0 = std::time::Instant::now();
    let file = &args.prompt_cache_file;
    let (ids, cache) = match args.format {
        CacheFormat::Pocketlm => {
            let prompt = build_prompt(
                m.chat_template.is_some(),
                args.no_chat_template,
                args.system.as_deref(),
                &args.prompt,
            );
            let ids = m.encode(&prompt)?;
            let cache = prompt_cache::prefill(&m, &ids, &KvCacheConfig::default(), 512)?;
            prompt_cache::save(file, &m, &cache, &ids)?;
            (ids, cache)
        }
        CacheFormat::Mlx => {
            let ids = mlx_prompt_cache::cache_prompt_ids(
                &m,
                args.system.as_deref(),
                &args.prompt,
                !args.no_chat_template,
            )?;
            let cache = prompt_cache::prefill(&m, &ids, &KvCacheConfig::default(), 512)?;
            let name = match &args.model.model {
                Some(name) => name.clone(),
                None => m.path.display().to_string(),
            };
            let meta = mlx_prompt_cache::cache_prompt_metadata(&name);
            mlx_prompt_cache::save(file, &cache, &meta)?;
            (ids, cache)
        }
    };
    eprintln!(
        "cached {} tokens ({:.1} MB) in {} ({:.2}s)",
        ids.len(),
        cache.nbytes() as f64 / 1e6,
        file.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
