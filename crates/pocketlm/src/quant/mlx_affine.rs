//! MLX affine group quantization, bit for bit.
//!
//! This is the format of mlx-community checkpoints: a `Linear`/`Embedding` weight `W`
//! (`[out, in]`, or more generally `[.., rows, cols]`) is split along its last dimension into
//! groups of `group_size` consecutive values; each group stores one `scale` and one `bias`
//! and each value an unsigned `bits`-bit code `q`, and
//!
//! ```text
//! w ≈ scale * q + bias
//! ```
//!
//! Stored tensors (config.json: `"quantization": {"group_size": G, "bits": B}`):
//! - `weight`: `[.., rows, cols * B / 32]` uint32, the codes of each row as one little-endian
//!   bit stream: code `c` of a row occupies bits `c*B .. c*B + B` of the row, bit `i` of the row
//!   being bit `i % 32` of word `i / 32`. For B in {2, 4, 8} every word holds `32 / B` whole
//!   codes; for B in {3, 5, 6} codes straddle words (MLX writes 3/5/6-bit packs of 8/8/4 codes
//!   as 3/5/3 bytes, which read as little-endian words gives the same stream).
//! - `scales`, `biases`: `[.., rows, cols / G]`, the dtype of the original weight (f32, f16 or
//!   bf16).
//!
//! Reference: Apple MLX (checked against Python `mlx` 0.32.4): `mlx/backend/cpu/quantized.cpp`
//! (`quantize`, `_qmm_t`) and `mlx/ops.cpp` (`affine_quantize`, `affine_dequantize`,
//! `quantized_matmul`). The golden test `tests/it/mlx_quant_golden.rs` compares against files made
//! by `scripts/golden/mlx_quant.py`.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::QuantError;

/// Bit widths MLX affine quantization defines.
pub const SUPPORTED_BITS: [usize; 6] = [2, 3, 4, 5, 6, 8];

/// Group sizes MLX affine quantization defines.
pub const SUPPORTED_GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Lower bound of `|scale|` before the bias is made exact (MLX `eps = 1e-7`).
const EPS: f32 = 1e-7;

/// Rows of the weight decoded together in [`AffineQuantized::matmul`], so that each row of `x`
/// is read once per tile while it is in cache.
const MATMUL_ROW_TILE: usize = 4;

/// Checks `bits` and `group_size` against [`SUPPORTED_BITS`] and [`SUPPORTED_GROUP_SIZES`].
///
/// Errors: [`QuantError::UnsupportedBits`], [`QuantError::UnsupportedGroupSize`].
pub fn check_params(group_size: usize, bits: usize) -> Result<(), QuantError> {
    if !SUPPORTED_BITS.contains(&bits) {
        return Err(QuantError::UnsupportedBits { bits });
    }
    if !SUPPORTED_GROUP_SIZES.contains(&group_size) {
        return Err(QuantError::UnsupportedGroupSize { group_size });
    }
    Ok(())
}

/// The dtype of `scales` and `biases` (MLX keeps the dtype of the quantized weight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamDtype {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl ParamDtype {
    /// Rounds an f32 to the nearest value of this dtype (ties to even, as MLX's casts do) and
    /// widens it back to f32 (exact).
    #[inline]
    pub fn round(self, v: f32) -> f32 {
        match self {
            Self::F32 => v,
            Self::F16 => f16::from_f32(v).to_f32(),
            Self::BF16 => bf16::from_f32(v).to_f32(),
        }
    }

    /// The matching candle dtype.
    pub fn to_candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }

    /// The dtype for a candle dtype; `None` unless F32, F16 or BF16.
    pub fn from_candle(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32),
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::BF16),
            _ => None,
        }
    }
}

/// Per-group parameters (`scales` or `biases`), `[rows * cols / group_size]` row-major, in
/// their stored dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupParams {
    /// f32 values.
    F32(Vec<f32>),
    /// f16 values.
    F16(Vec<f16>),
    /// bf16 values.
    BF16(Vec<bf16>),
}

impl GroupParams {
    /// Rounds each f32 to `dtype` (nearest, ties to even).
    pub fn from_f32(dtype: ParamDtype, values: &[f32]) -> Self {
        match dtype {
            ParamDtype::F32 => Self::F32(values.to_vec()),
            ParamDtype::F16 => Self::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            ParamDtype::BF16 => Self::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }

    /// The stored dtype.
    pub fn dtype(&self) -> ParamDtype {
        match self {
            Self::F32(_) => ParamDtype::F32,
            Self::F16(_) => ParamDtype::F16,
            Self::BF16(_) => ParamDtype::BF16,
        }
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::BF16(v) => v.len(),
        }
    }

    /// True when there are no groups.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i` widened to f32 (exact), or `None` past the end.
    #[inline]
    pub fn get(&self, i: usize) -> Option<f32> {
        match self {
            Self::F32(v) => v.get(i).copied(),
            Self::F16(v) => v.get(i).map(|x| x.to_f32()),
            Self::BF16(v) => v.get(i).map(|x| x.to_f32()),
        }
    }

    /// The stored values as raw bytes (native endianness), `len() * 4` or `len() * 2` long,
    /// for the CPU kernels.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        fn bytes<T>(v: &[T]) -> &[u8] {
            // SAFETY: plain-old-data floats without padding; `u8` has alignment 1 and the
            // length covers exactly the same memory.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        match self {
            Self::F32(v) => bytes(v),
            Self::F16(v) => bytes(v),
            Self::BF16(v) => bytes(v),
        }
    }

    /// All values widened to f32 (exact).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Self::F32(v) => v.clone(),
            Self::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Self::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// A candle tensor of `shape` in the stored dtype.
    fn to_tensor(
        &self,
        shape: &[usize],
        device: &Device,
        name: &str,
    ) -> Result<Tensor, QuantError> {
        let t = match self {
            Self::F32(v) => Tensor::from_slice(v, shape, device),
            Self::F16(v) => Tensor::from_slice(v, shape, device),
            Self::BF16(v) => Tensor::from_slice(v, shape, device),
        };
        t.map_err(candle_err(name))
    }

    /// Reads a float tensor (any shape, flattened row-major) keeping its dtype.
    fn from_tensor(t: &Tensor, name: &str) -> Result<Self, QuantError> {
        let flat = t.flatten_all().map_err(candle_err(name))?;
        Ok(match t.dtype() {
            DType::F32 => Self::F32(flat.to_vec1().map_err(candle_err(name))?),
            DType::F16 => Self::F16(flat.to_vec1().map_err(candle_err(name))?),
            DType::BF16 => Self::BF16(flat.to_vec1().map_err(candle_err(name))?),
            other => return Err(unsupported_float_dtype(name, other)),
        })
    }
}

/// A matrix `[rows, cols]` in MLX affine quantized form (see the module docs for the layout).
///
/// - `weight`: `[rows, cols * bits / 32]` u32 packed codes,
/// - `scales`, `biases`: `[rows, cols / group_size]` in [`Self::dtype`].
///
/// Invariants (checked by every constructor): `bits` in [`SUPPORTED_BITS`], `group_size` in
/// [`SUPPORTED_GROUP_SIZES`], `cols % group_size == 0`, the three buffers have the lengths
/// above, `scales` and `biases` share a dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineQuantized {
    weight: Vec<u32>,
    scales: GroupParams,
    biases: GroupParams,
    rows: usize,
    cols: usize,
    bits: usize,
    group_size: usize,
    exact_matmul: bool,
}

impl AffineQuantized {
    /// Marks the matrix for `mx.quantized_matmul`'s f32 arithmetic in products (instead of
    /// our activation-quantizing CPU kernels; see [`crate::loader::LoadOptions`]).
    pub fn with_exact_matmul(mut self, yes: bool) -> Self {
        self.exact_matmul = yes;
        self
    }

    /// Whether products with this matrix use f32 arithmetic only.
    pub fn exact_matmul(&self) -> bool {
        self.exact_matmul
    }

    /// Quantizes `w: [rows, cols]` (row-major f32) like `mx.quantize(w, group_size, bits)` on
    /// an array of dtype `dtype`; see [`quantize`].
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        group_size: usize,
        bits: usize,
        dtype: ParamDtype,
    ) -> Result<Self, QuantError> {
        quantize(w, rows, cols, group_size, bits, dtype)
    }

    /// The matrices stacked by rows (`[sum rows, cols]`), or `None` when they differ in
    /// `cols`, `bits`, `group_size` or parameter dtype (or `parts` is empty).
    pub fn stack_rows(parts: &[AffineQuantized]) -> Option<AffineQuantized> {
        let first = parts.first()?;
        if parts.iter().any(|p| {
            (p.cols, p.bits, p.group_size, p.dtype())
                != (first.cols, first.bits, first.group_size, first.dtype())
        }) {
            return None;
        }
        let cat = |f: fn(&AffineQuantized) -> &GroupParams| -> GroupParams {
            match f(first) {
                GroupParams::F32(_) => GroupParams::F32(
                    parts
                        .iter()
                        .flat_map(|p| match f(p) {
                            GroupParams::F32(v) => v.clone(),
                            _ => Vec::new(),
                        })
                        .collect(),
                ),
                GroupParams::F16(_) => GroupParams::F16(
                    parts
                        .iter()
                        .flat_map(|p| match f(p) {
                            GroupParams::F16(v) => v.clone(),
                            _ => Vec::new(),
                        })
                        .collect(),
                ),
                GroupParams::BF16(_) => GroupParams::BF16(
                    parts
                        .iter()
                        .flat_map(|p| match f(p) {
                            GroupParams::BF16(v) => v.clone(),
                            _ => Vec::new(),
                        })
                        .collect(),
                ),
            }
        };
        Self::from_parts(
            parts
                .iter()
                .flat_map(|p| p.weight.iter().copied())
                .collect(),
            cat(|p| &p.scales),
            cat(|p| &p.biases),
            parts.iter().map(|p| p.rows).sum(),
            first.cols,
            first.group_size,
            first.bits,
        )
        .ok()
        .map(|q| q.with_exact_matmul(first.exact_matmul))
    }

    /// Wraps already quantized buffers (e.g. read from an mlx-community safetensors file).
    ///
    /// `weight: [rows, cols * bits / 32]` u32, `scales`, `biases: [rows, cols / group_size]`.
    /// Errors: unsupported `bits` / `group_size`, `cols` not a multiple of `group_size`, a
    /// buffer of the wrong length, `scales` and `biases` of different dtypes.
    pub fn from_parts(
        weight: Vec<u32>,
        scales: GroupParams,
        biases: GroupParams,
        rows: usize,
        cols: usize,
        group_size: usize,
        bits: usize,
    ) -> Result<Self, QuantError> {
        check_params(group_size, bits)?;
        check_aligned("weight", cols, group_size)?;
        let words = checked_len("weight", rows, cols * bits / 32)?;
        let groups = checked_len("scales", rows, cols / group_size)?;
        let shape_words = format!("[{rows}, {cols} * {bits} / 32]");
        let shape_groups = format!("[{rows}, {cols} / {group_size}]");
        check_len("weight", weight.len(), words, &shape_words)?;
        check_len("scales", scales.len(), groups, &shape_groups)?;
        check_len("biases", biases.len(), groups, &shape_groups)?;
        if scales.dtype() != biases.dtype() {
            return Err(QuantError::UnsupportedDtype {
                name: "biases".into(),
                got: format!("{:?}", biases.dtype()),
                expected: format!("{:?}, the dtype of `scales`", scales.dtype()),
            });
        }
        Ok(Self {
            weight,
            scales,
            biases,
            rows,
            cols,
            bits,
            group_size,
            exact_matmul: false,
        })
    }

    /// Reads MLX tensors: `weight: [.., rows, cols * bits / 32]` U32, `scales` and `biases`:
    /// `[.., rows, cols / group_size]`, both F32, both F16 or both BF16. Leading dimensions
    /// are flattened into `rows` (e.g. stacked experts `[E, out, in]`).
    ///
    /// Errors: unsupported parameters, rank below 2, wrong dtypes, shapes that do not agree
    /// with each other and with `bits` / `group_size` (MLX `dequantize`'s checks).
    pub fn from_tensors(
        weight: &Tensor,
        scales: &Tensor,
        biases: &Tensor,
        group_size: usize,
        bits: usize,
    ) -> Result<Self, QuantError> {
        check_params(group_size, bits)?;
        if weight.dtype() != DType::U32 {
            return Err(QuantError::UnsupportedDtype {
                name: "weight".into(),
                got: format!("{:?}", weight.dtype()),
                expected: "U32 (packed codes)".into(),
            });
        }
        let wdims = weight.dims();
        let sdims = scales.dims();
        if wdims.len() < 2 {
            return Err(QuantError::RankTooLow {
                name: "weight".into(),
                rank: wdims.len(),
            });
        }
        let lead = &wdims[..wdims.len() - 1];
        let words = wdims[wdims.len() - 1];
        let groups = sdims.last().copied().unwrap_or(0);
        let cols = groups * group_size;
        let mut expected_scales = lead.to_vec();
        expected_scales.push(words * 32 / bits);
        expected_scales[lead.len()] /= group_size;
        if !(words * 32).is_multiple_of(bits * group_size) || sdims != expected_scales.as_slice() {
            return Err(QuantError::ShapeMismatch {
                name: "scales".into(),
                expected: expected_scales,
                got: sdims.to_vec(),
                what: format!(
                    "weight {wdims:?} packs {words} * 32 / {bits} values per row, \
                     in groups of {group_size}"
                ),
            });
        }
        if biases.dims() != sdims {
            return Err(QuantError::ShapeMismatch {
                name: "biases".into(),
                expected: sdims.to_vec(),
                got: biases.dims().to_vec(),
                what: "the shape of `scales`".into(),
            });
        }
        if scales.dtype() != biases.dtype() {
            return Err(QuantError::UnsupportedDtype {
                name: "biases".into(),
                got: format!("{:?}", biases.dtype()),
                expected: format!("{:?}, the dtype of `scales`", scales.dtype()),
            });
        }
        let rows = lead.iter().product();
        let packed = weight
            .flatten_all()
            .and_then(|t| t.to_vec1::<u32>())
            .map_err(candle_err("weight"))?;
        let scales = GroupParams::from_tensor(scales, "scales")?;
        let biases = GroupParams::from_tensor(biases, "biases")?;
        Self::from_parts(packed, scales, biases, rows, cols, group_size, bits)
    }

    /// The three tensors MLX stores, on `device`: `weight: [rows, cols * bits / 32]` U32,
    /// `scales`, `biases: [rows, cols / group_size]` in [`Self::dtype`]. Reshape them for
    /// leading dimensions.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor, Tensor), QuantError> {
        let weight = Tensor::from_slice(&self.weight, (self.rows, self.packed_cols()), device)
            .map_err(candle_err("weight"))?;
        let gshape = [self.rows, self.groups_per_row()];
        let scales = self.scales.to_tensor(&gshape, device, "scales")?;
        let biases = self.biases.to_tensor(&gshape, device, "biases")?;
        Ok((weight, scales, biases))
    }

    /// Packed codes, `[rows, cols * bits / 32]` row-major.
    pub fn weight(&self) -> &[u32] {
        &self.weight
    }

    /// Scales, `[rows, cols / group_size]` row-major.
    pub fn scales(&self) -> &GroupParams {
        &self.scales
    }

    /// Biases, `[rows, cols / group_size]` row-major.
    pub fn biases(&self) -> &GroupParams {
        &self.biases
    }

    /// Number of rows (output features of a `Linear`, vocabulary of an `Embedding`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features / hidden size).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bits per code.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Values per group.
    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// Dtype of `scales` and `biases`.
    pub fn dtype(&self) -> ParamDtype {
        self.scales.dtype()
    }

    /// u32 words per row: `cols * bits / 32`.
    pub fn packed_cols(&self) -> usize {
        self.cols * self.bits / 32
    }

    /// Groups per row: `cols / group_size`.
    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group_size
    }

    /// Dequantizes the whole matrix like `mx.dequantize`: `[rows, cols]` row-major; see
    /// [`dequantize`].
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(r, row)| self.decode_row(r, row, true));
        }
        out
    }

    /// Dequantizes row `row` into `out: [cols]` (an `Embedding` lookup), with the same
    /// arithmetic as [`Self::dequantize`].
    ///
    /// Errors: [`QuantError::RowOutOfRange`], [`QuantError::LengthMismatch`] for `out`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), QuantError> {
        if row >= self.rows {
            return Err(QuantError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        check_len("out", out.len(), self.cols, "[cols]")?;
        self.decode_row(row, out, true);
        Ok(())
    }

    /// `y = x W^T` like `mx.quantized_matmul(x, w, scales, biases, transpose=True)` with an f32
    /// `x`; see [`quantized_matmul`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>, QuantError> {
        quantized_matmul(x, m, self)
    }

    /// Decodes row `r` into `out: [cols]` as `scale * q + bias`. With `round_to_dtype`, each
    /// of the product and the sum is rounded to the dtype of `scales` (MLX `dequantize`
    /// computes in that dtype); without, both are f32 operations on the widened parameters
    /// (MLX `quantized_matmul` with an f32 `x` promotes scales and biases to f32).
    /// Two separate roundings, never a fused multiply-add, as MLX does.
    fn decode_row(&self, r: usize, out: &mut [f32], round_to_dtype: bool) {
        let gs = self.group_size;
        let words_per_group = gs * self.bits / 32;
        let gpr = self.groups_per_row();
        let pc = self.packed_cols();
        let row_words = &self.weight[r * pc..(r + 1) * pc];
        let dtype = self.dtype();
        for (g, (chunk, words)) in out
            .chunks_exact_mut(gs)
            .zip(row_words.chunks_exact(words_per_group))
            .enumerate()
        {
            unpack_codes(self.bits, words, chunk);
            // Indices are in range by the constructor's invariants.
            let scale = self.scales.get(r * gpr + g).unwrap_or(0.0);
            let bias = self.biases.get(r * gpr + g).unwrap_or(0.0);
            if round_to_dtype && dtype != ParamDtype::F32 {
                for v in chunk.iter_mut() {
                    *v = dtype.round(dtype.round(*v * scale) + bias);
                }
            } else {
                for v in chunk.iter_mut() {
                    *v = *v * scale + bias;
                }
            }
        }
    }
}

/// Quantizes `w: [rows, cols]` (row-major) like `mx.quantize(w, group_size, bits)` on the
/// CPU, bit for bit, where `w` holds the values of an array of dtype `dtype` (for f16 / bf16
/// weights pass their exact f32 widening; `scales` and `biases` come out in `dtype`).
///
/// Per group of `group_size` values (MLX `quantize` in `backend/cpu/quantized.cpp`, all in f32):
/// ```text
/// n_bins = 2^bits - 1
/// scale  = max((w_max - w_min) / n_bins, 1e-7)
/// if |w_min| > |w_max| { edge = w_min } else { edge = w_max; scale = -scale }
/// q0 = rint(edge / scale)                          // round half to even
/// if q0 != 0 { scale = edge / q0; bias = edge }    // `edge` decodes exactly (q = q0 ... 0)
/// else       { bias = 0 }
/// q = clamp(rint((w - bias) / scale), 0, n_bins)
/// ```
/// The codes use the f32 `scale`; the stored `scales` / `biases` are `scale` / `bias` rounded
/// to `dtype` (ties to even). A constant group (`w_max == w_min`) gets `|scale| ≈ 1e-7`,
/// `bias` = the value and all codes 0 (all-zero groups: `scale = -1e-7`, `bias = 0`). Note
/// that `scale` is negative when `|w_max| >= |w_min|`.
///
/// Round-trip error (f32 parameters, up to f32 rounding): `|w - dequantized| <= |scale| / 2`
/// for values whose code is below `n_bins`, but only `<= |scale|` in general: making `edge`
/// exact can shrink `|scale|` (by at most a factor `1 - 1 / n_bins`), so the value at the other
/// end of the group may need a code past `n_bins` and be clamped.
///
/// Errors: unsupported `bits` / `group_size`, `cols % group_size != 0`, `w.len() !=
/// rows * cols`, a NaN or infinite value in `w` (MLX would produce garbage silently).
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    group_size: usize,
    bits: usize,
    dtype: ParamDtype,
) -> Result<AffineQuantized, QuantError> {
    check_params(group_size, bits)?;
    check_aligned("w", cols, group_size)?;
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
    let n_groups = n / group_size;
    let words_per_group = group_size * bits / 32;
    let mut weight = vec![0u32; n_groups * words_per_group];
    let mut params = vec![(0f32, 0f32); n_groups];
    if n_groups > 0 {
        weight
            .par_chunks_mut(words_per_group)
            .zip(params.par_iter_mut())
            .zip(w.par_chunks(group_size))
            .for_each(|((out, p), group)| *p = quantize_group(group, bits, out));
    }
    let scales: Vec<f32> = params.iter().map(|p| p.0).collect();
    let biases: Vec<f32> = params.iter().map(|p| p.1).collect();
    AffineQuantized::from_parts(
        weight,
        GroupParams::from_f32(dtype, &scales),
        GroupParams::from_f32(dtype, &biases),
        rows,
        cols,
        group_size,
        bits,
    )
}

/// Dequantizes like `mx.dequantize(weight, scales, biases, group_size, bits)`: returns
/// `[rows, cols]` row-major, `w = scale * q + bias`.
///
/// MLX computes in the dtype of `scales`: for f16 / bf16 both the product and the sum are
/// rounded to that dtype (ties to even) and the result here is its exact f32 widening, so it
/// equals `mx.dequantize(...).astype(mx.float32)` bit for bit. (Each f32 operation rounded to
/// f16 / bf16 equals the correctly rounded f16 / bf16 operation, since 24 >= 2 * 11 + 2.)
pub fn dequantize(q: &AffineQuantized) -> Vec<f32> {
    q.dequantize()
}

/// `y = x W^T` for `x: [m, k]` f32 row-major and `q` holding `W: [n, k]` (a `Linear` weight
/// `[out, in]`), returning `y: [m, n]` f32 row-major; the product of
/// `mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size, bits)` with an
/// f32 `x`.
///
/// Each weight value is `scale * q + bias` in f32 (parameters widened from their dtype, as
/// MLX promotes them to `x`'s dtype), then dotted with `x` in f32 with eight partial sums
/// (MLX's CPU kernel sums sequentially, so results differ from it by summation order only:
/// at most about `k * 2^-24 * Σ|x_i w_i|`). Rows of `W` are spread over threads with rayon.
///
/// Errors: [`QuantError::LengthMismatch`] if `x.len() != m * k`.
pub fn quantized_matmul(x: &[f32], m: usize, q: &AffineQuantized) -> Result<Vec<f32>, QuantError> {
    let k = q.cols;
    let n = q.rows;
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
    // yt: [n, m], one chunk of MATMUL_ROW_TILE weight rows per task.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(MATMUL_ROW_TILE * m)
        .enumerate()
        .for_each_init(
            || vec![0f32; MATMUL_ROW_TILE * k],
            |wbuf, (tile, ychunk)| {
                let r0 = tile * MATMUL_ROW_TILE;
                let nr = ychunk.len() / m;
                for t in 0..nr {
                    q.decode_row(r0 + t, &mut wbuf[t * k..(t + 1) * k], false);
                }
                for (i, xi) in x.chunks_exact(k).enumerate() {
                    for t in 0..nr {
                        ychunk[t * m + i] = dot(xi, &wbuf[t * k..(t + 1) * k]);
                    }
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

/// Quantizes a tensor `w: [.., rows, cols]` (F32, F16 or BF16, rank >= 2) like `mx.quantize`,
/// returning `(weight, scales, biases)` on `w`'s device: `weight: [.., rows, cols * bits / 32]`
/// U32, `scales`, `biases: [.., rows, cols / group_size]` in `w`'s dtype.
///
/// Errors: as [`quantize`], plus rank below 2 and other dtypes.
pub fn quantize_tensor(
    w: &Tensor,
    group_size: usize,
    bits: usize,
) -> Result<(Tensor, Tensor, Tensor), QuantError> {
    check_params(group_size, bits)?;
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
    check_aligned("w", cols, group_size)?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let values = w
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(candle_err("w"))?;
    let q = quantize(&values, rows, cols, group_size, bits, dtype)?;
    let (weight, scales, biases) = q.to_tensors(w.device())?;
    let mut wshape = dims.clone();
    wshape[dims.len() - 1] = q.packed_cols();
    let mut gshape = dims;
    let last = gshape.len() - 1;
    gshape[last] = q.groups_per_row();
    Ok((
        weight.reshape(wshape).map_err(candle_err("weight"))?,
        scales
            .reshape(gshape.clone())
            .map_err(candle_err("scales"))?,
        biases.reshape(gshape).map_err(candle_err("biases"))?,
    ))
}

/// Dequantizes MLX tensors like `mx.dequantize`: `weight: [.., rows, cols * bits / 32]` U32,
/// `scales`, `biases: [.., rows, cols / group_size]` (same float dtype) -> `[.., rows, cols]`
/// in the dtype of `scales`, on `weight`'s device. Values as [`dequantize`].
///
/// Errors: as [`AffineQuantized::from_tensors`].
pub fn dequantize_tensor(
    weight: &Tensor,
    scales: &Tensor,
    biases: &Tensor,
    group_size: usize,
    bits: usize,
) -> Result<Tensor, QuantError> {
    let q = AffineQuantized::from_tensors(weight, scales, biases, group_size, bits)?;
    let mut shape = weight.dims().to_vec();
    let last = shape.len() - 1;
    shape[last] = q.cols;
    Tensor::from_vec(q.dequantize(), shape, weight.device())
        .and_then(|t| t.to_dtype(q.dtype().to_candle()))
        .map_err(candle_err("dequantized"))
}

/// Quantizes one group (`group.len()` = group size) into `out` (`group.len() * bits / 32`
/// words) and returns the unrounded f32 `(scale, bias)`. Mirrors MLX's CPU kernel, including
/// `std::max` / `std::min` operand order.
fn quantize_group(group: &[f32], bits: usize, out: &mut [u32]) -> (f32, f32) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let mut w_min = f32::INFINITY;
    let mut w_max = f32::NEG_INFINITY;
    for &v in group {
        if w_max < v {
            w_max = v;
        }
        if v < w_min {
            w_min = v;
        }
    }
    let mask = w_min.abs() > w_max.abs();
    let range = (w_max - w_min) / n_bins;
    let mut scale = if range < EPS { EPS } else { range };
    if !mask {
        scale = -scale;
    }
    let edge = if mask { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    let mut bias = 0f32;
    if q0 != 0.0 {
        scale = edge / q0;
        bias = edge;
    }
    let mut writer = BitWriter::new(bits, out);
    for &v in group {
        let mut q = ((v - bias) / scale).round_ties_even();
        if q < 0.0 {
            q = 0.0;
        }
        if n_bins < q {
            q = n_bins;
        }
        // `as` saturates and maps NaN to 0; q is finite and in [0, n_bins] for finite input.
        writer.push(q as u32);
    }
    (scale, bias)
}

/// Appends `bits`-bit codes to a little-endian word stream.
struct BitWriter<'a> {
    bits: usize,
    out: &'a mut [u32],
    next: usize,
    buf: u64,
    filled: usize,
}

impl<'a> BitWriter<'a> {
    fn new(bits: usize, out: &'a mut [u32]) -> Self {
        Self {
            bits,
            out,
            next: 0,
            buf: 0,
            filled: 0,
        }
    }

    #[inline]
    fn push(&mut self, code: u32) {
        self.buf |= u64::from(code) << self.filled;
        self.filled += self.bits;
        if self.filled >= 32 {
            if let Some(slot) = self.out.get_mut(self.next) {
                *slot = self.buf as u32;
            }
            self.next += 1;
            self.buf >>= 32;
            self.filled -= 32;
        }
    }
}

/// Unpacks `out.len()` codes (as f32) from the little-endian word stream `words`.
#[inline]
fn unpack_codes(bits: usize, words: &[u32], out: &mut [f32]) {
    match bits {
        2 => unpack_pow2::<2>(words, out),
        4 => unpack_pow2::<4>(words, out),
        8 => unpack_pow2::<8>(words, out),
        3 => unpack_stream::<3>(words, out),
        5 => unpack_stream::<5>(words, out),
        6 => unpack_stream::<6>(words, out),
        // Unreachable: bits is checked by every constructor.
        _ => out.fill(f32::NAN),
    }
}

/// Bit widths that divide 32: every word holds `32 / BITS` whole codes.
#[inline]
fn unpack_pow2<const BITS: usize>(words: &[u32], out: &mut [f32]) {
    let per_word = 32 / BITS;
    let mask = (1u32 << BITS) - 1;
    for (word, chunk) in words.iter().zip(out.chunks_exact_mut(per_word)) {
        for (k, o) in chunk.iter_mut().enumerate() {
            *o = ((word >> (k * BITS)) & mask) as f32;
        }
    }
}

/// Bit widths 3, 5, 6: codes straddle word boundaries; read through a 64-bit buffer.
#[inline]
fn unpack_stream<const BITS: usize>(words: &[u32], out: &mut [f32]) {
    let mask = (1u64 << BITS) - 1;
    let mut it = words.iter();
    let mut buf = 0u64;
    let mut have = 0usize;
    for o in out.iter_mut() {
        if have < BITS {
            buf |= u64::from(it.next().copied().unwrap_or(0)) << have;
            have += 32;
        }
        *o = (buf & mask) as f32;
        buf >>= BITS;
        have -= BITS;
    }
}

/// Dot product of equal-length slices with eight partial sums (vectorizes).
#[inline]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

pub(super) fn check_aligned(name: &str, cols: usize, group_size: usize) -> Result<(), QuantError> {
    if !cols.is_multiple_of(group_size) {
        return Err(QuantError::NotGroupAligned {
            name: name.into(),
            cols,
            group_size,
        });
    }
    Ok(())
}

pub(super) fn checked_len(name: &str, a: usize, b: usize) -> Result<usize, QuantError> {
    a.checked_mul(b).ok_or_else(|| QuantError::LengthMismatch {
        name: name.into(),
        expected: usize::MAX,
        got: 0,
        what: format!("{a} * {b} overflows usize"),
    })
}

pub(super) fn check_len(
    name: &str,
    got: usize,
    expected: usize,
    what: &str,
) -> Result<(), QuantError> {
    if got != expected {
        return Err(QuantError::LengthMismatch {
            name: name.into(),
            expected,
            got,
            what: what.into(),
        });
    }
    Ok(())
}

pub(super) fn unsupported_float_dtype(name: &str, got: DType) -> QuantError {
    QuantError::UnsupportedDtype {
        name: name.into(),
        got: format!("{got:?}"),
        expected: "F32, F16 or BF16".into(),
    }
}

pub(super) fn candle_err(name: &str) -> impl Fn(candle_core::Error) -> QuantError + '_ {
    move |error| QuantError::Candle {
        name: name.into(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values (xorshift64*), roughly uniform in [-1, 1).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
                2.0 * u - 1.0
            })
            .collect()
    }

    #[test]
    fn stacked_rows_compute_the_concatenated_product() {
        for dtype in [ParamDtype::F16, ParamDtype::BF16, ParamDtype::F32] {
            let (a, b) = (weight(3, 5, 128), weight(4, 7, 128));
            let qa = quantize(&a, 5, 128, 64, 4, dtype).unwrap();
            let qb = quantize(&b, 7, 128, 64, 4, dtype).unwrap();
            let s = AffineQuantized::stack_rows(&[qa.clone(), qb.clone()]).unwrap();
            assert_eq!((s.rows(), s.cols()), (12, 128));
            let x = values(9, 2 * 128);
            let (ya, yb, ys) = (
                qa.matmul(&x, 2).unwrap(),
                qb.matmul(&x, 2).unwrap(),
                s.matmul(&x, 2).unwrap(),
            );
            for m in 0..2 {
                assert_eq!(&ys[m * 12..m * 12 + 5], &ya[m * 5..m * 5 + 5]);
                assert_eq!(&ys[m * 12 + 5..m * 12 + 12], &yb[m * 7..m * 7 + 7]);
            }
            let q8 = quantize(&b, 7, 128, 64, 8, dtype).unwrap();
            assert!(AffineQuantized::stack_rows(&[qa, q8]).is_none());
        }
        assert!(AffineQuantized::stack_rows(&[]).is_none());
    }

    /// A weight with a mix of group shapes: symmetric, skewed, one-signed, constant, zero.
    fn weight(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
        let mut w = values(seed, rows * cols);
        for (r, row) in w.chunks_exact_mut(cols).enumerate() {
            match r % 5 {
                1 => row.iter_mut().for_each(|v| *v = *v * 0.3 + 0.5),
                2 => row.iter_mut().for_each(|v| *v = v.abs() * -2.0 - 0.1),
                3 => row[..32].iter_mut().for_each(|v| *v = 0.25),
                4 => row[..32].iter_mut().for_each(|v| *v = 0.0),
                _ => {}
            }
        }
        w
    }

    /// Codes of row `r` read back one by one from the bit stream (independent of the
    /// group-wise unpackers).
    fn codes(q: &AffineQuantized, r: usize) -> Vec<u32> {
        let pc = q.packed_cols();
        let words = &q.weight()[r * pc..(r + 1) * pc];
        (0..q.cols())
            .map(|c| {
                let mut v = 0u32;
                for b in 0..q.bits() {
                    let bit = c * q.bits() + b;
                    v |= ((words[bit / 32] >> (bit % 32)) & 1) << b;
                }
                v
            })
            .collect()
    }

    #[test]
    fn round_trip_error_bound() {
        // MLX moves the scale so that the extreme value `edge` decodes exactly; a value at
        // the other end can then need a code past n_bins and is clamped. Bound: every value
        // is within |scale| of its decoding, and within |scale| / 2 when its code is below
        // n_bins (not clamped). Plus f32 rounding of the two operations.
        let (rows, cols) = (10, 256);
        let w = weight(7, rows, cols);
        let mut clamped_beyond_half = 0;
        for bits in SUPPORTED_BITS {
            for gs in SUPPORTED_GROUP_SIZES {
                let q = quantize(&w, rows, cols, gs, bits, ParamDtype::F32).unwrap();
                let deq = q.dequantize();
                let n_bins = (1u32 << bits) - 1;
                for r in 0..rows {
                    let c = codes(&q, r);
                    for (col, &code) in c.iter().enumerate() {
                        let g = r * q.groups_per_row() + col / gs;
                        let s = q.scales().get(g).unwrap().abs();
                        let b = q.biases().get(g).unwrap().abs();
                        let i = r * cols + col;
                        let err = (w[i] - deq[i]).abs();
                        let round = 4.0 * f32::EPSILON * (w[i].abs() + b + s * n_bins as f32);
                        assert!(
                            err <= s + round,
                            "bits {bits} gs {gs} row {r} col {col}: err {err} > scale {s}"
                        );
                        if code < n_bins {
                            assert!(
                                err <= 0.5 * s + round,
                                "bits {bits} gs {gs} row {r} col {col}: err {err} > scale/2 {s}"
                            );
                        } else if err > 0.5 * s + round {
                            clamped_beyond_half += 1;
                        }
                    }
                }
            }
        }
        // The clamped case does occur on these inputs (so the looser bound is needed).
        assert!(clamped_beyond_half > 0);
    }

    #[test]
    fn round_trip_half_precision_params() {
        // With f16 / bf16 parameters the codes are computed with the f32 scale, then scale
        // and bias are rounded: the error grows by n_bins * |Δscale| + |Δbias|.
        let (rows, cols) = (5, 128);
        let w = weight(11, rows, cols);
        for (dtype, unit) in [
            (ParamDtype::F16, 2f32.powi(-11)),
            (ParamDtype::BF16, 2f32.powi(-8)),
        ] {
            for bits in [4, 8] {
                let q = quantize(&w, rows, cols, 32, bits, dtype).unwrap();
                let deq = q.dequantize();
                let n_bins = ((1u32 << bits) - 1) as f32;
                for (i, (a, d)) in w.iter().zip(&deq).enumerate() {
                    let g = i / 32;
                    let s = q.scales().get(g).unwrap().abs();
                    let b = q.biases().get(g).unwrap().abs();
                    let bound = s + unit * (n_bins * s + b + a.abs()) * 2.0 + 1e-6;
                    assert!((a - d).abs() <= bound, "{dtype:?} bits {bits} i {i}");
                }
            }
        }
    }

    #[test]
    fn constant_and_zero_groups() {
        let mut w = vec![0.0f32; 64];
        w[32..].iter_mut().for_each(|v| *v = -1.75);
        let q = quantize(&w, 1, 64, 32, 4, ParamDtype::F32).unwrap();
        // all-zero group: q0 == 0, scale = -eps, bias = 0
        assert_eq!(q.scales().get(0), Some(-EPS));
        assert_eq!(q.biases().get(0), Some(0.0));
        // constant group: bias is the value, codes 0, decodes exactly
        assert_eq!(q.biases().get(1), Some(-1.75));
        assert!(codes(&q, 0).iter().all(|&c| c == 0));
        assert_eq!(q.dequantize(), w);
    }

    #[test]
    fn packing_matches_bit_stream_and_unpackers() {
        let (rows, cols) = (3, 128);
        let w = weight(3, rows, cols);
        for bits in SUPPORTED_BITS {
            let q = quantize(&w, rows, cols, 32, bits, ParamDtype::F32).unwrap();
            assert_eq!(q.weight().len(), rows * cols * bits / 32);
            for r in 0..rows {
                let expect: Vec<f32> = codes(&q, r).iter().map(|&c| c as f32).collect();
                let pc = q.packed_cols();
                let mut got = vec![0f32; cols];
                unpack_codes(bits, &q.weight()[r * pc..(r + 1) * pc], &mut got);
                assert_eq!(got, expect, "bits {bits} row {r}");
                assert!(expect.iter().all(|&c| c <= ((1u32 << bits) - 1) as f32));
            }
        }
    }

    /// Naive reference: full dequantization, then an f64 triple loop.
    fn naive_matmul(x: &[f32], m: usize, q: &AffineQuantized) -> Vec<f64> {
        let (n, k) = (q.rows(), q.cols());
        let w = q.dequantize();
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn matmul_matches_naive_on_many_shapes() {
        let mut cases = 0;
        for bits in SUPPORTED_BITS {
            for gs in SUPPORTED_GROUP_SIZES {
                for (n, groups, m) in [(1, 1, 1), (3, 2, 2), (5, 3, 1), (9, 1, 4), (17, 2, 3)] {
                    let k = gs * groups;
                    let w = weight((bits * 1000 + gs + n) as u64, n, k);
                    let x = values((m * 31 + k) as u64, m * k);
                    let q = quantize(&w, n, k, gs, bits, ParamDtype::F32).unwrap();
                    let y = q.matmul(&x, m).unwrap();
                    let reference = naive_matmul(&x, m, &q);
                    let wd = q.dequantize();
                    assert_eq!(y.len(), m * n);
                    for i in 0..m {
                        for j in 0..n {
                            let mag: f64 = (0..k)
                                .map(|l| (x[i * k + l] as f64 * wd[j * k + l] as f64).abs())
                                .sum();
                            let tol = k as f64 * f32::EPSILON as f64 * mag + 1e-30;
                            let d = (y[i * n + j] as f64 - reference[i * n + j]).abs();
                            assert!(
                                d <= tol,
                                "bits {bits} gs {gs} n {n} k {k} m {m}: {d} > {tol}"
                            );
                        }
                    }
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 6 * 3 * 5);
    }

    #[test]
    fn matmul_empty_and_bad_x() {
        let w = weight(1, 2, 64);
        let q = quantize(&w, 2, 64, 64, 4, ParamDtype::F32).unwrap();
        assert!(q.matmul(&[], 0).unwrap().is_empty());
        let err = q.matmul(&[0.0; 63], 1).unwrap_err();
        assert!(
            matches!(err, QuantError::LengthMismatch { ref name, expected: 64, got: 63, .. } if name == "x")
        );
    }

    #[test]
    fn argument_validation() {
        let w = vec![0.5f32; 2 * 64];
        let err = quantize(&w, 2, 64, 64, 7, ParamDtype::F32).unwrap_err();
        assert!(matches!(err, QuantError::UnsupportedBits { bits: 7 }));
        assert!(err.to_string().contains("bits = 7"));
        let err = quantize(&w, 2, 64, 16, 4, ParamDtype::F32).unwrap_err();
        assert!(matches!(
            err,
            QuantError::UnsupportedGroupSize { group_size: 16 }
        ));
        let w96 = vec![0.5f32; 96];
        let err = quantize(&w96, 1, 96, 64, 4, ParamDtype::F32).unwrap_err();
        assert!(matches!(
            err,
            QuantError::NotGroupAligned {
                cols: 96,
                group_size: 64,
                ..
            }
        ));
        let err = quantize(&w, 3, 64, 64, 4, ParamDtype::F32).unwrap_err();
        assert!(matches!(
            err,
            QuantError::LengthMismatch {
                expected: 192,
                got: 128,
                ..
            }
        ));
        let mut bad = w.clone();
        bad[70] = f32::NAN;
        let err = quantize(&bad, 2, 64, 64, 4, ParamDtype::F32).unwrap_err();
        assert!(matches!(err, QuantError::NonFinite { row: 1, col: 6, .. }));

        // from_parts: packed shape consistent with rows, cols, bits; matching dtypes
        let q = quantize(&w, 2, 64, 32, 3, ParamDtype::F16).unwrap();
        let (wq, s, b) = (q.weight().to_vec(), q.scales().clone(), q.biases().clone());
        let err = AffineQuantized::from_parts(wq[1..].to_vec(), s.clone(), b.clone(), 2, 64, 32, 3)
            .unwrap_err();
        assert!(
            matches!(err, QuantError::LengthMismatch { ref name, expected: 12, got: 11, .. } if name == "weight")
        );
        let err = AffineQuantized::from_parts(wq.clone(), s.clone(), b.clone(), 2, 64, 64, 3)
            .unwrap_err();
        assert!(
            matches!(err, QuantError::LengthMismatch { ref name, expected: 2, got: 4, .. } if name == "scales")
        );
        let b32 = GroupParams::F32(b.to_f32_vec());
        let err =
            AffineQuantized::from_parts(wq.clone(), s.clone(), b32, 2, 64, 32, 3).unwrap_err();
        assert!(matches!(err, QuantError::UnsupportedDtype { ref name, .. } if name == "biases"));
        let back = AffineQuantized::from_parts(wq, s, b, 2, 64, 32, 3).unwrap();
        assert_eq!(back, q);

        let mut row = vec![0f32; 64];
        assert!(matches!(
            q.dequantize_row(2, &mut row),
            Err(QuantError::RowOutOfRange { row: 2, rows: 2 })
        ));
        assert!(matches!(
            q.dequantize_row(0, &mut row[..10]),
            Err(QuantError::LengthMismatch { .. })
        ));
        q.dequantize_row(1, &mut row).unwrap();
        assert_eq!(row, q.dequantize()[64..]);
    }

    #[test]
    fn tensor_wrappers_round_trip_and_validate() -> Result<(), Box<dyn std::error::Error>> {
        let dev = Device::Cpu;
        // [2, 3, 64]: leading dimensions are flattened into rows
        let w = weight(5, 6, 64);
        let t = Tensor::from_slice(&w, (2, 3, 64), &dev)?.to_dtype(DType::BF16)?;
        let (wq, s, b) = quantize_tensor(&t, 32, 6)?;
        assert_eq!(wq.dims(), &[2, 3, 12]);
        assert_eq!(wq.dtype(), DType::U32);
        assert_eq!(s.dims(), &[2, 3, 2]);
        assert_eq!(s.dtype(), DType::BF16);
        assert_eq!(b.dtype(), DType::BF16);
        let d = dequantize_tensor(&wq, &s, &b, 32, 6)?;
        assert_eq!(d.dims(), &[2, 3, 64]);
        assert_eq!(d.dtype(), DType::BF16);
        // same numbers as the slice API on the bf16 values
        let wb: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let q = quantize(&wb, 6, 64, 32, 6, ParamDtype::BF16)?;
        assert_eq!(wq.flatten_all()?.to_vec1::<u32>()?, q.weight());
        let dv: Vec<f32> = d.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        assert_eq!(dv, q.dequantize());

        // errors
        let e = quantize_tensor(&Tensor::zeros(64, DType::F32, &dev)?, 32, 4).unwrap_err();
        assert!(matches!(e, QuantError::RankTooLow { rank: 1, .. }));
        let e = quantize_tensor(&Tensor::zeros((2, 64), DType::U32, &dev)?, 32, 4).unwrap_err();
        assert!(matches!(e, QuantError::UnsupportedDtype { .. }));
        let e = dequantize_tensor(&s, &s, &b, 32, 6).unwrap_err();
        assert!(matches!(e, QuantError::UnsupportedDtype { ref name, .. } if name == "weight"));
        // bits that do not match the packed width
        let e = dequantize_tensor(&wq, &s, &b, 32, 4).unwrap_err();
        assert!(
            matches!(e, QuantError::ShapeMismatch { ref name, .. } if name == "scales"),
            "{e}"
        );
        let e = dequantize_tensor(&wq, &s, &b.narrow(2, 0, 1)?, 32, 6).unwrap_err();
        assert!(matches!(e, QuantError::ShapeMismatch { ref name, .. } if name == "biases"));
        let e = dequantize_tensor(&wq, &s, &b.to_dtype(DType::F32)?, 32, 6).unwrap_err();
        assert!(matches!(e, QuantError::UnsupportedDtype { ref name, .. } if name == "biases"));
        Ok(())
    }
}
