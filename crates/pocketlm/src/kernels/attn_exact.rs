//! ggml's exact-order attention rows ([`super::float::attention`] below the tiled kernel's
//! thresholds) with AVX-512 register tiles: the same IEEE operations in the same order as the
//! portable `attention_block` of `float.rs` (which stays the reference and the path of other
//! CPUs), so the same bits, only computed for 4 rows at a time so that every load of a key
//! or a value feeds 4 rows (the 4 query heads of a kv head at one query, under Llama 3's
//! grouped-query attention) instead of one.
//!
//! Per block of 16 keys (one block of [`transpose_keys`]) and 4 rows, the scores are
//! `ggml_vec_dot_f32`'s: lane `l` of accumulator `g` chains the products of components
//! `64s + 16g + l`, `v_l = (a0 + a2) + (a1 + a3)`, the 16 `v_l` reduced in the order of
//! [`reduce_add16`] (`q_i = (v_i + v_{i+8}) + (v_{i+4} + v_{i+12})`,
//! `(q_0 + q_2) + (q_1 + q_3)`), then the components after the last 64 one by one, with the 16
//! keys as the vector lanes. The softmax is [`softmax_scaled_sink`]'s, 16 values a vector.
//! The product with the values follows `tinyBLAS`: slot `s` sums `p_j · v_j` over
//! `j ≡ s (mod 16)` in order, the 16 slots reduced as [`reduce_add16`]; a row's slots run
//! past its last visible key with `p_j = 0` up to the last of its tile's rows, which adds
//! exact zeros (ggml's product runs over the whole padded cache the same way).
//!
//! [`transpose_keys`]: super::float::transpose_keys
//! [`reduce_add16`]: super::float::reduce_add16
//! [`softmax_scaled_sink`]: super::float::softmax_scaled_sink

use std::arch::x86_64::*;

use super::float::{expf, AttentionShape, LANES};

/// Rows per register tile.
const R: usize = 4;

/// Whether [`block`] takes a pass with this head dimension and query count on this CPU
/// (AVX-512F and FMA, `head_dim` a multiple of 16, more than one query: one query takes
/// ggml's 64-slot order for the values, which this kernel does not implement).
pub(super) fn applies(head_dim: usize, queries: usize) -> bool {
    head_dim > 0
        && head_dim.is_multiple_of(LANES)
        && queries > 1
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("fma")
}

/// `attention_block` of `float.rs` with AVX-512 tiles (see the module doc): the query heads of
/// kv head `kh` at queries `ts`, written to `out` (`[queries, heads, head_dim]`).
///
/// # Safety
/// The CPU has AVX-512F and FMA and [`applies`] holds for the shape; `kt` is
/// `transpose_keys(k, shape)`; `q`, `v`, `sinks` hold their shapes (checked by `attention`);
/// `out` is valid for the rows `(t, h)` of the block and no other thread writes them.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    shape: &AttentionShape,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    kh: usize,
    ts: std::ops::Range<usize>,
    out: *mut f32,
) {
    let AttentionShape {
        heads,
        kv_heads,
        queries,
        kv_len,
        head_dim: d,
        kv_head_stride: hs,
    } = *shape;
    let rep = heads / kv_heads;
    let offset = kv_len - queries;
    // Rows `(t, h)`, query-major (a tile of 4 is often one query's heads: one mask).
    let rows: Vec<(usize, usize)> = ts
        .clone()
        .flat_map(|t| (kh * rep..(kh + 1) * rep).map(move |h| (t, h)))
        .collect();
    let n = rows.len();
    let tiles = n.div_ceil(R);
    let pos = |r: usize| offset + rows[r.min(n - 1)].0;
    let first = |r: usize| window.map_or(0, |w| (pos(r) + 1).saturating_sub(w));
    // The scores `attention_block` keeps per row: up to the end of the last visible block.
    let len = |r: usize| ((pos(r) + 1).div_ceil(LANES) * LANES).min(kv_len);
    let stride = (0..n).map(len).max().unwrap_or(0).div_ceil(LANES) * LANES;
    // Rows of probabilities: `-inf` where no score is written, zeros past `len` and in the
    // padding rows of the last tile.
    let mut p = vec![0f32; tiles * R * stride];
    for r in 0..n {
        p[r * stride..][..len(r)].fill(f32::NEG_INFINITY);
    }
    let qrow = |r: usize| {
        let (t, h) = rows[r.min(n - 1)];
        q[(h * queries + t) * d..][..d].as_ptr()
    };
    let blocks = kv_len.div_ceil(LANES);
    let kt = &kt[kh * blocks * d * LANES..][..blocks * d * LANES];
    let lo_all = (0..n).map(first).min().unwrap_or(0) / LANES;
    let hi_all = (0..n).map(pos).max().unwrap_or(0) / LANES;
    let pp = p.as_mut_ptr();
    for b in lo_all..=hi_all {
        let kb = kt[b * d * LANES..][..d * LANES].as_ptr();
        for tile in 0..tiles {
            let rs = tile * R..((tile + 1) * R).min(n);
            if rs
                .clone()
                .all(|r| b < first(r) / LANES || b > pos(r) / LANES)
            {
                continue;
            }
            let qs: [*const f32; R] = std::array::from_fn(|i| qrow(tile * R + i));
            // SAFETY: the rows hold `d` values and the block `16·d` (the caller's shapes).
            let s = unsafe {
                match d {
                    64 => scores(qs, kb, 64),
                    128 => scores(qs, kb, 128),
                    _ => scores(qs, kb, d),
                }
            };
            for r in rs {
                let (lo, hi) = (first(r) as i64 - (b * LANES) as i64, pos(r) + 1 - b * LANES);
                let (lo, hi) = (lo.clamp(0, LANES as i64) as u32, hi.min(LANES) as u32);
                if lo >= hi {
                    continue;
                }
                let mask = (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as __mmask16;
                // SAFETY: `b·16 + 16 <= stride` (`len(r) > b·16` as `pos(r) >= b·16`).
                unsafe {
                    _mm512_mask_storeu_ps(pp.add(r * stride + b * LANES), mask, s[r % R]);
                }
            }
        }
    }
    for (r, &(_, h)) in rows.iter().enumerate() {
        let row = &mut p[r * stride..][..len(r)];
        let sm = match softcap {
            // As `attention_block`: the cap on the scaled scores, then a softmax of scale 1.
            Some(c) => {
                let inv = 1.0 / c;
                for pj in row.iter_mut().take(pos(r) + 1).skip(first(r)) {
                    *pj = (*pj * scale * inv).tanh() * c;
                }
                1.0
            }
            None => scale,
        };
        // SAFETY: AVX-512F and FMA (this function's features).
        unsafe { softmax(row, sm, sinks.map(|s| s[h])) };
    }
    let vv = &v[kh * hs..][..kv_len * d];
    let mut slots = vec![0f32; R * LANES * d];
    for tile in 0..tiles {
        let rs = tile * R..((tile + 1) * R).min(n);
        let end = rs.clone().map(|r| pos(r) + 1).max().unwrap_or(0);
        let prow: [*const f32; R] = std::array::from_fn(|i| p[(tile * R + i) * stride..].as_ptr());
        for s in 0..LANES {
            let mut c0 = 0;
            while c0 < d {
                let nv = ((d - c0) / LANES).min(4);
                // SAFETY: `end <= stride` and `end <= kv_len`; `c0 + 16·nv <= d`; `slots`
                // holds `R` rows of 16 slots of `d`.
                unsafe {
                    let (vp, dst) = (vv.as_ptr().add(c0), slots.as_mut_ptr().add(s * d + c0));
                    match nv {
                        1 => slot::<1>(prow, vp, d, s, end, dst, LANES * d),
                        2 => slot::<2>(prow, vp, d, s, end, dst, LANES * d),
                        3 => slot::<3>(prow, vp, d, s, end, dst, LANES * d),
                        _ => slot::<4>(prow, vp, d, s, end, dst, LANES * d),
                    }
                }
                c0 += nv * LANES;
            }
        }
        for r in rs {
            let (t, h) = rows[r];
            let acc = &slots[(r % R) * LANES * d..][..LANES * d];
            // SAFETY: row `(t, h)` belongs to this block (the caller's guarantee); `acc`
            // holds 16 slots of `d`, a multiple of 16.
            unsafe {
                let o = out.add((t * heads + h) * d);
                for c in (0..d).step_by(LANES) {
                    let a = acc.as_ptr().add(c);
                    let mut hh = [_mm512_setzero_ps(); 8];
                    for (i, x) in hh.iter_mut().enumerate() {
                        *x = _mm512_add_ps(
                            _mm512_loadu_ps(a.add(i * d)),
                            _mm512_loadu_ps(a.add((i + 8) * d)),
                        );
                    }
                    let mut q4 = [_mm512_setzero_ps(); 4];
                    for (i, x) in q4.iter_mut().enumerate() {
                        *x = _mm512_add_ps(hh[i], hh[i + 4]);
                    }
                    let x = _mm512_add_ps(_mm512_add_ps(q4[0], q4[2]), _mm512_add_ps(q4[1], q4[3]));
                    _mm512_storeu_ps(o.add(c), x);
                }
            }
        }
    }
}

/// The scores of the `R` rows `qs` (`d` values each) against one block of 16 keys `kb`
/// (`[d][16]`), in `ggml_vec_dot_f32`'s order (see the module doc): one vector of 16 keys per
/// row.
///
/// # Safety
/// The CPU has AVX-512F and FMA; each `qs[i]` points at `d` values and `kb` at `16·d`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn scores(qs: [*const f32; R], kb: *const f32, d: usize) -> [__m512; R] {
    let np = d / (4 * LANES) * (4 * LANES);
    let zero = _mm512_setzero_ps();
    // q4[i][r] = (v_i + v_{i+8}) + (v_{i+4} + v_{i+12}) of row r.
    let mut q4 = [[zero; R]; 4];
    for i in [0, 2, 1, 3] {
        let mut v = [[zero; R]; 4];
        for (vx, l) in v.iter_mut().zip([i, i + 8, i + 4, i + 12]) {
            // `v_l`: chains over the 64-value steps, then `(a0 + a2) + (a1 + a3)`.
            let mut a = [[zero; 4]; R];
            for step in (0..np).step_by(4 * LANES) {
                for g in 0..4 {
                    let c = step + g * LANES + l;
                    // SAFETY: `c < d` (the caller's bounds).
                    unsafe {
                        let kv = _mm512_loadu_ps(kb.add(c * LANES));
                        for (ar, qr) in a.iter_mut().zip(&qs) {
                            ar[g] = _mm512_fmadd_ps(_mm512_set1_ps(*qr.add(c)), kv, ar[g]);
                        }
                    }
                }
            }
            for (x, ar) in vx.iter_mut().zip(&a) {
                *x = _mm512_add_ps(_mm512_add_ps(ar[0], ar[2]), _mm512_add_ps(ar[1], ar[3]));
            }
        }
        for r in 0..R {
            q4[i][r] = _mm512_add_ps(
                _mm512_add_ps(v[0][r], v[1][r]),
                _mm512_add_ps(v[2][r], v[3][r]),
            );
        }
    }
    let mut o = [zero; R];
    for (r, or) in o.iter_mut().enumerate() {
        *or = _mm512_add_ps(
            _mm512_add_ps(q4[0][r], q4[2][r]),
            _mm512_add_ps(q4[1][r], q4[3][r]),
        );
    }
    for c in np..d {
        // SAFETY: `c < d`.
        unsafe {
            let kv = _mm512_loadu_ps(kb.add(c * LANES));
            for (or, qr) in o.iter_mut().zip(&qs) {
                *or = _mm512_fmadd_ps(_mm512_set1_ps(*qr.add(c)), kv, *or);
            }
        }
    }
    o
}

/// Slot `s` of the `R` rows `p` over the values `vp` (rows `d` apart, `16·NV` of each):
/// `Σ p_j·v_j` over `j = s, s + 16, ... < end` in order, one fused multiply-add each,
/// stored at `dst + i·rs` for row `i`.
///
/// # Safety
/// The CPU has AVX-512F and FMA; each `p[i]` holds `end` values; `vp` holds rows `j < end`
/// of `16·NV` values, `d` apart; `dst + i·rs` holds `16·NV` values for each `i < R`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn slot<const NV: usize>(
    p: [*const f32; R],
    vp: *const f32,
    d: usize,
    s: usize,
    end: usize,
    dst: *mut f32,
    rs: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    let mut j = s;
    while j < end {
        // SAFETY: `j < end` (the caller's bounds).
        unsafe {
            let mut vj = [_mm512_setzero_ps(); NV];
            for (x, vx) in vj.iter_mut().enumerate() {
                *vx = _mm512_loadu_ps(vp.add(j * d + x * LANES));
            }
            for (ar, pr) in acc.iter_mut().zip(&p) {
                let pj = _mm512_set1_ps(*pr.add(j));
                for (a, vx) in ar.iter_mut().zip(&vj) {
                    *a = _mm512_fmadd_ps(pj, *vx, *a);
                }
            }
        }
        j += LANES;
    }
    for (i, ar) in acc.iter().enumerate() {
        for (x, a) in ar.iter().enumerate() {
            // SAFETY: as above.
            unsafe { _mm512_storeu_ps(dst.add(i * rs + x * LANES), *a) };
        }
    }
}

/// `softmax_scaled_sink(x, scale, sink)` of `float.rs` 16 values a vector: the same products,
/// maximum, [`exp`] (lane by lane [`expf`]), [`reduce_add16`](super::float::reduce_add16)
/// order and `f64` sum.
///
/// # Safety
/// The CPU has AVX-512F and FMA.
#[target_feature(enable = "avx512f,fma")]
unsafe fn softmax(x: &mut [f32], scale: f32, sink: Option<f32>) {
    let n = x.len();
    let xp = x.as_mut_ptr();
    let mask = |c: usize| -> __mmask16 {
        let k = (n - c).min(LANES) as u32;
        ((1u32 << k) - 1) as __mmask16
    };
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let sv = _mm512_set1_ps(scale);
    let mut mx = ninf;
    for c in (0..n).step_by(LANES) {
        let m = mask(c);
        // SAFETY: masked to the `n` values of `x`.
        unsafe {
            let y = _mm512_mul_ps(_mm512_mask_loadu_ps(ninf, m, xp.add(c)), sv);
            _mm512_mask_storeu_ps(xp.add(c), m, y);
            mx = _mm512_max_ps(mx, y);
        }
    }
    let mut max = _mm512_reduce_max_ps(mx);
    if let Some(s) = sink {
        max = max.max(s);
    }
    if max == f32::NEG_INFINITY {
        x.fill(0.0);
        return;
    }
    let mv = _mm512_set1_ps(max);
    let mut sum = 0f64;
    for c in (0..n).step_by(LANES) {
        let m = mask(c);
        // SAFETY: as above.
        unsafe {
            let e = exp(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, m, xp.add(c)), mv));
            _mm512_mask_storeu_ps(xp.add(c), m, e);
            sum += reduce_add16(e) as f64;
        }
    }
    if let Some(s) = sink {
        sum += expf(s - max) as f64;
    }
    let inv = _mm512_set1_ps((1.0 / sum) as f32);
    for c in (0..n).step_by(LANES) {
        let m = mask(c);
        // SAFETY: as above.
        unsafe {
            let y = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xp.add(c)), inv);
            _mm512_mask_storeu_ps(xp.add(c), m, y);
        }
    }
}

/// The horizontal sum of [`reduce_add16`](super::float::reduce_add16): halves of 8, then of
/// 4, then `(s0 + s2) + (s1 + s3)`.
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce_add16(v: __m512) -> f32 {
    let h = _mm256_add_ps(
        _mm512_castps512_ps256(v),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
    );
    let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
    // [q0 + q2, q1 + q3, ...], then lane 0 + lane 1.
    let s = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
}

/// ggml's `ggml_v_expf` (AVX-512 variant), lane by lane [`expf`].
#[inline]
#[target_feature(enable = "avx512f,fma")]
pub(super) fn exp(x: __m512) -> __m512 {
    let c = |bits: u32| _mm512_set1_ps(f32::from_bits(bits));
    let r = c(0x4b40_0000);
    let z = _mm512_fmadd_ps(x, c(0x3fb8_aa3b), r);
    let n = _mm512_sub_ps(z, r);
    let b = _mm512_fnmadd_ps(n, c(0x35bf_be8e), _mm512_fnmadd_ps(n, c(0x3f31_7200), x));
    let u = _mm512_mul_ps(b, b);
    let lo = _mm512_fmadd_ps(c(0x3f7f_fff6), b, _mm512_set1_ps(1.0));
    let mid = _mm512_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb));
    let hi = _mm512_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17));
    let j = _mm512_fmadd_ps(_mm512_fmadd_ps(hi, u, mid), u, lo);
    let res = _mm512_scalef_ps(j, n);
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
    let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(n, _mm512_setzero_ps());
    let inf = _mm512_maskz_mov_ps(pos, _mm512_set1_ps(f32::INFINITY));
    _mm512_mask_blend_ps(big, res, inf)
}
