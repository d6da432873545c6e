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
                l.to_dtype(candle_core::DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
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
    Ok(BenchReport {
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
