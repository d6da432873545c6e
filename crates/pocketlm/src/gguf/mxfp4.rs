//! GGUF's MXFP4 tensors (ggml type 39, `GGML_TYPE_MXFP4`), which the tensor library's GGUF
//! parser does not know: their directory entries are set aside ([`super::set_aside`]), and
//! their blocks become MLX `mxfp4` weights ([`FpQuantized`]) for the existing MXFP4 kernels.
//!
//! A block (`block_mxfp4`, ggml `ggml-common.h`) is 17 bytes for 32 values: `e` (an E8M0
//! scale byte) then `qs[16]`, where byte `j` holds the E2M1 code of value `j` in its low
//! nibble and of value `j + 16` in its high nibble. Value = `kvalues_mxfp4[code] ·
//! e8m0_to_fp32_half(e)` (`ggml-quants.c` `dequantize_row_mxfp4`), with `kvalues_mxfp4` the
//! E2M1 values doubled and the scale halved: the E2M1 value times `2^(e - 127)`, as MLX's
//! `mxfp4` mode computes it. MLX packs codes in order, two a byte, the low nibble first; so the
//! codes are only reordered, never rounded.
//!
//! Format reference: ggml's `docs/gguf.md` (versions 2 and 3), `ggml.h` (type ids).

use crate::quant::mlx_fp::{FpMode, FpQuantized};
use crate::{Error, Result};

/// ggml's type id of MXFP4.
pub const GGML_TYPE_MXFP4: u32 = 39;
/// Values per MXFP4 block.
pub const BLOCK: usize = 32;
/// Bytes per MXFP4 block: one E8M0 scale and 16 bytes of codes.
pub const BLOCK_BYTES: usize = 17;
/// The codes of one block in value order (32 nibbles) from ggml's layout (`qs[j]`: value `j`
/// low, `j + 16` high), packed as MLX does (value `2i` in the low nibble of byte `i`).
fn block_to_mlx(qs: &[u8]) -> [u8; 16] {
    let code = |v: usize| {
        if v < 16 {
            qs[v] & 0x0f
        } else {
            qs[v - 16] >> 4
        }
    };
    std::array::from_fn(|i| code(2 * i) | (code(2 * i + 1) << 4))
}

/// `rows · cols` values of MXFP4 blocks (`rows` rows of `cols / 32` blocks) as an MLX `mxfp4`
/// weight `[rows, cols]`. `name` is used in messages.
///
/// Errors: `cols` not a multiple of 32 or `blocks` of another length, naming `name`.
pub fn to_mlx(name: &str, blocks: &[u8], rows: usize, cols: usize) -> Result<FpQuantized> {
    let bad = |m: String| Error::tensor(name, m);
    if !cols.is_multiple_of(BLOCK) {
        return Err(bad(format!(
            "MXFP4 rows of {cols} values are not whole blocks of 32"
        )));
    }
    let n_blocks = rows * cols / BLOCK;
    if blocks.len() != n_blocks * BLOCK_BYTES {
        return Err(bad(format!(
            "has {} bytes of MXFP4 blocks, expected {} for [{rows}, {cols}]",
            blocks.len(),
            n_blocks * BLOCK_BYTES
        )));
    }
    let mut words = Vec::with_capacity(n_blocks * 4);
    let mut scales = Vec::with_capacity(n_blocks);
    for b in blocks.chunks_exact(BLOCK_BYTES) {
        scales.push(b[0]);
        let packed = block_to_mlx(&b[1..]);
        words.extend(
            packed
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])),
        );
    }
    FpQuantized::from_parts(words, scales, rows, cols, FpMode::Mxfp4)
        .map_err(|e| bad(e.to_string()))
}

/// ggml's reference dequantization of MXFP4 blocks (`dequantize_row_mxfp4`): the naive twin
/// of [`to_mlx`] + MLX's dequantization, for tests.
pub fn dequantize_reference(blocks: &[u8]) -> Vec<f32> {
    const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
    // ggml_e8m0_to_fp32_half: 2^(e - 128) as a float's bits (e < 2: a subnormal).
    let half = |e: u8| -> f32 {
        let bits = if e < 2 {
            0x0020_0000u32 << e
        } else {
            ((e as u32) - 1) << 23
        };
        f32::from_bits(bits)
    };
    let mut out = Vec::with_capacity(blocks.len() / BLOCK_BYTES * BLOCK);
    for b in blocks.chunks_exact(BLOCK_BYTES) {
        let d = half(b[0]);
        let qs = &b[1..];
        let mut y = [0f32; BLOCK];
        for j in 0..16 {
            y[j] = KVALUES[(qs[j] & 0x0f) as usize] as f32 * d;
            y[j + 16] = KVALUES[(qs[j] >> 4) as usize] as f32 * d;
        }
        out.extend_from_slice(&y);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::mlx_affine::ParamDtype;

    #[test]
    fn mlx_repack_equals_ggml_dequantization() {
        // Every code in every position, with scales across E8M0's range (subnormal halves
        // included).
        let rows = 6;
        let cols = 64;
        let mut blocks = Vec::new();
        for r in 0..rows {
            for k in 0..cols / BLOCK {
                let e = [0u8, 1, 2, 100, 127, 130, 200, 250, 126, 128, 5, 254][(r * 2 + k) % 12];
                blocks.push(e);
                blocks.extend(
                    (0..16).map(|j| ((j + r + k) % 16) as u8 | ((((j * 7 + r) % 16) as u8) << 4)),
                );
            }
        }
        let want = dequantize_reference(&blocks);
        let q = to_mlx("t", &blocks, rows, cols).unwrap();
        assert_eq!(q.dequantize(ParamDtype::F32), want);
        let e = to_mlx("t", &blocks[1..], rows, cols)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes of MXFP4 blocks"), "{e}");
        assert!(to_mlx("t", &blocks, rows * 2, cols / 2 + 1).is_err());
    }
}
