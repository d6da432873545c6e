//! `convert` against references: MLX-quantized output equals what `mx.quantize` wrote
//! (`tests/golden/folders/tiny_llama_q8`, from `scripts/golden/tiny_folders.py`) bit for bit,
//! converted folders load and compute what their source computes, and the real default GGUF
//! converted to a float folder gives the same greedy tokens as the GGUF itself (dequantized).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use pocketlm::chat_template::Message;
use pocketlm::convert::{convert, ConvertEvent, ConvertOptions, QuantOverride, QuantRecipe};
use pocketlm::loader::{load, LoadOptions, LoadedModel, Prompt};
use pocketlm::models::Logits;
use pocketlm::safetensors_weights::QuantParams;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/folders")
}

fn cpu(dequantize: bool) -> LoadOptions {
    LoadOptions {
        device: pocketlm::device::DeviceSpec::Cpu,
        dequantize,
        ..Default::default()
    }
}

/// MLX layers with `mx.quantized_matmul`'s f32 arithmetic: the logits must then equal the
/// reference computed with the dequantized weights (tiny_llama_q8 has a 4-bit layer, which
/// our default kernels would run with 8-bit activations).
fn exact() -> LoadOptions {
    LoadOptions {
        exact_mlx_matmul: true,
        ..cpu(false)
    }
}

fn run(src: &Path, out: &Path, opts: &ConvertOptions) -> Res<usize> {
    let mut done = 0;
    let mut total = 0;
    convert(src, out, opts, &mut |e| match e {
        ConvertEvent::Begin { tensors } => total = tensors,
        ConvertEvent::Tensor { .. } => done += 1,
    })?;
    assert_eq!(done, total, "progress reported every tensor");
    Ok(total)
}

fn tensors(dir: &Path) -> Res<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        dir.join("model.safetensors"),
        &Device::Cpu,
    )?)
}

fn config(dir: &Path) -> Res<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        dir.join("config.json"),
    )?)?)
}

fn logits(m: &LoadedModel, ids: &Tensor) -> Res<Tensor> {
    let mut cache = m.model.new_cache();
    Ok(m.model
        .forward(&ids.unsqueeze(0)?, &mut cache, Logits::All)?
        .squeeze(0)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Res<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn same_bits(a: &Tensor, b: &Tensor) -> Res<bool> {
    if a.dtype() != b.dtype() || a.dims() != b.dims() {
        return Ok(false);
    }
    let (a, b) = (
        a.to_dtype(candle_core::DType::F32)?.flatten_all()?,
        b.to_dtype(candle_core::DType::F32)?.flatten_all()?,
    );
    let (a, b) = (a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
    Ok(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()))
}

#[test]
fn quantized_conversion_equals_mx_quantize() -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("q8");
    let opts = ConvertOptions {
        quantize: Some(QuantParams {
            group_size: 64,
            bits: 8,
        }),
        ..Default::default()
    };
    run(&golden_dir().join("tiny_llama"), &out, &opts)?;
    let ours = tensors(&out)?;
    let mlx = tensors(&golden_dir().join("tiny_llama_q8"))?;
    // Layers the golden file quantizes with other parameters (per-layer overrides).
    let overridden = [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
    ];
    let mut compared = 0;
    for (name, want) in &mlx {
        if overridden.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let got = ours.get(name).ok_or(format!("{name} missing"))?;
        assert!(same_bits(got, want)?, "{name} differs from mx.quantize");
        compared += 1;
    }
    // 2 layers x 7 linears + embedding + lm_head quantized (3 tensors each), minus the 2
    // overridden, plus 5 norms.
    assert_eq!(compared, (2 * 7 + 2 - 2) * 3 + 5);
    assert_eq!(
        config(&out)?["quantization"],
        serde_json::json!({"group_size": 64, "bits": 8})
    );
    // It loads (the logits of loaded MLX folders are checked in tests/folders_golden.rs).
    let m = load(&out, &cpu(false))?;
    // Tokenizer files came along.
    assert_eq!(
        m.render_chat(&[Message::user("hi")])?,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    Ok(())
}

/// Per-layer overrides written by `convert` reproduce the golden MLX folder whole: the 8-bit
/// layers, the 4-bit / group-32 `down_proj` of layer 0 and the bf16 `o_proj` of layer 1, bit
/// for bit, and the same config.json `quantization`; the output loads and computes what the
/// golden folder computes.
#[test]
fn quantization_overrides_equal_mx_quantize() -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("q8o");
    let opts = ConvertOptions {
        quantize: Some(QuantParams {
            group_size: 64,
            bits: 8,
        }),
        overrides: vec![
            QuantOverride::parse("model.layers.*.mlp.down_proj=6", 64)?,
            QuantOverride::parse("model.layers.0.mlp.down_proj=4:32", 64)?,
            QuantOverride::parse("model.layers.1.self_attn.o_proj=off", 64)?,
        ],
        ..Default::default()
    };
    run(&golden_dir().join("tiny_llama"), &out, &opts)?;
    let ours = tensors(&out)?;
    let mlx = tensors(&golden_dir().join("tiny_llama_q8"))?;
    let mut want_cfg = config(&golden_dir().join("tiny_llama_q8"))?["quantization"].clone();
    // The first override (6 bits for every down_proj) stays for layer 1 only.
    want_cfg["model.layers.1.mlp.down_proj"] = serde_json::json!({"group_size": 64, "bits": 6});
    assert_eq!(config(&out)?["quantization"], want_cfg);
    let mut compared = 0;
    for (name, want) in &mlx {
        if name.starts_with("model.layers.1.mlp.down_proj") {
            continue;
        }
        let got = ours.get(name).ok_or(format!("{name} missing"))?;
        assert!(same_bits(got, want)?, "{name} differs from mx.quantize");
        compared += 1;
    }
    // Everything but layer 1's down_proj (3 tensors) is compared.
    assert_eq!(compared, mlx.len() - 3);
    assert_eq!(ours.len(), mlx.len());
    // 6 bits, 64 per group: [64 rows, 128 * 6 / 32 words], scales [64, 2].
    assert_eq!(
        ours["model.layers.1.mlp.down_proj.weight"].dims(),
        &[64, 24]
    );
    assert_eq!(ours["model.layers.1.mlp.down_proj.scales"].dims(), &[64, 2]);

    // Without the 6-bit override the output is the golden folder, and computes its logits.
    let out2 = tmp.path().join("q8o2");
    let opts = ConvertOptions {
        overrides: opts.overrides[1..].to_vec(),
        ..opts
    };
    run(&golden_dir().join("tiny_llama"), &out2, &opts)?;
    let g = candle_core::safetensors::load(golden_dir().join("logits.safetensors"), &Device::Cpu)?;
    let m = load(&out2, &exact())?;
    let d = max_abs_diff(&logits(&m, &g["ids"])?, &g["q8"])?;
    assert!(d <= 1e-4, "overrides: max |logits - reference| = {d}");
    Ok(())
}

#[test]
fn quantization_recipes_and_override_errors() -> Res<()> {
    // mixed_3_6 on 2 layers (mlx-lm's rule: first/last eighth and every third layer between get
    // 6 bits for v_proj and down_proj): layer 1 is "last eighth" (1 >= 7 * 2 / 8), layer 0 is
    // not (0 < 2 / 8 is false).
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("mixed");
    let opts = ConvertOptions {
        quantize: Some(QuantParams {
            group_size: 64,
            bits: 4,
        }),
        recipe: Some("mixed_3_6".parse::<QuantRecipe>()?),
        // f32 scales: a dequantized load then computes what the quantized one does (with bf16
        // scales it rounds the weights to bf16, as `mx.dequantize` does).
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    };
    run(&golden_dir().join("tiny_llama"), &out, &opts)?;
    let q = &config(&out)?["quantization"];
    let bits = |layer: &str| q[layer]["bits"].as_u64();
    assert_eq!(bits("model.layers.1.self_attn.v_proj"), Some(6));
    assert_eq!(bits("model.layers.1.mlp.down_proj"), Some(6));
    assert_eq!(bits("model.layers.0.self_attn.v_proj"), Some(3));
    assert_eq!(bits("model.layers.0.mlp.down_proj"), Some(3));
    assert_eq!(bits("model.layers.1.mlp.up_proj"), Some(3));
    assert_eq!(bits("model.embed_tokens"), Some(3));
    assert_eq!(bits("lm_head"), Some(6));
    // The loader reads the per-layer widths back: quantized (with `mx.quantized_matmul`'s f32
    // arithmetic) and dequantized loads agree. The default kernels quantize the activations
    // to 8 bits for 3- and 6-bit layers too: on this tiny random model that moves the logits
    // by 0.46 (max |logit| 7.35), as it moves those of its plain 4-bit conversion by 0.34.
    let g = candle_core::safetensors::load(golden_dir().join("logits.safetensors"), &Device::Cpu)?;
    let a = logits(&load(&out, &exact())?, &g["ids"])?;
    let b = logits(&load(&out, &cpu(true))?, &g["ids"])?;
    let d = max_abs_diff(&a, &b)?;
    assert!(d <= 1e-4, "mixed: quantized vs dequantized load: {d}");
    let fast = logits(&load(&out, &cpu(false))?, &g["ids"])?;
    let top = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let d = max_abs_diff(&fast, &b)?;
    assert!(
        d > 0.0 && d <= 0.1 * top,
        "mixed: kernels vs dequantized load: {d} (max |logit| {top})"
    );

    // Bad overrides are named.
    for bad in ["nothing", "=4", "x=7", "x=4:48", "x=four"] {
        let e = QuantOverride::parse(bad, 64).unwrap_err().to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
    assert!("mixed_5_6".parse::<QuantRecipe>().is_err());
    // A group size that does not divide the layer names the tensor (hidden size 64).
    let opts = ConvertOptions {
        quantize: Some(QuantParams {
            group_size: 32,
            bits: 4,
        }),
        overrides: vec![QuantOverride::parse(
            "model.layers.0.self_attn.q_proj=4:128",
            32,
        )?],
        ..Default::default()
    };
    let e = convert(
        &golden_dir().join("tiny_llama"),
        &tmp.path().join("never"),
        &opts,
        &mut |_| {},
    )
    .err()
    .ok_or("accepted group size 128 for 64 columns")?
    .to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("128"),
        "{e}"
    );
    // Overrides need -q.
    let opts = ConvertOptions {
        overrides: vec![QuantOverride::parse("x=off", 64)?],
        ..Default::default()
    };
    assert!(convert(
        &golden_dir().join("tiny_llama"),
        &tmp.path().join("n2"),
        &opts,
        &mut |_| {}
    )
    .is_err());
    Ok(())
}

#[test]
fn dequantize_and_copy_conversions() -> Res<()> {
    let g = candle_core::safetensors::load(golden_dir().join("logits.safetensors"), &Device::Cpu)?;
    let tmp = tempfile::tempdir()?;
    // A plain copy keeps the MLX quantization (with its per-layer overrides).
    let copy = tmp.path().join("copy");
    run(
        &golden_dir().join("tiny_llama_q8"),
        &copy,
        &ConvertOptions::default(),
    )?;
    let mlx = tensors(&golden_dir().join("tiny_llama_q8"))?;
    let ours = tensors(&copy)?;
    assert_eq!(ours.len(), mlx.len());
    for (k, v) in &mlx {
        assert!(same_bits(&ours[k], v)?, "{k}");
    }
    let m = load(&copy, &exact())?;
    let d = max_abs_diff(&logits(&m, &g["ids"])?, &g["q8"])?;
    assert!(d <= 1e-4, "copy: {d}");

    // --dequantize: float (bf16, the dtype of the scales) weights, no quantization left.
    let deq = tmp.path().join("deq");
    let opts = ConvertOptions {
        dequantize: true,
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    };
    run(&golden_dir().join("tiny_llama_q8"), &deq, &opts)?;
    assert!(config(&deq)?.get("quantization").is_none());
    assert!(tensors(&deq)?.keys().all(|k| !k.ends_with(".scales")));
    let m = load(&deq, &cpu(false))?;
    // The written weights are `mx.dequantize`'s (rounded to bf16, the dtype of the scales),
    // which is also what loading the quantized folder with `dequantize: true` computes.
    let q = load(golden_dir().join("tiny_llama_q8"), &cpu(true))?;
    let d = max_abs_diff(&logits(&m, &g["ids"])?, &logits(&q, &g["ids"])?)?;
    assert!(d <= 1e-5, "dequantized: {d}");
    Ok(())
}

#[test]
fn sharded_output_loads() -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("sharded");
    let opts = ConvertOptions {
        max_shard_bytes: Some(64 * 1024),
        ..Default::default()
    };
    run(&golden_dir().join("tiny_llama"), &out, &opts)?;
    assert!(!out.join("model.safetensors").exists());
    let index = std::fs::read_to_string(out.join("model.safetensors.index.json"))?;
    let index: serde_json::Value = serde_json::from_str(&index)?;
    let map = index["weight_map"].as_object().ok_or("no weight_map")?;
    assert_eq!(map.len(), 21);
    let shards: std::collections::BTreeSet<&str> =
        map.values().filter_map(|v| v.as_str()).collect();
    // 230 KB of bf16 weights in shards of at most 64 KB (the 40 KB embedding alone).
    let n = shards.len();
    assert!(n >= 4, "{shards:?}");
    for i in 1..=n {
        let f = format!("model-{i:05}-of-{n:05}.safetensors");
        assert!(shards.contains(f.as_str()) && out.join(&f).is_file(), "{f}");
    }
    let m = load(&out, &cpu(false))?;
    let g = candle_core::safetensors::load(golden_dir().join("logits.safetensors"), &Device::Cpu)?;
    let d = max_abs_diff(&logits(&m, &g["ids"])?, &g["float"])?;
    assert!(d <= 1e-4, "{d}");
    Ok(())
}

#[test]
fn output_is_atomic() -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("exists");
    std::fs::create_dir(&out)?;
    let e = convert(
        &golden_dir().join("tiny_llama"),
        &out,
        &ConvertOptions::default(),
        &mut |_| {},
    )
    .err()
    .ok_or("converted into an existing folder")?;
    assert!(e.to_string().contains("already exists"), "{e}");

    // A failing conversion (a source tensor of an unsupported dtype) leaves nothing behind.
    let bad = tmp.path().join("bad_src");
    std::fs::create_dir(&bad)?;
    for e in std::fs::read_dir(golden_dir().join("tiny_llama"))? {
        let p = e?.path();
        std::fs::copy(&p, bad.join(p.file_name().ok_or("name")?))?;
    }
    let mut all = tensors(&bad)?;
    let name = "model.norm.weight";
    let t = all[name].to_dtype(candle_core::DType::F64)?;
    all.insert(name.into(), t);
    candle_core::safetensors::save(&all, bad.join("model.safetensors"))?;
    let dst = tmp.path().join("never");
    let e = convert(&bad, &dst, &ConvertOptions::default(), &mut |_| {})
        .err()
        .ok_or("converted a bad source")?;
    assert!(
        e.to_string().contains(name) && e.to_string().contains("F64"),
        "{e}"
    );
    assert!(!dst.exists());
    let left: Vec<_> = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".pocketlm-convert"))
        .collect();
    assert!(left.is_empty(), "temporary folders left: {left:?}");
    Ok(())
}

fn default_gguf() -> PathBuf {
    pocketlm_testutil::default_model_path()
}

fn greedy(m: &LoadedModel, prompt: &[u32], steps: usize) -> Res<Vec<u32>> {
    Ok(pocketlm_testutil::greedy(m.model.as_ref(), prompt, steps)?)
}

#[test]
fn default_gguf_converts_to_float_and_quantized_folders() -> Res<()> {
    let gguf = default_gguf();
    let reference = load(&gguf, &cpu(true))?;
    let messages = [Message::user("What is the capital of France?")];
    let prompt = reference.encode(&Prompt::Chat(messages.to_vec()))?;
    let want = greedy(&reference, &prompt, 16)?;

    let tmp = tempfile::tempdir()?;
    let float = tmp.path().join("f32");
    let opts = ConvertOptions {
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    };
    run(&gguf, &float, &opts)?;
    let m = load(&float, &cpu(false))?;
    // Same tokenizer and template through tokenizer.json / tokenizer_config.json.
    assert_eq!(m.encode(&Prompt::Chat(messages.to_vec()))?, prompt);
    assert_eq!(
        m.encode(&Prompt::Text("Hello world, 123!".into()))?,
        reference.encode(&Prompt::Text("Hello world, 123!".into()))?
    );
    assert_eq!(greedy(&m, &prompt, 16)?, want, "float conversion");

    let q8 = tmp.path().join("q8");
    let opts = ConvertOptions {
        quantize: Some(QuantParams {
            group_size: 64,
            bits: 8,
        }),
        ..Default::default()
    };
    run(&gguf, &q8, &opts)?;
    let mq = load(&q8, &cpu(false))?;
    let got = greedy(&mq, &prompt, 16)?;
    let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
    eprintln!("8-bit conversion follows the float tokens for {same} of 16 steps");
    assert!(same >= 4, "8-bit conversion: {got:?} vs {want:?}");
    Ok(())
}

/// A transformers 5 config.json carries RoPE only in `rope_parameters`; the converted folder
/// also has the top-level `rope_theta` (and `rope_scaling` for a non-default rope type) that
/// older readers take: mlx-lm 0.32.2 reads only `rope_theta`, and silently uses base 10000
/// without it. (Fails without the fix: the output had no `rope_theta`.)
#[test]
fn converted_config_has_top_level_rope_fields() -> Res<()> {
    let src = golden_dir().join("tiny_llama");
    let src_config = config(&src)?;
    assert!(src_config.get("rope_theta").is_none() && src_config.get("rope_scaling").is_none());
    assert_eq!(src_config["rope_parameters"]["rope_theta"], 50000.0);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("copy");
    run(&src, &out, &ConvertOptions::default())?;
    let c = config(&out)?;
    assert_eq!(c["rope_theta"], 50000.0, "{c}");
    assert!(c.get("rope_scaling").is_none_or(|v| v.is_null()), "{c}");
    assert_eq!(c["rope_parameters"], src_config["rope_parameters"]);

    // A scaled RoPE: `rope_scaling` too, with the type and factor.
    let linear = tmp.path().join("linear-src");
    std::fs::create_dir(&linear)?;
    for e in std::fs::read_dir(&src)? {
        let p = e?.path();
        std::fs::copy(&p, linear.join(p.file_name().ok_or("no name")?))?;
    }
    let rp = serde_json::json!({"rope_theta": 20000.0, "rope_type": "linear", "factor": 2.0});
    let mut sc = src_config.clone();
    sc["rope_parameters"] = rp.clone();
    std::fs::write(linear.join("config.json"), serde_json::to_string(&sc)?)?;
    let out = tmp.path().join("linear");
    run(&linear, &out, &ConvertOptions::default())?;
    let c = config(&out)?;
    assert_eq!(c["rope_theta"], 20000.0, "{c}");
    assert_eq!(c["rope_scaling"]["rope_type"], "linear", "{c}");
    assert_eq!(c["rope_scaling"]["factor"], 2.0, "{c}");
    Ok(())
}

/// `exact_mlx_matmul` reaches a tied output layer: a 4-bit MLX embedding table that is also
/// the output projection (`tie_word_embeddings`) runs in f32 like the other layers, so the
/// logits equal those of the same weights dequantized to dense f32. (Fails without the fix:
/// the table kept the 8-bit-activation kernel: 0.039 from the dense product.)
#[test]
fn exact_mlx_matmul_reaches_tied_output_layer() -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let q4 = tmp.path().join("q4");
    let opts = ConvertOptions {
        quantize: Some(QuantParams {
            group_size: 64,
            bits: 4,
        }),
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    };
    run(&golden_dir().join("tiny_llama"), &q4, &opts)?;
    // Tie it: no lm_head tensors, `tie_word_embeddings: true`.
    let mut t = tensors(&q4)?;
    t.retain(|k, _| !k.starts_with("lm_head."));
    candle_core::safetensors::save(&t, q4.join("model.safetensors"))?;
    let mut c = config(&q4)?;
    c["tie_word_embeddings"] = true.into();
    std::fs::write(q4.join("config.json"), serde_json::to_string(&c)?)?;

    let ids =
        candle_core::safetensors::load(golden_dir().join("logits.safetensors"), &Device::Cpu)?
            ["ids"]
            .clone();
    let dense = logits(&load(&q4, &cpu(true))?, &ids)?;
    let d = max_abs_diff(&logits(&load(&q4, &exact())?, &ids)?, &dense)?;
    assert!(d <= 1e-4, "exact: max |logits - dense| = {d}");
    // Without the flag the 4-bit layers (the output layer included) quantize activations.
    let k = max_abs_diff(&logits(&load(&q4, &cpu(false))?, &ids)?, &dense)?;
    assert!(k > 1e-3, "kernel: {k}");
    Ok(())
}
