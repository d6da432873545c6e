//! The architectures' GGUF name tables ([`crate::gguf::names::NameTable`]), read both ways.

use std::path::Path;

use crate::gguf::names::NameTable;
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
                if g.ends_with(".weight") || g.ends_with(".bias") {
                    // A whole parameter: no suffix carried over.
                    let (hf, gg) = (
                        format!("model.layers.{layer}.{h}"),
                        format!("blk.{layer}.{g}"),
                    );
                    assert_eq!(t.gguf_name(&hf).as_deref(), Some(gg.as_str()), "{}", t.name);
                    assert_eq!(t.hf_name(&gg).as_deref(), Some(hf.as_str()), "{}", t.name);
                    continue;
                }
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

#[test]
fn whole_parameter_names_of_this_rounds_architectures() {
    let f = Path::new(FILE);
    let table = |arch: &str| {
        crate::models::by_gguf_architecture(arch)
            .unwrap()
            .gguf_names
            .unwrap()
    };
    for (arch, hf, g) in [
        (
            "deepseek2",
            "model.layers.1.mlp.gate.e_score_correction_bias",
            "blk.1.exp_probs_b.bias",
        ),
        (
            "deepseek2",
            "model.layers.1.mlp.gate.weight",
            "blk.1.ffn_gate_inp.weight",
        ),
        (
            "deepseek2",
            "model.layers.0.self_attn.embed_q.weight",
            "blk.0.attn_k_b.weight",
        ),
        (
            "gpt-oss",
            "model.layers.2.self_attn.sinks",
            "blk.2.attn_sinks.weight",
        ),
        (
            "gpt-oss",
            "model.layers.2.mlp.experts.down_proj.bias",
            "blk.2.ffn_down_exps.bias",
        ),
        (
            "gemma4",
            "model.layers.3.layer_scalar",
            "blk.3.layer_output_scale.weight",
        ),
        (
            "gemma4",
            "model.embed_tokens_per_layer.weight",
            "per_layer_token_embd.weight",
        ),
        (
            "mistral3",
            "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_q.weight",
        ),
        // llama.cpp's suffix-less `ssm_a`, matched by its exact name.
        ("qwen35", "model.layers.2.linear_attn.A_log", "blk.2.ssm_a"),
        (
            "qwen35moe",
            "model.layers.2.linear_attn.dt_bias",
            "blk.2.ssm_dt.bias",
        ),
        (
            "qwen35moe",
            "model.layers.0.mlp.shared_expert_gate.weight",
            "blk.0.ffn_gate_inp_shexp.weight",
        ),
    ] {
        let t = table(arch);
        assert_eq!(t.to_gguf(hf, f).unwrap(), g, "{arch}");
        assert_eq!(t.to_hf(g, f).unwrap(), hf, "{arch}");
    }
    // A whole-parameter pair does not carry suffixes over.
    assert_eq!(
        table("gpt-oss").gguf_name("model.layers.2.self_attn.sinks.bias"),
        None
    );
}
