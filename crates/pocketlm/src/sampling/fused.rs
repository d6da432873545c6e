//! The filter links of the [`super::Sampler`] chain and its draw, fused: what running
//! [`super::log_softmax`] (when top-p is on), [`super::apply_top_k`], [`super::apply_min_p`],
//! [`super::apply_top_p`], [`super::apply_temperature`] and the categorical draw one after the
//! other over the whole vocabulary computes, bit for bit, in fewer passes
//! ([`filter_and_draw`]).
//!
//! Before (issue #24, a 128,256-token vocabulary), the server's chain (temperature, top-k 40,
//! top-p, min-p, repetition penalty) made about fifteen scalar passes over the vocabulary per
//! token: copy, sanitize, three for the log-softmax, five for top-k (with a
//! `select_nth_unstable` of every value), two for min-p, four for top-p, the temperature, and
//! three for the draw. Here:
//!
//! - the copy and the sanitizing are one pass ([`copy_sanitized`]);
//! - when top-k binds (`k` < the tokens above `-inf`) or min-p is on, one pass finds the k-th
//!   largest logit (a buffer of at most `2k` values trimmed by `select_nth_unstable`, a chunk of
//!   16 skipped when none of it beats the current threshold), another collects the candidates
//!   (in id order, with their values), and every filter and the draw then run over the
//!   candidates only: the links keep a prefix of one ranking and measure masses against the
//!   whole vocabulary, so their results over the candidates equal their results over the
//!   vocabulary (see [`filter_and_draw`] for why the candidate set is large enough);
//! - the log-softmax normalizer is still a full-vocabulary `exp` pass when top-p is on (top-p
//!   and the log-probabilities need it), computed once; the log-probabilities themselves are
//!   only computed for the candidates;
//! - with no filter, the draw is one `exp` pass that also records the running sum every
//!   [`BLOCK`] tokens, so the inverse-CDF walk only re-reads one block.
//!
//! Exactness: the same f32 roundings, the same `exp` and the same sums in the same order as
//! the links, so the same seed draws the same ids (tests compare with the links one by one).
//! The log-sum-exp of the log-softmax ([`log_sum_exp`], shared with the link) uses a
//! vectorizable `exp` ([`exp_nonpositive`]); the few `exp`s over candidates and the no-filter
//! draw's pass use std's f32 `exp`. The other loops run over chunks of [`LANES`] f32 that the
//! compiler vectorizes.

use super::{apply_min_p, apply_temperature, categorical_draw, top_k_with, top_p_with};

/// Width of the chunks of the vectorizable loops (f32 values): 4 SSE or 2 AVX registers.
pub(super) const LANES: usize = 16;

/// Tokens between two saved running sums of the no-filter draw.
pub(super) const BLOCK: usize = 1024;

const NEG: f32 = f32::NEG_INFINITY;

/// The filter settings of a sampled (not greedy) chain, as the links of
/// [`super::Sampler::new`] apply them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Filters {
    /// Top-p in `(0, 1)`; `1`: off (and no log-softmax).
    pub top_p: f32,
    /// Top-k; `0`: off.
    pub top_k: usize,
    /// Min-p; `<= 0`: off.
    pub min_p: f32,
    /// Temperature `> 0`.
    pub temperature: f32,
}

/// Buffers reused across steps by [`filter_and_draw`].
#[derive(Debug, Default)]
pub(super) struct Scratch {
    /// The k-th largest search ([`kth_largest`]).
    select: Vec<f32>,
    /// Candidate ids, ascending.
    ids: Vec<u32>,
    /// Candidate values (logits or log-probabilities), in the order of `ids`.
    values: Vec<f32>,
    /// [`top_k_with`]'s scratch.
    top_k: Vec<f32>,
    /// [`top_p_with`]'s scratch.
    top_p: Vec<u32>,
    /// Running sums of the no-filter draw, one per [`BLOCK`].
    sums: Vec<f64>,
}

/// [`super::sanitize`] of one value: NaN to `-inf`, `+inf` to `f32::MAX`.
#[inline]
pub(super) fn sanitize_one(l: f32) -> f32 {
    if l.is_nan() {
        NEG
    } else if l == f32::INFINITY {
        f32::MAX
    } else {
        l
    }
}

/// `out = sanitize(logits)` (`[vocab]` f32) in one pass.
pub(super) fn copy_sanitized(logits: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend(logits.iter().map(|&l| sanitize_one(l)));
}

/// The largest value of `values` (NaN ignored); `-inf` when there is none above it.
pub(super) fn max_value(values: &[f32]) -> f32 {
    let mut lanes = [NEG; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            if v > *m {
                *m = v;
            }
        }
    }
    let mut m = NEG;
    for &v in lanes.iter().chain(chunks.remainder()) {
        if v > m {
            m = v;
        }
    }
    m
}

/// [`super::argmax`]: the lowest index of the largest value (NaN ignored), 0 when none is
/// above `-inf`. Two vectorizable passes: the maximum, then the first chunk holding it.
pub(super) fn argmax(values: &[f32]) -> u32 {
    let m = max_value(values);
    if m == NEG {
        return 0;
    }
    let mut base = 0;
    for c in values.chunks(LANES) {
        let mut any = false;
        for &v in c {
            any |= v == m;
        }
        if any {
            let i = c.iter().position(|&v| v == m).unwrap_or(0);
            return (base + i) as u32;
        }
        base += c.len();
    }
    0
}

/// `ln Σ exp(x)` over the entries of `values` above `-inf` (NaN ignored), `max` being their
/// maximum: `max + ln Σ exp(x - max)`, each term by [`exp_nonpositive`] (terms below `e^-86`
/// dropped), summed in f64 over [`LANES`] lanes (lane `j` takes the entries `j, j + 16, ...`),
/// the lanes then added in order. One vectorized pass; [`super::log_softmax`] and the fused
/// chain both use it, so they agree bit for bit.
///
/// Tolerance: each term is within 4e-7 (relative) of the exponential of the f32 difference
/// `x - max`, so the result is within 4e-7 (absolute) of what the log-softmax computed before
/// (issue #24: std's f32 `exp`, within 1e-7, summed in index order; tested). The log-probabilities
/// `(x - lse)` rounded to f32 can therefore differ from the old ones by one f32 step; a
/// seeded draw changes only when the uniform draw or a filter boundary falls within about
/// 1e-6 of a token's cumulative mass.
///
/// On x86-64 with AVX-512 or AVX2 the same loop is compiled for those (wider registers, the
/// same operations in the same order, no fused multiply-add: the same result).
pub(super) fn log_sum_exp(values: &[f32], max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { log_sum_exp_avx512(values, max) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { log_sum_exp_avx2(values, max) };
        }
    }
    log_sum_exp_lanes(values, max)
}

/// [`log_sum_exp`] compiled for AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn log_sum_exp_avx512(values: &[f32], max: f32) -> f64 {
    log_sum_exp_lanes(values, max)
}

/// [`log_sum_exp`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn log_sum_exp_avx2(values: &[f32], max: f32) -> f64 {
    log_sum_exp_lanes(values, max)
}

/// The loop of [`log_sum_exp`].
#[inline(always)]
fn log_sum_exp_lanes(values: &[f32], max: f32) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for (acc, &l) in lanes.iter_mut().zip(c) {
            *acc += f64::from(exp_term(l - max));
        }
    }
    let mut sum = 0.0f64;
    for acc in lanes {
        sum += acc;
    }
    for &l in chunks.remainder() {
        sum += f64::from(exp_term(l - max));
    }
    f64::from(max) + sum.ln()
}

/// `exp(d)` for `d <= 0` as a term of [`log_sum_exp`]: 0 below -86 (and for NaN or `-inf`).
#[inline(always)]
fn exp_term(d: f32) -> f32 {
    if d >= -86.0 {
        exp_nonpositive(d)
    } else {
        0.0
    }
}

/// `e^x` in f32 for `x` in `[-86, 0]`, branch-free so that a loop of it vectorizes:
/// `x = n·ln2 + r` with `n = round(x / ln2)` (by adding `1.5·2^23`) and `|r| <= ln2 / 2`
/// (`ln2` split in two so that `n·LN2_HI` is exact, Cody and Waite), `e^r` by its Taylor
/// polynomial of degree 7 (truncation below 6e-9 relative), times `2^n` by adding `n` to the
/// exponent bits. Relative error below 4e-7 over the range (tested against f64 `exp`; 1e-7
/// measured). Outside the range the result is meaningless.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // 0x3f318000: 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 - LN2_HI
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let n_bits = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    f32::from_bits((p.to_bits() as i32).wrapping_add(n_bits << 23) as u32)
}

/// A log-probability as [`super::log_softmax`] rounds it: `(x - lse)` in f64, then f32.
#[inline]
fn log_prob(x: f32, lse: f64) -> f32 {
    (f64::from(x) - lse) as f32
}

/// A logit `c` below which no log-probability reaches `t`: `log_prob(x, lse) >= t` implies
/// `x >= c`. The margin, `(1 + |t| + |lse|)·2^-16`, is far above the roundings involved (the
/// f64 subtraction, the f32 roundings of `x - lse` and of `c`, each at most
/// `(|t| + |lse| + margin)·2^-24`), so the bound holds; it only makes the candidate set a few
/// tokens larger than needed.
fn logit_bound(t: f32, lse: f64) -> f32 {
    let t = f64::from(t);
    let margin = (1.0 + t.abs() + lse.abs()) * (-16f64).exp2();
    (t + lse - margin) as f32
}

/// The `k`-th largest (`k >= 1`, counted with multiplicity) of the entries of `values` above
/// `-inf`; `None` when there are `k` or fewer (top-k then keeps them all). One pass: a buffer
/// holds the largest values seen, trimmed to `k` by `select_nth_unstable` whenever it reaches
/// `max(2k, 64)`; after a trim only values above the k-th largest so far can change the
/// answer, and a chunk of [`LANES`] with none is skipped by one vectorized compare.
pub(super) fn kth_largest(values: &[f32], k: usize, buf: &mut Vec<f32>) -> Option<f32> {
    debug_assert!(k >= 1);
    let cap = (2 * k).max(64);
    buf.clear();
    let mut threshold = NEG;
    let mut trimmed = false;
    let desc = |a: &f32, b: &f32| b.total_cmp(a);
    let mut take = |v: f32, threshold: &mut f32, buf: &mut Vec<f32>| {
        if v > *threshold {
            buf.push(v);
            if buf.len() >= cap {
                buf.select_nth_unstable_by(k - 1, desc);
                buf.truncate(k);
                *threshold = buf[k - 1];
                trimmed = true;
            }
        }
    };
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        let mut any = false;
        for &v in c {
            any |= v > threshold;
        }
        if any {
            for &v in c {
                take(v, &mut threshold, buf);
            }
        }
    }
    for &v in chunks.remainder() {
        take(v, &mut threshold, buf);
    }
    if !trimmed && buf.len() <= k {
        return None;
    }
    let (_, kth, _) = buf.select_nth_unstable_by(k - 1, desc);
    Some(*kth)
}

/// Appends to `ids` (ascending) the indices of `values` at or above `c` (and above `-inf`)
/// and to `out` their values mapped by `f`.
fn collect_at_least(
    values: &[f32],
    c: f32,
    ids: &mut Vec<u32>,
    out: &mut Vec<f32>,
    f: impl Fn(f32) -> f32,
) {
    let mut base = 0u32;
    for chunk in values.chunks(LANES) {
        let mut any = false;
        for &v in chunk {
            any |= v >= c;
        }
        if any {
            for (i, &v) in chunk.iter().enumerate() {
                if v >= c && v > NEG {
                    ids.push(base + i as u32);
                    out.push(f(v));
                }
            }
        }
        base += chunk.len() as u32;
    }
}

/// The filter links and the draw of a sampled chain over `x` (`[vocab]` f32: the logits after
/// the sanitize link and the logit processors; NaN counts as `-inf`), with the uniform draw
/// from `draw` (called once, only when something is drawable). `x` is overwritten. Returns the
/// id that running the links one by one and then [`super::categorical`] with the same draw
/// returns (0 when nothing is above `-inf`).
///
/// With `v` the values the filters see (the logits, or their log-probabilities when top-p is
/// on, which keep the order of the logits), the candidates are the ids with `x >= c`:
/// - top-k binding: `c` is the k-th largest logit `X_k` (minus [`logit_bound`]'s margin on
///   log-probabilities). Every token with `v` at or above the k-th largest `v` then is a
///   candidate, so top-k over the candidates keeps the same tokens, ties included;
/// - min-p: `c` is the min-p threshold (`max + ln(min_p)`, on log-probabilities through
///   [`logit_bound`]), so every token min-p keeps is a candidate;
/// - both: the larger `c`. If it is min-p's, the tokens it leaves out fail min-p, and the
///   min-p survivors are a prefix of the ranking inside the candidates as in the vocabulary,
///   so top-k then min-p keep the same tokens.
///
/// Top-p, the temperature and the draw then see the same surviving values in the same id
/// order as over the vocabulary (the others are `-inf` there, which they skip), so they give
/// the same result. Without top-k or min-p, top-p runs over the vocabulary and the draw over
/// its survivors; with no filter at all the draw is one fused pass ([`draw_all`]).
pub(super) fn filter_and_draw(
    x: &mut [f32],
    f: &Filters,
    s: &mut Scratch,
    draw: impl FnOnce() -> f64,
) -> u32 {
    let max = max_value(x);
    if max == NEG {
        // Every link leaves an all `-inf` vector as it is; the draw falls back to index 0.
        return 0;
    }
    let top_p_on = f.top_p < 1.0;
    let lse = if top_p_on { log_sum_exp(x, max) } else { 0.0 };
    let to_v = |l: f32| if top_p_on { log_prob(l, lse) } else { l };
    let min_p_on = f.min_p > 0.0;
    let mut c = NEG;
    let mut restricted = false;
    if f.top_k > 0 {
        if let Some(kth) = kth_largest(x, f.top_k, &mut s.select) {
            restricted = true;
            c = if top_p_on {
                logit_bound(log_prob(kth, lse), lse)
            } else {
                kth
            };
        }
    }
    if min_p_on {
        restricted = true;
        // As `apply_min_p`: the largest value plus `ln(min_p)` in f32.
        let threshold = to_v(max) + f.min_p.ln();
        let cp = if top_p_on {
            logit_bound(threshold, lse)
        } else {
            threshold
        };
        c = c.max(cp);
    }
    s.ids.clear();
    s.values.clear();
    if restricted {
        collect_at_least(x, c, &mut s.ids, &mut s.values, to_v);
        top_k_with(&mut s.values, f.top_k, &mut s.top_k);
        apply_min_p(&mut s.values, f.min_p);
        if top_p_on {
            top_p_with(&mut s.values, f.top_p, &mut s.top_p);
        }
    } else if top_p_on {
        for l in x.iter_mut() {
            *l = log_prob(*l, lse);
        }
        top_p_with(x, f.top_p, &mut s.top_p);
        collect_at_least(x, f32::MIN, &mut s.ids, &mut s.values, |v| v);
    } else {
        return draw_all(x, f.temperature, &mut s.sums, draw);
    }
    apply_temperature(&mut s.values, f.temperature);
    let i = categorical_draw(&mut s.values, draw);
    s.ids.get(i as usize).copied().unwrap_or(0)
}

/// [`super::apply_temperature`] then the categorical draw over all of `x` (`[vocab]`, no
/// filter), fused: one pass writes the weights `exp(x/T - max/T)` (f32) and their f64 sum in
/// index order, saving the running sum every [`BLOCK`] tokens into `sums`; the inverse-CDF
/// walk then starts at the block where the running sum passes the target. The running sums
/// are the very ones the walk of [`super::categorical`] computes (adding a weight 0 changes
/// no sum), so it returns the same id.
fn draw_all(
    x: &mut [f32],
    temperature: f32,
    sums: &mut Vec<f64>,
    draw: impl FnOnce() -> f64,
) -> u32 {
    let scaled = !(temperature.is_nan() || temperature <= 0.0 || temperature == 1.0);
    let inv = 1.0 / temperature;
    let scale = |l: f32| if scaled { l * inv } else { l };
    // The largest scaled value is the scaled largest value (rounding is monotone).
    let max = scale(max_value(x));
    sums.clear();
    let mut total = 0.0f64;
    for block in x.chunks_mut(BLOCK) {
        for l in block.iter_mut() {
            let v = scale(*l);
            *l = if v > NEG { (v - max).exp() } else { 0.0 };
            total += f64::from(*l);
        }
        sums.push(total);
    }
    if !(total > 0.0 && total.is_finite()) {
        // An overflowing scale (`+inf - +inf`): the fallback of the draw, the first largest
        // scaled value, from the weights' NaN (`+inf` values) or, failing that, index 0.
        return x.iter().position(|w| w.is_nan()).unwrap_or(0) as u32;
    }
    let target = draw() * total;
    let Some(b) = sums.iter().position(|&s| target < s) else {
        // Rounding left `target` at the very end: the last drawable index.
        return x.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32;
    };
    let mut acc = if b == 0 { 0.0f64 } else { sums[b - 1] };
    let start = b * BLOCK;
    let end = (start + BLOCK).min(x.len());
    let mut last = start;
    for (i, &w) in x[start..end].iter().enumerate() {
        if w > 0.0 {
            acc += f64::from(w);
            last = start + i;
            if target < acc {
                return last as u32;
            }
        }
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn exp_nonpositive_is_within_4e7_of_exp() {
        let mut worst = 0.0f64;
        let mut x = -86.0f32;
        while x <= 0.0 {
            for d in [0.0f32, 1e-7, 3.3e-4, 0.1234567] {
                let y = (x + d).min(0.0);
                let want = f64::from(y).exp();
                let err = ((f64::from(exp_nonpositive(y)) - want) / want).abs();
                worst = worst.max(err);
            }
            x += 0.000_97;
        }
        assert!(worst < 4e-7, "{worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_term(NEG), 0.0);
        assert_eq!(exp_term(f32::NAN), 0.0);
        assert_eq!(exp_term(-86.5), 0.0);
        eprintln!("exp_nonpositive: worst relative error {worst:e}");
    }

    #[test]
    fn log_sum_exp_is_close_to_f64() {
        let mut rng = StdRng::seed_from_u64(21);
        for n in [1usize, 15, 16, 17, 1000, 50_000] {
            let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-30.0f32..10.0)).collect();
            if n > 1 {
                v[0] = NEG;
            }
            let max = max_value(&v);
            // What the log-softmax computed before: std's f32 `exp` summed in index order.
            let want = f64::from(max)
                + v.iter()
                    .filter(|l| **l > NEG)
                    .map(|&l| f64::from((l - max).exp()))
                    .sum::<f64>()
                    .ln();
            let got = log_sum_exp(&v, max);
            assert!((got - want).abs() < 4e-7, "n {n}: {got} vs {want}");
        }
    }

    #[test]
    fn kth_largest_matches_a_sort() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut buf = Vec::new();
        for trial in 0..200 {
            let n = [1usize, 15, 16, 17, 100, 1000, 5000][trial % 7];
            let mut v: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..20) {
                    0 => NEG,
                    1 => f32::NAN,
                    2 => 0.5,
                    _ => rng.random_range(-5.0f32..5.0),
                })
                .collect();
            if trial % 5 == 0 {
                v.sort_by(f32::total_cmp); // ascending: every value beats the threshold
            }
            let mut finite: Vec<f32> = v.iter().copied().filter(|x| *x > NEG).collect();
            finite.sort_by(|a, b| b.total_cmp(a));
            for k in [1usize, 2, 7, 40, 64, 65, 500] {
                let want = (finite.len() > k).then(|| finite[k - 1]);
                assert_eq!(kth_largest(&v, k, &mut buf), want, "n {n} k {k}");
            }
        }
    }

    #[test]
    fn argmax_and_max_match_a_scan() {
        let mut rng = StdRng::seed_from_u64(9);
        for n in [0usize, 1, 15, 16, 33, 1000] {
            for _ in 0..20 {
                let v: Vec<f32> = (0..n)
                    .map(|_| match rng.random_range(0..10) {
                        0 => f32::NAN,
                        1 => NEG,
                        _ => rng.random_range(0..8) as f32,
                    })
                    .collect();
                let mut best = 0;
                let mut best_value = NEG;
                for (i, &x) in v.iter().enumerate() {
                    if x > best_value {
                        best = i;
                        best_value = x;
                    }
                }
                assert_eq!(argmax(&v), best as u32, "{v:?}");
                assert_eq!(max_value(&v), best_value);
            }
        }
    }

    #[test]
    fn logit_bound_keeps_every_token_reaching_the_log_probability() {
        let mut rng = StdRng::seed_from_u64(13);
        for _ in 0..2000 {
            let lse: f64 = rng.random_range(-50.0..200.0);
            let x: f32 = rng.random_range(-300.0f32..300.0);
            let t = log_prob(x, lse);
            let c = logit_bound(t, lse);
            // Every logit near `x` whose log-probability reaches `t` is at or above the bound.
            for ulps in -64i32..=64 {
                let y = f32::from_bits(x.to_bits().wrapping_add_signed(ulps));
                if y.is_finite() && log_prob(y, lse) >= t {
                    assert!(y >= c, "x {x} y {y} lse {lse} c {c}");
                }
            }
            assert!(c < x && x - c < 1e-2 * (1.0 + x.abs() + lse.abs() as f32));
        }
    }
}
