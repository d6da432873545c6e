//! BERT encoders (Devlin et al. 2019; all-MiniLM-L6-v2, bge-small-en-v1.5): word + position +
//! token-type embeddings and a LayerNorm, then post-norm blocks
//! `h = LayerNorm(x + attention(x)); y = LayerNorm(h + ffn(h))` with bidirectional attention
//! masked at padding and a GELU MLP. Reference: Hugging Face `modeling_bert.py` (`BertModel`,
//! absolute positions); tensor names as it saves them, with or without the `bert.` prefix that
//! task models (`BertForMaskedLM`, ...) add. The pooler (`pooler.dense`) is not used:
//! sentence-transformers pools the last hidden states itself.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::models::Encoder;
use crate::nn::{ops, Embedding, LayerNorm, Linear};
use crate::weights::Weights;
use crate::{Error, Result};

/// config.json of a BERT model (Hugging Face `BertConfig` field names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size (rows of `word_embeddings`).
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// MLP activation: `gelu` (exact, erf), `gelu_new` / `gelu_pytorch_tanh` (tanh
    /// approximation) or `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Rows of `position_embeddings`: the longest input, in tokens.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// Rows of `token_type_embeddings` (segment A/B).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Only `absolute` (learned position embeddings) is supported.
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".into()
}

/// The MLP activations BERT configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    GeluErf,
    GeluTanh,
    Relu,
}

impl Act {
    fn from_config(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Act::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Act::GeluTanh),
            "relu" => Ok(Act::Relu),
            other => Err(Error::Model(format!(
                "config.json: `hidden_act` {other:?} is not supported for bert (gelu, gelu_new, \
                 gelu_pytorch_tanh, relu)"
            ))),
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::GeluErf => x.gelu_erf()?,
            Act::GeluTanh => x.gelu()?,
            Act::Relu => x.relu()?,
        })
    }
}

/// One post-norm BERT block.
#[derive(Debug)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// A BERT encoder ([`Encoder`]).
#[derive(Debug)]
pub struct Bert {
    word_embeddings: Embedding,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<BertLayer>,
    n_heads: usize,
    head_dim: usize,
    act: Act,
    cfg: BertConfig,
    device: Device,
}

/// Builds a BERT encoder from its config.json and weights ([`crate::models::ENCODERS`]).
///
/// Errors: [`Error::Model`] naming the config field that is missing or unsupported;
/// [`Error::Tensor`] naming a missing or misshapen weight.
pub fn build(config: &serde_json::Value, w: &dyn Weights) -> Result<Box<dyn Encoder>> {
    let cfg: BertConfig = serde_json::from_value(config.clone())
        .map_err(|e| Error::Model(format!("config.json: {e}")))?;
    Ok(Box::new(Bert::new(cfg, w)?))
}

impl Bert {
    /// Loads the weights named as Hugging Face `BertModel` saves them (`embeddings.*`,
    /// `encoder.layer.N.*`), or the same under `bert.`.
    ///
    /// Errors: as [`build`].
    pub fn new(cfg: BertConfig, w: &dyn Weights) -> Result<Self> {
        if cfg.position_embedding_type != "absolute" {
            return Err(Error::Model(format!(
                "config.json: `position_embedding_type` {:?} is not supported (absolute)",
                cfg.position_embedding_type
            )));
        }
        let (h, inter, nh) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
        );
        if nh == 0 || !h.is_multiple_of(nh) {
            return Err(Error::Model(format!(
                "config.json: `hidden_size` {h} is not a multiple of `num_attention_heads` {nh}"
            )));
        }
        let act = Act::from_config(&cfg.hidden_act)?;
        let p = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let eps = cfg.layer_norm_eps;
        let norm = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                w.tensor(&format!("{name}.weight"), &[h])?,
                w.tensor(&format!("{name}.bias"), &[h])?,
                eps,
            ))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{p}encoder.layer.{i}");
            layers.push(BertLayer {
                query: w.linear(&format!("{l}.attention.self.query"), h, h, true)?,
                key: w.linear(&format!("{l}.attention.self.key"), h, h, true)?,
                value: w.linear(&format!("{l}.attention.self.value"), h, h, true)?,
                attn_out: w.linear(&format!("{l}.attention.output.dense"), h, h, true)?,
                attn_norm: norm(&format!("{l}.attention.output.LayerNorm"))?,
                intermediate: w.linear(&format!("{l}.intermediate.dense"), inter, h, true)?,
                output: w.linear(&format!("{l}.output.dense"), h, inter, true)?,
                out_norm: norm(&format!("{l}.output.LayerNorm"))?,
            });
        }
        Ok(Self {
            word_embeddings: w.embedding(
                &format!("{p}embeddings.word_embeddings.weight"),
                cfg.vocab_size,
                h,
            )?,
            position_embeddings: w.tensor(
                &format!("{p}embeddings.position_embeddings.weight"),
                &[cfg.max_position_embeddings, h],
            )?,
            token_type_embeddings: w.tensor(
                &format!("{p}embeddings.token_type_embeddings.weight"),
                &[cfg.type_vocab_size, h],
            )?,
            embed_norm: norm(&format!("{p}embeddings.LayerNorm"))?,
            layers,
            n_heads: nh,
            head_dim: h / nh,
            act,
            device: w.device().clone(),
            cfg,
        })
    }

    /// `x: [b, s, h]` -> `[b, heads, s, head_dim]`.
    fn heads(&self, x: Tensor, b: usize, s: usize) -> Result<Tensor> {
        Ok(x.reshape((b, s, self.n_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// One block on `x: [b, s, h]` with the additive key mask `bias: [b, 1, 1, s]`.
    fn layer(&self, l: &BertLayer, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let q = self.heads(l.query.forward(x)?, b, s)?;
        let k = self.heads(l.key.forward(x)?, b, s)?;
        let v = self.heads(l.value.forward(x)?, b, s)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h))?;
        let x = l
            .attn_norm
            .forward(&ops::add(&l.attn_out.forward(&ctx)?, x)?)?;
        let inner = self.act.apply(&l.intermediate.forward(&x)?)?;
        l.out_norm
            .forward(&ops::add(&l.output.forward(&inner)?, &x)?)
    }
}

impl Encoder for Bert {
    fn forward_hidden(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if attention_mask.dims() != [b, s] {
            return Err(Error::InvalidArgument(format!(
                "attention mask of shape {:?} for input ids of shape [{b}, {s}]",
                attention_mask.dims()
            )));
        }
        if s > self.cfg.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "{s} tokens, more than bert's {} positions (`max_position_embeddings`)",
                self.cfg.max_position_embeddings
            )));
        }
        // Token type 0 for every token (one text per input, as sentence-transformers encodes).
        let emb = self
            .word_embeddings
            .forward(input_ids)?
            .broadcast_add(&self.position_embeddings.narrow(0, 0, s)?)?
            .broadcast_add(&self.token_type_embeddings.narrow(0, 0, 1)?)?;
        let mut x = self.embed_norm.forward(&emb)?;
        // Padding keys get the most negative f32 added, as transformers' extended mask does
        // (`(1 - mask) * finfo.min`): their softmax weight is 0.
        let keep = attention_mask.to_dtype(DType::F32)?;
        let bias = ((keep - 1.0)? * -(f32::MIN as f64))?.reshape((b, 1, 1, s))?;
        for l in &self.layers {
            x = self.layer(l, &x, &bias)?;
        }
        Ok(x)
    }

    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn architecture(&self) -> &str {
        "bert"
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
