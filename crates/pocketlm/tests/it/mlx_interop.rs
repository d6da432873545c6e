//! Interop with mlx-lm on the real default model, against `tests/golden/mlx_interop/golden.json`
//! (from `scripts/golden/mlx_interop.py`, mlx 0.32.4 / mlx-lm 0.32.2):
//!
//! - pocketlm -> mlx-lm: `convert` of the default GGUF (f32, 4-bit / group 64, and mlx-lm's
//!   `mixed_3_6` recipe) gives, on pocketlm, the greedy tokens mlx-lm gives on the same folders.
//! - mlx-lm -> pocketlm: the folders `mlx_lm.convert -q` wrote from a float folder of the same
//!   model hold exactly our conversion's tensors (each tensor's dtype, shape and sha256 prefix
//!   match the golden digests, and the script checked the rest bit for bit), so pocketlm runs
//!   them here as our weights with mlx-lm's own config.json, and must give mlx-lm's tokens.
//!   With `POCKETLM_MLX_INTEROP_WORK` set to the script's `--work` folder, the mlx-lm-written
//!   folders themselves are loaded too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pocketlm::chat_template::Message;
use pocketlm::convert::{convert, ConvertOptions, QuantRecipe};
use pocketlm::loader::{load, LoadOptions, LoadedModel, Prompt};
use pocketlm::safetensors_weights::QuantParams;
use sha2::{Digest, Sha256};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn golden() -> Res<serde_json::Value> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/mlx_interop/golden.json");
    let text = std::fs::read_to_string(&p)
        .map_err(|e| format!("{}: {e} (run scripts/golden/mlx_interop.py)", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn default_gguf() -> PathBuf {
    pocketlm_testutil::default_model_path()
}

fn cpu() -> LoadOptions {
    LoadOptions {
        device: pocketlm::device::DeviceSpec::Cpu,
        dequantize: false,
        ..Default::default()
    }
}

/// `steps` greedy tokens after `prompt`, no end-of-generation stop (as the script's loop).
fn greedy(m: &LoadedModel, prompt: &[u32], steps: usize) -> Res<Vec<u32>> {
    Ok(pocketlm_testutil::greedy(m.model.as_ref(), prompt, steps)?)
}

/// `dtype[shape]:h` for every tensor of a folder's safetensors files, as the script writes
/// them (h: the first 16 hex digits of the sha256 of the stored bytes).
fn digests(dir: &Path) -> Res<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => "float32",
                safetensors::Dtype::F16 => "float16",
                safetensors::Dtype::BF16 => "bfloat16",
                safetensors::Dtype::U32 => "uint32",
                d => return Err(format!("{name}: unexpected dtype {d:?}").into()),
            };
            let shape: Vec<String> = view.shape().iter().map(|d| d.to_string()).collect();
            let hash = Sha256::digest(view.data());
            let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
            out.insert(name, format!("{dtype}[{}]:{hex}", shape.join(",")));
        }
    }
    Ok(out)
}

/// Positions where `got` equals `want`, and the length of the common prefix.
fn agreement(got: &[u32], want: &[u32]) -> (usize, usize) {
    let equal = got.iter().zip(want).filter(|(a, b)| a == b).count();
    let prefix = got.iter().zip(want).take_while(|(a, b)| a == b).count();
    (equal, prefix)
}

fn ids(v: &serde_json::Value) -> Res<Vec<u32>> {
    v.as_array()
        .ok_or("expected a list of ids")?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|i| i as u32)
                .ok_or_else(|| "expected an id".into())
        })
        .collect()
}

/// One direction pair for one quantization: our folder in pocketlm vs mlx-lm on it, and the
/// mlx-lm-written folder (our verified-identical weights + mlx-lm's config.json) vs mlx-lm.
fn check(recipe: Option<QuantRecipe>, ours: &str, theirs: &str) -> Res<()> {
    let g = golden()?;
    let steps = g["steps"].as_u64().ok_or("steps")? as usize;
    let prompt = ids(&g["prompt_ids"])?;
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join(ours);
    let opts = ConvertOptions {
        quantize: Some(QuantParams {
            group_size: 64,
            bits: 4,
        }),
        recipe,
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    };
    convert(&default_gguf(), &out, &opts, &mut |_| {})?;

    // Our weights are mlx-lm's, tensor by tensor.
    let folder = &g["mlx_folders"][theirs];
    let want: BTreeMap<String, String> = serde_json::from_value(folder["tensors"].clone())?;
    let got = digests(&out)?;
    let differ: Vec<&String> = want
        .keys()
        .chain(got.keys())
        .filter(|k| want.get(*k) != got.get(*k))
        .collect();
    assert!(
        differ.is_empty(),
        "{ours}: {} tensors differ from mlx_lm.convert's {theirs}, e.g. {:?}",
        differ.len(),
        &differ[..differ.len().min(5)]
    );

    let m = load(&out, &cpu())?;
    let messages: Vec<Message> = serde_json::from_value(g["messages"].clone())?;
    assert_eq!(
        m.encode(&Prompt::Chat(messages))?,
        prompt,
        "the chat prompt tokenizes as in mlx-lm"
    );
    let mlx_on_ours = ids(&g["tokens"][ours])?;
    let tokens = greedy(&m, &prompt, steps)?;
    let (eq, prefix) = agreement(&tokens, &mlx_on_ours);
    eprintln!("pocketlm -> mlx-lm ({ours}): {eq}/{steps} tokens equal (common prefix {prefix})");

    // mlx-lm's folder: its config.json over the (identical) weights.
    let mlx_dir = tmp.path().join(theirs);
    std::fs::create_dir(&mlx_dir)?;
    for e in std::fs::read_dir(&out)? {
        let p = e?.path();
        let name = p.file_name().ok_or("file name")?;
        if name != "config.json" {
            std::fs::copy(&p, mlx_dir.join(name))?;
        }
    }
    std::fs::write(
        mlx_dir.join("config.json"),
        serde_json::to_string_pretty(&folder["config"])?,
    )?;
    let mlx_tokens = ids(&g["tokens"][theirs])?;
    let mut dirs = vec![mlx_dir];
    if let Some(work) = std::env::var_os("POCKETLM_MLX_INTEROP_WORK") {
        dirs.push(PathBuf::from(work).join(theirs));
    }
    let mut results = vec![(eq, &mlx_on_ours, tokens)];
    for dir in dirs {
        let mt = load(&dir, &cpu())?;
        let tokens = greedy(&mt, &prompt, steps)?;
        let (eq, prefix) = agreement(&tokens, &mlx_tokens);
        eprintln!(
            "mlx-lm -> pocketlm ({}): {eq}/{steps} tokens equal (common prefix {prefix})",
            dir.display()
        );
        results.push((eq, &mlx_tokens, tokens));
    }
    for (eq, want, got) in results {
        assert_eq!(
            eq, steps,
            "greedy tokens: pocketlm {got:?}, mlx-lm {want:?}"
        );
    }
    Ok(())
}

#[test]
fn q4_folders_match_mlx_lm_both_ways() -> Res<()> {
    check(None, "ours_q4", "mlx_q4")
}

#[test]
fn mixed_3_6_folders_match_mlx_lm_both_ways() -> Res<()> {
    check(Some(QuantRecipe::Mixed3_6), "ours_mixed", "mlx_mixed")
}
