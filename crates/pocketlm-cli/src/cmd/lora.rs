//! `pocketlm lora`: fine-tune LoRA adapters (`--train`) and/or measure test loss (`--test`),
//! with mlx-lm's `mlx_lm.lora` argument names.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use pocketlm::lora::data::load_split;
use pocketlm::lora::train::{test_loss, train, LrSchedule, OptimizerKind, TrainConfig, TrainEvent};
use pocketlm::lora::{Adapter, LoraParameters};

use super::model::{load, ModelArgs};

/// Arguments of `lora`.
#[derive(Args, Debug)]
pub struct LoraArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder with train.jsonl, valid.jsonl and test.jsonl.
    #[arg(long)]
    pub data: PathBuf,
    /// Train adapters.
    #[arg(long)]
    pub train: bool,
    /// Report test loss and perplexity (of the trained adapter, or of --adapter-path).
    #[arg(long)]
    pub test: bool,
    /// Training steps.
    #[arg(long, default_value_t = 1000)]
    pub iters: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-5)]
    pub learning_rate: f64,
    /// Adapt the last K blocks (-1: all).
    #[arg(long, default_value_t = 16, allow_hyphen_values = true)]
    pub num_layers: i64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA scale (the update is scale · x A B).
    #[arg(long, default_value_t = 20.0)]
    pub scale: f64,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Modules to adapt within each block, comma-separated (default: all linear layers),
    /// e.g. self_attn.q_proj,self_attn.v_proj.
    #[arg(long, value_delimiter = ',')]
    pub keys: Option<Vec<String>>,
    /// Do not score prompt tokens (chat and prompt/completion records).
    #[arg(long)]
    pub mask_prompt: bool,
    /// Optimizer: adam or adamw.
    #[arg(long, default_value = "adam")]
    pub optimizer: String,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Learning-rate schedule: constant or cosine (linear warmup, then cosine decay to
    /// --lr-end over the remaining steps).
    #[arg(long, default_value = "constant")]
    pub lr_schedule: String,
    /// Warmup steps of the cosine schedule.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 0.0)]
    pub lr_end: f64,
    /// Gradient checkpointing: keep only each adapted block's input in the forward pass and
    /// recompute the block in the backward pass (less memory, about one more forward pass).
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// Validation batches per evaluation (-1: the whole validation set).
    #[arg(long, default_value_t = 25, allow_hyphen_values = true)]
    pub val_batches: i64,
    /// Steps between validations.
    #[arg(long, default_value_t = 200)]
    pub steps_per_eval: usize,
    /// Steps between loss reports.
    #[arg(long, default_value_t = 10)]
    pub steps_per_report: usize,
    /// Steps between checkpoints (0: only the final save).
    #[arg(long, default_value_t = 100)]
    pub save_every: usize,
    /// Start from these adapter weights (an adapters.safetensors).
    #[arg(long, alias = "resume-adapter-file")]
    pub resume: Option<PathBuf>,
    /// Longest example in tokens.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_length: usize,
    /// Seed of the adapter initialisation, the batch order and the dropout masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `lora`.
pub fn run(a: LoraArgs) -> Result<()> {
    if !a.train && !a.test {
        bail!("nothing to do: give --train and/or --test");
    }
    let adapter_path = a
        .model
        .adapter_path
        .clone()
        .unwrap_or_else(|| PathBuf::from("adapters"));
    let base = ModelArgs {
        adapter_path: None,
        ..a.model.clone()
    };
    let mut m = load(&base, false)?;
    let split = |m: &pocketlm::loader::LoadedModel, name: &str| {
        load_split(m, &a.data, name, a.mask_prompt)
            .with_context(|| format!("reading {}", a.data.join(format!("{name}.jsonl")).display()))
    };
    if a.train {
        let train_set =
            split(&m, "train")?.with_context(|| format!("{}: no train.jsonl", a.data.display()))?;
        let valid = split(&m, "valid")?;
        let optimizer = match a.optimizer.as_str() {
            "adam" => OptimizerKind::Adam,
            "adamw" => OptimizerKind::AdamW {
                weight_decay: a.weight_decay,
            },
            o => bail!("unknown optimizer `{o}` (adam or adamw)"),
        };
        let schedule = match a.lr_schedule.as_str() {
            "constant" => LrSchedule::Constant,
            "cosine" => LrSchedule::Cosine {
                warmup: a.warmup,
                decay_steps: a.iters.saturating_sub(a.warmup),
                end: a.lr_end,
            },
            s => bail!("unknown --lr-schedule `{s}` (constant or cosine)"),
        };
        let cfg = TrainConfig {
            iters: a.iters,
            batch_size: a.batch_size,
            learning_rate: a.learning_rate,
            num_layers: a.num_layers,
            lora: LoraParameters {
                rank: a.rank,
                scale: a.scale,
                dropout: a.dropout,
                keys: a.keys.clone(),
            },
            optimizer,
            schedule,
            max_seq_length: a.max_seq_length,
            val_batches: a.val_batches,
            steps_per_eval: a.steps_per_eval,
            steps_per_report: a.steps_per_report,
            save_every: a.save_every,
            adapter_path: adapter_path.clone(),
            resume: a.resume.clone(),
            seed: a.seed,
            grad_checkpoint: a.grad_checkpoint,
            ..Default::default()
        };
        let extra = serde_json::json!({
            "model": m.path.display().to_string(),
            "data": a.data.display().to_string(),
            "iters": a.iters,
            "batch_size": a.batch_size,
            "learning_rate": a.learning_rate,
            "mask_prompt": a.mask_prompt,
            "max_seq_length": a.max_seq_length,
            "seed": a.seed,
            "optimizer": a.optimizer,
        });
        let extra = extra.as_object().cloned().unwrap_or_default();
        eprintln!(
            "training {} examples ({} validation), {} steps of {}",
            train_set.len(),
            valid.as_ref().map_or(0, |v| v.len()),
            a.iters,
            a.batch_size
        );
        let bar = if std::io::stderr().is_terminal() {
            indicatif::ProgressBar::new(a.iters as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let mut on_event = |e: TrainEvent| {
            let line = match e {
                TrainEvent::Train {
                    iter,
                    loss,
                    learning_rate,
                    iterations_per_second,
                    tokens_per_second,
                    trained_tokens,
                    peak_memory_bytes,
                } => {
                    let mem = peak_memory_bytes.map_or(String::new(), |p| {
                        format!(", Peak mem {:.3} GB", p as f64 / 1e9)
                    });
                    bar.set_position(iter as u64);
                    bar.set_message(format!("loss {loss:.3}, {tokens_per_second:.0} tok/s{mem}"));
                    format!(
                        "Iter {iter}: Train loss {loss:.3}, Learning Rate {learning_rate:.3e}, It/sec {iterations_per_second:.3}, Tokens/sec {tokens_per_second:.1}, Trained Tokens {trained_tokens}{mem}"
                    )
                }
                TrainEvent::Val {
                    iter,
                    loss,
                    seconds,
                } => {
                    format!("Iter {iter}: Val loss {loss:.3}, Val took {seconds:.3}s")
                }
                TrainEvent::Saved { iter, path } => {
                    format!("Iter {iter}: Saved adapter weights to {}", path.display())
                }
            };
            bar.suspend(|| eprintln!("{line}"));
        };
        let summary = train(
            m.model.as_mut(),
            &train_set,
            valid.as_deref(),
            &cfg,
            extra,
            &mut on_event,
        )?;
        bar.finish_and_clear();
        if let (Some(i), Some(f)) = (summary.initial_val_loss, summary.final_val_loss) {
            eprintln!(
                "validation loss {i:.3} -> {f:.3}; {:.1} tokens/s; adapter in {}",
                summary.tokens_per_second,
                adapter_path.display()
            );
        }
    } else {
        let adapter = Adapter::load(&adapter_path)?;
        adapter.apply(m.model.as_mut())?;
    }
    if a.test {
        let test =
            split(&m, "test")?.with_context(|| format!("{}: no test.jsonl", a.data.display()))?;
        let (loss, ppl) = test_loss(m.model.as_ref(), &test, a.max_seq_length)?;
        println!("Test loss {loss:.3}, Test ppl {ppl:.3}.");
    }
    Ok(())
}
