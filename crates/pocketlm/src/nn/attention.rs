//! Scaled dot-product attention (Vaswani et al. 2017) with grouped-query attention
//! (Ainslie et al. 2023, "GQA") and an optional causal mask.

use candle_core::{DType, Device, Storage, Tensor};

use crate::kernels::float::{attention as float_attention, attention_f16, AttentionShape};
use crate::{Error, Result};

/// Causal attention of `q: [b, heads, s, d]` over `k`, `v: [b, kv_heads, kv_len, d]` (the last
/// `s` keys are the queries' own positions), with an optional sliding `window` and optional
/// attention logit soft-capping (Gemma 2); returns `[b, s, heads · d]`, the input of the output
/// projection.
///
/// `f32` on the CPU runs [`crate::kernels::float::attention`] (ggml's numerics, no mask
/// tensor, no transposed copies), or with `k`, `v` in f16 (an f16 KV cache,
/// [`crate::kv_cache::KvCacheConfig::kv_f16`]) [`crate::kernels::float::attention_f16`], which
/// reads them as they are; other devices and dtypes build `mask` (passed in, from
/// [`causal_mask`]) and run [`scaled_dot_product_attention`].
///
/// With `softcap = Some(c)` each score `s = q·k · scale` becomes `c · tanh(s / c)` before the
/// softmax, on every device. On the CPU in `f32` the scores follow llama.cpp's order (`q·k`,
/// `·scale`, `·(1/c)`, `tanhf`, `·c`); llama.cpp scales `q` instead of the scores, so a caller
/// that wants its numerics bit for bit pre-scales `q` and passes `scale = 1`.
///
/// With `sinks = Some(s)` (`[heads]`, gpt-oss's learned per-head `self_attn.sinks`) each
/// head's softmax has one more logit `s[h]` in its denominator, with no value: see
/// [`crate::kernels::float::softmax_scaled_sink`] and [`softmax_with_sinks`].
///
/// Errors: shapes that do not agree (heads not a multiple of kv heads, fewer keys than
/// queries, different head dims, sinks that are not `[heads]`).
#[allow(clippy::too_many_arguments)] // the operands and the four score options
pub fn causal_attention_capped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    window: Option<usize>,
    sinks: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let (kb, kv_heads, kv_len, kd) = k.dims4()?;
    if kb != b
        || kd != d
        || v.dims() != k.dims()
        || kv_heads == 0
        || heads % kv_heads != 0
        || kv_len < s
        || sinks.is_some_and(|t| t.dims() != [heads])
    {
        return Err(Error::InvalidArgument(format!(
            "attention shapes: q {:?}, k {:?}, v {:?}, sinks {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            sinks.map(|t| t.dims().to_vec())
        )));
    }
    let cpu = [q, k, v].iter().all(|t| t.device().is_cpu()) && q.dtype() == DType::F32;
    // An f16 KV cache's keys and values, read as they are by the kernel.
    let kv_f16 = k.dtype() == DType::F16 && v.dtype() == DType::F16;
    let cpu_f32 = cpu && (kv_f16 || (k.dtype() == DType::F32 && v.dtype() == DType::F32));
    if !cpu_f32 {
        let (k, v) = (&k.to_dtype(q.dtype())?, &v.to_dtype(q.dtype())?);
        let o = scaled_dot_product_attention(q, k, v, mask, scale, softcap, sinks)?;
        return Ok(o.transpose(1, 2)?.reshape((b, s, heads * d))?);
    }
    let q = q.contiguous()?;
    let qv = q.flatten_all()?.to_vec1::<f32>()?;
    // k and v as slices of their storage: rows of `d` values, heads `stride[1]` apart.
    let packed = |t: &Tensor| -> Result<Tensor> {
        let st = t.stride();
        Ok(if st[3] == 1 && st[2] == d {
            t.clone()
        } else {
            t.contiguous()?
        })
    };
    let (k, v) = (packed(k)?, packed(v)?);
    let sinks = sinks
        .map(|t| t.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()?;
    let mut out = vec![0f32; b * s * heads * d];
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
        return Err(Error::InvalidArgument(
            "attention: k/v not on the CPU".into(),
        ));
    };
    enum Kv<'a> {
        F32(&'a [f32], &'a [f32]),
        F16(&'a [half::f16], &'a [half::f16]),
    }
    let kv = if kv_f16 {
        Kv::F16(kc.as_slice::<half::f16>()?, vc.as_slice::<half::f16>()?)
    } else {
        Kv::F32(kc.as_slice::<f32>()?, vc.as_slice::<f32>()?)
    };
    for bi in 0..b {
        let ko = kl.start_offset() + bi * kl.stride()[0];
        let vo = vl.start_offset() + bi * vl.stride()[0];
        let (khs, vhs) = (kl.stride()[1], vl.stride()[1]);
        if khs != vhs && kv_heads > 1 {
            return Err(Error::InvalidArgument(
                "attention: k and v head strides differ".into(),
            ));
        }
        let hs = if kv_heads > 1 { khs } else { kv_len * d };
        let shape = AttentionShape {
            heads,
            kv_heads,
            queries: s,
            kv_len,
            head_dim: d,
            kv_head_stride: hs,
        };
        let span = (kv_heads - 1) * hs + kv_len * d;
        let (qb, ob) = (
            &qv[bi * heads * s * d..][..heads * s * d],
            &mut out[bi * s * heads * d..][..s * heads * d],
        );
        let (sc, cap, sk) = (scale as f32, softcap.map(|c| c as f32), sinks.as_deref());
        match kv {
            Kv::F32(kall, vall) => float_attention(
                qb,
                &kall[ko..ko + span],
                &vall[vo..vo + span],
                shape,
                sc,
                cap,
                window,
                sk,
                ob,
            ),
            Kv::F16(kall, vall) => attention_f16(
                qb,
                &kall[ko..ko + span],
                &vall[vo..vo + span],
                shape,
                sc,
                cap,
                window,
                sk,
                ob,
            ),
        }
    }
    Ok(Tensor::from_vec(out, (b, s, heads * d), q.device())?)
}

/// Causal attention of `q: [1, heads, s, head_dim]` f32 on the CPU over a cache read in place
/// through its block table (`kv`, [`crate::kv_pool::PagedKv`]: vLLM's PagedAttention), the
/// last `s` cached positions being the queries' own (an f16 pool's blocks through
/// [`crate::kernels::float::attention_paged_f16`]); returns `[1, s, heads · head_dim]` as
/// [`causal_attention_capped`] does, equal to its result on the same keys and values gathered
/// into a tensor bit for bit ([`crate::kernels::float::attention_paged`] keeps the row
/// kernel's order) for fewer than 16 queries.
///
/// Errors: [`Error::InvalidArgument`] for `q` not f32 on the CPU, a batch other than 1, heads
/// that are not a multiple of the cache's kv heads, another head dimension, fewer cached
/// positions than queries, or sinks that are not `[heads]`.
pub fn causal_attention_paged(
    q: &Tensor,
    kv: &crate::kv_pool::PagedKv<'_>,
    scale: f64,
    softcap: Option<f64>,
    window: Option<usize>,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let kv_heads = kv.kv_heads();
    if b != 1
        || !q.device().is_cpu()
        || q.dtype() != DType::F32
        || kv.head_dim() != d
        || heads % kv_heads != 0
        || kv.len() < s
        || sinks.is_some_and(|t| t.dims() != [heads])
    {
        return Err(Error::InvalidArgument(format!(
            "paged attention: q {:?} {:?} on {:?}, a cache of {} positions of [{kv_heads}, {}], \
             sinks {:?}",
            q.dims(),
            q.dtype(),
            q.device(),
            kv.len(),
            kv.head_dim(),
            sinks.map(|t| t.dims().to_vec())
        )));
    }
    let qv = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let sinks = sinks
        .map(|t| t.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()?;
    let shape = crate::kernels::float::PagedShape {
        heads,
        kv_heads,
        queries: s,
        kv_len: kv.len(),
        head_dim: d,
        block: kv.block(),
    };
    let mut out = vec![0f32; s * heads * d];
    let (scale, softcap) = (scale as f32, softcap.map(|c| c as f32));
    if kv.dtype() == DType::F16 {
        crate::kernels::float::attention_paged_f16(
            &qv,
            &kv.keys_f16(),
            &kv.values_f16(),
            shape,
            scale,
            softcap,
            window,
            sinks.as_deref(),
            &mut out,
        );
    } else {
        crate::kernels::float::attention_paged(
            &qv,
            &kv.keys(),
            &kv.values(),
            shape,
            scale,
            softcap,
            window,
            sinks.as_deref(),
            &mut out,
        );
    }
    Ok(Tensor::from_vec(out, (1, s, heads * d), q.device())?)
}

/// Differentiable causal attention from candle ops (for training, no KV cache):
/// `q: [b, heads, s, d]`, `k`, `v: [b, kv_heads, s, d]` -> `[b, s, heads · d]`, with
/// `mask: [s, s]` from [`causal_mask`], an optional soft-cap `c · tanh(score / c)` of the
/// scaled scores (Gemma 2) and optional attention sinks `[heads]` ([`softmax_with_sinks`]).
pub fn causal_attention_diff(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    sinks: Option<&Tensor>,
    mask: &Tensor,
) -> Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let n_rep = heads / k.dim(1)?.max(1);
    let k = repeat_kv(k, n_rep)?.contiguous()?;
    let v = repeat_kv(v, n_rep)?.contiguous()?;
    let mut att = (q.contiguous()?.matmul(&k.t()?)? * scale)?;
    if let Some(c) = softcap {
        att = super::softcap(&att, c)?;
    }
    let att = att.broadcast_add(mask)?;
    let att = match sinks {
        Some(sinks) => softmax_with_sinks(&att, sinks)?,
        None => candle_nn::ops::softmax(&att, candle_core::D::Minus1)?,
    };
    let o = att.matmul(&v)?;
    Ok(o.transpose(1, 2)?.reshape((b, s, heads * d))?)
}

/// The softmax over the last axis of `att: [b, heads, q, kv]` with one more logit per head,
/// `sinks: [heads]`, that joins the denominator and is then dropped: `[b, heads, q, kv]`, rows
/// summing to less than 1 (gpt-oss's attention sinks; transformers `eager_attention_forward`
/// in `modeling_gpt_oss.py`: `cat([scores, sinks], -1)`, softmax, `[..., :-1]`). Candle ops,
/// differentiable.
///
/// Errors: `sinks` not of `heads` values; the tensor library's errors.
pub fn softmax_with_sinks(att: &Tensor, sinks: &Tensor) -> Result<Tensor> {
    let (b, h, q, kv) = att.dims4()?;
    let s = sinks
        .to_dtype(att.dtype())?
        .reshape((1, h, 1, 1))?
        .broadcast_as((b, h, q, 1))?;
    let all = Tensor::cat(&[att, &s], 3)?;
    Ok(candle_nn::ops::softmax(&all, candle_core::D::Minus1)?.narrow(3, 0, kv)?)
}

/// Repeats key/value heads for grouped-query attention:
/// `[batch, kv_heads, seq, head_dim]` -> `[batch, kv_heads * n_rep, seq, head_dim]`
/// (each kv head repeated `n_rep` times consecutively, as HF `repeat_kv`).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, s, d))?
        .reshape((b, kv * n_rep, s, d))?)
}

/// Additive causal mask `[q_len, kv_len]` f32 for queries at positions
/// `kv_len - q_len .. kv_len`: 0 where a query may attend, `-inf` elsewhere. With
/// `sliding_window = Some(w)` a query also cannot see keys more than `w - 1` positions back.
pub fn causal_mask(
    q_len: usize,
    kv_len: usize,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let offset = kv_len - q_len;
    let mut m = vec![0f32; q_len * kv_len];
    for i in 0..q_len {
        let qpos = offset + i;
        for j in 0..kv_len {
            let future = j > qpos;
            let too_old = sliding_window.is_some_and(|w| qpos >= w && j <= qpos - w);
            if future || too_old {
                m[i * kv_len + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (q_len, kv_len), device)?)
}

/// `softmax(q k^T * scale + mask) v`.
///
/// `q: [batch, heads, q_len, head_dim]`, `k`, `v: [batch, kv_heads, kv_len, head_dim]`
/// (`heads` a multiple of `kv_heads`), `mask: [q_len, kv_len]` additive, or `None` (no mask,
/// e.g. one query attending to the whole cache). `softcap`: Gemma 2's `tanh` logit capping
/// `c * tanh(s / c)`. `sinks`: gpt-oss's per-head extra softmax logit `[heads]`
/// ([`softmax_with_sinks`]). Returns `[batch, heads, q_len, head_dim]`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, heads, q_len, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let n_rep = heads / kv_heads;
    let kv_len = k.dim(2)?;
    // Group query heads by their kv head so that no copy of k/v is needed:
    // q: [b, kv_heads, n_rep * q_len, d]
    let q = q.reshape((b, kv_heads, n_rep * q_len, d))?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    #[cfg(feature = "cuda")]
    if softcap.is_none() && sinks.is_none() && q.device().is_cuda() && q.dtype() == DType::F32 {
        // One kernel for the scale, the mask and the softmax.
        let att = q.matmul(&k.t()?)?;
        let att = crate::cuda::softmax_scaled_masked(&att, mask, q_len, scale as f32)?;
        let out = att.to_dtype(v.dtype())?.matmul(&v)?;
        return Ok(out.reshape((b, heads, q_len, d))?.contiguous()?);
    }
    let mut att = (q.matmul(&k.t()?)? * scale)?;
    if let Some(c) = softcap {
        att = ((att / c)?.tanh()? * c)?;
    }
    if let Some(m) = mask {
        let att4 = att.reshape((b, kv_heads, n_rep, q_len, kv_len))?;
        att = att4.broadcast_add(&m.to_dtype(att4.dtype())?)?.reshape((
            b,
            kv_heads,
            n_rep * q_len,
            kv_len,
        ))?;
    }
    let att = att.to_dtype(DType::F32)?;
    let att = match sinks {
        Some(sinks) => softmax_with_sinks(&att.reshape((b, heads, q_len, kv_len))?, sinks)?
            .reshape((b, kv_heads, n_rep * q_len, kv_len))?,
        None => candle_nn::ops::softmax_last_dim(&att)?,
    };
    let out = att.to_dtype(v.dtype())?.matmul(&v)?;
    Ok(out.reshape((b, heads, q_len, d))?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        h: usize,
        kvh: usize,
        ql: usize,
        kl: usize,
        d: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; h * ql * d];
        let rep = h / kvh;
        for hh in 0..h {
            let kh = hh / rep;
            for i in 0..ql {
                let qpos = kl - ql + i;
                let mut s: Vec<f32> = (0..kl)
                    .map(|j| {
                        if j > qpos {
                            f32::NEG_INFINITY
                        } else {
                            (0..d)
                                .map(|t| q[(hh * ql + i) * d + t] * k[(kh * kl + j) * d + t])
                                .sum::<f32>()
                                / (d as f32).sqrt()
                        }
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = s
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - m).exp();
                        *x
                    })
                    .sum();
                for t in 0..d {
                    out[(hh * ql + i) * d + t] =
                        (0..kl).map(|j| s[j] / z * v[(kh * kl + j) * d + t]).sum();
                }
            }
        }
        out
    }

    #[test]
    fn gqa_matches_naive() {
        let dev = Device::Cpu;
        let (h, kvh, ql, kl, d) = (6, 2, 3, 5, 4);
        let gen = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * s).sin()).collect() };
        let q = gen(h * ql * d, 0.37);
        let k = gen(kvh * kl * d, 0.71);
        let v = gen(kvh * kl * d, 1.13);
        let qt = Tensor::from_vec(q.clone(), (1, h, ql, d), &dev).unwrap();
        let kt = Tensor::from_vec(k.clone(), (1, kvh, kl, d), &dev).unwrap();
        let vt = Tensor::from_vec(v.clone(), (1, kvh, kl, d), &dev).unwrap();
        let m = causal_mask(ql, kl, None, &dev).unwrap();
        let o: Vec<f32> = scaled_dot_product_attention(
            &qt,
            &kt,
            &vt,
            Some(&m),
            1.0 / (d as f64).sqrt(),
            None,
            None,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
        let r = naive(&q, &k, &v, h, kvh, ql, kl, d);
        for (a, b) in o.iter().zip(&r) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn capped_cpu_path_equals_the_generic_one() {
        // Same softcap semantics (cap after the scale) on the ggml-order CPU path as in
        // `scaled_dot_product_attention`, which other devices use.
        let dev = Device::Cpu;
        let (h, kvh, ql, kl, d) = (4, 2, 3, 6, 8);
        let gen =
            |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| 3.0 * (i as f32 * s).sin()).collect() };
        let q = Tensor::from_vec(gen(h * ql * d, 0.37), (1, h, ql, d), &dev).unwrap();
        let k = Tensor::from_vec(gen(kvh * kl * d, 0.71), (1, kvh, kl, d), &dev).unwrap();
        let v = Tensor::from_vec(gen(kvh * kl * d, 1.13), (1, kvh, kl, d), &dev).unwrap();
        let (scale, cap) = (0.3, 2.0);
        let m = causal_mask(ql, kl, None, &dev).unwrap();
        let want: Vec<f32> =
            scaled_dot_product_attention(&q, &k, &v, Some(&m), scale, Some(cap), None)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        let got: Vec<f32> = causal_attention_capped(&q, &k, &v, scale, Some(cap), None, None, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// Attention sinks: the CPU kernel, the candle path of other devices and the training path
    /// agree, with a window; and one key against a sink weighs its value by
    /// `e^s' / (e^s' + e^sink)`.
    #[test]
    fn sinks_agree_across_paths_and_match_the_formula() {
        let dev = Device::Cpu;
        let (h, kvh, ql, kl, d) = (4, 2, 5, 5, 8);
        let gen = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * s).sin()).collect() };
        let q = Tensor::from_vec(gen(h * ql * d, 0.37), (1, h, ql, d), &dev).unwrap();
        let k = Tensor::from_vec(gen(kvh * kl * d, 0.71), (1, kvh, kl, d), &dev).unwrap();
        let v = Tensor::from_vec(gen(kvh * kl * d, 1.13), (1, kvh, kl, d), &dev).unwrap();
        let sinks = Tensor::new(&[0.3f32, -2.0, 1.5, 4.0], &dev).unwrap();
        let (scale, window) = (0.35, Some(3));
        let m = causal_mask(ql, kl, window, &dev).unwrap();
        let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let generic = flat(
            scaled_dot_product_attention(&q, &k, &v, Some(&m), scale, None, Some(&sinks))
                .unwrap()
                .transpose(1, 2)
                .unwrap(),
        );
        let cpu = flat(
            causal_attention_capped(&q, &k, &v, scale, None, window, Some(&sinks), None).unwrap(),
        );
        let diff = flat(causal_attention_diff(&q, &k, &v, scale, None, Some(&sinks), &m).unwrap());
        let plain =
            flat(causal_attention_capped(&q, &k, &v, scale, None, window, None, None).unwrap());
        for ((a, b), c) in cpu.iter().zip(&generic).zip(&diff) {
            assert!((a - b).abs() < 1e-5 && (a - c).abs() < 1e-5, "{a} {b} {c}");
        }
        assert!(cpu.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-2));
        // The first query sees only the first key: output = p · v_0, p = e^s / (e^s + e^sink).
        let (q0, k0, v0) = (
            flat(q.i((0, 0, 0)).unwrap()),
            flat(k.i((0, 0, 0)).unwrap()),
            flat(v.i((0, 0, 0)).unwrap()),
        );
        let s = q0.iter().zip(&k0).map(|(a, b)| a * b).sum::<f32>() * scale as f32;
        let p = s.exp() / (s.exp() + 0.3f32.exp());
        for c in 0..d {
            assert!(
                (cpu[c] - p * v0[c]).abs() < 1e-5,
                "{} vs {}",
                cpu[c],
                p * v0[c]
            );
        }
        // Bad sinks are an error, not a panic.
        let bad = Tensor::new(&[0f32; 3], &dev).unwrap();
        assert!(causal_attention_capped(&q, &k, &v, scale, None, None, Some(&bad), None).is_err());
    }

    #[test]
    fn sliding_window_mask() {
        let m: Vec<Vec<f32>> = causal_mask(3, 5, Some(2), &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        // query at position 2 sees keys 1,2; position 4 sees keys 3,4.
        assert!(m[0][0].is_infinite() && m[0][1] == 0.0 && m[0][2] == 0.0 && m[0][3].is_infinite());
        assert!(m[2][2].is_infinite() && m[2][3] == 0.0 && m[2][4] == 0.0);
    }
}
