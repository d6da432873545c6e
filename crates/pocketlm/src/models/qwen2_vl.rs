//! Qwen2-VL and Qwen2.5-VL (`model_type` `qwen2_vl`, `qwen2_5_vl`): a ViT over 14x14x2 patches
//! with 2D rotary embeddings, a 2x2 patch merger into the language model's width, and a Qwen2
//! language model with multimodal RoPE (M-RoPE: temporal, height and width position streams
//! over sections of the rotary frequencies). Qwen2.5-VL's tower uses RMSNorm, a gated SiLU MLP
//! and window attention (windows of `window_size` pixels) except in `fullatt_block_indexes`.
//!
//! Reference: Hugging Face transformers `models/qwen2_vl/modeling_qwen2_vl.py`,
//! `models/qwen2_5_vl/modeling_qwen2_5_vl.py` and `vision_utils.py` (`get_vision_position_ids`,
//! `get_vision_window_index`, `get_rope_index`); mlx-vlm `models/qwen2_vl`, `models/qwen2_5_vl`.
//!
//! Weight names: the published layout (`model.layers.*`, `lm_head`, `visual.*`), transformers'
//! newer one (`model.language_model.*`, `model.visual.*`) and mlx-vlm's
//! (`language_model.model.*`, `language_model.lm_head`, `vision_tower.*`, the patch embedding
//! stored channels-last) are all read.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::image_processor::ProcessedImage;
use crate::kv_cache::KvCache;
use crate::models::decoder::{Decoder, Mlp, PreNormBlock};
use crate::models::{
    prefill_text, CausalLM, DecodePlan, LinearSlot, Logits, ModelInfo, ModelInput, Prefill,
    Trainable, VisionInfo,
};
use crate::nn::{
    ops, scaled_dot_product_attention, Activation, Attention, AttentionPass, Embedding, GateUp,
    GatedMlp, Linear, Mode, Numerics, QkvProj, RmsNorm, RopeScaling, RotaryEmbedding,
};
use crate::weights::{QkRowOrder, Weights};
use crate::{Error, Result};

/// The text fields of config.json (top level in published folders, `text_config` in
/// transformers 5's).
#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest context.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Output layer shares the embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// `vision_config` of config.json (Qwen2-VL and Qwen2.5-VL field names).
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    /// Number of ViT blocks.
    pub depth: usize,
    /// ViT width (Qwen2-VL `embed_dim`; Qwen2.5-VL `hidden_size`).
    #[serde(default)]
    pub embed_dim: Option<usize>,
    /// Qwen2-VL: the language model's width (merger output); Qwen2.5-VL: the ViT width.
    pub hidden_size: usize,
    /// Qwen2.5-VL: merger output width.
    #[serde(default)]
    pub out_hidden_size: Option<usize>,
    /// Qwen2-VL: MLP width as a multiple of `embed_dim`.
    #[serde(default)]
    pub mlp_ratio: Option<f64>,
    /// Qwen2.5-VL: MLP width.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP activation (`quick_gelu` for Qwen2-VL, `silu` for Qwen2.5-VL).
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Input channels (3).
    #[serde(default = "default_three")]
    pub in_channels: usize,
    /// Patch side (14).
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// Side of the merged block (2).
    #[serde(default = "default_two")]
    pub spatial_merge_size: usize,
    /// Frames per patch (2).
    #[serde(default = "default_two")]
    pub temporal_patch_size: usize,
    /// Qwen2.5-VL: window side in pixels (112).
    #[serde(default)]
    pub window_size: Option<usize>,
    /// Qwen2.5-VL: blocks with full (per-image) attention; the others use windows.
    #[serde(default)]
    pub fullatt_block_indexes: Option<Vec<usize>>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    1_000_000.0
}
fn default_ctx() -> usize {
    32768
}
fn default_three() -> usize {
    3
}
fn default_patch() -> usize {
    14
}
fn default_two() -> usize {
    2
}

/// Which of the two architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Qwen2-VL: LayerNorm, `fc1`/`fc2` MLP, full attention per image.
    Qwen2Vl,
    /// Qwen2.5-VL: RMSNorm, gated MLP, window attention.
    Qwen25Vl,
}

/// Builds a Qwen2-VL model from config.json and weights.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    Ok(Box::new(Qwen2Vl::new(config, w, Variant::Qwen2Vl)?))
}

/// Builds a Qwen2.5-VL model from config.json and weights.
pub fn build_2_5(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    Ok(Box::new(Qwen2Vl::new(config, w, Variant::Qwen25Vl)?))
}

/// Unused: no GGUF architecture is registered for the VLMs.
pub fn config_from_gguf(_: &crate::gguf::GgufFile) -> Result<serde_json::Value> {
    Err(Error::Model(
        "Qwen2-VL models are read from safetensors folders only".into(),
    ))
}

/// Maps the published weight names onto the ones a folder actually uses (see the module docs);
/// the one place where names differ, at load.
struct Names<'a> {
    w: &'a dyn Weights,
}

impl Names<'_> {
    fn candidates(name: &str) -> Vec<String> {
        let mut c = vec![name.to_string()];
        if let Some(rest) = name.strip_prefix("visual.") {
            c.push(format!("model.visual.{rest}"));
            c.push(format!("vision_tower.{rest}"));
        } else if let Some(rest) = name.strip_prefix("model.") {
            c.push(format!("model.language_model.{rest}"));
            c.push(format!("language_model.model.{rest}"));
        } else if name.starts_with("lm_head") {
            c.push(format!("language_model.{name}"));
        }
        c
    }

    /// The stored name of `name` (`probe` is appended when checking, e.g. `.weight`).
    fn find(&self, name: &str, probe: &str) -> Result<String> {
        Self::candidates(name)
            .into_iter()
            .find(|c| self.w.contains(&format!("{c}{probe}")))
            .ok_or_else(|| Error::tensor(format!("{name}{probe}"), "not found in the weights"))
    }

    fn has(&self, name: &str) -> bool {
        self.find(name, "").is_ok()
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let p = self.find(prefix, ".weight")?;
        self.w.linear(&p, out, inp, bias)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n = self.find(name, "")?;
        self.w.tensor(&n, shape)
    }

    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        let n = self.find(name, "")?;
        self.w.embedding(&n, vocab, hidden)
    }
}

#[derive(Debug)]
enum Norm {
    Layer(candle_nn::LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn load(n: &Names, prefix: &str, dim: usize, variant: Variant) -> Result<Self> {
        let w = n.tensor(&format!("{prefix}.weight"), &[dim])?;
        Ok(match variant {
            Variant::Qwen2Vl => {
                let b = n.tensor(&format!("{prefix}.bias"), &[dim])?;
                Norm::Layer(candle_nn::LayerNorm::new(w, b, 1e-6))
            }
            Variant::Qwen25Vl => Norm::Rms(RmsNorm::new(w, 1e-6, false)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(l) => Ok(candle_core::Module::forward(l, x)?),
            Norm::Rms(r) => r.forward(x),
        }
    }
}

/// Activations named in configs: `x: any shape` -> same shape.
fn activation(name: &str, x: &Tensor) -> Result<Tensor> {
    Ok(match name {
        // x * sigmoid(1.702 x) (HF `QuickGELUActivation`).
        "quick_gelu" => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        "gelu" => x.gelu_erf()?,
        "gelu_pytorch_tanh" | "gelu_new" => x.gelu()?,
        "silu" => candle_nn::ops::silu(x)?,
        other => {
            return Err(Error::Model(format!(
                "config.json `vision_config.hidden_act` `{other}` is not supported \
                 (quick_gelu, gelu, gelu_pytorch_tanh, silu)"
            )))
        }
    })
}

#[derive(Debug)]
enum VisionMlp {
    /// `fc2(act(fc1(x)))`.
    Plain { fc1: Linear, fc2: Linear },
    /// `down(act(gate(x)) * up(x))`.
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

#[derive(Debug)]
struct VisionBlock {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: VisionMlp,
}

/// The vision tower.
#[derive(Debug)]
struct VisionTower {
    patch_embed: Tensor,
    blocks: Vec<VisionBlock>,
    merger_norm: Norm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    inv_freq: Vec<f32>,
    cfg: VisionConfig,
    variant: Variant,
    dim: usize,
    heads: usize,
    act: String,
}

impl VisionTower {
    fn new(cfg: VisionConfig, out_dim: usize, n: &Names, variant: Variant) -> Result<Self> {
        let dim = match variant {
            Variant::Qwen2Vl => cfg.embed_dim.unwrap_or(cfg.hidden_size),
            Variant::Qwen25Vl => cfg.hidden_size,
        };
        if cfg.num_heads == 0 || !dim.is_multiple_of(cfg.num_heads) {
            return Err(Error::Model(format!(
                "config.json `vision_config.num_heads` {} does not divide the width {dim}",
                cfg.num_heads
            )));
        }
        let hd = dim / cfg.num_heads;
        if !hd.is_multiple_of(4) {
            return Err(Error::Model(format!(
                "vision head width {hd} must be a multiple of 4 (2D rotary embedding)"
            )));
        }
        let (c, t, p) = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size);
        let pe = "visual.patch_embed.proj.weight";
        let stored = n.find(pe, "")?;
        let patch_embed = if stored.starts_with("vision_tower.") {
            // mlx-vlm stores Conv3d weights channels-last: [out, t, kh, kw, in].
            n.w.tensor(&stored, &[dim, t, p, p, c])?
                .permute((0, 4, 1, 2, 3))?
                .contiguous()?
        } else {
            n.w.tensor(&stored, &[dim, c, t, p, p])?
        }
        .reshape((dim, c * t * p * p))?;
        let mlp_dim = match variant {
            Variant::Qwen2Vl => (dim as f64 * cfg.mlp_ratio.unwrap_or(4.0)) as usize,
            Variant::Qwen25Vl => cfg.intermediate_size.ok_or_else(|| {
                Error::Model("config.json: `vision_config.intermediate_size` is missing".into())
            })?,
        };
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let b = format!("visual.blocks.{i}");
            let mlp = match variant {
                Variant::Qwen2Vl => VisionMlp::Plain {
                    fc1: n.linear(&format!("{b}.mlp.fc1"), mlp_dim, dim, true)?,
                    fc2: n.linear(&format!("{b}.mlp.fc2"), dim, mlp_dim, true)?,
                },
                Variant::Qwen25Vl => VisionMlp::Gated {
                    gate: n.linear(&format!("{b}.mlp.gate_proj"), mlp_dim, dim, true)?,
                    up: n.linear(&format!("{b}.mlp.up_proj"), mlp_dim, dim, true)?,
                    down: n.linear(&format!("{b}.mlp.down_proj"), dim, mlp_dim, true)?,
                },
            };
            blocks.push(VisionBlock {
                norm1: Norm::load(n, &format!("{b}.norm1"), dim, variant)?,
                norm2: Norm::load(n, &format!("{b}.norm2"), dim, variant)?,
                qkv: n.linear(&format!("{b}.attn.qkv"), 3 * dim, dim, true)?,
                proj: n.linear(&format!("{b}.attn.proj"), dim, dim, true)?,
                mlp,
            });
        }
        let m2 = cfg.spatial_merge_size * cfg.spatial_merge_size;
        // Axial RoPE: theta 10000 over head_dim / 2 per axis (`compute_axial_rope_parameters`).
        let spatial = hd / 2;
        let inv_freq = (0..spatial)
            .step_by(2)
            .map(|i| 1.0 / 10000f32.powf(i as f32 / spatial as f32))
            .collect();
        let act = cfg.hidden_act.clone().unwrap_or_else(|| {
            match variant {
                Variant::Qwen2Vl => "quick_gelu",
                Variant::Qwen25Vl => "silu",
            }
            .into()
        });
        Ok(Self {
            patch_embed,
            blocks,
            merger_norm: Norm::load(n, "visual.merger.ln_q", dim, variant)?,
            merger_fc1: n.linear("visual.merger.mlp.0", dim * m2, dim * m2, true)?,
            merger_fc2: n.linear("visual.merger.mlp.2", out_dim, dim * m2, true)?,
            inv_freq,
            heads: cfg.num_heads,
            cfg,
            variant,
            dim,
            act,
        })
    }

    /// 2D rotary cos/sin `[patches, head_dim / 2]` for the patches of `grids` in pixel-row
    /// order (merge blocks consecutive, `get_vision_position_ids`): the first half of the
    /// frequencies turn with the row, the second with the column.
    fn rotary(&self, grids: &[[usize; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let m = self.cfg.spatial_merge_size;
        let q = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &[t, h, w] in grids {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for mh in 0..m {
                            for mw in 0..m {
                                let (y, x) = ((bh * m + mh) as f32, (bw * m + mw) as f32);
                                for pos in [y, x] {
                                    for f in &self.inv_freq {
                                        cos.push((pos * f).cos());
                                        sin.push((pos * f).sin());
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let n = cos.len() / (2 * q);
        Ok((
            Tensor::from_vec(cos, (n, 2 * q), device)?,
            Tensor::from_vec(sin, (n, 2 * q), device)?,
        ))
    }

    /// Qwen2.5-VL `get_vision_window_index`: the merged-token order that makes every window
    /// contiguous, and the window lengths in patches.
    fn window_index(&self, grids: &[[usize; 3]]) -> Result<(Vec<usize>, Vec<usize>)> {
        let m = self.cfg.spatial_merge_size;
        let ws = self.cfg.window_size.unwrap_or(112) / m / self.cfg.patch_size;
        if ws == 0 {
            return Err(Error::Model(format!(
                "config.json `vision_config.window_size` {:?} is below one merged token",
                self.cfg.window_size
            )));
        }
        let (mut index, mut lens) = (Vec::new(), Vec::new());
        let mut base = 0;
        for &[t, h, w] in grids {
            let (lh, lw) = (h / m, w / m);
            let (nwh, nww) = (lh.div_ceil(ws), lw.div_ceil(ws));
            for ti in 0..t {
                for wy in 0..nwh {
                    for wx in 0..nww {
                        let before = index.len();
                        for y in wy * ws..((wy + 1) * ws).min(lh) {
                            for x in wx * ws..((wx + 1) * ws).min(lw) {
                                index.push(base + ti * lh * lw + y * lw + x);
                            }
                        }
                        if index.len() > before {
                            lens.push((index.len() - before) * m * m);
                        }
                    }
                }
            }
            base += t * lh * lw;
        }
        Ok((index, lens))
    }

    /// Bidirectional attention within each segment of `lens` consecutive rows.
    /// `x: [n, dim]`, `cos`/`sin: [n, head_dim / 2]` -> `[n, dim]`.
    fn attention(
        &self,
        blk: &VisionBlock,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        lens: &[usize],
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let hd = self.dim / self.heads;
        let qkv = blk.qkv.forward(x)?.reshape((n, 3, self.heads, hd))?;
        let part = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(1, i, 1)?
                .squeeze(1)?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        let q = candle_nn::rotary_emb::rope(&part(0)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&part(1)?, cos, sin)?;
        let v = part(2)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(lens.len());
        let mut start = 0;
        for &len in lens {
            let o = scaled_dot_product_attention(
                &q.narrow(2, start, len)?,
                &k.narrow(2, start, len)?,
                &v.narrow(2, start, len)?,
                None,
                scale,
                None,
                None,
            )?;
            outs.push(o);
            start += len;
        }
        let o = Tensor::cat(&outs, 2)?
            .squeeze(0)?
            .transpose(0, 1)?
            .reshape((n, self.dim))?;
        blk.proj.forward(&o)
    }

    /// `pixels: [patches, 3 * t * p * p]` of images with `grids` -> merged features
    /// `[patches / merge^2, out_dim]`, images in order.
    fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let dev = pixels.device();
        let m2 = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let mut x = pixels.matmul(&self.patch_embed.t()?)?;
        let n = x.dim(0)?;
        let (mut cos, mut sin) = self.rotary(grids, dev)?;
        let full: Vec<usize> = grids.iter().flat_map(|g| vec![g[1] * g[2]; g[0]]).collect();
        let mut windows = None;
        let mut order = None;
        if self.variant == Variant::Qwen25Vl {
            let (index, lens) = self.window_index(grids)?;
            let idx = Tensor::from_vec(
                index
                    .iter()
                    .flat_map(|&i| (0..m2).map(move |j| (i * m2 + j) as u32))
                    .collect::<Vec<_>>(),
                n,
                dev,
            )?;
            x = x.index_select(&idx, 0)?;
            cos = cos.index_select(&idx, 0)?;
            sin = sin.index_select(&idx, 0)?;
            windows = Some(lens);
            order = Some(index);
        }
        let full_blocks = self.cfg.fullatt_block_indexes.clone().unwrap_or_default();
        for (i, blk) in self.blocks.iter().enumerate() {
            let lens = match &windows {
                Some(w) if !full_blocks.contains(&i) => w,
                _ => &full,
            };
            let h = blk.norm1.forward(&x)?;
            x = ops::add(&x, &self.attention(blk, &h, &cos, &sin, lens)?)?;
            let h = blk.norm2.forward(&x)?;
            let y = match &blk.mlp {
                VisionMlp::Plain { fc1, fc2 } => {
                    fc2.forward(&activation(&self.act, &fc1.forward(&h)?)?)?
                }
                VisionMlp::Gated { gate, up, down } => {
                    let g = activation(&self.act, &gate.forward(&h)?)?;
                    down.forward(&(g * up.forward(&h)?)?)?
                }
            };
            x = ops::add(&x, &y)?;
        }
        let h = self
            .merger_norm
            .forward(&x)?
            .reshape((n / m2, m2 * self.dim))?;
        let h = self.merger_fc1.forward(&h)?.gelu_erf()?;
        let out = self.merger_fc2.forward(&h)?;
        Ok(match order {
            Some(index) => {
                let mut reverse = vec![0u32; index.len()];
                for (pos, &i) in index.iter().enumerate() {
                    reverse[i] = pos as u32;
                }
                let len = reverse.len();
                out.index_select(&Tensor::from_vec(reverse, len, dev)?, 0)?
            }
            None => out,
        })
    }
}

/// A Qwen2-VL / Qwen2.5-VL model: vision tower and language model.
#[derive(Debug)]
pub struct Qwen2Vl {
    visual: VisionTower,
    /// The language model (M-RoPE positions come from [`Self::cos_sin`]).
    decoder: Decoder,
    /// Rotary frequencies `[head_dim / 2]`.
    inv_freq: Vec<f32>,
    /// How the text stack's heads are rotated (half-split pairs); the tables are M-RoPE's.
    rope: RotaryEmbedding,
    /// Rotary frequency index -> position stream (0 temporal, 1 height, 2 width).
    stream: Vec<usize>,
    vision: VisionInfo,
    info: ModelInfo,
    device: Device,
}

fn token_id(config: &serde_json::Value, field: &str, default: u32) -> Result<u32> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| Error::Model(format!("config.json `{field}`: expected a token id"))),
    }
}

impl Qwen2Vl {
    /// Loads the model (see the module docs for the weight names).
    ///
    /// Errors: [`Error::Model`] naming a missing or invalid config field (`vision_config`,
    /// `rope_scaling.mrope_section` not summing to `head_dim / 2`, ...); [`Error::Tensor`]
    /// naming a missing or misshapen weight.
    pub fn new(config: &serde_json::Value, w: &dyn Weights, variant: Variant) -> Result<Self> {
        // transformers 5 nests the text fields; published folders keep them at the top.
        let mut flat = config.clone();
        if let (Some(obj), Some(text)) = (
            flat.as_object_mut(),
            config.get("text_config").and_then(|t| t.as_object()),
        ) {
            for (k, v) in text {
                obj.entry(k.clone()).or_insert(v.clone());
            }
        }
        let rope = flat
            .get("rope_scaling")
            .filter(|v| !v.is_null())
            .or_else(|| flat.get("rope_parameters"))
            .cloned();
        if flat.get("rope_theta").is_none() {
            if let Some(t) = rope.as_ref().and_then(|r| r.get("rope_theta")) {
                flat["rope_theta"] = t.clone();
            }
        }
        let cfg: TextConfig = serde_json::from_value(flat.clone())
            .map_err(|e| Error::Model(format!("config.json: {e}")))?;
        let vcfg: VisionConfig = serde_json::from_value(
            flat.get("vision_config")
                .cloned()
                .ok_or_else(|| Error::Model("config.json: `vision_config` is missing".into()))?,
        )
        .map_err(|e| Error::Model(format!("config.json `vision_config`: {e}")))?;
        let (h, nh, nkv) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        );
        if nh == 0 || nkv == 0 || !nh.is_multiple_of(nkv) || !h.is_multiple_of(nh) {
            return Err(Error::Model(format!(
                "config.json: heads {nh} / kv heads {nkv} / hidden {h} do not fit"
            )));
        }
        let hd = h / nh;
        let sections: Vec<usize> = rope
            .as_ref()
            .and_then(|r| r.get("mrope_section"))
            .map(|s| serde_json::from_value(s.clone()))
            .transpose()
            .map_err(|e| Error::Model(format!("config.json `rope_scaling.mrope_section`: {e}")))?
            .ok_or_else(|| {
                Error::Model("config.json: `rope_scaling.mrope_section` is missing".into())
            })?;
        if sections.iter().sum::<usize>() != hd / 2 {
            return Err(Error::Model(format!(
                "config.json `rope_scaling.mrope_section` {sections:?} does not sum to head_dim / 2 = {}",
                hd / 2
            )));
        }
        let stream = sections
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(i % 3, n))
            .collect();
        let inv_freq = (0..hd)
            .step_by(2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(i as f32 / hd as f32))
            .collect();
        let n = Names { w };
        let out_dim = match variant {
            Variant::Qwen2Vl => vcfg.hidden_size,
            Variant::Qwen25Vl => vcfg.out_hidden_size.unwrap_or(h),
        };
        if out_dim != h {
            return Err(Error::Model(format!(
                "config.json: the vision merger outputs {out_dim} values but the language model is {h} wide"
            )));
        }
        let merge = vcfg.spatial_merge_size;
        let patch = vcfg.patch_size;
        let tps = vcfg.temporal_patch_size;
        let visual = VisionTower::new(vcfg, out_dim, &n, variant)?;
        let inter = cfg.intermediate_size;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let norm = |s: &str| {
                RmsNorm::new(
                    n.tensor(&format!("{p}.{s}.weight"), &[h])?,
                    cfg.rms_norm_eps,
                    false,
                )
            };
            layers.push(PreNormBlock {
                input_layernorm: norm("input_layernorm")?,
                self_attn: Attention::plain(
                    QkvProj::Separate {
                        q: n.linear(&format!("{p}.self_attn.q_proj"), nh * hd, h, true)?,
                        k: n.linear(&format!("{p}.self_attn.k_proj"), nkv * hd, h, true)?,
                        v: n.linear(&format!("{p}.self_attn.v_proj"), nkv * hd, h, true)?,
                    },
                    n.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd, false)?,
                    nh,
                    nkv,
                    hd,
                ),
                post_attention_layernorm: norm("post_attention_layernorm")?,
                mlp: Mlp::Dense(GatedMlp {
                    gate_up: GateUp::Separate {
                        gate: n.linear(&format!("{p}.mlp.gate_proj"), inter, h, false)?,
                        up: n.linear(&format!("{p}.mlp.up_proj"), inter, h, false)?,
                    },
                    down_proj: n.linear(&format!("{p}.mlp.down_proj"), h, inter, false)?,
                    activation: Activation::Silu,
                    numerics: Numerics::Reference,
                }),
            });
        }
        let embed_tokens = n.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let lm_head = if cfg.tie_word_embeddings || !n.has("lm_head.weight") {
            embed_tokens.as_linear(n.w.device())?
        } else {
            n.linear("lm_head", cfg.vocab_size, h, false)?
        };
        let norm = RmsNorm::new(
            n.tensor("model.norm.weight", &[h])?,
            cfg.rms_norm_eps,
            false,
        )?;
        let vision = VisionInfo {
            image_token_id: token_id(config, "image_token_id", 151655)?,
            vision_start_token_id: token_id(config, "vision_start_token_id", 151652)?,
            vision_end_token_id: token_id(config, "vision_end_token_id", 151653)?,
            patch_size: patch,
            merge_size: merge,
            temporal_patch_size: tps,
        };
        Ok(Self {
            visual,
            decoder: Decoder {
                embed_tokens,
                layers,
                norm,
                lm_head,
            },
            inv_freq,
            rope: RotaryEmbedding::new(hd, cfg.rope_theta, &RopeScaling::None, false, w.device())?,
            stream,
            vision,
            device: w.device().clone(),
            info: ModelInfo {
                architecture: match variant {
                    Variant::Qwen2Vl => "qwen2_vl",
                    Variant::Qwen25Vl => "qwen2_5_vl",
                }
                .into(),
                vocab_size: cfg.vocab_size,
                n_layers: cfg.num_hidden_layers,
                hidden_size: h,
                n_kv_heads: nkv,
                head_dim: hd,
                context_length: cfg.max_position_embeddings,
            },
        })
    }

    /// M-RoPE cos/sin `[s, head_dim / 2]` from three position streams (`positions[i]` is
    /// `[temporal, height, width]` of token `i`): frequency `j` turns with stream
    /// `stream[j]` (`mrope_section`), as HF `Qwen2VLRotaryEmbedding.recomposition_frequencies`.
    fn cos_sin(&self, positions: &[[i64; 3]]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for (f, &s) in self.inv_freq.iter().zip(&self.stream) {
                let a = p[s] as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (positions.len(), half), &self.device)?,
            Tensor::from_vec(sin, (positions.len(), half), &self.device)?,
        ))
    }

    /// The decoder over `x: [1, s, hidden]` with positions `positions` (`[s]` of 3 streams).
    fn decode(
        &self,
        x: Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        self.decoder.check_cache(cache)?;
        let (cos, sin) = self.cos_sin(positions)?;
        let pass = AttentionPass::with_tables(&self.rope, cos, sin);
        let all = 0..self.decoder.layers.len();
        let x = self
            .decoder
            .run_blocks(x, all, &pass, Some(cache), Mode::Inference)?;
        self.decoder.logits(&x, logits)
    }

    fn text_positions(start: i64, s: usize) -> Vec<[i64; 3]> {
        (0..s as i64).map(|i| [start + i; 3]).collect()
    }
}

impl CausalLM for Qwen2Vl {
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let (_, s) = input_ids.dims2()?;
        let start = cache.offset() as i64 + cache.rope_delta();
        let x = self.decoder.embed_tokens.forward(input_ids)?;
        self.decode(x, &Self::text_positions(start, s), cache, logits)
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn vision(&self) -> Option<&VisionInfo> {
        Some(&self.vision)
    }

    fn trainable(&self) -> Option<&dyn Trainable> {
        Some(self)
    }

    fn trainable_mut(&mut self) -> Option<&mut dyn Trainable> {
        Some(self)
    }

    /// The text stack's step: a text token's three M-RoPE positions are equal, so its
    /// rotation is plain RoPE at the cache's offset plus its RoPE delta (set by an image
    /// prefill), which the plan's consumers add.
    fn decode_plan(&self) -> Option<DecodePlan<'_>> {
        self.decoder
            .decode_plan(&self.rope, self.info.context_length)
    }

    fn prefill(&self, input: &ModelInput, cache: &mut KvCache, chunk: usize) -> Result<Prefill> {
        if input.images.is_empty() {
            return Ok(Prefill::text(prefill_text(self, &input.ids, cache, chunk)?));
        }
        // The whole prompt in one forward pass: M-RoPE positions span the images.
        let tv = Instant::now();
        let features = self.encode_images(&input.images)?;
        let vision_time = tv.elapsed();
        let image_tokens = input.images.iter().map(|i| i.n_tokens()).collect();
        let grids: Vec<[usize; 3]> = input.images.iter().map(|i| i.grid_thw).collect();
        let ids = Tensor::new(input.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let logits =
            self.forward_with_image_features(&ids, &features, &grids, cache, Logits::Last)?;
        Ok(Prefill {
            logits,
            vision_time,
            image_tokens,
        })
    }
}

impl Qwen2Vl {
    /// The attention pass of a text-only sequence of `s` tokens at positions `0..s` (every
    /// M-RoPE stream at the token's index), as training sees its examples.
    fn text_pass(&self, s: usize) -> Result<AttentionPass<'_>> {
        let (cos, sin) = self.cos_sin(&Self::text_positions(0, s))?;
        Ok(AttentionPass::with_tables(&self.rope, cos, sin))
    }
}

/// Adapters and fine-tuning on the language model, text only (training examples have no
/// images; the vision tower has no adapters and stays frozen).
impl Trainable for Qwen2Vl {
    /// The language model's `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` under
    /// `language_model.model.layers.{i}` (mlx-lm's `qwen2_vl` module paths: its model wraps a
    /// `qwen2` text model), then `language_model.lm_head`.
    fn linears_mut(&mut self) -> Vec<LinearSlot<'_>> {
        let slots = self.decoder.linears_mut(QkRowOrder::HuggingFace);
        crate::models::wrap_slots(slots, Some("language_model"))
    }

    fn hidden_states(&self, input_ids: &Tensor, upto: usize) -> Result<Tensor> {
        let mut cache = KvCache::growing(self.decoder.layers.len());
        let pass = self.text_pass(input_ids.dim(1)?)?;
        let x = self.decoder.embed_tokens.forward(input_ids)?;
        let upto = upto.min(self.decoder.layers.len());
        self.decoder
            .run_blocks(x, 0..upto, &pass, Some(&mut cache), Mode::Inference)
    }

    fn forward_blocks(
        &self,
        hidden: &Tensor,
        range: std::ops::Range<usize>,
        train: bool,
    ) -> Result<Tensor> {
        if range.is_empty() {
            return Ok(hidden.clone());
        }
        let pass = self.text_pass(hidden.dim(1)?)?;
        let mode = Mode::Training { dropout: train };
        self.decoder
            .run_blocks(hidden.clone(), range, &pass, None, mode)
    }

    fn forward_head(
        &self,
        hidden: &Tensor,
        train: bool,
        select: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.decoder.forward_head(hidden, train, select)
    }
}

/// The image entry points, below [`CausalLM::prefill`].
impl Qwen2Vl {
    /// Runs the vision tower: preprocessed `images` -> f32 features `[tokens, hidden]`, one row
    /// per `<|image_pad|>` token, images in order.
    ///
    /// Errors: [`Error::InvalidArgument`] for images whose patches do not fit the tower.
    pub fn encode_images(&self, images: &[ProcessedImage]) -> Result<Tensor> {
        let dim = self.visual.patch_embed.dim(1)?;
        let mut rows = Vec::new();
        let mut grids = Vec::with_capacity(images.len());
        for (i, im) in images.iter().enumerate() {
            let [t, h, w] = im.grid_thw;
            let m = self.visual.cfg.spatial_merge_size;
            if im.patch_dim != dim
                || im.pixel_values.len() != im.n_patches() * dim
                || !h.is_multiple_of(m)
                || !w.is_multiple_of(m)
                || t == 0
            {
                return Err(Error::InvalidArgument(format!(
                    "image {i}: grid {:?} with {} values of {} per patch does not fit the \
                     vision tower ({dim} per patch, merge {m})",
                    im.grid_thw,
                    im.pixel_values.len(),
                    im.patch_dim
                )));
            }
            rows.extend_from_slice(&im.pixel_values);
            grids.push(im.grid_thw);
        }
        if grids.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.info.hidden_size),
                DType::F32,
                &self.device,
            )?);
        }
        let n = rows.len() / dim;
        let pixels = Tensor::from_vec(rows, (n, dim), &self.device)?;
        self.visual.forward(&pixels, &grids)
    }

    /// As [`CausalLM::forward`] with image `features` (from [`Qwen2Vl::encode_images`])
    /// spliced in at the image placeholder tokens of `input_ids: [1, seq]` u32, images of patch
    /// grids `grids` (`[t, h, w]` each) in prompt order. Positions (M-RoPE) continue from
    /// `cache`, whose RoPE delta it sets. Returns f32 logits as [`CausalLM::forward`].
    ///
    /// Errors: [`Error::InvalidArgument`] for a batch other than 1 or when the placeholders do
    /// not match the images.
    pub fn forward_with_image_features(
        &self,
        input_ids: &Tensor,
        features: &Tensor,
        grids: &[[usize; 3]],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if b != 1 {
            return Err(Error::InvalidArgument(format!(
                "prompts with images take a batch of 1, got {b}"
            )));
        }
        let ids: Vec<u32> = input_ids.squeeze(0)?.to_vec1()?;
        let m = self.vision.merge_size;
        let img = self.vision.image_token_id;
        let n_feat = features.dim(0)?;
        // M-RoPE positions (`get_rope_index`), continuing from the cache.
        let mut positions = Vec::with_capacity(s);
        let mut current = cache.offset() as i64 + cache.rope_delta();
        let mut gather = Vec::with_capacity(s);
        let (mut i, mut next_image, mut used) = (0usize, 0usize, 0usize);
        while i < s {
            if ids[i] != img {
                positions.push([current; 3]);
                gather.push(i as u32);
                current += 1;
                i += 1;
                continue;
            }
            let [t, h, w] = *grids.get(next_image).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "the prompt has more image placeholders than the {} images given",
                    grids.len()
                ))
            })?;
            let (lh, lw) = (h / m, w / m);
            let n = t * lh * lw;
            if i + n > s || ids[i..i + n].iter().any(|&x| x != img) {
                return Err(Error::InvalidArgument(format!(
                    "image {next_image} needs {n} consecutive `<|image_pad|>` tokens at position {i}"
                )));
            }
            for ti in 0..t {
                for y in 0..lh {
                    for x in 0..lw {
                        positions.push([
                            current + ti as i64,
                            current + y as i64,
                            current + x as i64,
                        ]);
                        gather.push((s + used) as u32);
                        used += 1;
                    }
                }
            }
            current += lh.max(lw) as i64;
            next_image += 1;
            i += n;
        }
        if next_image != grids.len() || used != n_feat {
            return Err(Error::InvalidArgument(format!(
                "{} images ({n_feat} feature rows) given but the prompt has placeholders for {next_image} ({used} tokens)",
                grids.len()
            )));
        }
        let x = self.decoder.embed_tokens.forward(input_ids)?.squeeze(0)?;
        let all = Tensor::cat(&[&x, &features.to_dtype(x.dtype())?], 0)?;
        let x = all
            .index_select(&Tensor::from_vec(gather, s, &self.device)?, 0)?
            .unsqueeze(0)?;
        let delta = current - (cache.offset() + s) as i64;
        let out = self.decode(x, &positions, cache, logits)?;
        cache.set_rope_delta(delta);
        Ok(out)
    }
}
