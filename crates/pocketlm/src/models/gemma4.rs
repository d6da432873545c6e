//! Gemma 4 (text): Gemma 3's block (norms before and after attention and MLP, GELU-tanh gated
//! MLP, sliding-window and full layers with their own RoPE, per-head q/k norms, embeddings
//! scaled by `sqrt(hidden)`, tied output layer), with these differences:
//!
//! - RMSNorm scales by `w`, not `1 + w`; values get a scale-free per-head RMSNorm (`v_norm`);
//!   attention scores are not scaled (`scaling = 1`), and not soft-capped.
//! - Full-attention layers have their own head width (`global_head_dim`, 512 by default) and,
//!   with `attention_k_eq_v`, their own KV head count (`num_global_key_value_heads`) and no
//!   `v_proj`: the values are the key projection (before `k_norm`). transformers 5 writes both
//!   as `per_layer_config` (layer index -> `head_dim`, `num_key_value_heads`), which wins.
//! - Full layers use proportional RoPE (theta 1e6, a quarter of the frequencies rotate:
//!   [`RopeScaling::Proportional`]), sliding layers plain RoPE (theta 1e4), from
//!   `rope_parameters` per layer type. The last layer is always full attention.
//! - Per-layer embeddings (`hidden_size_per_layer_input` = P > 0): a second embedding
//!   `[vocab_per_layer, layers · P]` scaled by `sqrt(P)`, plus the RMS-normed projection
//!   `per_layer_model_projection(x) / sqrt(hidden)` of the scaled embedding `x`, their sum times
//!   `2^-0.5` gives each layer a `[P]` input; after its MLP a layer adds
//!   `post_per_layer_input_norm(per_layer_projection(gelu(per_layer_input_gate(h)) · input))`.
//! - Every layer's output is multiplied by its `layer_scalar`.
//! - KV sharing: the last `num_kv_shared_layers` layers have no k/v projections and attend
//!   over the keys and values of the last earlier layer of their type; they hold no cache.
//!   With `use_double_wide_mlp` their MLP is twice as wide.
//! - Logits soft-capped by `final_logit_softcapping` when set.
//!
//! - The mixture-of-experts block (`enable_moe_block`, Gemma-4-26B-A4B): beside the MLP,
//!   `num_experts` GELU-tanh gated experts, `top_k_experts` per token, chosen by a router on
//!   the block's residual `x`: `proj(rms_norm(x) · scale · hidden^-0.5)`, softmax, top-k
//!   renormalized, each weight times the expert's `per_expert_scale`; the experts run on
//!   `pre_feedforward_layernorm_2(x)`. The feed-forward output is then
//!   `post_feedforward_layernorm(post_feedforward_layernorm_1(mlp) +
//!   post_feedforward_layernorm_2(experts))` ([`ExpertBranch`]).
//!
//! Refused with an error: bidirectional attention on text (`use_bidirectional_attention: all`;
//! `vision` only concerns image tokens and is accepted).
//!
//! Reference: Hugging Face `models/gemma4/configuration_gemma4.py` (`Gemma4TextConfig`),
//! `modeling_gemma4.py` (`Gemma4TextModel`, `Gemma4ForCausalLM`), `modeling_rope_utils.py`
//! (`_compute_proportional_rope_parameters`), `Gemma4TextRouter`, `Gemma4TextExperts`; mlx-lm
//! `models/gemma4_text.py` (`Router`, `Experts`, `sanitize`), `gemma4.py`.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::gguf::names::NameTable;
use crate::gguf::GgufFile;
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::models::gemma::SandwichMlp;
use crate::models::{build, CausalLM, LinearSlot, Logits, ModelInfo, Trainable};
use crate::nn::{
    add, gelu_tanh, residual, softcap, Activation, Attention, AttentionPass, Embedding, KvSource,
    Linear, Mode, Moe, QkvProj, RmsNorm, RopeScaling, RotaryEmbedding, Router, ScaleAt, Scoring,
};
use crate::weights::Weights;
use crate::{Error, Result};

const SLIDING: &str = "sliding_attention";
const FULL: &str = "full_attention";

/// config.json of a Gemma 4 text model (`Gemma4TextConfig` field names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma4Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads of sliding layers (and of full layers unless overridden).
    pub num_key_value_heads: usize,
    /// Head width of sliding layers (default 256).
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// Head width of full layers (default 512) when `per_layer_config` is absent.
    #[serde(default)]
    pub global_head_dim: Option<usize>,
    /// KV heads of full layers with `attention_k_eq_v`, when `per_layer_config` is absent.
    #[serde(default)]
    pub num_global_key_value_heads: Option<usize>,
    /// transformers 5: per layer index, `head_dim` and `num_key_value_heads` overrides.
    #[serde(default)]
    pub per_layer_config: Option<HashMap<String, LayerOverride>>,
    /// MLP activation (only `gelu_pytorch_tanh`).
    #[serde(default = "default_activation")]
    pub hidden_activation: String,
    /// Longest context.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Output layer tied to the embedding (default true).
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// `{"full_attention": {...}, "sliding_attention": {...}}` (`rope_type`, `rope_theta`,
    /// `partial_rotary_factor`); HF defaults when absent.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Biases on the attention projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Window of sliding layers, in tokens (a query sees itself and `sliding_window - 1` keys
    /// before it; default 512).
    #[serde(default = "default_window")]
    pub sliding_window: usize,
    /// `sliding_attention` / `full_attention` per layer (default: every 6th full).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// `c` in `c · tanh(logits / c)`.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// `vision` (image tokens attend both ways: no effect on text) or `all` (not supported).
    #[serde(default)]
    pub use_bidirectional_attention: Option<String>,
    /// Rows of the per-layer embedding (default 262144).
    #[serde(default = "default_ple_vocab")]
    pub vocab_size_per_layer_input: usize,
    /// Per-layer input width P (default 256; 0 or null: none).
    #[serde(default = "default_ple_width")]
    pub hidden_size_per_layer_input: Option<usize>,
    /// Full layers' values are their keys (no `v_proj`).
    #[serde(default)]
    pub attention_k_eq_v: bool,
    /// The last this many layers reuse earlier layers' keys and values.
    #[serde(default)]
    pub num_kv_shared_layers: usize,
    /// Mixture-of-experts block beside the MLP.
    #[serde(default)]
    pub enable_moe_block: bool,
    /// Routed experts per layer (with `enable_moe_block`).
    #[serde(default)]
    pub num_experts: Option<usize>,
    /// Experts per token (with `enable_moe_block`).
    #[serde(default)]
    pub top_k_experts: Option<usize>,
    /// Inner width of each expert (with `enable_moe_block`).
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    /// KV-shared layers have MLPs of twice `intermediate_size`.
    #[serde(default)]
    pub use_double_wide_mlp: bool,
}

/// One entry of `per_layer_config`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    /// Head width of this layer.
    pub head_dim: Option<usize>,
    /// KV heads of this layer.
    pub num_key_value_heads: Option<usize>,
}

fn default_head_dim() -> usize {
    256
}
fn default_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_ctx() -> usize {
    131_072
}
fn default_eps() -> f64 {
    1e-6
}
fn yes() -> bool {
    true
}
fn default_window() -> usize {
    512
}
fn default_ple_vocab() -> usize {
    262_144
}
fn default_ple_width() -> Option<usize> {
    Some(256)
}

fn bad(field: &str, msg: impl std::fmt::Display) -> Error {
    Error::Model(format!("config.json field `{field}`: {msg}"))
}

/// What one layer looks like, resolved from the config.
#[derive(Debug, Clone)]
struct LayerPlan {
    sliding: bool,
    heads: build::Heads,
    /// `Some(j)`: attends over layer `j`'s keys and values (KV sharing).
    shares: Option<usize>,
    /// Keys are values (no `v_proj`).
    k_eq_v: bool,
    intermediate: usize,
}

impl Gemma4Config {
    fn layer_types(&self) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        let mut sliding: Vec<bool> = match &self.layer_types {
            Some(t) if t.len() != n => {
                return Err(bad(
                    "layer_types",
                    format!("has {} entries for {n} layers", t.len()),
                ))
            }
            Some(t) => t
                .iter()
                .map(|s| match s.as_str() {
                    SLIDING => Ok(true),
                    FULL => Ok(false),
                    o => Err(bad("layer_types", format!("unknown layer type `{o}`"))),
                })
                .collect::<Result<_>>()?,
            None => (0..n).map(|i| !(i + 1).is_multiple_of(6)).collect(),
        };
        // HF `Gemma4TextConfig.__post_init__` forces the last layer to full attention.
        if let Some(last) = sliding.last_mut() {
            *last = false;
        }
        Ok(sliding)
    }

    /// Per layer: type, head geometry, KV source and MLP width (HF `per_layer_config` and
    /// `kv_sharing_modes`).
    fn plan(&self) -> Result<Vec<LayerPlan>> {
        let n = self.num_hidden_layers;
        let sliding = self.layer_types()?;
        if self.num_kv_shared_layers >= n.max(1) {
            return Err(bad(
                "num_kv_shared_layers",
                format!(
                    "{} must be below num_hidden_layers {n}",
                    self.num_kv_shared_layers
                ),
            ));
        }
        let first_shared = n - self.num_kv_shared_layers;
        let mut out = Vec::with_capacity(n);
        for (i, &is_sliding) in sliding.iter().enumerate() {
            let mut heads = build::Heads {
                n_heads: self.num_attention_heads,
                n_kv_heads: self.num_key_value_heads,
                head_dim: self.head_dim,
            };
            match &self.per_layer_config {
                Some(p) => {
                    if let Some(o) = p.get(&i.to_string()) {
                        heads.head_dim = o.head_dim.unwrap_or(heads.head_dim);
                        heads.n_kv_heads = o.num_key_value_heads.unwrap_or(heads.n_kv_heads);
                    }
                }
                None if !is_sliding => {
                    heads.head_dim = self.global_head_dim.unwrap_or(512);
                    if self.attention_k_eq_v {
                        heads.n_kv_heads =
                            self.num_global_key_value_heads.unwrap_or(heads.n_kv_heads);
                    }
                }
                None => {}
            }
            let shares = if i >= first_shared {
                let j = (0..first_shared)
                    .rev()
                    .find(|&j| sliding[j] == is_sliding)
                    .ok_or_else(|| {
                        bad(
                            "num_kv_shared_layers",
                            format!("layer {i} shares keys and values, but no earlier layer of its type has them"),
                        )
                    })?;
                Some(j)
            } else {
                None
            };
            let wide = self.use_double_wide_mlp && shares.is_some();
            out.push(LayerPlan {
                sliding: is_sliding,
                heads: heads.checked()?,
                shares,
                k_eq_v: self.attention_k_eq_v && !is_sliding,
                intermediate: self.intermediate_size * if wide { 2 } else { 1 },
            });
        }
        for (i, p) in out.iter().enumerate() {
            if let Some(j) = p.shares {
                if out[j].heads.head_dim != p.heads.head_dim
                    || out[j].heads.n_kv_heads != p.heads.n_kv_heads
                {
                    return Err(bad(
                        "per_layer_config",
                        format!("layer {i} shares layer {j}'s keys and values but has other heads"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// RoPE base and scaling of a layer type (HF defaults when `rope_parameters` is absent).
    fn rope(&self, sliding: bool) -> Result<(f64, RopeScaling)> {
        let key = if sliding { SLIDING } else { FULL };
        let default = if sliding {
            serde_json::json!({"rope_type": "default", "rope_theta": 10_000.0})
        } else {
            serde_json::json!({"rope_type": "proportional", "partial_rotary_factor": 0.25,
                               "rope_theta": 1_000_000.0})
        };
        let v = match &self.rope_parameters {
            Some(p) if !p.is_null() => p
                .get(key)
                .cloned()
                .ok_or_else(|| bad("rope_parameters", format!("has no `{key}`")))?,
            _ => default,
        };
        let theta = v
            .get("rope_theta")
            .and_then(|t| t.as_f64())
            .ok_or_else(|| bad(&format!("rope_parameters.{key}"), "has no `rope_theta`"))?;
        Ok((theta, RopeScaling::from_config(Some(&v))?))
    }

    /// The experts' sizes and `top_k_experts` with `enable_moe_block`, else `None`.
    ///
    /// Errors: [`Error::Model`] naming a missing field or a top-k of 0 or above the experts.
    fn experts(&self) -> Result<Option<(build::ExpertShape, usize)>> {
        if !self.enable_moe_block {
            return Ok(None);
        }
        let need = |v: Option<usize>, f: &str| {
            v.filter(|&n| n > 0)
                .ok_or_else(|| bad(f, "missing or 0 (and `enable_moe_block` is true)"))
        };
        let n = need(self.num_experts, "num_experts")?;
        let k = need(self.top_k_experts, "top_k_experts")?;
        if k > n {
            return Err(bad(
                "top_k_experts",
                format!("{k} is above num_experts {n}"),
            ));
        }
        let shape = build::ExpertShape {
            n_experts: n,
            intermediate: need(self.moe_intermediate_size, "moe_intermediate_size")?,
            hidden: self.hidden_size,
        };
        Ok(Some((shape, k)))
    }

    fn validate(&self) -> Result<()> {
        self.experts()?;
        // `vision` makes only image tokens attend both ways (HF: text stays causal), which a
        // text-only model never sees; `all` makes every layer bidirectional.
        match self.use_bidirectional_attention.as_deref() {
            None | Some("vision") => {}
            Some(b) => {
                return Err(bad(
                    "use_bidirectional_attention",
                    format!("`{b}` is not supported (only causal text attention)"),
                ))
            }
        }
        match self.hidden_activation.as_str() {
            "gelu_pytorch_tanh" | "gelu_tanh" => {}
            o => return Err(bad("hidden_activation", format!("`{o}` is not supported"))),
        }
        if self.sliding_window == 0 {
            return Err(bad("sliding_window", "must be positive"));
        }
        Ok(())
    }

    fn ple_width(&self) -> Option<usize> {
        self.hidden_size_per_layer_input.filter(|&p| p > 0)
    }
}

/// Where a layer's keys and values come from.
#[derive(Debug, Clone, Copy)]
enum KvSlot {
    /// Its own projections, appended to cache layer `n`.
    Cache(usize),
    /// Those layer `n` attended over.
    Shared(usize),
}

/// The per-layer-input branch of one block.
#[derive(Debug)]
struct PerLayerBranch {
    gate: Linear,
    projection: Linear,
    norm: RmsNorm,
}

/// Gemma 4's mixture-of-experts branch beside the MLP (`enable_moe_block`; HF
/// `Gemma4TextDecoderLayer`'s `router`, `experts` and extra norms), see the module docs.
#[derive(Debug)]
struct ExpertBranch {
    /// The router's input norm: plain RMSNorm of weight `router.scale · hidden^-0.5` (mlx-lm's
    /// `rms_norm(x, scale · root_size)`).
    router_norm: RmsNorm,
    /// Router (`router.proj`, softmax top-k renormalized, `router.per_expert_scale`) and the
    /// GELU-tanh gated experts.
    moe: Moe,
    pre_feedforward_layernorm_2: RmsNorm,
    post_feedforward_layernorm_1: RmsNorm,
    post_feedforward_layernorm_2: RmsNorm,
}

impl ExpertBranch {
    /// The branch of block prefix `p` (Hugging Face's fused `experts.gate_up_proj` /
    /// `experts.down_proj`, mlx-lm's stacked `experts.switch_glu.*`), norms made by `norm`.
    fn load(
        w: &dyn Weights,
        p: &str,
        (shape, top_k): (build::ExpertShape, usize),
        norm: &dyn Fn(&str, usize) -> Result<RmsNorm>,
        eps: f64,
    ) -> Result<Self> {
        let h = shape.hidden;
        let n = shape.n_experts;
        let r = format!("{p}.router");
        let root = (h as f64).powf(-0.5);
        let scale = (w.tensor(&format!("{r}.scale"), &[h])? * root)?;
        let per_expert = w.tensor(&format!("{r}.per_expert_scale"), &[n])?;
        let router = Router {
            gate: w.linear(&format!("{r}.proj"), n, h, false)?,
            scoring: Scoring::Softmax,
            top_k,
            norm_topk_prob: true,
            selection_bias: None,
            expert_scale: Some(per_expert.to_vec1::<f32>()?),
            scale: 1.0,
            groups: None,
        };
        let (stacked, hf) = (format!("{p}.experts.switch_glu"), format!("{p}.experts"));
        let numerics = w.layout().numerics;
        let experts = build::experts_at(w, &stacked, &hf, shape, Activation::GeluTanh, numerics)?;
        let n = |s: &str| norm(&format!("{p}.{s}.weight"), h);
        Ok(Self {
            router_norm: RmsNorm::new(scale, eps, false)?,
            moe: Moe {
                router,
                experts,
                shared: None,
                kernels: Default::default(),
            },
            pre_feedforward_layernorm_2: n("pre_feedforward_layernorm_2")?,
            post_feedforward_layernorm_1: n("post_feedforward_layernorm_1")?,
            post_feedforward_layernorm_2: n("post_feedforward_layernorm_2")?,
        })
    }
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    ffn: SandwichMlp,
    /// The mixture-of-experts branch beside `ffn`, with `enable_moe_block`.
    experts: Option<ExpertBranch>,
    per_layer: Option<PerLayerBranch>,
    layer_scalar: f64,
    kv: KvSlot,
    /// Index into [`Gemma4::ropes`].
    rope: usize,
}

impl Block {
    /// The feed-forward part on the residual `x: [.., hidden]` f32, without the residual: the
    /// MLP, or with [`ExpertBranch`] the MLP and the experts (module docs).
    /// Differentiable ops throughout in [`Mode::Training`] (the experts' routing constant for
    /// the gradient, [`Moe::forward`]).
    fn feed_forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let Some(e) = &self.experts else {
            return self.ffn.forward(x, mode);
        };
        let h1 = e
            .post_feedforward_layernorm_1
            .forward_mode(&self.ffn.inner(x, mode)?, mode)?;
        let h2 = e.moe.forward_routed(
            &e.router_norm.forward_mode(x, mode)?,
            &e.pre_feedforward_layernorm_2.forward_mode(x, mode)?,
            mode,
        )?;
        let h2 = e.post_feedforward_layernorm_2.forward_mode(&h2, mode)?;
        self.ffn.post(&(h1 + h2)?, mode)
    }

    /// After the attention's residual: the feed-forward part with its residual, the
    /// per-layer-input branch (`inputs` `[batch, seq, layers, P]`, this is layer `i`) and the
    /// layer scalar, on `x: [batch, seq, hidden]`.
    fn finish(&self, x: Tensor, i: usize, inputs: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        let mut x = residual(&self.feed_forward(&x, mode)?, &x, mode)?;
        if let (Some(b), Some(inputs)) = (&self.per_layer, inputs) {
            let g = gelu_tanh(&b.gate.forward_mode(&x, mode)?)?;
            let g = (g * inputs.narrow(2, i, 1)?.squeeze(2)?)?;
            let branch = b
                .norm
                .forward_mode(&b.projection.forward_mode(&g, mode)?, mode)?;
            x = residual(&branch, &x, mode)?;
        }
        Ok((x * self.layer_scalar)?)
    }
}

/// The per-layer embeddings (PLE) of the whole model.
#[derive(Debug)]
struct PerLayerEmbedding {
    /// `embed_tokens_per_layer` `[vocab_per_layer, layers · P]`.
    embed: Embedding,
    /// `per_layer_model_projection` `[layers · P, hidden]`.
    projection: Linear,
    /// `per_layer_projection_norm` `[P]`.
    norm: RmsNorm,
    width: usize,
}

impl PerLayerEmbedding {
    /// `ids: [batch, seq]` u32 and the scaled embedding `x: [batch, seq, hidden]` -> every
    /// layer's input `[batch, seq, layers, P]` (HF `get_per_layer_inputs` +
    /// `project_per_layer_inputs`).
    fn inputs(&self, ids: &Tensor, x: &Tensor, n_layers: usize) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let shape = (b, s, n_layers, self.width);
        let tokens = (self.embed.forward(ids)? * (self.width as f64).sqrt())?.reshape(shape)?;
        let hidden = x.dim(2)? as f64;
        let projected = (self.projection.forward(x)? * hidden.powf(-0.5))?.reshape(shape)?;
        let projected = self.norm.forward(&projected)?;
        Ok(((projected + tokens)? * 0.5f64.sqrt())?)
    }
}

/// A Gemma 4 text causal language model.
#[derive(Debug)]
pub struct Gemma4 {
    embed_tokens: Embedding,
    embed_scale: f64,
    per_layer: Option<PerLayerEmbedding>,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    /// One rotary embedding per (layer type, head width).
    ropes: Vec<RotaryEmbedding>,
    final_softcap: Option<f64>,
    /// Layers with a cache of their own (the first `layers - num_kv_shared_layers`).
    n_caches: usize,
    /// `(kv_heads, head_dim)` of the cached layers.
    cache_shapes: Vec<(usize, usize)>,
    /// The layers whose keys and values later layers share, with `kv_heads · head_dim` of
    /// each, in layer order: the training carry holds their keys and values ([`Trainable`]).
    kv_sources: Vec<(usize, usize)>,
    /// Adapter names' prefix ([`crate::models::wrap_slots`]): `language_model` when loaded
    /// from the multimodal `gemma4` config (mlx-lm's `gemma4` wraps `gemma4_text`).
    wrapper: Option<&'static str>,
    info: ModelInfo,
    device: Device,
}

impl Gemma4 {
    /// Loads the weights named as in Hugging Face `Gemma4ForCausalLM` (or mlx-lm's
    /// `gemma4_text` conversion of it).
    ///
    /// Errors: [`Error::Model`] naming an invalid or unsupported config field;
    /// [`Error::Tensor`] naming a missing or misshapen weight.
    pub fn new(cfg: Gemma4Config, w: &dyn Weights) -> Result<Self> {
        cfg.validate()?;
        let plan = cfg.plan()?;
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        let norm = |name: &str, dim: usize| RmsNorm::new(w.tensor(name, &[dim])?, eps, false);
        let unscaled = |dim: usize| {
            RmsNorm::new(
                Tensor::ones(dim, candle_core::DType::F32, w.device())?,
                eps,
                false,
            )
        };
        let ple = cfg.ple_width();
        let moe = cfg.experts()?;
        let mut ropes: Vec<(bool, usize, RotaryEmbedding)> = Vec::new();
        let mut layers = Vec::with_capacity(plan.len());
        let mut n_caches = 0;
        let mut cache_shapes = Vec::new();
        for (i, lp) in plan.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = |n: &str| format!("{p}.self_attn.{n}");
            let build::Heads {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
            } = lp.heads;
            let ab = cfg.attention_bias;
            let q = w.linear(&a("q_proj"), nh * hd, h, ab)?;
            let (qkv, k_norm, v_norm, kv) = match lp.shares {
                Some(j) => (QkvProj::QueryOnly(q), None, None, KvSlot::Shared(j)),
                None => {
                    let k = w.linear(&a("k_proj"), nkv * hd, h, ab)?;
                    let qkv = if lp.k_eq_v {
                        QkvProj::KeyIsValue { q, k }
                    } else {
                        let v = w.linear(&a("v_proj"), nkv * hd, h, ab)?;
                        QkvProj::Separate { q, k, v }
                    };
                    n_caches += 1;
                    cache_shapes.push((nkv, hd));
                    let k_norm = norm(&a("k_norm.weight"), hd)?;
                    (
                        qkv,
                        Some(k_norm),
                        Some(unscaled(hd)?),
                        KvSlot::Cache(n_caches - 1),
                    )
                }
            };
            let rope = match ropes
                .iter()
                .position(|(s, d, _)| *s == lp.sliding && *d == hd)
            {
                Some(r) => r,
                None => {
                    let (theta, scaling) = cfg.rope(lp.sliding)?;
                    let r = RotaryEmbedding::new(hd, theta, &scaling, false, w.device())?;
                    ropes.push((lp.sliding, hd, r));
                    ropes.len() - 1
                }
            };
            let per_layer = match ple {
                Some(pw) => Some(PerLayerBranch {
                    gate: w.linear(&format!("{p}.per_layer_input_gate"), pw, h, false)?,
                    projection: w.linear(&format!("{p}.per_layer_projection"), h, pw, false)?,
                    norm: norm(&format!("{p}.post_per_layer_input_norm.weight"), h)?,
                }),
                None => None,
            };
            // A persistent buffer of ones in HF; checkpoints without it get 1.
            let scalar_name = format!("{p}.layer_scalar");
            let layer_scalar = if w.contains(&scalar_name) {
                w.tensor(&scalar_name, &[1])?
                    .flatten_all()?
                    .to_vec1::<f32>()?[0] as f64
            } else {
                1.0
            };
            layers.push(Block {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"), h)?,
                self_attn: Attention {
                    qkv,
                    o_proj: w.linear(&a("o_proj"), h, nh * hd, ab)?,
                    q_norm: Some(norm(&a("q_norm.weight"), hd)?),
                    k_norm,
                    v_norm,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                    scale: 1.0,
                    softcap: None,
                    window: lp.sliding.then_some(cfg.sliding_window),
                    scale_at: ScaleAt::Scores,
                    rope: true,
                    query_temperature: None,
                    sinks: None,
                    output_gate: false,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
                ffn: SandwichMlp::load(w, &p, lp.intermediate, h, &norm)?,
                experts: match moe {
                    Some(m) => Some(ExpertBranch::load(w, &p, m, &norm, cfg.rms_norm_eps)?),
                    None => None,
                },
                per_layer,
                layer_scalar,
                kv,
                rope,
            });
        }
        let n = cfg.num_hidden_layers;
        let mut kv_sources: Vec<(usize, usize)> = Vec::new();
        for layer in &layers {
            if let KvSlot::Shared(j) = layer.kv {
                if !kv_sources.iter().any(|&(s, _)| s == j) {
                    let a = &layers[j].self_attn;
                    kv_sources.push((j, a.n_kv_heads * a.head_dim));
                }
            }
        }
        kv_sources.sort_unstable();
        let per_layer = match ple {
            Some(pw) => Some(PerLayerEmbedding {
                embed: w.embedding(
                    "model.embed_tokens_per_layer.weight",
                    cfg.vocab_size_per_layer_input,
                    n * pw,
                )?,
                projection: w.linear("model.per_layer_model_projection", n * pw, h, false)?,
                norm: norm("model.per_layer_projection_norm.weight", pw)?,
                width: pw,
            }),
            None => None,
        };
        let embed_tokens = w.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let lm_head = build::lm_head(w, &embed_tokens, cfg.tie_word_embeddings, cfg.vocab_size, h)?;
        Ok(Self {
            embed_tokens,
            embed_scale: (h as f64).sqrt(),
            per_layer,
            layers,
            norm: norm("model.norm.weight", h)?,
            lm_head,
            ropes: ropes.into_iter().map(|(_, _, r)| r).collect(),
            final_softcap: cfg.final_logit_softcapping,
            wrapper: None,
            n_caches,
            cache_shapes,
            kv_sources,
            device: w.device().clone(),
            info: ModelInfo {
                architecture: "gemma4".into(),
                vocab_size: cfg.vocab_size,
                n_layers: n,
                hidden_size: h,
                n_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                context_length: cfg.max_position_embeddings,
            },
        })
    }

    /// Inference over `input_ids: [batch, seq]` u32 appended to `cache`, through blocks
    /// `0..upto`: the hidden states `[batch, seq, hidden]`, the per-layer inputs `[batch, seq,
    /// layers, P]` (with per-layer embeddings) and each run layer's keys and values
    /// `[batch, kv_heads, len, head_dim]`.
    ///
    /// Errors: a cache of another layer count; shapes that do not agree with the weights.
    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        upto: usize,
    ) -> Result<(Tensor, Option<Tensor>, Vec<Option<(Tensor, Tensor)>>)> {
        let s = input_ids.dim(1)?;
        if cache.n_layers() != self.n_caches {
            return Err(Error::InvalidArgument(format!(
                "KV cache has {} layers, the model caches {} (layers without shared keys and values)",
                cache.n_layers(),
                self.n_caches
            )));
        }
        let offset = cache.offset();
        let passes = self
            .ropes
            .iter()
            .map(|r| AttentionPass::new(r, offset, s))
            .collect::<Result<Vec<_>>>()?;
        let mut x = (self.embed_tokens.forward(input_ids)? * self.embed_scale)?;
        let per_layer = match &self.per_layer {
            Some(p) => Some(p.inputs(input_ids, &x, self.layers.len())?),
            None => None,
        };
        let mut kvs: Vec<Option<(Tensor, Tensor)>> = vec![None; self.layers.len()];
        for (i, layer) in self.layers.iter().enumerate().take(upto) {
            let source = match layer.kv {
                KvSlot::Cache(c) => KvSource::Cache(cache.layer_for_pass(c)?),
                KvSlot::Shared(j) => {
                    let (k, v) = kvs[j].clone().ok_or_else(|| {
                        Error::Model(format!("layer {i} shares the keys of layer {j}, not run"))
                    })?;
                    KvSource::Shared(k, v)
                }
            };
            let hn = layer.input_layernorm.forward(&x)?;
            let (a, kv) = layer
                .self_attn
                .forward_kv(&hn, &passes[layer.rope], source)?;
            kvs[i] = Some(kv);
            x = add(&layer.post_attention_layernorm.forward(&a)?, &x)?;
            x = layer.finish(x, i, per_layer.as_ref(), Mode::Inference)?;
        }
        Ok((x, per_layer, kvs))
    }
}

/// Builds a Gemma 4 text model from an HF-style config and weights. For `model_type: gemma4`
/// (the multimodal checkpoint) the text model is read from `text_config` and the
/// `language_model` weights ([`build::language_model`]); the vision and audio towers are
/// ignored.
///
/// Errors: [`Error::Model`] naming an invalid or unsupported config field; [`Error::Tensor`]
/// naming a missing or misshapen weight.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    if config.get("model_type").and_then(|v| v.as_str()) != Some("gemma4") {
        let cfg: Gemma4Config = serde_json::from_value(config.clone())
            .map_err(|e| Error::Model(format!("config.json: {e}")))?;
        return Ok(Box::new(Gemma4::new(cfg, w)?));
    }
    let text = config
        .get("text_config")
        .cloned()
        .ok_or_else(|| bad("text_config", "is missing (model_type gemma4)"))?;
    let cfg: Gemma4Config = serde_json::from_value(text)
        .map_err(|e| Error::Model(format!("config.json `text_config`: {e}")))?;
    let w = build::language_model(w)?;
    let mut m = Gemma4::new(cfg, &w)?;
    m.wrapper = Some("language_model");
    Ok(Box::new(m))
}

impl CausalLM for Gemma4 {
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let s = input_ids.dim(1)?;
        let (x, _, _) = self.run(input_ids, cache, self.layers.len())?;
        let x = match logits {
            Logits::Last => x.narrow(1, s - 1, 1)?,
            Logits::All => x,
        };
        let mut out = self.lm_head.forward(&self.norm.forward(&x)?)?;
        if let Some(c) = self.final_softcap {
            out = softcap(&out, c)?;
        }
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

    /// Growing caches for the layers with keys and values of their own (KV-shared layers have
    /// none, as mlx-lm's `make_cache`).
    fn new_cache(&self) -> KvCache {
        KvCache::growing(self.n_caches)
    }

    /// As [`CausalLM::new_cache`], of the kind `config` describes.
    ///
    /// Errors: as [`KvCache::new`], for every head width of the cached layers.
    fn make_cache(&self, config: &KvCacheConfig) -> Result<KvCache> {
        for &(_, hd) in &self.cache_shapes {
            KvCache::new(0, hd, config)?;
        }
        KvCache::new(self.n_caches, self.info.head_dim, config)
    }

    fn cache_shapes(&self) -> Vec<(usize, usize)> {
        self.cache_shapes.clone()
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// GGUF tensor names of llama.cpp's `gemma4` (`llama-arch.cpp`, `tensor_mapping.py`): Gemma
/// 3's, plus the per-layer-input branch (`inp_gate`, `proj`, `post_norm`, the global
/// `per_layer_*` tensors) and the layer scalar `layer_scalar` (`layer_output_scale.weight`). `rope_freqs.weight` holds the proportional RoPE of full layers as
/// frequency divisors (1 rotates, 1e30 does not); [`config_from_gguf`] reads it.
pub static GGUF_NAMES: NameTable = NameTable {
    name: "gemma4",
    global: &[
        ("model.embed_tokens", "token_embd"),
        ("model.embed_tokens_per_layer", "per_layer_token_embd"),
        ("model.per_layer_model_projection", "per_layer_model_proj"),
        ("model.per_layer_projection_norm", "per_layer_proj_norm"),
        ("model.norm", "output_norm"),
        ("lm_head", "output"),
    ],
    block: &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
        ("post_per_layer_input_norm", "post_norm"),
        ("per_layer_input_gate", "inp_gate"),
        ("per_layer_projection", "proj"),
        ("layer_scalar", "layer_output_scale.weight"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        // The mixture-of-experts branch (`enable_moe_block`): llama.cpp keeps the experts
        // fused as transformers saves them, the router's `scale` as `ffn_gate_inp.scale` and
        // `per_expert_scale` as `ffn_down_exps.scale` (it scales each expert's output).
        ("router.proj", "ffn_gate_inp"),
        ("router.scale", "ffn_gate_inp.scale"),
        ("router.per_expert_scale", "ffn_down_exps.scale"),
        ("experts.gate_up_proj", "ffn_gate_up_exps"),
        ("experts.down_proj", "ffn_down_exps"),
        ("pre_feedforward_layernorm_2", "pre_ffw_norm_2"),
        ("post_feedforward_layernorm_1", "post_ffw_norm_1"),
        ("post_feedforward_layernorm_2", "post_ffw_norm_2"),
    ],
    gguf_only: &["rope_freqs.weight"],
};

/// An HF-style Gemma 4 text config from the metadata of a GGUF `gemma4` file (llama.cpp's
/// converter, `conversion/gemma.py` `Gemma4Model`), every field [`Gemma4Config`] reads:
///
/// - layer types from `gemma4.attention.sliding_window_pattern` (true: sliding);
/// - per layer (`per_layer_config`): head width `attention.key_length` (full) /
///   `attention.key_length_swa` (sliding), KV heads from `attention.head_count_kv` (an array
///   or one value);
/// - `intermediate_size` from `feed_forward_length` (an array when KV-shared layers are twice
///   as wide: `use_double_wide_mlp`); `num_kv_shared_layers` from
///   `attention.shared_kv_layers`; `hidden_size_per_layer_input` from
///   `embedding_length_per_layer_input`;
/// - RoPE: full layers proportional with base `rope.freq_base` and the rotating fraction of
///   `rope_freqs.weight` (its entries equal to 1; the converter writes the others as 1e30),
///   sliding layers base `rope.freq_base_swa` over `rope.dimension_count_swa` dimensions;
/// - `attention_k_eq_v` when a full layer with its own keys has no `attn_v`, as llama.cpp's
///   graph uses the keys as values when `wv` is absent;
/// - `enable_moe_block` when layer 0 has a router (`blk.0.ffn_gate_inp.weight`; llama.cpp's
///   graph gives a layer experts exactly when it has one, and Gemma 4 gives every layer the
///   same), then `num_experts`, `top_k_experts` and `moe_intermediate_size` from
///   `expert_count`, `expert_used_count` and `expert_feed_forward_length`.
///
/// Errors: a missing or mistyped key, or per-layer arrays of the wrong length, naming the
/// file.
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let k = |s: &str| format!("gemma4.{s}");
    let file = g.path().display();
    let n = g.get_usize(&k("block_count"))?;
    let sliding = g.get_bool_array(&k("attention.sliding_window_pattern"))?;
    if sliding.len() != n {
        return Err(Error::Model(format!(
            "{file}: `gemma4.attention.sliding_window_pattern` has {} entries for {n} layers",
            sliding.len()
        )));
    }
    let kv = g.get_usize_per_layer(&k("attention.head_count_kv"), n)?;
    let ff = g.get_usize_per_layer(&k("feed_forward_length"), n)?;
    let shared = g.opt_usize(&k("attention.shared_kv_layers"))?.unwrap_or(0);
    let first_shared = n.saturating_sub(shared);
    let head_full = g.get_usize(&k("attention.key_length"))?;
    let head_swa = g.get_usize(&k("attention.key_length_swa"))?;
    let width = |i: usize| if sliding[i] { head_swa } else { head_full };
    let per_layer: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| {
            let o = serde_json::json!({"head_dim": width(i), "num_key_value_heads": kv[i]});
            (i.to_string(), o)
        })
        .collect();
    let base = ff.first().copied().unwrap_or(0);
    let double_wide = first_shared < n && ff[first_shared..].iter().all(|&f| f == 2 * base);
    if let Some(i) = (0..n).find(|&i| {
        ff[i]
            != if double_wide && i >= first_shared {
                2 * base
            } else {
                base
            }
    }) {
        return Err(Error::Model(format!(
            "{file}: `gemma4.feed_forward_length` {ff:?}: layer {i} is neither {base} nor twice \
             that on a KV-shared layer"
        )));
    }
    let k_eq_v = (0..first_shared)
        .find(|&i| !sliding[i])
        .is_some_and(|i| !g.has_tensor(&format!("blk.{i}.attn_v.weight")));
    let rotating = if g.has_tensor("rope_freqs.weight") {
        let f = g.tensor_f32(
            "rope_freqs.weight",
            &[head_full / 2],
            &candle_core::Device::Cpu,
        )?;
        f.to_vec1::<f32>()?.iter().filter(|&&x| x == 1.0).count()
    } else {
        head_full / 2
    };
    let rot_swa = g
        .opt_usize(&k("rope.dimension_count_swa"))?
        .unwrap_or(head_swa);
    let embed_rows = |name: &str| -> Result<usize> { Ok(g.tensor_dims(name)?[0]) };
    let ple = g
        .opt_usize(&k("embedding_length_per_layer_input"))?
        .unwrap_or(0);
    let moe = g.has_tensor("blk.0.ffn_gate_inp.weight");
    let expert_key = |s: &str| -> Result<Option<usize>> {
        if moe {
            g.get_usize(&k(s)).map(Some)
        } else {
            Ok(None)
        }
    };
    Ok(serde_json::json!({
        "model_type": "gemma4_text",
        "vocab_size": embed_rows("token_embd.weight")?,
        "hidden_size": g.get_usize(&k("embedding_length"))?,
        "intermediate_size": base,
        "use_double_wide_mlp": double_wide,
        "num_hidden_layers": n,
        "num_attention_heads": g.get_usize(&k("attention.head_count"))?,
        "num_key_value_heads": (0..n).find(|&i| sliding[i]).map_or(kv[0], |i| kv[i]),
        "head_dim": head_swa,
        "global_head_dim": head_full,
        "per_layer_config": per_layer,
        "attention_k_eq_v": k_eq_v,
        "attention_bias": g.has_tensor("blk.0.attn_q.bias"),
        "num_kv_shared_layers": shared,
        "layer_types": sliding
            .iter()
            .map(|&s| if s { SLIDING } else { FULL })
            .collect::<Vec<_>>(),
        "sliding_window": g.get_usize(&k("attention.sliding_window"))?,
        "rms_norm_eps": g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
        "final_logit_softcapping": g.opt_f64(&k("final_logit_softcapping"))?,
        "max_position_embeddings": g.opt_usize(&k("context_length"))?.unwrap_or(131_072),
        "tie_word_embeddings": !g.has_tensor("output.weight"),
        "hidden_size_per_layer_input": ple,
        "enable_moe_block": moe,
        "num_experts": expert_key("expert_count")?,
        "top_k_experts": expert_key("expert_used_count")?,
        "moe_intermediate_size": expert_key("expert_feed_forward_length")?,
        "vocab_size_per_layer_input": if ple > 0 {
            embed_rows("per_layer_token_embd.weight")?
        } else {
            0
        },
        "rope_parameters": {
            FULL: {
                "rope_type": "proportional",
                "rope_theta": g.opt_f64(&k("rope.freq_base"))?.unwrap_or(1e6),
                "partial_rotary_factor": (2 * rotating) as f64 / head_full as f64,
            },
            SLIDING: {
                "rope_type": "default",
                "rope_theta": g.opt_f64(&k("rope.freq_base_swa"))?.unwrap_or(1e4),
                "partial_rotary_factor": rot_swa as f64 / head_swa as f64,
            },
        },
    }))
}

/// Keys or values `[batch, kv_heads, seq, head_dim]` as carry channels `[batch, seq, kv_heads ·
/// head_dim]`.
fn pack_heads(t: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = t.dims4()?;
    Ok(t.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))?)
}

/// The inverse of [`pack_heads`] for `head_dim` `d`.
fn unpack_heads(t: &Tensor, d: usize) -> Result<Tensor> {
    let (b, s, w) = t.dims3()?;
    Ok(t.contiguous()?
        .reshape((b, s, w / d, d))?
        .transpose(1, 2)?
        .contiguous()?)
}

impl Gemma4 {
    /// Width of the training carry: the hidden size, the per-layer inputs of every layer
    /// (`layers · P`) and the keys and values of [`Self::kv_sources`].
    fn carry_width(&self) -> usize {
        self.info.hidden_size
            + self
                .per_layer
                .as_ref()
                .map_or(0, |p| p.width * self.layers.len())
            + self.kv_sources.iter().map(|&(_, w)| 2 * w).sum::<usize>()
    }

    /// The training carry `[batch, seq, width]` of hidden states `x: [batch, seq, hidden]`,
    /// per-layer inputs `[batch, seq, layers, P]` and the keys and values `kv(j)` of each
    /// source layer (zeros for one not run yet).
    fn pack_carry(
        &self,
        x: Tensor,
        per_layer: Option<Tensor>,
        kv: &dyn Fn(usize) -> Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let mut parts = vec![x];
        if let Some(p) = per_layer {
            let (b, s, l, w) = p.dims4()?;
            parts.push(p.reshape((b, s, l * w))?);
        }
        for &(j, w) in &self.kv_sources {
            match kv(j) {
                Some((k, v)) => parts.extend([pack_heads(&k)?, pack_heads(&v)?]),
                None => {
                    let z = Tensor::zeros((b, s, w), candle_core::DType::F32, &self.device)?;
                    parts.extend([z.clone(), z]);
                }
            }
        }
        Ok(Tensor::cat(&parts, 2)?)
    }
}

/// Fine-tuning through a training carry. A Gemma 4 block reads more than the previous block's
/// output: the per-layer inputs (made from the token ids and the embedding) and, on KV-shared
/// layers, the keys and values of an earlier layer. So the tensor passed between blocks is
/// `[batch, seq, hidden + layers · P + Σ 2 · kv_heads · head_dim]`: the hidden states, then
/// the per-layer inputs, then the keys and values of each layer that later layers share
/// ([`Gemma4::kv_sources`]), written by that layer when it runs. Blocks run one range at a time
/// give the same result as all at once, and gradients reach a shared layer's `k_proj` /
/// `v_proj` adapters through the carry (gradient checkpointing included).
impl Trainable for Gemma4 {
    /// Per block under `model.layers.{i}` (mlx-lm's `gemma4_text` module paths; under
    /// `language_model.` for the multimodal `gemma4` config): `self_attn.{q,k,v,o}_proj` (those
    /// the layer has: no `k_proj`/`v_proj` on KV-shared layers, no `v_proj` where keys are the
    /// values), `mlp.{gate,up,down}_proj`, `per_layer_input_gate` and `per_layer_projection`;
    /// then `lm_head`. Not the mixture of experts (`router.proj`, `experts.switch_glu`).
    fn linears_mut(&mut self) -> Vec<LinearSlot<'_>> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let mut own: Vec<(&'static str, &mut Linear)> = layer
                .self_attn
                .linears_mut()
                .into_iter()
                .map(|(k, l, _)| (k, l))
                .collect();
            own.extend(layer.ffn.linears_mut());
            if let Some(b) = &mut layer.per_layer {
                own.push(("per_layer_input_gate", &mut b.gate));
                own.push(("per_layer_projection", &mut b.projection));
            }
            for (key, linear) in own {
                out.push(LinearSlot::new(i, key, linear));
            }
        }
        out.push(LinearSlot::output(&mut self.lm_head));
        crate::models::wrap_slots(out, self.wrapper)
    }

    fn hidden_states(&self, input_ids: &Tensor, upto: usize) -> Result<Tensor> {
        let upto = upto.min(self.layers.len());
        let mut cache = self.new_cache();
        let (x, per_layer, kvs) = self.run(input_ids, &mut cache, upto)?;
        self.pack_carry(x, per_layer, &|j| kvs[j].clone())
    }

    fn forward_blocks(
        &self,
        hidden: &Tensor,
        range: std::ops::Range<usize>,
        train: bool,
    ) -> Result<Tensor> {
        let mode = Mode::Training { dropout: train };
        let (b, s, width) = hidden.dims3()?;
        if width != self.carry_width() {
            return Err(Error::InvalidArgument(format!(
                "gemma4 training carry of width {width}, the model's is {} (hidden states, \
                 per-layer inputs, shared keys and values: Gemma4::hidden_states)",
                self.carry_width()
            )));
        }
        let h = self.info.hidden_size;
        let mut x = hidden.narrow(2, 0, h)?;
        let mut off = h;
        let (ple, inputs) = match &self.per_layer {
            Some(p) => {
                let lw = p.width * self.layers.len();
                let t = hidden.narrow(2, off, lw)?;
                off += lw;
                let inputs = t.reshape((b, s, self.layers.len(), p.width))?;
                (Some(t), Some(inputs))
            }
            None => (None, None),
        };
        let mut kv = Vec::with_capacity(self.kv_sources.len());
        for &(_, w) in &self.kv_sources {
            kv.push((hidden.narrow(2, off, w)?, hidden.narrow(2, off + w, w)?));
            off += 2 * w;
        }
        let passes = self
            .ropes
            .iter()
            .map(|r| AttentionPass::new(r, 0, s))
            .collect::<Result<Vec<_>>>()?;
        let source = |j: usize| self.kv_sources.iter().position(|&(s, _)| s == j);
        for i in range.start.min(self.layers.len())..range.end.min(self.layers.len()) {
            let layer = &self.layers[i];
            let shared = match layer.kv {
                KvSlot::Shared(j) => {
                    let si = source(j).ok_or_else(|| {
                        Error::Model(format!(
                            "layer {i} shares the keys of layer {j}, not a source"
                        ))
                    })?;
                    let d = self.layers[j].self_attn.head_dim;
                    Some((unpack_heads(&kv[si].0, d)?, unpack_heads(&kv[si].1, d)?))
                }
                KvSlot::Cache(_) => None,
            };
            let hn = layer.input_layernorm.forward_mode(&x, mode)?;
            let (a, (k, v)) =
                layer
                    .self_attn
                    .forward_train_kv(&hn, &passes[layer.rope], shared, mode)?;
            if let Some(si) = source(i) {
                kv[si] = (pack_heads(&k)?, pack_heads(&v)?);
            }
            x = residual(
                &layer.post_attention_layernorm.forward_mode(&a, mode)?,
                &x,
                mode,
            )?;
            x = layer.finish(x, i, inputs.as_ref(), mode)?;
        }
        let mut parts = vec![x];
        parts.extend(ple);
        for (k, v) in kv {
            parts.extend([k, v]);
        }
        Ok(Tensor::cat(&parts, 2)?)
    }

    fn forward_head(
        &self,
        hidden: &Tensor,
        train: bool,
        select: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mode = Mode::Training { dropout: train };
        let x = hidden.narrow(2, 0, self.info.hidden_size)?.contiguous()?;
        let x = crate::models::select_positions(&x, select)?;
        let mut out = self
            .lm_head
            .forward_mode(&self.norm.forward_mode(&x, mode)?, mode)?;
        if let Some(c) = self.final_softcap {
            out = softcap(&out, c)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> Gemma4Config {
        let mut v = serde_json::json!({
            "vocab_size": 320, "hidden_size": 64, "intermediate_size": 32,
            "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                            "sliding_attention", "sliding_attention"],
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn plan_resolves_global_heads_and_kv_sharing() {
        let c = config(serde_json::json!({
            "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": true,
            "num_kv_shared_layers": 2, "use_double_wide_mlp": true,
        }));
        let p = c.plan().unwrap();
        // The last layer is forced to full attention.
        let sliding: Vec<bool> = p.iter().map(|l| l.sliding).collect();
        assert_eq!(sliding, [true, true, false, true, false]);
        assert_eq!(
            (p[2].heads.head_dim, p[2].heads.n_kv_heads, p[2].k_eq_v),
            (32, 1, true)
        );
        assert_eq!(
            (p[0].heads.head_dim, p[0].heads.n_kv_heads, p[0].k_eq_v),
            (16, 2, false)
        );
        let shares: Vec<Option<usize>> = p.iter().map(|l| l.shares).collect();
        assert_eq!(shares, [None, None, None, Some(1), Some(2)]);
        assert_eq!(p[3].intermediate, 64);
        assert_eq!(p[1].intermediate, 32);
        // transformers 5's `per_layer_config` wins over the global fields.
        let c = config(serde_json::json!({
            "global_head_dim": 32, "per_layer_config": {"4": {"head_dim": 8}},
        }));
        let p = c.plan().unwrap();
        assert_eq!((p[2].heads.head_dim, p[4].heads.head_dim), (16, 8));
    }

    #[test]
    fn unsupported_fields_are_named() {
        // The MoE block needs its sizes; the top-k must fit the experts.
        let e = config(serde_json::json!({"enable_moe_block": true}))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_experts") && e.contains("enable_moe_block"),
            "{e}"
        );
        let moe = |k: usize| {
            config(
                serde_json::json!({"enable_moe_block": true, "num_experts": 4,
                "top_k_experts": k, "moe_intermediate_size": 8}),
            )
            .validate()
        };
        assert!(moe(2).is_ok());
        let e = moe(5).unwrap_err().to_string();
        assert!(e.contains("top_k_experts"), "{e}");
        let bi = |m: &str| config(serde_json::json!({"use_bidirectional_attention": m})).validate();
        assert!(bi("vision").is_ok());
        let e = bi("all").unwrap_err().to_string();
        assert!(e.contains("use_bidirectional_attention"), "{e}");
        let e = config(serde_json::json!({"num_kv_shared_layers": 5}))
            .plan()
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_kv_shared_layers"), "{e}");
        let e = config(serde_json::json!({"num_kv_shared_layers": 4}))
            .plan()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no earlier layer of its type"), "{e}");
    }
}
