//! GGUF's MXFP4 tensors (ggml type 39, `GGML_TYPE_MXFP4`), which the tensor library's GGUF
//! parser does not know: the tensor directory is read here, MXFP4 entries are set aside, and
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

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::quantized::gguf_file::Content;

use crate::quant::mlx_fp::{FpMode, FpQuantized};
use crate::{Error, Result};

/// ggml's type id of MXFP4.
pub const GGML_TYPE_MXFP4: u32 = 39;
/// Values per MXFP4 block.
pub const BLOCK: usize = 32;
/// Bytes per MXFP4 block: one E8M0 scale and 16 bytes of codes.
pub const BLOCK_BYTES: usize = 17;
/// A type id every GGUF parser knows (Q8_0), written over MXFP4 ids in the copy of the header
/// given to the parser; those entries are then taken out of its directory.
const STAND_IN: u32 = 8;

/// Where an MXFP4 tensor lies in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mxfp4Info {
    /// Row-major dims, outermost first (`[n_experts, rows, cols]` for `ffn_*_exps`).
    pub dims: Vec<usize>,
    /// Offset of its data from the start of the tensor data section.
    pub offset: u64,
}

impl Mxfp4Info {
    /// Bytes of the tensor's blocks.
    pub fn bytes(&self) -> usize {
        self.dims.iter().product::<usize>() / BLOCK * BLOCK_BYTES
    }
}

/// A bounds-checked reader over the header bytes.
struct Scan<'a> {
    b: &'a [u8],
    at: usize,
}

impl Scan<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.u64()?).ok()
    }
    fn string(&mut self) -> Option<String> {
        let n = self.len()?;
        Some(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    /// Skips one metadata value of GGUF value type `ty`.
    fn skip_value(&mut self, ty: u32, depth: usize) -> Option<()> {
        match ty {
            0 | 1 | 7 => self.take(1).map(|_| ()),
            2 | 3 => self.take(2).map(|_| ()),
            4..=6 => self.take(4).map(|_| ()),
            10..=12 => self.take(8).map(|_| ()),
            8 => self.string().map(|_| ()),
            9 if depth < 4 => {
                let item = self.u32()?;
                let n = self.len()?;
                let fixed = match item {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    _ => None,
                };
                match fixed {
                    Some(size) => self.take(n.checked_mul(size)?).map(|_| ()),
                    None => (0..n).try_for_each(|_| self.skip_value(item, depth + 1)),
                }
            }
            _ => None,
        }
    }
}

/// Parses a GGUF header with the tensor library's parser, MXFP4 tensors included: they are
/// returned apart, by name, and left out of the parsed directory. Files without MXFP4 tensors
/// (or that the scan cannot read: the parser then reports them) are parsed as they are.
///
/// Errors: the parser's error, as text.
pub(crate) fn parse(
    bytes: &[u8],
) -> std::result::Result<(Content, HashMap<String, Mxfp4Info>), String> {
    let parse = |b: &[u8]| {
        Content::read(&mut Cursor::new(b)).map_err(|e| crate::candle_errors::candle_message(&e))
    };
    let Some((found, header_end)) = scan(bytes) else {
        return Ok((parse(bytes)?, HashMap::new()));
    };
    if found.is_empty() {
        return Ok((parse(bytes)?, HashMap::new()));
    }
    let mut header = bytes[..header_end].to_vec();
    let mut mxfp4 = HashMap::new();
    for (name, info, type_at) in found {
        header[type_at..type_at + 4].copy_from_slice(&STAND_IN.to_le_bytes());
        mxfp4.insert(name, info);
    }
    let mut content = parse(&header)?;
    for name in mxfp4.keys() {
        content.tensor_infos.remove(name);
    }
    Ok((content, mxfp4))
}

/// An MXFP4 tensor found by [`scan`]: its name, where it lies, and the byte position of its
/// type id in the header.
type Found = (String, Mxfp4Info, usize);

/// The MXFP4 tensors of a GGUF (v2/v3) header and the end of the tensor directory; `None` when
/// the header cannot be read this way.
fn scan(bytes: &[u8]) -> Option<(Vec<Found>, usize)> {
    let mut s = Scan { b: bytes, at: 0 };
    if s.take(4)? != b"GGUF" || !matches!(s.u32()?, 2 | 3) {
        return None;
    }
    let (n_tensors, n_kv) = (s.len()?, s.len()?);
    for _ in 0..n_kv {
        s.string()?;
        let ty = s.u32()?;
        s.skip_value(ty, 0)?;
    }
    let mut found = Vec::new();
    for _ in 0..n_tensors {
        let name = s.string()?;
        let n_dims = s.u32()? as usize;
        if n_dims > 8 {
            return None;
        }
        let mut dims = (0..n_dims)
            .map(|_| s.len())
            .collect::<Option<Vec<usize>>>()?;
        dims.reverse();
        let type_at = s.at;
        let ty = s.u32()?;
        let offset = s.u64()?;
        if ty == GGML_TYPE_MXFP4 {
            found.push((name, Mxfp4Info { dims, offset }, type_at));
        }
    }
    Some((found, s.at))
}

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
