//! `Q5_K` weights repacked at load into groups of 16 interleaved rows (the layout family of
//! [`super::packed`]; the `Q4_K` layout of [`super::packed_q4k`] plus the high bits).
//!
//! Layout of a packed matrix `[rows, cols]` (`rows` a multiple of 16): group `g` (rows
//! `16g..16g + 16`) is stored whole, then group `g + 1`; within a group, super-block `b`
//! (values `256b..256b + 256` of every row) takes [`GROUP_BLOCK`] = 2880 bytes:
//! - bytes `0..32`: the 16 rows' `d` (`f16`), row order; bytes `32..64`: their `dmin`;
//! - bytes `64..192`: the 6-bit sub-block scales decoded to bytes, `[sub-block s: 8][row: 16]`;
//! - bytes `192..320`: the 6-bit sub-block mins decoded to bytes, `[pair c: 4][row: 16][2]`
//!   (row `i`'s mins of sub-blocks `2c` and `2c + 1` side by side, as in `Q4_K`'s layout);
//! - bytes `320..2368`: the low 4 bits of the codes as 32 words of 64 bytes, word `8c + t`
//!   holding 4 bytes per row (lane `i` = bytes `4i..4i + 4` = row `16g + i`'s GGUF
//!   `qs[32c + 4t..32c + 4t + 4]`): their low nibbles are values `64c + 4t..` (sub-block `2c`),
//!   their high nibbles values `64c + 32 + 4t..` (sub-block `2c + 1`);
//! - bytes `2368..2880`: the high bits as 8 words of 64 bytes, word `t` holding row `i`'s GGUF
//!   `qh[4t..4t + 4]` in lane `i`: bit `2c` of a byte is bit 4 of the low-nibble code of the
//!   same byte of code word `8c + t`, bit `2c + 1` that of its high-nibble code.
//!
//! That is 64 bytes more per 16 rows and super-block than GGUF's 2816 (2.3%): the scales and
//! mins are stored decoded, as for `Q4_K`.
//!
//! The products compute, per row and super-block, the same exact integers as the unpacked
//! `Q5_K` kernels (`Σ_s sc_s·Σ q·y` and `Σ_s m_s·bsum_s` against `Q8_K` activations) and
//! apply them with the portable unpacked kernel's float operations (ggml's tiled order for
//! products of 8 or more rows, [`super::q5k_tiled`]; below that one fused multiply-add per
//! super-block into the scaled sum and one into the minimums' sum), so packed results equal
//! the portable unpacked kernel's bit for bit on every backend. (The unpacked x86 kernels of
//! fewer than 8 rows sum in ggml's eight-lane `ggml_vec_dot_q5_K_q8_K` order instead, and
//! differ from both by rounding.)

use super::packed::ROWS;
use super::scalar::f16_at;
use super::{Acts, Tile};

/// Bytes of one super-block of a 16-row group.
pub(crate) const GROUP_BLOCK: usize = QH + 64 * 8;
/// Offset of the decoded scales in a group block.
const SC: usize = 64;
/// Offset of the decoded mins.
const MIN: usize = 192;
/// Offset of the code words (low 4 bits).
const QS: usize = 320;
/// Offset of the high-bit words.
const QH: usize = QS + 64 * 32;
/// Bytes of a GGUF `Q5_K` block.
const GGUF_BLOCK: usize = 176;

/// The packed bytes of GGUF `Q5_K` `bytes` `[rows, cols]` (`rows % 16 == 0`). Groups are packed
/// in parallel on the rayon pool.
pub(crate) fn repack(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    super::packed::repack_superblocks(
        bytes,
        rows,
        cols,
        (GGUF_BLOCK, GROUP_BLOCK),
        |db, i, blk| {
            // `Q4_K`'s layout (the same offsets), then the high bits.
            super::packed_q4k::fill(db, i, blk, &blk[48..176]);
            for t in 0..8 {
                db[QH + 64 * t + 4 * i..][..4].copy_from_slice(&blk[16 + 4 * t..][..4]);
            }
        },
    )
}

/// The 5-bit code of value `64c + 32·half + l` (`l < 32`) of row lane `i` in a packed group
/// block.
#[inline(always)]
fn code(blk: &[u8], i: usize, c: usize, half: usize, l: usize) -> u8 {
    let at = 4 * i + l % 4;
    let byte = blk[QS + 64 * (8 * c + l / 4) + at];
    let nib = if half == 0 { byte & 0xF } else { byte >> 4 };
    let h = (blk[QH + 64 * (l / 4) + at] >> (2 * c + half)) & 1;
    nib | (h << 4)
}

/// Row `r` of a packed matrix with `cols` columns, dequantized into `out` (`cols` values;
/// exactly ggml's `dequantize_row_q5_K` values).
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
                    let q = code(blk, i, c, half, l);
                    o[64 * c + 32 * half + l] = d1 * q as f32 - m1;
                }
            }
        }
    }
}

/// The exact integers of super-block `blk` (block `b`) for row lane `i` and activation row
/// `r`: `(Σ_s sc_s·Σ q·y, Σ_s m_s·bsum_s)`.
#[inline(always)]
fn block_sums(blk: &[u8], a: &Acts, r: usize, b: usize, i: usize) -> (i32, i32) {
    let y = &a.qs[r * a.k + 256 * b..][..256];
    let bsums = &a.bsums[r * (a.k / 16) + 16 * b..][..16];
    let (mut isum, mut msum) = (0i32, 0i32);
    for c in 0..4 {
        for half in 0..2 {
            let mut s = 0i32;
            for l in 0..32 {
                s += code(blk, i, c, half, l) as i32 * y[64 * c + 32 * half + l] as i32;
            }
            let sb = 2 * c + half;
            isum += blk[SC + 16 * sb + i] as i32 * s;
            msum += blk[MIN + 32 * c + 2 * i + half] as i32
                * (bsums[2 * sb] as i32 + bsums[2 * sb + 1] as i32);
        }
    }
    (isum, msum)
}

/// The portable tile function (the reference of the SIMD kernel: the same integers and the
/// same float operations in the same order, which are those of the portable unpacked kernel).
///
/// # Safety
/// See [`super::TileFn`]; the tile's rows start and end on multiples of [`ROWS`]; the
/// activations are `Q8_K`.
pub(crate) unsafe fn tile_scalar(t: &Tile<'_>) {
    let a = t.acts;
    let nb = a.k / 256;
    let tiled = super::q5k_tiled(a.m);
    for g in t.rows.start / ROWS..t.rows.end / ROWS {
        let grp = &t.w[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK];
        for r in t.ms.clone() {
            for i in 0..ROWS {
                let (mut acc, mut accm) = (0f32, 0f32);
                for b in 0..nb {
                    let blk = &grp[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
                    let dy = a.d[r * nb + b];
                    let (d, dmin) = (f16_at(blk, 2 * i), f16_at(blk, 32 + 2 * i));
                    let (isum, msum) = block_sums(blk, a, r, b, i);
                    if tiled {
                        acc = (-dmin)
                            .mul_add(msum as f32, isum as f32 * d)
                            .mul_add(dy, acc);
                    } else {
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
/// AVX512-VNNI), the `Q4_K` kernel of [`super::packed_q4k`] with the high bits: per code word
/// and pair `c`, the high-bit word shifted right by `2c` puts each byte's two bits at bits 0
/// and 1, and a shift left by 4 (3) and a mask by `0x10` put the low (high) code's bit 4 in
/// place; one `vpternlogd` each then merges it with the nibble (`(v & 0x0F) | bit`).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::packed::avx512::prefetch_l1;
    use super::super::packed_q4k::avx512::bsum_pairs;
    use super::super::Tile;
    use super::{GROUP_BLOCK, MIN, QH, QS, ROWS, SC};

    /// Bytes ahead of the super-block in use that a decode product prefetches (as for
    /// `Q4_K`, whose measurements are in [`super::super::packed_q4k`]).
    const PREFETCH: usize = 12 * 1024;

    /// `vpternlogd` truth table of `(a & c) | b`.
    const A_AND_C_OR_B: i32 = 0xEC;

    /// The 5-bit codes of code word `v` (64 bytes of two nibbles each) with the high bits in
    /// bits 0 and 1 of the bytes of `h` (shifted so that sub-block pair `c`'s bits come
    /// first): `(low-nibble codes, high-nibble codes)`, one code a byte.
    ///
    /// # Safety
    /// The CPU has AVX512F.
    #[inline(always)]
    unsafe fn merge_high(v: __m512i, h: __m512i) -> (__m512i, __m512i) {
        let (m4, m16) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x10));
        let lo = _mm512_ternarylogic_epi32::<A_AND_C_OR_B>(
            v,
            _mm512_and_si512(_mm512_slli_epi32::<4>(h), m16),
            m4,
        );
        let hi = _mm512_ternarylogic_epi32::<A_AND_C_OR_B>(
            _mm512_srli_epi32::<4>(v),
            _mm512_and_si512(_mm512_slli_epi32::<3>(h), m16),
            m4,
        );
        (lo, hi)
    }

    /// # Safety
    /// See [`super::super::TileFn`]; the tile's rows start and end on multiples of [`ROWS`];
    /// the activations are `Q8_K`; the CPU has AVX512F, AVX512BW and AVX512-VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(crate) unsafe fn tile(t: &Tile<'_>) {
        let a = t.acts;
        let nb = a.k / 256;
        let tiled = super::super::q5k_tiled(a.m);
        if tiled && t.ms.len() >= DECODED_MIN_ROWS {
            // SAFETY: as this function's.
            return unsafe { tile_decoded(t) };
        }
        for g in t.rows.start / ROWS..t.rows.end / ROWS {
            // SAFETY: group `g` lies inside the weight (rows checked by the caller).
            let wg = unsafe { t.w.as_ptr().add(g * nb * GROUP_BLOCK) };
            let mut r = t.ms.start;
            unsafe {
                while r + 4 <= t.ms.end {
                    if tiled {
                        rows::<4, true>(t, wg, g, r);
                    } else {
                        rows::<4, false>(t, wg, g, r);
                    }
                    r += 4;
                }
                if r + 2 <= t.ms.end {
                    if tiled {
                        rows::<2, true>(t, wg, g, r);
                    } else {
                        rows::<2, false>(t, wg, g, r);
                    }
                    r += 2;
                }
                if r < t.ms.end {
                    if tiled {
                        rows::<1, true>(t, wg, g, r);
                    } else {
                        rows::<1, false>(t, wg, g, r);
                    }
                }
            }
        }
    }

    /// Activation rows of a tile from which [`tile_decoded`] takes the tile (products of 8 or
    /// more rows only: it does the float operations of ggml's tiled order).
    const DECODED_MIN_ROWS: usize = 8;

    /// Super-blocks of a group that [`tile_decoded`] decodes at a time (`64 * 64` bytes of
    /// codes each).
    const CHUNK: usize = 2;

    /// The 5-bit codes of super-block `blk` of a group into `codes` (64 words): word
    /// `2(8c + t)` holds the low-nibble codes of code word `8c + t` (sub-block `2c`), word
    /// `2(8c + t) + 1` its high-nibble codes (sub-block `2c + 1`), each byte the code itself.
    ///
    /// # Safety
    /// `blk` points at a whole group block; the CPU has AVX512F.
    #[inline(always)]
    unsafe fn decode(blk: *const u8, codes: &mut [__m512i]) {
        unsafe {
            for tw in 0..8 {
                let mut h = _mm512_loadu_si512(blk.add(QH + 64 * tw) as *const _);
                for c in 0..4 {
                    let v = _mm512_loadu_si512(blk.add(QS + 64 * (8 * c + tw)) as *const _);
                    let (lo, hi) = merge_high(v, h);
                    codes[2 * (8 * c + tw)] = lo;
                    codes[2 * (8 * c + tw) + 1] = hi;
                    h = _mm512_srli_epi32::<2>(h);
                }
            }
        }
    }

    /// A tile of 8 or more activation rows in ggml's tiled order: per group, [`CHUNK`]
    /// super-blocks at a time are decoded once to bytes holding the 5-bit codes, then every
    /// activation row of the tile runs over them (groups of 4 rows; the accumulators go
    /// through the output between chunks, so the float operations and their order are those
    /// of one pass over all super-blocks). The high bits are thus merged once per tile
    /// instead of once per 4 activation rows.
    ///
    /// # Safety
    /// As [`tile`]; `q5k_tiled(t.acts.m)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_decoded(t: &Tile<'_>) {
        let nb = t.acts.k / 256;
        let mut codes = [_mm512_setzero_si512(); 64 * CHUNK];
        for g in t.rows.start / ROWS..t.rows.end / ROWS {
            // SAFETY: group `g` lies inside the weight (rows checked by the caller).
            let wg = unsafe { t.w.as_ptr().add(g * nb * GROUP_BLOCK) };
            let mut b0 = 0;
            while b0 < nb {
                let b1 = (b0 + CHUNK).min(nb);
                for b in b0..b1 {
                    // SAFETY: block `b` of group `g` lies inside the weight.
                    unsafe { decode(wg.add(b * GROUP_BLOCK), &mut codes[64 * (b - b0)..]) };
                }
                // The next chunk's weights (the next group's after the last chunk: the tile's
                // next group or, mostly, the next tile's), while the rows run over this one.
                prefetch_l1(wg.wrapping_add(b1 * GROUP_BLOCK), CHUNK * GROUP_BLOCK);
                let mut r = t.ms.start;
                // SAFETY: the rows lie in the tile.
                unsafe {
                    while r + 4 <= t.ms.end {
                        rows_decoded::<4>(t, wg, &codes, g, r, b0..b1);
                        r += 4;
                    }
                    if r + 2 <= t.ms.end {
                        rows_decoded::<2>(t, wg, &codes, g, r, b0..b1);
                        r += 2;
                    }
                    if r < t.ms.end {
                        rows_decoded::<1>(t, wg, &codes, g, r, b0..b1);
                    }
                }
                b0 = b1;
            }
        }
    }

    /// Activation rows `r..r + R` against super-blocks `bs` of the 16 weight rows of group `g`
    /// (at `wg`; their codes decoded in `codes`), in ggml's tiled order: the sums so far are
    /// read from the output (unless `bs` starts the row) and written back.
    ///
    /// # Safety
    /// As [`tile_decoded`]; `r + R <= t.ms.end`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // `i` indexes the activations and the sums alike
    unsafe fn rows_decoded<const R: usize>(
        t: &Tile<'_>,
        wg: *const u8,
        codes: &[__m512i],
        g: usize,
        r: usize,
        bs: std::ops::Range<usize>,
    ) {
        let a = t.acts;
        let (k, nb) = (a.k, a.k / 256);
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            if bs.start > 0 {
                for i in 0..R {
                    acc[i] = _mm512_loadu_ps(t.out.add((r + i) * t.ldo + g * ROWS));
                }
            }
            for b in bs.clone() {
                let blk = wg.add(b * GROUP_BLOCK);
                let cw = codes.as_ptr().add(64 * (b - bs.start));
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i));
                let pairs = bsum_pairs::<R>(a, r, b);
                let mut isum = [_mm512_setzero_si512(); R];
                let mut msum = [_mm512_setzero_si512(); R];
                for c in 0..4 {
                    let mut s1 = [_mm512_setzero_si512(); R];
                    let mut s2 = [_mm512_setzero_si512(); R];
                    for tw in 0..8 {
                        let lo = *cw.add(2 * (8 * c + tw));
                        let hi = *cw.add(2 * (8 * c + tw) + 1);
                        for i in 0..R {
                            let y = a.qs.as_ptr().add((r + i) * k + 256 * b + 64 * c + 4 * tw)
                                as *const i32;
                            s1[i] = _mm512_dpbusd_epi32(
                                s1[i],
                                lo,
                                _mm512_set1_epi32(y.read_unaligned()),
                            );
                            s2[i] = _mm512_dpbusd_epi32(
                                s2[i],
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
                        let pair = _mm512_set1_epi32(pairs[i][c]);
                        msum[i] = _mm512_dpwssd_epi32(msum[i], mins, pair);
                        isum[i] = _mm512_add_epi32(
                            isum[i],
                            _mm512_add_epi32(
                                _mm512_mullo_epi32(s1[i], sc1),
                                _mm512_mullo_epi32(s2[i], sc2),
                            ),
                        );
                    }
                }
                for i in 0..R {
                    let dy = _mm512_set1_ps(*a.d.get_unchecked((r + i) * nb + b));
                    let fi = _mm512_cvtepi32_ps(isum[i]);
                    let fm = _mm512_cvtepi32_ps(msum[i]);
                    let s = _mm512_fnmadd_ps(dmin, fm, _mm512_mul_ps(fi, d));
                    acc[i] = _mm512_fmadd_ps(s, dy, acc[i]);
                }
            }
            for i in 0..R {
                _mm512_storeu_ps(t.out.add((r + i) * t.ldo + g * ROWS), acc[i]);
            }
        }
    }

    /// Activation rows `r..r + R` against the 16 weight rows of group `g` (at `wg`).
    ///
    /// # Safety
    /// As [`tile`]; `r + R <= t.ms.end`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // `i` indexes the activations and the sums alike
    unsafe fn rows<const R: usize, const TILED: bool>(
        t: &Tile<'_>,
        wg: *const u8,
        g: usize,
        r: usize,
    ) {
        let a = t.acts;
        let (k, nb) = (a.k, a.k / 256);
        // Independent dot-product chains per sum (two for one row: `vpdpbusd`'s latency
        // otherwise bounds a single-row product).
        let chains = if R == 1 { 2 } else { 1 };
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            let mut accm = [_mm512_setzero_ps(); R];
            // Each of the block's 45 cache lines is prefetched once: the 5 of the scales here,
            // one code word per step below and the high-bit words with the first pair. (The
            // address may lie past the weight: prefetches do not fault.)
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
                let pairs = bsum_pairs::<R>(a, r, b);
                let mut isum = [_mm512_setzero_si512(); R];
                let mut msum = [_mm512_setzero_si512(); R];
                for c in 0..4 {
                    let shift = _mm_cvtsi32_si128(2 * c as i32);
                    let mut s1 = [[_mm512_setzero_si512(); 2]; R];
                    let mut s2 = [[_mm512_setzero_si512(); 2]; R];
                    for tw in 0..8 {
                        if pf {
                            _mm_prefetch::<_MM_HINT_T0>(
                                blk.wrapping_add(PREFETCH + QS + 64 * (8 * c + tw)) as *const i8,
                            );
                            if c == 0 {
                                _mm_prefetch::<_MM_HINT_T0>(
                                    blk.wrapping_add(PREFETCH + QH + 64 * tw) as *const i8,
                                );
                            }
                        }
                        let v = _mm512_loadu_si512(blk.add(QS + 64 * (8 * c + tw)) as *const _);
                        let h = _mm512_srl_epi32(
                            _mm512_loadu_si512(blk.add(QH + 64 * tw) as *const _),
                            shift,
                        );
                        let (lo, hi) = merge_high(v, h);
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
                        isum[i] = _mm512_add_epi32(
                            isum[i],
                            _mm512_add_epi32(
                                _mm512_mullo_epi32(p1, sc1),
                                _mm512_mullo_epi32(p2, sc2),
                            ),
                        );
                    }
                }
                for i in 0..R {
                    let dy = _mm512_set1_ps(*a.d.get_unchecked((r + i) * nb + b));
                    let fi = _mm512_cvtepi32_ps(isum[i]);
                    let fm = _mm512_cvtepi32_ps(msum[i]);
                    if TILED {
                        let s = _mm512_fnmadd_ps(dmin, fm, _mm512_mul_ps(fi, d));
                        acc[i] = _mm512_fmadd_ps(s, dy, acc[i]);
                    } else {
                        acc[i] = _mm512_fmadd_ps(fi, _mm512_mul_ps(d, dy), acc[i]);
                        accm[i] = _mm512_fmadd_ps(fm, _mm512_mul_ps(dmin, dy), accm[i]);
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
