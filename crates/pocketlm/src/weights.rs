//! Where model code gets its weights from. Architectures ask for tensors by their Hugging Face
//! names; each source maps those names to its own (the "sanitize" step happens here, at load,
//! never in the forward pass) and decides whether a layer is dense or quantized.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::gguf::{hf_to_gguf_name, GgufFile};
use crate::nn::{Embedding, Linear};
use crate::{Error, Result};

/// The on-disk format the weights come from; a few architectures need to know it (llama.cpp
/// permutes Llama's q/k projection rows for its RoPE layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// A GGUF file (llama.cpp naming and layout).
    Gguf,
    /// Hugging Face safetensors (possibly MLX-quantized).
    Safetensors,
}

/// A source of named weights (Hugging Face names).
pub trait Weights {
    /// A linear layer `prefix.weight` `[out, in]` (and `prefix.bias` `[out]` when `bias`).
    fn linear(
        &self,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
    ) -> Result<Linear>;
    /// An embedding table `name` `[vocab, hidden]`.
    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding>;
    /// A float tensor of the given shape, as f32.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Whether a tensor exists.
    fn contains(&self, name: &str) -> bool;
    /// The device tensors are loaded onto.
    fn device(&self) -> &Device;
    /// Where the weights come from.
    fn format(&self) -> WeightFormat;
    /// Several bias-free linear layers over the same input (`prefixes[i]` of `[outs[i], in]`)
    /// stacked into one `[sum(outs), in]` layer, where the format and device make that cheaper
    /// (on a GPU one launch replaces several in decode); `None` where not, and the caller loads
    /// them one by one.
    fn stacked_linear(
        &self,
        prefixes: &[&str],
        outs: &[usize],
        in_features: usize,
    ) -> Result<Option<Linear>> {
        let _ = (prefixes, outs, in_features);
        Ok(None)
    }
}

/// Weights read from a GGUF file.
#[derive(Debug)]
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    device: Device,
    dequantize: bool,
}

impl<'a> GgufWeights<'a> {
    /// Weights from `file`, loaded onto `device`.
    pub fn new(file: &'a GgufFile, device: Device) -> Self {
        Self {
            file,
            device,
            dequantize: false,
        }
    }

    /// Dequantize every weight to f32 at load (dense layers only): the model then computes
    /// exactly what the float reference does with these weights, at 4-8x the memory.
    pub fn dequantized(mut self, yes: bool) -> Self {
        self.dequantize = yes;
        self
    }

    /// Whether a tensor goes to our CPU kernels: quantized, of a type they handle, on the CPU,
    /// and not asked to be dequantized.
    fn uses_kernels(&self, gguf_name: &str) -> Result<bool> {
        let (_, dtype) = self.file.tensor_info(gguf_name)?;
        Ok(self.device.is_cpu()
            && !self.dequantize
            && !is_float(dtype)
            && crate::kernels::GgufType::from_ggml(dtype).is_some())
    }

    /// On a CUDA device, GGUF tensors `names` (row blocks `outs` x `in_features`, one type our
    /// kernels take) stacked by rows into one [`crate::cuda::CudaQMatrix`] layer; `None` when
    /// not on CUDA, dequantizing, or of another type.
    #[cfg(feature = "cuda")]
    fn cuda_linear(
        &self,
        names: &[&str],
        outs: &[usize],
        in_features: usize,
        bias: Option<Tensor>,
    ) -> Result<Option<Linear>> {
        use crate::cuda::CudaQMatrix;
        if !self.device.is_cuda() || self.dequantize || names.len() != outs.len() {
            return Ok(None);
        }
        let Some((dtype, raw)) = self.stacked_blocks(names, outs, in_features, |t| {
            CudaQMatrix::supports_gguf(t, in_features)
        })?
        else {
            return Ok(None);
        };
        let rows = outs.iter().sum();
        let m = CudaQMatrix::from_gguf(dtype, &raw, rows, in_features, &self.device)
            .map_err(|e| Error::tensor(names[0], e.to_string()))?;
        Ok(Some(Linear::Cuda {
            weight: std::sync::Arc::new(m),
            bias,
        }))
    }

    /// The ggml blocks of quantized tensors `names` (`outs[i] x in_features` each), stacked by
    /// rows into one buffer, when all have one type and `accept` takes it; `None` otherwise.
    fn stacked_blocks(
        &self,
        names: &[&str],
        outs: &[usize],
        in_features: usize,
        accept: impl Fn(candle_core::quantized::GgmlDType) -> bool,
    ) -> Result<Option<(candle_core::quantized::GgmlDType, Vec<u8>)>> {
        let mut dtype = None;
        for n in names {
            let (_, t) = self.file.tensor_info(n)?;
            if !accept(t) || dtype.is_some_and(|d| d != t) {
                return Ok(None);
            }
            dtype = Some(t);
        }
        let Some(dtype) = dtype else { return Ok(None) };
        let mut raw = Vec::new();
        for (n, &o) in names.iter().zip(outs) {
            let q = self.file.qtensor(n, &[o, in_features], &Device::Cpu)?;
            raw.extend_from_slice(&q.data()?);
        }
        Ok(Some((dtype, raw)))
    }

    fn gguf_name(&self, name: &str) -> Result<String> {
        hf_to_gguf_name(name).ok_or_else(|| {
            Error::tensor(
                name,
                format!(
                    "has no GGUF counterpart (in {})",
                    self.file.path().display()
                ),
            )
        })
    }
}

impl Weights for GgufWeights<'_> {
    fn linear(
        &self,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
    ) -> Result<Linear> {
        let w = self.gguf_name(&format!("{prefix}.weight"))?;
        let b = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out_features])?)
        } else {
            None
        };
        if self.uses_kernels(&w)? {
            let weight = self.file.matrix(&w, &[out_features, in_features])?;
            return Ok(Linear::Kernel { weight, bias: b });
        }
        #[cfg(feature = "cuda")]
        if let Some(l) = self.cuda_linear(&[&w], &[out_features], in_features, b.clone())? {
            return Ok(l);
        }
        let q = self
            .file
            .qtensor(&w, &[out_features, in_features], &self.device)?;
        if self.dequantize || is_float(q.dtype()) {
            Ok(Linear::dense(
                q.dequantize(&self.device)?.to_dtype(DType::F32)?,
                b,
            ))
        } else {
            Linear::gguf(Arc::new(q), b)
        }
    }

    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        let g = self.gguf_name(name)?;
        if self.uses_kernels(&g)? {
            return Ok(Embedding::Kernel(self.file.matrix(&g, &[vocab, hidden])?));
        }
        let q = self.file.qtensor(&g, &[vocab, hidden], &self.device)?;
        if self.dequantize || is_float(q.dtype()) {
            Ok(Embedding::Dense(q.dequantize(&self.device)?))
        } else {
            Ok(Embedding::Gguf(Arc::new(q)))
        }
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let g = self.gguf_name(name)?;
        self.file.tensor_f32(&g, shape, &self.device)
    }

    fn contains(&self, name: &str) -> bool {
        hf_to_gguf_name(name).is_some_and(|g| self.file.has_tensor(&g))
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn format(&self) -> WeightFormat {
        WeightFormat::Gguf
    }

    fn stacked_linear(
        &self,
        prefixes: &[&str],
        outs: &[usize],
        in_features: usize,
    ) -> Result<Option<Linear>> {
        if !self.device.is_cuda() || self.dequantize || prefixes.len() != outs.len() {
            return Ok(None);
        }
        let names = prefixes
            .iter()
            .map(|p| self.gguf_name(&format!("{p}.weight")))
            .collect::<Result<Vec<_>>>()?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        #[cfg(feature = "cuda")]
        if let Some(l) = self.cuda_linear(&names, outs, in_features, None)? {
            return Ok(Some(l));
        }
        let Some((dtype, raw)) =
            self.stacked_blocks(&names, outs, in_features, |t| !is_float(t))?
        else {
            return Ok(None);
        };
        let rows = outs.iter().sum();
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &raw,
            vec![rows, in_features],
            &self.device,
        )?;
        Ok(Some(Linear::gguf(Arc::new(q), None)?))
    }
}

fn is_float(t: candle_core::quantized::GgmlDType) -> bool {
    use candle_core::quantized::GgmlDType as G;
    matches!(t, G::F32 | G::F16 | G::BF16)
}
