//! LoRA fine-tuning on the CPU, following mlx-lm's trainer (`mlx_lm/tuner/trainer.py`):
//! batches of length-sorted examples in shuffled order, next-token cross-entropy averaged over
//! the scored tokens, Adam / AdamW with a constant or warmup + cosine learning rate, periodic
//! validation and checkpoints.
//!
//! How gradients are obtained on a quantized base (QLoRA: Dettmers et al. 2023 — frozen
//! quantized weights, float adapters):
//! - Blocks below the first adapted block have nothing to train: they run the ordinary
//!   inference path (our quantized kernels, no autograd graph) via
//!   [`CausalLM::hidden_states`], and their output for each example is computed once and
//!   cached (they never change), so later epochs start at the first adapted block.
//! - The adapted blocks, the final norm and the output layer run as differentiable candle ops
//!   ([`CausalLM::forward_from`]). The frozen weights there must pass gradients to their
//!   input, which the quantized kernels cannot; so while training, each frozen weight of those
//!   blocks (and the output layer) is held as a dequantized f32 copy (`grad_x = grad_y · W`
//!   through candle's matmul). The quantized weights stay in the model untouched; the copies
//!   are dropped when training ends ([`TrainSession::finish`]). For the default model with 4
//!   adapted blocks this is about 60 MB for the blocks plus 113 MB for the tied output layer.
//! - Only the adapters' `A` and `B` are [`candle_core::Var`]s, so `backward()` computes no
//!   gradient for any frozen weight.
//! - With gradient checkpointing ([`TrainConfig::grad_checkpoint`]) only the input of each
//!   adapted block is kept; the backward pass reruns one block at a time.
//! - Dropout masks are drawn from seeds derived from `--seed`, the step and the layer, so a
//!   run is reproducible.
//!
//! Differences from mlx-lm: batches are padded to their longest example (mlx-lm pads to one
//! more than a multiple of 32; padding changes no loss); the loss mask scores targets at
//! positions `offset..len` (mlx-lm's `steps <= lengths` also scores the first padding
//! position); Adam without bias correction, as `mlx.optimizers.Adam`'s default.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::data::Example;
use super::{attach_new, permute_cols, Adapter, AdapterConfig, LoraParameters};
use crate::models::{CausalLM, Trainable};
use crate::nn::Linear;
use crate::{Error, Result};

/// Which optimizer (`mlx.optimizers` names and defaults: betas 0.9 / 0.999, eps 1e-8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    /// Adam (Kingma & Ba 2015) without bias correction.
    Adam,
    /// AdamW (Loshchilov & Hutter 2019): `p ← p (1 - lr · weight_decay)` before the Adam step.
    AdamW {
        /// Decoupled weight decay (mlx default 0.01).
        weight_decay: f64,
    },
}

/// Learning rate over the steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// Linear warmup from 0 over `warmup` steps, then `mlx.optimizers.cosine_decay` from the
    /// base rate to `end` over `decay_steps` steps.
    Cosine {
        /// Warmup steps.
        warmup: usize,
        /// Steps of the cosine part.
        decay_steps: usize,
        /// Final rate.
        end: f64,
    },
}

impl LrSchedule {
    /// The rate at 0-based `step` for base rate `lr`.
    pub fn at(&self, lr: f64, step: usize) -> f64 {
        match *self {
            Self::Constant => lr,
            Self::Cosine {
                warmup,
                decay_steps,
                end,
            } => {
                if step < warmup {
                    return lr * step as f64 / warmup as f64;
                }
                let s = (step - warmup).min(decay_steps) as f64;
                let d = decay_steps.max(1) as f64;
                end + 0.5 * (lr - end) * (1.0 + (std::f64::consts::PI * s / d).cos())
            }
        }
    }
}

/// Training settings (mlx-lm's `lora` arguments and defaults where they make sense on a CPU).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Training steps.
    pub iters: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Base learning rate.
    pub learning_rate: f64,
    /// Adapters on the last `num_layers` blocks (`-1`: all).
    pub num_layers: i64,
    /// Rank, scale, dropout, keys.
    pub lora: LoraParameters,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Longest example in tokens; longer ones are truncated.
    pub max_seq_length: usize,
    /// Validation batches per evaluation (`-1`: the whole validation set).
    pub val_batches: i64,
    /// Steps between validations (also run before the first step and after the last).
    pub steps_per_eval: usize,
    /// Steps between training-loss reports.
    pub steps_per_report: usize,
    /// Steps between checkpoints (`0`: only the final save).
    pub save_every: usize,
    /// Output folder of the adapter.
    pub adapter_path: PathBuf,
    /// An `adapters.safetensors` to start from.
    pub resume: Option<PathBuf>,
    /// Seed of the adapter initialisation, the batch order and the dropout masks.
    pub seed: u64,
    /// Bytes of cached frozen-block outputs to keep (beyond it they are recomputed).
    pub hidden_cache_bytes: usize,
    /// Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
    /// Cost"; mlx-lm `--grad-checkpoint`): keep only each adapted block's input during the
    /// forward pass and recompute the block during the backward pass.
    pub grad_checkpoint: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            iters: 1000,
            batch_size: 4,
            learning_rate: 1e-5,
            num_layers: 16,
            lora: LoraParameters::default(),
            optimizer: OptimizerKind::Adam,
            schedule: LrSchedule::Constant,
            max_seq_length: 2048,
            val_batches: 25,
            steps_per_eval: 200,
            steps_per_report: 10,
            save_every: 100,
            adapter_path: PathBuf::from("adapters"),
            resume: None,
            seed: 0,
            hidden_cache_bytes: 1 << 30,
            grad_checkpoint: false,
        }
    }
}

/// What training reports as it goes.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Training loss over the last reporting window.
    Train {
        /// Step just done (1-based).
        iter: usize,
        /// Mean loss per scored token over the window.
        loss: f64,
        /// Learning rate of the step.
        learning_rate: f64,
        /// Steps per second over the window.
        iterations_per_second: f64,
        /// Scored tokens per second over the window.
        tokens_per_second: f64,
        /// Scored tokens so far.
        trained_tokens: usize,
        /// Peak resident memory of the process, bytes.
        peak_memory_bytes: Option<u64>,
    },
    /// A validation.
    Val {
        /// Steps done before it (0: the base model).
        iter: usize,
        /// Mean loss per scored token.
        loss: f64,
        /// Seconds it took.
        seconds: f64,
    },
    /// A checkpoint was written.
    Saved {
        /// Step.
        iter: usize,
        /// The file written.
        path: PathBuf,
    },
}

/// What a training run ended with.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Validation loss before the first step.
    pub initial_val_loss: Option<f64>,
    /// Validation loss after the last step.
    pub final_val_loss: Option<f64>,
    /// Mean training tokens per second.
    pub tokens_per_second: f64,
    /// Scored tokens trained on.
    pub trained_tokens: usize,
    /// Peak resident memory, bytes.
    pub peak_memory_bytes: Option<u64>,
}

/// A model prepared for training: adapters from `first` on, with dequantized f32 copies of
/// the frozen weights they need, and a cache of the frozen blocks' outputs.
pub struct TrainSession<'m> {
    model: &'m mut dyn Trainable,
    /// First adapted block.
    pub first: usize,
    originals: Vec<(String, Linear)>,
    vars: Vec<Var>,
    hidden: HashMap<(u8, usize), Tensor>,
    hidden_bytes: usize,
    hidden_limit: usize,
    /// Gradient checkpointing in [`Self::gradients`] (see [`TrainConfig::grad_checkpoint`]).
    pub grad_checkpoint: bool,
}

impl<'m> TrainSession<'m> {
    /// Puts fresh adapters (or those of `resume`) on `model` as `config` says, and the
    /// training copies of the frozen weights of the adapted blocks and the output layer.
    ///
    /// Errors: an architecture without adapters, or with adapters but without training
    /// ([`Trainable::training_unsupported`]); a `resume` file that does not fit.
    pub fn new(
        model: &'m mut dyn CausalLM,
        config: &AdapterConfig,
        resume: Option<&std::path::Path>,
        seed: u64,
        hidden_limit: usize,
    ) -> Result<Self> {
        if let Some(why) = super::trainable(model)?.training_unsupported() {
            return Err(Error::InvalidArgument(why));
        }
        let n = attach_new(model, config, seed)?;
        if n == 0 {
            return Err(Error::InvalidArgument(
                "no layer matches the LoRA keys".into(),
            ));
        }
        let model = super::trainable(model)?;
        let first = config.first_layer(model.info().n_layers);
        let resumed = match resume {
            Some(p) => Some(super::read_weights(p)?),
            None => None,
        };
        let mut originals = Vec::new();
        let mut vars = Vec::new();
        for slot in model.linears_mut() {
            let trained = slot.layer.is_none_or(|l| l >= first);
            if !trained {
                continue;
            }
            match slot.linear {
                Linear::Lora(l) => {
                    if let Some(w) = &resumed {
                        let (a, b) = w.get(&slot.name).ok_or_else(|| {
                            Error::tensor(
                                format!("{}.lora_a", slot.name),
                                "missing in --resume file",
                            )
                        })?;
                        let b = match slot.permuted_heads {
                            Some(h) => permute_cols(b, h, true)?,
                            None => b.clone(),
                        };
                        if a.dims() != l.a.dims() || b.dims() != l.b.dims() {
                            return Err(Error::tensor(
                                format!("{}.lora_a", slot.name),
                                "shape does not match the adapter config",
                            ));
                        }
                        l.a.set(&a.to_device(l.a.device())?)?;
                        l.b.set(&b.to_device(l.b.device())?)?;
                    }
                    l.train_weight = Some(l.base.dequantized_weight()?.to_device(l.a.device())?);
                    vars.push(l.a.clone());
                    vars.push(l.b.clone());
                }
                lin => {
                    let dense_f32 =
                        matches!(lin, Linear::Dense(d) if d.weight().dtype() == DType::F32);
                    if !dense_f32 {
                        let w = lin.dequantized_weight()?;
                        let dense = Linear::dense(w, lin.bias().cloned());
                        originals.push((slot.name.clone(), std::mem::replace(lin, dense)));
                    }
                }
            }
        }
        Ok(Self {
            model,
            first,
            originals,
            vars,
            hidden: HashMap::new(),
            hidden_bytes: 0,
            hidden_limit,
            grad_checkpoint: false,
        })
    }

    /// The trainable tensors (`A`, `B` of each adapted layer, in model order).
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The model being trained.
    pub fn model(&mut self) -> &mut dyn CausalLM {
        &mut *self.model
    }

    /// Output of the frozen blocks for one example (`[len, hidden]`), cached under
    /// `(split, index)`.
    fn frozen_hidden(&mut self, key: (u8, usize), tokens: &[u32]) -> Result<Tensor> {
        if let Some(h) = self.hidden.get(&key) {
            return Ok(h.clone());
        }
        let ids = Tensor::new(tokens, self.model.device())?.unsqueeze(0)?;
        let h = self
            .model
            .hidden_states(&ids, self.first)?
            .squeeze(0)?
            .detach();
        let bytes = h.elem_count() * 4;
        if self.hidden_bytes + bytes <= self.hidden_limit {
            self.hidden_bytes += bytes;
            self.hidden.insert(key, h.clone());
        }
        Ok(h)
    }

    /// Inputs of a batch: the frozen blocks' output `[batch, t - 1, hidden]` (zero-padded),
    /// the flattened indices of the scored positions `[n]` u32, their targets `[n, 1]` u32 and
    /// the number of scored tokens.
    fn batch_inputs(
        &mut self,
        split: u8,
        batch: &[(usize, &Example)],
        max_seq_length: usize,
    ) -> Result<(Tensor, Tensor, Tensor, usize)> {
        let dev = self.model.device().clone();
        let lens: Vec<usize> = batch
            .iter()
            .map(|(_, e)| e.tokens.len().min(max_seq_length))
            .collect();
        let t = lens.iter().copied().max().unwrap_or(0);
        if t < 2 {
            return Err(Error::InvalidArgument(
                "examples need at least 2 tokens".into(),
            ));
        }
        let mut hs = Vec::with_capacity(batch.len());
        let mut targets = vec![0u32; batch.len() * (t - 1)];
        let mut mask = vec![false; batch.len() * (t - 1)];
        let mut ntoks = 0;
        for (j, ((idx, ex), &len)) in batch.iter().zip(&lens).enumerate() {
            let toks = &ex.tokens[..len];
            let h = self.frozen_hidden((split, *idx), toks)?;
            let h = if len < t {
                h.pad_with_zeros(0, 0, t - len)?
            } else {
                h
            };
            hs.push(h.narrow(0, 0, t - 1)?);
            for p in 1..len {
                targets[j * (t - 1) + p - 1] = toks[p];
                if p >= ex.offset {
                    mask[j * (t - 1) + p - 1] = true;
                    ntoks += 1;
                }
            }
        }
        let hidden = Tensor::stack(&hs, 0)?;
        // Only scored positions go through the output layer (the largest matrix).
        let keep: Vec<u32> = (0..mask.len() as u32)
            .filter(|&i| mask[i as usize])
            .collect();
        let targets: Vec<u32> = keep.iter().map(|&i| targets[i as usize]).collect();
        let n = keep.len();
        let keep = Tensor::from_vec(keep, n, &dev)?;
        let targets = Tensor::from_vec(targets, (n, 1), &dev)?;
        Ok((hidden, keep, targets, ntoks))
    }

    /// Mean next-token loss of a batch (a scalar with its autograd graph) and the number of
    /// scored tokens. `split` keys the frozen-output cache (0 train, 1 valid, 2 test);
    /// `train` turns dropout on.
    pub fn batch_loss(
        &mut self,
        split: u8,
        batch: &[(usize, &Example)],
        max_seq_length: usize,
        train: bool,
    ) -> Result<(Tensor, usize)> {
        let (hidden, keep, targets, ntoks) = self.batch_inputs(split, batch, max_seq_length)?;
        let logits = self
            .model
            .forward_from(&hidden, self.first, train, Some(&keep))?;
        let loss = self.loss(&logits, &targets, ntoks)?;
        Ok((loss, ntoks))
    }

    fn loss(&self, logits: &Tensor, targets: &Tensor, ntoks: usize) -> Result<Tensor> {
        let mask = Tensor::ones(targets.dim(0)?, DType::F32, logits.device())?;
        cross_entropy(logits, targets, &mask, ntoks)
    }

    /// Gives every adapter a dropout seed derived from `seed` and `step` (its own per layer),
    /// so that a step's dropout masks are reproducible and the same in a recomputed block.
    pub fn set_dropout_seeds(&mut self, seed: u64, step: u64) {
        for (i, slot) in self.model.linears_mut().into_iter().enumerate() {
            if let Linear::Lora(l) = slot.linear {
                l.dropout_seed = mix_seed(seed, step, i as u64);
            }
        }
    }

    /// The loss of a batch (as [`Self::batch_loss`]), the number of scored tokens and the
    /// gradients: the returned store holds the gradient of the loss for each of
    /// [`Self::vars`]. With [`Self::grad_checkpoint`] the adapted blocks run without a graph
    /// in the forward pass, keeping only each block's input, and each block is run again
    /// during the backward pass (from the last to the first) to push the gradient through it:
    /// one block's graph is alive at a time. Dropout masks are seeded
    /// ([`Self::set_dropout_seeds`]), so the recomputed blocks equal the first pass and the
    /// gradients equal those without checkpointing up to float rounding.
    pub fn gradients(
        &mut self,
        split: u8,
        batch: &[(usize, &Example)],
        max_seq_length: usize,
        train: bool,
    ) -> Result<(f32, usize, candle_core::backprop::GradStore)> {
        if !self.grad_checkpoint {
            let (loss, ntoks) = self.batch_loss(split, batch, max_seq_length, train)?;
            let grads = loss.backward()?;
            return Ok((loss.to_scalar::<f32>()?, ntoks, grads));
        }
        let (hidden, keep, targets, ntoks) = self.batch_inputs(split, batch, max_seq_length)?;
        let (first, n) = (self.first, self.model.info().n_layers);
        let mut inputs = Vec::with_capacity(n.saturating_sub(first));
        let mut x = hidden;
        for i in first..n {
            let y = self.model.forward_blocks(&x, i..i + 1, train)?.detach();
            inputs.push(x);
            x = y;
        }
        let top = Var::from_tensor(&x)?;
        let logits = self
            .model
            .forward_head(top.as_tensor(), train, Some(&keep))?;
        let loss = self.loss(&logits, &targets, ntoks)?;
        let mut grads = loss.backward()?;
        let mut g = grads.remove(top.as_tensor());
        for i in (first..n).rev() {
            // An output with no gradient (no adapter above it) has nothing to push down.
            let Some(gy) = g.take() else { break };
            let xi = Var::from_tensor(&inputs[i - first])?;
            let y = self.model.forward_blocks(xi.as_tensor(), i..i + 1, train)?;
            let mut gi = (y * gy.detach())?.sum_all()?.backward()?;
            for v in &self.vars {
                if let Some(d) = gi.remove(v.as_tensor()) {
                    let sum = match grads.remove(v.as_tensor()) {
                        Some(prev) => (prev + d)?,
                        None => d,
                    };
                    grads.insert(v.as_tensor(), sum.detach());
                }
            }
            g = gi.remove(xi.as_tensor());
        }
        Ok((loss.to_scalar::<f32>()?, ntoks, grads))
    }

    /// Mean loss per scored token over `num_batches` batches (`-1`: all) of `data` in length
    /// order, without dropout (mlx-lm `evaluate`).
    pub fn evaluate(
        &mut self,
        split: u8,
        data: &[Example],
        batch_size: usize,
        num_batches: i64,
        max_seq_length: usize,
    ) -> Result<f64> {
        let batches = make_batches(data, batch_size)?;
        let take = if num_batches < 0 {
            batches.len()
        } else {
            num_batches as usize
        };
        let (mut sum, mut n) = (0f64, 0usize);
        for b in batches.iter().take(take) {
            let ex: Vec<(usize, &Example)> = b.iter().map(|&i| (i, &data[i])).collect();
            let (loss, nt) = self.batch_loss(split, &ex, max_seq_length, false)?;
            sum += loss.to_scalar::<f32>()? as f64 * nt as f64;
            n += nt;
        }
        Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
    }

    /// Removes the training copies and restores the frozen layers; the adapters stay loaded.
    pub fn finish(self) -> Result<()> {
        let mut originals: HashMap<String, Linear> = self.originals.into_iter().collect();
        for slot in self.model.linears_mut() {
            if let Some(orig) = originals.remove(&slot.name) {
                *slot.linear = orig;
            } else if let Linear::Lora(l) = slot.linear {
                l.train_weight = None;
            }
        }
        Ok(())
    }
}

/// A 64-bit seed from three (SplitMix64's finalizer over a combination: Steele et al. 2014).
fn mix_seed(seed: u64, step: u64, layer: u64) -> u64 {
    let mut z =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ layer.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `mean over scored positions of (logsumexp(logits) - logits[target])`:
/// `logits: [n, vocab]`, `targets: [n, 1]` u32, `mask: [n]` f32 (1 = scored).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    ntoks: usize,
) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &m)?;
    let picked = logits.gather(targets, D::Minus1)?;
    let nll = (lse - picked)?.squeeze(1)?;
    Ok(((nll * mask)?.sum_all()? / ntoks.max(1) as f64)?)
}

/// Batches of indices into `data`: sorted by length, `batch_size` consecutive ones each, a
/// trailing partial batch dropped (mlx-lm `iterate_batches`).
///
/// Errors: fewer examples than `batch_size`.
pub fn make_batches(data: &[Example], batch_size: usize) -> Result<Vec<Vec<usize>>> {
    if data.len() < batch_size || batch_size == 0 {
        return Err(Error::InvalidArgument(format!(
            "the data set has {} examples, fewer than the batch size {batch_size}",
            data.len()
        )));
    }
    let mut idx: Vec<usize> = (0..data.len()).collect();
    idx.sort_by_key(|&i| data[i].tokens.len());
    Ok(idx.chunks_exact(batch_size).map(|c| c.to_vec()).collect())
}

/// Adam / AdamW state over a list of variables (mlx conventions, see [`OptimizerKind`]).
pub struct Optimizer {
    kind: OptimizerKind,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Optimizer {
    /// Zero moments for `vars`.
    pub fn new(kind: OptimizerKind, vars: &[Var]) -> Result<Self> {
        let z = |v: &Var| v.zeros_like();
        Ok(Self {
            kind,
            m: vars.iter().map(z).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(z).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One step with rate `lr`: `m ← β1 m + (1-β1) g`, `v ← β2 v + (1-β2) g²`,
    /// `p ← p - lr · m / (sqrt(v) + ε)` (AdamW first decays `p`).
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &candle_core::backprop::GradStore,
        lr: f64,
    ) -> Result<()> {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        for (i, var) in vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Gradients carry the graph of the step; the moments must not keep it alive.
            let g = g.detach();
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?.detach();
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
            let mut p = var.as_tensor().detach();
            if let OptimizerKind::AdamW { weight_decay } = self.kind {
                p = (p * (1.0 - lr * weight_decay))?;
            }
            let upd = (&self.m[i] / (self.v[i].sqrt()? + eps)?)?;
            var.set(&(p - (upd * lr)?)?)?;
        }
        Ok(())
    }
}

/// Fine-tunes adapters on `model` with `train` examples, validating on `valid`, writing the
/// adapter (and checkpoints) under `config.adapter_path`. The adapters stay loaded in
/// `model` afterwards. `extra` is stored in `adapter_config.json` beside the LoRA fields.
///
/// Errors: data sets smaller than the batch size; architectures without training support;
/// I/O errors writing the adapter.
pub fn train(
    model: &mut dyn CausalLM,
    train: &[Example],
    valid: Option<&[Example]>,
    config: &TrainConfig,
    extra: serde_json::Map<String, serde_json::Value>,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary> {
    let mut acfg = AdapterConfig::new(config.num_layers, config.lora.clone());
    acfg.extra = extra;
    let batches = make_batches(train, config.batch_size)?;
    let mut session = TrainSession::new(
        model,
        &acfg,
        config.resume.as_deref(),
        config.seed,
        config.hidden_cache_bytes,
    )?;
    session.grad_checkpoint = config.grad_checkpoint;
    let vars = session.vars().to_vec();
    let mut opt = Optimizer::new(config.optimizer, &vars)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = Vec::new();
    let validate = |s: &mut TrainSession<'_>,
                    iter: usize,
                    on_event: &mut dyn FnMut(TrainEvent)|
     -> Result<Option<f64>> {
        let Some(v) = valid else { return Ok(None) };
        if config.val_batches == 0 {
            return Ok(None);
        }
        let t0 = Instant::now();
        let loss = s.evaluate(
            1,
            v,
            config.batch_size.min(v.len()).max(1),
            config.val_batches,
            config.max_seq_length,
        )?;
        on_event(TrainEvent::Val {
            iter,
            loss,
            seconds: t0.elapsed().as_secs_f64(),
        });
        Ok(Some(loss))
    };
    let initial_val_loss = validate(&mut session, 0, on_event)?;
    let mut final_val_loss = initial_val_loss;
    let (mut win_loss, mut win_toks, mut win_steps) = (0f64, 0usize, 0usize);
    let mut win_t0 = Instant::now();
    let (mut trained_tokens, mut train_secs) = (0usize, 0f64);
    let save = |s: &mut TrainSession<'_>, path: Option<PathBuf>| -> Result<Adapter> {
        let a = Adapter::from_model(s.model(), acfg.clone())?;
        match path {
            Some(p) => a.save_weights(&p)?,
            None => a.save(&config.adapter_path)?,
        }
        Ok(a)
    };
    std::fs::create_dir_all(&config.adapter_path)
        .map_err(|e| Error::io(&config.adapter_path, e))?;
    for it in 1..=config.iters {
        if order.is_empty() {
            order = (0..batches.len()).collect();
            order.shuffle(&mut rng);
        }
        let b = &batches[order.pop().unwrap_or(0)];
        let ex: Vec<(usize, &Example)> = b.iter().map(|&i| (i, &train[i])).collect();
        let t0 = Instant::now();
        let lr = config.schedule.at(config.learning_rate, it - 1);
        session.set_dropout_seeds(config.seed, it as u64);
        let (loss, ntoks, grads) = session.gradients(0, &ex, config.max_seq_length, true)?;
        opt.step(&vars, &grads, lr)?;
        train_secs += t0.elapsed().as_secs_f64();
        win_loss += loss as f64;
        win_toks += ntoks;
        win_steps += 1;
        trained_tokens += ntoks;
        if it % config.steps_per_report.max(1) == 0 || it == config.iters {
            let secs = win_t0.elapsed().as_secs_f64().max(1e-9);
            on_event(TrainEvent::Train {
                iter: it,
                loss: win_loss / win_steps as f64,
                learning_rate: lr,
                iterations_per_second: win_steps as f64 / secs,
                tokens_per_second: win_toks as f64 / secs,
                trained_tokens,
                peak_memory_bytes: crate::memory::snapshot().peak_resident_bytes,
            });
            (win_loss, win_toks, win_steps) = (0.0, 0, 0);
            win_t0 = Instant::now();
        }
        if it % config.steps_per_eval.max(1) == 0 || it == config.iters {
            final_val_loss = validate(&mut session, it, on_event)?.or(final_val_loss);
        }
        if config.save_every > 0 && it % config.save_every == 0 {
            save(&mut session, None)?;
            let p = config
                .adapter_path
                .join(format!("{it:07}_adapters.safetensors"));
            save(&mut session, Some(p.clone()))?;
            on_event(TrainEvent::Saved { iter: it, path: p });
        }
    }
    save(&mut session, None)?;
    on_event(TrainEvent::Saved {
        iter: config.iters,
        path: config.adapter_path.join(super::WEIGHTS_FILE),
    });
    session.finish()?;
    Ok(TrainSummary {
        initial_val_loss,
        final_val_loss,
        tokens_per_second: trained_tokens as f64 / train_secs.max(1e-9),
        trained_tokens,
        peak_memory_bytes: crate::memory::snapshot().peak_resident_bytes,
    })
}

/// Test loss and perplexity (`exp(loss)`) of `model` as it is (adapters loaded or not) on
/// `data`, one example at a time through the inference path (quantized kernels, no graph).
pub fn test_loss(
    model: &dyn CausalLM,
    data: &[Example],
    max_seq_length: usize,
) -> Result<(f64, f64)> {
    let n_layers = model.info().n_layers;
    let dev = model.device().clone();
    let arch = model.info().architecture.clone();
    let model = model
        .trainable()
        .ok_or(super::LoraError::Unsupported(arch))?;
    let (mut sum, mut n) = (0f64, 0usize);
    for ex in data {
        let toks = &ex.tokens[..ex.tokens.len().min(max_seq_length)];
        if toks.len() < 2 {
            continue;
        }
        let ids = Tensor::new(&toks[..toks.len() - 1], &dev)?.unsqueeze(0)?;
        let h = model.hidden_states(&ids, n_layers)?;
        let logits = model.forward_from(&h, n_layers, false, None)?.squeeze(0)?;
        let mask: Vec<f32> = (1..toks.len())
            .map(|p| if p >= ex.offset { 1.0 } else { 0.0 })
            .collect();
        let nt = mask.iter().filter(|&&m| m > 0.0).count();
        let t = Tensor::from_vec(toks[1..].to_vec(), (toks.len() - 1, 1), &dev)?;
        let m = Tensor::from_vec(mask, toks.len() - 1, &dev)?;
        let loss = cross_entropy(&logits, &t, &m, nt)?;
        sum += loss.to_scalar::<f32>()? as f64 * nt as f64;
        n += nt;
    }
    let loss = if n == 0 { f64::NAN } else { sum / n as f64 };
    Ok((loss, loss.exp()))
}
