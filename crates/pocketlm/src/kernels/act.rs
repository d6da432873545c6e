//! Quantization of the activation rows, once per product (ggml's `quantize_row_q8_0`,
//! `quantize_row_q8_1`, `quantize_row_q8_K`).
//!
//! Per block `b` of a row: `amax = max |x|`, `d = amax / 127`, `q = round_half_even(x / d)`
//! computed as `x * (1 / d)` (as ggml's AVX2 path does, `_mm256_round_ps` to nearest even),
//! so `|x - d * q| <= d / 2` (plus one rounding of `1 / d`). Differences from ggml's byte
//! layouts, none of which changes the integers: scales are kept as `f32` (ggml stores `f16`
//! for `Q8_0`/`Q8_1`), and the `Q8_K` scale is positive (ggml uses `-127 / max` with `max`
//! the signed extreme; values stay in `[-127, 127]` either way). The SIMD and scalar versions
//! produce identical bytes.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::Backend;

/// Activation block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActFormat {
    /// 32-value blocks: `d` and `s = d * Σq` per block (ggml `Q8_0` plus the `Q8_1` sum), for
    /// `Q4_0`, `Q4_1`, `Q5_0`, `Q8_0` weights.
    Q8_32,
    /// 32-value blocks like [`Self::Q8_32`] with `d` and `s` kept in `f32` (not rounded to
    /// `f16`, which only mirrors ggml's storage), for MLX 8-bit weights.
    Q8_32F,
    /// [`Self::Q8_32`] (`d` and `s` rounded to `f16`, as ggml's `Q8_1`) with the values of
    /// each block reordered to match the nibbles of MLX 4-bit words: positions `0..16` hold
    /// values `0, 2, .., 30` and `16..32` values `1, 3, .., 31` (byte `c` of an MLX 4-bit
    /// block holds codes `2c` in its low and `2c + 1` in its high nibble, so masking and
    /// shifting 16 bytes gives the codes in this order).
    Q8_32Nib,
    /// 256-value blocks: `d` per block and `bsums` (Σq per 16 values), ggml `Q8_K`, for
    /// k-quant weights.
    Q8K,
}

impl ActFormat {
    /// Values per block.
    pub(crate) const fn block(self) -> usize {
        match self {
            Self::Q8_32 | Self::Q8_32F | Self::Q8_32Nib => 32,
            Self::Q8K => 256,
        }
    }

    /// Whether blocks keep `s = d * Σq` (the 32-value formats).
    pub(crate) const fn has_sums(self) -> bool {
        matches!(self, Self::Q8_32 | Self::Q8_32F | Self::Q8_32Nib)
    }
}

/// Quantized activation rows `[m, k]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Acts {
    pub fmt: ActFormat,
    pub m: usize,
    pub k: usize,
    /// `[m, k]` quantized values in `[-127, 127]`.
    pub qs: Vec<i8>,
    /// `[m, k / block]` scales.
    pub d: Vec<f32>,
    /// `Q8_32*`: `[m, k / 32]`, `d * Σq` per block. Empty for `Q8K`.
    pub s: Vec<f32>,
    /// `Q8K`: `[m, k / 16]`, `Σq` per 16 values. Empty for `Q8_32`.
    pub bsums: Vec<i16>,
    /// `Q8_32*`: `[m, k / 32]`, the exact integer `Σq` per block (the offsets of the packed
    /// kernels, [`super::packed`]). Empty for `Q8K`.
    pub isum: Vec<i32>,
    /// `[m, k]`: `qs` biased to unsigned bytes (`q + 128`, that is `q ^ 0x80`), made on first
    /// use by [`Acts::biased`] (the packed `IQ4_XS` prefill kernel's unsigned operand of
    /// `vpdpbusd`, [`super::packed_iq4xs`]).
    pub biased: OnceLock<Vec<u8>>,
    /// `[m, k / 4]`: `-128 ·` the sum of each 4 consecutive values of `qs`, made on first use
    /// by [`Acts::neg128_sums4`] (the offsets of the packed `Q8_0` kernel in ggml's order,
    /// [`super::packed`]).
    pub sums4: OnceLock<Vec<i32>>,
}

impl Acts {
    /// [`Acts::biased`]'s bytes `q + 128` of `qs` (`[m, k]`), made on the first call (the
    /// first caller makes them, callers on other threads wait for it).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the AVX-512 kernels
    pub(crate) fn biased(&self) -> &[u8] {
        self.biased
            .get_or_init(|| self.qs.iter().map(|&q| q as u8 ^ 0x80).collect())
    }

    /// [`Acts::sums4`]: `-128 · Σ` of each 4 values of `qs` (`[m, k / 4]`), made once per
    /// product on the first call, not once per tile (a tile of the output layer holds 16 to 64
    /// of its 49,152 rows, and summing the activations again in each was as costly as the
    /// tile's dot products at 16 activation rows).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the AVX-512 kernels
    pub(crate) fn neg128_sums4(&self) -> &[i32] {
        self.sums4.get_or_init(|| {
            self.qs
                .chunks_exact(4)
                .map(|y| -128 * y.iter().map(|&v| v as i32).sum::<i32>())
                .collect()
        })
    }
}

/// Rows below this many values are quantized on the calling thread.
const PAR_VALUES: usize = 32 * 1024;

/// Quantizes `x: [m, k]` (`k` a multiple of the format's block) row by row.
pub(crate) fn quantize_acts(
    backend: Backend,
    fmt: ActFormat,
    x: &[f32],
    m: usize,
    k: usize,
) -> Acts {
    let bs = fmt.block();
    let nb = k / bs;
    let mut acts = Acts {
        fmt,
        m,
        k,
        qs: vec![0; m * k],
        d: vec![0.0; m * nb],
        s: if fmt.has_sums() {
            vec![0.0; m * nb]
        } else {
            Vec::new()
        },
        bsums: if fmt == ActFormat::Q8K {
            vec![0; m * k / 16]
        } else {
            Vec::new()
        },
        isum: if fmt.has_sums() {
            vec![0; m * nb]
        } else {
            Vec::new()
        },
        biased: OnceLock::new(),
        sums4: OnceLock::new(),
    };
    if m == 0 || k == 0 {
        return acts;
    }
    let row = |x: &[f32], qs: &mut [i8], d: &mut [f32], aux: &mut [f32], sums: Sums<'_>| {
        quantize_row(backend, fmt, x, qs, d, aux, sums)
    };
    // Split the per-row outputs; `s` or `bsums` is empty depending on the format.
    let s_len = if fmt.has_sums() { nb } else { 0 };
    let b_len = if fmt == ActFormat::Q8K { k / 16 } else { 0 };
    let Acts {
        qs,
        d,
        s,
        bsums,
        isum,
        ..
    } = &mut acts;
    let mut s_rows: Vec<&mut [f32]> = if s_len > 0 {
        s.chunks_mut(s_len).collect()
    } else {
        (0..m).map(|_| &mut [][..]).collect()
    };
    let mut b_rows: Vec<Sums<'_>> = if b_len > 0 {
        bsums.chunks_mut(b_len).map(Sums::K).collect()
    } else {
        isum.chunks_mut(nb).map(Sums::Blocks).collect()
    };
    if m * k >= PAR_VALUES && m > 1 {
        x.par_chunks(k)
            .zip(qs.par_chunks_mut(k))
            .zip(d.par_chunks_mut(nb))
            .zip(s_rows.par_iter_mut())
            .zip(b_rows.par_iter_mut())
            .for_each(|((((x, q), d), s), b)| row(x, q, d, s, b.reborrow()));
    } else {
        for ((((x, q), d), s), b) in x
            .chunks(k)
            .zip(qs.chunks_mut(k))
            .zip(d.chunks_mut(nb))
            .zip(s_rows.iter_mut())
            .zip(b_rows.iter_mut())
        {
            row(x, q, d, s, b.reborrow());
        }
    }
    acts
}

/// The integer sums of one row: per 16 values (`Q8K`) or per block (the 32-value formats).
enum Sums<'a> {
    K(&'a mut [i16]),
    Blocks(&'a mut [i32]),
}

impl Sums<'_> {
    fn reborrow(&mut self) -> Sums<'_> {
        match self {
            Sums::K(b) => Sums::K(b),
            Sums::Blocks(b) => Sums::Blocks(b),
        }
    }
}

fn quantize_row(
    backend: Backend,
    fmt: ActFormat,
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    mut sums: Sums<'_>,
) {
    let bs = fmt.block();
    for (b, (xb, qb)) in x.chunks_exact(bs).zip(qs.chunks_exact_mut(bs)).enumerate() {
        let (db, id, sum) = quantize_block(backend, xb, qb);
        if let Sums::Blocks(isum) = &mut sums {
            isum[b] = sum;
        }
        match fmt {
            // ggml's `quantize_row_q8_0`/`q8_1` store `d = amax / 127` and `s = d * Σq` as f16;
            // the dot products read them back, so round the same way.
            ActFormat::Q8_32F => {
                d[b] = db;
                s[b] = db * sum as f32;
            }
            ActFormat::Q8_32 | ActFormat::Q8_32Nib => {
                d[b] = f16_round(db);
                s[b] = f16_round(db * sum as f32);
                if fmt == ActFormat::Q8_32Nib {
                    let mut t = [0i8; 32];
                    for c in 0..16 {
                        t[c] = qb[2 * c];
                        t[16 + c] = qb[2 * c + 1];
                    }
                    qb.copy_from_slice(&t);
                }
            }
            // ggml's `quantize_row_q8_K` stores `d = 1 / iscale` in f32.
            ActFormat::Q8K => {
                d[b] = if id != 0.0 { 1.0 / id } else { 0.0 };
                if let Sums::K(bsums) = &mut sums {
                    for (j, q16) in qb.chunks_exact(16).enumerate() {
                        bsums[b * 16 + j] = q16.iter().map(|&q| q as i16).sum();
                    }
                }
            }
        }
    }
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Quantizes one block (32 or 256 values) into `q`, returning `(d, id, Σq)` with
/// `d = amax / 127` and the multiplier `id = 127 / amax` (0 for an all-zero block), as ggml.
fn quantize_block(backend: Backend, x: &[f32], q: &mut [i8]) -> (f32, f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if matches!(
        backend,
        Backend::Avx2 | Backend::Avx512Vnni | Backend::AvxVnni
    ) && x.len().is_multiple_of(32)
    {
        // SAFETY: these backends are only used when the CPU has AVX2 (checked by callers
        // through `Backend::is_available`); lengths are equal multiples of 32.
        return unsafe { quantize_block_avx2(x, q) };
    }
    let _ = backend;
    quantize_block_scalar(x, q)
}

/// Portable version (also the reference the SIMD version is tested against).
pub(crate) fn quantize_block_scalar(x: &[f32], q: &mut [i8]) -> (f32, f32, i32) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (qi, &xi) in q.iter_mut().zip(x) {
        // `as` saturates and maps NaN to 0; `|x * id| <= 127` up to one rounding.
        let v = ((xi * id).round_ties_even() as i32).clamp(-127, 127);
        *qi = v as i8;
        sum += v;
    }
    (d, id, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(x: &[f32], q: &mut [i8]) -> (f32, f32, i32) {
    use std::arch::x86_64::*;
    let n = x.len();
    let xp = x.as_ptr();
    let sign = _mm256_set1_ps(-0.0);
    let mut vmax = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        let v = _mm256_loadu_ps(xp.add(i));
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
    }
    let hi = _mm256_extractf128_ps(vmax, 1);
    let m4 = _mm_max_ps(hi, _mm256_castps256_ps128(vmax));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
    let amax = _mm_cvtss_f32(m1);
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let vid = _mm256_set1_ps(id);
    let lo = _mm256_set1_epi32(-127);
    let hi = _mm256_set1_epi32(127);
    let mut vsum = _mm256_setzero_si256();
    let qp = q.as_mut_ptr();
    for i in (0..n).step_by(32) {
        let mut iv = [_mm256_setzero_si256(); 4];
        for (j, v) in iv.iter_mut().enumerate() {
            let xv = _mm256_mul_ps(_mm256_loadu_ps(xp.add(i + 8 * j)), vid);
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xv);
            let c = _mm256_max_epi32(lo, _mm256_min_epi32(hi, _mm256_cvtps_epi32(r)));
            vsum = _mm256_add_epi32(vsum, c);
            *v = c;
        }
        // Pack 4 × 8 i32 to 32 i8; packs work per 128-bit lane, so restore the order.
        let p01 = _mm256_packs_epi32(iv[0], iv[1]);
        let p23 = _mm256_packs_epi32(iv[2], iv[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qp.add(i) as *mut __m256i, p);
    }
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(vsum),
        _mm256_extracti128_si256(vsum, 1),
    );
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
    (d, id, _mm_cvtsi128_si32(s1))
}
