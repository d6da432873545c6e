//! Ministral 3 (text) and the text stack of Mistral 3 (multimodal). Ministral 3 is Mistral's
//! Llama architecture (RMSNorm, grouped-query attention, SwiGLU MLP, untied output layer,
//! optional sliding window on every layer) with YaRN RoPE and Llama 4's attention temperature:
//! the rotated query at position `p` is multiplied by
//! `1 + llama_4_scaling_beta · ln(1 + floor(p / original_max_position_embeddings))`, both
//! fields of `rope_parameters` ([`QueryTemperature`]). Mistral 3 (`model_type: mistral3`)
//! holds a Ministral 3 (or, in Mistral Small 3.1, a `mistral`) text model under `text_config`
//! and its weights under `model.language_model.` / `language_model.model.`; the vision tower
//! and projector are ignored.
//!
//! Reference: Hugging Face `models/ministral3/modeling_ministral3.py`
//! (`Ministral3Attention`, `get_llama_4_attn_scale`), `configuration_ministral3.py`,
//! `models/mistral3/modeling_mistral3.py`; mlx-lm `models/ministral3.py`, `models/mistral3.py`.

use crate::gguf::GgufFile;
use crate::models::llama::{Llama, LlamaConfig, LlamaVariant};
use crate::models::{build as parts, llama, CausalLM};
use crate::nn::QueryTemperature;
use crate::weights::Weights;
use crate::{Error, Result};

/// Llama's layers under this architecture's name.
pub const VARIANT: LlamaVariant = LlamaVariant {
    name: "ministral3",
    ..LlamaVariant::LLAMA
};

fn bad(field: &str, msg: impl std::fmt::Display) -> Error {
    Error::Model(format!("config.json field `{field}`: {msg}"))
}

/// The query temperature of a Ministral 3 config: `llama_4_scaling_beta` and
/// `original_max_position_embeddings` from `rope_parameters` (transformers 5) or
/// `rope_scaling`.
///
/// Errors: [`Error::Model`] naming a missing or invalid field (both are required, as in the
/// references).
pub fn query_temperature(config: &serde_json::Value) -> Result<QueryTemperature> {
    let rp = ["rope_parameters", "rope_scaling"]
        .iter()
        .find_map(|k| config.get(*k).filter(|v| v.is_object()))
        .ok_or_else(|| bad("rope_parameters", "is missing"))?;
    let beta = rp
        .get("llama_4_scaling_beta")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| bad("rope_parameters.llama_4_scaling_beta", "is missing"))?;
    let original = rp
        .get("original_max_position_embeddings")
        .and_then(|v| v.as_u64())
        .filter(|&o| o > 0)
        .ok_or_else(|| {
            bad(
                "rope_parameters.original_max_position_embeddings",
                "is missing or not a positive integer",
            )
        })?;
    Ok(QueryTemperature {
        beta,
        original_max_position_embeddings: original as usize,
    })
}

fn build_text(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    // transformers uses `sliding_window` on every layer and warns about `layer_types`; mlx-lm
    // follows `layer_types`. They agree only when the types are all the same.
    if let Some(t) = config.get("layer_types").and_then(|t| t.as_array()) {
        if t.windows(2).any(|p| p[0] != p[1]) {
            return Err(bad(
                "layer_types",
                "mixed layer types are not supported (transformers ignores them)",
            ));
        }
    }
    let cfg: LlamaConfig = serde_json::from_value(config.clone())
        .map_err(|e| Error::Model(format!("config.json: {e}")))?;
    let t = query_temperature(config)?;
    let mut m = Llama::with_variant(cfg, w, VARIANT)?;
    m.set_query_temperature(Some(t));
    Ok(Box::new(m))
}

/// Builds a Ministral 3 model (`model_type: ministral3`, `Ministral3ForCausalLM` names) or the
/// text model of a Mistral 3 checkpoint (`model_type: mistral3`: `text_config` of
/// `model_type` `ministral3`, or `mistral` / `llama`, built as Llama), or a GGUF `mistral3`
/// file's config ([`config_from_gguf`]: `model_type` `ministral3`, or `mistral` when the file
/// has no query temperature, built as Llama).
///
/// Errors: [`Error::Model`] naming a missing or invalid config field (`text_config` included);
/// [`Error::Tensor`] naming a missing or misshapen weight.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    match config.get("model_type").and_then(|v| v.as_str()) {
        Some("mistral3") => {}
        // A GGUF `mistral3` file without the query temperature ([`config_from_gguf`]).
        Some("mistral") => return llama::build(config, w),
        _ => return build_text(config, w),
    }
    // The loader has brought `text_config.rope_parameters` to `rope_theta` / `rope_scaling`
    // (`loader::normalize_config`).
    let text = config
        .get("text_config")
        .ok_or_else(|| bad("text_config", "is missing (model_type mistral3)"))?;
    let w = parts::language_model(w)?;
    match text.get("model_type").and_then(|v| v.as_str()) {
        Some("ministral3") => build_text(text, &w),
        Some("mistral") | Some("llama") | None => llama::build(text, &w),
        Some(other) => Err(bad(
            "text_config.model_type",
            format!("`{other}` is not supported (ministral3, mistral, llama)"),
        )),
    }
}

/// An HF-style Ministral 3 config from the metadata of a GGUF `mistral3` file (llama.cpp's
/// converter, `conversion/mistral3.py` `Ministral3Model`): the common keys
/// ([`super::gguf_config::common`]: YaRN from `mistral3.rope.scaling.*`) plus Llama 4's query
/// temperature, `llama_4_scaling_beta` from `mistral3.attention.temperature_scale` and its
/// period from `mistral3.rope.scaling.original_context_length` (llama.cpp's
/// `n_attn_temp_floor_scale`, `src/models/mistral3.cpp`). Weights are named as Llama's
/// ([`crate::models::llama::GGUF_NAMES`]), q/k rows permuted as Llama's.
///
/// Errors: a missing or mistyped key, naming the file; YaRN missing while the temperature is
/// set.
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let mut c = super::gguf_config::common(g)?;
    let beta = g.opt_f64("mistral3.attention.temperature_scale")?;
    let o = c
        .as_object_mut()
        .ok_or_else(|| Error::Model("mistral3 GGUF config is not an object".into()))?;
    o.insert("model_type".into(), "ministral3".into());
    if let Some(beta) = beta.filter(|&b| b != 0.0) {
        let scaling = o
            .get_mut("rope_scaling")
            .and_then(|r| r.as_object_mut())
            .ok_or_else(|| {
                Error::Model(format!(
                    "{}: `mistral3.attention.temperature_scale` needs YaRN \
                     (`mistral3.rope.scaling.type`), for its original context length",
                    g.path().display()
                ))
            })?;
        scaling.insert("llama_4_scaling_beta".into(), beta.into());
    } else {
        // No temperature: a plain Llama / Mistral text model under the Ministral 3 name.
        o.insert("model_type".into(), "mistral".into());
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_from_rope_parameters() {
        let c = serde_json::json!({"rope_parameters": {
            "rope_type": "yarn", "llama_4_scaling_beta": 0.1,
            "original_max_position_embeddings": 8}});
        let t = query_temperature(&c).unwrap();
        assert_eq!(t.factor(7), 1.0);
        assert!((t.factor(8) - (1.0 + 0.1 * 2f64.ln())).abs() < 1e-12);
        assert!((t.factor(23) - (1.0 + 0.1 * 3f64.ln())).abs() < 1e-12);
        let e = query_temperature(&serde_json::json!({"rope_parameters": {"rope_theta": 1.0}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("llama_4_scaling_beta"), "{e}");
    }
}
