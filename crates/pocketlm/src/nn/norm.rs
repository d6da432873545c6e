//! RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"):
//! `y = x / sqrt(mean(x^2) + eps) * weight`, as in Hugging Face `LlamaRMSNorm`.

use candle_core::Tensor;

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

    /// `x: [.., hidden]` -> same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.is_contiguous() {
            x.clone()
        } else {
            x.contiguous()?
        };
        Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?)
    }
}
