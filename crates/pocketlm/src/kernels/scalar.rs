//! Portable kernels (any CPU) and the GGUF block decoders shared with the SIMD versions.
//!
//! The dot products follow ggml's generic `ggml_vec_dot_*` (ggml-cpu `quants.c`): an integer
//! sum per block, then one float multiply-add with the block scales.

use half::f16;

use super::{Acts, GgufType, Tile, TileFn, KVALUES_IQ4NL};
use crate::quant::mlx_affine::ParamDtype;

/// `f16` at `p` (little-endian) as `f32`.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], p: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[p], b[p + 1]])).to_f32()
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a `Q4_K`
/// block's 12 scale bytes.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decodes one row of GGUF bytes into `out` (ggml's `dequantize_row_*`).
/// `row` holds `out.len() / block_size` whole blocks.
pub(crate) fn dequantize_row(dtype: GgufType, row: &[u8], out: &mut [f32]) {
    let bs = dtype.block_size();
    let ts = dtype.type_size();
    for (blk, y) in row.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
        match dtype {
            GgufType::Q4_0 => {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    let q = blk[2 + j];
                    y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
                    y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgufType::Q4_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for j in 0..16 {
                    let q = blk[4 + j];
                    y[j] = (q & 0xF) as f32 * d + m;
                    y[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            GgufType::Q5_0 => {
                let d = f16_at(blk, 0);
                for (y, q) in y.iter_mut().zip(q5_0_quants(blk)) {
                    *y = q as f32 * d;
                }
            }
            GgufType::Q8_0 => {
                let d = f16_at(blk, 0);
                for j in 0..32 {
                    y[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
            GgufType::Q4K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                let qs = &blk[16..144];
                for c in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * c, scales);
                    let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                    let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                    for l in 0..32 {
                        let q = qs[32 * c + l];
                        y[64 * c + l] = d1 * (q & 0xF) as f32 - mm1;
                        y[64 * c + 32 + l] = d2 * (q >> 4) as f32 - mm2;
                    }
                }
            }
            GgufType::Q5K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let q = q5k_codes(blk);
                for s in 0..8 {
                    let (sc, m) = scale_min_k4(s, &blk[4..16]);
                    let (d1, m1) = (d * sc as f32, dmin * m as f32);
                    for l in 0..32 {
                        y[32 * s + l] = d1 * q[32 * s + l] as f32 - m1;
                    }
                }
            }
            GgufType::Q6K => {
                let d = f16_at(blk, 208);
                for half in 0..2 {
                    let ql = &blk[64 * half..64 * half + 64];
                    let qh = &blk[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &blk[192 + 8 * half..192 + 8 * half + 8];
                    let y = &mut y[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                    }
                }
            }
            GgufType::Iq4Nl => {
                let d = f16_at(blk, 0);
                for (y, v) in y.iter_mut().zip(iq4_values(&blk[2..18])) {
                    *y = d * v as f32;
                }
            }
            GgufType::Iq4Xs => {
                // dequantize_row_iq4_xs: dl = d·(ls - 32), then dl·kvalue.
                let d = f16_at(blk, 0);
                for s in 0..8 {
                    let dl = d * (iq4xs_scale(blk, s) - 32) as f32;
                    let qs = &blk[8 + 16 * s..8 + 16 * s + 16];
                    for (y, v) in y[32 * s..32 * s + 32].iter_mut().zip(iq4_values(qs)) {
                        *y = dl * v as f32;
                    }
                }
            }
        }
    }
}

/// The 6-bit scale `ls` (`0..64`, used as `ls - 32`) of sub-block `s` (0..8) of an `IQ4_XS`
/// block (ggml `dequantize_row_iq4_xs`).
#[inline(always)]
pub(crate) fn iq4xs_scale(blk: &[u8], s: usize) -> i32 {
    let scales_h = u16::from_le_bytes([blk[2], blk[3]]);
    let lo = (blk[4 + s / 2] >> (4 * (s % 2))) & 0xF;
    let hi = ((scales_h >> (2 * s)) & 3) as u8;
    (lo | (hi << 4)) as i32
}

/// The table values of 32 `IQ4_NL`-coded values from 16 bytes in `Q4_0`'s nibble order
/// (byte `j`: value `j` low, `j + 16` high).
#[inline(always)]
pub(crate) fn iq4_values(qs: &[u8]) -> [i8; 32] {
    let mut v = [0i8; 32];
    for j in 0..16 {
        v[j] = KVALUES_IQ4NL[(qs[j] & 0xF) as usize];
        v[j + 16] = KVALUES_IQ4NL[(qs[j] >> 4) as usize];
    }
    v
}

/// The signed quants `q - 16` (`-16..16`) of a `Q5_0` block: the nibbles of bytes 6..22 as in
/// `Q4_0`, bit 4 of value `j` from bit `j` of bytes 2..6 (a little-endian `u32`).
#[inline(always)]
fn q5_0_quants(blk: &[u8]) -> [i32; 32] {
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    let mut q = [0i32; 32];
    for j in 0..16 {
        let b = blk[6 + j];
        q[j] = ((b & 0xF) as i32 | (((qh >> j) & 1) << 4) as i32) - 16;
        q[j + 16] = ((b >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32) - 16;
    }
    q
}

/// The 5-bit codes (`0..32`) of a `Q5_K` block (176 bytes), in value order: value `64c + l`
/// (`l < 32`) is the low nibble of `qs[32c + l]` (bytes `48..176`) with bit `2c` of `qh[l]`
/// (bytes `16..48`) as bit 4, value `64c + 32 + l` the high nibble with bit `2c + 1` (ggml's
/// `dequantize_row_q5_K`).
#[inline(always)]
pub(crate) fn q5k_codes(blk: &[u8]) -> [u8; 256] {
    let (qh, qs) = (&blk[16..48], &blk[48..176]);
    let mut q = [0u8; 256];
    for c in 0..4 {
        for l in 0..32 {
            let (b, h) = (qs[32 * c + l], qh[l] >> (2 * c));
            q[64 * c + l] = (b & 0xF) | ((h & 1) << 4);
            q[64 * c + 32 + l] = (b >> 4) | ((h & 2) << 3);
        }
    }
    q
}

/// The tile function of a weight type.
pub(crate) fn tile_fn(dtype: GgufType) -> TileFn {
    match dtype {
        GgufType::Q4_0 => tile::<Q4_0>,
        GgufType::Q4_1 => tile::<Q4_1>,
        GgufType::Q5_0 => tile::<Q5_0>,
        GgufType::Q8_0 => tile::<Q8_0>,
        GgufType::Q4K => tile::<Q4K>,
        GgufType::Q5K => tile::<Q5K>,
        GgufType::Q6K => tile::<Q6K>,
        GgufType::Iq4Nl => tile::<Iq4Nl>,
        GgufType::Iq4Xs => tile::<Iq4Xs>,
    }
}

/// A row dot product: weight row bytes against activation row `r`.
trait RowDot {
    fn dot(w: &[u8], a: &Acts, r: usize) -> f32;
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q8_0;
struct Q4K;
struct Q5K;
struct Q6K;
struct Iq4Nl;
struct Iq4Xs;

/// Activation block `b` of row `r` (32 values) and its `(d, s)`.
#[inline(always)]
fn act32(a: &Acts, r: usize, b: usize) -> (&[i8], f32, f32) {
    let nb = a.k / 32;
    let q = &a.qs[r * a.k + 32 * b..r * a.k + 32 * b + 32];
    (q, a.d[r * nb + b], a.s[r * nb + b])
}

/// `Σ_j nibble_j · y_j` of a 16-byte `Q4_x` quant array against 32 activations.
#[inline(always)]
fn q4_isum(qs: &[u8], y: &[i8]) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        s += (qs[j] & 0xF) as i32 * y[j] as i32 + (qs[j] >> 4) as i32 * y[j + 16] as i32;
    }
    s
}

impl RowDot for Q4_0 {
    // Σ d·(q - 8)·dy·y = d·dy·Σ q·y - 8·d·(dy·Σy): the block sum `s` of the activations.
    fn dot(w: &[u8], a: &Acts, r: usize) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(18).enumerate() {
            let (y, dy, sy) = act32(a, r, b);
            let d = f16_at(blk, 0);
            acc += d * dy * q4_isum(&blk[2..18], y) as f32 - 8.0 * d * sy;
        }
        acc
    }
}

impl RowDot for Q4_1 {
    // ggml_vec_dot_q4_1_q8_1: Σ (d·q + m)·dy·y = d·dy·Σ q·y + m·s.
    fn dot(w: &[u8], a: &Acts, r: usize) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(20).enumerate() {
            let (y, dy, sy) = act32(a, r, b);
            let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
            acc += d * dy * q4_isum(&blk[4..20], y) as f32 + m * sy;
        }
        acc
    }
}

impl RowDot for Q5_0 {
    // ggml_vec_dot_q5_0_q8_0: Σ_b d·dy·Σ (q - 16)·y.
    fn dot(w: &[u8], a: &Acts, r: usize) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(22).enumerate() {
            let (y, dy, _) = act32(a, r, b);
            let d = f16_at(blk, 0);
            let s: i32 = q5_0_quants(blk)
                .iter()
                .zip(y)
                .map(|(&q, &y)| q * y as i32)
                .sum();
            acc += d * dy * s as f32;
        }
        acc
    }
}

impl RowDot for Q8_0 {
    // ggml_vec_dot_q8_0_q8_0.
    fn dot(w: &[u8], a: &Acts, r: usize) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(34).enumerate() {
            let (y, dy, _) = act32(a, r, b);
            let d = f16_at(blk, 0);
            let mut s = 0i32;
            for j in 0..32 {
                s += blk[2 + j] as i8 as i32 * y[j] as i32;
            }
            acc += d * dy * s as f32;
        }
        acc
    }
}

impl RowDot for Q4K {
    // d·dy·Σ_s sc_s·Σ q·y - dmin·dy·Σ_s m_s·Σy, in the float order of ggml's repacked kernels
    // (see the module docs of `kernels`): one fused multiply-add per super-block, or per pair of
    // sub-blocks for the rows ggml's GEMM takes.
    fn dot(w: &[u8], a: &Acts, r: usize) -> f32 {
        let nb = a.k / 256;
        let gemm = super::q4k_gemm_row(a.m, r);
        let (mut acc, mut accm) = (0f32, 0f32);
        for (b, blk) in w.chunks_exact(144).enumerate() {
            let y = &a.qs[r * a.k + 256 * b..r * a.k + 256 * b + 256];
            let bsums = &a.bsums[r * (a.k / 16) + 16 * b..r * (a.k / 16) + 16 * b + 16];
            let dy = a.d[r * nb + b];
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let scales = &blk[4..16];
            let qs = &blk[16..144];
            let mut isum = 0i32;
            let mut msum = 0i32;
            for c in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * c, scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                let (mut s1, mut s2) = (0i32, 0i32);
                for l in 0..32 {
                    let q = qs[32 * c + l];
                    s1 += (q & 0xF) as i32 * y[64 * c + l] as i32;
                    s2 += (q >> 4) as i32 * y[64 * c + 32 + l] as i32;
                }
                isum += sc1 as i32 * s1 + sc2 as i32 * s2;
                msum += m1 as i32 * (bsums[4 * c] as i32 + bsums[4 * c + 1] as i32)
                    + m2 as i32 * (bsums[4 * c + 2] as i32 + bsums[4 * c + 3] as i32);
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
        acc - accm
    }
}

impl RowDot for Q5K {
    // d·dy·Σ_s sc_s·Σ q·y - dmin·dy·Σ_s m_s·bsum_s with 5-bit `q`. For 8+ rows in the float
    // order of ggml's tiled matmul (`super::q5k_tiled`); below that one fused multiply-add per
    // super-block into each of two sums, `acc - accm` at the end (ggml's x86 `vec_dot` keeps
    // eight lanes of `acc` instead, as the x86 kernels do).
    fn dot(w: &[u8], a: &Acts, r: usize) -> f32 {
        let nb = a.k / 256;
        let tiled = super::q5k_tiled(a.m);
        let (mut acc, mut accm) = (0f32, 0f32);
        for (b, blk) in w.chunks_exact(176).enumerate() {
            let y = &a.qs[r * a.k + 256 * b..r * a.k + 256 * b + 256];
            let bsums = &a.bsums[r * (a.k / 16) + 16 * b..r * (a.k / 16) + 16 * b + 16];
            let dy = a.d[r * nb + b];
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let q = q5k_codes(blk);
            let (mut isum, mut msum) = (0i32, 0i32);
            for s in 0..8 {
                let (sc, m) = scale_min_k4(s, &blk[4..16]);
                let mut sub = 0i32;
                for l in 32 * s..32 * s + 32 {
                    sub += q[l] as i32 * y[l] as i32;
                }
                isum += sc as i32 * sub;
                msum += m as i32 * (bsums[2 * s] as i32 + bsums[2 * s + 1] as i32);
            }
            if tiled {
                acc = (-dmin)
                    .mul_add(msum as f32, isum as f32 * d)
                    .mul_add(dy, acc);
            } else {
                acc = (isum as f32).mul_add(d * dy, acc);
                accm = (msum as f32).mul_add(dmin * dy, accm);
            }
        }
        acc - accm
    }
}

impl RowDot for Q6K {
    // d·dy·Σ_s sc_s·Σ (q - 32)·y, with Σ 32·y from the bsums; for 8+ rows in the float order of
    // ggml's tiled matmul (`super::q6k_tiled`).
    fn dot(w: &[u8], a: &Acts, r: usize) -> f32 {
        let nb = a.k / 256;
        let tiled = super::q6k_tiled(a.m);
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(210).enumerate() {
            let y = &a.qs[r * a.k + 256 * b..r * a.k + 256 * b + 256];
            let bsums = &a.bsums[r * (a.k / 16) + 16 * b..r * (a.k / 16) + 16 * b + 16];
            let dy = a.d[r * nb + b];
            let d = f16_at(blk, 208);
            let sc = &blk[192..208];
            let mut sub = [0i32; 16];
            for half in 0..2 {
                let ql = &blk[64 * half..64 * half + 64];
                let qh = &blk[128 + 32 * half..128 + 32 * half + 32];
                let y = &y[128 * half..128 * half + 128];
                for l in 0..32 {
                    let is = 8 * half + l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32;
                    sub[is] += q1 * y[l] as i32;
                    sub[is + 2] += q2 * y[l + 32] as i32;
                    sub[is + 4] += q3 * y[l + 64] as i32;
                    sub[is + 6] += q4 * y[l + 96] as i32;
                }
            }
            let mut isum = 0i32;
            for s in 0..16 {
                isum += (sc[s] as i8 as i32) * (sub[s] - 32 * bsums[s] as i32);
            }
            acc = if tiled {
                (isum as f32 * d).mul_add(dy, acc)
            } else {
                acc + d * dy * isum as f32
            };
        }
        acc
    }
}

/// `Σ_j v_j · y_j` of 32 table values against 32 activations.
#[inline(always)]
fn i8_isum(v: &[i8; 32], y: &[i8]) -> i32 {
    v.iter().zip(y).map(|(&v, &y)| v as i32 * y as i32).sum()
}

impl RowDot for Iq4Nl {
    // ggml_vec_dot_iq4_nl_q8_0 (generic): Σ_b d·dy·Σ kvalue(q)·y.
    fn dot(w: &[u8], a: &Acts, r: usize) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(18).enumerate() {
            let (y, dy, _) = act32(a, r, b);
            let d = f16_at(blk, 0);
            acc += dy * d * i8_isum(&iq4_values(&blk[2..18]), y) as f32;
        }
        acc
    }
}

impl RowDot for Iq4Xs {
    // ggml_vec_dot_iq4_xs_q8_K (generic): per sub-block (d·dy·(ls - 32))·Σ kvalue(q)·y.
    fn dot(w: &[u8], a: &Acts, r: usize) -> f32 {
        let nb = a.k / 256;
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(136).enumerate() {
            let y = &a.qs[r * a.k + 256 * b..r * a.k + 256 * b + 256];
            let d4d8 = f16_at(blk, 0) * a.d[r * nb + b];
            for s in 0..8 {
                let dl = d4d8 * (iq4xs_scale(blk, s) - 32) as f32;
                let v = iq4_values(&blk[8 + 16 * s..8 + 16 * s + 16]);
                acc += dl * i8_isum(&v, &y[32 * s..32 * s + 32]) as f32;
            }
        }
        acc
    }
}

/// # Safety
/// See [`TileFn`].
unsafe fn tile<K: RowDot>(t: &Tile<'_>) {
    for r in t.ms.clone() {
        for j in t.rows.clone() {
            let w = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
            let v = K::dot(w, t.acts, r);
            // SAFETY: the caller guarantees `out` is valid for `[m, ldo]` and that this
            // element belongs to this tile only.
            unsafe { *t.out.add(r * t.ldo + j) = v };
        }
    }
}

/// Scale or bias `i` of an MLX weight whose parameters are `f32` (`P = 0`), `f16` (`1`) or
/// `bf16` (`2`), widened to `f32` (exact).
///
/// # Safety
/// `p` must be valid for reading element `i` of that dtype.
#[inline(always)]
pub(crate) unsafe fn mlx_param<const P: u8>(p: *const u8, i: usize) -> f32 {
    unsafe {
        match P {
            0 => (p as *const f32).add(i).read_unaligned(),
            1 => f16::from_bits((p as *const u16).add(i).read_unaligned()).to_f32(),
            _ => f32::from_bits(u32::from((p as *const u16).add(i).read_unaligned()) << 16),
        }
    }
}

/// The portable MLX affine tile function for `bits` (2, 3, 4, 5, 6 or 8) and a parameter
/// dtype.
pub(crate) fn mlx_tile_fn(bits: usize, params: ParamDtype) -> TileFn {
    macro_rules! by_params {
        ($bits:literal) => {
            match params {
                ParamDtype::F32 => tile_mlx::<$bits, 0>,
                ParamDtype::F16 => tile_mlx::<$bits, 1>,
                ParamDtype::BF16 => tile_mlx::<$bits, 2>,
            }
        };
    }
    match bits {
        2 => by_params!(2),
        3 => by_params!(3),
        4 => by_params!(4),
        5 => by_params!(5),
        6 => by_params!(6),
        _ => by_params!(8),
    }
}

/// # Safety
/// See [`TileFn`]; `t.mlx` points at the weight's `[n, gpr]` scales and biases.
unsafe fn tile_mlx<const BITS: usize, const P: u8>(t: &Tile<'_>) {
    for i in t.ms.clone() {
        for j in t.rows.clone() {
            let v = unsafe { dot_mlx::<BITS, P>(t, j, i) };
            unsafe { *t.out.add(i * t.ldo + j) = v };
        }
    }
}

/// MLX affine weight row `j` against activation row `i`:
/// `Σ_g Σ_{b in g} scale_g·dy_b·Σ q·y + bias_g·s_b`. 4-bit codes pair with `Q8_32Nib`
/// activations (byte `c`: low nibble with position `c`, high nibble with `16 + c`), 8-bit
/// codes (`u8`) and those of 2, 3, 5 and 6 bits (a little-endian bit stream of `4·BITS`
/// bytes per 32-value block, [`unpack_block`]) with `Q8_32F` ones.
///
/// # Safety
/// As [`tile_mlx`].
unsafe fn dot_mlx<const BITS: usize, const P: u8>(t: &Tile<'_>, j: usize, i: usize) -> f32 {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 32);
    let pm = t.mlx;
    let row = &t.w[j * t.row_bytes..(j + 1) * t.row_bytes];
    let yq = &a.qs[i * k..(i + 1) * k];
    let mut acc = 0f32;
    for g in 0..pm.gpr {
        let (sc, bi) = unsafe {
            (
                mlx_param::<P>(pm.scales, j * pm.gpr + g),
                mlx_param::<P>(pm.biases, j * pm.gpr + g),
            )
        };
        for b in g * pm.bpg..(g + 1) * pm.bpg {
            let y = &yq[32 * b..32 * b + 32];
            let sumi: i32 = if BITS == 4 {
                row[16 * b..16 * b + 16]
                    .iter()
                    .enumerate()
                    .map(|(c, &q)| {
                        i32::from(q & 0xF) * i32::from(y[c])
                            + i32::from(q >> 4) * i32::from(y[16 + c])
                    })
                    .sum()
            } else if BITS == 8 {
                row[32 * b..32 * b + 32]
                    .iter()
                    .zip(y)
                    .map(|(&q, &v)| i32::from(q) * i32::from(v))
                    .sum()
            } else {
                let q = unpack_block::<BITS>(&row[4 * BITS * b..4 * BITS * (b + 1)]);
                q.iter()
                    .zip(y)
                    .map(|(&q, &v)| i32::from(q) * i32::from(v))
                    .sum()
            };
            acc += sc * a.d[i * nb + b] * sumi as f32 + bi * a.s[i * nb + b];
        }
    }
    acc
}

/// The 32 codes of one block of `BITS`-bit MLX codes (`bytes`: `4·BITS` bytes of the row, a
/// little-endian bit stream, low bits first, as MLX packs its `u32` words).
#[inline(always)]
pub(crate) fn unpack_block<const BITS: usize>(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mask = (1u32 << BITS) - 1;
    let (mut buf, mut have) = (0u32, 0usize);
    let mut it = bytes.iter();
    for c in out.iter_mut() {
        while have < BITS {
            buf |= u32::from(it.next().copied().unwrap_or(0)) << have;
            have += 8;
        }
        *c = (buf & mask) as u8;
        buf >>= BITS;
        have -= BITS;
    }
    out
}
