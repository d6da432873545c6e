//! `IQ4_XS` weights repacked at load into groups of 16 interleaved rows (the layout family of
//! [`super::packed`]; an `IQ4_XS` sub-block of 32 values is an `IQ4_NL` block without its own
//! `f16` scale, so each sub-block is packed as [`super::packed`] packs an `IQ4_NL` block).
//!
//! GGUF's block (ggml `block_iq4_xs`, 136 bytes): `d: f16, scales_h: u16, scales_l: [u8; 4],
//! qs: [u8; 128]`; sub-block `s` has the 6-bit scale `ls_s` (see [`super::GgufType::Iq4Xs`])
//! and its 32 codes in `qs[16s..16s + 16]` (byte `j`: value `j` low, `j + 16` high), value
//! `d·(ls_s - 32)·KVALUES_IQ4NL[q]` (ggml `dequantize_row_iq4_xs`).
//!
//! Layout of a packed matrix `[rows, cols]` (`rows` a multiple of 16, `cols` of 256): group
//! `g` (rows `16g..16g + 16`) is stored whole, then group `g + 1`; within a group,
//! super-block `b` (values `256b..256b + 256` of every row) takes [`GROUP_BLOCK`] = 2208
//! bytes:
//! - bytes `0..32`: the 16 rows' `d` (`f16`), row order;
//! - bytes `32..160`: the sub-block scales decoded to `i8` `ls_s - 32`, `[sub-block s: 8][row:
//!   16]`;
//! - bytes `160..2208`: the codes as 32 words of 64 bytes, word `4s + c` holding 4 bytes per
//!   row (lane `i` = bytes `4i..4i + 4` = row `16g + i`'s GGUF `qs[16s + 4c..16s + 4c + 4]`):
//!   their low nibbles are values `32s + 4c..` and their high nibbles values `32s + 16 + 4c..`.
//!
//! That is 32 bytes more per 16 rows and super-block than GGUF's 2176 (1.5%): the scales are
//! stored decoded so that the kernels need no bit surgery per token.
//!
//! Products (against `Q8_K` activations, as ggml pairs `IQ4_XS` with `Q8_K`): per row and
//! super-block the exact integer `Σ_s (ls_s - 32)·Σ_j v_j·y_j` (the integers of ggml's
//! `ggml_vec_dot_iq4_xs_q8_K`, `ggml-cpu/arch/x86/quants.c`), where the SIMD kernel of fewer
//! than 8 activation rows takes each `Σ v·y` as `Σ (v + 128)·y - 128·Σy` (unsigned table codes
//! [`super::packed::IQ4NL_U8`] for `vpdpbusd`; `Σy` from the activations' 16-value sums), and
//! the one of 8 or more as `Σ v·(y + 128) - 128·Σv` (signed values against the activations
//! biased to unsigned bytes; `Σv` does not depend on the activation row, so its share is made
//! once per tile), then one fused multiply-add `acc = fma(isum, d·dy, acc)`. That float order is not the unpacked kernels' (ggml's AVX2
//! kernel keeps eight lanes of partial sums per row and adds them at the end; the portable one
//! applies the scale per sub-block), so packed and unpacked agree to rounding;
//! [`tile_scalar`] does the AVX-512 kernel's integer and float operations in the same order
//! (bit for bit).

use super::packed::{IQ4NL_U8, ROWS};
use super::scalar::{f16_at, iq4xs_scale};
use super::{Acts, Tile, KVALUES_IQ4NL};

/// Bytes of one super-block of a 16-row group.
pub(crate) const GROUP_BLOCK: usize = QS + 64 * 32;
/// Offset of the decoded scales in a group block.
const SC: usize = 32;
/// Offset of the code words.
const QS: usize = 160;
/// Bytes of a GGUF `IQ4_XS` block.
const GGUF_BLOCK: usize = 136;

/// The packed bytes of GGUF `IQ4_XS` `bytes` `[rows, cols]` (`rows % 16 == 0`). Groups are
/// packed in parallel on the rayon pool.
pub(crate) fn repack(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    super::packed::repack_superblocks(
        bytes,
        rows,
        cols,
        (GGUF_BLOCK, GROUP_BLOCK),
        |db, i, blk| {
            db[2 * i..2 * i + 2].copy_from_slice(&blk[0..2]);
            for s in 0..8 {
                db[SC + 16 * s + i] = (iq4xs_scale(blk, s) - 32) as i8 as u8;
            }
            for w in 0..32 {
                db[QS + 64 * w + 4 * i..][..4].copy_from_slice(&blk[8 + 4 * w..][..4]);
            }
        },
    )
}

/// The code (`0..16`) of value `j` (`0..32`) of sub-block `s` for row lane `i` of a group block.
#[inline(always)]
fn code(blk: &[u8], s: usize, i: usize, j: usize) -> u8 {
    let byte = blk[QS + 64 * (4 * s + (j % 16) / 4) + 4 * i + j % 4];
    if j < 16 {
        byte & 0xF
    } else {
        byte >> 4
    }
}

/// Row `r` of a packed matrix with `cols` columns, dequantized into `out` (`cols` values;
/// exactly ggml's `dequantize_row_iq4_xs` values: `dl = d·(ls - 32)`, then `dl·v`).
pub(crate) fn dequantize_row(packed: &[u8], cols: usize, r: usize, out: &mut [f32]) {
    let nb = cols / 256;
    let (g, i) = (r / ROWS, r % ROWS);
    let grp = &packed[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK];
    for (b, o) in out.chunks_exact_mut(256).enumerate() {
        let blk = &grp[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
        let d = f16_at(blk, 2 * i);
        for (s, o) in o.chunks_exact_mut(32).enumerate() {
            let dl = d * (blk[SC + 16 * s + i] as i8) as f32;
            for (j, v) in o.iter_mut().enumerate() {
                *v = dl * KVALUES_IQ4NL[code(blk, s, i, j) as usize] as f32;
            }
        }
    }
}

/// The exact integer `Σ_s (ls_s - 32)·(Σ_j (v_j + 128)·y_j - 128·Σy)` of super-block `b` for
/// row lane `i` and activation row `r` (that is, `Σ_s (ls_s - 32)·Σ_j v_j·y_j`).
#[inline(always)]
fn block_isum(blk: &[u8], a: &Acts, r: usize, b: usize, i: usize) -> i32 {
    let y = &a.qs[r * a.k + 256 * b..][..256];
    let bsums = &a.bsums[r * (a.k / 16) + 16 * b..][..16];
    let mut isum = 0i32;
    for s in 0..8 {
        let mut p = -128 * (bsums[2 * s] as i32 + bsums[2 * s + 1] as i32);
        for j in 0..32 {
            p += IQ4NL_U8[code(blk, s, i, j) as usize] as i32 * y[32 * s + j] as i32;
        }
        isum += (blk[SC + 16 * s + i] as i8) as i32 * p;
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
    for g in t.rows.start / ROWS..t.rows.end / ROWS {
        let grp = &t.w[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK];
        for r in t.ms.clone() {
            for i in 0..ROWS {
                let mut acc = 0f32;
                for b in 0..nb {
                    let blk = &grp[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
                    let dd = f16_at(blk, 2 * i) * a.d[r * nb + b];
                    acc = (block_isum(blk, a, r, b, i) as f32).mul_add(dd, acc);
                }
                // SAFETY: the caller guarantees `out` is valid for `[m, ldo]` and that the
                // tile's elements belong to it only.
                unsafe { *t.out.add(r * t.ldo + g * ROWS + i) = acc };
            }
        }
    }
}

/// The AVX-512 kernel (AVX512F, AVX512BW for `vpshufb`, AVX512-VNNI for `vpdpbusd`): the
/// blocking of the packed `Q4_0` kernel (activation rows 8 at a time, blocks in chunks that
/// stay in L1 for more than 8 rows), each sub-block's codes unpacked and looked up once for
/// all the rows of a pass.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::packed::avx512::{
        block_sums, chain, iq4_table, lookup, nibbles, prefetch_ahead, prefetch_l1, remainder_rows,
        unroll8,
    };
    use super::super::{Tile, KVALUES_IQ4NL};
    use super::{GROUP_BLOCK, QS, ROWS, SC};

    /// # Safety
    /// See [`super::super::TileFn`]; the tile's rows start and end on multiples of [`ROWS`];
    /// the activations are `Q8_K`; the CPU has AVX512F, AVX512BW and AVX512-VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(crate) unsafe fn tile(t: &Tile<'_>) {
        if t.ms.len() >= DECODED_MIN_ROWS {
            // SAFETY: as this function's.
            return unsafe { tile_decoded(t) };
        }
        unsafe { tile_rows(t) }
    }

    /// Activation rows of a tile from which [`tile`] decodes the codes once per tile
    /// ([`tile_decoded`]) instead of once per pass of 8 rows.
    const DECODED_MIN_ROWS: usize = 8;

    /// Super-blocks of a group that [`tile_decoded`] decodes at a time (`64 * 64` bytes of
    /// codes each).
    const CHUNK: usize = 2;

    /// Super-block `blk` of a group decoded for [`rows_decoded`]: into `codes` (64 words) the
    /// signed values `KVALUES_IQ4NL[q]`, word `8s + j` holding those of sub-block `s`'s
    /// activation bytes `4j..4j + 4` (the [`nibbles`] order), one value a byte; into `sc` (8
    /// words) the sub-block scales `ls_s - 32` as `i32` lanes; and the returned word, the
    /// activation-independent part of the integer sum, `-128·Σ_s (ls_s - 32)·Σ_j v_j` per row
    /// lane (see [`tile_decoded`]).
    ///
    /// # Safety
    /// `blk` points at a whole group block; the CPU has AVX512F, AVX512BW and AVX512-VNNI.
    #[inline(always)]
    unsafe fn decode(blk: *const u8, codes: &mut [__m512i], sc: &mut [__m512i]) -> __m512i {
        unsafe {
            let table =
                _mm512_broadcast_i32x4(_mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i));
            let ones = _mm512_set1_epi8(1);
            let mut c = _mm512_setzero_si512();
            for s in 0..8 {
                let mut w = nibbles(blk.add(QS + 256 * s));
                lookup(&mut w, table);
                // `Σ_j v_j` of the sub-block, per row lane (two chains).
                let (mut v0, mut v1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for j in 0..4 {
                    v0 = _mm512_dpbusd_epi32(v0, ones, w[2 * j]);
                    v1 = _mm512_dpbusd_epi32(v1, ones, w[2 * j + 1]);
                }
                let scs = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(SC + 16 * s) as *const _));
                c = _mm512_add_epi32(c, _mm512_mullo_epi32(_mm512_add_epi32(v0, v1), scs));
                codes[8 * s..8 * s + 8].copy_from_slice(&w);
                sc[s] = scs;
            }
            _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<7>(c))
        }
    }

    /// A tile of 8 or more activation rows: per group, [`CHUNK`] super-blocks at a time are
    /// decoded once ([`decode`]), then every activation row of the tile runs over them (passes
    /// of 8 rows; the accumulators go through the output between chunks, so the float
    /// operations and their order are those of one pass over all super-blocks, the portable
    /// twin's). The integers are the same exact `Σ_s (ls_s - 32)·Σ_j v_j·y_j`, taken the other
    /// way round from [`tile_rows`]: the signed values against the activations biased to
    /// unsigned bytes `y + 128` ([`super::super::Acts::biased`]) give `Σ (y + 128)·v`, and
    /// `-128·Σ_s (ls_s - 32)·Σ_j v_j`, which does not depend on the activation row, is made
    /// once per tile and super-block by [`decode`] (no per-row offset from the activation
    /// sums, and no unpacking or table lookup per pass).
    ///
    /// # Safety
    /// As [`tile`]; `t.ms.len() >= 8`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_decoded(t: &Tile<'_>) {
        let nb = t.acts.k / 256;
        let yu = t.acts.biased().as_ptr();
        let mut codes = [_mm512_setzero_si512(); 64 * CHUNK];
        let mut sc = [_mm512_setzero_si512(); 8 * CHUNK];
        let mut cst = [_mm512_setzero_si512(); CHUNK];
        for g in t.rows.start / ROWS..t.rows.end / ROWS {
            // SAFETY: group `g` lies inside the weight (rows checked by the caller).
            let wg = unsafe { t.w.as_ptr().add(g * nb * GROUP_BLOCK) };
            let mut b0 = 0;
            while b0 < nb {
                let b1 = (b0 + CHUNK).min(nb);
                for b in b0..b1 {
                    let j = b - b0;
                    // SAFETY: block `b` of group `g` lies inside the weight.
                    cst[j] = unsafe {
                        decode(
                            wg.add(b * GROUP_BLOCK),
                            &mut codes[64 * j..64 * j + 64],
                            &mut sc[8 * j..8 * j + 8],
                        )
                    };
                }
                // The next chunk's weights (the next group's after the last chunk: the tile's
                // next group or, mostly, the next tile's), while the rows run over this one.
                prefetch_l1(wg.wrapping_add(b1 * GROUP_BLOCK), CHUNK * GROUP_BLOCK);
                let d = Decoded {
                    codes: &codes,
                    sc: &sc,
                    cst: &cst,
                    yu,
                };
                let mut r = t.ms.start;
                // SAFETY: the rows lie in the tile.
                unsafe {
                    while r + 8 <= t.ms.end {
                        rows_decoded::<8>(t, wg, &d, g, r, b0..b1);
                        r += 8;
                    }
                    remainder_rows!(t.ms.end - r, R => rows_decoded::<R>(t, wg, &d, g, r, b0..b1));
                }
                b0 = b1;
            }
        }
    }

    /// A chunk of super-blocks decoded by [`decode`], and the biased activations.
    struct Decoded<'a> {
        /// 64 words per super-block.
        codes: &'a [__m512i],
        /// 8 words per super-block.
        sc: &'a [__m512i],
        /// 1 word per super-block.
        cst: &'a [__m512i],
        /// [`super::super::Acts::biased`].
        yu: *const u8,
    }

    /// Activation rows `r..r + R` (`R <= 8`) against super-blocks `bs` of the 16 weight rows
    /// of group `g` (at `wg`; decoded in `d`): the sums so far are read from the output
    /// (unless `bs` starts the row) and written back.
    ///
    /// # Safety
    /// As [`tile_decoded`]; `r + R <= t.ms.end`.
    #[inline(always)]
    unsafe fn rows_decoded<const R: usize>(
        t: &Tile<'_>,
        wg: *const u8,
        d: &Decoded<'_>,
        g: usize,
        r: usize,
        bs: std::ops::Range<usize>,
    ) {
        let a = t.acts;
        let (k, nb) = (a.k, a.k / 256);
        unsafe {
            let out = t.out.add(r * t.ldo + g * ROWS);
            let mut acc = [_mm512_setzero_ps(); R];
            if bs.start > 0 {
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_loadu_ps(out.add(i * t.ldo));
                }
            }
            let y0 = d.yu.add(r * k);
            let dy = a.d.as_ptr().add(r * nb);
            for b in bs.clone() {
                let j = b - bs.start;
                let blk = wg.add(b * GROUP_BLOCK);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let cw = d.codes.as_ptr().add(64 * j);
                let mut isum = [d.cst[j]; R];
                for s in 0..8 {
                    let mut p = [_mm512_setzero_si512(); R];
                    for w in 0..8 {
                        let code = *cw.add(8 * s + w);
                        unroll8!(R, i => {
                            let y = y0.add(i * k + 256 * b + 32 * s + 4 * w) as *const i32;
                            let yb = _mm512_set1_epi32(y.read_unaligned());
                            p[i] = _mm512_dpbusd_epi32(p[i], yb, code);
                        });
                    }
                    let sc = d.sc[8 * j + s];
                    unroll8!(R, i => {
                        isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(p[i], sc));
                    });
                }
                unroll8!(R, i => {
                    let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*dy.add(i * nb + b)));
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), dd, acc[i]);
                });
            }
            for (i, v) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * t.ldo), *v);
            }
        }
    }

    /// The kernel of fewer than 8 activation rows: the blocking of the packed `Q4_0` kernel
    /// (each sub-block's codes unpacked and looked up once for all the rows of the tile).
    ///
    /// # Safety
    /// As [`tile`]; `t.ms.len() < 8`.
    #[inline(always)]
    unsafe fn tile_rows(t: &Tile<'_>) {
        let nb = t.acts.k / 256;
        for g in t.rows.start / ROWS..t.rows.end / ROWS {
            // SAFETY: group `g` lies inside the weight (rows checked by the caller).
            let wg = unsafe { t.w.as_ptr().add(g * nb * GROUP_BLOCK) };
            let r = t.ms.start;
            unsafe { remainder_rows!(t.ms.len(), R => rows::<R>(t, wg, g, r, 0..nb)) };
        }
    }

    /// Super-blocks `bs` of activation rows `r..r + R` (`R <= 8`) against the 16 weight rows
    /// of group `g` (at `wg`); the accumulators start at zero for the first super-block and
    /// from the output (the sums of super-blocks `0..bs.start`) otherwise.
    ///
    /// # Safety
    /// As [`tile`]; `r + R <= t.ms.end`, `bs.end <= k / 256`, and for `bs.start > 0` the
    /// output holds the sums of the super-blocks before.
    #[inline(always)]
    unsafe fn rows<const R: usize>(
        t: &Tile<'_>,
        wg: *const u8,
        g: usize,
        r: usize,
        bs: std::ops::Range<usize>,
    ) {
        let a = t.acts;
        let (k, nb) = (a.k, a.k / 256);
        // As the packed `Q4_0` kernel: the tile's first pass over a group streams it.
        let pf = r == t.ms.start;
        unsafe {
            let table = iq4_table();
            let out = t.out.add(r * t.ldo + g * ROWS);
            let mut acc = [_mm512_setzero_ps(); R];
            if bs.start > 0 {
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_loadu_ps(out.add(i * t.ldo));
                }
            }
            let y0 = a.qs.as_ptr().add(r * k);
            let bsums = a.bsums.as_ptr().add(r * (k / 16));
            let dy = a.d.as_ptr().add(r * nb);
            for b in bs {
                let blk = wg.add(b * GROUP_BLOCK);
                if pf {
                    prefetch_ahead(blk, GROUP_BLOCK);
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let mut isum = [_mm512_setzero_si512(); R];
                for s in 0..8 {
                    let mut w = nibbles(blk.add(QS + 256 * s));
                    lookup(&mut w, table);
                    let sc =
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(SC + 16 * s) as *const _));
                    unroll8!(R, i => {
                        let y = y0.add(i * k + 256 * b + 32 * s) as *const i32;
                        let bs2 = bsums.add(i * (k / 16) + 16 * b + 2 * s);
                        let off = -128 * (*bs2 as i32 + *bs2.add(1) as i32);
                        let p = if R >= 4 {
                            chain(&w, y, off)
                        } else {
                            block_sums(&w, y, off)
                        };
                        isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(p, sc));
                    });
                }
                unroll8!(R, i => {
                    let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*dy.add(i * nb + b)));
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), dd, acc[i]);
                });
            }
            for (i, v) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * t.ldo), *v);
            }
        }
    }
}
