//! Llama architecture (Llama 2/3.x, Mistral, SmolLM): RMSNorm, RoPE, grouped-query attention,
//! SwiGLU MLP, optionally tied embeddings. Reference: Hugging Face `modeling_llama.py` and
//! mlx-lm `models/llama.py`.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use std::ops::Range;

use crate::gguf::names::{self, NameTable};
use crate::kv_cache::KvCache;
use crate::models::decoder::{Decoder, Mlp, PreNormBlock};
use crate::models::{
    build, BatchRow, CausalLM, DecodePlan, LinearSlot, Logits, ModelInfo, Trainable,
};
use crate::nn::{
    Activation, Attention, GatedMlp, QueryTemperature, RmsNorm, RopeScaling, RotaryEmbedding,
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

/// The RMSNorm epsilon when config.json has none (also DeepSeek-V3's).
pub(crate) fn default_eps() -> f64 {
    1e-6
}
/// The RoPE base when config.json has none (also DeepSeek-V3's).
pub(crate) fn default_theta() -> f64 {
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
    fn heads(&self) -> build::Heads {
        build::Heads {
            n_heads: self.num_attention_heads,
            n_kv_heads: self.n_kv_heads(),
            head_dim: self.head_dim(),
        }
    }
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

/// Per-layer changes to the Llama stack ([`Llama::with_layers`]).
pub(crate) struct LayerHooks<'a> {
    /// The feed-forward part of layer `i` (block prefix `p`, `model.layers.{i}`), or `None`
    /// for the dense gated MLP.
    pub mlp: &'a dyn Fn(usize, &str) -> Result<Option<Mlp>>,
    /// Whether layer `i` applies RoPE.
    pub rope: &'a dyn Fn(usize) -> bool,
    /// Changes to the attention of layer `i` (block prefix `p`) after it is built from the
    /// config (gpt-oss: the per-layer window of `layer_types`, the attention sinks).
    pub attn: &'a dyn Fn(usize, &str, &mut Attention) -> Result<()>,
}

impl Default for LayerHooks<'_> {
    /// Every layer dense, with RoPE.
    fn default() -> Self {
        Self {
            mlp: &|_, _| Ok(None),
            rope: &|_| true,
            attn: &|_, _, _| Ok(()),
        }
    }
}

/// A Llama-family causal language model.
#[derive(Debug)]
pub struct Llama {
    decoder: Decoder,
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
        Self::with_layers(cfg, w, v, &LayerHooks::default())
    }

    /// As [`Self::with_variant`], with the per-layer changes of an architecture built on this
    /// stack (Qwen3-MoE's sparse layers, SmolLM3's NoPE layers, gpt-oss's windows and sinks).
    pub(crate) fn with_layers(
        cfg: LlamaConfig,
        w: &dyn Weights,
        v: LlamaVariant,
        hooks: &LayerHooks<'_>,
    ) -> Result<Self> {
        let heads = cfg.heads().checked()?;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (heads.n_heads, heads.n_kv_heads, heads.head_dim);
        let norm = |name: &str| RmsNorm::new(w.tensor(name, &[h])?, cfg.rms_norm_eps, false);
        let numerics = w.layout().numerics;
        let (qkv_b, o_b) = (
            cfg.attention_bias || v.qkv_bias,
            cfg.attention_bias || v.o_bias,
        );
        let mb = cfg.mlp_bias;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let (q_norm, k_norm) = build::qk_norms(w, &p, hd, cfg.rms_norm_eps, false, v.qk_norm)?;
            let mut self_attn = Attention {
                q_norm,
                k_norm,
                window: cfg.sliding_window,
                rope: (hooks.rope)(i),
                ..Attention::plain(
                    build::qkv(w, &p, heads, h, qkv_b, v.fused_qkv)?,
                    w.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd, o_b)?,
                    nh,
                    nkv,
                    hd,
                )
            };
            (hooks.attn)(i, &p, &mut self_attn)?;
            layers.push(PreNormBlock {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                self_attn,
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: match (hooks.mlp)(i, &p)? {
                    Some(mlp) => mlp,
                    None => Mlp::Dense(GatedMlp {
                        gate_up: build::gate_up(w, &p, inter, h, mb, v.fused_gate_up)?,
                        down_proj: w.linear(&format!("{p}.mlp.down_proj"), h, inter, mb)?,
                        activation: Activation::Silu,
                        numerics,
                    }),
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
        let rotary_dim = build::rotary_dim(hd, cfg.partial_rotary_factor)?;
        let rope = RotaryEmbedding::new(
            rotary_dim,
            cfg.rope_theta,
            &scaling,
            interleaved,
            w.device(),
        )?;
        Ok(Self {
            decoder: Decoder {
                embed_tokens,
                layers,
                norm: norm("model.norm.weight")?,
                lm_head,
            },
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
    /// A model of Llama's interface from a decoder an architecture built itself (DeepSeek-V3's
    /// latent attention), with Hugging Face's q/k row order.
    pub(crate) fn from_parts(
        decoder: Decoder,
        rope: RotaryEmbedding,
        info: ModelInfo,
        device: Device,
    ) -> Self {
        Self {
            decoder,
            rope,
            qk_rows: QkRowOrder::HuggingFace,
            info,
            device,
        }
    }

    /// Sets every layer's query temperature (Ministral 3's Llama-4 scaling).
    pub(crate) fn set_query_temperature(&mut self, t: Option<QueryTemperature>) {
        for l in &mut self.decoder.layers {
            l.self_attn.query_temperature = t;
        }
    }

    /// The final hidden states (after the final norm) of `input_ids: [batch, seq]` u32 at
    /// positions `0..seq`: `[batch, seq, hidden]` f32 ([`Decoder::final_hidden`]).
    pub fn forward_hidden(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.decoder.final_hidden(input_ids, &self.rope)
    }
}

impl CausalLM for Llama {
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        self.decoder.forward(input_ids, &self.rope, cache, logits)
    }

    fn forward_batch(&self, rows: &mut [BatchRow<'_>]) -> Result<Tensor> {
        self.decoder.forward_batch(rows, &self.rope, &self.device)
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn decode_plan(&self) -> Option<DecodePlan<'_>> {
        self.decoder
            .decode_plan(&self.rope, self.info.context_length)
    }

    fn trainable(&self) -> Option<&dyn Trainable> {
        Some(self)
    }

    fn trainable_mut(&mut self) -> Option<&mut dyn Trainable> {
        Some(self)
    }
}

impl Trainable for Llama {
    fn linears_mut(&mut self) -> Vec<LinearSlot<'_>> {
        self.decoder.linears_mut(self.qk_rows)
    }

    fn hidden_states(&self, input_ids: &Tensor, upto: usize) -> Result<Tensor> {
        self.decoder.hidden_states(input_ids, upto, &self.rope)
    }

    fn forward_blocks(&self, hidden: &Tensor, range: Range<usize>, train: bool) -> Result<Tensor> {
        self.decoder
            .forward_blocks(hidden, range, train, &self.rope)
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
