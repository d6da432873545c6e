//! GGUF tensors of types that the tensor library's GGUF parser does not know (the one list:
//! [`SetAsideType::from_ggml_id`]): MXFP4 (ggml type 39, gpt-oss's experts, [`super::mxfp4`]),
//! IQ4_NL (20) and IQ4_XS (23) (read by our CPU kernels, [`crate::kernels::GgufType`]).
//!
//! The tensor directory is scanned here first; entries of those types are set aside (name,
//! type, dims, offset), a stand-in type id is written over theirs in a copy of the header, the
//! parser reads that copy, and the entries are then taken out of its directory. Every other
//! tensor is read by the parser as before.
//!
//! Format reference: ggml's `docs/gguf.md` (versions 2 and 3), `ggml.h` (type ids).

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::quantized::gguf_file::Content;

use crate::kernels::GgufType;

/// A type id every GGUF parser knows (Q8_0), written over set-aside type ids in the copy of
/// the header given to the parser; those entries are then taken out of its directory.
const STAND_IN: u32 = 8;

/// A tensor type the tensor library cannot read, which pocketlm reads itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetAsideType {
    /// MXFP4 (ggml type 39): 32 values in 17 bytes, read as MLX `mxfp4` weights
    /// ([`super::mxfp4`]).
    Mxfp4,
    /// A block type of our CPU kernels: [`GgufType::Iq4Nl`] (ggml type 20) or
    /// [`GgufType::Iq4Xs`] (23).
    Kernel(GgufType),
}

impl SetAsideType {
    /// The type of ggml type id `id` when the tensor library lacks it; `None` for every other
    /// id (the tensor library's parser reads or rejects those).
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        match id {
            20 => Some(Self::Kernel(GgufType::Iq4Nl)),
            23 => Some(Self::Kernel(GgufType::Iq4Xs)),
            super::mxfp4::GGML_TYPE_MXFP4 => Some(Self::Mxfp4),
            _ => None,
        }
    }

    /// ggml's name of the type (`MXFP4`, `IQ4_NL`, `IQ4_XS`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Mxfp4 => "MXFP4",
            Self::Kernel(t) => t.ggml_name(),
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::Mxfp4 => super::mxfp4::BLOCK,
            Self::Kernel(t) => t.block_size(),
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::Mxfp4 => super::mxfp4::BLOCK_BYTES,
            Self::Kernel(t) => t.type_size(),
        }
    }
}

/// A set-aside tensor: its type and where it lies in the GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAsideInfo {
    /// The type.
    pub ty: SetAsideType,
    /// Row-major dims, outermost first (`[rows, cols]` for a matrix, `[n_experts, rows, cols]`
    /// for `ffn_*_exps`).
    pub dims: Vec<usize>,
    /// Offset of its data from the start of the tensor data section.
    pub offset: u64,
}

impl SetAsideInfo {
    /// Bytes of the tensor's blocks; `None` when the last dim is not a whole number of blocks
    /// or the size overflows.
    pub fn bytes(&self) -> Option<usize> {
        let bs = self.ty.block_size();
        let cols = *self.dims.last()?;
        if !cols.is_multiple_of(bs) {
            return None;
        }
        self.dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))?
            .checked_div(bs)?
            .checked_mul(self.ty.type_size())
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

/// Parses a GGUF header with the tensor library's parser, tensors of the types it lacks
/// included: they are returned apart, by name, and left out of the parsed directory. Files
/// without such tensors (or that the scan cannot read: the parser then reports them) are
/// parsed as they are.
///
/// Errors: the parser's error, as text.
pub(crate) fn parse(
    bytes: &[u8],
) -> std::result::Result<(Content, HashMap<String, SetAsideInfo>), String> {
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
    let mut set_aside = HashMap::new();
    for (name, info, type_at) in found {
        header[type_at..type_at + 4].copy_from_slice(&STAND_IN.to_le_bytes());
        set_aside.insert(name, info);
    }
    let mut content = parse(&header)?;
    for name in set_aside.keys() {
        content.tensor_infos.remove(name);
    }
    Ok((content, set_aside))
}

/// A set-aside tensor found by [`scan`]: its name, where it lies, and the byte position of its
/// type id in the header.
type Found = (String, SetAsideInfo, usize);

/// The tensors of set-aside types of a GGUF (v2/v3) header and the end of the tensor
/// directory; `None` when the header cannot be read this way.
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
        if let Some(ty) = SetAsideType::from_ggml_id(ty) {
            found.push((name, SetAsideInfo { ty, dims, offset }, type_at));
        }
    }
    Some((found, s.at))
}
