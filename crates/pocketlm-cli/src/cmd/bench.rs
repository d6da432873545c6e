//! `pocketlm bench`: prefill and decode speed, reported like `llama-bench`.

use anyhow::Result;
use clap::Args;
use pocketlm::bench::{self, BenchParams};

use super::model::{load, ModelArgs, SamplingArgs};

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens of the prefill tests (pp), comma-separated or repeated; 0 skips them.
    #[arg(short = 'p', long = "n-prompt", value_delimiter = ',', default_values_t = [512])]
    pub n_prompt: Vec<usize>,
    /// Tokens of the decode tests (tg), comma-separated or repeated; 0 skips them.
    #[arg(short = 'n', long = "n-gen", value_delimiter = ',', default_values_t = [128])]
    pub n_gen: Vec<usize>,
    /// Context depths: tokens already in the KV cache before each test (filled untimed, 512
    /// a pass), comma-separated or repeated, as llama-bench's `-d`.
    #[arg(short = 'd', long = "n-depth", value_delimiter = ',', default_values_t = [0])]
    pub depth: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub repetitions: usize,
    /// A JSON Schema file: each tg test runs again with its grammar mask (`tg128 +grammar`),
    /// to measure the cost of constrained decoding.
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<std::path::PathBuf>,
    /// Run each tg test again drawing every token with the sampler (`tg128 +sampling`), with
    /// the settings below (unset ones from the model's defaults, as `generate`); seed 0 unless
    /// given.
    #[arg(long)]
    pub sample: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Batch sizes, comma-separated: each tg test runs again with that many sequences decoded
    /// together (`tg128 x32`: aggregate tokens/s of all sequences, as llama-batched-bench's
    /// S_TG at `-npl 32`; 1 is the plain tg test).
    #[arg(long = "batch", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Store the KV cache in f16 instead of f32 (as `generate --kv-f16`; llama-bench's
    /// `-ctk f16 -ctv f16`).
    #[arg(long)]
    pub kv_f16: bool,
    /// Each batched decode test (--batch), and each prompt test at a depth (-d), runs again
    /// with the KV caches paged in one block pool on the model's device (`tg128 x32 paged`,
    /// `pp512 @ d4096 paged`; f16 blocks on a CUDA GPU), as `serve --kv-memory` keeps them
    #[arg(long)]
    pub paged: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let m = load(&args.model, false)?;
    let constraint = super::generate::ConstraintArgs {
        json_schema: args.json_schema.clone(),
        ..Default::default()
    }
    .constraint()?;
    if let Some((c, file)) = &constraint {
        // Compile once up front, so that a bad schema is reported before the tests run.
        let env = pocketlm::constrain::GrammarEnv::for_tokenizer(&m.tokenizer)?;
        pocketlm::constrain::GrammarMask::new(env, c)
            .map_err(|e| super::generate::name_grammar_file(e.into(), file.as_deref()))?;
    }
    let params = BenchParams {
        constraint: constraint.map(|(c, _)| c),
        n_prompt: args.n_prompt,
        n_gen: args.n_gen,
        depth: args.depth,
        repetitions: args.repetitions,
        sampling: args.sample.then(|| {
            let mut p = args.sampling.params(&m.default_sampling());
            p.seed = p.seed.or(Some(0));
            p
        }),
        cache: pocketlm::kv_cache::KvCacheConfig {
            kv_f16: args.kv_f16,
            ..Default::default()
        },
        batch: args.batch,
        paged: args.paged,
    };
    let r = bench::run(&m, &params)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("| model | size | threads | test | t/s |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let name = std::path::Path::new(&r.model)
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| r.model.clone());
    for t in &r.tests {
        println!(
            "| {name} | {:.2} MiB | {} | {} | {:.2} ± {:.2} |",
            mib(r.weights_bytes),
            r.threads,
            t.name,
            t.mean_tps,
            t.stddev_tps
        );
    }
    println!();
    println!("device: {}", r.device);
    println!("load time: {:.3} s", r.load_seconds);
    println!("weights: {:.2} MiB", mib(r.weights_bytes));
    println!("KV cache after tg: {:.2} MiB", mib(r.kv_cache_bytes as u64));
    if let Some(p) = r.tg_peak_resident_bytes {
        println!("peak resident memory during tg: {:.2} MiB", mib(p));
    }
    if let Some(p) = r.peak_resident_bytes {
        println!("peak resident memory: {:.2} MiB", mib(p));
    }
    if let (Some(u), Some(t)) = (r.gpu_memory_used_bytes, r.gpu_memory_total_bytes) {
        println!(
            "GPU memory in use after tg: {:.2} MiB of {:.2} MiB",
            mib(u),
            mib(t)
        );
    }
    Ok(())
}
