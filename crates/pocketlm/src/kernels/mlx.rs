//! CPU matrix products over MLX affine weights of 2, 3, 4, 5, 6 and 8 bits ([`AffineQuantized`]), with the
//! numerics of the GGUF kernels: `y[m, n] = x[m, k] · W[n, k]ᵀ` where each weight row stays
//! in MLX's packed `u32` words and `x` is quantized once per call to 8-bit blocks of 32 values
//! (ggml's `Q8_1`: `dy = amax / 127`, `qy = round(x / dy)`, `s = dy · Σqy`). For 4-bit weights
//! `dy` and `s` are rounded to `f16` as ggml stores them, so a 4-bit product has the numerics
//! of llama.cpp's `Q4_1 × Q8_1` (per-group instead of per-block scales); for 8-bit weights
//! they stay `f32`, because the `q - 128` form below multiplies the error of `s` by
//! `128 · scale`; for 2, 3, 5 and 6 bits they stay `f32` as well (the bit stream of a 32-value
//! block, `4 · bits` bytes, is unpacked to one code a byte before the integer dot product).
//!
//! Per group `g` of `group_size` values (`scale`, `bias`, codes `q`) and per 32-value block `b`
//! of the group:
//!
//! ```text
//! y += scale · dy_b · Σ_{i in b} q_i · qy_i  +  bias · s_b
//! ```
//!
//! an integer dot product per block (`vpmaddubsw`/`vpdpbusd` on x86-64, `smull`/`sdot` on
//! NEON) and two float multiply-adds. 4-bit words hold codes low bits first, so byte `c` of a block has
//! codes `2c` and `2c + 1` in its low and high nibbles; the activations of 4-bit products are
//! permuted once per call to that order (`ActFormat::Q8_32Nib`), so no per-weight shuffle is
//! needed. 8-bit codes are unsigned bytes; where the instruction needs signed ones (AVX2's
//! `vpmaddubsw` would saturate, NEON's `smull`) they are used as `q - 128` with `128 · scale`
//! folded into the bias.
//!
//! Error against the `f32` product of [`crate::quant::mlx_affine::quantized_matmul`] (what
//! `mx.quantized_matmul` computes with an `f32` `x`): the activation rounding, at most
//! `Σ_b (dy_b / 2) · Σ_{i in b} |w_i|` per output (`dy_b / 2` is half a quantization step of
//! block `b` of `x`), plus for 4 bits the `f16` roundings (`Σ_b 2^-11 · (127 · dy_b ·
//! Σ|w_i| + |bias · s_b|)`), plus `f32` rounding. `kernels::mlx_tests` checks that bound.
//!
//! Greedy decoding of the default model in MLX 4-bit gives mlx-lm's 32 tokens
//! (`tests/it/mlx_interop.rs`), but with little margin: keeping `dy` and `s` in `f32` for 4-bit
//! products too (more accurate) flips token 18 ("the" for mlx-lm's "a", a near tie), so
//! token equality with mlx-lm is a property of these exact roundings, not a guarantee of
//! 8-bit activations.
//!
//! Threads, tiling and the backends are those of [`super`] (the GGUF kernels).

use candle_core::Tensor;

use super::{
    forward_refs, run_products, scalar, Backend, KernelError, Kind, MatRef, MlxParts, TileFn,
};
use crate::quant::mlx_affine::{AffineQuantized, ParamDtype};

/// The name used in errors (an [`AffineQuantized`] has no name of its own).
const NAME: &str = "<MLX affine weight>";

/// Whether the fast kernels take this weight: 2, 3, 4, 5, 6 or 8 bits (any group size, any
/// parameter dtype), on a little-endian CPU. Others go through
/// [`crate::quant::mlx_affine::quantized_matmul`].
pub fn supports(w: &AffineQuantized) -> bool {
    cfg!(target_endian = "little") && matches!(w.bits(), 2 | 3 | 4 | 5 | 6 | 8)
}

/// The planner's view of `w`.
///
/// Errors: [`KernelError::UnsupportedType`] unless [`supports`].
pub(crate) fn mat_ref(w: &AffineQuantized) -> Result<MatRef<'_>, KernelError> {
    if !supports(w) {
        return Err(KernelError::UnsupportedType {
            name: NAME.to_string(),
            dtype: format!("MLX affine {}-bit", w.bits()),
        });
    }
    let words = w.weight();
    // SAFETY: `u32` words reinterpreted as their bytes (little-endian, checked by `supports`),
    // same memory, alignment 1.
    let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 4) };
    Ok(MatRef {
        name: NAME,
        w: bytes,
        kind: Kind::Mlx {
            bits: w.bits(),
            params: w.dtype(),
        },
        rows: w.rows(),
        cols: w.cols(),
        row_bytes: w.packed_cols() * 4,
        mlx: MlxParts {
            scales: w.scales().as_bytes().as_ptr(),
            biases: w.biases().as_bytes().as_ptr(),
            gpr: w.groups_per_row(),
            bpg: w.group_size() / 32,
        },
    })
}

/// `out[m, n] = x[m, k] · Wᵀ`, all row-major `f32`, on [`Backend::detect`]ed SIMD (see the
/// module docs for the numerics).
///
/// Errors: [`KernelError::UnsupportedType`] unless [`supports`]; [`KernelError::ArgLength`]
/// when `x.len() != m * k` or `out.len() != m * n`.
pub fn matmul(
    w: &AffineQuantized,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    matmul_with(Backend::detect(), w, x, m, out)
}

/// [`matmul`] on a given backend.
///
/// Errors: those of [`matmul`], and [`KernelError::BackendUnavailable`].
pub fn matmul_with(
    backend: Backend,
    w: &AffineQuantized,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    matmul_fused_with(backend, &[w], x, m, &mut [out])
}

/// Several products sharing one input (q/k/v, gate/up): `outs[i][m, n_i] = x[m, k] · W_iᵀ`,
/// with one activation quantization per format and one parallel pass.
///
/// Errors: those of [`matmul`] for each matrix, and [`KernelError::Input`] when `mats` is
/// empty, the matrices differ in `k`, or `outs.len() != mats.len()`.
pub fn matmul_fused(
    mats: &[&AffineQuantized],
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
    mats: &[&AffineQuantized],
    x: &[f32],
    m: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    let refs = mats
        .iter()
        .map(|w| mat_ref(w))
        .collect::<Result<Vec<_>, _>>()?;
    run_products(backend, &refs, x, m, outs)
}

/// [`matmul_fused`] over candle tensors: `x: [.., k]` f32 on the CPU -> one `[.., n_i]` f32
/// tensor per matrix.
///
/// Errors: [`crate::Error::Tensor`] when `x` is not `f32`, not on the CPU or its last dim is
/// not `k`, and those of [`matmul_fused`].
pub fn forward_fused(mats: &[&AffineQuantized], x: &Tensor) -> crate::Result<Vec<Tensor>> {
    let refs = mats
        .iter()
        .map(|w| mat_ref(w))
        .collect::<Result<Vec<_>, _>>()?;
    forward_refs(Backend::detect(), &refs, x)
}

/// The tile function for MLX weights of `bits` (2, 3, 4, 5, 6 or 8) on `backend`.
pub(crate) fn tile_fn(backend: Backend, bits: usize, params: ParamDtype) -> TileFn {
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 | Backend::Avx512Vnni | Backend::AvxVnni => {
            super::x86::mlx_tile_fn(bits, params, backend)
        }
        #[cfg(target_arch = "aarch64")]
        Backend::Neon => super::neon::mlx_tile_fn(bits, params, false),
        #[cfg(target_arch = "aarch64")]
        Backend::NeonDotprod => super::neon::mlx_tile_fn(bits, params, true),
        _ => scalar::mlx_tile_fn(bits, params),
    }
}
