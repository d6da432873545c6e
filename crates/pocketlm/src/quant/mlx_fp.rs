//! MLX's float quantization modes `mxfp4`, `mxfp8` and `nvfp4`, bit for bit.
//!
//! A weight `W: [.., rows, cols]` is split along its last dimension into groups of
//! `group_size` values; each group stores one 8-bit scale `s` and each value a small float
//! code `c`, and `w ≈ decode(c) * scale(s)`. There is no bias. Each mode allows one
//! `(group_size, bits)` pair (mlx 0.32 refuses every other):
//!
//! | mode | group_size | bits | element | scale |
//! |---|---|---|---|---|
//! | `mxfp4` | 32 | 4 | E2M1 (`0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6`) | E8M0: `2^(s - 127)` |
//! | `mxfp8` | 32 | 8 | E4M3 (OCP "FN": no infinities, `0x7F`/`0xFF` NaN, max 448) | E8M0 |
//! | `nvfp4` | 16 | 4 | E2M1 | E4M3 |
//!
//! Stored tensors (config.json: `"quantization": {"group_size": G, "bits": B, "mode": M}`):
//! - `weight`: `[.., rows, cols * bits / 32]` uint32: 4-bit codes as little-endian nibbles
//!   (code `k` of a row in bits `4 * (k % 8)` of word `k / 8`), 8-bit codes as little-endian
//!   bytes (code `k` in bits `8 * (k % 4)` of word `k / 4`),
//! - `scales`: `[.., rows, cols / group_size]` uint8.
//!
//! The formats are OCP Microscaling (MX) v1.0 (E2M1, E4M3, E8M0) and NVIDIA's NVFP4 (E4M3
//! scales over 16 values). The rounding rules below are MLX's own, read from
//! `mlx/ops.cpp` (`fp_quantize`, `fp_dequantize`) and `mlx/backend/cpu/quantized.cpp`
//! (`fp_qmm_t`, `dequantize_scale`) and pinned by testing mlx 0.32.4 on the CPU; the golden
//! test `tests/it/mlx_quant_modes_golden.rs` compares against files made by
//! `scripts/golden/mlx_quant_modes.py`. E4M3 conversions use the `float8` crate (round to
//! nearest even, saturating at ±448, as `mx.to_fp8` does for finite values).

use candle_core::{DType, Device, Tensor};
use float8::F8E4M3;
use rayon::prelude::*;

use super::mlx_affine::{
    candle_err, check_aligned, check_len, checked_len, dot, unsupported_float_dtype, ParamDtype,
};
use super::QuantError;

/// The E2M1 (FP4) values by code: bit 3 is the sign, bits 0-2 index
/// `0, 0.5, 1, 1.5, 2, 3, 4, 6` (MLX's `FP4_LUT`).
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// One of MLX's float quantization modes (`mx.quantize(w, mode=...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FpMode {
    /// E2M1 values, E8M0 scales, groups of 32.
    Mxfp4,
    /// E4M3 values, E8M0 scales, groups of 32.
    Mxfp8,
    /// E2M1 values, E4M3 scales, groups of 16.
    Nvfp4,
}

impl FpMode {
    /// All modes.
    pub const ALL: [FpMode; 3] = [FpMode::Mxfp4, FpMode::Mxfp8, FpMode::Nvfp4];

    /// The name mlx and config.json use: `"mxfp4"`, `"mxfp8"`, `"nvfp4"`.
    pub fn name(self) -> &'static str {
        match self {
            FpMode::Mxfp4 => "mxfp4",
            FpMode::Mxfp8 => "mxfp8",
            FpMode::Nvfp4 => "nvfp4",
        }
    }

    /// The mode named `name` (as [`Self::name`]), or `None`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Values per group: 32, or 16 for `nvfp4`.
    pub fn group_size(self) -> usize {
        match self {
            FpMode::Nvfp4 => 16,
            _ => 32,
        }
    }

    /// Bits per value: 8 for `mxfp8`, else 4.
    pub fn bits(self) -> usize {
        match self {
            FpMode::Mxfp8 => 8,
            _ => 4,
        }
    }

    /// The mode whose `(group_size, bits)` this is (what mlx-lm's `infer_quant_config` reads
    /// off a layer with uint8 scales), or `None`.
    pub fn from_params(group_size: usize, bits: usize) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.group_size() == group_size && m.bits() == bits)
    }

    /// Checks that `group_size` and `bits` are this mode's.
    ///
    /// Errors: [`QuantError::UnsupportedModeParams`].
    pub fn check(self, group_size: usize, bits: usize) -> Result<(), QuantError> {
        if (group_size, bits) != (self.group_size(), self.bits()) {
            return Err(QuantError::UnsupportedModeParams {
                mode: self.name(),
                group_size,
                bits,
                expected_group_size: self.group_size(),
                expected_bits: self.bits(),
            });
        }
        Ok(())
    }

    /// Largest element magnitude: 6 (E2M1) or 448 (E4M3).
    fn max_value(self) -> f32 {
        match self {
            FpMode::Mxfp8 => 448.0,
            _ => 6.0,
        }
    }
}

impl std::fmt::Display for FpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The value of an E8M0 scale byte: `2^(s - 127)` as f32 (`s = 0` gives `2^-127`, a
/// subnormal; `s = 255` gives +infinity, where the OCP spec has NaN), as MLX's
/// `dequantize_scale` and `power(2, s - 127)` compute it.
#[inline]
pub fn e8m0_to_f32(s: u8) -> f32 {
    f32::from_bits(if s == 0 {
        0x0040_0000
    } else {
        (s as u32) << 23
    })
}

/// The value of an E4M3 byte as f32 (exact; `0x7F` and `0xFF` are NaN).
#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    F8E4M3::from_bits(b).to_f32()
}

/// An f32 rounded to E4M3 like `mx.to_fp8`: nearest, ties to even, magnitudes past 464
/// saturating to ±448. (NaN gives `0x7F` here but `0x7E` in mlx; quantization never passes
/// NaN.)
#[inline]
pub fn f32_to_e4m3(v: f32) -> u8 {
    F8E4M3::from_f32(v).to_bits()
}

/// The E2M1 code mlx picks for `v`: the first entry of [`E2M1_VALUES`] with the smallest
/// `|v - value|`, the differences computed in f32 (mlx's `argmin` over `abs(wq - lut)`).
/// Hence ties go to the smaller magnitude, values rounding to zero get code 0 (never the
/// `-0` code 8), and NaN or infinite `v` get code 0.
#[inline]
pub fn e2m1_code(v: f32) -> u8 {
    let mut best = (v - E2M1_VALUES[0]).abs();
    let mut code = 0u8;
    for (k, &e) in E2M1_VALUES.iter().enumerate().skip(1) {
        let d = (v - e).abs();
        if d < best {
            best = d;
            code = k as u8;
        }
    }
    code
}

/// `ceil(log2(x))` exactly, for finite `x > 0` (subnormals included).
fn ceil_log2(x: f32) -> i32 {
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32;
    let man = bits & 0x7F_FFFF;
    if exp == 0 {
        // Subnormal: x = man * 2^-149.
        let top = 31 - man.leading_zeros() as i32; // floor(log2(man))
        let pow2 = man.is_power_of_two();
        top - 149 + i32::from(!pow2)
    } else {
        exp - 127 + i32::from(man != 0)
    }
}

/// `2^e` as f32 for `e` in `[-149, 127]` (exact; subnormal below -126).
fn exp2i(e: i32) -> f32 {
    f64::from_bits(((e + 1023) as u64) << 52) as f32
}

/// A matrix `[rows, cols]` in one of MLX's float quantization modes (see the module docs for
/// the layout).
///
/// - `weight`: `[rows, cols * bits / 32]` u32 packed codes,
/// - `scales`: `[rows, cols / group_size]` u8.
///
/// Invariants (checked by every constructor): `cols % group_size == 0` and the buffers have
/// the lengths above.
#[derive(Debug, Clone, PartialEq)]
pub struct FpQuantized {
    weight: Vec<u32>,
    scales: Vec<u8>,
    rows: usize,
    cols: usize,
    mode: FpMode,
}

impl FpQuantized {
    /// Wraps already quantized buffers (e.g. read from an mlx-community safetensors file).
    ///
    /// Errors: `cols` not a multiple of the mode's group size, a buffer of the wrong length.
    pub fn from_parts(
        weight: Vec<u32>,
        scales: Vec<u8>,
        rows: usize,
        cols: usize,
        mode: FpMode,
    ) -> Result<Self, QuantError> {
        let (gs, bits) = (mode.group_size(), mode.bits());
        check_aligned("weight", cols, gs)?;
        let words = checked_len("weight", rows, cols * bits / 32)?;
        let groups = checked_len("scales", rows, cols / gs)?;
        check_len(
            "weight",
            weight.len(),
            words,
            &format!("[{rows}, {cols} * {bits} / 32]"),
        )?;
        check_len(
            "scales",
            scales.len(),
            groups,
            &format!("[{rows}, {cols} / {gs}]"),
        )?;
        Ok(Self {
            weight,
            scales,
            rows,
            cols,
            mode,
        })
    }

    /// Quantizes `w: [rows, cols]` (row-major) like `mx.quantize(w, mode=mode)` on the CPU, bit
    /// for bit, where `w` holds the values of an array of dtype `dtype` (for f16 / bf16 weights
    /// pass their exact f32 widening: mlx computes the scale and the scaled values in that
    /// dtype).
    ///
    /// Per group, all operations in f32 and then rounded to `dtype` ("rd"):
    /// ```text
    /// scale = rd(max |w| / M)                 M = 6 (E2M1) or 448 (E4M3)
    /// mx modes: e = scale == 0 ? 0 : ceil(log2(scale))   (exact)
    ///           s = (e + 127) as u8           (wraps below e = -127, as mlx's cast)
    ///           q = rd(w / 2^e)
    /// nvfp4:    s = e4m3(scale);  q = rd(w / rd(value(s)))   (scale 0 gives ±inf / NaN: code 0)
    /// code = e4m3(q) (mxfp8) or e2m1_code(q) (see [`e2m1_code`])
    /// ```
    /// Since `2^e >= scale`, `|q| <= M` in the mx modes; in `nvfp4` the E4M3 scale may round
    /// down (or saturate at 448) and values past 6 become ±6.
    ///
    /// Errors: `cols` not a multiple of the group size, `w.len() != rows * cols`, a NaN or
    /// infinite value in `w` (mlx would produce garbage silently).
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        mode: FpMode,
        dtype: ParamDtype,
    ) -> Result<Self, QuantError> {
        let gs = mode.group_size();
        check_aligned("w", cols, gs)?;
        let n = checked_len("w", rows, cols)?;
        check_len("w", w.len(), n, &format!("[{rows}, {cols}]"))?;
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite {
                name: "w".into(),
                row: i / cols,
                col: i % cols,
                value: w[i],
            });
        }
        let n_groups = n / gs;
        let words_per_group = gs * mode.bits() / 32;
        let mut weight = vec![0u32; n_groups * words_per_group];
        let mut scales = vec![0u8; n_groups];
        if n_groups > 0 {
            weight
                .par_chunks_mut(words_per_group)
                .zip(scales.par_iter_mut())
                .zip(w.par_chunks(gs))
                .for_each(|((out, s), group)| *s = quantize_group(group, mode, dtype, out));
        }
        Self::from_parts(weight, scales, rows, cols, mode)
    }

    /// Reads MLX tensors: `weight: [.., rows, cols * bits / 32]` U32, `scales:
    /// [.., rows, cols / group_size]` U8. Leading dimensions are flattened into `rows`.
    ///
    /// Errors: rank below 2, wrong dtypes, shapes that do not agree with each other and the
    /// mode (MLX `dequantize`'s checks).
    pub fn from_tensors(
        weight: &Tensor,
        scales: &Tensor,
        mode: FpMode,
    ) -> Result<Self, QuantError> {
        let (gs, bits) = (mode.group_size(), mode.bits());
        if weight.dtype() != DType::U32 {
            return Err(QuantError::UnsupportedDtype {
                name: "weight".into(),
                got: format!("{:?}", weight.dtype()),
                expected: "U32 (packed codes)".into(),
            });
        }
        if scales.dtype() != DType::U8 {
            return Err(QuantError::UnsupportedDtype {
                name: "scales".into(),
                got: format!("{:?}", scales.dtype()),
                expected: format!("U8 ({} scales)", mode.name()),
            });
        }
        let wdims = weight.dims();
        if wdims.len() < 2 {
            return Err(QuantError::RankTooLow {
                name: "weight".into(),
                rank: wdims.len(),
            });
        }
        let lead = &wdims[..wdims.len() - 1];
        let words = wdims[wdims.len() - 1];
        let cols = words * 32 / bits;
        let mut expected = lead.to_vec();
        expected.push(cols / gs);
        if !cols.is_multiple_of(gs) || scales.dims() != expected.as_slice() {
            return Err(QuantError::ShapeMismatch {
                name: "scales".into(),
                expected,
                got: scales.dims().to_vec(),
                what: format!(
                    "{} weight {wdims:?} packs {words} * 32 / {bits} values per row, in groups \
                     of {gs}",
                    mode.name()
                ),
            });
        }
        let rows = lead.iter().product();
        let packed = weight
            .flatten_all()
            .and_then(|t| t.to_vec1::<u32>())
            .map_err(candle_err("weight"))?;
        let s = scales
            .flatten_all()
            .and_then(|t| t.to_vec1::<u8>())
            .map_err(candle_err("scales"))?;
        Self::from_parts(packed, s, rows, cols, mode)
    }

    /// The two tensors MLX stores, on `device`: `weight: [rows, cols * bits / 32]` U32 and
    /// `scales: [rows, cols / group_size]` U8. Reshape them for leading dimensions.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor), QuantError> {
        let weight = Tensor::from_slice(&self.weight, (self.rows, self.packed_cols()), device)
            .map_err(candle_err("weight"))?;
        let scales = Tensor::from_slice(&self.scales, (self.rows, self.groups_per_row()), device)
            .map_err(candle_err("scales"))?;
        Ok((weight, scales))
    }

    /// Packed codes, `[rows, cols * bits / 32]` row-major.
    pub fn weight(&self) -> &[u32] {
        &self.weight
    }

    /// Scale bytes, `[rows, cols / group_size]` row-major.
    pub fn scales(&self) -> &[u8] {
        &self.scales
    }

    /// Number of rows (output features of a `Linear`, vocabulary of an `Embedding`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features / hidden size).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The mode.
    pub fn mode(&self) -> FpMode {
        self.mode
    }

    /// u32 words per row: `cols * bits / 32`.
    pub fn packed_cols(&self) -> usize {
        self.cols * self.mode.bits() / 32
    }

    /// Groups per row: `cols / group_size`.
    pub fn groups_per_row(&self) -> usize {
        self.cols / self.mode.group_size()
    }

    /// Dequantizes the whole matrix like `mx.dequantize(weight, scales, mode=mode,
    /// dtype=dtype)`: `[rows, cols]` row-major, each value `rd(rd(element) * rd(scale))` with
    /// `rd` rounding to `dtype` (ties to even) and the result its exact f32 widening, so it
    /// equals mlx's output cast to f32 bit for bit (NaN payloads aside). With f32 or bf16 the
    /// products are exact except past the range of the dtype; f16 loses scales outside
    /// `[2^-24, 2^15]`. (mlx-lm's `QuantizedEmbedding` uses mlx's default, bf16.)
    pub fn dequantize(&self, dtype: ParamDtype) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(r, row)| self.decode_row(r, row, Some(dtype)));
        }
        out
    }

    /// Dequantizes row `row` into `out: [cols]` with the arithmetic of [`Self::dequantize`].
    ///
    /// Errors: [`QuantError::RowOutOfRange`], [`QuantError::LengthMismatch`] for `out`.
    pub fn dequantize_row(
        &self,
        row: usize,
        out: &mut [f32],
        dtype: ParamDtype,
    ) -> Result<(), QuantError> {
        if row >= self.rows {
            return Err(QuantError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        check_len("out", out.len(), self.cols, "[cols]")?;
        self.decode_row(row, out, Some(dtype));
        Ok(())
    }

    /// `y = x W^T` for `x: [m, k]` f32 row-major (`k = cols`), returning `y: [m, rows]` f32
    /// row-major: the product of `mx.quantized_matmul(x, weight, scales, transpose=True,
    /// mode=mode)` with an f32 `x`. As mlx's CPU kernel (`fp_qmm_t`), each group's dot product
    /// with the unscaled elements is multiplied by the group's scale and the groups summed, in
    /// f32; results differ from mlx by summation order only. Rows are spread over threads.
    ///
    /// Errors: [`QuantError::LengthMismatch`] if `x.len() != m * k`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>, QuantError> {
        let (k, n) = (self.cols, self.rows);
        let len = checked_len("x", m, k)?;
        check_len(
            "x",
            x.len(),
            len,
            &format!("[{m}, {k}] (k = in features of the weight)"),
        )?;
        if m == 0 || n == 0 {
            return Ok(vec![0f32; m * n]);
        }
        let gs = self.mode.group_size();
        let gpr = self.groups_per_row();
        // yt: [n, m]; each task decodes one weight row (unscaled) and dots it with every x row.
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(m).enumerate().for_each_init(
            || vec![0f32; k],
            |wbuf, (r, ycol)| {
                self.decode_row(r, wbuf, None);
                let scales = &self.scales[r * gpr..(r + 1) * gpr];
                for (xi, y) in x.chunks_exact(k).zip(ycol.iter_mut()) {
                    let mut acc = 0f32;
                    for ((xg, wg), &s) in xi.chunks_exact(gs).zip(wbuf.chunks_exact(gs)).zip(scales)
                    {
                        acc += self.scale_value(s) * dot(xg, wg);
                    }
                    *y = acc;
                }
            },
        );
        let mut y = vec![0f32; m * n];
        for (j, col) in yt.chunks_exact(m).enumerate() {
            for (i, v) in col.iter().enumerate() {
                y[i * n + j] = *v;
            }
        }
        Ok(y)
    }

    /// The f32 value of a scale byte of this mode.
    #[inline]
    fn scale_value(&self, s: u8) -> f32 {
        match self.mode {
            FpMode::Nvfp4 => e4m3_to_f32(s),
            _ => e8m0_to_f32(s),
        }
    }

    /// Decodes row `r` into `out: [cols]`: with `Some(dtype)` the scaled values rounded as
    /// [`Self::dequantize`]; with `None` the unscaled elements.
    fn decode_row(&self, r: usize, out: &mut [f32], dtype: Option<ParamDtype>) {
        let pc = self.packed_cols();
        let words = &self.weight[r * pc..(r + 1) * pc];
        if self.mode.bits() == 4 {
            for (w, o) in words.iter().zip(out.chunks_exact_mut(8)) {
                for (j, v) in o.iter_mut().enumerate() {
                    *v = E2M1_VALUES[((w >> (4 * j)) & 0xF) as usize];
                }
            }
        } else {
            for (w, o) in words.iter().zip(out.chunks_exact_mut(4)) {
                for (j, v) in o.iter_mut().enumerate() {
                    *v = e4m3_to_f32((w >> (8 * j)) as u8);
                }
            }
        }
        let Some(dtype) = dtype else { return };
        let gpr = self.groups_per_row();
        let gs = self.mode.group_size();
        for (chunk, &s) in out
            .chunks_exact_mut(gs)
            .zip(&self.scales[r * gpr..(r + 1) * gpr])
        {
            let scale = dtype.round(self.scale_value(s));
            for v in chunk.iter_mut() {
                *v = dtype.round(dtype.round(*v) * scale);
            }
        }
    }
}

/// Quantizes one group into `out` (`group.len() * bits / 32` words) and returns its scale
/// byte; see [`FpQuantized::quantize`].
fn quantize_group(group: &[f32], mode: FpMode, dtype: ParamDtype, out: &mut [u32]) -> u8 {
    let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = dtype.round(amax / mode.max_value());
    let (s, divisor) = match mode {
        FpMode::Nvfp4 => {
            let s = f32_to_e4m3(scale);
            (s, dtype.round(e4m3_to_f32(s)))
        }
        FpMode::Mxfp4 | FpMode::Mxfp8 => {
            let e = if scale == 0.0 { 0 } else { ceil_log2(scale) };
            ((e + 127) as u8, dtype.round(exp2i(e)))
        }
    };
    let q = |v: f32| dtype.round(v / divisor);
    if mode.bits() == 4 {
        for (word, vals) in out.iter_mut().zip(group.chunks_exact(8)) {
            *word = vals.iter().enumerate().fold(0u32, |acc, (j, &v)| {
                acc | (u32::from(e2m1_code(q(v))) << (4 * j))
            });
        }
    } else {
        for (word, vals) in out.iter_mut().zip(group.chunks_exact(4)) {
            *word = vals.iter().enumerate().fold(0u32, |acc, (j, &v)| {
                acc | (u32::from(f32_to_e4m3(q(v))) << (8 * j))
            });
        }
    }
    s
}

/// Quantizes a tensor `w: [.., rows, cols]` (F32, F16 or BF16, rank >= 2) like
/// `mx.quantize(w, mode=mode)`, returning `(weight, scales)` on `w`'s device:
/// `weight: [.., rows, cols * bits / 32]` U32, `scales: [.., rows, cols / group_size]` U8.
///
/// Errors: as [`FpQuantized::quantize`], plus rank below 2 and other dtypes.
pub fn quantize_tensor(w: &Tensor, mode: FpMode) -> Result<(Tensor, Tensor), QuantError> {
    let dims = w.dims().to_vec();
    if dims.len() < 2 {
        return Err(QuantError::RankTooLow {
            name: "w".into(),
            rank: dims.len(),
        });
    }
    let dtype = ParamDtype::from_candle(w.dtype())
        .ok_or_else(|| unsupported_float_dtype("w", w.dtype()))?;
    let cols = dims[dims.len() - 1];
    check_aligned("w", cols, mode.group_size())?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let values = w
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(candle_err("w"))?;
    let q = FpQuantized::quantize(&values, rows, cols, mode, dtype)?;
    let (weight, scales) = q.to_tensors(w.device())?;
    let last = dims.len() - 1;
    let mut wshape = dims.clone();
    wshape[last] = q.packed_cols();
    let mut sshape = dims;
    sshape[last] = q.groups_per_row();
    Ok((
        weight.reshape(wshape).map_err(candle_err("weight"))?,
        scales.reshape(sshape).map_err(candle_err("scales"))?,
    ))
}

/// Dequantizes MLX tensors like `mx.dequantize(weight, scales, mode=mode, dtype=dtype)`:
/// `weight: [.., rows, cols * bits / 32]` U32, `scales: [.., rows, cols / group_size]` U8 ->
/// `[.., rows, cols]` in `dtype`, on `weight`'s device.
///
/// Errors: as [`FpQuantized::from_tensors`].
pub fn dequantize_tensor(
    weight: &Tensor,
    scales: &Tensor,
    mode: FpMode,
    dtype: ParamDtype,
) -> Result<Tensor, QuantError> {
    let q = FpQuantized::from_tensors(weight, scales, mode)?;
    let mut shape = weight.dims().to_vec();
    let last = shape.len() - 1;
    shape[last] = q.cols;
    Tensor::from_vec(q.dequantize(dtype), shape, weight.device())
        .and_then(|t| t.to_dtype(dtype.to_candle()))
        .map_err(candle_err("dequantized"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_log2_is_exact() {
        for e in -149..=127 {
            let p = exp2i(e);
            assert_eq!(ceil_log2(p), e, "2^{e}");
            if e < 127 {
                assert_eq!(
                    ceil_log2(f32::from_bits(p.to_bits() + 1)),
                    e + 1,
                    "above 2^{e}"
                );
            }
            // (Below 2^-148 lies 2^-149, itself a power of two.)
            if e > -148 {
                assert_eq!(ceil_log2(f32::from_bits(p.to_bits() - 1)), e, "below 2^{e}");
            }
        }
        assert_eq!(ceil_log2(3.0), 2);
        assert_eq!(ceil_log2(f32::from_bits(3)), -147);
    }

    #[test]
    fn scale_and_element_decoding() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(130), 8.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32(255), f32::INFINITY);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(e4m3_to_f32(0x7F).is_nan());
        assert_eq!(f32_to_e4m3(1e6), 0x7E);
        assert_eq!(f32_to_e4m3(-1e6), 0xFE);
        // Ties go to the smaller magnitude; tiny negatives to code 0.
        assert_eq!(e2m1_code(0.25), 0);
        assert_eq!(e2m1_code(0.75), 1);
        assert_eq!(e2m1_code(-0.75), 9);
        assert_eq!(e2m1_code(5.0), 6);
        assert_eq!(e2m1_code(-0.1), 0);
        assert_eq!(e2m1_code(7.9), 7);
        assert_eq!(e2m1_code(f32::INFINITY), 0);
        assert_eq!(e2m1_code(f32::NAN), 0);
    }

    fn weight(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
        let mut s = seed;
        (0..rows * cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() -> Result<(), QuantError> {
        let (rows, cols) = (5, 64);
        let w = weight(3, rows, cols);
        for mode in FpMode::ALL {
            let q = FpQuantized::quantize(&w, rows, cols, mode, ParamDtype::F32)?;
            let d = q.dequantize(ParamDtype::F32);
            let gs = mode.group_size();
            for (g, (wg, dg)) in w.chunks(gs).zip(d.chunks(gs)).enumerate() {
                let amax = wg.iter().fold(0f32, |m, v| m.max(v.abs()));
                // E2M1 steps are at most 2 (between 4 and 6) of 6; E4M3 relative 1/8 (normal).
                let bound = match mode {
                    FpMode::Mxfp8 => amax / 16.0 + 1e-6,
                    FpMode::Mxfp4 => amax / 3.0 + 1e-7,
                    FpMode::Nvfp4 => amax * 1.1 / 6.0 + 1e-6,
                };
                for (a, b) in wg.iter().zip(dg) {
                    assert!((a - b).abs() <= bound, "{mode} group {g}: {a} vs {b}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn matmul_matches_dequantized_product() -> Result<(), QuantError> {
        let (rows, cols, m) = (7, 96, 3);
        let w = weight(11, rows, cols);
        let x = weight(12, m, cols);
        for mode in FpMode::ALL {
            let q = FpQuantized::quantize(&w, rows, cols, mode, ParamDtype::BF16)?;
            let d = q.dequantize(ParamDtype::F32);
            let y = q.matmul(&x, m)?;
            for i in 0..m {
                for j in 0..rows {
                    let r: f64 = (0..cols)
                        .map(|c| x[i * cols + c] as f64 * d[j * cols + c] as f64)
                        .sum();
                    assert!(
                        (y[i * rows + j] as f64 - r).abs() < 1e-5,
                        "{mode} ({i}, {j})"
                    );
                }
            }
        }
        assert!(
            FpQuantized::quantize(&w, rows, cols, FpMode::Mxfp4, ParamDtype::F32)?
                .matmul(&x[..5], 1)
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn argument_validation() {
        let w = vec![0.5f32; 2 * 48];
        assert!(matches!(
            FpQuantized::quantize(&w, 2, 48, FpMode::Mxfp4, ParamDtype::F32),
            Err(QuantError::NotGroupAligned { .. })
        ));
        assert!(FpQuantized::quantize(&w, 2, 48, FpMode::Nvfp4, ParamDtype::F32).is_ok());
        let mut bad = vec![0.5f32; 64];
        bad[40] = f32::NAN;
        assert!(matches!(
            FpQuantized::quantize(&bad, 2, 32, FpMode::Mxfp8, ParamDtype::F32),
            Err(QuantError::NonFinite { row: 1, col: 8, .. })
        ));
        assert!(FpQuantized::from_parts(vec![0; 3], vec![0; 2], 2, 32, FpMode::Mxfp4).is_err());
        assert!(FpMode::Mxfp4.check(32, 4).is_ok());
        assert!(FpMode::Nvfp4.check(32, 4).is_err());
        assert_eq!(FpMode::from_params(16, 4), Some(FpMode::Nvfp4));
        assert_eq!(FpMode::from_name("mxfp8"), Some(FpMode::Mxfp8));
        assert_eq!(FpMode::from_name("affine"), None);
    }
}
