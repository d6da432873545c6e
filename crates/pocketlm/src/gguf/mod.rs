//! Reading GGUF files: metadata and tensors. Quantized tensors stay quantized (as candle
//! `QTensor`s); float tensors are returned as `f32` candle tensors.
//!
//! Format reference: ggml's `docs/gguf.md` (version 2 and 3 files). Parsing is done by
//! `candle_core::quantized::gguf_file`; this module adds file-named errors, typed metadata
//! accessors. The Hugging Face <-> GGUF tensor names are per architecture:
//! [`crate::gguf::names`].

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub mod mxfp4;
pub mod names;

use crate::error::candle_message;
use crate::kernels::{GgufMatrix, GgufType, WeightBytes};
use crate::quant::mlx_fp::FpQuantized;
use crate::{Error, Result};
use mxfp4::Mxfp4Info;

/// An opened GGUF file: its parsed header (metadata and tensor directory) and the file
/// memory-mapped, so that quantized weights are used in place (no copy, near-zero load time;
/// resident memory grows only with the pages actually read).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    /// MXFP4 tensors (ggml type 39), which `content` leaves out: [`mxfp4`].
    mxfp4: HashMap<String, Mxfp4Info>,
    map: Arc<memmap2::Mmap>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    ///
    /// Errors: [`Error::Io`] when the file cannot be opened; [`Error::Model`] naming the file
    /// when it is not a GGUF file, is truncated, or its tensor directory points past the end.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let map = crate::kernels::mmap_file(&path)?;
        let (content, mxfp4) = mxfp4::parse(&map).map_err(|e| {
            Error::Model(format!("{}: not a valid GGUF file ({e})", path.display()))
        })?;
        let file_len = map.len() as u64;
        for (name, info) in &mxfp4 {
            let end = content.tensor_data_offset + info.offset + info.bytes() as u64;
            if !info
                .dims
                .last()
                .is_some_and(|c| c.is_multiple_of(mxfp4::BLOCK))
                || end > file_len
            {
                return Err(Error::Model(format!(
                    "{}: MXFP4 tensor `{name}` {:?} is not whole blocks of 32 or ends at byte {end} past the file's {file_len}",
                    path.display(),
                    info.dims
                )));
            }
        }
        // Check every tensor lies inside the file, so a truncated download is reported up front
        // with the name of the first tensor that is cut off.
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(bs) {
                return Err(Error::Model(format!(
                    "{}: tensor `{name}` has {elems} elements, not a multiple of the {:?} block size {bs}",
                    path.display(),
                    info.ggml_dtype
                )));
            }
            let size = (elems / bs * info.ggml_dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + size;
            if end > file_len {
                return Err(Error::Model(format!(
                    "{}: truncated GGUF file: tensor `{name}` ends at byte {end} but the file has {file_len} bytes",
                    path.display()
                )));
            }
        }
        Ok(Self {
            path,
            content,
            mxfp4,
            map,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/values.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture` (e.g. `llama`, `qwen2`, `gemma3`).
    pub fn architecture(&self) -> Result<String> {
        self.get_str("general.architecture")
    }

    /// Names of all tensors in the file.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    /// Whether the file holds a tensor of this (GGUF) name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name) || self.mxfp4.contains_key(name)
    }

    /// The directory entry of tensor `name`.
    ///
    /// Errors: [`Error::Tensor`] when it is missing, or MXFP4 (read only by
    /// [`Self::mxfp4_expert`]).
    fn info(&self, name: &str) -> Result<&candle_core::quantized::gguf_file::TensorInfo> {
        self.content.tensor_infos.get(name).ok_or_else(|| {
            let why = if self.is_mxfp4(name) {
                "is MXFP4 (ggml type 39), read only as stacked experts, in"
            } else {
                "missing from"
            };
            Error::tensor(name, format!("{why} {}", self.path.display()))
        })
    }

    /// Whether tensor `name` is MXFP4 (ggml type 39; read it with [`Self::mxfp4_expert`]).
    pub fn is_mxfp4(&self, name: &str) -> bool {
        self.mxfp4.contains_key(name)
    }

    /// Expert `expert` of a stacked MXFP4 expert tensor `[n_experts, rows, cols]` (gpt-oss's
    /// `ffn_*_exps`) as an MLX `mxfp4` weight `[rows, cols]` (codes reordered, not rounded:
    /// [`mxfp4`]). `expected` as in [`Self::qtensor`].
    ///
    /// Errors: [`Error::Tensor`] when the tensor is missing or not MXFP4, of another shape, or
    /// `expert` out of range.
    pub fn mxfp4_expert(
        &self,
        name: &str,
        expected: [usize; 3],
        expert: usize,
    ) -> Result<FpQuantized> {
        let info = self.mxfp4.get(name).ok_or_else(|| {
            Error::tensor(
                name,
                format!("is not an MXFP4 tensor of {}", self.path.display()),
            )
        })?;
        let [n, rows, cols] = expected;
        if info.dims != expected || expert >= n {
            return Err(Error::tensor(
                name,
                format!(
                    "has shape {:?} in {}, expected {expected:?} (expert {expert})",
                    info.dims,
                    self.path.display()
                ),
            ));
        }
        let one = rows * cols / mxfp4::BLOCK * mxfp4::BLOCK_BYTES;
        let start = usize::try_from(self.content.tensor_data_offset + info.offset)
            .map_err(|_| Error::tensor(name, "offset past the address space"))?
            + expert * one;
        mxfp4::to_mlx(
            &format!("{name}[{expert}]"),
            &self.map[start..start + one],
            rows,
            cols,
        )
    }

    /// Shape (row-major, outermost first, e.g. `[vocab, hidden]` for `token_embd.weight`) and
    /// type of a tensor.
    pub fn tensor_info(&self, name: &str) -> Result<(Vec<usize>, GgmlDType)> {
        let info = self.info(name)?;
        Ok((info.shape.dims().to_vec(), info.ggml_dtype))
    }

    /// Total bytes of tensor data in the file.
    pub fn tensor_data_bytes(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|i| {
                (i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size()) as u64
            })
            .sum()
    }

    /// Reads a tensor as stored (quantized types stay quantized), checking its shape against
    /// `expected` (row-major dims, e.g. `[out_features, in_features]` for a linear weight).
    ///
    /// Errors: [`Error::Tensor`] naming the tensor when it is missing or its shape differs.
    pub fn qtensor(&self, name: &str, expected: &[usize], device: &Device) -> Result<QTensor> {
        let (dims, _) = self.tensor_info(name)?;
        if dims != expected {
            return Err(Error::tensor(
                name,
                format!(
                    "has shape {dims:?} in {}, expected {expected:?}",
                    self.path.display()
                ),
            ));
        }
        self.content
            .tensor(&mut Cursor::new(&self.map[..]), name, device)
            .map_err(|e| {
                Error::tensor(
                    name,
                    format!("{} ({})", self.path.display(), candle_message(&e)),
                )
            })
    }

    /// A quantized weight `[rows, cols]` used in place from the mapped file, for the CPU
    /// kernels. `expected` as in [`Self::qtensor`].
    ///
    /// Errors: [`Error::Tensor`] when missing, of another shape, or of a type the kernels do
    /// not handle.
    pub fn matrix(&self, name: &str, expected: &[usize]) -> Result<GgufMatrix> {
        let (dims, _) = self.tensor_info(name)?;
        if dims != expected {
            return Err(Error::tensor(
                name,
                format!(
                    "has shape {dims:?} in {}, expected {expected:?}",
                    self.path.display()
                ),
            ));
        }
        Ok(GgufMatrix::from_gguf(&self.map, &self.content, name)?)
    }

    /// Expert `expert` of a stacked expert tensor `[n_experts, rows, cols]` (llama.cpp's
    /// `ffn_*_exps`; ggml stores each expert's `[rows, cols]` matrix contiguously) as a
    /// quantized matrix used in place from the mapped file, for the CPU kernels. `expected` as
    /// in [`Self::qtensor`].
    ///
    /// Errors: [`Error::Tensor`] when missing, of another shape, `expert` out of range, or of a
    /// type the kernels do not handle.
    pub fn expert_matrix(
        &self,
        name: &str,
        expected: [usize; 3],
        expert: usize,
    ) -> Result<GgufMatrix> {
        let info = self.info(name)?;
        let [n, rows, cols] = expected;
        if info.shape.dims() != expected || expert >= n {
            return Err(Error::tensor(
                name,
                format!(
                    "has shape {:?} in {}, expected {expected:?} (expert {expert})",
                    info.shape.dims(),
                    self.path.display()
                ),
            ));
        }
        let dtype = GgufType::from_ggml(info.ggml_dtype).ok_or_else(|| {
            Error::tensor(
                name,
                format!("type {:?} has no CPU kernel", info.ggml_dtype),
            )
        })?;
        let one = rows * (cols / dtype.block_size()) * dtype.type_size();
        let start = usize::try_from(self.content.tensor_data_offset + info.offset)
            .map_err(|_| Error::tensor(name, "offset past the address space"))?
            + expert * one;
        let label = format!("{name}[{expert}]");
        let bytes = WeightBytes::mapped(&label, Arc::clone(&self.map), start, one)?;
        Ok(GgufMatrix::new(label, bytes, dtype, rows, cols)?)
    }

    /// Reads a tensor and dequantizes it to `f32`. `expected` as in [`Self::qtensor`].
    pub fn tensor_f32(&self, name: &str, expected: &[usize], device: &Device) -> Result<Tensor> {
        Ok(self.qtensor(name, expected, device)?.dequantize(device)?)
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| {
            Error::Model(format!(
                "{}: metadata field `{key}` is missing",
                self.path.display()
            ))
        })
    }

    fn bad_type(&self, key: &str, want: &str) -> Error {
        Error::Model(format!(
            "{}: metadata field `{key}` is not {want}",
            self.path.display()
        ))
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Value::String(s) => Ok(s.clone()),
            _ => Err(self.bad_type(key, "a string")),
        }
    }

    /// An unsigned integer metadata value (any integer width, non-negative).
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let n = int_value(self.get(key)?).ok_or_else(|| self.bad_type(key, "an integer"))?;
        usize::try_from(n).map_err(|_| self.bad_type(key, "a non-negative integer"))
    }

    /// A metadata value that is an array of unsigned integers (llama.cpp's per-layer values,
    /// e.g. LFM2's `attention.head_count_kv`: 0 on its convolution layers).
    pub fn get_usize_array(&self, key: &str) -> Result<Vec<usize>> {
        let Value::Array(items) = self.get(key)? else {
            return Err(self.bad_type(key, "an array"));
        };
        items
            .iter()
            .map(|v| {
                int_value(v)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.bad_type(key, "an array of non-negative integers"))
            })
            .collect()
    }

    /// A per-layer integer metadata value of `n_layers` layers: an array of that many entries,
    /// or one integer for every layer (llama.cpp writes either, e.g. Gemma 4's
    /// `feed_forward_length` is an array only with `use_double_wide_mlp`).
    ///
    /// Errors: a missing key, another type, or an array of another length, naming the file.
    pub fn get_usize_per_layer(&self, key: &str, n_layers: usize) -> Result<Vec<usize>> {
        if !matches!(self.get(key)?, Value::Array(_)) {
            return Ok(vec![self.get_usize(key)?; n_layers]);
        }
        let v = self.get_usize_array(key)?;
        if v.len() != n_layers {
            return Err(Error::Model(format!(
                "{}: metadata field `{key}` has {} entries for {n_layers} layers",
                self.path.display(),
                v.len()
            )));
        }
        Ok(v)
    }

    /// A metadata value that is an array of booleans (llama.cpp's per-layer flags, e.g.
    /// Gemma 4's `attention.sliding_window_pattern`).
    pub fn get_bool_array(&self, key: &str) -> Result<Vec<bool>> {
        let Value::Array(items) = self.get(key)? else {
            return Err(self.bad_type(key, "an array"));
        };
        items
            .iter()
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                _ => Err(self.bad_type(key, "an array of booleans")),
            })
            .collect()
    }

    /// A float metadata value (f32 or f64 in the file).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            _ => Err(self.bad_type(key, "a float")),
        }
    }

    /// A boolean metadata value.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.get(key)? {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.bad_type(key, "a boolean")),
        }
    }

    /// Whether a metadata key exists.
    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    /// An optional integer: `Ok(None)` when absent, an error when present with another type.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.has(key).then(|| self.get_usize(key)).transpose()
    }

    /// An optional float: `Ok(None)` when absent, an error when present with another type.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.has(key).then(|| self.get_f64(key)).transpose()
    }

    /// An optional string: `Ok(None)` when absent, an error when present with another type.
    pub fn opt_str(&self, key: &str) -> Result<Option<String>> {
        self.has(key).then(|| self.get_str(key)).transpose()
    }
}

/// An integer metadata value of any width; `None` for other types.
fn int_value(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_gguf_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gguf");
        std::fs::write(&p, b"this is not gguf at all").unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains("bad.gguf") && e.contains("not a valid GGUF"),
            "{e}"
        );
        let e = GgufFile::open(dir.path().join("missing.gguf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.gguf"), "{e}");
    }
}
