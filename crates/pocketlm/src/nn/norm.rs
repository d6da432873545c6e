//! RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"):
//! `y = x / sqrt(mean(x^2) + eps) * weight`, as in Hugging Face `LlamaRMSNorm`.

use candle_core::{DType, Tensor};

use super::Mode;
use crate::Result;

/// RMSNorm over the last dimension. `weight: [hidden]` f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// `weight: [hidden]`; `eps` from the config (`rms_norm_eps`). When `add_unit_offset` is set
    /// the stored weight is `w` and the scale used is `1 + w` (Gemma's convention).
    pub fn new(weight: Tensor, eps: f64, add_unit_offset: bool) -> Result<Self> {
        let weight = if add_unit_offset {
            (weight + 1.0)?
        } else {
            weight
        };
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }

    /// The scale `[hidden]` applied after normalizing (with Gemma's unit offset included).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The epsilon added to the mean square.
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// `x: [.., hidden]` -> same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.is_contiguous() {
            x.clone()
        } else {
            x.contiguous()?
        };
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            // ggml's rounding (f64 sum of squares), see `kernels::float::rms_norm`.
            let w = self.weight.to_vec1::<f32>()?;
            if x.dims().last() != Some(&w.len()) {
                return Err(crate::Error::InvalidArgument(format!(
                    "RMSNorm of {:?} with a weight of {} values",
                    x.dims(),
                    w.len()
                )));
            }
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let mut y = vec![0f32; xs.len()];
            crate::kernels::float::rms_norm(&xs, &w, self.eps, &mut y);
            return Ok(Tensor::from_vec(y, x.shape(), x.device())?);
        }
        Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?)
    }

    /// [`Self::forward`] for [`Mode::Inference`], [`Self::forward_diff`] for
    /// [`Mode::Training`]: `x: [.., hidden]` -> same shape.
    pub fn forward_mode(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Inference => self.forward(x),
            Mode::Training { .. } => self.forward_diff(x),
        }
    }

    /// Differentiable RMSNorm from candle ops (for training): `x: [.., hidden]` f32 -> same
    /// shape, `x / sqrt(mean(x^2) + eps) * weight`.
    pub fn forward_diff(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let y = x.broadcast_div(&(ms + self.eps as f64)?.sqrt()?)?;
        Ok(y.broadcast_mul(&self.weight)?)
    }
}

/// LayerNorm over the last dimension (Ba et al. 2016, "Layer Normalization"), as PyTorch's
/// `nn.LayerNorm` with an affine weight and bias: `y = (x - mean) / sqrt(var + eps) * weight +
/// bias`, `var` the biased variance. `weight`, `bias`: `[hidden]` f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// `weight`, `bias`: `[hidden]`; `eps` from the config (`layer_norm_eps`).
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias,
            eps: eps as f32,
        }
    }

    /// `x: [.., hidden]` f32 -> same shape.
    ///
    /// Errors: a last dimension other than the weight's.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.is_contiguous() {
            x.clone()
        } else {
            x.contiguous()?
        };
        Ok(candle_nn::ops::layer_norm(
            &x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_matches_the_formula() {
        let xs = [0.5f32, -1.25, 3.0, 2.0, 7.0, -3.5, 0.0, 1.0];
        let w = [1.5f32, -0.5, 2.0, 1.0];
        let b = [0.1f32, 0.2, -0.3, 0.0];
        let dev = Device::Cpu;
        let ln = LayerNorm::new(
            Tensor::new(&w, &dev).unwrap(),
            Tensor::new(&b, &dev).unwrap(),
            1e-5,
        );
        let x = Tensor::new(&xs, &dev).unwrap().reshape((2, 4)).unwrap();
        let y: Vec<f32> = ln
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for r in 0..2 {
            let row = &xs[r * 4..r * 4 + 4];
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 4.0;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 4.0;
            for c in 0..4 {
                let want = (row[c] as f64 - mean) / (var + 1e-5).sqrt() * w[c] as f64 + b[c] as f64;
                assert!((y[r * 4 + c] as f64 - want).abs() < 1e-5, "{r},{c}");
            }
        }
    }
}
