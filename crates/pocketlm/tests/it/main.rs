//! The integration tests of `pocketlm`, one module per concern, in one test binary (one link
//! instead of one per file).

mod archs_2026;
mod archs_golden;
mod chat_template_golden;
mod constrain;
mod convert;
mod embeddings;
mod fetch_loopback;
mod folders_golden;
mod generation_config;
mod generation_golden;
mod gguf_kernels;
mod lora_interop;
mod lora_train;
mod mlx_interop;
mod mlx_quant_golden;
mod mlx_quant_modes_golden;
mod module_graph;
mod perplexity;
mod prompt_cache;
mod session;
mod tokenizer_golden;
mod vlm_golden;
