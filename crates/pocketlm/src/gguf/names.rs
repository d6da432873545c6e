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
///
/// A pair whose GGUF column ends in `.weight` or `.bias` names a whole parameter instead, for
/// the parameters whose names do not follow the module pattern:
/// `("mlp.gate.e_score_correction_bias", "exp_probs_b.bias")` stands for
/// `model.layers.N.mlp.gate.e_score_correction_bias` <-> `blk.N.exp_probs_b.bias`.
///
/// Any pair also names a whole parameter when asked for by its exact name, for the GGUF tensors
/// that llama.cpp writes without a suffix: `("linear_attn.A_log", "ssm_a")` stands for
/// `model.layers.N.linear_attn.A_log` <-> `blk.N.ssm_a` (what such a tensor holds is the
/// converter's form of the parameter, which the architecture undoes at load).
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

/// Splits `{prefix}{N}.{rest}` into `(N, rest)`; `None` for other names.
fn split_layer<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (layer, rest) = rest.split_once('.')?;
    Some((layer.parse().ok()?, rest))
}

/// Whether a pair's GGUF column names a whole parameter ([`NameTable`]).
fn is_parameter(gguf: &str) -> bool {
    gguf.ends_with(".weight") || gguf.ends_with(".bias")
}

/// The other column of the pair of `pairs` whose `from` column is `name`, for a whole
/// parameter (or any pair matched exactly), or for `{module}.{suffix}` with the suffix carried
/// over.
fn lookup(
    pairs: &[(&'static str, &'static str)],
    name: &str,
    from: fn(&(&'static str, &'static str)) -> &'static str,
    to: fn(&(&'static str, &'static str)) -> &'static str,
) -> Option<String> {
    if let Some(p) = pairs.iter().find(|p| from(p) == name) {
        return Some(to(p).to_string());
    }
    let (module, suffix) = name.rsplit_once('.')?;
    let p = pairs
        .iter()
        .find(|p| !is_parameter(p.1) && from(p) == module)?;
    Some(format!("{}.{suffix}", to(p)))
}

impl NameTable {
    /// The GGUF name of Hugging Face tensor `hf` (`model.layers.3.self_attn.q_proj.weight` ->
    /// `blk.3.attn_q.weight`), or `None` when the table has none.
    pub fn gguf_name(&self, hf: &str) -> Option<String> {
        if let Some((layer, rest)) = split_layer(hf, HF_BLOCK) {
            let g = lookup(self.block, rest, |p| p.0, |p| p.1)?;
            return Some(format!("{GGUF_BLOCK}{layer}.{g}"));
        }
        lookup(self.global, hf, |p| p.0, |p| p.1)
    }

    /// The Hugging Face name of GGUF tensor `gguf` (`blk.3.attn_q.weight` ->
    /// `model.layers.3.self_attn.q_proj.weight`), or `None` when the table has none (also for
    /// [`Self::gguf_only`] names).
    pub fn hf_name(&self, gguf: &str) -> Option<String> {
        if let Some((layer, rest)) = split_layer(gguf, GGUF_BLOCK) {
            let h = lookup(self.block, rest, |p| p.1, |p| p.0)?;
            return Some(format!("{HF_BLOCK}{layer}.{h}"));
        }
        lookup(self.global, gguf, |p| p.1, |p| p.0)
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
