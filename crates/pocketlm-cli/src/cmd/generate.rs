//! `pocketlm generate`: one prompt, one streamed answer.

use std::io::Write;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use pocketlm::chat_template::Message;
use pocketlm::constrain::{Constraint, ConstraintError};
use pocketlm::generate::{generate_input, Event, GenerateParams, GenerationStats};
use pocketlm::image_processor::load_image;
use pocketlm::kv_cache::KvCache;
use pocketlm::loader::{EncodedPrompt, LoadedModel, Prompt};

use super::cache::KvArgs;
use super::model::{load, ModelArgs, SamplingArgs};

/// Arguments of `generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// A system message (chat template only).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Feed the prompt as plain text instead of through the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// An image to show the model with the prompt (vision-language models; repeatable, in
    /// order; PNG, JPEG or WebP).
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<std::path::PathBuf>,
    #[command(flatten)]
    pub constraint: ConstraintArgs,
    /// With a constraint, draw the tokens the grammar forces one forward pass each instead of
    /// fast-forwarding them (appended unsampled, fed in one pass); the output is the same.
    #[arg(long)]
    pub no_fast_forward: bool,
    /// Print load and generation statistics to stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// What the output must match (structured output); at most one.
#[derive(Args, Debug, Default, Clone)]
#[group(multiple = false)]
pub struct ConstraintArgs {
    /// A JSON Schema file: the output is JSON that validates against it.
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// The output is a JSON object (any).
    #[arg(long)]
    pub json: bool,
    /// The output matches this regular expression (whole output, Rust `regex` syntax).
    #[arg(long, value_name = "RE")]
    pub regex: Option<String>,
    /// A Lark grammar file (llguidance's dialect, `%json { ... }` embeds a schema).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
}

impl ConstraintArgs {
    /// The constraint asked for, and the file it came from (for error messages).
    ///
    /// Errors: a file that cannot be read, or a schema file that is not JSON, naming it.
    pub fn constraint(&self) -> Result<Option<(Constraint, Option<PathBuf>)>> {
        if let Some(path) = &self.json_schema {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the JSON schema {}", path.display()))?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("the JSON schema {} is not JSON", path.display()))?;
            return Ok(Some((Constraint::JsonSchema(schema), Some(path.clone()))));
        }
        if let Some(path) = &self.grammar {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the grammar {}", path.display()))?;
            return Ok(Some((Constraint::Lark(text), Some(path.clone()))));
        }
        if let Some(re) = &self.regex {
            return Ok(Some((Constraint::Regex(re.clone()), None)));
        }
        Ok(self.json.then_some((Constraint::JsonObject, None)))
    }
}

/// Adds the file a grammar came from to a grammar compile error.
pub fn name_grammar_file(e: pocketlm::Error, file: Option<&Path>) -> anyhow::Error {
    match (&e, file) {
        (pocketlm::Error::Constraint(ConstraintError::Grammar(_)), Some(f)) => {
            anyhow::Error::new(e).context(format!("{}", f.display()))
        }
        _ => e.into(),
    }
}

/// Builds the prompt: chat-templated unless disabled or the model has no template.
pub fn build_prompt(
    has_template: bool,
    no_template: bool,
    system: Option<&str>,
    text: &str,
) -> Prompt {
    if no_template || !has_template {
        return Prompt::Text(text.to_string());
    }
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message::new("system", s));
    }
    messages.push(Message::new("user", text));
    Prompt::Chat(messages)
}

/// Prints generation statistics the way `mlx_lm.generate --verbose` does.
pub fn print_stats(stats: &GenerationStats, reason: &str) {
    eprintln!("==========");
    eprintln!(
        "Prompt: {} tokens, {:.3} tokens-per-sec",
        stats.prompt_tokens,
        stats.prefill_tokens_per_second()
    );
    eprintln!(
        "Generation: {} tokens, {:.3} tokens-per-sec (finished: {reason})",
        stats.generated_tokens,
        stats.decode_tokens_per_second()
    );
    if stats.decode_passes + 1 < stats.generated_tokens {
        eprintln!(
            "Forced tokens fast-forwarded: {} forward passes for {} tokens",
            stats.decode_passes, stats.generated_tokens
        );
    }
    if !stats.image_tokens.is_empty() {
        eprintln!(
            "Images: {} ({} image tokens), vision encoding {:.3} s",
            stats.image_tokens.len(),
            stats
                .image_tokens
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" + "),
            stats.vision_time.as_secs_f64()
        );
    }
    if let Some(p) = stats.peak_memory_bytes {
        eprintln!("Peak memory: {:.3} GB", p as f64 / 1e9);
    }
}

/// Runs `generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let m = load(&args.model, args.verbose)?;
    let mut prompt = build_prompt(
        m.chat_template.is_some(),
        args.no_chat_template,
        args.system.as_deref(),
        &args.prompt,
    );
    if !args.images.is_empty() {
        let Prompt::Chat(messages) = &mut prompt else {
            anyhow::bail!("--image needs the model's chat template (drop --no-chat-template)");
        };
        let images = args
            .images
            .iter()
            .map(|p| load_image(p))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(last) = messages.last_mut() {
            last.images = images;
        }
    }
    let constraint = args.constraint.constraint()?;
    if constraint.is_some() && args.verbose {
        let env = pocketlm::constrain::GrammarEnv::for_tokenizer(&m.tokenizer)?;
        eprintln!(
            "grammar environment: {} tokens in {:.1} ms",
            env.vocab_size(),
            env.build_time().as_secs_f64() * 1e3
        );
    }
    let mut input = m.encode_multimodal(&prompt)?;
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params(&m.default_sampling()),
        stop: args.stop.clone(),
        constraint: constraint.as_ref().map(|(c, _)| c.clone()),
        fast_forward: !args.no_fast_forward,
        ..Default::default()
    };
    if let Some(cache) = args.kv.mlx_cache(&m, args.verbose)? {
        anyhow::ensure!(
            input.images.is_empty(),
            "--image cannot be used with an mlx-lm prompt cache"
        );
        // As `mlx_lm generate`: the prompt is the text after the cached one.
        input.ids = pocketlm::mlx_prompt_cache::continuation_ids(
            &m,
            args.system.as_deref(),
            &args.prompt,
            !args.no_chat_template,
        )?;
        return run_stream(&args, &m, cache, input, params, constraint.as_ref());
    }
    let (mut cache, cached) = args.kv.cache(&m, args.verbose)?;
    // A prompt cache holds no images: with images the whole prompt is prefilled.
    let reused = if input.images.is_empty() {
        pocketlm::prompt_cache::reuse_prefix(&mut cache, &cached, &input.ids)
    } else {
        cache.reset();
        0
    };
    if args.verbose && args.kv.prompt_cache_file.is_some() {
        eprintln!("reusing {reused} cached prompt tokens");
    }
    input.ids.drain(..reused);
    run_stream(&args, &m, cache, input, params, constraint.as_ref())
}

/// Generates from `input` after what `cache` holds and prints the events.
fn run_stream(
    args: &GenerateArgs,
    m: &LoadedModel,
    mut cache: KvCache,
    input: EncodedPrompt,
    params: GenerateParams,
    constraint: Option<&(Constraint, Option<PathBuf>)>,
) -> Result<()> {
    let file = constraint.and_then(|(_, f)| f.as_deref());
    let stream = generate_input(m.model.as_ref(), &m.tokenizer, &mut cache, input, params)
        .map_err(|e| name_grammar_file(e, file))?;
    let mut out = std::io::stdout().lock();
    for ev in stream {
        write_event(&mut out, ev?, args.verbose)?;
    }
    Ok(())
}

/// Prints one generation event: text as it comes (flushed), a newline at the end, and the
/// statistics to stderr when `verbose`.
pub fn write_event(out: &mut impl Write, ev: Event, verbose: bool) -> Result<()> {
    match ev {
        Event::Token { text, .. } | Event::Text(text) => {
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        Event::Finished { reason, stats } => {
            writeln!(out)?;
            if verbose {
                print_stats(&stats, reason.as_openai());
            }
        }
    }
    Ok(())
}
