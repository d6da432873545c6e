//! Tiled causal attention for long prompts on the CPU: FlashAttention-2's loop (Dao 2023,
//! "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
//! Algorithm 1) with AVX-512 register tiles, for [`super::float::attention`] when a pass has
//! [`MIN_QUERIES`] or more queries over [`MIN_KEYS`] or more cached positions.
//!
//! Work items are one kv head and [`QUERY_BLOCK`] queries (all of the kv head's query heads:
//! the rows that share each key and value load). An item walks the keys it can see in blocks
//! of 64, four rows at a time:
//!
//! ```text
//! S    = Q_rows · K_blockᵀ                     (4 rows × 64 keys in 16 registers)
//! S    = -inf where the key is after the row's position or outside its window
//! m'   = max(m, max_j S_j)
//! P    = exp(S - m')                           (ggml's vectorized expf)
//! l    = l·exp(m - m') + Σ_j P_j
//! O    = O·exp(m - m') + P · V_block            (4 rows × 64 dims in 16 registers)
//! out  = O / l                                  after the last block
//! ```
//!
//! An attention sink `s` (gpt-oss) joins at the end: `m' = max(m, s)`,
//! `l' = l·exp(m - m') + exp(s - m')`, `out = O·exp(m - m') / l'`.
//!
//! No score matrix is kept (64 scores per row at a time), the queries are scaled once, and
//! every block of keys and values is read once per item from the caches. The result is the
//! same function as ggml's row-at-a-time attention ([`super::float::attention`]) up to float
//! summation order (a relative difference of a few `f32` ulps of the output); decode, short
//! prompts and short contexts keep ggml's exact order.

use super::float::{transpose_keys, work_items, AttentionShape, SyncMutPtr, LANES};

/// Queries from which a pass takes the tiled kernel: decode and short prompts (the golden
/// tests against llama.cpp among them) keep ggml's exact order.
pub(crate) const MIN_QUERIES: usize = 64;

/// Cached positions (the pass's own included) from which a pass takes the tiled kernel: below,
/// the row kernel's exact ggml order keeps our logits equal to llama.cpp's (8-bit activations
/// turn one-ulp differences into logit changes of about 0.2 on the default model: with the
/// tiled kernel on 256-token windows, the default model's perplexity moved 1% from
/// `llama-perplexity`'s). That equality costs speed: on the default model, pp512 at depth 0
/// ran about 1.5x faster with the tiled kernel than with the row kernel before the row kernel
/// had its AVX-512 tiles (`attn_exact`, 2.6x faster on `benches/attention`'s h32/8 d64 q512
/// depth 0).
pub(crate) const MIN_KEYS: usize = 1024;

/// Queries per work item.
const QUERY_BLOCK: usize = 8;

/// Keys per block of the inner loop (4 vectors of 16).
const KEY_BLOCK: usize = 4 * LANES;

/// Whether the tiled kernel takes a pass of this shape on this CPU ([`MIN_QUERIES`],
/// [`MIN_KEYS`], AVX-512F, a head dimension that is a multiple of 16, no soft-capping).
pub(crate) fn applies(shape: &AttentionShape, softcap: Option<f32>) -> bool {
    softcap.is_none()
        && shape.queries >= MIN_QUERIES
        && shape.kv_len >= MIN_KEYS
        && shape.head_dim > 0
        && shape.head_dim.is_multiple_of(LANES)
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("fma")
}

/// Causal attention with the operands and result of [`super::float::attention`] (the caller
/// checked the slice lengths and [`applies`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let kt = transpose_keys(k, &shape);
    attention_kt(q, &kt, v, shape, scale, window, sinks, out)
}

/// [`attention`] with the keys already transposed (`kt`, [`transpose_keys`]'s layout: the f16
/// cache's path widens them on the way, `super::float::attention_f16`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_kt(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    let items = work_items(shape.kv_heads, shape.queries, QUERY_BLOCK);
    let out_ptr = SyncMutPtr(out.as_mut_ptr());
    items.par_iter().with_max_len(1).for_each(|(kh, ts)| {
        // SAFETY: `applies` checked AVX-512F and FMA; the items' output rows are pairwise
        // disjoint and inside `out` (the caller checked its length).
        unsafe {
            avx512::item(
                q,
                kt,
                v,
                &shape,
                scale,
                window,
                sinks,
                *kh,
                ts.clone(),
                out_ptr,
            )
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{AttentionShape, SyncMutPtr, KEY_BLOCK, LANES};

    /// ggml's `ggml_v_expf` (AVX-512 variant), lane by lane the scalar
    /// [`crate::kernels::float::expf`].
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn exp(x: __m512) -> __m512 {
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

    /// Work item `(kh, ts)`: the query heads of kv head `kh` at queries `ts`.
    ///
    /// # Safety
    /// The CPU has AVX-512F and FMA; `kt` is [`transpose_keys`]`(k, shape)`; the slices hold
    /// their shapes; `out` holds `[queries, heads, head_dim]` and no other thread writes the
    /// item's rows.
    ///
    /// [`transpose_keys`]: crate::kernels::float::transpose_keys
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn item(
        q: &[f32],
        kt: &[f32],
        v: &[f32],
        shape: &AttentionShape,
        scale: f32,
        window: Option<usize>,
        sinks: Option<&[f32]>,
        kh: usize,
        ts: std::ops::Range<usize>,
        out: SyncMutPtr,
    ) {
        let &AttentionShape {
            heads,
            kv_heads,
            queries,
            kv_len,
            head_dim: d,
            kv_head_stride: hs,
        } = shape;
        let rep = heads / kv_heads;
        let offset = kv_len - queries;
        // Rows `(t, h)` query-major, so that groups of 4 often share one position.
        let rows: Vec<(usize, usize)> = ts
            .clone()
            .flat_map(|t| (kh * rep..(kh + 1) * rep).map(move |h| (t, h)))
            .collect();
        let n = rows.len().div_ceil(4) * 4;
        let mut qs = vec![0f32; n * d];
        for (r, &(t, h)) in rows.iter().enumerate() {
            for (x, &y) in qs[r * d..][..d]
                .iter_mut()
                .zip(&q[(h * queries + t) * d..][..d])
            {
                *x = y * scale;
            }
        }
        // A padding row repeats the last real one (same mask, result unused).
        let row = |r: usize| rows[r.min(rows.len() - 1)];
        let pos = |r: usize| offset + row(r).0;
        let first = |r: usize| window.map_or(0, |w| (pos(r) + 1).saturating_sub(w));
        for r in rows.len()..n {
            let src = (rows.len() - 1) * d;
            qs.copy_within(src..src + d, r * d);
        }
        let mut o = vec![0f32; n * d];
        let mut m = vec![f32::NEG_INFINITY; n];
        let mut l = vec![0f32; n];
        let blocks16 = kv_len.div_ceil(LANES);
        let kt = &kt[kh * blocks16 * d * LANES..][..blocks16 * d * LANES];
        let vv = &v[kh * hs..][..kv_len * d];
        let mut p = [[0f32; KEY_BLOCK]; 4];
        for g in (0..n).step_by(4) {
            let lo = (g..g + 4).map(first).min().unwrap_or(0) / LANES * LANES;
            let hi = (g..g + 4).map(pos).max().unwrap_or(0) + 1;
            let mut j0 = lo;
            while j0 < hi {
                let nsub = (hi - j0).div_ceil(LANES).min(4);
                let keys = (j0 + nsub * LANES).min(kv_len) - j0;
                unsafe {
                    let s = match nsub {
                        1 => scores::<1>(&qs[g * d..], kt, j0 / LANES, d),
                        2 => scores::<2>(&qs[g * d..], kt, j0 / LANES, d),
                        3 => scores::<3>(&qs[g * d..], kt, j0 / LANES, d),
                        _ => scores::<4>(&qs[g * d..], kt, j0 / LANES, d),
                    };
                    let mut corr = [0f32; 4];
                    for (i, (pi, ci)) in p.iter_mut().zip(corr.iter_mut()).enumerate() {
                        let r = g + i;
                        let (f, ps) = (first(r) as i32, pos(r) as i32);
                        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
                        let mut sv = [_mm512_setzero_ps(); 4];
                        for (sub, svs) in sv.iter_mut().enumerate().take(nsub) {
                            let key = _mm512_add_epi32(
                                _mm512_set1_epi32((j0 + sub * LANES) as i32),
                                _mm512_setr_epi32(
                                    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                ),
                            );
                            let seen =
                                _mm512_cmp_epi32_mask::<_MM_CMPINT_LE>(key, _mm512_set1_epi32(ps))
                                    & _mm512_cmp_epi32_mask::<_MM_CMPINT_NLT>(
                                        key,
                                        _mm512_set1_epi32(f),
                                    );
                            *svs = _mm512_mask_blend_ps(
                                seen,
                                _mm512_set1_ps(f32::NEG_INFINITY),
                                s[i][sub],
                            );
                            mx = _mm512_max_ps(mx, *svs);
                        }
                        let m_new = m[r].max(_mm512_reduce_max_ps(mx));
                        if m_new == f32::NEG_INFINITY {
                            // Nothing visible in this block: it adds nothing.
                            pi.iter_mut().for_each(|x| *x = 0.0);
                            *ci = 1.0;
                            continue;
                        }
                        let mn = _mm512_set1_ps(m_new);
                        let mut sum = _mm512_setzero_ps();
                        for (sub, svs) in sv.iter().enumerate().take(nsub) {
                            let e = exp(_mm512_sub_ps(*svs, mn));
                            sum = _mm512_add_ps(sum, e);
                            _mm512_storeu_ps(pi.as_mut_ptr().add(sub * LANES), e);
                        }
                        *ci = crate::kernels::float::expf(m[r] - m_new);
                        l[r] = l[r] * *ci + _mm512_reduce_add_ps(sum);
                        m[r] = m_new;
                    }
                    pv(
                        &mut o[g * d..(g + 4) * d],
                        &p,
                        &corr,
                        &vv[j0 * d..],
                        keys,
                        d,
                    );
                }
                j0 += nsub * LANES;
            }
        }
        for (r, &(t, h)) in rows.iter().enumerate() {
            let (mut corr, mut lr) = (1.0, l[r]);
            if let Some(sink) = sinks.map(|s| s[h]) {
                let mf = m[r].max(sink);
                corr = crate::kernels::float::expf(m[r] - mf);
                lr = lr * corr + crate::kernels::float::expf(sink - mf);
            }
            let inv = corr / lr;
            // SAFETY: row `(t, h)` belongs to this item (the caller's guarantee).
            let dst =
                unsafe { std::slice::from_raw_parts_mut(out.get().add((t * heads + h) * d), d) };
            for (x, &y) in dst.iter_mut().zip(&o[r * d..][..d]) {
                *x = y * inv;
            }
        }
    }

    /// Scores of rows `qs[0..4]` (`d` values each, scaled) against `NS` blocks of 16 keys of
    /// `kt` from block `b0` on: `[row][block]` vectors of 16 keys.
    ///
    /// # Safety
    /// The CPU has AVX-512F and FMA; `qs` holds 4 rows; `kt` holds blocks `b0..b0 + NS`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn scores<const NS: usize>(
        qs: &[f32],
        kt: &[f32],
        b0: usize,
        d: usize,
    ) -> [[__m512; 4]; 4] {
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        debug_assert!(qs.len() >= 4 * d && kt.len() >= (b0 + NS) * d * LANES);
        unsafe {
            let kp = kt.as_ptr().add(b0 * d * LANES);
            let qp = qs.as_ptr();
            for c in 0..d {
                let mut kv = [_mm512_setzero_ps(); 4];
                for (s, kv) in kv.iter_mut().enumerate().take(NS) {
                    *kv = _mm512_loadu_ps(kp.add((s * d + c) * LANES));
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let qb = _mm512_set1_ps(*qp.add(i * d + c));
                    for s in 0..NS {
                        acc[s] = _mm512_fmadd_ps(qb, kv[s], acc[s]);
                    }
                }
            }
        }
        acc
    }

    /// `o[i] = o[i]·corr[i] + Σ_j p[i][j]·v_j` for the 4 rows of `o` (`d` values each) over
    /// the first `keys` rows of `vv`.
    ///
    /// # Safety
    /// The CPU has AVX-512F and FMA; `o` holds 4 rows of `d` (a multiple of 16); `vv` holds
    /// `keys` rows of `d`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn pv(
        o: &mut [f32],
        p: &[[f32; KEY_BLOCK]; 4],
        corr: &[f32; 4],
        vv: &[f32],
        keys: usize,
        d: usize,
    ) {
        debug_assert!(o.len() >= 4 * d && vv.len() >= keys * d);
        let mut c0 = 0;
        while c0 < d {
            let nv = ((d - c0) / LANES).min(4);
            unsafe {
                match nv {
                    1 => pv_chunk::<1>(o, p, corr, vv, keys, d, c0),
                    2 => pv_chunk::<2>(o, p, corr, vv, keys, d, c0),
                    3 => pv_chunk::<3>(o, p, corr, vv, keys, d, c0),
                    _ => pv_chunk::<4>(o, p, corr, vv, keys, d, c0),
                }
            }
            c0 += nv * LANES;
        }
    }

    /// [`pv`] for dimensions `c0..c0 + 16·NV`.
    ///
    /// # Safety
    /// As [`pv`]; `c0 + 16·NV <= d`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_chunk<const NV: usize>(
        o: &mut [f32],
        p: &[[f32; KEY_BLOCK]; 4],
        corr: &[f32; 4],
        vv: &[f32],
        keys: usize,
        d: usize,
        c0: usize,
    ) {
        unsafe {
            let op = o.as_mut_ptr();
            let mut acc = [[_mm512_setzero_ps(); NV]; 4];
            for (i, acc) in acc.iter_mut().enumerate() {
                let ci = _mm512_set1_ps(corr[i]);
                for (x, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_mul_ps(_mm512_loadu_ps(op.add(i * d + c0 + x * LANES)), ci);
                }
            }
            let vp = vv.as_ptr();
            for j in 0..keys {
                let mut vj = [_mm512_setzero_ps(); NV];
                for (x, vx) in vj.iter_mut().enumerate() {
                    *vx = _mm512_loadu_ps(vp.add(j * d + c0 + x * LANES));
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let pj = _mm512_set1_ps(*p[i].get_unchecked(j));
                    for x in 0..NV {
                        acc[x] = _mm512_fmadd_ps(pj, vj[x], acc[x]);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                for (x, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(op.add(i * d + c0 + x * LANES), *a);
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Deterministic values in `[-2, 2)`.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn tiled_attention_matches_the_row_kernel() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED tiled_attention_matches_the_row_kernel: no AVX-512F here");
            return;
        }
        // (heads, kv_heads, head_dim, queries, earlier positions, window, extra head stride)
        let cases = [
            (8, 2, 64, 64, 0, None, 0),
            (8, 2, 64, 100, 1037, None, 64),
            (4, 4, 128, 70, 300, None, 0),
            (6, 2, 96, 65, 5, Some(50), 0),
            (2, 1, 32, 129, 200, Some(129), 32),
            (3, 1, 256, 64, 17, None, 0),
        ];
        for (seed, &(heads, kv_heads, d, queries, past, window, extra)) in cases.iter().enumerate()
        {
            let kv_len = queries + past;
            let shape = AttentionShape {
                heads,
                kv_heads,
                queries,
                kv_len,
                head_dim: d,
                kv_head_stride: kv_len * d + extra,
            };
            assert_eq!(applies(&shape, None), kv_len >= MIN_KEYS);
            let q = values(heads * queries * d, 3 * seed as u64 + 1);
            let k = values(kv_heads * shape.kv_head_stride, 3 * seed as u64 + 2);
            let v = values(kv_heads * shape.kv_head_stride, 3 * seed as u64 + 3);
            let scale = 1.0 / (d as f32).sqrt();
            let mut want = vec![0f32; heads * queries * d];
            // The row-at-a-time kernel (ggml's order) on the same operands.
            // Sinks on every other case (one of them large enough to dominate).
            let sinks: Vec<f32> = (0..heads).map(|h| [0.5, -1.0, 3.0, 40.0][h % 4]).collect();
            let sinks = (seed % 2 == 1).then_some(&sinks[..]);
            crate::kernels::float::attention_rows(
                &q, &k, &v, shape, scale, None, window, sinks, &mut want,
            );
            let mut got = vec![0f32; heads * queries * d];
            attention(&q, &k, &v, shape, scale, window, sinks, &mut got);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 2e-5, "case {seed}: max difference {worst}");
        }
    }
}
