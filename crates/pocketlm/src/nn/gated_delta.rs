//! Gated DeltaNet linear attention (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"), the
//! token mixer of Qwen3-Next and Qwen3.5's `linear_attention` layers. Per token, `in_proj_qkv`
//! gives queries, keys and values (convolved over time by a depthwise causal convolution, then
//! SiLU), `in_proj_z` the output gate, `in_proj_b` and `in_proj_a` one scalar per value head for
//! the write strength `beta = sigmoid(b)` and the decay `g = -exp(A_log) · softplus(a +
//! dt_bias)`. Each value head `h` keeps a state `S_h: [d_v, d_k]` (mlx-lm's layout, the
//! transpose of transformers') updated by the gated delta rule, with `q` and `k` L2-normalised
//! and `q` scaled by `d_k^-0.5`:
//!
//! ```text
//! S ← exp(g) · S;   S ← S + beta · (v - S k) kᵀ;   o = S q
//! ```
//!
//! then `o` is RMS-normalised per head with a plain (not zero-centred) weight, gated by
//! `silu(z)` and projected back by `out_proj`. Key heads serve `n_v / n_k` value heads each:
//! consecutive ones in the Hugging Face / MLX order, every `n_k`-th one in the order llama.cpp's
//! converter stores ([`ValueHeadOrder`]). The state is an [`ArraysCache`] of two arrays (mlx-lm `ArraysCache(size=2)`): the
//! convolution state `[batch, kernel - 1, conv_dim]` and the recurrent state `[batch, n_v, d_v,
//! d_k]` f32.
//!
//! The recurrence runs token by token in prefill as in decode (transformers'
//! `torch_recurrent_gated_delta_rule` / mlx-lm's `gated_delta_ops`, not the chunked form
//! transformers uses for prompts; the two differ in rounding only), on the host in f32, the
//! value heads in parallel: the per-head state is a small matrix, and the loop costs
//! `O(seq · n_v · d_k · d_v)`. On a GPU the inputs and state make a round trip to the host.
//!
//! Reference: Hugging Face `models/qwen3_5/modeling_qwen3_5.py` (`Qwen3_5GatedDeltaNet`,
//! `Qwen3_5RMSNormGated`, `torch_recurrent_gated_delta_rule`, `l2norm`), mlx-lm
//! `models/qwen3_5.py` (`GatedDeltaNet`) and `models/gated_delta.py` (transformers 5.24, mlx-lm
//! 0.32.2).

use candle_core::Tensor;

use super::{CausalConv1d, Linear, Mode, RmsNorm};
use crate::kv_cache::ArraysCache;
use crate::{Error, Result};

/// Which value heads a key head serves, i.e. the order of the value heads in every weight and
/// state that has one entry per value head (the `v` rows of `in_proj_qkv` and of the
/// convolution, `in_proj_z`, `in_proj_a`, `in_proj_b`, `A_log`, `dt_bias`, the columns of
/// `out_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueHeadOrder {
    /// Grouped by key head (Hugging Face, mlx-lm): value head `j` reads key head
    /// `j / (n_v / n_k)`.
    Grouped,
    /// Tiled (llama.cpp's converter, `_LinearAttentionVReorderBase._reorder_v_heads`, so that
    /// ggml broadcasts the key heads): value head `j` reads key head `j % n_k`.
    Tiled,
}

/// Head counts and widths of a Gated DeltaNet layer (`linear_num_key_heads`,
/// `linear_num_value_heads`, `linear_key_head_dim`, `linear_value_head_dim`) and the order of
/// its value heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaHeads {
    /// Query/key heads.
    pub n_k: usize,
    /// Value heads (a multiple of `n_k`).
    pub n_v: usize,
    /// Width of a query/key head.
    pub d_k: usize,
    /// Width of a value head.
    pub d_v: usize,
    /// How the value heads are ordered.
    pub order: ValueHeadOrder,
}

impl DeltaHeads {
    /// The key head that value head `hv` reads ([`ValueHeadOrder`]).
    pub fn key_head(&self, hv: usize) -> usize {
        match self.order {
            ValueHeadOrder::Grouped => hv / (self.n_v / self.n_k),
            ValueHeadOrder::Tiled => hv % self.n_k,
        }
    }

    /// Width of the convolved `q, k, v` rows: `2 · n_k · d_k + n_v · d_v`.
    pub fn conv_dim(&self) -> usize {
        2 * self.n_k * self.d_k + self.n_v * self.d_v
    }
}

/// A Gated DeltaNet layer: `x: [batch, seq, hidden]` f32 -> `[batch, seq, hidden]` f32.
#[derive(Debug)]
pub struct GatedDeltaNet {
    /// `in_proj_qkv` `[conv_dim, hidden]`: rows q (`n_k · d_k`), k (`n_k · d_k`), v (`n_v · d_v`).
    pub in_proj_qkv: Linear,
    /// `in_proj_z` `[n_v · d_v, hidden]`: the output gate.
    pub in_proj_z: Linear,
    /// `in_proj_b` `[n_v, hidden]`: the write strength before its sigmoid.
    pub in_proj_b: Linear,
    /// `in_proj_a` `[n_v, hidden]`: the decay's input.
    pub in_proj_a: Linear,
    /// The depthwise causal convolution over the `q, k, v` rows (no bias).
    pub conv: CausalConv1d,
    /// `-exp(A_log)` per value head.
    pub neg_a: Vec<f32>,
    /// `dt_bias` per value head.
    pub dt_bias: Vec<f32>,
    /// The per-head RMSNorm `[d_v]` of the output (plain weight), before the gate.
    pub norm: RmsNorm,
    /// `out_proj` `[hidden, n_v · d_v]`.
    pub out_proj: Linear,
    /// Head geometry.
    pub heads: DeltaHeads,
}

/// `ln(1 + e^x)` as PyTorch's `softplus` (linear above 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `x / sqrt(sum(x²) + 1e-6)`, transformers' `l2norm` (the FLA kernel's convention).
fn l2_normalize(x: &mut [f32]) {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Inputs of the recurrence for one sequence of `seq` tokens, host f32, row-major:
/// `q`, `k: [seq, n_k, d_k]`, `v: [seq, n_v, d_v]`, `g`, `beta: [seq, n_v]` (`g` the log decay).
struct Step<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
    beta: &'a [f32],
}

/// The gated delta rule over `seq` tokens of one sequence, continuing `state: [n_v, d_v, d_k]`
/// (updated in place). Returns the outputs `[seq, n_v, d_v]`. `q` and `k` are L2-normalised
/// here and `q` scaled by `d_k^-0.5`. The value heads are independent and run in parallel.
fn recurrence(h: DeltaHeads, seq: usize, x: &Step<'_>, state: &mut [f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let DeltaHeads { n_v, d_k, d_v, .. } = h;
    let per_head: Vec<Vec<f32>> = state
        .par_chunks_mut(d_v * d_k)
        .enumerate()
        .map(|(hv, s)| head_recurrence(h, seq, x, hv, s))
        .collect();
    let mut out = vec![0f32; seq * n_v * d_v];
    for (hv, o) in per_head.iter().enumerate() {
        for t in 0..seq {
            out[(t * n_v + hv) * d_v..(t * n_v + hv + 1) * d_v]
                .copy_from_slice(&o[t * d_v..(t + 1) * d_v]);
        }
    }
    out
}

/// [`recurrence`] for value head `hv` alone, continuing its state `s: [d_v, d_k]`; outputs
/// `[seq, d_v]`.
fn head_recurrence(h: DeltaHeads, seq: usize, x: &Step<'_>, hv: usize, s: &mut [f32]) -> Vec<f32> {
    let DeltaHeads {
        n_k, n_v, d_k, d_v, ..
    } = h;
    let hk = h.key_head(hv);
    let scale = 1.0 / (d_k as f32).sqrt();
    let mut out = vec![0f32; seq * d_v];
    let (mut q, mut k) = (vec![0f32; d_k], vec![0f32; d_k]);
    for t in 0..seq {
        let at = (t * n_k + hk) * d_k;
        q.copy_from_slice(&x.q[at..at + d_k]);
        k.copy_from_slice(&x.k[at..at + d_k]);
        l2_normalize(&mut q);
        l2_normalize(&mut k);
        q.iter_mut().for_each(|v| *v *= scale);
        let decay = x.g[t * n_v + hv].exp();
        let beta = x.beta[t * n_v + hv];
        let v = &x.v[(t * n_v + hv) * d_v..(t * n_v + hv + 1) * d_v];
        let o = &mut out[t * d_v..(t + 1) * d_v];
        for (j, row) in s.chunks_exact_mut(d_k).enumerate() {
            row.iter_mut().for_each(|r| *r *= decay);
            let mem: f32 = row.iter().zip(&k).map(|(r, k)| r * k).sum();
            let delta = (v[j] - mem) * beta;
            row.iter_mut().zip(&k).for_each(|(r, k)| *r += k * delta);
            o[j] = row.iter().zip(&q).map(|(r, q)| r * q).sum();
        }
    }
    out
}

impl GatedDeltaNet {
    /// The layer on `x: [batch, seq, hidden]` f32 after the state in `cache` (array 0 the
    /// convolution state `[batch, kernel - 1, conv_dim]`, array 1 the recurrent state `[batch,
    /// n_v, d_v, d_k]` f32; unset: zeros), which it replaces and advances by `seq` positions.
    /// Returns `[batch, seq, hidden]` f32.
    ///
    /// Errors: shapes that do not agree with the weights or the state.
    pub fn forward(&self, x: &Tensor, cache: &mut ArraysCache) -> Result<Tensor> {
        let h = self.heads;
        let (b, s, _) = x.dims3()?;
        let dev = x.device();
        let qkv = self.in_proj_qkv.forward(x)?;
        let (conv, conv_state) = self.conv.forward(&qkv, cache.get(0))?;
        let conv = candle_nn::ops::silu(&conv)?;
        let kd = h.n_k * h.d_k;
        let host = |t: Tensor| -> Result<Vec<f32>> {
            Ok(t.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
        };
        let q = host(conv.narrow(2, 0, kd)?)?;
        let k = host(conv.narrow(2, kd, kd)?)?;
        let v = host(conv.narrow(2, 2 * kd, h.n_v * h.d_v)?)?;
        let beta: Vec<f32> = host(self.in_proj_b.forward(x)?)?
            .into_iter()
            .map(|b| 1.0 / (1.0 + (-b).exp()))
            .collect();
        let g: Vec<f32> = host(self.in_proj_a.forward(x)?)?
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                let hv = i % h.n_v;
                self.neg_a[hv] * softplus(a + self.dt_bias[hv])
            })
            .collect();
        let per = h.n_v * h.d_v * h.d_k;
        let mut state = match cache.get(1) {
            Some(st) if st.dims() == [b, h.n_v, h.d_v, h.d_k] => host(st.clone())?,
            Some(st) => {
                return Err(Error::InvalidArgument(format!(
                    "Gated DeltaNet recurrent state {:?}, expected {:?} (batch, value heads, \
                     value width, key width)",
                    st.dims(),
                    [b, h.n_v, h.d_v, h.d_k]
                )))
            }
            None => vec![0f32; b * per],
        };
        let (nq, nv, ng) = (s * kd, s * h.n_v * h.d_v, s * h.n_v);
        let mut out = Vec::with_capacity(b * nv);
        for i in 0..b {
            let step = Step {
                q: &q[i * nq..(i + 1) * nq],
                k: &k[i * nq..(i + 1) * nq],
                v: &v[i * nv..(i + 1) * nv],
                g: &g[i * ng..(i + 1) * ng],
                beta: &beta[i * ng..(i + 1) * ng],
            };
            out.extend(recurrence(h, s, &step, &mut state[i * per..(i + 1) * per]));
        }
        cache.set(0, conv_state)?;
        cache.set(1, Tensor::from_vec(state, (b, h.n_v, h.d_v, h.d_k), dev)?)?;
        cache.advance(s);
        let o = Tensor::from_vec(out, (b, s, h.n_v, h.d_v), dev)?;
        let z = self.in_proj_z.forward(x)?.reshape((b, s, h.n_v, h.d_v))?;
        let o = (self.norm.forward(&o)? * candle_nn::ops::silu(&z)?)?;
        self.out_proj.forward(&o.reshape((b, s, h.n_v * h.d_v))?)
    }
}

impl GatedDeltaNet {
    /// The layer for training ([`Mode::Training`]): `x: [batch, seq, hidden]` f32 from a zero
    /// state (positions `0..seq`) -> `[batch, seq, hidden]` f32, built from differentiable
    /// candle ops so that `backward()` reaches adapters on its projections and below it. The
    /// same formulas as [`Self::forward`] (the recurrence a loop over tokens, each step a few
    /// batched matrix products over the value heads; transformers'
    /// `torch_recurrent_gated_delta_rule`); `dropout` turns adapter dropout on.
    ///
    /// Cost: `seq` steps of `O(batch · n_v · d_v · d_k)` each, and an autograd graph of a few
    /// ops per token.
    ///
    /// Errors: shapes that do not agree with the weights.
    pub fn forward_diff(&self, x: &Tensor, dropout: bool) -> Result<Tensor> {
        let mode = Mode::Training { dropout };
        let h = self.heads;
        let (b, s, _) = x.dims3()?;
        let dev = x.device();
        let qkv = self.in_proj_qkv.forward_mode(x, mode)?;
        let (conv, _) = self.conv.forward(&qkv, None)?;
        let conv = candle_nn::ops::silu(&conv)?;
        let kd = h.n_k * h.d_k;
        let l2 = |t: Tensor| -> Result<Tensor> {
            let n = (t.sqr()?.sum_keepdim(3)? + 1e-6)?.sqrt()?;
            Ok(t.broadcast_div(&n)?)
        };
        // Key heads repeated for their value heads: [b, s, n_v, d_k].
        let idx: Vec<u32> = (0..h.n_v).map(|j| h.key_head(j) as u32).collect();
        let idx = Tensor::from_vec(idx, h.n_v, dev)?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(l2(t.reshape((b, s, h.n_k, h.d_k))?)?.index_select(&idx, 2)?)
        };
        let q = (heads(conv.narrow(2, 0, kd)?)? * (1.0 / (h.d_k as f64).sqrt()))?;
        let k = heads(conv.narrow(2, kd, kd)?)?;
        let v = conv
            .narrow(2, 2 * kd, h.n_v * h.d_v)?
            .reshape((b, s, h.n_v, h.d_v))?;
        let beta = candle_nn::ops::sigmoid(&self.in_proj_b.forward_mode(x, mode)?)?;
        let dt_bias = Tensor::new(self.dt_bias.as_slice(), dev)?;
        let neg_a = Tensor::new(self.neg_a.as_slice(), dev)?;
        // softplus(z) = max(z, 0) + ln(1 + e^-|z|), stable for every z.
        let z = self
            .in_proj_a
            .forward_mode(x, mode)?
            .broadcast_add(&dt_bias)?;
        let softplus = (z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let decay = softplus.broadcast_mul(&neg_a)?.exp()?; // [b, s, n_v]
        let mut state = Tensor::zeros((b, h.n_v, h.d_v, h.d_k), x.dtype(), dev)?;
        let mut outs = Vec::with_capacity(s);
        let at = |t: &Tensor, i: usize| -> Result<Tensor> { Ok(t.narrow(1, i, 1)?.squeeze(1)?) };
        for i in 0..s {
            let (qt, kt, vt) = (at(&q, i)?, at(&k, i)?, at(&v, i)?);
            let dt = at(&decay, i)?.reshape((b, h.n_v, 1, 1))?;
            let bt = at(&beta, i)?.reshape((b, h.n_v, 1))?;
            state = state.broadcast_mul(&dt)?;
            let kcol = kt.unsqueeze(3)?.contiguous()?; // [b, n_v, d_k, 1]
            let mem = state.matmul(&kcol)?.squeeze(3)?; // [b, n_v, d_v]
            let delta = (vt - mem)?.broadcast_mul(&bt)?;
            let outer = delta
                .unsqueeze(3)?
                .contiguous()?
                .matmul(&kt.unsqueeze(2)?.contiguous()?)?;
            state = (state + outer)?;
            let qcol = qt.unsqueeze(3)?.contiguous()?;
            outs.push(state.matmul(&qcol)?.squeeze(3)?);
        }
        let o = Tensor::stack(&outs, 1)?; // [b, s, n_v, d_v]
        let z = self
            .in_proj_z
            .forward_mode(x, mode)?
            .reshape((b, s, h.n_v, h.d_v))?;
        let o = (self.norm.forward_diff(&o)? * candle_nn::ops::silu(&z)?)?;
        self.out_proj
            .forward_mode(&o.reshape((b, s, h.n_v * h.d_v))?, mode)
    }

    /// The linear layers by Hugging Face name within the block (`linear_attn.in_proj_qkv`,
    /// `in_proj_z`, `in_proj_b`, `in_proj_a`, `out_proj`), for adapters.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("linear_attn.in_proj_qkv", &mut self.in_proj_qkv),
            ("linear_attn.in_proj_z", &mut self.in_proj_z),
            ("linear_attn.in_proj_b", &mut self.in_proj_b),
            ("linear_attn.in_proj_a", &mut self.in_proj_a),
            ("linear_attn.out_proj", &mut self.out_proj),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recurrence against transformers' formula written with `[d_k, d_v]` states (its
    /// `torch_recurrent_gated_delta_rule`, values computed by hand for one head), and a split
    /// run equal to one run.
    #[test]
    fn recurrence_follows_the_delta_rule_and_carries_its_state() {
        let h = DeltaHeads {
            n_k: 1,
            n_v: 2,
            d_k: 2,
            d_v: 1,
            order: ValueHeadOrder::Grouped,
        };
        // Two tokens; both value heads share the key head.
        let q = [1.0f32, 0.0, 0.6, 0.8];
        let k = [0.0f32, 2.0, 3.0, 4.0];
        let v = [1.0f32, -1.0, 0.5, 2.0];
        let g = [0.0f32, -1.0, -0.5, 0.0];
        let beta = [0.5f32, 1.0, 0.25, 0.5];
        let x = Step {
            q: &q,
            k: &k,
            v: &v,
            g: &g,
            beta: &beta,
        };
        let mut state = vec![0f32; 4];
        let out = recurrence(h, 2, &x, &mut state);
        // Head 0, token 0: k = (0, 1), S = 0.5 · 1 · kᵀ = (0, 0.5); q = (1, 0)/√2: o = 0.
        // Token 1: k = (0.6, 0.8), S·e^-0.5, mem = 0.4·e^-0.5, delta = 0.25 (0.5 - mem),
        // S += k delta, o = S · (0.6, 0.8)/√2.
        let s0 = [0.0f32, 0.5];
        let d = (-0.5f32).exp();
        let mem = (s0[0] * 0.6 + s0[1] * 0.8) * d;
        let delta = 0.25 * (0.5 - mem);
        let s1 = [s0[0] * d + 0.6 * delta, s0[1] * d + 0.8 * delta];
        let o1 = (s1[0] * 0.6 + s1[1] * 0.8) / 2f32.sqrt();
        assert!(out[0].abs() < 1e-6, "{out:?}");
        assert!((out[2] - o1).abs() < 1e-6, "{} vs {o1}", out[2]);
        assert!((state[0] - s1[0]).abs() < 1e-6 && (state[1] - s1[1]).abs() < 1e-6);
        // Token by token from the carried state: the same outputs and state.
        let mut st = vec![0f32; 4];
        let mut parts = Vec::new();
        for t in 0..2 {
            let one = Step {
                q: &q[2 * t..2 * t + 2],
                k: &k[2 * t..2 * t + 2],
                v: &v[2 * t..2 * t + 2],
                g: &g[2 * t..2 * t + 2],
                beta: &beta[2 * t..2 * t + 2],
            };
            parts.extend(recurrence(h, 1, &one, &mut st));
        }
        assert_eq!(parts, out);
        assert_eq!(st, state);
    }

    /// The same layer with its value heads stored tiled (llama.cpp) instead of grouped gives
    /// the same outputs, tiled: value head `j = r · n_k + k` of the tiled order is head
    /// `k · (n_v / n_k) + r` of the grouped one.
    #[test]
    fn tiled_value_heads_read_the_key_head_llama_cpp_assigns() {
        let grouped = DeltaHeads {
            n_k: 2,
            n_v: 4,
            d_k: 2,
            d_v: 2,
            order: ValueHeadOrder::Grouped,
        };
        let tiled = DeltaHeads {
            order: ValueHeadOrder::Tiled,
            ..grouped
        };
        let (n_k, n_v, d_v, seq) = (2, 4, 2, 3);
        let to_grouped = |j: usize| (j % n_k) * (n_v / n_k) + j / n_k;
        assert_eq!((0..n_v).map(to_grouped).collect::<Vec<_>>(), [0, 2, 1, 3]);
        let f = |n: usize, m: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32) * m).sin()).collect() };
        let (q, k) = (f(seq * 4, 0.7), f(seq * 4, 1.3));
        let (v, g, beta) = (
            f(seq * n_v * d_v, 0.9),
            f(seq * n_v, 0.4),
            f(seq * n_v, 2.1),
        );
        let g: Vec<f32> = g.iter().map(|x| -x.abs()).collect();
        let beta: Vec<f32> = beta.iter().map(|x| x.abs()).collect();
        // Rows [seq, n_v, width] from grouped order to tiled order.
        let tile = |x: &[f32], width: usize| -> Vec<f32> {
            let mut out = vec![0f32; x.len()];
            for t in 0..seq {
                for j in 0..n_v {
                    let src = (t * n_v + to_grouped(j)) * width;
                    out[(t * n_v + j) * width..][..width].copy_from_slice(&x[src..src + width]);
                }
            }
            out
        };
        let step = |v: &[f32], g: &[f32], b: &[f32], h: DeltaHeads| {
            let x = Step {
                q: &q,
                k: &k,
                v,
                g,
                beta: b,
            };
            recurrence(h, seq, &x, &mut vec![0f32; n_v * 4])
        };
        let want = tile(&step(&v, &g, &beta, grouped), d_v);
        let got = step(&tile(&v, d_v), &tile(&g, 1), &tile(&beta, 1), tiled);
        assert_eq!(got, want);
        assert_ne!(
            step(&tile(&v, d_v), &tile(&g, 1), &tile(&beta, 1), grouped),
            want
        );
    }

    #[test]
    fn softplus_matches_its_formula() {
        for x in [-30.0f32, -2.0, 0.0, 1.5, 19.0, 25.0] {
            let want = if x > 20.0 { x } else { (1.0 + x.exp()).ln() };
            assert!((softplus(x) - want).abs() < 1e-5, "{x}");
        }
    }
}
