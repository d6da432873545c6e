//! pocketlm: run, quantize and fine-tune language models locally.
//!
//! The crate is organised by concern, one job per module:
//! - [`gguf`]: reading GGUF files (metadata and tensors, quantized tensors stay quantized).
//! - [`tokenizer`]: tokenizers from `tokenizer.json` or GGUF metadata, and streaming detokenization.
//! - [`chat_template`]: the model's own Jinja chat template, rendered with `minijinja`.
//! - [`sampling`]: the chain of logit processors (repetition penalty, temperature, top-k, top-p, min-p).
//! - [`nn`]: shared layers (RMSNorm, RoPE, attention, linear layers that may be quantized).
//! - [`kv_cache`]: key/value caches behind one trait.
//! - [`weights`]: named-weight sources (GGUF, safetensors) that the model code loads from.
//! - [`models`]: one file per architecture and a registry keyed by `model_type`.
//! - [`convert`]: GGUF or Hugging Face folders to MLX-format folders (optionally quantized).
//! - [`loader`]: from a path to a ready [`loader::LoadedModel`].
//! - [`embed`]: sentence embeddings (BERT encoders, Qwen3-Embedding) with sentence-transformers'
//!   pooling and normalization.
//! - [`json_file`]: optional JSON files of a model folder, read with errors naming the file.
//! - [`candle_errors`]: tensor-library errors as one line, without candle's backtrace.
//! - [`lora`]: LoRA adapters in mlx-lm's format: load, unload, hot-swap, fine-tune, fuse.
//! - [`generate`]: the token stepper (prefill, then one sampled token per step) under the text
//!   layer, a stream of [`generate::Event`]s.
//! - [`bench`]: prefill/decode speed in the manner of `llama-bench`.
//! - [`perplexity`]: perplexity of raw text (transformers' or `llama-perplexity`'s windows) and
//!   the KL divergence of a model from a reference (quantization quality).
//! - [`prompt_cache`]: KV caches of prompt prefixes saved to and loaded from safetensors.
//! - [`session`]: multi-turn chat that keeps its KV cache between turns.
//! - [`memory`]: resident and peak memory readings.
//! - [`fetch`]: downloading the default model from a package registry.
//! - `accel` (feature `cuda`): the fused CUDA decode step in front of any model that exports a
//!   [`models::DecodePlan`].
//! - [`kernels`]: CPU kernels for GGUF quantized matrix products (AVX2, NEON, scalar).
//! - [`quant`]: quantization formats.
//! - [`image_processor`]: image decoding and the Qwen2-VL image processor (resize, normalize, patchify).

#[cfg(feature = "cuda")]
pub mod accel;
pub mod bench;
pub mod candle_errors;
pub mod chat_template;
pub mod constrain;
pub mod convert;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod embed;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod image_processor;
pub mod json_file;
pub mod kernels;
pub mod kv_cache;
pub mod kv_pool;
pub mod loader;
pub mod lora;
pub mod memory;
pub mod mlx_prompt_cache;
pub mod models;
pub mod nn;
pub mod perplexity;
pub mod prefix_cache;
pub mod prompt_cache;
pub mod quant;
pub mod safetensors_weights;
pub mod sampling;
pub mod session;
pub mod structured;
mod switches;
pub mod tokenizer;
pub mod tools;
pub mod weights;

pub use error::{Error, Result};

/// The README's Rust examples, compiled as doc tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExamples;
