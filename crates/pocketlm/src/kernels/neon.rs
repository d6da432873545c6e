//! aarch64 Advanced SIMD (NEON) kernels, after ggml-cpu's ARM `ggml_vec_dot_*`
//! (`arch/arm/quants.c`), built twice: for every aarch64 CPU, with 8-bit products from
//! `smull`/`smull2` widened into 32-bit lanes with `sadalp`, and for CPUs with the `dotprod`
//! extension ([`super::Backend::NeonDotprod`]), with `sdot` (ggml's `ggml_vdotq_s32` when built
//! with `__ARM_FEATURE_DOTPROD`). Both sum the same exact integers and then do the same float
//! operations, so their results are equal bit for bit. Same structure as the AVX2 kernels: one
//! weight row against `R <= 4` activation rows, each weight block unpacked once. (The `i8mm`
//! extension's `smmla` is not used.)
//!
//! Float order: each kernel applies the block scales with the float operations of its portable
//! twin ([`super::scalar`]), in the same order, so the results equal
//! [`super::Backend::Scalar`]'s bit for bit (tested), except the MLX 8-bit kernel's, which
//! differ by rounding: it takes the codes as `q - 128` (`smull` and `sdot` multiply signed
//! bytes) with `128·scale` folded into the bias.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::scalar::{f16_at, iq4xs_scale, mlx_param, scale_min_k4};
use super::{GgufType, Tile, TileFn, KVALUES_IQ4NL};
use crate::quant::mlx_affine::ParamDtype;

/// The tile function of a weight type; `dotprod` picks the `sdot` build, which needs the CPU's
/// `dotprod` extension ([`super::Backend::NeonDotprod`]).
pub(crate) fn tile_fn(dtype: GgufType, dotprod: bool) -> TileFn {
    let (plain, dp): (TileFn, TileFn) = match dtype {
        GgufType::Q4_0 => (tile_q4_0, tile_q4_0_dp),
        GgufType::Q4_1 => (tile_q4_1, tile_q4_1_dp),
        GgufType::Q5_0 => (tile_q5_0, tile_q5_0_dp),
        GgufType::Q8_0 => (tile_q8_0, tile_q8_0_dp),
        GgufType::Q4K => (tile_q4k, tile_q4k_dp),
        GgufType::Q5K => (tile_q5k, tile_q5k_dp),
        GgufType::Q6K => (tile_q6k, tile_q6k_dp),
        GgufType::Iq4Nl => (tile_iq4nl, tile_iq4nl_dp),
        GgufType::Iq4Xs => (tile_iq4xs, tile_iq4xs_dp),
    };
    if dotprod {
        dp
    } else {
        plain
    }
}

/// Tile driver: groups of 4 activation rows, then the 1-3 left over, each against every
/// weight row of the tile. `tile_impl!(plain, dotprod, dot, args..)` defines `plain`, which
/// calls `dot::<R, false, args..>`, and `dotprod`, which calls `dot::<R, true, args..>` and is
/// compiled with the `dotprod` extension.
macro_rules! tile_impl {
    ($name:ident, $name_dp:ident, $dot:ident $(, $arg:tt)*) => {
        tile_impl!(@one [], $name, $dot, false $(, $arg)*);
        tile_impl!(@one [#[target_feature(enable = "dotprod")]], $name_dp, $dot, true $(, $arg)*);
    };
    (@one [$(#[$attr:meta])*], $name:ident, $dot:ident $(, $arg:tt)*) => {
        /// # Safety
        /// See [`TileFn`]; the CPU must have the features it is compiled with.
        $(#[$attr])*
        unsafe fn $name(t: &Tile<'_>) {
            let mut r = t.ms.start;
            while r + 4 <= t.ms.end {
                for j in t.rows.clone() {
                    let v = unsafe { $dot::<4 $(, $arg)*>(t, j, r) };
                    unsafe { store(t, r, j, &v) };
                }
                r += 4;
            }
            match t.ms.end - r {
                3 => {
                    for j in t.rows.clone() {
                        let v = unsafe { $dot::<3 $(, $arg)*>(t, j, r) };
                        unsafe { store(t, r, j, &v) };
                    }
                }
                2 => {
                    for j in t.rows.clone() {
                        let v = unsafe { $dot::<2 $(, $arg)*>(t, j, r) };
                        unsafe { store(t, r, j, &v) };
                    }
                }
                1 => {
                    for j in t.rows.clone() {
                        let v = unsafe { $dot::<1 $(, $arg)*>(t, j, r) };
                        unsafe { store(t, r, j, &v) };
                    }
                }
                _ => {}
            }
        }
    };
}

tile_impl!(tile_q4_0, tile_q4_0_dp, dot_q4, true);
tile_impl!(tile_q4_1, tile_q4_1_dp, dot_q4, false);
tile_impl!(tile_q5_0, tile_q5_0_dp, dot_q5_0);
tile_impl!(tile_q8_0, tile_q8_0_dp, dot_q8_0);
tile_impl!(tile_q4k, tile_q4k_dp, dot_q4k);
tile_impl!(tile_q5k, tile_q5k_dp, dot_q5k);
tile_impl!(tile_q6k, tile_q6k_dp, dot_q6k);
tile_impl!(tile_iq4nl, tile_iq4nl_dp, dot_iq4nl);
tile_impl!(tile_iq4xs, tile_iq4xs_dp, dot_iq4xs);
tile_impl!(tile_mlx4_f32, tile_mlx4_f32_dp, dot_mlx4, 0);
tile_impl!(tile_mlx4_f16, tile_mlx4_f16_dp, dot_mlx4, 1);
tile_impl!(tile_mlx4_bf16, tile_mlx4_bf16_dp, dot_mlx4, 2);
tile_impl!(tile_mlx8_f32, tile_mlx8_f32_dp, dot_mlx8, 0);
tile_impl!(tile_mlx8_f16, tile_mlx8_f16_dp, dot_mlx8, 1);
tile_impl!(tile_mlx8_bf16, tile_mlx8_bf16_dp, dot_mlx8, 2);

tile_impl!(tile_mlx2_f32, tile_mlx2_f32_dp, dot_mlxn, 0, 2);
tile_impl!(tile_mlx2_f16, tile_mlx2_f16_dp, dot_mlxn, 1, 2);
tile_impl!(tile_mlx2_bf16, tile_mlx2_bf16_dp, dot_mlxn, 2, 2);
tile_impl!(tile_mlx3_f32, tile_mlx3_f32_dp, dot_mlxn, 0, 3);
tile_impl!(tile_mlx3_f16, tile_mlx3_f16_dp, dot_mlxn, 1, 3);
tile_impl!(tile_mlx3_bf16, tile_mlx3_bf16_dp, dot_mlxn, 2, 3);
tile_impl!(tile_mlx5_f32, tile_mlx5_f32_dp, dot_mlxn, 0, 5);
tile_impl!(tile_mlx5_f16, tile_mlx5_f16_dp, dot_mlxn, 1, 5);
tile_impl!(tile_mlx5_bf16, tile_mlx5_bf16_dp, dot_mlxn, 2, 5);
tile_impl!(tile_mlx6_f32, tile_mlx6_f32_dp, dot_mlxn, 0, 6);
tile_impl!(tile_mlx6_f16, tile_mlx6_f16_dp, dot_mlxn, 1, 6);
tile_impl!(tile_mlx6_bf16, tile_mlx6_bf16_dp, dot_mlxn, 2, 6);

/// The tile function of an MLX affine weight of `bits` (2, 3, 4, 5, 6 or 8) with parameters
/// in `params`; `dotprod` as in [`tile_fn`].
pub(crate) fn mlx_tile_fn(bits: usize, params: ParamDtype, dotprod: bool) -> TileFn {
    let (plain, dp): (TileFn, TileFn) = match (bits, params) {
        (2, ParamDtype::F32) => (tile_mlx2_f32, tile_mlx2_f32_dp),
        (2, ParamDtype::F16) => (tile_mlx2_f16, tile_mlx2_f16_dp),
        (2, ParamDtype::BF16) => (tile_mlx2_bf16, tile_mlx2_bf16_dp),
        (3, ParamDtype::F32) => (tile_mlx3_f32, tile_mlx3_f32_dp),
        (3, ParamDtype::F16) => (tile_mlx3_f16, tile_mlx3_f16_dp),
        (3, ParamDtype::BF16) => (tile_mlx3_bf16, tile_mlx3_bf16_dp),
        (4, ParamDtype::F32) => (tile_mlx4_f32, tile_mlx4_f32_dp),
        (4, ParamDtype::F16) => (tile_mlx4_f16, tile_mlx4_f16_dp),
        (4, ParamDtype::BF16) => (tile_mlx4_bf16, tile_mlx4_bf16_dp),
        (5, ParamDtype::F32) => (tile_mlx5_f32, tile_mlx5_f32_dp),
        (5, ParamDtype::F16) => (tile_mlx5_f16, tile_mlx5_f16_dp),
        (5, ParamDtype::BF16) => (tile_mlx5_bf16, tile_mlx5_bf16_dp),
        (6, ParamDtype::F32) => (tile_mlx6_f32, tile_mlx6_f32_dp),
        (6, ParamDtype::F16) => (tile_mlx6_f16, tile_mlx6_f16_dp),
        (6, ParamDtype::BF16) => (tile_mlx6_bf16, tile_mlx6_bf16_dp),
        (_, ParamDtype::F32) => (tile_mlx8_f32, tile_mlx8_f32_dp),
        (_, ParamDtype::F16) => (tile_mlx8_f16, tile_mlx8_f16_dp),
        (_, ParamDtype::BF16) => (tile_mlx8_bf16, tile_mlx8_bf16_dp),
    };
    if dotprod {
        dp
    } else {
        plain
    }
}

/// How 32 MLX codes of `BITS` bits (2, 3, 5, 6), a little-endian bit stream of `4·BITS`
/// bytes, become bytes: code `8h + w` is 16-bit lane `w` of group `h` (0..4), gathered by
/// `tbl[h]` (bytes `p / 8` and `p / 8 + 1` of the stream, `p = BITS·(8h + w)` its first bit)
/// and shifted right by `p % 8` (`shift[h][w]` holds `-(p % 8)` for `ushl`), then masked.
struct NbitUnpack {
    tbl: [[u8; 16]; 4],
    shift: [[i16; 8]; 4],
}

const fn nbit_unpack(bits: usize) -> NbitUnpack {
    let mut t = NbitUnpack {
        tbl: [[0; 16]; 4],
        shift: [[0; 8]; 4],
    };
    let mut h = 0;
    while h < 4 {
        let mut w = 0;
        while w < 8 {
            let p = bits * (8 * h + w);
            t.tbl[h][2 * w] = (p / 8) as u8;
            t.tbl[h][2 * w + 1] = (p / 8 + 1) as u8;
            t.shift[h][w] = -((p % 8) as i16);
            w += 1;
        }
        h += 1;
    }
    t
}

/// [`NbitUnpack`] of each width, indexed by bits (only 2, 3, 5 and 6 are used).
const NBIT_UNPACK: [NbitUnpack; 7] = [
    nbit_unpack(0),
    nbit_unpack(1),
    nbit_unpack(2),
    nbit_unpack(3),
    nbit_unpack(4),
    nbit_unpack(5),
    nbit_unpack(6),
];

/// The 32 codes of one block of `BITS`-bit MLX codes (`BITS` in 2, 3, 5, 6) at `p` (`4·BITS`
/// bytes) as two vectors of signed bytes (codes `0..16` and `16..32`, all below 64), the NEON
/// twin of [`super::scalar::unpack_block`].
///
/// # Safety
/// `p` must be valid for reading `4·BITS` bytes.
#[inline(always)]
unsafe fn unpack_mlxn<const BITS: usize>(p: *const u8) -> (int8x16_t, int8x16_t) {
    let u = &NBIT_UNPACK[BITS];
    // The stream plus zeros: the gathers read up to byte `4·BITS`.
    let mut buf = [0u8; 32];
    unsafe {
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), 4 * BITS);
        let tbl = vld1q_u8_x2(buf.as_ptr());
        let mask = vdupq_n_u16((1 << BITS) - 1);
        let group = |h: usize| {
            let v = vreinterpretq_u16_u8(vqtbl2q_u8(tbl, vld1q_u8(u.tbl[h].as_ptr())));
            vandq_u16(vshlq_u16(v, vld1q_s16(u.shift[h].as_ptr())), mask)
        };
        (
            vreinterpretq_s8_u8(vcombine_u8(vmovn_u16(group(0)), vmovn_u16(group(1)))),
            vreinterpretq_s8_u8(vcombine_u8(vmovn_u16(group(2)), vmovn_u16(group(3)))),
        )
    }
}

/// MLX affine 2, 3, 5 or 6-bit against `Q8_32F` activations: codes unpacked by
/// [`unpack_mlxn`], then dotted as the 8-bit codes are (signed: they are below 64). Float
/// order of the portable kernel: per block `acc += scale·dy·Σ q·y + bias·s`.
///
/// # Safety
/// As [`dot_mlx4`].
#[inline(always)]
unsafe fn dot_mlxn<const R: usize, const DP: bool, const P: u8, const BITS: usize>(
    t: &Tile<'_>,
    j: usize,
    r: usize,
) -> [f32; R] {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 32);
    let pm = t.mlx;
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let mut acc = [0f32; R];
    unsafe {
        for g in 0..pm.gpr {
            let sc = mlx_param::<P>(pm.scales, j * pm.gpr + g);
            let bi = mlx_param::<P>(pm.biases, j * pm.gpr + g);
            for b in g * pm.bpg..(g + 1) * pm.bpg {
                let (q0, q1) = unpack_mlxn::<BITS>(row[4 * BITS * b..4 * BITS * (b + 1)].as_ptr());
                for i in 0..R {
                    let y = a.qs.as_ptr().add((r + i) * k + 32 * b);
                    let s = block_dot::<DP>(q0, q1, y);
                    let dy = *a.d.get_unchecked((r + i) * nb + b);
                    let sy = *a.s.get_unchecked((r + i) * nb + b);
                    acc[i] += sc * dy * s as f32 + bi * sy;
                }
            }
        }
    }
    acc
}

/// MLX affine 4-bit against `Q8_32Nib` activations (low nibbles are the even codes, high
/// nibbles the odd ones, the order of the permuted activations).
///
/// # Safety
/// As [`dot_q4`]; `t.mlx` points at the weight's scales and biases.
#[inline(always)]
unsafe fn dot_mlx4<const R: usize, const DP: bool, const P: u8>(
    t: &Tile<'_>,
    j: usize,
    r: usize,
) -> [f32; R] {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 32);
    let pm = t.mlx;
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let mut acc = [0f32; R];
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        for g in 0..pm.gpr {
            let sc = mlx_param::<P>(pm.scales, j * pm.gpr + g);
            let bi = mlx_param::<P>(pm.biases, j * pm.gpr + g);
            for b in g * pm.bpg..(g + 1) * pm.bpg {
                let v = vld1q_u8(row.as_ptr().add(16 * b));
                let lo = vreinterpretq_s8_u8(vandq_u8(v, m4));
                let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                for i in 0..R {
                    let y = a.qs.as_ptr().add((r + i) * k + 32 * b);
                    let s = block_dot::<DP>(lo, hi, y);
                    let dy = *a.d.get_unchecked((r + i) * nb + b);
                    let sy = *a.s.get_unchecked((r + i) * nb + b);
                    acc[i] += sc * dy * s as f32 + bi * sy;
                }
            }
        }
    }
    acc
}

/// MLX affine 8-bit against `Q8_32F` activations, as signed `q - 128` (the `u8` codes do not
/// fit `smull`'s signed lanes) with `128·scale` folded into the bias.
///
/// # Safety
/// As [`dot_mlx4`].
#[inline(always)]
unsafe fn dot_mlx8<const R: usize, const DP: bool, const P: u8>(
    t: &Tile<'_>,
    j: usize,
    r: usize,
) -> [f32; R] {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 32);
    let pm = t.mlx;
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let mut acc = [0f32; R];
    unsafe {
        let flip = vdupq_n_u8(0x80);
        for g in 0..pm.gpr {
            let sc = mlx_param::<P>(pm.scales, j * pm.gpr + g);
            let bi = mlx_param::<P>(pm.biases, j * pm.gpr + g) + 128.0 * sc;
            for b in g * pm.bpg..(g + 1) * pm.bpg {
                let p = row.as_ptr().add(32 * b);
                let q0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), flip));
                let q1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p.add(16)), flip));
                for i in 0..R {
                    let y = a.qs.as_ptr().add((r + i) * k + 32 * b);
                    let s = block_dot::<DP>(q0, q1, y);
                    let dy = *a.d.get_unchecked((r + i) * nb + b);
                    let sy = *a.s.get_unchecked((r + i) * nb + b);
                    acc[i] += sc * dy * s as f32 + bi * sy;
                }
            }
        }
    }
    acc
}

/// # Safety
/// `out[(r + i) * ldo + j]` must be valid and owned by this tile for `i < R`.
#[inline(always)]
unsafe fn store<const R: usize>(t: &Tile<'_>, r: usize, j: usize, v: &[f32; R]) {
    for (i, &x) in v.iter().enumerate() {
        unsafe { *t.out.add((r + i) * t.ldo + j) = x };
    }
}

/// `acc + Σ a·b` over 16 `i8` lanes, in 4 `i32` lanes: with `DP`, one `sdot` (lane `l` adds
/// the products of bytes `4l..4l + 4`); without, `smull`/`smull2` and `sadalp` (lane `l` adds
/// those of bytes `2l, 2l + 1, 2l + 8, 2l + 9`; no 16-bit overflow: each product is at most
/// 2^14 and is widened before it is added). The lanes differ, their sum does not.
///
/// # Safety
/// With `DP`, the CPU must have the `dotprod` extension.
#[inline(always)]
unsafe fn dot16<const DP: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    if DP {
        // SAFETY: the caller guarantees the extension.
        return unsafe { sdot(acc, a, b) };
    }
    unsafe {
        let acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
        vpadalq_s16(acc, vmull_high_s8(a, b))
    }
}

/// `sdot acc.4s, a.16b, b.16b` (`vdotq_s32`, whose intrinsic is not stable yet).
///
/// # Safety
/// The CPU must have the `dotprod` extension.
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: register-only instruction (no memory, stack or flags), available per the
    // caller's guarantee.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// The 16 bytes at `p` as signed lanes.
#[inline(always)]
unsafe fn load_s8(p: *const i8) -> int8x16_t {
    unsafe { vld1q_s8(p) }
}

/// `Σ w·y` over a 32-value block: `lo` and `hi` its first and last 16 signed weight values,
/// `y` the activation row's 32 codes (the integer sum every 32-value block kernel takes).
///
/// # Safety
/// `y` is readable for 32 bytes; with `DP`, as [`dot16`].
#[inline(always)]
unsafe fn block_dot<const DP: bool>(lo: int8x16_t, hi: int8x16_t, y: *const i8) -> i32 {
    unsafe {
        let s = dot16::<DP>(
            dot16::<DP>(vdupq_n_s32(0), lo, load_s8(y)),
            hi,
            load_s8(y.add(16)),
        );
        vaddvq_s32(s)
    }
}

/// `Q4_0` (`Q4_0 = true`: offset `-8·d`) and `Q4_1` against `Q8_32` activations.
///
/// # Safety
/// `j` is a weight row and `r..r + R` activation rows of the tile (see [`TileFn`]); with `DP`,
/// the CPU has the `dotprod` extension.
#[inline(always)]
unsafe fn dot_q4<const R: usize, const DP: bool, const Q4_0: bool>(
    t: &Tile<'_>,
    j: usize,
    r: usize,
) -> [f32; R] {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 32);
    let (bs, qoff) = if Q4_0 { (18, 2) } else { (20, 4) };
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let mut acc = [0f32; R];
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        for b in 0..nb {
            let blk = &row[b * bs..(b + 1) * bs];
            let d = f16_at(blk, 0);
            let m = if Q4_0 { -8.0 * d } else { f16_at(blk, 2) };
            let v = vld1q_u8(blk.as_ptr().add(qoff));
            let lo = vreinterpretq_s8_u8(vandq_u8(v, m4));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
            for i in 0..R {
                let y = a.qs.as_ptr().add((r + i) * k + 32 * b);
                let s = block_dot::<DP>(lo, hi, y);
                let dy = *a.d.get_unchecked((r + i) * nb + b);
                let sy = *a.s.get_unchecked((r + i) * nb + b);
                acc[i] += d * dy * s as f32 + m * sy;
            }
        }
    }
    acc
}

/// `Q8_0` against `Q8_32` activations.
///
/// # Safety
/// As [`dot_q4`].
#[inline(always)]
unsafe fn dot_q8_0<const R: usize, const DP: bool>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 32);
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let mut acc = [0f32; R];
    unsafe {
        for b in 0..nb {
            let blk = &row[b * 34..(b + 1) * 34];
            let d = f16_at(blk, 0);
            let q0 = load_s8(blk.as_ptr().add(2) as *const i8);
            let q1 = load_s8(blk.as_ptr().add(18) as *const i8);
            for i in 0..R {
                let y = a.qs.as_ptr().add((r + i) * k + 32 * b);
                let s = block_dot::<DP>(q0, q1, y);
                let dy = *a.d.get_unchecked((r + i) * nb + b);
                acc[i] += d * dy * s as f32;
            }
        }
    }
    acc
}

/// `Q5_0` against `Q8_32` activations, after ggml's ARM `ggml_vec_dot_q5_0_q8_0`: bit 4 of
/// each value (from `qh`) is spread to its byte (`vtst` against the bit masks `1, 2, .., 128`
/// instead of ggml's `table_b2b_1` lookups) and the signed codes `q - 16` are dotted with the
/// activations. Float order of the portable kernel: per block `acc += d·dy·Σ (q - 16)·y`.
///
/// # Safety
/// As [`dot_q4`].
#[inline(always)]
unsafe fn dot_q5_0<const R: usize, const DP: bool>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 32);
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let mut acc = [0f32; R];
    const BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        let b4 = vdupq_n_u8(0x10);
        let bits = vld1q_u8(BITS.as_ptr());
        let off = vdupq_n_s8(16);
        for b in 0..nb {
            let blk = &row[b * 22..(b + 1) * 22];
            let d = f16_at(blk, 0);
            // Bits 0..16 of `qh` (little-endian) belong to the low nibbles, 16..32 to the high.
            let hl = vtstq_u8(vcombine_u8(vdup_n_u8(blk[2]), vdup_n_u8(blk[3])), bits);
            let hh = vtstq_u8(vcombine_u8(vdup_n_u8(blk[4]), vdup_n_u8(blk[5])), bits);
            let v = vld1q_u8(blk.as_ptr().add(6));
            let lo = vorrq_u8(vandq_u8(v, m4), vandq_u8(hl, b4));
            let hi = vorrq_u8(vshrq_n_u8::<4>(v), vandq_u8(hh, b4));
            let lo = vsubq_s8(vreinterpretq_s8_u8(lo), off);
            let hi = vsubq_s8(vreinterpretq_s8_u8(hi), off);
            for i in 0..R {
                let y = a.qs.as_ptr().add((r + i) * k + 32 * b);
                let s = block_dot::<DP>(lo, hi, y);
                let dy = *a.d.get_unchecked((r + i) * nb + b);
                acc[i] += d * dy * s as f32;
            }
        }
    }
    acc
}

/// `Q4_K` against `Q8_K` activations.
///
/// # Safety
/// As [`dot_q4`].
#[inline(always)]
unsafe fn dot_q4k<const R: usize, const DP: bool>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
    let a = t.acts;
    let (k, nb, nbs) = (a.k, a.k / 256, a.k / 16);
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let mut acc = [0f32; R];
    let mut accm = [0f32; R];
    let gemm: [bool; R] = std::array::from_fn(|i| super::q4k_gemm_row(a.m, r + i));
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        for b in 0..nb {
            let blk = &row[b * 144..(b + 1) * 144];
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let mut sc = [0i32; 8];
            let mut mn = [0i32; 8];
            for s in 0..8 {
                let (a_, b_) = scale_min_k4(s, &blk[4..16]);
                sc[s] = a_ as i32;
                mn[s] = b_ as i32;
            }
            let qs = blk.as_ptr().add(16);
            let mut isum = [0i32; R];
            for c in 0..4 {
                let q0 = vld1q_u8(qs.add(32 * c));
                let q1 = vld1q_u8(qs.add(32 * c + 16));
                let l0 = vreinterpretq_s8_u8(vandq_u8(q0, m4));
                let l1 = vreinterpretq_s8_u8(vandq_u8(q1, m4));
                let h0 = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q0));
                let h1 = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q1));
                for i in 0..R {
                    let y = a.qs.as_ptr().add((r + i) * k + 256 * b + 64 * c);
                    let zero = vdupq_n_s32(0);
                    let sl = dot16::<DP>(dot16::<DP>(zero, l0, load_s8(y)), l1, load_s8(y.add(16)));
                    let sh = dot16::<DP>(
                        dot16::<DP>(zero, h0, load_s8(y.add(32))),
                        h1,
                        load_s8(y.add(48)),
                    );
                    let part = sc[2 * c] * vaddvq_s32(sl) + sc[2 * c + 1] * vaddvq_s32(sh);
                    if gemm[i] {
                        // ggml's repacked GEMM: one step per pair of sub-blocks.
                        let bsums = &a.bsums[(r + i) * nbs + 16 * b..][..16];
                        let msum = mn[2 * c] * (bsums[4 * c] as i32 + bsums[4 * c + 1] as i32)
                            + mn[2 * c + 1] * (bsums[4 * c + 2] as i32 + bsums[4 * c + 3] as i32);
                        let dy = *a.d.get_unchecked((r + i) * nb + b);
                        acc[i] = (part as f32).mul_add(d * dy, acc[i]);
                        accm[i] = (msum as f32).mul_add(dmin * dy, accm[i]);
                    } else {
                        isum[i] += part;
                    }
                }
            }
            for i in 0..R {
                if gemm[i] {
                    continue;
                }
                let bsums = &a.bsums[(r + i) * nbs + 16 * b..(r + i) * nbs + 16 * b + 16];
                let mut msum = 0i32;
                for s in 0..8 {
                    msum += mn[s] * (bsums[2 * s] as i32 + bsums[2 * s + 1] as i32);
                }
                let dy = *a.d.get_unchecked((r + i) * nb + b);
                // ggml's repacked GEMV: one step per super-block (module docs of `kernels`).
                acc[i] = (isum[i] as f32).mul_add(d * dy, acc[i]);
                accm[i] = (msum as f32).mul_add(dmin * dy, accm[i]);
            }
        }
    }
    let mut out = [0f32; R];
    for i in 0..R {
        out[i] = acc[i] - accm[i];
    }
    out
}

/// `Q5_K` against `Q8_K` activations, after ggml's ARM `ggml_vec_dot_q5_K_q8_K`: per 64
/// values the nibbles of 32 bytes of `qs` get bit 4 from the two low bits of `qh` (shifted
/// down by 2 for the next 64), then the eight sub-block sums are scaled in integers and the
/// mins applied through the activations' 16-value sums. Float order of the portable kernel:
/// for 8 or more activation rows ggml's tiled matmul (`super::q5k_tiled`), else one fused
/// multiply-add per super-block into each of `acc` and `acc_min`, and `acc - acc_min`.
///
/// # Safety
/// As [`dot_q4`].
#[inline(always)]
unsafe fn dot_q5k<const R: usize, const DP: bool>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
    let a = t.acts;
    let (k, nb, nbs) = (a.k, a.k / 256, a.k / 16);
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let tiled = super::q5k_tiled(a.m);
    let mut acc = [0f32; R];
    let mut accm = [0f32; R];
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        let one = vdupq_n_u8(1);
        let two = vdupq_n_u8(2);
        for b in 0..nb {
            let blk = &row[b * 176..(b + 1) * 176];
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let mut sc = [0i32; 8];
            let mut mn = [0i32; 8];
            for s in 0..8 {
                let (a_, b_) = scale_min_k4(s, &blk[4..16]);
                sc[s] = a_ as i32;
                mn[s] = b_ as i32;
            }
            let mut qh0 = vld1q_u8(blk.as_ptr().add(16));
            let mut qh1 = vld1q_u8(blk.as_ptr().add(32));
            let qs = blk.as_ptr().add(48);
            let mut isum = [0i32; R];
            for c in 0..4 {
                let q0 = vld1q_u8(qs.add(32 * c));
                let q1 = vld1q_u8(qs.add(32 * c + 16));
                // Value 64c + l takes bit 2c of qh[l], value 64c + 32 + l bit 2c + 1.
                let l0 = vorrq_u8(vandq_u8(q0, m4), vshlq_n_u8::<4>(vandq_u8(qh0, one)));
                let l1 = vorrq_u8(vandq_u8(q1, m4), vshlq_n_u8::<4>(vandq_u8(qh1, one)));
                let h0 = vorrq_u8(vshrq_n_u8::<4>(q0), vshlq_n_u8::<3>(vandq_u8(qh0, two)));
                let h1 = vorrq_u8(vshrq_n_u8::<4>(q1), vshlq_n_u8::<3>(vandq_u8(qh1, two)));
                qh0 = vshrq_n_u8::<2>(qh0);
                qh1 = vshrq_n_u8::<2>(qh1);
                let (l0, l1) = (vreinterpretq_s8_u8(l0), vreinterpretq_s8_u8(l1));
                let (h0, h1) = (vreinterpretq_s8_u8(h0), vreinterpretq_s8_u8(h1));
                for i in 0..R {
                    let y = a.qs.as_ptr().add((r + i) * k + 256 * b + 64 * c);
                    let zero = vdupq_n_s32(0);
                    let sl = dot16::<DP>(dot16::<DP>(zero, l0, load_s8(y)), l1, load_s8(y.add(16)));
                    let sh = dot16::<DP>(
                        dot16::<DP>(zero, h0, load_s8(y.add(32))),
                        h1,
                        load_s8(y.add(48)),
                    );
                    isum[i] += sc[2 * c] * vaddvq_s32(sl) + sc[2 * c + 1] * vaddvq_s32(sh);
                }
            }
            for i in 0..R {
                let bsums = &a.bsums[(r + i) * nbs + 16 * b..(r + i) * nbs + 16 * b + 16];
                let mut msum = 0i32;
                for s in 0..8 {
                    msum += mn[s] * (bsums[2 * s] as i32 + bsums[2 * s + 1] as i32);
                }
                let dy = *a.d.get_unchecked((r + i) * nb + b);
                if tiled {
                    acc[i] = (-dmin)
                        .mul_add(msum as f32, isum[i] as f32 * d)
                        .mul_add(dy, acc[i]);
                } else {
                    acc[i] = (isum[i] as f32).mul_add(d * dy, acc[i]);
                    accm[i] = (msum as f32).mul_add(dmin * dy, accm[i]);
                }
            }
        }
    }
    let mut out = [0f32; R];
    for i in 0..R {
        out[i] = acc[i] - accm[i];
    }
    out
}

/// `Q6_K` against `Q8_K` activations.
///
/// # Safety
/// As [`dot_q4`].
#[inline(always)]
unsafe fn dot_q6k<const R: usize, const DP: bool>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
    let a = t.acts;
    let (k, nb, nbs) = (a.k, a.k / 256, a.k / 16);
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let mut acc = [0f32; R];
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        let m3 = vdupq_n_u8(0x03);
        for b in 0..nb {
            let blk = &row[b * 210..(b + 1) * 210];
            let d = f16_at(blk, 208);
            let mut sc = [0i32; 16];
            for s in 0..16 {
                sc[s] = blk[192 + s] as i8 as i32;
            }
            let mut isum = [0i32; R];
            for h in 0..2 {
                let ql = blk.as_ptr().add(64 * h);
                let qh = blk.as_ptr().add(128 + 32 * h);
                for half in 0..2 {
                    let l0 = 16 * half;
                    let qla = vld1q_u8(ql.add(l0));
                    let qlb = vld1q_u8(ql.add(32 + l0));
                    let qhv = vld1q_u8(qh.add(l0));
                    let q = [
                        vorrq_u8(vandq_u8(qla, m4), vshlq_n_u8::<4>(vandq_u8(qhv, m3))),
                        vorrq_u8(
                            vandq_u8(qlb, m4),
                            vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(qhv), m3)),
                        ),
                        vorrq_u8(
                            vshrq_n_u8::<4>(qla),
                            vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(qhv), m3)),
                        ),
                        vorrq_u8(vshrq_n_u8::<4>(qlb), vshlq_n_u8::<4>(vshrq_n_u8::<6>(qhv))),
                    ];
                    for i in 0..R {
                        let y = a.qs.as_ptr().add((r + i) * k + 256 * b + 128 * h + l0);
                        for (kk, qv) in q.iter().enumerate() {
                            let s = dot16::<DP>(
                                vdupq_n_s32(0),
                                vreinterpretq_s8_u8(*qv),
                                load_s8(y.add(32 * kk)),
                            );
                            isum[i] += sc[8 * h + half + 2 * kk] * vaddvq_s32(s);
                        }
                    }
                }
            }
            for i in 0..R {
                let bsums = &a.bsums[(r + i) * nbs + 16 * b..(r + i) * nbs + 16 * b + 16];
                let mut corr = 0i32;
                for s in 0..16 {
                    corr += sc[s] * bsums[s] as i32;
                }
                let dy = *a.d.get_unchecked((r + i) * nb + b);
                let isum = isum[i] - 32 * corr;
                // ggml's tiled matmul order for 8+ rows (`super::q6k_tiled`).
                acc[i] = if super::q6k_tiled(a.m) {
                    (isum as f32 * d).mul_add(dy, acc[i])
                } else {
                    acc[i] + d * dy * isum as f32
                };
            }
        }
    }
    acc
}

/// 16 bytes of `IQ4_NL` nibbles (`Q4_0` order) as the table values of their low and high
/// nibbles (`tbl` a register holding [`KVALUES_IQ4NL`]), ggml's `vqtbl1q_s8` lookups.
///
/// # Safety
/// `p` must be valid for reading 16 bytes.
#[inline(always)]
unsafe fn iq4_lookup(tbl: int8x16_t, p: *const u8) -> (int8x16_t, int8x16_t) {
    unsafe {
        let v = vld1q_u8(p);
        (
            vqtbl1q_s8(tbl, vandq_u8(v, vdupq_n_u8(0x0F))),
            vqtbl1q_s8(tbl, vshrq_n_u8::<4>(v)),
        )
    }
}

/// `IQ4_NL` against `Q8_32` activations, after ggml's ARM `ggml_vec_dot_iq4_nl_q8_0` (one
/// block at a time instead of two). Float order of the portable kernel (ggml's generic one):
/// per block `acc += dy·d·Σ kvalue(q)·y`.
///
/// # Safety
/// As [`dot_q4`].
#[inline(always)]
unsafe fn dot_iq4nl<const R: usize, const DP: bool>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 32);
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let mut acc = [0f32; R];
    unsafe {
        let tbl = vld1q_s8(KVALUES_IQ4NL.as_ptr());
        for b in 0..nb {
            let blk = &row[b * 18..(b + 1) * 18];
            let d = f16_at(blk, 0);
            let (lo, hi) = iq4_lookup(tbl, blk.as_ptr().add(2));
            for i in 0..R {
                let y = a.qs.as_ptr().add((r + i) * k + 32 * b);
                let s = block_dot::<DP>(lo, hi, y);
                let dy = *a.d.get_unchecked((r + i) * nb + b);
                acc[i] += dy * d * s as f32;
            }
        }
    }
    acc
}

/// `IQ4_XS` against `Q8_K` activations, after ggml's ARM `ggml_vec_dot_iq4_xs_q8_K`: the
/// 16 bytes of each 32-value sub-block looked up as for `IQ4_NL`. Float order of the portable
/// kernel (ggml's generic one, not the ARM kernel's integer scaling): per sub-block
/// `acc += (d·dy·(ls - 32))·Σ kvalue(q)·y`.
///
/// # Safety
/// As [`dot_q4`].
#[inline(always)]
unsafe fn dot_iq4xs<const R: usize, const DP: bool>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 256);
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let mut acc = [0f32; R];
    unsafe {
        let tbl = vld1q_s8(KVALUES_IQ4NL.as_ptr());
        for b in 0..nb {
            let blk = &row[b * 136..(b + 1) * 136];
            let d = f16_at(blk, 0);
            let mut d4d8 = [0f32; R];
            for i in 0..R {
                d4d8[i] = d * *a.d.get_unchecked((r + i) * nb + b);
            }
            for s in 0..8 {
                let ls = (iq4xs_scale(blk, s) - 32) as f32;
                let (lo, hi) = iq4_lookup(tbl, blk.as_ptr().add(8 + 16 * s));
                for i in 0..R {
                    let y = a.qs.as_ptr().add((r + i) * k + 256 * b + 32 * s);
                    let sum = block_dot::<DP>(lo, hi, y);
                    acc[i] += d4d8[i] * ls * sum as f32;
                }
            }
        }
    }
    acc
}
