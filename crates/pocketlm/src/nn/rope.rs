//! Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer", arXiv:2104.09864) and the
//! frequency-scaling variants of Hugging Face `modeling_rope_utils.py`.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::Mode;
use crate::{Error, Result};

/// How RoPE frequencies are scaled for longer contexts (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    #[default]
    None,
    /// Position interpolation: all frequencies divided by `factor`.
    Linear {
        /// Scaling factor.
        factor: f64,
    },
    /// Llama 3.1 scaling (HF `_compute_llama3_parameters`): low frequencies divided by
    /// `factor`, high ones kept, a smooth blend between.
    Llama3 {
        /// Scaling factor.
        factor: f64,
        /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
    /// YaRN (Peng et al. 2023, arXiv:2309.00071; HF `_compute_yarn_parameters`): frequencies
    /// whose wavelength fits the original context more than `beta_fast` times are kept, those
    /// fitting fewer than `beta_slow` times are divided by `factor`, with a linear ramp over the
    /// dimensions between; cos/sin multiplied by `attention_factor`.
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// Context length the model was pre-trained with, in tokens.
        original_max_position_embeddings: f64,
        /// Rotations over the original context above which a frequency is kept (default 32).
        beta_fast: f64,
        /// Rotations below which a frequency is fully interpolated (default 1).
        beta_slow: f64,
        /// Scale of cos/sin: given, or `0.1·ln(factor) + 1` (with `mscale` / `mscale_all_dim`:
        /// the ratio of `0.1·m·ln(factor) + 1` for the two), 1 when `factor <= 1`.
        attention_factor: f64,
        /// Round the ramp's ends outward to whole dimensions (default true).
        truncate: bool,
    },
    /// Per-frequency divisors given explicitly (GGUF `rope_freqs.weight`, `[head_dim / 2]`),
    /// which is how llama.cpp stores Llama 3.1 scaling.
    FreqFactors(Vec<f32>),
    /// Proportional RoPE (Gemma 4's full-attention layers; HF
    /// `_compute_proportional_rope_parameters`, mlx-lm `ProportionalRoPE`): pairs span the
    /// whole head (`rotary_dim = head_dim`, exponents `2i / head_dim`), but only the first
    /// `floor(partial_rotary_factor · head_dim / 2)` frequencies rotate; the others are 0 (those
    /// pairs pass unchanged). All frequencies are divided by `factor`.
    Proportional {
        /// Scaling factor (default 1).
        factor: f64,
        /// Share of the head's dimensions that rotate (default 1).
        partial_rotary_factor: f64,
    },
    /// LongRoPE (Ding et al. 2024, arXiv:2402.13753; Phi-3's `longrope`, formerly `su`), as HF
    /// `_compute_longrope_parameters` + `longrope_frequency_update`: frequencies divided by
    /// `short_factor` while every position of a forward pass is below
    /// `original_max_position_embeddings`, by `long_factor` once one is not; cos/sin multiplied
    /// by `attention_factor`.
    LongRope {
        /// Per-frequency divisors `[rotary_dim / 2]` for short contexts.
        short_factor: Vec<f64>,
        /// Per-frequency divisors `[rotary_dim / 2]` for long contexts.
        long_factor: Vec<f64>,
        /// Context length the model was pre-trained with, in tokens.
        original_max_position_embeddings: usize,
        /// Scale of cos/sin: given, or `sqrt(1 + ln(factor) / ln(original))` for
        /// `factor = max_position_embeddings / original > 1`, else 1.
        attention_factor: f64,
    },
}

#[derive(Deserialize)]
struct RawScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    short_factor: Option<Vec<f64>>,
    long_factor: Option<Vec<f64>>,
    attention_factor: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    truncate: Option<bool>,
    partial_rotary_factor: Option<f64>,
}

impl RopeScaling {
    /// Parses config.json's `rope_scaling` object (`null` or absent gives [`RopeScaling::None`]).
    ///
    /// Errors name the missing field or the unsupported `rope_type`.
    ///
    /// `longrope` (or its old name `su`) needs `short_factor`, `long_factor`,
    /// `original_max_position_embeddings`, and `factor` (the ratio of the extended to the
    /// original context) unless `attention_factor` is given; architectures copy those from the
    /// top level of config.json into the object first where their configs keep them there.
    pub fn from_config(v: Option<&serde_json::Value>) -> Result<Self> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(Self::None);
        };
        let raw: RawScaling = serde_json::from_value(v.clone())
            .map_err(|e| Error::Model(format!("config.json: bad `rope_scaling`: {e}")))?;
        let need = |x: Option<f64>, f: &str| {
            x.ok_or_else(|| Error::Model(format!("config.json: `rope_scaling.{f}` is missing")))
        };
        match raw.rope_type.as_deref().unwrap_or("default") {
            "default" => Ok(Self::None),
            "linear" => Ok(Self::Linear {
                factor: need(raw.factor, "factor")?,
            }),
            "llama3" => Ok(Self::Llama3 {
                factor: need(raw.factor, "factor")?,
                low_freq_factor: need(raw.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(raw.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: need(
                    raw.original_max_position_embeddings,
                    "original_max_position_embeddings",
                )?,
            }),
            "longrope" | "su" => {
                let original = need(
                    raw.original_max_position_embeddings,
                    "original_max_position_embeddings",
                )?;
                let attention_factor = match raw.attention_factor {
                    Some(a) => a,
                    None => {
                        let factor = need(raw.factor, "factor")?;
                        if factor <= 1.0 {
                            1.0
                        } else {
                            (1.0 + factor.ln() / original.ln()).sqrt()
                        }
                    }
                };
                let factors = |x: Option<Vec<f64>>, f: &str| {
                    x.ok_or_else(|| {
                        Error::Model(format!("config.json: `rope_scaling.{f}` is missing"))
                    })
                };
                Ok(Self::LongRope {
                    short_factor: factors(raw.short_factor, "short_factor")?,
                    long_factor: factors(raw.long_factor, "long_factor")?,
                    original_max_position_embeddings: original as usize,
                    attention_factor,
                })
            }
            "yarn" => {
                let factor = need(raw.factor, "factor")?;
                let get_mscale = |m: f64| {
                    if factor <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * factor.ln() + 1.0
                    }
                };
                let attention_factor = match (raw.attention_factor, raw.mscale, raw.mscale_all_dim)
                {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        get_mscale(m) / get_mscale(all)
                    }
                    _ => get_mscale(1.0),
                };
                Ok(Self::Yarn {
                    factor,
                    original_max_position_embeddings: need(
                        raw.original_max_position_embeddings,
                        "original_max_position_embeddings",
                    )?,
                    beta_fast: raw.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: raw.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0),
                    attention_factor,
                    truncate: raw.truncate.unwrap_or(true),
                })
            }
            "proportional" => {
                let partial_rotary_factor = raw.partial_rotary_factor.unwrap_or(1.0);
                if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
                    return Err(Error::Model(format!(
                        "config.json: `rope_parameters.partial_rotary_factor` {partial_rotary_factor} is not in (0, 1]"
                    )));
                }
                Ok(Self::Proportional {
                    factor: raw.factor.unwrap_or(1.0),
                    partial_rotary_factor,
                })
            }
            other => Err(Error::Model(format!(
                "config.json: `rope_scaling.rope_type` `{other}` is not supported (default, linear, llama3, yarn, longrope, proportional)"
            ))),
        }
    }

    /// Applies the scaling to `inv_freq` (`[rotary_dim / 2]`, from base `theta`); for LongRoPE,
    /// the short factors.
    pub fn apply(&self, inv_freq: &mut [f64], theta: f64) -> Result<()> {
        match self {
            Self::Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let half = inv_freq.len();
                let dim = 2.0 * half as f64;
                // The dimension at which a frequency turns `rot` times over the original context.
                let corr = |rot: f64| {
                    dim * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    *f = *f / factor * (1.0 - extrapolation) + *f * extrapolation;
                }
            }
            Self::None => {}
            Self::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen < high_wavelen {
                        // kept
                    } else if wavelen > low_wavelen {
                        *f /= factor;
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            Self::FreqFactors(ff) => {
                if ff.len() != inv_freq.len() {
                    return Err(Error::tensor(
                        "rope_freqs.weight",
                        format!("has {} factors, expected {}", ff.len(), inv_freq.len()),
                    ));
                }
                inv_freq
                    .iter_mut()
                    .zip(ff)
                    .for_each(|(f, d)| *f /= *d as f64);
            }
            Self::LongRope { short_factor, .. } => divide(inv_freq, short_factor, "short_factor")?,
            Self::Proportional {
                factor,
                partial_rotary_factor,
            } => {
                // HF: `int(partial_rotary_factor * head_dim // 2)`, head_dim = 2 · len.
                let rotated = (partial_rotary_factor * 2.0 * inv_freq.len() as f64 / 2.0).floor();
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    *f = if (i as f64) < rotated {
                        *f / factor
                    } else {
                        0.0
                    };
                }
            }
        }
        Ok(())
    }
}

fn divide(inv_freq: &mut [f64], factors: &[f64], field: &str) -> Result<()> {
    if factors.len() != inv_freq.len() {
        return Err(Error::Model(format!(
            "config.json: `rope_scaling.{field}` has {} factors, expected rotary_dim / 2 = {}",
            factors.len(),
            inv_freq.len()
        )));
    }
    inv_freq.iter_mut().zip(factors).for_each(|(f, d)| *f /= d);
    Ok(())
}

/// Rotary position embedding for one attention layout. The cos/sin values are computed per
/// call for the positions in use, so any context length works without a table.
///
/// `interleaved` selects the pairing of dimensions: `false` rotates `(x[i], x[i + d/2])`
/// (Hugging Face / GPT-NeoX layout), `true` rotates `(x[2i], x[2i+1])` (the original
/// RoFormer/Meta layout, which llama.cpp's GGUF Llama weights expect, since its converter
/// permutes the q/k projection rows).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    /// The angles as ggml computes them, for GGUF models (see [`Self::new`]).
    ggml: Option<GgmlAngles>,
    /// LongRoPE: frequencies used once a pass reaches beyond this many positions.
    long: Option<(usize, Vec<f32>)>,
    /// Scale applied to cos and sin (LongRoPE's attention factor; 1 otherwise).
    attention_factor: f32,
    rotary_dim: usize,
    interleaved: bool,
    device: Device,
}

/// ggml's rope parameters: `theta_base`, `freq_scale` (`1 / factor` of linear scaling) and
/// per-frequency divisors (`rope_freqs.weight`, Llama 3 scaling).
#[derive(Debug, Clone)]
struct GgmlAngles {
    base: f32,
    freq_scale: f32,
    freq_factors: Option<Vec<f32>>,
}

impl RotaryEmbedding {
    /// `rotary_dim`: dimensions rotated per head (usually `head_dim`); `theta`: `rope_theta`.
    ///
    /// With `interleaved` (GGUF weights) and no scaling, linear scaling or frequency factors,
    /// the angles are computed as llama.cpp computes them (`pos · base^(-2i/d)` by repeated
    /// `f32` multiplication, see [`crate::kernels::float::rope_cos_sin`]), so that a GGUF
    /// model follows llama.cpp's numerics; otherwise as Hugging Face does (`pos · inv_freq`).
    pub fn new(
        rotary_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        interleaved: bool,
        device: &Device,
    ) -> Result<Self> {
        Self::build(rotary_dim, theta, scaling, interleaved, interleaved, device)
    }

    /// Like [`Self::new`], but the angles follow llama.cpp's numerics whatever the pair layout
    /// (for GGUF weights whose heads keep Hugging Face's half-split pairs, ggml's `NEOX` rope
    /// mode, e.g. Gemma), when the scaling allows it (none, linear or frequency factors).
    pub fn new_ggml(
        rotary_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        interleaved: bool,
        device: &Device,
    ) -> Result<Self> {
        Self::build(rotary_dim, theta, scaling, interleaved, true, device)
    }

    /// Like [`Self::new`], but the angles follow Hugging Face's numerics (`pos · inv_freq`)
    /// whatever the pair layout: for checkpoints whose rotary dimensions are interleaved pairs
    /// in Hugging Face's own layout (DeepSeek-V3's `rope_interleave`, transformers'
    /// `apply_rotary_pos_emb_interleave`, mlx-lm's `traditional=True`).
    pub fn new_hf(
        rotary_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        interleaved: bool,
        device: &Device,
    ) -> Result<Self> {
        Self::build(rotary_dim, theta, scaling, interleaved, false, device)
    }

    fn build(
        rotary_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        interleaved: bool,
        ggml_angles: bool,
        device: &Device,
    ) -> Result<Self> {
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(Error::Model(format!(
                "rotary dimension {rotary_dim} must be even and positive"
            )));
        }
        let half = rotary_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / rotary_dim as f64))
            .collect();
        let mut inv_freq = base.clone();
        scaling.apply(&mut inv_freq, theta)?;
        let ggml = match (ggml_angles, scaling) {
            (false, _)
            | (true, RopeScaling::Llama3 { .. })
            | (true, RopeScaling::LongRope { .. })
            | (true, RopeScaling::Yarn { .. })
            | (true, RopeScaling::Proportional { .. }) => None,
            (true, RopeScaling::None) => Some((1.0, None)),
            (true, RopeScaling::Linear { factor }) => Some(((1.0 / factor) as f32, None)),
            (true, RopeScaling::FreqFactors(f)) => Some((1.0, Some(f.clone()))),
        }
        .map(|(freq_scale, freq_factors)| GgmlAngles {
            base: theta as f32,
            freq_scale,
            freq_factors,
        });
        let to32 = |v: &[f64]| v.iter().map(|f| *f as f32).collect::<Vec<f32>>();
        let (long, attention_factor) = match scaling {
            RopeScaling::LongRope {
                long_factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            } => {
                let mut l = base;
                divide(&mut l, long_factor, "long_factor")?;
                (
                    Some((*original_max_position_embeddings, to32(&l))),
                    *attention_factor as f32,
                )
            }
            RopeScaling::Yarn {
                attention_factor, ..
            } => (None, *attention_factor as f32),
            _ => (None, 1.0),
        };
        Ok(Self {
            ggml,
            inv_freq: to32(&inv_freq),
            long,
            attention_factor,
            rotary_dim,
            interleaved,
            device: device.clone(),
        })
    }

    /// cos and sin `[seq, rotary_dim / 2]` for positions `offset..offset+seq`, computed in f32
    /// as `pos * inv_freq` like the reference implementations (times the attention factor for
    /// LongRoPE, whose long frequencies apply when `offset + seq` exceeds the original context).
    pub fn cos_sin(&self, offset: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let inv_freq = match &self.long {
            Some((original, long)) if offset + seq > *original => long,
            _ => &self.inv_freq,
        };
        let half = inv_freq.len();
        let m = self.attention_factor;
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in offset..offset + seq {
            if let Some(g) = &self.ggml {
                let cs = crate::kernels::float::rope_cos_sin(
                    p,
                    self.rotary_dim,
                    g.base,
                    g.freq_scale,
                    g.freq_factors.as_deref(),
                );
                cos.extend(cs.iter().map(|c| c.0));
                sin.extend(cs.iter().map(|c| c.1));
                continue;
            }
            for f in inv_freq {
                let a = (p as f32) * f;
                cos.push(a.cos() * m);
                sin.push(a.sin() * m);
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq, half), &self.device)?,
            Tensor::from_vec(sin, (seq, half), &self.device)?,
        ))
    }

    /// Dimensions rotated per head.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// Whether adjacent values form the rotated pairs (GGUF Llama) rather than the two halves.
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    /// Whether [`Self::cos_sin`]`(offset, n)` rows equal rows `offset..offset + n` of one table
    /// (false for LongRoPE, whose frequencies depend on the length of the pass).
    pub fn offset_independent(&self) -> bool {
        self.long.is_none()
    }

    /// Rotates `x: [batch, heads, seq, head_dim]` with tables from [`Self::cos_sin`].
    pub fn apply_with(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(3)?;
        let rot = |t: &Tensor| -> Result<Tensor> {
            let t = t.contiguous()?;
            if t.device().is_cpu() && t.dtype() == DType::F32 && cos.dtype() == DType::F32 {
                return self.rotate_cpu(&t, cos, sin);
            }
            Ok(if self.interleaved {
                candle_nn::rotary_emb::rope_i(&t, cos, sin)?
            } else {
                candle_nn::rotary_emb::rope(&t, cos, sin)?
            })
        };
        if self.rotary_dim == head_dim {
            rot(x)
        } else {
            let head = x.narrow(3, 0, self.rotary_dim)?;
            let tail = x.narrow(3, self.rotary_dim, head_dim - self.rotary_dim)?;
            Ok(Tensor::cat(&[rot(&head)?, tail], 3)?)
        }
    }

    /// `x: [batch, heads, seq, rotary_dim]` contiguous `f32` on the CPU, rotated with
    /// [`crate::kernels::float::rope_apply`] (ggml's rounding: `x0·cos - x1·sin` with one
    /// fused multiply-add).
    fn rotate_cpu(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, h, s, d) = x.dims4()?;
        let cos = cos.flatten_all()?.to_vec1::<f32>()?;
        let sin = sin.flatten_all()?.to_vec1::<f32>()?;
        let half = d / 2;
        if cos.len() != s * half || sin.len() != s * half {
            return Err(Error::InvalidArgument(format!(
                "rope tables of {} values for {s} positions of {d} dimensions",
                cos.len()
            )));
        }
        let cs: Vec<(f32, f32)> = cos.into_iter().zip(sin).collect();
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        for (i, row) in v.chunks_exact_mut(d).enumerate() {
            let t = i % s;
            crate::kernels::float::rope_apply(row, &cs[t * half..][..half], self.interleaved);
        }
        Ok(Tensor::from_vec(v, (b, h, s, d), x.device())?)
    }

    /// Differentiable rotation from candle ops (for training): `x: [batch, heads, seq,
    /// head_dim]` f32 with tables `cos`, `sin: [seq, rotary_dim / 2]` from [`Self::cos_sin`];
    /// pairs are adjacent (`interleaved`, GGUF's layout) or half a rotary width apart (Hugging
    /// Face's `rotate_half`).
    pub fn apply_diff(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, h, s, d) = x.dims4()?;
        let r = self.rotary_dim;
        let half = r / 2;
        let head = x.narrow(3, 0, r)?;
        let (x0, x1) = if self.interleaved {
            let p = head.reshape((b, h, s, half, 2))?;
            (
                p.narrow(4, 0, 1)?.squeeze(4)?,
                p.narrow(4, 1, 1)?.squeeze(4)?,
            )
        } else {
            (head.narrow(3, 0, half)?, head.narrow(3, half, half)?)
        };
        let (c, sn) = (cos.reshape((1, 1, s, half))?, sin.reshape((1, 1, s, half))?);
        let y0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&sn)?)?;
        let y1 = (x0.broadcast_mul(&sn)? + x1.broadcast_mul(&c)?)?;
        let rot = if self.interleaved {
            Tensor::stack(&[y0, y1], 4)?.reshape((b, h, s, r))?
        } else {
            Tensor::cat(&[y0, y1], 3)?
        };
        if r == d {
            Ok(rot)
        } else {
            Ok(Tensor::cat(&[rot, x.narrow(3, r, d - r)?], 3)?)
        }
    }

    /// [`Self::apply_with`] for [`Mode::Inference`], [`Self::apply_diff`] for
    /// [`Mode::Training`]: `x: [batch, heads, seq, head_dim]`, tables from [`Self::cos_sin`].
    pub fn apply_mode(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Inference => self.apply_with(x, cos, sin),
            Mode::Training { .. } => self.apply_diff(x, cos, sin),
        }
    }

    /// Rotates `x: [batch, heads, seq, head_dim]` for positions `offset..offset+seq`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (cos, sin) = self.cos_sin(offset, x.dim(2)?)?;
        self.apply_with(x, &cos, &sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_rotates_only_the_first_frequencies() {
        // Gemma 4 full attention: head 32, a quarter of it rotates (HF: 4 of 16 frequencies).
        let v = serde_json::json!({"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1e6});
        let s = RopeScaling::from_config(Some(&v)).unwrap();
        let mut f: Vec<f64> = (0..16)
            .map(|i| 1e6f64.powf(-(2.0 * i as f64) / 32.0))
            .collect();
        let orig = f.clone();
        s.apply(&mut f, 1e6).unwrap();
        assert_eq!(&f[..4], &orig[..4]);
        assert!(f[4..].iter().all(|x| *x == 0.0), "{f:?}");
        let r = RotaryEmbedding::new(32, 1e6, &s, false, &Device::Cpu).unwrap();
        let (cos, sin) = r.cos_sin(7, 1).unwrap();
        let (cos, sin) = (
            cos.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            sin.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!((cos[15], sin[15]), (1.0, 0.0));
        assert!((cos[1] - (7.0 * orig[1]).cos() as f32).abs() < 1e-6);
        let bad = serde_json::json!({"rope_type": "proportional", "partial_rotary_factor": 1.5});
        let e = RopeScaling::from_config(Some(&bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains("partial_rotary_factor"), "{e}");
    }

    #[test]
    fn llama3_scaling_matches_reference_values() {
        // Llama 3.1 8B: theta 500000, factor 8, low 1, high 4, original 8192.
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let d = 128;
        let mut f: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / 500000f64.powf(2.0 * i as f64 / d as f64))
            .collect();
        let orig = f.clone();
        s.apply(&mut f, 500000.0).unwrap();
        assert_eq!(f[0], orig[0]); // highest frequency kept
        assert!((f[63] - orig[63] / 8.0).abs() < 1e-18); // lowest scaled by factor
        assert!(
            f[45] < orig[45] && f[45] > orig[45] / 8.0
                || f[45] == orig[45]
                || f[45] == orig[45] / 8.0
        );
    }

    /// Against transformers 5.23's `_compute_yarn_parameters` (`scripts/golden/rope_yarn.py`).
    #[test]
    fn yarn_matches_transformers() {
        /// theta, `rope_scaling`, attention factor, (index, inv_freq) pairs.
        type Case = (f64, serde_json::Value, f64, [(usize, f64); 9]);
        let cases: [Case; 2] = [
            (
                1e6,
                serde_json::json!({"rope_type": "yarn", "factor": 4.0,
                    "original_max_position_embeddings": 32768}),
                1.138629436111989,
                [
                    (0, 1.0),
                    (8, 0.17782793939113617),
                    (16, 0.03162277862429619),
                    (24, 0.005375321488827467),
                    (32, 0.0006029411451891065),
                    (40, 4.4456985051510856e-05),
                    (48, 7.905693564680405e-06),
                    (56, 1.405853367941745e-06),
                    (63, 3.102344408034696e-07),
                ],
            ),
            (
                1e4,
                serde_json::json!({"type": "yarn", "factor": 40.0,
                    "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2,
                    "mscale": 1.0, "mscale_all_dim": 0.707}),
                1.0857263992561355,
                [
                    (0, 1.0),
                    (8, 0.3162277638912201),
                    (16, 0.10000000149011612),
                    (24, 0.03162277862429619),
                    (32, 0.00573437474668026),
                    (40, 0.00027175823925063014),
                    (48, 2.499999936844688e-05),
                    (56, 7.905694474175107e-06),
                    (63, 2.886954689529375e-06),
                ],
            ),
        ];
        for (theta, cfg, att, want) in cases {
            let s = RopeScaling::from_config(Some(&cfg)).unwrap();
            let RopeScaling::Yarn {
                attention_factor, ..
            } = &s
            else {
                panic!("not yarn: {s:?}");
            };
            assert!(
                (attention_factor - att).abs() < 1e-12,
                "{attention_factor} vs {att}"
            );
            let d = 128;
            let mut f: Vec<f64> = (0..d / 2)
                .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
                .collect();
            s.apply(&mut f, theta).unwrap();
            for (i, w) in want {
                // transformers computes in f32.
                assert!(
                    (f[i] - w).abs() <= 2e-7 * w,
                    "inv_freq[{i}] = {} vs {w}",
                    f[i]
                );
            }
        }
    }

    #[test]
    fn interleaved_and_half_layouts_agree_after_permutation() {
        // Rotating interleaved pairs of a permuted vector equals rotating half-split pairs.
        let dev = Device::Cpu;
        let d = 8;
        let x: Vec<f32> = (0..d).map(|i| i as f32 + 1.0).collect();
        let xt = Tensor::from_vec(x.clone(), (1, 1, 1, d), &dev).unwrap();
        let half = RotaryEmbedding::new(d, 10000.0, &RopeScaling::None, false, &dev).unwrap();
        let inter = RotaryEmbedding::new(d, 10000.0, &RopeScaling::None, true, &dev).unwrap();
        let perm: Vec<f32> = (0..d / 2).flat_map(|i| [x[i], x[i + d / 2]]).collect();
        let pt = Tensor::from_vec(perm, (1, 1, 1, d), &dev).unwrap();
        let a: Vec<f32> = half
            .apply(&xt, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = inter
            .apply(&pt, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..d / 2 {
            assert!((a[i] - b[2 * i]).abs() < 1e-5);
            assert!((a[i + d / 2] - b[2 * i + 1]).abs() < 1e-5);
        }
    }

    #[test]
    fn parses_config_scaling() {
        let v: serde_json::Value = serde_json::json!({"rope_type": "linear", "factor": 2.0});
        assert_eq!(
            RopeScaling::from_config(Some(&v)).unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        let v = serde_json::json!({"type": "weird", "factor": 2.0});
        assert!(RopeScaling::from_config(Some(&v))
            .unwrap_err()
            .to_string()
            .contains("weird"));
        let v = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        assert!(RopeScaling::from_config(Some(&v))
            .unwrap_err()
            .to_string()
            .contains("low_freq_factor"));
    }
}
