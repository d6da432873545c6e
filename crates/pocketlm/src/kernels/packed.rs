//! Weights repacked at load into groups of 16 interleaved rows, for products whose output
//! lanes are weight rows (as llama.cpp's `ggml-cpu/repack.cpp` interleaves 4 or 8 rows of
//! `Q4_0`/`Q4_K` for its `ggml_gemm_*` kernels; here 16 rows fill one 512-bit register of
//! `i32` lanes).
//!
//! Layout of a packed matrix `[rows, cols]` (`rows` a multiple of 16, same byte count as the
//! GGUF layout): group `g` (rows `16g..16g + 16`) is stored whole, then group `g + 1`; within a
//! group, block `b` (values `32b..32b + 32` of every row) is `16 × f16` scales (row order)
//! followed by the quants as 64-byte words, word `c` holding 4 bytes per row (lane `i` =
//! bytes `4i..4i + 4` = row `16g + i`):
//! - `Q4_0` (288 bytes a block): 4 words; byte `t` of row `i` in word `c` is the original
//!   `qs[4c + t]` of that row, so its low nibble is value `4c + t` and its high nibble value
//!   `16 + 4c + t` (values `0..16`, meaning `q - 8`).
//! - `Q8_0` (544 bytes a block): 8 words; byte `t` of row `i` in word `c` is value `4c + t`
//!   plus 128 (`q ^ 0x80`, so `0..=255` as unsigned).
//! - `Q4_1` (320 bytes a block): `16 × f16` scales `d`, then `16 × f16` minimums `m`, then 4
//!   words as for `Q4_0` (values `0..16`, meaning `d·q + m`).
//! - `IQ4_NL` (288 bytes a block): `Q4_0`'s bytes exactly (the GGUF block is `Q4_0`'s, ggml
//!   `block_iq4_nl`); a code `q` means `KVALUES_IQ4NL[q]` instead of `q - 8`.
//!
//! A product then takes, per block and activation row, 8 `u8 × i8` dot products of 4 values
//! (`vpdpbusd`), each against 4 activation bytes broadcast to every lane, giving the 16 rows'
//! integer sums side by side with no horizontal reduction. The offsets of the unsigned codes
//! (`-8·Σy` for `Q4_0`, `-128·Σy` for `Q8_0` and `IQ4_NL`, `Σy` the block's activation sum)
//! start the integer accumulators, and each block adds `d_w·d_y·Σ` with one fused multiply-add per lane. The
//! integers are exact, so this differs from the unpacked kernels only in float summation
//! order; [`tile_fn`]'s portable version does the very same float operations as the SIMD one.
//!
//! `IQ4_NL` runs `Q4_0`'s kernel with one step more: after the nibbles are unpacked, a
//! `vpshufb` maps each code `q` to the unsigned byte `KVALUES_IQ4NL[q] + 128` (`1..=241`,
//! [`IQ4NL_U8`]), so that `vpdpbusd` against the signed activations gives `Σ (v + 128)·y`, and
//! the `-128·Σy` offset leaves the exact `Σ v·y` of ggml's `ggml_vec_dot_iq4_nl_q8_0`
//! (`ggml-cpu/arch/x86/quants.c`; ggml's AVX2 kernel looks the signed values up the same way).
//! The float operations are `Q4_0`'s (one fused multiply-add `acc = fma(Σ, d·dy, acc)` per
//! block and row), not the unpacked `IQ4_NL` kernels' ggml lane order (two sets of eight lanes,
//! even and odd blocks): packed and unpacked agree to rounding, and the portable packed kernel
//! is the bit-exact twin of the AVX-512 one.
//!
//! `Q4_1` runs `Q4_0`'s kernel with the minimums' term: since `Σ_j (d·q_j + m)·d_y·y_j =
//! d·d_y·Σ + m·s_y` (`Σ` the block's exact integer `Σ q·y`, `s_y = d_y·Σy` the `Q8_1`
//! activation block's sum, ggml's `block_q8_1.s`), each block adds `fma(Σ, d·d_y, acc)` and
//! then `fma(m, s_y, acc)` per lane. That is not ggml's order (`ggml_vec_dot_q4_1_q8_1`
//! converts each 4-value partial sum to float: 8 float accumulators a row, 3 times the vector
//! operations), so the packed products differ from llama.cpp's in rounding only; unpacked
//! (`LoadOptions::no_repack`) and through [`tile_fn_vec_dot`] the kernels keep ggml's order
//! bit for bit: per row, 8 float accumulators, one per 4-value group `L` of ggml's 256-bit
//! vector (values `4L..4L + 4`: word `L % 4`'s low nibbles for `L < 4`, high ones after),
//! each `fma(d·d_y, Σ_L, acc_L)` per block with `Σ_L` the exact integer sum of its 4
//! products; a chain `fma(m, s, accm)` for the minimums (`s = d_y·Σy`); at the end ggml's
//! `hsum_float_8` order `((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3))`, plus `accm`.
//! Either way each row's blocks are summed in the same order whatever the row count, so a
//! batch of sequences gets the bits each sequence gets alone.
//!
//! `Q8_0` has a second kernel that keeps ggml's float order (`ggml_vec_dot_q8_0_q8_0` as the
//! unpacked x86 kernels compute it, [`tile_fn_vec_dot`], `GgufMatrix::repacked_keeping_order`):
//! per row, 8 float accumulators, one per 4-value group `L` (values `4L..4L + 4` = word `L`), each `fma(d·d_y, Σ_L, acc_L)` per block with `Σ_L` the exact
//! integer `Σ q·y` of its 4 values, and at the end `hsum_float_8`'s order as for `Q4_1`. The
//! unsigned codes `q + 128` give `Σ_L (q + 128)·y`, so each `Σ_L` starts from `-128·Σ_L y`
//! (the activations' 4-value sums, computed once per tile).
//!
//! `Q4_K` (256-value super-blocks with 6-bit sub-block scales and mins) has its own group layout
//! and kernels in [`super::packed_q4k`], bit-identical to its unpacked kernels; `Q5_K` in
//! [`super::packed_q5k`]; `Q6_K` in [`super::packed_q6k`]; `IQ4_XS` in
//! [`super::packed_iq4xs`].

use super::{Acts, GgufType, Tile, TileFn, KVALUES_IQ4NL};

/// `KVALUES_IQ4NL[q] + 128` (`1..=241`): the unsigned codes the packed `IQ4_NL` / `IQ4_XS`
/// kernels feed `vpdpbusd` (the `+128` is taken back by a `-128·Σy` offset).
pub(crate) const IQ4NL_U8: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (KVALUES_IQ4NL[i] as i16 + 128) as u8;
        i += 1;
    }
    t
};

/// Rows per interleaved group.
pub(crate) const ROWS: usize = 16;

/// The repacking loop of the 256-value super-block layouts (`Q4_K`, `Q5_K`, `Q6_K`,
/// `IQ4_XS`): `bytes` holds `[rows, cols]` (`rows % 16 == 0`, `cols % 256 == 0`) in GGUF blocks
/// of `gguf_block` bytes; the result holds each 16-row group whole, super-block after
/// super-block, in `group_block` bytes each, and `fill(group_block, i, gguf_block)` writes row
/// `i`'s share of one from that row's GGUF block (the layout's own part). Groups are packed in
/// parallel on the rayon pool.
pub(crate) fn repack_superblocks(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    (gguf_block, group_block): (usize, usize),
    fill: impl Fn(&mut [u8], usize, &[u8]) + Sync,
) -> Vec<u8> {
    use rayon::prelude::*;
    let nb = cols / 256;
    let row_bytes = nb * gguf_block;
    let mut out = vec![0u8; rows / ROWS * nb * group_block];
    if nb == 0 {
        return out;
    }
    out.par_chunks_exact_mut(nb * group_block)
        .zip(bytes.par_chunks_exact(ROWS * row_bytes))
        .for_each(|(dst, src)| {
            for (i, row) in src.chunks_exact(row_bytes).enumerate() {
                for (db, blk) in dst
                    .chunks_exact_mut(group_block)
                    .zip(row.chunks_exact(gguf_block))
                {
                    fill(db, i, blk);
                }
            }
        });
    out
}

/// Whether `dtype` has a packed layout (`Q4_K`'s is in [`super::packed_q4k`], `Q5_K`'s in
/// [`super::packed_q5k`], `Q6_K`'s in [`super::packed_q6k`], `IQ4_XS`'s in
/// [`super::packed_iq4xs`]).
pub(crate) fn supports(dtype: GgufType) -> bool {
    matches!(
        dtype,
        GgufType::Q4_0
            | GgufType::Q4_1
            | GgufType::Q8_0
            | GgufType::Q4K
            | GgufType::Q5K
            | GgufType::Q6K
            | GgufType::Iq4Nl
            | GgufType::Iq4Xs
    )
}

/// `f16` parameters per row and block: the scale `d`, and for `Q4_1` the minimum `m` (each
/// stored as 16 rows' values before the quant words).
const fn params(dtype: GgufType) -> usize {
    match dtype {
        GgufType::Q4_1 => 2,
        _ => 1,
    }
}

/// Quant words (64 bytes each) per block (the kernels take the count, and the `-OFF · Σy`
/// offset of the codes, as const parameters: see [`tile_fn`]).
const fn words(dtype: GgufType) -> usize {
    match dtype {
        GgufType::Q8_0 => 8,
        _ => 4,
    }
}

/// The packed bytes of GGUF `bytes` `[rows, cols]` (`rows % 16 == 0`, `supports(dtype)`).
/// Groups are packed in parallel on the rayon pool.
pub(crate) fn repack(dtype: GgufType, bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    use rayon::prelude::*;
    if dtype == GgufType::Q4K {
        return super::packed_q4k::repack(bytes, rows, cols);
    }
    if dtype == GgufType::Q5K {
        return super::packed_q5k::repack(bytes, rows, cols);
    }
    if dtype == GgufType::Q6K {
        return super::packed_q6k::repack(bytes, rows, cols);
    }
    if dtype == GgufType::Iq4Xs {
        return super::packed_iq4xs::repack(bytes, rows, cols);
    }
    debug_assert!(supports(dtype) && rows.is_multiple_of(ROWS));
    let (ts, nb) = (dtype.type_size(), cols / 32);
    let row_bytes = nb * ts;
    let gblock = ROWS * ts;
    let (words, np) = (words(dtype), params(dtype));
    let hdr = 32 * np;
    let flip = if dtype == GgufType::Q8_0 {
        0x8080_8080u32
    } else {
        0
    };
    let mut out = vec![0u8; bytes.len()];
    if nb == 0 {
        return out;
    }
    out.par_chunks_exact_mut(nb * gblock)
        .zip(bytes.par_chunks_exact(ROWS * row_bytes))
        .for_each(|(dst, src)| {
            for (i, row) in src.chunks_exact(row_bytes).enumerate() {
                for (b, blk) in row.chunks_exact(ts).enumerate() {
                    let db = &mut dst[b * gblock..(b + 1) * gblock];
                    for p in 0..np {
                        db[32 * p + 2 * i..][..2].copy_from_slice(&blk[2 * p..2 * p + 2]);
                    }
                    for c in 0..words {
                        let q = 2 * np + 4 * c;
                        let w = u32::from_le_bytes(blk[q..q + 4].try_into().expect("4 bytes"));
                        db[hdr + 64 * c + 4 * i..][..4].copy_from_slice(&(w ^ flip).to_le_bytes());
                    }
                }
            }
        });
    out
}

/// Row `r` of a packed matrix with `cols` columns, dequantized into `out` (`cols` values;
/// exactly ggml's `dequantize_row_*` values).
pub(crate) fn dequantize_row(
    dtype: GgufType,
    packed: &[u8],
    cols: usize,
    r: usize,
    out: &mut [f32],
) {
    if dtype == GgufType::Q4K {
        return super::packed_q4k::dequantize_row(packed, cols, r, out);
    }
    if dtype == GgufType::Q5K {
        return super::packed_q5k::dequantize_row(packed, cols, r, out);
    }
    if dtype == GgufType::Q6K {
        return super::packed_q6k::dequantize_row(packed, cols, r, out);
    }
    if dtype == GgufType::Iq4Xs {
        return super::packed_iq4xs::dequantize_row(packed, cols, r, out);
    }
    let (ts, nb) = (dtype.type_size(), cols / 32);
    let gblock = ROWS * ts;
    let (g, i) = (r / ROWS, r % ROWS);
    let hdr = 32 * params(dtype);
    let grp = &packed[g * nb * gblock..(g + 1) * nb * gblock];
    for (b, o) in out.chunks_exact_mut(32).enumerate() {
        let blk = &grp[b * gblock..(b + 1) * gblock];
        let d = super::scalar::f16_at(blk, 2 * i);
        for (j, v) in o.iter_mut().enumerate() {
            if dtype == GgufType::Q8_0 {
                let q = (blk[hdr + 64 * (j / 4) + 4 * i + j % 4] ^ 0x80) as i8;
                *v = d * q as f32;
                continue;
            }
            let c = (j % 16) / 4;
            let byte = blk[hdr + 64 * c + 4 * i + j % 4];
            let nib = if j < 16 { byte & 0xF } else { byte >> 4 };
            // ggml's dequantize_row_q4_0 / _q4_1 / _iq4_nl.
            *v = if dtype == GgufType::Q4_1 {
                nib as f32 * d + super::scalar::f16_at(blk, 32 + 2 * i)
            } else if dtype == GgufType::Iq4Nl {
                d * KVALUES_IQ4NL[nib as usize] as f32
            } else {
                (nib as i32 - 8) as f32 * d
            };
        }
    }
}

/// The portable tile function of a packed weight type (the reference the SIMD kernels are
/// tested against: the same integers and the same float operations in the same order).
pub(crate) fn tile_fn(dtype: GgufType) -> TileFn {
    match dtype {
        GgufType::Q4K => super::packed_q4k::tile_scalar,
        GgufType::Q5K => super::packed_q5k::tile_scalar,
        GgufType::Q6K => super::packed_q6k::tile_scalar,
        GgufType::Iq4Xs => super::packed_iq4xs::tile_scalar,
        GgufType::Q8_0 => tile_scalar::<8, 128, false, false>,
        GgufType::Q4_1 => tile_scalar::<4, 0, false, true>,
        GgufType::Iq4Nl => tile_scalar::<4, 128, true, false>,
        _ => tile_scalar::<4, 8, false, false>,
    }
}

/// The portable tile function of a packed type in the float order of the unpacked kernels
/// (ggml's `vec_dot`, see the module docs), where it has one: `Q8_0` and `Q4_1`.
pub(crate) fn tile_fn_vec_dot(dtype: GgufType) -> Option<TileFn> {
    match dtype {
        GgufType::Q8_0 => Some(tile_scalar_q8_0_vec_dot),
        GgufType::Q4_1 => Some(tile_scalar_q4_1),
        _ => None,
    }
}

/// The integer sum of block `b` of activation row `r` against row lane `i` of a packed block,
/// offset included: `Σ_j code_j·y_j - OFF·Σy`, where with `NL` (`IQ4_NL`) a nibble `q`'s code
/// is [`IQ4NL_U8`]`[q]`.
#[inline(always)]
fn block_isum<const WORDS: usize, const OFF: i32, const NL: bool, const MIN: bool>(
    blk: &[u8],
    a: &Acts,
    r: usize,
    b: usize,
    i: usize,
) -> i32 {
    let y = &a.qs[r * a.k + 32 * b..][..32];
    let hdr = header::<MIN>();
    let mut s = if OFF == 0 {
        0
    } else {
        -OFF * a.isum[r * (a.k / 32) + b]
    };
    for c in 0..4 {
        for t in 0..4 {
            let byte = blk[hdr + 64 * c + 4 * i + t];
            if WORDS == 8 {
                s += byte as i32 * y[4 * c + t] as i32;
                let hi = blk[hdr + 64 * (c + 4) + 4 * i + t];
                s += hi as i32 * y[16 + 4 * c + t] as i32;
            } else {
                let (lo, hi) = (byte & 0xF, byte >> 4);
                let (lo, hi) = if NL {
                    (IQ4NL_U8[lo as usize], IQ4NL_U8[hi as usize])
                } else {
                    (lo, hi)
                };
                s += lo as i32 * y[4 * c + t] as i32;
                s += hi as i32 * y[16 + 4 * c + t] as i32;
            }
        }
    }
    s
}

/// Bytes of a packed block before its quant words: 16 rows' `f16` [`params`], the scales and
/// with `MIN` (`Q4_1`) the minimums.
const fn header<const MIN: bool>() -> usize {
    32 * params(if MIN { GgufType::Q4_1 } else { GgufType::Q4_0 })
}

/// The portable packed kernel of `Q4_0` (`WORDS = 4, OFF = 8`), `Q8_0` (`8, 128`), `IQ4_NL`
/// (`4, 128`, `NL`) and `Q4_1` (`4, 0`, `MIN`): per block and row `acc = fma(Σ, d·d_y, acc)`
/// with `Σ` the block's exact integer sum, and for `Q4_1` then `acc = fma(m, s_y, acc)` (`s_y
/// = d_y·Σy`, the `Q8_1` activation block's sum), since `Σ_j (d·q_j + m)·d_y·y_j = d·d_y·Σ +
/// m·s_y`.
///
/// # Safety
/// See [`TileFn`]; the tile's rows start and end on multiples of [`ROWS`].
unsafe fn tile_scalar<const WORDS: usize, const OFF: i32, const NL: bool, const MIN: bool>(
    t: &Tile<'_>,
) {
    let a = t.acts;
    let nb = a.k / 32;
    let gblock = header::<MIN>() + 64 * WORDS;
    for g in t.rows.start / ROWS..t.rows.end / ROWS {
        let grp = &t.w[g * nb * gblock..(g + 1) * nb * gblock];
        for r in t.ms.clone() {
            let mut acc = [0f32; ROWS];
            for b in 0..nb {
                let blk = &grp[b * gblock..(b + 1) * gblock];
                let dy = a.d[r * nb + b];
                for (i, acc) in acc.iter_mut().enumerate() {
                    let dd = super::scalar::f16_at(blk, 2 * i) * dy;
                    let s = block_isum::<WORDS, OFF, NL, MIN>(blk, a, r, b, i);
                    *acc = (s as f32).mul_add(dd, *acc);
                    if MIN {
                        let m = super::scalar::f16_at(blk, 32 + 2 * i);
                        *acc = m.mul_add(a.s[r * nb + b], *acc);
                    }
                }
            }
            for (i, v) in acc.iter().enumerate() {
                // SAFETY: the caller guarantees `out` is valid for `[m, ldo]` and that the
                // tile's elements belong to it only.
                unsafe { *t.out.add(r * t.ldo + g * ROWS + i) = *v };
            }
        }
    }
}

/// The portable packed `Q8_0` kernel in ggml's float order (see the module docs).
///
/// # Safety
/// See [`TileFn`]; the tile's rows start and end on multiples of [`ROWS`].
unsafe fn tile_scalar_q8_0_vec_dot(t: &Tile<'_>) {
    let a = t.acts;
    let nb = a.k / 32;
    let gblock = 32 + 64 * 8;
    for g in t.rows.start / ROWS..t.rows.end / ROWS {
        let grp = &t.w[g * nb * gblock..(g + 1) * nb * gblock];
        for r in t.ms.clone() {
            let mut acc = [[0f32; 8]; ROWS];
            for b in 0..nb {
                let blk = &grp[b * gblock..(b + 1) * gblock];
                let dy = a.d[r * nb + b];
                let y = &a.qs[r * a.k + 32 * b..][..32];
                for (i, acc) in acc.iter_mut().enumerate() {
                    let dd = super::scalar::f16_at(blk, 2 * i) * dy;
                    for (l, acc) in acc.iter_mut().enumerate() {
                        let mut s = 0i32;
                        for t in 0..4 {
                            let q = (blk[32 + 64 * l + 4 * i + t] ^ 0x80) as i8;
                            s += q as i32 * y[4 * l + t] as i32;
                        }
                        *acc = dd.mul_add(s as f32, *acc);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                // SAFETY: the caller guarantees `out` is valid for `[m, ldo]` and that the
                // tile's elements belong to it only.
                unsafe { *t.out.add(r * t.ldo + g * ROWS + i) = hsum8(acc) };
            }
        }
    }
}

/// ggml's `hsum_float_8` of the 8 lane accumulators of a `Q4_1` row (see the module docs).
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[4] + a[0]) + (a[6] + a[2])) + ((a[5] + a[1]) + (a[7] + a[3]))
}

/// The portable packed `Q4_1` kernel: ggml's float order (see the module docs).
///
/// # Safety
/// See [`TileFn`]; the tile's rows start and end on multiples of [`ROWS`].
unsafe fn tile_scalar_q4_1(t: &Tile<'_>) {
    let a = t.acts;
    let nb = a.k / 32;
    let gblock = 64 + 64 * 4;
    for g in t.rows.start / ROWS..t.rows.end / ROWS {
        let grp = &t.w[g * nb * gblock..(g + 1) * nb * gblock];
        for r in t.ms.clone() {
            let mut acc = [[0f32; 8]; ROWS];
            let mut accm = [0f32; ROWS];
            for b in 0..nb {
                let blk = &grp[b * gblock..(b + 1) * gblock];
                let (dy, sy) = (a.d[r * nb + b], a.s[r * nb + b]);
                let y = &a.qs[r * a.k + 32 * b..][..32];
                for (i, (acc, accm)) in acc.iter_mut().zip(accm.iter_mut()).enumerate() {
                    let dd = super::scalar::f16_at(blk, 2 * i) * dy;
                    for (l, acc) in acc.iter_mut().enumerate() {
                        let mut s = 0i32;
                        for t in 0..4 {
                            let byte = blk[64 + 64 * (l % 4) + 4 * i + t];
                            let code = if l < 4 { byte & 0xF } else { byte >> 4 };
                            s += code as i32 * y[4 * l + t] as i32;
                        }
                        *acc = dd.mul_add(s as f32, *acc);
                    }
                    *accm = super::scalar::f16_at(blk, 32 + 2 * i).mul_add(sy, *accm);
                }
            }
            for (i, (acc, accm)) in acc.iter().zip(&accm).enumerate() {
                // SAFETY: the caller guarantees `out` is valid for `[m, ldo]` and that the
                // tile's elements belong to it only.
                unsafe { *t.out.add(r * t.ldo + g * ROWS + i) = hsum8(acc) + accm };
            }
        }
    }
}

/// The AVX-512 kernels (`vpdpbusd` on 512-bit registers: AVX512F + AVX512-VNNI).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::{GgufType, Tile, TileFn};
    use super::ROWS;

    /// Whether this CPU runs these kernels.
    pub(crate) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// The tile function of a packed type (callers check [`available`]).
    pub(crate) fn tile_fn(dtype: GgufType) -> TileFn {
        match dtype {
            GgufType::Q4K => super::super::packed_q4k::avx512::tile,
            GgufType::Q5K => super::super::packed_q5k::avx512::tile,
            GgufType::Q6K => super::super::packed_q6k::avx512::tile,
            GgufType::Iq4Xs => super::super::packed_iq4xs::avx512::tile,
            GgufType::Q8_0 => tile::<8, 128, false, false>,
            GgufType::Q4_1 => tile::<4, 0, false, true>,
            GgufType::Iq4Nl => tile::<4, 128, true, false>,
            _ => tile::<4, 8, false, false>,
        }
    }

    /// The tile function of a packed type in the unpacked kernels' float order, where it has
    /// one (see [`super::tile_fn_vec_dot`]; callers check [`available`]).
    pub(crate) fn tile_fn_vec_dot(dtype: GgufType) -> Option<TileFn> {
        match dtype {
            GgufType::Q8_0 => Some(tile_q8_0_vec_dot),
            GgufType::Q4_1 => Some(tile_q4_1),
            _ => None,
        }
    }

    /// Bytes ahead of the block in use that a 4-bit decode product prefetches, as the packed
    /// `Q4_K` kernel does ([`super::super::packed_q4k`]): the hardware prefetcher alone does
    /// not keep one core's stream of weights fed. On the 2-core Zen 5 VM (`gguf_kernels
    /// kquants`, one activation row, matrices beyond the L3), one thread: `Q4_0` 47 -> 60 GB/s,
    /// `Q4_1` 43 -> 59 GB/s; two threads: within the run-to-run noise (75-150 GB/s either way).
    const PREFETCH: usize = 12 * 1024;

    /// Prefetches the cache lines of the `bytes` bytes [`PREFETCH`] bytes after `blk` (a
    /// decode product's next blocks; the address may lie past the weight: prefetches do not
    /// fault).
    #[inline(always)]
    pub(crate) fn prefetch_ahead(blk: *const u8, bytes: usize) {
        prefetch_l1(blk.wrapping_add(PREFETCH), bytes);
    }

    /// Prefetches into L1 the cache lines of the `bytes` bytes at `p` (which may lie past the
    /// weight: prefetches do not fault); the tile-decoded prefill kernels' next chunk
    /// (`packed_q5k`, `packed_iq4xs`), whose weights come from memory in a model's prefill
    /// (each tile of activation rows takes the whole matrix before the next tile comes back
    /// to a group).
    #[inline(always)]
    pub(crate) fn prefetch_l1(p: *const u8, bytes: usize) {
        for l in 0..bytes.div_ceil(64) {
            // SAFETY: a prefetch reads nothing architecturally and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * l) as *const i8) };
        }
    }

    /// Weight bytes of one group that a tile of more than 8 activation rows keeps in L1 while
    /// its passes of 8 rows go by: the blocks of a group are taken in chunks of this size, each
    /// chunk by all the tile's rows (the accumulators go through the output between chunks,
    /// so the float operations and their order are those of one pass over all blocks). A
    /// `Q4_0` group of `k = 8192` (73 KiB) otherwise comes from L2 in every pass; the gain is
    /// small (`gguf_kernels q4_0`, 2048 x 8192 at m = 512: 13.8 -> 13.5 ms, within the noise).
    pub(crate) const CHUNK_BYTES: usize = 18 * 1024;

    /// The kernel of `Q4_0` (`WORDS = 4, OFF = 8`), `Q8_0` (`8, 128`), with `NL` `IQ4_NL`
    /// (`4, 128`: the nibbles mapped to [`super::IQ4NL_U8`] by `vpshufb`) and with `MIN` `Q4_1`
    /// (`4, 0`: the minimums' term added after each block's, as [`super::tile_scalar`]).
    ///
    /// # Safety
    /// See [`TileFn`]; the tile's rows start and end on multiples of [`ROWS`]; the CPU has
    /// AVX512F, AVX512BW and AVX512-VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const WORDS: usize, const OFF: i32, const NL: bool, const MIN: bool>(
        t: &Tile<'_>,
    ) {
        let nb = t.acts.k / 32;
        let gblock = super::header::<MIN>() + 64 * WORDS;
        let gbytes = nb * gblock;
        let chunk = if t.ms.len() > 8 {
            (CHUNK_BYTES / gblock).max(1)
        } else {
            nb.max(1)
        };
        for g in t.rows.start / ROWS..t.rows.end / ROWS {
            // SAFETY: group `g` lies inside the weight (rows checked by the caller).
            let wg = unsafe { t.w.as_ptr().add(g * gbytes) };
            let mut b0 = 0;
            while b0 < nb {
                let bs = b0..(b0 + chunk).min(nb);
                let mut r = t.ms.start;
                unsafe {
                    while r + 8 <= t.ms.end {
                        rows::<8, WORDS, OFF, NL, MIN>(t, wg, g, r, bs.clone());
                        r += 8;
                    }
                    remainder_rows!(t.ms.end - r, R => rows::<R, WORDS, OFF, NL, MIN>(t, wg, g, r, bs.clone()));
                }
                b0 = bs.end;
            }
        }
    }

    /// The 8 code words of a 4-bit block of 16 rows: the low nibbles of the 4 words at `p`
    /// (values `4c..4c + 4` of each row), then their high nibbles (values `16 + 4c..`).
    ///
    /// # Safety
    /// `p` is valid for 256 bytes; the CPU has AVX512F.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(crate) unsafe fn nibbles(p: *const u8) -> [__m512i; 8] {
        let m4 = _mm512_set1_epi8(0x0F);
        let mut w = [_mm512_setzero_si512(); 8];
        for c in 0..4 {
            let v = unsafe { _mm512_loadu_si512(p.add(64 * c) as *const _) };
            w[c] = _mm512_and_si512(v, m4);
            w[c + 4] = _mm512_and_si512(_mm512_srli_epi32::<4>(v), m4);
        }
        w
    }

    /// The 8 code words of [`nibbles`] mapped through a 16-byte table (`table` repeated in
    /// each 128-bit lane): byte `q` becomes `table[q]` (`vpshufb`).
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512BW.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) unsafe fn lookup(w: &mut [__m512i; 8], table: __m512i) {
        for w in w.iter_mut() {
            *w = _mm512_shuffle_epi8(table, *w);
        }
    }

    /// [`super::IQ4NL_U8`] in each 128-bit lane, the table of [`lookup`] for `IQ4_NL` and
    /// `IQ4_XS` codes.
    ///
    /// # Safety
    /// The CPU has AVX512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn iq4_table() -> __m512i {
        let t = unsafe { _mm_loadu_si128(super::IQ4NL_U8.as_ptr() as *const __m128i) };
        _mm512_broadcast_i32x4(t)
    }

    /// `init + Σ code·y` for the 16 rows of a block: word `j` of `w` against activation bytes
    /// `4j..4j + 4` at `y` (32 bytes), broadcast to every lane.
    ///
    /// # Safety
    /// `y` is valid for 32 bytes; the CPU has AVX512F and AVX512-VNNI.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(crate) unsafe fn block_sums(w: &[__m512i; 8], y: *const i32, init: i32) -> __m512i {
        let mut s0 = _mm512_set1_epi32(init);
        let mut s1 = _mm512_setzero_si512();
        // Two chains, so that consecutive dot products do not wait on each other.
        for c in 0..4 {
            let (y0, y1) = unsafe {
                (
                    _mm512_set1_epi32(y.add(2 * c).read_unaligned()),
                    _mm512_set1_epi32(y.add(2 * c + 1).read_unaligned()),
                )
            };
            s0 = _mm512_dpbusd_epi32(s0, w[2 * c], y0);
            s1 = _mm512_dpbusd_epi32(s1, w[2 * c + 1], y1);
        }
        _mm512_add_epi32(s0, s1)
    }

    /// [`block_sums`] as one chain of dot products (for several activation rows at once, whose
    /// chains are independent of each other).
    ///
    /// # Safety
    /// `y` is valid for 32 bytes; the CPU has AVX512F and AVX512-VNNI.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(crate) unsafe fn chain(w: &[__m512i; 8], y: *const i32, init: i32) -> __m512i {
        let mut s = _mm512_set1_epi32(init);
        for (c, w) in w.iter().enumerate() {
            let yc = unsafe { _mm512_set1_epi32(y.add(c).read_unaligned()) };
            s = _mm512_dpbusd_epi32(s, *w, yc);
        }
        s
    }

    /// `$body` once for each `$i` in `0..$n` (`$n` a constant up to 8), written out: LLVM
    /// leaves a loop over 8 activation rows rolled, with the accumulators in memory.
    macro_rules! unroll8 {
        ($n:expr, $i:ident => $body:block) => {
            unroll8!(@ $n, $i, $body, 0 1 2 3 4 5 6 7)
        };
        (@ $n:expr, $i:ident, $body:block, $($k:literal)*) => {
            $(
                if $k < $n {
                    let $i: usize = $k;
                    $body
                }
            )*
        };
    }
    pub(crate) use unroll8;

    /// `$body` with `$r` a constant equal to `$n` when `$n` is 1 to 7 (the activation rows a
    /// tile has left after its passes of 8), nothing otherwise: the row count of a kernel
    /// generic over it, chosen at run time.
    macro_rules! remainder_rows {
        ($n:expr, $r:ident => $body:expr) => {
            remainder_rows!(@ $n, $r, $body, 1 2 3 4 5 6 7)
        };
        (@ $n:expr, $r:ident, $body:expr, $($k:literal)*) => {
            match $n {
                $($k => {
                    const $r: usize = $k;
                    $body
                })*
                _ => {}
            }
        };
    }
    pub(crate) use remainder_rows;

    /// Blocks `bs` of activation rows `r..r + R` (`R <= 8`) against the 16 weight rows of
    /// group `g` (at `wg`): each block's code words are loaded (and unpacked) once for the `R`
    /// rows, and each row's 8 dot products form one chain (the `R` rows' chains are
    /// independent). The accumulators start at zero for the first block and from the output
    /// (the sums of blocks `0..bs.start`) otherwise.
    ///
    /// # Safety
    /// As [`tile`]; `r + R <= t.ms.end`, `bs.end <= k / 32`, and for `bs.start > 0` the
    /// output holds the sums of the blocks before.
    #[inline(always)]
    unsafe fn rows<
        const R: usize,
        const WORDS: usize,
        const OFF: i32,
        const NL: bool,
        const MIN: bool,
    >(
        t: &Tile<'_>,
        wg: *const u8,
        g: usize,
        r: usize,
        bs: std::ops::Range<usize>,
    ) {
        let a = t.acts;
        let (k, nb) = (a.k, a.k / 32);
        let hdr = super::header::<MIN>();
        let gblock = hdr + 64 * WORDS;
        // Not for `Q8_0`: with 2 threads its products ran at 66-76 GB/s with the prefetch
        // against 118-127 without (32768 x 2048, beyond the L3, Zen 5 VM). For every row
        // count, but only in the tile's first pass over the group or chunk (the later passes
        // find it in L1 or L2): at m = 16 the group comes from memory too (Llama-3.2-1B output
        // matrix 128256 x 2048 in `Q4_0`, m = 16, 2 threads: 12.2 -> 6.9 ms).
        let pf = WORDS == 4 && r == t.ms.start;
        unsafe {
            let table = iq4_table();
            let out = t.out.add(r * t.ldo + g * ROWS);
            let mut acc = [_mm512_setzero_ps(); R];
            if bs.start > 0 {
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_loadu_ps(out.add(i * t.ldo));
                }
            }
            let y0 = a.qs.as_ptr().add(r * k) as *const i32;
            let isum = a.isum.as_ptr().add(r * nb);
            let dy = a.d.as_ptr().add(r * nb);
            // `Q4_1`: the activation blocks' `d_y·Σy` (empty for `Q8K` activations, unused).
            let sy = a.s.as_ptr().wrapping_add(r * nb);
            for b in bs {
                let blk = wg.add(b * gblock);
                if pf {
                    prefetch_ahead(blk, gblock);
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let mw = if MIN {
                    _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i))
                } else {
                    _mm512_setzero_ps()
                };
                let mut w = [_mm512_setzero_si512(); 8];
                if WORDS == 8 {
                    for (c, w) in w.iter_mut().enumerate() {
                        *w = _mm512_loadu_si512(blk.add(hdr + 64 * c) as *const _);
                    }
                } else {
                    w = nibbles(blk.add(hdr));
                    if NL {
                        lookup(&mut w, table);
                    }
                }
                unroll8!(R, i => {
                    let y = y0.add(i * k / 4 + 8 * b);
                    let off = if OFF == 0 { 0 } else { -OFF * *isum.add(i * nb + b) };
                    let s = if R >= 4 {
                        chain(&w, y, off)
                    } else {
                        block_sums(&w, y, off)
                    };
                    let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*dy.add(i * nb + b)));
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dd, acc[i]);
                    if MIN {
                        let s = _mm512_set1_ps(*sy.add(i * nb + b));
                        acc[i] = _mm512_fmadd_ps(mw, s, acc[i]);
                    }
                });
            }
            for (i, v) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * t.ldo), *v);
            }
        }
    }

    /// The packed `Q4_1` kernel in ggml's float order (see the module docs): activation rows
    /// one or two at a time (8 accumulators each).
    ///
    /// # Safety
    /// See [`TileFn`]; the tile's rows start and end on multiples of [`ROWS`]; the CPU has
    /// AVX512F and AVX512-VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tile_q4_1(t: &Tile<'_>) {
        let nb = t.acts.k / 32;
        for g in t.rows.start / ROWS..t.rows.end / ROWS {
            // SAFETY: group `g` lies inside the weight (rows checked by the caller).
            let wg = unsafe { t.w.as_ptr().add(g * nb * 320) };
            let mut r = t.ms.start;
            unsafe {
                while r + 2 <= t.ms.end {
                    rows_q4_1::<2>(t, wg, g, r);
                    r += 2;
                }
                if r < t.ms.end {
                    rows_q4_1::<1>(t, wg, g, r);
                }
            }
        }
    }

    /// Activation rows `r..r + R` against the 16 `Q4_1` rows of group `g` (at `wg`).
    ///
    /// # Safety
    /// As [`tile_q4_1`]; `r + R <= t.ms.end`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // `i` indexes the activations and `acc` alike
    unsafe fn rows_q4_1<const R: usize>(t: &Tile<'_>, wg: *const u8, g: usize, r: usize) {
        let a = t.acts;
        let (k, nb) = (a.k, a.k / 32);
        let pf = super::super::streams_weights(a.m);
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 8]; R];
            let mut accm = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                let blk = wg.add(b * 320);
                if pf {
                    prefetch_ahead(blk, 320);
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let mw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i));
                // Word `L` of `nibbles`: ggml's lane group `L` (values `4L..4L + 4`).
                let w = nibbles(blk.add(64));
                for i in 0..R {
                    let ab = (r + i) * nb + b;
                    let y = a.qs.as_ptr().add((r + i) * k + 32 * b) as *const i32;
                    let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d.get_unchecked(ab)));
                    for l in 0..8 {
                        let yl = _mm512_set1_epi32(y.add(l).read_unaligned());
                        let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[l], yl);
                        acc[i][l] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(s), acc[i][l]);
                    }
                    let sy = _mm512_set1_ps(*a.s.get_unchecked(ab));
                    accm[i] = _mm512_fmadd_ps(mw, sy, accm[i]);
                }
            }
            for i in 0..R {
                let x = &acc[i];
                let s = _mm512_add_ps(
                    _mm512_add_ps(_mm512_add_ps(x[4], x[0]), _mm512_add_ps(x[6], x[2])),
                    _mm512_add_ps(_mm512_add_ps(x[5], x[1]), _mm512_add_ps(x[7], x[3])),
                );
                _mm512_storeu_ps(
                    t.out.add((r + i) * t.ldo + g * ROWS),
                    _mm512_add_ps(s, accm[i]),
                );
            }
        }
    }

    /// The packed `Q8_0` kernel in ggml's float order (see the module docs): the tile's
    /// activations' 4-value sums first (the `-128·Σ_L y` each dot product starts from), then
    /// per group activation rows two at a time (8 accumulators each).
    ///
    /// # Safety
    /// See [`TileFn`]; the tile's rows start and end on multiples of [`ROWS`]; the CPU has
    /// AVX512F and AVX512-VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tile_q8_0_vec_dot(t: &Tile<'_>) {
        let a = t.acts;
        let nb = a.k / 32;
        // `[m, k / 4]`: `-128·Σ y` of each 4 activation values, made once per product.
        let corr = a.neg128_sums4();
        for g in t.rows.start / ROWS..t.rows.end / ROWS {
            // SAFETY: group `g` lies inside the weight (rows checked by the caller).
            let wg = unsafe { t.w.as_ptr().add(g * nb * 544) };
            let mut r = t.ms.start;
            unsafe {
                while r + 2 <= t.ms.end {
                    rows_q8_0_vec_dot::<2>(t, wg, g, r, corr.as_ptr().add(r * a.k / 4));
                    r += 2;
                }
                if r < t.ms.end {
                    rows_q8_0_vec_dot::<1>(t, wg, g, r, corr.as_ptr().add(r * a.k / 4));
                }
            }
        }
    }

    /// Activation rows `r..r + R` against the 16 `Q8_0` rows of group `g` (at `wg`), in
    /// ggml's float order; `corr` holds the rows' `-128·Σ_L y` (`k / 4` per row).
    ///
    /// # Safety
    /// As [`tile_q8_0_vec_dot`]; `r + R <= t.ms.end`; `corr` valid for `R · k / 4` values.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // `i` indexes the activations and `acc` alike
    unsafe fn rows_q8_0_vec_dot<const R: usize>(
        t: &Tile<'_>,
        wg: *const u8,
        g: usize,
        r: usize,
        corr: *const i32,
    ) {
        let a = t.acts;
        let (k, nb) = (a.k, a.k / 32);
        // Decode sizes: the tile's first pass over a group streams it from memory.
        let pf = super::super::streams_weights(a.m) && r == t.ms.start;
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 8]; R];
            for b in 0..nb {
                let blk = wg.add(b * 544);
                if pf {
                    prefetch_ahead(blk, 544);
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let mut w = [_mm512_setzero_si512(); 8];
                for (l, w) in w.iter_mut().enumerate() {
                    *w = _mm512_loadu_si512(blk.add(32 + 64 * l) as *const _);
                }
                for i in 0..R {
                    let y = a.qs.as_ptr().add((r + i) * k + 32 * b) as *const i32;
                    let c = corr.add(i * k / 4 + 8 * b);
                    let dd =
                        _mm512_mul_ps(dw, _mm512_set1_ps(*a.d.get_unchecked((r + i) * nb + b)));
                    for l in 0..8 {
                        let yl = _mm512_set1_epi32(y.add(l).read_unaligned());
                        let s = _mm512_dpbusd_epi32(_mm512_set1_epi32(*c.add(l)), w[l], yl);
                        acc[i][l] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(s), acc[i][l]);
                    }
                }
            }
            for i in 0..R {
                let x = &acc[i];
                let s = _mm512_add_ps(
                    _mm512_add_ps(_mm512_add_ps(x[4], x[0]), _mm512_add_ps(x[6], x[2])),
                    _mm512_add_ps(_mm512_add_ps(x[5], x[1]), _mm512_add_ps(x[7], x[3])),
                );
                _mm512_storeu_ps(t.out.add((r + i) * t.ldo + g * ROWS), s);
            }
        }
    }
}
