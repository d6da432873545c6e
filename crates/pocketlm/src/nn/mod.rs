//! Layers shared by the architectures: linear layers that may be dense or quantized,
//! embeddings, RMSNorm, rotary position embeddings, the self-attention layer (with the
//! projections of multi-head latent attention), the gated MLP and the mixture-of-experts layer,
//! the causal depthwise convolution of LFM2's short convolutions, Gated DeltaNet linear
//! attention (Qwen3.5), each running in a [`Mode`]
//! (inference or training); LayerNorm and sentence-embedding pooling for encoders.

pub mod attention;
pub mod conv;
pub mod gated_delta;
pub mod linear;
pub mod lora;
pub mod mla;
pub mod mlp;
pub mod mode;
pub mod moe;
pub mod norm;
pub mod ops;
pub mod pooling;
pub mod rope;
pub mod self_attention;

pub use attention::{
    causal_attention_capped, causal_mask, repeat_kv, scaled_dot_product_attention,
};
pub use conv::CausalConv1d;
pub use gated_delta::{DeltaHeads, GatedDeltaNet, ValueHeadOrder};
pub use linear::{Embedding, Linear};
pub use lora::LoraLinear;
pub use mla::{Absorbed, Mla, MlaQuery};
pub use mlp::{Activation, GateUp, GatedMlp};
pub use mode::{Mode, Numerics};
pub use moe::{GroupLimit, Moe, MoeKernels, Router, Scoring, SharedExpert};
pub use norm::{LayerNorm, RmsNorm};
pub use ops::{add, gelu_tanh, residual, softcap};
pub use pooling::Pooling;
pub use rope::{RopeScaling, RotaryEmbedding};
pub use self_attention::{Attention, AttentionPass, KvSource, QkvProj, QueryTemperature, ScaleAt};
