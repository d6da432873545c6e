//! `pocketlm serve`: an OpenAI-compatible HTTP server over one model (see the
//! `pocketlm-server` crate for the routes and behaviour).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use pocketlm_server::embeddings::EmbeddingService;
use pocketlm_server::{ServerConfig, Timeouts};

use super::model::{load, ModelArgs};

/// Arguments of `serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (loopback by default; use 0.0.0.0 to expose it on the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together (continuous batching: one forward pass per step over all
    /// running requests); more requests wait in the queue. Default 16.
    #[arg(long, value_name = "N")]
    pub max_batch: Option<usize>,
    /// The older name of --max-batch.
    #[arg(long, value_name = "N", conflicts_with = "max_batch")]
    pub max_concurrency: Option<usize>,
    /// Tokens one forward pass may take: one per running sequence plus chunks of new prompts
    /// (a long prompt is prefilled over several steps, so running streams keep flowing).
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_tokens_per_step: usize,
    /// Requests that may wait beyond the running ones; more are answered 503.
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, env = "POCKETLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds a client may take to send a request's whole header (counted from the
    /// connection's start or its previous answer); the connection is closed after it.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub header_timeout: f64,
    /// Seconds a connection may stay silent (nothing read or written) before it is closed,
    /// once no request is in flight on it.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub keep_alive_timeout: f64,
    /// An embedding model for POST /v1/embeddings: a name (all-minilm-l6-v2, downloaded on
    /// first use), a sentence-transformers folder or a hub id. Without it the route answers 404.
    #[arg(long, value_name = "MODEL")]
    pub embedding_model: Option<String>,
    /// Memory for the prefix cache across requests: keys and values of prompts (and answers)
    /// already computed, reused by any request that starts with them (a shared system prompt,
    /// the earlier turns of a chat). Bytes, or with a unit: KiB, MiB, GiB (also K, M, G),
    /// KB, MB, GB. 0 disables it.
    #[arg(long, default_value = "1GiB", value_name = "SIZE", value_parser = parse_size)]
    pub prefix_cache_memory: usize,
    /// Memory the requests' KV caches may hold together (SIZE as for --prefix-cache-memory).
    /// When it is full, new requests wait and the latest running ones are preempted (their
    /// caches dropped, recomputed when they resume): no request fails for it, but one whose
    /// prompt alone needs more. Default: no bound.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub kv_memory: Option<usize>,
    /// With --kv-memory: positions each running request must still be able to add before a
    /// waiting one is admitted (decode headroom; fewer preemptions, smaller batches). 0 admits
    /// a request as soon as its prompt fits.
    #[arg(long, value_name = "N", default_value_t = pocketlm::generate::batch::KV_RESERVE)]
    pub kv_reserve: usize,
    /// Store the requests' keys and values in f16 instead of f32: half the memory a token, so
    /// twice the tokens under --kv-memory (llama-server's default cache type, f16). Attention
    /// reads the f16 values widened to f32, as `generate --kv-f16` does.
    #[arg(long)]
    pub kv_f16: bool,
    /// Directory the prefix cache is loaded from at start and saved to (every minute while it
    /// changes, and at shutdown). Default: $POCKETLM_HOME/prefix-cache/<model>-<hash>.
    #[arg(long, value_name = "DIR")]
    pub prefix_cache_dir: Option<std::path::PathBuf>,
    /// Skip the warm-up run at start (a few tokens through the prompt, decode, batched and
    /// mixed passes on throwaway caches, as llama-server's `--no-warmup` skips its own). On a
    /// GPU it loads the kernels and records the decode graphs before the first request; on a
    /// machine's first run that includes the driver's compilation of the kernels (seconds).
    #[arg(long)]
    pub no_warmup: bool,
    /// Print loading details.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// A size in bytes: a number, optionally followed by a unit (KiB, MiB, GiB, K, M, G binary;
/// KB, MB, GB decimal; B).
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (a number of bytes, or with KiB, MiB, GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        u => {
            return Err(format!(
                "`{s}`: unknown unit `{u}` (use KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    let bytes = n * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > usize::MAX as f64 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as usize)
}

/// Runs `serve` until Ctrl-C.
pub fn run(args: ServeArgs) -> Result<()> {
    let seconds = |name: &str, v: f64| -> Result<Duration> {
        if v.is_finite() && v > 0.0 && v <= 86_400.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            anyhow::bail!("--{name} is {v}; expected a number of seconds in (0, 86400]")
        }
    };
    let timeouts = Timeouts {
        header: seconds("header-timeout", args.header_timeout)?,
        keep_alive: seconds("keep-alive-timeout", args.keep_alive_timeout)?,
    };
    let m = load(&args.model, args.verbose)?;
    if !args.no_warmup {
        let took = m.warm_up().context("the warm-up run")?;
        if args.verbose {
            eprintln!("pocketlm: warm-up run in {:.2} s", took.as_secs_f64());
        }
        tracing::info!(seconds = took.as_secs_f64(), "warm-up run");
    }
    let prefix_cache_dir = match args.prefix_cache_dir {
        Some(d) => Some(d),
        None if args.prefix_cache_memory > 0 => {
            match pocketlm::prompt_cache::ModelIdentity::of(&m) {
                Ok(id) => Some(pocketlm::prefix_cache::default_dir(&id)),
                Err(e) => {
                    eprintln!("pocketlm: the prefix cache stays in memory ({e})");
                    None
                }
            }
        }
        None => None,
    };
    let embeddings = match &args.embedding_model {
        Some(spec) => {
            let e = super::embed::load(spec, args.model.device.parse()?, None)?;
            // Served under the name given, as a path's last component for a folder.
            let id = std::path::Path::new(spec)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.clone());
            Some(Arc::new(EmbeddingService::new(Arc::new(e), id)))
        }
        None => None,
    };
    let config = ServerConfig {
        embeddings,
        timeouts,
        host: args.host,
        port: args.port,
        max_concurrency: args.max_batch.or(args.max_concurrency).unwrap_or(16),
        max_tokens_per_step: args.max_tokens_per_step,
        queue_size: args.queue_size,
        api_key: args.api_key,
        prefix_cache_memory: args.prefix_cache_memory,
        prefix_cache_dir,
        kv_memory: args.kv_memory,
        kv_reserve: args.kv_reserve,
        kv_f16: args.kv_f16,
        ..ServerConfig::default()
    };
    pocketlm_server::run(m, config).context("serving")
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("512 m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("10kb"), Ok(10_000));
        for bad in ["", "lots", "1TiB", "-1", "1e3", "GiB"] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains(bad.trim()), "{bad}: {e}");
        }
    }
}
