//! LFM2 (Liquid AI): pre-norm blocks whose operator is either a gated short convolution or
//! grouped-query attention, each followed by a SwiGLU feed-forward. A convolution block
//! projects `x` to `B, C, x'` (`in_proj`, `[3 · hidden, hidden]`), convolves `B ⊙ x'` over time
//! with a depthwise causal kernel of `conv_L_cache` taps ([`CausalConv1d`]), gates the result
//! by `C` and projects it back (`out_proj`); its cache is the convolution state (the last
//! `conv_L_cache - 1` rows of `B ⊙ x'`, an [`ArraysCache`] of one array `[batch, L_cache - 1,
//! hidden]`, mlx-lm's layout). Attention blocks have per-head q/k RMSNorm (`q_layernorm`,
//! `k_layernorm`) before RoPE and an `out_proj`. The final norm is `model.embedding_norm`; the
//! output layer is tied to the embedding by default. GGUF `lfm2` files as llama.cpp's converter
//! writes them load through [`GGUF_NAMES`] and [`config_from_gguf`].
//! The blocks run in the shared hybrid stack ([`HybridLm`]).
//! Reference: Hugging Face `models/lfm2/modeling_lfm2.py` and `configuration_lfm2.py`
//! (transformers 5.24), mlx-lm `models/lfm2.py` (0.32.2).

use candle_core::Tensor;
use serde::Deserialize;

use crate::gguf::names::NameTable;
use crate::gguf::GgufFile;
use crate::kv_cache::ArraysCache;
use crate::models::decoder::Mlp;
use crate::models::hybrid::{HybridBlock, HybridLm, Mixer, StateMixer};
use crate::models::{build, CausalLM, ModelInfo};
use crate::nn::{
    Activation, Attention, CausalConv1d, GateUp, GatedMlp, Linear, Mode, RmsNorm, RopeScaling,
    RotaryEmbedding,
};
use crate::weights::Weights;
use crate::{Error, Result};

/// config.json of an LFM2 model (`Lfm2Config` field names and defaults; mlx-lm's `block_ff_dim`
/// and transformers' `tie_embedding` accepted too).
#[derive(Debug, Clone, Deserialize)]
pub struct Lfm2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Feed-forward width before [`Self::ff_dim`]'s adjustment.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// The same, under its original name (wins over `intermediate_size`, as in both references).
    #[serde(default)]
    pub block_ff_dim: Option<usize>,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads; defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Longest context.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon of every norm.
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Biases on `in_proj`, `out_proj` and the convolution.
    #[serde(default)]
    pub conv_bias: bool,
    /// Taps of the short convolution.
    #[serde(default = "default_l_cache", rename = "conv_L_cache")]
    pub conv_l_cache: usize,
    /// The adjusted feed-forward width is rounded up to a multiple of this.
    #[serde(default = "default_multiple_of")]
    pub block_multiple_of: usize,
    /// Factor on the adjusted feed-forward width (`null`: none, and no rounding).
    #[serde(default = "default_multiplier")]
    pub block_ffn_dim_multiplier: Option<f64>,
    /// Whether the feed-forward width is adjusted ([`Self::ff_dim`]).
    #[serde(default = "default_true")]
    pub block_auto_adjust_ff_dim: bool,
    /// The attention layers, when `layer_types` is absent.
    #[serde(default)]
    pub full_attn_idxs: Option<Vec<usize>>,
    /// Per layer: `conv` or `full_attention`.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// RoPE base (the loader copies `rope_parameters.rope_theta` here).
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (`rope_scaling` object), parsed by [`RopeScaling::from_config`].
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Output layer shares the embedding matrix (default true).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// transformers' older name of `tie_word_embeddings` (wins when both are given).
    #[serde(default)]
    pub tie_embedding: Option<bool>,
}

fn default_ctx() -> usize {
    128_000
}
fn default_eps() -> f64 {
    1e-5
}
fn default_l_cache() -> usize {
    3
}
fn default_multiple_of() -> usize {
    256
}
fn default_multiplier() -> Option<f64> {
    Some(1.0)
}
fn default_true() -> bool {
    true
}
fn default_theta() -> f64 {
    1e6
}

impl Lfm2Config {
    fn bad(field: &str, msg: String) -> Error {
        Error::Model(format!("config field `{field}`: {msg}"))
    }

    /// The feed-forward width (transformers' `Lfm2MLP`): `block_ff_dim` (else
    /// `intermediate_size`); with `block_auto_adjust_ff_dim`, `int(2 · ff / 3)`, then when
    /// `block_ffn_dim_multiplier` is set `int(multiplier · ff)` rounded up to a multiple of
    /// `block_multiple_of`. (mlx-lm rounds also without a multiplier; the two agree whenever
    /// the multiplier is set, as in every published config.)
    ///
    /// Errors: [`Error::Model`] when neither width is given or `block_multiple_of` is 0.
    pub fn ff_dim(&self) -> Result<usize> {
        let ff = self
            .block_ff_dim
            .or(self.intermediate_size)
            .ok_or_else(|| {
                Self::bad(
                    "intermediate_size",
                    "missing (nor is `block_ff_dim` given)".into(),
                )
            })?;
        if !self.block_auto_adjust_ff_dim {
            return Ok(ff);
        }
        let ff = 2 * ff / 3;
        let Some(m) = self.block_ffn_dim_multiplier else {
            return Ok(ff);
        };
        let multiple = self.block_multiple_of;
        if multiple == 0 {
            return Err(Self::bad("block_multiple_of", "must be positive".into()));
        }
        Ok(((m * ff as f64) as usize).div_ceil(multiple) * multiple)
    }

    /// Whether each layer is an attention layer (else a convolution layer): `layer_types`,
    /// else `full_attn_idxs`, else every layer attention (transformers' `Lfm2Config`).
    ///
    /// Errors: [`Error::Model`] naming the field for a list of the wrong length, an unknown
    /// layer type or an index past the last layer.
    pub fn attention_layers(&self) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if let Some(types) = &self.layer_types {
            if types.len() != n {
                let m = format!("{} entries for {n} layers", types.len());
                return Err(Self::bad("layer_types", m));
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(true),
                    "conv" => Ok(false),
                    other => Err(Self::bad(
                        "layer_types",
                        format!("`{other}` is neither `conv` nor `full_attention`"),
                    )),
                })
                .collect();
        }
        match &self.full_attn_idxs {
            Some(idx) => {
                if let Some(i) = idx.iter().find(|&&i| i >= n) {
                    return Err(Self::bad(
                        "full_attn_idxs",
                        format!("layer {i} of {n} layers"),
                    ));
                }
                Ok((0..n).map(|i| idx.contains(&i)).collect())
            }
            None => Ok(vec![true; n]),
        }
    }
}

/// A gated short convolution (HF `Lfm2ShortConv`, mlx-lm `ShortConv`):
/// `x: [batch, seq, hidden]` -> `out_proj(C ⊙ conv(B ⊙ x'))` where `B, C, x' = in_proj(x)`.
#[derive(Debug)]
pub struct ShortConv {
    /// `in_proj` `[3 · hidden, hidden]`: rows `B`, `C`, `x'`.
    pub in_proj: Linear,
    /// The depthwise causal convolution over `B ⊙ x'`.
    pub conv: CausalConv1d,
    /// `out_proj` `[hidden, hidden]`.
    pub out_proj: Linear,
    hidden: usize,
}

impl ShortConv {
    /// The operator on `x: [batch, seq, hidden]` f32 after the convolution state in `cache`
    /// (array 0, `[batch, L_cache - 1, hidden]`; unset: zeros), which it replaces and advances
    /// by `seq` positions; for [`Mode::Training`] the projections run as differentiable ops
    /// (the convolution always is one), so gradients reach adapters on and below it. Returns
    /// `[batch, seq, hidden]` f32.
    ///
    /// Errors: shapes that do not agree with the weights or the state.
    pub fn forward_mode(&self, x: &Tensor, cache: &mut ArraysCache, mode: Mode) -> Result<Tensor> {
        let h = self.hidden;
        let bcx = self.in_proj.forward_mode(x, mode)?;
        let (b, c, xs) = (
            bcx.narrow(2, 0, h)?,
            bcx.narrow(2, h, h)?,
            bcx.narrow(2, 2 * h, h)?,
        );
        let (y, state) = self.conv.forward(&(b * xs)?, cache.get(0))?;
        cache.set(0, state)?;
        cache.advance(x.dim(1)?);
        self.out_proj.forward_mode(&(c * y)?, mode)
    }
}

impl StateMixer for ShortConv {
    const KIND: &'static str = "convolution";
    const ARRAYS: usize = 1;

    fn forward_cached(&self, x: &Tensor, state: &mut ArraysCache) -> Result<Tensor> {
        self.forward_mode(x, state, Mode::Inference)
    }

    fn forward_train(&self, x: &Tensor, dropout: bool) -> Result<Tensor> {
        self.forward_mode(x, &mut ArraysCache::new(1), Mode::Training { dropout })
    }

    /// `conv.in_proj` and `conv.out_proj` (not the depthwise `conv.conv`).
    fn adapter_linears(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("conv.in_proj", &mut self.in_proj),
            ("conv.out_proj", &mut self.out_proj),
        ]
    }
}

/// An LFM2 causal language model: blocks `h = x + operator(operator_norm(x)); h +
/// feed_forward(ffn_norm(h))` whose operator is attention with q/k norms (HF `Lfm2Attention`)
/// or a [`ShortConv`], and a SwiGLU feed-forward `w2(silu(w1(x)) ⊙ w3(x))`. Adapters: per
/// block under `model.layers.{i}` (mlx-lm's `lfm2` module paths) attention blocks'
/// `self_attn.{q,k,v,out}_proj`, convolution blocks' `conv.in_proj` and `conv.out_proj`, and
/// every block's `feed_forward.{w1,w3,w2}`; then `lm_head`.
pub type Lfm2 = HybridLm<ShortConv>;

/// GGUF tensor names of llama.cpp's `lfm2` (`llama-arch.cpp`; `tensor_mapping.py` maps
/// `model.embedding_norm`, the final norm, to `token_embd_norm`).
pub static GGUF_NAMES: NameTable = NameTable {
    name: "lfm2",
    global: &[
        ("model.embed_tokens", "token_embd"),
        ("model.embedding_norm", "token_embd_norm"),
        ("lm_head", "output"),
    ],
    block: &[
        ("operator_norm", "attn_norm"),
        ("ffn_norm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.out_proj", "attn_output"),
        ("self_attn.q_layernorm", "attn_q_norm"),
        ("self_attn.k_layernorm", "attn_k_norm"),
        ("conv.conv", "shortconv.conv"),
        ("conv.in_proj", "shortconv.in_proj"),
        ("conv.out_proj", "shortconv.out_proj"),
        ("feed_forward.w1", "ffn_gate"),
        ("feed_forward.w3", "ffn_up"),
        ("feed_forward.w2", "ffn_down"),
    ],
    gguf_only: &[],
};

/// An HF-style config from the metadata of a GGUF `lfm2` file (llama.cpp's converter,
/// `conversion/lfm2.py`): the layer kinds from `lfm2.attention.head_count_kv`, one entry per
/// layer, 0 on convolution layers; `lfm2.feed_forward_length` already adjusted (so
/// `block_auto_adjust_ff_dim` is off); `lfm2.shortconv.l_cache`.
///
/// Errors: a missing or mistyped key, naming the file.
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let k = |s: &str| format!("lfm2.{s}");
    let kv = g.get_usize_array(&k("attention.head_count_kv"))?;
    let n = g.get_usize(&k("block_count"))?;
    if kv.len() != n {
        return Err(Error::Model(format!(
            "{}: `lfm2.attention.head_count_kv` has {} entries for {n} layers",
            g.path().display(),
            kv.len()
        )));
    }
    let heads = g.get_usize(&k("attention.head_count"))?;
    let layer_types: Vec<&str> = kv
        .iter()
        .map(|&h| if h == 0 { "conv" } else { "full_attention" })
        .collect();
    let conv_bias = kv
        .iter()
        .position(|&h| h == 0)
        .is_some_and(|i| g.has_tensor(&format!("blk.{i}.shortconv.in_proj.bias")));
    let vocab = match g.opt_usize(&k("vocab_size"))? {
        Some(v) => v,
        None => g.tensor_dims("token_embd.weight")?[0],
    };
    Ok(serde_json::json!({
        "model_type": "lfm2",
        "vocab_size": vocab,
        "hidden_size": g.get_usize(&k("embedding_length"))?,
        "intermediate_size": g.get_usize(&k("feed_forward_length"))?,
        "block_auto_adjust_ff_dim": false,
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": kv.iter().copied().max().unwrap_or(heads),
        "head_dim": g.opt_usize(&k("attention.key_length"))?,
        "norm_eps": g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
        "conv_L_cache": g.get_usize(&k("shortconv.l_cache"))?,
        "conv_bias": conv_bias,
        "layer_types": layer_types,
        "rope_theta": g.opt_f64(&k("rope.freq_base"))?.unwrap_or(1e6),
        "max_position_embeddings": g.opt_usize(&k("context_length"))?.unwrap_or(128_000),
        "tie_word_embeddings": !g.has_tensor("output.weight"),
    }))
}

/// Builds an LFM2 model from an HF-style config and weights (`Lfm2ForCausalLM` names, float or
/// MLX quantized; GGUF `lfm2` through [`GGUF_NAMES`]).
///
/// Errors: [`Error::Model`] naming a missing or invalid config field; [`Error::Tensor`] naming a
/// missing or misshapen weight.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    let cfg: Lfm2Config = serde_json::from_value(config.clone())
        .map_err(|e| Error::Model(format!("config.json: {e}")))?;
    Ok(Box::new(Lfm2::new(&cfg, w)?))
}

impl Lfm2 {
    /// Loads the weights named as in Hugging Face `Lfm2ForCausalLM`.
    ///
    /// Errors: as [`build`].
    pub fn new(cfg: &Lfm2Config, w: &dyn Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let nh = cfg.num_attention_heads;
        let heads = build::Heads {
            n_heads: nh,
            n_kv_heads: cfg.num_key_value_heads.unwrap_or(nh),
            head_dim: cfg.head_dim.unwrap_or(h / nh.max(1)),
        }
        .checked()?;
        let (nkv, hd) = (heads.n_kv_heads, heads.head_dim);
        if cfg.conv_l_cache < 2 {
            return Err(Lfm2Config::bad(
                "conv_L_cache",
                format!("{} must be at least 2", cfg.conv_l_cache),
            ));
        }
        let ff = cfg.ff_dim()?;
        let eps = cfg.norm_eps;
        let norm =
            |name: String, width: usize| RmsNorm::new(w.tensor(&name, &[width])?, eps, false);
        let bias = cfg.conv_bias;
        let numerics = w.layout().numerics;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (i, attn) in cfg.attention_layers()?.into_iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mixer = if attn {
                let a = format!("{p}.self_attn");
                Mixer::Attention(Attention {
                    q_norm: Some(norm(format!("{a}.q_layernorm.weight"), hd)?),
                    k_norm: Some(norm(format!("{a}.k_layernorm.weight"), hd)?),
                    ..Attention::plain(
                        build::qkv(w, &p, heads, h, false, false)?,
                        w.linear(&format!("{a}.out_proj"), h, nh * hd, false)?,
                        nh,
                        nkv,
                        hd,
                    )
                })
            } else {
                let conv_bias = match bias {
                    true => Some(w.tensor(&format!("{p}.conv.conv.bias"), &[h])?),
                    false => None,
                };
                let name = format!("{p}.conv.conv.weight");
                let (weight, _) = build::conv_weight(w, &name, h, cfg.conv_l_cache)?;
                Mixer::State(ShortConv {
                    in_proj: w.linear(&format!("{p}.conv.in_proj"), 3 * h, h, bias)?,
                    conv: CausalConv1d::new(weight, conv_bias)?,
                    out_proj: w.linear(&format!("{p}.conv.out_proj"), h, h, bias)?,
                    hidden: h,
                })
            };
            let f = format!("{p}.feed_forward");
            layers.push(HybridBlock {
                mixer_norm: norm(format!("{p}.operator_norm.weight"), h)?,
                mixer,
                mlp_norm: norm(format!("{p}.ffn_norm.weight"), h)?,
                mlp: Mlp::Dense(GatedMlp {
                    gate_up: GateUp::Separate {
                        gate: w.linear(&format!("{f}.w1"), ff, h, false)?,
                        up: w.linear(&format!("{f}.w3"), ff, h, false)?,
                    },
                    down_proj: w.linear(&format!("{f}.w2"), h, ff, false)?,
                    activation: Activation::Silu,
                    numerics,
                }),
            });
        }
        let embed_tokens = w.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let tied = cfg
            .tie_embedding
            .or(cfg.tie_word_embeddings)
            .unwrap_or(true);
        let lm_head = build::lm_head(w, &embed_tokens, tied, cfg.vocab_size, h)?;
        let scaling = RopeScaling::from_config(cfg.rope_scaling.as_ref())?;
        let rope = RotaryEmbedding::new(hd, cfg.rope_theta, &scaling, false, w.device())?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: norm("model.embedding_norm.weight".into(), h)?,
            lm_head,
            rope,
            adapter_key: lfm2_key,
            wrapper: None,
            device: w.device().clone(),
            info: ModelInfo {
                architecture: "lfm2".into(),
                vocab_size: cfg.vocab_size,
                n_layers: cfg.num_hidden_layers,
                hidden_size: h,
                n_kv_heads: nkv,
                head_dim: hd,
                context_length: cfg.max_position_embeddings,
            },
        })
    }
}

/// mlx-lm's (and Hugging Face's) names of the linear layers of an LFM2 block, for the
/// names [`Attention::linears_mut`] and [`GatedMlp::linears_mut`] give them.
fn lfm2_key(key: &'static str) -> &'static str {
    match key {
        "self_attn.o_proj" => "self_attn.out_proj",
        "mlp.gate_proj" => "feed_forward.w1",
        "mlp.up_proj" => "feed_forward.w3",
        "mlp.down_proj" => "feed_forward.w2",
        k => k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: serde_json::Value) -> Lfm2Config {
        let mut base = serde_json::json!({
            "vocab_size": 8, "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "intermediate_size": 70
        });
        for (k, x) in v.as_object().unwrap() {
            base[k] = x.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn ff_dim_follows_transformers() {
        // int(2 * 70 / 3) = 46, times 1.0, rounded up to 32: 64.
        assert_eq!(
            cfg(serde_json::json!({"block_multiple_of": 32}))
                .ff_dim()
                .unwrap(),
            64
        );
        // LFM2-1.2B: 12288 -> 8192, times 1.0, multiple of 256: 8192.
        let c = cfg(serde_json::json!({"block_ff_dim": 12288, "intermediate_size": 1}));
        assert_eq!(c.ff_dim().unwrap(), 8192);
        let c = cfg(serde_json::json!({"block_ffn_dim_multiplier": null}));
        assert_eq!(c.ff_dim().unwrap(), 46);
        let c = cfg(serde_json::json!({"block_auto_adjust_ff_dim": false}));
        assert_eq!(c.ff_dim().unwrap(), 70);
        let c = cfg(serde_json::json!({"intermediate_size": null}));
        let e = c.ff_dim().unwrap_err().to_string();
        assert!(e.contains("intermediate_size"), "{e}");
    }

    #[test]
    fn layer_kinds_from_types_or_indices() {
        let c = cfg(serde_json::json!({"layer_types":
            ["conv", "full_attention", "conv", "full_attention"]}));
        assert_eq!(c.attention_layers().unwrap(), [false, true, false, true]);
        let c = cfg(serde_json::json!({"full_attn_idxs": [2]}));
        assert_eq!(c.attention_layers().unwrap(), [false, false, true, false]);
        assert_eq!(
            cfg(serde_json::json!({})).attention_layers().unwrap(),
            [true; 4]
        );
        for bad in [
            serde_json::json!({"layer_types": ["conv"]}),
            serde_json::json!({"layer_types": ["conv", "mamba", "conv", "conv"]}),
            serde_json::json!({"full_attn_idxs": [4]}),
        ] {
            let e = cfg(bad).attention_layers().unwrap_err().to_string();
            assert!(
                e.contains("layer_types") || e.contains("full_attn_idxs"),
                "{e}"
            );
        }
    }
}
