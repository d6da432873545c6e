//! The gated MLP of the decoder blocks (Shazeer 2020, "GLU Variants Improve Transformer"):
//! `down(act(gate(x)) * up(x))`, SwiGLU (Llama, Qwen, Phi-3) or GeGLU with tanh-GELU (Gemma),
//! or gpt-oss's clamped SwiGLU. Reference: Hugging Face `LlamaMLP` / `Gemma2MLP` /
//! `GptOssExperts._apply_gate`, mlx-lm `models/llama.py` `MLP` and `activations.swiglu_oai`.

use candle_core::{DType, Tensor};

use super::{gelu_tanh, Linear, Mode, Numerics};
use crate::{Error, Result};

/// A CPU kernel `out = act(gate) * up` over f32 slices.
type GluKernel = fn(&[f32], &[f32], &mut [f32]);

/// The gate's activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// SiLU (`x · sigmoid(x)`): SwiGLU.
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`): GeGLU.
    GeluTanh,
    /// gpt-oss's clamped SwiGLU: with `g = min(gate, limit)` and `u = clamp(up, -limit,
    /// limit)`, `(u + 1) · g · sigmoid(alpha · g)` (transformers `GptOssExperts._apply_gate`,
    /// mlx-lm `swiglu_oai`; config.json `swiglu_alpha` 1.702, `swiglu_limit` 7.0).
    SwigluOai {
        /// The sigmoid's gain.
        alpha: f32,
        /// The clamp.
        limit: f32,
    },
}

impl Activation {
    /// `act(g) * u` (the pairing of the activated gate with the up projection, which
    /// [`Self::SwigluOai`] also clamps and shifts) as candle ops, differentiable.
    ///
    /// Errors: shapes that differ.
    pub fn glu(self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => (candle_nn::ops::silu(g)? * u)?,
            Self::GeluTanh => (gelu_tanh(g)? * u)?,
            Self::SwigluOai { alpha, limit } => {
                let (alpha, limit) = (f64::from(alpha), f64::from(limit));
                let g = g.minimum(limit)?;
                let u = u.clamp(-limit, limit)?;
                let glu = (&g * candle_nn::ops::sigmoid(&(&g * alpha)?)?)?;
                ((u + 1.0)? * glu)?
            }
        })
    }
}

/// The gate and up projections: two layers, or one `[2 · intermediate, hidden]` layer with the
/// gate rows first (Phi-3's `gate_up_proj`, or stacked at load for one GPU launch).
#[derive(Debug)]
pub enum GateUp {
    /// `gate_proj` and `up_proj`, each `[intermediate, hidden]`.
    Separate {
        /// `gate_proj`.
        gate: Linear,
        /// `up_proj`.
        up: Linear,
    },
    /// One layer `[2 · intermediate, hidden]`, gate rows first.
    Fused {
        /// `gate_up_proj`.
        gate_up: Linear,
        /// The inner width.
        intermediate: usize,
    },
}

/// A gated MLP: `x: [.., hidden]` f32 -> `[.., hidden]` f32.
#[derive(Debug)]
pub struct GatedMlp {
    /// The gate and up projections.
    pub gate_up: GateUp,
    /// `down_proj` `[hidden, intermediate]`.
    pub down_proj: Linear,
    /// The gate's activation.
    pub activation: Activation,
    /// [`Numerics::Ggml`]: GELU through ggml's `f16` table on the CPU, as llama.cpp does.
    /// SwiGLU on the CPU in f32 always follows ggml's rounding (its vectorized `expf`; see
    /// [`crate::kernels::float::swiglu`]), which is within an ulp of the exact formula.
    pub numerics: Numerics,
}

impl GatedMlp {
    /// `down(act(gate(x)) * up(x))` on `x: [.., hidden]` f32.
    ///
    /// Errors: shapes that do not agree with the weights.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let (g, u) = match &self.gate_up {
            GateUp::Separate { gate, up } => match mode {
                Mode::Inference => {
                    let gu = Linear::forward_many(&[gate, up], x)?;
                    <[Tensor; 2]>::try_from(gu)
                        .map(|[g, u]| (g, u))
                        .map_err(|_| Error::InvalidArgument("gate/up projection missing".into()))?
                }
                Mode::Training { .. } => (gate.forward_mode(x, mode)?, up.forward_mode(x, mode)?),
            },
            GateUp::Fused {
                gate_up,
                intermediate,
            } => {
                let y = gate_up.forward_mode(x, mode)?;
                #[cfg(feature = "cuda")]
                if mode == Mode::Inference
                    && self.activation == Activation::Silu
                    && y.device().is_cuda()
                    && y.dtype() == DType::F32
                {
                    let h = crate::cuda::swiglu_stacked(&y, *intermediate)?;
                    return self.down_proj.forward(&h);
                }
                let last = y.rank() - 1;
                (
                    y.narrow(last, 0, *intermediate)?,
                    y.narrow(last, *intermediate, *intermediate)?,
                )
            }
        };
        let h = if mode.is_training() {
            self.activation.glu(&g, &u)?
        } else {
            self.activate(&g, &u)?
        };
        self.down_proj.forward_mode(&h, mode)
    }

    /// Several MLPs on the same input `x: [.., hidden]` f32 (the chosen experts of a mixture
    /// of experts for one token), in inference: each output is [`Self::forward`]'s in
    /// [`Mode::Inference`], bit for bit. On our CPU kernels the gate/up products of all of
    /// them run in one pass of the thread pool ([`Linear::forward_many`]) and the down
    /// products in another ([`Linear::forward_each`]), instead of two passes per MLP.
    ///
    /// Errors: shapes that do not agree with the weights.
    pub fn forward_all(mlps: &[&GatedMlp], x: &Tensor) -> Result<Vec<Tensor>> {
        if !x.device().is_cpu() {
            return mlps.iter().map(|m| m.forward(x, Mode::Inference)).collect();
        }
        let mut layers = Vec::with_capacity(2 * mlps.len());
        for m in mlps {
            match &m.gate_up {
                GateUp::Separate { gate, up } => layers.extend([gate, up]),
                GateUp::Fused { gate_up, .. } => layers.push(gate_up),
            }
        }
        let mut outs = Linear::forward_many(&layers, x)?.into_iter();
        let mut next = || {
            outs.next()
                .ok_or_else(|| Error::InvalidArgument("gate/up projection missing".into()))
        };
        let mut hs = Vec::with_capacity(mlps.len());
        for m in mlps {
            let (g, u) = match &m.gate_up {
                GateUp::Separate { .. } => (next()?, next()?),
                GateUp::Fused { intermediate, .. } => {
                    let y = next()?;
                    let last = y.rank() - 1;
                    (
                        y.narrow(last, 0, *intermediate)?,
                        y.narrow(last, *intermediate, *intermediate)?,
                    )
                }
            };
            hs.push(m.activate(&g, &u)?);
        }
        let downs: Vec<&Linear> = mlps.iter().map(|m| &m.down_proj).collect();
        Linear::forward_each(&downs, &hs)
    }

    /// `act(g) * u` for inference: on the CPU in f32 with ggml's rounding where it applies
    /// ([`crate::kernels::float::swiglu`], and [`crate::kernels::float::geglu`] for
    /// [`Numerics::Ggml`]), else candle's ops.
    fn activate(&self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        let cpu_f32 = g.device().is_cpu() && g.dtype() == DType::F32 && u.dtype() == DType::F32;
        let kernel: Option<GluKernel> = match self.activation {
            Activation::Silu if cpu_f32 => Some(crate::kernels::float::swiglu),
            Activation::GeluTanh if cpu_f32 && self.numerics == Numerics::Ggml => {
                Some(crate::kernels::float::geglu)
            }
            Activation::Silu | Activation::GeluTanh | Activation::SwigluOai { .. } => None,
        };
        if let Some(kernel) = kernel {
            let (gv, uv) = (
                g.flatten_all()?.to_vec1::<f32>()?,
                u.flatten_all()?.to_vec1::<f32>()?,
            );
            let mut y = vec![0f32; gv.len()];
            kernel(&gv, &uv, &mut y);
            return Ok(Tensor::from_vec(y, g.shape(), g.device())?);
        }
        self.activation.glu(g, u)
    }

    /// The linear layers with their Hugging Face names within the block (`mlp.gate_proj`, ...),
    /// for adapters.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut out = Vec::with_capacity(3);
        match &mut self.gate_up {
            GateUp::Separate { gate, up } => {
                out.push(("mlp.gate_proj", gate));
                out.push(("mlp.up_proj", up));
            }
            GateUp::Fused { gate_up, .. } => out.push(("mlp.gate_up_proj", gate_up)),
        }
        out.push(("mlp.down_proj", &mut self.down_proj));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn dense(out: usize, inp: usize, seed: u64) -> Linear {
        let w: Vec<f32> = (0..out * inp)
            .map(|i| (((i as u64 * 7919 + seed * 104729) % 97) as f32 - 48.0) / 97.0)
            .collect();
        Linear::dense(Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap(), None)
    }

    /// gpt-oss's clamped SwiGLU against its formula, with both clamps hit.
    #[test]
    fn swiglu_oai_clamps_and_shifts() {
        let (alpha, limit) = (1.702f32, 7.0f32);
        let g = [-9.0f32, -1.0, 0.5, 3.0, 8.0, 20.0];
        let u = [-8.0f32, -0.5, 0.0, 2.0, 7.5, -20.0];
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let got: Vec<f32> = Activation::SwigluOai { alpha, limit }
            .glu(&t(&g), &t(&u))
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..g.len() {
            let gc = g[i].min(limit);
            let uc = u[i].clamp(-limit, limit);
            let want = (uc + 1.0) * gc / (1.0 + (-alpha * gc).exp());
            assert!((got[i] - want).abs() < 1e-5, "{i}: {} vs {want}", got[i]);
        }
    }

    /// Inference and training modes, separate and fused projections: one function.
    #[test]
    fn modes_and_layouts_agree() {
        let (h, inter) = (8, 12);
        let x = Tensor::from_vec(
            (0..3 * h).map(|i| (i as f32 * 0.37).sin()).collect(),
            (1, 3, h),
            &Device::Cpu,
        )
        .unwrap();
        let oai = Activation::SwigluOai {
            alpha: 1.702,
            limit: 0.3,
        };
        for activation in [Activation::Silu, Activation::GeluTanh, oai] {
            let (gate, up) = (dense(inter, h, 1), dense(inter, h, 2));
            let gate_up = Linear::dense(
                Tensor::cat(
                    &[
                        gate.dequantized_weight().unwrap(),
                        up.dequantized_weight().unwrap(),
                    ],
                    0,
                )
                .unwrap(),
                None,
            );
            let separate = GatedMlp {
                gate_up: GateUp::Separate { gate, up },
                down_proj: dense(h, inter, 3),
                activation,
                numerics: Numerics::Reference,
            };
            let fused = GatedMlp {
                gate_up: GateUp::Fused {
                    gate_up,
                    intermediate: inter,
                },
                down_proj: dense(h, inter, 3),
                activation,
                numerics: Numerics::Reference,
            };
            let want: Vec<f32> = separate
                .forward(&x, Mode::Inference)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (m, mode) in [
                (&separate, Mode::Training { dropout: false }),
                (&fused, Mode::Inference),
                (&fused, Mode::Training { dropout: false }),
            ] {
                let got: Vec<f32> = m
                    .forward(&x, mode)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{activation:?} {mode:?}: {a} vs {b}");
                }
            }
        }
    }
}
