//! DeepSeek-V3 (and Kimi K2, Moonlight: `model_type` `deepseek_v3`): multi-head latent
//! attention ([`crate::nn::Mla`]: queries through an optional low-rank bottleneck
//! `q_lora_rank`, keys and values expanded from a compressed latent, interleaved RoPE on a
//! `qk_rope_head_dim` part of each head, YaRN whose `mscale_all_dim` also scales the softmax),
//! and mixture-of-experts feed-forward blocks after `first_k_dense_replace` dense ones:
//! sigmoid scores with `e_score_correction_bias` for the choice, group-limited top-k
//! (`n_group`, `topk_group`), `norm_topk_prob`, `routed_scaling_factor`, plus
//! `n_shared_experts` shared experts on every token. Reference: Hugging Face
//! `models/deepseek_v3/modeling_deepseek_v3.py` / `configuration_deepseek_v3.py`, mlx-lm
//! `models/deepseek_v3.py` (whose `sanitize` splits `kv_b_proj` into `embed_q` /
//! `unembed_out`, joined back here at load).
//!
//! The KV cache holds the compressed form (one `[latent | rotary key]` head per position,
//! [`crate::nn::mla`]): for DeepSeek-V3 2 × 576 f32 values per position and layer (4.5 KiB,
//! 61 layers: 275 KiB per token) where the expanded per-head keys and values would take
//! 2 × 128 × 192 (192 KiB, 11.4 MiB per token).

use candle_core::Tensor;
use serde::Deserialize;

use crate::gguf::names::{self, NameTable};
use crate::gguf::GgufFile;
use crate::models::build::{self, ExpertShape};
use crate::models::decoder::{Decoder, Mlp, PreNormBlock};
use crate::models::llama::Llama;
use crate::models::{CausalLM, ModelInfo};
use crate::nn::{
    Absorbed, Attention, GroupLimit, Linear, Mla, MlaQuery, QkvProj, RmsNorm, RopeScaling,
    RotaryEmbedding, Router, Scoring, SharedExpert,
};
use crate::weights::Weights;
use crate::{Error, Result};

/// The epsilon of `q_a_layernorm` and `kv_a_layernorm` (transformers builds them with
/// `DeepseekV3RMSNorm`'s default, mlx-lm with `eps=1e-6`, whatever `rms_norm_eps` says).
const LATENT_NORM_EPS: f64 = 1e-6;

/// GGUF tensor names of llama.cpp's `deepseek2` (`llama-arch.cpp`, `tensor_mapping.py`).
/// llama.cpp's converter splits `kv_b_proj` into `attn_k_b` `[heads, kv_lora_rank,
/// qk_nope_head_dim]` (the key half, transposed per head) and `attn_v_b` `[heads, v_head_dim,
/// kv_lora_rank]`: mlx-lm's `embed_q` / `unembed_out`, which [`build`] joins back; older files
/// have `attn_kv_b`. Routed experts are stacked (`ffn_*_exps`, named as mlx-lm's
/// `switch_mlp`), the shared ones `ffn_*_shexp`, the selection bias `exp_probs_b.bias`.
pub static GGUF_NAMES: NameTable = NameTable {
    name: "deepseek2",
    global: names::GLOBAL,
    block: &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.q_a_proj", "attn_q_a"),
        ("self_attn.q_a_layernorm", "attn_q_a_norm"),
        ("self_attn.q_b_proj", "attn_q_b"),
        ("self_attn.kv_a_proj_with_mqa", "attn_kv_a_mqa"),
        ("self_attn.kv_a_layernorm", "attn_kv_a_norm"),
        ("self_attn.kv_b_proj", "attn_kv_b"),
        ("self_attn.embed_q", "attn_k_b"),
        ("self_attn.unembed_out", "attn_v_b"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("mlp.gate", "ffn_gate_inp"),
        ("mlp.gate.e_score_correction_bias", "exp_probs_b.bias"),
        ("mlp.switch_mlp.gate_proj", "ffn_gate_exps"),
        ("mlp.switch_mlp.up_proj", "ffn_up_exps"),
        ("mlp.switch_mlp.down_proj", "ffn_down_exps"),
        ("mlp.shared_experts.gate_proj", "ffn_gate_shexp"),
        ("mlp.shared_experts.up_proj", "ffn_up_shexp"),
        ("mlp.shared_experts.down_proj", "ffn_down_shexp"),
    ],
    gguf_only: &[],
};

/// llama.cpp's `expert_gating_func` values (`llama-hparams.h`): 1 softmax, 2 sigmoid.
const GATING_SIGMOID: usize = 2;

/// An HF-style DeepSeek-V3 config from the metadata of a GGUF `deepseek2` file (llama.cpp's
/// converter, `conversion/deepseek.py` `DeepseekV2Model`; the graph `src/models/deepseek2.cpp`):
///
/// - the common keys ([`super::gguf_config::common`]); `qk_rope_head_dim` from
///   `rope.dimension_count`, `qk_nope_head_dim` from `attention.key_length_mla` minus it,
///   `v_head_dim` from `attention.value_length_mla`, `kv_lora_rank` / `q_lora_rank` from
///   `attention.{kv,q}_lora_rank`;
/// - YaRN's `mscale_all_dim` is `rope.scaling.yarn_log_multiplier / 0.1` (the converter writes
///   `0.1 · mscale_all_dim`, which llama.cpp undoes), and `mscale` the same: llama.cpp's RoPE
///   attention factor is then 1 (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX); the softmax scale keeps
///   transformers' `mscale_all_dim` term;
/// - experts: `expert_count`, `expert_used_count`, `expert_shared_count`,
///   `expert_feed_forward_length`, `expert_group_count` / `expert_group_used_count`,
///   `expert_weights_scale` (`routed_scaling_factor`), `expert_weights_norm`
///   (`norm_topk_prob`), `leading_dense_block_count` (`first_k_dense_replace`);
///   `expert_gating_func` 2 is `sigmoid`, anything else (llama.cpp takes a missing key as
///   softmax) is passed on as `softmax`, which [`build`] refuses; `topk_method` is `noaux_tc`
///   when the first MoE layer has `exp_probs_b.bias`.
///
/// Errors: a missing or mistyped key, naming the file.
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let mut c = super::gguf_config::common(g)?;
    let k = |s: &str| format!("deepseek2.{s}");
    let rope = g.get_usize(&k("rope.dimension_count"))?;
    let key_mla = g.get_usize(&k("attention.key_length_mla"))?;
    let nope = key_mla.checked_sub(rope).filter(|&n| n > 0).ok_or_else(|| {
        Error::Model(format!(
            "{}: `deepseek2.attention.key_length_mla` {key_mla} is not above `deepseek2.rope.dimension_count` {rope}",
            g.path().display()
        ))
    })?;
    let dense = g.opt_usize(&k("leading_dense_block_count"))?.unwrap_or(0);
    let gating = g.opt_usize(&k("expert_gating_func"))?;
    let log_mul = g.opt_f64(&k("rope.scaling.yarn_log_multiplier"))?;
    let o = c
        .as_object_mut()
        .ok_or_else(|| Error::Model("deepseek2 GGUF config is not an object".into()))?;
    if let (Some(m), Some(rs)) = (
        log_mul,
        o.get_mut("rope_scaling").and_then(|r| r.as_object_mut()),
    ) {
        rs.insert("mscale_all_dim".into(), (m / 0.1).into());
        rs.insert("mscale".into(), (m / 0.1).into());
    }
    let fields = serde_json::json!({
        "model_type": "deepseek_v3",
        "moe_intermediate_size": g.get_usize(&k("expert_feed_forward_length"))?,
        "n_routed_experts": g.opt_usize(&k("expert_count"))?,
        "n_shared_experts": g.opt_usize(&k("expert_shared_count"))?,
        "num_experts_per_tok": g.opt_usize(&k("expert_used_count"))?,
        "n_group": g.opt_usize(&k("expert_group_count"))?,
        "topk_group": g.opt_usize(&k("expert_group_used_count"))?,
        "routed_scaling_factor": g.opt_f64(&k("expert_weights_scale"))?.unwrap_or(1.0),
        "norm_topk_prob": g.has(&k("expert_weights_norm")) && g.get_bool(&k("expert_weights_norm"))?,
        "scoring_func": if gating == Some(GATING_SIGMOID) { "sigmoid" } else { "softmax" },
        "topk_method": if g.has_tensor(&format!("blk.{dense}.exp_probs_b.bias")) {
            "noaux_tc"
        } else {
            "greedy"
        },
        "first_k_dense_replace": dense,
        "kv_lora_rank": g.get_usize(&k("attention.kv_lora_rank"))?,
        "q_lora_rank": g.opt_usize(&k("attention.q_lora_rank"))?,
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": nope,
        "v_head_dim": g.get_usize(&k("attention.value_length_mla"))?,
        "attention_bias": g.has_tensor("blk.0.attn_output.bias"),
        "rope_interleave": true,
    });
    if let Some(f) = fields.as_object() {
        o.extend(f.clone());
    }
    Ok(c)
}

/// config.json of a DeepSeek-V3 model (`DeepseekV3Config` field names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct DeepseekV3Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Inner width of the dense layers' MLP.
    pub intermediate_size: usize,
    /// Inner width of each routed expert (and, times `n_shared_experts`, of the shared MLP).
    pub moe_intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Attention heads (queries, keys and values alike).
    pub num_attention_heads: usize,
    /// Shared experts (one MLP `n_shared_experts` times as wide); none when absent.
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    /// Routed experts per MoE layer; no MoE layers when absent.
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    /// Multiplies the routing weights.
    #[serde(default = "one_f64")]
    pub routed_scaling_factor: f64,
    /// Width of the compressed key/value latent.
    pub kv_lora_rank: usize,
    /// Width of the query bottleneck; `null`: one `q_proj`.
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    /// Rotary part of each query/key head.
    pub qk_rope_head_dim: usize,
    /// Non-rotary part of each query/key head.
    pub qk_nope_head_dim: usize,
    /// Width of each value head.
    pub v_head_dim: usize,
    /// Expert choice method: only `noaux_tc` (as mlx-lm).
    #[serde(default)]
    pub topk_method: Option<String>,
    /// Router scores: only `sigmoid` (transformers' DeepSeek-V3 router).
    #[serde(default)]
    pub scoring_func: Option<String>,
    /// Divide the chosen experts' weights by their sum (default true).
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    /// Expert groups (default 1).
    #[serde(default)]
    pub n_group: Option<usize>,
    /// Groups whose experts may be chosen (default 1).
    #[serde(default)]
    pub topk_group: Option<usize>,
    /// Experts per token.
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    /// Every `moe_layer_freq`-th layer from `first_k_dense_replace` on is MoE (mlx-lm; 1 in
    /// released configs, where transformers ignores it).
    #[serde(default)]
    pub moe_layer_freq: Option<usize>,
    /// The first layers keep a dense MLP.
    #[serde(default)]
    pub first_k_dense_replace: Option<usize>,
    /// RMSNorm epsilon of the block and final norms.
    #[serde(default = "crate::models::llama::default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "crate::models::llama::default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (YaRN in released configs), parsed by [`RopeScaling::from_config`].
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Longest context.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Output layer shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj`.
    #[serde(default)]
    pub attention_bias: bool,
    /// The rotary dimensions are interleaved pairs (default true).
    #[serde(default)]
    pub rope_interleave: Option<bool>,
    /// The MLP activation: only `silu`.
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn one_f64() -> f64 {
    1.0
}
fn default_ctx() -> usize {
    4096
}

impl DeepseekV3Config {
    fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether layer `i` is a mixture of experts (mlx-lm's `DeepseekV3DecoderLayer`).
    pub fn is_moe(&self, i: usize) -> bool {
        self.n_routed_experts.is_some_and(|n| n > 0)
            && i >= self.first_k_dense_replace.unwrap_or(0)
            && i.is_multiple_of(self.moe_layer_freq.unwrap_or(1).max(1))
    }

    /// The softmax scale: `qk_head_dim^-0.5`, times `mscale²` with `mscale = 0.1 ·
    /// mscale_all_dim · ln(factor) + 1` when a RoPE scaling with `mscale_all_dim` and
    /// `factor > 1` is set (transformers' `yarn_apply_mscale`, mlx-lm's
    /// `DeepseekV3Attention.__init__`).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        let Some(rs) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
            return base;
        };
        let kind = rs
            .get("rope_type")
            .or_else(|| rs.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let get = |k: &str| rs.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        let (all, factor) = (get("mscale_all_dim"), get("factor"));
        if kind == "default" || all == 0.0 || factor <= 1.0 {
            return base;
        }
        let m = 0.1 * all * factor.ln() + 1.0;
        base * m * m
    }

    fn check(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(Error::Model(format!("config field `{f}`: {m}")));
        if let Some(m) = self.topk_method.as_deref().filter(|m| *m != "noaux_tc") {
            return bad(
                "topk_method",
                format!("`{m}` is not supported (only noaux_tc)"),
            );
        }
        if let Some(s) = self.scoring_func.as_deref().filter(|s| *s != "sigmoid") {
            return bad(
                "scoring_func",
                format!("`{s}` is not supported (only sigmoid)"),
            );
        }
        if let Some(a) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return bad("hidden_act", format!("`{a}` is not supported (only silu)"));
        }
        if self.num_attention_heads == 0 || self.kv_lora_rank == 0 || self.qk_rope_head_dim == 0 {
            return bad(
                "num_attention_heads / kv_lora_rank / qk_rope_head_dim",
                "must be positive".into(),
            );
        }
        let Some(n) = self.n_routed_experts.filter(|&n| n > 0) else {
            return Ok(());
        };
        let k = self.num_experts_per_tok.unwrap_or(0);
        let (g, tg) = (self.n_group.unwrap_or(1), self.topk_group.unwrap_or(1));
        if g == 0 || !n.is_multiple_of(g) {
            return bad(
                "n_group",
                format!("{g} does not divide n_routed_experts {n}"),
            );
        }
        if tg == 0 || tg > g {
            return bad(
                "topk_group",
                format!("{tg} must be between 1 and n_group {g}"),
            );
        }
        if k == 0 || k > tg * (n / g) {
            return bad(
                "num_experts_per_tok",
                format!(
                    "{k} must be between 1 and the {} experts of topk_group groups",
                    tg * (n / g)
                ),
            );
        }
        Ok(())
    }
}

/// `{a}.kv_b_proj` `[heads · (qk_nope_head_dim + v_head_dim), kv_lora_rank]`, or, in an mlx-lm
/// folder, the same joined back from `{a}.embed_q` `[heads, kv_lora_rank, qk_nope_head_dim]`
/// and `{a}.unembed_out` `[heads, v_head_dim, kv_lora_rank]` (mlx-lm's `sanitize` split it so;
/// float or MLX affine quantized): per head the transposed `embed_q`, then `unembed_out`,
/// dequantized to a dense f32 layer (the latent is narrow: 512 in DeepSeek-V3).
///
/// Errors: neither form present, or misshapen, naming the tensor.
fn kv_b_proj(w: &dyn Weights, a: &str, cfg: &DeepseekV3Config) -> Result<Linear> {
    let (nh, nope, v, r) = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    );
    let name = format!("{a}.kv_b_proj");
    if w.contains(&format!("{name}.weight")) || !w.contains(&format!("{a}.embed_q.weight")) {
        return w.linear(&name, nh * (nope + v), r, false);
    }
    let stacked = |n: &str, out: usize, inp: usize| -> Result<Vec<Linear>> {
        let p = format!("{a}.{n}");
        w.expert_linears(&p, nh, out, inp)?.ok_or_else(|| {
            Error::tensor(
                format!("{p}.weight"),
                format!("is not a stacked [{nh}, {out}, {inp}] tensor"),
            )
        })
    };
    let embed_q = stacked("embed_q", r, nope)?;
    let unembed_out = stacked("unembed_out", v, r)?;
    let mut rows = Vec::with_capacity(2 * nh);
    for (k, v) in embed_q.iter().zip(&unembed_out) {
        rows.push(k.dequantized_weight()?.t()?);
        rows.push(v.dequantized_weight()?);
    }
    let weight = Tensor::cat(&rows, 0)?.contiguous()?.to_device(w.device())?;
    Ok(Linear::dense(weight, None))
}

/// The latent attention of block prefix `p`.
fn attention(w: &dyn Weights, p: &str, cfg: &DeepseekV3Config) -> Result<Attention> {
    let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
    let a = format!("{p}.self_attn");
    let ab = cfg.attention_bias;
    let qk = cfg.qk_head_dim();
    let norm = |n: &str, d: usize| {
        RmsNorm::new(
            w.tensor(&format!("{a}.{n}.weight"), &[d])?,
            LATENT_NORM_EPS,
            false,
        )
    };
    let query = match cfg.q_lora_rank {
        None => MlaQuery::Direct(w.linear(&format!("{a}.q_proj"), nh * qk, h, false)?),
        Some(rq) => MlaQuery::LowRank {
            a: w.linear(&format!("{a}.q_a_proj"), rq, h, ab)?,
            norm: norm("q_a_layernorm", rq)?,
            b: w.linear(&format!("{a}.q_b_proj"), nh * qk, rq, false)?,
        },
    };
    let kv_b_proj = kv_b_proj(w, &a, cfg)?;
    // The compressed form wherever kv_b_proj can be split: every format on the CPU; a layer
    // quantized on a CUDA device, which cannot be dequantized there, keeps the expanded form.
    let absorbed = match Absorbed::new(
        &kv_b_proj,
        nh,
        cfg.qk_nope_head_dim,
        cfg.v_head_dim,
        w.device(),
    ) {
        Ok(a) => Some(a),
        Err(_) if w.device().is_cuda() => None,
        Err(e) => return Err(e),
    };
    let mla = Mla {
        query,
        kv_a_proj_with_mqa: w.linear(
            &format!("{a}.kv_a_proj_with_mqa"),
            cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            h,
            ab,
        )?,
        kv_a_layernorm: norm("kv_a_layernorm", cfg.kv_lora_rank)?,
        kv_b_proj,
        n_heads: nh,
        kv_lora_rank: cfg.kv_lora_rank,
        qk_nope_head_dim: cfg.qk_nope_head_dim,
        qk_rope_head_dim: cfg.qk_rope_head_dim,
        v_head_dim: cfg.v_head_dim,
        absorbed,
    };
    let (head_dim, n_kv_heads) = (mla.padded_head_dim(), mla.kv_heads());
    Ok(Attention {
        scale: cfg.softmax_scale(),
        ..Attention::plain(
            QkvProj::Latent(Box::new(mla)),
            w.linear(&format!("{a}.o_proj"), h, nh * cfg.v_head_dim, ab)?,
            nh,
            n_kv_heads,
            head_dim,
        )
    })
}

/// The feed-forward part of block `i` (prefix `p`): a dense SwiGLU MLP, or the routed experts
/// with their group-limited sigmoid router and the shared experts.
fn mlp(w: &dyn Weights, i: usize, p: &str, cfg: &DeepseekV3Config) -> Result<Mlp> {
    let h = cfg.hidden_size;
    let numerics = w.layout().numerics;
    let Some(n) = cfg.n_routed_experts.filter(|_| cfg.is_moe(i)) else {
        return Ok(Mlp::Dense(build::swiglu(
            w,
            &format!("{p}.mlp"),
            cfg.intermediate_size,
            h,
            numerics,
        )?));
    };
    let bias_name = format!("{p}.mlp.gate.e_score_correction_bias");
    let bias = w.tensor(&bias_name, &[n])?.to_vec1::<f32>()?;
    let shape = ExpertShape {
        n_experts: n,
        intermediate: cfg.moe_intermediate_size,
        hidden: h,
    };
    let router = |gate| Router {
        gate,
        scoring: Scoring::Sigmoid,
        top_k: cfg.num_experts_per_tok.unwrap_or(1),
        norm_topk_prob: cfg.norm_topk_prob.unwrap_or(true),
        selection_bias: Some(bias),
        expert_scale: None,
        scale: cfg.routed_scaling_factor as f32,
        groups: Some(GroupLimit {
            n_groups: cfg.n_group.unwrap_or(1),
            top_groups: cfg.topk_group.unwrap_or(1),
        }),
    };
    let mut moe = build::moe(w, p, shape, router)?;
    if let Some(s) = cfg.n_shared_experts.filter(|&s| s > 0) {
        moe.shared = Some(SharedExpert {
            mlp: build::swiglu(
                w,
                &format!("{p}.mlp.shared_experts"),
                cfg.moe_intermediate_size * s,
                h,
                numerics,
            )?,
            gate: None,
        });
    }
    Ok(Mlp::Moe(Box::new(moe)))
}

/// Builds a DeepSeek-V3 model from an HF-style config and weights (`DeepseekV3ForCausalLM`
/// names: per-expert `mlp.experts.{e}.*`; or an mlx-lm folder: stacked `mlp.switch_mlp.*`,
/// `self_attn.embed_q` / `unembed_out` instead of `kv_b_proj`; or GGUF `deepseek2` through
/// [`GGUF_NAMES`] and [`config_from_gguf`]). Layers past
/// `num_hidden_layers` (the multi-token-prediction module, `model.layers.61` in DeepSeek-V3)
/// are not read.
///
/// Errors: [`Error::Model`] naming a missing, invalid or unsupported config field;
/// [`Error::Tensor`] naming a missing or misshapen weight.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    let cfg: DeepseekV3Config = serde_json::from_value(config.clone())
        .map_err(|e| Error::Model(format!("config.json: {e}")))?;
    cfg.check()?;
    let h = cfg.hidden_size;
    let norm = |name: &str| RmsNorm::new(w.tensor(name, &[h])?, cfg.rms_norm_eps, false);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        layers.push(PreNormBlock {
            input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
            self_attn: attention(w, &p, &cfg)?,
            post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
            mlp: mlp(w, i, &p, &cfg)?,
        });
    }
    let embed_tokens = w.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
    let lm_head = build::lm_head(w, &embed_tokens, cfg.tie_word_embeddings, cfg.vocab_size, h)?;
    let rope = RotaryEmbedding::new_hf(
        cfg.qk_rope_head_dim,
        cfg.rope_theta,
        &RopeScaling::from_config(cfg.rope_scaling.as_ref())?,
        cfg.rope_interleave.unwrap_or(true),
        w.device(),
    )?;
    // What the KV cache holds per layer and position (the first layer's form: all share it).
    let (n_kv_heads, head_dim) = layers
        .first()
        .map_or((1, 1), |l| (l.self_attn.n_kv_heads, l.self_attn.head_dim));
    let info = ModelInfo {
        architecture: "deepseek_v3".into(),
        vocab_size: cfg.vocab_size,
        n_layers: cfg.num_hidden_layers,
        hidden_size: h,
        n_kv_heads,
        head_dim,
        context_length: cfg.max_position_embeddings,
    };
    let decoder = Decoder {
        embed_tokens,
        layers,
        norm: norm("model.norm.weight")?,
        lm_head,
    };
    Ok(Box::new(Llama::from_parts(
        decoder,
        rope,
        info,
        w.device().clone(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: serde_json::Value) -> DeepseekV3Config {
        let mut v = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "moe_intermediate_size": 4, "num_hidden_layers": 4, "num_attention_heads": 2,
            "kv_lora_rank": 4, "qk_rope_head_dim": 2, "qk_nope_head_dim": 4, "v_head_dim": 2,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
            "n_group": 4, "topk_group": 2
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn moe_layers_scale_and_checks() {
        let c = cfg(serde_json::json!({}));
        assert!(c.check().is_ok());
        let moe: Vec<usize> = (0..4).filter(|&i| c.is_moe(i)).collect();
        assert_eq!(moe, vec![1, 2, 3]);
        assert!((c.softmax_scale() - 6f64.powf(-0.5)).abs() < 1e-12);
        // DeepSeek-V3's YaRN: factor 40, mscale_all_dim 1.
        let c = cfg(
            serde_json::json!({"rope_scaling": {"type": "yarn", "factor": 40.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}}),
        );
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((c.softmax_scale() - 6f64.powf(-0.5) * m * m).abs() < 1e-12);
        for (field, v) in [
            ("n_group", serde_json::json!(3)),
            ("topk_group", serde_json::json!(5)),
            ("num_experts_per_tok", serde_json::json!(5)),
            ("scoring_func", serde_json::json!("softmax")),
        ] {
            let e = cfg(serde_json::json!({ field: v }))
                .check()
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
