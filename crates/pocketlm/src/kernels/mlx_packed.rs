//! MLX affine 4-bit weights repacked at load into groups of 16 interleaved rows, for the
//! AVX-512 VNNI kernel of [`super::packed`] (the `Q4_0` one) with MLX's per-group scales and
//! biases: prefill and decode read each weight byte once per 4 activation rows, and 16 rows'
//! integer sums come out side by side with no horizontal reduction.
//!
//! Layout of a [`PackedMlx4`] `[rows, cols]` (`rows` a multiple of 16; the same byte counts as
//! MLX's tensors, only permuted):
//! - codes: row group `g` (rows `16g..16g + 16`) whole, then group `g + 1`; within a group, per
//!   32-value block `b`, 4 words of 64 bytes, word `c` holding 4 bytes per row (lane `i` =
//!   bytes `4i..4i + 4` = row `16g + i`): byte `t` of lane `i` in word `c` is byte `4c + t` of
//!   that row's block in MLX's `u32` stream, so its low nibble is code `8c + 2t` and its high
//!   nibble code `8c + 2t + 1`. With the activations in `ActFormat::Q8_32Nib` order (even
//!   values first), low nibbles pair with positions `4c + t` and high ones with `16 + 4c + t`:
//!   the pairing of the packed `Q4_0` layout.
//! - scales and biases: `[rows / 16, cols / group_size, 16]`, in their stored dtype.
//!
//! Per 32-value block `b` of group `q` and activation row `r` (`dy`, `s = dy·Σqy` of ggml's
//! `Q8_1`, both rounded to `f16` as for the unpacked 4-bit kernel, see [`super::mlx`]):
//!
//! ```text
//! acc  = fma(Σ code·qy, scale_q·dy, acc)      (exact integer sum, converted once)
//! accm = fma(bias_q, s, accm)
//! y    = acc + accm
//! ```
//!
//! The same integers and roundings as the unpacked kernel except the float summation order
//! (that one adds 8 partial lanes at the end). [`tile_fn`]'s portable version performs the same
//! float operations in the same order as the AVX-512 one, which the tests compare bit for bit.

use rayon::prelude::*;

use super::{Kind, MatRef, MlxParts, Tile, TileFn};
use crate::quant::mlx_affine::{AffineQuantized, GroupParams, ParamDtype};

/// Rows per interleaved group.
pub(crate) const ROWS: usize = 16;

/// An MLX affine 4-bit matrix `[rows, cols]` in the 16-row interleaved layout (see the module
/// docs). Made by [`PackedMlx4::pack`], turned back by [`PackedMlx4::unpack`]; products give
/// the values of the unpacked kernels up to float summation order.
#[derive(Debug, Clone)]
pub struct PackedMlx4 {
    codes: Vec<u8>,
    scales: Vec<u8>,
    biases: Vec<u8>,
    params: ParamDtype,
    rows: usize,
    cols: usize,
    group_size: usize,
    exact_matmul: bool,
}

/// Bytes of one parameter of `dtype`.
fn param_size(dtype: ParamDtype) -> usize {
    match dtype {
        ParamDtype::F32 => 4,
        ParamDtype::F16 | ParamDtype::BF16 => 2,
    }
}

/// Moves element `old(i)` of `src` (elements of `es` bytes) to element `i` of the result.
fn permute(src: &[u8], es: usize, old: impl Fn(usize) -> usize) -> Vec<u8> {
    let n = src.len() / es;
    let mut out = vec![0u8; src.len()];
    for (i, dst) in out.chunks_exact_mut(es).enumerate().take(n) {
        let o = old(i);
        dst.copy_from_slice(&src[o * es..(o + 1) * es]);
    }
    out
}

impl PackedMlx4 {
    /// Whether [`Self::pack`] takes `q`: 4 bits, `rows` a multiple of 16, a little-endian CPU.
    pub fn can_pack(q: &AffineQuantized) -> bool {
        cfg!(target_endian = "little")
            && q.bits() == 4
            && q.cols() > 0
            && q.rows().is_multiple_of(ROWS)
    }

    /// The packed copy of `q`, or `None` unless [`Self::can_pack`].
    pub fn pack(q: &AffineQuantized) -> Option<Self> {
        if !Self::can_pack(q) {
            return None;
        }
        let (rows, cols, gs) = (q.rows(), q.cols(), q.group_size());
        let (nb, gpr) = (cols / 32, q.groups_per_row());
        let row_bytes = cols / 2;
        let words = q.weight();
        // SAFETY: `u32` words viewed as their bytes (little-endian, checked by `can_pack`).
        let src =
            unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 4) };
        let mut codes = vec![0u8; src.len()];
        codes
            .par_chunks_exact_mut(nb * 256)
            .zip(src.par_chunks_exact(ROWS * row_bytes))
            .for_each(|(dst, group)| {
                for (i, row) in group.chunks_exact(row_bytes).enumerate() {
                    for (b, blk) in row.chunks_exact(16).enumerate() {
                        for c in 0..4 {
                            dst[b * 256 + 64 * c + 4 * i..][..4]
                                .copy_from_slice(&blk[4 * c..4 * c + 4]);
                        }
                    }
                }
            });
        let params = q.dtype();
        let es = param_size(params);
        // Destination element (g, q, i) <- element (16g + i, q).
        let param_old = |p: usize| {
            let i = p % ROWS;
            let qg = (p / ROWS) % gpr;
            let g = p / (ROWS * gpr);
            (g * ROWS + i) * gpr + qg
        };
        Some(Self {
            codes,
            scales: permute(q.scales().as_bytes(), es, param_old),
            biases: permute(q.biases().as_bytes(), es, param_old),
            params,
            rows,
            cols,
            group_size: gs,
            exact_matmul: q.exact_matmul(),
        })
    }

    /// The matrix in MLX's layout again (exactly the one packed).
    pub fn unpack(&self) -> AffineQuantized {
        let (rows, cols, gpr) = (self.rows, self.cols, self.cols / self.group_size);
        let nb = cols / 32;
        let row_bytes = cols / 2;
        let mut codes = vec![0u8; self.codes.len()];
        codes
            .par_chunks_exact_mut(ROWS * row_bytes)
            .zip(self.codes.par_chunks_exact(nb * 256))
            .for_each(|(group, src)| {
                for (i, row) in group.chunks_exact_mut(row_bytes).enumerate() {
                    for (b, blk) in row.chunks_exact_mut(16).enumerate() {
                        for c in 0..4 {
                            blk[4 * c..4 * c + 4]
                                .copy_from_slice(&src[b * 256 + 64 * c + 4 * i..][..4]);
                        }
                    }
                }
            });
        // Source element of MLX position (row, group).
        let es = param_size(self.params);
        let param_old = |p: usize| {
            let (r, qg) = (p / gpr, p % gpr);
            ((r / ROWS) * gpr + qg) * ROWS + r % ROWS
        };
        let to_params = |bytes: Vec<u8>| -> GroupParams {
            let halves = || {
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
            };
            match self.params {
                ParamDtype::F32 => GroupParams::F32(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
                ParamDtype::F16 => GroupParams::F16(halves().map(half::f16::from_bits).collect()),
                ParamDtype::BF16 => {
                    GroupParams::BF16(halves().map(half::bf16::from_bits).collect())
                }
            }
        };
        let words = codes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        AffineQuantized::from_parts(
            words,
            to_params(permute(&self.scales, es, param_old)),
            to_params(permute(&self.biases, es, param_old)),
            rows,
            cols,
            self.group_size,
            4,
        )
        .expect("a packed matrix holds a valid MLX matrix's buffers")
        .with_exact_matmul(self.exact_matmul)
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Values per group.
    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// Whether products must keep `mx.quantized_matmul`'s f32 arithmetic (copied from the
    /// matrix packed; such layers are normally not packed at all).
    pub fn exact_matmul(&self) -> bool {
        self.exact_matmul
    }

    /// The whole matrix dequantized like `mx.dequantize`, `[rows, cols]` row-major `f32`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.unpack().dequantize()
    }

    pub(crate) fn mat_ref(&self) -> MatRef<'_> {
        MatRef {
            name: "<MLX affine weight (packed)>",
            w: &self.codes,
            kind: Kind::MlxPacked {
                params: self.params,
            },
            rows: self.rows,
            cols: self.cols,
            row_bytes: self.cols / 2,
            mlx: MlxParts {
                scales: self.scales.as_ptr(),
                biases: self.biases.as_ptr(),
                gpr: self.cols / self.group_size,
                bpg: self.group_size / 32,
            },
        }
    }
}

/// The portable tile function (the reference of the SIMD one: same integers, same float
/// operations in the same order).
pub(crate) fn tile_fn(params: ParamDtype) -> TileFn {
    match params {
        ParamDtype::F32 => tile_scalar::<0>,
        ParamDtype::F16 => tile_scalar::<1>,
        ParamDtype::BF16 => tile_scalar::<2>,
    }
}

/// # Safety
/// See [`TileFn`]; the tile's rows start and end on multiples of [`ROWS`]; `t.mlx` points at
/// the packed scales and biases.
unsafe fn tile_scalar<const P: u8>(t: &Tile<'_>) {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 32);
    let pm = t.mlx;
    for g in t.rows.start / ROWS..t.rows.end / ROWS {
        let grp = &t.w[g * nb * 256..(g + 1) * nb * 256];
        for r in t.ms.clone() {
            let mut acc = [0f32; ROWS];
            let mut accm = [0f32; ROWS];
            for qg in 0..pm.gpr {
                let base = (g * pm.gpr + qg) * ROWS;
                for b in qg * pm.bpg..(qg + 1) * pm.bpg {
                    let blk = &grp[b * 256..(b + 1) * 256];
                    let y = &a.qs[r * k + 32 * b..][..32];
                    let (dy, s) = (a.d[r * nb + b], a.s[r * nb + b]);
                    for i in 0..ROWS {
                        // SAFETY: `base + i` is inside the `[rows / 16, gpr, 16]` parameters.
                        let (sc, bi) = unsafe {
                            (
                                super::scalar::mlx_param::<P>(pm.scales, base + i),
                                super::scalar::mlx_param::<P>(pm.biases, base + i),
                            )
                        };
                        let mut sum = 0i32;
                        for c in 0..4 {
                            for tt in 0..4 {
                                let byte = blk[64 * c + 4 * i + tt];
                                sum += i32::from(byte & 0xF) * i32::from(y[4 * c + tt]);
                                sum += i32::from(byte >> 4) * i32::from(y[16 + 4 * c + tt]);
                            }
                        }
                        acc[i] = (sum as f32).mul_add(sc * dy, acc[i]);
                        accm[i] = bi.mul_add(s, accm[i]);
                    }
                }
            }
            for i in 0..ROWS {
                // SAFETY: the caller guarantees `out` is valid for `[m, ldo]` and that the
                // tile's elements belong to it only.
                unsafe { *t.out.add(r * t.ldo + g * ROWS + i) = acc[i] + accm[i] };
            }
        }
    }
}

/// The AVX-512 kernel (`vpdpbusd` on 512-bit registers: AVX512F + AVX512-VNNI).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::packed::avx512::{
        block_sums, chain, nibbles, prefetch_ahead, remainder_rows, unroll8,
    };
    use super::super::{Tile, TileFn};
    use super::ROWS;
    use crate::quant::mlx_affine::ParamDtype;

    /// The tile function for a parameter dtype (callers check
    /// [`super::super::packed::avx512::available`]).
    pub(crate) fn tile_fn(params: ParamDtype) -> TileFn {
        match params {
            ParamDtype::F32 => tile::<0>,
            ParamDtype::F16 => tile::<1>,
            ParamDtype::BF16 => tile::<2>,
        }
    }

    /// 16 parameters at `p` (`P`: 0 `f32`, 1 `f16`, 2 `bf16`) widened to `f32` (exact).
    ///
    /// # Safety
    /// `p` is valid for 16 elements; the CPU has AVX512F.
    #[inline(always)]
    unsafe fn params16<const P: u8>(p: *const u8) -> __m512 {
        unsafe {
            match P {
                0 => _mm512_loadu_ps(p as *const f32),
                1 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256(p as *const __m256i),
                ))),
            }
        }
    }

    /// # Safety
    /// See [`TileFn`]; the tile's rows start and end on multiples of [`ROWS`]; the CPU has
    /// AVX512F and AVX512-VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tile<const P: u8>(t: &Tile<'_>) {
        let nb = t.acts.k / 32;
        for g in t.rows.start / ROWS..t.rows.end / ROWS {
            // SAFETY: group `g` lies inside the weight (rows checked by the caller).
            let wg = unsafe { t.w.as_ptr().add(g * nb * 256) };
            let mut r = t.ms.start;
            unsafe {
                while r + 8 <= t.ms.end {
                    rows::<8, P>(t, wg, g, r);
                    r += 8;
                }
                remainder_rows!(t.ms.end - r, R => rows::<R, P>(t, wg, g, r));
            }
        }
    }

    /// Activation rows `r..r + R` (`R <= 8`) against the 16 weight rows of group `g` (codes
    /// at `wg`), written out row by row as the packed GGUF kernel does
    /// ([`super::super::packed`]).
    ///
    /// # Safety
    /// As [`tile`]; `r + R <= t.ms.end`.
    #[inline(always)]
    unsafe fn rows<const R: usize, const P: u8>(t: &Tile<'_>, wg: *const u8, g: usize, r: usize) {
        let a = t.acts;
        let (k, nb) = (a.k, a.k / 32);
        let pm = t.mlx;
        let es = if P == 0 { 4 } else { 2 };
        // Prefetch the codes ahead, as the GGUF 4-bit kernels do: in the tile's first pass
        // over the group (the group comes from memory for every row count).
        let pf = r == t.ms.start;
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            let mut accm = [_mm512_setzero_ps(); R];
            for qg in 0..pm.gpr {
                let off = (g * pm.gpr + qg) * ROWS * es;
                let sc = params16::<P>(pm.scales.add(off));
                let bi = params16::<P>(pm.biases.add(off));
                for b in qg * pm.bpg..(qg + 1) * pm.bpg {
                    if pf {
                        prefetch_ahead(wg.add(b * 256), 256);
                    }
                    let w = nibbles(wg.add(b * 256));
                    unroll8!(R, i => {
                        let y = a.qs.as_ptr().add((r + i) * k + 32 * b) as *const i32;
                        let s = if R >= 4 {
                            chain(&w, y, 0)
                        } else {
                            block_sums(&w, y, 0)
                        };
                        let ab = (r + i) * nb + b;
                        let dd = _mm512_mul_ps(sc, _mm512_set1_ps(*a.d.get_unchecked(ab)));
                        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dd, acc[i]);
                        accm[i] =
                            _mm512_fmadd_ps(bi, _mm512_set1_ps(*a.s.get_unchecked(ab)), accm[i]);
                    });
                }
            }
            for (i, v) in acc.iter().enumerate() {
                _mm512_storeu_ps(
                    t.out.add((r + i) * t.ldo + g * ROWS),
                    _mm512_add_ps(*v, accm[i]),
                );
            }
        }
    }
}
