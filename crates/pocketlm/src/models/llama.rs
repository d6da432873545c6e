//! Llama architecture (Llama 2/3.x, Mistral, SmolLM): RMSNorm, RoPE, grouped-query attention,
//! SwiGLU MLP, optionally tied embeddings. Reference: Hugging Face `modeling_llama.py` and
//! mlx-lm `models/llama.py`.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::gguf::GgufFile;
use crate::kv_cache::{KvCache, LayerKvCache};
use crate::models::names::{self, NameTable};
use crate::models::{CausalLM, LinearSlot, Logits, ModelInfo};
use crate::nn::{
    attention::{causal_attention, causal_attention_diff},
    causal_mask, Embedding, Linear, RmsNorm, RopeScaling, RotaryEmbedding,
};
use crate::weights::{QkRowOrder, Weights};
use crate::{Error, Result};

/// GGUF tensor names of the Llama family (Llama, Mistral, Qwen2, Qwen3: llama.cpp's
/// `LLM_ARCH_LLAMA` / `QWEN2` / `QWEN3` in `llama-arch.cpp`), as pairs with the Hugging Face
/// module names (`tensor_mapping.py`).
pub static GGUF_NAMES: NameTable = NameTable {
    name: "llama",
    global: names::GLOBAL,
    block: &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ],
    gguf_only: &["rope_freqs.weight"],
};

/// config.json of a Llama-family model (Hugging Face field names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (`rope_scaling` object), parsed by [`RopeScaling::from_config`].
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Per-frequency RoPE divisors from GGUF `rope_freqs.weight` (not a Hugging Face field).
    #[serde(default)]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Longest context.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Output layer shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Sliding-window attention span (Mistral), in tokens: a query sees itself and the
    /// `sliding_window - 1` keys before it.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Fraction of each head's dimensions that RoPE rotates (Phi-3 / Phi-4-mini); 1 if absent.
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

/// How a Llama-family architecture differs from Llama itself. The layers are the same; only
/// these switches change (Hugging Face names for the weights in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaVariant {
    /// Architecture name reported in [`ModelInfo::architecture`].
    pub name: &'static str,
    /// Biases on q/k/v (`attention_bias` in config.json also turns them on).
    pub qkv_bias: bool,
    /// Bias on o_proj (`attention_bias` also turns it on).
    pub o_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (`self_attn.q_norm` / `k_norm`,
    /// `[head_dim]`; Qwen3).
    pub qk_norm: bool,
    /// One `self_attn.qkv_proj` `[(heads + 2 kv_heads) * head_dim, hidden]` instead of three
    /// projections (Phi-3).
    pub fused_qkv: bool,
    /// One `mlp.gate_up_proj` `[2 * intermediate, hidden]` (gate rows first) instead of two
    /// (Phi-3).
    pub fused_gate_up: bool,
}

impl LlamaVariant {
    /// Llama / Mistral / SmolLM.
    pub const LLAMA: Self = Self {
        name: "llama",
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        fused_qkv: false,
        fused_gate_up: false,
    };
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_ctx() -> usize {
    2048
}

impl LlamaConfig {
    fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(Error::Model(format!("config field `{f}`: {m}")));
        if self.num_attention_heads == 0 || self.n_kv_heads() == 0 {
            return bad("num_attention_heads", "must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.n_kv_heads()) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.n_kv_heads(),
                    self.num_attention_heads
                ),
            );
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} must be even and positive", self.head_dim()),
            );
        }
        Ok(())
    }
}

/// Reads an HF-style config from GGUF metadata (`{arch}.*` keys, llama.cpp naming).
pub fn config_from_gguf(g: &GgufFile) -> Result<serde_json::Value> {
    let arch = g.architecture()?;
    let k = |s: &str| format!("{arch}.{s}");
    let heads = g.get_usize(&k("attention.head_count"))?;
    let hidden = g.get_usize(&k("embedding_length"))?;
    let vocab = match g.opt_usize(&k("vocab_size"))? {
        Some(v) => v,
        None => g.tensor_info("token_embd.weight")?.0[0],
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
        // llama.cpp's converter writes YaRN as the factor and the original context length.
        Some("yarn") => serde_json::json!({
            "rope_type": "yarn",
            "factor": g.get_f64(&k("rope.scaling.factor"))?,
            "original_max_position_embeddings":
                g.get_f64(&k("rope.scaling.original_context_length"))?,
            "beta_fast": g.opt_f64(&k("rope.scaling.yarn_beta_fast"))?,
            "beta_slow": g.opt_f64(&k("rope.scaling.yarn_beta_slow"))?,
        }),
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
        "intermediate_size": g.get_usize(&k("feed_forward_length"))?,
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

/// Builds a Llama model from an HF-style config and weights.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn CausalLM>> {
    build_variant(config, w, LlamaVariant::LLAMA)
}

/// Builds a Llama-family model of the given variant from an HF-style config and weights.
///
/// Errors: [`Error::Model`] naming the config field that is missing or invalid;
/// [`Error::Tensor`] naming a missing or misshapen weight.
pub fn build_variant(
    config: &serde_json::Value,
    w: &dyn Weights,
    variant: LlamaVariant,
) -> Result<Box<dyn CausalLM>> {
    let cfg: LlamaConfig = serde_json::from_value(config.clone())
        .map_err(|e| Error::Model(format!("config.json: {e}")))?;
    Ok(Box::new(Llama::with_variant(cfg, w, variant)?))
}

#[derive(Debug)]
enum QkvProj {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

#[derive(Debug)]
struct Attention {
    qkv: QkvProj,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        cos_sin: &(Tensor, Tensor),
        cache: &mut dyn LayerKvCache,
        mask: Option<&Tensor>,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let shape = |t: Tensor, h: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, h, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate { q, k, v } => {
                let mut qkv = Linear::forward_many(&[q, k, v], x)?.into_iter();
                let mut next = || {
                    qkv.next()
                        .ok_or_else(|| Error::InvalidArgument("q/k/v projection missing".into()))
                };
                (next()?, next()?, next()?)
            }
            QkvProj::Fused(l) => {
                let y = l.forward(x)?;
                let (nq, nk) = (
                    self.n_heads * self.head_dim,
                    self.n_kv_heads * self.head_dim,
                );
                (
                    y.narrow(2, 0, nq)?,
                    y.narrow(2, nq, nk)?,
                    y.narrow(2, nq + nk, nk)?,
                )
            }
        };
        let mut q = shape(q, self.n_heads)?;
        let mut k = shape(k, self.n_kv_heads)?;
        let v = shape(v, self.n_kv_heads)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = rope.apply_with(&q, &cos_sin.0, &cos_sin.1)?;
        let k = rope.apply_with(&k, &cos_sin.0, &cos_sin.1)?;
        let (k, v) = cache.update(&k, &v)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let o = causal_attention(&q, &k, &v, scale, window, mask)?;
        self.o_proj.forward(&o)
    }
}

impl Attention {
    /// Differentiable attention over the whole sequence (training; no cache).
    fn forward_diff(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        cos_sin: &(Tensor, Tensor),
        mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let shape = |t: Tensor, h: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, h, self.head_dim))?.transpose(1, 2)?)
        };
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate { q, k, v } => (
                q.forward_train(x, train)?,
                k.forward_train(x, train)?,
                v.forward_train(x, train)?,
            ),
            QkvProj::Fused(l) => {
                let y = l.forward_train(x, train)?;
                let (nq, nk) = (
                    self.n_heads * self.head_dim,
                    self.n_kv_heads * self.head_dim,
                );
                (
                    y.narrow(2, 0, nq)?,
                    y.narrow(2, nq, nk)?,
                    y.narrow(2, nq + nk, nk)?,
                )
            }
        };
        let mut q = shape(q, self.n_heads)?;
        let mut k = shape(k, self.n_kv_heads)?;
        let v = shape(v, self.n_kv_heads)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward_diff(&q)?;
            k = kn.forward_diff(&k)?;
        }
        let q = rope.apply_diff(&q, &cos_sin.0, &cos_sin.1)?;
        let k = rope.apply_diff(&k, &cos_sin.0, &cos_sin.1)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let o = causal_attention_diff(&q, &k, &v, scale, mask)?;
        self.o_proj.forward_train(&o, train)
    }
}

#[derive(Debug)]
enum GateUp {
    Separate {
        gate: Linear,
        up: Linear,
    },
    Fused {
        gate_up: Linear,
        intermediate: usize,
    },
}

#[derive(Debug)]
struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
}

impl Mlp {
    /// SwiGLU (Shazeer 2020): `down(silu(gate(x)) * up(x))`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (g, u) = match &self.gate_up {
            GateUp::Separate { gate, up } => {
                let gu = Linear::forward_many(&[gate, up], x)?;
                let [g, u] = <[Tensor; 2]>::try_from(gu)
                    .map_err(|_| Error::InvalidArgument("gate/up projection missing".into()))?;
                (g, u)
            }
            GateUp::Fused {
                gate_up,
                intermediate,
            } => {
                let y = gate_up.forward(x)?;
                #[cfg(feature = "cuda")]
                if y.device().is_cuda() && y.dtype() == DType::F32 {
                    let h = crate::cuda::swiglu_stacked(&y, *intermediate)?;
                    return self.down_proj.forward(&h);
                }
                let last = y.rank() - 1;
                (
                    y.narrow(last, 0, *intermediate)?,
                    y.narrow(last, *intermediate, *intermediate)?,
                )
            }
        };
        if g.device().is_cpu() && g.dtype() == DType::F32 && u.dtype() == DType::F32 {
            // ggml's SwiGLU rounding, see `kernels::float::swiglu`.
            let (gv, uv) = (
                g.flatten_all()?.to_vec1::<f32>()?,
                u.flatten_all()?.to_vec1::<f32>()?,
            );
            let mut y = vec![0f32; gv.len()];
            crate::kernels::float::swiglu(&gv, &uv, &mut y);
            let y = Tensor::from_vec(y, g.shape(), g.device())?;
            return self.down_proj.forward(&y);
        }
        self.down_proj.forward(&(candle_nn::ops::silu(&g)? * u)?)
    }
}

impl Mlp {
    /// Differentiable SwiGLU (training).
    fn forward_diff(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (g, u) = match &self.gate_up {
            GateUp::Separate { gate, up } => {
                (gate.forward_train(x, train)?, up.forward_train(x, train)?)
            }
            GateUp::Fused {
                gate_up,
                intermediate,
            } => {
                let y = gate_up.forward_train(x, train)?;
                let last = y.rank() - 1;
                (
                    y.narrow(last, 0, *intermediate)?,
                    y.narrow(last, *intermediate, *intermediate)?,
                )
            }
        };
        self.down_proj
            .forward_train(&(candle_nn::ops::silu(&g)? * u)?, train)
    }
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A Llama-family causal language model.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    sliding_window: Option<usize>,
    /// Row order of the q/k projections, from the weights' layout.
    qk_rows: QkRowOrder,
    info: ModelInfo,
    device: Device,
    /// The fused decode step on CUDA ([`crate::cuda::CudaDecoder`]), built at the first
    /// one-token step; reset when adapters change the layers.
    #[cfg(feature = "cuda")]
    cuda_decoder: std::sync::Mutex<CudaDecode>,
}

/// Whether the fused CUDA decode step has been built for a model.
#[cfg(feature = "cuda")]
#[derive(Debug, Default)]
enum CudaDecode {
    /// Not tried yet.
    #[default]
    Untried,
    /// The model's layers or settings are not ones it takes.
    Unavailable,
    /// Built.
    Ready(Box<crate::cuda::CudaDecoder>),
}

impl Llama {
    /// Loads the weights named as in Hugging Face `LlamaForCausalLM`.
    pub fn new(cfg: LlamaConfig, w: &dyn Weights) -> Result<Self> {
        Self::with_variant(cfg, w, LlamaVariant::LLAMA)
    }

    /// Loads a Llama-family variant (Hugging Face weight names of that architecture).
    pub fn with_variant(cfg: LlamaConfig, w: &dyn Weights, v: LlamaVariant) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let inter = cfg.intermediate_size;
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        let norm = |name: &str| RmsNorm::new(w.tensor(name, &[h])?, cfg.rms_norm_eps, false);
        let head_norm = |name: &str| RmsNorm::new(w.tensor(name, &[hd])?, cfg.rms_norm_eps, false);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv_b = cfg.attention_bias || v.qkv_bias;
            let o_b = cfg.attention_bias || v.o_bias;
            let mb = cfg.mlp_bias;
            let qkv = if v.fused_qkv {
                QkvProj::Fused(w.linear(
                    &format!("{p}.self_attn.qkv_proj"),
                    (nh + 2 * nkv) * hd,
                    h,
                    qkv_b,
                )?)
            } else if let (false, Some(l)) = (
                qkv_b,
                w.stacked_linear(
                    &[
                        &format!("{p}.self_attn.q_proj"),
                        &format!("{p}.self_attn.k_proj"),
                        &format!("{p}.self_attn.v_proj"),
                    ],
                    &[nh * hd, nkv * hd, nkv * hd],
                    h,
                )?,
            ) {
                // One launch for q, k and v on a GPU.
                QkvProj::Fused(l)
            } else {
                QkvProj::Separate {
                    q: w.linear(&format!("{p}.self_attn.q_proj"), nh * hd, h, qkv_b)?,
                    k: w.linear(&format!("{p}.self_attn.k_proj"), nkv * hd, h, qkv_b)?,
                    v: w.linear(&format!("{p}.self_attn.v_proj"), nkv * hd, h, qkv_b)?,
                }
            };
            let (q_norm, k_norm) = if v.qk_norm {
                (
                    Some(head_norm(&format!("{p}.self_attn.q_norm.weight"))?),
                    Some(head_norm(&format!("{p}.self_attn.k_norm.weight"))?),
                )
            } else {
                (None, None)
            };
            let gate_up = if v.fused_gate_up {
                GateUp::Fused {
                    gate_up: w.linear(&format!("{p}.mlp.gate_up_proj"), 2 * inter, h, mb)?,
                    intermediate: inter,
                }
            } else if let (false, Some(l)) = (
                mb,
                w.stacked_linear(
                    &[&format!("{p}.mlp.gate_proj"), &format!("{p}.mlp.up_proj")],
                    &[inter, inter],
                    h,
                )?,
            ) {
                GateUp::Fused {
                    gate_up: l,
                    intermediate: inter,
                }
            } else {
                GateUp::Separate {
                    gate: w.linear(&format!("{p}.mlp.gate_proj"), inter, h, mb)?,
                    up: w.linear(&format!("{p}.mlp.up_proj"), inter, h, mb)?,
                }
            };
            layers.push(Block {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    qkv,
                    o_proj: w.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd, o_b)?,
                    q_norm,
                    k_norm,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_up,
                    down_proj: w.linear(&format!("{p}.mlp.down_proj"), h, inter, mb)?,
                },
            });
        }
        let embed_tokens = w.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let lm_head = if cfg.tie_word_embeddings || !w.contains("lm_head.weight") {
            embed_tokens.as_linear(w.device())?
        } else {
            w.linear("lm_head", cfg.vocab_size, h, false)?
        };
        let scaling = match &cfg.rope_freq_factors {
            Some(ff) => RopeScaling::FreqFactors(ff.clone()),
            None => RopeScaling::from_config(cfg.rope_scaling.as_ref())?,
        };
        // llama.cpp's converter permutes Llama q/k rows so that adjacent-pair rotation applies.
        let qk_rows = w.layout().qk_rows;
        let interleaved = qk_rows.interleaved_rope();
        let rotary_dim = match cfg.partial_rotary_factor {
            Some(f) if f > 0.0 && f <= 1.0 => (hd as f64 * f) as usize,
            None => hd,
            Some(f) => {
                return Err(Error::Model(format!(
                    "config field `partial_rotary_factor`: {f} is not in (0, 1]"
                )))
            }
        };
        let rope = RotaryEmbedding::new(
            rotary_dim,
            cfg.rope_theta,
            &scaling,
            interleaved,
            w.device(),
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: norm("model.norm.weight")?,
            lm_head,
            rope,
            sliding_window: cfg.sliding_window,
            qk_rows,
            device: w.device().clone(),
            #[cfg(feature = "cuda")]
            cuda_decoder: Default::default(),
            info: ModelInfo {
                architecture: v.name.into(),
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

impl Llama {
    /// Blocks `0..upto` of the inference path on `x: [b, s, hidden]`, appending to `cache`.
    fn run_layers(
        &self,
        mut x: Tensor,
        upto: usize,
        cache: &mut KvCache,
        cos_sin: &(Tensor, Tensor),
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        for (i, layer) in self.layers.iter().enumerate().take(upto) {
            let c = cache
                .layer(i)
                .ok_or_else(|| Error::InvalidArgument("KV cache too short".into()))?;
            let r = x.clone();
            let hn = layer.input_layernorm.forward(&x)?;
            x = (layer.self_attn.forward(
                &hn,
                &self.rope,
                cos_sin,
                c,
                mask,
                self.sliding_window,
            )? + r)?;
            let r = x.clone();
            let hn = layer.post_attention_layernorm.forward(&x)?;
            x = (layer.mlp.forward(&hn)? + r)?;
        }
        Ok(x)
    }
}

/// Positions the fused CUDA decode step's RoPE tables cover at most.
#[cfg(feature = "cuda")]
const CUDA_DECODE_MAX_POSITIONS: usize = 32768;

#[cfg(feature = "cuda")]
impl Llama {
    /// The fused decode step's weights and tables, or `None` when this model has something it
    /// does not take: layers other than our CUDA quantized matrices (or with biases, or
    /// adapters), q/k norms, a sliding window, LongRoPE or partial rotary, head_dim other than
    /// 64/128. `POCKETLM_FUSED_DECODE=0` turns it off.
    fn cuda_decoder_spec(&self) -> Result<Option<crate::cuda::DecoderSpec>> {
        use crate::cuda::{DecoderLayer, DecoderSpec};
        if std::env::var("POCKETLM_FUSED_DECODE").is_ok_and(|v| v == "0")
            || !self.device.is_cuda()
            || self.sliding_window.is_some()
            || !self.rope.offset_independent()
            || self.rope.rotary_dim() != self.info.head_dim
        {
            return Ok(None);
        }
        let ours = |l: &Linear| match l {
            Linear::Cuda { weight, bias: None } => Some(weight.clone()),
            _ => None,
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut dims = None;
        for b in &self.layers {
            let a = &b.self_attn;
            let (
                QkvProj::Fused(qkv),
                GateUp::Fused {
                    gate_up,
                    intermediate,
                },
            ) = (&a.qkv, &b.mlp.gate_up)
            else {
                return Ok(None);
            };
            if a.q_norm.is_some() || a.k_norm.is_some() {
                return Ok(None);
            }
            let (Some(qkv), Some(o), Some(gate_up), Some(down)) = (
                ours(qkv),
                ours(&a.o_proj),
                ours(gate_up),
                ours(&b.mlp.down_proj),
            ) else {
                return Ok(None);
            };
            dims = Some((a.n_heads, a.n_kv_heads, a.head_dim, *intermediate));
            layers.push(DecoderLayer {
                attn_norm: b.input_layernorm.weight().clone(),
                qkv,
                o,
                ffn_norm: b.post_attention_layernorm.weight().clone(),
                gate_up,
                down,
            });
        }
        let Some((n_heads, n_kv_heads, head_dim, intermediate)) = dims else {
            return Ok(None);
        };
        let positions = self.info.context_length.clamp(1, CUDA_DECODE_MAX_POSITIONS);
        let (cos, sin) = self.rope.cos_sin(0, positions)?;
        Ok(Some(DecoderSpec {
            layers,
            norm: self.norm.weight().clone(),
            lm_head: ours(&self.lm_head),
            eps: self.norm.eps(),
            n_heads,
            n_kv_heads,
            head_dim,
            hidden: self.info.hidden_size,
            intermediate,
            interleaved: self.rope.interleaved(),
            cos,
            sin,
        }))
    }

    /// One token through the fused CUDA decode step, appending to `cache` in place; `None` when
    /// the step does not apply (see [`Self::cuda_decoder_spec`]; also caches that do not append
    /// in place and positions past its tables), and the caller takes the general path.
    fn cuda_decode(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Option<Tensor>> {
        let mut slot = self
            .cuda_decoder
            .lock()
            .map_err(|_| Error::Model("the CUDA decoder lock is poisoned".into()))?;
        if matches!(*slot, CudaDecode::Untried) {
            *slot = match self.cuda_decoder_spec()? {
                Some(spec) => CudaDecode::Ready(Box::new(crate::cuda::CudaDecoder::new(spec)?)),
                None => CudaDecode::Unavailable,
            };
        }
        let CudaDecode::Ready(dec) = &mut *slot else {
            return Ok(None);
        };
        let pos = cache.offset();
        if pos + 1 >= dec.spec().max_positions() {
            return Ok(None);
        }
        let (nkv, hd) = (self.info.n_kv_heads, self.info.head_dim);
        let mut bufs = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let Some(layer) = cache.layer(i) else {
                return Ok(None);
            };
            if layer.offset() != pos {
                return Ok(None);
            }
            match layer.reserve_in_place(1, nkv, hd, &self.device)? {
                Some(kv) => bufs.push(kv),
                None => return Ok(None),
            }
        }
        let capacity = bufs[0].0.dim(2)?;
        let mut ptrs = Vec::with_capacity(bufs.len());
        for (k, v) in &bufs {
            if k.dim(2)? != capacity || v.dim(2)? != capacity {
                return Ok(None);
            }
            ptrs.push((
                crate::cuda::device_address(k)?,
                crate::cuda::device_address(v)?,
            ));
        }
        let x = self.embed_tokens.forward(input_ids)?;
        let out = dec.step(&x, pos, &ptrs, capacity)?;
        for i in 0..self.layers.len() {
            if let Some(layer) = cache.layer(i) {
                layer.commit(1)?;
            }
        }
        if dec.spec().lm_head.is_some() {
            Ok(Some(out))
        } else {
            Ok(Some(self.lm_head.forward(&out)?))
        }
    }
}

fn make_slot<'a>(
    layer: usize,
    key: &str,
    linear: &'a mut Linear,
    permuted_heads: Option<usize>,
) -> LinearSlot<'a> {
    LinearSlot {
        name: format!("model.layers.{layer}.{key}"),
        layer: Some(layer),
        key: key.to_string(),
        linear,
        permuted_heads,
    }
}

impl CausalLM for Llama {
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if cache.n_layers() != self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "KV cache has {} layers, model has {}",
                cache.n_layers(),
                self.layers.len()
            )));
        }
        #[cfg(feature = "cuda")]
        if b == 1 && s == 1 && self.device.is_cuda() {
            if let Some(out) = self.cuda_decode(input_ids, cache)? {
                return Ok(match logits {
                    Logits::Last => out,
                    Logits::All => out.unsqueeze(1)?,
                });
            }
        }
        let _ = b;
        // RoPE positions continue from all positions seen; the mask spans the keys the cache
        // will return (fewer than `offset + s` for a rotating cache).
        let offset = cache.offset();
        let kv_len = cache.attend_len(s);
        let needs_window = self.sliding_window.is_some_and(|w| kv_len > w);
        let mut x = self.embed_tokens.forward(input_ids)?;
        // The CPU f32 attention kernel masks by position itself.
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
        let mask = if !cpu_f32 && (s > 1 || needs_window) {
            Some(causal_mask(
                s,
                kv_len,
                self.sliding_window,
                input_ids.device(),
            )?)
        } else {
            None
        };
        let cos_sin = self.rope.cos_sin(offset, s)?;
        x = self.run_layers(x, self.layers.len(), cache, &cos_sin, mask.as_ref())?;
        let x = match logits {
            Logits::Last => x.narrow(1, s - 1, 1)?,
            Logits::All => x,
        };
        let out = self.lm_head.forward(&self.norm.forward(&x)?)?;
        Ok(match logits {
            Logits::Last => out.squeeze(1)?,
            Logits::All => out,
        })
    }

    fn new_cache(&self) -> KvCache {
        KvCache::growing(self.layers.len())
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn linears_mut(&mut self) -> Vec<LinearSlot<'_>> {
        #[cfg(feature = "cuda")]
        if let Ok(slot) = self.cuda_decoder.get_mut() {
            // Adapters may swap layers: build the fused step again at the next token.
            *slot = CudaDecode::Untried;
        }
        let qk_rows = self.qk_rows;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let (nh, nkv) = (a.n_heads, a.n_kv_heads);
            let slot = |key: &str, linear, heads: Option<usize>| {
                make_slot(
                    i,
                    key,
                    linear,
                    heads.and_then(|h| qk_rows.permuted_heads(h)),
                )
            };
            let mut here = Vec::new();
            match &mut a.qkv {
                QkvProj::Separate { q, k, v } => {
                    here.push(slot("self_attn.q_proj", q, Some(nh)));
                    here.push(slot("self_attn.k_proj", k, Some(nkv)));
                    here.push(slot("self_attn.v_proj", v, None));
                }
                QkvProj::Fused(l) => here.push(slot("self_attn.qkv_proj", l, None)),
            }
            here.push(slot("self_attn.o_proj", &mut a.o_proj, None));
            let m = &mut layer.mlp;
            match &mut m.gate_up {
                GateUp::Separate { gate, up } => {
                    here.push(slot("mlp.gate_proj", gate, None));
                    here.push(slot("mlp.up_proj", up, None));
                }
                GateUp::Fused { gate_up, .. } => here.push(slot("mlp.gate_up_proj", gate_up, None)),
            }
            here.push(slot("mlp.down_proj", &mut m.down_proj, None));
            out.extend(here);
        }
        out.push(LinearSlot {
            name: "lm_head".into(),
            layer: None,
            key: "lm_head".into(),
            linear: &mut self.lm_head,
            permuted_heads: None,
        });
        out
    }

    fn hidden_states(&self, input_ids: &Tensor, upto: usize) -> Result<Tensor> {
        let (_b, s) = input_ids.dims2()?;
        let mut cache = self.new_cache();
        let x = self.embed_tokens.forward(input_ids)?;
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
        let mask = if !cpu_f32 && s > 1 {
            Some(causal_mask(s, s, self.sliding_window, input_ids.device())?)
        } else {
            None
        };
        let cos_sin = self.rope.cos_sin(0, s)?;
        let upto = upto.min(self.layers.len());
        self.run_layers(x, upto, &mut cache, &cos_sin, mask.as_ref())
    }

    fn forward_blocks(
        &self,
        hidden: &Tensor,
        range: std::ops::Range<usize>,
        train: bool,
    ) -> Result<Tensor> {
        let (_b, s, _) = hidden.dims3()?;
        let mut x = hidden.clone();
        if range.is_empty() {
            return Ok(x);
        }
        let cos_sin = self.rope.cos_sin(0, s)?;
        let mask = causal_mask(s, s, self.sliding_window, hidden.device())?;
        for layer in self
            .layers
            .iter()
            .skip(range.start)
            .take(range.end - range.start)
        {
            let hn = layer.input_layernorm.forward_diff(&x)?;
            x = (layer
                .self_attn
                .forward_diff(&hn, &self.rope, &cos_sin, &mask, train)?
                + x)?;
            let hn = layer.post_attention_layernorm.forward_diff(&x)?;
            x = (layer.mlp.forward_diff(&hn, train)? + x)?;
        }
        Ok(x)
    }

    fn forward_head(
        &self,
        hidden: &Tensor,
        train: bool,
        select: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = match select {
            Some(idx) => hidden.reshape(((), hidden.dim(2)?))?.index_select(idx, 0)?,
            None => hidden.clone(),
        };
        self.lm_head
            .forward_train(&self.norm.forward_diff(&x)?, train)
    }
}
