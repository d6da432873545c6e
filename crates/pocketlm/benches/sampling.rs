//! Benchmark of the CPU sampling chain ([`pocketlm::sampling::Sampler::sample`]) on a Llama 3
//! sized vocabulary (128,256 tokens), one case per chain shape:
//!
//! - `greedy`: temperature 0 (argmax);
//! - `temp`: temperature 0.7, no filter;
//! - `temp+top_p`: top-p 0.9;
//! - `temp+top_p+top_k`: top-p 0.9, top-k 40;
//! - `temp+top_p+top_k+min_p`: top-p 0.9, top-k 40, min-p 0.05;
//! - `server`: the server's defaults for a request that sends only a temperature
//!   ([`SamplingParams::recommended`] with temperature 0.7: top-k 40, top-p 0.95, min-p 0.05,
//!   repetition penalty 1.1 over 64 tokens), what `scripts/loadtest.py` runs;
//! - `temp+top_k`: top-k 40 only;
//! - `temp+min_p`: min-p 0.05 only.
//!
//! Run: `cargo bench -p pocketlm --bench sampling` (add a case name, e.g. `-- server`, to run
//! only the cases whose name contains it). The logits are N(0, 2) with a few peaks (+10 to
//! +14, as a model's confident next tokens); 4 such vectors are sampled in turn. Each row
//! prints the best and the median time per token (one `sample` call) over batches of 64
//! calls, and a checksum of the ids drawn (fixed seed) so that two builds can be compared for
//! identical draws. Numbers are noisy when other processes share the cores.

use std::hint::black_box;
use std::time::{Duration, Instant};

use pocketlm::sampling::{Sampler, SamplingParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VOCAB: usize = 128_256;
const VECTORS: usize = 4;
const BATCH: usize = 64;

/// `n` logits drawn from N(0, 2) (standard deviation 2, Box-Muller), with 6 peaks.
fn logits(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            let u2: f64 = rng.random();
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (2.0 * z) as f32
        })
        .collect();
    for _ in 0..6 {
        let i = rng.random_range(0..n);
        v[i] = rng.random_range(10.0f32..14.0);
    }
    v
}

fn main() {
    let filter: Option<String> = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-') && a != "bench");
    let mut rng = StdRng::seed_from_u64(2024);
    let inputs: Vec<Vec<f32>> = (0..VECTORS).map(|_| logits(&mut rng, VOCAB)).collect();
    let history: Vec<u32> = (0..200)
        .map(|_| rng.random_range(0..VOCAB as u32))
        .collect();
    let t = |temperature: f32| SamplingParams {
        temperature,
        seed: Some(7),
        ..SamplingParams::default()
    };
    let cases: Vec<(&str, SamplingParams)> = vec![
        ("greedy", t(0.0)),
        ("temp", t(0.7)),
        (
            "temp+top_p",
            SamplingParams {
                top_p: 0.9,
                ..t(0.7)
            },
        ),
        (
            "temp+top_p+top_k",
            SamplingParams {
                top_p: 0.9,
                top_k: 40,
                ..t(0.7)
            },
        ),
        (
            "temp+top_p+top_k+min_p",
            SamplingParams {
                top_p: 0.9,
                top_k: 40,
                min_p: 0.05,
                ..t(0.7)
            },
        ),
        (
            "server",
            SamplingParams {
                temperature: 0.7,
                seed: Some(7),
                ..SamplingParams::recommended()
            },
        ),
        (
            "temp+top_k",
            SamplingParams {
                top_k: 40,
                ..t(0.7)
            },
        ),
        (
            "temp+min_p",
            SamplingParams {
                min_p: 0.05,
                ..t(0.7)
            },
        ),
    ];
    println!(
        "sampling benchmark: vocabulary {VOCAB}, N(0, 2) logits with 6 peaks, {VECTORS} vectors"
    );
    println!(
        "{:<24} {:>12} {:>12} {:>18}",
        "case", "best ns/tok", "median", "ids checksum"
    );
    for (name, params) in cases {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        // The checksum: 256 seeded draws, cycling through the inputs.
        let mut s = Sampler::new(params.clone()).expect("valid parameters");
        let mut sum = 0u64;
        for i in 0..256 {
            let id = s.sample(&inputs[i % VECTORS], &history);
            sum = sum.wrapping_mul(1_000_003).wrapping_add(u64::from(id));
        }
        let mut s = Sampler::new(params).expect("valid parameters");
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 5 || (start.elapsed() < Duration::from_secs(3) && times.len() < 500) {
            let t0 = Instant::now();
            for i in 0..BATCH {
                black_box(s.sample(black_box(&inputs[i % VECTORS]), &history));
            }
            times.push(t0.elapsed().as_nanos() as f64 / BATCH as f64);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{name:<24} {:>12.0} {:>12.0} {sum:>18x}",
            times[0],
            times[times.len() / 2]
        );
    }
}
