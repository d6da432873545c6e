//! Small element-wise functions the architectures share.

use candle_core::Tensor;

use crate::Result;

/// Logit soft-capping (Gemma 2, HF `Gemma2ForCausalLM` / `eager_attention_forward`):
/// `cap * tanh(x / cap)`, element-wise, any shape and float dtype.
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(((x / cap)?.tanh()? * cap)?)
}

/// GELU with the tanh approximation (Hendrycks & Gimpel 2016; PyTorch
/// `gelu(approximate="tanh")`, HF `gelu_pytorch_tanh`):
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, element-wise.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gelu_tanh_and_softcap_match_formulas() {
        let xs = [-4.0f32, -1.3, -0.2, 0.0, 0.7, 2.5, 9.0];
        let t = Tensor::new(&xs, &Device::Cpu).unwrap();
        let g: Vec<f32> = gelu_tanh(&t).unwrap().to_vec1().unwrap();
        let c: Vec<f32> = softcap(&t, 3.0).unwrap().to_vec1().unwrap();
        for (i, &x) in xs.iter().enumerate() {
            let x = x as f64;
            let want = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            assert!(
                (g[i] as f64 - want).abs() < 1e-5,
                "gelu({x}) = {} vs {want}",
                g[i]
            );
            let want = 3.0 * (x / 3.0).tanh();
            assert!((c[i] as f64 - want).abs() < 1e-5, "softcap({x})");
        }
    }
}
