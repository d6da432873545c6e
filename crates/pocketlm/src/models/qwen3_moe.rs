//! Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm) with mixture-of-experts feed-forward
//! blocks: a softmax router over `num_experts` SwiGLU experts, `num_experts_per_tok` of them per
//! token, their weights renormalized when `norm_topk_prob`. Layer `i` is sparse when it is not in
//! `mlp_only_layers` and `(i + 1) % decoder_sparse_step == 0`; other layers keep a dense MLP of
//! `intermediate_size`. Reference: Hugging Face `modeling_qwen3_moe.py`, mlx-lm
//! `models/qwen3_moe.py`, llama.cpp `src/models/qwen3moe.cpp` (GGUF `qwen3moe`).

use serde::Deserialize;

use crate::gguf::names::{self, NameTable};
use crate::gguf::GgufFile;
use crate::models::build::{self, ExpertShape};
use crate::models::decoder::Mlp;
use crate::models::llama::{LayerHooks, Llama, LlamaConfig, LlamaVariant};
use crate::models::{qwen2, CausalLM};
use crate::nn::{Router, Scoring};
use crate::weights::Weights;
use crate::{Error, Result};

/// The Qwen3 switches over Llama (q/k norms), under this architecture's name.
pub const VARIANT: LlamaVariant = LlamaVariant {
    name: "qwen3_moe",
    ..crate::models::qwen3::VARIANT
};

/// GGUF tensor names of llama.cpp's `qwen3moe` (`llama-arch.cpp`): Qwen3's, plus the router
/// `ffn_gate_inp` and the stacked experts `ffn_{gate,up,down}_exps` `[n_experts, out, in]`,
/// named here as mlx-lm's stacked `mlp.switch_mlp.*` (llama.cpp's converter stacks the
/// per-expert Hugging Face tensors into them).
pub static GGUF_NAMES: NameTable = NameTable {
    name: "qwen3moe",
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
        ("mlp.gate", "ffn_gate_inp"),
        ("mlp.switch_mlp.gate_proj", "ffn_gate_exps"),
        ("mlp.switch_mlp.up_proj", "ffn_up_exps"),
        ("mlp.switch_mlp.down_proj", "ffn_down_exps"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ],
    gguf_only: &[],
};

/// The mixture-of-experts fields of config.json (`Qwen3MoeConfig`); the rest is
/// [`LlamaConfig`].
#[derive(Debug, Clone, Deserialize)]
pub struct MoeConfig {
    /// Routed experts per sparse layer (transformers 5 writes it as `num_local_experts`, and
    /// mlx-lm folders may carry both names; [`build`] reads either).
    pub num_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Inner width of each expert.
    pub moe_intermediate_size: usize,
    /// Every `decoder_sparse_step`-th layer is sparse (1: all).
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    /// Layers that keep a dense MLP whatever the step.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// Renormalize the chosen experts' weights to sum to 1.
    #[serde(default)]
    pub norm_topk_prob: bool,
}

fn one() -> usize {
    1
}

impl MoeConfig {
    /// Whether layer `i` is a mixture of experts (transformers' `Qwen3MoeDecoderLayer`).
    pub fn is_sparse(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.num_experts > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step.max(1))
    }

    fn check(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(Error::Model(format!("config field `{f}`: {m}")));
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
            return bad(
                "num_experts_per_tok",
                format!(
                    "{} must be between 1 and num_experts {}",
                    self.num_experts_per_tok, self.num_experts
                ),
            );
        }
        if self.decoder_sparse_step == 0 {
            return bad("decoder_sparse_step", "must be positive".into());
        }
        Ok(())
    }
}

/// Builds a Qwen3-MoE model from an HF-style config and weights (`Qwen3MoeForCausalLM` names,
/// mlx-lm's stacked `switch_mlp` experts, or GGUF `qwen3moe` through [`GGUF_NAMES`]).
///
/// Errors: [`Error::Model`] naming a missing or invalid config field (`use_sliding_window:
/// true` included); [`Error::Tensor`] naming a missing or misshapen weight.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    let mut config = qwen2::drop_unused_sliding_window(config)?;
    if let Some(o) = config.as_object_mut() {
        if let Some(n) = o.remove("num_local_experts") {
            o.entry("num_experts").or_insert(n);
        }
    }
    let parse = |e: serde_json::Error| Error::Model(format!("config.json: {e}"));
    let cfg: LlamaConfig = serde_json::from_value(config.clone()).map_err(parse)?;
    let moe: MoeConfig = serde_json::from_value(config).map_err(parse)?;
    moe.check()?;
    let shape = ExpertShape {
        n_experts: moe.num_experts,
        intermediate: moe.moe_intermediate_size,
        hidden: cfg.hidden_size,
    };
    let router = |gate| Router {
        gate,
        scoring: Scoring::Softmax,
        top_k: moe.num_experts_per_tok,
        norm_topk_prob: moe.norm_topk_prob,
        selection_bias: None,
        expert_scale: None,
        groups: None,
        scale: 1.0,
    };
    let mlp = |i: usize, p: &str| -> Result<Option<Mlp>> {
        if !moe.is_sparse(i) {
            return Ok(None);
        }
        Ok(Some(Mlp::Moe(Box::new(build::moe(w, p, shape, router)?))))
    };
    let hooks = LayerHooks {
        mlp: &mlp,
        ..LayerHooks::default()
    };
    Ok(Box::new(Llama::with_layers(cfg, w, VARIANT, &hooks)?))
}

/// An HF-style config from the metadata of a GGUF `qwen3moe` file: the common keys
/// ([`super::gguf_config::common`]) plus `{arch}.expert_count`, `{arch}.expert_used_count` and
/// `{arch}.expert_feed_forward_length`. Every layer is sparse and the top-k weights are
/// renormalized, as llama.cpp's `qwen3moe` graph does.
///
/// Errors: a missing key, naming the file.
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let mut c = super::gguf_config::with_experts(
        g,
        [
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
        ],
    )?;
    let o = c
        .as_object_mut()
        .ok_or_else(|| Error::Model("qwen3moe GGUF config is not an object".into()))?;
    o.insert("decoder_sparse_step".into(), 1.into());
    o.insert("norm_topk_prob".into(), true.into());
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_layers_follow_step_and_mlp_only_layers() {
        let c: MoeConfig = serde_json::from_value(serde_json::json!({
            "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "decoder_sparse_step": 2, "mlp_only_layers": [3]
        }))
        .unwrap();
        let sparse: Vec<usize> = (0..6).filter(|&i| c.is_sparse(i)).collect();
        assert_eq!(sparse, vec![1, 5]);
        assert!(c.check().is_ok());
        let bad = MoeConfig {
            num_experts_per_tok: 9,
            ..c
        };
        let e = bad.check().unwrap_err().to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");
    }
}
