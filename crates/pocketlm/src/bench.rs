//! Speed measurement in the manner of llama.cpp's `llama-bench`: `pp` (prefill: one forward
//! pass over `n_prompt` tokens) and `tg` (decode: `n_gen` single-token forward passes), each at a
//! context depth `d` (the cache first filled with `d` tokens, untimed, in chunks of
//! [`DEPTH_CHUNK`] as llama.cpp's default micro-batch of 512) and repeated, reported in tokens
//! per second as mean and standard deviation over the repetitions. Every combination of the
//! lists is run, as `llama-bench -p 512,1024 -n 128 -d 0,4096` does. With batch sizes
//! ([`BenchParams::batch`]), each decode test also runs for that many sequences decoded
//! together (one [`CausalLM::forward_batch`] a step), reported as the aggregate tokens per
//! second of all sequences, as `llama-batched-bench` reports its `S_TG`.

use std::time::Instant;

use candle_core::Tensor;

use crate::constrain::{Constraint, GrammarEnv, GrammarMask};
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::loader::LoadedModel;
use crate::memory;
use crate::models::{BatchRow, CausalLM, Logits};
use crate::sampling::{Sampler, SamplingParams};
use crate::Result;

/// Tokens per forward pass when filling the cache to a test's depth.
pub const DEPTH_CHUNK: usize = 512;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchParams {
    /// Prompt lengths of the prefill tests (`pp`; 0 entries are skipped).
    pub n_prompt: Vec<usize>,
    /// Token counts of the decode tests (`tg`; 0 entries are skipped).
    pub n_gen: Vec<usize>,
    /// Context depths (tokens already in the cache) at which every test runs.
    pub depth: Vec<usize>,
    /// Repetitions of each test.
    pub repetitions: usize,
    /// With a constraint, each decode test runs a second time with the grammar's mask applied
    /// (a test named `tg128 +grammar`, see [`run`]).
    pub constraint: Option<Constraint>,
    /// With sampling settings, each decode test runs a second time drawing each token with
    /// them as generation does (on the GPU when the logits are there, see
    /// [`crate::device::sample_on_device`]; a test named `tg128 +sampling`). A seed is
    /// best given, so that runs draw the same tokens.
    pub sampling: Option<SamplingParams>,
    /// The KV cache every test runs with ([`CausalLM::make_cache`]; e.g.
    /// [`KvCacheConfig::kv_f16`]); the default: the model's own ([`CausalLM::new_cache`]).
    pub cache: KvCacheConfig,
    /// Batch sizes (2 or more; smaller entries are skipped) at which each decode test runs
    /// again: that many sequences, each with its own cache at the test's depth, decoded
    /// together (a test named `tg128 x32`, see [`run`]).
    pub batch: Vec<usize>,
    /// Each batched decode test, and each prompt test at a depth, runs again with the caches
    /// paged in one [`crate::kv_pool::KvBlockPool`] on the model's device, sized for them
    /// (tests named `tg128 x32 paged`, `pp512 @ d4096 paged`): f16 blocks on a CUDA GPU
    /// (what the fused CUDA step reads), else the blocks of [`KvCacheConfig::kv_f16`]'s dtype.
    pub paged: bool,
}

impl Default for BenchParams {
    fn default() -> Self {
        Self {
            n_prompt: vec![512],
            n_gen: vec![128],
            depth: vec![0],
            repetitions: 3,
            constraint: None,
            sampling: None,
            cache: KvCacheConfig::default(),
            batch: Vec::new(),
            paged: false,
        }
    }
}

/// Tokens-per-second samples of one test and their summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestResult {
    /// `pp512`, `tg128`, `pp512 @ d4096` (llama-bench's names).
    pub name: String,
    /// Tokens processed per repetition.
    pub n_tokens: usize,
    /// Tokens in the cache before the timed tokens.
    pub depth: usize,
    /// Tokens per second of each repetition.
    pub samples_tps: Vec<f64>,
    /// Mean tokens per second.
    pub mean_tps: f64,
    /// Sample standard deviation of tokens per second (0 for one repetition).
    pub stddev_tps: f64,
}

impl TestResult {
    fn new(kind: &str, n_tokens: usize, depth: usize, samples_tps: Vec<f64>) -> Self {
        let name = if depth > 0 {
            format!("{kind}{n_tokens} @ d{depth}")
        } else {
            format!("{kind}{n_tokens}")
        };
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
            depth,
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

/// A fresh cache holding `depth` tokens (filled untimed, [`DEPTH_CHUNK`] tokens a pass). On a
/// GPU it returns only once the device has finished the fill, as llama-bench's `test_prompt`
/// ends with `llama_synchronize`: the passes are queued asynchronously, so without the wait the
/// timed test after it would also pay for the fill's last queued kernels.
fn cache_at(
    model: &dyn CausalLM,
    config: &KvCacheConfig,
    depth: usize,
    vocab: usize,
) -> Result<KvCache> {
    cache_in(model, config, None, depth, vocab)
}

/// A KV block pool on `model`'s device for `seqs` sequences of `positions` positions each
/// (and one block more each, for the block a fused step reserves ahead), of the dtype
/// `serve --kv-memory` gives it ([`KvBlockPool::dtype_for`]: f16 on a CUDA GPU, else
/// `config`'s).
fn paged_pool(
    model: &dyn CausalLM,
    config: &KvCacheConfig,
    seqs: usize,
    positions: usize,
) -> Result<std::sync::Arc<crate::kv_pool::KvBlockPool>> {
    use crate::kv_pool::{KvBlockPool, BLOCK};
    let dtype = KvBlockPool::dtype_for(model.device(), config.kv_f16);
    let blocks = seqs * (positions.div_ceil(BLOCK) + 1);
    let pool = KvBlockPool::on_device(&model.cache_shapes(), blocks, dtype, model.device())?;
    Ok(std::sync::Arc::new(pool))
}

/// [`cache_at`], its growing layers paged in `pool` when given ([`KvCache::page_into`]).
fn cache_in(
    model: &dyn CausalLM,
    config: &KvCacheConfig,
    pool: Option<&std::sync::Arc<crate::kv_pool::KvBlockPool>>,
    depth: usize,
    vocab: usize,
) -> Result<KvCache> {
    let mut cache = if *config == KvCacheConfig::default() {
        model.new_cache()
    } else {
        model.make_cache(config)?
    };
    if let Some(pool) = pool {
        cache.page_into(pool);
    }
    let ids = tokens(depth, vocab);
    for chunk in ids.chunks(DEPTH_CHUNK) {
        let x = Tensor::new(chunk, model.device())?.unsqueeze(0)?;
        forward(model, &x, &mut cache, Logits::Last)?;
    }
    model.device().synchronize()?;
    Ok(cache)
}

/// One forward pass as the generation loop runs it: on a pool thread when the model is on
/// the CPU ([`crate::kernels::in_pool_on`]).
fn forward(
    model: &dyn CausalLM,
    x: &Tensor,
    cache: &mut KvCache,
    logits: Logits,
) -> Result<Tensor> {
    crate::kernels::in_pool_on(model.device(), || model.forward(x, cache, logits))
}

/// `n_gen` decode steps under `constraint`, each as a generation runs them: one forward pass,
/// the grammar's mask and a greedy draw (on the logits' device when
/// [`crate::device::sample_on_device`] applies, else the logits copied to the CPU), the drawn
/// token fed next. When the grammar completes (an end-of-generation token is drawn) a fresh
/// grammar starts, so that every step is masked.
fn constrained_decode(
    m: &LoadedModel,
    cache: &mut KvCache,
    constraint: &Constraint,
    first: u32,
    n_gen: usize,
) -> Result<()> {
    let model = m.model.as_ref();
    let env = GrammarEnv::for_tokenizer(&m.tokenizer)?;
    let new_sampler = || -> Result<Sampler> {
        Ok(Sampler::new(SamplingParams::default())?
            .with_processor(Box::new(GrammarMask::new(env.clone(), constraint)?)))
    };
    let mut sampler = new_sampler()?;
    let mut id = first;
    for _ in 0..n_gen {
        let x = Tensor::new(&[id], model.device())?.unsqueeze(0)?;
        let l = forward(model, &x, cache, Logits::Last)?;
        id = match crate::device::sample_on_device(&mut sampler, &l, &[])? {
            Some(id) => id,
            None => {
                let l: Vec<f32> = l.squeeze(0)?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
                sampler.sample(&l, &[])
            }
        };
        if let Some(why) = sampler.failure() {
            return Err(crate::constrain::ConstraintError::Rejected(why).into());
        }
        if env.eos_tokens().contains(&id) {
            sampler = new_sampler()?;
        }
    }
    Ok(())
}

/// `n_gen` decode steps drawing each token with `params` as the token stepper does: on the
/// logits' device when [`crate::device::sample_on_device`] applies, else the logits copied
/// to the CPU and [`Sampler::sample`]; the drawn token is fed next, the history (the tokens fed
/// so far) feeds the repetition penalty.
fn sampled_decode(
    model: &dyn CausalLM,
    cache: &mut KvCache,
    params: &SamplingParams,
    first: u32,
    n_gen: usize,
) -> Result<()> {
    let mut sampler = Sampler::new(params.clone())?;
    let mut history = vec![first];
    let mut id = first;
    for _ in 0..n_gen {
        let x = Tensor::new(&[id], model.device())?.unsqueeze(0)?;
        let l = forward(model, &x, cache, Logits::Last)?;
        id = match crate::device::sample_on_device(&mut sampler, &l, &history)? {
            Some(id) => id,
            None => {
                let l: Vec<f32> = l.squeeze(0)?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
                sampler.sample(&l, &history)
            }
        };
        history.push(id);
    }
    Ok(())
}

/// The rows of a batched pass feeding `ids[i]` to the sequence of `caches[i]`.
fn one_token_rows<'a>(caches: &'a mut [KvCache], ids: &'a [u32]) -> Vec<BatchRow<'a>> {
    caches
        .iter_mut()
        .zip(ids)
        .map(|(cache, id)| BatchRow {
            ids: std::slice::from_ref(id),
            cache,
        })
        .collect()
}

/// `n_gen` decode steps of `caches.len()` sequences together: per step one
/// [`CausalLM::forward_batch`] of one token a sequence (sequence `i` feeds `ids[(step + i) %
/// len]`) and the greedy ids on the model's device, one copy back.
fn batched_decode(model: &dyn CausalLM, caches: &mut [KvCache], ids: &[u32]) -> Result<()> {
    for step in 0..ids.len() {
        let feed: Vec<u32> = (0..caches.len())
            .map(|i| ids[(step + i) % ids.len()])
            .collect();
        let mut rows = one_token_rows(caches, &feed);
        let l = crate::kernels::in_pool_on(model.device(), || model.forward_batch(&mut rows))?;
        l.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    }
    Ok(())
}

/// Runs the tests on a loaded model: for each depth, each prefill length, then each decode
/// length (and, with [`BenchParams::constraint`], that decode length again under the grammar,
/// see `constrained_decode`; with [`BenchParams::sampling`], again drawing with the sampler,
/// see `sampled_decode`; with [`BenchParams::batch`], again for each batch size, see
/// `batched_decode`). One untimed warm-up run precedes each test.
///
/// Errors: those of the model's forward pass (a depth plus test length beyond the model's
/// context is the model's error); with a constraint, [`crate::Error::Constraint`].
pub fn run(m: &LoadedModel, params: &BenchParams) -> Result<BenchReport> {
    let model = m.model.as_ref();
    let dev = model.device().clone();
    let vocab = model.info().vocab_size;
    let reps = params.repetitions.max(1);
    let mut tests = Vec::new();
    let mut kv_cache_bytes = 0;
    let mut tg_peak = None;
    let depths = if params.depth.is_empty() {
        &[0][..]
    } else {
        &params.depth[..]
    };
    // With `paged`, the prompt tests at a depth and the batched decode tests run again over
    // caches paged in a block pool.
    let layouts: &[bool] = if params.paged {
        &[false, true]
    } else {
        &[false]
    };
    for &depth in depths {
        let prompts = params.n_prompt.iter().filter(|&&n| n > 0);
        let prompt_layouts = if depth > 0 { layouts } else { &[false][..] };
        for (&n_prompt, &paged) in prompts.flat_map(|n| prompt_layouts.iter().map(move |p| (n, p)))
        {
            let ids = tokens(n_prompt, vocab);
            let input = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
            let mut samples = Vec::new();
            for rep in 0..=reps {
                let pool = match paged {
                    true => Some(paged_pool(model, &params.cache, 1, depth + n_prompt)?),
                    false => None,
                };
                let mut cache = cache_in(model, &params.cache, pool.as_ref(), depth, vocab)?;
                let t = Instant::now();
                let l = forward(model, &input, &mut cache, Logits::Last)?;
                l.to_dtype(candle_core::DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                if rep > 0 {
                    samples.push(n_prompt as f64 / t.elapsed().as_secs_f64());
                }
            }
            let mut r = TestResult::new("pp", n_prompt, depth, samples);
            if paged {
                r.name.push_str(" paged");
            }
            tests.push(r);
        }
        for &n_gen in params.n_gen.iter().filter(|&&n| n > 0) {
            let ids = tokens(n_gen, vocab);
            let mut samples = Vec::new();
            // As `generate` does after a prefill.
            memory::release_free_heap();
            memory::reset_peak();
            for rep in 0..=reps {
                let mut cache = cache_at(model, &params.cache, depth, vocab)?;
                let t = Instant::now();
                for &id in &ids {
                    let x = Tensor::new(&[id], &dev)?.unsqueeze(0)?;
                    let l = forward(model, &x, &mut cache, Logits::Last)?;
                    // As greedy decoding does: the argmax on the model's device, one id back.
                    crate::sampling::argmax_on_device(&l)?;
                }
                if rep > 0 {
                    samples.push(n_gen as f64 / t.elapsed().as_secs_f64());
                }
                kv_cache_bytes = cache.nbytes();
            }
            tg_peak = memory::snapshot().peak_resident_bytes;
            tests.push(TestResult::new("tg", n_gen, depth, samples));
            if let Some(c) = &params.constraint {
                let mut samples = Vec::new();
                for rep in 0..=reps {
                    let mut cache = cache_at(model, &params.cache, depth, vocab)?;
                    let t = Instant::now();
                    constrained_decode(m, &mut cache, c, ids[0], n_gen)?;
                    if rep > 0 {
                        samples.push(n_gen as f64 / t.elapsed().as_secs_f64());
                    }
                }
                let mut r = TestResult::new("tg", n_gen, depth, samples);
                r.name.push_str(" +grammar");
                tests.push(r);
            }
            if let Some(sp) = &params.sampling {
                let mut samples = Vec::new();
                for rep in 0..=reps {
                    let mut cache = cache_at(model, &params.cache, depth, vocab)?;
                    let t = Instant::now();
                    sampled_decode(model, &mut cache, sp, ids[0], n_gen)?;
                    if rep > 0 {
                        samples.push(n_gen as f64 / t.elapsed().as_secs_f64());
                    }
                }
                let mut r = TestResult::new("tg", n_gen, depth, samples);
                r.name.push_str(" +sampling");
                tests.push(r);
            }
            let batches = params.batch.iter().filter(|&&b| b > 1);
            for (&b, &paged) in batches.flat_map(|b| layouts.iter().map(move |p| (b, p))) {
                let mut samples = Vec::new();
                for rep in 0..=reps {
                    let pool = match paged {
                        true => Some(paged_pool(model, &params.cache, b, depth + n_gen)?),
                        false => None,
                    };
                    let mut caches = (0..b)
                        .map(|_| cache_in(model, &params.cache, pool.as_ref(), depth, vocab))
                        .collect::<Result<Vec<_>>>()?;
                    let t = Instant::now();
                    batched_decode(model, &mut caches, &ids)?;
                    if rep > 0 {
                        samples.push((b * n_gen) as f64 / t.elapsed().as_secs_f64());
                    }
                }
                let mut r = TestResult::new("tg", n_gen, depth, samples);
                r.name = match depth {
                    0 => format!("tg{n_gen} x{b}"),
                    _ => format!("tg{n_gen} x{b} @ d{depth}"),
                };
                if paged {
                    r.name.push_str(" paged");
                }
                r.n_tokens = b * n_gen;
                tests.push(r);
            }
        }
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
    let mut r = Agreement::new(prompt.len(), steps);
    for _ in 0..steps {
        let Some(ta) = r.observe(&la, &lb) else {
            break;
        };
        la = logits(a, &mut ca, &[ta])?;
        lb = logits(b, &mut cb, &[ta])?;
    }
    Ok(r)
}

impl Agreement {
    fn new(prompt_tokens: usize, steps: usize) -> Self {
        Self {
            prompt_tokens,
            steps,
            equal_steps: 0,
            max_abs_logit_diff: 0.0,
            max_abs_logit: 0.0,
            top2_gap_at_difference: None,
            tokens_a: Vec::new(),
            tokens_b: Vec::new(),
        }
    }

    /// Compares one step's logits (`la` the reference's): the reference's token when both
    /// choose it, `None` at the first difference (recorded with the reference's top-2 gap).
    fn observe(&mut self, la: &[f32], lb: &[f32]) -> Option<u32> {
        for (x, y) in la.iter().zip(lb) {
            self.max_abs_logit_diff = self.max_abs_logit_diff.max((x - y).abs());
            self.max_abs_logit = self.max_abs_logit.max(x.abs());
        }
        let (ta, tb) = (crate::sampling::argmax(la), crate::sampling::argmax(lb));
        self.tokens_a.push(ta);
        self.tokens_b.push(tb);
        if ta != tb {
            let second = la
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != ta as usize)
                .map(|(_, &v)| v)
                .fold(f32::NEG_INFINITY, f32::max);
            self.top2_gap_at_difference = Some(la[ta as usize] - second);
            return None;
        }
        self.equal_steps += 1;
        Some(ta)
    }
}

/// As [`compare_devices`] for several prompts at once, with `b`'s decode steps batched: each
/// prompt is prefilled alone on both models, then every step runs `a` once per prompt and `b`
/// once for all of them ([`CausalLM::forward_batch`], each row fed `a`'s token), comparing
/// each prompt's logits with `a`'s. A prompt past its first difference keeps being fed (so
/// the batch keeps its size) but is no longer compared. With `paged`, `b`'s caches are paged
/// in one [`crate::kv_pool::KvBlockPool`] on its device, sized for the prompts and steps
/// (f16 blocks on a GPU, what the fused CUDA step reads; f32 on the CPU), as a server with a
/// KV memory budget keeps them.
pub fn compare_batched(
    a: &dyn crate::models::CausalLM,
    b: &dyn crate::models::CausalLM,
    prompts: &[Vec<u32>],
    steps: usize,
    paged: bool,
) -> Result<Vec<Agreement>> {
    let cpu = |l: Tensor| -> Result<Vec<f32>> {
        Ok(l.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1()?)
    };
    let one = |m: &dyn crate::models::CausalLM, c: &mut KvCache, ids: &[u32]| -> Result<Vec<f32>> {
        let x = Tensor::new(ids, m.device())?.unsqueeze(0)?;
        cpu(m.forward(&x, c, Logits::Last)?)
    };
    let mut ca: Vec<KvCache> = prompts.iter().map(|_| a.new_cache()).collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pool = match paged {
        true => Some(paged_pool(
            b,
            &KvCacheConfig::default(),
            prompts.len(),
            longest + steps + 1,
        )?),
        false => None,
    };
    let mut cb: Vec<KvCache> = prompts
        .iter()
        .map(|_| {
            let mut c = b.new_cache();
            if let Some(pool) = &pool {
                c.page_into(pool);
            }
            c
        })
        .collect();
    let mut la = Vec::with_capacity(prompts.len());
    let mut lb = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        la.push(one(a, &mut ca[i], p)?);
        lb.push(one(b, &mut cb[i], p)?);
    }
    let mut out: Vec<Agreement> = prompts
        .iter()
        .map(|p| Agreement::new(p.len(), steps))
        .collect();
    let mut live = vec![true; prompts.len()];
    for _ in 0..steps {
        let mut feed = Vec::with_capacity(prompts.len());
        for i in 0..prompts.len() {
            let t = if live[i] {
                out[i].observe(&la[i], &lb[i])
            } else {
                None
            };
            live[i] &= t.is_some();
            feed.push(t.unwrap_or_else(|| crate::sampling::argmax(&la[i])));
        }
        if !live.iter().any(|&l| l) {
            break;
        }
        for i in 0..prompts.len() {
            la[i] = one(a, &mut ca[i], &[feed[i]])?;
        }
        let l = cpu(b.forward_batch(&mut one_token_rows(&mut cb, &feed))?)?;
        let vocab = l.len() / prompts.len();
        lb = l.chunks(vocab).map(<[f32]>::to_vec).collect();
    }
    Ok(out)
}
