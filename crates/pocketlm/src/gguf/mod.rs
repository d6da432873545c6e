//! Reading GGUF files: metadata and tensors. Quantized tensors stay quantized (as candle
//! `QTensor`s, or as [`GgufMatrix`]es used in place for the CPU kernels); float tensors are
//! returned as `f32` candle tensors.
//!
//! Format reference: ggml's `docs/gguf.md` (version 2 and 3 files). Parsing is done by
//! `candle_core::quantized::gguf_file`, except for the tensors of types it lacks (MXFP4,
//! IQ4_NL, IQ4_XS: [`set_aside`]); this module adds file-named errors, typed metadata
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
pub mod set_aside;

use crate::error::candle_message;
use crate::kernels::{GgufMatrix, GgufType, WeightBytes};
use crate::quant::mlx_fp::FpQuantized;
use crate::{Error, Result};
use set_aside::{SetAsideInfo, SetAsideType};

/// An opened GGUF file: its parsed header (metadata and tensor directory) and the file
/// memory-mapped, so that quantized weights are used in place (no copy, near-zero load time;
/// resident memory grows only with the pages actually read).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    /// Tensors of the types candle lacks (MXFP4, IQ4_NL, IQ4_XS), which `content` leaves out:
    /// [`set_aside`].
    set_aside: HashMap<String, SetAsideInfo>,
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
        let (content, set_aside) = set_aside::parse(&map).map_err(|e| {
            Error::Model(format!("{}: not a valid GGUF file ({e})", path.display()))
        })?;
        let file_len = map.len() as u64;
        for (name, info) in &set_aside {
            let ty = info.ty;
            let Some(bytes) = info.bytes() else {
                return Err(Error::Model(format!(
                    "{}: {} tensor `{name}` {:?} is not whole blocks of {} values",
                    path.display(),
                    ty.name(),
                    info.dims,
                    ty.block_size()
                )));
            };
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(bytes as u64));
            if end.is_none_or(|end| end > file_len) {
                return Err(Error::Model(format!(
                    "{}: truncated GGUF file: {} tensor `{name}` ends at byte {} but the file has {file_len} bytes",
                    path.display(),
                    ty.name(),
                    end.map_or("(overflow)".to_string(), |e| e.to_string())
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
            set_aside,
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
        self.content
            .tensor_infos
            .keys()
            .chain(self.set_aside.keys())
            .map(String::as_str)
    }

    /// Whether the file holds a tensor of this (GGUF) name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name) || self.set_aside.contains_key(name)
    }

    /// The directory entry of tensor `name` in candle's directory.
    ///
    /// Errors: [`Error::Tensor`] when it is missing, or of a type candle lacks (MXFP4: read only
    /// by [`Self::mxfp4_expert`]; IQ4_NL / IQ4_XS: read only by [`Self::matrix`],
    /// [`Self::expert_matrix`] and [`Self::tensor_f32`]).
    fn info(&self, name: &str) -> Result<&candle_core::quantized::gguf_file::TensorInfo> {
        self.content.tensor_infos.get(name).ok_or_else(|| {
            let why = match self.set_aside.get(name).map(|i| i.ty) {
                Some(SetAsideType::Mxfp4) => {
                    "is MXFP4 (ggml type 39), read only as stacked experts, in".to_string()
                }
                Some(SetAsideType::Kernel(t)) => format!(
                    "is {}, which only the CPU kernels read (as a matrix or dequantized to f32), in",
                    t.ggml_name()
                ),
                None => "missing from".to_string(),
            };
            Error::tensor(name, format!("{why} {}", self.path.display()))
        })
    }

    /// Whether tensor `name` is MXFP4 (ggml type 39; read it with [`Self::mxfp4_expert`]).
    pub fn is_mxfp4(&self, name: &str) -> bool {
        self.set_aside
            .get(name)
            .is_some_and(|i| i.ty == SetAsideType::Mxfp4)
    }

    /// The block type of tensor `name` when it is of a type that candle lacks but our CPU
    /// kernels read (IQ4_NL, IQ4_XS); `None` for every other tensor. Such a tensor is read only
    /// by [`Self::matrix`], [`Self::expert_matrix`] and [`Self::tensor_f32`] (our own
    /// dequantization); [`Self::qtensor`] and [`Self::tensor_info`] reject it by name.
    pub fn kernel_only_type(&self, name: &str) -> Option<GgufType> {
        match self.set_aside.get(name)?.ty {
            SetAsideType::Kernel(t) => Some(t),
            SetAsideType::Mxfp4 => None,
        }
    }

    /// Shape of tensor `name`, row-major, outermost first (e.g. `[vocab, hidden]` for
    /// `token_embd.weight`), whatever its type.
    ///
    /// Errors: [`Error::Tensor`] when it is missing.
    pub fn tensor_dims(&self, name: &str) -> Result<Vec<usize>> {
        match self.set_aside.get(name) {
            Some(i) => Ok(i.dims.clone()),
            None => Ok(self.info(name)?.shape.dims().to_vec()),
        }
    }

    /// A set-aside tensor of a kernel type (IQ4_NL, IQ4_XS) of `expected` shape (any rank of
    /// at least 1) as a matrix `[rows = product of the outer dims, cols = the last dim]` used
    /// in place from the mapped file.
    ///
    /// Errors: [`Error::Tensor`] naming the tensor when it is of another shape.
    fn kernel_only_matrix(
        &self,
        name: &str,
        ty: GgufType,
        info: &SetAsideInfo,
        expected: &[usize],
    ) -> Result<GgufMatrix> {
        if info.dims != expected {
            return Err(Error::tensor(
                name,
                format!(
                    "has shape {:?} in {}, expected {expected:?}",
                    info.dims,
                    self.path.display()
                ),
            ));
        }
        let cols = info.dims.last().copied().unwrap_or(0);
        let rows = info.dims[..info.dims.len().saturating_sub(1)]
            .iter()
            .product();
        // `open` checked that the blocks lie inside the file.
        let len = info.bytes().unwrap_or(usize::MAX);
        let start = usize::try_from(self.content.tensor_data_offset + info.offset)
            .map_err(|_| Error::tensor(name, "offset past the address space"))?;
        let bytes = WeightBytes::mapped(name, Arc::clone(&self.map), start, len)?;
        Ok(GgufMatrix::new(name, bytes, ty, rows, cols)?)
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
        let info = self
            .set_aside
            .get(name)
            .filter(|i| i.ty == SetAsideType::Mxfp4)
            .ok_or_else(|| {
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
        let set_aside: u64 = self
            .set_aside
            .values()
            .map(|i| i.bytes().unwrap_or(0) as u64)
            .sum();
        self.content
            .tensor_infos
            .values()
            .map(|i| {
                (i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size()) as u64
            })
            .sum::<u64>()
            + set_aside
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
        if let (Some(info), Some(ty)) = (self.set_aside.get(name), self.kernel_only_type(name)) {
            if expected.len() != 2 {
                return Err(Error::tensor(
                    name,
                    format!("read as a matrix with the shape {expected:?}, not 2-D"),
                ));
            }
            return self.kernel_only_matrix(name, ty, info, expected);
        }
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
        let (dims, dtype, offset) = match (self.set_aside.get(name), self.kernel_only_type(name)) {
            (Some(info), Some(ty)) => (info.dims.as_slice(), Ok(ty), info.offset),
            _ => {
                let info = self.info(name)?;
                let t = info.ggml_dtype;
                let ty = GgufType::from_ggml(t).ok_or(t);
                (info.shape.dims(), ty, info.offset)
            }
        };
        let [n, rows, cols] = expected;
        if dims != expected || expert >= n {
            return Err(Error::tensor(
                name,
                format!(
                    "has shape {dims:?} in {}, expected {expected:?} (expert {expert})",
                    self.path.display()
                ),
            ));
        }
        let dtype =
            dtype.map_err(|t| Error::tensor(name, format!("type {t:?} has no CPU kernel")))?;
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(Error::tensor(
                name,
                format!(
                    "{cols} columns is not a multiple of the {} block size {}",
                    dtype.ggml_name(),
                    dtype.block_size()
                ),
            ));
        }
        let one = rows * (cols / dtype.block_size()) * dtype.type_size();
        let start = usize::try_from(self.content.tensor_data_offset + offset)
            .map_err(|_| Error::tensor(name, "offset past the address space"))?
            + expert * one;
        let label = format!("{name}[{expert}]");
        let bytes = WeightBytes::mapped(&label, Arc::clone(&self.map), start, one)?;
        Ok(GgufMatrix::new(label, bytes, dtype, rows, cols)?)
    }

    /// Reads a tensor and dequantizes it to `f32`. `expected` as in [`Self::qtensor`]. IQ4_NL
    /// and IQ4_XS tensors (which candle lacks) are dequantized by our decoder (ggml's
    /// `dequantize_row_iq4_nl` / `dequantize_row_iq4_xs`), on the CPU, then moved to `device`.
    ///
    /// Errors: [`Error::Tensor`] naming the tensor when it is missing, of another shape, or
    /// MXFP4 (read only by [`Self::mxfp4_expert`]).
    pub fn tensor_f32(&self, name: &str, expected: &[usize], device: &Device) -> Result<Tensor> {
        if let (Some(info), Some(ty)) = (self.set_aside.get(name), self.kernel_only_type(name)) {
            let m = self.kernel_only_matrix(name, ty, info, expected)?;
            let t = Tensor::from_vec(m.dequantize(), expected, &Device::Cpu)?;
            return Ok(t.to_device(device)?);
        }
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
pub(crate) mod tests {
    use super::*;

    /// `scripts/golden/make_iq4_golden.py`'s file: IQ4_NL `[4, 128]` and IQ4_XS `[4, 512]`
    /// tensors and gguf-py's dequantization of them.
    pub(crate) fn iq4_golden() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/iq4/iq4.gguf")
    }

    pub(crate) const IQ4_TENSORS: [(&str, &str, [usize; 2], GgufType); 2] = [
        ("iq4_nl.weight", "iq4_nl.deq", [4, 128], GgufType::Iq4Nl),
        ("iq4_xs.weight", "iq4_xs.deq", [4, 512], GgufType::Iq4Xs),
    ];

    pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    pub(crate) fn f32s(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn iq4_golden_dequantization_is_bit_exact() {
        let f = GgufFile::open(iq4_golden()).unwrap();
        let cpu = Device::Cpu;
        for (name, deq, shape, ty) in IQ4_TENSORS {
            let want = f32s(&f.tensor_f32(deq, &shape, &cpu).unwrap());
            assert_eq!(f.kernel_only_type(name), Some(ty));
            assert_eq!(f.kernel_only_type(deq), None);
            assert!(f.has_tensor(name) && f.tensor_names().any(|n| n == name));
            assert_eq!(f.tensor_dims(name).unwrap(), shape);
            let m = f.matrix(name, &shape).unwrap();
            assert_eq!((m.dtype(), m.rows(), m.cols()), (ty, shape[0], shape[1]));
            assert!(m.weight_bytes().is_mapped());
            assert_eq!(bits(&m.dequantize()), bits(&want), "{name}");
            let t = f.tensor_f32(name, &shape, &cpu).unwrap();
            assert_eq!(bits(&f32s(&t)), bits(&want), "{name}");
            let e = m.embedding(&[3, 0]).unwrap();
            let k = shape[1];
            assert_eq!(bits(&e[..k]), bits(&want[3 * k..]), "{name}");
            // What candle would have to read is refused by name, never a panic.
            for e in [
                f.qtensor(name, &shape, &cpu).unwrap_err(),
                f.tensor_info(name).unwrap_err(),
                f.matrix(name, &[shape[0], shape[1] + 32]).unwrap_err(),
                f.tensor_f32(name, &[shape[1], shape[0]], &cpu).unwrap_err(),
                f.expert_matrix(name, [1, shape[0], shape[1]], 0)
                    .unwrap_err(),
                f.mxfp4_expert(name, [1, shape[0], shape[1]], 0)
                    .unwrap_err(),
            ] {
                assert!(e.to_string().contains(name), "{e}");
            }
            let e = f.qtensor(name, &shape, &cpu).unwrap_err().to_string();
            assert!(e.contains(ty.ggml_name()), "{e}");
        }
        let data: u64 = 4 * 128 * 4 + 4 * 512 * 4 + 16 * 18 + 8 * 136;
        assert_eq!(f.tensor_data_bytes(), data);
    }

    /// A GGUF v3 file with no metadata and `tensors` (name, dims outermost first, ggml type
    /// id, data), data aligned to 32 bytes as ggml writes it.
    pub(crate) fn write_gguf(path: &Path, tensors: &[(&str, &[usize], u32, &[u8])]) {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let mut offset = 0u64;
        for (name, dims, ty, data) in tensors {
            b.extend((name.len() as u64).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims.iter().rev() {
                b.extend((*d as u64).to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        for (_, _, _, data) in tensors {
            b.resize(b.len().div_ceil(32) * 32, 0);
            b.extend(*data);
        }
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn malformed_iq4_files_give_named_errors() {
        let good = std::fs::read(iq4_golden()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Cut into the last tensor (IQ4_XS).
        let p = dir.path().join("cut.gguf");
        std::fs::write(&p, &good[..good.len() - 100]).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains("cut.gguf") && e.contains("iq4_xs.weight") && e.contains("truncated"),
            "{e}"
        );
        // IQ4_NL rows of 100 values: not whole blocks of 32 (`ne[0]`, the row length, follows
        // the name and its dim count in the directory entry).
        let key = b"iq4_nl.weight";
        let at = good.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
        let mut bad = good.clone();
        bad[at..at + 8].copy_from_slice(&100u64.to_le_bytes());
        let p = dir.path().join("rows.gguf");
        std::fs::write(&p, &bad).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains("rows.gguf") && e.contains("iq4_nl.weight") && e.contains("IQ4_NL"),
            "{e}"
        );
        // A header cut short is no GGUF file at all.
        let p = dir.path().join("head.gguf");
        std::fs::write(&p, &good[..200]).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("head.gguf"), "{e}");
    }

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
