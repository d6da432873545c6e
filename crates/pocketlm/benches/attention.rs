//! Benchmark of CPU prefill attention ([`pocketlm::kernels::float::attention`]) on Llama 3
//! shapes: 512 queries, 32 query heads over 8 kv heads, head_dim 64 (Llama-3.2-1B) and 128
//! (Llama-3.1-8B), at depth 0 (the prompt alone: 512 keys, ggml's exact-order row kernel) and
//! at depth 4096 (4,608 keys: the tiled kernel), plus one decode-like row of 1 query.
//!
//! Run: `cargo bench -p pocketlm --bench attention` (add a case name such as `d64` or
//! `depth4096` to run only the cases whose name contains it). Threads: rayon's global pool
//! (`RAYON_NUM_THREADS`, all cores by default). Each row prints the best and the median time
//! of one call and GFLOP/s of the best, counting `4 · heads · head_dim` flops per visible
//! (query, key) pair (`q·k` and `p·v`, one multiply and one add each; the causal triangle's
//! hidden pairs are not counted). Numbers are noisy when other processes share the cores.

use std::hint::black_box;
use std::time::{Duration, Instant};

use pocketlm::kernels::float::{attention, AttentionShape};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Best and median of timed runs of `f`: at least `min_runs`, and until `budget` has passed.
fn time<F: FnMut()>(mut f: F, min_runs: usize, budget: Duration) -> (Duration, Duration) {
    f(); // warm-up
    let mut v = Vec::new();
    let start = Instant::now();
    while v.len() < min_runs || (start.elapsed() < budget && v.len() < 10_000) {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    v.sort();
    (v[0], v[v.len() / 2])
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    println!(
        "pocketlm CPU attention, {} rayon threads",
        rayon::current_num_threads()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>9}",
        "case", "best", "median", "GFLOP/s"
    );
    let mut rng = StdRng::seed_from_u64(7);
    // (heads, kv_heads, head_dim, queries, depth)
    let cases = [
        (32, 8, 64, 512, 0),
        (32, 8, 64, 512, 4096),
        (32, 8, 128, 512, 0),
        (32, 8, 128, 512, 4096),
        (32, 8, 64, 1, 4096),
    ];
    for (heads, kv_heads, d, queries, depth) in cases {
        let name = format!("h{heads}/{kv_heads} d{d} q{queries} depth{depth}");
        if !args.is_empty() && !args.iter().any(|a| name.contains(a.as_str())) {
            continue;
        }
        let kv_len = depth + queries;
        let shape = AttentionShape {
            heads,
            kv_heads,
            queries,
            kv_len,
            head_dim: d,
            kv_head_stride: kv_len * d,
        };
        let mut vals =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let q = vals(heads * queries * d);
        let k = vals(kv_heads * kv_len * d);
        let v = vals(kv_heads * kv_len * d);
        let mut out = vec![0f32; heads * queries * d];
        let scale = 1.0 / (d as f32).sqrt();
        let (best, median) = time(
            || {
                attention(
                    black_box(&q),
                    &k,
                    &v,
                    shape,
                    scale,
                    None,
                    None,
                    None,
                    &mut out,
                );
                black_box(&out);
            },
            5,
            Duration::from_secs(3),
        );
        // Visible pairs: query t (at position depth + t) sees depth + t + 1 keys.
        let pairs = (queries * depth + queries * (queries + 1) / 2) as f64;
        let flops = 4.0 * (heads * d) as f64 * pairs;
        println!(
            "{:<28} {:>7.2} ms {:>7.2} ms {:>9.1}",
            name,
            best.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e3,
            flops / best.as_secs_f64() / 1e9
        );
    }
}
