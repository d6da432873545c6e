//! Hugging Face configs from GGUF metadata: the keys llama.cpp's architectures share.

use candle_core::Device;

use crate::gguf::GgufFile;
use crate::{Error, Result};

/// An HF-style config (config.json field names) from the GGUF metadata keys llama.cpp's
/// architectures share (`{arch}.embedding_length`, `{arch}.attention.head_count`, RoPE base and
/// scaling, ...; llama.cpp's `llama-arch.cpp` names, written by `convert_hf_to_gguf.py`), with
/// Llama 3's `rope_freqs.weight` frequency divisors where the file has them.
///
/// Errors: a missing required key or an unsupported `rope.scaling.type`, naming the file.
pub fn common(g: &GgufFile) -> Result<serde_json::Value> {
    let mut c = without_ffn(g)?;
    let ff = g.get_usize(&format!("{}.feed_forward_length", g.architecture()?))?;
    if let Some(o) = c.as_object_mut() {
        o.insert("intermediate_size".into(), ff.into());
    }
    Ok(c)
}

/// [`common`] without `intermediate_size`, for architectures whose files may lack
/// `{arch}.feed_forward_length` (llama.cpp's `qwen35moe`: experts only).
///
/// Errors: as [`common`].
pub fn without_ffn(g: &GgufFile) -> Result<serde_json::Value> {
    let arch = g.architecture()?;
    let k = |s: &str| format!("{arch}.{s}");
    let heads = g.get_usize(&k("attention.head_count"))?;
    let hidden = g.get_usize(&k("embedding_length"))?;
    let vocab = match g.opt_usize(&k("vocab_size"))? {
        Some(v) => v,
        None => g.tensor_dims("token_embd.weight")?[0],
    };
    let head_dim = match g.opt_usize(&k("attention.key_length"))? {
        Some(d) => d,
        None => g
            .opt_usize(&k("rope.dimension_count"))?
            .unwrap_or(hidden / heads.max(1)),
    };
    let rope_scaling = match g.opt_str(&k("rope.scaling.type"))?.as_deref() {
        None | Some("none") => serde_json::Value::Null,
        Some("linear") => serde_json::json!({
            "rope_type": "linear",
            "factor": g.get_f64(&k("rope.scaling.factor"))?,
        }),
        // llama.cpp's converter writes YaRN as the factor and the original context length,
        // and transformers' `mscale_all_dim` as `rope.scaling.yarn_log_multiplier`, with
        // `mscale` taken as 1 (`llama-context.cpp`; `deepseek2` writes it otherwise:
        // `deepseek_v3::config_from_gguf`).
        Some("yarn") => {
            let log_mul = g.opt_f64(&k("rope.scaling.yarn_log_multiplier"))?;
            let mscale = log_mul.map(|_| 1.0);
            serde_json::json!({
                "rope_type": "yarn",
                "factor": g.get_f64(&k("rope.scaling.factor"))?,
                "original_max_position_embeddings":
                    g.get_usize(&k("rope.scaling.original_context_length"))?,
                "beta_fast": g.opt_f64(&k("rope.scaling.yarn_beta_fast"))?,
                "beta_slow": g.opt_f64(&k("rope.scaling.yarn_beta_slow"))?,
                "mscale": mscale,
                "mscale_all_dim": log_mul,
            })
        }
        Some(other) => {
            return Err(Error::Model(format!(
                "{}: `{arch}.rope.scaling.type` `{other}` is not supported",
                g.path().display()
            )))
        }
    };
    let rope_freq_factors = if g.has_tensor("rope_freqs.weight") {
        let t = g.tensor_f32("rope_freqs.weight", &[head_dim / 2], &Device::Cpu)?;
        Some(t.to_vec1::<f32>()?)
    } else {
        None
    };
    Ok(serde_json::json!({
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": g.get_usize(&k("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": g.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": g.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
        "rope_scaling": rope_scaling,
        "rope_freq_factors": rope_freq_factors,
        "max_position_embeddings": g.opt_usize(&k("context_length"))?.unwrap_or(2048),
        "vocab_size": vocab,
        "tie_word_embeddings": !g.has_tensor("output.weight"),
        "sliding_window": g.opt_usize(&k("attention.sliding_window"))?,
    }))
}

/// [`common`] plus the expert counts of a mixture-of-experts GGUF file, under the config.json
/// names `names` = `[experts, experts per token, expert width]`: `{arch}.expert_count`,
/// `{arch}.expert_used_count` and `{arch}.expert_feed_forward_length`.
///
/// Errors: as [`common`]; a missing expert key, naming the file.
pub fn with_experts(g: &GgufFile, names: [&str; 3]) -> Result<serde_json::Value> {
    let mut c = common(g)?;
    let arch = g.architecture()?;
    let keys = [
        "expert_count",
        "expert_used_count",
        "expert_feed_forward_length",
    ];
    if let Some(o) = c.as_object_mut() {
        for (name, key) in names.into_iter().zip(keys) {
            o.insert(name.into(), g.get_usize(&format!("{arch}.{key}"))?.into());
        }
    }
    Ok(c)
}
