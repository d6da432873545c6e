//! Qwen3.5 (`qwen3_5`, and its mixture-of-experts form `qwen3_5_moe`): pre-norm blocks whose
//! token mixer is either Gated DeltaNet linear attention ([`GatedDeltaNet`], `linear_attn`) or
//! gated full attention (`self_attn`), as in Qwen3-Next. Which layers attend fully comes from
//! `layer_types`, else every `full_attention_interval`-th layer. Full attention has per-head
//! q/k RMSNorm, RoPE on the first `partial_rotary_factor · head_dim` dimensions of each head
//! (the multimodal RoPE sections coincide for text positions) and an output gate in `q_proj`
//! ([`Attention::output_gate`]). Every RMSNorm outside the DeltaNet scales by `1 + w`
//! (zero-centred, `Qwen3_5RMSNorm`); the DeltaNet's output norm scales by `w`. The
//! feed-forward is a SwiGLU MLP, or (`num_experts > 0`) a softmax top-k router over SwiGLU
//! experts, renormalized, plus a shared expert scaled by `sigmoid(shared_expert_gate(x))`.
//!
//! The cache of a linear-attention layer is an [`ArraysCache`] of two arrays (the convolution
//! and recurrent states, mlx-lm's `ArraysCache(size=2)`), which chat sessions and prompt caches
//! carry as they carry the other layers' keys and values. The blocks run in the shared hybrid
//! stack ([`HybridLm`]).
//!
//! Checkpoints: the text-only `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` folders
//! (`model_type` `qwen3_5_text` / `qwen3_5_moe_text`, weights under `model.`), and the
//! multimodal `Qwen3_5ForConditionalGeneration` form (`model_type` `qwen3_5` / `qwen3_5_moe`,
//! the text config under `text_config`, weights under `model.language_model.` or, as mlx-lm
//! writes them, `language_model.model.`), whose vision tower (`model.visual.*`) and
//! multi-token-prediction head (`mtp.*`) are not loaded: only text is run. mlx-lm's `sanitize`
//! stores the convolution weight as `[conv_dim, kernel, 1]` (Hugging Face: `[conv_dim, 1,
//! kernel]`) and adds the 1 to the zero-centred norms; that layout is recognised by the
//! convolution weight's shape. MoE experts load from mlx-lm's stacked `switch_mlp`, the Hub's
//! fused `experts.gate_up_proj` or transformers' per-expert names ([`build::experts`]).
//!
//! GGUF files of llama.cpp's `qwen35` / `qwen35moe` load through [`GGUF_NAMES`] and
//! [`config_from_gguf`]. llama.cpp's converter (`conversion/qwen.py`, `Qwen3NextModel` and
//! `_LinearAttentionVReorderBase`) stores the convolution weight squeezed to `[conv_dim,
//! kernel]`, which tells this layout apart, `-exp(A_log)` in place of `A_log` (`ssm_a`), the
//! zero-centred norms with their 1 added, and the DeltaNet's value heads tiled instead of
//! grouped by key head ([`ValueHeadOrder::Tiled`]); the layer takes these forms as they are.
//!
//! Reference: Hugging Face `models/qwen3_5/modeling_qwen3_5.py`, `configuration_qwen3_5.py`,
//! `models/qwen3_5_moe/modeling_qwen3_5_moe.py` (transformers 5.24); mlx-lm `models/qwen3_5.py`,
//! `qwen3_5_moe.py`, `qwen3_next.py` (0.32.2); llama.cpp as vendored by llama-cpp-python 0.3.36
//! (`conversion/qwen.py`, `src/models/qwen35.cpp`, `qwen35moe.cpp`).

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::gguf::names::{self, NameTable};
use crate::gguf::GgufFile;
use crate::kv_cache::ArraysCache;
use crate::models::build::{self, ConvLayout, ExpertShape};
use crate::models::decoder::Mlp;
use crate::models::hybrid::{HybridBlock, HybridLm, Mixer, StateMixer};
use crate::models::{CausalLM, ModelInfo};
use crate::nn::{
    Attention, CausalConv1d, DeltaHeads, GatedDeltaNet, Linear, QkvProj, RmsNorm, RopeScaling,
    RotaryEmbedding, Router, Scoring, SharedExpert, ValueHeadOrder,
};
use crate::weights::Weights;
use crate::{Error, Result};

/// The text model's config.json fields (`Qwen3_5TextConfig` / `Qwen3_5MoeTextConfig` names;
/// defaults as transformers' where the Hub configs may omit them).
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen35Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Width of the dense MLP (required when `num_experts` is 0).
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads of the full-attention layers.
    pub num_attention_heads: usize,
    /// Key/value heads of the full-attention layers.
    pub num_key_value_heads: usize,
    /// Head width of the full-attention layers; defaults to `hidden_size /
    /// num_attention_heads` (mlx-lm).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Longest context.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Output layer shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the full-attention projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Taps of the DeltaNet convolution.
    #[serde(default = "default_kernel")]
    pub linear_conv_kernel_dim: usize,
    /// DeltaNet query/key head width.
    #[serde(default = "default_128")]
    pub linear_key_head_dim: usize,
    /// DeltaNet value head width.
    #[serde(default = "default_128")]
    pub linear_value_head_dim: usize,
    /// DeltaNet query/key heads.
    #[serde(default = "default_16")]
    pub linear_num_key_heads: usize,
    /// DeltaNet value heads (a multiple of the key heads).
    #[serde(default = "default_32")]
    pub linear_num_value_heads: usize,
    /// Per layer: `linear_attention` or `full_attention`.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Every this-many-th layer is full attention when `layer_types` is absent.
    #[serde(default = "default_interval")]
    pub full_attention_interval: usize,
    /// RoPE base (the loader copies `rope_parameters.rope_theta` here); mlx-lm's default.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// transformers 5's RoPE parameters, read for `partial_rotary_factor`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// RoPE scaling other than the default, parsed by [`RopeScaling::from_config`].
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Share of each head that RoPE rotates (older configs; else `rope_parameters`', else
    /// 0.25).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Routed experts per MoE layer (0: a dense model).
    #[serde(default)]
    pub num_experts: usize,
    /// Experts per token.
    #[serde(default)]
    pub num_experts_per_tok: usize,
    /// Inner width of each routed expert.
    #[serde(default)]
    pub moe_intermediate_size: usize,
    /// Inner width of the shared expert.
    #[serde(default)]
    pub shared_expert_intermediate_size: usize,
    /// Renormalize the top-k weights (transformers' router always does; mlx-lm reads this,
    /// default true).
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
}

fn default_ctx() -> usize {
    32_768
}
fn default_eps() -> f64 {
    1e-6
}
fn default_kernel() -> usize {
    4
}
fn default_128() -> usize {
    128
}
fn default_16() -> usize {
    16
}
fn default_32() -> usize {
    32
}
fn default_interval() -> usize {
    4
}
fn default_theta() -> f64 {
    100_000.0
}
fn default_true() -> bool {
    true
}

fn bad(field: &str, msg: impl std::fmt::Display) -> Error {
    Error::Model(format!("config field `{field}`: {msg}"))
}

impl Qwen35Config {
    /// Whether each layer is full attention (else Gated DeltaNet): `layer_types`, else layer
    /// `i` when `(i + 1) % full_attention_interval == 0` (transformers' `Qwen3_5TextConfig`).
    ///
    /// Errors: [`Error::Model`] naming the field for a list of the wrong length, an unknown
    /// layer type or an interval of 0.
    pub fn full_attention_layers(&self) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if let Some(types) = &self.layer_types {
            if types.len() != n {
                return Err(bad(
                    "layer_types",
                    format!("{} entries for {n} layers", types.len()),
                ));
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(true),
                    "linear_attention" => Ok(false),
                    other => Err(bad(
                        "layer_types",
                        format!("`{other}` is neither `linear_attention` nor `full_attention`"),
                    )),
                })
                .collect();
        }
        let k = self.full_attention_interval;
        if k == 0 {
            return Err(bad("full_attention_interval", "must be positive"));
        }
        Ok((0..n).map(|i| (i + 1).is_multiple_of(k)).collect())
    }

    /// RoPE's share of each head: `partial_rotary_factor`, else
    /// `rope_parameters.partial_rotary_factor`, else 0.25.
    fn rotary_factor(&self) -> f64 {
        self.partial_rotary_factor
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|r| r.get("partial_rotary_factor"))
                    .and_then(|f| f.as_f64())
            })
            .unwrap_or(0.25)
    }

    /// The DeltaNet heads, their value heads in `order`.
    fn delta_heads(&self, order: ValueHeadOrder) -> Result<DeltaHeads> {
        let h = DeltaHeads {
            n_k: self.linear_num_key_heads,
            n_v: self.linear_num_value_heads,
            d_k: self.linear_key_head_dim,
            d_v: self.linear_value_head_dim,
            order,
        };
        if h.n_k == 0 || h.d_k == 0 || h.d_v == 0 || !h.n_v.is_multiple_of(h.n_k) || h.n_v == 0 {
            return Err(bad(
                "linear_num_value_heads",
                format!(
                    "{} value heads, {} key heads of widths {} / {}: the value heads must be a \
                     positive multiple of the key heads, the widths positive",
                    h.n_v, h.n_k, h.d_k, h.d_v
                ),
            ));
        }
        Ok(h)
    }
}

impl StateMixer for GatedDeltaNet {
    const KIND: &'static str = "linear-attention";
    const ARRAYS: usize = 2;

    fn forward_cached(&self, x: &Tensor, state: &mut ArraysCache) -> Result<Tensor> {
        self.forward(x, state)
    }

    fn forward_train(&self, x: &Tensor, dropout: bool) -> Result<Tensor> {
        self.forward_diff(x, dropout)
    }

    /// `linear_attn.{in_proj_qkv,in_proj_z,in_proj_b,in_proj_a,out_proj}`, none in a GGUF
    /// whose value heads are stored tiled.
    fn adapter_linears(&mut self) -> Vec<(&'static str, &mut Linear)> {
        // llama.cpp's tiled value-head order (a GGUF with 2 or more key heads, fewer than
        // value heads; with one key head it is the grouped order) reorders these layers' rows
        // and columns; adapters, in Hugging Face order, would not fit them: they stay without
        // (an adapter naming them is refused).
        let h = &self.heads;
        if h.order == ValueHeadOrder::Tiled && h.n_k > 1 && h.n_k != h.n_v {
            return Vec::new();
        }
        self.linears_mut()
    }
}

/// A Qwen3.5 causal language model (dense or MoE): blocks `h = x +
/// mixer(input_layernorm(x)); h + mlp(post_attention_layernorm(h))` whose mixer is gated full
/// attention (HF `Qwen3_5Attention`) or a [`GatedDeltaNet`] (HF `Qwen3_5GatedDeltaNet`).
/// Adapters: per block under `model.layers.{i}` (mlx-lm's `qwen3_5_text` module paths; the
/// multimodal `qwen3_5` wrapper's are under `language_model.`) full-attention blocks'
/// `self_attn.{q,k,v,o}_proj` (q with its output gate rows), linear-attention blocks'
/// `linear_attn.{in_proj_qkv,in_proj_z,in_proj_b,in_proj_a,out_proj}` (not in a GGUF whose
/// value heads are stored tiled), dense MLPs' `mlp.{gate,up,down}_proj` (none for a mixture of
/// experts); then `lm_head`.
pub type Qwen35 = HybridLm<GatedDeltaNet>;

/// A per-value-head vector `{a}.{name}` `[n_v]` on the host.
fn head_values(w: &dyn Weights, a: &str, name: &str, n_v: usize) -> Result<Vec<f32>> {
    let t = w.tensor(&format!("{a}.{name}"), &[n_v])?;
    Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// The Gated DeltaNet of block prefix `p` (`{p}.linear_attn.*`), and the layout of its
/// convolution weight, which tells whose checkpoint this is (see the module docs).
fn delta_net(w: &dyn Weights, p: &str, cfg: &Qwen35Config) -> Result<(GatedDeltaNet, ConvLayout)> {
    let a = format!("{p}.linear_attn");
    let h = cfg.hidden_size;
    let kernel = cfg.linear_conv_kernel_dim;
    if kernel < 2 {
        return Err(bad(
            "linear_conv_kernel_dim",
            format!("{kernel} must be at least 2"),
        ));
    }
    let conv_dim = cfg.delta_heads(ValueHeadOrder::Grouped)?.conv_dim();
    let (weight, layout) = build::conv_weight(w, &format!("{a}.conv1d.weight"), conv_dim, kernel)?;
    let heads = cfg.delta_heads(match layout {
        ConvLayout::Gguf => ValueHeadOrder::Tiled,
        ConvLayout::HuggingFace | ConvLayout::Mlx => ValueHeadOrder::Grouped,
    })?;
    let vd = heads.n_v * heads.d_v;
    // llama.cpp's converter stores `-exp(A_log)` (`ssm_a`).
    let a_log = head_values(w, &a, "A_log", heads.n_v)?;
    let neg_a = match layout {
        ConvLayout::Gguf => a_log,
        ConvLayout::HuggingFace | ConvLayout::Mlx => a_log.into_iter().map(|l| -l.exp()).collect(),
    };
    let lin =
        |name: &str, out: usize, inp: usize| w.linear(&format!("{a}.{name}"), out, inp, false);
    let net = GatedDeltaNet {
        in_proj_qkv: lin("in_proj_qkv", heads.conv_dim(), h)?,
        in_proj_z: lin("in_proj_z", vd, h)?,
        in_proj_b: lin("in_proj_b", heads.n_v, h)?,
        in_proj_a: lin("in_proj_a", heads.n_v, h)?,
        conv: CausalConv1d::new(weight, None)?,
        neg_a,
        dt_bias: head_values(w, &a, "dt_bias", heads.n_v)?,
        norm: RmsNorm::new(
            w.tensor(&format!("{a}.norm.weight"), &[heads.d_v])?,
            cfg.rms_norm_eps,
            false,
        )?,
        out_proj: lin("out_proj", h, vd)?,
        heads,
    };
    Ok((net, layout))
}

/// The feed-forward of block prefix `p`: a SwiGLU MLP, or the routed experts with the shared
/// expert and its gate (HF `Qwen3_5MoeSparseMoeBlock`).
fn mlp(w: &dyn Weights, p: &str, cfg: &Qwen35Config) -> Result<Mlp> {
    let h = cfg.hidden_size;
    let numerics = w.layout().numerics;
    if cfg.num_experts == 0 {
        let inter = cfg
            .intermediate_size
            .ok_or_else(|| bad("intermediate_size", "missing (and `num_experts` is 0)"))?;
        return Ok(Mlp::Dense(build::swiglu(
            w,
            &format!("{p}.mlp"),
            inter,
            h,
            numerics,
        )?));
    }
    let k = cfg.num_experts_per_tok;
    if k == 0 || k > cfg.num_experts {
        return Err(bad(
            "num_experts_per_tok",
            format!("{k} must be between 1 and num_experts {}", cfg.num_experts),
        ));
    }
    let shape = ExpertShape {
        n_experts: cfg.num_experts,
        intermediate: cfg.moe_intermediate_size,
        hidden: h,
    };
    let mut moe = build::moe(w, p, shape, |gate| Router {
        gate,
        scoring: Scoring::Softmax,
        top_k: k,
        norm_topk_prob: cfg.norm_topk_prob,
        selection_bias: None,
        expert_scale: None,
        scale: 1.0,
        groups: None,
    })?;
    if cfg.shared_expert_intermediate_size > 0 {
        let s = cfg.shared_expert_intermediate_size;
        moe.shared = Some(SharedExpert {
            mlp: build::swiglu(w, &format!("{p}.mlp.shared_expert"), s, h, numerics)?,
            gate: Some(w.linear(&format!("{p}.mlp.shared_expert_gate"), 1, h, false)?),
        });
    }
    Ok(Mlp::Moe(Box::new(moe)))
}

/// GGUF tensor names of llama.cpp's `qwen35` and `qwen35moe` (`llama-arch.cpp`,
/// `tensor_mapping.py`). `ssm_a` holds `-exp(A_log)` and has no suffix; the routed experts
/// `ffn_{gate,up,down}_exps` `[n_experts, out, in]` are named as mlx-lm's stacked
/// `mlp.switch_mlp.*` (the converter stacks the per-expert tensors).
pub static GGUF_NAMES: NameTable = NameTable {
    name: "qwen35",
    global: names::GLOBAL,
    block: &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("linear_attn.in_proj_qkv", "attn_qkv"),
        ("linear_attn.in_proj_z", "attn_gate"),
        ("linear_attn.in_proj_a", "ssm_alpha"),
        ("linear_attn.in_proj_b", "ssm_beta"),
        ("linear_attn.conv1d", "ssm_conv1d"),
        ("linear_attn.dt_bias", "ssm_dt.bias"),
        ("linear_attn.A_log", "ssm_a"),
        ("linear_attn.norm", "ssm_norm"),
        ("linear_attn.out_proj", "ssm_out"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("mlp.gate", "ffn_gate_inp"),
        ("mlp.switch_mlp.gate_proj", "ffn_gate_exps"),
        ("mlp.switch_mlp.up_proj", "ffn_up_exps"),
        ("mlp.switch_mlp.down_proj", "ffn_down_exps"),
        ("mlp.shared_expert.gate_proj", "ffn_gate_shexp"),
        ("mlp.shared_expert.up_proj", "ffn_up_shexp"),
        ("mlp.shared_expert.down_proj", "ffn_down_shexp"),
        ("mlp.shared_expert_gate", "ffn_gate_inp_shexp"),
    ],
    gguf_only: &[],
};

/// An HF-style config (`Qwen3_5TextConfig` / `Qwen3_5MoeTextConfig` names) from the metadata of
/// a GGUF `qwen35` / `qwen35moe` file (llama.cpp's `Qwen3NextModel.set_gguf_parameters`): the
/// common keys ([`super::gguf_config::without_ffn`]); the DeltaNet's from `ssm.conv_kernel`,
/// `ssm.state_size` (key head width), `ssm.group_count` (key heads), `ssm.time_step_rank`
/// (value heads) and `ssm.inner_size` (value heads · value head width); the layer kinds from
/// `attention.recurrent_layers`, else `full_attention_interval`; RoPE's share of each head from
/// `rope.dimension_count`; the experts from `expert_count`, `expert_used_count`,
/// `expert_feed_forward_length` and `expert_shared_feed_forward_length`, their weights
/// renormalized as llama.cpp's graph does. `rope.dimension_sections` (multimodal RoPE) is not
/// read: for text every section has the same position.
///
/// Errors: a missing or mistyped key, or inconsistent head counts, naming the file.
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let arch = g.architecture()?;
    let k = |s: &str| format!("{arch}.{s}");
    let bad = |msg: String| Error::Model(format!("{}: {msg}", g.path().display()));
    let mut c = super::gguf_config::without_ffn(g)?;
    let n = g.get_usize(&k("block_count"))?;
    let head_dim = g.get_usize(&k("attention.key_length"))?;
    let rotary = g.get_usize(&k("rope.dimension_count"))?;
    let v_heads = g.get_usize(&k("ssm.time_step_rank"))?;
    let inner = g.get_usize(&k("ssm.inner_size"))?;
    if v_heads == 0 || !inner.is_multiple_of(v_heads) || head_dim == 0 {
        return Err(bad(format!(
            "`{arch}.ssm.inner_size` {inner} is not a multiple of `{arch}.ssm.time_step_rank` \
             {v_heads}, or `{arch}.attention.key_length` is 0"
        )));
    }
    let o = c
        .as_object_mut()
        .ok_or_else(|| bad("the GGUF config is not an object".into()))?;
    let mut set = |key: &str, v: serde_json::Value| o.insert(key.into(), v);
    set(
        "intermediate_size",
        g.opt_usize(&k("feed_forward_length"))?.into(),
    );
    set(
        "partial_rotary_factor",
        (rotary as f64 / head_dim as f64).into(),
    );
    set(
        "linear_conv_kernel_dim",
        g.get_usize(&k("ssm.conv_kernel"))?.into(),
    );
    set(
        "linear_key_head_dim",
        g.get_usize(&k("ssm.state_size"))?.into(),
    );
    set(
        "linear_num_key_heads",
        g.get_usize(&k("ssm.group_count"))?.into(),
    );
    set("linear_num_value_heads", v_heads.into());
    set("linear_value_head_dim", (inner / v_heads).into());
    if g.has(&k("attention.recurrent_layers")) {
        let recurrent = g.get_bool_array(&k("attention.recurrent_layers"))?;
        if recurrent.len() < n {
            return Err(bad(format!(
                "`{arch}.attention.recurrent_layers` has {} entries for {n} layers",
                recurrent.len()
            )));
        }
        let types: Vec<&str> = recurrent[..n]
            .iter()
            .map(|&r| {
                if r {
                    "linear_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        set("layer_types", types.into());
    } else if let Some(i) = g.opt_usize(&k("full_attention_interval"))? {
        set("full_attention_interval", i.into());
    }
    if g.has(&k("expert_count")) {
        let moe = [
            ("num_experts", "expert_count"),
            ("num_experts_per_tok", "expert_used_count"),
            ("moe_intermediate_size", "expert_feed_forward_length"),
        ];
        for (name, key) in moe {
            set(name, g.get_usize(&k(key))?.into());
        }
        let shared = match g.opt_usize(&k("expert_shared_feed_forward_length"))? {
            Some(s) => s,
            // llama.cpp's default (`qwen35moe.cpp`): the dense width.
            None => g.get_usize(&k("feed_forward_length"))?,
        };
        set("shared_expert_intermediate_size", shared.into());
        set("norm_topk_prob", true.into());
    }
    Ok(c)
}

/// Builds a Qwen3.5 model (dense or MoE) from an HF-style config (the text model's, or a
/// multimodal one with `text_config`) and weights (see the module docs for the layouts).
///
/// Errors: [`Error::Model`] naming a missing or invalid config field; [`Error::Tensor`] naming
/// a missing or misshapen weight.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    let text = config.get("text_config").unwrap_or(config);
    let cfg: Qwen35Config = serde_json::from_value(text.clone()).map_err(|e| {
        let at = if config.get("text_config").is_some() {
            "config.json `text_config`"
        } else {
            "config.json"
        };
        Error::Model(format!("{at}: {e}"))
    })?;
    let mut m = if w.contains("model.embed_tokens.weight") {
        Qwen35::new(&cfg, w)?
    } else {
        Qwen35::new(&cfg, &build::language_model(w)?)?
    };
    // mlx-lm 0.32.2 reads only the wrapped form (`qwen3_5` with `text_config`), whose
    // adapters name the text model's modules under `language_model.`.
    if config.get("text_config").is_some() {
        m.wrapper = Some("language_model");
    }
    Ok(Box::new(m))
}

impl Qwen35 {
    /// Loads the weights named as in Hugging Face `Qwen3_5ForCausalLM` /
    /// `Qwen3_5MoeForCausalLM` (`model.layers.{i}...`).
    ///
    /// Errors: as [`build`].
    pub fn new(cfg: &Qwen35Config, w: &dyn Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let nh = cfg.num_attention_heads;
        let heads = build::Heads {
            n_heads: nh,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim.unwrap_or(h / nh.max(1)),
        }
        .checked()?;
        let (nkv, hd) = (heads.n_kv_heads, heads.head_dim);
        let kinds = cfg.full_attention_layers()?;
        let eps = cfg.rms_norm_eps;
        let bias = cfg.attention_bias;
        // The zero-centred norms' 1 is added at load unless mlx-lm's sanitize or llama.cpp's
        // converter stored it, which the first DeltaNet's convolution layout tells (a model
        // without one: as the weight source says).
        let mut layout = None;
        let mut mixers = Vec::with_capacity(kinds.len());
        for (i, &full) in kinds.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mixer = if full {
                let a = format!("{p}.self_attn");
                let lin =
                    |n: &str, out: usize, inp: usize| w.linear(&format!("{a}.{n}"), out, inp, bias);
                let qkv = QkvProj::Separate {
                    q: lin("q_proj", 2 * nh * hd, h)?,
                    k: lin("k_proj", nkv * hd, h)?,
                    v: lin("v_proj", nkv * hd, h)?,
                };
                Mixer::Attention(Attention {
                    output_gate: true,
                    ..Attention::plain(qkv, lin("o_proj", h, nh * hd)?, nh, nkv, hd)
                })
            } else {
                let (net, l) = delta_net(w, &p, cfg)?;
                layout.get_or_insert(l);
                Mixer::State(net)
            };
            mixers.push(mixer);
        }
        let unit_offset = match layout {
            Some(l) => l == ConvLayout::HuggingFace,
            None => !w.layout().norm_offset_included,
        };
        let norm =
            |name: String, width: usize| RmsNorm::new(w.tensor(&name, &[width])?, eps, unit_offset);
        let mut layers = Vec::with_capacity(mixers.len());
        for (i, mut mixer) in mixers.into_iter().enumerate() {
            let p = format!("model.layers.{i}");
            if let Mixer::Attention(a) = &mut mixer {
                a.q_norm = Some(norm(format!("{p}.self_attn.q_norm.weight"), hd)?);
                a.k_norm = Some(norm(format!("{p}.self_attn.k_norm.weight"), hd)?);
            }
            layers.push(HybridBlock {
                mixer_norm: norm(format!("{p}.input_layernorm.weight"), h)?,
                mixer,
                mlp_norm: norm(format!("{p}.post_attention_layernorm.weight"), h)?,
                mlp: mlp(w, &p, cfg)?,
            });
        }
        let embed_tokens = w.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let lm_head = build::lm_head(w, &embed_tokens, cfg.tie_word_embeddings, cfg.vocab_size, h)?;
        let factor = cfg.rotary_factor();
        let rotary = build::rotary_dim(hd, Some(factor))?;
        let scaling = RopeScaling::from_config(cfg.rope_scaling.as_ref())?;
        // GGUF weights follow llama.cpp's angles (its multimodal RoPE gives every section the
        // text position, so ggml's NEOX angles), others transformers'.
        let rope = if w.layout().numerics == crate::nn::Numerics::Ggml {
            RotaryEmbedding::new_ggml(rotary, cfg.rope_theta, &scaling, false, w.device())?
        } else {
            RotaryEmbedding::new(rotary, cfg.rope_theta, &scaling, false, w.device())?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: norm("model.norm.weight".into(), h)?,
            lm_head,
            rope,
            adapter_key: |key| key,
            wrapper: None,
            device: w.device().clone(),
            info: ModelInfo {
                architecture: if cfg.num_experts > 0 {
                    "qwen3_5_moe"
                } else {
                    "qwen3_5"
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: serde_json::Value) -> Qwen35Config {
        let mut base = serde_json::json!({
            "vocab_size": 8, "hidden_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64
        });
        for (k, x) in v.as_object().unwrap() {
            base[k] = x.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn layer_kinds_from_types_or_interval() {
        assert_eq!(
            cfg(serde_json::json!({})).full_attention_layers().unwrap(),
            [false, false, false, true]
        );
        let c = cfg(serde_json::json!({"full_attention_interval": 2}));
        assert_eq!(
            c.full_attention_layers().unwrap(),
            [false, true, false, true]
        );
        let c = cfg(serde_json::json!({"layer_types":
            ["full_attention", "linear_attention", "linear_attention", "full_attention"]}));
        assert_eq!(
            c.full_attention_layers().unwrap(),
            [true, false, false, true]
        );
        for (bad, field) in [
            (
                serde_json::json!({"layer_types": ["full_attention"]}),
                "layer_types",
            ),
            (
                serde_json::json!({"layer_types": ["mamba", "full_attention",
                    "full_attention", "full_attention"]}),
                "layer_types",
            ),
            (
                serde_json::json!({"full_attention_interval": 0}),
                "full_attention_interval",
            ),
        ] {
            let e = cfg(bad).full_attention_layers().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn rotary_factor_and_delta_heads_are_read_and_checked() {
        assert_eq!(cfg(serde_json::json!({})).rotary_factor(), 0.25);
        let c = cfg(serde_json::json!({"rope_parameters": {"partial_rotary_factor": 0.5}}));
        assert_eq!(c.rotary_factor(), 0.5);
        let c = cfg(serde_json::json!({"linear_num_key_heads": 3}));
        let e = c
            .delta_heads(ValueHeadOrder::Grouped)
            .unwrap_err()
            .to_string();
        assert!(e.contains("linear_num_value_heads"), "{e}");
        let h = cfg(serde_json::json!({}))
            .delta_heads(ValueHeadOrder::Grouped)
            .unwrap();
        assert_eq!(h.conv_dim(), 2 * 16 * 128 + 32 * 128);
    }
}
