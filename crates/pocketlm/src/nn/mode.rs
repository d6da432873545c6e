//! How a forward pass runs: for inference (our kernels, the KV cache) or for training
//! (differentiable candle ops), and whose rounding it follows.

/// Which operations a layer's forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inference: our CPU kernels (ggml's numerics where [`Numerics::Ggml`]), the KV cache, no
    /// autograd graph.
    Inference,
    /// Training: differentiable candle ops over the whole sequence (no KV cache), so that
    /// `backward()` reaches the adapters ([`crate::lora::train`]); `dropout` turns LoRA dropout
    /// on.
    Training {
        /// Apply the adapters' dropout.
        dropout: bool,
    },
}

impl Mode {
    /// Whether this is a training pass.
    pub fn is_training(self) -> bool {
        matches!(self, Mode::Training { .. })
    }
}

/// Whose order of floating-point operations a layer follows where the two references differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numerics {
    /// llama.cpp's (weights from a GGUF file): queries scaled before `q·k`, GELU through ggml's
    /// `f16` table, ggml's RoPE angles.
    Ggml,
    /// The Hugging Face / MLX reference's (safetensors folders).
    Reference,
}
