//! The causal depthwise 1-D convolution of short-convolution and linear-attention layers (LFM2's
//! `ShortConv`, Gated DeltaNet's `conv1d`), with the convolution state that carries the last
//! `kernel - 1` inputs from one forward pass to the next. Reference: Hugging Face
//! `modeling_lfm2.py` (`causal_conv1d_fn` / `causal_conv1d_update`: `F.conv1d` with `groups =
//! channels`), mlx-lm `models/lfm2.py` `ShortConv` (the state concatenated before the inputs,
//! its last `L_cache - 1` rows kept).

use candle_core::Tensor;

use crate::{Error, Result};

/// A depthwise causal convolution over time: output `t`, channel `c` is
/// `bias[c] + sum_k weight[c, k] · x[t - (kernel - 1) + k, c]`, inputs before the first taken
/// from the state (zeros for a fresh sequence).
#[derive(Debug, Clone)]
pub struct CausalConv1d {
    /// `[channels, kernel]` f32 (Hugging Face's `[channels, 1, kernel]` and mlx-lm's
    /// `[channels, kernel, 1]` both squeezed).
    weight: Tensor,
    /// `[channels]` f32.
    bias: Option<Tensor>,
    channels: usize,
    kernel: usize,
}

impl CausalConv1d {
    /// `weight: [channels, kernel]`, `bias: [channels]`.
    ///
    /// Errors: [`Error::InvalidArgument`] for a weight that is not 2-D, a kernel of 0, or a bias
    /// of another width.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (channels, kernel) = weight.dims2().map_err(|_| {
            Error::InvalidArgument(format!(
                "a depthwise convolution weight is [channels, kernel], got {:?}",
                weight.dims()
            ))
        })?;
        if kernel == 0 {
            return Err(Error::InvalidArgument(
                "a convolution kernel of width 0".into(),
            ));
        }
        if let Some(b) = &bias {
            if b.dims() != [channels] {
                return Err(Error::InvalidArgument(format!(
                    "convolution bias {:?} for {channels} channels",
                    b.dims()
                )));
            }
        }
        Ok(Self {
            weight: weight.t()?.contiguous()?,
            bias,
            channels,
            kernel,
        })
    }

    /// Kernel width (`L_cache`).
    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// Rows of the state: `kernel - 1`.
    pub fn state_len(&self) -> usize {
        self.kernel - 1
    }

    /// The convolution of `x: [batch, seq, channels]` f32 after `state: [batch, kernel - 1,
    /// channels]` (the previous inputs in time order; `None`: zeros). Returns the output
    /// `[batch, seq, channels]` and the next state (the last `kernel - 1` rows of the state
    /// followed by `x`).
    ///
    /// Errors: shapes that do not match the weight or each other.
    pub fn forward(&self, x: &Tensor, state: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (b, s, c) = x.dims3()?;
        if c != self.channels {
            return Err(Error::InvalidArgument(format!(
                "convolution over {c} channels, the weight has {}",
                self.channels
            )));
        }
        let keep = self.state_len();
        let state = match state {
            Some(st) if st.dims() == [b, keep, c] => st.to_dtype(x.dtype())?,
            Some(st) => {
                return Err(Error::InvalidArgument(format!(
                    "convolution state {:?}, expected {:?} (batch, kernel - 1, channels)",
                    st.dims(),
                    [b, keep, c]
                )))
            }
            None => Tensor::zeros((b, keep, c), x.dtype(), x.device())?,
        };
        let full = Tensor::cat(&[&state, x], 1)?;
        let mut out = match &self.bias {
            Some(bias) => bias.broadcast_as((b, s, c))?.contiguous()?,
            None => Tensor::zeros((b, s, c), x.dtype(), x.device())?,
        };
        for k in 0..self.kernel {
            let w = self.weight.get(k)?;
            out = (out + full.narrow(1, k, s)?.broadcast_mul(&w)?)?;
        }
        let next = full.narrow(1, s, keep)?.contiguous()?;
        Ok((out, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The formula, one output at a time.
    fn naive(w: &[Vec<f32>], bias: &[f32], x: &[Vec<f32>], hist: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let kernel = w[0].len();
        let all: Vec<&Vec<f32>> = hist.iter().chain(x.iter()).collect();
        (0..x.len())
            .map(|t| {
                (0..w.len())
                    .map(|c| bias[c] + (0..kernel).map(|k| w[c][k] * all[t + k][c]).sum::<f32>())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn chunked_passes_equal_one_pass_and_the_formula() {
        let dev = Device::Cpu;
        let (c, kernel, n) = (5, 4, 9);
        let w: Vec<Vec<f32>> = (0..c)
            .map(|i| {
                (0..kernel)
                    .map(|k| ((i * 7 + k * 3) as f32 * 0.37).sin())
                    .collect()
            })
            .collect();
        let bias: Vec<f32> = (0..c).map(|i| 0.1 * i as f32 - 0.2).collect();
        let x: Vec<Vec<f32>> = (0..n)
            .map(|t| (0..c).map(|i| ((t * c + i) as f32 * 0.91).cos()).collect())
            .collect();
        let wt = Tensor::new(w.clone(), &dev).unwrap();
        let conv =
            CausalConv1d::new(wt, Some(Tensor::new(bias.as_slice(), &dev).unwrap())).unwrap();
        let xt = Tensor::new(x.clone(), &dev).unwrap().unsqueeze(0).unwrap();
        let zeros = vec![vec![0f32; c]; kernel - 1];
        let want = naive(&w, &bias, &x, &zeros);
        let (one, state) = conv.forward(&xt, None).unwrap();
        let got: Vec<Vec<f32>> = one.squeeze(0).unwrap().to_vec2().unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        let last: Vec<Vec<f32>> = state.squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(last, x[n - (kernel - 1)..].to_vec());
        // In chunks of 2, 1 and 6 positions, the state carried: the same outputs.
        let mut st: Option<Tensor> = None;
        let mut parts = Vec::new();
        for (from, len) in [(0, 2), (2, 1), (3, 6)] {
            let (o, s) = conv
                .forward(&xt.narrow(1, from, len).unwrap(), st.as_ref())
                .unwrap();
            parts.push(o);
            st = Some(s);
        }
        // The same products summed in the same order: equal to the last bit.
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&Tensor::cat(&parts, 1).unwrap()), flat(&one));
        // A state of the wrong shape is refused.
        let bad = Tensor::zeros((1, kernel, c), candle_core::DType::F32, &dev).unwrap();
        assert!(conv.forward(&xt, Some(&bad)).is_err());
    }
}
