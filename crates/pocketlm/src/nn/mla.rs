//! The projections of multi-head latent attention (MLA, DeepSeek-V2/V3, Kimi K2; DeepSeek-AI
//! 2024, "DeepSeek-V2", section 2.1): queries through an optional low-rank bottleneck, keys
//! and values from one compressed latent per position (`kv_lora_rank` wide, RMS-normed) that
//! `kv_b_proj` expands into per-head keys and values, plus a small rotary key part
//! (`qk_rope_head_dim`) shared by all heads. Each query/key head is `[nope | rope]`: only the
//! `rope` part is rotated, and the value heads may be narrower than the query/key heads.
//!
//! This module gives [`super::Attention`] its per-head queries, keys and values
//! ([`super::QkvProj::Latent`]); the attention, the KV cache and the output projection are the
//! shared ones. The cache holds the expanded per-head keys and values (see
//! [`Mla::padded_head_dim`] for how values narrower than the keys are stored).
//!
//! Reference: Hugging Face `modeling_deepseek_v3.py` (`DeepseekV3Attention.forward`,
//! `expand_kv`), mlx-lm `models/deepseek_v3.py` (`DeepseekV3Attention`).

use candle_core::Tensor;

use super::{Linear, Mode, RmsNorm};
use crate::{Error, Result};

/// How MLA projects the queries.
#[derive(Debug)]
pub enum MlaQuery {
    /// `q_proj` `[heads · qk_head_dim, hidden]` (`q_lora_rank: null`).
    Direct(Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`: `q_a_proj` `[q_lora_rank, hidden]`,
    /// `q_a_layernorm` `[q_lora_rank]`, `q_b_proj` `[heads · qk_head_dim, q_lora_rank]`.
    LowRank {
        /// `q_a_proj`.
        a: Linear,
        /// `q_a_layernorm`.
        norm: RmsNorm,
        /// `q_b_proj`.
        b: Linear,
    },
}

/// The MLA projections of one layer. `x: [batch, seq, hidden]` f32 -> per-head queries, keys
/// and values ([`Self::heads`]).
#[derive(Debug)]
pub struct Mla {
    /// The query projection.
    pub query: MlaQuery,
    /// `kv_a_proj_with_mqa` `[kv_lora_rank + qk_rope_head_dim, hidden]`: the latent, then the
    /// shared rotary key.
    pub kv_a_proj_with_mqa: Linear,
    /// `kv_a_layernorm` `[kv_lora_rank]`, on the latent.
    pub kv_a_layernorm: RmsNorm,
    /// `kv_b_proj` `[heads · (qk_nope_head_dim + v_head_dim), kv_lora_rank]`: per head, the
    /// key's non-rotary part, then the value.
    pub kv_b_proj: Linear,
    /// Query (and key/value) heads.
    pub n_heads: usize,
    /// Width of the latent (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// Non-rotary part of a query/key head (`qk_nope_head_dim`).
    pub qk_nope_head_dim: usize,
    /// Rotary part of a query/key head (`qk_rope_head_dim`).
    pub qk_rope_head_dim: usize,
    /// Width of a value head (`v_head_dim`).
    pub v_head_dim: usize,
}

impl Mla {
    /// Width of a query/key head: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The head width the attention and the KV cache see: `max(qk_head_dim, v_head_dim)`. The
    /// narrower of the two sides is padded with zeros to it ([`Self::heads`]): zero query/key
    /// dimensions add nothing to the scores, zero value dimensions give zero outputs that
    /// [`Self::values_out`] drops. DeepSeek-V3 (192 vs 128) so stores 1.5× the value bytes
    /// of an unpadded cache; the shared attention kernels need equal widths.
    pub fn padded_head_dim(&self) -> usize {
        self.qk_head_dim().max(self.v_head_dim)
    }

    /// Queries, keys and values `[batch, heads, seq, padded_head_dim]` of `x: [batch, seq,
    /// hidden]` f32. Query and key heads are `[nope | rope]`, the rope parts rotated by
    /// `rotate` (`[batch, heads or 1, seq, qk_rope_head_dim]` -> same, at the pass's
    /// positions); the rotary key is computed once and shared by all heads. In
    /// [`Mode::Training`] every step is a differentiable op.
    ///
    /// Errors: shapes that do not agree with the weights.
    pub fn heads(
        &self,
        x: &Tensor,
        rotate: &dyn Fn(&Tensor) -> Result<Tensor>,
        mode: Mode,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let (nh, nope, rope, r) = (
            self.n_heads,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.kv_lora_rank,
        );
        let qk = self.qk_head_dim();
        let q = match &self.query {
            MlaQuery::Direct(l) => l.forward_mode(x, mode)?,
            MlaQuery::LowRank { a, norm, b } => {
                b.forward_mode(&norm.forward_mode(&a.forward_mode(x, mode)?, mode)?, mode)?
            }
        };
        let q = q.reshape((b, s, nh, qk))?.transpose(1, 2)?;
        let q_rot = rotate(&q.narrow(3, nope, rope)?.contiguous()?)?;
        let q = Tensor::cat(&[&q.narrow(3, 0, nope)?, &q_rot], 3)?;

        let ckv = self.kv_a_proj_with_mqa.forward_mode(x, mode)?;
        if ckv.dim(2)? != r + rope {
            return Err(Error::tensor(
                "kv_a_proj_with_mqa",
                format!(
                    "gives {} values per position, not kv_lora_rank + qk_rope_head_dim = {}",
                    ckv.dim(2)?,
                    r + rope
                ),
            ));
        }
        let latent = self
            .kv_a_layernorm
            .forward_mode(&ckv.narrow(2, 0, r)?.contiguous()?, mode)?;
        let k_rot = ckv
            .narrow(2, r, rope)?
            .reshape((b, s, 1, rope))?
            .transpose(1, 2)?
            .contiguous()?;
        let k_rot = rotate(&k_rot)?.broadcast_as((b, nh, s, rope))?;
        let kv = self
            .kv_b_proj
            .forward_mode(&latent, mode)?
            .reshape((b, s, nh, nope + self.v_head_dim))?
            .transpose(1, 2)?;
        let k = Tensor::cat(&[&kv.narrow(3, 0, nope)?, &k_rot], 3)?;
        let v = kv.narrow(3, nope, self.v_head_dim)?;
        let d = self.padded_head_dim();
        let pad = |t: Tensor| -> Result<Tensor> {
            let w = t.dim(3)?;
            let t = if w < d {
                let zeros = Tensor::zeros((b, nh, s, d - w), t.dtype(), t.device())?;
                Tensor::cat(&[&t, &zeros], 3)?
            } else {
                t
            };
            Ok(if mode.is_training() {
                t
            } else {
                t.contiguous()?
            })
        };
        Ok((pad(q)?, pad(k)?, pad(v)?))
    }

    /// The attention output `o: [batch, seq, heads · padded_head_dim]` without the value
    /// padding: `[batch, seq, heads · v_head_dim]`, the input of `o_proj`.
    pub fn values_out(&self, o: &Tensor) -> Result<Tensor> {
        let d = self.padded_head_dim();
        if d == self.v_head_dim {
            return Ok(o.clone());
        }
        let (b, s, _) = o.dims3()?;
        Ok(o.reshape((b, s, self.n_heads, d))?
            .narrow(3, 0, self.v_head_dim)?
            .reshape((b, s, self.n_heads * self.v_head_dim))?)
    }

    /// The linear layers by Hugging Face name within the block (`self_attn.q_a_proj`, ...).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut out = Vec::with_capacity(4);
        match &mut self.query {
            MlaQuery::Direct(q) => out.push(("self_attn.q_proj", q)),
            MlaQuery::LowRank { a, b, .. } => {
                out.push(("self_attn.q_a_proj", a));
                out.push(("self_attn.q_b_proj", b));
            }
        }
        out.push(("self_attn.kv_a_proj_with_mqa", &mut self.kv_a_proj_with_mqa));
        out.push(("self_attn.kv_b_proj", &mut self.kv_b_proj));
        out
    }
}
