//! One placement policy for every weight source: which [`Linear`] / [`Embedding`] kind a stored
//! tensor becomes, from how it is stored (float, a GGUF block type, MLX affine), the device and
//! whether the user asked for float weights. Quantization is a property of a layer, decided
//! here once ("Quantization is a property of a layer", as mlx's `nn.quantize` with a class
//! predicate).
//!
//! | stored | `dequantize` | CPU | CUDA |
//! |---|---|---|---|
//! | float | either | dense | dense |
//! | GGUF type of our CPU kernels (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) | no | [`Linear::Kernel`] (memory-mapped; Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K repacked in 16-row groups on CPUs with AVX-512 VNNI) | [`Linear::Cuda`] where our CUDA kernels take the type, else candle's [`Linear::Gguf`] |
//! | GGUF IQ4_NL, IQ4_XS (which candle cannot read) | no | [`Linear::Kernel`] (memory-mapped; repacked in 16-row groups on CPUs with AVX-512 VNNI and BW) | dense f32 (our dequantization) |
//! | other GGUF block types | no | [`Linear::Gguf`] | as above |
//! | MLX affine | no | [`Linear::Mlx`] ([`Linear::MlxPacked`] for 4-bit on CPUs with AVX-512 VNNI, 2/3/5/6-bit with VBMI2 as well) | [`Linear::Cuda`] for 4/8-bit, else dense |
//! | MLX `mxfp4` / `mxfp8` / `nvfp4` | no | [`Linear::MlxFp`] | dense |
//! | any quantized | yes | dense f32 | dense f32 |
//!
//! Embedding tables follow the same rows, except that GGUF tables on CUDA stay candle's
//! quantized tensors (looked up by row) and MLX tables of the types our CUDA kernels take
//! become [`Embedding::Cuda`].

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::gguf::GgufFile;
use crate::kernels::PackedMlx;
use crate::nn::{Embedding, Linear};
use crate::quant::mlx_affine::{AffineQuantized, ParamDtype};
use crate::quant::mlx_fp::FpQuantized;
use crate::Result;

/// A weight matrix as a source holds it.
pub enum Stored<'a> {
    /// A float tensor (any float dtype, any device).
    Float(Tensor),
    /// A tensor of a GGUF file, `[rows, cols]`, by its GGUF name.
    Gguf {
        /// The file.
        file: &'a GgufFile,
        /// Its GGUF name.
        name: &'a str,
        /// `[rows, cols]`.
        shape: [usize; 2],
    },
    /// An MLX affine group-quantized matrix.
    Mlx(AffineQuantized),
    /// A matrix in one of MLX's float quantization modes (`mxfp4`, `mxfp8`, `nvfp4`).
    MlxFp(FpQuantized),
}

/// Where weights go and whether to dequantize them (see the module docs).
#[derive(Debug, Clone)]
pub struct Placement {
    /// The device the layers run on.
    pub device: Device,
    /// Dequantize every quantized weight to f32 at load (the float reference's numbers, at 4-8x
    /// the memory).
    pub dequantize: bool,
    /// Repack GGUF and MLX 4-bit weights for this CPU's fastest kernels where it has them
    /// ([`crate::kernels::GgufMatrix::repacked`], [`PackedMlx`]); `false` keeps the file's
    /// layout.
    pub repack: bool,
}

impl Placement {
    /// The linear layer `stored` becomes, with an optional float `bias` `[rows]`.
    ///
    /// Errors: a tensor that cannot be read or does not have `shape` (named).
    pub fn linear(&self, stored: Stored<'_>, bias: Option<Tensor>) -> Result<Linear> {
        match stored {
            Stored::Float(t) => Ok(Linear::dense(self.f32(t)?, bias)),
            Stored::Mlx(q) if self.dequantize => Ok(Linear::dense(self.dense_mlx(&q)?, bias)),
            Stored::Mlx(q) if self.packs_mlx(&q) => match PackedMlx::pack(&q) {
                Some(p) => Ok(Linear::MlxPacked {
                    weight: Arc::new(p),
                    bias,
                }),
                None => Linear::mlx_on(Arc::new(q), bias, &self.device),
            },
            Stored::Mlx(q) => Linear::mlx_on(Arc::new(q), bias, &self.device),
            Stored::MlxFp(q) if self.dequantize => Ok(Linear::dense(self.dense_fp(&q)?, bias)),
            Stored::MlxFp(q) => Linear::mlx_fp_on(Arc::new(q), bias, &self.device),
            Stored::Gguf { file, name, shape } if file.kernel_only_type(name).is_some() => {
                if self.kernel_only_on_cpu() {
                    let weight = file.matrix(name, &shape)?;
                    let weight = if self.repack {
                        weight.repacked()
                    } else {
                        weight
                    };
                    return Ok(Linear::Kernel { weight, bias });
                }
                let w = file.tensor_f32(name, &shape, &self.device)?;
                Ok(Linear::dense(w, bias))
            }
            Stored::Gguf { file, name, shape } => {
                let (_, dtype) = file.tensor_info(name)?;
                if self.uses_cpu_kernels(dtype) {
                    // Repacked for this CPU's fastest kernels where it has them; embedding
                    // tables (below) keep GGUF's row layout for lookups, and a tied output
                    // layer gets a packed copy in the unpacked kernels' float order
                    // (`Embedding::as_linear`).
                    let weight = file.matrix(name, &shape)?;
                    let weight = if self.repack {
                        weight.repacked()
                    } else {
                        weight
                    };
                    return Ok(Linear::Kernel { weight, bias });
                }
                #[cfg(feature = "cuda")]
                if let Some(l) =
                    self.cuda_gguf(file, &[name], &[shape[0]], shape[1], bias.clone())?
                {
                    return Ok(l);
                }
                let q = file.qtensor(name, &shape, &self.device)?;
                self.ggml(q, bias)
            }
        }
    }

    /// The embedding table `[vocab, hidden]` `stored` becomes.
    ///
    /// Errors: as [`Self::linear`].
    pub fn embedding(&self, stored: Stored<'_>) -> Result<Embedding> {
        match stored {
            Stored::Float(t) => Ok(Embedding::Dense(self.f32(t)?)),
            Stored::Mlx(q) if self.dequantize => Ok(Embedding::Dense(self.dense_mlx(&q)?)),
            #[cfg(feature = "cuda")]
            Stored::Mlx(q)
                if self.device.is_cuda() && crate::cuda::CudaQMatrix::supports_mlx(&q) =>
            {
                let m = crate::cuda::CudaQMatrix::from_mlx(&q, &self.device)?;
                Ok(Embedding::Cuda(Arc::new(m)))
            }
            Stored::Mlx(q) => Ok(Embedding::Mlx(Arc::new(q))),
            Stored::MlxFp(q) if self.dequantize || !self.device.is_cpu() => {
                Ok(Embedding::Dense(self.dense_fp(&q)?))
            }
            Stored::MlxFp(q) => Ok(Embedding::MlxFp(Arc::new(q))),
            Stored::Gguf { file, name, shape } if file.kernel_only_type(name).is_some() => {
                if self.kernel_only_on_cpu() {
                    return Ok(Embedding::Kernel {
                        table: file.matrix(name, &shape)?,
                        repack_output: self.repack,
                    });
                }
                Ok(Embedding::Dense(file.tensor_f32(
                    name,
                    &shape,
                    &self.device,
                )?))
            }
            Stored::Gguf { file, name, shape } => {
                let (_, dtype) = file.tensor_info(name)?;
                if self.uses_cpu_kernels(dtype) {
                    return Ok(Embedding::Kernel {
                        table: file.matrix(name, &shape)?,
                        repack_output: self.repack,
                    });
                }
                let q = file.qtensor(name, &shape, &self.device)?;
                if self.dequantize || is_float(q.dtype()) {
                    Ok(Embedding::Dense(q.dequantize(&self.device)?))
                } else {
                    Ok(Embedding::Gguf(Arc::new(q)))
                }
            }
        }
    }

    /// The experts of the stacked GGUF tensor `name` `[n_experts, rows, cols]` (llama.cpp's
    /// `ffn_{gate,up,down}_exps`), one bias-free layer each: types of our CPU kernels become
    /// [`Linear::Kernel`] layers over each expert's slice of the mapped file (repacked as
    /// [`Self::linear`] does); on CUDA, types our CUDA kernels take become one
    /// [`Linear::Cuda`] layer per expert; MXFP4 (gpt-oss) becomes MLX `mxfp4` layers
    /// ([`crate::gguf::mxfp4`]), dequantized when asked; IQ4_NL / IQ4_XS as the types of our
    /// CPU kernels on the CPU, else dense; float and other types are read as f32 and each
    /// expert becomes a dense layer on the device.
    ///
    /// Errors: a missing tensor or one of another shape (named).
    pub fn gguf_experts(
        &self,
        file: &GgufFile,
        name: &str,
        shape: [usize; 3],
    ) -> Result<Vec<Linear>> {
        if file.is_mxfp4(name) {
            return (0..shape[0])
                .map(|e| self.linear(Stored::MlxFp(file.mxfp4_expert(name, shape, e)?), None))
                .collect();
        }
        let cpu_kernels = if file.kernel_only_type(name).is_some() {
            self.kernel_only_on_cpu()
        } else {
            let (_, dtype) = file.tensor_info(name)?;
            #[cfg(feature = "cuda")]
            if self.device.is_cuda()
                && !self.dequantize
                && crate::cuda::CudaQMatrix::supports_gguf(dtype, shape[2])
            {
                return self.cuda_experts(file, name, shape, dtype);
            }
            self.uses_cpu_kernels(dtype)
        };
        if cpu_kernels {
            return (0..shape[0])
                .map(|e| {
                    let weight = file.expert_matrix(name, shape, e)?;
                    let weight = if self.repack {
                        weight.repacked()
                    } else {
                        weight
                    };
                    Ok(Linear::Kernel { weight, bias: None })
                })
                .collect();
        }
        let all = file.tensor_f32(name, &shape, &Device::Cpu)?;
        (0..shape[0])
            .map(|e| self.linear(Stored::Float(all.get(e)?), None))
            .collect()
    }

    /// GGUF tensors `names` (`outs[i] x cols` each) stacked by rows into one bias-free layer,
    /// where that is cheaper (on a GPU one launch replaces several in decode); `None` on the
    /// CPU, when dequantizing, or when the types differ or are float.
    ///
    /// Errors: tensors that cannot be read (named).
    pub fn stacked_gguf(
        &self,
        file: &GgufFile,
        names: &[&str],
        outs: &[usize],
        cols: usize,
    ) -> Result<Option<Linear>> {
        if !self.device.is_cuda() || self.dequantize || names.len() != outs.len() {
            return Ok(None);
        }
        #[cfg(feature = "cuda")]
        if let Some(l) = self.cuda_gguf(file, names, outs, cols, None)? {
            return Ok(Some(l));
        }
        let Some((dtype, raw)) = stacked_blocks(file, names, outs, cols, |t| !is_float(t))? else {
            return Ok(None);
        };
        let rows = outs.iter().sum();
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &raw,
            vec![rows, cols],
            &self.device,
        )?;
        Ok(Some(Linear::gguf(Arc::new(q), None)?))
    }

    /// MLX matrices `parts` (same columns, group size and bits) stacked by rows into one
    /// bias-free layer where that is cheaper (a GPU); `None` on the CPU, when dequantizing, or
    /// when the parts do not stack.
    ///
    /// Errors: a layer that cannot be placed on the device.
    pub fn stacked_mlx(&self, parts: &[AffineQuantized]) -> Result<Option<Linear>> {
        if !self.device.is_cuda() || self.dequantize {
            return Ok(None);
        }
        match AffineQuantized::stack_rows(parts) {
            Some(q) => Ok(Some(Linear::mlx_on(Arc::new(q), None, &self.device)?)),
            None => Ok(None),
        }
    }

    /// Whether an MLX matrix becomes a [`Linear::MlxPacked`] layer: repacking asked for, on the
    /// CPU, a CPU with the packed kernels of its width, and a 2- to 6-bit matrix that our
    /// kernels run (not kept on `mx.quantized_matmul`'s f32 arithmetic) with rows in whole
    /// groups of 16.
    fn packs_mlx(&self, q: &AffineQuantized) -> bool {
        self.repack
            && self.device.is_cpu()
            && !q.exact_matmul()
            && PackedMlx::can_pack(q)
            && PackedMlx::kernels_here(q.bits())
    }

    /// Whether a GGUF tensor of `dtype` goes to our CPU kernels: quantized, of a type they
    /// handle, on the CPU, and not asked to be dequantized.
    fn uses_cpu_kernels(&self, dtype: GgmlDType) -> bool {
        self.device.is_cpu()
            && !self.dequantize
            && !is_float(dtype)
            && crate::kernels::GgufType::from_ggml(dtype).is_some()
    }

    /// Whether a GGUF tensor of a type that only our CPU kernels read (IQ4_NL, IQ4_XS) stays
    /// quantized for them: on the CPU and not asked to be dequantized (elsewhere it is
    /// dequantized to f32 by [`GgufFile::tensor_f32`]).
    fn kernel_only_on_cpu(&self) -> bool {
        self.device.is_cpu() && !self.dequantize
    }

    /// A candle quantized tensor as a layer: dense f32 when dequantizing or float, else
    /// candle's quantized product.
    fn ggml(&self, q: QTensor, bias: Option<Tensor>) -> Result<Linear> {
        if self.dequantize || is_float(q.dtype()) {
            let w = q.dequantize(&self.device)?.to_dtype(DType::F32)?;
            Ok(Linear::dense(w, bias))
        } else {
            Linear::gguf(Arc::new(q), bias)
        }
    }

    /// On a CUDA device, GGUF tensors `names` (row blocks `outs` x `cols`, one type our kernels
    /// take) stacked by rows into one [`crate::cuda::CudaQMatrix`] layer; `None` when not on
    /// CUDA, dequantizing, or of another type.
    #[cfg(feature = "cuda")]
    fn cuda_gguf(
        &self,
        file: &GgufFile,
        names: &[&str],
        outs: &[usize],
        cols: usize,
        bias: Option<Tensor>,
    ) -> Result<Option<Linear>> {
        use crate::cuda::CudaQMatrix;
        if !self.device.is_cuda() || self.dequantize || names.len() != outs.len() {
            return Ok(None);
        }
        let accept = |t| CudaQMatrix::supports_gguf(t, cols);
        let Some((dtype, raw)) = stacked_blocks(file, names, outs, cols, accept)? else {
            return Ok(None);
        };
        let rows = outs.iter().sum();
        let m = CudaQMatrix::from_gguf(dtype, &raw, rows, cols, &self.device)
            .map_err(|e| crate::Error::tensor(names[0], e.to_string()))?;
        Ok(Some(Linear::Cuda {
            weight: Arc::new(m),
            bias,
        }))
    }

    /// On a CUDA device, each expert of the stacked GGUF tensor `name` `[n_experts, rows,
    /// cols]` (of `dtype`, a type our kernels take) as its own [`crate::cuda::CudaQMatrix`]
    /// layer: the fused decode step reads only the chosen experts' matrices.
    #[cfg(feature = "cuda")]
    fn cuda_experts(
        &self,
        file: &GgufFile,
        name: &str,
        shape: [usize; 3],
        dtype: GgmlDType,
    ) -> Result<Vec<Linear>> {
        use crate::cuda::CudaQMatrix;
        let q = file.qtensor(name, &shape, &Device::Cpu)?;
        let raw = q.data()?;
        let per = raw.len() / shape[0].max(1);
        raw.chunks_exact(per)
            .map(|part| {
                let m = CudaQMatrix::from_gguf(dtype, part, shape[1], shape[2], &self.device)
                    .map_err(|e| crate::Error::tensor(name, e.to_string()))?;
                Ok(Linear::Cuda {
                    weight: Arc::new(m),
                    bias: None,
                })
            })
            .collect()
    }

    fn f32(&self, t: Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?)
    }

    /// A float-mode matrix dequantized as mlx-lm's embedding lookups do (bf16, exact for
    /// these modes' values), as f32 on the device.
    fn dense_fp(&self, q: &FpQuantized) -> Result<Tensor> {
        let t = Tensor::from_vec(
            q.dequantize(ParamDtype::BF16),
            (q.rows(), q.cols()),
            &Device::Cpu,
        )?;
        self.f32(t)
    }

    fn dense_mlx(&self, q: &AffineQuantized) -> Result<Tensor> {
        let t = Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)?;
        self.f32(t)
    }
}

/// Whether a GGUF type holds floats (F32, F16, BF16) rather than quantized blocks.
fn is_float(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// The ggml blocks of quantized tensors `names` (`outs[i] x cols` each), stacked by rows into
/// one buffer, when all have one type and `accept` takes it; `None` otherwise.
fn stacked_blocks(
    file: &GgufFile,
    names: &[&str],
    outs: &[usize],
    cols: usize,
    accept: impl Fn(GgmlDType) -> bool,
) -> Result<Option<(GgmlDType, Vec<u8>)>> {
    if names.iter().any(|n| file.kernel_only_type(n).is_some()) {
        return Ok(None);
    }
    let mut dtype = None;
    for n in names {
        let (_, t) = file.tensor_info(n)?;
        if !accept(t) || dtype.is_some_and(|d| d != t) {
            return Ok(None);
        }
        dtype = Some(t);
    }
    let Some(dtype) = dtype else { return Ok(None) };
    let mut raw = Vec::new();
    for (n, &o) in names.iter().zip(outs) {
        let q = file.qtensor(n, &[o, cols], &Device::Cpu)?;
        raw.extend_from_slice(&q.data()?);
    }
    Ok(Some((dtype, raw)))
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{gguf_file, QMatMul};
    use candle_core::Module;

    use super::*;
    use crate::kernels::{GgufMatrix, GgufType};

    /// A `Q5_K` GGUF tensor (every Q5_K_M file has them) goes to our CPU kernels, repacked
    /// where this CPU has the packed kernels, as a layer, as an embedding table and as the tied
    /// output layer made from that table (unpacked: see `GgufMatrix::repacked_keeping_order`);
    /// the products agree with candle's `QMatMul` and the looked-up rows equal candle's
    /// dequantization.
    #[test]
    fn q5k_gguf_tensors_go_to_the_cpu_kernels() {
        let (n, k) = (32, 512);
        let vals: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q5K).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q5k.gguf");
        let arch = gguf_file::Value::String("llama".into());
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("w", &q)]).unwrap();
        drop(f);
        let file = GgufFile::open(&path).unwrap();
        let x = Tensor::from_vec(
            (0..3 * k)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect(),
            (3, k),
            &Device::Cpu,
        )
        .unwrap();
        let deq: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
        let close = |l: &Linear| {
            let got: Vec<f32> = l
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * scale, "{a} vs candle's {b}");
            }
        };
        let stored = || Stored::Gguf {
            file: &file,
            name: "w",
            shape: [n, k],
        };
        for repack in [false, true] {
            let p = Placement {
                device: Device::Cpu,
                dequantize: false,
                repack,
            };
            let packs = repack && GgufMatrix::packed_kernels_here();
            let l = p.linear(stored(), None).unwrap();
            let Linear::Kernel { weight, .. } = &l else {
                panic!("a Q5_K layer is not on the CPU kernels: {l:?}");
            };
            assert_eq!(weight.dtype(), GgufType::Q5K);
            assert_eq!(weight.is_packed(), packs);
            close(&l);
            let e = p.embedding(stored()).unwrap();
            assert!(matches!(e, Embedding::Kernel { .. }), "{e:?}");
            let ids = Tensor::new(&[3u32, 0, 31, 3], &Device::Cpu).unwrap();
            let rows: Vec<f32> = e
                .forward(&ids)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, id) in [3, 0, 31, 3].into_iter().enumerate() {
                assert_eq!(rows[i * k..(i + 1) * k], deq[id * k..(id + 1) * k]);
            }
            let out = e.as_linear(&Device::Cpu).unwrap();
            let Linear::Kernel { weight, .. } = &out else {
                panic!("a tied Q5_K output layer is not on the CPU kernels: {out:?}");
            };
            // A tied output layer is packed as the other layers are.
            assert_eq!(weight.is_packed(), packs);
            close(&out);
        }
    }
}
