//! Layers shared by the architectures: linear layers that may be dense or quantized,
//! embeddings, RMSNorm, rotary position embeddings and attention.

pub mod attention;
pub mod linear;
pub mod lora;
pub mod norm;
pub mod ops;
pub mod rope;

pub use attention::{
    causal_attention, causal_attention_capped, causal_mask, repeat_kv, scaled_dot_product_attention,
};
pub use linear::{Embedding, Linear};
pub use lora::LoraLinear;
pub use norm::RmsNorm;
pub use ops::{gelu_tanh, softcap};
pub use rope::{RopeScaling, RotaryEmbedding};
