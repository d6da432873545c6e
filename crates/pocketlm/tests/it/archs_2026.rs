//! The 2026 architectures of issue #25 (`qwen3_moe`, `smollm3`, `gemma4_text`, `ministral3`,
//! `gpt_oss`, `lfm2`, `deepseek_v3`, `qwen3_5`, `qwen3_5_moe`) against their references, on
//! tiny random-weight models (`scripts/golden/tiny_moe.py`, `scripts/golden/tiny_2026b.py`,
//! `scripts/golden/tiny_gpt_oss.py`, `scripts/golden/tiny_lfm2.py`,
//! `scripts/golden/tiny_deepseek_v3.py`, `scripts/golden/tiny_qwen3_5.py`, golden files under
//! `tests/golden/archs_2026/`; `lfm2`, `deepseek_v3` and `qwen3_5` at the end of this file):
//!
//! - Hugging Face folders (bfloat16): logits of 3 prompts (20, 12 and 7 tokens) at every
//!   position within 1e-4 of transformers' float32 forward pass, and 16 greedy tokens (our KV
//!   cache, one token per step) equal to transformers'. `qwen3_moe` mixes a MoE layer and a
//!   dense one (`mlp_only_layers`) with `norm_topk_prob: false`; `qwen3_moe_sparse` has only
//!   MoE layers and renormalized top-k weights; `smollm3` has a NoPE layer; `gemma4_text` has
//!   per-layer embeddings, KV-shared layers, keys-as-values full layers of their own head width
//!   with proportional RoPE, sliding layers (window 8) and layer scalars; `ministral3` has YaRN
//!   RoPE and the Llama-4 query temperature; `gemma4_moe` (`scripts/golden/tiny_gemma4_moe.py`,
//!   at the end of this file) has Gemma 4's MoE block beside the MLP. The multimodal `gemma4`
//!   and `mistral3` layouts are the text folders rewritten by the tests.
//! - mlx-lm's own 4-bit conversions of `qwen3_moe` (stacked `switch_mlp` experts, 8-bit router,
//!   float32 scales), `gemma4_text` and `ministral3`: 16 greedy tokens after prompt 1 equal to
//!   mlx-lm's on that folder (for the last two on the weights dequantized at load, with
//!   logits within 1e-4 of mlx-lm's: [`check_mlx_q4_logits`]).
//! - `gpt_oss` (attention sinks, 2 sliding + 2 full layers with a window of 8, YaRN, 4 experts
//!   top-2 with biases and the clamped SwiGLU): the same float checks, the batched decode
//!   against one-sequence decode, the Hub's MXFP4 expert layout against transformers, and
//!   mlx-lm's greedy tokens on its affine 4-bit and MXFP4 conversions.
//! - llama.cpp's own Q8_0 GGUF of `qwen3_moe_sparse` and `smollm3` (stacked `ffn_*_exps`
//!   experts run one expert slice at a time on our Q8_0 kernels): logits over prompt 0 equal
//!   to llama.cpp's on that file in the file's layout, and 16 greedy tokens equal.
//! - llama.cpp's own conversions of `ministral3`, `gemma4_text`, `gpt_oss_mxfp4` (MXFP4
//!   experts, ggml type 39), `deepseek_v3` (f16; `kv_b_proj` split by the converter),
//!   `qwen3_5`, `qwen3_5_moe` and `qwen3_5_tiled` (`scripts/golden/tiny_gguf_2026.py`), at the
//!   end of this file: logits over a prompt within a per-model bound of llama.cpp's on the
//!   same file, and 16 greedy tokens equal.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use pocketlm::kv_cache::{KvCache, KvCacheConfig};
use pocketlm::loader::{load, LoadOptions, LoadedModel};
use pocketlm::models::Logits;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/archs_2026")
        .join(name)
}

fn cpu() -> LoadOptions {
    LoadOptions {
        device: pocketlm::device::DeviceSpec::Cpu,
        dequantize: false,
        ..Default::default()
    }
}

fn tensors(file: &str) -> Res<HashMap<String, Tensor>> {
    let p = path(file);
    candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| {
        format!(
            "{}: {e} (run scripts/golden/tiny_moe.py, then tiny_2026b.py)",
            p.display()
        )
        .into()
    })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Res<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Greedy decoding with the KV cache: prefill the prompt, then one token per step.
fn greedy(m: &LoadedModel, prompt: &[u32], n: usize) -> Res<Vec<u32>> {
    greedy_after(m, &mut m.model.new_cache(), prompt, n)
}

/// [`greedy`] continuing `cache` (which holds the positions before `prompt`).
fn greedy_after(m: &LoadedModel, cache: &mut KvCache, prompt: &[u32], n: usize) -> Res<Vec<u32>> {
    let dev = m.model.device();
    let mut input = Tensor::new(prompt, dev)?.unsqueeze(0)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let l = m.model.forward(&input, cache, Logits::Last)?;
        let t = l.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        out.push(t);
        input = Tensor::new(&[t], dev)?.unsqueeze(0)?;
    }
    Ok(out)
}

fn check_float(name: &str, arch: &str) -> Res<()> {
    let g = tensors(&format!("{name}.golden.safetensors"))?;
    let m = load(path(name), &cpu())?;
    assert_eq!(m.model.info().architecture, arch);
    let mut worst = 0f32;
    for p in 0..3 {
        let ids = &g[&format!("ids{p}")];
        let mut cache = m.model.new_cache();
        let got = m
            .model
            .forward(&ids.unsqueeze(0)?, &mut cache, Logits::All)?
            .squeeze(0)?;
        let d = max_abs_diff(&got, &g[&format!("logits{p}")])?;
        assert!(
            d <= 1e-4,
            "{name} prompt {p}: max |logits - transformers| = {d}"
        );
        worst = worst.max(d);
    }
    let want = g["greedy"].to_vec1::<u32>()?;
    let got = greedy(&m, &g["ids0"].to_vec1::<u32>()?, want.len())?;
    assert_eq!(got, want, "{name}: greedy tokens");
    println!("{name}: logits max diff {worst:.1e} over 3 prompts, 16/16 greedy tokens equal");
    Ok(())
}

#[test]
fn qwen3_moe_matches_transformers() -> Res<()> {
    check_float("qwen3_moe", "qwen3_moe")
}

#[test]
fn qwen3_moe_sparse_matches_transformers() -> Res<()> {
    check_float("qwen3_moe_sparse", "qwen3_moe")
}

#[test]
fn smollm3_matches_transformers() -> Res<()> {
    check_float("smollm3", "smollm3")
}

#[test]
fn gemma4_text_matches_transformers() -> Res<()> {
    check_float("gemma4_text", "gemma4")
}

/// The text folder `name` rewritten into a multimodal checkpoint's layout of `model_type`
/// (`text_config`, weights under `model.language_model.` with `lm_head` at the top, or under
/// `language_model.model.` with `language_model.lm_head`:
/// [`super::archs_golden::multimodal_copy`]) loads as `arch` and gives transformers' logits of
/// the text model over prompt 0 (within 1e-4).
fn check_multimodal(name: &str, model_type: &str, arch: &str) -> Res<()> {
    let g = tensors(&format!("{name}.golden.safetensors"))?;
    for prefix in ["model.language_model.", "language_model.model."] {
        let tmp = super::archs_golden::multimodal_copy(&path(name), model_type, prefix)?;
        let m = load(tmp.path(), &cpu())?;
        assert_eq!(m.model.info().architecture, arch);
        let mut cache = m.model.new_cache();
        let got = m
            .model
            .forward(&g["ids0"].unsqueeze(0)?, &mut cache, Logits::All)?
            .squeeze(0)?;
        let d = max_abs_diff(&got, &g["logits0"])?;
        assert!(
            d <= 1e-4,
            "{model_type} {prefix}: max |logits - transformers| = {d}"
        );
    }
    Ok(())
}

/// A Gemma 4 prompt cache (3 cached layers for 5 blocks, of two head widths) of the first 12
/// tokens of prompt 0 saves, loads, and continues with transformers' 16 greedy tokens.
#[test]
fn gemma4_prompt_cache_round_trips() -> Res<()> {
    let g = tensors("gemma4_text.golden.safetensors")?;
    let m = load(path("gemma4_text"), &cpu())?;
    let ids = g["ids0"].to_vec1::<u32>()?;
    let config = KvCacheConfig::default();
    let cache = pocketlm::prompt_cache::prefill(&m, &ids[..12], &config, 64)?;
    assert_eq!(cache.n_layers(), 3);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("prompt.safetensors");
    pocketlm::prompt_cache::save(&file, &m, &cache, &ids[..12])?;
    let mut loaded = pocketlm::prompt_cache::load(&file, &m, &config)?;
    assert_eq!(loaded.token_ids, &ids[..12]);
    let want = g["greedy"].to_vec1::<u32>()?;
    let got = greedy_after(&m, &mut loaded.cache, &ids[12..], want.len())?;
    assert_eq!(
        got, want,
        "gemma4_text: greedy tokens after a loaded prompt cache"
    );
    Ok(())
}

#[test]
fn gemma4_multimodal_layout_loads_text_model() -> Res<()> {
    check_multimodal("gemma4_text", "gemma4", "gemma4")
}

/// mlx-lm's 4-bit conversion `<name>_mlx_q4` of `<name>`: 16 greedy tokens after prompt 1
/// equal to mlx-lm's (`mlx_greedy` in `<name>.golden.safetensors`).
fn check_mlx_q4(name: &str) -> Res<()> {
    let g = tensors(&format!("{name}.golden.safetensors"))?;
    let m = load(path(&format!("{name}_mlx_q4")), &cpu())?;
    let want = g["mlx_greedy"].to_vec1::<u32>()?;
    let got = greedy(&m, &g["ids1"].to_vec1::<u32>()?, want.len())?;
    assert_eq!(got, want, "{name} mlx q4: greedy tokens against mlx-lm");
    Ok(())
}

#[test]
fn qwen3_moe_mlx_q4_matches_mlx_lm() -> Res<()> {
    check_mlx_q4("qwen3_moe")
}

/// mlx-lm's 4-bit folder `<name>_mlx_q4` against mlx-lm on it. The greedy steps of these tiny
/// models come within 0.01 of a tie, closer than our 4-bit kernels' rounding of activations to
/// 8 bits moves their logits (measured over prompt 1: up to 0.69 for gemma4_text, 0.97 for
/// ministral3), so the exact check runs on the weights dequantized at load, which computes as
/// mlx-lm does (f32 products of the dequantized weights): logits within 1e-4 of mlx-lm's
/// (`mlx_logits1`) and its 16 greedy tokens (`mlx_greedy`). The kernels stay within
/// `kernel_bound` of mlx-lm's logits (a loose bound, against gross errors only: 1.5 for the
/// dense models).
fn check_mlx_q4_logits(name: &str, kernel_bound: f32) -> Res<()> {
    let g = tensors(&format!("{name}.golden.safetensors"))?;
    let folder = path(&format!("{name}_mlx_q4"));
    let ids = &g["ids1"];
    let logits = |m: &LoadedModel| -> Res<Tensor> {
        let mut cache = m.model.new_cache();
        Ok(m.model
            .forward(&ids.unsqueeze(0)?, &mut cache, Logits::All)?
            .squeeze(0)?)
    };
    let exact = load(
        &folder,
        &LoadOptions {
            dequantize: true,
            ..cpu()
        },
    )?;
    let d = max_abs_diff(&logits(&exact)?, &g["mlx_logits1"])?;
    assert!(
        d <= 1e-4,
        "{name} mlx q4 dequantized: max |logits - mlx-lm| = {d}"
    );
    let want = g["mlx_greedy"].to_vec1::<u32>()?;
    let got = greedy(&exact, &ids.to_vec1::<u32>()?, want.len())?;
    assert_eq!(
        got, want,
        "{name} mlx q4 dequantized: greedy tokens against mlx-lm"
    );
    let kernels = load(&folder, &cpu())?;
    let k = max_abs_diff(&logits(&kernels)?, &g["mlx_logits1"])?;
    assert!(
        k <= kernel_bound,
        "{name} mlx q4 kernels: max |logits - mlx-lm| = {k}"
    );
    println!("{name} mlx q4: dequantized {d:.1e}, kernels {k:.2} from mlx-lm's logits");
    Ok(())
}

#[test]
fn gemma4_text_mlx_q4_matches_mlx_lm() -> Res<()> {
    check_mlx_q4_logits("gemma4_text", 1.5)
}

#[test]
fn ministral3_matches_transformers() -> Res<()> {
    check_float("ministral3", "ministral3")
}

#[test]
fn ministral3_mlx_q4_matches_mlx_lm() -> Res<()> {
    check_mlx_q4_logits("ministral3", 1.5)
}

#[test]
fn mistral3_layout_loads_text_model() -> Res<()> {
    check_multimodal("ministral3", "mistral3", "ministral3")
}

#[test]
fn gpt_oss_matches_transformers() -> Res<()> {
    check_float("gpt_oss", "gpt_oss")
}

/// The Hub's MXFP4 layout of gpt-oss (`gpt_oss_mxfp4/`: experts as u8 `*_blocks` /
/// `*_scales`, the rest bfloat16): logits of prompt 0 within 2e-4 of transformers' float32
/// forward over the same experts dequantized by its `convert_moe_packed_tensors`, and 16 greedy
/// tokens equal to transformers'. Measured 1.3e-4 (logits up to 32 in size); with the experts
/// dequantized to dense f32 instead of run on the MXFP4 path it is 1.7e-4, so the gap to the
/// float model's 7.6e-5 is f32 rounding of a different model, not the format.
#[test]
fn gpt_oss_hf_mxfp4_matches_transformers() -> Res<()> {
    let g = tensors("gpt_oss.golden.safetensors")?;
    let m = load(path("gpt_oss_mxfp4"), &cpu())?;
    assert_eq!(m.model.info().architecture, "gpt_oss");
    let ids = &g["ids0"];
    let mut cache = m.model.new_cache();
    let got = m
        .model
        .forward(&ids.unsqueeze(0)?, &mut cache, Logits::All)?
        .squeeze(0)?;
    let d = max_abs_diff(&got, &g["mxfp4_logits0"])?;
    assert!(
        d <= 2e-4,
        "gpt_oss mxfp4: max |logits - transformers| = {d}"
    );
    let want = g["mxfp4_greedy"].to_vec1::<u32>()?;
    let got = greedy(&m, &ids.to_vec1::<u32>()?, want.len())?;
    assert_eq!(got, want, "gpt_oss mxfp4: greedy tokens");
    println!("gpt_oss mxfp4: logits max diff {d:.1e}, 16/16 greedy tokens equal");
    Ok(())
}

/// The batched decode (`forward_batch`, one pass over several sequences' caches) of gpt-oss
/// equals one-sequence decoding for 8 greedy steps after the 3 prompts (20, 12 and 7 tokens,
/// so each crosses the sliding window of 8): attention sinks and per-layer windows in that path
/// too.
#[test]
fn gpt_oss_batched_decode_matches_single() -> Res<()> {
    check_batched_decode("gpt_oss")
}

/// The batched decode of model `name` equals one-sequence decoding for 8 greedy steps after
/// its 3 golden prompts (logits within 1e-4).
fn check_batched_decode(name: &str) -> Res<()> {
    use pocketlm::models::BatchRow;
    let g = tensors(&format!("{name}.golden.safetensors"))?;
    let m = load(path(name), &cpu())?;
    let dev = m.model.device();
    let mut single = Vec::new();
    let mut batched = Vec::new();
    let mut next = Vec::new();
    for p in 0..3 {
        let ids = g[&format!("ids{p}")].unsqueeze(0)?;
        let (mut a, mut b) = (m.model.new_cache(), m.model.new_cache());
        let l = m.model.forward(&ids, &mut a, Logits::Last)?;
        m.model.forward(&ids, &mut b, Logits::Last)?;
        next.push(l.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?);
        single.push(a);
        batched.push(b);
    }
    let mut worst = 0f32;
    for step in 0..8 {
        let mut want = Vec::new();
        for (t, cache) in next.iter().zip(single.iter_mut()) {
            let x = Tensor::new(&[*t], dev)?.unsqueeze(0)?;
            want.push(m.model.forward(&x, cache, Logits::Last)?.squeeze(0)?);
        }
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut rows: Vec<BatchRow<'_>> = toks
            .iter()
            .zip(batched.iter_mut())
            .map(|(ids, cache)| BatchRow { ids, cache })
            .collect();
        let got = m.model.forward_batch(&mut rows)?;
        for (i, w) in want.iter().enumerate() {
            let d = max_abs_diff(&got.get(i)?, w)?;
            assert!(d <= 1e-4, "step {step} sequence {i}: batched vs single {d}");
            worst = worst.max(d);
        }
        next = want
            .iter()
            .map(|w| Ok(w.argmax(0)?.to_scalar::<u32>()?))
            .collect::<Res<Vec<_>>>()?;
    }
    println!("{name}: batched decode vs single, max logit diff {worst:.1e} over 8 steps");
    Ok(())
}

/// mlx-lm's own 4-bit conversion `folder` of the tiny gpt-oss (`tiny_gpt_oss.py`: experts
/// stacked with biases, the router 8-bit, sinks and norms float32): 16 greedy tokens after
/// prompt `prompt` equal to mlx-lm's (`key` in the golden file) on that folder.
fn check_gpt_oss_mlx(folder: &str, key: &str, prompt: usize) -> Res<()> {
    let g = tensors("gpt_oss.golden.safetensors")?;
    let m = load(path(folder), &cpu())?;
    assert_eq!(m.model.info().architecture, "gpt_oss");
    let want = g[key].to_vec1::<u32>()?;
    let got = greedy(
        &m,
        &g[&format!("ids{prompt}")].to_vec1::<u32>()?,
        want.len(),
    )?;
    assert_eq!(got, want, "{folder}: greedy tokens against mlx-lm");
    Ok(())
}

#[test]
fn gpt_oss_mlx_q4_matches_mlx_lm() -> Res<()> {
    check_gpt_oss_mlx("gpt_oss_mlx_q4", "mlx_greedy", 1)
}

#[test]
fn gpt_oss_mlx_mxfp4_matches_mlx_lm() -> Res<()> {
    // MXFP4 stacked experts (uint8 E8M0 scales), run on the `MlxFp` path one expert each.
    check_gpt_oss_mlx("gpt_oss_mlx_mxfp4", "mlx_mxfp4_greedy", 0)
}

/// llama.cpp's own Q8_0 GGUF of a model (`tiny_moe.py --gguf`), loaded twice: on our Q8_0
/// kernels (the experts one in-place slice of the stacked `ffn_*_exps` tensors each) and with
/// every weight dequantized at load. Both stay within 4.0 of each other and of transformers'
/// float logits (std ~8): loose bounds, as `archs_golden.rs` uses for 8-bit weights, since 8-bit
/// rounding moves these tiny random models' logits by up to ~3 (measured: dequantized vs
/// transformers 1.5 / 2.9, kernels vs dequantized 2.7 / 2.4 for qwen3_moe_sparse / smollm3).
/// They catch gross errors only; the exact check of the expert slices is in
/// `qwen3_moe_gguf_experts_run_in_place`. Against llama.cpp on the same file
/// (`<name>.gguf_llamacpp.safetensors`, `tiny_moe.py --gguf`), loaded a third time in the
/// file's own layout (`no_repack`, the layout this machine's llama.cpp build runs): the 16
/// greedy tokens equal, and with `bound` the logits over prompt 0 within it of llama.cpp's
/// (`tiny_lfm2.py`'s file has the tokens only). The repacked kernels sum in another order
/// (1.9e-6 on smollm3's logits), which can flip the rounding of a Q8_0 activation further
/// on: measured 0.42 on smollm3 from position 28 on, where llama.cpp's greedy step 16 has a
/// margin of 0.078 and the repacked model picks the runner-up.
fn check_gguf(name: &str, arch: &str, bound: Option<f32>) -> Res<()> {
    let g = tensors(&format!("{name}.golden.safetensors"))?;
    let file = path(&format!("{name}.gguf"));
    let kernels = load(&file, &cpu())?;
    let dequantized = load(
        &file,
        &LoadOptions {
            dequantize: true,
            ..cpu()
        },
    )?;
    assert_eq!(kernels.model.info().architecture, arch);
    let ids = &g["ids0"];
    let all = |m: &LoadedModel| -> Res<Tensor> {
        let mut cache = m.model.new_cache();
        Ok(m.model
            .forward(&ids.unsqueeze(0)?, &mut cache, Logits::All)?
            .squeeze(0)?)
    };
    let (k, d) = (all(&kernels)?, all(&dequantized)?);
    let kd = max_abs_diff(&k, &d)?;
    let df = max_abs_diff(&d, &g["logits0"])?;
    assert!(
        kd <= 4.0,
        "{name} gguf: kernels vs dequantized: max diff {kd}"
    );
    assert!(
        df <= 4.0,
        "{name} gguf: dequantized Q8_0 vs transformers: max diff {df}"
    );
    println!("{name} gguf: kernels vs dequantized {kd:.1e}, dequantized vs transformers {df:.2e}");
    let r = tensors(&format!("{name}.gguf_llamacpp.safetensors"))?;
    let ggml = load(
        &file,
        &LoadOptions {
            no_repack: true,
            ..cpu()
        },
    )?;
    if let Some(bound) = bound {
        let logits = r.get("logits").ok_or("no llama.cpp logits")?;
        let dl = max_abs_diff(&all(&ggml)?, logits)?;
        let dk = max_abs_diff(&k, logits)?;
        println!("{name} gguf: file layout vs llama.cpp {dl:.1e} (repacked kernels {dk:.1e})");
        assert!(dl <= bound, "{name} gguf: max |logits - llama.cpp| = {dl}");
    }
    let want = r["greedy"].to_vec1::<u32>()?;
    let got = greedy(&ggml, &ids.to_vec1::<u32>()?, want.len())?;
    assert_eq!(got, want, "{name} gguf: greedy tokens against llama.cpp");
    Ok(())
}

#[test]
fn qwen3_moe_gguf_experts_run_in_place() -> Res<()> {
    // Each expert's in-place Q8_0 slice holds exactly that expert of the stacked tensor.
    let file = pocketlm::gguf::GgufFile::open(path("qwen3_moe_sparse.gguf"))?;
    for l in 0..2 {
        for (t, rows, cols) in [("gate", 32, 64), ("up", 32, 64), ("down", 64, 32)] {
            let name = format!("blk.{l}.ffn_{t}_exps.weight");
            let all = file.tensor_f32(&name, &[8, rows, cols], &Device::Cpu)?;
            for e in 0..8 {
                let slice = file.expert_matrix(&name, [8, rows, cols], e)?.dequantize();
                let want = all.get(e)?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(slice, want, "{name} expert {e}");
            }
        }
    }
    check_gguf("qwen3_moe_sparse", "qwen3_moe", Some(1e-5))
}

#[test]
fn smollm3_gguf_runs() -> Res<()> {
    check_gguf("smollm3", "smollm3", Some(1e-5))
}

// LFM2 (`scripts/golden/tiny_lfm2.py`): 4 layers `[conv, full_attention, conv,
// full_attention]`; the convolution layers keep their state in an `ArraysCache`.

#[test]
fn lfm2_matches_transformers() -> Res<()> {
    // Prefill of 3 prompts, then 16 greedy steps of one token on the convolution states and KV
    // caches against transformers' full forward passes without a cache.
    check_float("lfm2", "lfm2")
}

/// Prompt 0 of `name` fed in pieces of 1, 5, 1, 1, 7 and 5 tokens (each continuing the array
/// states and KV caches) gives transformers' logits at every position (within 1e-4): the
/// states carry exactly across passes of any length, single-token decode included. Returns the
/// cache after the 20 positions; its array states cannot be cut back (the cache is left as it
/// was).
fn check_chunked(name: &str) -> Res<KvCache> {
    let g = tensors(&format!("{name}.golden.safetensors"))?;
    let m = load(path(name), &cpu())?;
    let ids = g["ids0"].to_vec1::<u32>()?;
    let want = &g["logits0"];
    let mut cache = m.model.new_cache();
    let mut at = 0;
    let mut worst = 0f32;
    for n in [1, 5, 1, 1, 7, 5] {
        let x = Tensor::new(&ids[at..at + n], m.model.device())?.unsqueeze(0)?;
        let got = m.model.forward(&x, &mut cache, Logits::All)?.squeeze(0)?;
        let d = max_abs_diff(&got, &want.narrow(0, at, n)?)?;
        assert!(d <= 1e-4, "{name} positions {at}..{}: max diff {d}", at + n);
        worst = worst.max(d);
        at += n;
        assert_eq!(cache.offset(), at);
    }
    assert_eq!(at, ids.len());
    let e = cache.truncate(10).unwrap_err().to_string();
    assert!(e.contains("layer 0") && e.contains("ArraysCache"), "{e}");
    assert_eq!(cache.offset(), ids.len());
    println!("{name}: chunked prefill and decode, logits max diff {worst:.1e}");
    Ok(cache)
}

#[test]
fn lfm2_chunked_and_token_by_token_match_transformers() -> Res<()> {
    let cache = check_chunked("lfm2")?;
    // Two convolution layers of [1, 2, 64] f32 states and two attention layers of 20 positions
    // (growing buffers of 256 positions, 2 KV heads of width 16, keys and values).
    assert_eq!(cache.nbytes(), 2 * 2 * 64 * 4 + 2 * 2 * 256 * 2 * 16 * 4);
    Ok(())
}

/// A prompt cache of `name` of the first 12 tokens of prompt 0 (array states and keys and
/// values) saves, loads, and continues with transformers' 16 greedy tokens; mlx-lm's format
/// refuses the array-state layers by name.
fn check_prompt_cache(name: &str) -> Res<()> {
    let g = tensors(&format!("{name}.golden.safetensors"))?;
    let m = load(path(name), &cpu())?;
    let ids = g["ids0"].to_vec1::<u32>()?;
    let config = KvCacheConfig::default();
    let cache = pocketlm::prompt_cache::prefill(&m, &ids[..12], &config, 5)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("prompt.safetensors");
    pocketlm::prompt_cache::save(&file, &m, &cache, &ids[..12])?;
    let mut loaded = pocketlm::prompt_cache::load(&file, &m, &config)?;
    assert_eq!(loaded.token_ids, &ids[..12]);
    assert_eq!(loaded.cache.offset(), 12);
    let want = g["greedy"].to_vec1::<u32>()?;
    let got = greedy_after(&m, &mut loaded.cache, &ids[12..], want.len())?;
    assert_eq!(
        got, want,
        "{name}: greedy tokens after a loaded prompt cache"
    );
    let mlx = dir.path().join("mlx.safetensors");
    let e = pocketlm::mlx_prompt_cache::save(&mlx, &cache, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 0") && e.contains("ArraysCache"), "{e}");
    Ok(())
}

#[test]
fn lfm2_prompt_cache_round_trips() -> Res<()> {
    check_prompt_cache("lfm2")
}

/// A chat session on `name` carries the array states and KV caches between turns. Turn 0
/// starts from a cache of the first tokens of its prompt (as from a prompt-cache file) and
/// prefills only the rest; later turns prefill only what the cached tokens do not cover when
/// they are a prefix of the new prompt, else (the random model's replies do not re-encode to
/// the same tokens, and an array state cannot be cut back) the whole prompt. Every greedy
/// reply equals a fresh run over the whole history.
fn check_session(name: &str) -> Res<()> {
    use pocketlm::chat_template::Message;
    use pocketlm::generate::{generate, GenerateParams};
    use pocketlm::loader::Prompt;
    use pocketlm::session::{common_prefix_len, ChatSession, SessionOptions};
    let m = std::sync::Arc::new(load(path(name), &cpu())?);
    let params = GenerateParams {
        max_tokens: 6,
        ..Default::default()
    };
    let mut s = ChatSession::new(
        m.clone(),
        SessionOptions {
            params: params.clone(),
            ..Default::default()
        },
    )?;
    let turns = ["small models", "run on laptops", "quick brown fox"];
    let first = m.encode(&Prompt::Chat(vec![Message::user(turns[0])]))?;
    let k = first.len() - 4;
    let cache = pocketlm::prompt_cache::prefill(&m, &first[..k], &KvCacheConfig::default(), 64)?;
    s.with_cache(cache, first[..k].to_vec())?;
    for (turn, text) in turns.iter().enumerate() {
        let before = s.cached_token_ids().to_vec();
        let mut messages = s.messages();
        messages.push(Message::user(*text));
        let ids = m.encode(&Prompt::Chat(messages.clone()))?;
        let common = common_prefix_len(&before, &ids).min(ids.len() - 1);
        let out = s.respond(text)?;
        let want = if common == before.len() {
            ids.len() - common
        } else {
            ids.len()
        };
        assert_eq!(
            out.stats.prompt_tokens, want,
            "turn {turn}: prefilled tokens"
        );
        if turn == 0 {
            assert_eq!(out.stats.prompt_tokens, 4);
        }
        let mut cache = m.model.new_cache();
        let fresh = generate(
            m.model.as_ref(),
            &m.tokenizer,
            &mut cache,
            &ids,
            params.clone(),
        )?
        .collect_output()?;
        assert_eq!(out.token_ids, fresh.token_ids, "{name} turn {turn}: reply");
    }
    Ok(())
}

#[test]
fn lfm2_session_carries_the_state_across_turns() -> Res<()> {
    check_session("lfm2")
}

#[test]
fn lfm2_mlx_q4_matches_mlx_lm() -> Res<()> {
    // mlx-lm's `[hidden, 3, 1]` convolution weight, 4-bit embedding, projections and
    // feed-forward. The kernels' 8-bit activations move the logits further than on the other
    // tiny models (measured 1.62 over prompt 1: the convolution blocks multiply three
    // projections, B ⊙ x' gated by C), hence the looser bound against gross errors.
    check_mlx_q4_logits("lfm2", 2.0)
}

#[test]
fn lfm2_gguf_matches_llama_cpp() -> Res<()> {
    // llama.cpp's own Q8_0 conversion (`tiny_lfm2.py --gguf`: `[hidden, 3]` convolution
    // weights, per-layer `head_count_kv` giving the layer kinds): 16 greedy tokens equal to
    // llama.cpp's on that file, and the loose bounds of `check_gguf`.
    check_gguf("lfm2", "lfm2", None)
}

// DeepSeek-V3 (`scripts/golden/tiny_deepseek_v3.py`): multi-head latent attention with a query
// low-rank (`q_lora_rank`), value heads narrower than the query/key heads, interleaved YaRN
// RoPE whose `mscale_all_dim` scales the softmax; 1 dense layer, then 2 MoE layers with 8
// experts in 4 groups (2 chosen), sigmoid scores with a selection bias, renormalized and
// scaled top-2 weights, and a shared expert. The `_lite` variant has one `q_proj`
// (`q_lora_rank: null`), plain RoPE and one expert group.

#[test]
fn deepseek_v3_matches_transformers() -> Res<()> {
    check_float("deepseek_v3", "deepseek_v3")
}

#[test]
fn deepseek_v3_lite_matches_transformers() -> Res<()> {
    check_float("deepseek_v3_lite", "deepseek_v3")
}

/// The KV cache holds the compressed form: one `[latent | rotary key]` head of 32 + 16 per
/// layer and position (the expanded form would be 2 heads of 48), in one-sequence and batched
/// decode alike.
#[test]
fn deepseek_v3_cache_is_compressed_and_batched_decode_matches() -> Res<()> {
    let m = load(path("deepseek_v3"), &cpu())?;
    let info = m.model.info();
    assert_eq!((info.n_kv_heads, info.head_dim), (1, 48));
    let mut cache = m.model.new_cache();
    let ids = tensors("deepseek_v3.golden.safetensors")?["ids0"].unsqueeze(0)?;
    m.model.forward(&ids, &mut cache, Logits::Last)?;
    let state = cache
        .layer(0)
        .and_then(|l| l.state().transpose())
        .ok_or("empty cache")??;
    assert_eq!(state.0.dims(), [1, 1, 20, 48]);
    check_batched_decode("deepseek_v3")
}

/// mlx-lm's 4-bit folder (`kv_b_proj` split into quantized per-head `embed_q` /
/// `unembed_out`, joined back at load; stacked `switch_mlp` experts): logits within 1e-4 of
/// mlx-lm's on the weights dequantized at load, 16 greedy tokens equal to mlx-lm's. On our
/// 4-bit kernels (activations rounded to 8 bits) 11 of the 12 positions stay within 1.4 of
/// mlx-lm's logits; at the last one the hidden state after the second MoE layer jumps (0.2 to
/// 2.9 from the dequantized model's, measured) as the rounding flips an expert choice, and the
/// logits move by 6.2: hence the bound of 7 there.
#[test]
fn deepseek_v3_mlx_q4_matches_mlx_lm() -> Res<()> {
    check_mlx_q4_logits("deepseek_v3", 7.0)
}

/// The training forward (differentiable ops through the latent attention, the router's choice
/// and the experts) gives the inference path's hidden states after all 3 blocks.
#[test]
fn deepseek_v3_training_forward_matches_inference() -> Res<()> {
    let m = load(path("deepseek_v3"), &cpu())?;
    let t = m.model.trainable().ok_or("deepseek_v3 is not trainable")?;
    let ids = tensors("deepseek_v3.golden.safetensors")?["ids1"].unsqueeze(0)?;
    let embedded = t.hidden_states(&ids, 0)?;
    let want = t.hidden_states(&ids, 3)?;
    let got = t.forward_blocks(&embedded, 0..3, false)?;
    let d = max_abs_diff(&got, &want)?;
    assert!(d <= 1e-4, "training vs inference forward: {d}");
    Ok(())
}

// GGUF files of llama.cpp's own converter for this round's architectures
// (`scripts/golden/tiny_gguf_2026.py`, run after the scripts above), loaded on our kernels.

/// `<name>.gguf` on our kernels against llama.cpp on the same file
/// (`<name>.gguf_llamacpp.safetensors`): the logits of every position of the prompt it chose
/// within `bound` of llama.cpp's, and its 16 greedy tokens (KV cache, one token per step)
/// equal to llama.cpp's. Where both run the same Q8_0 dot products (our kernels quantize the
/// activations as ggml does) the logits agree to float rounding; where ggml rounds the
/// activations of other types (to f16 for f16 weights, to Q8_0 for MXFP4 weights) and our
/// kernels keep them f32, they differ more, hence the per-model bounds. The script picks the
/// prompt whose greedy steps keep the widest top-1/top-2 margin. Returns the logits' max
/// difference.
fn check_llama_cpp(name: &str, golden: &str, arch: &str, bound: f32) -> Res<f32> {
    let r = tensors(&format!("{name}.gguf_llamacpp.safetensors"))?;
    let p = r["prompt"].to_vec1::<u32>()?[0];
    let ids = tensors(&format!("{golden}.golden.safetensors"))?[&format!("ids{p}")].clone();
    let m = load(path(&format!("{name}.gguf")), &cpu())?;
    assert_eq!(m.model.info().architecture, arch);
    let mut cache = m.model.new_cache();
    let got = m
        .model
        .forward(&ids.unsqueeze(0)?, &mut cache, Logits::All)?
        .squeeze(0)?;
    let d = max_abs_diff(&got, &r["logits"])?;
    let want = r["greedy"].to_vec1::<u32>()?;
    let margin = r["greedy_margin"].min(0)?.to_scalar::<f32>()?;
    let tokens = greedy(&m, &ids.to_vec1::<u32>()?, want.len())?;
    println!(
        "{name} gguf: logits max diff {d:.2e} against llama.cpp after prompt {p}; greedy {tokens:?} (llama.cpp's smallest margin {margin:.3})"
    );
    assert!(d <= bound, "{name} gguf: max |logits - llama.cpp| = {d}");
    assert_eq!(tokens, want, "{name} gguf: greedy tokens against llama.cpp");
    Ok(d)
}

/// Ministral 3 as llama.cpp's `mistral3`: YaRN, Llama 4's query temperature
/// (`mistral3.attention.temperature_scale`), Llama's permuted q/k rows.
/// Every weight Q8_0 or f32, as in llama.cpp: measured 1.9e-6.
#[test]
fn ministral3_gguf_matches_llama_cpp() -> Res<()> {
    check_llama_cpp("ministral3", "ministral3", "ministral3", 1e-4)?;
    Ok(())
}

/// Gemma 4 as llama.cpp's `gemma4`: every config field from the GGUF keys (sliding pattern,
/// per-layer head widths and KV heads, KV-shared layers with double-wide MLPs, per-layer
/// embeddings, proportional RoPE from `rope_freqs.weight`, soft-capping). The converter
/// keeps the per-layer projections (16 wide: not whole Q8_0 blocks) f16, whose inputs ggml
/// rounds to f16: measured 0.17 (logits up to 30; the f32 conversion, not kept for its size:
/// 1.7e-3).
#[test]
fn gemma4_text_gguf_matches_llama_cpp() -> Res<()> {
    check_llama_cpp("gemma4_text", "gemma4_text", "gemma4", 0.25)?;
    Ok(())
}

/// Gemma 4's mixture-of-experts layout (Gemma-4-26B-A4B's) as llama.cpp's `gemma4`: the config
/// from `expert_count` / `expert_used_count` / `expert_feed_forward_length` and the router
/// tensor; the experts kept fused by the converter (`ffn_gate_up_exps`, Q8_0, gate rows
/// first) and run as one `[2 · inter, hidden]` product each, the router's `scale` from
/// `ffn_gate_inp.scale`, `per_expert_scale` from `ffn_down_exps.scale`, the three extra norms.
/// Every matrix Q8_0 (whose dot products both sides run in ggml's order), the router f32:
/// measured 0, the logits bit for bit llama.cpp's (which are 0.74 from transformers' bfloat16
/// ones).
#[test]
fn gemma4_moe_gguf_matches_llama_cpp() -> Res<()> {
    check_llama_cpp("gemma4_moe", "gemma4_moe", "gemma4", 1e-3)?;
    Ok(())
}

/// gpt-oss as llama.cpp's `gpt-oss`, from the Hub's MXFP4 layout: experts MXFP4 (ggml type
/// 39) on our MXFP4 kernels, attention sinks, biases. Each expert read from the GGUF holds
/// exactly the codes and scales of the Hub folder's experts (reordered, never rounded).
/// ggml's MXFP4 dot product rounds its inputs to Q8_0 where our MXFP4 kernel keeps them f32:
/// measured 2.7 on logits of up to 30 (std 8), the tokens equal, with llama.cpp's smallest
/// margin 0.37. (The Q8_0 conversion of the bfloat16 `gpt_oss/` folder, not kept for its size,
/// measured 1.9e-6 against llama.cpp, 16/16 tokens equal.)
#[test]
fn gpt_oss_gguf_mxfp4_matches_llama_cpp() -> Res<()> {
    let file = pocketlm::gguf::GgufFile::open(path("gpt_oss_mxfp4.gguf"))?;
    let hub = tensors("gpt_oss_mxfp4/model.safetensors")?;
    let bytes = |t: &Tensor, e: usize| -> Res<Vec<u8>> {
        let v = t.get(e)?.flatten_all()?.to_dtype(candle_core::DType::U32)?;
        Ok(v.to_vec1::<u32>()?.into_iter().map(|x| x as u8).collect())
    };
    for l in 0..4 {
        let name = format!("blk.{l}.ffn_down_exps.weight");
        assert!(file.is_mxfp4(&name));
        let blocks = &hub[&format!("model.layers.{l}.mlp.experts.down_proj_blocks")];
        let scales = &hub[&format!("model.layers.{l}.mlp.experts.down_proj_scales")];
        for e in 0..4 {
            let ours = file.mxfp4_expert(&name, [4, 64, 32], e)?;
            let words: Vec<u32> = bytes(blocks, e)?
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(ours.weight(), &words[..], "{name} expert {e} codes");
            assert_eq!(
                ours.scales(),
                &bytes(scales, e)?[..],
                "{name} expert {e} scales"
            );
        }
    }
    check_llama_cpp("gpt_oss_mxfp4", "gpt_oss", "gpt_oss", 4.0)?;
    Ok(())
}

/// DeepSeek-V3 as llama.cpp's `deepseek2`: `kv_b_proj` rebuilt from the converter's
/// `attn_k_b` / `attn_v_b`, sigmoid group-limited routing with the selection bias, shared
/// experts, YaRN with `mscale_all_dim` in the softmax scale. The f16 conversion (why: the
/// script's `MODELS`), whose inputs ggml rounds to f16: measured 3.6e-2 (the f32 conversion,
/// not kept for its size: 2.7e-5).
#[test]
fn deepseek_v3_gguf_matches_llama_cpp() -> Res<()> {
    check_llama_cpp("deepseek_v3", "deepseek_v3", "deepseek_v3", 0.1)?;
    Ok(())
}

// Qwen3.5 (`scripts/golden/tiny_qwen3_5.py`): `qwen3_5` has 4 layers `[linear_attention,
// full_attention, linear_attention, full_attention]` (Gated DeltaNet with grouped value heads,
// gated full attention with partial RoPE, zero-centred norms), `qwen3_5_moe` 2 such layers with
// 4 experts (top-2) and a gated shared expert. The DeltaNet layers keep their convolution and
// recurrent states in an `ArraysCache` of two arrays.

#[test]
fn qwen3_5_matches_transformers() -> Res<()> {
    // Prefill of 3 prompts (our token-by-token recurrence against transformers' chunked one),
    // then 16 greedy steps of one token on the states and KV caches against transformers' full
    // forward passes without a cache.
    check_float("qwen3_5", "qwen3_5")
}

#[test]
fn qwen3_5_moe_matches_transformers() -> Res<()> {
    check_float("qwen3_5_moe", "qwen3_5_moe")
}

#[test]
fn qwen3_5_chunked_and_token_by_token_match_transformers() -> Res<()> {
    let cache = check_chunked("qwen3_5")?;
    // Two DeltaNet layers: convolution states [1, 3, 64] and recurrent states [1, 2, 16, 16]
    // f32; two attention layers of 20 positions (growing buffers of 256 positions, 1 KV head
    // of width 16, keys and values).
    let states = 2 * (3 * 64 + 2 * 16 * 16) * 4;
    assert_eq!(cache.nbytes(), states + 2 * 2 * 256 * 16 * 4);
    Ok(())
}

#[test]
fn qwen3_5_moe_chunked_and_token_by_token_match_transformers() -> Res<()> {
    check_chunked("qwen3_5_moe").map(|_| ())
}

#[test]
fn qwen3_5_prompt_cache_round_trips() -> Res<()> {
    check_prompt_cache("qwen3_5")
}

#[test]
fn qwen3_5_session_carries_the_state_across_turns() -> Res<()> {
    check_session("qwen3_5")
}

#[test]
fn qwen3_5_multimodal_layout_loads_text_model() -> Res<()> {
    // `Qwen3_5ForConditionalGeneration`'s layouts (`model_type` qwen3_5, `text_config`) of the
    // text folder, with Hugging Face's norms and convolution layout.
    check_multimodal("qwen3_5", "qwen3_5", "qwen3_5")?;
    check_multimodal("qwen3_5_moe", "qwen3_5_moe", "qwen3_5_moe")
}

/// The Qwen3.5-MoE Hub checkpoints' expert layout: the tiny MoE folder with its per-expert
/// weights (as transformers 5.24 saves them) fused into `mlp.experts.gate_up_proj` `[4, 64,
/// 64]` (gate rows first) and `mlp.experts.down_proj` `[4, 64, 32]` (transformers'
/// `Qwen3_5MoeExperts`) gives transformers' logits over prompt 0 (within 1e-4).
#[test]
fn qwen3_5_moe_fused_experts_load() -> Res<()> {
    let g = tensors("qwen3_5_moe.golden.safetensors")?;
    let tmp = tempfile::tempdir()?;
    for e in std::fs::read_dir(path("qwen3_5_moe"))? {
        let p = e?.path();
        std::fs::copy(&p, tmp.path().join(p.file_name().ok_or("no name")?))?;
    }
    let st = tmp.path().join("model.safetensors");
    let mut w = candle_core::safetensors::load(&st, &Device::Cpu)?;
    for l in 0..2 {
        let p = format!("model.layers.{l}.mlp.experts");
        let mut take = |e: usize, m: &str| {
            w.remove(&format!("{p}.{e}.{m}.weight"))
                .ok_or(format!("{p}.{e}.{m}.weight"))
        };
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..4 {
            gate_up.push(Tensor::cat(
                &[take(e, "gate_proj")?, take(e, "up_proj")?],
                0,
            )?);
            down.push(take(e, "down_proj")?);
        }
        w.insert(format!("{p}.gate_up_proj"), Tensor::stack(&gate_up, 0)?);
        w.insert(format!("{p}.down_proj"), Tensor::stack(&down, 0)?);
    }
    candle_core::safetensors::save(&w, &st)?;
    let m = load(tmp.path(), &cpu())?;
    let mut cache = m.model.new_cache();
    let got = m
        .model
        .forward(&g["ids0"].unsqueeze(0)?, &mut cache, Logits::All)?
        .squeeze(0)?;
    let d = max_abs_diff(&got, &g["logits0"])?;
    assert!(
        d <= 1e-4,
        "fused experts: max |logits - transformers| = {d}"
    );
    Ok(())
}

#[test]
fn qwen3_5_mlx_q4_matches_mlx_lm() -> Res<()> {
    // mlx-lm's folder: `language_model.model.` names, norms holding their 1, `[64, 4, 1]`
    // convolution weights (float), 4-bit projections and embedding.
    check_mlx_q4_logits("qwen3_5", 2.0)
}

#[test]
fn qwen3_5_moe_mlx_q4_matches_mlx_lm() -> Res<()> {
    // Stacked 4-bit `switch_mlp` experts, 8-bit router and shared expert gate. The kernels'
    // 8-bit activations move the logits by up to 2.29 (measured over prompt 1): a router
    // choice that flips swaps a whole expert's output, hence the looser bound.
    check_mlx_q4_logits("qwen3_5_moe", 2.5)
}

// Qwen3.5 as llama.cpp's `qwen35` / `qwen35moe` (`scripts/golden/tiny_gguf_2026.py`): the
// converter's forms taken as they are (`-exp(A_log)` as `ssm_a`, the convolution weight
// squeezed, norms holding their 1, the DeltaNet's value heads tiled), Q8_0 projections.

#[test]
fn qwen3_5_gguf_matches_llama_cpp() -> Res<()> {
    check_llama_cpp("qwen3_5", "qwen3_5", "qwen3_5", 1e-5)?;
    Ok(())
}

/// 2 key heads and 4 value heads: the converter's tiled value-head order is not the identity.
#[test]
fn qwen3_5_tiled_gguf_matches_llama_cpp() -> Res<()> {
    check_llama_cpp("qwen3_5_tiled", "qwen3_5", "qwen3_5", 1e-5)?;
    Ok(())
}

#[test]
fn qwen3_5_moe_gguf_matches_llama_cpp() -> Res<()> {
    check_llama_cpp("qwen3_5_moe", "qwen3_5_moe", "qwen3_5_moe", 1e-5)?;
    Ok(())
}

// Gemma 4 with the mixture-of-experts block (`scripts/golden/tiny_gemma4_moe.py`): 2 layers
// `[sliding, full]`, each with the dense MLP and 4 GELU-tanh experts (top 2) beside it, the
// router on the block's residual with `per_expert_scale`.

#[test]
fn gemma4_moe_matches_transformers() -> Res<()> {
    // transformers' fused `experts.gate_up_proj` / `experts.down_proj`.
    check_float("gemma4_moe", "gemma4")
}

#[test]
fn gemma4_moe_mlx_q4_matches_mlx_lm() -> Res<()> {
    // mlx-lm's stacked 4-bit `experts.switch_glu.*` and 8-bit `router.proj`.
    check_mlx_q4_logits("gemma4_moe", 2.5)
}

// LoRA on the architectures with their own model structs (issue #25: "`convert` and LoRA
// cover the new architectures"), on their tiny folders: for each, a session's adapters with
// random A and B on the last `num_layers` blocks, then
// - backward gives a nonzero gradient to every adapter variable, and two entries agree with
//   central finite differences of the loss (the differentiable path is the loss's);
// - the training path's logits equal the inference path's with the adapters;
// - the adapters change the logits; saved and loaded back they give the same logits; unload
//   restores the base logits bit for bit; `fuse` (float32) gives a folder whose logits are
//   within 1e-4 of the adapted model's.

/// `m`'s f32 logits `[seq, vocab]` of `ids` at every position, flattened.
fn all_logits(m: &LoadedModel, ids: &[u32]) -> Res<Vec<f32>> {
    let x = Tensor::new(ids, m.model.device())?.unsqueeze(0)?;
    let mut cache = m.model.new_cache();
    Ok(m.model
        .forward(&x, &mut cache, Logits::All)?
        .flatten_all()?
        .to_vec1()?)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// How far a float32 folder written by `convert` or `fuse` from a tiny model of `arch` may put
/// the logits from the source's: 1e-4 (the weights are only cast), except Qwen3.5's, whose
/// zero-centred norms are written as mlx-lm's `sanitize` writes them, `1 + w` rounded to the
/// checkpoint's bfloat16 (`convert_writes_2026_models_in_mlx_lm_layout_bit_for_bit`): measured
/// up to 0.23 on these models' logits (of up to 30); 0.3.
fn float_conversion_bound(arch: &str) -> f32 {
    if arch.starts_with("qwen3_5") {
        0.3
    } else {
        1e-4
    }
}

/// The LoRA checks above on folder `dir` (architecture `arch`), adapters on the last
/// `num_layers` blocks on `keys` (`None`: every linear layer); `want` the adapted layer names
/// the session must list (a few, by full module name).
fn check_lora(
    dir: PathBuf,
    arch: &str,
    num_layers: i64,
    keys: Option<&[&str]>,
    want: &[&str],
) -> Res<()> {
    check_lora_fd(dir, arch, num_layers, keys, want, true)
}

/// [`check_lora`]; `finite_differences: false` skips the comparison with finite differences
/// (for mixtures of experts, whose routing weights are constant for the gradient:
/// [`pocketlm::nn::Moe::forward`]).
fn check_lora_fd(
    dir: PathBuf,
    arch: &str,
    num_layers: i64,
    keys: Option<&[&str]>,
    want: &[&str],
    finite_differences: bool,
) -> Res<()> {
    use pocketlm::lora::train::TrainSession;
    use pocketlm::lora::{AdapterConfig, LoraParameters};
    use rand::{Rng, SeedableRng};

    let ids: Vec<u32> = vec![1, 17, 42, 99, 5, 120, 31, 8, 64, 3];
    let mut m = load(&dir, &cpu())?;
    assert_eq!(m.model.info().architecture, arch);
    let base = all_logits(&m, &ids)?;
    let params = LoraParameters {
        rank: 3,
        scale: 2.0,
        dropout: 0.0,
        keys: keys.map(|k| k.iter().map(|s| s.to_string()).collect()),
    };
    let cfg = AdapterConfig::new(num_layers, params);

    // Training: random adapters, gradients, finite differences.
    let mut s = TrainSession::new(m.model.as_mut(), &cfg, None, 1, 1 << 20)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for v in s.vars() {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.random_range(-0.2f32..0.2))
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), v.device())?)?;
    }
    let ex = [
        pocketlm::lora::data::Example {
            tokens: ids.clone(),
            offset: 0,
        },
        pocketlm::lora::data::Example {
            tokens: vec![9, 110, 33, 71, 5, 60],
            offset: 2,
        },
    ];
    let batch: Vec<(usize, &pocketlm::lora::data::Example)> = ex.iter().enumerate().collect();
    let (loss, _) = s.batch_loss(0, &batch, 64, false)?;
    let grads = loss.backward()?;
    let vars = s.vars().to_vec();
    for (vi, v) in vars.iter().enumerate() {
        let g: Vec<f32> = grads
            .get(v.as_tensor())
            .ok_or("no gradient for an adapter variable")?
            .flatten_all()?
            .to_vec1()?;
        assert!(
            g.iter().any(|x| x.abs() > 1e-5),
            "{arch}: variable {vi}: gradient all ~0"
        );
        // The lowest adapted layer's A (gradients through every adapted block) and the top's B.
        if finite_differences && (vi == 0 || vi == vars.len() - 1) {
            let i = (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap_or(0);
            let orig: Vec<f32> = v.flatten_all()?.to_vec1()?;
            let eps = 2e-3f32;
            let mut eval = |d: f32| -> Res<f64> {
                let mut p = orig.clone();
                p[i] += d;
                v.set(&Tensor::from_vec(p, v.shape(), v.device())?)?;
                Ok(s.batch_loss(0, &batch, 64, false)?.0.to_scalar::<f32>()? as f64)
            };
            let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps as f64);
            v.set(&Tensor::from_vec(orig, v.shape(), v.device())?)?;
            let an = g[i] as f64;
            assert!(
                (an - fd).abs() <= 5e-4 + 2e-2 * an.abs(),
                "{arch}: variable {vi} entry {i}: backward {an}, finite difference {fd}"
            );
        }
    }
    let first = s.first;
    s.finish()?;

    // The adapted model: inference and training paths agree, the logits moved.
    let adapted = all_logits(&m, &ids)?;
    let scale = adapted.iter().fold(1f32, |a, x| a.max(x.abs()));
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let t = m.model.trainable().ok_or("not trainable")?;
    let h = t.hidden_states(&x, first)?;
    let train_path: Vec<f32> = t
        .forward_from(&h, first, false, None)?
        .flatten_all()?
        .to_vec1()?;
    let d = max_diff(&train_path, &adapted);
    assert!(d <= 1e-4 * scale, "{arch}: training vs inference path: {d}");
    let moved = max_diff(&adapted, &base);
    assert!(
        moved > 1e-2,
        "{arch}: the adapters moved the logits by {moved}"
    );

    round_trip(m, &dir, arch, &cfg, &ids, &base, &adapted, want)
}

/// The adapter loaded in `m` (config `cfg`; `adapted` its logits of `ids`, `base` those of
/// the base): it names the layers `want`; saved and loaded back it gives `adapted`, unloaded
/// `base` (exactly); `dir` fused with it (float32) gives `adapted` within 1e-4.
#[allow(clippy::too_many_arguments)]
fn round_trip(
    mut m: LoadedModel,
    dir: &std::path::Path,
    arch: &str,
    cfg: &pocketlm::lora::AdapterConfig,
    ids: &[u32],
    base: &[f32],
    adapted: &[f32],
    want: &[&str],
) -> Res<()> {
    use pocketlm::lora::{fuse, unload, Adapter};
    let moved = max_diff(adapted, base);
    assert!(
        moved > 1e-2,
        "{arch}: the adapters moved the logits by {moved}"
    );
    let adapter = Adapter::from_model(m.model.as_mut(), cfg.clone())?;
    for name in want {
        assert!(
            adapter.weights.contains_key(*name),
            "{arch}: no adapter on {name}; have {:?}",
            adapter.weights.keys().collect::<Vec<_>>()
        );
    }
    let tmp = tempfile::tempdir()?;
    adapter.save(tmp.path().join("adapter"))?;
    assert!(unload(m.model.as_mut()) > 0);
    assert_eq!(all_logits(&m, ids)?, base, "{arch}: unload");
    let loaded = Adapter::load(tmp.path().join("adapter"))?;
    assert_eq!(loaded.weights.len(), adapter.weights.len());
    let n = loaded.apply(m.model.as_mut())?;
    assert_eq!(n, adapter.weights.len());
    assert_eq!(
        all_logits(&m, ids)?,
        adapted,
        "{arch}: adapter after save/load"
    );
    unload(m.model.as_mut());
    assert_eq!(all_logits(&m, ids)?, base, "{arch}: second unload");
    drop(m);
    // The plain float32 conversion keeps the base logits.
    let opts = pocketlm::convert::ConvertOptions {
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    };
    let f32_dir = tmp.path().join("f32");
    pocketlm::convert::convert(dir, &f32_dir, &opts, &mut |_| {})?;
    let d = max_diff(&all_logits(&load(&f32_dir, &cpu())?, ids)?, base);
    let bound = float_conversion_bound(arch);
    assert!(d <= bound, "{arch}: float32 conversion vs source: {d}");
    let fused_dir = tmp.path().join("fused");
    fuse(
        dir,
        &loaded,
        &fused_dir,
        false,
        Some(candle_core::DType::F32),
        &mut |_| {},
    )?;
    let fused = load(&fused_dir, &cpu())?;
    let d = max_diff(&all_logits(&fused, ids)?, adapted);
    assert!(d <= bound, "{arch}: fused vs adapted: {d}");
    println!(
        "{arch}: {} adapted layers, logits moved {moved:.3}, fused within {d:.1e}",
        adapter.weights.len()
    );
    Ok(())
}

#[test]
fn lora_gemma4() -> Res<()> {
    // 5 layers [sliding, sliding, full, sliding, full], the full ones with keys as values (no
    // v_proj), the last 2 KV-shared (no k_proj / v_proj: they attend over layers 1's and 2's
    // keys and values, which reach them through the training carry), per-layer inputs.
    // Adapters on the last 4 blocks: layer 2's k_proj gets gradients from layers 2 and 4.
    check_lora(
        path("gemma4_text"),
        "gemma4",
        4,
        None,
        &[
            "model.layers.2.self_attn.k_proj",
            "model.layers.3.self_attn.q_proj",
            "model.layers.4.per_layer_projection",
            "model.layers.4.mlp.up_proj",
        ],
    )
}

#[test]
fn lora_gemma4_moe() -> Res<()> {
    // The MoE block beside the MLP: adapters on attention and the MLP, the experts' routing
    // constant for the gradient (hence no finite differences, as for the other MoE models).
    check_lora_fd(
        path("gemma4_moe"),
        "gemma4",
        -1,
        None,
        &[
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.mlp.down_proj",
        ],
        false,
    )
}

/// Gemma 4's training forward (through the carry of hidden states, per-layer inputs and
/// shared keys and values) gives the inference path's hidden states after all blocks within
/// 1e-5 of their largest magnitude (measured 1.8e-4 of 64 and 2.8e-5 of 29), and the same carry bit for bit
/// whether it runs whole or in two ranges split anywhere (as gradient checkpointing runs it).
#[test]
fn gemma4_training_forward_matches_inference() -> Res<()> {
    for name in ["gemma4_text", "gemma4_moe"] {
        let m = load(path(name), &cpu())?;
        let t = m.model.trainable().ok_or("gemma4 is not trainable")?;
        let n = m.model.info().n_layers;
        let h = m.model.info().hidden_size;
        let ids = tensors(&format!("{name}.golden.safetensors"))?["ids1"].unsqueeze(0)?;
        let hidden = |c: &Tensor| -> Res<Vec<f32>> {
            Ok(c.narrow(2, 0, h)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let want = hidden(&t.hidden_states(&ids, n)?)?;
        let embedded = t.hidden_states(&ids, 0)?;
        let whole = t.forward_blocks(&embedded, 0..n, false)?;
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = max_diff(&hidden(&whole)?, &want);
        println!("{name}: training vs inference hidden states {d:.2e} (largest {scale:.1})");
        assert!(d <= 1e-5 * scale, "{name}: training vs inference: {d}");
        let all = whole.flatten_all()?.to_vec1::<f32>()?;
        for split in 1..n {
            let mid = t.forward_blocks(&embedded, 0..split, false)?;
            let got = t.forward_blocks(&mid, split..n, false)?;
            assert!(
                got.flatten_all()?.to_vec1::<f32>()? == all,
                "{name}: blocks split at {split} differ from the whole run"
            );
        }
    }
    Ok(())
}

fn archs_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/archs")
        .join(name)
}

#[test]
fn lora_gemma2() -> Res<()> {
    check_lora(
        archs_path("gemma2"),
        "gemma2",
        -1,
        None,
        &[
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.mlp.down_proj",
        ],
    )
}

#[test]
fn lora_gemma3() -> Res<()> {
    check_lora(
        archs_path("gemma3"),
        "gemma3",
        2,
        Some(&["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj"]),
        &["model.layers.1.self_attn.o_proj"],
    )
}

#[test]
fn lora_lfm2() -> Res<()> {
    // 4 blocks [conv, attention, conv, attention]: the last 3 with every linear layer.
    check_lora(
        path("lfm2"),
        "lfm2",
        3,
        None,
        &[
            "model.layers.1.self_attn.out_proj",
            "model.layers.2.conv.in_proj",
            "model.layers.2.conv.out_proj",
            "model.layers.3.feed_forward.w1",
        ],
    )
}

#[test]
fn lora_deepseek_v3() -> Res<()> {
    // Built on the Llama stack; MoE layers (routing constant for the gradient).
    check_lora_fd(
        path("deepseek_v3"),
        "deepseek_v3",
        -1,
        None,
        &["model.layers.0.self_attn.kv_a_proj_with_mqa"],
        false,
    )
}

#[test]
fn lora_qwen3_5() -> Res<()> {
    // [linear, full, linear, full] attention: gradients through the Gated DeltaNet layers.
    check_lora(
        path("qwen3_5"),
        "qwen3_5",
        -1,
        None,
        &[
            "model.layers.0.linear_attn.in_proj_qkv",
            "model.layers.1.self_attn.q_proj",
            "model.layers.2.linear_attn.in_proj_a",
            "model.layers.2.linear_attn.out_proj",
            "model.layers.3.mlp.down_proj",
        ],
    )
}

#[test]
fn lora_qwen3_5_moe() -> Res<()> {
    check_lora_fd(
        path("qwen3_5_moe"),
        "qwen3_5_moe",
        -1,
        Some(&["self_attn.o_proj", "linear_attn.in_proj_z"]),
        &["model.layers.0.linear_attn.in_proj_z"],
        false,
    )
}

#[test]
fn lora_qwen2_vl() -> Res<()> {
    // The language model of the tiny Qwen2-VL (text-only examples).
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/vlm/qwen2_vl");
    check_lora(
        dir,
        "qwen2_vl",
        1,
        Some(&["self_attn.q_proj", "self_attn.k_proj"]),
        &["language_model.model.layers.1.self_attn.k_proj"],
    )
}

/// mlx-lm's own adapter on a tiny folder (`scripts/golden/lora_2026.py`: `<name>_lora/`, made
/// and loaded by mlx-lm under its module names) applied here, against mlx-lm's float32 logits
/// over the prompt with the adapter (`mlx_lm.load(adapter_path=...)`) and without:
/// - the base logits are within `base_bound` of mlx-lm's;
/// - with the adapter, the logits are within `bound` of mlx-lm's, and so are the adapter's
///   effect (adapted minus base logits, of each side) and the logits of the folder fused with
///   it; the effect itself is over 100 times `bound`.
fn check_mlx_adapter(name: &str, base_bound: f32, bound: f32) -> Res<()> {
    use pocketlm::lora::{fuse, Adapter};
    let g = tensors(&format!("{name}_lora.golden.safetensors"))?;
    let ids = g["ids"].to_vec1::<u32>()?;
    let want = g["logits"].flatten_all()?.to_vec1::<f32>()?;
    let want_base = g["base_logits"].flatten_all()?.to_vec1::<f32>()?;
    let adapter = Adapter::load(path(&format!("{name}_lora")))?;
    let mut m = load(path(name), &cpu())?;
    let base = all_logits(&m, &ids)?;
    let db = max_diff(&base, &want_base);
    assert!(db <= base_bound, "{name}: base {db} from mlx-lm");
    let n = adapter.apply(m.model.as_mut())?;
    assert_eq!(n, adapter.weights.len());
    let got = all_logits(&m, &ids)?;
    let d = max_diff(&got, &want);
    let effect = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>();
    let want_effect = effect(&want, &want_base);
    let de = max_diff(&effect(&got, &base), &want_effect);
    let moved = want_effect.iter().fold(0f32, |a, x| a.max(x.abs()));
    assert!(
        d <= bound && de <= bound && moved > 100.0 * bound,
        "{name}: with mlx-lm's adapter {d} from mlx-lm, its effect {de} from mlx-lm's \
         (which moved the logits by {moved})"
    );
    drop(m);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("fused");
    fuse(
        &path(name),
        &adapter,
        &out,
        false,
        Some(candle_core::DType::F32),
        &mut |_| {},
    )?;
    let fd = max_diff(&all_logits(&load(&out, &cpu())?, &ids)?, &want);
    let fused_bound = bound.max(float_conversion_bound(name));
    assert!(fd <= fused_bound, "{name}: fused folder {fd} from mlx-lm");
    println!(
        "{name}: base {db:.1e} from mlx-lm; with mlx-lm's adapter {d:.1e}, its effect \
         {de:.1e} (of {moved:.2}), fused {fd:.1e}"
    );
    Ok(())
}

#[test]
fn lora_lfm2_matches_mlx_lm() -> Res<()> {
    check_mlx_adapter("lfm2", 1e-4, 1e-4)
}

#[test]
fn lora_qwen3_5_matches_mlx_lm() -> Res<()> {
    // mlx-lm's names from its wrapped `qwen3_5` model (`language_model.model.layers...`) on
    // the text-only folder.
    check_mlx_adapter("qwen3_5", 1e-4, 1e-4)
}

// `convert -q` of the MoE folders against mlx-lm's own conversions (`<name>_mlx_q4`, 4-bit
// group 32): the layers quantized other than the default (mlx-lm's `quant_predicate`: the
// routers at 8 bits, group 64) are the same, by canonical name (mlx-lm's `qwen3_5_moe` names
// them under `language_model.`).

fn per_layer_quant(config: &serde_json::Value) -> Res<Vec<(String, serde_json::Value)>> {
    let q = config
        .get("quantization")
        .and_then(|q| q.as_object())
        .ok_or("config.json has no quantization")?;
    let mut out: Vec<(String, serde_json::Value)> = q
        .iter()
        .filter(|(_, v)| {
            !matches!(
                v,
                serde_json::Value::Number(_) | serde_json::Value::String(_)
            )
        })
        .map(|(k, v)| {
            let v = match v.as_object() {
                Some(o) => {
                    serde_json::json!({"bits": o.get("bits"), "group_size": o.get("group_size")})
                }
                None => v.clone(),
            };
            (pocketlm::lora::canonical_name(k), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// `convert -q --q-bits 4 --q-group-size 32` (the settings of the golden `*_mlx_q4` folders,
/// in `dtype` when given) of golden folder `name` into `q4` under a fresh temporary folder.
fn convert_q4_g32(
    name: &str,
    dtype: Option<candle_core::DType>,
) -> Res<(tempfile::TempDir, PathBuf)> {
    use pocketlm::convert::{convert, ConvertOptions};
    use pocketlm::safetensors_weights::QuantParams;
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("q4");
    let opts = ConvertOptions {
        quantize: Some(QuantParams {
            group_size: 32,
            bits: 4,
        }),
        dtype,
        ..Default::default()
    };
    convert(&path(name), &out, &opts, &mut |_| {})?;
    Ok((tmp, out))
}

fn check_convert_quant_layers(name: &str) -> Res<()> {
    let (_tmp, out) = convert_q4_g32(name, None)?;
    let read = |p: PathBuf| -> Res<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
    };
    let ours = per_layer_quant(&read(out.join("config.json"))?)?;
    let mlx = per_layer_quant(&read(path(&format!("{name}_mlx_q4")).join("config.json"))?)?;
    assert!(
        !mlx.is_empty(),
        "{name}: mlx-lm quantized no layer otherwise"
    );
    assert_eq!(ours, mlx, "{name}: per-layer quantization against mlx-lm's");
    // And the result loads and runs.
    let m = load(&out, &cpu())?;
    let l = all_logits(&m, &[1, 2, 3])?;
    assert!(l.iter().all(|x| x.is_finite()));
    Ok(())
}

/// A stored tensor: dtype name, shape, bytes.
type StoredTensor = (String, Vec<usize>, Vec<u8>);

/// Every tensor of the `*.safetensors` files of `dir`, by name.
fn safetensors_of(dir: &std::path::Path) -> Res<HashMap<String, StoredTensor>> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p)?;
            let st = safetensors::SafeTensors::deserialize(&bytes)?;
            for (name, view) in st.tensors() {
                let v = (
                    format!("{:?}", view.dtype()),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                );
                out.insert(name, v);
            }
        }
    }
    Ok(out)
}

/// `convert -q` of a Hugging Face folder of the 2026 architectures whose mlx-lm modules
/// rewrite the weights writes what `mlx_lm.convert` writes, tensor for tensor and bit for bit
/// (the same 4-bit g32 float32 conversion, committed by the golden scripts of
/// `scripts/golden/`): per-expert weights stacked into `switch_mlp`, gpt-oss's and Gemma 4's
/// fused `gate_up_proj` split (and transposed for gpt-oss), all quantized as 3-D
/// `SwitchLinear` weights; for DeepSeek-V3 `kv_b_proj` split into the `MultiLinear` `embed_q`
/// / `unembed_out`, the router `mlp.gate` in float and its correction bias in its own dtype;
/// for Qwen3.5 (dense and MoE) every tensor under `language_model.`, the DeltaNet convolution
/// as `[channels, kernel, 1]`, the zero-centred norms as `1 + w` rounded to bfloat16, `A_log`
/// kept bfloat16, and config.json in the wrapper form (`text_config`, the quantization's layer
/// paths under `language_model.`) (mlx-lm's `sanitize`, `cast_predicate` and
/// `quant_predicate`). So mlx-lm loads our conversions of these models.
///
/// The float conversions (same layout, unquantized) give the source's logits within 1e-4,
/// except Qwen3.5's: mlx-lm rounds `1 + w` of its norms to bfloat16, which moves the logits by
/// 0.144 (qwen3_5_moe) and 0.131 (qwen3_5), measured; transformers 5.24 with the same rounding
/// applied to those norms moves them by the same amounts (0.14389 here, 0.14389 there, on ids
/// 1..=5); bound 0.2.
#[test]
fn convert_writes_2026_models_in_mlx_lm_layout_bit_for_bit() -> Res<()> {
    use pocketlm::convert::{convert, ConvertOptions};
    let moe = [
        "qwen3_moe",
        "deepseek_v3",
        "gpt_oss",
        "gemma4_moe",
        "qwen3_5_moe",
    ];
    for name in moe.into_iter().chain(["qwen3_5"]) {
        let (tmp, out) = convert_q4_g32(name, Some(candle_core::DType::F32))?;
        let ours = safetensors_of(&out)?;
        let mlx = safetensors_of(&path(&format!("{name}_mlx_q4")))?;
        let mut a: Vec<&String> = ours.keys().collect();
        let mut b: Vec<&String> = mlx.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: tensor names against mlx-lm's conversion");
        assert!(
            !moe.contains(&name)
                || mlx.iter().any(
                    |(k, v)| (k.contains("experts.") || k.contains("switch_mlp."))
                        && k.ends_with(".scales")
                        && v.1.len() == 3
                ),
            "{name}: mlx-lm's conversion has quantized expert stacks"
        );
        for (k, (dt, shape, bytes)) in &mlx {
            let (odt, oshape, obytes) = &ours[k];
            assert_eq!((odt, oshape), (dt, shape), "{name}: {k}");
            assert!(obytes == bytes, "{name}: {k} differs from mlx-lm's bytes");
        }
        // config.json: the same model type and per-layer quantization (mlx 0.32 also writes
        // the default `mode: affine`, which we leave out).
        let read = |p: PathBuf| -> Res<serde_json::Value> {
            Ok(serde_json::from_str(&std::fs::read_to_string(
                p.join("config.json"),
            )?)?)
        };
        let (oc, mc) = (read(out.clone())?, read(path(&format!("{name}_mlx_q4")))?);
        assert_eq!(oc["model_type"], mc["model_type"], "{name}: model_type");
        let mut mq = mc["quantization"].clone();
        mq.as_object_mut().map(|q| q.remove("mode"));
        assert_eq!(oc["quantization"], mq, "{name}: quantization");
        // And it loads and runs here.
        let l = all_logits(&load(&out, &cpu())?, &[1, 2, 3])?;
        assert!(l.iter().all(|x| x.is_finite()), "{name}");
        let f32_dir = tmp.path().join("f32");
        let opts = ConvertOptions {
            dtype: Some(candle_core::DType::F32),
            ..Default::default()
        };
        convert(&path(name), &f32_dir, &opts, &mut |_| {})?;
        let ids = [1, 2, 3, 4, 5];
        let base = all_logits(&load(path(name), &cpu())?, &ids)?;
        let d = max_diff(&all_logits(&load(&f32_dir, &cpu())?, &ids)?, &base);
        let bound = if name.starts_with("qwen3_5") {
            0.2
        } else {
            1e-4
        };
        println!("{name}: float32 conversion vs source: {d:.2e}");
        assert!(d <= bound, "{name}: float32 conversion vs source: {d}");
    }
    Ok(())
}

#[test]
fn convert_quantizes_routers_as_mlx_lm() -> Res<()> {
    for name in ["qwen3_moe", "qwen3_5_moe", "gemma4_moe", "gpt_oss"] {
        check_convert_quant_layers(name)?;
    }
    Ok(())
}

/// A GGUF whose Gated DeltaNet value heads are stored tiled (2 key, 4 value heads) offers no
/// adapter slots on its linear-attention layers (their rows are not in Hugging Face order);
/// the untiled GGUF does.
#[test]
fn lora_qwen3_5_tiled_gguf_has_no_linear_attention_slots() -> Res<()> {
    for (file, tiled) in [("qwen3_5_tiled.gguf", true), ("qwen3_5.gguf", false)] {
        let mut m = load(path(file), &cpu())?;
        let t = m.model.trainable_mut().ok_or("not trainable")?;
        let names: Vec<String> = t.linears_mut().into_iter().map(|s| s.name).collect();
        let linear = names.iter().any(|n| n.contains(".linear_attn."));
        assert!(
            names.iter().any(|n| n.contains(".self_attn.q_proj")),
            "{file}: {names:?}"
        );
        assert_eq!(linear, !tiled, "{file}: {names:?}");
    }
    Ok(())
}

/// `bench::compare_batched` of the tiny gpt-oss with itself on the CPU (the check `agree
/// --batch` runs against a GPU), with growing and with paged caches: every prompt's 6 greedy
/// tokens equal and its batched logits within 1e-4 of the one-sequence ones; and `bench::run`
/// with a batch size adds the batched decode test (and with `paged` its paged twin),
/// counting the tokens of every sequence.
#[test]
fn batched_agreement_and_bench_on_the_cpu() -> Res<()> {
    let g = tensors("gpt_oss.golden.safetensors")?;
    let m = load(path("gpt_oss"), &cpu())?;
    let prompts = (0..3)
        .map(|p| g[&format!("ids{p}")].to_vec1::<u32>())
        .collect::<Result<Vec<_>, _>>()?;
    let model = m.model.as_ref();
    for paged in [false, true] {
        let rs = pocketlm::bench::compare_batched(model, model, &prompts, 6, paged)?;
        assert_eq!(rs.len(), 3);
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.equal_steps, 6, "prompt {i} (paged {paged}): {r:?}");
            assert!(r.max_abs_logit_diff <= 1e-4, "prompt {i}: {r:?}");
            assert_eq!(r.prompt_tokens, prompts[i].len());
        }
    }
    let params = pocketlm::bench::BenchParams {
        n_prompt: vec![5],
        n_gen: vec![4],
        depth: vec![0, 20],
        repetitions: 1,
        batch: vec![1, 3],
        paged: true,
        ..Default::default()
    };
    let report = pocketlm::bench::run(&m, &params)?;
    let names: Vec<&str> = report.tests.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "pp5",
            "tg4",
            "tg4 x3",
            "tg4 x3 paged",
            "pp5 @ d20",
            "pp5 @ d20 paged",
            "tg4 @ d20",
            "tg4 x3 @ d20",
            "tg4 x3 @ d20 paged"
        ]
    );
    for t in &report.tests {
        let want = match (t.name.starts_with("pp"), t.name.contains("x3")) {
            (true, _) => 5,
            (false, true) => 12,
            (false, false) => 4,
        };
        assert_eq!(t.n_tokens, want, "{}", t.name);
        assert!(t.mean_tps > 0.0);
    }
    Ok(())
}
