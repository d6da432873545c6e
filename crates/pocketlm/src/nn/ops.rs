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

/// Elements below which [`add`] sums on the calling thread.
const PAR_ADD: usize = 32 * 1024;

/// `a + b` for two tensors of one shape (a residual connection at inference). For contiguous
/// `f32` tensors on the CPU the sum runs on the rayon pool (on the calling thread below
/// 32K values) instead of candle's element-wise split, whose own worker threads compete with
/// the rayon pool's for the cores: inside a forward pass the pool's workers are kept awake
/// ([`crate::kernels::in_pool`]), so candle's worker waited for a core while the caller spun
/// at candle's barrier (8.7% of the default model's server samples under 16 clients, for
/// 0.2% of actual adding: the prefill chunks' residual adds of 64K values and more). The same
/// values (one `f32` addition per element). Anything else goes to candle's `+` (which keeps
/// autograd graphs: do not use this for training).
///
/// Errors: candle's, for shapes that differ (as `+` without broadcasting).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    use candle_core::{DType, Storage};
    use rayon::prelude::*;
    let plain = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if a.dims() != b.dims() || !plain(a) || !plain(b) {
        return Ok((a + b)?);
    }
    let n = a.elem_count();
    let mut out = vec![0f32; n];
    {
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else {
            return Ok((a + b)?);
        };
        let (Some((a0, a1)), Some((b0, b1))) = (la.contiguous_offsets(), lb.contiguous_offsets())
        else {
            return Ok((a + b)?);
        };
        let (xa, xb) = (
            &ca.as_slice::<f32>()?[a0..a1],
            &cb.as_slice::<f32>()?[b0..b1],
        );
        let sum = |(o, (x, y)): (&mut [f32], (&[f32], &[f32]))| {
            for (o, (x, y)) in o.iter_mut().zip(x.iter().zip(y)) {
                *o = x + y;
            }
        };
        if n < PAR_ADD {
            sum((&mut out, (xa, xb)));
        } else {
            let c = 16 * 1024;
            out.par_chunks_mut(c)
                .zip(xa.par_chunks(c).zip(xb.par_chunks(c)))
                .for_each(sum);
        }
    }
    Ok(Tensor::from_vec(out, a.shape(), a.device())?)
}

/// A residual connection `a + b` in `mode`: [`add`] at inference, candle's differentiable `+`
/// in training (so that `backward()` goes through it).
///
/// Errors: candle's, for shapes that differ.
pub fn residual(a: &Tensor, b: &Tensor, mode: crate::nn::Mode) -> Result<Tensor> {
    match mode {
        crate::nn::Mode::Inference => add(a, b),
        crate::nn::Mode::Training { .. } => Ok((a + b)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn add_equals_candle_add_on_every_path() {
        // Serial, rayon-split (more than 32K values, a ragged last piece) and candle's own
        // path (a non-contiguous operand) give candle's sums; other shapes are an error.
        for n in [7usize, 40_000, 70_001] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
            let ta = Tensor::from_vec(a, (1, n), &Device::Cpu).unwrap();
            let tb = Tensor::from_vec(b, (1, n), &Device::Cpu).unwrap();
            let want: Vec<f32> = (&ta + &tb)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = add(&ta, &tb).unwrap();
            assert_eq!(got.dims(), &[1, n]);
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        }
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let tt = t.t().unwrap();
        let want: Vec<f32> = (&tt + &tt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f32> = add(&tt, &tt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, want);
        assert!(add(&t, &tt).is_err());
    }

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
