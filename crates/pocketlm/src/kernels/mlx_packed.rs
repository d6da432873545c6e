//! MLX affine weights of 2, 3, 4, 5 and 6 bits repacked at load into groups of 16 interleaved
//! rows, for the AVX-512 VNNI kernel of [`super::packed`] (the `Q4_0` one) with MLX's
//! per-group scales and biases: prefill and decode read each weight byte once per 4 activation
//! rows, and 16 rows' integer sums come out side by side with no horizontal reduction.
//!
//! Layout of a [`PackedMlx`] `[rows, cols]` of `bits` bits (`rows` a multiple of 16; the same
//! byte counts as MLX's tensors, only permuted):
//! - codes: row group `g` (rows `16g..16g + 16`) whole, then group `g + 1`; within a group, per
//!   32-value block `b` (`4·bits` bytes of each row), `bits` words of 64 bytes, word `c`
//!   holding 4 bytes per row (lane `i` = bytes `4i..4i + 4` = row `16g + i`): byte `t` of lane
//!   `i` in word `c` is byte `4c + t` of that row's block in MLX's `u32` stream.
//!   - 4 bits: the low nibble of that byte is code `8c + 2t` and its high nibble code
//!     `8c + 2t + 1`. With the activations in `ActFormat::Q8_32Nib` order (even values first),
//!     low nibbles pair with positions `4c + t` and high ones with `16 + 4c + t`: the pairing
//!     of the packed `Q4_0` layout.
//!   - 2, 3, 5, 6 bits: lane `i` of words `0..bits` is row `16g + i`'s block as a bit stream
//!     of `32·bits` bits. Codes `4j..4j + 4` (bits `4j·bits..4(j + 1)·bits`) are shifted out
//!     of two consecutive words (`vpshrdvd`, AVX512-VBMI2) and spread to one byte each
//!     (`vpmultishiftqb`, AVX512-VBMI, then a mask), to pair with activation bytes
//!     `4j..4j + 4` in their natural order (`ActFormat::Q8_32F`, `f32` `dy` and `s`, as the
//!     unpacked kernels of these widths).
//! - scales and biases: `[rows / 16, cols / group_size, 16]`, in their stored dtype.
//!
//! Per 32-value block `b` of group `q` and activation row `r` (`dy`, `s = dy·Σqy` of ggml's
//! `Q8_1`, for 4 bits both rounded to `f16` as for the unpacked 4-bit kernel, see
//! [`super::mlx`]):
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

/// An MLX affine matrix `[rows, cols]` of 2, 3, 4, 5 or 6 bits in the 16-row interleaved
/// layout (see the module docs). Made by [`PackedMlx::pack`], turned back by [`PackedMlx::unpack`]; products give
/// the values of the unpacked kernels up to float summation order.
#[derive(Debug, Clone)]
pub struct PackedMlx {
    codes: Vec<u8>,
    scales: Vec<u8>,
    biases: Vec<u8>,
    params: ParamDtype,
    rows: usize,
    cols: usize,
    group_size: usize,
    bits: usize,
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

impl PackedMlx {
    /// Whether [`Self::pack`] takes `q`: 2 to 6 bits, `rows` a multiple of 16, a
    /// little-endian CPU.
    pub fn can_pack(q: &AffineQuantized) -> bool {
        cfg!(target_endian = "little")
            && matches!(q.bits(), 2..=6)
            && q.cols() > 0
            && q.rows().is_multiple_of(ROWS)
    }

    /// Whether this CPU has the packed kernels of `bits`: AVX-512 VNNI (with BW), and for 2,
    /// 3, 5 and 6 bits AVX512-VBMI and VBMI2 too. Elsewhere a packed matrix runs on the
    /// portable kernel, slower than the unpacked kernels.
    pub fn kernels_here(bits: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            super::GgufMatrix::packed_kernels_here() && avx512::runs(bits)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = bits;
            false
        }
    }

    /// The packed copy of `q`, or `None` unless [`Self::can_pack`].
    pub fn pack(q: &AffineQuantized) -> Option<Self> {
        if !Self::can_pack(q) {
            return None;
        }
        let (rows, cols, gs, bits) = (q.rows(), q.cols(), q.group_size(), q.bits());
        let (nb, gpr) = (cols / 32, q.groups_per_row());
        let (row_bytes, blk_bytes) = (cols * bits / 8, 4 * bits);
        let words = q.weight();
        // SAFETY: `u32` words viewed as their bytes (little-endian, checked by `can_pack`).
        let src =
            unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 4) };
        let mut codes = vec![0u8; src.len()];
        codes
            .par_chunks_exact_mut(nb * ROWS * blk_bytes)
            .zip(src.par_chunks_exact(ROWS * row_bytes))
            .for_each(|(dst, group)| {
                for (i, row) in group.chunks_exact(row_bytes).enumerate() {
                    for (b, blk) in row.chunks_exact(blk_bytes).enumerate() {
                        for c in 0..bits {
                            dst[b * ROWS * blk_bytes + 64 * c + 4 * i..][..4]
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
            bits,
            exact_matmul: q.exact_matmul(),
        })
    }

    /// The matrix in MLX's layout again (exactly the one packed).
    pub fn unpack(&self) -> AffineQuantized {
        let (rows, cols, gpr, bits) =
            (self.rows, self.cols, self.cols / self.group_size, self.bits);
        let nb = cols / 32;
        let (row_bytes, blk_bytes) = (cols * bits / 8, 4 * bits);
        let mut codes = vec![0u8; self.codes.len()];
        codes
            .par_chunks_exact_mut(ROWS * row_bytes)
            .zip(self.codes.par_chunks_exact(nb * ROWS * blk_bytes))
            .for_each(|(group, src)| {
                for (i, row) in group.chunks_exact_mut(row_bytes).enumerate() {
                    for (b, blk) in row.chunks_exact_mut(blk_bytes).enumerate() {
                        for c in 0..bits {
                            blk[4 * c..4 * c + 4].copy_from_slice(
                                &src[b * ROWS * blk_bytes + 64 * c + 4 * i..][..4],
                            );
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
            bits,
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

    /// Bits per code (2 to 6).
    pub fn bits(&self) -> usize {
        self.bits
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
                bits: self.bits,
                params: self.params,
            },
            rows: self.rows,
            cols: self.cols,
            row_bytes: self.cols * self.bits / 8,
            mlx: MlxParts {
                scales: self.scales.as_ptr(),
                biases: self.biases.as_ptr(),
                gpr: self.cols / self.group_size,
                bpg: self.group_size / 32,
            },
        }
    }
}

/// The portable tile function for `bits` (the reference of the SIMD one: same integers, same
/// float operations in the same order).
pub(crate) fn tile_fn(bits: usize, params: ParamDtype) -> TileFn {
    macro_rules! by_params {
        ($bits:literal) => {
            match params {
                ParamDtype::F32 => tile_scalar::<$bits, 0>,
                ParamDtype::F16 => tile_scalar::<$bits, 1>,
                ParamDtype::BF16 => tile_scalar::<$bits, 2>,
            }
        };
    }
    match bits {
        2 => by_params!(2),
        3 => by_params!(3),
        5 => by_params!(5),
        6 => by_params!(6),
        _ => by_params!(4),
    }
}

/// # Safety
/// See [`TileFn`]; the tile's rows start and end on multiples of [`ROWS`]; `t.mlx` points at
/// the packed scales and biases.
unsafe fn tile_scalar<const BITS: usize, const P: u8>(t: &Tile<'_>) {
    let a = t.acts;
    let (k, nb) = (a.k, a.k / 32);
    let pm = t.mlx;
    let gb = ROWS * 4 * BITS;
    for g in t.rows.start / ROWS..t.rows.end / ROWS {
        let grp = &t.w[g * nb * gb..(g + 1) * nb * gb];
        for r in t.ms.clone() {
            let mut acc = [0f32; ROWS];
            let mut accm = [0f32; ROWS];
            for qg in 0..pm.gpr {
                let base = (g * pm.gpr + qg) * ROWS;
                for b in qg * pm.bpg..(qg + 1) * pm.bpg {
                    let blk = &grp[b * gb..(b + 1) * gb];
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
                        if BITS == 4 {
                            for c in 0..4 {
                                for tt in 0..4 {
                                    let byte = blk[64 * c + 4 * i + tt];
                                    sum += i32::from(byte & 0xF) * i32::from(y[4 * c + tt]);
                                    sum += i32::from(byte >> 4) * i32::from(y[16 + 4 * c + tt]);
                                }
                            }
                        } else {
                            let mut stream = [0u8; 24];
                            for c in 0..BITS {
                                stream[4 * c..4 * c + 4]
                                    .copy_from_slice(&blk[64 * c + 4 * i..][..4]);
                            }
                            let q = super::scalar::unpack_block::<BITS>(&stream[..4 * BITS]);
                            for (&q, &v) in q.iter().zip(y) {
                                sum += i32::from(q) * i32::from(v);
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

    /// Whether this CPU runs the kernel of `bits` (callers check
    /// [`super::super::packed::avx512::available`] as well): 2, 3, 5 and 6 bits need
    /// AVX512-VBMI and VBMI2 for their unpacking.
    pub(crate) fn runs(bits: usize) -> bool {
        bits == 4
            || (is_x86_feature_detected!("avx512vbmi") && is_x86_feature_detected!("avx512vbmi2"))
    }

    /// The tile function for `bits` and a parameter dtype (callers check [`runs`]).
    pub(crate) fn tile_fn(bits: usize, params: ParamDtype) -> TileFn {
        macro_rules! by_params {
            ($tile:ident, $bits:literal) => {
                match params {
                    ParamDtype::F32 => $tile::<0, $bits>,
                    ParamDtype::F16 => $tile::<1, $bits>,
                    ParamDtype::BF16 => $tile::<2, $bits>,
                }
            };
        }
        match bits {
            2 => by_params!(tile_n, 2),
            3 => by_params!(tile_n, 3),
            5 => by_params!(tile_n, 5),
            6 => by_params!(tile_n, 6),
            _ => by_params!(tile, 4),
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

    /// The tile loop over row groups and 8 activation rows at a time, for a tile function
    /// `$name` with target features `$feat`.
    macro_rules! tile_loop {
        ($name:ident, $feat:literal) => {
            /// # Safety
            /// See [`TileFn`]; the tile's rows start and end on multiples of [`ROWS`]; the CPU
            /// has the function's target features.
            #[target_feature(enable = $feat)]
            unsafe fn $name<const P: u8, const BITS: usize>(t: &Tile<'_>) {
                let gb = ROWS * 4 * BITS;
                let nb = t.acts.k / 32;
                for g in t.rows.start / ROWS..t.rows.end / ROWS {
                    // SAFETY: group `g` lies inside the weight (rows checked by the caller).
                    let wg = unsafe { t.w.as_ptr().add(g * nb * gb) };
                    let mut r = t.ms.start;
                    unsafe {
                        while r + 8 <= t.ms.end {
                            rows::<8, P, BITS>(t, wg, g, r);
                            r += 8;
                        }
                        remainder_rows!(t.ms.end - r, R => rows::<R, P, BITS>(t, wg, g, r));
                    }
                }
            }
        };
    }
    tile_loop!(tile, "avx512f,avx512vnni");
    tile_loop!(tile_n, "avx512f,avx512bw,avx512vnni,avx512vbmi,avx512vbmi2");

    /// Per lane (row), the codes of one 32-value block of `BITS` bits (2, 3, 5, 6) as bytes:
    /// word `j` holds codes `4j..4j + 4`. `p` points at the block's `BITS` words of 64 bytes
    /// (see the module docs).
    ///
    /// # Safety
    /// `p` is valid for `64·BITS` bytes; the CPU has AVX512F, BW, VBMI and VBMI2.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2")]
    unsafe fn nbit_codes<const BITS: usize>(p: *const u8) -> [__m512i; 8] {
        let mut d = [_mm512_setzero_si512(); 6];
        for (c, d) in d.iter_mut().enumerate().take(BITS) {
            *d = unsafe { _mm512_loadu_si512(p.add(64 * c) as *const _) };
        }
        // Byte `t` of each 32-bit half takes the 8 bits at `t·BITS` of that half.
        let mut offsets = 0u64;
        for b in 0..8 {
            offsets |= ((32 * (b / 4) + BITS * (b % 4)) as u64) << (8 * b);
        }
        let ctrl = _mm512_set1_epi64(offsets as i64);
        let mask = _mm512_set1_epi8(((1u16 << BITS) - 1) as i8);
        let mut w = [_mm512_setzero_si512(); 8];
        for (j, w) in w.iter_mut().enumerate() {
            let bit = 4 * j * BITS;
            let (lo, s) = (bit / 32, (bit % 32) as i32);
            let hi = (lo + 1).min(BITS - 1);
            let x = _mm512_shrdv_epi32(d[lo], d[hi], _mm512_set1_epi32(s));
            *w = _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, x), mask);
        }
        w
    }

    /// Activation rows `r..r + R` (`R <= 8`) against the 16 weight rows of group `g` (codes
    /// at `wg`), written out row by row as the packed GGUF kernel does
    /// ([`super::super::packed`]).
    ///
    /// # Safety
    /// As [`tile`]; `r + R <= t.ms.end`.
    #[inline(always)]
    unsafe fn rows<const R: usize, const P: u8, const BITS: usize>(
        t: &Tile<'_>,
        wg: *const u8,
        g: usize,
        r: usize,
    ) {
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
                    let blk = wg.add(b * ROWS * 4 * BITS);
                    if pf {
                        prefetch_ahead(blk, ROWS * 4 * BITS);
                    }
                    let w = if BITS == 4 {
                        nibbles(blk)
                    } else {
                        nbit_codes::<BITS>(blk)
                    };
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
