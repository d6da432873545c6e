//! SmolLM3: the Llama architecture with no rotary embedding on some layers ("NoPE"): layer `i`
//! applies RoPE when `no_rope_layers[i]` is 1 and none when it is 0 (the name is the
//! reference's); without the list, every `no_rope_layer_interval`-th layer (4) has none.
//! Reference: Hugging Face `configuration_smollm3.py` / `modeling_smollm3.py`
//! (`SmolLM3Attention.use_rope`), mlx-lm `models/smollm3.py`, llama.cpp `src/models/smollm3.cpp`
//! (GGUF `smollm3`, which fixes the interval at 4).

use serde::Deserialize;

use crate::gguf::GgufFile;
use crate::models::llama::{LayerHooks, Llama, LlamaConfig, LlamaVariant};
use crate::models::CausalLM;
use crate::weights::Weights;
use crate::{Error, Result};

/// Llama's layers under this architecture's name.
pub const VARIANT: LlamaVariant = LlamaVariant {
    name: "smollm3",
    ..LlamaVariant::LLAMA
};

/// The NoPE fields of config.json (`SmolLM3Config`); the rest is [`LlamaConfig`].
#[derive(Debug, Clone, Deserialize)]
pub struct NoRopeConfig {
    /// Per layer: 1 applies RoPE, 0 does not.
    #[serde(default)]
    pub no_rope_layers: Option<Vec<u8>>,
    /// Without `no_rope_layers`, layers `i` with `(i + 1) % interval == 0` have no RoPE.
    #[serde(default = "four")]
    pub no_rope_layer_interval: usize,
    /// Sliding windows on the NoPE layers (not supported).
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn four() -> usize {
    4
}

impl NoRopeConfig {
    /// Whether each of `n_layers` layers applies RoPE (transformers'
    /// `SmolLM3Config.__post_init__`).
    ///
    /// Errors: [`Error::Model`] naming `no_rope_layers` when its length is not `n_layers` or an
    /// entry is not 0 or 1, or `no_rope_layer_interval` when it is 0.
    pub fn rope_layers(&self, n_layers: usize) -> Result<Vec<bool>> {
        let bad = |f: &str, m: String| Err(Error::Model(format!("config field `{f}`: {m}")));
        match &self.no_rope_layers {
            Some(v) if v.len() != n_layers => bad(
                "no_rope_layers",
                format!("{} entries for {n_layers} layers", v.len()),
            ),
            Some(v) if v.iter().any(|&x| x > 1) => {
                bad("no_rope_layers", "entries must be 0 or 1".into())
            }
            Some(v) => Ok(v.iter().map(|&x| x == 1).collect()),
            None if self.no_rope_layer_interval == 0 => {
                bad("no_rope_layer_interval", "must be positive".into())
            }
            None => Ok((0..n_layers)
                .map(|i| !(i + 1).is_multiple_of(self.no_rope_layer_interval))
                .collect()),
        }
    }
}

/// Builds a SmolLM3 model from an HF-style config and weights (`SmolLM3ForCausalLM` names;
/// GGUF `smollm3` through Llama's name table).
///
/// Errors: [`Error::Model`] naming a missing or invalid config field, `use_sliding_window: true`
/// included; [`Error::Tensor`] naming a missing or misshapen weight.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    let parse = |e: serde_json::Error| Error::Model(format!("config.json: {e}"));
    let nope: NoRopeConfig = serde_json::from_value(config.clone()).map_err(parse)?;
    if nope.use_sliding_window {
        return Err(Error::Model(
            "config.json: `use_sliding_window: true` (sliding windows on SmolLM3's NoPE layers) \
             is not supported"
                .into(),
        ));
    }
    let mut config = config.clone();
    if let Some(o) = config.as_object_mut() {
        o.remove("sliding_window"); // only used with `use_sliding_window`
    }
    let cfg: LlamaConfig = serde_json::from_value(config).map_err(parse)?;
    let rope = nope.rope_layers(cfg.num_hidden_layers)?;
    let rope_on = |i: usize| rope.get(i).copied().unwrap_or(true);
    let hooks = LayerHooks {
        rope: &rope_on,
        ..LayerHooks::default()
    };
    Ok(Box::new(Llama::with_layers(cfg, w, VARIANT, &hooks)?))
}

/// An HF-style config from the metadata of a GGUF `smollm3` file: the common keys
/// ([`super::gguf_config::common`]); llama.cpp's graph drops RoPE on every 4th layer whatever
/// the file says, and so does this config.
///
/// Errors: a missing key, naming the file.
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let mut c = super::gguf_config::common(g)?;
    if let Some(o) = c.as_object_mut() {
        o.insert("no_rope_layer_interval".into(), 4.into());
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_layers_from_list_or_interval() {
        let c = |v: serde_json::Value| serde_json::from_value::<NoRopeConfig>(v).unwrap();
        let got = c(serde_json::json!({})).rope_layers(8).unwrap();
        assert_eq!(got, [true, true, true, false, true, true, true, false]);
        let got = c(serde_json::json!({"no_rope_layers": [1, 0, 1]}))
            .rope_layers(3)
            .unwrap();
        assert_eq!(got, [true, false, true]);
        let e = c(serde_json::json!({"no_rope_layers": [1, 0]}))
            .rope_layers(3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no_rope_layers"), "{e}");
    }
}
