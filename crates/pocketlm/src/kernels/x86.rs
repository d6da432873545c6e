//! x86-64 kernels, after ggml-cpu's AVX2 `ggml_vec_dot_*` (`arch/x86/quants.c`) and candle's
//! port of them (`candle-core/src/quantized/avx.rs`), built three times: AVX2 + FMA + F16C, and
//! the same plus AVX512-VNNI or plus AVX-VNNI, whose `vpdpbusd` (EVEX or VEX encoded) replaces
//! the `vpmaddubsw` + `vpmaddwd` pair of the 32-value block types.
//!
//! Each kernel takes one weight row against `R <= 4` activation rows: the weight block is
//! loaded and unpacked once and reused for every activation row, so prefill reads each weight
//! byte once per 4 activation rows. Integer products use `vpmaddubsw` (unsigned × signed
//! bytes), which is why 4-bit quants stay unsigned (`0..16`) and their offsets are applied
//! through the activation block sums (`Q4_0`: `-8·d·s`, `Q4_1`: `m·s`, `Q4_K`: mins × bsums,
//! `Q6_K`: `-32` × bsums); `Q8_0` weights are signed and use ggml's `vpsignb` trick.
//! Per-row float operations happen in the same order for every `R`, so a row's result does
//! not depend on how rows are grouped.

#![allow(clippy::needless_range_loop)]

use super::{Backend, GgufType, TileFn};
use crate::quant::mlx_affine::ParamDtype;

/// The tile function of a weight type on `backend` (`Avx512Vnni` and `AvxVnni` pick their
/// `vpdpbusd` builds, anything else the AVX2 one).
pub(crate) fn tile_fn(dtype: GgufType, backend: Backend) -> TileFn {
    match backend {
        Backend::Avx512Vnni => vnni::tile_fn(dtype),
        Backend::AvxVnni => avx_vnni::tile_fn(dtype),
        _ => avx2::tile_fn(dtype),
    }
}

/// The tile function of an MLX affine weight of `bits` (2, 3, 4, 5, 6 or 8) with parameters in
/// `params`, on `backend` as [`tile_fn`].
pub(crate) fn mlx_tile_fn(bits: usize, params: ParamDtype, backend: Backend) -> TileFn {
    match backend {
        Backend::Avx512Vnni => vnni::mlx_tile_fn(bits, params),
        Backend::AvxVnni => avx_vnni::mlx_tile_fn(bits, params),
        _ => avx2::mlx_tile_fn(bits, params),
    }
}

/// How 16 MLX codes of `BITS` bits (2, 3, 5, 6), a little-endian bit stream of `2·BITS` bytes
/// in each 128-bit lane, become 16-bit words and then codes: `shuf[h]` gathers for code
/// `8h + w` (word `w` of both lanes) the byte holding its lowest bit and the next one; the
/// multiply by `mult[h][w] = 2^(16 - BITS - s)`, `s` the code's bit offset in that byte,
/// moves its top bit to bit 15 (dropping the bits above), and a logical right shift by
/// `16 - BITS` leaves the code.
struct NbitUnpack {
    shuf: [[u8; 32]; 2],
    mult: [[u16; 16]; 2],
}

const fn nbit_unpack(bits: usize) -> NbitUnpack {
    let mut t = NbitUnpack {
        shuf: [[0; 32]; 2],
        mult: [[0; 16]; 2],
    };
    if bits == 0 || bits > 8 {
        return t;
    }
    let mut h = 0;
    while h < 2 {
        let mut w = 0;
        while w < 8 {
            let p = bits * (8 * h + w);
            let lo = (p / 8) as u8;
            let m = (1u32 << (16 - bits - p % 8)) as u16;
            let mut lane = 0;
            while lane < 2 {
                t.shuf[h][16 * lane + 2 * w] = lo;
                t.shuf[h][16 * lane + 2 * w + 1] = lo + 1;
                t.mult[h][8 * lane + w] = m;
                lane += 1;
            }
            w += 1;
        }
        h += 1;
    }
    t
}

/// [`NbitUnpack`] of each width, indexed by bits.
const NBIT_UNPACK: [NbitUnpack; 9] = [
    nbit_unpack(0),
    nbit_unpack(1),
    nbit_unpack(2),
    nbit_unpack(3),
    nbit_unpack(4),
    nbit_unpack(5),
    nbit_unpack(6),
    nbit_unpack(7),
    nbit_unpack(8),
];

/// Byte shuffles that broadcast the 16-bit scale `i` (0..8) of a 128-bit lane to all lanes
/// (ggml's `get_scale_shuffle_k4`).
const SHUFFLE_K4: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut i = 0;
    while i < 8 {
        let mut l = 0;
        while l < 16 {
            t[i][2 * l] = 2 * i as u8;
            t[i][2 * l + 1] = 2 * i as u8 + 1;
            l += 1;
        }
        i += 1;
    }
    t
};

/// Byte shuffles that spread bytes `2i` and `2i + 1` over 8 bytes each (ggml's
/// `get_scale_shuffle`).
const SHUFFLE_Q6: [[u8; 16]; 8] = {
    let mut t = [[0u8; 16]; 8];
    let mut i = 0;
    while i < 8 {
        let mut l = 0;
        while l < 8 {
            t[i][l] = 2 * i as u8;
            t[i][l + 8] = 2 * i as u8 + 1;
            l += 1;
        }
        i += 1;
    }
    t
};

/// Tile driver: groups of 4 activation rows, then the 1-3 left over, each against every
/// weight row of the tile, one weight row at a time. (Two weight rows per call, to hide the
/// FMA latency at `m = 1`, measured 3-4x slower on weights streamed from memory for some row
/// strides, e.g. `Q8_0` with k = 576 and `Q4_1` with k = 1536: the prefetchers lose the two
/// interleaved streams.)
macro_rules! tile_impl {
    ($feat:literal, $name:ident, $dot:ident $(, $arg:tt)*) => {
        /// # Safety
        /// See [`TileFn`]; the CPU must have the module's features.
        #[target_feature(enable = $feat)]
        unsafe fn $name(t: &Tile<'_>) {
            let mut r = t.ms.start;
            while r + 4 <= t.ms.end {
                for j in t.rows.clone() {
                    let v = $dot::<4 $(, $arg)*>(t, j, r);
                    store(t, r, j, &v);
                }
                r += 4;
            }
            match t.ms.end - r {
                3 => {
                    for j in t.rows.clone() {
                        let v = $dot::<3 $(, $arg)*>(t, j, r);
                        store(t, r, j, &v);
                    }
                }
                2 => {
                    for j in t.rows.clone() {
                        let v = $dot::<2 $(, $arg)*>(t, j, r);
                        store(t, r, j, &v);
                    }
                }
                1 => {
                    for j in t.rows.clone() {
                        let v = $dot::<1 $(, $arg)*>(t, j, r);
                        store(t, r, j, &v);
                    }
                }
                _ => {}
            }
        }
    };
}

/// The kernels, compiled once per feature set. `$dot` gives the `u8 × i8` dot-product step:
/// `vpmaddubsw` + `vpmaddwd` on AVX2, one `vpdpbusd` with AVX512-VNNI (256-bit, AVX512VL).
macro_rules! kernels {
    ($feat:literal, $vnni:literal, |$x:ident, $y:ident| $dot:expr) => {
        use std::arch::x86_64::*;

        use super::super::{
            q4k_gemm_row, q5k_tiled, q6k_tiled, GgufType, Tile, TileFn, KVALUES_IQ4NL,
        };
        use super::{ParamDtype, NBIT_UNPACK, SHUFFLE_K4, SHUFFLE_Q6};

        pub(crate) fn mlx_tile_fn(bits: usize, params: ParamDtype) -> TileFn {
            match (bits, params) {
                (4, ParamDtype::F32) => tile_mlx4_f32,
                (4, ParamDtype::F16) => tile_mlx4_f16,
                (4, ParamDtype::BF16) => tile_mlx4_bf16,
                (8, ParamDtype::F32) => tile_mlx8_f32,
                (8, ParamDtype::F16) => tile_mlx8_f16,
                (8, ParamDtype::BF16) => tile_mlx8_bf16,
                (2, ParamDtype::F32) => tile_mlx2_f32,
                (2, ParamDtype::F16) => tile_mlx2_f16,
                (2, ParamDtype::BF16) => tile_mlx2_bf16,
                (3, ParamDtype::F32) => tile_mlx3_f32,
                (3, ParamDtype::F16) => tile_mlx3_f16,
                (3, ParamDtype::BF16) => tile_mlx3_bf16,
                (5, ParamDtype::F32) => tile_mlx5_f32,
                (5, ParamDtype::F16) => tile_mlx5_f16,
                (5, ParamDtype::BF16) => tile_mlx5_bf16,
                (_, ParamDtype::F32) => tile_mlx6_f32,
                (_, ParamDtype::F16) => tile_mlx6_f16,
                (_, ParamDtype::BF16) => tile_mlx6_bf16,
            }
        }

        tile_impl!($feat, tile_mlx4_f32, dot_mlx4, 0);
        tile_impl!($feat, tile_mlx4_f16, dot_mlx4, 1);
        tile_impl!($feat, tile_mlx4_bf16, dot_mlx4, 2);
        tile_impl!($feat, tile_mlx8_f32, dot_mlx8, 0);
        tile_impl!($feat, tile_mlx8_f16, dot_mlx8, 1);
        tile_impl!($feat, tile_mlx8_bf16, dot_mlx8, 2);
        tile_impl!($feat, tile_mlx2_f32, dot_mlxn, 0, 2);
        tile_impl!($feat, tile_mlx2_f16, dot_mlxn, 1, 2);
        tile_impl!($feat, tile_mlx2_bf16, dot_mlxn, 2, 2);
        tile_impl!($feat, tile_mlx3_f32, dot_mlxn, 0, 3);
        tile_impl!($feat, tile_mlx3_f16, dot_mlxn, 1, 3);
        tile_impl!($feat, tile_mlx3_bf16, dot_mlxn, 2, 3);
        tile_impl!($feat, tile_mlx5_f32, dot_mlxn, 0, 5);
        tile_impl!($feat, tile_mlx5_f16, dot_mlxn, 1, 5);
        tile_impl!($feat, tile_mlx5_bf16, dot_mlxn, 2, 5);
        tile_impl!($feat, tile_mlx6_f32, dot_mlxn, 0, 6);
        tile_impl!($feat, tile_mlx6_f16, dot_mlxn, 1, 6);
        tile_impl!($feat, tile_mlx6_bf16, dot_mlxn, 2, 6);

        /// Scale or bias `i` of an MLX weight (`P`: 0 `f32`, 1 `f16`, 2 `bf16`) as `f32`.
        ///
        /// # Safety
        /// `p` must be valid for reading element `i` of that dtype.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn mlx_param<const P: u8>(p: *const u8, i: usize) -> f32 {
            unsafe {
                match P {
                    0 => (p as *const f32).add(i).read_unaligned(),
                    1 => f16_at(p.add(2 * i)),
                    _ => f32::from_bits(u32::from((p as *const u16).add(i).read_unaligned()) << 16),
                }
            }
        }

        /// MLX affine 4-bit against `Q8_32Nib` activations:
        /// `Σ_g Σ_{b in g} scale·dy·Σ q·y + bias·s`. The 16 bytes of a 32-value block give,
        /// masked and shifted, the even codes then the odd ones: the order the activations
        /// were permuted to, so this is the `Q4_1` kernel with per-group parameters.
        ///
        /// # Safety
        /// As [`dot_q4`]; `t.mlx` points at the weight's scales and biases.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_mlx4<const R: usize, const P: u8>(
            t: &Tile<'_>,
            j: usize,
            r: usize,
        ) -> [f32; R] {
            let a = t.acts;
            let (k, nb) = (a.k, a.k / 32);
            let pm = t.mlx;
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let ys = a.s.as_ptr().add(r * nb);
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut accm = [0f32; R];
                for g in 0..pm.gpr {
                    let sc = mlx_param::<P>(pm.scales, j * pm.gpr + g);
                    let bi = mlx_param::<P>(pm.biases, j * pm.gpr + g);
                    for b in g * pm.bpg..(g + 1) * pm.bpg {
                        let tmp = _mm_loadu_si128(w.add(16 * b) as *const __m128i);
                        let qx = _mm256_and_si256(
                            _mm256_inserti128_si256::<1>(
                                _mm256_castsi128_si256(tmp),
                                _mm_srli_epi16(tmp, 4),
                            ),
                            m4,
                        );
                        for i in 0..R {
                            let y = _mm256_loadu_si256(yq.add(i * k + 32 * b) as *const __m256i);
                            let p = _mm256_cvtepi32_ps(dot_u8i8(qx, y));
                            let dy = *yd.add(i * nb + b);
                            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(sc * dy), p, acc[i]);
                            accm[i] = bi.mul_add(*ys.add(i * nb + b), accm[i]);
                        }
                    }
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = hsum_ps(acc[i]) + accm[i];
                }
                out
            }
        }

        /// MLX affine 8-bit (`u8` codes) against `Q8_32F` activations. With VNNI `vpdpbusd`
        /// takes the codes as they are; `vpmaddubsw` would saturate (`2·255·127 > 2^15`), so
        /// the AVX2 build uses `q - 128` with ggml's sign trick and folds `128·scale` into the
        /// bias: `scale·dy·Σ(q - 128)·y + (bias + 128·scale)·s`.
        ///
        /// # Safety
        /// As [`dot_mlx4`].
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_mlx8<const R: usize, const P: u8>(
            t: &Tile<'_>,
            j: usize,
            r: usize,
        ) -> [f32; R] {
            let a = t.acts;
            let (k, nb) = (a.k, a.k / 32);
            let pm = t.mlx;
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let ys = a.s.as_ptr().add(r * nb);
                let flip = _mm256_set1_epi8(-128);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut accm = [0f32; R];
                for g in 0..pm.gpr {
                    let sc = mlx_param::<P>(pm.scales, j * pm.gpr + g);
                    let mut bi = mlx_param::<P>(pm.biases, j * pm.gpr + g);
                    if !$vnni {
                        bi += 128.0 * sc;
                    }
                    for b in g * pm.bpg..(g + 1) * pm.bpg {
                        let q = _mm256_loadu_si256(w.add(32 * b) as *const __m256i);
                        let qs = _mm256_xor_si256(q, flip);
                        let qa = if $vnni { q } else { _mm256_sign_epi8(qs, qs) };
                        for i in 0..R {
                            let y = _mm256_loadu_si256(yq.add(i * k + 32 * b) as *const __m256i);
                            let y = if $vnni { y } else { _mm256_sign_epi8(y, qs) };
                            let p = _mm256_cvtepi32_ps(dot_u8i8(qa, y));
                            let dy = *yd.add(i * nb + b);
                            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(sc * dy), p, acc[i]);
                            accm[i] = bi.mul_add(*ys.add(i * nb + b), accm[i]);
                        }
                    }
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = hsum_ps(acc[i]) + accm[i];
                }
                out
            }
        }

        /// MLX affine codes of `BITS` bits (2, 3, 5 or 6) against `Q8_32F` activations:
        /// `Σ_g Σ_{b in g} scale·dy·Σ q·y + bias·s`, the [`dot_mlx8`] sum. A 32-value block is
        /// `4·BITS` bytes; its two halves (16 codes, `2·BITS` bytes each) are loaded into the
        /// two 128-bit lanes and unpacked to bytes by [`NBIT_UNPACK`]'s shuffles, multiplies
        /// and shifts, in order. Codes are below 64, so `vpmaddubsw` cannot saturate
        /// (`2·63·127 < 2^15`). A block too close to the end of the matrix for two 16-byte
        /// loads is copied to the stack first.
        ///
        /// # Safety
        /// As [`dot_mlx4`].
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_mlxn<const R: usize, const P: u8, const BITS: usize>(
            t: &Tile<'_>,
            j: usize,
            r: usize,
        ) -> [f32; R] {
            let a = t.acts;
            let (k, nb) = (a.k, a.k / 32);
            let pm = t.mlx;
            let half = 2 * BITS;
            let tb = &NBIT_UNPACK[BITS];
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let end = t.w.as_ptr() as usize + t.w.len();
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let ys = a.s.as_ptr().add(r * nb);
                let sa = _mm256_loadu_si256(tb.shuf[0].as_ptr() as *const __m256i);
                let sb = _mm256_loadu_si256(tb.shuf[1].as_ptr() as *const __m256i);
                let ma = _mm256_loadu_si256(tb.mult[0].as_ptr() as *const __m256i);
                let mb = _mm256_loadu_si256(tb.mult[1].as_ptr() as *const __m256i);
                let cnt = _mm_cvtsi32_si128(16 - BITS as i32);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut accm = [0f32; R];
                for g in 0..pm.gpr {
                    let sc = mlx_param::<P>(pm.scales, j * pm.gpr + g);
                    let bi = mlx_param::<P>(pm.biases, j * pm.gpr + g);
                    for b in g * pm.bpg..(g + 1) * pm.bpg {
                        let src = w.add(4 * BITS * b);
                        let v = if end - src as usize >= half + 16 {
                            let lo = _mm_loadu_si128(src as *const __m128i);
                            let hi = _mm_loadu_si128(src.add(half) as *const __m128i);
                            _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi)
                        } else {
                            let mut buf = [0u8; 32];
                            std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), half);
                            std::ptr::copy_nonoverlapping(
                                src.add(half),
                                buf.as_mut_ptr().add(16),
                                half,
                            );
                            _mm256_loadu_si256(buf.as_ptr() as *const __m256i)
                        };
                        let wa = _mm256_mullo_epi16(_mm256_shuffle_epi8(v, sa), ma);
                        let wb = _mm256_mullo_epi16(_mm256_shuffle_epi8(v, sb), mb);
                        let qx = _mm256_packus_epi16(
                            _mm256_srl_epi16(wa, cnt),
                            _mm256_srl_epi16(wb, cnt),
                        );
                        for i in 0..R {
                            let y = _mm256_loadu_si256(yq.add(i * k + 32 * b) as *const __m256i);
                            let p = _mm256_cvtepi32_ps(dot_u8i8(qx, y));
                            let dy = *yd.add(i * nb + b);
                            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(sc * dy), p, acc[i]);
                            accm[i] = bi.mul_add(*ys.add(i * nb + b), accm[i]);
                        }
                    }
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = hsum_ps(acc[i]) + accm[i];
                }
                out
            }
        }

        pub(crate) fn tile_fn(dtype: GgufType) -> TileFn {
            match dtype {
                GgufType::Q4_0 => tile_q4_0,
                GgufType::Q4_1 => tile_q4_1,
                GgufType::Q5_0 => tile_q5_0,
                GgufType::Q8_0 => tile_q8_0,
                GgufType::Q4K => tile_q4k,
                GgufType::Q5K => tile_q5k,
                GgufType::Q6K => tile_q6k,
                GgufType::Iq4Nl => tile_iq4nl,
                GgufType::Iq4Xs => tile_iq4xs,
            }
        }

        tile_impl!($feat, tile_q4_0, dot_q4, true);
        tile_impl!($feat, tile_q4_1, dot_q4, false);
        tile_impl!($feat, tile_q5_0, dot_q5_0);
        tile_impl!($feat, tile_q8_0, dot_q8_0);
        tile_impl!($feat, tile_q4k, dot_q4k);
        tile_impl!($feat, tile_q5k, dot_q5k);
        tile_impl!($feat, tile_q6k, dot_q6k);
        tile_impl!($feat, tile_iq4nl, dot_iq4nl);
        tile_impl!($feat, tile_iq4xs, dot_iq4xs);

        /// # Safety
        /// `out[(r + i) * ldo + j]` must be valid and owned by this tile for `i < R`.
        #[inline(always)]
        unsafe fn store<const R: usize>(t: &Tile<'_>, r: usize, j: usize, v: &[f32; R]) {
            for (i, &x) in v.iter().enumerate() {
                unsafe { *t.out.add((r + i) * t.ldo + j) = x };
            }
        }

        #[inline]
        #[target_feature(enable = $feat)]
        fn hsum_ps(x: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
            hsum_ps128(s)
        }

        #[inline]
        #[target_feature(enable = $feat)]
        fn hsum_ps128(s: __m128) -> f32 {
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }

        /// Sum of the four `i32` lanes (exact: the callers' sums stay far from overflow).
        #[inline]
        #[target_feature(enable = $feat)]
        fn hsum_epi32(x: __m128i) -> i32 {
            let s = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
            _mm_cvtsi128_si32(s)
        }

        /// `f16` bits at `p` as `f32`.
        ///
        /// # Safety
        /// `p` must be valid for a 2-byte read.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn f16_at(p: *const u8) -> f32 {
            let bits = unsafe { (p as *const u16).read_unaligned() };
            // `vmovd` zeroes the upper lanes. Written as intrinsics, LLVM inserts the half
            // into whatever register is at hand (only lane 0 is used), which was once the
            // FMA accumulator: a false dependency that made the Q8_0 loop 2x slower.
            let v: __m128i;
            unsafe {
                std::arch::asm!(
                    "vmovd {v}, {b:e}",
                    v = out(xmm_reg) v,
                    b = in(reg) bits as u32,
                    options(pure, nomem, nostack, preserves_flags)
                );
            }
            _mm_cvtss_f32(_mm_cvtph_ps(v))
        }

        /// Pairwise `u8 × i8` products summed by 4 into 8 `i32` lanes.
        #[inline]
        #[target_feature(enable = $feat)]
        fn dot_u8i8($x: __m256i, $y: __m256i) -> __m256i {
            $dot
        }

        /// The 8 scales and 8 mins (6 bits each, ggml's `get_scale_min_k4` packing) of a
        /// `Q4_K` / `Q5_K` super-block, from its 12 scale bytes at `sp`: the scales as `i16`
        /// in both 128-bit lanes, the mins as 8 `i16`.
        ///
        /// # Safety
        /// `sp` must be valid for a 12-byte read.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn k_scales_mins(sp: *const u8) -> (__m256i, __m128i) {
            const KMASK1: u32 = 0x3f3f3f3f;
            const KMASK2: u32 = 0x0f0f0f0f;
            const KMASK3: u32 = 0x03030303;
            let sp = sp as *const u32;
            let (u0, u1, u2) = unsafe {
                (
                    sp.read_unaligned(),
                    sp.add(1).read_unaligned(),
                    sp.add(2).read_unaligned(),
                )
            };
            // 8 scales then 8 mins, 6 bits each.
            let s03 = u0 & KMASK1;
            let s47 = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
            let m03 = u1 & KMASK1;
            let m47 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
            let mins_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(
                m47 as i32, m03 as i32, s47 as i32, s03 as i32,
            ));
            let sc128 = _mm256_castsi256_si128(mins_scales);
            let scales = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(sc128), sc128);
            (scales, _mm256_extracti128_si256::<1>(mins_scales))
        }

        /// `Q4_0` (`Q4_0 = true`: offset `-8·d`) and `Q4_1` (`m` from the block) against
        /// `Q8_32` activations: `Σ_b d·dy·Σ q·y + m·s`.
        ///
        /// # Safety
        /// `j` is a weight row and `r..r + R` activation rows of the tile (see [`TileFn`]).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_q4<const R: usize, const Q4_0: bool>(
            t: &Tile<'_>,
            j: usize,
            r: usize,
        ) -> [f32; R] {
            let a = t.acts;
            let (k, nb) = (a.k, a.k / 32);
            let (bs, qoff) = if Q4_0 { (18, 2) } else { (20, 4) };
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let ys = a.s.as_ptr().add(r * nb);
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut accm = [0f32; R];
                for b in 0..nb {
                    let blk = w.add(b * bs);
                    let (d, m) = if Q4_0 {
                        let d = f16_at(blk);
                        (d, -8.0 * d)
                    } else {
                        let dm =
                            _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
                        (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
                    };
                    // ggml's bytes_from_nibbles_32: low nibbles are values 0..16, high ones
                    // 16..32.
                    let tmp = _mm_loadu_si128(blk.add(qoff) as *const __m128i);
                    let qx = _mm256_and_si256(
                        _mm256_inserti128_si256::<1>(
                            _mm256_castsi128_si256(tmp),
                            _mm_srli_epi16(tmp, 4),
                        ),
                        m4,
                    );
                    for i in 0..R {
                        let y = _mm256_loadu_si256(yq.add(i * k + 32 * b) as *const __m256i);
                        let p = _mm256_cvtepi32_ps(dot_u8i8(qx, y));
                        let dy = *yd.add(i * nb + b);
                        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * dy), p, acc[i]);
                        accm[i] = m.mul_add(*ys.add(i * nb + b), accm[i]);
                    }
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = hsum_ps(acc[i]) + accm[i];
                }
                out
            }
        }

        /// One block of 32 signed quants `qx` with scale `d` against `R` activation rows:
        /// `acc[i] += d·dy_i · Σ qx·y_i`, with ggml's sign trick (`|qx|` as unsigned, the sign
        /// moved onto `y`; `mul_sum_i8_pairs_float`). Shared by `Q5_0` and `Q8_0`.
        ///
        /// # Safety
        /// `y` points at the block's 32 values of activation row 0, with row `i` at
        /// `y + i·k`; `dy` at its scale, with row `i` at `dy + i·nb`; both valid for `R` rows.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn add_signed_block<const R: usize>(
            acc: &mut [__m256; R],
            qx: __m256i,
            d: f32,
            y: *const i8,
            dy: *const f32,
            k: usize,
            nb: usize,
        ) {
            let ax = _mm256_sign_epi8(qx, qx);
            for i in 0..R {
                unsafe {
                    let yv = _mm256_loadu_si256(y.add(i * k) as *const __m256i);
                    let p = _mm256_cvtepi32_ps(dot_u8i8(ax, _mm256_sign_epi8(yv, qx)));
                    acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * *dy.add(i * nb)), p, acc[i]);
                }
            }
        }

        /// `Q5_0` against `Q8_32` activations, as ggml's AVX2 `ggml_vec_dot_q5_0_q8_0`:
        /// signed quants `q - 16` (the nibbles as in `Q4_0`, bit 4 from `bytes_from_bits_32`
        /// of `qh`: byte `j` all ones when bit `j` is set), the sign trick of `Q8_0`, then
        /// `Σ_b d·dy·Σ (q - 16)·y` in eight f32 lanes. The same integers and float operations
        /// as ggml, so products equal llama.cpp's bit for bit.
        ///
        /// # Safety
        /// As [`dot_q4`].
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_q5_0<const R: usize>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
            let a = t.acts;
            let (k, nb) = (a.k, a.k / 32);
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let m4 = _mm256_set1_epi8(0x0F);
                let hi_off = _mm256_set1_epi8(0xF0u8 as i8);
                let shuf = _mm256_set_epi64x(
                    0x0303030303030303,
                    0x0202020202020202,
                    0x0101010101010101,
                    0,
                );
                let bit_mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
                let ones = _mm256_set1_epi64x(-1);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    let blk = w.add(b * 22);
                    let d = f16_at(blk);
                    let qh = (blk.add(2) as *const i32).read_unaligned();
                    let bits = _mm256_cmpeq_epi8(
                        _mm256_or_si256(
                            _mm256_shuffle_epi8(_mm256_set1_epi32(qh), shuf),
                            bit_mask,
                        ),
                        ones,
                    );
                    let tmp = _mm_loadu_si128(blk.add(6) as *const __m128i);
                    let nib = _mm256_and_si256(
                        _mm256_inserti128_si256::<1>(
                            _mm256_castsi128_si256(tmp),
                            _mm_srli_epi16(tmp, 4),
                        ),
                        m4,
                    );
                    // q - 16 in two's complement: 0xF0 where bit 4 is clear
                    let qx = _mm256_or_si256(nib, _mm256_andnot_si256(bits, hi_off));
                    add_signed_block(&mut acc, qx, d, yq.add(32 * b), yd.add(b), k, nb);
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = hsum_ps(acc[i]);
                }
                out
            }
        }

        /// `Q8_0` against `Q8_32` activations: `Σ_b d·dy·Σ q·y`, with ggml's sign trick
        /// (`|q|` as unsigned, the sign moved onto `y`).
        ///
        /// # Safety
        /// As [`dot_q4`].
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_q8_0<const R: usize>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
            let a = t.acts;
            let (k, nb) = (a.k, a.k / 32);
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    let blk = w.add(b * 34);
                    let d = f16_at(blk);
                    let qx = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    add_signed_block(&mut acc, qx, d, yq.add(32 * b), yd.add(b), k, nb);
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = hsum_ps(acc[i]);
                }
                out
            }
        }

        /// The 32 signed table values of 16 bytes of `IQ4_NL`/`IQ4_XS` codes (byte `j`: value
        /// `j` low, `j + 16` high), looked up with `vpshufb` as ggml's AVX2 kernels do.
        ///
        /// # Safety
        /// `p` must be valid for a 16-byte read.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn iq4_lookup(p: *const u8, table: __m128i) -> __m256i {
            let m4 = _mm_set1_epi8(0x0F);
            let bits = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let lo = _mm_shuffle_epi8(table, _mm_and_si128(bits, m4));
            let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bits, 4), m4));
            _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi)
        }

        /// `IQ4_NL` against `Q8_32` activations, as ggml's AVX2 `ggml_vec_dot_iq4_nl_q8_0`:
        /// the codes' table values (`vpshufb`), the sign trick of `Q8_0`, and `Σ_b d·dy·Σ v·y`
        /// in two sets of eight f32 lanes (even and odd blocks) added before the horizontal
        /// sum; an odd last block is added after it, in ggml's scalar order.
        ///
        /// # Safety
        /// As [`dot_q4`].
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_iq4nl<const R: usize>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
            let a = t.acts;
            let (k, nb) = (a.k, a.k / 32);
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let table = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
                let mut acc1 = [_mm256_setzero_ps(); R];
                let mut acc2 = [_mm256_setzero_ps(); R];
                let mut b = 0;
                while b + 1 < nb {
                    let (b1, b2) = (w.add(b * 18), w.add(b * 18 + 18));
                    let q1 = iq4_lookup(b1.add(2), table);
                    let q2 = iq4_lookup(b2.add(2), table);
                    add_signed_block(&mut acc1, q1, f16_at(b1), yq.add(32 * b), yd.add(b), k, nb);
                    add_signed_block(
                        &mut acc2,
                        q2,
                        f16_at(b2),
                        yq.add(32 * b + 32),
                        yd.add(b + 1),
                        k,
                        nb,
                    );
                    b += 2;
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = hsum_ps(_mm256_add_ps(acc1[i], acc2[i]));
                }
                if b < nb {
                    let blk = std::slice::from_raw_parts(w.add(b * 18), 18);
                    let d = f16_at(blk.as_ptr());
                    let v = super::super::scalar::iq4_values(&blk[2..]);
                    for i in 0..R {
                        let y = std::slice::from_raw_parts(yq.add(i * k + 32 * b), 32);
                        let s: i32 = v.iter().zip(y).map(|(&v, &y)| v as i32 * y as i32).sum();
                        out[i] += (*yd.add(i * nb + b) * d) * s as f32;
                    }
                }
                out
            }
        }

        /// `IQ4_XS` against `Q8_K` activations, as ggml's AVX2 `ggml_vec_dot_iq4_xs_q8_K`:
        /// per 32-value sub-block the table values' products with the sign trick
        /// (`vpmaddubsw`), times `ls - 32` (`vpmaddwd`), summed over the super-block in eight
        /// `i32` lanes, then `Σ_b d·dy·Σ` in eight f32 lanes.
        ///
        /// # Safety
        /// As [`dot_q4`].
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_iq4xs<const R: usize>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
            let a = t.acts;
            let (k, nb) = (a.k, a.k / 256);
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let table = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    let blk = w.add(b * 136);
                    let d = f16_at(blk);
                    let mut sh = (blk.add(2) as *const u16).read_unaligned();
                    let mut s1 = [_mm256_setzero_si256(); R];
                    let mut s2 = [_mm256_setzero_si256(); R];
                    for ib in (0..8).step_by(2) {
                        let q1 = iq4_lookup(blk.add(8 + 16 * ib), table);
                        let q2 = iq4_lookup(blk.add(24 + 16 * ib), table);
                        let sl = *blk.add(4 + ib / 2);
                        let ls1 = ((sl & 0xF) as i16 | ((sh << 4) & 0x30) as i16) - 32;
                        let ls2 = ((sl >> 4) as i16 | ((sh << 2) & 0x30) as i16) - 32;
                        sh >>= 4;
                        let (a1, a2) = (_mm256_sign_epi8(q1, q1), _mm256_sign_epi8(q2, q2));
                        let (l1, l2) = (_mm256_set1_epi16(ls1), _mm256_set1_epi16(ls2));
                        for i in 0..R {
                            let y = yq.add(i * k + 256 * b + 32 * ib);
                            let y1 = _mm256_loadu_si256(y as *const __m256i);
                            let y2 = _mm256_loadu_si256(y.add(32) as *const __m256i);
                            let p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(y1, q1));
                            let p2 = _mm256_maddubs_epi16(a2, _mm256_sign_epi8(y2, q2));
                            s1[i] = _mm256_add_epi32(_mm256_madd_epi16(p1, l1), s1[i]);
                            s2[i] = _mm256_add_epi32(_mm256_madd_epi16(p2, l2), s2[i]);
                        }
                    }
                    for i in 0..R {
                        let dy = *yd.add(i * nb + b);
                        acc[i] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * dy),
                            _mm256_cvtepi32_ps(_mm256_add_epi32(s1[i], s2[i])),
                            acc[i],
                        );
                    }
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = hsum_ps(acc[i]);
                }
                out
            }
        }

        /// `Q4_K` against `Q8_K` activations: `Σ_b d·dy·Σ_s sc_s·Σ q·y - dmin·dy·Σ_s
        /// m_s·bsum_s`, the integers as ggml's AVX2 `ggml_vec_dot_q4_K_q8_K`, the floats in the
        /// order of its repacked kernels (see the module docs of `kernels`).
        ///
        /// # Safety
        /// As [`dot_q4`].
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_q4k<const R: usize>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
            let a = t.acts;
            let (k, nb, nbs) = (a.k, a.k / 256, a.k / 16);
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let ybs = a.bsums.as_ptr().add(r * nbs);
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [0f32; R];
                let mut accm = [0f32; R];
                let gemm: [bool; R] = std::array::from_fn(|i| q4k_gemm_row(a.m, r + i));
                for b in 0..nb {
                    let blk = w.add(b * 144);
                    let d = f16_at(blk);
                    let dmin = f16_at(blk.add(2));
                    let (scales, mins) = k_scales_mins(blk.add(4));
                    let qs = blk.add(16);
                    // pc[i][c]: row i, sub-blocks 2c and 2c + 1, scaled, in 8 lanes.
                    let mut pc = [[_mm256_setzero_si256(); 4]; R];
                    let bs32: [__m128i; R] = std::array::from_fn(|i| {
                        let bs = _mm256_loadu_si256(ybs.add(i * nbs + 16 * b) as *const __m256i);
                        _mm_hadd_epi16(
                            _mm256_castsi256_si128(bs),
                            _mm256_extracti128_si256::<1>(bs),
                        )
                    });
                    for c in 0..4 {
                        let sl = _mm256_shuffle_epi8(
                            scales,
                            _mm256_loadu_si256(SHUFFLE_K4[2 * c].as_ptr() as *const __m256i),
                        );
                        let sh = _mm256_shuffle_epi8(
                            scales,
                            _mm256_loadu_si256(SHUFFLE_K4[2 * c + 1].as_ptr() as *const __m256i),
                        );
                        let q4 = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                        let ql = _mm256_and_si256(q4, m4);
                        let qh = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
                        for (i, pci) in pc.iter_mut().enumerate() {
                            let y = yq.add(i * k + 256 * b + 64 * c);
                            let yl = _mm256_loadu_si256(y as *const __m256i);
                            let yh = _mm256_loadu_si256(y.add(32) as *const __m256i);
                            let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(ql, yl));
                            let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(qh, yh));
                            pci[c] = _mm256_add_epi32(pl, ph);
                        }
                    }
                    for i in 0..R {
                        let dy = *yd.add(i * nb + b);
                        let (dd, dm) = (d * dy, dmin * dy);
                        // Lane c: the scaled sums / the mins · activation sums of sub-blocks
                        // 2c and 2c + 1.
                        let [p0, p1, p2, p3] = pc[i];
                        let h = _mm256_hadd_epi32(
                            _mm256_hadd_epi32(p0, p1),
                            _mm256_hadd_epi32(p2, p3),
                        );
                        let sums =
                            _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                        let prod = _mm_madd_epi16(mins, bs32[i]);
                        if gemm[i] {
                            let (mut sl, mut ml) = ([0i32; 4], [0i32; 4]);
                            _mm_storeu_si128(sl.as_mut_ptr() as *mut __m128i, sums);
                            _mm_storeu_si128(ml.as_mut_ptr() as *mut __m128i, prod);
                            for c in 0..4 {
                                acc[i] = (sl[c] as f32).mul_add(dd, acc[i]);
                                accm[i] = (ml[c] as f32).mul_add(dm, accm[i]);
                            }
                        } else {
                            acc[i] = (hsum_epi32(sums) as f32).mul_add(dd, acc[i]);
                            accm[i] = (hsum_epi32(prod) as f32).mul_add(dm, accm[i]);
                        }
                    }
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = acc[i] - accm[i];
                }
                out
            }
        }

        /// `Q5_K` against `Q8_K` activations, as ggml's AVX2 `ggml_vec_dot_q5_K_q8_K`:
        /// `Σ_b d·dy·Σ_s sc_s·Σ q·y - dmin·dy·Σ_s m_s·bsum_s` with `q` in `0..32` (the nibbles
        /// as in `Q4_K`, bit 4 from `qh`), the scaled sums in eight `f32` lanes
        /// (`fma(d·dy, lanes, acc)` per super-block, then `hsum_float_8`) and the minimums in
        /// one chain (`fma(dmin·dy, msum, accm)`, subtracted at the end); products of 8+ rows in
        /// the float order of ggml's tiled matmul (see [`q5k_tiled`]).
        ///
        /// # Safety
        /// As [`dot_q4`].
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_q5k<const R: usize>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
            let a = t.acts;
            let (k, nb, nbs) = (a.k, a.k / 256, a.k / 16);
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let ybs = a.bsums.as_ptr().add(r * nbs);
                let m4 = _mm256_set1_epi8(0x0F);
                let m16 = _mm256_set1_epi8(0x10);
                let tiled = q5k_tiled(a.m);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut acc1 = [0f32; R];
                let mut accm = [0f32; R];
                for b in 0..nb {
                    let blk = w.add(b * 176);
                    let d = f16_at(blk);
                    let dmin = f16_at(blk.add(2));
                    let (scales, mins) = k_scales_mins(blk.add(4));
                    let hbits = _mm256_loadu_si256(blk.add(16) as *const __m256i);
                    let qs = blk.add(48);
                    let mut sumi = [_mm256_setzero_si256(); R];
                    for c in 0..4 {
                        let sl = _mm256_shuffle_epi8(
                            scales,
                            _mm256_loadu_si256(SHUFFLE_K4[2 * c].as_ptr() as *const __m256i),
                        );
                        let sh = _mm256_shuffle_epi8(
                            scales,
                            _mm256_loadu_si256(SHUFFLE_K4[2 * c + 1].as_ptr() as *const __m256i),
                        );
                        // Bit 4 of each code: 0x10 where bit `2c` (`2c + 1`) of its `qh` byte
                        // is set.
                        let (bl, bh) = (
                            _mm256_set1_epi8(1 << (2 * c)),
                            _mm256_set1_epi8((2 << (2 * c)) as u8 as i8),
                        );
                        let hl = _mm256_and_si256(
                            _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bl), bl),
                            m16,
                        );
                        let hh = _mm256_and_si256(
                            _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bh), bh),
                            m16,
                        );
                        let q4 = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                        let ql = _mm256_or_si256(_mm256_and_si256(q4, m4), hl);
                        let qh = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4),
                            hh,
                        );
                        for i in 0..R {
                            let y = yq.add(i * k + 256 * b + 64 * c);
                            let yl = _mm256_loadu_si256(y as *const __m256i);
                            let yh = _mm256_loadu_si256(y.add(32) as *const __m256i);
                            let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(ql, yl));
                            let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(qh, yh));
                            sumi[i] = _mm256_add_epi32(sumi[i], _mm256_add_epi32(pl, ph));
                        }
                    }
                    for i in 0..R {
                        let dy = *yd.add(i * nb + b);
                        let bs = _mm256_loadu_si256(ybs.add(i * nbs + 16 * b) as *const __m256i);
                        let bs32 = _mm_hadd_epi16(
                            _mm256_castsi256_si128(bs),
                            _mm256_extracti128_si256::<1>(bs),
                        );
                        let msum = hsum_epi32(_mm_madd_epi16(mins, bs32)) as f32;
                        if tiled {
                            let s = sumi[i];
                            let isum = hsum_epi32(_mm_add_epi32(
                                _mm256_castsi256_si128(s),
                                _mm256_extracti128_si256::<1>(s),
                            ));
                            acc1[i] =
                                (-dmin).mul_add(msum, isum as f32 * d).mul_add(dy, acc1[i]);
                        } else {
                            acc[i] = _mm256_fmadd_ps(
                                _mm256_set1_ps(d * dy),
                                _mm256_cvtepi32_ps(sumi[i]),
                                acc[i],
                            );
                            accm[i] = msum.mul_add(dmin * dy, accm[i]);
                        }
                    }
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = if tiled { acc1[i] } else { hsum_ps(acc[i]) - accm[i] };
                }
                out
            }
        }

        /// `Q6_K` against `Q8_K` activations (ggml `ggml_vec_dot_q6_K_q8_K`, AVX2):
        /// `Σ_b d·dy·Σ_s sc_s·(Σ q·y - 32·bsum_s)` with `q` in `0..64`; products of 8+ rows
        /// in the float order of ggml's tiled matmul (see [`q6k_tiled`]).
        ///
        /// # Safety
        /// As [`dot_q4`].
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dot_q6k<const R: usize>(t: &Tile<'_>, j: usize, r: usize) -> [f32; R] {
            let a = t.acts;
            let (k, nb, nbs) = (a.k, a.k / 256, a.k / 16);
            unsafe {
                let w = t.w.as_ptr().add(j * t.row_bytes);
                let yq = a.qs.as_ptr().add(r * k);
                let yd = a.d.as_ptr().add(r * nb);
                let ybs = a.bsums.as_ptr().add(r * nbs);
                let m4 = _mm256_set1_epi8(0x0F);
                let m2 = _mm256_set1_epi8(3);
                let mut acc = [_mm256_setzero_ps(); R];
                let tiled = q6k_tiled(a.m);
                let mut acc1 = [0f32; R];
                for b in 0..nb {
                    let blk = w.add(b * 210);
                    let d = f16_at(blk.add(208));
                    let scales = _mm_loadu_si128(blk.add(192) as *const __m128i);
                    let mut sumi = [_mm256_setzero_si256(); R];
                    for h in 0..2 {
                        let ql = blk.add(64 * h);
                        let qh = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
                        let l1 = _mm256_loadu_si256(ql as *const __m256i);
                        let l2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                        let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4);
                        let h1 =
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4);
                        let h2 =
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4);
                        let h3 =
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4);
                        let q = [
                            _mm256_or_si256(_mm256_and_si256(l1, m4), h0),
                            _mm256_or_si256(_mm256_and_si256(l2, m4), h1),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), h2),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l2, 4), m4), h3),
                        ];
                        let mut sc = [_mm256_setzero_si256(); 4];
                        for (s, v) in sc.iter_mut().enumerate() {
                            let shuf =
                                _mm_loadu_si128(SHUFFLE_Q6[4 * h + s].as_ptr() as *const __m128i);
                            *v = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, shuf));
                        }
                        for i in 0..R {
                            let y = yq.add(i * k + 256 * b + 128 * h);
                            let mut s = sumi[i];
                            for c in 0..4 {
                                let yv = _mm256_loadu_si256(y.add(32 * c) as *const __m256i);
                                let p = _mm256_madd_epi16(sc[c], _mm256_maddubs_epi16(q[c], yv));
                                s = _mm256_add_epi32(s, p);
                            }
                            sumi[i] = s;
                        }
                    }
                    let sc16 = _mm256_cvtepi8_epi16(scales);
                    for i in 0..R {
                        let bs = _mm256_loadu_si256(ybs.add(i * nbs + 16 * b) as *const __m256i);
                        let corr = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5);
                        let s = _mm256_sub_epi32(sumi[i], corr);
                        let dy = *yd.add(i * nb + b);
                        if tiled {
                            let isum = hsum_epi32(_mm_add_epi32(
                                _mm256_castsi256_si128(s),
                                _mm256_extracti128_si256::<1>(s),
                            ));
                            acc1[i] = (isum as f32 * d).mul_add(dy, acc1[i]);
                        } else {
                            acc[i] = _mm256_fmadd_ps(
                                _mm256_set1_ps(d * dy),
                                _mm256_cvtepi32_ps(s),
                                acc[i],
                            );
                        }
                    }
                }
                let mut out = [0f32; R];
                for i in 0..R {
                    out[i] = if tiled { acc1[i] } else { hsum_ps(acc[i]) };
                }
                out
            }
        }
    };
}

/// AVX2 + FMA + F16C.
mod avx2 {
    kernels!("avx2,fma,f16c", false, |x, y| _mm256_madd_epi16(
        _mm256_maddubs_epi16(x, y),
        _mm256_set1_epi16(1)
    ));
}

/// The same with AVX512-VNNI's `vpdpbusd` (on 256-bit registers, so AVX512VL) for the 8-bit
/// dot products of `Q4_0`, `Q4_1` and `Q8_0`.
mod vnni {
    kernels!("avx2,fma,f16c,avx512f,avx512vl,avx512vnni", true, |x, y| {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y)
    });
}

/// The same with AVX-VNNI's `vpdpbusd` (VEX encoded: CPUs with AVX-VNNI but no AVX-512).
mod avx_vnni {
    kernels!("avx2,fma,f16c,avxvnni", true, |x, y| {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), x, y)
    });
}
