//! `Q6_K` weights repacked at load into groups of 16 interleaved rows (the layout family of
//! [`super::packed`]).
//!
//! Layout of a packed matrix `[rows, cols]` (`rows` a multiple of 16, the same byte count as
//! GGUF's): group `g` (rows `16g..16g + 16`) is stored whole, then group `g + 1`; within a group,
//! super-block `b` (values `256b..256b + 256` of every row) takes [`GROUP_BLOCK`] = 3360 bytes:
//! - bytes `0..32`: the 16 rows' `d` (`f16`), row order;
//! - bytes `32..288`: the sub-block scales (`i8`), `[sub-block s: 16][row: 16]`;
//! - bytes `288..3360`: for each half `h` of the super-block (128 values), 24 words of 64
//!   bytes, 4 bytes per row (lane `i` = bytes `4i..4i + 4` = row `16g + i`): words `t = 0..8`
//!   hold GGUF's `ql[64h + 4t..]`, words `8 + t` its `ql[64h + 32 + 4t..]`, words `16 + t` its
//!   `qh[32h + 4t..]`. So, per byte, code `q1` (value `128h + 4t + j`) is the low nibble of
//!   word `t` with bits 0-1 of word `16 + t` above it, `q2` (value `+32`) the low nibble of
//!   word `8 + t` with bits 2-3, `q3` (`+64`) the high nibble of word `t` with bits 4-5, `q4`
//!   (`+96`) the high nibble of word `8 + t` with bits 6-7 (ggml's `dequantize_row_q6_K`).
//!
//! The products compute, per row and super-block, the exact integer
//! `Σ_s sc_s·(Σ q·y - 32·bsum_s)` against `Q8_K` activations, as the unpacked kernels do, and
//! apply it with the portable `Q6_K` kernel's float operations (ggml's tiled order,
//! `fma(isum·d, dy, acc)`, for products of 8 or more rows, [`super::q6k_tiled`];
//! `acc + d·dy·isum` below that), so packed results equal the unpacked portable kernel's bit
//! for bit on every backend. (The unpacked SIMD kernels of fewer than 8 rows sum in ggml's
//! eight-lane `ggml_vec_dot_q6_K_q8_K` order instead, and differ from both by rounding.)

use super::packed::ROWS;
use super::scalar::f16_at;
use super::{Acts, Tile};

/// Bytes of one super-block of a 16-row group.
pub(crate) const GROUP_BLOCK: usize = 288 + 2 * 24 * 64;
/// Offset of the sub-block scales in a group block.
const SC: usize = 32;
/// Offset of the code words.
const QS: usize = 288;
/// Bytes of a GGUF `Q6_K` block.
const GGUF_BLOCK: usize = 210;

/// The packed bytes of GGUF `Q6_K` `bytes` `[rows, cols]` (`rows % 16 == 0`), the same length.
/// Groups are packed in parallel on the rayon pool.
pub(crate) fn repack(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    super::packed::repack_superblocks(
        bytes,
        rows,
        cols,
        (GGUF_BLOCK, GROUP_BLOCK),
        |db, i, blk| {
            db[2 * i..2 * i + 2].copy_from_slice(&blk[208..210]);
            for s in 0..16 {
                db[SC + 16 * s + i] = blk[192 + s];
            }
            for h in 0..2 {
                for t in 0..8 {
                    let words = [64 * h + 4 * t, 64 * h + 32 + 4 * t, 128 + 32 * h + 4 * t];
                    for (w, &from) in words.iter().enumerate() {
                        let at = QS + 64 * (24 * h + 8 * w + t) + 4 * i;
                        db[at..at + 4].copy_from_slice(&blk[from..from + 4]);
                    }
                }
            }
        },
    )
}

/// The 6-bit code of value `v` (0..256) of row lane `i` in a packed group block.
#[inline(always)]
fn code(blk: &[u8], i: usize, v: usize) -> i32 {
    let (h, j, l) = (v / 128, (v % 128) / 32, v % 32);
    let (t, byte) = (l / 4, l % 4);
    let word = |w: usize| blk[QS + 64 * (24 * h + 8 * w + t) + 4 * i + byte];
    let lo = match j {
        0 => word(0) & 0xF,
        1 => word(1) & 0xF,
        2 => word(0) >> 4,
        _ => word(1) >> 4,
    };
    let hi = (word(2) >> (2 * j)) & 3;
    (lo | (hi << 4)) as i32
}

/// Row `r` of a packed matrix with `cols` columns, dequantized into `out` (`cols` values;
/// exactly ggml's `dequantize_row_q6_K` values).
pub(crate) fn dequantize_row(packed: &[u8], cols: usize, r: usize, out: &mut [f32]) {
    let nb = cols / 256;
    let (g, i) = (r / ROWS, r % ROWS);
    let grp = &packed[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK];
    for (b, o) in out.chunks_exact_mut(256).enumerate() {
        let blk = &grp[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
        let d = f16_at(blk, 2 * i);
        for (v, y) in o.iter_mut().enumerate() {
            let sc = blk[SC + 16 * (v / 16) + i] as i8 as f32;
            *y = d * sc * (code(blk, i, v) - 32) as f32;
        }
    }
}

/// The exact integer `Σ_s sc_s·(Σ q·y - 32·bsum_s)` of super-block `b` for row lane `i` and
/// activation row `r`.
#[inline(always)]
fn block_isum(blk: &[u8], a: &Acts, r: usize, b: usize, i: usize) -> i32 {
    let y = &a.qs[r * a.k + 256 * b..][..256];
    let bsums = &a.bsums[r * (a.k / 16) + 16 * b..][..16];
    let mut isum = 0i32;
    for s in 0..16 {
        let mut sub = 0i32;
        for (v, &yv) in y.iter().enumerate().skip(16 * s).take(16) {
            sub += code(blk, i, v) * yv as i32;
        }
        isum += (blk[SC + 16 * s + i] as i8 as i32) * (sub - 32 * bsums[s] as i32);
    }
    isum
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
    let tiled = super::q6k_tiled(a.m);
    for g in t.rows.start / ROWS..t.rows.end / ROWS {
        let grp = &t.w[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK];
        for r in t.ms.clone() {
            for i in 0..ROWS {
                let mut acc = 0f32;
                for b in 0..nb {
                    let blk = &grp[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
                    let (d, dy) = (f16_at(blk, 2 * i), a.d[r * nb + b]);
                    let isum = block_isum(blk, a, r, b, i);
                    acc = if tiled {
                        (isum as f32 * d).mul_add(dy, acc)
                    } else {
                        acc + d * dy * isum as f32
                    };
                }
                // SAFETY: the caller guarantees `out` is valid for `[m, ldo]` and that the
                // tile's elements belong to it only.
                unsafe { *t.out.add(r * t.ldo + g * ROWS + i) = acc };
            }
        }
    }
}

/// The AVX-512 kernel (`vpdpbusd` on codes rebuilt from nibbles and 2-bit high parts:
/// AVX512F + AVX512-VNNI).
///
/// Per group of 4 code vectors (a word of low nibbles of codes `j = 0, 2`, one of `j = 1, 3`,
/// one of their high bits) the high bits are moved to bits 4-5 and masked (7 operations for
/// the 4 vectors), and each code is then one `vpternlogd` (`(nibbles & 0x0F) | high`) after a
/// shift for `j = 2, 3`: 13 logic operations per 4 `vpdpbusd` inputs.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::Tile;
    use super::{GROUP_BLOCK, QS, ROWS, SC};

    /// Bytes ahead of the super-block in use that a decode product prefetches (about 3
    /// super-blocks). Measured on a 2-core Zen 5 VM, `Q6_K` 32768 x 2048 (beyond the L3), one
    /// activation row: 14 GB/s on one thread without prefetch (the three interleaved word
    /// streams defeat the hardware prefetcher), 33 at 4 KiB, 48 at 8 KiB, 47 at 12 KiB, 41 at
    /// 32 KiB; on two threads 59, 63, 78, 79, 65 GB/s.
    const PREFETCH: usize = 10 * 1024;

    /// `vpternlogd` truth table of `(a & c) | b`.
    const A_AND_C_OR_B: i32 = 0xEC;

    /// # Safety
    /// See [`super::super::TileFn`]; the tile's rows start and end on multiples of [`ROWS`];
    /// the activations are `Q8_K`; the CPU has AVX512F and AVX512-VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(crate) unsafe fn tile(t: &Tile<'_>) {
        let a = t.acts;
        let nb = a.k / 256;
        let tiled = super::super::q6k_tiled(a.m);
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
                while r < t.ms.end {
                    if tiled {
                        rows::<1, true>(t, wg, g, r);
                    } else {
                        rows::<1, false>(t, wg, g, r);
                    }
                    r += 1;
                }
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
        let m4 = _mm512_set1_epi8(0x0F);
        let m30 = _mm512_set1_epi8(0x30);
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            // Each of the block's cache lines is prefetched once: the 5 of the scales here, the
            // 3 code words of each step below. (The address may lie past the weight:
            // prefetches do not fault.)
            let pf = super::super::streams_weights(a.m);
            for b in 0..nb {
                let blk = wg.add(b * GROUP_BLOCK);
                if pf {
                    for l in 0..QS.div_ceil(64) {
                        _mm_prefetch::<_MM_HINT_T0>(
                            blk.wrapping_add(PREFETCH + 64 * l) as *const i8
                        );
                    }
                }
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let mut isum = [_mm512_setzero_si512(); R];
                for h in 0..2 {
                    let base = blk.add(QS + 64 * 24 * h);
                    let word = |w: usize| _mm512_loadu_si512(base.add(64 * w) as *const _);
                    for half in 0..2 {
                        // `sums[i][j]`: sub-block `8h + 2j + half` (code vector `j`'s words
                        // `4·half..4·half + 4`), started at `-32·bsum`.
                        let mut sums = [[_mm512_setzero_si512(); 4]; R];
                        for i in 0..R {
                            let bs = a.bsums.as_ptr().add((r + i) * (k / 16) + 16 * b + 8 * h);
                            for j in 0..4 {
                                sums[i][j] = _mm512_set1_epi32(-32 * *bs.add(2 * j + half) as i32);
                            }
                        }
                        for tw in 4 * half..4 * half + 4 {
                            if pf {
                                for w in [tw, 8 + tw, 16 + tw] {
                                    _mm_prefetch::<_MM_HINT_T0>(
                                        base.wrapping_add(PREFETCH + 64 * w) as *const i8,
                                    );
                                }
                            }
                            let (w0, w1, wh) = (word(tw), word(8 + tw), word(16 + tw));
                            // High bits of code `j` (bits `2j..2j + 2` of `wh`) at bits 4-5.
                            let h0 = _mm512_and_si512(_mm512_slli_epi32::<4>(wh), m30);
                            let h1 = _mm512_and_si512(_mm512_slli_epi32::<2>(wh), m30);
                            let h2 = _mm512_and_si512(wh, m30);
                            let h3 = _mm512_and_si512(_mm512_srli_epi32::<2>(wh), m30);
                            let q = [
                                _mm512_ternarylogic_epi32::<A_AND_C_OR_B>(w0, h0, m4),
                                _mm512_ternarylogic_epi32::<A_AND_C_OR_B>(w1, h1, m4),
                                _mm512_ternarylogic_epi32::<A_AND_C_OR_B>(
                                    _mm512_srli_epi32::<4>(w0),
                                    h2,
                                    m4,
                                ),
                                _mm512_ternarylogic_epi32::<A_AND_C_OR_B>(
                                    _mm512_srli_epi32::<4>(w1),
                                    h3,
                                    m4,
                                ),
                            ];
                            for i in 0..R {
                                let y = a.qs.as_ptr().add((r + i) * k + 256 * b + 128 * h + 4 * tw);
                                for j in 0..4 {
                                    let yv = _mm512_set1_epi32(
                                        (y.add(32 * j) as *const i32).read_unaligned(),
                                    );
                                    sums[i][j] = _mm512_dpbusd_epi32(sums[i][j], q[j], yv);
                                }
                            }
                        }
                        for j in 0..4 {
                            let s = 8 * h + 2 * j + half;
                            let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                                blk.add(SC + 16 * s) as *const __m128i
                            ));
                            for i in 0..R {
                                isum[i] =
                                    _mm512_add_epi32(isum[i], _mm512_mullo_epi32(sums[i][j], sc));
                            }
                        }
                    }
                }
                for i in 0..R {
                    let dy = _mm512_set1_ps(*a.d.get_unchecked((r + i) * nb + b));
                    let fs = _mm512_cvtepi32_ps(isum[i]);
                    acc[i] = if TILED {
                        _mm512_fmadd_ps(_mm512_mul_ps(fs, d), dy, acc[i])
                    } else {
                        _mm512_add_ps(acc[i], _mm512_mul_ps(_mm512_mul_ps(d, dy), fs))
                    };
                }
            }
            for i in 0..R {
                _mm512_storeu_ps(t.out.add((r + i) * t.ldo + g * ROWS), acc[i]);
            }
        }
    }
}
