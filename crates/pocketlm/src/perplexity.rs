//! Perplexity of raw text, and the KL divergence of one model's next-token distributions from
//! another's (llama.cpp's measure of quantization quality).
//!
//! The text is tokenized once (with the tokenizer's own BOS when it adds one, as
//! `tokenizer(text)` in transformers and `common_tokenize(.., add_special = true)` in llama.cpp
//! do), then cut into windows of at most `context` tokens. Each window runs from an empty KV
//! cache, in chunks of `batch` tokens, and some of its positions are *scored*: the negative
//! log-likelihood of token `t[i]` under the logits the model gave at position `i - 1` of the
//! same window,
//!
//! ```text
//! nll_i = logsumexp(logits[i - 1]) - logits[i - 1][t[i]]      (natural log, f64 sums)
//! mean NLL = Σ nll_i / N over all scored tokens,   perplexity = exp(mean NLL)
//! ```
//!
//! Which positions are scored is the [`Convention`]:
//!
//! - [`Convention::Sliding`] (the default, stride = context): transformers' guide "Perplexity
//!   of fixed-length models" (`docs/source/en/perplexity.md`). Windows begin at `0, stride,
//!   2·stride, ..`, each `min(context, n - begin)` tokens long, and the last one is the first
//!   that reaches the end of the text. A window scores only the tokens that no earlier window
//!   scored (the last `trg_len = end - prev_end` tokens), except the window's own first token,
//!   which has no logits before it: with `stride == context` the windows do not overlap and
//!   every token but each window's first is scored; with a smaller stride every token but the
//!   text's first is scored once, with at least `context - stride` tokens of context. No BOS is
//!   inserted at window starts. The mean is over tokens, each counted once. (The guide's loop
//!   weights each window's mean loss by `num_valid_tokens - 1`; in a window after the first,
//!   whose first label is already masked, the loss is a mean over `trg_len` tokens, one more,
//!   so the guide's own figure is a little off: 21.9108 against 21.8759 on the test text of
//!   `tests/golden/perplexity/`.)
//! - [`Convention::LlamaCpp`]: `llama-perplexity`'s default (`tools/perplexity/perplexity.cpp`,
//!   `perplexity()`). The tokens are cut into `n / context` non-overlapping windows of exactly
//!   `context` tokens (the remainder is dropped); when the tokenizer adds a BOS, the first
//!   token of each window is replaced by BOS; positions `context / 2 .. context - 1` are scored
//!   (the second half: `context - 1 - context / 2` tokens per window), so that every scored
//!   token has at least `context / 2` tokens before it. (`llama-perplexity` also refuses texts
//!   shorter than two windows; here one suffices.) `llama-perplexity -c N` gives the same
//!   windows as `context: N` here.
//!
//! mlx-lm's `mlx_lm.perplexity` scores every position but the first of non-overlapping
//! windows of its `--sequence-length`: that is [`Convention::Sliding`] with
//! `stride == context` (up to its batching and data-set sampling).
//!
//! [`kl_divergence`] runs a reference model and a tested model on the same windows and, at
//! every scored position, computes
//!
//! ```text
//! KL(ref || test) = Σ_v p_ref(v) · (log p_ref(v) - log p_test(v))   (log-softmax of each model's logits, f64)
//! ```
//!
//! and whether both models' most likely tokens are the same (top-1 agreement), as
//! `llama-perplexity --kl-divergence` does ("Mean KLD", "Median KLD", "99.0% KLD", "Maximum
//! KLD", "Same top p"; percentiles interpolated linearly between sorted values, the median the
//! mean of the two middle values for an even count). `llama-perplexity` keeps the base model's
//! log-probabilities as 16-bit numbers and skips terms with `p_ref < e^-16`; here every term is
//! summed from the full-precision logits.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::kv_cache::KvCache;
use crate::loader::LoadedModel;
use crate::models::{CausalLM, Logits};
use crate::{Error, Result};

/// Which tokens of which windows are scored (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Convention {
    /// transformers' sliding windows: windows begin every `stride` tokens (at most
    /// `context`), each scores the tokens no earlier window scored.
    Sliding {
        /// Tokens between window starts, `1..=context`.
        stride: usize,
    },
    /// `llama-perplexity`'s: non-overlapping windows of `context` tokens, BOS as each window's
    /// first token (when the tokenizer adds one), the second half scored.
    LlamaCpp,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct PerplexityParams {
    /// Tokens per window (at most the model's context length).
    pub context: usize,
    /// Which tokens are scored.
    pub convention: Convention,
    /// Tokens per forward pass within a window (bounds the memory of the logits; the KV cache
    /// carries the window across passes). At least 1.
    pub batch: usize,
    /// Use only the first this many windows (`llama-perplexity --chunks`); `None`: all.
    pub max_windows: Option<usize>,
}

impl PerplexityParams {
    /// Non-overlapping windows of `context` tokens (transformers' convention with
    /// `stride == context`), in passes of 512 tokens.
    pub fn new(context: usize) -> Self {
        Self {
            context,
            convention: Convention::Sliding { stride: context },
            batch: 512,
            max_windows: None,
        }
    }
}

/// One window: tokens `start .. start + len` of the text, of which those at window positions
/// `first_scored .. len` are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    /// Index of the window's first token in the text's tokens.
    pub start: usize,
    /// Tokens in the window.
    pub len: usize,
    /// Window position of the first scored token (at least 1).
    pub first_scored: usize,
    /// Whether the window's first token is replaced by BOS.
    pub bos: bool,
}

impl Window {
    /// Tokens scored in this window.
    pub fn scored(&self) -> usize {
        self.len - self.first_scored
    }
}

/// The windows of `n_tokens` tokens under `params` (`add_bos`: whether the tokenizer adds a
/// BOS, which [`Convention::LlamaCpp`] puts at each window's start).
///
/// Errors: [`Error::InvalidArgument`] naming `context` (0, or 1 for llama.cpp's convention,
/// which scores the second half), `stride` (0 or larger than `context`), or the text when it
/// has fewer tokens than one window.
pub fn windows(n_tokens: usize, params: &PerplexityParams, add_bos: bool) -> Result<Vec<Window>> {
    let ctx = params.context;
    if ctx < 2 {
        return Err(Error::InvalidArgument(format!(
            "`context` is {ctx}; a window needs at least 2 tokens (one to predict from, one scored)"
        )));
    }
    if n_tokens < ctx {
        return Err(Error::InvalidArgument(format!(
            "the text has {n_tokens} tokens, fewer than one window (`context` {ctx})"
        )));
    }
    let mut out = Vec::new();
    match params.convention {
        Convention::Sliding { stride } => {
            if stride == 0 || stride > ctx {
                return Err(Error::InvalidArgument(format!(
                    "`stride` is {stride}; it must be 1..={ctx} (`context`)"
                )));
            }
            let mut prev_end = 0;
            let mut begin = 0;
            loop {
                let end = (begin + ctx).min(n_tokens);
                let trg_len = end - prev_end;
                let len = end - begin;
                // The last `trg_len` tokens are targets, but not the window's first token.
                out.push(Window {
                    start: begin,
                    len,
                    first_scored: (len - trg_len).max(1),
                    bos: false,
                });
                prev_end = end;
                if end == n_tokens {
                    break;
                }
                begin += stride;
            }
        }
        Convention::LlamaCpp => {
            for i in 0..n_tokens / ctx {
                out.push(Window {
                    start: i * ctx,
                    len: ctx,
                    first_scored: ctx / 2 + 1,
                    bos: add_bos,
                });
            }
        }
    }
    if let Some(m) = params.max_windows {
        if m == 0 {
            return Err(Error::InvalidArgument("`max_windows` is 0".into()));
        }
        out.truncate(m);
    }
    Ok(out)
}

/// The result of one window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WindowResult {
    /// The window.
    #[serde(flatten)]
    pub window: Window,
    /// Sum of the scored tokens' negative log-likelihoods (natural log).
    pub nll_sum: f64,
}

/// A perplexity measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PerplexityReport {
    /// Tokens of the whole text.
    pub text_tokens: usize,
    /// Tokens per window.
    pub context: usize,
    /// The scoring convention.
    pub convention: Convention,
    /// Per window.
    pub windows: Vec<WindowResult>,
    /// Tokens scored.
    pub tokens_scored: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Tokens run through the model (all windows' tokens).
    pub tokens_evaluated: usize,
    /// Seconds spent in the model and scoring.
    pub seconds: f64,
    /// `tokens_evaluated / seconds`.
    pub tokens_per_second: f64,
}

/// Statistics of the per-token KL divergence, nats.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KlStats {
    /// Mean.
    pub mean: f64,
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// 99th percentile (linear interpolation between sorted values, as llama.cpp).
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl KlStats {
    /// The statistics of `values` (sorted here).
    ///
    /// Errors: [`Error::InvalidArgument`] for no values.
    pub fn of(values: &mut [f64]) -> Result<Self> {
        if values.is_empty() {
            return Err(Error::InvalidArgument("no KL divergence values".into()));
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n.is_multiple_of(2) {
            0.5 * (values[n / 2 - 1] + values[n / 2])
        } else {
            values[n / 2]
        };
        Ok(Self {
            mean: values.iter().sum::<f64>() / n as f64,
            median,
            p99: percentile(values, 0.99),
            max: values[n - 1],
        })
    }
}

/// `llama-perplexity`'s percentile of sorted `values`: linear interpolation at
/// `fraction · (n - 1)`.
fn percentile(values: &[f64], fraction: f64) -> f64 {
    let p = fraction * (values.len() - 1) as f64;
    let i = p as usize;
    let f = p - i as f64;
    (1.0 - f) * values[i] + f * values[(i + 1).min(values.len() - 1)]
}

/// A KL-divergence measurement of a tested model against a reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KlReport {
    /// The reference model's perplexity on the scored tokens.
    pub reference: PerplexityReport,
    /// The tested model's perplexity on the same tokens.
    pub test: PerplexityReport,
    /// Per-token KL(reference || test).
    pub kl: KlStats,
    /// Percentage of scored positions where both models' most likely next tokens are equal.
    pub top1_agreement_percent: f64,
}

/// Reads a text file for [`perplexity`].
///
/// Errors: [`Error::Io`] naming the file; [`Error::InvalidArgument`] naming it when it is
/// empty (or only whitespace) or not UTF-8.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::InvalidArgument(format!("{}: not UTF-8 text ({e})", path.display())))?;
    if text.trim().is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: the file is empty",
            path.display()
        )));
    }
    Ok(text)
}

/// The perplexity of `m` on `text` (see the module docs for the windows and the formula).
///
/// Errors: [`Error::InvalidArgument`] for empty text, a text shorter than one window,
/// `context` larger than the model's context length (`max_position_embeddings`), a bad
/// `stride` or `batch`; the tokenizer's and the model's errors.
pub fn perplexity(
    m: &LoadedModel,
    text: &str,
    params: &PerplexityParams,
) -> Result<PerplexityReport> {
    let ids = encode(m, text)?;
    let plan = plan(m, ids.len(), params)?;
    let mut acc = Accumulator::new(&plan);
    let t0 = Instant::now();
    run_windows(
        &[m.model.as_ref()],
        &ids,
        &plan,
        bos_id(m),
        params.batch,
        &mut |w, rows, targets, vocab| {
            for (r, &t) in rows[0].chunks_exact(vocab).zip(targets) {
                acc.add(w, nll(&log_softmax(r), t));
            }
            Ok(())
        },
    )?;
    Ok(acc.report(ids.len(), params, t0.elapsed().as_secs_f64()))
}

/// KL(reference || test) per scored token of `text`, with both models' perplexities (see the
/// module docs). Both run the same windows.
///
/// Errors: [`Error::InvalidArgument`] naming both models when their tokenizers differ (the
/// text's tokens, BOS, or the vocabulary size) or their output layers have different widths;
/// as [`perplexity`] otherwise.
pub fn kl_divergence(
    reference: &LoadedModel,
    test: &LoadedModel,
    text: &str,
    params: &PerplexityParams,
) -> Result<KlReport> {
    let ids = encode(reference, text)?;
    let mismatch = |what: &str| {
        Error::InvalidArgument(format!(
            "the reference model {} and the tested model {} do not share a tokenizer ({what} differ); \
             KL divergence compares next-token distributions over the same vocabulary",
            reference.path.display(),
            test.path.display()
        ))
    };
    if reference.tokenizer.vocab_size() != test.tokenizer.vocab_size() {
        return Err(mismatch("their vocabulary sizes"));
    }
    if reference.model.info().vocab_size != test.model.info().vocab_size {
        return Err(mismatch("their output layers' widths"));
    }
    if bos_id(reference) != bos_id(test) {
        return Err(mismatch("their BOS tokens"));
    }
    if encode(test, text)? != ids {
        return Err(mismatch("the text's tokens"));
    }
    let plan = plan(reference, ids.len(), params)?;
    plan_fits(test, params)?;
    let mut acc_ref = Accumulator::new(&plan);
    let mut acc_test = Accumulator::new(&plan);
    let mut kls = Vec::new();
    let mut same_top = 0usize;
    let t0 = Instant::now();
    let models = [reference.model.as_ref(), test.model.as_ref()];
    run_windows(
        &models,
        &ids,
        &plan,
        bos_id(reference),
        params.batch,
        &mut |w, rows, targets, vocab| {
            for ((r, q), &t) in rows[0]
                .chunks_exact(vocab)
                .zip(rows[1].chunks_exact(vocab))
                .zip(targets)
            {
                let (lp, lq) = (log_softmax(r), log_softmax(q));
                acc_ref.add(w, nll(&lp, t));
                acc_test.add(w, nll(&lq, t));
                let kl: f64 = lp.iter().zip(&lq).map(|(&a, &b)| a.exp() * (a - b)).sum();
                kls.push(kl.max(0.0));
                same_top += usize::from(argmax(r) == argmax(q));
            }
            Ok(())
        },
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let n = kls.len();
    Ok(KlReport {
        reference: acc_ref.report(ids.len(), params, secs),
        test: acc_test.report(ids.len(), params, secs),
        kl: KlStats::of(&mut kls)?,
        top1_agreement_percent: 100.0 * same_top as f64 / n as f64,
    })
}

fn encode(m: &LoadedModel, text: &str) -> Result<Vec<u32>> {
    if text.trim().is_empty() {
        return Err(Error::InvalidArgument("the text is empty".into()));
    }
    Ok(m.tokenizer.encode(text, true)?)
}

/// The BOS id when the tokenizer adds one.
fn bos_id(m: &LoadedModel) -> Option<u32> {
    m.tokenizer.bos_token_id().filter(|_| m.tokenizer.add_bos())
}

fn plan_fits(m: &LoadedModel, params: &PerplexityParams) -> Result<()> {
    let n_ctx = m.model.info().context_length;
    if params.context > n_ctx {
        return Err(Error::InvalidArgument(format!(
            "`context` {} is larger than the context length of {} ({n_ctx} tokens)",
            params.context,
            m.path.display()
        )));
    }
    if params.batch == 0 {
        return Err(Error::InvalidArgument("`batch` is 0".into()));
    }
    Ok(())
}

fn plan(m: &LoadedModel, n_tokens: usize, params: &PerplexityParams) -> Result<Vec<Window>> {
    plan_fits(m, params)?;
    windows(n_tokens, params, bos_id(m).is_some())
}

/// Runs each window through every model of `models` (each from an empty cache, in passes of
/// `batch` tokens, the models in lockstep) and hands `f` the rows of logits that predict the
/// scored tokens: `f(window index, rows per model (each [n, vocab] flattened), the n targets,
/// vocab)`.
#[allow(clippy::type_complexity)]
fn run_windows(
    models: &[&dyn CausalLM],
    ids: &[u32],
    plan: &[Window],
    bos: Option<u32>,
    batch: usize,
    f: &mut dyn FnMut(usize, &[Vec<f32>], &[u32], usize) -> Result<()>,
) -> Result<()> {
    for (wi, w) in plan.iter().enumerate() {
        let mut input = ids[w.start..w.start + w.len].to_vec();
        if let (true, Some(b)) = (w.bos, bos) {
            input[0] = b;
        }
        // Targets are the window's original tokens (llama.cpp restores the one BOS replaced).
        let tokens = &ids[w.start..w.start + w.len];
        let mut caches: Vec<KvCache> = models.iter().map(|m| m.new_cache()).collect();
        let mut pos = 0;
        while pos < w.len {
            let n = batch.min(w.len - pos);
            // Rows at window positions p predict p + 1; scored targets are first_scored..len.
            let lo = (w.first_scored - 1).max(pos);
            let hi = pos + n;
            let want = lo < hi && lo < w.len - 1;
            let mut rows = Vec::with_capacity(models.len());
            let mut vocab = 0;
            for (m, cache) in models.iter().zip(caches.iter_mut()) {
                let x = Tensor::new(&input[pos..pos + n], m.device())?.unsqueeze(0)?;
                if !want {
                    m.forward(&x, cache, Logits::Last)?;
                    continue;
                }
                let hi = hi.min(w.len - 1);
                let l = m.forward(&x, cache, Logits::All)?.squeeze(0)?;
                let l = l.narrow(0, lo - pos, hi - lo)?.to_dtype(DType::F32)?;
                vocab = l.dim(1)?;
                rows.push(l.flatten_all()?.to_vec1::<f32>()?);
            }
            if want {
                let hi = hi.min(w.len - 1);
                f(wi, &rows, &tokens[lo + 1..hi + 1], vocab)?;
            }
            pos += n;
        }
    }
    Ok(())
}

/// Log-probabilities of `logits`, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

fn nll(log_probs: &[f64], target: u32) -> f64 {
    -log_probs[target as usize]
}

/// The first index of the largest value.
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

struct Accumulator {
    windows: Vec<WindowResult>,
}

impl Accumulator {
    fn new(plan: &[Window]) -> Self {
        Self {
            windows: plan
                .iter()
                .map(|&window| WindowResult {
                    window,
                    nll_sum: 0.0,
                })
                .collect(),
        }
    }

    fn add(&mut self, window: usize, nll: f64) {
        self.windows[window].nll_sum += nll;
    }

    fn report(
        self,
        text_tokens: usize,
        params: &PerplexityParams,
        seconds: f64,
    ) -> PerplexityReport {
        let tokens_scored: usize = self.windows.iter().map(|w| w.window.scored()).sum();
        let tokens_evaluated: usize = self.windows.iter().map(|w| w.window.len).sum();
        let mean_nll = self.windows.iter().map(|w| w.nll_sum).sum::<f64>() / tokens_scored as f64;
        PerplexityReport {
            text_tokens,
            context: params.context,
            convention: params.convention,
            windows: self.windows,
            tokens_scored,
            mean_nll,
            perplexity: mean_nll.exp(),
            tokens_evaluated,
            seconds,
            tokens_per_second: tokens_evaluated as f64 / seconds.max(1e-9),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sliding(context: usize, stride: usize) -> PerplexityParams {
        PerplexityParams {
            convention: Convention::Sliding { stride },
            ..PerplexityParams::new(context)
        }
    }

    /// The windows of transformers' guide loop, written out for 400 tokens, context 256.
    #[test]
    fn sliding_windows_follow_the_transformers_loop() {
        let w = windows(400, &sliding(256, 128), false).unwrap();
        let got: Vec<_> = w.iter().map(|w| (w.start, w.len, w.first_scored)).collect();
        // begin 0: end 256, trg 256 (all but the first); begin 128: end 384, trg 128;
        // begin 256: end 400, trg 16.
        assert_eq!(got, [(0, 256, 1), (128, 256, 128), (256, 144, 128)]);
        // Every token but the first scored once.
        assert_eq!(w.iter().map(Window::scored).sum::<usize>(), 399);
        // stride == context: non-overlapping, each window's first token unscored.
        let w = windows(600, &sliding(256, 256), false).unwrap();
        let got: Vec<_> = w.iter().map(|w| (w.start, w.len, w.first_scored)).collect();
        assert_eq!(got, [(0, 256, 1), (256, 256, 1), (512, 88, 1)]);
    }

    #[test]
    fn llama_cpp_windows_score_the_second_half() {
        let p = PerplexityParams {
            convention: Convention::LlamaCpp,
            ..PerplexityParams::new(256)
        };
        let w = windows(600, &p, true).unwrap();
        let got: Vec<_> = w
            .iter()
            .map(|w| (w.start, w.len, w.first_scored, w.bos))
            .collect();
        assert_eq!(got, [(0, 256, 129, true), (256, 256, 129, true)]);
        // n_ctx - 1 - n_ctx / 2 per window, as perplexity.cpp counts.
        assert_eq!(w[0].scored(), 256 - 1 - 128);
    }

    #[test]
    fn bad_windows_are_named_errors() {
        let e = windows(100, &sliding(256, 256), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("100 tokens") && e.contains("`context` 256"),
            "{e}"
        );
        let e = windows(1000, &sliding(256, 300), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`stride`"), "{e}");
        let e = windows(1000, &sliding(1, 1), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`context`"), "{e}");
    }

    /// KL statistics as llama-perplexity computes them (median of an even count: the mean of
    /// the middle two; 99th percentile interpolated).
    #[test]
    fn kl_stats() {
        let mut v: Vec<f64> = (0..=100).rev().map(f64::from).collect();
        let s = KlStats::of(&mut v).unwrap();
        assert_eq!((s.mean, s.median, s.p99, s.max), (50.0, 50.0, 99.0, 100.0));
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        let s = KlStats::of(&mut v).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(
            (s.p99 - (0.97 * 4.0 + 0.03 * 3.0)).abs() < 1e-12,
            "{}",
            s.p99
        );
    }

    /// The log-softmax and the KL sum on a small case worked by hand.
    #[test]
    fn log_softmax_and_kl() {
        let lp = log_softmax(&[0.0, (3f32).ln()]);
        assert!((lp[0] - 0.25f64.ln()).abs() < 1e-7 && (lp[1] - 0.75f64.ln()).abs() < 1e-7);
        let lq = log_softmax(&[0.0, 0.0]);
        let kl: f64 = lp.iter().zip(&lq).map(|(&a, &b)| a.exp() * (a - b)).sum();
        let want = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
        assert!((kl - want).abs() < 1e-7, "{kl} vs {want}");
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
