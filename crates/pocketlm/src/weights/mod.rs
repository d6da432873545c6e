//! Where model code gets its weights from. Architectures ask for tensors by their Hugging Face
//! names; each source maps those names to its own (the "sanitize" step happens here, at load,
//! never in the forward pass: GGUF names come from the architecture's
//! [`crate::gguf::names::NameTable`]), decides through one [`Placement`] whether a layer is
//! dense or quantized (and on which kernels), and
//! tells the model builder how the weights are laid out ([`WeightLayout`]).

use candle_core::{Device, Tensor};

use crate::gguf::names::NameTable;
use crate::gguf::GgufFile;
use crate::nn::{Embedding, Linear};
use crate::{Error, Result};

#[cfg(test)]
mod iq4_tests;
pub mod placement;

pub use placement::{Placement, Stored};

/// The row order of the q and k projections (`[heads * head_dim, hidden]`), which decides how
/// RoPE pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkRowOrder {
    /// Hugging Face's: RoPE rotates dimension `i` with `i + rotary_dim / 2` of each head
    /// (`rotate_half`).
    HuggingFace,
    /// llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`, for Llama and
    /// Mistral) reorders each head's rows so that rotated pairs are adjacent (ggml's `NORMAL`
    /// RoPE mode): stored = `hf.reshape(heads, 2, head_dim / 2, in).swapaxes(1, 2)`. Kept in
    /// this order, since the order of summation in llama.cpp's matrix products depends on it.
    GgmlInterleaved,
}

impl QkRowOrder {
    /// Whether RoPE pairs adjacent dimensions (`(x[2i], x[2i + 1])`) for this row order.
    pub fn interleaved_rope(self) -> bool {
        self == QkRowOrder::GgmlInterleaved
    }

    /// `Some(heads)` when a q/k projection of `heads` heads is stored out of Hugging Face
    /// order, so that tensors over its outputs (LoRA `lora_b` columns, a fused delta) written
    /// in Hugging Face order must be reordered ([`Self::from_hf`]); `None` otherwise. The one
    /// place adapters learn the permutation ([`crate::models::LinearSlot::permuted_heads`]).
    pub fn permuted_heads(self, heads: usize) -> Option<usize> {
        (self == QkRowOrder::GgmlInterleaved).then_some(heads)
    }

    /// `w: [heads * head_dim, k]`, rows in Hugging Face order, returned in this order.
    ///
    /// Errors: [`Error::Tensor`] naming `name` when the rows do not split into `heads` heads of
    /// even width.
    pub fn from_hf(self, w: &Tensor, heads: usize, name: &str) -> Result<Tensor> {
        self.reorder(w, heads, name, true)
    }

    /// `w: [heads * head_dim, k]`, rows in this order, returned in Hugging Face order (the
    /// inverse of [`Self::from_hf`]).
    ///
    /// Errors: as [`Self::from_hf`].
    pub fn to_hf(self, w: &Tensor, heads: usize, name: &str) -> Result<Tensor> {
        self.reorder(w, heads, name, false)
    }

    fn reorder(self, w: &Tensor, heads: usize, name: &str, from_hf: bool) -> Result<Tensor> {
        if self == QkRowOrder::HuggingFace {
            return Ok(w.clone());
        }
        let (out, k) = w.dims2()?;
        if heads == 0 || !out.is_multiple_of(2 * heads) {
            return Err(Error::tensor(
                name,
                format!("{out} rows cannot be split into {heads} heads of even width"),
            ));
        }
        let half = out / heads / 2;
        let w = if from_hf {
            w.reshape((heads, 2, half, k))?
        } else {
            w.reshape((heads, half, 2, k))?
        };
        Ok(w.transpose(1, 2)?.contiguous()?.reshape((out, k))?)
    }
}

pub use crate::nn::Numerics;

/// What a weight source tells the model builder about its weights, beyond their names
/// ([`Weights::layout`]): the model reads these fields at load instead of asking where the
/// weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightLayout {
    /// Row order of the q and k projections.
    pub qk_rows: QkRowOrder,
    /// Whether the norm weights of architectures that scale by `1 + w` (Gemma's RMSNorm)
    /// already hold the 1 (llama.cpp's converter adds it: `Gemma2Model.modify_tensors`).
    pub norm_offset_included: bool,
    /// Whose rounding to follow.
    pub numerics: Numerics,
}

impl WeightLayout {
    /// Hugging Face / MLX checkpoints: their own row order, norms as trained, reference
    /// numerics.
    pub const REFERENCE: Self = Self {
        qk_rows: QkRowOrder::HuggingFace,
        norm_offset_included: false,
        numerics: Numerics::Reference,
    };
}

/// A source of named weights (Hugging Face names).
pub trait Weights {
    /// A linear layer `prefix.weight` `[out, in]` (and `prefix.bias` `[out]` when `bias`).
    fn linear(
        &self,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
    ) -> Result<Linear>;
    /// An embedding table `name` `[vocab, hidden]`.
    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding>;
    /// A float tensor of the given shape, as f32.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Whether a tensor exists.
    fn contains(&self, name: &str) -> bool;
    /// The bytes of a uint8 tensor of the given shape, flattened (gpt-oss's MXFP4
    /// `*_blocks` / `*_scales`).
    ///
    /// Errors: [`Error::Tensor`] naming the tensor when it is missing, not U8 or of another
    /// shape, or when this source has no uint8 tensors (the default).
    fn u8_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        let _ = shape;
        Err(Error::tensor(
            name,
            "uint8 tensors are read from safetensors folders only",
        ))
    }
    /// The device tensors are loaded onto.
    fn device(&self) -> &Device;
    /// How the weights are laid out (q/k row order, norm offsets, whose numerics to follow).
    fn layout(&self) -> WeightLayout;
    /// Several bias-free linear layers over the same input (`prefixes[i]` of `[outs[i], in]`)
    /// stacked into one `[sum(outs), in]` layer, where the format and device make that cheaper
    /// (on a GPU one launch replaces several in decode); `None` where not, and the caller loads
    /// them one by one.
    fn stacked_linear(
        &self,
        prefixes: &[&str],
        outs: &[usize],
        in_features: usize,
    ) -> Result<Option<Linear>> {
        let _ = (prefixes, outs, in_features);
        Ok(None)
    }
    /// The `n_experts` layers of a stacked expert projection `{prefix}.weight`
    /// `[n_experts, out, in]` (mlx-lm's `switch_mlp.{gate,up,down}_proj`, MLX affine quantized
    /// or float; GGUF `ffn_{gate,up,down}_exps`), one bias-free layer `[out, in]` per expert,
    /// each a contiguous slice of the stacked tensor (used in place where the format allows);
    /// `None` when the source has no such tensor (the default), and the caller loads
    /// per-expert names instead.
    ///
    /// Errors: a stacked tensor of another shape, or quantized with parameters that do not
    /// match it, named.
    fn expert_linears(
        &self,
        prefix: &str,
        n_experts: usize,
        out_features: usize,
        in_features: usize,
    ) -> Result<Option<Vec<Linear>>> {
        let _ = (prefix, n_experts, out_features, in_features);
        Ok(None)
    }
}

/// Weights read from a GGUF file, asked for by Hugging Face name and found by the
/// architecture's name table.
#[derive(Debug)]
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    names: &'static NameTable,
    qk_rows: QkRowOrder,
    placement: Placement,
}

impl<'a> GgufWeights<'a> {
    /// Weights from `file`, loaded onto `device`, named by `names`, with q/k rows stored in
    /// `qk_rows` order (both from the architecture's registry entry,
    /// [`crate::models::Architecture`]).
    pub fn new(
        file: &'a GgufFile,
        names: &'static NameTable,
        qk_rows: QkRowOrder,
        device: Device,
    ) -> Self {
        Self {
            file,
            names,
            qk_rows,
            placement: Placement {
                device,
                dequantize: false,
                repack: true,
            },
        }
    }

    /// Repack weights for this CPU's fastest kernels where it has them (the default; see
    /// [`crate::kernels::GgufMatrix::repacked`]), or keep the file's layout.
    pub fn repacked(mut self, yes: bool) -> Self {
        self.placement.repack = yes;
        self
    }

    /// Dequantize every weight to f32 at load (dense layers only): the model then computes
    /// exactly what the float reference does with these weights, at 4-8x the memory.
    pub fn dequantized(mut self, yes: bool) -> Self {
        self.placement.dequantize = yes;
        self
    }

    /// The GGUF name of Hugging Face tensor `name`.
    ///
    /// Errors: [`Error::Tensor`] naming the tensor, the table and the file when the table has
    /// no GGUF name for it.
    fn gguf_name(&self, name: &str) -> Result<String> {
        self.names.to_gguf(name, self.file.path())
    }
}

impl Weights for GgufWeights<'_> {
    fn linear(
        &self,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
    ) -> Result<Linear> {
        let w = self.gguf_name(&format!("{prefix}.weight"))?;
        let b = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out_features])?)
        } else {
            None
        };
        let shape = [out_features, in_features];
        let stored = Stored::Gguf {
            file: self.file,
            name: &w,
            shape,
        };
        self.placement.linear(stored, b)
    }

    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        let g = self.gguf_name(name)?;
        let stored = Stored::Gguf {
            file: self.file,
            name: &g,
            shape: [vocab, hidden],
        };
        self.placement.embedding(stored)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let g = self.gguf_name(name)?;
        self.file.tensor_f32(&g, shape, &self.placement.device)
    }

    fn contains(&self, name: &str) -> bool {
        self.names
            .gguf_name(name)
            .is_some_and(|g| self.file.has_tensor(&g))
    }

    fn device(&self) -> &Device {
        &self.placement.device
    }

    fn layout(&self) -> WeightLayout {
        WeightLayout {
            qk_rows: self.qk_rows,
            norm_offset_included: true,
            numerics: Numerics::Ggml,
        }
    }

    fn stacked_linear(
        &self,
        prefixes: &[&str],
        outs: &[usize],
        in_features: usize,
    ) -> Result<Option<Linear>> {
        let names = prefixes
            .iter()
            .map(|p| self.gguf_name(&format!("{p}.weight")))
            .collect::<Result<Vec<_>>>()?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.placement
            .stacked_gguf(self.file, &names, outs, in_features)
    }

    fn expert_linears(
        &self,
        prefix: &str,
        n_experts: usize,
        out_features: usize,
        in_features: usize,
    ) -> Result<Option<Vec<Linear>>> {
        let Some(name) = self.names.gguf_name(&format!("{prefix}.weight")) else {
            return Ok(None);
        };
        if !self.file.has_tensor(&name) {
            return Ok(None);
        }
        let shape = [n_experts, out_features, in_features];
        Ok(Some(self.placement.gguf_experts(self.file, &name, shape)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_row_orders() {
        // 2 heads of width 4 (half 2): HF rows per head [x0 x1 | y0 y1] -> GGUF [x0 y0 x1 y1].
        let w = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 2))
            .unwrap();
        let rows = |t: &Tensor| -> Vec<f32> {
            t.narrow(1, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let g = QkRowOrder::GgmlInterleaved.from_hf(&w, 2, "q").unwrap();
        assert_eq!(rows(&g), vec![0., 4., 2., 6., 8., 12., 10., 14.]);
        let back = QkRowOrder::GgmlInterleaved.to_hf(&g, 2, "q").unwrap();
        assert_eq!(rows(&back), rows(&w));
        let same = QkRowOrder::HuggingFace.to_hf(&w, 2, "q").unwrap();
        assert_eq!(rows(&same), rows(&w));
        assert_eq!(QkRowOrder::GgmlInterleaved.permuted_heads(8), Some(8));
        assert_eq!(QkRowOrder::HuggingFace.permuted_heads(8), None);
        let e = QkRowOrder::GgmlInterleaved
            .to_hf(&w, 3, "blk.0.attn_q.weight")
            .unwrap_err()
            .to_string();
        assert!(e.contains("blk.0.attn_q.weight"), "{e}");
    }
}
