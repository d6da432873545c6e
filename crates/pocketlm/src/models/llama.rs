//! Llama architecture (Llama 2/3.x, Mistral, SmolLM): RMSNorm, RoPE, grouped-query attention,
//! SwiGLU MLP, optionally tied embeddings. Reference: Hugging Face `modeling_llama.py` and
//! mlx-lm `models/llama.py`.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::models::names::{self, NameTable};
use crate::models::{build, CausalLM, DecodePlan, LinearSlot, Logits, ModelInfo, PlanBlock};
use crate::nn::{
    Activation, Attention, AttentionPass, Embedding, GatedMlp, Linear, Mode, RmsNorm, RopeScaling,
    RotaryEmbedding, ScaleAt,
};
use crate::weights::{QkRowOrder, Weights};
use crate::{Error, Result};

/// GGUF tensor names of the Llama family (Llama, Mistral, Qwen2, Qwen3: llama.cpp's
/// `LLM_ARCH_LLAMA` / `QWEN2` / `QWEN3` in `llama-arch.cpp`), as pairs with the Hugging Face
/// module names (`tensor_mapping.py`).
pub static GGUF_NAMES: NameTable = NameTable {
    name: "llama",
    global: names::GLOBAL,
    block: &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
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
    gguf_only: &["rope_freqs.weight"],
};

/// config.json of a Llama-family model (Hugging Face field names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (`rope_scaling` object), parsed by [`RopeScaling::from_config`].
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Per-frequency RoPE divisors from GGUF `rope_freqs.weight` (not a Hugging Face field).
    #[serde(default)]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Longest context.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Output layer shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Sliding-window attention span (Mistral), in tokens: a query sees itself and the
    /// `sliding_window - 1` keys before it.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Fraction of each head's dimensions that RoPE rotates (Phi-3 / Phi-4-mini); 1 if absent.
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

/// How a Llama-family architecture differs from Llama itself. The layers are the same; only
/// these switches change (Hugging Face names for the weights in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaVariant {
    /// Architecture name reported in [`ModelInfo::architecture`].
    pub name: &'static str,
    /// Biases on q/k/v (`attention_bias` in config.json also turns them on).
    pub qkv_bias: bool,
    /// Bias on o_proj (`attention_bias` also turns it on).
    pub o_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (`self_attn.q_norm` / `k_norm`,
    /// `[head_dim]`; Qwen3).
    pub qk_norm: bool,
    /// One `self_attn.qkv_proj` `[(heads + 2 kv_heads) * head_dim, hidden]` instead of three
    /// projections (Phi-3).
    pub fused_qkv: bool,
    /// One `mlp.gate_up_proj` `[2 * intermediate, hidden]` (gate rows first) instead of two
    /// (Phi-3).
    pub fused_gate_up: bool,
}

impl LlamaVariant {
    /// Llama / Mistral / SmolLM.
    pub const LLAMA: Self = Self {
        name: "llama",
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        fused_qkv: false,
        fused_gate_up: false,
    };
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_ctx() -> usize {
    2048
}

impl LlamaConfig {
    fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(Error::Model(format!("config field `{f}`: {m}")));
        if self.num_attention_heads == 0 || self.n_kv_heads() == 0 {
            return bad("num_attention_heads", "must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.n_kv_heads()) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.n_kv_heads(),
                    self.num_attention_heads
                ),
            );
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} must be even and positive", self.head_dim()),
            );
        }
        Ok(())
    }
}

/// Reads an HF-style config from GGUF metadata (`{arch}.*` keys, llama.cpp naming).
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let arch = g.architecture()?;
    let k = |s: &str| format!("{arch}.{s}");
    let heads = g.get_usize(&k("attention.head_count"))?;
    let hidden = g.get_usize(&k("embedding_length"))?;
    let vocab = match g.opt_usize(&k("vocab_size"))? {
        Some(v) => v,
        None => g.tensor_info("token_embd.weight")?.0[0],
    };
    let head_dim = match g.opt_usize(&k("attention.key_length"))? {
        Some(d) => d,
        None => g
            .opt_usize(&k("rope.dimension_count"))?
            .unwrap_or(hidden / heads.max(1)),
    };
    let rope_scaling = match g.opt_str(&k("rope.scaling.type"))?.as_deref() {
        None | Some("none") => serde_json::Value::Null,
        Some("linear") => serde_json::json!({
            "rope_type": "linear",
            "factor": g.get_f64(&k("rope.scaling.factor"))?,
        }),
        // llama.cpp's converter writes YaRN as the factor and the original context length.
        Some("yarn") => serde_json::json!({
            "rope_type": "yarn",
            "factor": g.get_f64(&k("rope.scaling.factor"))?,
            "original_max_position_embeddings":
                g.get_f64(&k("rope.scaling.original_context_length"))?,
            "beta_fast": g.opt_f64(&k("rope.scaling.yarn_beta_fast"))?,
            "beta_slow": g.opt_f64(&k("rope.scaling.yarn_beta_slow"))?,
        }),
        Some(other) => {
            return Err(Error::Model(format!(
                "{}: `{arch}.rope.scaling.type` `{other}` is not supported",
                g.path().display()
            )))
        }
    };
    let rope_freq_factors = if g.has_tensor("rope_freqs.weight") {
        let t = g.tensor_f32("rope_freqs.weight", &[head_dim / 2], &Device::Cpu)?;
        Some(t.to_vec1::<f32>()?)
    } else {
        None
    };
    Ok(serde_json::json!({
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": g.get_usize(&k("feed_forward_length"))?,
        "num_hidden_layers": g.get_usize(&k("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": g.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": g.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
        "rope_scaling": rope_scaling,
        "rope_freq_factors": rope_freq_factors,
        "max_position_embeddings": g.opt_usize(&k("context_length"))?.unwrap_or(2048),
        "vocab_size": vocab,
        "tie_word_embeddings": !g.has_tensor("output.weight"),
        "sliding_window": g.opt_usize(&k("attention.sliding_window"))?,
    }))
}

/// Builds a Llama model from an HF-style config and weights.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    build_variant(config, w, LlamaVariant::LLAMA)
}

/// Builds a Llama-family model of the given variant from an HF-style config and weights.
///
/// Errors: [`Error::Model`] naming the config field that is missing or invalid;
/// [`Error::Tensor`] naming a missing or misshapen weight.
pub fn build_variant(
    config: &serde_json::Value,
    w: &dyn Weights,
    variant: LlamaVariant,
) -> Result<Box<dyn CausalLM>> {
    let cfg: LlamaConfig = serde_json::from_value(config.clone())
        .map_err(|e| Error::Model(format!("config.json: {e}")))?;
    Ok(Box::new(Llama::with_variant(cfg, w, variant)?))
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

/// A Llama-family causal language model.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    /// Row order of the q/k projections, from the weights' layout.
    qk_rows: QkRowOrder,
    info: ModelInfo,
    device: Device,
}

impl Llama {
    /// Loads the weights named as in Hugging Face `LlamaForCausalLM`.
    pub fn new(cfg: LlamaConfig, w: &dyn Weights) -> Result<Self> {
        Self::with_variant(cfg, w, LlamaVariant::LLAMA)
    }

    /// Loads a Llama-family variant (Hugging Face weight names of that architecture).
    pub fn with_variant(cfg: LlamaConfig, w: &dyn Weights, v: LlamaVariant) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let inter = cfg.intermediate_size;
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        let norm = |name: &str| RmsNorm::new(w.tensor(name, &[h])?, cfg.rms_norm_eps, false);
        let numerics = w.layout().numerics;
        let heads = build::Heads {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        };
        let (qkv_b, o_b) = (
            cfg.attention_bias || v.qkv_bias,
            cfg.attention_bias || v.o_bias,
        );
        let mb = cfg.mlp_bias;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let (q_norm, k_norm) = build::qk_norms(w, &p, hd, cfg.rms_norm_eps, false, v.qk_norm)?;
            layers.push(Block {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    qkv: build::qkv(w, &p, heads, h, qkv_b, v.fused_qkv)?,
                    o_proj: w.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd, o_b)?,
                    q_norm,
                    k_norm,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                    scale: 1.0 / (hd as f64).sqrt(),
                    softcap: None,
                    window: cfg.sliding_window,
                    scale_at: ScaleAt::Scores,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: GatedMlp {
                    gate_up: build::gate_up(w, &p, inter, h, mb, v.fused_gate_up)?,
                    down_proj: w.linear(&format!("{p}.mlp.down_proj"), h, inter, mb)?,
                    activation: Activation::Silu,
                    numerics,
                },
            });
        }
        let embed_tokens = w.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let lm_head = build::lm_head(w, &embed_tokens, cfg.tie_word_embeddings, cfg.vocab_size, h)?;
        let scaling = match &cfg.rope_freq_factors {
            Some(ff) => RopeScaling::FreqFactors(ff.clone()),
            None => RopeScaling::from_config(cfg.rope_scaling.as_ref())?,
        };
        // llama.cpp's converter permutes Llama q/k rows so that adjacent-pair rotation applies.
        let qk_rows = w.layout().qk_rows;
        let interleaved = qk_rows.interleaved_rope();
        let rotary_dim = match cfg.partial_rotary_factor {
            Some(f) if f > 0.0 && f <= 1.0 => (hd as f64 * f) as usize,
            None => hd,
            Some(f) => {
                return Err(Error::Model(format!(
                    "config field `partial_rotary_factor`: {f} is not in (0, 1]"
                )))
            }
        };
        let rope = RotaryEmbedding::new(
            rotary_dim,
            cfg.rope_theta,
            &scaling,
            interleaved,
            w.device(),
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: norm("model.norm.weight")?,
            lm_head,
            rope,
            qk_rows,
            device: w.device().clone(),
            info: ModelInfo {
                architecture: v.name.into(),
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

impl Llama {
    /// Blocks `range` on `x: [b, s, hidden]` at the pass's positions: for inference appending
    /// to `cache` (required), for training as differentiable ops (see [`Mode`]).
    fn run_blocks(
        &self,
        mut x: Tensor,
        range: std::ops::Range<usize>,
        pass: &AttentionPass<'_>,
        mut cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        for (i, layer) in self
            .layers
            .iter()
            .enumerate()
            .take(range.end)
            .skip(range.start)
        {
            let c = match cache.as_deref_mut() {
                Some(c) => Some(
                    c.layer(i)
                        .ok_or_else(|| Error::InvalidArgument("KV cache too short".into()))?,
                ),
                None => None,
            };
            let hn = layer.input_layernorm.forward_mode(&x, mode)?;
            x = (layer.self_attn.forward(&hn, pass, c, mode)? + x)?;
            let hn = layer.post_attention_layernorm.forward_mode(&x, mode)?;
            x = (layer.mlp.forward(&hn, mode)? + x)?;
        }
        Ok(x)
    }
}

fn make_slot<'a>(
    layer: usize,
    key: &str,
    linear: &'a mut Linear,
    permuted_heads: Option<usize>,
) -> LinearSlot<'a> {
    LinearSlot {
        name: format!("model.layers.{layer}.{key}"),
        layer: Some(layer),
        key: key.to_string(),
        linear,
        permuted_heads,
    }
}

impl CausalLM for Llama {
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let (_, s) = input_ids.dims2()?;
        if cache.n_layers() != self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "KV cache has {} layers, model has {}",
                cache.n_layers(),
                self.layers.len()
            )));
        }
        // RoPE positions continue from all positions seen.
        let pass = AttentionPass::new(&self.rope, cache.offset(), s)?;
        let x = self.embed_tokens.forward(input_ids)?;
        let x = self.run_blocks(x, 0..self.layers.len(), &pass, Some(cache), Mode::Inference)?;
        let x = match logits {
            Logits::Last => x.narrow(1, s - 1, 1)?,
            Logits::All => x,
        };
        let out = self.lm_head.forward(&self.norm.forward(&x)?)?;
        Ok(match logits {
            Logits::Last => out.squeeze(1)?,
            Logits::All => out,
        })
    }

    fn new_cache(&self) -> KvCache {
        KvCache::growing(self.layers.len())
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn decode_plan(&self) -> Option<DecodePlan<'_>> {
        let blocks = self
            .layers
            .iter()
            .map(|b| PlanBlock {
                attn_norm: &b.input_layernorm,
                attention: &b.self_attn,
                mlp_norm: &b.post_attention_layernorm,
                mlp: &b.mlp,
            })
            .collect();
        Some(DecodePlan {
            embed_tokens: &self.embed_tokens,
            blocks,
            norm: &self.norm,
            lm_head: &self.lm_head,
            rope: &self.rope,
            context_length: self.info.context_length,
        })
    }

    fn linears_mut(&mut self) -> Vec<LinearSlot<'_>> {
        let qk_rows = self.qk_rows;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (key, linear, heads) in layer.self_attn.linears_mut() {
                let permuted = heads.and_then(|h| qk_rows.permuted_heads(h));
                out.push(make_slot(i, key, linear, permuted));
            }
            for (key, linear) in layer.mlp.linears_mut() {
                out.push(make_slot(i, key, linear, None));
            }
        }
        out.push(LinearSlot {
            name: "lm_head".into(),
            layer: None,
            key: "lm_head".into(),
            linear: &mut self.lm_head,
            permuted_heads: None,
        });
        out
    }

    fn hidden_states(&self, input_ids: &Tensor, upto: usize) -> Result<Tensor> {
        let (_b, s) = input_ids.dims2()?;
        let mut cache = self.new_cache();
        let x = self.embed_tokens.forward(input_ids)?;
        let pass = AttentionPass::new(&self.rope, 0, s)?;
        let upto = upto.min(self.layers.len());
        self.run_blocks(x, 0..upto, &pass, Some(&mut cache), Mode::Inference)
    }

    fn forward_blocks(
        &self,
        hidden: &Tensor,
        range: std::ops::Range<usize>,
        train: bool,
    ) -> Result<Tensor> {
        let (_b, s, _) = hidden.dims3()?;
        if range.is_empty() {
            return Ok(hidden.clone());
        }
        let pass = AttentionPass::new(&self.rope, 0, s)?;
        let mode = Mode::Training { dropout: train };
        self.run_blocks(hidden.clone(), range, &pass, None, mode)
    }

    fn forward_head(
        &self,
        hidden: &Tensor,
        train: bool,
        select: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = match select {
            Some(idx) => hidden.reshape(((), hidden.dim(2)?))?.index_select(idx, 0)?,
            None => hidden.clone(),
        };
        let mode = Mode::Training { dropout: train };
        self.lm_head
            .forward_mode(&self.norm.forward_mode(&x, mode)?, mode)
    }
}
