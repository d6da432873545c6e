//! Loading pieces the architectures share, by Hugging Face names under a block prefix
//! (`model.layers.3`): the attention projections, the gated MLP's projections, per-head q/k
//! norms, the routed experts of a mixture of experts and the output layer. Reference: the module
//! layout of Hugging Face `LlamaAttention`, `LlamaMLP`, `Phi3Attention` (fused `qkv_proj`,
//! `gate_up_proj`) and `Qwen3MoeSparseMoeBlock`; mlx-lm's `SwitchGLU` (`switch_mlp`).

use crate::models::Logits;
use crate::nn::{
    Activation, Embedding, GateUp, GatedMlp, Linear, Moe, Numerics, QkvProj, RmsNorm, Router,
};
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::Tensor;

/// Head geometry of an attention layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl Heads {
    /// Checks the geometry of config.json's `num_attention_heads`, `num_key_value_heads` and
    /// `head_dim`.
    ///
    /// Errors: [`Error::Model`] naming the field: no heads, kv heads that do not divide the
    /// query heads, an odd or zero head width (RoPE rotates pairs).
    pub fn checked(self) -> Result<Self> {
        let bad = |f: &str, m: String| Err(Error::Model(format!("config field `{f}`: {m}")));
        let Self {
            n_heads,
            n_kv_heads,
            head_dim,
        } = self;
        if n_heads == 0 || n_kv_heads == 0 {
            return bad("num_attention_heads", "must be positive".into());
        }
        if !n_heads.is_multiple_of(n_kv_heads) {
            let m = format!("{n_kv_heads} does not divide num_attention_heads {n_heads}");
            return bad("num_key_value_heads", m);
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return bad("head_dim", format!("{head_dim} must be even and positive"));
        }
        Ok(self)
    }
}

/// Dimensions of each head that RoPE rotates: `head_dim · partial_rotary_factor` (Phi-3,
/// Phi-4-mini; all of them when absent).
///
/// Errors: [`Error::Model`] for a factor outside `(0, 1]`.
pub(crate) fn rotary_dim(head_dim: usize, partial_rotary_factor: Option<f64>) -> Result<usize> {
    match partial_rotary_factor {
        Some(f) if f > 0.0 && f <= 1.0 => Ok((head_dim as f64 * f) as usize),
        None => Ok(head_dim),
        Some(f) => Err(Error::Model(format!(
            "config field `partial_rotary_factor`: {f} is not in (0, 1]"
        ))),
    }
}

/// `{p}.self_attn.{q,k,v}_proj` (`fused`: one `{p}.self_attn.qkv_proj`), each
/// `[heads · head_dim, hidden]`. Separate projections are stacked into one layer (their biases
/// too) where the weight source makes that cheaper (one launch on a GPU,
/// [`Weights::stacked_linear`]).
///
/// Errors: a missing or misshapen weight, named.
pub(crate) fn qkv(
    w: &dyn Weights,
    p: &str,
    heads: Heads,
    hidden: usize,
    bias: bool,
    fused: bool,
) -> Result<QkvProj> {
    let Heads {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
    } = heads;
    if fused {
        let rows = (nh + 2 * nkv) * hd;
        return Ok(QkvProj::Fused(w.linear(
            &format!("{p}.self_attn.qkv_proj"),
            rows,
            hidden,
            bias,
        )?));
    }
    let names = ["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}.self_attn.{n}"));
    let rows = [nh * hd, nkv * hd, nkv * hd];
    let refs = names.each_ref().map(String::as_str);
    if let Some(l) = w.stacked_linear(&refs, &rows, hidden)? {
        // The biases (Qwen2) stack the same way, beside the weights.
        let stacked_bias = bias
            .then(|| {
                let parts = names
                    .iter()
                    .zip(rows)
                    .map(|(n, r)| w.tensor(&format!("{n}.bias"), &[r]))
                    .collect::<Result<Vec<_>>>()?;
                Ok::<_, crate::Error>(Tensor::cat(&parts, 0)?)
            })
            .transpose()?;
        return Ok(QkvProj::Fused(l.with_bias(stacked_bias)?));
    }
    let [q, k, v] = names;
    Ok(QkvProj::Separate {
        q: w.linear(&q, rows[0], hidden, bias)?,
        k: w.linear(&k, rows[1], hidden, bias)?,
        v: w.linear(&v, rows[2], hidden, bias)?,
    })
}

/// `{p}.mlp.gate_proj` and `{p}.mlp.up_proj` `[intermediate, hidden]` (`fused`: one
/// `{p}.mlp.gate_up_proj`, gate rows first), stacked where cheaper as in [`qkv`].
///
/// Errors: a missing or misshapen weight, named.
pub(crate) fn gate_up(
    w: &dyn Weights,
    p: &str,
    intermediate: usize,
    hidden: usize,
    bias: bool,
    fused: bool,
) -> Result<GateUp> {
    if fused {
        let gate_up = w.linear(
            &format!("{p}.mlp.gate_up_proj"),
            2 * intermediate,
            hidden,
            bias,
        )?;
        return Ok(GateUp::Fused {
            gate_up,
            intermediate,
        });
    }
    let (gate, up) = (format!("{p}.mlp.gate_proj"), format!("{p}.mlp.up_proj"));
    if !bias {
        let rows = [intermediate, intermediate];
        if let Some(gate_up) = w.stacked_linear(&[&gate, &up], &rows, hidden)? {
            return Ok(GateUp::Fused {
                gate_up,
                intermediate,
            });
        }
    }
    Ok(GateUp::Separate {
        gate: w.linear(&gate, intermediate, hidden, bias)?,
        up: w.linear(&up, intermediate, hidden, bias)?,
    })
}

/// `{p}.self_attn.q_norm` and `k_norm` `[head_dim]` when `present` (Qwen3, Gemma 3), else none.
///
/// Errors: a missing or misshapen weight, named.
pub(crate) fn qk_norms(
    w: &dyn Weights,
    p: &str,
    head_dim: usize,
    eps: f64,
    unit_offset: bool,
    present: bool,
) -> Result<(Option<RmsNorm>, Option<RmsNorm>)> {
    if !present {
        return Ok((None, None));
    }
    let norm = |n: &str| {
        let t = w.tensor(&format!("{p}.self_attn.{n}.weight"), &[head_dim])?;
        RmsNorm::new(t, eps, unit_offset)
    };
    Ok((Some(norm("q_norm")?), Some(norm("k_norm")?)))
}

/// The output layer: `lm_head` `[vocab, hidden]`, or the embedding table when tied (`tied`, or
/// no `lm_head.weight` in the weights).
///
/// Errors: a misshapen `lm_head`, named.
pub(crate) fn lm_head(
    w: &dyn Weights,
    embed_tokens: &Embedding,
    tied: bool,
    vocab: usize,
    hidden: usize,
) -> Result<Linear> {
    if tied || !w.contains("lm_head.weight") {
        embed_tokens.as_linear(w.device())
    } else {
        w.linear("lm_head", vocab, hidden, false)
    }
}

/// Sizes of the routed experts of a mixture-of-experts block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExpertShape {
    /// Routed experts (`num_experts`).
    pub n_experts: usize,
    /// Inner width of each expert (`moe_intermediate_size`).
    pub intermediate: usize,
    /// Hidden width.
    pub hidden: usize,
}

/// The routed experts of block `p`, SwiGLU MLPs, from whichever form the weights hold:
/// stacked `{p}.mlp.switch_mlp.{gate,up,down}_proj` `[n_experts, out, in]` (mlx-lm's
/// `SwitchGLU`, float or MLX affine quantized; GGUF `ffn_{gate,up,down}_exps` through the name
/// table), Hugging Face's fused `{p}.mlp.experts.gate_up_proj` `[n_experts, 2 · inter, hidden]`
/// (gate rows first) and `{p}.mlp.experts.down_proj` `[n_experts, hidden, inter]` (transformers
/// 5's `Qwen3_5MoeExperts`, the Qwen3.5 Hub checkpoints; float only), else Hugging Face's
/// per-expert `{p}.mlp.experts.{e}.{gate,up,down}_proj` ([`experts_at`]).
///
/// Errors: a missing or misshapen weight, named.
pub(crate) fn experts(
    w: &dyn Weights,
    p: &str,
    shape: ExpertShape,
    numerics: Numerics,
) -> Result<Vec<GatedMlp>> {
    let (stacked, hf) = (format!("{p}.mlp.switch_mlp"), format!("{p}.mlp.experts"));
    experts_at(w, &stacked, &hf, shape, Activation::Silu, numerics)
}

/// Gated MLP experts of inner activation `activation` from stacked `{stacked}.{gate,up,down}_proj`
/// ([`stacked_experts`]), else Hugging Face's fused `{hf}.gate_up_proj` `[n_experts, 2 · inter,
/// hidden]` (gate rows first) and `{hf}.down_proj` `[n_experts, hidden, inter]` (stacked and
/// quantized where the source keeps `{hf}.gate_up_proj.weight`, as GGUF `ffn_gate_up_exps`
/// does; else float), else per-expert `{hf}.{e}.{gate,up,down}_proj`.
///
/// Errors: a missing or misshapen weight, named.
pub(crate) fn experts_at(
    w: &dyn Weights,
    stacked: &str,
    hf: &str,
    shape: ExpertShape,
    activation: Activation,
    numerics: Numerics,
) -> Result<Vec<GatedMlp>> {
    let ExpertShape {
        n_experts: n,
        intermediate: inter,
        hidden: h,
    } = shape;
    if let Some(e) = stacked_experts(w, stacked, shape, false, activation, numerics)? {
        return Ok(e);
    }
    // The fused layout stacked and quantized (llama.cpp's converter keeps Gemma 4's fused
    // experts as `ffn_gate_up_exps`): one `[2 · inter, hidden]` layer per expert, gate rows
    // first, as the file holds it.
    if let Some(gate_ups) = w.expert_linears(&format!("{hf}.gate_up_proj"), n, 2 * inter, h)? {
        let downs = w
            .expert_linears(&format!("{hf}.down_proj"), n, h, inter)?
            .ok_or_else(|| {
                Error::tensor(
                    format!("{hf}.down_proj.weight"),
                    "missing beside the stacked `gate_up_proj`",
                )
            })?;
        return Ok(gate_ups
            .into_iter()
            .zip(downs)
            .map(|(gate_up, down_proj)| GatedMlp {
                gate_up: GateUp::Fused {
                    gate_up,
                    intermediate: inter,
                },
                down_proj,
                activation,
                numerics,
            })
            .collect());
    }
    let fused = format!("{hf}.gate_up_proj");
    if w.contains(&fused) {
        let gate_up = w.tensor(&fused, &[n, 2 * inter, h])?;
        let down = w.tensor(&format!("{hf}.down_proj"), &[n, h, inter])?;
        return (0..n)
            .map(|e| {
                let gu = gate_up.get(e)?;
                let dense = |t: candle_core::Tensor| Linear::dense(t, None);
                Ok(GatedMlp {
                    gate_up: GateUp::Separate {
                        gate: dense(gu.narrow(0, 0, inter)?.contiguous()?),
                        up: dense(gu.narrow(0, inter, inter)?.contiguous()?),
                    },
                    down_proj: dense(down.get(e)?.contiguous()?),
                    activation,
                    numerics,
                })
            })
            .collect();
    }
    (0..n)
        .map(|e| {
            let mlp = swiglu(w, &format!("{hf}.{e}"), inter, h, numerics)?;
            Ok(GatedMlp { activation, ..mlp })
        })
        .collect()
}

/// Who wrote a depthwise convolution weight, told by its stored shape ([`conv_weight`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConvLayout {
    /// Hugging Face's `nn.Conv1d`: `[channels, 1, kernel]`.
    HuggingFace,
    /// mlx-lm's `sanitize`: `[channels, kernel, 1]`.
    Mlx,
    /// llama.cpp's converter, which squeezes the 1 away: `[channels, kernel]`.
    Gguf,
}

/// The depthwise convolution weight `name` as `[channels, kernel]`, from any of the layouts of
/// [`ConvLayout`] (LFM2's short convolution, the Gated DeltaNet's), and which one it was.
///
/// Errors: [`Error::Tensor`] naming `name` and the three shapes when it has none of them.
pub(crate) fn conv_weight(
    w: &dyn Weights,
    name: &str,
    channels: usize,
    kernel: usize,
) -> Result<(Tensor, ConvLayout)> {
    let (c, k) = (channels, kernel);
    let t = w
        .tensor(name, &[c, 1, k])
        .map(|t| (t, ConvLayout::HuggingFace))
        .or_else(|_| w.tensor(name, &[c, k, 1]).map(|t| (t, ConvLayout::Mlx)))
        .or_else(|_| w.tensor(name, &[c, k]).map(|t| (t, ConvLayout::Gguf)))
        .map_err(|e| {
            Error::tensor(
                name,
                format!(
                    "expected [{c}, 1, {k}] (Hugging Face), [{c}, {k}, 1] (mlx-lm) or [{c}, {k}] \
                     (GGUF): {e}"
                ),
            )
        })?;
    Ok((t.0.reshape((c, k))?, t.1))
}

/// A SwiGLU MLP `{prefix}.{gate,up,down}_proj` (no biases) of inner width `inter`: DeepSeek's
/// and Qwen's shared experts, Hugging Face's per-expert weights.
///
/// Errors: a missing or misshapen weight, named.
pub(crate) fn swiglu(
    w: &dyn Weights,
    prefix: &str,
    inter: usize,
    h: usize,
    numerics: Numerics,
) -> Result<GatedMlp> {
    Ok(GatedMlp {
        gate_up: GateUp::Separate {
            gate: w.linear(&format!("{prefix}.gate_proj"), inter, h, false)?,
            up: w.linear(&format!("{prefix}.up_proj"), inter, h, false)?,
        },
        down_proj: w.linear(&format!("{prefix}.down_proj"), h, inter, false)?,
        activation: Activation::Silu,
        numerics,
    })
}

/// The experts stacked under `prefix` as `{prefix}.{gate,up,down}_proj` `[n_experts, out, in]`
/// ([`Weights::expert_linears`]: mlx-lm's `SwitchGLU` layout, float or MLX quantized), with
/// `{prefix}.{name}.bias` `[n_experts, out]` when `bias` (gpt-oss); `None` when there is no
/// stacked `gate_proj`.
///
/// Errors: a missing or misshapen weight, named.
pub(crate) fn stacked_experts(
    w: &dyn Weights,
    prefix: &str,
    shape: ExpertShape,
    bias: bool,
    activation: Activation,
    numerics: Numerics,
) -> Result<Option<Vec<GatedMlp>>> {
    let ExpertShape {
        n_experts: n,
        intermediate: inter,
        hidden: h,
    } = shape;
    let stacked = |name: &str, out: usize, inp: usize| -> Result<Option<Vec<Linear>>> {
        let Some(ls) = w.expert_linears(&format!("{prefix}.{name}"), n, out, inp)? else {
            return Ok(None);
        };
        if !bias {
            return Ok(Some(ls));
        }
        let b = w.tensor(&format!("{prefix}.{name}.bias"), &[n, out])?;
        ls.into_iter()
            .enumerate()
            .map(|(e, l)| l.with_bias(Some(b.get(e)?)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    };
    let Some(gates) = stacked("gate_proj", inter, h)? else {
        return Ok(None);
    };
    let missing = |m: &str| Error::tensor(format!("{prefix}.{m}.weight"), "missing");
    let ups = stacked("up_proj", inter, h)?.ok_or_else(|| missing("up_proj"))?;
    let downs = stacked("down_proj", h, inter)?.ok_or_else(|| missing("down_proj"))?;
    Ok(Some(
        gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .map(|((gate, up), down_proj)| GatedMlp {
                gate_up: GateUp::Separate { gate, up },
                down_proj,
                activation,
                numerics,
            })
            .collect(),
    ))
}

/// A mixture-of-experts block `p` with no shared experts: the router `{p}.mlp.gate`
/// `[n_experts, hidden]` and the experts of [`experts`].
///
/// Errors: a missing or misshapen weight, named.
pub(crate) fn moe(
    w: &dyn Weights,
    p: &str,
    shape: ExpertShape,
    router: impl FnOnce(Linear) -> Router,
) -> Result<Moe> {
    let gate = w.linear(
        &format!("{p}.mlp.gate"),
        shape.n_experts,
        shape.hidden,
        false,
    )?;
    Ok(Moe {
        router: router(gate),
        experts: experts(w, p, shape, w.layout().numerics)?,
        shared: None,
        kernels: Default::default(),
    })
}

/// Weights read from `inner` under other names: every name asked for goes through `rename`
/// once, at load (mlx-lm's `sanitize`), as the multimodal layouts ([`language_model`]) and
/// Qwen3-Embedding's bare-model checkpoints need.
pub(crate) struct Renamed<'a> {
    inner: &'a dyn Weights,
    rename: Box<dyn Fn(&str) -> String + 'a>,
}

impl<'a> Renamed<'a> {
    /// `inner`'s weights, asked for by the names `rename` maps to `inner`'s.
    pub fn new(inner: &'a dyn Weights, rename: impl Fn(&str) -> String + 'a) -> Self {
        Self {
            inner,
            rename: Box::new(rename),
        }
    }
}

/// The text model of a multimodal checkpoint (Gemma 3 and 4, Mistral 3), read with the text
/// model's names (`model.layers.0...`, `lm_head`): its weights live under
/// `model.language_model.` with the output layer at `lm_head` (transformers 5), or under
/// `language_model.model.` with it at `language_model.lm_head` (transformers 4, mlx-vlm,
/// mlx-lm). The layout is found by the token embedding; the vision tower's weights are never
/// asked for.
///
/// Errors: [`Error::Tensor`] naming the embedding when neither layout has it.
pub(crate) fn language_model(w: &dyn Weights) -> Result<Renamed<'_>> {
    let (prefix, head) = [
        ("model.language_model.", ""),
        ("language_model.model.", "language_model."),
    ]
    .into_iter()
    .find(|(p, _)| w.contains(&format!("{p}embed_tokens.weight")))
    .ok_or_else(|| {
        Error::tensor(
            "model.language_model.embed_tokens.weight",
            "is missing (nor language_model.model.embed_tokens.weight)",
        )
    })?;
    Ok(Renamed::new(w, move |name| {
        match name.strip_prefix("model.") {
            Some(rest) => format!("{prefix}{rest}"),
            None if name.starts_with("lm_head") => format!("{head}{name}"),
            None => name.to_string(),
        }
    }))
}

impl Weights for Renamed<'_> {
    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        self.inner.linear(&(self.rename)(prefix), out, inp, bias)
    }
    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        self.inner.embedding(&(self.rename)(name), vocab, hidden)
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<candle_core::Tensor> {
        self.inner.tensor(&(self.rename)(name), shape)
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&(self.rename)(name))
    }
    fn device(&self) -> &candle_core::Device {
        self.inner.device()
    }
    fn layout(&self) -> crate::weights::WeightLayout {
        self.inner.layout()
    }
    fn stacked_linear(
        &self,
        prefixes: &[&str],
        outs: &[usize],
        in_features: usize,
    ) -> Result<Option<Linear>> {
        let names: Vec<String> = prefixes.iter().map(|p| (self.rename)(p)).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.inner.stacked_linear(&names, outs, in_features)
    }
    fn expert_linears(
        &self,
        prefix: &str,
        n_experts: usize,
        out_features: usize,
        in_features: usize,
    ) -> Result<Option<Vec<Linear>>> {
        self.inner
            .expert_linears(&(self.rename)(prefix), n_experts, out_features, in_features)
    }
}

/// The output of a decoder stack's last hidden states `x: [batch, seq, hidden]` f32: the final
/// norm and the output layer over the last position ([`Logits::Last`]: `[batch, vocab]`) or
/// every position ([`Logits::All`]: `[batch, seq, vocab]`).
///
/// Errors: shapes that do not agree with the weights.
pub(crate) fn output_logits(
    x: &candle_core::Tensor,
    norm: &RmsNorm,
    lm_head: &Linear,
    logits: Logits,
) -> Result<candle_core::Tensor> {
    let seq = x.dim(1)?;
    let x = match logits {
        Logits::Last => x.narrow(1, seq - 1, 1)?,
        Logits::All => x.clone(),
    };
    let out = lm_head.forward(&norm.forward(&x)?)?;
    Ok(match logits {
        Logits::Last => out.squeeze(1)?,
        Logits::All => out,
    })
}
