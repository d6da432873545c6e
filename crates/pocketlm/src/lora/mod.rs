//! LoRA adapters in mlx-lm's format (`mlx_lm/tuner/utils.py`, `mlx_lm/tuner/lora.py`):
//! loading into a loaded model (each selected [`Linear`] becomes a [`Linear::Lora`]),
//! unloading, hot-swapping, saving, and fusing into the base weights.
//!
//! An adapter folder holds
//! - `adapter_config.json`: `fine_tune_type` (`"lora"`), `num_layers` (the last `num_layers`
//!   blocks get adapters; `-1` or more than the model has: all), and
//!   `lora_parameters {rank, scale, dropout, keys}` (`keys`: module names within a block such as
//!   `self_attn.q_proj`; absent: every linear layer of the block, as mlx-lm does). Other fields
//!   (mlx-lm writes all its training arguments) are kept but not used.
//! - `adapters.safetensors`: `model.layers.{i}.{key}.lora_a` `[in, r]` and `.lora_b`
//!   `[r, out]`, float, in Hugging Face row order.
//!
//! The update is `y = x W^T + scale · (x A) B` (see [`crate::nn::lora`]).

pub mod data;
pub mod train;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub use crate::models::canonical_name;
use crate::models::{CausalLM, LinearSlot, Trainable};
use crate::nn::{Linear, LoraLinear};
use crate::weights::QkRowOrder;
use crate::{Error, Result};

/// File name of the adapter configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const WEIGHTS_FILE: &str = "adapters.safetensors";

/// Errors of adapter files and of applying adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// `adapter_config.json` is missing a field or has a bad value.
    #[error("{}: {msg}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor of `adapters.safetensors` is missing, unexpected or misshapen.
    #[error("{}: tensor `{name}`: {msg}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// The model has no layers that adapters can attach to.
    #[error("the `{0}` architecture does not support adapters")]
    Unsupported(String),
}

impl From<LoraError> for Error {
    fn from(e: LoraError) -> Self {
        Error::Model(e.to_string())
    }
}

/// `lora_parameters` of `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraParameters {
    /// Rank `r` of `A: [in, r]`, `B: [r, out]`.
    pub rank: usize,
    /// Multiplier of the update (mlx-lm default 20).
    pub scale: f64,
    /// Dropout on the adapter input while training.
    #[serde(default)]
    pub dropout: f32,
    /// Module names within a block (`self_attn.q_proj`, `mlp.down_proj`, ...); `None`: all
    /// linear layers of the block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
}

impl Default for LoraParameters {
    /// mlx-lm's defaults (`mlx_lm/lora.py` `CONFIG_DEFAULTS`): rank 8, scale 20, dropout 0.
    fn default() -> Self {
        Self {
            rank: 8,
            scale: 20.0,
            dropout: 0.0,
            keys: None,
        }
    }
}

/// `adapter_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// `lora` (the only kind supported here; mlx-lm also has `dora` and `full`).
    #[serde(default = "default_fine_tune_type")]
    pub fine_tune_type: String,
    /// Adapters on the last `num_layers` blocks (`-1`: all).
    pub num_layers: i64,
    /// Rank, scale, dropout and keys.
    pub lora_parameters: LoraParameters,
    /// Every other field, kept as written (mlx-lm stores its training arguments here).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_fine_tune_type() -> String {
    "lora".into()
}

impl AdapterConfig {
    /// A LoRA config for the last `num_layers` blocks.
    pub fn new(num_layers: i64, lora_parameters: LoraParameters) -> Self {
        Self {
            fine_tune_type: default_fine_tune_type(),
            num_layers,
            lora_parameters,
            extra: Default::default(),
        }
    }

    /// Index of the first block with adapters in a model of `n_layers` blocks.
    pub fn first_layer(&self, n_layers: usize) -> usize {
        if self.num_layers <= 0 || self.num_layers as usize >= n_layers {
            0
        } else {
            n_layers - self.num_layers as usize
        }
    }

    /// Whether a slot of the model gets an adapter under this config.
    fn selects(&self, slot: &LinearSlot<'_>, first: usize) -> bool {
        let Some(layer) = slot.layer else {
            return false;
        };
        layer >= first
            && match &self.lora_parameters.keys {
                Some(keys) => keys.iter().any(|k| k == &slot.key),
                None => true,
            }
    }
}

/// An adapter read from (or to be written to) a folder: its config and its `lora_a` / `lora_b`
/// tensors by module name (Hugging Face row order, f32 on the CPU).
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `adapter_config.json`.
    pub config: AdapterConfig,
    /// Module name (`model.layers.29.self_attn.q_proj`) -> (`lora_a: [in, r]`, `lora_b: [r, out]`).
    pub weights: BTreeMap<String, (Tensor, Tensor)>,
    /// Where it was read from (for error messages).
    pub path: PathBuf,
}

impl Adapter {
    /// Reads `dir/adapter_config.json` and `dir/adapters.safetensors`.
    ///
    /// Errors: [`Error::Io`] for unreadable files; [`LoraError::Config`] for a malformed
    /// config or a `fine_tune_type` other than `lora`; [`LoraError::Tensor`] for a tensor that
    /// is not `*.lora_a` / `*.lora_b` or lacks its partner.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cpath = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cpath).map_err(|e| Error::io(&cpath, e))?;
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| LoraError::Config {
            path: cpath.clone(),
            msg: e.to_string(),
        })?;
        if config.fine_tune_type != "lora" {
            return Err(LoraError::Config {
                path: cpath,
                msg: format!(
                    "fine_tune_type `{}` is not supported (only `lora`)",
                    config.fine_tune_type
                ),
            }
            .into());
        }
        let wpath = dir.join(WEIGHTS_FILE);
        let weights = read_weights(&wpath)?;
        Ok(Self {
            config,
            weights,
            path: dir.to_path_buf(),
        })
    }

    /// The adapter currently loaded in `model` (tensors read back from its LoRA layers, in
    /// Hugging Face row order), with `config`.
    pub fn from_model(model: &mut dyn CausalLM, config: AdapterConfig) -> Result<Self> {
        let mut weights = BTreeMap::new();
        for slot in trainable(model)?.linears_mut() {
            if let Linear::Lora(l) = &*slot.linear {
                let a = l.a.as_tensor().to_device(&Device::Cpu)?;
                let mut b = l.b.as_tensor().to_device(&Device::Cpu)?;
                if let Some(h) = slot.permuted_heads {
                    b = permute_cols(&b, h, false)?;
                }
                weights.insert(slot.name.clone(), (a, b));
            }
        }
        Ok(Self {
            config,
            weights,
            path: PathBuf::new(),
        })
    }

    /// Writes `dir/adapter_config.json` and `dir/adapters.safetensors` (each to a temporary
    /// file, then renamed), creating `dir` if needed.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.save_weights(&dir.join(WEIGHTS_FILE))?;
        let text = serde_json::to_string_pretty(&self.config)
            .map_err(|e| Error::Model(format!("adapter config: {e}")))?;
        write_atomic(&dir.join(CONFIG_FILE), (text + "\n").as_bytes())
    }

    /// Writes only the tensors, to `path` (temporary file, then rename).
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (name, (a, b)) in &self.weights {
            map.insert(format!("{name}.lora_a"), a.clone());
            map.insert(format!("{name}.lora_b"), b.clone());
        }
        let tmp = tmp_path(path);
        candle_core::safetensors::save(&map, &tmp)
            .map_err(|e| Error::Model(format!("{}: {e}", tmp.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let perms = std::fs::Permissions::from_mode(0o644);
            std::fs::set_permissions(&tmp, perms).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Loads the adapter into `model`: any adapter already there is unloaded first (so
    /// adapters hot-swap on one base), then each layer the config selects becomes a LoRA layer
    /// over the same frozen base. Tensors match layers by [`canonical_name`], so an adapter
    /// written for a multimodal wrapper's text model (`language_model.model.layers...`) loads
    /// into the text-only form and back. Returns the number of layers adapted.
    ///
    /// Errors: [`LoraError::Unsupported`] for architectures without adapter support;
    /// [`LoraError::Tensor`] naming a selected layer without tensors, a tensor for a layer
    /// the config does not select, or shapes that do not fit the layer.
    pub fn apply(&self, model: &mut dyn CausalLM) -> Result<usize> {
        unload(model);
        let n = model.info().n_layers;
        let arch = model.info().architecture.clone();
        let first = self.config.first_layer(n);
        let scale = self.config.lora_parameters.scale;
        let wpath = self.path.join(WEIGHTS_FILE);
        let terr = |name: &str, msg: String| LoraError::Tensor {
            path: wpath.clone(),
            name: name.to_string(),
            msg,
        };
        let by_name: HashMap<String, &(Tensor, Tensor)> = self
            .weights
            .iter()
            .map(|(k, v)| (canonical_name(k), v))
            .collect();
        let slots = trainable(model)?.linears_mut();
        if slots.is_empty() {
            return Err(LoraError::Unsupported(arch).into());
        }
        let mut used = 0;
        let mut count = 0;
        for slot in slots {
            if !self.config.selects(&slot, first) {
                continue;
            }
            let (a, b) = by_name.get(&canonical_name(&slot.name)).ok_or_else(|| {
                terr(
                    &format!("{}.lora_a", slot.name),
                    "missing (the config selects this layer)".into(),
                )
            })?;
            used += 1;
            let dev = slot.linear_device();
            let mut b = b.to_device(&dev)?;
            if let Some(h) = slot.permuted_heads {
                b = permute_cols(&b, h, true)?;
            }
            let base = take(slot.linear);
            match LoraLinear::with_weights(base.clone(), &a.to_device(&dev)?, &b, scale) {
                Ok(mut l) => {
                    l.dropout = self.config.lora_parameters.dropout;
                    *slot.linear = Linear::Lora(Box::new(l));
                }
                Err(e) => {
                    *slot.linear = base;
                    return Err(terr(&slot.name, e.to_string()).into());
                }
            }
            count += 1;
        }
        if used != self.weights.len() {
            let selected: Vec<String> = trainable(model)?
                .linears_mut()
                .into_iter()
                .filter(|s| matches!(s.linear, Linear::Lora(_)))
                .map(|s| canonical_name(&s.name))
                .collect();
            let extra = self
                .weights
                .keys()
                .find(|k| !selected.contains(&canonical_name(k)))
                .cloned()
                .unwrap_or_default();
            unload(model);
            return Err(terr(
                &format!("{extra}.lora_a"),
                format!(
                    "not an adapter parameter of the model under this config (num_layers {}, keys {:?})",
                    self.config.num_layers, self.config.lora_parameters.keys
                ),
            )
            .into());
        }
        Ok(count)
    }

    /// Float weight deltas `scale · B^T A^T: [out, in]` f32 by weight name
    /// (`model.layers.29.self_attn.q_proj.weight`, Hugging Face row order): what
    /// `mlx_lm.fuse` adds to each adapted weight.
    pub fn deltas(&self) -> Result<HashMap<String, Tensor>> {
        let s = self.config.lora_parameters.scale;
        let mut out = HashMap::new();
        for (name, (a, b)) in &self.weights {
            let d = (b.t()?.matmul(&a.t()?)? * s)?;
            out.insert(format!("{name}.weight"), d);
        }
        Ok(out)
    }
}

/// Merges `adapter` into the weights of the model at `src` (a GGUF file or a model folder)
/// and writes an MLX-format folder `out` (`mlx_lm.fuse`): each adapted weight becomes
/// `W + scale · B^T A^T`. With `dequantize`, or for a float source, the output is float
/// (`dtype`, default: the source's; f16 for GGUF). Otherwise an MLX-quantized source is
/// re-quantized with its own bits / group size (as mlx-lm does), and a GGUF source — whose
/// block formats have no MLX equivalent — becomes MLX affine 4-bit, group 64.
///
/// Errors: as [`crate::convert::convert`]; an adapter tensor naming no weight of the model.
pub fn fuse(
    src: &Path,
    adapter: &Adapter,
    out: &Path,
    dequantize: bool,
    dtype: Option<DType>,
    progress: &mut dyn FnMut(crate::convert::ConvertEvent),
) -> Result<crate::convert::ConvertSummary> {
    use crate::safetensors_weights::QuantParams;
    let mut opts = crate::convert::ConvertOptions {
        dtype,
        weight_deltas: adapter.deltas()?,
        ..Default::default()
    };
    if src.is_dir() {
        let cfg = crate::loader::read_json(&src.join("config.json"))?.unwrap_or_default();
        let q = cfg
            .get("quantization")
            .or_else(|| cfg.get("quantization_config"));
        if let Some(q) = q {
            if dequantize {
                opts.dequantize = true;
            } else {
                let get = |k: &str| q.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
                // The source's mode too (affine when absent), so a float-mode model is fused
                // back into its own format.
                opts.q_mode = match q.get("mode").and_then(|m| m.as_str()) {
                    Some(m) => m.parse()?,
                    None => crate::quant::QuantMode::Affine,
                };
                let (group_size, bits) = opts.q_mode.default_params();
                opts.quantize = Some(QuantParams {
                    group_size: get("group_size").unwrap_or(group_size),
                    bits: get("bits").unwrap_or(bits),
                });
            }
        }
    } else if !dequantize {
        opts.quantize = Some(QuantParams {
            group_size: 64,
            bits: 4,
        });
    }
    crate::convert::convert(src, out, &opts, progress)
}

impl LinearSlot<'_> {
    fn linear_device(&self) -> Device {
        match &*self.linear {
            Linear::Dense(l) => l.weight().device().clone(),
            Linear::Lora(l) => l.a.device().clone(),
            _ => Device::Cpu,
        }
    }
}

/// The adapter and fine-tuning capability of `model` ([`CausalLM::trainable_mut`]).
///
/// Errors: [`LoraError::Unsupported`] naming the architecture when it has none.
pub fn trainable(model: &mut dyn CausalLM) -> Result<&mut dyn Trainable> {
    let arch = model.info().architecture.clone();
    model
        .trainable_mut()
        .ok_or_else(|| LoraError::Unsupported(arch).into())
}

/// Removes every adapter from `model`, restoring the frozen base layers. Returns how many
/// layers were restored.
pub fn unload(model: &mut dyn CausalLM) -> usize {
    let Some(model) = model.trainable_mut() else {
        return 0;
    };
    let mut n = 0;
    for slot in model.linears_mut() {
        if let Linear::Lora(_) = &*slot.linear {
            if let Linear::Lora(l) = take(slot.linear) {
                *slot.linear = l.base;
                n += 1;
            }
        }
    }
    n
}

/// Puts fresh adapters (mlx-lm's initialisation) on the layers `config` selects, after
/// unloading any; `A` is drawn from a generator seeded with `seed`. Returns the number of
/// layers adapted.
///
/// Errors: [`LoraError::Unsupported`] when the architecture has no adapter support.
pub fn attach_new(model: &mut dyn CausalLM, config: &AdapterConfig, seed: u64) -> Result<usize> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    unload(model);
    let n = model.info().n_layers;
    let arch = model.info().architecture.clone();
    let dev = model.device().clone();
    let first = config.first_layer(n);
    let p = &config.lora_parameters;
    let slots = trainable(model)?.linears_mut();
    if slots.is_empty() {
        return Err(LoraError::Unsupported(arch).into());
    }
    let mut count = 0;
    for slot in slots {
        if config.selects(&slot, first) {
            let base = take(slot.linear);
            let l = LoraLinear::new(base, p.rank, p.scale, p.dropout, &mut rng, &dev)?;
            *slot.linear = Linear::Lora(Box::new(l));
            count += 1;
        }
    }
    Ok(count)
}

/// Moves the layer out, leaving an empty dense placeholder to be overwritten.
fn take(l: &mut Linear) -> Linear {
    let empty = Tensor::zeros((0, 0), DType::F32, &Device::Cpu).expect("empty tensor");
    std::mem::replace(l, Linear::dense(empty, None))
}

/// Reorders the columns of `b: [r, out]` between Hugging Face order and llama.cpp's permuted
/// q/k row order (`to_gguf`: HF -> GGUF, as llama.cpp's `permute`; else the inverse), for
/// `heads` heads: the rows of `b^T` reordered as [`QkRowOrder::GgmlInterleaved`] reorders a
/// projection's rows.
///
/// Errors: [`Error::Tensor`] when `out` does not split into `heads` heads of even width.
pub fn permute_cols(b: &Tensor, heads: usize, to_gguf: bool) -> Result<Tensor> {
    let order = QkRowOrder::GgmlInterleaved;
    let t = b.t()?.contiguous()?;
    let t = if to_gguf {
        order.from_hf(&t, heads, "lora_b")?
    } else {
        order.to_hf(&t, heads, "lora_b")?
    };
    Ok(t.t()?.contiguous()?)
}

fn read_weights(path: &Path) -> Result<BTreeMap<String, (Tensor, Tensor)>> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let all = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    let terr = |name: &str, msg: &str| LoraError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        msg: msg.to_string(),
    };
    let mut out = BTreeMap::new();
    for (name, t) in &all {
        if let Some(prefix) = name.strip_suffix(".lora_a") {
            let b = all
                .get(&format!("{prefix}.lora_b"))
                .ok_or_else(|| terr(name, "has no matching `.lora_b`"))?;
            if t.rank() != 2 || b.rank() != 2 {
                return Err(terr(name, "lora_a and lora_b must be matrices").into());
            }
            out.insert(
                prefix.to_string(),
                (t.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?),
            );
        } else if let Some(prefix) = name.strip_suffix(".lora_b") {
            if !all.contains_key(&format!("{prefix}.lora_a")) {
                return Err(terr(name, "has no matching `.lora_a`").into());
            }
        } else {
            return Err(terr(name, "not a LoRA tensor (`*.lora_a` / `*.lora_b`)").into());
        }
    }
    Ok(out)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips_and_matches_llama_cpp() {
        // 2 heads of width 4 (half 2): HF order per head [x0 x1 | y0 y1] -> GGUF [x0 y0 x1 y1].
        let b = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 8))
            .unwrap();
        let g = permute_cols(&b, 2, true).unwrap();
        let gv: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(gv, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back: Vec<f32> = permute_cols(&g, 2, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, (0..8).map(|x| x as f32).collect::<Vec<_>>());
    }
}

#[cfg(test)]
mod name_tests {
    use super::canonical_name;

    #[test]
    fn wrapper_prefixes_are_taken_off() {
        let q = "model.layers.3.self_attn.q_proj";
        assert_eq!(
            canonical_name("language_model.model.layers.3.self_attn.q_proj"),
            q
        );
        assert_eq!(
            canonical_name("model.language_model.layers.3.self_attn.q_proj"),
            q
        );
        assert_eq!(canonical_name(q), q);
        assert_eq!(
            canonical_name("language_model.lm_head.weight"),
            "lm_head.weight"
        );
        assert_eq!(
            canonical_name("model.visual.blocks.0.attn.qkv"),
            "model.visual.blocks.0.attn.qkv"
        );
    }
}
