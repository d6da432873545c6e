//! Model architectures, one file each, and the registry keyed by config.json `model_type`
//! (and GGUF `general.architecture`).

pub mod bert;
mod build;
pub mod decode_plan;
pub mod decoder;
pub mod deepseek_v3;
pub mod gemma;
pub mod gemma4;
mod gguf_config;
#[cfg(test)]
mod gguf_names_tests;
pub mod gpt_oss;
pub mod hybrid;
pub mod lfm2;
pub mod llama;
pub mod ministral3;
pub mod phi3;
pub mod qwen2;
pub mod qwen2_vl;
pub mod qwen3;
pub mod qwen3_5;
pub mod qwen3_moe;
pub mod smollm3;

use std::ops::Range;
use std::time::Duration;

use candle_core::Tensor;

pub use decode_plan::{DecodePlan, PlanBlock, PlanMlp};

use crate::gguf::names::NameTable;
use crate::gguf::GgufFile;
use crate::image_processor::ProcessedImage;
use crate::kv_cache::{KvCache, KvCacheConfig, LayerKvCache};
use crate::nn::{Linear, Mode};
use crate::weights::{GgufWeights, QkRowOrder, Weights};
use crate::{Error, Result};

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: `[batch, vocab]`.
    Last,
    /// Every position: `[batch, seq, vocab]`.
    All,
}

/// Facts about a loaded model that callers need (context length, cache sizing).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Architecture name (`model_type`).
    pub architecture: String,
    /// Vocabulary size (rows of the output layer).
    pub vocab_size: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Key/value heads per layer.
    pub n_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Longest context the model supports (`max_position_embeddings`), in tokens.
    pub context_length: usize,
}

impl ModelInfo {
    /// Bytes of f32 KV cache per token (keys and values, all layers).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * 4
    }
}

/// What a vision-language model needs from the prompt side: its image placeholder tokens and
/// patch geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisionInfo {
    /// `<|image_pad|>`: one per merged image token in the prompt (`image_token_id`).
    pub image_token_id: u32,
    /// `<|vision_start|>` (`vision_start_token_id`).
    pub vision_start_token_id: u32,
    /// `<|vision_end|>` (`vision_end_token_id`).
    pub vision_end_token_id: u32,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// Patches per merged token side (2).
    pub merge_size: usize,
    /// Frames per patch (2).
    pub temporal_patch_size: usize,
}

/// A network that turns a batch of token ids into hidden states, for embeddings
/// ([`crate::embed`]): BERT-family encoders, and decoders used as embedding models
/// (Qwen3-Embedding).
pub trait Encoder: Send + Sync {
    /// `input_ids: [batch, seq]` u32 and `attention_mask: [batch, seq]` u32 (1 for a real
    /// token, 0 for padding; batches are right-padded: each row's real tokens come first, at
    /// positions `0..len`) -> the last hidden states `[batch, seq, hidden]` f32 (after the final
    /// norm for decoders). Padding rows' outputs are unspecified.
    ///
    /// Errors: shapes that do not match; the tensor library's errors.
    fn forward_hidden(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor>;
    /// Width of the hidden states (`hidden_size`).
    fn hidden_size(&self) -> usize;
    /// Rows of the token embedding (`vocab_size`): token ids must be below it.
    fn vocab_size(&self) -> usize;
    /// Most tokens one input may have (`max_position_embeddings`).
    fn max_positions(&self) -> usize;
    /// Architecture name (`model_type`).
    fn architecture(&self) -> &str;
    /// The device the weights live on (inputs must be created there).
    fn device(&self) -> &candle_core::Device;
}

/// One entry of the embedding-model registry ([`ENCODERS`]).
pub struct EncoderArchitecture {
    /// config.json `model_type` values.
    pub model_types: &'static [&'static str],
    /// Builds the network from an HF-style config and weights.
    pub build: fn(&serde_json::Value, &dyn Weights) -> Result<Box<dyn Encoder>>,
    /// The pooling used when the folder has no sentence-transformers `1_Pooling/config.json`:
    /// mean pooling for BERT (sentence-transformers' default for a bare transformer), the last
    /// token for decoders (a causal model's last position is the only one that saw the whole
    /// text).
    pub default_pooling: crate::nn::Pooling,
    /// Whether embeddings are L2-normalized when the folder has no `modules.json`: not for
    /// BERT (sentence-transformers' default pipeline has no `Normalize`), yes for Qwen3
    /// (Qwen3-Embedding's usage normalizes).
    pub default_normalize: bool,
    /// Whether last-token pooling needs `<|endoftext|>` at the end of every input, appended
    /// when the tokenizer does not (Qwen3-Embedding's tokenizer appends it).
    pub append_eos: bool,
    /// Whether `dimensions` may shorten its embeddings (trained with Matryoshka
    /// representation learning, as Qwen3-Embedding is).
    pub matryoshka: bool,
}

/// Architectures that give embedding models. `bert` is only here; `qwen3` is both a causal LM
/// ([`REGISTRY`]) and, as Qwen3-Embedding, an embedding model.
pub static ENCODERS: &[EncoderArchitecture] = &[
    EncoderArchitecture {
        model_types: &["bert"],
        build: bert::build,
        default_pooling: crate::nn::Pooling::Mean,
        default_normalize: false,
        append_eos: false,
        matryoshka: false,
    },
    EncoderArchitecture {
        model_types: &["qwen3"],
        build: qwen3::build_encoder,
        default_pooling: crate::nn::Pooling::LastToken,
        default_normalize: true,
        append_eos: true,
        matryoshka: true,
    },
];

/// The embedding-model registry entry for a config.json `model_type`.
///
/// Errors: [`Error::UnsupportedArchitecture`] listing the embedding architectures.
pub fn encoder_by_model_type(model_type: &str) -> Result<&'static EncoderArchitecture> {
    ENCODERS
        .iter()
        .find(|a| a.model_types.contains(&model_type))
        .ok_or_else(|| Error::UnsupportedArchitecture {
            name: format!("{model_type} (as an embedding model)"),
            supported: ENCODERS
                .iter()
                .flat_map(|a| a.model_types.iter().copied())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// A decoder-only language model.
pub trait CausalLM: Send + Sync {
    /// Runs the model on `input_ids: [batch, seq]` (u32), at positions continuing from
    /// `cache.offset()`, appending to the cache. Returns f32 logits `[batch, vocab]`
    /// ([`Logits::Last`]) or `[batch, seq, vocab]` ([`Logits::All`]).
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor>;
    /// One forward pass over several sequences (batched decode, as mlx-lm's `BatchGenerator`
    /// and llama.cpp's server run their slots): `rows[i].ids` (at least one token: the next
    /// token, or a few forced tokens, or a prefill chunk) at positions continuing from
    /// `rows[i].cache.offset()`, appended to that sequence's own cache. Returns f32 logits
    /// `[rows.len(), vocab]`: row `i` is the logits after the last of `rows[i].ids`.
    ///
    /// The default runs [`CausalLM::forward`] once per row, so every architecture takes it;
    /// the shared decoder stack ([`decoder::Decoder::forward_batch`]: Llama, Qwen, Phi-3)
    /// runs the norms and linear layers over all rows at once (one quantized GEMM instead of
    /// one GEMV per sequence) and attends per sequence over its own cache.
    ///
    /// Errors: [`Error::InvalidArgument`] for no rows or a row without tokens; the model's
    /// errors. After an error the caches may hold part of the pass.
    fn forward_batch(&self, rows: &mut [BatchRow<'_>]) -> Result<Tensor> {
        check_batch(rows)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows.iter_mut() {
            let ids = Tensor::new(r.ids, self.device())?.unsqueeze(0)?;
            out.push(self.forward(&ids, r.cache, Logits::Last)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }
    /// An empty cache sized for this model: a growing cache for each layer.
    fn new_cache(&self) -> KvCache {
        KvCache::growing(self.info().n_layers)
    }
    /// An empty cache of the kind `config` describes, one per layer of this model (the
    /// default: the same kind for every layer).
    ///
    /// Errors: as [`KvCache::new`].
    fn make_cache(&self, config: &KvCacheConfig) -> Result<KvCache> {
        KvCache::new(self.info().n_layers, self.info().head_dim, config)
    }
    /// `(kv_heads, head_dim)` of each layer of the caches [`CausalLM::new_cache`] and
    /// [`CausalLM::make_cache`] make (what a saved prompt cache must hold). The default:
    /// [`ModelInfo`]'s heads for every block; Gemma 4 caches fewer layers, of two widths.
    fn cache_shapes(&self) -> Vec<(usize, usize)> {
        let i = self.info();
        vec![(i.n_kv_heads, i.head_dim); i.n_layers]
    }
    /// Facts about the model.
    fn info(&self) -> &ModelInfo;
    /// The device the weights live on (inputs must be created there).
    fn device(&self) -> &candle_core::Device;
    /// For vision-language models, their image settings; `None` (the default) for text-only
    /// models.
    fn vision(&self) -> Option<&VisionInfo> {
        None
    }
    /// Prefills `input` (an encoded prompt, its images included) into `cache` and returns the
    /// logits of its last position, as MLX Swift's `LanguageModel.prepare(LMInput)`: the model
    /// turns its own input into cache entries, and the generator never sees images.
    ///
    /// The default, for text-only models, runs `input.ids` through [`CausalLM::forward`] in
    /// chunks of `chunk` tokens (at least 1; bounds activation memory), positions continuing
    /// from `cache.offset()` ([`prefill_text`]). Vision-language models override it to run their
    /// vision tower first.
    ///
    /// Returns [`Prefill::logits`] `[1, vocab]` f32 (on the model's device).
    ///
    /// Errors: [`Error::InvalidArgument`] for an empty prompt, or images given to a text-only
    /// model; the model's errors.
    fn prefill(&self, input: &ModelInput, cache: &mut KvCache, chunk: usize) -> Result<Prefill> {
        if !input.images.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "the {} model takes no images",
                self.info().architecture
            )));
        }
        Ok(Prefill::text(prefill_text(self, &input.ids, cache, chunk)?))
    }

    /// The one-token decode step as data, for a backend that fuses it ([`DecodePlan`]); `None`
    /// (the default) for models whose blocks do not have its shape.
    fn decode_plan(&self) -> Option<DecodePlan<'_>> {
        None
    }

    /// Adapters and fine-tuning ([`Trainable`]); `None` (the default) for architectures
    /// without them.
    fn trainable(&self) -> Option<&dyn Trainable> {
        None
    }

    /// As [`CausalLM::trainable`], to swap layers for adapters.
    fn trainable_mut(&mut self) -> Option<&mut dyn Trainable> {
        None
    }
}

/// The capability of models that take adapters and can be fine-tuned ([`crate::lora`]):
/// their linear layers by name, and the training forward in pieces (below the adapted blocks by
/// the inference path, the adapted blocks and the head as differentiable ops).
pub trait Trainable: CausalLM {
    /// The linear layers of the blocks and the output layer, by Hugging Face module name, for
    /// adapters ([`crate::lora`]).
    fn linears_mut(&mut self) -> Vec<LinearSlot<'_>>;

    /// Why this model takes adapters but cannot be fine-tuned, or `None` (the default) when the
    /// training methods below work. [`crate::lora::train::TrainSession::new`] refuses such a
    /// model with this message.
    fn training_unsupported(&self) -> Option<String> {
        None
    }

    /// Training, first half: the hidden states `[batch, seq, hidden]` f32 after the embedding
    /// and blocks `0..upto`, computed by the inference path (no autograd graph), for
    /// `input_ids: [batch, seq]` u32 at positions `0..seq`. A model whose blocks read more than
    /// the previous block's output carries that after the hidden size, `[batch, seq, width]`
    /// (Gemma 4: per-layer inputs and shared keys and values); the methods below take and
    /// return that same layout, which only the model itself reads.
    fn hidden_states(&self, input_ids: &Tensor, upto: usize) -> Result<Tensor>;

    /// Training: blocks `range` on `hidden: [batch, seq, hidden]` f32 (positions `0..seq`),
    /// built from differentiable candle ops so that `backward()` reaches the adapters; returns
    /// `[batch, seq, hidden]` f32. `train` turns adapter dropout on. Running the blocks one
    /// range at a time gives the same result as all at once (gradient checkpointing relies
    /// on it: [`crate::lora::train`]).
    fn forward_blocks(&self, hidden: &Tensor, range: Range<usize>, train: bool) -> Result<Tensor>;

    /// Training: the final norm and the output layer on `hidden: [batch, seq, hidden]`, as
    /// differentiable candle ops. Returns logits `[batch, seq, vocab]` f32, or with
    /// `select: [n]` u32 (indices into the flattened `batch · seq` positions) only those
    /// positions' logits `[n, vocab]`.
    fn forward_head(&self, hidden: &Tensor, train: bool, select: Option<&Tensor>)
        -> Result<Tensor>;

    /// Training, second half: blocks `from..` then the head ([`Self::forward_blocks`],
    /// [`Self::forward_head`]) on `hidden: [batch, seq, hidden]`; logits as `forward_head`.
    fn forward_from(
        &self,
        hidden: &Tensor,
        from: usize,
        train: bool,
        select: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = self.forward_blocks(hidden, from..self.info().n_layers, train)?;
        self.forward_head(&x, train, select)
    }
}

/// How [`TrainableBlocks::run_blocks`] runs the blocks.
#[derive(Debug)]
pub(crate) enum BlockRun<'a> {
    /// Inference ([`Mode::Inference`]), appending to this cache, at positions from its offset.
    Inference(&'a mut KvCache),
    /// Training ([`Mode::Training`]): differentiable ops without a cache, at positions from 0;
    /// `dropout` turns adapter dropout on.
    Training {
        /// Apply the adapters' dropout.
        dropout: bool,
    },
}

impl BlockRun<'_> {
    /// The mode the layers run in.
    pub(crate) fn mode(&self) -> Mode {
        match self {
            Self::Inference(_) => Mode::Inference,
            Self::Training { dropout } => Mode::Training { dropout: *dropout },
        }
    }

    /// The position of the first token: the cache's offset, 0 for training.
    pub(crate) fn offset(&self) -> usize {
        match self {
            Self::Inference(c) => c.offset(),
            Self::Training { .. } => 0,
        }
    }

    /// Layer `i`'s cache for inference, `None` for training.
    ///
    /// Errors: as [`KvCache::layer_for_pass`].
    pub(crate) fn layer(&mut self, i: usize) -> Result<Option<&mut (dyn LayerKvCache + 'static)>> {
        match self {
            Self::Inference(c) => Ok(Some(c.layer_for_pass(i)?)),
            Self::Training { .. } => Ok(None),
        }
    }
}

/// A model whose training entry points are its inference blocks run in [`Mode::Training`]
/// (LFM2, Qwen3.5, Gemma 2 and 3): it gives its embedding, blocks and head, and has
/// [`Trainable`] from them: [`Trainable::hidden_states`] runs the embedding and blocks
/// `0..upto` for inference with a fresh [`CausalLM::new_cache`], [`Trainable::forward_blocks`]
/// the blocks for training, [`Trainable::forward_head`] the head for training on the
/// [`select_positions`].
pub(crate) trait TrainableBlocks: CausalLM {
    /// As [`Trainable::linears_mut`].
    fn linear_slots(&mut self) -> Vec<LinearSlot<'_>>;

    /// The input of the first block from `input_ids: [batch, seq]` u32: `[batch, seq, hidden]`
    /// f32.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor>;

    /// Blocks `range` (clipped to the model's) on `x: [batch, seq, hidden]` f32, run as `run`
    /// says.
    ///
    /// Errors: a cache too short; the layers' errors.
    fn run_blocks(&self, x: Tensor, range: Range<usize>, run: BlockRun<'_>) -> Result<Tensor>;

    /// Final norm and output layer on `x: [.., hidden]` f32 -> `[.., vocab]` f32.
    fn head(&self, x: &Tensor, mode: Mode) -> Result<Tensor>;
}

impl<T: TrainableBlocks> Trainable for T {
    fn linears_mut(&mut self) -> Vec<LinearSlot<'_>> {
        self.linear_slots()
    }

    fn hidden_states(&self, input_ids: &Tensor, upto: usize) -> Result<Tensor> {
        let mut cache = self.new_cache();
        let upto = upto.min(self.info().n_layers);
        let x = self.embed(input_ids)?;
        self.run_blocks(x, 0..upto, BlockRun::Inference(&mut cache))
    }

    fn forward_blocks(&self, hidden: &Tensor, range: Range<usize>, train: bool) -> Result<Tensor> {
        self.run_blocks(hidden.clone(), range, BlockRun::Training { dropout: train })
    }

    fn forward_head(&self, x: &Tensor, train: bool, select: Option<&Tensor>) -> Result<Tensor> {
        let x = select_positions(x, select)?;
        self.head(&x, Mode::Training { dropout: train })
    }
}

/// One sequence's part of a batched forward pass ([`CausalLM::forward_batch`]).
#[derive(Debug)]
pub struct BatchRow<'a> {
    /// The token ids to run (u32, at least one, each below the vocabulary size).
    pub ids: &'a [u32],
    /// The sequence's own cache: the ids go at positions from its offset on and are appended.
    pub cache: &'a mut KvCache,
}

/// Errors unless `rows` has at least one row and every row at least one token.
pub(crate) fn check_batch(rows: &[BatchRow<'_>]) -> Result<()> {
    if rows.is_empty() {
        return Err(Error::InvalidArgument(
            "a batched pass needs sequences".into(),
        ));
    }
    if let Some(i) = rows.iter().position(|r| r.ids.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "sequence {i} of a batched pass has no tokens"
        )));
    }
    Ok(())
}

/// A batched pass run as two: the rows of one token (decoding sequences) by `decode` and the
/// others (prompt chunks, forced tokens) by `rest`, each over its rows in their order, and the
/// logits put back in the order of `rows`: `[rows.len(), vocab]` f32, as
/// [`CausalLM::forward_batch`] returns. `None` (nothing run) unless both groups have rows.
///
/// On a GPU the fused decode step takes only one-token rows; a server admitting a request
/// while others decode would otherwise run all of them layer by layer.
///
/// Errors: the closures'; they must return one logits row per row given.
// Used by the CUDA accelerator (`crate::accel`); tested in all builds.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn forward_split(
    rows: &mut [BatchRow<'_>],
    decode: impl FnOnce(&mut [BatchRow<'_>]) -> Result<Tensor>,
    rest: impl FnOnce(&mut [BatchRow<'_>]) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let n_decode = rows.iter().filter(|r| r.ids.len() == 1).count();
    if n_decode == 0 || n_decode == rows.len() {
        return Ok(None);
    }
    let (mut one, mut more) = (Vec::new(), Vec::new());
    // Row i's place in `[decode logits; rest logits]`.
    let mut place = Vec::with_capacity(rows.len());
    for r in rows.iter_mut() {
        let row = BatchRow {
            ids: r.ids,
            cache: &mut *r.cache,
        };
        if row.ids.len() == 1 {
            place.push(one.len() as u32);
            one.push(row);
        } else {
            place.push((n_decode + more.len()) as u32);
            more.push(row);
        }
    }
    let a = decode(&mut one)?;
    let b = rest(&mut more)?;
    for (t, n, what) in [(&a, one.len(), "one-token"), (&b, more.len(), "other")] {
        if t.dims().first() != Some(&n) {
            return Err(Error::Model(format!(
                "the batched pass over the {what} rows gave logits {:?} for {n} rows",
                t.dims()
            )));
        }
    }
    let place = Tensor::new(place.as_slice(), a.device())?;
    Ok(Some(Tensor::cat(&[&a, &b], 0)?.index_select(&place, 0)?))
}

/// A batched pass run row by row: `step` takes each row in order and gives its logits `[1,
/// vocab]`, or `None` when it cannot take that row, in which case `rest` runs that row and all
/// after it together; the logits `[rows.len(), vocab]` in the order of `rows`, as
/// [`CausalLM::forward_batch`] returns.
///
/// On a GPU a model whose fused decode step runs one sequence at a time (a mixture of experts)
/// decodes a batch faster through that step once per row than layer by layer for all rows.
///
/// Errors: the closures'; `step` must give one logits row and `rest` one per row given.
// Used by the CUDA accelerator (`crate::accel`); tested in all builds.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn forward_each(
    rows: &mut [BatchRow<'_>],
    mut step: impl FnMut(&mut BatchRow<'_>) -> Result<Option<Tensor>>,
    rest: impl FnOnce(&mut [BatchRow<'_>]) -> Result<Tensor>,
) -> Result<Tensor> {
    let check = |out: &Tensor, i: usize, n: usize| {
        if out.dims().first() == Some(&n) {
            return Ok(());
        }
        Err(Error::Model(format!(
            "the pass over row {i} gave logits {:?} for {n} rows",
            out.dims()
        )))
    };
    let mut outs = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let Some(out) = step(&mut rows[i])? else {
            let out = rest(&mut rows[i..])?;
            check(&out, i, rows.len() - i)?;
            outs.push(out);
            break;
        };
        check(&out, i, 1)?;
        outs.push(out);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// An encoded prompt as a model takes it (MLX Swift's `LMInput`): token ids with one
/// placeholder token per image token, and the preprocessed images in prompt order.
#[derive(Debug, Clone, Default)]
pub struct ModelInput {
    /// Token ids; for a vision-language model, one `<|image_pad|>` per image token
    /// ([`ProcessedImage::n_tokens`] of each image, expanded by
    /// [`crate::loader::LoadedModel::encode_multimodal`]).
    pub ids: Vec<u32>,
    /// The images, in prompt order (empty for a text prompt).
    pub images: Vec<ProcessedImage>,
}

impl ModelInput {
    /// A text prompt: `ids` and no images.
    pub fn text(ids: Vec<u32>) -> Self {
        Self {
            ids,
            images: Vec::new(),
        }
    }
}

/// What [`CausalLM::prefill`] returns.
#[derive(Debug, Clone)]
pub struct Prefill {
    /// Logits of the prompt's last position: `[1, vocab]` f32, on the model's device.
    pub logits: Tensor,
    /// Wall time of the vision tower over the prompt's images (zero without images).
    pub vision_time: Duration,
    /// Image tokens of each image of the prompt, in order (empty without images).
    pub image_tokens: Vec<usize>,
}

impl Prefill {
    /// The result of a text-only prefill: `logits` `[1, vocab]`, no images.
    pub fn text(logits: Tensor) -> Self {
        Self {
            logits,
            vision_time: Duration::ZERO,
            image_tokens: Vec::new(),
        }
    }
}

/// Runs `ids` through `model.forward` in chunks of `chunk` tokens (at least 1), positions
/// continuing from `cache.offset()`, and returns the last position's logits `[1, vocab]` f32:
/// the text prefill that [`CausalLM::prefill`] does by default.
///
/// Errors: [`Error::InvalidArgument`] when `ids` is empty; the model's errors.
pub fn prefill_text<M: CausalLM + ?Sized>(
    model: &M,
    ids: &[u32],
    cache: &mut KvCache,
    chunk: usize,
) -> Result<Tensor> {
    let mut last = None;
    for part in ids.chunks(chunk.max(1)) {
        let ids = Tensor::new(part, model.device())?.unsqueeze(0)?;
        last = Some(model.forward(&ids, cache, Logits::Last)?);
    }
    last.ok_or_else(|| Error::InvalidArgument("the prompt is empty".into()))
}

/// One linear layer of a model, as [`Trainable::linears_mut`] lists them.
#[derive(Debug)]
pub struct LinearSlot<'a> {
    /// Hugging Face module name (`model.layers.3.self_attn.q_proj`, `lm_head`).
    pub name: String,
    /// The block it belongs to (`None` for the output layer).
    pub layer: Option<usize>,
    /// The name within its block (`self_attn.q_proj`), as mlx-lm's LoRA `keys`.
    pub key: String,
    /// The layer, to be swapped for a LoRA layer and back.
    pub linear: &'a mut Linear,
    /// `Some(heads)` when the layer's output rows are stored in llama.cpp's permuted order
    /// for adjacent-pair RoPE (q/k projections of a Llama GGUF): adapters written in Hugging
    /// Face order need their `lora_b` columns permuted. Set from the weights' layout
    /// ([`QkRowOrder::permuted_heads`]).
    pub permuted_heads: Option<usize>,
}

impl<'a> LinearSlot<'a> {
    /// The layer `key` (`self_attn.q_proj`) of block `layer`, named
    /// `model.layers.{layer}.{key}` (mlx-lm's module path for text models), in Hugging Face
    /// row order.
    pub fn new(layer: usize, key: &str, linear: &'a mut Linear) -> Self {
        Self {
            name: format!("model.layers.{layer}.{key}"),
            layer: Some(layer),
            key: key.to_string(),
            linear,
            permuted_heads: None,
        }
    }

    /// The output layer, named `lm_head`.
    pub fn output(linear: &'a mut Linear) -> Self {
        Self {
            name: "lm_head".into(),
            layer: None,
            key: "lm_head".into(),
            linear,
            permuted_heads: None,
        }
    }
}

/// A module or weight name with a multimodal wrapper's prefix taken off, so that the names of
/// one text model's layers compare equal in every layout: `language_model.model.X` (mlx-lm's
/// `gemma3`, `qwen2_vl`, `qwen3_5`) and `model.language_model.X` (transformers 5's
/// multimodal checkpoints) become `model.X`, `language_model.lm_head` becomes `lm_head`;
/// other names are returned as they are. Adapters ([`crate::lora::Adapter::apply`]) and fused weight deltas
/// ([`crate::convert::ConvertOptions::weight_deltas`]) match layers by it.
pub fn canonical_name(name: &str) -> String {
    for wrapped in ["language_model.model.", "model.language_model."] {
        if let Some(rest) = name.strip_prefix(wrapped) {
            return format!("model.{rest}");
        }
    }
    match name.strip_prefix("language_model.lm_head") {
        Some(rest) => format!("lm_head{rest}"),
        None => name.to_string(),
    }
}

/// `slots` renamed for a model loaded from a multimodal wrapper's config (`wrapper`:
/// `language_model`, as mlx-lm's `gemma3`, `qwen2_vl` and `qwen3_5` models hold the text
/// model): `model.layers.3.self_attn.q_proj` becomes `language_model.model.layers.3...`, the
/// module paths mlx-lm's adapters of those models use. `None` leaves them as they are.
pub(crate) fn wrap_slots<'a>(
    mut slots: Vec<LinearSlot<'a>>,
    wrapper: Option<&str>,
) -> Vec<LinearSlot<'a>> {
    if let Some(w) = wrapper {
        for s in &mut slots {
            s.name = format!("{w}.{}", s.name);
        }
    }
    slots
}

/// `hidden: [batch, seq, hidden]` -> with `select: [n]` u32 (indices into the flattened
/// `batch · seq` positions) those rows `[n, hidden]`, without it `hidden` itself: the rows
/// [`Trainable::forward_head`] computes logits of.
///
/// Errors: an index past `batch · seq`; `hidden` not of rank 3.
pub(crate) fn select_positions(hidden: &Tensor, select: Option<&Tensor>) -> Result<Tensor> {
    Ok(match select {
        Some(idx) => hidden.reshape(((), hidden.dim(2)?))?.index_select(idx, 0)?,
        None => hidden.clone(),
    })
}

/// One registry entry.
pub struct Architecture {
    /// config.json `model_type` values (the first is the canonical name).
    pub model_types: &'static [&'static str],
    /// GGUF `general.architecture` values.
    pub gguf_architectures: &'static [&'static str],
    /// Tensor names in GGUF files of this architecture (`None`: no GGUF form).
    pub gguf_names: Option<&'static NameTable>,
    /// Row order of the q/k projections in GGUF files of this architecture (llama.cpp's
    /// converter permutes Llama's and Mistral's: `LlamaModel.permute`).
    pub gguf_qk_rows: QkRowOrder,
    /// Builds an HF-style config (config.json field names) from GGUF metadata.
    pub config_from_gguf: fn(&GgufFile) -> Result<serde_json::Value>,
    /// Builds the model from an HF-style config and weights.
    pub build: fn(&serde_json::Value, &dyn Weights) -> Result<Box<dyn CausalLM>>,
}

/// All supported architectures.
pub static REGISTRY: &[Architecture] = &[
    Architecture {
        model_types: &["llama", "mistral"],
        gguf_architectures: &["llama", "mistral"],
        gguf_names: Some(&llama::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::GgmlInterleaved,
        config_from_gguf: gguf_config::common,
        build: llama::build,
    },
    Architecture {
        model_types: &["qwen2"],
        gguf_architectures: &["qwen2"],
        gguf_names: Some(&llama::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: gguf_config::common,
        build: qwen2::build,
    },
    Architecture {
        model_types: &["qwen3"],
        gguf_architectures: &["qwen3"],
        gguf_names: Some(&llama::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: gguf_config::common,
        build: qwen3::build,
    },
    Architecture {
        model_types: &["qwen3_moe"],
        gguf_architectures: &["qwen3moe"],
        gguf_names: Some(&qwen3_moe::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: qwen3_moe::config_from_gguf,
        build: qwen3_moe::build,
    },
    Architecture {
        model_types: &["smollm3"],
        gguf_architectures: &["smollm3"],
        gguf_names: Some(&llama::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::GgmlInterleaved,
        config_from_gguf: smollm3::config_from_gguf,
        build: smollm3::build,
    },
    Architecture {
        model_types: &["gemma2", "gemma3_text", "gemma3"],
        gguf_architectures: &["gemma2", "gemma3"],
        gguf_names: Some(&gemma::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: gemma::config_from_gguf,
        build: gemma::build,
    },
    Architecture {
        model_types: &["gemma4_text", "gemma4"],
        gguf_architectures: &["gemma4"],
        gguf_names: Some(&gemma4::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: gemma4::config_from_gguf,
        build: gemma4::build,
    },
    Architecture {
        model_types: &["ministral3", "mistral3"],
        gguf_architectures: &["mistral3"],
        gguf_names: Some(&llama::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::GgmlInterleaved,
        config_from_gguf: ministral3::config_from_gguf,
        build: ministral3::build,
    },
    Architecture {
        model_types: &["deepseek_v3"],
        gguf_architectures: &["deepseek2"],
        gguf_names: Some(&deepseek_v3::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: deepseek_v3::config_from_gguf,
        build: deepseek_v3::build,
    },
    Architecture {
        model_types: &["gpt_oss"],
        gguf_architectures: &["gpt-oss"],
        gguf_names: Some(&gpt_oss::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: gpt_oss::config_from_gguf,
        build: gpt_oss::build,
    },
    Architecture {
        model_types: &["qwen2_vl"],
        gguf_architectures: &[],
        gguf_names: None,
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: qwen2_vl::config_from_gguf, // unused: no GGUF architecture listed
        build: qwen2_vl::build,
    },
    Architecture {
        model_types: &["qwen2_5_vl"],
        gguf_architectures: &[],
        gguf_names: None,
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: qwen2_vl::config_from_gguf, // unused: no GGUF architecture listed
        build: qwen2_vl::build_2_5,
    },
    Architecture {
        model_types: &["lfm2"],
        gguf_architectures: &["lfm2"],
        gguf_names: Some(&lfm2::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: lfm2::config_from_gguf,
        build: lfm2::build,
    },
    Architecture {
        // One builder for the dense and the MoE model (`num_experts` tells them apart).
        model_types: &["qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"],
        gguf_architectures: &["qwen35", "qwen35moe"],
        gguf_names: Some(&qwen3_5::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: qwen3_5::config_from_gguf,
        build: qwen3_5::build,
    },
    Architecture {
        model_types: &["phi3"],
        gguf_architectures: &["phi3"],
        gguf_names: Some(&phi3::GGUF_NAMES),
        gguf_qk_rows: QkRowOrder::HuggingFace,
        config_from_gguf: phi3::config_from_gguf,
        build: phi3::build,
    },
];

impl Architecture {
    /// This architecture's GGUF name table.
    ///
    /// Errors: [`Error::Model`] naming `file` when the architecture has no GGUF form.
    pub fn gguf_name_table(&self, file: &GgufFile) -> Result<&'static NameTable> {
        self.gguf_names.ok_or_else(|| {
            Error::Model(format!(
                "{}: `{}` models are not read from GGUF files",
                file.path().display(),
                self.model_types.first().copied().unwrap_or("?")
            ))
        })
    }

    /// The weights of GGUF `file` (of this architecture), named by its table and laid out as
    /// llama.cpp's converter writes it, loaded onto `device`.
    ///
    /// Errors: as [`Self::gguf_name_table`].
    pub fn gguf_weights<'a>(
        &self,
        file: &'a GgufFile,
        device: candle_core::Device,
    ) -> Result<GgufWeights<'a>> {
        Ok(GgufWeights::new(
            file,
            self.gguf_name_table(file)?,
            self.gguf_qk_rows,
            device,
        ))
    }
}

fn supported() -> String {
    REGISTRY
        .iter()
        .flat_map(|a| a.model_types.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The registry entry for a config.json `model_type`.
///
/// Errors: [`Error::Model`] for an embedding-only architecture (`bert`: load it with
/// [`crate::embed::EmbeddingModel::load`]); [`Error::UnsupportedArchitecture`] otherwise.
pub fn by_model_type(model_type: &str) -> Result<&'static Architecture> {
    let causal = REGISTRY.iter().any(|a| a.model_types.contains(&model_type));
    if !causal && ENCODERS.iter().any(|a| a.model_types.contains(&model_type)) {
        return Err(Error::Model(format!(
            "`{model_type}` is an embedding model, not a text generator: use `pocketlm embed` \
             (pocketlm::embed::EmbeddingModel)"
        )));
    }
    REGISTRY
        .iter()
        .find(|a| a.model_types.contains(&model_type))
        .ok_or_else(|| Error::UnsupportedArchitecture {
            name: model_type.to_string(),
            supported: supported(),
        })
}

/// The registry entry for a GGUF `general.architecture`.
///
/// Errors: [`Error::UnsupportedArchitecture`] listing the GGUF architectures read (llama.cpp's
/// names: `gpt-oss`, `deepseek2`, ...).
pub fn by_gguf_architecture(arch: &str) -> Result<&'static Architecture> {
    REGISTRY
        .iter()
        .find(|a| a.gguf_architectures.contains(&arch))
        .ok_or_else(|| Error::UnsupportedArchitecture {
            name: format!("{arch} (GGUF)"),
            supported: REGISTRY
                .iter()
                .flat_map(|a| a.gguf_architectures.iter().copied())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn unknown_gguf_architecture_lists_gguf_names() {
        let e = super::by_gguf_architecture("mamba9")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("mamba9"), "{e}");
        for a in [
            "llama",
            "qwen3moe",
            "smollm3",
            "gemma3",
            "gemma4",
            "mistral3",
            "gpt-oss",
            "deepseek2",
            "lfm2",
            "phi3",
        ] {
            assert!(e.contains(a), "{e}");
        }
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let e = super::by_model_type("gpt-17").err().unwrap().to_string();
        assert!(e.contains("gpt-17") && e.contains("llama"), "{e}");
        for a in [
            "mistral",
            "qwen2",
            "qwen3",
            "qwen3_moe",
            "smollm3",
            "gpt_oss",
            "deepseek_v3",
            "gemma2",
            "gemma3_text",
            "gemma3",
            "gemma4_text",
            "gemma4",
            "ministral3",
            "mistral3",
            "phi3",
            "lfm2",
            "qwen3_5",
            "qwen3_5_moe_text",
        ] {
            assert!(e.contains(a), "{e}");
        }
    }
}
