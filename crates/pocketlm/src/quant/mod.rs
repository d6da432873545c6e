//! Quantization formats.
//!
//! - [`mlx_affine`]: MLX affine group quantization (`mx.quantize` / `mx.dequantize` /
//!   `mx.quantized_matmul` in `"affine"` mode), the format of mlx-community checkpoints.
//! - [`mlx_fp`]: MLX's float modes `mxfp4`, `mxfp8` and `nvfp4` (`mx.quantize(w, mode=...)`).
//! - [`hadamard`]: the orthonormal Walsh–Hadamard rotation applied before quantizing KV caches.

pub mod hadamard;
pub mod mlx_affine;
pub mod mlx_fp;

use mlx_fp::FpMode;

/// An MLX quantization mode (`mode` of `mx.quantize` and of config.json's `quantization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QuantMode {
    /// `"affine"`: [`mlx_affine`], scales and biases in the weight's dtype (the default).
    #[default]
    Affine,
    /// `"mxfp4"`, `"mxfp8"` or `"nvfp4"`: [`mlx_fp`], uint8 scales, no biases.
    Fp(FpMode),
}

impl QuantMode {
    /// The name mlx uses: `"affine"`, `"mxfp4"`, `"mxfp8"`, `"nvfp4"`.
    pub fn name(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Fp(m) => m.name(),
        }
    }

    /// `(group_size, bits)` mlx-lm uses when none are given (`quantize_model`'s
    /// `defaults_for_mode`): affine (64, 4), mxfp4 (32, 4), mxfp8 (32, 8), nvfp4 (16, 4).
    pub fn default_params(self) -> (usize, usize) {
        match self {
            QuantMode::Affine => (64, 4),
            QuantMode::Fp(m) => (m.group_size(), m.bits()),
        }
    }

    /// Checks `group_size` and `bits` against what the mode allows.
    ///
    /// Errors: as [`mlx_affine::check_params`] and [`FpMode::check`].
    pub fn check(self, group_size: usize, bits: usize) -> Result<(), QuantError> {
        match self {
            QuantMode::Affine => mlx_affine::check_params(group_size, bits),
            QuantMode::Fp(m) => m.check(group_size, bits),
        }
    }
}

impl std::str::FromStr for QuantMode {
    type Err = QuantError;

    /// `affine`, `mxfp4`, `mxfp8` or `nvfp4`.
    ///
    /// Errors: [`QuantError::Other`] listing the names.
    fn from_str(s: &str) -> Result<Self, QuantError> {
        if s == "affine" {
            return Ok(QuantMode::Affine);
        }
        FpMode::from_name(s).map(QuantMode::Fp).ok_or_else(|| {
            QuantError::Other(format!(
                "unknown quantization mode `{s}` (expected affine, mxfp4, mxfp8 or nvfp4)"
            ))
        })
    }
}

impl std::fmt::Display for QuantMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors from quantization routines. Messages name the argument or tensor that is wrong
/// (`w`, `x`, `weight`, `scales`, `biases`); callers that know the checkpoint's tensor name
/// wrap the error with it.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// Any quantization failure, with context.
    #[error("quantization: {0}")]
    Other(String),
    /// A bit width the format does not define.
    #[error("unsupported bits = {bits}; MLX affine quantization supports 2, 3, 4, 5, 6 and 8")]
    UnsupportedBits {
        /// The bit width requested.
        bits: usize,
    },
    /// A group size the format does not define.
    #[error(
        "unsupported group_size = {group_size}; MLX affine quantization supports 32, 64 and 128"
    )]
    UnsupportedGroupSize {
        /// The group size requested.
        group_size: usize,
    },
    /// A group size or bit width the float mode does not allow (each allows one pair).
    #[error(
        "{mode} quantization needs group_size {expected_group_size} and bits {expected_bits}, \
         got group_size {group_size} and bits {bits}"
    )]
    UnsupportedModeParams {
        /// The mode's name.
        mode: &'static str,
        /// The group size requested.
        group_size: usize,
        /// The bits requested.
        bits: usize,
        /// The mode's group size.
        expected_group_size: usize,
        /// The mode's bits.
        expected_bits: usize,
    },
    /// The last (input) dimension is not a whole number of groups.
    #[error("`{name}`: the last dimension {cols} is not a multiple of group_size {group_size}")]
    NotGroupAligned {
        /// Which argument.
        name: String,
        /// The last dimension.
        cols: usize,
        /// The group size.
        group_size: usize,
    },
    /// A buffer does not hold the number of elements its shape needs.
    #[error("`{name}` has {got} elements but {expected} are needed ({what})")]
    LengthMismatch {
        /// Which argument.
        name: String,
        /// Elements needed.
        expected: usize,
        /// Elements given.
        got: usize,
        /// The shape the count comes from, in words.
        what: String,
    },
    /// A tensor's shape does not fit the others or the quantization parameters.
    #[error("`{name}` has shape {got:?} but {expected:?} was expected ({what})")]
    ShapeMismatch {
        /// Which tensor.
        name: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
        /// Why that shape is expected.
        what: String,
    },
    /// A tensor has a dtype the format does not allow there.
    #[error("`{name}` has dtype {got}; expected {expected}")]
    UnsupportedDtype {
        /// Which tensor.
        name: String,
        /// The dtype found.
        got: String,
        /// The dtypes allowed.
        expected: String,
    },
    /// The input to quantize holds NaN or an infinity.
    #[error("`{name}` holds a non-finite value {value} at row {row}, column {col}")]
    NonFinite {
        /// Which argument.
        name: String,
        /// Row (flattened leading dimensions).
        row: usize,
        /// Column (last dimension).
        col: usize,
        /// The value.
        value: f32,
    },
    /// A tensor has fewer dimensions than the format needs.
    #[error("`{name}` has rank {rank}; MLX affine quantization needs at least 2 dimensions")]
    RankTooLow {
        /// Which tensor.
        name: String,
        /// Its rank.
        rank: usize,
    },
    /// A row index past the end of the matrix.
    #[error("row {row} is out of range for a quantized matrix of {rows} rows")]
    RowOutOfRange {
        /// The index asked for.
        row: usize,
        /// The number of rows.
        rows: usize,
    },
    /// A tensor-library error while converting `name` at the API edge.
    #[error("`{name}`: {}", crate::candle_errors::candle_message(error))]
    Candle {
        /// Which tensor.
        name: String,
        /// The underlying error (shown on one line, without a backtrace).
        error: candle_core::Error,
    },
}
