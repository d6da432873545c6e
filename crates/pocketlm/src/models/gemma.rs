//! Gemma 2 and Gemma 3 (text): embeddings scaled by `sqrt(hidden)`, `(1 + w)` RMSNorm, norms
//! before and after both attention and MLP, GELU-tanh gated MLP, attention scaled by
//! `query_pre_attn_scalar^-0.5`, sliding-window ("local") and full ("global") layers with their
//! own RoPE, logit soft-capping (Gemma 2) and per-head q/k norms (Gemma 3). Tied output layer.
//! Reference: Hugging Face `modeling_gemma2.py`, `modeling_gemma3.py` (`Gemma3ForCausalLM`),
//! mlx-lm `models/gemma2.py`, `models/gemma3_text.py`.

use std::ops::Range;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::gguf::names::{self, NameTable};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::models::{
    build, BlockRun, CausalLM, DecodePlan, LinearSlot, Logits, ModelInfo, PlanBlock, PlanMlp,
    Trainable, TrainableBlocks,
};
use crate::nn::{
    residual, softcap, Activation, Attention, AttentionPass, Embedding, GatedMlp, Linear, Mode,
    Numerics, RmsNorm, RopeScaling, RotaryEmbedding, ScaleAt,
};
use crate::weights::Weights;
use crate::{Error, Result};

/// GGUF tensor names of Gemma 2 and Gemma 3 (llama.cpp's `LLM_ARCH_GEMMA2` / `GEMMA3`): Llama's,
/// plus norms after attention and around the MLP. Gemma's `post_attention_layernorm` follows
/// attention (`post_attention_norm`; in Llama it is the MLP input norm `ffn_norm`), the pre-MLP
/// norm is `ffn_norm`, the post-MLP norm `post_ffw_norm`.
pub static GGUF_NAMES: NameTable = NameTable {
    name: "gemma",
    global: names::GLOBAL,
    block: &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ],
    gguf_only: &[],
};

/// config.json of a Gemma 2 / Gemma 3 text model (Hugging Face field names; both the
/// transformers 4 layout, `rope_theta` + `rope_local_base_freq` + `sliding_window_pattern`, and
/// the transformers 5 one, `rope_parameters` per layer type + `layer_types`).
#[derive(Debug, Clone, Deserialize)]
pub struct GemmaConfig {
    /// `gemma2`, `gemma3_text` (or `gemma3` for the text part of the multimodal model).
    pub model_type: String,
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads; defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Head width (Gemma: 256, not `hidden / heads`); defaults to `hidden / heads`.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base of global layers (transformers 4 layout).
    pub rope_theta: Option<f64>,
    /// RoPE base of local layers (Gemma 3, transformers 4 layout; default 10000).
    pub rope_local_base_freq: Option<f64>,
    /// RoPE scaling of global layers (transformers 4 layout).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5: `{"full_attention": {...}, "sliding_attention": {...}}` (Gemma 3) or
    /// one object for all layers (Gemma 2).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Longest context.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5`; defaults to `head_dim`.
    pub query_pre_attn_scalar: Option<f64>,
    /// `c` in `c * tanh(scores / c)` for attention scores (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// `c` in `c * tanh(logits / c)` for the output logits (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// Window of local layers, in tokens (a query sees itself and `sliding_window - 1` keys
    /// before it).
    pub sliding_window: Option<usize>,
    /// `sliding_attention` / `full_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    /// Every `n`-th layer is global (Gemma 3, transformers 4 layout; default 6).
    #[serde(alias = "_sliding_window_pattern")]
    pub sliding_window_pattern: Option<usize>,
    /// MLP activation; only `gelu_pytorch_tanh` (and its alias `gelu_tanh`) is used by Gemma.
    pub hidden_activation: Option<String>,
    /// Biases on the attention projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bidirectional attention (Gemma 3 embedding models); not supported.
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_ctx() -> usize {
    8192
}

fn bad(field: &str, msg: impl std::fmt::Display) -> Error {
    Error::Model(format!("config.json field `{field}`: {msg}"))
}

/// RoPE base and scaling of one layer type.
#[derive(Debug, Clone)]
struct RopeParams {
    theta: f64,
    scaling: RopeScaling,
}

fn rope_params(v: &serde_json::Value, field: &str) -> Result<RopeParams> {
    let theta = v
        .get("rope_theta")
        .and_then(|t| t.as_f64())
        .ok_or_else(|| bad(field, "has no `rope_theta`"))?;
    Ok(RopeParams {
        theta,
        scaling: RopeScaling::from_config(Some(v))?,
    })
}

impl GemmaConfig {
    fn is_gemma3(&self) -> bool {
        self.model_type.starts_with("gemma3")
    }
    fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// `true` for each sliding-window layer.
    fn sliding_layers(&self) -> Result<Vec<bool>> {
        if let Some(t) = &self.layer_types {
            if t.len() != self.num_hidden_layers {
                return Err(bad(
                    "layer_types",
                    format!(
                        "has {} entries for {} layers",
                        t.len(),
                        self.num_hidden_layers
                    ),
                ));
            }
            return t
                .iter()
                .map(|s| match s.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    o => Err(bad("layer_types", format!("unknown layer type `{o}`"))),
                })
                .collect();
        }
        // HF defaults: Gemma 2 alternates starting with a local layer; Gemma 3 makes every
        // `sliding_window_pattern`-th layer global.
        let pattern = if self.is_gemma3() {
            self.sliding_window_pattern.unwrap_or(6)
        } else {
            2
        };
        if pattern == 0 {
            return Err(bad("sliding_window_pattern", "must be positive"));
        }
        Ok((0..self.num_hidden_layers)
            .map(|i| (i + 1) % pattern != 0)
            .collect())
    }

    /// RoPE of (global, local) layers.
    fn rope(&self) -> Result<(RopeParams, RopeParams)> {
        if let Some(rp) = self.rope_parameters.as_ref().filter(|v| !v.is_null()) {
            if let (Some(full), Some(sliding)) =
                (rp.get("full_attention"), rp.get("sliding_attention"))
            {
                return Ok((
                    rope_params(full, "rope_parameters.full_attention")?,
                    rope_params(sliding, "rope_parameters.sliding_attention")?,
                ));
            }
            if self.rope_theta.is_none() {
                let p = rope_params(rp, "rope_parameters")?;
                return Ok((p.clone(), p));
            }
        }
        let default_global = if self.is_gemma3() {
            1_000_000.0
        } else {
            10_000.0
        };
        let global = RopeParams {
            theta: self.rope_theta.unwrap_or(default_global),
            scaling: RopeScaling::from_config(self.rope_scaling.as_ref())?,
        };
        let local = if self.is_gemma3() {
            RopeParams {
                theta: self.rope_local_base_freq.unwrap_or(10_000.0),
                scaling: RopeScaling::None,
            }
        } else {
            global.clone()
        };
        Ok((global, local))
    }

    fn heads(&self) -> build::Heads {
        build::Heads {
            n_heads: self.num_attention_heads,
            n_kv_heads: self.n_kv_heads(),
            head_dim: self.head_dim(),
        }
    }

    fn validate(&self) -> Result<()> {
        self.heads().checked()?;
        match self.hidden_activation.as_deref() {
            None | Some("gelu_pytorch_tanh") | Some("gelu_tanh") => {}
            Some(o) => return Err(bad("hidden_activation", format!("`{o}` is not supported"))),
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err(bad("use_bidirectional_attention", "true is not supported"));
        }
        if self.sliding_window == Some(0) {
            return Err(bad("sliding_window", "must be positive"));
        }
        Ok(())
    }
}

/// Reads an HF-style Gemma 2 / Gemma 3 text config from GGUF metadata (`gemma2.*` /
/// `gemma3.*` keys, llama.cpp naming), with llama.cpp's fixed choices for what the metadata
/// does not hold (`src/llama-model.cpp`): Gemma 2 alternates local and global layers starting
/// with a local one, Gemma 3 makes every 6th layer global and gives local layers RoPE base
/// 10000; queries are scaled by `key_length^-0.5`, except for the 27B models (46 / 62 layers)
/// where it is `(hidden / heads)^-0.5`.
///
/// Errors: [`Error::Model`] / [`Error::Tensor`] naming a missing key or tensor.
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let arch = g.architecture()?;
    let k = |s: &str| format!("{arch}.{s}");
    let heads = g.get_usize(&k("attention.head_count"))?;
    let hidden = g.get_usize(&k("embedding_length"))?;
    let layers = g.get_usize(&k("block_count"))?;
    let head_dim = g
        .opt_usize(&k("attention.key_length"))?
        .unwrap_or(hidden / heads.max(1));
    let vocab = match g.opt_usize(&k("vocab_size"))? {
        Some(v) => v,
        None => g.tensor_dims("token_embd.weight")?[0],
    };
    let is_27b = (arch == "gemma2" && layers == 46) || (arch == "gemma3" && layers == 62);
    let query_pre_attn_scalar = if is_27b {
        hidden / heads.max(1)
    } else {
        head_dim
    };
    let rope_scaling = match g.opt_str(&k("rope.scaling.type"))?.as_deref() {
        None | Some("none") => serde_json::Value::Null,
        Some("linear") => serde_json::json!({
            "rope_type": "linear",
            "factor": g.get_f64(&k("rope.scaling.factor"))?,
        }),
        Some(other) => {
            return Err(Error::Model(format!(
                "{}: `{arch}.rope.scaling.type` `{other}` is not supported",
                g.path().display()
            )))
        }
    };
    let is_gemma3 = arch == "gemma3";
    Ok(serde_json::json!({
        "model_type": if is_gemma3 { "gemma3_text" } else { "gemma2" },
        "hidden_size": hidden,
        "intermediate_size": g.get_usize(&k("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": g.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": g.opt_f64(&k("rope.freq_base"))?.unwrap_or(if is_gemma3 { 1e6 } else { 1e4 }),
        "rope_local_base_freq": 10000.0,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": g.opt_usize(&k("context_length"))?.unwrap_or(8192),
        "vocab_size": vocab,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "attn_logit_softcapping": g.opt_f64(&k("attn_logit_softcapping"))?,
        "final_logit_softcapping": g.opt_f64(&k("final_logit_softcapping"))?,
        "sliding_window": g.opt_usize(&k("attention.sliding_window"))?,
        "sliding_window_pattern": if is_gemma3 { 6 } else { 2 },
    }))
}

/// Builds a Gemma 2 / Gemma 3 text model from an HF-style config and weights
/// (`Gemma2ForCausalLM` / `Gemma3ForCausalLM` names). For `model_type: gemma3` (the multimodal
/// checkpoint) the text model is read from `text_config` and `language_model` weights; the
/// vision tower is ignored.
///
/// Errors: [`Error::Model`] naming an invalid config field; [`Error::Tensor`] naming a missing
/// or misshapen weight.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    let is_multimodal = config.get("model_type").and_then(|v| v.as_str()) == Some("gemma3");
    if !is_multimodal {
        let cfg: GemmaConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::Model(format!("config.json: {e}")))?;
        return Ok(Box::new(Gemma::new(cfg, w)?));
    }
    let mut text = config
        .get("text_config")
        .cloned()
        .ok_or_else(|| bad("text_config", "is missing (model_type gemma3)"))?;
    if let Some(o) = text.as_object_mut() {
        o.insert("model_type".into(), "gemma3_text".into());
    }
    let cfg: GemmaConfig = serde_json::from_value(text)
        .map_err(|e| Error::Model(format!("config.json `text_config`: {e}")))?;
    let w = build::language_model(w)?;
    let mut m = Gemma::new(cfg, &w)?;
    m.wrapper = Some("language_model");
    Ok(Box::new(m))
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    ffn: SandwichMlp,
}

/// Gemma's feed-forward part (Gemma 2, 3 and 4): `post_feedforward_layernorm(mlp(
/// pre_feedforward_layernorm(x)))`, the MLP GELU-tanh gated. `x: [.., hidden]` f32 -> same.
#[derive(Debug)]
pub(crate) struct SandwichMlp {
    pre_feedforward_layernorm: RmsNorm,
    mlp: GatedMlp,
    post_feedforward_layernorm: RmsNorm,
}

impl SandwichMlp {
    /// `{p}.pre_feedforward_layernorm`, `{p}.mlp.{gate,up,down}_proj` (`intermediate` wide)
    /// and `{p}.post_feedforward_layernorm`, the norms `hidden` wide, made by `norm(name, dim)`.
    ///
    /// Errors: a missing or misshapen weight, named.
    pub fn load(
        w: &dyn Weights,
        p: &str,
        intermediate: usize,
        hidden: usize,
        norm: &dyn Fn(&str, usize) -> Result<RmsNorm>,
    ) -> Result<Self> {
        let h = hidden;
        Ok(Self {
            pre_feedforward_layernorm: norm(&format!("{p}.pre_feedforward_layernorm.weight"), h)?,
            mlp: GatedMlp {
                gate_up: build::gate_up(w, p, intermediate, h, false, false)?,
                down_proj: w.linear(&format!("{p}.mlp.down_proj"), h, intermediate, false)?,
                activation: Activation::GeluTanh,
                numerics: w.layout().numerics,
            },
            post_feedforward_layernorm: norm(&format!("{p}.post_feedforward_layernorm.weight"), h)?,
        })
    }

    /// `x: [.., hidden]` f32 -> the normed MLP output `[.., hidden]` (without the residual);
    /// differentiable ops throughout for [`Mode::Training`].
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.post_feedforward_layernorm
            .forward_mode(&self.inner(x, mode)?, mode)
    }

    /// `mlp(pre_feedforward_layernorm(x))`, without the post norm: Gemma 4's MoE block normalizes
    /// it on its own and adds the experts' output before [`Self::post`].
    pub fn inner(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.mlp
            .forward(&self.pre_feedforward_layernorm.forward_mode(x, mode)?, mode)
    }

    /// The MLP's linear layers by Hugging Face name within the block (`mlp.gate_proj`, ...).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        self.mlp.linears_mut()
    }

    /// `post_feedforward_layernorm(y)` (differentiable in [`Mode::Training`]).
    pub fn post(&self, y: &Tensor, mode: Mode) -> Result<Tensor> {
        self.post_feedforward_layernorm.forward_mode(y, mode)
    }
}

/// A Gemma 2 / Gemma 3 text causal language model.
#[derive(Debug)]
pub struct Gemma {
    embed_tokens: Embedding,
    embed_scale: f64,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope_global: RotaryEmbedding,
    rope_local: RotaryEmbedding,
    final_softcap: Option<f64>,
    /// Adapter names' prefix ([`crate::models::wrap_slots`]): `language_model` when loaded
    /// from the multimodal `gemma3` config.
    wrapper: Option<&'static str>,
    info: ModelInfo,
    device: Device,
}

impl Gemma {
    /// Loads the weights named as in Hugging Face `Gemma2ForCausalLM` / `Gemma3ForCausalLM`.
    ///
    /// Norm weights are stored as `w` and used as `1 + w` (HF `Gemma2RMSNorm`), except where
    /// the weights' layout says the 1 is included (GGUF: llama.cpp's converter adds it).
    pub fn new(cfg: GemmaConfig, w: &dyn Weights) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let inter = cfg.intermediate_size;
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        let layout = w.layout();
        let unit_offset = !layout.norm_offset_included;
        let numerics = layout.numerics;
        let ggml = numerics == Numerics::Ggml;
        let norm = |name: &str, dim: usize| {
            RmsNorm::new(w.tensor(name, &[dim])?, cfg.rms_norm_eps, unit_offset)
        };
        let sliding = cfg.sliding_layers()?;
        if sliding.iter().any(|s| *s) && cfg.sliding_window.is_none() {
            return Err(bad(
                "sliding_window",
                "is missing but some layers are sliding",
            ));
        }
        let scale = 1.0 / cfg.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt();
        let heads = cfg.heads();
        let ab = cfg.attention_bias;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (i, &is_sliding) in sliding.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let (q_norm, k_norm) =
                build::qk_norms(w, &p, hd, cfg.rms_norm_eps, unit_offset, cfg.is_gemma3())?;
            layers.push(Block {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"), h)?,
                self_attn: Attention {
                    q_norm,
                    k_norm,
                    scale,
                    softcap: cfg.attn_logit_softcapping,
                    window: if is_sliding { cfg.sliding_window } else { None },
                    // llama.cpp's Gemma graphs scale the queries before q·k.
                    scale_at: match numerics {
                        Numerics::Ggml => ScaleAt::Queries,
                        Numerics::Reference => ScaleAt::Scores,
                    },
                    ..Attention::plain(
                        build::qkv(w, &p, heads, h, ab, false)?,
                        w.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd, ab)?,
                        nh,
                        nkv,
                        hd,
                    )
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
                ffn: SandwichMlp::load(w, &p, inter, h, &norm)?,
            });
        }
        let embed_tokens = w.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let lm_head = build::lm_head(w, &embed_tokens, false, cfg.vocab_size, h)?;
        let (global, local) = cfg.rope()?;
        // ggml numerics (GGUF weights) follow llama.cpp's angles (ggml's NEOX mode), others
        // transformers'.
        let rope = |p: &RopeParams| {
            if ggml {
                RotaryEmbedding::new_ggml(hd, p.theta, &p.scaling, false, w.device())
            } else {
                RotaryEmbedding::new(hd, p.theta, &p.scaling, false, w.device())
            }
        };
        Ok(Self {
            embed_tokens,
            embed_scale: (h as f64).sqrt(),
            layers,
            norm: norm("model.norm.weight", h)?,
            lm_head,
            rope_global: rope(&global)?,
            rope_local: rope(&local)?,
            final_softcap: cfg.final_logit_softcapping,
            wrapper: None,
            device: w.device().clone(),
            info: ModelInfo {
                architecture: if cfg.is_gemma3() { "gemma3" } else { "gemma2" }.into(),
                vocab_size: cfg.vocab_size,
                n_layers: cfg.num_hidden_layers,
                hidden_size: h,
                n_kv_heads: nkv,
                head_dim: hd,
                context_length: cfg.max_position_embeddings,
            },
        })
    }
}

impl CausalLM for Gemma {
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let (_b, s) = input_ids.dims2()?;
        cache.check_layers(self.layers.len())?;
        let x = self.embed(input_ids)?;
        let x = self.run_blocks(x, 0..self.layers.len(), BlockRun::Inference(cache))?;
        let x = match logits {
            Logits::Last => x.narrow(1, s - 1, 1)?,
            Logits::All => x,
        };
        let out = self.head(&x, Mode::Inference)?;
        Ok(match logits {
            Logits::Last => out.squeeze(1)?,
            Logits::All => out,
        })
    }

    fn trainable(&self) -> Option<&dyn Trainable> {
        Some(self)
    }

    fn trainable_mut(&mut self) -> Option<&mut dyn Trainable> {
        Some(self)
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    /// The sandwich blocks with their post norms, the local RoPE on sliding-window layers, the
    /// embedding scale and Gemma 2's soft-caps (the attention's in its layers, the logits').
    fn decode_plan(&self) -> Option<DecodePlan<'_>> {
        let blocks = self
            .layers
            .iter()
            .map(|b| PlanBlock {
                attn_norm: &b.input_layernorm,
                attention: &b.self_attn,
                mlp_norm: &b.ffn.pre_feedforward_layernorm,
                mlp: PlanMlp::Dense(&b.ffn.mlp),
                post_attn_norm: Some(&b.post_attention_layernorm),
                post_mlp_norm: Some(&b.ffn.post_feedforward_layernorm),
                rope: b.self_attn.window.map(|_| &self.rope_local),
            })
            .collect();
        Some(DecodePlan {
            embed_tokens: &self.embed_tokens,
            blocks,
            norm: &self.norm,
            lm_head: &self.lm_head,
            rope: &self.rope_global,
            context_length: self.info.context_length,
            embed_scale: Some(self.embed_scale),
            final_softcap: self.final_softcap,
        })
    }
}

impl TrainableBlocks for Gemma {
    /// Per block `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` under
    /// `model.layers.{i}` (mlx-lm's `gemma2` / `gemma3_text` module paths; under
    /// `language_model.` for the multimodal `gemma3` config, as mlx-lm's `gemma3` wraps the
    /// text model), then `lm_head`.
    fn linear_slots(&mut self) -> Vec<LinearSlot<'_>> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let attn = layer
                .self_attn
                .linears_mut()
                .into_iter()
                .map(|(k, l, _)| (k, l));
            for (key, linear) in attn.chain(layer.ffn.linears_mut()) {
                out.push(LinearSlot::new(i, key, linear));
            }
        }
        out.push(LinearSlot::output(&mut self.lm_head));
        crate::models::wrap_slots(out, self.wrapper)
    }

    /// The scaled token embedding of `input_ids: [batch, seq]` u32: `[batch, seq, hidden]` f32.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok((self.embed_tokens.forward(input_ids)? * self.embed_scale)?)
    }

    /// `x` is the scaled embedding or an earlier block's output.
    ///
    /// Errors: as [`BlockRun::layer`] and [`Attention::forward`].
    fn run_blocks(&self, x: Tensor, range: Range<usize>, mut run: BlockRun<'_>) -> Result<Tensor> {
        let mut x = x;
        let (s, offset, mode) = (x.dim(1)?, run.offset(), run.mode());
        let global = AttentionPass::new(&self.rope_global, offset, s)?;
        let local = AttentionPass::new(&self.rope_local, offset, s)?;
        for i in range.start..range.end.min(self.layers.len()) {
            let layer = &self.layers[i];
            let c = run.layer(i)?;
            let pass = match layer.self_attn.window {
                Some(_) => &local,
                None => &global,
            };
            let hn = layer.input_layernorm.forward_mode(&x, mode)?;
            let a = layer.self_attn.forward(&hn, pass, c, mode)?;
            let a = layer.post_attention_layernorm.forward_mode(&a, mode)?;
            x = residual(&a, &x, mode)?;
            x = residual(&layer.ffn.forward(&x, mode)?, &x, mode)?;
        }
        Ok(x)
    }

    /// Final norm, output layer and soft-cap on `x: [.., hidden]` -> `[.., vocab]` f32.
    fn head(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut out = self
            .lm_head
            .forward_mode(&self.norm.forward_mode(x, mode)?, mode)?;
        if let Some(c) = self.final_softcap {
            out = softcap(&out, c)?;
        }
        Ok(out)
    }
}
