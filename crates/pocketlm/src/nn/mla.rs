//! The projections of multi-head latent attention (MLA, DeepSeek-V2/V3, Kimi K2; DeepSeek-AI
//! 2024, "DeepSeek-V2", section 2.1): queries through an optional low-rank bottleneck, keys
//! and values from one compressed latent per position (`kv_lora_rank` wide, RMS-normed) that
//! `kv_b_proj` expands into per-head keys and values, plus a small rotary key part
//! (`qk_rope_head_dim`) shared by all heads. Each query/key head is `[nope | rope]`: only the
//! `rope` part is rotated, and the value heads may be narrower than the query/key heads.
//!
//! This module gives [`super::Attention`] its per-head queries, keys and values
//! ([`super::QkvProj::Latent`]); the attention, the KV cache and the output projection are the
//! shared ones, in one of two forms:
//!
//! - expanded: `kv_b_proj` expands every position's latent into per-head keys and values, which
//!   the cache holds (values zero-padded to the key width, [`Mla::padded_head_dim`]);
//! - compressed ([`Mla::absorbed`], as mlx-lm decodes and FlashMLA runs): `kv_b_proj`'s key part
//!   is absorbed into the queries and its value part applied after the attention, so all heads
//!   attend over one shared key/value head `[latent | rotary key]` (`kv_lora_rank +
//!   qk_rope_head_dim` wide), which is all the cache holds. For DeepSeek-V3 (128 heads, latent
//!   512, rope 64, keys 192 and values 128 wide) that is 2 × 576 values per position and layer
//!   (the shared attention keeps separate key and value buffers, here equal) instead of
//!   2 × 128 × 192 expanded: 43× less.
//!
//! The expanded form is the reference the compressed one is tested against.
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
    /// `kv_b_proj` split per head for the compressed form, or `None` for the expanded one.
    pub absorbed: Option<Absorbed>,
}

/// `kv_b_proj` `[heads · (nope + v), kv_lora_rank]` split per head (f32, dense), for the
/// compressed form: a query's non-rotary part times its head's key rows gives its product with
/// any latent, and the attention-weighted latent times the value rows the head's output.
#[derive(Debug)]
pub struct Absorbed {
    /// The key rows per head `[heads, qk_nope_head_dim, kv_lora_rank]` (mlx-lm's `embed_q`,
    /// transposed).
    pub key: Tensor,
    /// The value rows per head, transposed: `[heads, kv_lora_rank, v_head_dim]` (mlx-lm's
    /// `unembed_out`, transposed).
    pub value_t: Tensor,
}

impl Absorbed {
    /// The split of `kv_b_proj` (dequantized where it is quantized), on its device.
    ///
    /// Errors: a layer that cannot be dequantized where it lives (quantized on a CUDA device),
    /// or whose shape is not `[heads · (nope + v), kv_lora_rank]`.
    pub fn new(
        kv_b_proj: &Linear,
        n_heads: usize,
        nope: usize,
        v: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let w = kv_b_proj.dequantized_weight()?.to_device(device)?;
        let w = w.reshape((n_heads, nope + v, ()))?;
        Ok(Self {
            key: w.narrow(1, 0, nope)?.contiguous()?,
            value_t: w.narrow(1, nope, v)?.transpose(1, 2)?.contiguous()?,
        })
    }
}

impl Mla {
    /// Width of a query/key head: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The head width the attention and the KV cache see. Compressed: `kv_lora_rank +
    /// qk_rope_head_dim`. Expanded: `max(qk_head_dim, v_head_dim)`, the narrower of the two
    /// sides padded with zeros to it ([`Self::heads`]): zero query/key dimensions add nothing
    /// to the scores, zero value dimensions give zero outputs that [`Self::values_out`] drops.
    /// DeepSeek-V3 (192 vs 128) so stores 1.5× the value bytes of an unpadded cache; the shared
    /// attention kernels need equal widths.
    pub fn padded_head_dim(&self) -> usize {
        match self.absorbed {
            Some(_) => self.kv_lora_rank + self.qk_rope_head_dim,
            None => self.qk_head_dim().max(self.v_head_dim),
        }
    }

    /// Key/value heads the attention and the KV cache see: 1 compressed, `n_heads` expanded.
    pub fn kv_heads(&self) -> usize {
        match self.absorbed {
            Some(_) => 1,
            None => self.n_heads,
        }
    }

    /// Queries `[batch, heads, seq, padded_head_dim]`, keys and values `[batch, kv_heads, seq,
    /// padded_head_dim]` of `x: [batch, seq, hidden]` f32. The rope parts are rotated by
    /// `rotate` (`[batch, heads or 1, seq, qk_rope_head_dim]` -> same, at the pass's
    /// positions); the rotary key is computed once and shared by all heads. Expanded: query and
    /// key heads `[nope | rope]`, values padded. Compressed: query heads `[q_nope · key rows |
    /// rope]`, one key head `[latent | rope]` and the same as the value head. In
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
        let q_nope = q.narrow(3, 0, nope)?;

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
        let k_rot = rotate(&k_rot)?;
        let finish = |t: Tensor| -> Result<Tensor> {
            Ok(if mode.is_training() {
                t
            } else {
                t.contiguous()?
            })
        };
        if let Some(a) = &self.absorbed {
            let q_lat = q_nope.contiguous()?.broadcast_matmul(&a.key)?;
            let q = Tensor::cat(&[&q_lat, &q_rot], 3)?;
            let kv = Tensor::cat(&[&latent.unsqueeze(1)?, &k_rot], 3)?;
            return Ok((finish(q)?, finish(kv.clone())?, finish(kv)?));
        }
        let q = Tensor::cat(&[&q_nope, &q_rot], 3)?;
        let k_rot = k_rot.broadcast_as((b, nh, s, rope))?;
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
            finish(if w < d {
                let zeros = Tensor::zeros((b, nh, s, d - w), t.dtype(), t.device())?;
                Tensor::cat(&[&t, &zeros], 3)?
            } else {
                t
            })
        };
        Ok((pad(q)?, pad(k)?, pad(v)?))
    }

    /// The per-head values of the attention output `o: [batch, seq, heads ·
    /// padded_head_dim]`: `[batch, seq, heads · v_head_dim]`, the input of `o_proj`. Expanded:
    /// without the value padding. Compressed: each head's attention-weighted latent times its
    /// value rows of `kv_b_proj`.
    pub fn values_out(&self, o: &Tensor) -> Result<Tensor> {
        let d = self.padded_head_dim();
        let (b, s, _) = o.dims3()?;
        let (nh, v) = (self.n_heads, self.v_head_dim);
        if let Some(a) = &self.absorbed {
            let lat = o
                .reshape((b, s, nh, d))?
                .narrow(3, 0, self.kv_lora_rank)?
                .transpose(1, 2)?
                .contiguous()?;
            let out = lat.broadcast_matmul(&a.value_t)?.transpose(1, 2)?;
            return Ok(out.reshape((b, s, nh * v))?);
        }
        if d == v {
            return Ok(o.clone());
        }
        Ok(o.reshape((b, s, nh, d))?
            .narrow(3, 0, v)?
            .reshape((b, s, nh * v))?)
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
        // The compressed form runs kv_b_proj's split, not the layer: an adapter there would
        // change nothing.
        if self.absorbed.is_none() {
            out.push(("self_attn.kv_b_proj", &mut self.kv_b_proj));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{causal_attention_capped, RopeScaling, RotaryEmbedding};
    use candle_core::Device;

    fn dense(out: usize, inp: usize, seed: u64) -> Linear {
        let w: Vec<f32> = (0..out * inp)
            .map(|i| (((i as u64 * 7919 + seed * 104729) % 97) as f32 - 48.0) / 150.0)
            .collect();
        Linear::dense(Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap(), None)
    }

    fn norm(d: usize) -> RmsNorm {
        let w: Vec<f32> = (0..d).map(|i| 1.0 + 0.1 * (i as f32).sin()).collect();
        RmsNorm::new(Tensor::from_vec(w, d, &Device::Cpu).unwrap(), 1e-6, false).unwrap()
    }

    /// Heads 3, hidden 12, latent 8, key heads 6 + 4 (nope + rope), values 5.
    fn mla(low_rank: bool) -> Mla {
        let (nh, h, r, nope, rope, v) = (3, 12, 8, 6, 4, 5);
        let query = if low_rank {
            MlaQuery::LowRank {
                a: dense(7, h, 1),
                norm: norm(7),
                b: dense(nh * (nope + rope), 7, 2),
            }
        } else {
            MlaQuery::Direct(dense(nh * (nope + rope), h, 3))
        };
        Mla {
            query,
            kv_a_proj_with_mqa: dense(r + rope, h, 4),
            kv_a_layernorm: norm(r),
            kv_b_proj: dense(nh * (nope + v), r, 5),
            n_heads: nh,
            kv_lora_rank: r,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            v_head_dim: v,
            absorbed: None,
        }
    }

    /// The compressed form (one shared `[latent | rope]` head, `kv_b_proj` absorbed) gives the
    /// expanded form's attention output, over a 9-token prefill and in both query forms.
    #[test]
    fn compressed_equals_expanded() {
        let dev = Device::Cpu;
        let rot = RotaryEmbedding::new_hf(4, 10000.0, &RopeScaling::None, true, &dev).unwrap();
        let rotate = |t: &Tensor| rot.apply(t, 0);
        let x = Tensor::from_vec(
            (0..9 * 12).map(|i| (i as f32 * 0.31).sin()).collect(),
            (1, 9, 12),
            &dev,
        )
        .unwrap();
        for low_rank in [false, true] {
            let mut m = mla(low_rank);
            let run = |m: &Mla| -> Vec<f32> {
                let (q, k, v) = m.heads(&x, &rotate, Mode::Inference).unwrap();
                assert_eq!(k.dim(1).unwrap(), m.kv_heads());
                assert_eq!(q.dim(3).unwrap(), m.padded_head_dim());
                let o = causal_attention_capped(&q, &k, &v, 0.3, None, None, None, None).unwrap();
                let o = m.values_out(&o).unwrap();
                assert_eq!(o.dims(), [1, 9, 3 * 5]);
                o.flatten_all().unwrap().to_vec1().unwrap()
            };
            let want = run(&m);
            m.absorbed = Some(Absorbed::new(&m.kv_b_proj, 3, 6, 5, &dev).unwrap());
            assert_eq!((m.kv_heads(), m.padded_head_dim()), (1, 12));
            let got = run(&m);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "low rank {low_rank}: {a} vs {b}");
            }
        }
    }
}
