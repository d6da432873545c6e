//! CPU matrix products over GGUF block-quantized weights, as llama.cpp's CPU backend does them.
//!
//! `y[m, n] = x[m, k] · W[n, k]ᵀ` where `W` stays in its GGUF byte layout (ggml blocks, see
//! ggml's `ggml-common.h`) and `x` is `f32`. Like `ggml_compute_forward_mul_mat`, each call
//! first quantizes the activation rows once, to 8-bit blocks matching the weight's block size
//! (32 values with a scale for `Q4_0`, `Q4_1`, `Q5_0`, `Q8_0`, `IQ4_NL`; 256 values plus 16-value
//! sums for the k-quants `Q4_K`, `Q5_K`, `Q6_K` and for `IQ4_XS`), then takes integer dot
//! products block by block and applies the float scales once per block.
//!
//! - [`GgufMatrix`]: a weight `[rows = n, cols = k]` holding the raw GGUF bytes without copying
//!   them ([`WeightBytes`]: a range of a memory-mapped file, or an owned buffer), with
//!   [`GgufMatrix::matmul`] (slices), [`GgufMatrix::forward`] (candle tensors) and
//!   [`GgufMatrix::embedding`] (dequantizes only the rows asked for).
//! - [`matmul_fused`] / [`forward_fused`]: several matrices sharing one input (q/k/v,
//!   gate/up) with one activation quantization and one parallel pass.
//! - [`Backend`]: the instruction set used, chosen at run time ([`Backend::detect`]): AVX2, FMA
//!   and F16C on x86-64 (with AVX512-VNNI's `vpdpbusd` where the CPU has it), NEON on aarch64
//!   (with the `dotprod` extension's `sdot` where the CPU has it), and a portable scalar
//!   fallback. All compute the same integers; results differ only by
//!   float summation order.
//!
//! Float order: within a block the integer sums are exact; the float scales are applied as
//! ggml's AVX2 `ggml_vec_dot_*` kernels apply them, except for `Q4_K`, which llama.cpp's CPU
//! backend repacks on x86-64 (AVX2) and on aarch64 with i8mm (`ggml_gemv_q4_K_8x8_q8_K` /
//! `ggml_gemm_q4_K_8x8_q8_K`): there each super-block's scaled integer sum `Σ_s sc_s·Σ q·y` and
//! min sum `Σ_s m_s·bsum_s` are accumulated by one fused multiply-add each with `d·dy` and
//! `dmin·dy`, and the result is `acc - acc_min`; its GEMM, which takes the activation rows in
//! groups of 4 (all but the last `m % 4` rows of a product, see [`q4k_gemm_row`]), does the
//! same once per pair of sub-blocks (64 values) instead of once per super-block. Following that
//! order is what lets a GGUF with `Q4_K` tensors (Gemma 3's Q4_K_M) reproduce llama.cpp's
//! logits bit for bit. `Q6_K` products of 8 or more activation rows go through ggml-cpu's
//! tiled K-quant matmul (`tiled/tiled-kernel.cpp`, see [`q6k_tiled`]): per super-block the
//! exact integer `Σ_s sc_s·(Σ q·y - 32·bsum_s)` is converted to `f32`, multiplied by `d`, and
//! accumulated with one fused multiply-add by `dy`; fewer rows use the eight-lane order of
//! `ggml_vec_dot_q6_K_q8_K`. `Q5_K`, which ggml-cpu repacks only on aarch64, follows its x86-64
//! path the same way: the tiled matmul for 8 or more rows ([`q5k_tiled`]), else the eight-lane
//! order of `ggml_vec_dot_q5_K_q8_K` in the unpacked x86 kernels. The portable kernels keep one
//! float sum where ggml's AVX2 ones keep eight lanes; the NEON kernels do the portable kernels'
//! float operations in their order, so their results equal the portable ones bit for bit.
//!
//! Threads: work is split with rayon over tiles of output rows (and, for prefill, of
//! activation rows, so that each weight tile is read from L1 once per group of 4 activation
//! rows); small products stay on the calling thread. Rayon's workers sleep when idle. Each
//! call made from outside the pool pays a hand-off to the pool and back (thread wake-ups,
//! measured by `benches/gguf_kernels.rs`); a forward pass run inside the pool ([`in_pool`],
//! as the generation loop does) avoids it, and keeps the other workers polling for work
//! until it ends instead of sleeping between products.

mod act;
#[cfg(target_arch = "x86_64")]
mod attn_exact;
#[cfg(target_arch = "x86_64")]
mod attn_tiled;
pub mod float;
pub mod mlx;
mod mlx_packed;
mod packed;
mod packed_iq4xs;
mod packed_q4k;
mod packed_q5k;
mod packed_q6k;
mod scalar;

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod mlx_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Storage, Tensor};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::quant::mlx_affine::ParamDtype;

pub(crate) use act::{quantize_acts, ActFormat, Acts};
pub use mlx_packed::PackedMlx;

/// The GGUF (ggml) block types that have kernels here.
///
/// Block layouts (little-endian, `f16` = IEEE half), from ggml's `ggml-common.h`:
/// - `Q4_0`: 32 values in 18 bytes: `d: f16, qs: [u8; 16]`; value `j` is `d * (q_j - 8)`, with
///   `q_j = qs[j] & 0xF` for `j < 16` and `qs[j - 16] >> 4` otherwise.
/// - `Q4_1`: 32 values in 20 bytes: `d: f16, m: f16, qs: [u8; 16]`; value `d * q_j + m`.
/// - `Q5_0`: 32 values in 22 bytes: `d: f16, qh: [u8; 4], qs: [u8; 16]`; value `d * (q_j - 16)`
///   with the 4-bit `q_j` of `Q4_0` plus bit `j` of `qh` (little-endian `u32`) as bit 4.
/// - `Q8_0`: 32 values in 34 bytes: `d: f16, qs: [i8; 32]`; value `d * qs[j]`.
/// - `Q4_K`: 256 values in 144 bytes: `d: f16, dmin: f16, scales: [u8; 12]` (eight 6-bit
///   scale/min pairs), `qs: [u8; 128]`; value `d * sc_s * q - dmin * m_s` per 32-value sub-block.
/// - `Q5_K`: 256 values in 176 bytes: `d: f16, dmin: f16, scales: [u8; 12]` (as `Q4_K`),
///   `qh: [u8; 32], qs: [u8; 128]`; value `d * sc_s * q - dmin * m_s` with the 4-bit `q` of
///   `Q4_K` plus bit 4 from `qh`: value `64c + l` (`l < 32`) takes bit `2c` of `qh[l]`, value
///   `64c + 32 + l` bit `2c + 1` (ggml's `dequantize_row_q5_K`).
/// - `Q6_K`: 256 values in 210 bytes: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`;
///   value `d * scales[s] * (q - 32)` with 6-bit `q` per 16-value sub-block.
/// - `IQ4_NL`: 32 values in 18 bytes: `d: f16, qs: [u8; 16]`, the nibbles `q_j` in `Q4_0`'s
///   order; value `d * KVALUES_IQ4NL[q_j]` (ggml `block_iq4_nl`, `dequantize_row_iq4_nl`).
/// - `IQ4_XS`: 256 values in 136 bytes: `d: f16, scales_h: u16, scales_l: [u8; 4], qs: [u8;
///   128]`; sub-block `s` (32 values, nibbles in `Q4_0`'s order within its 16 bytes
///   `qs[16s..16s + 16]`) has the 6-bit scale `ls_s = (scales_l[s / 2] >> 4·(s % 2)) & 0xF |
///   ((scales_h >> 2s) & 3) << 4`; value `d * (ls_s - 32) * KVALUES_IQ4NL[q]` (ggml
///   `block_iq4_xs`, `dequantize_row_iq4_xs`).
///
/// candle's `GgmlDType` has no IQ4 types: [`GgufType::from_ggml`] never returns them and
/// [`GgufType::to_ggml`] returns `None` for them; GGUF files holding them are read by
/// [`crate::gguf::GgufFile`] itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufType {
    /// 4-bit, one scale per 32 values.
    Q4_0,
    /// 4-bit, scale and minimum per 32 values.
    Q4_1,
    /// 5-bit, one scale per 32 values.
    Q5_0,
    /// 8-bit, one scale per 32 values.
    Q8_0,
    /// 4-bit k-quant, 256-value super-blocks.
    Q4K,
    /// 5-bit k-quant, 256-value super-blocks (`Q4K` plus one high bit per value).
    Q5K,
    /// 6-bit k-quant, 256-value super-blocks.
    Q6K,
    /// 4-bit non-linear (a 16-entry table), one scale per 32 values (ggml type 20).
    Iq4Nl,
    /// 4-bit non-linear, 256-value super-blocks with 6-bit sub-block scales (ggml type 23).
    Iq4Xs,
}

/// The 16 values of the `IQ4_NL` / `IQ4_XS` codes (ggml `kvalues_iq4nl`, `ggml-common.h`).
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

impl GgufType {
    /// Values per block (32, or 256 for k-quants and `IQ4_XS`).
    pub const fn block_size(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q8_0 | Self::Iq4Nl => 32,
            Self::Q4K | Self::Q5K | Self::Q6K | Self::Iq4Xs => 256,
        }
    }

    /// Bytes per block (18, 20, 22, 34, 144, 176, 210, 18, 136).
    pub const fn type_size(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Iq4Nl => 18,
            Self::Iq4Xs => 136,
        }
    }

    /// The type for a candle/ggml dtype, or `None` when there is no kernel for it here.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q5K => Some(Self::Q5K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    /// The candle/ggml dtype; `None` for the types candle does not have (`IQ4_NL`, `IQ4_XS`).
    pub fn to_ggml(self) -> Option<GgmlDType> {
        match self {
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::Q4_1 => Some(GgmlDType::Q4_1),
            Self::Q5_0 => Some(GgmlDType::Q5_0),
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4K => Some(GgmlDType::Q4K),
            Self::Q5K => Some(GgmlDType::Q5K),
            Self::Q6K => Some(GgmlDType::Q6K),
            Self::Iq4Nl | Self::Iq4Xs => None,
        }
    }

    /// ggml's name of the type (`Q4_0`, ..., `Q6_K`, `IQ4_NL`, `IQ4_XS`).
    pub const fn ggml_name(self) -> &'static str {
        match self {
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Iq4Nl => "IQ4_NL",
            Self::Iq4Xs => "IQ4_XS",
        }
    }

    /// How activations are quantized for this weight type: 32-value blocks (ggml's `Q8_0`,
    /// with the block sum of `Q8_1` kept as well) or 256-value `Q8_K` blocks (as ggml pairs
    /// `IQ4_NL` with `Q8_0` and `IQ4_XS` with `Q8_K`).
    pub(crate) fn act_format(self) -> ActFormat {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q8_0 | Self::Iq4Nl => ActFormat::Q8_32,
            Self::Q4K | Self::Q5K | Self::Q6K | Self::Iq4Xs => ActFormat::Q8K,
        }
    }
}

/// The instruction set a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C (checked at run time).
    Avx2,
    /// [`Backend::Avx2`] plus AVX512-VNNI and AVX512VL: the 8-bit dot products of `Q4_0`,
    /// `Q4_1` and `Q8_0` use `vpdpbusd` on 256-bit registers (as ggml does when built with
    /// `GGML_AVX512_VNNI`). Same integers, same float operations as `Avx2`.
    Avx512Vnni,
    /// [`Backend::Avx2`] plus AVX-VNNI (the VEX encoding of `vpdpbusd`, on CPUs without
    /// AVX-512: Intel Alder Lake and later client cores, Sierra Forest): the same kernels as
    /// [`Backend::Avx512Vnni`] (as ggml does when built with `GGML_AVX_VNNI`). Same integers,
    /// same float operations as `Avx2`.
    AvxVnni,
    /// aarch64 Advanced SIMD (baseline on every aarch64 CPU).
    Neon,
    /// [`Backend::Neon`] plus the `dotprod` extension (Armv8.2-A, checked at run time): the
    /// 8-bit dot products use `sdot` instead of `smull` + `sadalp` (as ggml does when built
    /// with `__ARM_FEATURE_DOTPROD`). Same integers, same float operations as `Neon`, so the
    /// same results bit for bit.
    NeonDotprod,
}

impl Backend {
    /// Every backend, in declaration order (`Scalar` first).
    pub const ALL: [Backend; 6] = [
        Self::Scalar,
        Self::Avx2,
        Self::Avx512Vnni,
        Self::AvxVnni,
        Self::Neon,
        Self::NeonDotprod,
    ];

    /// The backends this CPU can run ([`Self::is_available`]), in the order of [`Self::ALL`]:
    /// what the kernel tests compare with the scalar reference and the kernel benches time.
    pub fn available() -> Vec<Backend> {
        Self::ALL.into_iter().filter(|b| b.is_available()).collect()
    }

    /// The fastest backend this CPU supports (detected once, then cached).
    pub fn detect() -> Self {
        static DETECTED: OnceLock<Backend> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            [
                Self::Avx512Vnni,
                Self::AvxVnni,
                Self::Avx2,
                Self::NeonDotprod,
                Self::Neon,
            ]
            .into_iter()
            .find(|b| b.is_available())
            .unwrap_or(Self::Scalar)
        })
    }

    /// Whether this CPU can run the backend.
    pub fn is_available(self) -> bool {
        match self {
            Self::Scalar => true,
            Self::Avx2 => {
                #[cfg(target_arch = "x86_64")]
                {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    false
                }
            }
            Self::Avx512Vnni => {
                #[cfg(target_arch = "x86_64")]
                {
                    Self::Avx2.is_available()
                        && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512vnni")
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    false
                }
            }
            Self::AvxVnni => {
                #[cfg(target_arch = "x86_64")]
                {
                    Self::Avx2.is_available() && is_x86_feature_detected!("avxvnni")
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    false
                }
            }
            Self::Neon => cfg!(target_arch = "aarch64"),
            Self::NeonDotprod => {
                #[cfg(target_arch = "aarch64")]
                {
                    std::arch::is_aarch64_feature_detected!("dotprod")
                }
                #[cfg(not(target_arch = "aarch64"))]
                {
                    false
                }
            }
        }
    }
}

/// Errors from the kernels. Each names the tensor concerned (the name given to
/// [`GgufMatrix::new`], or `<unnamed>`).
#[derive(Debug)]
pub enum KernelError {
    /// A tensor type that has no kernel here.
    UnsupportedType {
        /// Tensor name.
        name: String,
        /// The type found (e.g. `Q2K`, `F16`).
        dtype: String,
    },
    /// The column count (`k`) is not a whole number of blocks.
    NotBlockAligned {
        /// Tensor name.
        name: String,
        /// The weight type.
        dtype: GgufType,
        /// Columns of the matrix.
        cols: usize,
    },
    /// The weight bytes do not hold exactly `rows * cols / block_size` blocks.
    ByteLength {
        /// Tensor name.
        name: String,
        /// The weight type.
        dtype: GgufType,
        /// Rows (`n`).
        rows: usize,
        /// Columns (`k`).
        cols: usize,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// A byte range that is not inside the memory-mapped file.
    OutOfFile {
        /// Tensor name.
        name: String,
        /// Start of the range (bytes from the start of the file).
        start: usize,
        /// Length of the range.
        len: usize,
        /// Length of the mapping.
        file_len: usize,
    },
    /// A tensor that is not a 2-D matrix.
    NotAMatrix {
        /// Tensor name.
        name: String,
        /// Its dims, outermost first.
        dims: Vec<usize>,
    },
    /// A tensor name that the GGUF file does not hold.
    Missing {
        /// Tensor name.
        name: String,
    },
    /// An argument slice of the wrong length.
    ArgLength {
        /// Tensor name.
        name: String,
        /// Which argument (`x`, `out`, ...).
        arg: &'static str,
        /// Elements needed.
        expected: usize,
        /// Elements given.
        got: usize,
        /// Where the expected count comes from.
        what: String,
    },
    /// An input tensor of the wrong dtype, device or shape.
    Input {
        /// Tensor name (of the weight).
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A token id at or past the number of rows.
    IdOutOfRange {
        /// Tensor name.
        name: String,
        /// The id.
        id: u32,
        /// Rows of the matrix.
        rows: usize,
    },
    /// The requested backend cannot run on this CPU.
    BackendUnavailable {
        /// Tensor name.
        name: String,
        /// The backend asked for.
        backend: Backend,
    },
}

impl KernelError {
    /// The name of the tensor the error is about.
    pub fn tensor_name(&self) -> &str {
        match self {
            Self::UnsupportedType { name, .. }
            | Self::NotBlockAligned { name, .. }
            | Self::ByteLength { name, .. }
            | Self::OutOfFile { name, .. }
            | Self::NotAMatrix { name, .. }
            | Self::Missing { name }
            | Self::ArgLength { name, .. }
            | Self::Input { name, .. }
            | Self::IdOutOfRange { name, .. }
            | Self::BackendUnavailable { name, .. } => name,
        }
    }

    /// The message without the tensor name.
    pub fn detail(&self) -> String {
        match self {
            Self::UnsupportedType { dtype, .. } => format!(
                "type {dtype} has no quantized matmul kernel (supported: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)"
            ),
            Self::NotBlockAligned { dtype, cols, .. } => format!(
                "{cols} columns is not a multiple of the {dtype:?} block size {}",
                dtype.block_size()
            ),
            Self::ByteLength {
                dtype,
                rows,
                cols,
                expected,
                got,
                ..
            } => format!(
                "has {got} bytes of {dtype:?} data but shape [{rows}, {cols}] needs {expected}"
            ),
            Self::OutOfFile {
                start,
                len,
                file_len,
                ..
            } => format!(
                "bytes {start}..{} lie outside the {file_len}-byte file (truncated file?)",
                start.saturating_add(*len)
            ),
            Self::NotAMatrix { dims, .. } => format!("has dims {dims:?}, expected a 2-D matrix"),
            Self::Missing { .. } => "is not in the GGUF file".to_string(),
            Self::ArgLength {
                arg,
                expected,
                got,
                what,
                ..
            } => format!("`{arg}` has {got} elements, expected {expected} ({what})"),
            Self::Input { msg, .. } => msg.clone(),
            Self::IdOutOfRange { id, rows, .. } => {
                format!("token id {id} is out of range (the matrix has {rows} rows)")
            }
            Self::BackendUnavailable { backend, .. } => {
                format!("backend {backend:?} is not available on this CPU")
            }
        }
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tensor `{}`: {}", self.tensor_name(), self.detail())
    }
}

impl std::error::Error for KernelError {}

impl From<KernelError> for crate::Error {
    fn from(e: KernelError) -> Self {
        crate::Error::tensor(e.tensor_name(), e.detail())
    }
}

/// The bytes of a GGUF weight: a range of a memory-mapped file (zero-copy) or an owned buffer.
#[derive(Clone)]
pub struct WeightBytes(Repr);

#[derive(Clone)]
enum Repr {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Vec<u8>),
}

impl WeightBytes {
    /// An owned buffer.
    pub fn owned(bytes: Vec<u8>) -> Self {
        Self(Repr::Owned(bytes))
    }

    /// `len` bytes of a mapped file starting at byte `start`; nothing is copied.
    ///
    /// Errors: [`KernelError::OutOfFile`] (naming `name`) when the range is not inside the map.
    pub fn mapped(
        name: &str,
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    ) -> Result<Self, KernelError> {
        match start.checked_add(len) {
            Some(end) if end <= map.len() => Ok(Self(Repr::Mapped { map, start, len })),
            _ => Err(KernelError::OutOfFile {
                name: name.to_string(),
                start,
                len,
                file_len: map.len(),
            }),
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Mapped { map, start, len } => &map[*start..*start + *len],
            Repr::Owned(v) => v,
        }
    }

    /// Tells the kernel that a mapped range is no longer needed, so its pages leave the
    /// resident set (they are read from the file again if touched). A hint: failures and
    /// owned buffers are ignored.
    fn release(&self) {
        #[cfg(unix)]
        if let Repr::Mapped { map, start, len } = &self.0 {
            // Whole pages inside the range only: neighbours may still be in use.
            let page = 4096;
            let (a, b) = (start.div_ceil(page) * page, (start + len) / page * page);
            if b > a {
                // SAFETY: the mapping is private and read-only, so dropping its pages loses
                // nothing: a later read faults them in from the file again.
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
                };
            }
        }
    }

    /// Whether the bytes are borrowed from a memory map (no copy).
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }
}

impl fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Mapped { start, len, .. } => write!(f, "Mapped({start}..{})", start + len),
            Repr::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
        }
    }
}

/// Memory-maps a GGUF file and parses its header (metadata and tensor directory), for
/// [`GgufMatrix::from_gguf`].
///
/// Like every memory map, the mapping assumes the file is not modified while it is in use.
///
/// Errors: [`crate::Error::Io`] when the file cannot be opened or mapped; [`crate::Error::Model`]
/// naming the file when it is not a GGUF file.
pub fn mmap_gguf(path: impl AsRef<Path>) -> crate::Result<(Arc<Mmap>, Content)> {
    let path = path.as_ref();
    let map = mmap_file(path)?;
    let content = Content::read(&mut std::io::Cursor::new(&map[..])).map_err(|e| {
        crate::Error::Model(format!(
            "{}: not a valid GGUF file ({})",
            path.display(),
            crate::error::candle_message(&e)
        ))
    })?;
    Ok((map, content))
}

/// Memory-maps a file read-only (with a read-ahead hint), for [`mmap_gguf`] and
/// [`crate::gguf::GgufFile::open`].
///
/// Errors: [`crate::Error::Io`] when the file cannot be opened or mapped.
pub fn mmap_file(path: impl AsRef<Path>) -> crate::Result<Arc<Mmap>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    // SAFETY: read-only private mapping; the file is documented not to change while mapped.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| crate::Error::io(path, e))?;
    // Ask the kernel to read ahead: decode touches every weight page once per token. Only a
    // hint, so a failure is ignored.
    #[cfg(unix)]
    let _ = map.advise(memmap2::Advice::WillNeed);
    Ok(Arc::new(map))
}

/// A GGUF block-quantized weight matrix `[rows = n, cols = k]` (PyTorch `[out, in]` order,
/// row-major, each row a whole number of blocks), kept in its file byte layout.
#[derive(Debug, Clone)]
pub struct GgufMatrix {
    name: String,
    bytes: WeightBytes,
    dtype: GgufType,
    rows: usize,
    cols: usize,
    /// Whether `bytes` hold the packed layout ([`GgufMatrix::repacked`]) instead of GGUF's.
    packed: bool,
    /// Whether the packed products keep the unpacked kernels' float order
    /// ([`GgufMatrix::repacked_keeping_order`]).
    vec_dot_order: bool,
}

impl GgufMatrix {
    /// Wraps GGUF bytes of shape `[rows, cols]`.
    ///
    /// Errors (naming `name`): [`KernelError::NotBlockAligned`] when `cols` is not a multiple of
    /// the block size; [`KernelError::ByteLength`] when `bytes` does not hold exactly
    /// `rows * cols / block_size * type_size` bytes.
    pub fn new(
        name: impl Into<String>,
        bytes: WeightBytes,
        dtype: GgufType,
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        let name = name.into();
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(KernelError::NotBlockAligned { name, dtype, cols });
        }
        let expected = rows
            .checked_mul(cols / dtype.block_size())
            .and_then(|b| b.checked_mul(dtype.type_size()));
        let got = bytes.as_slice().len();
        if expected != Some(got) {
            return Err(KernelError::ByteLength {
                name,
                dtype,
                rows,
                cols,
                expected: expected.unwrap_or(usize::MAX),
                got,
            });
        }
        Ok(Self {
            name,
            bytes,
            dtype,
            rows,
            cols,
            packed: false,
            vec_dot_order: false,
        })
    }

    /// The same matrix with its rows interleaved in groups of 16 for the CPU's fastest
    /// kernels, when this CPU has them (AVX-512 with VNNI) and the type has a packed layout
    /// (`Q4_0`, `Q4_1`, `Q8_0`, `Q4_K`, `Q5_K`, `Q6_K`, `IQ4_NL`, `IQ4_XS`) and `rows` is a
    /// multiple of 16; otherwise `self` unchanged. The packed bytes are an owned copy of the
    /// same size (`Q4_K`: 2.8% larger, see `packed_q4k`; `Q5_K`: 2.3%, see `packed_q5k`;
    /// `IQ4_XS`: 1.5%, see `packed_iq4xs`) (llama.cpp repacks the same way at load, see
    /// `ggml-cpu/repack.cpp`); the memory-mapped pages they came from are released.
    /// Products, [`Self::embedding`] and [`Self::dequantize`] give the same values either way
    /// (products up to float summation order).
    pub fn repacked(self) -> Self {
        if Self::packs_on(Backend::detect()) {
            self.into_packed()
        } else {
            self
        }
    }

    /// The same matrix packed as [`Self::repacked`] does, but only where the packed products
    /// then give exactly the bits of the unpacked kernels (ggml's `vec_dot` float order) on
    /// every row count: `Q8_0` and `Q4_1` (through kernels of their own, 2-3 times the vector
    /// operations of [`Self::repacked`]'s); otherwise `self` unchanged. For products whose
    /// outputs are to stay bit for bit with llama.cpp's (which keeps ggml's order for both
    /// types) at the packed layout's memory speed: the packed kernels read 16 rows per 512-bit
    /// word instead of one row per 256-bit word.
    pub fn repacked_keeping_order(self) -> Self {
        if Self::packs_on(Backend::detect()) {
            self.into_packed_keeping_order()
        } else {
            self
        }
    }

    /// [`Self::repacked_keeping_order`] regardless of the CPU (for tests).
    pub(crate) fn into_packed_keeping_order(self) -> Self {
        if self.packed || packed::tile_fn_vec_dot(self.dtype).is_none() {
            return self;
        }
        let m = self.into_packed();
        let vec_dot_order = m.packed;
        Self { vec_dot_order, ..m }
    }

    /// Whether this CPU has the kernels of the 16-row packed layouts (AVX-512 VNNI), so that
    /// repacking weights at load pays off ([`Self::repacked`], [`PackedMlx`]).
    pub fn packed_kernels_here() -> bool {
        Self::packs_on(Backend::detect())
    }

    /// Whether [`Self::repacked`] packs on this backend.
    fn packs_on(backend: Backend) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            backend == Backend::Avx512Vnni && packed::avx512::available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = backend;
            false
        }
    }

    /// The packed layout regardless of the CPU (for tests), when the type and shape allow it.
    pub(crate) fn into_packed(self) -> Self {
        if self.packed || !packed::supports(self.dtype) || !self.rows.is_multiple_of(packed::ROWS) {
            return self;
        }
        let bytes = packed::repack(self.dtype, self.bytes(), self.rows, self.cols);
        self.bytes.release();
        Self {
            bytes: WeightBytes::owned(bytes),
            packed: true,
            ..self
        }
    }

    /// Whether the bytes are in the packed layout (see [`Self::repacked`]).
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Copies the bytes of a 2-D candle [`QTensor`] `[n, k]` (any device) into an owned matrix.
    ///
    /// Errors: [`KernelError::UnsupportedType`], [`KernelError::NotAMatrix`], or the errors of
    /// [`Self::new`]; [`KernelError::Input`] when candle cannot return the bytes.
    pub fn from_qtensor(name: impl Into<String>, q: &QTensor) -> Result<Self, KernelError> {
        let name = name.into();
        let dtype = GgufType::from_ggml(q.dtype()).ok_or_else(|| KernelError::UnsupportedType {
            name: name.clone(),
            dtype: format!("{:?}", q.dtype()),
        })?;
        let (rows, cols) = match q.shape().dims() {
            &[r, c] => (r, c),
            d => {
                return Err(KernelError::NotAMatrix {
                    name,
                    dims: d.to_vec(),
                })
            }
        };
        let data = q.data().map_err(|e| KernelError::Input {
            name: name.clone(),
            msg: format!("cannot read the quantized bytes ({e})"),
        })?;
        Self::new(
            name,
            WeightBytes::owned(data.into_owned()),
            dtype,
            rows,
            cols,
        )
    }

    /// The tensor `name` of a memory-mapped GGUF file (see [`mmap_gguf`]), without copying.
    /// GGUF stores dims innermost first; candle's `Content` reverses them, so a linear weight
    /// reads as `[out, in]`.
    ///
    /// Errors (naming the tensor): [`KernelError::Missing`], [`KernelError::UnsupportedType`],
    /// [`KernelError::NotAMatrix`], [`KernelError::OutOfFile`] (truncated file), or those of
    /// [`Self::new`].
    pub fn from_gguf(map: &Arc<Mmap>, content: &Content, name: &str) -> Result<Self, KernelError> {
        let info = content
            .tensor_infos
            .get(name)
            .ok_or_else(|| KernelError::Missing {
                name: name.to_string(),
            })?;
        let dtype =
            GgufType::from_ggml(info.ggml_dtype).ok_or_else(|| KernelError::UnsupportedType {
                name: name.to_string(),
                dtype: format!("{:?}", info.ggml_dtype),
            })?;
        let (rows, cols) = match info.shape.dims() {
            &[r, c] => (r, c),
            d => {
                return Err(KernelError::NotAMatrix {
                    name: name.to_string(),
                    dims: d.to_vec(),
                })
            }
        };
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(KernelError::NotBlockAligned {
                name: name.to_string(),
                dtype,
                cols,
            });
        }
        let out_of_file = || KernelError::OutOfFile {
            name: name.to_string(),
            start: usize::MAX,
            len: 0,
            file_len: map.len(),
        };
        let start = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(out_of_file)?;
        let len = rows
            .checked_mul(cols / dtype.block_size())
            .and_then(|b| b.checked_mul(dtype.type_size()))
            .ok_or_else(out_of_file)?;
        let bytes = WeightBytes::mapped(name, Arc::clone(map), start, len)?;
        Self::new(name, bytes, dtype, rows, cols)
    }

    /// Tensor name (used in error messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Block type.
    pub fn dtype(&self) -> GgufType {
        self.dtype
    }

    /// Rows (`n`, output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (`k`, input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The weight bytes: GGUF's layout (`rows * row_bytes()` long), or the packed one when
    /// [`Self::is_packed`] (as long, except `Q4_K`: 2.8% longer).
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Where the bytes live.
    pub fn weight_bytes(&self) -> &WeightBytes {
        &self.bytes
    }

    /// Bytes per row: `cols / block_size * type_size`.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    pub(crate) fn mat_ref(&self) -> MatRef<'_> {
        MatRef {
            name: &self.name,
            w: self.bytes(),
            kind: if self.packed && self.vec_dot_order {
                Kind::PackedVecDot(self.dtype)
            } else if self.packed {
                Kind::Packed(self.dtype)
            } else {
                Kind::Gguf(self.dtype)
            },
            rows: self.rows,
            cols: self.cols,
            row_bytes: self.row_bytes(),
            mlx: MlxParts::NONE,
        }
    }

    /// `out[m, n] = x[m, k] · Wᵀ`, all row-major `f32`, on [`Backend::detect`]ed SIMD.
    ///
    /// The activation rows are quantized once to 8 bits per value (see the module docs), so
    /// the result differs from an `f32` product with the dequantized weight by at most about
    /// `Σ_blocks amax(x_block) / 254 · Σ_block |w|` per output (half a quantization step of
    /// each activation).
    ///
    /// Errors: [`KernelError::ArgLength`] when `x.len() != m * k` or `out.len() != m * n`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(Backend::detect(), x, m, out)
    }

    /// [`Self::matmul`] on a given backend (for comparisons and tests).
    ///
    /// Errors: those of [`Self::matmul`], and [`KernelError::BackendUnavailable`].
    pub fn matmul_with(
        &self,
        backend: Backend,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        matmul_fused_with(backend, &[self], x, m, &mut [out])
    }

    /// `x: [.., k]` f32 on the CPU -> `[.., n]` f32.
    ///
    /// Errors: [`crate::Error::Tensor`] naming the weight when `x` is not `f32`, not on the CPU
    /// or its last dim is not `k`.
    pub fn forward(&self, x: &Tensor) -> crate::Result<Tensor> {
        let mut ys = forward_fused(&[self], x)?;
        ys.pop()
            .ok_or_else(|| crate::Error::tensor(&self.name, "fused product returned no output"))
    }

    /// The dequantized rows `ids`, concatenated: `[ids.len(), k]` row-major `f32` (an embedding
    /// lookup; only the rows asked for are decoded). Values are exactly those of ggml's
    /// `dequantize_row_*`.
    ///
    /// Errors: [`KernelError::IdOutOfRange`] for an id `>= rows`.
    pub fn embedding(&self, ids: &[u32]) -> Result<Vec<f32>, KernelError> {
        let k = self.cols;
        let bytes = self.bytes();
        let mut out = vec![0f32; ids.len() * k];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(k.max(1))) {
            let r = id as usize;
            if r >= self.rows {
                return Err(KernelError::IdOutOfRange {
                    name: self.name.clone(),
                    id,
                    rows: self.rows,
                });
            }
            self.dequantize_row_into(bytes, r, dst);
        }
        Ok(out)
    }

    /// The whole matrix dequantized, `[rows, cols]` row-major `f32` (`rows * cols * 4` bytes).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, dst) in out.chunks_exact_mut(self.cols).enumerate() {
                self.dequantize_row_into(self.bytes(), r, dst);
            }
        }
        out
    }

    fn dequantize_row_into(&self, bytes: &[u8], r: usize, dst: &mut [f32]) {
        if self.packed {
            packed::dequantize_row(self.dtype, bytes, self.cols, r, dst);
        } else {
            let rb = self.row_bytes();
            scalar::dequantize_row(self.dtype, &bytes[r * rb..(r + 1) * rb], dst);
        }
    }
}

/// Several products sharing one input, `outs[i][m, n_i] = x[m, k] · W_iᵀ` (e.g. q/k/v or
/// gate/up projections): the activations are quantized once per activation format and all
/// matrices' tiles go to the thread pool in one pass.
///
/// Errors: [`KernelError::Input`] when `mats` is empty, the matrices differ in `k`, or
/// `outs.len() != mats.len()`; [`KernelError::ArgLength`] as in [`GgufMatrix::matmul`].
pub fn matmul_fused(
    mats: &[&GgufMatrix],
    x: &[f32],
    m: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    matmul_fused_with(Backend::detect(), mats, x, m, outs)
}

/// [`matmul_fused`] on a given backend.
///
/// Errors: those of [`matmul_fused`], and [`KernelError::BackendUnavailable`].
pub fn matmul_fused_with(
    backend: Backend,
    mats: &[&GgufMatrix],
    x: &[f32],
    m: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    let refs: Vec<MatRef<'_>> = mats.iter().map(|w| w.mat_ref()).collect();
    run_products(backend, &refs, x, m, outs)
}

/// A weight as the planner and the tile kernels see it: a GGUF matrix or an MLX affine one.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    /// Name for errors.
    pub name: &'a str,
    /// Weight bytes, `rows * row_bytes` (packed `Q4_K`: 2.8% more).
    pub w: &'a [u8],
    /// The weight format.
    pub kind: Kind,
    /// Rows (`n`).
    pub rows: usize,
    /// Columns (`k`).
    pub cols: usize,
    /// Bytes per row of `w`.
    pub row_bytes: usize,
    /// Per-group parameters (MLX only; null pointers for GGUF).
    pub mlx: MlxParts,
}

/// The format of a weight: a GGUF block type, or MLX affine codes of `bits` bits with
/// `scales`/`biases` in `params`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// GGUF blocks.
    Gguf(GgufType),
    /// GGUF blocks repacked in groups of 16 rows ([`packed`]).
    Packed(GgufType),
    /// [`Self::Packed`] with kernels in the unpacked kernels' float order (`Q8_0`, `Q4_1`:
    /// [`packed::tile_fn_vec_dot`]).
    PackedVecDot(GgufType),
    /// MLX affine 2- to 6-bit repacked in groups of 16 rows ([`mlx_packed`]).
    MlxPacked {
        /// Bits per code (2 to 6).
        bits: usize,
        /// Dtype of scales and biases.
        params: ParamDtype,
    },
    /// MLX affine, 2, 3, 4, 5, 6 or 8 bits.
    Mlx {
        /// Bits per code (2, 3, 4, 5, 6 or 8).
        bits: usize,
        /// Dtype of scales and biases.
        params: ParamDtype,
    },
}

impl Kind {
    fn act_format(self) -> ActFormat {
        match self {
            Self::Gguf(t) | Self::Packed(t) | Self::PackedVecDot(t) => t.act_format(),
            Self::Mlx { bits: 4, .. } | Self::MlxPacked { bits: 4, .. } => ActFormat::Q8_32Nib,
            Self::Mlx { .. } | Self::MlxPacked { .. } => ActFormat::Q8_32F,
        }
    }
}

/// Scales and biases of an MLX weight: `[rows, gpr]` each, in the dtype of its [`Kind`];
/// `bpg` 32-value activation blocks per group (group size / 32).
#[derive(Clone, Copy)]
pub(crate) struct MlxParts {
    pub scales: *const u8,
    pub biases: *const u8,
    pub gpr: usize,
    pub bpg: usize,
}

impl MlxParts {
    const NONE: Self = Self {
        scales: std::ptr::null(),
        biases: std::ptr::null(),
        gpr: 0,
        bpg: 0,
    };
}

// SAFETY: read-only pointers into buffers borrowed for the whole product (by the `MatRef`
// lifetime's owner, the caller of `run_products`).
unsafe impl Send for MlxParts {}
unsafe impl Sync for MlxParts {}

/// Checks the arguments of a (possibly fused) product and runs it.
pub(crate) fn run_products(
    backend: Backend,
    mats: &[MatRef<'_>],
    x: &[f32],
    m: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    let first = mats.first().ok_or_else(|| KernelError::Input {
        name: "<unnamed>".into(),
        msg: "fused product over no matrices".into(),
    })?;
    if outs.len() != mats.len() {
        return Err(KernelError::Input {
            name: first.name.to_string(),
            msg: format!("{} outputs given for {} matrices", outs.len(), mats.len()),
        });
    }
    let k = first.cols;
    for w in mats {
        if w.cols != k {
            return Err(KernelError::Input {
                name: w.name.to_string(),
                msg: format!(
                    "fused with `{}`: {} columns vs {k}; fused matrices must share the input",
                    first.name, w.cols
                ),
            });
        }
    }
    for (w, out) in mats.iter().zip(outs.iter()) {
        check_product(backend, w, x, m, out)?;
    }
    if m == 0 {
        return Ok(());
    }
    if k == 0 {
        for out in outs.iter_mut() {
            out.fill(0.0);
        }
        return Ok(());
    }
    // One activation quantization per format in use.
    let mut acts: Vec<Acts> = Vec::with_capacity(2);
    let mut act_index = Vec::with_capacity(mats.len());
    for w in mats {
        let fmt = w.kind.act_format();
        let i = match acts.iter().position(|a| a.fmt == fmt) {
            Some(i) => i,
            None => {
                acts.push(quantize_acts(backend, fmt, x, m, k));
                acts.len() - 1
            }
        };
        act_index.push(i);
    }
    let jobs: Vec<Job<'_>> = mats
        .iter()
        .zip(outs.iter_mut())
        .zip(act_index)
        .map(|((w, out), ai)| Job {
            w: w.w,
            kind: w.kind,
            n: w.rows,
            row_bytes: w.row_bytes,
            mlx: w.mlx,
            acts: &acts[ai],
            out: SyncPtr(out.as_mut_ptr()),
        })
        .collect();
    run_jobs(backend, &jobs, m);
    Ok(())
}

/// [`matmul_fused`] over candle tensors: `x: [.., k]` f32 on the CPU -> one `[.., n_i]` tensor
/// per matrix.
///
/// Errors: [`crate::Error::Tensor`] naming the first weight when `x` is not `f32`, not on the
/// CPU, or its last dim is not `k`, or for the errors of [`matmul_fused`].
pub fn forward_fused(mats: &[&GgufMatrix], x: &Tensor) -> crate::Result<Vec<Tensor>> {
    let refs: Vec<MatRef<'_>> = mats.iter().map(|w| w.mat_ref()).collect();
    forward_refs(Backend::detect(), &refs, x)
}

/// Products with an input each, `outs[i][m, n_i] = xs[i][m, k_i] · W_iᵀ` (the down
/// projections of a mixture of experts' chosen experts, each on its own expert's
/// activations): each input is quantized on its own and all matrices' tiles go to the thread
/// pool in one pass, so that several small products cost one dispatch instead of one each.
/// Each output equals [`run_products`] of its matrix alone, bit for bit (a tile's result does
/// not depend on the other jobs).
///
/// Errors: as [`run_products`], per matrix (`xs[i]` of `m` rows of its own `k_i`).
pub(crate) fn run_products_each(
    backend: Backend,
    mats: &[MatRef<'_>],
    xs: &[&[f32]],
    m: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    if mats.len() != xs.len() || mats.len() != outs.len() {
        return Err(KernelError::Input {
            name: mats.first().map_or("<unnamed>", |w| w.name).to_string(),
            msg: format!(
                "{} inputs and {} outputs given for {} matrices",
                xs.len(),
                outs.len(),
                mats.len()
            ),
        });
    }
    let mut acts = Vec::with_capacity(mats.len());
    for ((w, x), out) in mats.iter().zip(xs).zip(outs.iter_mut()) {
        // The checks of one product, and its degenerate cases, as `run_products` has them.
        if m == 0 || w.cols == 0 {
            run_products(
                backend,
                std::slice::from_ref(w),
                x,
                m,
                std::slice::from_mut(out),
            )?;
            acts.push(None);
            continue;
        }
        check_product(backend, w, x, m, out)?;
        acts.push(Some(quantize_acts(
            backend,
            w.kind.act_format(),
            x,
            m,
            w.cols,
        )));
    }
    let jobs: Vec<Job<'_>> = mats
        .iter()
        .zip(outs.iter_mut())
        .zip(&acts)
        .filter_map(|((w, out), a)| {
            Some(Job {
                w: w.w,
                kind: w.kind,
                n: w.rows,
                row_bytes: w.row_bytes,
                mlx: w.mlx,
                acts: a.as_ref()?,
                out: SyncPtr(out.as_mut_ptr()),
            })
        })
        .collect();
    if !jobs.is_empty() {
        run_jobs(backend, &jobs, m);
    }
    Ok(())
}

/// The argument checks of one product `out[m, n] = x[m, k] · Wᵀ` ([`run_products`]'s).
fn check_product(
    backend: Backend,
    w: &MatRef<'_>,
    x: &[f32],
    m: usize,
    out: &[f32],
) -> Result<(), KernelError> {
    if !backend.is_available() {
        return Err(KernelError::BackendUnavailable {
            name: w.name.to_string(),
            backend,
        });
    }
    if Some(x.len()) != m.checked_mul(w.cols) {
        return Err(KernelError::ArgLength {
            name: w.name.to_string(),
            arg: "x",
            expected: m.saturating_mul(w.cols),
            got: x.len(),
            what: format!("m = {m} rows of k = {}", w.cols),
        });
    }
    if Some(out.len()) != m.checked_mul(w.rows) {
        return Err(KernelError::ArgLength {
            name: w.name.to_string(),
            arg: "out",
            expected: m.saturating_mul(w.rows),
            got: out.len(),
            what: format!("m = {m} rows of n = {}", w.rows),
        });
    }
    Ok(())
}

/// [`run_products`] over candle tensors, as [`forward_fused`] documents.
pub(crate) fn forward_refs(
    backend: Backend,
    mats: &[MatRef<'_>],
    x: &Tensor,
) -> crate::Result<Vec<Tensor>> {
    let first = mats.first().ok_or_else(|| {
        crate::Error::InvalidArgument("fused product over no matrices".to_string())
    })?;
    let bad = |msg: String| -> crate::Error {
        KernelError::Input {
            name: first.name.to_string(),
            msg,
        }
        .into()
    };
    if !x.device().is_cpu() {
        return Err(bad(format!(
            "input is on {:?}; these kernels run on the CPU",
            x.device()
        )));
    }
    if x.dtype() != DType::F32 {
        return Err(bad(format!(
            "input has dtype {:?}, expected f32",
            x.dtype()
        )));
    }
    let dims = x.dims();
    let k = first.cols;
    match dims.last() {
        Some(&last) if last == k => {}
        _ => {
            return Err(bad(format!(
                "input has shape {dims:?}, expected [.., {k}] (k = the matrix's columns)"
            )))
        }
    }
    let m: usize = dims[..dims.len() - 1].iter().product();
    let x = x.contiguous()?;
    let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![0f32; m * w.rows]).collect();
    {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(bad("input storage is not on the CPU".to_string()));
        };
        let data = cpu.as_slice::<f32>()?;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| bad("input is not contiguous".to_string()))?;
        let mut out_refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        run_products(backend, mats, &data[start..end], m, &mut out_refs)?;
    }
    let mut shape = dims.to_vec();
    mats.iter()
        .zip(outs)
        .map(|(w, o)| {
            if let Some(last) = shape.last_mut() {
                *last = w.rows;
            }
            Ok(Tensor::from_vec(o, shape.as_slice(), &Device::Cpu)?)
        })
        .collect()
}

/// [`run_products_each`] over candle tensors: `xs[i]: [.., k_i]` f32 on the CPU, all with the
/// same leading dimensions -> one `[.., n_i]` tensor per matrix.
///
/// Errors: [`crate::Error::InvalidArgument`] when the inputs' leading dimensions differ or an
/// input is not f32; those of [`run_products_each`].
pub(crate) fn forward_refs_each(
    backend: Backend,
    mats: &[MatRef<'_>],
    xs: &[Tensor],
) -> crate::Result<Vec<Tensor>> {
    let Some(first) = xs.first() else {
        return Ok(Vec::new());
    };
    let lead = &first.dims()[..first.rank().saturating_sub(1)];
    let mut data = Vec::with_capacity(xs.len());
    for (x, w) in xs.iter().zip(mats) {
        if x.rank() == 0 || &x.dims()[..x.rank() - 1] != lead {
            return Err(crate::Error::InvalidArgument(format!(
                "`{}`: input of shape {:?}, the first's leading dimensions are {lead:?}",
                w.name,
                x.dims()
            )));
        }
        if x.dtype() != DType::F32 {
            return Err(crate::Error::InvalidArgument(format!(
                "`{}`: input has dtype {:?}, expected f32",
                w.name,
                x.dtype()
            )));
        }
        data.push(x.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let m: usize = lead.iter().product();
    let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![0f32; m * w.rows]).collect();
    let xs: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
    let mut out_refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    run_products_each(backend, mats, &xs, m, &mut out_refs)?;
    mats.iter()
        .zip(outs)
        .map(|(w, o)| {
            let mut shape = lead.to_vec();
            shape.push(w.rows);
            Ok(Tensor::from_vec(o, shape.as_slice(), &Device::Cpu)?)
        })
        .collect()
}

/// Runs `f` on a worker thread of the current rayon pool and returns its result (the caller
/// blocks meanwhile), with the pool's other workers kept awake until `f` returns.
///
/// Kernel calls made inside `f` start their parallel loops on a pool thread instead of
/// handing every call from a foreign thread to the pool and back (two thread wake-ups per
/// call). And while `f` runs, each other worker polls for work ([`keep_awake`]) instead of
/// going to sleep between two products, so that the next product does not wait for a
/// wake-up either: a decode token runs about 120 products, with a few microseconds of serial
/// work (norms, RoPE, attention of one row) between them. llama.cpp's thread pool spins
/// between the operations of a graph the same way (`ggml_barrier`). A worker that finds no
/// work for [`KEEP_AWAKE`] goes back to sleep; all of them do when `f` returns.
///
/// Wrap a whole forward pass in it (the generation loop does: [`in_pool_on`]);
/// `benches/gguf_kernels.rs` measures a decode token of the default model both ways. Nested
/// calls just run `f`.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if IN_POOL.with(|c| c.get()) {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let owner = rayon::current_thread_index();
        let done = &done;
        for _ in 1..rayon::current_num_threads() {
            s.spawn(move |_| keep_awake(done, owner));
        }
        IN_POOL.with(|c| c.set(true));
        let r = f();
        IN_POOL.with(|c| c.set(false));
        done.store(true, Ordering::Release);
        r
    })
}

thread_local! {
    /// Whether this thread is running the body of an [`in_pool`] call.
    static IN_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How long a worker kept awake by [`in_pool`] polls without finding work before it goes back
/// to sleep: longer than the serial gaps of a forward pass, short enough that a long serial
/// stretch does not burn a core.
pub const KEEP_AWAKE: std::time::Duration = std::time::Duration::from_millis(1);

/// The body of the jobs [`in_pool`] spawns: runs the pool's pending jobs as they appear
/// (`rayon::yield_now`) until `done` is set or nothing came for [`KEEP_AWAKE`]. Picked up
/// by the owner thread itself (while it waits on a join), it returns at once.
fn keep_awake(done: &AtomicBool, owner: Option<usize>) {
    if rayon::current_thread_index() == owner {
        return;
    }
    let mut idle_since = None;
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = None,
            Some(rayon::Yield::Idle) => {
                let t0 = *idle_since.get_or_insert_with(std::time::Instant::now);
                if t0.elapsed() >= KEEP_AWAKE {
                    return;
                }
                for _ in 0..32 {
                    std::hint::spin_loop();
                }
            }
            None => return,
        }
    }
}

/// [`in_pool`] when `device` is the CPU; on any other device `f` runs on the calling thread,
/// which keeps the GPU backends' streams and contexts on the thread that made them.
///
/// The generation loop, the batch engine, `bench` and the perplexity run wrap each forward
/// pass in it. On the 2-core benchmark machine that took the default model's decode from
/// 82 to 108-116 tokens/s (2 threads): a decode token runs about 120 parallel products, and
/// from a thread outside the pool each one cost two thread wake-ups.
pub fn in_pool_on<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        in_pool(f)
    } else {
        f()
    }
}

/// `f(&mut items[i], &with[i])` for each `i` (up to the shorter slice), in order of `i`: on
/// the CPU with more than one item in parallel on the rayon pool, one item per task (for
/// per-sequence work of a batched step, each too small to split inside); on another device in
/// turn on this thread (its work is queued on one stream anyway).
pub fn zip_map_on<A: Send, B: Sync, R: Send>(
    device: &Device,
    items: &mut [A],
    with: &[B],
    f: impl Fn(&mut A, &B) -> R + Sync + Send,
) -> Vec<R> {
    if device.is_cpu() && items.len().min(with.len()) > 1 {
        use rayon::prelude::*;
        items
            .par_iter_mut()
            .zip(with.par_iter())
            .with_max_len(1)
            .map(|(a, b)| f(a, b))
            .collect()
    } else {
        items.iter_mut().zip(with).map(|(a, b)| f(a, b)).collect()
    }
}

/// A raw output pointer shared by the worker threads. Every tile writes a disjoint set of
/// output elements, so concurrent writes never alias.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: see the type docs; the pointee outlives the parallel region (it is borrowed
// mutably by the caller of `run_jobs` for its whole duration).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// One matrix of a (possibly fused) product.
struct Job<'a> {
    w: &'a [u8],
    kind: Kind,
    n: usize,
    row_bytes: usize,
    mlx: MlxParts,
    acts: &'a Acts,
    out: SyncPtr,
}

/// The unit of work handed to a kernel: weight rows `rows` against activation rows `ms`,
/// writing `out[r * ldo + j]`.
pub(crate) struct Tile<'a> {
    /// All weight bytes of the matrix.
    pub w: &'a [u8],
    /// Bytes per weight row.
    pub row_bytes: usize,
    /// Scales and biases of an MLX weight (null for GGUF).
    pub mlx: MlxParts,
    /// The quantized activations.
    pub acts: &'a Acts,
    /// Weight rows (output columns) of this tile.
    pub rows: Range<usize>,
    /// Activation rows (output rows) of this tile.
    pub ms: Range<usize>,
    /// Output base pointer (row-major `[m, ldo]`).
    pub out: *mut f32,
    /// Output row stride (`n`).
    pub ldo: usize,
}

/// Whether activation row `r` of an `m`-row product goes through ggml's repacked `Q4_K` GEMM
/// (`ggml_gemm_q4_K_8x8_q8_K`: rows in groups of 4, one fused multiply-add per pair of
/// sub-blocks) rather than its GEMV (the last `m % 4` rows, one per super-block); see
/// `forward_mul_mat` in ggml-cpu's `repack.cpp`.
#[inline(always)]
pub(crate) fn q4k_gemm_row(m: usize, r: usize) -> bool {
    r < m - m % 4
}

/// Whether an `m`-row `Q6_K` product goes through ggml-cpu's tiled K-quant matmul (taken for
/// 8 or more activation rows, `ggml_tiled_min_batch`) rather than `ggml_vec_dot_q6_K_q8_K`.
#[inline(always)]
pub(crate) fn q6k_tiled(m: usize) -> bool {
    m >= 8
}

/// Whether an `m`-row `Q5_K` product goes through ggml-cpu's tiled K-quant matmul (the same
/// threshold as [`q6k_tiled`]; ggml-cpu repacks `Q5_K` only on aarch64, so on x86-64 smaller
/// products run `ggml_vec_dot_q5_K_q8_K`). Per super-block the tiled kernel turns the exact
/// integers `isum = Σ_s sc_s·Σ q·y` and `msum = Σ_s m_s·bsum_s` into
/// `fma(fnmadd(dmin, msum, isum·d), dy, acc)` (`tiled-kernel.cpp`, `HAS_MIN`).
#[inline(always)]
pub(crate) fn q5k_tiled(m: usize) -> bool {
    m >= 8
}

/// Whether an `m`-row product is a decode-sized one whose weights are streamed from memory
/// once (split on rows only, see `plan`) rather than re-read from L1 by prefill tiles: the
/// packed `Q4_K`/`Q6_K` kernels then prefetch ahead of the hardware prefetcher.
#[inline(always)]
pub(crate) fn streams_weights(m: usize) -> bool {
    m <= 8
}

/// A tile kernel: computes every output of the tile.
///
/// # Safety
/// `tile.rows.end <= n`, `tile.ms.end <= acts.m`, the bytes hold `n` rows of `row_bytes`, the
/// activation format matches the weight type, and `out` is valid for `[acts.m, ldo]` writes of
/// which no other thread writes the tile's elements.
pub(crate) type TileFn = unsafe fn(&Tile<'_>);

fn tile_fn(backend: Backend, kind: Kind) -> TileFn {
    let dtype = match kind {
        Kind::Gguf(t) => t,
        Kind::Packed(t) => {
            #[cfg(target_arch = "x86_64")]
            if GgufMatrix::packs_on(backend) {
                return packed::avx512::tile_fn(t);
            }
            return packed::tile_fn(t);
        }
        Kind::PackedVecDot(t) => {
            #[cfg(target_arch = "x86_64")]
            if GgufMatrix::packs_on(backend) {
                if let Some(f) = packed::avx512::tile_fn_vec_dot(t) {
                    return f;
                }
            }
            return packed::tile_fn_vec_dot(t).unwrap_or_else(|| packed::tile_fn(t));
        }
        Kind::Mlx { bits, params } => return mlx::tile_fn(backend, bits, params),
        Kind::MlxPacked { bits, params } => {
            #[cfg(target_arch = "x86_64")]
            if GgufMatrix::packs_on(backend) && mlx_packed::avx512::runs(bits) {
                return mlx_packed::avx512::tile_fn(bits, params);
            }
            return mlx_packed::tile_fn(bits, params);
        }
    };
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 | Backend::Avx512Vnni | Backend::AvxVnni => x86::tile_fn(dtype, backend),
        #[cfg(target_arch = "aarch64")]
        Backend::Neon => neon::tile_fn(dtype, false),
        #[cfg(target_arch = "aarch64")]
        Backend::NeonDotprod => neon::tile_fn(dtype, true),
        _ => scalar::tile_fn(dtype),
    }
}

/// Weight bytes a prefill tile keeps hot (re-read once per group of 4 activation rows): half
/// of a typical 32-48 KiB L1d.
const TILE_BYTES: usize = 16 * 1024;
/// Below this many weight bytes × activation rows a product runs on the calling thread when
/// that thread is a rayon worker. Measured break-even on the 2-core benchmark machine (hot
/// `Q4_1` weights, k = 576): 45 KB took 3.2 µs serial vs 3.3 µs split, 67 KB 4.6 vs 4.1 µs.
const SERIAL_WORK_IN_POOL: usize = 48 * 1024;
/// The same for a caller outside the pool, which pays a hand-off to the pool and back
/// (about 5 µs): 202 KB took 12.9 µs serial vs 13.4 µs split, 270 KB 17.1 vs 15.5 µs.
const SERIAL_WORK_OUTSIDE: usize = 224 * 1024;
/// Activation rows per prefill tile.
const TILE_M: usize = 64;

struct Task {
    job: usize,
    rows: Range<usize>,
    ms: Range<usize>,
}

fn plan(jobs: &[Job<'_>], m: usize, threads: usize) -> Vec<Task> {
    let total_bytes: usize = jobs.iter().map(|j| j.n * j.row_bytes).sum();
    let target_tasks = if threads > 1 { threads * 4 } else { 1 };
    let mut tasks = Vec::new();
    for (ji, job) in jobs.iter().enumerate() {
        if job.n == 0 {
            continue;
        }
        let (rows_per, m_per) = if streams_weights(m) {
            // Decode: stream the weights once; split rows evenly, in pieces of >= 8 KiB.
            let bytes_per = (total_bytes / target_tasks).max(8 * 1024);
            ((bytes_per / job.row_bytes).max(1), m)
        } else {
            // Prefill: weight tiles that stay in L1 while groups of 4 activation rows pass by.
            let rows_l1 = (TILE_BYTES / job.row_bytes).clamp(1, job.n);
            let mut m_per = TILE_M.min(m);
            let count = |mp: usize| job.n.div_ceil(rows_l1) * m.div_ceil(mp);
            while m_per > 4 && count(m_per) * jobs.len() < target_tasks {
                m_per = (m_per / 2).max(4);
            }
            (rows_l1, m_per)
        };
        // Packed weights are split on whole groups of rows.
        let rows_per = match job.kind {
            Kind::Packed(_) | Kind::PackedVecDot(_) => {
                rows_per.div_ceil(packed::ROWS) * packed::ROWS
            }
            Kind::MlxPacked { .. } => rows_per.div_ceil(mlx_packed::ROWS) * mlx_packed::ROWS,
            _ => rows_per,
        };
        let mut m0 = 0;
        while m0 < m {
            let m1 = (m0 + m_per).min(m);
            let mut r0 = 0;
            while r0 < job.n {
                let r1 = (r0 + rows_per).min(job.n);
                tasks.push(Task {
                    job: ji,
                    rows: r0..r1,
                    ms: m0..m1,
                });
                r0 = r1;
            }
            m0 = m1;
        }
    }
    tasks
}

fn run_jobs(backend: Backend, jobs: &[Job<'_>], m: usize) {
    let threads = rayon::current_num_threads();
    let work = jobs
        .iter()
        .map(|j| j.n * j.row_bytes)
        .sum::<usize>()
        .saturating_mul(m);
    let serial_below = if rayon::current_thread_index().is_some() {
        SERIAL_WORK_IN_POOL
    } else {
        SERIAL_WORK_OUTSIDE
    };
    let threads = if work < serial_below { 1 } else { threads };
    let fns: Vec<TileFn> = jobs.iter().map(|j| tile_fn(backend, j.kind)).collect();
    let run = |t: &Task| {
        let job = &jobs[t.job];
        let tile = Tile {
            w: job.w,
            row_bytes: job.row_bytes,
            mlx: job.mlx,
            acts: job.acts,
            rows: t.rows.clone(),
            ms: t.ms.clone(),
            out: job.out.0,
            ldo: job.n,
        };
        // SAFETY: `plan` produces in-range, pairwise disjoint tiles; the lengths of the
        // weights, activations and outputs were checked by `matmul_fused_with`, and the
        // tile function was picked for this job's dtype on an available backend.
        unsafe { (fns[t.job])(&tile) }
    };
    let tasks = plan(jobs, m, threads);
    if threads <= 1 || tasks.len() <= 1 {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().with_max_len(1).for_each(run);
    }
}
