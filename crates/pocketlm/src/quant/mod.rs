//! Quantization formats.
//!
//! - [`mlx_affine`]: MLX affine group quantization (`mx.quantize` / `mx.dequantize` /
//!   `mx.quantized_matmul` in `"affine"` mode), the format of mlx-community checkpoints.
//! - [`hadamard`]: the orthonormal Walsh–Hadamard rotation applied before quantizing KV caches.

pub mod hadamard;
pub mod mlx_affine;

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
