//! Tensor names: one table per architecture of (Hugging Face name, GGUF name) pairs, read in
//! both directions. The GGUF weight source ([`crate::weights::GgufWeights`]) reads it from
//! Hugging Face to GGUF when a model asks for a weight; `convert` reads it from GGUF to Hugging
//! Face when it writes a GGUF file out as a folder. Each registry entry
//! ([`crate::models::Architecture::gguf_names`]) points to its table; the tables themselves
//! live in the architecture files.
//!
//! Source: llama.cpp's `gguf-py/gguf/tensor_mapping.py` (what `convert_hf_to_gguf.py` renames
//! each Hugging Face tensor to) and `src/llama-arch.cpp` (the GGUF names per architecture).

use std::path::Path;

use crate::{Error, Result};

/// One architecture's tensor names. A pair names a module, without the parameter suffix: the
/// last dot-separated part (`weight`, `bias`) is carried over as is, so
/// `("self_attn.q_proj", "attn_q")` in [`Self::block`] stands for
/// `model.layers.N.self_attn.q_proj.weight` <-> `blk.N.attn_q.weight` and for the `.bias` pair
/// alike. Within each list both columns are unique, so the mapping is one-to-one.
#[derive(Debug)]
pub struct NameTable {
    /// The architecture(s) the table serves, for error messages (`llama`).
    pub name: &'static str,
    /// Modules outside the blocks, full paths: `("model.embed_tokens", "token_embd")`.
    pub global: &'static [(&'static str, &'static str)],
    /// Modules of block `N`, paths within the block: `("self_attn.q_proj", "attn_q")` for
    /// `model.layers.N.self_attn.q_proj` <-> `blk.N.attn_q`.
    pub block: &'static [(&'static str, &'static str)],
    /// Full names of GGUF tensors with no Hugging Face weight: they become config fields
    /// (`rope_freqs.weight`: Llama 3 RoPE factors; `rope_factors_long.weight`: Phi-3 LongRoPE),
    /// and `convert` writes no tensor for them.
    pub gguf_only: &'static [&'static str],
}

/// `model.layers.N.` / `blk.N.`: the prefixes of block tensors.
const HF_BLOCK: &str = "model.layers.";
const GGUF_BLOCK: &str = "blk.";

/// Splits `{prefix}{N}.{module}.{suffix}` into `(N, module, suffix)`; `None` for other names.
fn split_block<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    Some((layer, module, suffix))
}

impl NameTable {
    /// The GGUF name of Hugging Face tensor `hf` (`model.layers.3.self_attn.q_proj.weight` ->
    /// `blk.3.attn_q.weight`), or `None` when the table has none.
    pub fn gguf_name(&self, hf: &str) -> Option<String> {
        if let Some((layer, module, suffix)) = split_block(hf, HF_BLOCK) {
            let (_, g) = self.block.iter().find(|(h, _)| *h == module)?;
            return Some(format!("{GGUF_BLOCK}{layer}.{g}.{suffix}"));
        }
        let (module, suffix) = hf.rsplit_once('.')?;
        let (_, g) = self.global.iter().find(|(h, _)| *h == module)?;
        Some(format!("{g}.{suffix}"))
    }

    /// The Hugging Face name of GGUF tensor `gguf` (`blk.3.attn_q.weight` ->
    /// `model.layers.3.self_attn.q_proj.weight`), or `None` when the table has none (also for
    /// [`Self::gguf_only`] names).
    pub fn hf_name(&self, gguf: &str) -> Option<String> {
        if let Some((layer, module, suffix)) = split_block(gguf, GGUF_BLOCK) {
            let (h, _) = self.block.iter().find(|(_, g)| *g == module)?;
            return Some(format!("{HF_BLOCK}{layer}.{h}.{suffix}"));
        }
        let (module, suffix) = gguf.rsplit_once('.')?;
        let (h, _) = self.global.iter().find(|(_, g)| *g == module)?;
        Some(format!("{h}.{suffix}"))
    }

    /// As [`Self::gguf_name`], for a tensor of GGUF `file`.
    ///
    /// Errors: [`Error::Tensor`] naming `hf`, the table and `file` when the table has no GGUF
    /// name for it.
    pub fn to_gguf(&self, hf: &str, file: &Path) -> Result<String> {
        self.gguf_name(hf).ok_or_else(|| {
            Error::tensor(
                hf,
                format!(
                    "has no GGUF name in the `{}` tensor-name table (reading {})",
                    self.name,
                    file.display()
                ),
            )
        })
    }

    /// As [`Self::hf_name`], for a tensor of GGUF `file`.
    ///
    /// Errors: [`Error::Tensor`] naming `gguf`, the table and `file` when the table has no
    /// Hugging Face name for it.
    pub fn to_hf(&self, gguf: &str, file: &Path) -> Result<String> {
        self.hf_name(gguf).ok_or_else(|| {
            Error::tensor(
                gguf,
                format!(
                    "has no Hugging Face name in the `{}` tensor-name table (reading {})",
                    self.name,
                    file.display()
                ),
            )
        })
    }

    /// Whether `gguf` is a GGUF tensor with no Hugging Face weight ([`Self::gguf_only`]).
    pub fn is_gguf_only(&self, gguf: &str) -> bool {
        self.gguf_only.contains(&gguf)
    }
}

/// Modules outside the blocks that every supported architecture has (the output layer is
/// absent from GGUF files of tied-embedding models).
pub const GLOBAL: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::REGISTRY;

    /// The file named in errors.
    const FILE: &str = "m.gguf";

    fn tables() -> Vec<&'static NameTable> {
        let mut t: Vec<&'static NameTable> = Vec::new();
        for a in REGISTRY {
            if let Some(n) = a.gguf_names {
                if !t.iter().any(|x| std::ptr::eq(*x, n)) {
                    t.push(n);
                }
            }
        }
        t
    }

    #[test]
    fn every_gguf_architecture_has_a_table() {
        for a in REGISTRY {
            assert_eq!(
                a.gguf_names.is_some(),
                !a.gguf_architectures.is_empty(),
                "{:?}",
                a.model_types
            );
        }
    }

    #[test]
    fn tables_round_trip_both_ways() {
        let f = Path::new(FILE);
        let tables = tables();
        assert!(tables.len() >= 3, "llama, gemma, phi3");
        for t in tables {
            for list in [t.global, t.block] {
                for (i, (h, g)) in list.iter().enumerate() {
                    // One-to-one: no name twice in a column.
                    assert!(!list[i + 1..].iter().any(|(h2, _)| h2 == h), "{h} twice");
                    assert!(!list[i + 1..].iter().any(|(_, g2)| g2 == g), "{g} twice");
                }
            }
            for (h, g) in t.block {
                for layer in [0, 7, 31] {
                    for suffix in ["weight", "bias"] {
                        let hf = format!("model.layers.{layer}.{h}.{suffix}");
                        let gg = format!("blk.{layer}.{g}.{suffix}");
                        assert_eq!(t.gguf_name(&hf).as_deref(), Some(gg.as_str()), "{}", t.name);
                        assert_eq!(t.hf_name(&gg).as_deref(), Some(hf.as_str()), "{}", t.name);
                    }
                }
            }
            for (h, g) in t.global {
                let (hf, gg) = (format!("{h}.weight"), format!("{g}.weight"));
                assert_eq!(t.to_gguf(&hf, f).unwrap(), gg, "{}", t.name);
                assert_eq!(t.to_hf(&gg, f).unwrap(), hf, "{}", t.name);
            }
            for g in t.gguf_only {
                assert!(t.is_gguf_only(g));
                assert_eq!(t.hf_name(g), None, "{g} in {}", t.name);
            }
        }
    }

    /// Moved from `gguf.rs` (`hf_to_gguf_name`), assertions kept.
    #[test]
    fn maps_llama_names() {
        let llama = crate::models::by_gguf_architecture("llama").unwrap();
        let llama = llama.gguf_names.unwrap();
        let hf_to_gguf_name = |n: &str| llama.gguf_name(n);
        assert_eq!(
            hf_to_gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(),
            Some("blk.12.attn_k.weight")
        );
        assert_eq!(
            hf_to_gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            hf_to_gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down.weight")
        );
        assert_eq!(hf_to_gguf_name("model.layers.x.mlp.down_proj.weight"), None);
        assert_eq!(hf_to_gguf_name("vision_tower.foo"), None);
    }

    #[test]
    fn architecture_specific_names() {
        let f = Path::new(FILE);
        let llama = crate::models::by_gguf_architecture("llama").unwrap();
        let llama = llama.gguf_names.unwrap();
        assert_eq!(
            llama.to_hf("blk.2.ffn_norm.weight", f).unwrap(),
            "model.layers.2.post_attention_layernorm.weight"
        );
        let qwen2 = crate::models::by_gguf_architecture("qwen2").unwrap();
        assert_eq!(
            qwen2
                .gguf_names
                .unwrap()
                .to_gguf("model.layers.1.self_attn.q_proj.bias", f)
                .unwrap(),
            "blk.1.attn_q.bias"
        );
        // Phi-3: fused projections; `ffn_up` is the fused gate+up.
        let phi3 = crate::models::by_gguf_architecture("phi3").unwrap();
        let phi3 = phi3.gguf_names.unwrap();
        assert_eq!(
            phi3.to_hf("blk.4.attn_qkv.weight", f).unwrap(),
            "model.layers.4.self_attn.qkv_proj.weight"
        );
        assert_eq!(
            phi3.to_hf("blk.4.ffn_up.weight", f).unwrap(),
            "model.layers.4.mlp.gate_up_proj.weight"
        );
        assert!(phi3.is_gguf_only("rope_factors_long.weight"));
        // Gemma: `post_attention_layernorm` follows attention (Llama's is the FFN input norm).
        let gemma = crate::models::by_gguf_architecture("gemma3").unwrap();
        let gemma = gemma.gguf_names.unwrap();
        for (hf, g) in [
            ("post_attention_layernorm", "post_attention_norm"),
            ("pre_feedforward_layernorm", "ffn_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
            ("self_attn.q_norm", "attn_q_norm"),
        ] {
            assert_eq!(
                gemma
                    .to_gguf(&format!("model.layers.5.{hf}.weight"), f)
                    .unwrap(),
                format!("blk.5.{g}.weight")
            );
        }
    }

    #[test]
    fn unknown_names_are_clear_errors() {
        let f = Path::new(FILE);
        let llama = crate::models::by_gguf_architecture("llama").unwrap();
        let t = llama.gguf_names.unwrap();
        for bad in [
            "model.layers.x.mlp.down_proj.weight",
            "model.layers.0.mlp.gate_up_proj.weight",
            "vision_tower.foo",
            "nodot",
        ] {
            let e = t.to_gguf(bad, f).unwrap_err().to_string();
            assert!(
                e.contains(bad) && e.contains("`llama`") && e.contains("m.gguf"),
                "{e}"
            );
        }
        for bad in [
            "blk.0.attn_qkv.weight",
            "blk.0.post_ffw_norm.weight",
            "rope_freqs.weight",
        ] {
            let e = t.to_hf(bad, f).unwrap_err().to_string();
            assert!(
                e.contains(bad) && e.contains("no Hugging Face name") && e.contains("m.gguf"),
                "{e}"
            );
        }
    }
}
