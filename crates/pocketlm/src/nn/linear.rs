//! Linear layers and embeddings whose weights may be dense (float) or quantized.
//! "Quantization is a property of a layer": the loader decides which variant a layer gets.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use super::lora::{dense_forward, LoraLinear};
use super::Mode;
use crate::kernels::mlx as mlx_kernels;
use crate::kernels::{forward_refs, Backend, GgufMatrix, MatRef, PackedMlx};
use crate::quant::mlx_affine::{AffineQuantized, ParamDtype};
use crate::quant::mlx_fp::FpQuantized;
use crate::{Error, Result};

/// A linear layer `y = x W^T + b`.
///
/// `x: [.., in_features]` (f32) -> `[.., out_features]` (f32). The weight is stored
/// `[out_features, in_features]` as in PyTorch / Hugging Face.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Float weight `[out, in]` and optional bias `[out]`.
    Dense(candle_nn::Linear),
    /// A GGUF block-quantized weight (`Q4_0`, `Q4_1`, `Q8_0`, k-quants, ...); the product
    /// quantizes activations like llama.cpp's `ggml_mul_mat` on CPU.
    Gguf {
        /// The quantized weight `[out, in]`.
        weight: QMatMul,
        /// Optional float bias `[out]`.
        bias: Option<Tensor>,
        /// `out_features`.
        out_features: usize,
        /// `in_features`.
        in_features: usize,
    },
    /// A GGUF block-quantized weight used in place by our CPU kernels ([`crate::kernels`]).
    Kernel {
        /// The quantized weight `[out, in]`.
        weight: GgufMatrix,
        /// Optional float bias `[out]`.
        bias: Option<Tensor>,
    },
    /// An MLX affine group-quantized weight (`QuantizedLinear` of mlx-community checkpoints):
    /// `y = x (scale * q + bias)^T`. 2- to 6-bit weights with an f32 input on the CPU use our
    /// kernels ([`crate::kernels::mlx`]: the input quantized to 8 bits per 32 values, like
    /// the GGUF path); 8-bit ones (and any loaded with `exact_mlx_matmul`) compute in f32 like
    /// `mx.quantized_matmul(x, w, scales, biases, transpose=True)` with an f32 `x`
    /// ([`AffineQuantized::matmul`]), copying inputs on another device to the CPU and back.
    Mlx {
        /// The quantized weight, `rows = out_features`, `cols = in_features`.
        weight: Arc<AffineQuantized>,
        /// Optional float bias `[out]`.
        bias: Option<Tensor>,
    },
    /// A weight in one of MLX's float modes (`mxfp4`, `mxfp8`, `nvfp4`;
    /// [`crate::quant::mlx_fp`]): `y = x (element * scale)^T`, computed in f32 like
    /// `mx.quantized_matmul(x, w, scales, mode=..., transpose=True)` with an f32 `x`
    /// ([`FpQuantized::matmul`]: per group, the dot product with the unscaled elements times
    /// the group's scale), inputs on another device copied to the CPU and back.
    MlxFp {
        /// The quantized weight, `rows = out_features`, `cols = in_features`.
        weight: Arc<FpQuantized>,
        /// Optional float bias `[out]`.
        bias: Option<Tensor>,
    },
    /// An MLX affine 2- to 6-bit weight repacked at load in groups of 16 rows for this CPU's
    /// AVX-512 VNNI kernels ([`PackedMlx`]); the numerics of [`Self::Mlx`]'s kernels up to
    /// float summation order.
    MlxPacked {
        /// The packed weight, `rows = out_features`, `cols = in_features`.
        weight: Arc<PackedMlx>,
        /// Optional float bias `[out]`.
        bias: Option<Tensor>,
    },
    /// A quantized weight (MLX affine 4/8-bit, GGUF `Q4_0`/`Q4_1`/`Q8_0`) held on a CUDA device
    /// and run by our kernels ([`crate::cuda::CudaQMatrix`]): integer GEMV for decode, f16
    /// dequantize + cuBLAS for prefill.
    #[cfg(feature = "cuda")]
    Cuda {
        /// The quantized weight on the GPU, `[out, in]`.
        weight: Arc<crate::cuda::CudaQMatrix>,
        /// Optional float bias `[out]`.
        bias: Option<Tensor>,
    },
    /// A frozen layer with a LoRA adapter (see [`super::lora::LoraLinear`]); loading an
    /// adapter swaps a layer for this variant and unloading swaps the base back.
    Lora(Box<LoraLinear>),
}

impl Linear {
    /// A dense layer from a weight `[out, in]` and an optional bias `[out]`.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::Dense(candle_nn::Linear::new(weight, bias))
    }

    /// A layer over a GGUF quantized weight of shape `[out, in]`.
    pub fn gguf(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        Ok(Self::Gguf {
            weight: QMatMul::from_arc(weight)?,
            bias,
            out_features,
            in_features,
        })
    }

    /// A layer over an MLX affine quantized weight (`rows = out`, `cols = in`) and an optional
    /// float bias `[out]`.
    pub fn mlx(weight: Arc<AffineQuantized>, bias: Option<Tensor>) -> Self {
        Self::Mlx { weight, bias }
    }

    /// An MLX affine quantized layer for `device`: on CUDA, uploaded once for our kernels
    /// (bits 4 and 8) or dequantized to a dense f32 weight (other widths); elsewhere
    /// [`Self::mlx`].
    pub fn mlx_on(
        weight: Arc<AffineQuantized>,
        bias: Option<Tensor>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            if crate::cuda::CudaQMatrix::supports_mlx(&weight) {
                let weight = Arc::new(crate::cuda::CudaQMatrix::from_mlx(&weight, device)?);
                return Ok(Self::Cuda { weight, bias });
            }
            let dense = Tensor::from_vec(
                weight.dequantize(),
                (weight.rows(), weight.cols()),
                &candle_core::Device::Cpu,
            )?
            .to_device(device)?;
            return Ok(Self::dense(dense, bias));
        }
        let _ = device;
        Ok(Self::mlx(weight, bias))
    }

    /// A layer over a weight in one of MLX's float modes for `device`: on the CPU
    /// [`Self::MlxFp`]; elsewhere dequantized (f32) to a dense weight on `device` (no GPU
    /// kernels for these modes yet).
    pub fn mlx_fp_on(
        weight: Arc<FpQuantized>,
        bias: Option<Tensor>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        if device.is_cpu() {
            return Ok(Self::MlxFp { weight, bias });
        }
        let dense = Tensor::from_vec(
            weight.dequantize(ParamDtype::F32),
            (weight.rows(), weight.cols()),
            &candle_core::Device::Cpu,
        )?
        .to_device(device)?;
        Ok(Self::dense(dense, bias))
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        match self {
            Self::Dense(l) => l.weight().dim(1).unwrap_or(0),
            Self::Gguf { in_features, .. } => *in_features,
            Self::Kernel { weight, .. } => weight.cols(),
            Self::Mlx { weight, .. } => weight.cols(),
            Self::MlxPacked { weight, .. } => weight.cols(),
            Self::MlxFp { weight, .. } => weight.cols(),
            #[cfg(feature = "cuda")]
            Self::Cuda { weight, .. } => weight.dims().1,
            Self::Lora(l) => l.base.in_features(),
        }
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        match self {
            Self::Dense(l) => l.weight().dim(0).unwrap_or(0),
            Self::Gguf { out_features, .. } => *out_features,
            Self::Kernel { weight, .. } => weight.rows(),
            Self::Mlx { weight, .. } => weight.rows(),
            Self::MlxPacked { weight, .. } => weight.rows(),
            Self::MlxFp { weight, .. } => weight.rows(),
            #[cfg(feature = "cuda")]
            Self::Cuda { weight, .. } => weight.dims().0,
            Self::Lora(l) => l.base.out_features(),
        }
    }

    /// The optional bias `[out]`.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(l) => l.bias(),
            Self::Gguf { bias, .. }
            | Self::Kernel { bias, .. }
            | Self::Mlx { bias, .. }
            | Self::MlxPacked { bias, .. }
            | Self::MlxFp { bias, .. } => bias.as_ref(),
            Self::Lora(l) => l.base.bias(),
            #[cfg(feature = "cuda")]
            Self::Cuda { bias, .. } => bias.as_ref(),
        }
    }

    /// The matrix of a bias-free layer of our CUDA kernels' formats (no adapter), else `None`:
    /// what the fused CUDA kernels take.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_matrix(&self) -> Option<&std::sync::Arc<crate::cuda::CudaQMatrix>> {
        match self {
            Self::Cuda { weight, bias: None } => Some(weight),
            _ => None,
        }
    }

    /// The same layer with `bias` `[out]` in place of its own (gpt-oss's experts: the stacked
    /// weights come without biases, which are stored beside them).
    ///
    /// Errors: a bias that is not `[out]`.
    pub fn with_bias(self, bias: Option<Tensor>) -> Result<Self> {
        if let Some(b) = &bias {
            if b.dims() != [self.out_features()] {
                return Err(Error::InvalidArgument(format!(
                    "bias of shape {:?} for a layer of {} outputs",
                    b.dims(),
                    self.out_features()
                )));
            }
        }
        Ok(match self {
            Self::Dense(l) => Self::dense(l.weight().clone(), bias),
            Self::Gguf {
                weight,
                out_features,
                in_features,
                ..
            } => Self::Gguf {
                weight,
                bias,
                out_features,
                in_features,
            },
            Self::Kernel { weight, .. } => Self::Kernel { weight, bias },
            Self::Mlx { weight, .. } => Self::Mlx { weight, bias },
            Self::MlxPacked { weight, .. } => Self::MlxPacked { weight, bias },
            Self::MlxFp { weight, .. } => Self::MlxFp { weight, bias },
            #[cfg(feature = "cuda")]
            Self::Cuda { weight, .. } => Self::Cuda { weight, bias },
            Self::Lora(mut l) => {
                l.base = l.base.with_bias(bias)?;
                Self::Lora(l)
            }
        })
    }

    /// The weight `[out, in]` as f32 (quantized weights dequantized; a LoRA layer gives its
    /// base weight, without the update).
    pub fn dequantized_weight(&self) -> Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        let (o, i) = (self.out_features(), self.in_features());
        Ok(match self {
            Self::Dense(l) => l.weight().to_dtype(DType::F32)?,
            Self::Gguf { weight, .. } => match weight {
                QMatMul::QTensor(q) => q.dequantize(&cpu)?,
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
            },
            Self::Kernel { weight, .. } => Tensor::from_vec(weight.dequantize(), (o, i), &cpu)?,
            Self::Mlx { weight, .. } => Tensor::from_vec(weight.dequantize(), (o, i), &cpu)?,
            Self::MlxPacked { weight, .. } => Tensor::from_vec(weight.dequantize(), (o, i), &cpu)?,
            Self::MlxFp { weight, .. } => {
                Tensor::from_vec(weight.dequantize(ParamDtype::F32), (o, i), &cpu)?
            }
            Self::Lora(l) => l.base.dequantized_weight()?,
            #[cfg(feature = "cuda")]
            Self::Cuda { .. } => {
                return Err(Error::InvalidArgument(
                    "a quantized layer held on a CUDA device cannot be dequantized here; \
                     load the model on the CPU to fuse or fine-tune"
                        .into(),
                ))
            }
        })
    }

    /// Differentiable forward for training (see [`crate::lora::train`]): a dense weight or a
    /// LoRA layer's training weight runs as candle ops, so gradients flow to `x`; quantized
    /// layers run their inference kernels (no gradient to `x`). `train` turns dropout on.
    pub fn forward_train(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Dense(l) => dense_forward(l.weight(), l.bias(), x),
            Self::Lora(l) => l.forward_train(x, train),
            _ => self.forward(x),
        }
    }

    /// [`Self::forward`] for [`Mode::Inference`], [`Self::forward_train`] (with the mode's
    /// dropout) for [`Mode::Training`]: `x: [.., in]` -> `[.., out]`.
    pub fn forward_mode(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Inference => self.forward(x),
            Mode::Training { dropout } => self.forward_train(x, dropout),
        }
    }

    /// Several layers applied to the same input, `x: [.., in]` -> one `[.., out_i]` each. When
    /// all use our CPU kernels the input is quantized once and one parallel pass runs them all
    /// (q/k/v, gate/up); otherwise each runs on its own.
    pub fn forward_many(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        if layers.len() > 1 && x.device().is_cpu() && x.dtype() == DType::F32 {
            if let Some(refs) = Self::kernel_refs(layers, x) {
                return forward_refs(Backend::detect(), &refs, x);
            }
        }
        layers.iter().map(|l| l.forward(x)).collect()
    }

    /// Layers each on its own input, `xs[i]: [.., in_i]` -> `[.., out_i]` (all inputs with the
    /// same leading dimensions; a mixture of experts' down projections on their experts'
    /// activations). When all use our CPU kernels one parallel pass runs them all (each input
    /// quantized on its own); otherwise each runs on its own. Either way each output is
    /// [`Self::forward`]'s, bit for bit.
    ///
    /// Errors: `xs.len() != layers.len()`; those of [`Self::forward`].
    pub fn forward_each(layers: &[&Linear], xs: &[Tensor]) -> Result<Vec<Tensor>> {
        if layers.len() != xs.len() {
            return Err(Error::InvalidArgument(format!(
                "{} inputs for {} layers",
                xs.len(),
                layers.len()
            )));
        }
        let cpu_f32 = xs
            .iter()
            .all(|x| x.device().is_cpu() && x.dtype() == DType::F32);
        if layers.len() > 1 && cpu_f32 {
            let refs: Option<Vec<MatRef<'_>>> = layers
                .iter()
                .zip(xs)
                .map(|(l, x)| Self::kernel_refs(std::slice::from_ref(l), x)?.pop())
                .collect();
            if let Some(refs) = refs {
                return crate::kernels::forward_refs_each(Backend::detect(), &refs, xs);
            }
        }
        layers.iter().zip(xs).map(|(l, x)| l.forward(x)).collect()
    }

    /// The kernel matrices of `layers` when every one of them runs on our CPU kernels for
    /// input `x` with no bias (what [`Self::forward_many`] batches), else `None`.
    fn kernel_refs<'a>(layers: &[&'a Linear], x: &Tensor) -> Option<Vec<MatRef<'a>>> {
        layers
            .iter()
            .map(|l| match l {
                Self::Kernel { weight, bias: None } => Some(weight.mat_ref()),
                Self::Mlx { weight, bias: None } if mlx_fast(weight, x) => {
                    mlx_kernels::mat_ref(weight).ok()
                }
                Self::MlxPacked { weight, bias: None } => Some(weight.mat_ref()),
                _ => None,
            })
            .collect()
    }

    /// `x: [.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => Ok(l.forward(x)?),
            Self::Gguf { weight, bias, .. } => add_bias(weight.forward(x)?, bias),
            Self::Kernel { weight, bias } => add_bias(weight.forward(x)?, bias),
            Self::Mlx { weight, bias } if mlx_fast(weight, x) => {
                let y = mlx_kernels::forward_fused(&[weight], x)?.pop();
                add_bias(
                    y.ok_or_else(|| Error::InvalidArgument("no output".into()))?,
                    bias,
                )
            }
            Self::Mlx { weight, bias } => add_bias(
                mlx_matmul(
                    weight.cols(),
                    x,
                    |xs, m| Ok(weight.matmul(xs, m)?),
                    weight.rows(),
                )?,
                bias,
            ),
            Self::MlxFp { weight, bias } => add_bias(
                mlx_matmul(
                    weight.cols(),
                    x,
                    |xs, m| Ok(weight.matmul(xs, m)?),
                    weight.rows(),
                )?,
                bias,
            ),
            Self::MlxPacked { weight, bias } => {
                // The kernels take f32 on the CPU; other inputs are converted there and back,
                // as `mlx_matmul` does.
                let xf = x
                    .to_dtype(DType::F32)?
                    .to_device(&candle_core::Device::Cpu)?;
                let y = forward_refs(Backend::detect(), &[weight.mat_ref()], &xf)?
                    .pop()
                    .ok_or_else(|| Error::InvalidArgument("no output".into()))?;
                add_bias(y.to_device(x.device())?, bias)
            }
            #[cfg(feature = "cuda")]
            Self::Cuda { weight, bias } => add_bias(weight.forward(x)?, bias),
            Self::Lora(l) => l.forward(x),
        }
    }
}

/// Whether an MLX product runs on our kernels (which quantize activations to 8 bits, as
/// ggml does): 2-, 3-, 4-, 5- and 6-bit weights with an f32 input on the CPU. 8-bit layers
/// keep the exact f32 arithmetic of `mx.quantized_matmul`: at 8 bits the activation rounding
/// is no longer small against the weights' own, and moved the logits of the tiny 8-bit models
/// of `tests/it/archs_golden.rs` by up to 2.6 from transformers on the same dequantized
/// weights. (At 6 bits a weight's rounding, up to `range / 126` of its group, still exceeds
/// an activation's, up to `amax / 254` of its block, as with llama.cpp's `Q6_K × Q8_K`.)
/// Weights loaded with [`crate::loader::LoadOptions::exact_mlx_matmul`] also keep it.
fn mlx_fast(w: &AffineQuantized, x: &Tensor) -> bool {
    w.bits() != 8
        && !w.exact_matmul()
        && mlx_kernels::supports(w)
        && x.device().is_cpu()
        && x.dtype() == DType::F32
}

fn add_bias(y: Tensor, bias: &Option<Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `x: [.., in]` (any float dtype, any device) -> `[.., out]` f32 on `x`'s device, through
/// `matmul(x: [m, in] f32, m) -> [m, out]` on the CPU.
fn mlx_matmul(
    in_features: usize,
    x: &Tensor,
    matmul: impl Fn(&[f32], usize) -> Result<Vec<f32>>,
    out_features: usize,
) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = dims.pop().unwrap_or(0);
    if k != in_features {
        return Err(Error::InvalidArgument(format!(
            "quantized linear layer takes {in_features} input features, got {k}"
        )));
    }
    let m: usize = dims.iter().product();
    let xs = x
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f32>()?;
    let y = matmul(&xs, m)?;
    dims.push(out_features);
    Ok(Tensor::from_vec(y, dims, &candle_core::Device::Cpu)?.to_device(x.device())?)
}

/// A token embedding table `[vocab, hidden]`, dense or GGUF-quantized. Quantized tables are
/// dequantized row by row at lookup, so the table stays at its quantized size in memory.
#[derive(Debug, Clone)]
pub enum Embedding {
    /// Float table `[vocab, hidden]`.
    Dense(Tensor),
    /// Quantized table `[vocab, hidden]`.
    Gguf(Arc<QTensor>),
    /// Quantized table `[vocab, hidden]` used in place by our CPU kernels (lookups read the
    /// file's layout).
    Kernel {
        /// The table.
        table: GgufMatrix,
        /// Whether [`Self::as_linear`] gives a copy packed for this CPU's fastest kernels
        /// ([`GgufMatrix::repacked`]; the loader's repacking setting).
        repack_output: bool,
    },
    /// MLX affine quantized table (`QuantizedEmbedding`), `rows = vocab`, `cols = hidden`;
    /// looked-up rows are dequantized like `mx.dequantize` (in the dtype of the scales, then
    /// widened to f32).
    Mlx(Arc<AffineQuantized>),
    /// A table in one of MLX's float modes (`QuantizedEmbedding` with `mode="mxfp4"` etc.),
    /// `rows = vocab`, `cols = hidden`; looked-up rows are dequantized like mlx-lm's
    /// `mx.dequantize` call (its default output dtype, bf16, then widened to f32).
    MlxFp(Arc<FpQuantized>),
    /// A quantized table held on a CUDA device ([`crate::cuda::CudaQMatrix`]), looked up by
    /// our kernel (the same values as [`Self::Mlx`] / [`Self::Gguf`] give).
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::CudaQMatrix>),
}

impl Embedding {
    /// `ids: [..] u32` -> `[.., hidden]` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => {
                let mut dims = ids.dims().to_vec();
                dims.push(w.dim(1)?);
                Ok(w.index_select(&ids.flatten_all()?, 0)?.reshape(dims)?)
            }
            Self::Gguf(q) => Ok(q.embedding(ids)?),
            Self::Kernel { table: w, .. } => {
                let mut dims = ids.dims().to_vec();
                dims.push(w.cols());
                let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let rows = w.embedding(&flat)?;
                Ok(Tensor::from_vec(rows, dims, ids.device())?)
            }
            #[cfg(feature = "cuda")]
            Self::Cuda(q) => q.embedding(ids),
            Self::Mlx(q) => {
                let flat = ids
                    .flatten_all()?
                    .to_device(&candle_core::Device::Cpu)?
                    .to_vec1::<u32>()?;
                let h = q.cols();
                let mut out = vec![0f32; flat.len() * h];
                for (id, row) in flat.iter().zip(out.chunks_exact_mut(h.max(1))) {
                    q.dequantize_row(*id as usize, row)?;
                }
                let mut dims = ids.dims().to_vec();
                dims.push(h);
                Ok(Tensor::from_vec(out, dims, &candle_core::Device::Cpu)?
                    .to_device(ids.device())?)
            }
            Self::MlxFp(q) => {
                let flat = ids
                    .flatten_all()?
                    .to_device(&candle_core::Device::Cpu)?
                    .to_vec1::<u32>()?;
                let h = q.cols();
                let mut out = vec![0f32; flat.len() * h];
                for (id, row) in flat.iter().zip(out.chunks_exact_mut(h.max(1))) {
                    q.dequantize_row(*id as usize, row, ParamDtype::BF16)?;
                }
                let mut dims = ids.dims().to_vec();
                dims.push(h);
                Ok(Tensor::from_vec(out, dims, &candle_core::Device::Cpu)?
                    .to_device(ids.device())?)
            }
        }
    }

    /// The same weights as an output projection (`hidden -> vocab`), for tied embeddings, on
    /// `device` (where the model runs; MLX tables stay on the CPU for lookups).
    pub fn as_linear(&self, device: &candle_core::Device) -> Result<Linear> {
        match self {
            Self::Dense(w) => Ok(Linear::dense(w.clone(), None)),
            Self::Gguf(q) => Linear::gguf(q.clone(), None),
            // A tied output layer reads the whole table each step, so packing it costs no
            // memory that the product would not touch anyway (the copy is owned; lookups keep
            // reading the mapped file).
            Self::Kernel {
                table,
                repack_output,
            } => Ok(Linear::Kernel {
                weight: if *repack_output {
                    table.clone().repacked()
                } else {
                    table.clone()
                },
                bias: None,
            }),
            Self::Mlx(q) => Linear::mlx_on(q.clone(), None, device),
            Self::MlxFp(q) => Linear::mlx_fp_on(q.clone(), None, device),
            #[cfg(feature = "cuda")]
            Self::Cuda(q) => Ok(Linear::Cuda {
                weight: q.clone(),
                bias: None,
            }),
        }
    }

    /// `(vocab, hidden)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Dense(w) => w.dims2()?,
            Self::Gguf(q) => q.shape().dims2()?,
            Self::Kernel { table: w, .. } => (w.rows(), w.cols()),
            Self::Mlx(q) => (q.rows(), q.cols()),
            Self::MlxFp(q) => (q.rows(), q.cols()),
            #[cfg(feature = "cuda")]
            Self::Cuda(q) => q.dims(),
        })
    }
}
