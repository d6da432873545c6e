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
    use rayon::prelude::*;
    let nb = cols / 256;
    let row_bytes = nb * GGUF_BLOCK;
    let mut out = vec![0u8; rows / ROWS * nb * GROUP_BLOCK];
    if nb == 0 {
        return out;
    }
    out.par_chunks_exact_mut(nb * GROUP_BLOCK)
        .zip(bytes.par_chunks_exact(ROWS * row_bytes))
        .for_each(|(dst, src)| {
            for (i, row) in src.chunks_exact(row_bytes).enumerate() {
                for (b, blk) in row.chunks_exact(GGUF_BLOCK).enumerate() {
                    let db = &mut dst[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
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
                }
            }
        });
    out
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
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::Tile;
    use super::{GROUP_BLOCK, QS, ROWS, SC};

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
            for b in 0..nb {
                let blk = wg.add(b * GROUP_BLOCK);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let mut isum = [_mm512_setzero_si512(); R];
                for h in 0..2 {
                    let base = blk.add(QS + 64 * 24 * h);
                    let word = |w: usize| _mm512_loadu_si512(base.add(64 * w) as *const _);
                    // Sub-block `s` = code vector `j`'s words `4·half..4·half + 4`.
                    for half in 0..2 {
                        for j in 0..4 {
                            let s = 8 * h + 2 * j + half;
                            let mut sums = [_mm512_setzero_si512(); R];
                            for i in 0..R {
                                let bs = *a.bsums.get_unchecked((r + i) * (k / 16) + 16 * b + s);
                                sums[i] = _mm512_set1_epi32(-32 * bs as i32);
                            }
                            for tw in 4 * half..4 * half + 4 {
                                // (nibble & 0x0F) | (two high bits moved to bits 4-5 & 0x30).
                                let (wq, wh) = (word(tw + 8 * (j % 2)), word(16 + tw));
                                let lo = if j < 2 {
                                    wq
                                } else {
                                    _mm512_srli_epi32::<4>(wq)
                                };
                                let hi = match j {
                                    0 => _mm512_slli_epi32::<4>(wh),
                                    1 => _mm512_slli_epi32::<2>(wh),
                                    2 => wh,
                                    _ => _mm512_srli_epi32::<2>(wh),
                                };
                                let q = _mm512_or_si512(
                                    _mm512_and_si512(lo, m4),
                                    _mm512_and_si512(hi, m30),
                                );
                                for i in 0..R {
                                    let y =
                                        a.qs.as_ptr()
                                            .add((r + i) * k + 256 * b + 128 * h + 32 * j + 4 * tw)
                                            as *const i32;
                                    let yv = _mm512_set1_epi32(y.read_unaligned());
                                    sums[i] = _mm512_dpbusd_epi32(sums[i], q, yv);
                                }
                            }
                            let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                                blk.add(SC + 16 * s) as *const __m128i
                            ));
                            for i in 0..R {
                                isum[i] =
                                    _mm512_add_epi32(isum[i], _mm512_mullo_epi32(sums[i], sc));
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
