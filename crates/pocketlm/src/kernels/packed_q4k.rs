//! `Q4_K` weights repacked at load into groups of 16 interleaved rows (the layout family of
//! [`super::packed`]; llama.cpp's `repack.cpp` interleaves 8 rows of `Q4_K` as `block_q4_Kx8`
//! for its `ggml_gemm_q4_K_8x8_q8_K`).
//!
//! Layout of a packed matrix `[rows, cols]` (`rows` a multiple of 16): group `g` (rows
//! `16g..16g + 16`) is stored whole, then group `g + 1`; within a group, super-block `b`
//! (values `256b..256b + 256` of every row) takes [`GROUP_BLOCK`] = 2368 bytes:
//! - bytes `0..32`: the 16 rows' `d` (`f16`), row order; bytes `32..64`: their `dmin`;
//! - bytes `64..192`: the 6-bit sub-block scales decoded to bytes, `[sub-block s: 8][row: 16]`;
//! - bytes `192..320`: the 6-bit sub-block mins decoded to bytes, `[pair c: 4][row: 16][2]`
//!   (row `i`'s mins of sub-blocks `2c` and `2c + 1` side by side, so that widening 32 bytes to
//!   16-bit lanes gives each 32-bit lane the pair);
//! - bytes `320..2368`: the codes as 32 words of 64 bytes, word `8c + t` holding 4 bytes per row
//!   (lane `i` = bytes `4i..4i + 4` = row `16g + i`'s GGUF `qs[32c + 4t..32c + 4t + 4]`): their
//!   low nibbles are values `64c + 4t..` (sub-block `2c`), their high nibbles values
//!   `64c + 32 + 4t..` (sub-block `2c + 1`).
//!
//! That is 64 bytes more per 16 rows and super-block than GGUF's 2304 (2.8%): the scales and
//! mins are stored decoded so that the kernels need no bit surgery per token.
//!
//! The products compute, per row and super-block, the same exact integers as the unpacked
//! `Q4_K` kernels (`Σ_s sc_s·Σ q·y` and `Σ_s m_s·bsum_s` against `Q8_K` activations) and apply
//! them with the same fused multiply-adds in the same order (once per super-block, or once per
//! pair of sub-blocks for the activation rows ggml's GEMM takes, [`super::q4k_gemm_row`]), so
//! packed and unpacked results are bit-identical on every backend.

use super::packed::ROWS;
use super::scalar::{f16_at, scale_min_k4};
use super::{Acts, Tile};

/// Bytes of one super-block of a 16-row group.
pub(crate) const GROUP_BLOCK: usize = 320 + 64 * 32;
/// Offset of the decoded scales in a group block.
const SC: usize = 64;
/// Offset of the decoded mins.
const MIN: usize = 192;
/// Offset of the code words.
const QS: usize = 320;
/// Bytes of a GGUF `Q4_K` block.
const GGUF_BLOCK: usize = 144;

/// The packed bytes of GGUF `Q4_K` `bytes` `[rows, cols]` (`rows % 16 == 0`). Groups are packed
/// in parallel on the rayon pool.
pub(crate) fn repack(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    super::packed::repack_superblocks(
        bytes,
        rows,
        cols,
        (GGUF_BLOCK, GROUP_BLOCK),
        |db, i, blk| fill(db, i, blk, &blk[16..144]),
    )
}

/// Row lane `i`'s share of a group block (this layout's first [`GROUP_BLOCK`] bytes) from its
/// GGUF block `blk`, whose first 16 bytes are `d`, `dmin` and the 12 bytes of 6-bit scales and
/// mins, with the 128 bytes of 4-bit codes `qs`: `Q4_K`'s whole layout, and the part of
/// `Q5_K`'s ([`super::packed_q5k`]) without the high bits.
pub(crate) fn fill(db: &mut [u8], i: usize, blk: &[u8], qs: &[u8]) {
    db[2 * i..2 * i + 2].copy_from_slice(&blk[0..2]);
    db[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&blk[2..4]);
    for s in 0..8 {
        let (sc, m) = scale_min_k4(s, &blk[4..16]);
        db[SC + 16 * s + i] = sc;
        db[MIN + 32 * (s / 2) + 2 * i + s % 2] = m;
    }
    for w in 0..32 {
        db[QS + 64 * w + 4 * i..][..4].copy_from_slice(&qs[4 * w..][..4]);
    }
}

/// Row `r` of a packed matrix with `cols` columns, dequantized into `out` (`cols` values;
/// exactly ggml's `dequantize_row_q4_K` values).
pub(crate) fn dequantize_row(packed: &[u8], cols: usize, r: usize, out: &mut [f32]) {
    let nb = cols / 256;
    let (g, i) = (r / ROWS, r % ROWS);
    let grp = &packed[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK];
    for (b, o) in out.chunks_exact_mut(256).enumerate() {
        let blk = &grp[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
        let (d, dmin) = (f16_at(blk, 2 * i), f16_at(blk, 32 + 2 * i));
        for c in 0..4 {
            for half in 0..2 {
                let s = 2 * c + half;
                let sc = blk[SC + 16 * s + i];
                let m = blk[MIN + 32 * c + 2 * i + half];
                let (d1, m1) = (d * sc as f32, dmin * m as f32);
                for l in 0..32 {
                    let byte = blk[QS + 64 * (8 * c + l / 4) + 4 * i + l % 4];
                    let q = if half == 0 { byte & 0xF } else { byte >> 4 };
                    o[64 * c + 32 * half + l] = d1 * q as f32 - m1;
                }
            }
        }
    }
}

/// The exact integers of pair `c` (sub-blocks `2c`, `2c + 1`) of super-block `blk` for row lane
/// `i` and activation row `r`: `(sc·Σ q·y` over both sub-blocks, `Σ m·bsum)`.
#[inline(always)]
fn pair_sums(blk: &[u8], a: &Acts, r: usize, b: usize, c: usize, i: usize) -> (i32, i32) {
    let y = &a.qs[r * a.k + 256 * b + 64 * c..][..64];
    let bsums = &a.bsums[r * (a.k / 16) + 16 * b + 4 * c..][..4];
    let (mut s1, mut s2) = (0i32, 0i32);
    for l in 0..32 {
        let byte = blk[QS + 64 * (8 * c + l / 4) + 4 * i + l % 4];
        s1 += (byte & 0xF) as i32 * y[l] as i32;
        s2 += (byte >> 4) as i32 * y[32 + l] as i32;
    }
    let (sc1, sc2) = (
        blk[SC + 32 * c + i] as i32,
        blk[SC + 32 * c + 16 + i] as i32,
    );
    let (m1, m2) = (
        blk[MIN + 32 * c + 2 * i] as i32,
        blk[MIN + 32 * c + 2 * i + 1] as i32,
    );
    (
        sc1 * s1 + sc2 * s2,
        m1 * (bsums[0] as i32 + bsums[1] as i32) + m2 * (bsums[2] as i32 + bsums[3] as i32),
    )
}

/// The portable tile function (the reference of the SIMD kernel: the same integers and the
/// same float operations in the same order).
///
/// # Safety
/// See [`super::TileFn`]; the tile's rows start and end on multiples of [`ROWS`]; the
/// activations are `Q8_K`.
pub(crate) unsafe fn tile_scalar(t: &Tile<'_>) {
    let a = t.acts;
    let nb = a.k / 256;
    for g in t.rows.start / ROWS..t.rows.end / ROWS {
        let grp = &t.w[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK];
        for r in t.ms.clone() {
            let gemm = super::q4k_gemm_row(a.m, r);
            for i in 0..ROWS {
                let (mut acc, mut accm) = (0f32, 0f32);
                for b in 0..nb {
                    let blk = &grp[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
                    let dy = a.d[r * nb + b];
                    let (d, dmin) = (f16_at(blk, 2 * i), f16_at(blk, 32 + 2 * i));
                    let (mut isum, mut msum) = (0i32, 0i32);
                    for c in 0..4 {
                        let (s, m) = pair_sums(blk, a, r, b, c, i);
                        isum += s;
                        msum += m;
                        if gemm {
                            acc = (isum as f32).mul_add(d * dy, acc);
                            accm = (msum as f32).mul_add(dmin * dy, accm);
                            (isum, msum) = (0, 0);
                        }
                    }
                    if !gemm {
                        acc = (isum as f32).mul_add(d * dy, acc);
                        accm = (msum as f32).mul_add(dmin * dy, accm);
                    }
                }
                // SAFETY: the caller guarantees `out` is valid for `[m, ldo]` and that the
                // tile's elements belong to it only.
                unsafe { *t.out.add(r * t.ldo + g * ROWS + i) = acc - accm };
            }
        }
    }
}

/// The AVX-512 kernel (`vpdpbusd` for the codes, `vpdpwssd` for the mins: AVX512F +
/// AVX512-VNNI).
///
/// Per 64-byte code word it takes two logic operations: the low nibbles (`v & 0x0F`) and the
/// high nibbles left in place (`v & 0xF0`, 16 times the code): the high sub-block's dot
/// products are then 16 times too large, and exactly divisible by 16, so one arithmetic shift
/// per pair (GEMM) or per super-block (GEMV) gives the same integers as the portable kernel.
/// The activations' sums per pair of sub-blocks are computed once per super-block and row, as
/// the `i16` pairs `vpdpwssd` takes. A single activation row (decode) splits each chain of
/// dot products in two to halve its latency.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::{Acts, Tile};
    use super::{GROUP_BLOCK, MIN, QS, ROWS, SC};

    /// Bytes ahead of the super-block in use that a decode product prefetches (about 5
    /// super-blocks). Measured on a 2-core Zen 5 VM, `Q4_K` 49152 x 2048 (beyond the L3),
    /// one activation row: 46 GB/s on one thread without prefetch, 53 at 8 KiB, 57 at 12 KiB,
    /// 40 at 32 KiB; the hardware prefetcher alone does not keep up with one core's demand.
    const PREFETCH: usize = 12 * 1024;

    /// # Safety
    /// See [`super::super::TileFn`]; the tile's rows start and end on multiples of [`ROWS`];
    /// the activations are `Q8_K`; the CPU has AVX512F, AVX512BW and AVX512-VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(crate) unsafe fn tile(t: &Tile<'_>) {
        let a = t.acts;
        let nb = a.k / 256;
        for g in t.rows.start / ROWS..t.rows.end / ROWS {
            // SAFETY: group `g` lies inside the weight (rows checked by the caller).
            let wg = unsafe { t.w.as_ptr().add(g * nb * GROUP_BLOCK) };
            let mut r = t.ms.start;
            while r < t.ms.end {
                let left = t.ms.end - r;
                let gemm = super::super::q4k_gemm_row(a.m, r);
                // Rows of one call share the GEMM/GEMV float order.
                let same = |n: usize| super::super::q4k_gemm_row(a.m, r + n - 1) == gemm;
                unsafe {
                    if left >= 4 && same(4) {
                        if gemm {
                            rows::<4, true>(t, wg, g, r);
                        } else {
                            rows::<4, false>(t, wg, g, r);
                        }
                        r += 4;
                    } else if left >= 2 && same(2) {
                        if gemm {
                            rows::<2, true>(t, wg, g, r);
                        } else {
                            rows::<2, false>(t, wg, g, r);
                        }
                        r += 2;
                    } else {
                        if gemm {
                            rows::<1, true>(t, wg, g, r);
                        } else {
                            rows::<1, false>(t, wg, g, r);
                        }
                        r += 1;
                    }
                }
            }
        }
    }

    /// Row `r + i`'s activation sums of sub-blocks `2c` and `2c + 1` of super-block `b`, as
    /// the `i16` pair of word `c` of entry `i` (|sum| <= 32 · 127, so the pack does not
    /// saturate): the second operand of `vpdpwssd` against the mins. Shared with `Q5_K`.
    ///
    /// # Safety
    /// Rows `r..r + R` and super-block `b` lie in the `Q8_K` activations `a`; the CPU has
    /// AVX512F.
    #[inline(always)]
    pub(crate) unsafe fn bsum_pairs<const R: usize>(a: &Acts, r: usize, b: usize) -> [[i32; 4]; R] {
        let ones = _mm_set1_epi16(1);
        let mut pairs = [[0i32; 4]; R];
        for (i, pair) in pairs.iter_mut().enumerate() {
            unsafe {
                let bs = a.bsums.as_ptr().add((r + i) * (a.k / 16) + 16 * b) as *const __m128i;
                let p = _mm_packs_epi32(
                    _mm_madd_epi16(_mm_loadu_si128(bs), ones),
                    _mm_madd_epi16(_mm_loadu_si128(bs.add(1)), ones),
                );
                _mm_storeu_si128(pair.as_mut_ptr() as *mut __m128i, p);
            }
        }
        pairs
    }

    /// Activation rows `r..r + R` against the 16 weight rows of group `g` (at `wg`).
    ///
    /// # Safety
    /// As [`tile`]; `r + R <= t.ms.end`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // `i` indexes the activations and the sums alike
    unsafe fn rows<const R: usize, const GEMM: bool>(
        t: &Tile<'_>,
        wg: *const u8,
        g: usize,
        r: usize,
    ) {
        let a = t.acts;
        let (k, nb) = (a.k, a.k / 256);
        let m4 = _mm512_set1_epi8(0x0F);
        // Independent dot-product chains per sum (two for one row: `vpdpbusd`'s latency
        // otherwise bounds a single-row product).
        let chains = if R == 1 { 2 } else { 1 };
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            let mut accm = [_mm512_setzero_ps(); R];
            // Each of the block's 37 cache lines is prefetched once: the 5 of the scales here,
            // one code word per step below. (The address may lie past the weight: prefetches
            // do not fault.)
            let pf = super::super::streams_weights(a.m);
            for b in 0..nb {
                let blk = wg.add(b * GROUP_BLOCK);
                if pf {
                    for l in 0..QS / 64 {
                        _mm_prefetch::<_MM_HINT_T0>(
                            blk.wrapping_add(PREFETCH + 64 * l) as *const i8
                        );
                    }
                }
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i));
                let mut dd = [_mm512_setzero_ps(); R];
                let mut ddm = [_mm512_setzero_ps(); R];
                for i in 0..R {
                    let dy = _mm512_set1_ps(*a.d.get_unchecked((r + i) * nb + b));
                    dd[i] = _mm512_mul_ps(d, dy);
                    ddm[i] = _mm512_mul_ps(dmin, dy);
                }
                let pairs = bsum_pairs::<R>(a, r, b);
                // GEMV: `Σ sc·Σ q·y` of the low sub-blocks, and 16 times that of the high ones.
                let mut isum = [_mm512_setzero_si512(); R];
                let mut isum16 = [_mm512_setzero_si512(); R];
                let mut msum = [_mm512_setzero_si512(); R];
                for c in 0..4 {
                    let mut s1 = [[_mm512_setzero_si512(); 2]; R];
                    let mut s2 = [[_mm512_setzero_si512(); 2]; R];
                    for tw in 0..8 {
                        if pf {
                            _mm_prefetch::<_MM_HINT_T0>(
                                blk.wrapping_add(PREFETCH + QS + 64 * (8 * c + tw)) as *const i8,
                            );
                        }
                        let v = _mm512_loadu_si512(blk.add(QS + 64 * (8 * c + tw)) as *const _);
                        let lo = _mm512_and_si512(v, m4);
                        let hi = _mm512_andnot_si512(m4, v);
                        let ch = tw % chains;
                        for i in 0..R {
                            let y = a.qs.as_ptr().add((r + i) * k + 256 * b + 64 * c + 4 * tw)
                                as *const i32;
                            s1[i][ch] = _mm512_dpbusd_epi32(
                                s1[i][ch],
                                lo,
                                _mm512_set1_epi32(y.read_unaligned()),
                            );
                            s2[i][ch] = _mm512_dpbusd_epi32(
                                s2[i][ch],
                                hi,
                                _mm512_set1_epi32(y.add(8).read_unaligned()),
                            );
                        }
                    }
                    let sc1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        blk.add(SC + 32 * c) as *const __m128i
                    ));
                    let sc2 = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        blk.add(SC + 32 * c + 16) as *const __m128i
                    ));
                    let mins = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                        blk.add(MIN + 32 * c) as *const __m256i
                    ));
                    for i in 0..R {
                        let (mut p1, mut p2) = (s1[i][0], s2[i][0]);
                        if chains == 2 {
                            p1 = _mm512_add_epi32(p1, s1[i][1]);
                            p2 = _mm512_add_epi32(p2, s2[i][1]);
                        }
                        let pair = _mm512_set1_epi32(pairs[i][c]);
                        msum[i] = _mm512_dpwssd_epi32(msum[i], mins, pair);
                        if GEMM {
                            let s = _mm512_add_epi32(
                                _mm512_mullo_epi32(p1, sc1),
                                _mm512_mullo_epi32(_mm512_srai_epi32::<4>(p2), sc2),
                            );
                            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dd[i], acc[i]);
                            accm[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum[i]), ddm[i], accm[i]);
                            msum[i] = _mm512_setzero_si512();
                        } else {
                            isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(p1, sc1));
                            isum16[i] = _mm512_add_epi32(isum16[i], _mm512_mullo_epi32(p2, sc2));
                        }
                    }
                }
                if !GEMM {
                    for i in 0..R {
                        // Exact: every term of `isum16` is a multiple of 16 (and the sum is below
                        // 2^31: 4 · 63 · 16 · 32 · 15 · 127).
                        let s = _mm512_add_epi32(isum[i], _mm512_srai_epi32::<4>(isum16[i]));
                        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dd[i], acc[i]);
                        accm[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum[i]), ddm[i], accm[i]);
                    }
                }
            }
            for i in 0..R {
                _mm512_storeu_ps(
                    t.out.add((r + i) * t.ldo + g * ROWS),
                    _mm512_sub_ps(acc[i], accm[i]),
                );
            }
        }
    }
}
