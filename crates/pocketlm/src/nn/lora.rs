//! Low-rank adapters on a frozen linear layer (LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation
//! of Large Language Models"), in mlx-lm's convention (`mlx_lm/tuner/lora.py`, `LoRALinear`):
//!
//! `y = base(x) + scale · (dropout(x) · A) · B`, with `A = lora_a: [in, r]` and
//! `B = lora_b: [r, out]` (note: mlx-lm stores A and B transposed with respect to the paper's
//! `B A` of shapes `[out, r]`, `[r, in]`, and multiplies by `scale` directly, not `alpha / r`).
//!
//! Initialisation as mlx-lm: `A ~ U(-1/sqrt(in), 1/sqrt(in))`, `B = 0`, so a fresh adapter
//! leaves the model unchanged.

use candle_core::{DType, Device, Tensor, Var};

use super::Linear;
use crate::Result;

/// A linear layer with a LoRA adapter: `x: [.., in]` f32 -> `[.., out]` f32.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// The frozen layer (dense or quantized), restored by `unload`.
    pub base: Linear,
    /// A dequantized f32 copy of the frozen weight `[out, in]`, present only while training
    /// (see [`crate::lora::train`]): it lets gradients pass through the frozen layer to its
    /// input, which the quantized kernels cannot do.
    pub train_weight: Option<Tensor>,
    /// `lora_a: [in, r]` f32, trainable.
    pub a: Var,
    /// `lora_b: [r, out]` f32, trainable.
    pub b: Var,
    /// Multiplier of the low-rank update (mlx-lm `scale`, default 20).
    pub scale: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f32,
    /// Seed of the dropout mask: a forward pass in training draws its mask from this seed
    /// alone, so the same seed gives the same mask (the trainer sets a new one per step and
    /// layer from `--seed`; gradient checkpointing recomputes a block with the same masks).
    pub dropout_seed: u64,
}

impl LoraLinear {
    /// A new adapter on `base` with mlx-lm's initialisation (`A` uniform in
    /// `±1/sqrt(in)` drawn from `rng`, `B = 0`), rank `r`.
    pub fn new(
        base: Linear,
        r: usize,
        scale: f64,
        dropout: f32,
        rng: &mut impl rand::Rng,
        device: &Device,
    ) -> Result<Self> {
        let (inp, out) = (base.in_features(), base.out_features());
        let bound = 1.0 / (inp as f32).sqrt();
        let init: Vec<f32> = (0..inp * r)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(init, (inp, r), device)?)?;
        let b = Var::zeros((r, out), DType::F32, device)?;
        Ok(Self {
            base,
            train_weight: None,
            a,
            b,
            scale,
            dropout,
            dropout_seed: 0,
        })
    }

    /// An adapter with the given `a: [in, r]` and `b: [r, out]` (converted to f32).
    ///
    /// Errors: shapes that do not fit `base`.
    pub fn with_weights(base: Linear, a: &Tensor, b: &Tensor, scale: f64) -> Result<Self> {
        let (inp, r) = a.dims2()?;
        let (r2, out) = b.dims2()?;
        if inp != base.in_features() || out != base.out_features() || r != r2 {
            return Err(crate::Error::InvalidArgument(format!(
                "LoRA shapes lora_a {:?}, lora_b {:?} do not fit a layer of {} -> {} features",
                a.dims(),
                b.dims(),
                base.in_features(),
                base.out_features()
            )));
        }
        let dev = a.device();
        Ok(Self {
            base,
            train_weight: None,
            a: Var::from_tensor(&a.to_dtype(DType::F32)?.to_device(dev)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?.to_device(dev)?)?,
            scale,
            dropout: 0.0,
            dropout_seed: 0,
        })
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dim(1).unwrap_or(0)
    }

    /// `scale · (x A) B` for `x: [.., in]` -> `[.., out]`, with dropout on `x` when `train`.
    fn update(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let inp = dims.pop().unwrap_or(0);
        let x2 = x.reshape(((), inp))?;
        let x2 = if train && self.dropout > 0.0 {
            dropout(&x2, self.dropout, self.dropout_seed)?
        } else {
            x2
        };
        let z = x2.matmul(self.a.as_tensor())?.matmul(self.b.as_tensor())?;
        dims.push(z.dim(1)?);
        Ok((z * self.scale)?.reshape(dims)?)
    }

    /// Inference: `x: [.., in]` -> `[.., out]` (the base layer's own kernel plus the update).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        Ok((y + self.update(x, false)?)?)
    }

    /// Differentiable forward for training: the base through [`Self::train_weight`] when set
    /// (so gradients reach `x`), else through its own forward (gradients reach `x` only for a
    /// dense base); the update with dropout when `train`.
    pub fn forward_train(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = match &self.train_weight {
            Some(w) => dense_forward(w, self.base.bias(), x)?,
            None => self.base.forward(x)?,
        };
        Ok((y + self.update(x, train)?)?)
    }

    /// The fused weight delta `scale · B^T A^T: [out, in]` f32 (mlx-lm `LoRALinear.fuse`).
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().t()?.matmul(&self.a.as_tensor().t()?)? * self.scale)?)
    }
}

/// Inverted dropout (Srivastava et al. 2014, as `candle_nn::ops::dropout`): each element of
/// `x` is zeroed with probability `p` and the others scaled by `1 / (1 - p)`; the mask is drawn
/// from a generator seeded with `seed`, so it is reproducible. The mask is a constant of the
/// graph: gradients reach `x` through the kept elements.
///
/// Errors: `p` outside `[0, 1)`.
fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    if !(0.0..1.0).contains(&p) {
        return Err(crate::Error::InvalidArgument(format!(
            "LoRA dropout must be in [0, 1), got {p}"
        )));
    }
    let keep = 1.0 / (1.0 - p);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() >= p { keep } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    Ok((x * mask)?)
}

/// `x: [.., in]` · `w: [out, in]`^T (+ `bias: [out]`), from differentiable candle ops.
pub(crate) fn dense_forward(w: &Tensor, bias: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let inp = dims.pop().unwrap_or(0);
    let y = x.reshape(((), inp))?.matmul(&w.t()?)?;
    dims.push(y.dim(1)?);
    let y = y.reshape(dims)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}
