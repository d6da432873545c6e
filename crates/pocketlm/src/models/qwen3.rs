//! Qwen3: the Llama architecture with a per-head RMSNorm of queries and keys before RoPE
//! (`q_norm`, `k_norm`, `[head_dim]`) and an explicit `head_dim`. Reference: Hugging Face
//! `modeling_qwen3.py`, mlx-lm `models/qwen3.py`.

use candle_core::{Device, Tensor};

use crate::models::build::Renamed;
use crate::models::llama::{self, Llama, LlamaConfig, LlamaVariant};
use crate::models::{qwen2, CausalLM, Encoder};
use crate::weights::Weights;
use crate::{Error, Result};

/// The Qwen3 switches over Llama (`attention_bias` from config.json still applies).
pub const VARIANT: LlamaVariant = LlamaVariant {
    name: "qwen3",
    qkv_bias: false,
    o_bias: false,
    qk_norm: true,
    fused_qkv: false,
    fused_gate_up: false,
};

/// Builds a Qwen3 model from an HF-style config and weights (`Qwen3ForCausalLM` names).
///
/// Errors: as [`llama::build_variant`]; [`crate::Error::Model`] for `use_sliding_window: true`.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    llama::build_variant(&qwen2::drop_unused_sliding_window(config)?, w, VARIANT)
}

/// Qwen3 as an embedding model (Qwen3-Embedding): the decoder's final hidden states, to be
/// pooled at the last token by [`crate::embed`].
#[derive(Debug)]
pub struct Qwen3Encoder {
    model: Llama,
}

/// Builds Qwen3-Embedding from its config and weights. Its checkpoints are saved from
/// transformers' `Qwen3Model`, so tensor names lack `model.` (`embed_tokens.weight`,
/// `layers.0...`) and there is no `lm_head`; names with `model.` load too. The output layer
/// is never used, so it is tied to the embedding whatever `tie_word_embeddings` says.
///
/// Errors: as [`build`].
pub fn build_encoder(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn Encoder>> {
    let mut config = qwen2::drop_unused_sliding_window(config)?;
    if let Some(obj) = config.as_object_mut() {
        obj.insert("tie_word_embeddings".into(), true.into());
    }
    let cfg: LlamaConfig =
        serde_json::from_value(config).map_err(|e| Error::Model(format!("config.json: {e}")))?;
    let model = if w.contains("model.embed_tokens.weight") {
        Llama::with_variant(cfg, w, VARIANT)?
    } else {
        // A bare `Qwen3Model` checkpoint: the names without `model.`.
        let bare = Renamed::new(w, |n| n.strip_prefix("model.").unwrap_or(n).to_string());
        Llama::with_variant(cfg, &bare, VARIANT)?
    };
    Ok(Box::new(Qwen3Encoder { model }))
}

impl Encoder for Qwen3Encoder {
    /// Causal attention: with right padding no real token attends to padding, so the mask is
    /// only checked for shape.
    fn forward_hidden(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        if attention_mask.dims() != input_ids.dims() {
            return Err(Error::InvalidArgument(format!(
                "attention mask of shape {:?} for input ids of shape {:?}",
                attention_mask.dims(),
                input_ids.dims()
            )));
        }
        self.model.forward_hidden(input_ids)
    }

    fn hidden_size(&self) -> usize {
        self.model.info().hidden_size
    }

    fn vocab_size(&self) -> usize {
        self.model.info().vocab_size
    }

    fn max_positions(&self) -> usize {
        self.model.info().context_length
    }

    fn architecture(&self) -> &str {
        "qwen3"
    }

    fn device(&self) -> &Device {
        CausalLM::device(&self.model)
    }
}
