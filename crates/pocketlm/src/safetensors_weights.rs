//! Weights from Hugging Face / MLX safetensors files (one file or shards listed in
//! `model.safetensors.index.json`), memory-mapped.
//!
//! Float tensors (F32, F16, BF16) are converted to f32 for compute. A layer whose
//! `{prefix}.scales` and `{prefix}.biases` sit next to a U32 `{prefix}.weight` is MLX affine
//! group-quantized (mlx-community checkpoints) and becomes [`Linear::Mlx`] /
//! [`Embedding::Mlx`], with `group_size` / `bits` from config.json `quantization` and its
//! per-layer overrides, as mlx-lm's `load_model` reads them (`mlx_lm/utils.py`: the class
//! predicate quantizes a layer when `f"{p}.scales"` is in the weights and takes
//! `quantization[p]` when present). Layers with uint8 `scales` and no `biases` are in one of
//! MLX's float modes (`"mode": "mxfp4"`, `"mxfp8"`, `"nvfp4"`), recognised as mlx-lm's
//! `infer_quant_config` does (the mode whose group size and bits the shapes give), and become
//! [`Linear::MlxFp`] / [`Embedding::MlxFp`].

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::candle_message;
use crate::nn::{Embedding, Linear};
use crate::quant::mlx_affine::AffineQuantized;
use crate::quant::mlx_fp::{FpMode, FpQuantized};
use crate::quant::QuantMode;
use crate::weights::{Placement, Stored, WeightLayout, Weights};
use crate::{Error, Result};

/// Name of the shard index written by `save_pretrained` and mlx-lm.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// `group_size` and `bits` of one MLX quantized layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantParams {
    /// Values per group (affine: 32, 64 or 128; mxfp4 / mxfp8: 32; nvfp4: 16).
    pub group_size: usize,
    /// Bits per code (affine: 2, 3, 4, 5, 6 or 8; mxfp4 / nvfp4: 4; mxfp8: 8).
    pub bits: usize,
}

/// How one layer is quantized: its group size and bits, and the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerQuant {
    /// Group size and bits.
    pub params: QuantParams,
    /// `affine`, `mxfp4`, `mxfp8` or `nvfp4`.
    pub mode: QuantMode,
}

impl LayerQuant {
    /// MLX affine quantization with `params`.
    pub fn affine(params: QuantParams) -> Self {
        Self {
            params,
            mode: QuantMode::Affine,
        }
    }

    /// The entry config.json gets for the layer: `{"group_size", "bits"}`, plus `"mode"` for a
    /// float mode (what mlx-lm's `quantize_model` writes).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v =
            serde_json::json!({"group_size": self.params.group_size, "bits": self.params.bits});
        if self.mode != QuantMode::Affine {
            v["mode"] = self.mode.name().into();
        }
        v
    }
}

/// config.json `quantization`: defaults plus per-layer overrides keyed by the layer's
/// Hugging Face path (`"model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8}` or
/// `false` for a layer left in float).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantConfig {
    /// The defaults.
    pub default: QuantParams,
    /// The default mode (`"mode"`, `affine` when absent).
    pub mode: QuantMode,
    /// Per-layer overrides; `None` means the layer is not quantized.
    pub overrides: HashMap<String, Option<LayerQuant>>,
}

impl QuantConfig {
    /// Reads `config["quantization"]`; `Ok(None)` when it is absent or null.
    ///
    /// Errors: [`Error::Model`] naming the field when `group_size` / `bits` are missing or not
    /// allowed by the mode, or `mode` is not one of `affine`, `mxfp4`, `mxfp8`, `nvfp4`.
    pub fn from_config(config: &serde_json::Value) -> Result<Option<Self>> {
        let q = match config.get("quantization") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(q) => q,
        };
        let obj = q.as_object().ok_or_else(|| {
            Error::Model("config.json `quantization`: expected an object".to_string())
        })?;
        let default = parse_layer(q, "quantization")?;
        let mut overrides = HashMap::new();
        for (k, v) in obj {
            if matches!(k.as_str(), "group_size" | "bits" | "mode") {
                continue;
            }
            match v {
                serde_json::Value::Bool(false) => {
                    overrides.insert(k.clone(), None);
                }
                serde_json::Value::Bool(true) => {
                    overrides.insert(k.clone(), Some(default));
                }
                serde_json::Value::Object(_) => {
                    let field = format!("quantization[\"{k}\"]");
                    overrides.insert(k.clone(), Some(parse_layer(v, &field)?));
                }
                _ => {}
            }
        }
        Ok(Some(Self {
            default: default.params,
            mode: default.mode,
            overrides,
        }))
    }

    /// The quantization of the layer at `prefix` (e.g. `model.layers.0.mlp.down_proj`); `None`
    /// when an override marks it unquantized.
    pub fn for_layer(&self, prefix: &str) -> Option<LayerQuant> {
        match self.overrides.get(prefix) {
            Some(p) => *p,
            None => Some(LayerQuant {
                params: self.default,
                mode: self.mode,
            }),
        }
    }

    /// The `quantization` object for config.json (defaults, `mode` unless affine, and
    /// overrides).
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("group_size".into(), self.default.group_size.into());
        m.insert("bits".into(), self.default.bits.into());
        if self.mode != QuantMode::Affine {
            m.insert("mode".into(), self.mode.name().into());
        }
        let mut keys: Vec<_> = self.overrides.keys().collect();
        keys.sort();
        for k in keys {
            let v = match self.overrides[k] {
                None => serde_json::Value::Bool(false),
                Some(p) => p.to_json(),
            };
            m.insert(k.clone(), v);
        }
        serde_json::Value::Object(m)
    }
}

/// `{"group_size", "bits", "mode"}` (mode `affine` when absent, as mlx's `to_quantized`).
fn parse_layer(v: &serde_json::Value, field: &str) -> Result<LayerQuant> {
    let mode = match v.get("mode") {
        None | Some(serde_json::Value::Null) => QuantMode::Affine,
        Some(m) => m
            .as_str()
            .ok_or_else(|| Error::Model(format!("config.json `{field}.mode`: not a string")))?
            .parse::<QuantMode>()
            .map_err(|e| Error::Model(format!("config.json `{field}.mode`: {e}")))?,
    };
    Ok(LayerQuant {
        params: parse_params(v, field, mode)?,
        mode,
    })
}

fn parse_params(v: &serde_json::Value, field: &str, mode: QuantMode) -> Result<QuantParams> {
    let get = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| {
                Error::Model(format!(
                    "config.json `{field}.{k}`: missing or not a non-negative integer"
                ))
            })
    };
    let p = QuantParams {
        group_size: get("group_size")?,
        bits: get("bits")?,
    };
    mode.check(p.group_size, p.bits)
        .map_err(|e| Error::Model(format!("config.json `{field}`: {e}")))?;
    Ok(p)
}

/// Memory-mapped safetensors weights with Hugging Face names.
pub struct SafetensorsWeights {
    st: MmapedSafetensors,
    names: BTreeSet<String>,
    files: Vec<PathBuf>,
    device: Device,
    quant: Option<QuantConfig>,
    dequantize: bool,
    exact_mlx_matmul: bool,
    repack: bool,
}

impl std::fmt::Debug for SafetensorsWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsWeights")
            .field("files", &self.files)
            .field("tensors", &self.names.len())
            .field("quant", &self.quant)
            .finish()
    }
}

impl SafetensorsWeights {
    /// The safetensors files of a model folder: the shards named by `model.safetensors.index.json`
    /// (`weight_map` values) when it exists, otherwise every `*.safetensors` file, sorted.
    ///
    /// Errors: [`Error::Model`] for an unreadable index, a shard it names that is missing, or a
    /// folder without safetensors files; [`Error::Io`] for an unreadable folder.
    pub fn folder_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Model(format!("{}: not valid JSON: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::Model(format!("{}: no `weight_map` object", index.display()))
                })?;
            let mut shards = BTreeSet::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::Model(format!(
                        "{}: `weight_map[\"{tensor}\"]` is not a file name",
                        index.display()
                    ))
                })?;
                shards.insert(file.to_string());
            }
            let mut files = Vec::new();
            for s in shards {
                let p = dir.join(&s);
                if !p.is_file() {
                    return Err(Error::Model(format!(
                        "{}: shard `{s}` listed in `weight_map` is missing ({})",
                        index.display(),
                        p.display()
                    )));
                }
                files.push(p);
            }
            return Ok(files);
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let p = entry.map_err(|e| Error::io(dir, e))?.path();
            if p.extension().is_some_and(|e| e == "safetensors") && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(Error::Model(format!(
                "{}: no *.safetensors files in the folder",
                dir.display()
            )));
        }
        Ok(files)
    }

    /// Opens the weights of a model folder ([`Self::folder_files`]) with the quantization of
    /// its `config` (config.json as JSON).
    pub fn open_folder(dir: &Path, config: &serde_json::Value, device: Device) -> Result<Self> {
        let files = Self::folder_files(dir)?;
        Self::open(&files, QuantConfig::from_config(config)?, device)
    }

    /// Memory-maps `files` (a tensor present in several is taken from the last).
    ///
    /// Errors: [`Error::Io`] / [`Error::Model`] naming a file that cannot be opened or is not
    /// valid safetensors.
    pub fn open(files: &[PathBuf], quant: Option<QuantConfig>, device: Device) -> Result<Self> {
        for f in files {
            std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        }
        // SAFETY: the files are mapped read-only; as with every memory-mapped model loader
        // (candle, safetensors, mlx), the caller must not truncate them while they are in use.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            Error::Model(format!(
                "not a valid safetensors file ({}) among {files:?}",
                candle_message(&e)
            ))
        })?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            st,
            names,
            files: files.to_vec(),
            device,
            quant,
            dequantize: false,
            exact_mlx_matmul: false,
            repack: true,
        })
    }

    /// Dequantize MLX quantized layers to dense f32 at load (for comparisons with float
    /// references).
    pub fn dequantized(mut self, yes: bool) -> Self {
        self.dequantize = yes;
        self
    }

    /// Repack MLX 2- to 6-bit layers for this CPU's fastest kernels where it has them (the default;
    /// see [`crate::kernels::PackedMlx`]), or keep MLX's layout
    /// ([`crate::loader::LoadOptions::no_repack`]).
    pub fn repacked(mut self, yes: bool) -> Self {
        self.repack = yes;
        self
    }

    /// Keep MLX 2- to 6-bit layers on `mx.quantized_matmul`'s f32 arithmetic
    /// ([`crate::loader::LoadOptions::exact_mlx_matmul`]).
    pub fn exact_mlx_matmul(mut self, yes: bool) -> Self {
        self.exact_mlx_matmul = yes;
        self
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// The files, in the order given.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Total size of the files in bytes.
    pub fn bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }

    /// The quantization read from config.json, if any.
    pub fn quant_config(&self) -> Option<&QuantConfig> {
        self.quant.as_ref()
    }

    /// The shape and safetensors dtype name (`"F32"`, `"BF16"`, `"U32"`, ...) of `name`.
    ///
    /// Errors: [`Error::Tensor`] when it is absent.
    pub fn info(&self, name: &str) -> Result<(Vec<usize>, String)> {
        if !self.names.contains(name) {
            return Err(Error::tensor(
                name,
                format!("not found in {}", self.files_list()),
            ));
        }
        let v = self
            .st
            .get(name)
            .map_err(|e| Error::tensor(name, candle_message(&e)))?;
        Ok((v.shape().to_vec(), format!("{:?}", v.dtype())))
    }

    fn files_list(&self) -> String {
        self.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A tensor as stored (any dtype candle supports), on the CPU, shape checked when
    /// `shape` is given.
    ///
    /// Errors: [`Error::Tensor`] for a missing tensor, a wrong shape, or a dtype candle cannot
    /// hold.
    pub fn raw(&self, name: &str, shape: Option<&[usize]>) -> Result<Tensor> {
        let (vshape, dt) = self.info(name)?;
        if let Some(shape) = shape {
            if vshape != shape {
                return Err(Error::tensor(
                    name,
                    format!("has shape {vshape:?}, expected {shape:?}"),
                ));
            }
        }
        self.st
            .load(name, &Device::Cpu)
            .map_err(|e| Error::tensor(name, format!("dtype {dt}: {}", candle_message(&e))))
    }

    /// A float tensor (F32, F16 or BF16 on disk) in its stored dtype, on the CPU.
    ///
    /// Errors: [`Error::Tensor`] naming the tensor and its dtype when it is not a float type
    /// we support; missing tensor; wrong shape.
    pub fn float(&self, name: &str, shape: Option<&[usize]>) -> Result<Tensor> {
        let (_, dt) = self.info(name)?;
        if !matches!(dt.as_str(), "F32" | "F16" | "BF16") {
            return Err(Error::tensor(
                name,
                format!("has dtype {dt}; supported float dtypes are F32, F16 and BF16"),
            ));
        }
        self.raw(name, shape)
    }

    /// The quantization config.json gives the MLX quantized layer at `prefix` (whose
    /// `{prefix}.scales` exists).
    ///
    /// Errors: [`Error::Tensor`] when config.json has no `quantization` or marks the layer
    /// `false`.
    fn layer_quant(&self, prefix: &str) -> Result<LayerQuant> {
        let sn = format!("{prefix}.scales");
        let quant = self.quant.as_ref().ok_or_else(|| {
            Error::tensor(
                &sn,
                "exists (an MLX quantized layer) but config.json has no `quantization`",
            )
        })?;
        quant.for_layer(prefix).ok_or_else(|| {
            Error::tensor(
                &sn,
                format!("exists but config.json `quantization[\"{prefix}\"]` is false"),
            )
        })
    }

    /// The MLX quantized weight of the layer at `prefix` (`rows x cols` after unpacking) in
    /// whichever mode it is stored: [`Stored::Mlx`] (affine) or [`Stored::MlxFp`] (uint8
    /// `scales`); `None` when the layer has no `{prefix}.scales`.
    ///
    /// Errors: as [`Self::quantized`] and [`Self::quantized_fp`].
    pub fn quantized_any(
        &self,
        prefix: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Stored<'static>>> {
        let sn = format!("{prefix}.scales");
        if !self.contains(&sn) {
            return Ok(None);
        }
        let (_, sdt) = self.info(&sn)?;
        if sdt == "U8" {
            return Ok(self.quantized_fp(prefix, rows, cols)?.map(Stored::MlxFp));
        }
        Ok(self
            .quantized(prefix, rows, cols)?
            .map(|q| Stored::Mlx(q.with_exact_matmul(self.exact_mlx_matmul))))
    }

    /// The weight of the layer at `prefix` (`rows x cols` after unpacking) in one of MLX's float
    /// modes (uint8 `{prefix}.scales`, no biases), or `None` when the layer has no
    /// `{prefix}.scales`. The mode is the one config.json names for the layer in a per-layer
    /// entry; otherwise, as mlx-lm's `infer_quant_config`, the mode whose group size and bits
    /// the shapes give (the top-level default is not consulted, as in mlx-lm).
    ///
    /// Errors: [`Error::Tensor`] / [`Error::Model`] when config.json has no `quantization`, marks
    /// the layer `false` or affine, the shapes fit no float mode (or not the mode named), the
    /// weight is not U32 or the scales not U8.
    pub fn quantized_fp(
        &self,
        prefix: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<FpQuantized>> {
        let (wn, sn) = (format!("{prefix}.weight"), format!("{prefix}.scales"));
        if !self.contains(&sn) {
            return Ok(None);
        }
        let lq = self.layer_quant(prefix)?;
        let explicit = self
            .quant
            .as_ref()
            .is_some_and(|q| q.overrides.contains_key(prefix));
        let (wshape, wdt) = self.info(&wn)?;
        let (sshape, sdt) = self.info(&sn)?;
        if wdt != "U32" || sdt != "U8" {
            return Err(Error::tensor(
                &wn,
                format!(
                    "a float-mode quantized layer stores a U32 weight and U8 scales, found \
                     {wdt} and {sdt} (`{sn}`)"
                ),
            ));
        }
        let shapes_ok = wshape.len() == 2
            && sshape.len() == 2
            && wshape[0] == rows
            && sshape[0] == rows
            && cols > 0
            && (wshape[1] * 32).is_multiple_of(cols)
            && sshape[1] > 0
            && cols.is_multiple_of(sshape[1]);
        let inferred = if shapes_ok {
            FpMode::from_params(cols / sshape[1], wshape[1] * 32 / cols)
        } else {
            None
        };
        let mode = match (inferred, explicit.then_some(lq.mode)) {
            (Some(m), None) => m,
            (Some(m), Some(QuantMode::Fp(named))) if m == named => m,
            (_, named) => {
                let named = named
                    .map(|m| format!("config.json names mode {m} for it; "))
                    .unwrap_or_default();
                return Err(Error::tensor(
                    &wn,
                    format!(
                        "a [{rows}, {cols}] layer with uint8 scales is in a float mode \
                         (mxfp4: weight [{rows}, {}], scales [{rows}, {}]; mxfp8: [{rows}, {}], \
                         [{rows}, {}]; nvfp4: [{rows}, {}], [{rows}, {}]); {named}the file \
                         has weight {wshape:?} and scales {sshape:?}",
                        cols / 8,
                        cols / 32,
                        cols / 4,
                        cols / 32,
                        cols / 8,
                        cols / 16
                    ),
                ));
            }
        };
        let w = self.raw(&wn, Some(&wshape))?;
        let s = self.raw(&sn, Some(&sshape))?;
        let q = FpQuantized::from_tensors(&w, &s, mode)
            .map_err(|e| Error::tensor(prefix, e.to_string()))?;
        Ok(Some(q))
    }

    /// The MLX affine quantized weight of the layer at `prefix` (`rows x cols` after
    /// unpacking), or `None` when the layer has no `{prefix}.scales`.
    ///
    /// Errors: [`Error::Tensor`] / [`Error::Model`] when config.json has no `quantization`,
    /// marks the layer `false` or in a float mode, or its `bits` / `group_size` do not match the
    /// packed width of `{prefix}.weight` or the shape of `{prefix}.scales`; a weight that is
    /// not U32.
    pub fn quantized(
        &self,
        prefix: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<AffineQuantized>> {
        let (wn, sn, bn) = (
            format!("{prefix}.weight"),
            format!("{prefix}.scales"),
            format!("{prefix}.biases"),
        );
        if !self.contains(&sn) {
            return Ok(None);
        }
        let lq = self.layer_quant(prefix)?;
        if lq.mode != QuantMode::Affine {
            return Err(Error::tensor(
                &sn,
                format!(
                    "config.json quantizes `{prefix}` in mode {}, but its scales are not uint8",
                    lq.mode
                ),
            ));
        }
        let p = lq.params;
        let (wshape, wdt) = self.info(&wn)?;
        if wdt != "U32" {
            return Err(Error::tensor(
                &wn,
                format!("has dtype {wdt}; a quantized weight (with `{sn}`) must be U32"),
            ));
        }
        let expected_w = [rows, cols * p.bits / 32];
        let expected_s = [rows, cols / p.group_size.max(1)];
        let (sshape, _) = self.info(&sn)?;
        if wshape != expected_w || sshape != expected_s || !cols.is_multiple_of(p.group_size) {
            return Err(Error::tensor(
                &wn,
                format!(
                    "config.json quantization for `{prefix}` says bits = {}, group_size = {}, \
                     so a [{rows}, {cols}] layer stores weight {expected_w:?} and scales \
                     {expected_s:?}, but the file has weight {wshape:?} and scales {sshape:?}",
                    p.bits, p.group_size
                ),
            ));
        }
        let w = self.raw(&wn, Some(&expected_w))?;
        let s = self.float(&sn, Some(&expected_s))?;
        let b = self.float(&bn, Some(&expected_s))?;
        let q = AffineQuantized::from_tensors(&w, &s, &b, p.group_size, p.bits)
            .map_err(|e| Error::tensor(prefix, e.to_string()))?;
        Ok(Some(q))
    }

    /// The packed codes, scales and biases of a stacked MLX quantized layer `{prefix}`
    /// (`[n, rows, cols]` after unpacking: mlx-lm's `SwitchLinear`), with its parameters; `None`
    /// when there is no `{prefix}.scales`.
    ///
    /// Errors: as [`Self::quantized`].
    #[allow(clippy::type_complexity)]
    fn quantized_stack(
        &self,
        prefix: &str,
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Option<(Tensor, Tensor, Tensor, QuantParams)>> {
        let (wn, sn, bn) = (
            format!("{prefix}.weight"),
            format!("{prefix}.scales"),
            format!("{prefix}.biases"),
        );
        if !self.contains(&sn) {
            return Ok(None);
        }
        let lq = self.layer_quant(prefix)?;
        if lq.mode != QuantMode::Affine {
            return Err(Error::tensor(
                &sn,
                format!(
                    "config.json quantizes the stacked experts `{prefix}` in mode {}, but \
                     their scales are not uint8",
                    lq.mode
                ),
            ));
        }
        let p = lq.params;
        let expected_w = [n, rows, cols * p.bits / 32];
        let expected_s = [n, rows, cols / p.group_size.max(1)];
        let (wshape, wdt) = self.info(&wn)?;
        let (sshape, _) = self.info(&sn)?;
        if wdt != "U32"
            || wshape != expected_w
            || sshape != expected_s
            || !cols.is_multiple_of(p.group_size)
        {
            return Err(Error::tensor(
                &wn,
                format!(
                    "config.json quantization for `{prefix}` says bits = {}, group_size = {}, \
                     so {n} stacked [{rows}, {cols}] experts store U32 weight {expected_w:?} \
                     and scales {expected_s:?}, but the file has {wdt} weight {wshape:?} and \
                     scales {sshape:?}",
                    p.bits, p.group_size
                ),
            ));
        }
        let w = self.raw(&wn, Some(&expected_w))?;
        let s = self.float(&sn, Some(&expected_s))?;
        let b = self.float(&bn, Some(&expected_s))?;
        Ok(Some((w, s, b, p)))
    }

    /// The `n` stacked experts at `prefix` (`[n, rows, cols]` after unpacking) in the MLX
    /// float mode config.json names for them (uint8 `{prefix}.scales` `[n, rows, cols /
    /// group]`, U32 `{prefix}.weight` `[n, rows, cols · bits / 32]`, no biases: mlx-lm's
    /// `QuantizedSwitchLinear` with `mode="mxfp4"`, as its gpt-oss conversions hold them), one
    /// [`FpQuantized`] per expert; `None` when the scales are absent or not uint8.
    ///
    /// Errors: config.json not naming a float mode for them, or shapes that do not match it,
    /// named.
    fn fp_stack(
        &self,
        prefix: &str,
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Vec<FpQuantized>>> {
        let (wn, sn) = (format!("{prefix}.weight"), format!("{prefix}.scales"));
        if !self.contains(&sn) || self.info(&sn)?.1 != "U8" {
            return Ok(None);
        }
        let QuantMode::Fp(mode) = self.layer_quant(prefix)?.mode else {
            return Err(Error::tensor(
                &sn,
                format!(
                    "uint8 scales (an MLX float mode) but config.json quantizes `{prefix}` as \
                     affine"
                ),
            ));
        };
        let (gs, bits) = (mode.group_size(), mode.bits());
        let ew = [n, rows, cols * bits / 32];
        let es = [n, rows, cols / gs];
        let ((wshape, wdt), (sshape, _)) = (self.info(&wn)?, self.info(&sn)?);
        if wdt != "U32" || wshape != ew || sshape != es || !cols.is_multiple_of(gs) {
            return Err(Error::tensor(
                &wn,
                format!(
                    "{n} stacked [{rows}, {cols}] experts in mode {mode} store U32 weight \
                     {ew:?} and U8 scales {es:?}, but the file has {wdt} weight {wshape:?} \
                     and scales {sshape:?}"
                ),
            ));
        }
        let w = self.raw(&wn, Some(&ew))?;
        let sc = self.raw(&sn, Some(&es))?;
        (0..n)
            .map(|e| {
                FpQuantized::from_tensors(&w.get(e)?, &sc.get(e)?, mode)
                    .map_err(|err| Error::tensor(&wn, format!("expert {e}: {err}")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn f32_on_device(&self, t: Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?)
    }

    /// Where this source's layers go ([`Placement`]).
    fn placement(&self) -> Placement {
        Placement {
            device: self.device.clone(),
            dequantize: self.dequantize,
            repack: self.repack,
        }
    }

    fn float_weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (_, dt) = self.info(name)?;
        if dt == "U32" {
            let prefix = name.strip_suffix(".weight").unwrap_or(name);
            return Err(Error::tensor(
                name,
                format!("is packed U32 but there is no `{prefix}.scales` next to it"),
            ));
        }
        self.f32_on_device(self.float(name, Some(shape))?)
    }
}

impl Weights for SafetensorsWeights {
    fn linear(
        &self,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
    ) -> Result<Linear> {
        let b = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out_features])?)
        } else {
            None
        };
        let stored = match self.quantized_any(prefix, out_features, in_features)? {
            Some(q) => q,
            None => {
                let name = format!("{prefix}.weight");
                Stored::Float(self.float_weight(&name, &[out_features, in_features])?)
            }
        };
        self.placement().linear(stored, b)
    }

    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        // The flag matters when the table is also the output layer (tied embeddings,
        // `Embedding::as_linear`); lookups dequantize rows either way.
        let stored = match self.quantized_any(prefix, vocab, hidden)? {
            Some(q) => q,
            None => Stored::Float(self.float_weight(name, &[vocab, hidden])?),
        };
        self.placement().embedding(stored)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.f32_on_device(self.float(name, Some(shape))?)
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn u8_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        let (_, dt) = self.info(name)?;
        if dt != "U8" {
            return Err(Error::tensor(name, format!("has dtype {dt}, expected U8")));
        }
        Ok(self
            .raw(name, Some(shape))?
            .flatten_all()?
            .to_vec1::<u8>()?)
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn layout(&self) -> WeightLayout {
        WeightLayout::REFERENCE
    }

    fn stacked_linear(
        &self,
        prefixes: &[&str],
        outs: &[usize],
        in_features: usize,
    ) -> Result<Option<Linear>> {
        let placement = self.placement();
        if !placement.device.is_cuda() || placement.dequantize || prefixes.len() != outs.len() {
            return Ok(None);
        }
        let mut parts = Vec::with_capacity(prefixes.len());
        for (p, &o) in prefixes.iter().zip(outs) {
            if self
                .info(&format!("{p}.scales"))
                .is_ok_and(|(_, dt)| dt == "U8")
            {
                return Ok(None);
            }
            match self.quantized(p, o, in_features)? {
                Some(q) => parts.push(q.with_exact_matmul(self.exact_mlx_matmul)),
                None => return Ok(None),
            }
        }
        placement.stacked_mlx(&parts)
    }

    fn expert_linears(
        &self,
        prefix: &str,
        n_experts: usize,
        out_features: usize,
        in_features: usize,
    ) -> Result<Option<Vec<Linear>>> {
        let wn = format!("{prefix}.weight");
        if !self.contains(&wn) {
            return Ok(None);
        }
        let placement = self.placement();
        if let Some(fp) = self.fp_stack(prefix, n_experts, out_features, in_features)? {
            return fp
                .into_iter()
                .map(|q| placement.linear(Stored::MlxFp(q), None))
                .collect::<Result<Vec<_>>>()
                .map(Some);
        }
        let Some(stack) = self.quantized_stack(prefix, n_experts, out_features, in_features)?
        else {
            let all = self.float_weight(&wn, &[n_experts, out_features, in_features])?;
            return (0..n_experts)
                .map(|e| placement.linear(Stored::Float(all.get(e)?), None))
                .collect::<Result<Vec<_>>>()
                .map(Some);
        };
        let (w, s, b, p) = stack;
        (0..n_experts)
            .map(|e| {
                let q = AffineQuantized::from_tensors(
                    &w.get(e)?,
                    &s.get(e)?,
                    &b.get(e)?,
                    p.group_size,
                    p.bits,
                )
                .map_err(|err| Error::tensor(&wn, format!("expert {e}: {err}")))?;
                placement.linear(
                    Stored::Mlx(q.with_exact_matmul(self.exact_mlx_matmul)),
                    None,
                )
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}
