//! The mixture-of-experts feed-forward layer (Shazeer et al. 2017, "Outrageously Large Neural
//! Networks"; Fedus et al. 2021, "Switch Transformers"): a router scores the experts for each
//! token, the top-k run on it, and their outputs are summed with the routing weights; optional
//! shared experts run on every token. Only the chosen experts' weights are read: the tokens
//! routed to one expert are gathered and its gated MLP runs once over them (one product per
//! projection over all its tokens, as mlx-lm's `SwitchGLU` / `gather_qmm` and llama.cpp's
//! `mul_mat_id` batch them), then the weighted outputs are scattered back and added.
//!
//! Reference: Hugging Face `Qwen3MoeSparseMoeBlock` / `Qwen3MoeTopKRouter` /
//! `Qwen3MoeExperts` (softmax routing), `Qwen2MoeSparseMoeBlock` (shared expert with a sigmoid
//! gate), `DeepseekV3MoE` (sigmoid routing with a selection bias and a scaling factor);
//! mlx-lm `models/qwen3_moe.py` and `switch_layers.py`.

use candle_core::{DType, Tensor};

#[cfg(feature = "cuda")]
use super::Activation;
use super::{GatedMlp, Linear, Mode};
use crate::{Error, Result};

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// `softmax` over all experts, in f32 (Qwen2/Qwen3-MoE, Mixtral).
    Softmax,
    /// `sigmoid` of each logit (DeepSeek-V3, Kimi K2).
    Sigmoid,
}

/// The router: a linear gate `[n_experts, hidden]` and the top-k choice.
#[derive(Debug)]
pub struct Router {
    /// `mlp.gate` `[n_experts, hidden]`: one logit per expert.
    pub gate: Linear,
    /// Logits to scores.
    pub scoring: Scoring,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Divide the chosen experts' scores by their sum (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Added to the scores for the choice only, not to the weights (DeepSeek-V3's
    /// `e_score_correction_bias`, `[n_experts]`).
    pub selection_bias: Option<Vec<f32>>,
    /// Multiplies the final weights (DeepSeek-V3's `routed_scaling_factor`; 1 elsewhere).
    pub scale: f32,
    /// Multiplies the final weight of each chosen expert by that expert's entry (Gemma 4's
    /// `router.per_expert_scale`, `[n_experts]`).
    pub expert_scale: Option<Vec<f32>>,
    /// Group-limited choice (DeepSeek-V3's `n_group` / `topk_group`), if any.
    pub groups: Option<GroupLimit>,
}

/// DeepSeek-V3's group-limited expert choice (`n_group`, `topk_group`; transformers'
/// `DeepseekV3TopkRouter.forward`, mlx-lm `group_expert_select`): the experts are split in
/// index order into `n_groups` equal groups, each group is scored by the sum of its two highest
/// selection keys (scores plus [`Router::selection_bias`]), and only the experts of the
/// `top_groups` best groups may be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    /// Groups (`n_group`, a divisor of the expert count).
    pub n_groups: usize,
    /// Groups whose experts may be chosen (`topk_group`).
    pub top_groups: usize,
}

impl GroupLimit {
    /// Which of the `keys.len()` experts may be chosen; among groups of equal score the lower
    /// index wins. All of them when there is one group or the count does not divide evenly
    /// (the architectures check their configs for that).
    pub fn allowed(&self, keys: &[f32]) -> Vec<bool> {
        let n = keys.len();
        if self.n_groups <= 1 || !n.is_multiple_of(self.n_groups) {
            return vec![true; n];
        }
        let size = n / self.n_groups;
        let score = |g: usize| -> f32 {
            let mut k: Vec<f32> = keys[g * size..(g + 1) * size].to_vec();
            k.sort_by(|a, b| b.total_cmp(a));
            k.iter().take(2).sum()
        };
        let scores: Vec<f32> = (0..self.n_groups).map(score).collect();
        let mut order: Vec<usize> = (0..self.n_groups).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let mut allowed = vec![false; n];
        for &g in order.iter().take(self.top_groups) {
            allowed[g * size..(g + 1) * size].fill(true);
        }
        allowed
    }
}

impl Router {
    /// The chosen experts of one token from its router `logits` (`[n_experts]` f32), as
    /// `(expert, weight)` best first; among equal scores the lower index wins.
    ///
    /// Scores are `softmax(logits)` or `sigmoid(logits)` ([`Scoring`]); the `top_k` highest
    /// (after adding [`Self::selection_bias`]; within the groups [`Self::groups`] allows) are
    /// chosen; their weights are their scores,
    /// divided by their sum when [`Self::norm_topk_prob`], times [`Self::scale`] and the
    /// expert's [`Self::expert_scale`] (transformers' `Qwen3MoeTopKRouter.forward`,
    /// `DeepseekV3TopkRouter`, `Gemma4TextRouter`).
    pub fn select(&self, logits: &[f32]) -> Vec<(usize, f32)> {
        let scores: Vec<f32> = match self.scoring {
            Scoring::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                exps.iter().map(|&e| e / sum).collect()
            }
            Scoring::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
        };
        let key = |e: usize| match &self.selection_bias {
            Some(b) => scores[e] + b.get(e).copied().unwrap_or(0.0),
            None => scores[e],
        };
        let allowed = match &self.groups {
            Some(g) => g.allowed(&(0..scores.len()).map(key).collect::<Vec<_>>()),
            None => vec![true; scores.len()],
        };
        let mut order: Vec<usize> = (0..scores.len()).filter(|&e| allowed[e]).collect();
        // Stable: equal keys keep index order.
        order.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
        order.truncate(self.top_k.min(scores.len()));
        let sum: f32 = order.iter().map(|&e| scores[e]).sum();
        let norm = if self.norm_topk_prob && sum > 0.0 {
            sum
        } else {
            1.0
        };
        order
            .into_iter()
            .map(|e| {
                let s = self
                    .expert_scale
                    .as_ref()
                    .and_then(|s| s.get(e))
                    .unwrap_or(&1.0);
                (e, scores[e] / norm * self.scale * s)
            })
            .collect()
    }

    /// The tokens each expert gets, for `x: [n, hidden]` f32: for expert `e`, its
    /// `(token, weight)` pairs in token order ([`Self::select`] on each token's logits).
    ///
    /// Errors: a gate whose width is not `hidden`; the tensor library's errors.
    pub fn route(&self, x: &Tensor, n_experts: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let logits = self.gate.forward(x)?.to_dtype(DType::F32)?;
        let (n, e) = logits.dims2()?;
        if e != n_experts {
            return Err(Error::InvalidArgument(format!(
                "the router gives {e} logits per token for {n_experts} experts"
            )));
        }
        let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let mut routes = vec![Vec::new(); n_experts];
        for t in 0..n {
            for (expert, w) in self.select(&flat[t * e..(t + 1) * e]) {
                routes[expert].push((t as u32, w));
            }
        }
        Ok(routes)
    }
}

/// Experts that run on every token (Qwen2-MoE's `shared_expert`, DeepSeek's
/// `shared_experts`), optionally scaled per token by `sigmoid(gate(x))` (Qwen2-MoE's
/// `shared_expert_gate` `[1, hidden]`).
#[derive(Debug)]
pub struct SharedExpert {
    /// The shared gated MLP.
    pub mlp: GatedMlp,
    /// `shared_expert_gate` `[1, hidden]`, if any.
    pub gate: Option<Linear>,
}

/// A mixture-of-experts layer: `x: [.., hidden]` f32 -> `[.., hidden]` f32,
/// `y = Σ_{e ∈ topk(x)} w_e(x) · expert_e(x) + shared(x)`.
#[derive(Debug)]
pub struct Moe {
    /// The router.
    pub router: Router,
    /// The routed experts, SwiGLU MLPs `[moe_intermediate, hidden]` / `[hidden,
    /// moe_intermediate]` each (`mlp.experts.{e}` in Hugging Face checkpoints; slices of the
    /// stacked `[n_experts, out, in]` tensors of MLX and GGUF files).
    pub experts: Vec<GatedMlp>,
    /// Shared experts, if any.
    pub shared: Option<SharedExpert>,
    /// The GPU kernels its inference passes run on, once made.
    pub kernels: MoeKernels,
}

/// The GPU kernels a [`Moe`] runs its inference passes on (feature `cuda`;
/// [`crate::cuda::MoeRows`]: the router, each chosen expert's weights read once for all the
/// tokens that chose it, and the weighted sum, in place of a host round trip for the routing
/// and a product, a gather and a scatter per expert), made at the first pass on a CUDA device
/// and made again when its expert layers change (adapters loaded, fused or unloaded). Empty in
/// other builds, and for layers the kernels do not take (the general path runs them).
#[derive(Default)]
pub struct MoeKernels {
    #[cfg(feature = "cuda")]
    state: std::sync::Mutex<Option<KernelState>>,
}

/// The expert matrices the kernels were made for (per expert gate, up, down: ours, or `None`),
/// and the kernels, if they take the layer.
#[cfg(feature = "cuda")]
type KernelState = (
    Vec<Option<std::sync::Arc<crate::cuda::CudaQMatrix>>>,
    Option<std::sync::Arc<crate::cuda::MoeRows>>,
);

impl std::fmt::Debug for MoeKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeKernels").finish_non_exhaustive()
    }
}

#[cfg(feature = "cuda")]
impl MoeKernels {
    /// The kernels for `moe` on `device`, made now when untried or when its expert layers
    /// changed since; `None` when they do not take it.
    ///
    /// Errors: a poisoned lock; making them (the driver's).
    fn get(
        &self,
        moe: &Moe,
        device: &candle_core::Device,
    ) -> Result<Option<std::sync::Arc<crate::cuda::MoeRows>>> {
        let now: Vec<_> = moe
            .experts
            .iter()
            .flat_map(|e| {
                let gate_up = match &e.gate_up {
                    super::GateUp::Separate { gate, up } => [Some(gate), Some(up)],
                    super::GateUp::Fused { .. } => [None, None],
                };
                gate_up
                    .into_iter()
                    .chain([Some(&e.down_proj)])
                    .map(|l| l.and_then(Linear::cuda_matrix))
            })
            .collect();
        let mut state = self
            .state
            .lock()
            .map_err(|_| Error::Model("the mixture of experts' kernel lock is poisoned".into()))?;
        if let Some((made_for, k)) = &*state {
            let same = made_for.len() == now.len()
                && made_for.iter().zip(&now).all(|(a, b)| match (a, b) {
                    (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                });
            if same {
                return Ok(k.clone());
            }
        }
        let k = moe.rows_kernels(device)?.map(std::sync::Arc::new);
        let made_for = now.into_iter().map(|m| m.cloned()).collect();
        *state = Some((made_for, k.clone()));
        Ok(k)
    }
}

#[cfg(feature = "cuda")]
impl Moe {
    /// The layer as the fused CUDA kernels take it, with its experts' activation; `None` when
    /// it has shared experts, routing other than softmax top-k (a selection bias, groups, a
    /// scale, per-expert scales), a router that is not a bias-free float matrix, experts not
    /// of our CUDA kernels' formats (or with adapters), mixed activations, or more experts or
    /// a larger top-k than the kernels take.
    ///
    /// Errors: converting the router's weight to f32.
    pub(crate) fn decoder_moe(&self) -> Result<Option<(crate::cuda::DecoderMoe, Activation)>> {
        use crate::cuda::{MOE_MAX_EXPERTS, MOE_MAX_TOPK};
        let r = &self.router;
        let Linear::Dense(gate) = &r.gate else {
            return Ok(None);
        };
        if self.shared.is_some()
            || r.scoring != Scoring::Softmax
            || r.selection_bias.is_some()
            || r.groups.is_some()
            || r.scale != 1.0
            || r.expert_scale.is_some()
            || gate.bias().is_some()
            || self.experts.len() > MOE_MAX_EXPERTS
            || r.top_k == 0
            || r.top_k > MOE_MAX_TOPK.min(self.experts.len())
        {
            return Ok(None);
        }
        let Some(activation) = self.experts.first().map(|e| e.activation) else {
            return Ok(None);
        };
        if self.experts.iter().any(|e| e.activation != activation) {
            return Ok(None);
        }
        let mut experts = Vec::with_capacity(self.experts.len());
        for e in &self.experts {
            let super::GateUp::Separate { gate, up } = &e.gate_up else {
                return Ok(None);
            };
            let (Some(g), Some(u), Some(d)) = (
                gate.cuda_matrix(),
                up.cuda_matrix(),
                e.down_proj.cuda_matrix(),
            ) else {
                return Ok(None);
            };
            experts.push([g.clone(), u.clone(), d.clone()]);
        }
        let router = gate.weight().to_dtype(DType::F32)?.contiguous()?;
        Ok(Some((
            crate::cuda::DecoderMoe {
                router,
                experts,
                top_k: r.top_k,
                norm_topk_prob: r.norm_topk_prob,
            },
            activation,
        )))
    }

    /// The kernels that run the layer over many token rows on the GPU
    /// ([`crate::cuda::MoeRows`]); `None` when [`Self::decoder_moe`] or the kernels do not
    /// take it, or its activation is not SiLU or GELU-tanh.
    ///
    /// Errors: as [`Self::decoder_moe`]; the driver's.
    fn rows_kernels(&self, device: &candle_core::Device) -> Result<Option<crate::cuda::MoeRows>> {
        match self.decoder_moe()? {
            Some((m, a @ (Activation::Silu | Activation::GeluTanh))) => {
                crate::cuda::MoeRows::new(m, a == Activation::GeluTanh, device)
            }
            _ => Ok(None),
        }
    }
}

impl Moe {
    /// The layer on `x: [.., hidden]` f32. Each expert chosen by at least one token runs once
    /// on the rows routed to it (gathered with `index_select`); the outputs, times their
    /// weights, are added back per token with one `index_add`, in expert order (as
    /// transformers' `Qwen3MoeExperts.forward` does).
    ///
    /// In [`Mode::Training`] the experts run as differentiable ops, so gradients reach `x`
    /// through them; the routing (choice and weights) is computed from the inference values
    /// and is constant for the gradient. Inference on a CUDA device runs on the fused kernels
    /// when they take the layer ([`MoeKernels`]; `POCKETLM_MOE_KERNELS=0` keeps this path):
    /// the same choice and weights, the products on 8-bit activations as the decode step's.
    ///
    /// Errors: shapes that do not agree with the weights.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if mode == Mode::Inference
            && x.device().is_cuda()
            && !crate::switches::switched_off("POCKETLM_MOE_KERNELS")
        {
            if let Some(k) = self.kernels.get(self, x.device())? {
                let dims = x.dims().to_vec();
                let h = dims.last().copied().unwrap_or(0);
                return Ok(k.forward(&x.reshape(((), h))?)?.reshape(dims)?);
            }
        }
        self.forward_routed(x, x, mode)
    }

    /// As [`Self::forward`], the router reading `route_x: [.., hidden]` f32 (the same tokens
    /// as `x`, another form of them: Gemma 4 routes on the block's residual and runs the
    /// experts on its `pre_feedforward_layernorm_2`).
    ///
    /// Errors: as [`Self::forward`]; `route_x` of another token count.
    pub fn forward_routed(&self, route_x: &Tensor, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let h = *dims
            .last()
            .ok_or_else(|| Error::InvalidArgument("MoE input has no dimensions".into()))?;
        let xf = x.reshape(((), h))?;
        let n = xf.dim(0)?;
        let dev = x.device();
        let rf = route_x.reshape((n, ()))?;
        let routes = self.router.route(&rf.detach(), self.experts.len())?;
        let y = if n == 1 && mode == Mode::Inference && dev.is_cpu() {
            self.routed_one(&xf, &routes)?
        } else {
            self.routed_gathered(&xf, &routes, mode)?
        };
        let y = match &self.shared {
            Some(shared) => {
                let mut s = shared.mlp.forward(&xf, mode)?;
                if let Some(g) = &shared.gate {
                    let g = candle_nn::ops::sigmoid(&g.forward_mode(&xf, mode)?)?;
                    s = s.broadcast_mul(&g)?;
                }
                (y + s)?
            }
            None => y,
        };
        Ok(y.reshape(dims)?)
    }

    /// The routed experts' part of the layer on `xf: [n, hidden]`, `routes` given
    /// ([`Router::route`]): each expert chosen by at least one token runs once on the rows
    /// routed to it (gathered with `index_select`); the outputs, times their weights, are added
    /// back per token with one `index_add`, in expert order.
    fn routed_gathered(
        &self,
        xf: &Tensor,
        routes: &[Vec<(u32, f32)>],
        mode: Mode,
    ) -> Result<Tensor> {
        let n = xf.dim(0)?;
        let dev = xf.device();
        let mut outs = Vec::new();
        let (mut tokens, mut weights) = (Vec::new(), Vec::new());
        for (expert, route) in self.experts.iter().zip(routes) {
            if route.is_empty() {
                continue;
            }
            let ids: Vec<u32> = route.iter().map(|&(t, _)| t).collect();
            let rows = if ids.len() == n && ids.iter().enumerate().all(|(i, &t)| t as usize == i) {
                xf.clone()
            } else {
                xf.index_select(&Tensor::new(ids.as_slice(), dev)?, 0)?
            };
            outs.push(expert.forward(&rows, mode)?);
            tokens.extend(ids);
            weights.extend(route.iter().map(|&(_, w)| w));
        }
        if outs.is_empty() {
            return Ok(xf.zeros_like()?);
        }
        let m = weights.len();
        let gathered =
            Tensor::cat(&outs, 0)?.broadcast_mul(&Tensor::from_vec(weights, (m, 1), dev)?)?;
        Ok(xf
            .zeros_like()?
            .index_add(&Tensor::from_vec(tokens, m, dev)?, &gathered, 0)?)
    }

    /// [`Self::routed_gathered`] for one token `xf: [1, hidden]` f32 on the CPU in inference:
    /// the chosen experts run batched ([`GatedMlp::forward_all`]: two passes of the thread
    /// pool for all of them, where a decode step would otherwise make two per expert), and
    /// their weighted outputs are summed in expert order from zero, as `index_add` sums them
    /// there, so the result is the same bit for bit.
    fn routed_one(&self, xf: &Tensor, routes: &[Vec<(u32, f32)>]) -> Result<Tensor> {
        let (mut mlps, mut weights) = (Vec::new(), Vec::new());
        for (expert, route) in self.experts.iter().zip(routes) {
            if let Some(&(_, w)) = route.first() {
                mlps.push(expert);
                weights.push(w);
            }
        }
        let h = xf.dim(1)?;
        let mut y = vec![0f32; h];
        for (o, w) in GatedMlp::forward_all(&mlps, xf)?.into_iter().zip(weights) {
            let o = o.flatten_all()?.to_vec1::<f32>()?;
            for (a, v) in y.iter_mut().zip(o) {
                *a += v * w;
            }
        }
        Ok(Tensor::from_vec(y, (1, h), xf.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Activation, GateUp, Numerics};
    use candle_core::Device;

    fn dense(out: usize, inp: usize, seed: u64) -> Linear {
        let w: Vec<f32> = (0..out * inp)
            .map(|i| (((i as u64 * 7919 + seed * 104729) % 97) as f32 - 48.0) / 97.0)
            .collect();
        Linear::dense(Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap(), None)
    }

    fn mlp(h: usize, inter: usize, seed: u64) -> GatedMlp {
        GatedMlp {
            gate_up: GateUp::Separate {
                gate: dense(inter, h, seed),
                up: dense(inter, h, seed + 1),
            },
            down_proj: dense(h, inter, seed + 2),
            activation: Activation::Silu,
            numerics: Numerics::Reference,
        }
    }

    fn router(gate: Linear, scoring: Scoring, norm: bool) -> Router {
        Router {
            gate,
            scoring,
            top_k: 2,
            norm_topk_prob: norm,
            selection_bias: None,
            expert_scale: None,
            scale: 1.0,
            groups: None,
        }
    }

    #[test]
    fn select_softmax_sigmoid_bias() {
        let r = router(dense(4, 2, 0), Scoring::Softmax, false);
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let got = r.select(&logits);
        // Ties (experts 1 and 3) keep index order.
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((got[0].1 - 3f32.exp() / z).abs() < 1e-6);
        let r = router(dense(4, 2, 0), Scoring::Softmax, true);
        let got = r.select(&logits);
        assert!((got[0].1 - 0.5).abs() < 1e-6 && (got[1].1 - 0.5).abs() < 1e-6);
        let mut r = router(dense(4, 2, 0), Scoring::Sigmoid, false);
        r.selection_bias = Some(vec![5.0, 0.0, 0.0, 0.0]);
        r.scale = 2.0;
        let got = r.select(&logits);
        assert_eq!(got[0].0, 0);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((got[0].1 - 2.0 * sig(1.0)).abs() < 1e-6, "{got:?}");
        assert_eq!(got[1].0, 1);
        let mut r = router(dense(4, 2, 0), Scoring::Softmax, true);
        r.expert_scale = Some(vec![1.0, 3.0, 1.0, 0.5]);
        let got = r.select(&logits);
        assert!((got[0].1 - 1.5).abs() < 1e-6 && (got[1].1 - 0.25).abs() < 1e-6);
    }

    #[test]
    fn group_limit_keeps_the_best_groups() {
        // 6 experts in 3 groups of 2; group sums of the top 2: 0.9, 1.5, 1.1.
        let keys = [0.5f32, 0.4, 0.9, 0.6, 0.2, 0.9];
        let g = GroupLimit {
            n_groups: 3,
            top_groups: 2,
        };
        assert_eq!(g.allowed(&keys), [false, false, true, true, true, true]);
        let mut r = router(dense(6, 2, 0), Scoring::Sigmoid, true);
        r.groups = Some(GroupLimit {
            n_groups: 3,
            top_groups: 1,
        });
        r.top_k = 2;
        // Expert 0 has the highest single logit, but group 1 (experts 2, 3) the best pair.
        let logits = [3.0f32, -3.0, 2.0, 2.0, -1.0, -1.0];
        let got = r.select(&logits);
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 3]);
        assert!((got[0].1 - 0.5).abs() < 1e-6, "{got:?}");
        r.groups = None;
        assert_eq!(r.select(&logits)[0].0, 0);
    }

    /// A Q4_0 layer on our CPU kernels (repacked or in the file's layout).
    fn q4(out: usize, inp: usize, seed: u64, repack: bool) -> Linear {
        use candle_core::quantized::{GgmlDType, QTensor};
        let Linear::Dense(d) = dense(out, inp, seed) else {
            unreachable!()
        };
        let q = QTensor::quantize(d.weight(), GgmlDType::Q4_0).unwrap();
        let w = crate::kernels::GgufMatrix::from_qtensor(format!("w{seed}"), &q).unwrap();
        let weight = if repack { w.repacked() } else { w };
        Linear::Kernel { weight, bias: None }
    }

    /// One token on our quantized kernels: the batched path (`routed_one`, every chosen
    /// expert's products in two passes) gives the gathered path's output bit for bit, separate
    /// and fused gate/up projections, repacked or not.
    #[test]
    fn one_token_batched_equals_gathered() {
        let (h, inter, n_exp) = (64, 32, 6);
        for repack in [false, true] {
            let experts: Vec<GatedMlp> = (0..n_exp)
                .map(|e| {
                    let s = 10 * e as u64;
                    GatedMlp {
                        gate_up: if e % 2 == 0 {
                            GateUp::Separate {
                                gate: q4(inter, h, s, repack),
                                up: q4(inter, h, s + 1, repack),
                            }
                        } else {
                            GateUp::Fused {
                                gate_up: q4(2 * inter, h, s, repack),
                                intermediate: inter,
                            }
                        },
                        down_proj: q4(h, inter, s + 2, repack),
                        activation: Activation::Silu,
                        numerics: Numerics::Reference,
                    }
                })
                .collect();
            let mut r = router(dense(n_exp, h, 99), Scoring::Softmax, true);
            r.top_k = 3;
            let moe = Moe {
                router: r,
                experts,
                shared: None,
                kernels: MoeKernels::default(),
            };
            for t in 0..4 {
                let x: Vec<f32> = (0..h).map(|i| ((i + 7 * t) as f32 * 0.37).sin()).collect();
                let x = Tensor::from_vec(x, (1, h), &Device::Cpu).unwrap();
                let routes = moe.router.route(&x, n_exp).unwrap();
                assert_eq!(routes.iter().filter(|r| !r.is_empty()).count(), 3);
                let one: Vec<f32> = moe
                    .routed_one(&x, &routes)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let all: Vec<f32> = moe
                    .routed_gathered(&x, &routes, Mode::Inference)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&one), bits(&all), "repack {repack}, token {t}");
                assert!(one.iter().any(|&v| v != 0.0));
            }
        }
    }

    /// The gathered forward equals the per-token definition (each token through its top-k
    /// experts, weighted), in inference and training modes, with a gated shared expert.
    #[test]
    fn forward_matches_per_token_definition() {
        let (h, inter, n_exp) = (8, 6, 5);
        let experts: Vec<GatedMlp> = (0..n_exp).map(|e| mlp(h, inter, 10 * e as u64)).collect();
        let moe = Moe {
            router: router(dense(n_exp, h, 99), Scoring::Softmax, false),
            experts,
            shared: Some(SharedExpert {
                mlp: mlp(h, inter, 77),
                gate: Some(dense(1, h, 55)),
            }),
            kernels: MoeKernels::default(),
        };
        let x = Tensor::from_vec(
            (0..7 * h).map(|i| (i as f32 * 0.37).sin()).collect(),
            (1, 7, h),
            &Device::Cpu,
        )
        .unwrap();
        let xf = x.reshape((7, h)).unwrap();
        let logits: Vec<Vec<f32>> = moe.router.gate.forward(&xf).unwrap().to_vec2().unwrap();
        let mut want = Vec::new();
        let mut used = std::collections::BTreeSet::new();
        for (t, l) in logits.iter().enumerate() {
            let row = xf.narrow(0, t, 1).unwrap();
            let sh = moe.shared.as_ref().unwrap();
            let g = sh
                .gate
                .as_ref()
                .unwrap()
                .forward(&row)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()[0][0];
            let s: Vec<f32> = sh
                .mlp
                .forward(&row, Mode::Inference)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut acc: Vec<f32> = s.iter().map(|v| v / (1.0 + (-g).exp())).collect();
            for (e, w) in moe.router.select(l) {
                used.insert(e);
                let y: Vec<f32> = moe.experts[e]
                    .forward(&row, Mode::Inference)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (a, v) in acc.iter_mut().zip(y) {
                    *a += w * v;
                }
            }
            want.extend(acc);
        }
        assert!(
            used.len() > 2,
            "the test input should reach several experts: {used:?}"
        );
        for mode in [Mode::Inference, Mode::Training { dropout: false }] {
            let got: Vec<f32> = moe
                .forward(&x, mode)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{mode:?}: {a} vs {b}");
            }
        }
    }
}
