//! Speed measurement in the manner of llama.cpp's `llama-bench`: `pp` (prefill: one forward
//! pass over `n_prompt` tokens from an empty cache) and `tg` (decode: `n_gen` single-token
//! forward passes from an empty cache), each repeated, reported in tokens per second as mean and
//! standard deviation over the repetitions.

use std::time::Instant;

use candle_core::Tensor;

use crate::loader::LoadedModel;
use crate::memory;
use crate::models::Logits;
use crate::Result;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchParams {
    /// Prompt tokens for the prefill test (0 skips it).
    pub n_prompt: usize,
    /// Tokens for the decode test (0 skips it).
    pub n_gen: usize,
    /// Repetitions of each test.
    pub repetitions: usize,
}

impl Default for BenchParams {
    fn default() -> Self {
        Self {
            n_prompt: 512,
            n_gen: 128,
            repetitions: 3,
        }
    }
}

/// Tokens-per-second samples of one test and their summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestResult {
    /// `pp512`, `tg128`, ...
    pub name: String,
    /// Tokens processed per repetition.
    pub n_tokens: usize,
    /// Tokens per second of each repetition.
    pub samples_tps: Vec<f64>,
    /// Mean tokens per second.
    pub mean_tps: f64,
    /// Sample standard deviation of tokens per second (0 for one repetition).
    pub stddev_tps: f64,
}

impl TestResult {
    fn new(name: String, n_tokens: usize, samples_tps: Vec<f64>) -> Self {
        let n = samples_tps.len() as f64;
        let mean = samples_tps.iter().sum::<f64>() / n.max(1.0);
        let var = if samples_tps.len() > 1 {
            samples_tps.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Self {
            name,
            n_tokens,
            samples_tps,
            mean_tps: mean,
            stddev_tps: var.sqrt(),
        }
    }
}

/// A benchmark report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Model file or folder.
    pub model: String,
    /// Architecture.
    pub architecture: String,
    /// Bytes of weights on disk.
    pub weights_bytes: u64,
    /// Seconds to load the model.
    pub load_seconds: f64,
    /// Device the model ran on (`cpu`, `cuda:0`, ...).
    pub device: String,
    /// Threads used by the compute pool.
    pub threads: usize,
    /// The tests run.
    pub tests: Vec<TestResult>,
    /// Bytes held by the KV cache at the end of the decode test.
    pub kv_cache_bytes: usize,
    /// Peak resident memory of the process, bytes (Linux).
    pub peak_resident_bytes: Option<u64>,
    /// Peak resident memory measured during the decode test alone, bytes (Linux; the
    /// high-water mark is reset before it where the kernel allows).
    pub tg_peak_resident_bytes: Option<u64>,
    /// GPU memory in use on the model's device at the end (total minus free, all processes:
    /// weights, KV cache, the allocator's pool and the CUDA context), bytes; `None` off GPU.
    pub gpu_memory_used_bytes: Option<u64>,
    /// The GPU's total memory, bytes; `None` off GPU.
    pub gpu_memory_total_bytes: Option<u64>,
}

/// Deterministic token ids for the tests (`llama-bench` uses random tokens; speed does not
/// depend on the values).
fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab.max(1) as u64) as u32
        })
        .collect()
}

/// Runs the tests on a loaded model. One untimed warm-up run precedes each test.
pub fn run(m: &LoadedModel, params: &BenchParams) -> Result<BenchReport> {
    let model = m.model.as_ref();
    let dev = model.device().clone();
    let vocab = model.info().vocab_size;
    let reps = params.repetitions.max(1);
    let mut tests = Vec::new();
    if params.n_prompt > 0 {
        let ids = tokens(params.n_prompt, vocab);
        let input = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
        let mut samples = Vec::new();
        for rep in 0..=reps {
            let mut cache = model.new_cache();
            let t = Instant::now();
            let l = model.forward(&input, &mut cache, Logits::Last)?;
            l.to_dtype(candle_core::DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            if rep > 0 {
                samples.push(params.n_prompt as f64 / t.elapsed().as_secs_f64());
            }
        }
        tests.push(TestResult::new(
            format!("pp{}", params.n_prompt),
            params.n_prompt,
            samples,
        ));
    }
    let mut kv_cache_bytes = 0;
    let mut tg_peak = None;
    if params.n_gen > 0 {
        let ids = tokens(params.n_gen, vocab);
        let mut samples = Vec::new();
        // As `generate` does after a prefill.
        memory::release_free_heap();
        memory::reset_peak();
        for rep in 0..=reps {
            let mut cache = model.new_cache();
            let t = Instant::now();
            for &id in &ids {
                let x = Tensor::new(&[id], &dev)?.unsqueeze(0)?;
                let l = model.forward(&x, &mut cache, Logits::Last)?;
                // As greedy decoding does: the argmax on the model's device, one id back.
                crate::sampling::argmax_on_device(&l)?;
            }
            if rep > 0 {
                samples.push(params.n_gen as f64 / t.elapsed().as_secs_f64());
            }
            kv_cache_bytes = cache.nbytes();
        }
        tg_peak = memory::snapshot().peak_resident_bytes;
        tests.push(TestResult::new(
            format!("tg{}", params.n_gen),
            params.n_gen,
            samples,
        ));
    }
    let gpu = crate::device::gpu_memory(&dev);
    Ok(BenchReport {
        device: crate::device::device_name(&dev),
        gpu_memory_used_bytes: gpu.map(|(free, total)| (total - free) as u64),
        gpu_memory_total_bytes: gpu.map(|(_, total)| total as u64),
        model: m.path.display().to_string(),
        architecture: model.info().architecture.clone(),
        weights_bytes: m.weights_bytes,
        load_seconds: m.load_time.as_secs_f64(),
        threads: rayon::current_num_threads(),
        tests,
        kv_cache_bytes,
        peak_resident_bytes: memory::snapshot().peak_resident_bytes,
        tg_peak_resident_bytes: tg_peak,
    })
}

/// How one prompt's greedy continuation compares between two loaded copies of a model (say,
/// on the CPU and on a GPU): see [`compare_devices`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Agreement {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Greedy steps compared.
    pub steps: usize,
    /// Steps whose chosen tokens were equal before the first difference (== `steps` if none).
    pub equal_steps: usize,
    /// Largest `|a - b|` over all logits of the steps up to and including the first difference.
    pub max_abs_logit_diff: f32,
    /// The reference's largest logit magnitude over those steps (for scale).
    pub max_abs_logit: f32,
    /// At the first difference: the reference's gap between its top two logits (a near tie
    /// explains a flip by rounding).
    pub top2_gap_at_difference: Option<f32>,
    /// The reference's tokens.
    pub tokens_a: Vec<u32>,
    /// The other model's tokens (up to the first difference, and that one).
    pub tokens_b: Vec<u32>,
}

/// Greedy decoding of `prompt` for `steps` tokens on `a` (the reference) and `b` in lockstep,
/// both fed `a`'s tokens, comparing the full logits of every step (copied to the CPU) up to the
/// first step whose argmax differs.
pub fn compare_devices(
    a: &dyn crate::models::CausalLM,
    b: &dyn crate::models::CausalLM,
    prompt: &[u32],
    steps: usize,
) -> Result<Agreement> {
    let logits =
        |m: &dyn crate::models::CausalLM, c: &mut crate::kv_cache::KvCache, ids: &[u32]| {
            let x = Tensor::new(ids, m.device())?.unsqueeze(0)?;
            let l = m.forward(&x, c, Logits::Last)?;
            Ok::<Vec<f32>, crate::Error>(
                l.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_device(&candle_core::Device::Cpu)?
                    .to_vec1()?,
            )
        };
    let (mut ca, mut cb) = (a.new_cache(), b.new_cache());
    let mut la = logits(a, &mut ca, prompt)?;
    let mut lb = logits(b, &mut cb, prompt)?;
    let mut r = Agreement {
        prompt_tokens: prompt.len(),
        steps,
        equal_steps: 0,
        max_abs_logit_diff: 0.0,
        max_abs_logit: 0.0,
        top2_gap_at_difference: None,
        tokens_a: Vec::new(),
        tokens_b: Vec::new(),
    };
    for _ in 0..steps {
        for (x, y) in la.iter().zip(&lb) {
            r.max_abs_logit_diff = r.max_abs_logit_diff.max((x - y).abs());
            r.max_abs_logit = r.max_abs_logit.max(x.abs());
        }
        let (ta, tb) = (crate::sampling::argmax(&la), crate::sampling::argmax(&lb));
        r.tokens_a.push(ta);
        r.tokens_b.push(tb);
        if ta != tb {
            let top = la[ta as usize];
            let second = la
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != ta as usize)
                .map(|(_, &v)| v)
                .fold(f32::NEG_INFINITY, f32::max);
            r.top2_gap_at_difference = Some(top - second);
            break;
        }
        r.equal_steps += 1;
        la = logits(a, &mut ca, &[ta])?;
        lb = logits(b, &mut cb, &[ta])?;
    }
    Ok(r)
}
