//! The float operations of a transformer layer on `f32` slices, computed with ggml-cpu's
//! numerics bit for bit (llama.cpp's CPU backend as built with AVX-512 on x86-64, the
//! reference our golden files record), on every CPU: every rounding step of ggml is
//! reproduced with IEEE operations (`mul_add` is a fused multiply-add), so the result does
//! not depend on the instruction set we run on.
//!
//! Why: with quantized weights every matrix product quantizes its input activations to 8 bits
//! (as ggml does), so a difference of one unit in the last place before a product can move a
//! logit of a 135M model by ~0.1 and flip a greedy token at a near-tie. Mirroring ggml's
//! order of operations is the only way to follow llama.cpp's token paths.
//!
//! Sources (llama.cpp `ggml/src/ggml-cpu`): `ops.cpp` (`ggml_compute_forward_rms_norm_f32`,
//! `ggml_rope_cache_init`, `rotate_pairs`, `ggml_compute_forward_soft_max_f32`), `vec.h`
//! (`ggml_v_expf`, `ggml_v_silu`, AVX-512 variants), `vec.cpp` (`ggml_vec_dot_f32`,
//! `ggml_vec_soft_max_f32`, `ggml_vec_swiglu_f32`), `llamafile/sgemm.cpp` (`tinyBLAS`, used
//! for `f32` products whose right operand is contiguous).

/// Runs `$f(args)` compiled with FMA and AVX2 when the CPU has them (so that `mul_add` is
/// one instruction and the loops vectorize), otherwise as plain code (`mul_add` is then
/// libm's `fmaf`, as exact but slower). Both give identical results.
macro_rules! fma_dispatch {
    ($f:ident($($a:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU has the features `fma_impl` is compiled for.
            return unsafe { fma_impl::$f($($a),*) };
        }
        $f($($a),*)
    }};
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    has_fma() && std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(target_arch = "x86_64")]
fn has_fma() -> bool {
    std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
}

/// The hot loops compiled with AVX2 + FMA (their bodies are `#[inline(always)]`).
#[cfg(target_arch = "x86_64")]
mod fma_impl {
    use super::{AttentionShape, KvRows};

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu_impl(gate: &[f32], up: &[f32], out: &mut [f32]) {
        super::swiglu_impl(gate, up, out)
    }

    /// The `mul_add`s one instruction each instead of libm's software `fmaf` (0.9% of the
    /// default model's server under 16 clients); both round once, so the result is the same.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rope_apply_impl(x: &mut [f32], cs: &[(f32, f32)], interleaved: bool) {
        super::rope_apply_impl(x, cs, interleaved)
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attention_block<R: KvRows>(
        q: &[f32],
        k: R,
        kt: Option<&[f32]>,
        v: R,
        shape: &AttentionShape,
        scale: f32,
        softcap: Option<f32>,
        window: Option<usize>,
        sinks: Option<&[f32]>,
        kh: usize,
        ts: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            super::attention_block(
                q, k, kt, v, shape, scale, softcap, window, sinks, kh, ts, out,
            )
        }
    }

    /// [`attention_block`] with 512-bit vectors (the same IEEE operations, so the same result).
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attention_block_avx512<R: KvRows>(
        q: &[f32],
        k: R,
        kt: Option<&[f32]>,
        v: R,
        shape: &AttentionShape,
        scale: f32,
        softcap: Option<f32>,
        window: Option<usize>,
        sinks: Option<&[f32]>,
        kh: usize,
        ts: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            super::attention_block(
                q, k, kt, v, shape, scale, softcap, window, sinks, kh, ts, out,
            )
        }
    }
}

/// Lanes of ggml's AVX-512 `f32` vectors.
pub const LANES: usize = 16;

/// `exp(x)` as ggml's vectorized `ggml_v_expf` computes it (AVX-512 variant): a range
/// reduction `x = n·ln2 + b` with `n` rounded to nearest by the `1.5·2^23` trick, a degree-5
/// polynomial in `b`, and a scaling by `2^n`; `0` or `inf` when `|n| > 192`. Within 1.5 ulp
/// of `expf`.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // ln2 low part
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // ln2 high part
    );
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17))
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)),
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0));
    let res = scalef(j, n.clamp(-193.0, 193.0));
    // Branch-free selects, so that loops over `expf` vectorize.
    let out_of_range = if n <= 0.0 { 0.0 } else { f32::INFINITY };
    if n.abs() > 192.0 {
        out_of_range
    } else {
        res
    }
}

/// `j · 2^n` for an integral `n` in `[-193, 193]`, rounded once (`_mm512_scalef_ps`): the
/// product is exact in `f64`, the conversion to `f32` rounds.
#[inline(always)]
fn scalef(j: f32, n: f32) -> f32 {
    let p = f64::from_bits(((n as i32 + 1023) as u64) << 52);
    (j as f64 * p) as f32
}

/// SiLU `x / (1 + exp(-x))` (Elfwing et al. 2017), as `ggml_v_silu`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

/// SwiGLU (Shazeer 2020): `out[i] = silu(gate[i]) · up[i]` (`ggml_vec_swiglu_f32`).
/// All three slices have the same length.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    fma_dispatch!(swiglu_impl(gate, up, out))
}

#[inline(always)]
fn swiglu_impl(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// GELU with the tanh approximation (Hendrycks & Gimpel 2016) as ggml's `ggml_gelu_f32`
/// evaluates it in `f32`: `0.5·x·(1 + tanhf(sqrt(2/π)·x·(1 + 0.044715·x·x)))`, where GCC
/// contracts `1 + (0.044715·x)·x` into one fused multiply-add and `tanhf` is libm's.
#[inline]
fn gelu_tanh_f32(x: f32) -> f32 {
    const COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let inner = (SQRT_2_OVER_PI * x) * (COEF_A * x).mul_add(x, 1.0);
    (0.5 * x) * (1.0 + inner.tanh())
}

/// ggml's GELU table (`ggml_table_gelu_f16`): for every `f16` bit pattern `h`,
/// `f16(gelu_tanh_f32(f32(h)))`, built once (65,536 entries, 128 KiB).
fn gelu_table() -> &'static [u16] {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|h| {
                let x = half::f16::from_bits(h).to_f32();
                half::f16::from_f32(gelu_tanh_f32(x)).to_bits()
            })
            .collect()
    })
}

/// GeGLU (Shazeer 2020) with ggml's tanh-GELU: `out[i] = gelu(gate[i]) · up[i]`
/// (`ggml_vec_geglu_f32` with `GGML_GELU_FP16`, the default; llama.cpp's `ggml_geglu_split`
/// in Gemma's feed-forward): `0` for `gate <= -10`, `gate · up` for `gate >= 10`, otherwise
/// `gate` rounded to `f16` and looked up in [`gelu_table`], so the GELU carries `f16`
/// precision (relative error up to ~1e-3 against the exact formula). All three slices have
/// the same length.
pub fn geglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let table = gelu_table();
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = if g <= -10.0 {
            0.0
        } else if g >= 10.0 {
            g * u
        } else {
            let h = half::f16::from_f32(g).to_bits() as usize;
            half::f16::from_bits(table[h]).to_f32() * u
        };
    }
}

/// RMSNorm (Zhang & Sennrich 2019) of each row of `x: [rows, n]` into `out`, times `weight:
/// [n]`: the sum of squares is accumulated in `f64` (each square rounded to `f32` first), the
/// mean rounded to `f32`, `scale = 1 / sqrtf(mean + eps)`, then `out = x · scale · weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    if n == 0 {
        return;
    }
    for (xr, yr) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((y, &v), &w) in yr.iter_mut().zip(xr).zip(weight) {
            *y = v * scale * w;
        }
    }
}

/// Horizontal sum of 16 lanes in the order of GCC's `_mm512_reduce_add_ps`: halves of 8,
/// then of 4, then `(s0 + s2) + (s1 + s3)`.
#[inline(always)]
pub fn reduce_add16(v: &[f32; LANES]) -> f32 {
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = v[i] + v[i + 8];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// Dot product as llamafile's `tinyBLAS` computes an `f32` GEMM element with AVX-512: 16
/// lanes, each a chain of fused multiply-adds over the elements `l, l + 16, ...`, then
/// [`reduce_add16`]. A trailing partial chunk counts as zero-padded (ggml's operands are
/// padded with zeros). `a` and `b` have the same length.
#[inline(always)]
pub fn dot_tinyblas(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (xa, xb) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] = xa[l].mul_add(xb[l], acc[l]);
        }
    }
    for (l, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] = x.mul_add(y, acc[l]);
    }
    reduce_add16(&acc)
}

/// Dot product as `ggml_vec_dot_f32` computes it with AVX-512: steps of 64 elements into 4
/// accumulators of 16 lanes (fused multiply-adds), reduced lane-wise `(a0 + a2) + (a1 + a3)`
/// then by [`reduce_add16`]; the elements after the last full step are added one by one
/// (`sumf += x·y`, contracted to a fused multiply-add).
#[inline(always)]
pub fn dot_vec(a: &[f32], b: &[f32]) -> f32 {
    const STEP: usize = 4 * LANES;
    let n = a.len().min(b.len());
    let np = n / STEP * STEP;
    let mut acc = [[0f32; LANES]; 4];
    for (xa, xb) in a[..np].chunks_exact(STEP).zip(b[..np].chunks_exact(STEP)) {
        for (j, accj) in acc.iter_mut().enumerate() {
            let xa: &[f32; LANES] = xa[j * LANES..][..LANES].try_into().expect("16 lanes");
            let xb: &[f32; LANES] = xb[j * LANES..][..LANES].try_into().expect("16 lanes");
            for l in 0..LANES {
                accj[l] = xa[l].mul_add(xb[l], accj[l]);
            }
        }
    }
    let mut s = [0f32; LANES];
    for l in 0..LANES {
        s[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let mut sum = reduce_add16(&s);
    for i in np..n {
        sum = a[i].mul_add(b[i], sum);
    }
    sum
}

/// Softmax of `x` in place after `x = x · scale` (masked entries are `-inf` already), as
/// ggml's `soft_max`: the maximum, then chunks of 16 values `expf(x - max)` whose
/// [`reduce_add16`] sums are accumulated in `f64`, then a multiplication by `(f32)(1 / sum)`.
/// Values after the last full chunk use the same [`expf`] (ggml pads rows to 256 with
/// masked entries, so it never sees a partial chunk). An all-masked row gives zeros.
#[inline(always)]
pub fn softmax_scaled(x: &mut [f32], scale: f32) {
    softmax_scaled_sink(x, scale, None)
}

/// [`softmax_scaled`] with an optional attention sink (gpt-oss; llama.cpp's `soft_max_ext`
/// with `sinks`): a logit `sink` that joins the maximum and the denominator but has no output,
/// so that `x_j = exp(x_j - m) / (Σ_i exp(x_i - m) + exp(sink - m))` with `m` the maximum of
/// the scaled `x` and `sink` (transformers' `eager_attention_forward` of
/// `modeling_gpt_oss.py`). The sink's term is added to the `f64` sum after the chunks.
#[inline(always)]
pub fn softmax_scaled_sink(x: &mut [f32], scale: f32, sink: Option<f32>) {
    // Lane-wise maxima (the maximum does not depend on the order; NaN scores do not occur).
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (m, v) in lanes.iter_mut().zip(c.iter_mut()) {
            *v *= scale;
            *m = if *v > *m { *v } else { *m };
        }
    }
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for v in chunks.into_remainder() {
        *v *= scale;
        max = max.max(*v);
    }
    if let Some(sink) = sink {
        max = max.max(sink);
    }
    if max == f32::NEG_INFINITY {
        x.fill(0.0);
        return;
    }
    let mut sum = 0f64;
    for c in x.chunks_mut(LANES) {
        let mut e = [0f32; LANES];
        for (ei, v) in e.iter_mut().zip(c.iter_mut()) {
            *v = expf(*v - max);
            *ei = *v;
        }
        sum += reduce_add16(&e) as f64;
    }
    if let Some(sink) = sink {
        sum += expf(sink - max) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// The cos/sin table of rotary position embeddings (Su et al. 2021, RoFormer) for one
/// position, as `ggml_rope_cache_init` computes it: `theta_0 = pos`, `theta_{i+1} = theta_i ·
/// theta_scale` in `f32` with `theta_scale = base^(-2/dims)`, each divided by its frequency
/// factor when there are any, then `cosf`/`sinf` (plain rope: no YaRN ramp, `mscale = 1`,
/// `freq_scale` multiplies `theta`). Returns `[dims / 2]` pairs `(cos, sin)`.
pub fn rope_cos_sin(
    pos: usize,
    dims: usize,
    base: f32,
    freq_scale: f32,
    freq_factors: Option<&[f32]>,
) -> Vec<(f32, f32)> {
    let theta_scale = base.powf(-2.0 / dims as f32);
    let mut theta = pos as f32;
    let mut out = Vec::with_capacity(dims / 2);
    for i in 0..dims / 2 {
        let ff = freq_factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
        let t = freq_scale * (theta / ff);
        out.push((t.cos(), t.sin()));
        theta *= theta_scale;
    }
    out
}

/// Rotates one head vector `x: [dims]` in place with a table from [`rope_cos_sin`]:
/// `interleaved` pairs `(x[2i], x[2i+1])` (ggml's `NORMAL` mode, GGUF Llama weights) or
/// halves `(x[i], x[i + dims/2])` (`NEOX` mode, Hugging Face layout). Each output is
/// `x0·cos - x1·sin` and `x0·sin + x1·cos`, rounded as ggml does.
pub fn rope_apply(x: &mut [f32], cs: &[(f32, f32)], interleaved: bool) {
    fma_dispatch!(rope_apply_impl(x, cs, interleaved))
}

#[inline(always)]
fn rope_apply_impl(x: &mut [f32], cs: &[(f32, f32)], interleaved: bool) {
    let half = cs.len();
    for (i, &(c, s)) in cs.iter().enumerate() {
        let (i0, i1) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (x[i0], x[i1]);
        x[i0] = x0.mul_add(c, -(x1 * s));
        x[i1] = x0.mul_add(s, x1 * c);
    }
}

/// Shapes of one [`attention`] call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention: query head `h` reads kv head
    /// `h / (heads / kv_heads)`).
    pub kv_heads: usize,
    /// Query positions (the last `queries` of the `kv_len` cached positions).
    pub queries: usize,
    /// Cached positions, the new ones included.
    pub kv_len: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Distance in values between the key (value) heads of `k` (`v`): `kv_len · head_dim`
    /// for a packed cache, more for a view into a preallocated one.
    pub kv_head_stride: usize,
}

/// Causal scaled dot-product attention (Vaswani et al. 2017) with ggml's numerics, for
/// `q: [heads, queries, head_dim]`, `k`, `v: [kv_heads, kv_len, head_dim]` (heads
/// `kv_head_stride` apart), into
/// `out: [queries, heads, head_dim]` (the layout the output projection reads). Query `t`
/// sits at position `kv_len - queries + t` and sees keys `j <= ` its position, and with a
/// `window` only those with `pos - j < window`.
///
/// The scores are `q·k` as ggml's `mul_mat` computes them, with `ggml_vec_dot_f32`
/// ([`dot_vec`]; the query operand is never a contiguous matrix of 2+ columns); with a
/// `softcap` `c` (Gemma 2's attention logit soft-capping, llama.cpp `build_attn_mha`) each
/// score becomes `tanhf(s · scale · (1/c)) · c` and the softmax takes scale 1; then
/// [`softmax_scaled`]; then `Σ p_j v_j` over the positions (ggml multiplies by the transposed
/// value cache) as `ggml_vec_dot_f32` does for one query (llamafile's `tinyBLAS` declines
/// one-column products) and as `tinyBLAS` ([`dot_tinyblas`]) does for several, without
/// materializing a transposed `v`. Rows run in parallel on the rayon pool. Where the CPU has
/// AVX-512, passes of 16 or more queries with a head dimension that is a multiple of 16 run
/// these same operations in tiles of 4 rows (`kernels::attn_exact`: each load of a key or a
/// value feeds 4 rows), with the same result bit for bit.
///
/// Passes of 64 queries or more over 1,024 or more cached positions (long prompts at depth)
/// take a tiled online-softmax kernel instead where the CPU has AVX-512
/// (`kernels::attn_tiled`: FlashAttention-2's loop, the same function up to float summation
/// order), without soft-capping.
///
/// With `sinks` (`[heads]`, gpt-oss) each head's sink logit joins the softmax's maximum and
/// denominator ([`softmax_scaled_sink`]).
///
/// # Panics
/// If a slice is shorter than its shape says or `heads` is not a multiple of `kv_heads`
/// (internal callers check shapes first).
#[allow(clippy::too_many_arguments)] // the operands and ggml's four attention parameters
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    check_attention_operands(q, k, v, &shape, sinks, out);
    #[cfg(target_arch = "x86_64")]
    if super::attn_tiled::applies(&shape, softcap) {
        return super::attn_tiled::attention(q, k, v, shape, scale, window, sinks, out);
    }
    attention_rows(q, k, v, shape, scale, softcap, window, sinks, out)
}

/// The slice lengths and head counts [`attention`] needs (panics otherwise).
fn check_attention_operands(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &AttentionShape,
    sinks: Option<&[f32]>,
    out: &[f32],
) {
    check_attention_shape(q.len(), k.len(), v.len(), shape, sinks, out.len())
}

/// [`check_attention_operands`] on the slices' lengths (any element type of `k` and `v`).
fn check_attention_shape(
    q: usize,
    k: usize,
    v: usize,
    shape: &AttentionShape,
    sinks: Option<&[f32]>,
    out: usize,
) {
    let &AttentionShape {
        heads,
        kv_heads,
        queries,
        kv_len,
        head_dim: d,
        kv_head_stride: hs,
    } = shape;
    assert!(kv_heads > 0 && heads % kv_heads == 0 && kv_len >= queries);
    assert!(q >= heads * queries * d && out >= heads * queries * d);
    assert!(hs >= kv_len * d);
    let kv_need = (kv_heads - 1) * hs + kv_len * d;
    assert!(k >= kv_need && v >= kv_need);
    assert!(sinks.is_none_or(|s| s.len() >= heads));
}

/// [`attention`] one output row at a time in ggml's exact order (see there), whatever the
/// number of queries; the operands are [`attention`]'s, checked there.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    // Prefill: keys transposed once per call so that scores go 16 keys at a time.
    let kt = (shape.queries >= TRANSPOSE_MIN_QUERIES).then(|| transpose_keys(k, &shape));
    attention_rows_kt(
        q,
        k,
        kt.as_deref(),
        v,
        shape,
        scale,
        softcap,
        window,
        sinks,
        out,
    )
}

/// [`attention_rows`] with the keys transposed by the caller when `kt` is given
/// ([`transpose_keys`]; then `k` is not read and may be empty).
#[allow(clippy::too_many_arguments)]
fn attention_rows_kt(
    q: &[f32],
    k: &[f32],
    kt: Option<&[f32]>,
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let (kv_len, d, hs) = (shape.kv_len, shape.head_dim, shape.kv_head_stride);
    let out_ptr = SyncMutPtr(out.as_mut_ptr());
    for_each_item(&shape, |kh, ts| {
        let out = out_ptr.get();
        // The AVX-512 tiles of `attn_exact` where they apply (transposed keys, 16 queries or
        // more), else the row kernel over kv head `kh`'s rows.
        #[cfg(target_arch = "x86_64")]
        if let Some(kt) = kt.filter(|_| super::attn_exact::applies(d, shape.queries)) {
            // SAFETY: `applies` checked the CPU and the shape; the rest as below.
            return unsafe {
                super::attn_exact::block(
                    q, kt, v, &shape, scale, softcap, window, sinks, kh, ts, out,
                )
            };
        }
        // Kv head `kh`'s rows (its keys are not read when they come transposed, and then `k`
        // may be empty).
        let kh_k: &[f32] = if kt.is_some() {
            &[]
        } else {
            &k[kh * hs..][..kv_len * d]
        };
        let kh_v = &v[kh * hs..][..kv_len * d];
        // SAFETY: the operands hold their shapes (asserted by the callers), `kt` is
        // `transpose_keys`'s and the items' rows are pairwise disjoint.
        unsafe {
            row_block(
                q, kh_k, kt, kh_v, &shape, scale, softcap, window, sinks, kh, ts, out,
            )
        }
    })
}

/// Runs `item(kh, ts)` on every work item of an attention pass of `shape` ([`work_items`]: a
/// kv head `kh` and a block `ts` of up to [`QUERY_BLOCK`] queries), in parallel on the rayon
/// pool when the pass is large enough (`heads · queries · kv_len · head_dim` of 2^15 or more,
/// and more than one item), else in order on this thread.
fn for_each_item<F>(shape: &AttentionShape, item: F)
where
    F: Fn(usize, std::ops::Range<usize>) + Sync + Send,
{
    use rayon::prelude::*;
    let items = work_items(shape.kv_heads, shape.queries, QUERY_BLOCK);
    let run = |(kh, ts): &(usize, std::ops::Range<usize>)| item(*kh, ts.clone());
    let multiply_adds = shape.heads * shape.queries * shape.kv_len * shape.head_dim;
    if multiply_adds >= 1 << 15 && items.len() > 1 {
        items.par_iter().with_max_len(1).for_each(run);
    } else {
        items.iter().for_each(run);
    }
}

/// One work item of [`attention`]'s row kernel (the query heads of kv head `kh` at queries
/// `ts`, over kv head `kh`'s rows `k`, `v`, wherever they are stored) on the best build of
/// [`attention_block`] this CPU has: AVX-512, AVX2 + FMA or plain code (the same result bit
/// for bit on each).
///
/// # Safety
/// As [`attention_block`].
#[allow(clippy::too_many_arguments)]
unsafe fn row_block<R: KvRows>(
    q: &[f32],
    k: R,
    kt: Option<&[f32]>,
    v: R,
    shape: &AttentionShape,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    kh: usize,
    ts: std::ops::Range<usize>,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the features `attention_block_avx512` is compiled for; the
        // rest is the caller's.
        return unsafe {
            fma_impl::attention_block_avx512(
                q, k, kt, v, shape, scale, softcap, window, sinks, kh, ts, out,
            )
        };
    }
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: as above, for AVX2 + FMA.
        return unsafe {
            fma_impl::attention_block(
                q, k, kt, v, shape, scale, softcap, window, sinks, kh, ts, out,
            )
        };
    }
    // SAFETY: the caller's.
    unsafe {
        attention_block(
            q, k, kt, v, shape, scale, softcap, window, sinks, kh, ts, out,
        )
    }
}

/// [`attention`] over an f16 KV cache: `k`, `v: [kv_heads, kv_len, head_dim]` f16 (heads
/// `kv_head_stride` apart), the other operands and the result as there. The result is
/// [`attention`]'s over the keys and values widened to f32, bit for bit (f16 -> f32 is
/// exact), without a widened copy of the whole cache on decode:
///
/// - Decode and short passes (fewer than 16 queries): each work item (a kv head and up to 4
///   queries) widens its kv head's keys and values into a buffer of its thread ([`widen_f16`]:
///   AVX-512 `vcvtph2ps`, F16C, or `half`), which stays in the core's caches, and runs the row
///   kernel on it; the cache itself is read once, at half the f32 cache's bytes.
/// - Prefills (16 queries or more): the keys are widened inside their transposition
///   ([`transpose_keys`], which the f32 path makes too) and the values once per pass, a cost
///   shared by all the pass's queries.
///
/// # Panics
/// As [`attention`].
#[allow(clippy::too_many_arguments)] // the operands and ggml's four attention parameters
pub fn attention_f16(
    q: &[f32],
    k: &[half::f16],
    v: &[half::f16],
    shape: AttentionShape,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    check_attention_shape(q.len(), k.len(), v.len(), &shape, sinks, out.len());
    let AttentionShape {
        heads,
        kv_heads,
        queries,
        kv_len,
        head_dim: d,
        kv_head_stride: hs,
    } = shape;
    if queries >= TRANSPOSE_MIN_QUERIES {
        let kt = transpose_keys_f16(k, &shape);
        let mut vf = vec![0f32; kv_heads * kv_len * d];
        vf.par_chunks_mut(kv_len * d)
            .enumerate()
            .for_each(|(h, dst)| widen_f16(&v[h * hs..][..kv_len * d], dst));
        let packed = AttentionShape {
            kv_head_stride: kv_len * d,
            ..shape
        };
        #[cfg(target_arch = "x86_64")]
        if super::attn_tiled::applies(&packed, softcap) {
            return super::attn_tiled::attention_kt(q, &kt, &vf, packed, scale, window, sinks, out);
        }
        return attention_rows_kt(
            q,
            &[],
            Some(&kt),
            &vf,
            packed,
            scale,
            softcap,
            window,
            sinks,
            out,
        );
    }
    thread_local! {
        /// Widened keys and values of one kv head, and the output rows of one work item.
        static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = const {
            std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()])
        };
    }
    let rep = heads / kv_heads;
    // One kv head alone: its query heads are heads `0..rep` of `q[kh·rep..]`.
    let one = AttentionShape {
        heads: rep,
        kv_heads: 1,
        queries,
        kv_len,
        head_dim: d,
        kv_head_stride: kv_len * d,
    };
    let out_ptr = SyncMutPtr(out.as_mut_ptr());
    for_each_item(&shape, |kh, ts| {
        SCRATCH.with(|cell| {
            let mut bufs = cell.borrow_mut();
            let [kf, vf, of] = &mut *bufs;
            for (buf, n) in [
                (&mut *kf, kv_len * d),
                (&mut *vf, kv_len * d),
                (&mut *of, queries * rep * d),
            ] {
                buf.resize(n, 0.0);
            }
            widen_f16(&k[kh * hs..][..kv_len * d], kf);
            widen_f16(&v[kh * hs..][..kv_len * d], vf);
            let qh = &q[kh * rep * queries * d..][..rep * queries * d];
            let sh = sinks.map(|s| &s[kh * rep..][..rep]);
            // SAFETY: `kf`, `vf` hold one kv head of `kv_len` positions, `qh` its query heads,
            // `of` the `[queries, rep, d]` rows of `one`, written by this item alone.
            unsafe {
                row_block(
                    qh,
                    &kf[..],
                    None,
                    &vf[..],
                    &one,
                    scale,
                    softcap,
                    window,
                    sh,
                    0,
                    ts.clone(),
                    of.as_mut_ptr(),
                )
            };
            for t in ts.clone() {
                // SAFETY: rows `(t, kh·rep..(kh + 1)·rep)` of `out` belong to this item alone
                // and lie inside it (`check_attention_shape`).
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.get().add((t * heads + kh * rep) * d),
                        rep * d,
                    )
                };
                dst.copy_from_slice(&of[t * rep * d..][..rep * d]);
            }
        })
    })
}

/// `dst[i] = src[i]` widened from f16 to f32 (exact), with AVX-512F's `vcvtph2ps` 16 at a
/// time or F16C's 8 at a time where the CPU has them, else with the `half` crate; every path
/// gives the same bits.
///
/// # Panics
/// If `dst` is shorter than `src`.
pub fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    let dst = &mut dst[..src.len()];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the lengths agree.
            return unsafe { widen_f16_avx512(src, dst) };
        }
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
        {
            // SAFETY: the CPU has F16C and AVX; the lengths agree.
            return unsafe { widen_f16_f16c(src, dst) };
        }
    }
    widen_f16_scalar(src, dst)
}

/// [`widen_f16`] with the `half` crate, one value at a time (the reference and the path of
/// other CPUs).
pub fn widen_f16_scalar(src: &[half::f16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// [`widen_f16`] with AVX-512F, 16 values an instruction.
///
/// # Safety
/// The CPU has AVX-512F; `dst.len() == src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn widen_f16_avx512(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len() / LANES * LANES;
    for i in (0..n).step_by(LANES) {
        // SAFETY: `i + 16 <= n <= len` of both slices.
        unsafe {
            let h = _mm256_loadu_si256(src.as_ptr().add(i).cast::<__m256i>());
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        }
    }
    widen_f16_scalar(&src[n..], &mut dst[n..]);
}

/// [`widen_f16`] with F16C, 8 values an instruction.
///
/// # Safety
/// The CPU has F16C and AVX; `dst.len() == src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
pub(crate) unsafe fn widen_f16_f16c(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n <= len` of both slices.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i).cast::<__m128i>());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    widen_f16_scalar(&src[n..], &mut dst[n..]);
}

/// Queries per work item of [`attention`] (times the query heads of a kv head: the rows that
/// share each load of keys and values).
const QUERY_BLOCK: usize = 4;

/// Work items of an attention pass: a kv head and a block of up to `qb` queries (all of the kv
/// head's query heads), so that each key and value is loaded once per block rather than once
/// per row.
pub(crate) fn work_items(
    kv_heads: usize,
    queries: usize,
    qb: usize,
) -> Vec<(usize, std::ops::Range<usize>)> {
    let qb = qb.min(queries.max(1));
    (0..kv_heads)
        .flat_map(|kh| {
            (0..queries)
                .step_by(qb)
                .map(move |t0| (kh, t0..(t0 + qb).min(queries)))
        })
        .collect()
}

/// An output pointer shared by an attention pass's work items, which write disjoint rows.
#[derive(Clone, Copy)]
pub(crate) struct SyncMutPtr(pub(crate) *mut f32);
// SAFETY: the work items write pairwise disjoint rows through it (see `attention`).
unsafe impl Send for SyncMutPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncMutPtr {}

impl SyncMutPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Queries from which [`attention`] transposes the keys (below, the copy costs more than the
/// vectorized scores save).
const TRANSPOSE_MIN_QUERIES: usize = 16;

/// The keys of every kv head in blocks of 16 positions, each block `[head_dim][16]`
/// (component-major, positions past `kv_len` zero): `kt[((h · blocks + b) · d + c) · 16 + j]`
/// is component `c` of key `16b + j` of head `h`.
pub(crate) fn transpose_keys(k: &[f32], shape: &AttentionShape) -> Vec<f32> {
    transpose_keys_with(k, shape, |key, row| row.copy_from_slice(key))
}

/// [`transpose_keys`] of f16 keys, widened to f32 ([`widen_f16`]) on the way.
pub(crate) fn transpose_keys_f16(k: &[half::f16], shape: &AttentionShape) -> Vec<f32> {
    transpose_keys_with(k, shape, widen_f16)
}

/// [`transpose_keys`] of keys stored as `T`, each key row made f32 by `load(key, row)` (both
/// `head_dim` long) before it is scattered into its block.
fn transpose_keys_with<T: Sync>(
    k: &[T],
    shape: &AttentionShape,
    load: impl Fn(&[T], &mut [f32]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let (d, hs, kv_len) = (shape.head_dim, shape.kv_head_stride, shape.kv_len);
    let blocks = kv_len.div_ceil(LANES);
    let mut kt = vec![0f32; shape.kv_heads * blocks * d * LANES];
    kt.par_chunks_mut(d * LANES).enumerate().for_each_init(
        || vec![0f32; d],
        |row, (hb, dst)| {
            let (h, b) = (hb / blocks, hb % blocks);
            for j in 0..LANES.min(kv_len - b * LANES) {
                load(&k[h * hs + (b * LANES + j) * d..][..d], row);
                for (c, &x) in row.iter().enumerate() {
                    dst[c * LANES + j] = x;
                }
            }
        },
    );
    kt
}

/// [`scores16`] with AVX-512 intrinsics (the same operations; LLVM does not keep the 16
/// lane vectors of the generic version in registers).
///
/// # Safety
/// The CPU has AVX-512F; `kt.len() >= 16 · qv.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores16_avx512(qv: &[f32], kt: &[f32], out: &mut [f32; LANES]) {
    use std::arch::x86_64::*;
    const STEP: usize = 4 * LANES;
    let d = qv.len();
    let np = d / STEP * STEP;
    debug_assert!(kt.len() >= d * LANES);
    let (q, k) = (qv.as_ptr(), kt.as_ptr());
    unsafe {
        let mut v = [_mm512_setzero_ps(); LANES];
        for (l, vl) in v.iter_mut().enumerate() {
            let mut a = [_mm512_setzero_ps(); 4];
            for step in (0..np).step_by(STEP) {
                for (g, ag) in a.iter_mut().enumerate() {
                    let c = step + g * LANES + l;
                    *ag = _mm512_fmadd_ps(
                        _mm512_set1_ps(*q.add(c)),
                        _mm512_loadu_ps(k.add(c * LANES)),
                        *ag,
                    );
                }
            }
            *vl = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
        }
        let h: [__m512; 8] = std::array::from_fn(|i| _mm512_add_ps(v[i], v[i + 8]));
        let q4: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(h[i], h[i + 4]));
        let mut o = _mm512_add_ps(_mm512_add_ps(q4[0], q4[2]), _mm512_add_ps(q4[1], q4[3]));
        for c in np..d {
            o = _mm512_fmadd_ps(
                _mm512_set1_ps(*q.add(c)),
                _mm512_loadu_ps(k.add(c * LANES)),
                o,
            );
        }
        _mm512_storeu_ps(out.as_mut_ptr(), o);
    }
}

/// The scores `q·k` of 16 keys (one block of [`transpose_keys`]), each exactly as [`dot_vec`]
/// computes it: per key, lane `l` of accumulator `g` chains the products of components
/// `64s + 16g + l` over the steps `s`, the lanes are combined `(a0 + a2) + (a1 + a3)` and
/// reduced by [`reduce_add16`], then the components after the last whole step are added one by
/// one. Here the 16 keys are the vector lanes.
#[inline(always)]
fn scores16(qv: &[f32], kt: &[f32], out: &mut [f32; LANES]) {
    const STEP: usize = 4 * LANES;
    let d = qv.len();
    let np = d / STEP * STEP;
    let mut v = [[0f32; LANES]; LANES];
    for (l, vl) in v.iter_mut().enumerate() {
        let mut a = [[0f32; LANES]; 4];
        for step in (0..np).step_by(STEP) {
            for (g, ag) in a.iter_mut().enumerate() {
                let c = step + g * LANES + l;
                let (qc, kc) = (qv[c], &kt[c * LANES..][..LANES]);
                for j in 0..LANES {
                    ag[j] = qc.mul_add(kc[j], ag[j]);
                }
            }
        }
        for j in 0..LANES {
            vl[j] = (a[0][j] + a[2][j]) + (a[1][j] + a[3][j]);
        }
    }
    // reduce_add16 over l, for every key at once.
    let mut h = [[0f32; LANES]; 8];
    for i in 0..8 {
        for j in 0..LANES {
            h[i][j] = v[i][j] + v[i + 8][j];
        }
    }
    for j in 0..LANES {
        let q = [
            h[0][j] + h[4][j],
            h[1][j] + h[5][j],
            h[2][j] + h[6][j],
            h[3][j] + h[7][j],
        ];
        out[j] = (q[0] + q[2]) + (q[1] + q[3]);
    }
    for c in np..d {
        let (qc, kc) = (qv[c], &kt[c * LANES..][..LANES]);
        for j in 0..LANES {
            out[j] = qc.mul_add(kc[j], out[j]);
        }
    }
}

/// Where [`attention_block`] finds the rows of one kv head's keys or values: row `j`
/// (`[d]` f32, `d` the head dimension) holds position `j < kv_len`. Sources: a contiguous
/// `[kv_len, d]` slice ([`attention`]) and a slice of rows found through a block table
/// ([`attention_paged`], [`paged_rows`]). The kernel takes its sources by value and is
/// compiled once per kind, so its loops call no function to find a row, and on slices it
/// indexes them as a kernel written for slices alone would.
trait KvRows: Copy {
    /// Row `j` (`[d]`).
    fn row(&self, j: usize, d: usize) -> &[f32];
}

/// `[kv_len, d]`: row `j` at `j · d`.
impl KvRows for &[f32] {
    #[inline(always)]
    fn row(&self, j: usize, d: usize) -> &[f32] {
        &self[j * d..][..d]
    }
}

/// One row per position, `d` long already.
impl KvRows for &[&[f32]] {
    #[inline(always)]
    fn row(&self, j: usize, _: usize) -> &[f32] {
        self[j]
    }
}

/// The rows of kv head `kh` at positions `0..kv_len` of a block table (vLLM's PagedAttention):
/// `blocks[b]` is `[kv_heads, block, head_dim]` f32 and holds positions `b·block..(b + 1)·block`,
/// so position `j` is row `kh · block + j mod block` of block `j / block`.
///
/// # Panics
/// If a block the positions need is missing or shorter than `kv_heads · block · head_dim`.
fn paged_rows<'a>(blocks: &[&'a [f32]], shape: &PagedShape, kh: usize) -> Vec<&'a [f32]> {
    let &PagedShape {
        kv_len,
        head_dim: d,
        block,
        ..
    } = shape;
    (0..kv_len)
        .map(|j| &blocks[j / block][(kh * block + j % block) * d..][..d])
        .collect()
}

/// A block of output rows of [`attention`] and [`attention_paged`]: the query heads of kv head
/// `kh` at queries `ts`, written to `out` (`[queries, heads, head_dim]`), over kv head `kh`'s
/// key and value rows `k`, `v` (wherever they are stored) or, when `kt` is given, the keys of
/// [`transpose_keys`] (then `k` is not read). `shape` is that of the keys and values laid out
/// contiguously (its `kv_head_stride` is not read). Each row's result is exactly what it would
/// be alone (the same operations in the same order); the rows are only interleaved so that
/// every block of 16 keys (and every stripe of values) is loaded once for all of them instead
/// of once per row, which keeps long contexts in the caches.
///
/// # Safety
/// `out` is valid for the rows `(t, h)` of the block (`t` in `ts`, `h` in kv head `kh`'s
/// query heads), and no other thread writes them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attention_block<R: KvRows>(
    q: &[f32],
    k: R,
    kt: Option<&[f32]>,
    v: R,
    shape: &AttentionShape,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    kh: usize,
    ts: std::ops::Range<usize>,
    out: *mut f32,
) {
    let AttentionShape {
        heads,
        kv_heads,
        queries,
        kv_len,
        head_dim: d,
        kv_head_stride: _,
    } = *shape;
    let rep = heads / kv_heads;
    let offset = kv_len - queries;
    // Rows `(t, h)`, query-major, with each one's position and first visible key.
    let rows: Vec<(usize, usize)> = ts
        .clone()
        .flat_map(|t| (kh * rep..(kh + 1) * rep).map(move |h| (t, h)))
        .collect();
    let pos = |t: usize| offset + t;
    let first = |t: usize| window.map_or(0, |w| (pos(t) + 1).saturating_sub(w));
    let qv = |t: usize, h: usize| &q[(h * queries + t) * d..][..d];
    // Only the first `len` scores of a row are computed and normalized: the rest are masked,
    // and in ggml's softmax they add exact zeros (its 16-value chunks start at position 0
    // either way).
    let mut ps: Vec<Vec<f32>> = rows
        .iter()
        .map(|&(t, _)| {
            let len = (pos(t) + 1)
                .div_ceil(LANES)
                .saturating_mul(LANES)
                .min(kv_len);
            vec![f32::NEG_INFINITY; len]
        })
        .collect();
    let lo_all = ts.clone().map(first).min().unwrap_or(0);
    let hi_all = ts.clone().map(pos).max().unwrap_or(0);
    match kt {
        Some(kt) => {
            let blocks = kv_len.div_ceil(LANES);
            let kt = &kt[kh * blocks * d * LANES..][..blocks * d * LANES];
            let mut s = [0f32; LANES];
            #[cfg(target_arch = "x86_64")]
            let avx512 = has_avx512();
            for b in lo_all / LANES..=hi_all / LANES {
                let blk = &kt[b * d * LANES..][..d * LANES];
                for (&(t, h), p) in rows.iter().zip(ps.iter_mut()) {
                    let (f, ps_) = (first(t), pos(t));
                    if b < f / LANES || b > ps_ / LANES {
                        continue;
                    }
                    #[cfg(target_arch = "x86_64")]
                    if avx512 {
                        // SAFETY: the CPU has AVX-512F; `blk` holds `d` rows of 16 values.
                        unsafe { scores16_avx512(qv(t, h), blk, &mut s) };
                    } else {
                        scores16(qv(t, h), blk, &mut s);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    scores16(qv(t, h), blk, &mut s);
                    let (lo, hi) = ((b * LANES).max(f), (b * LANES + LANES).min(ps_ + 1));
                    p[lo..hi].copy_from_slice(&s[lo - b * LANES..hi - b * LANES]);
                }
            }
        }
        None => {
            for j in lo_all..=hi_all {
                let kj = k.row(j, d);
                for (&(t, h), p) in rows.iter().zip(ps.iter_mut()) {
                    if j >= first(t) && j <= pos(t) {
                        p[j] = dot_vec(qv(t, h), kj);
                    }
                }
            }
        }
    }
    for (&(t, h), p) in rows.iter().zip(ps.iter_mut()) {
        // The cap applies to the scaled scores (`c·tanh(s·scale/c)`, as
        // `scaled_dot_product_attention` on other devices); with `scale = 1` (llama.cpp
        // pre-scales q) `s·1` is exact, so this is ggml's order.
        let softmax_scale = match softcap {
            Some(c) => {
                let inv = 1.0 / c;
                for pj in p.iter_mut().take(pos(t) + 1).skip(first(t)) {
                    *pj = (*pj * scale * inv).tanh() * c;
                }
                1.0
            }
            None => scale,
        };
        softmax_scaled_sink(p, softmax_scale, sinks.map(|s| s[h]));
    }
    // Slot `s` (lane `s % 16` of accumulator `s / 16`) sums `p_j·v_j` over the positions
    // `j ≡ s (mod slots)` in order, as ggml's lanes do; each slot is summed in registers, and
    // a lane's slots are combined as ggml combines its accumulators (`(a0 + a2) + (a1 + a3)`)
    // as soon as they are summed, so only a row's 16 lanes are stored, not its `slots`
    // accumulators (a quarter of the stores, and of the buffer, for one-token decode). The
    // lane loop is outside the row loop, so that a lane's stripes of values are loaded once
    // for all the rows while they are in the cache.
    let groups = if queries == 1 { 4 } else { 1 };
    let mut lanes = vec![0f32; rows.len() * LANES * d];
    for l in 0..LANES {
        for ((&(t, _), p), ln) in rows.iter().zip(&ps).zip(lanes.chunks_exact_mut(LANES * d)) {
            let p = &p[..pos(t) + 1];
            let lane = &mut ln[l * d..][..d];
            match d {
                64 => pv_lane::<64, R>(p, v, l, groups, lane),
                128 => pv_lane::<128, R>(p, v, l, groups, lane),
                _ => {
                    let slot = |s: usize| {
                        let mut a = vec![0f32; d];
                        for (j, &pj) in p.iter().enumerate().skip(s).step_by(groups * LANES) {
                            for (a, &x) in a.iter_mut().zip(v.row(j, d)) {
                                *a = pj.mul_add(x, *a);
                            }
                        }
                        a
                    };
                    if groups == 4 {
                        let a = [0, 1, 2, 3].map(|g| slot(g * LANES + l));
                        for c in 0..d {
                            lane[c] = (a[0][c] + a[2][c]) + (a[1][c] + a[3][c]);
                        }
                    } else {
                        lane.copy_from_slice(&slot(l));
                    }
                }
            }
        }
    }
    for (&(t, h), ln) in rows.iter().zip(lanes.chunks_exact(LANES * d)) {
        // The lanes reduced as ggml's `reduce_add16` does, every output dimension at once.
        let ln = |l: usize| &ln[l * d..][..d];
        // SAFETY: row `(t, h)` belongs to this block (the caller's guarantee).
        let o = unsafe { std::slice::from_raw_parts_mut(out.add((t * heads + h) * d), d) };
        for (c, oc) in o.iter_mut().enumerate() {
            let h = |i: usize| ln(i)[c] + ln(i + 8)[c];
            let q = [h(0) + h(4), h(1) + h(5), h(2) + h(6), h(3) + h(7)];
            *oc = (q[0] + q[2]) + (q[1] + q[3]);
        }
    }
}

/// Lane `l` of one row's `p_j·v_j` sums into `lane` (`[D]`): with `groups = 4` (one query,
/// ggml's 4 accumulators of 16 lanes) `(a0 + a2) + (a1 + a3)` of the slots
/// `a_g` = [`pv_slot`] at `s = 16g + l` of 64; with `groups = 1` the slot `l` of 16.
#[inline(always)]
fn pv_lane<const D: usize, R: KvRows>(p: &[f32], v: R, l: usize, groups: usize, lane: &mut [f32]) {
    let slots = groups * LANES;
    if groups != 4 {
        return pv_slot::<D, R>(p, v, l, slots, lane);
    }
    let (mut a, mut b) = ([0f32; D], [0f32; D]);
    pv_slot::<D, R>(p, v, l, slots, &mut a);
    pv_slot::<D, R>(p, v, 2 * LANES + l, slots, &mut b);
    for c in 0..D {
        lane[c] = a[c] + b[c];
    }
    pv_slot::<D, R>(p, v, LANES + l, slots, &mut a);
    pv_slot::<D, R>(p, v, 3 * LANES + l, slots, &mut b);
    for c in 0..D {
        lane[c] += a[c] + b[c];
    }
}

/// `a[c] = Σ p_j·v_j[c]` over the positions `j = s, s + slots, ...` of `p`, in order (one
/// fused multiply-add each), with the `D` accumulators in registers; `v_j` is row `j` of `v`.
#[inline(always)]
fn pv_slot<const D: usize, R: KvRows>(p: &[f32], v: R, s: usize, slots: usize, a: &mut [f32]) {
    let mut r = [0f32; D];
    for (j, &pj) in p.iter().enumerate().skip(s).step_by(slots) {
        let x: &[f32; D] = v.row(j, D).try_into().expect("D values");
        for c in 0..D {
            r[c] = pj.mul_add(x[c], r[c]);
        }
    }
    a.copy_from_slice(&r);
}

/// Shapes of one [`attention_paged`] call.
#[derive(Debug, Clone, Copy)]
pub struct PagedShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (query head `h` reads kv head `h / (heads / kv_heads)`).
    pub kv_heads: usize,
    /// Query positions (the last `queries` of the `kv_len` cached positions).
    pub queries: usize,
    /// Cached positions, the new ones included.
    pub kv_len: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Positions per block (at least 1).
    pub block: usize,
}

impl PagedShape {
    /// The shape of these keys and values gathered contiguously (`[kv_heads, kv_len,
    /// head_dim]`, heads `kv_len · head_dim` apart): the one the row kernel takes.
    fn gathered(&self) -> AttentionShape {
        AttentionShape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            queries: self.queries,
            kv_len: self.kv_len,
            head_dim: self.head_dim,
            kv_head_stride: self.kv_len * self.head_dim,
        }
    }
}

/// The panics of [`attention_paged`] and [`attention_paged_f16`]: `q` and `out` (their
/// lengths) shorter than `[heads, queries, head_dim]`, fewer than `ceil(kv_len / block)` blocks
/// of `k` or `v` or one shorter than `kv_heads · block · head_dim`, `sinks` shorter than
/// `heads`, `heads` not a multiple of `kv_heads`, more queries than positions.
fn check_paged_shape<T>(
    q_len: usize,
    k: &[&[T]],
    v: &[&[T]],
    shape: &PagedShape,
    sinks: Option<&[f32]>,
    out_len: usize,
) {
    let &PagedShape {
        heads,
        kv_heads,
        queries,
        kv_len,
        head_dim: d,
        block,
    } = shape;
    assert!(kv_heads > 0 && heads % kv_heads == 0 && kv_len >= queries && block > 0);
    assert!(q_len >= heads * queries * d && out_len >= heads * queries * d);
    let blocks = kv_len.div_ceil(block);
    assert!(k.len() >= blocks && v.len() >= blocks);
    let need = kv_heads * block * d;
    assert!(k[..blocks]
        .iter()
        .chain(&v[..blocks])
        .all(|b| b.len() >= need));
    assert!(sinks.is_none_or(|s| s.len() >= heads));
}

/// [`attention`] over keys and values held in blocks (vLLM's PagedAttention, Kwon et al.
/// 2023): `k[b]`, `v[b]` are block `b` of a block table, each `[kv_heads, block, head_dim]`
/// f32 holding positions `b·block..(b + 1)·block` (only the first `kv_len` positions overall
/// are read), walked in place without a gathered copy; `q` and `out` as in [`attention`].
///
/// Each output row is computed with the operations of [`attention`]'s row kernel in the same
/// order (the scores [`dot_vec`] per key, [`softmax_scaled_sink`] over the row, then `p_j·v_j`
/// into the slot `j mod 64` for one query or `j mod 16` for several, in position order,
/// combined as ggml's lanes are), so the result equals [`attention`]'s on the same keys and
/// values laid out contiguously bit for bit, wherever [`attention`] runs its row kernel: fewer
/// than 16 queries (one-token decode), and more with the transposed-key tiles that keep its
/// order; not the tiled online-softmax kernel of long prefills. Rows run in parallel on the
/// rayon pool.
///
/// # Panics
/// If a block is shorter than `kv_heads · block · head_dim`, there are fewer than
/// `ceil(kv_len / block)` blocks, `q` or `out` are shorter than their shapes, `sinks` shorter
/// than `heads`, or `heads` is not a multiple of `kv_heads` (internal callers check shapes
/// first).
#[allow(clippy::too_many_arguments)] // the operands and ggml's four attention parameters
pub fn attention_paged(
    q: &[f32],
    k: &[&[f32]],
    v: &[&[f32]],
    shape: PagedShape,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    check_paged_shape(q.len(), k, v, &shape, sinks, out.len());
    let flat = shape.gathered();
    let out_ptr = SyncMutPtr(out.as_mut_ptr());
    for_each_item(&flat, |kh, ts| {
        let (kr, vr) = (paged_rows(k, &shape, kh), paged_rows(v, &shape, kh));
        // SAFETY: the operands hold their shapes (asserted above) and the items' rows are
        // pairwise disjoint.
        unsafe {
            row_block(
                q,
                &kr[..],
                None,
                &vr[..],
                &flat,
                scale,
                softcap,
                window,
                sinks,
                kh,
                ts,
                out_ptr.get(),
            )
        }
    })
}

/// [`attention_paged`] over blocks of f16 keys and values (an f16 KV block pool,
/// [`crate::kv_pool::KvBlockPool::new_f16`]): each work item widens its kv head's rows of the
/// blocks into a thread's f32 scratch ([`widen_f16`], exact), as [`attention_f16`] widens a
/// contiguous f16 cache, and runs the same row kernel, so the result equals [`attention_paged`]
/// on the widened blocks, and [`attention_f16`] on the same positions, bit for bit.
///
/// # Panics
/// As [`attention_paged`].
#[allow(clippy::too_many_arguments)] // the operands and ggml's four attention parameters
pub fn attention_paged_f16(
    q: &[f32],
    k: &[&[half::f16]],
    v: &[&[half::f16]],
    shape: PagedShape,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    check_paged_shape(q.len(), k, v, &shape, sinks, out.len());
    let PagedShape {
        kv_len,
        head_dim: d,
        block,
        ..
    } = shape;
    let blocks = kv_len.div_ceil(block);
    thread_local! {
        /// One kv head's keys and values widened to f32, `[kv_len, head_dim]` each.
        static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = const {
            std::cell::RefCell::new([Vec::new(), Vec::new()])
        };
    }
    let flat = shape.gathered();
    let out_ptr = SyncMutPtr(out.as_mut_ptr());
    for_each_item(&flat, |kh, ts| {
        SCRATCH.with(|cell| {
            let mut bufs = cell.borrow_mut();
            let [kf, vf] = &mut *bufs;
            kf.resize(kv_len * d, 0.0);
            vf.resize(kv_len * d, 0.0);
            for b in 0..blocks {
                let take = block.min(kv_len - b * block);
                let src = kh * block * d..(kh * block + take) * d;
                let dst = b * block * d..(b * block + take) * d;
                widen_f16(&k[b][src.clone()], &mut kf[dst.clone()]);
                widen_f16(&v[b][src], &mut vf[dst]);
            }
            // SAFETY: the operands hold their shapes (asserted above), `kf`, `vf` kv head
            // `kh`'s `kv_len` rows, and the items' rows are pairwise disjoint.
            unsafe {
                row_block(
                    q,
                    &kf[..],
                    None,
                    &vf[..],
                    &flat,
                    scale,
                    softcap,
                    window,
                    sinks,
                    kh,
                    ts,
                    out_ptr.get(),
                )
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in `[-1, 1)`.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// ggml's attention for one row, written plainly (the order [`attention_block`] must keep):
    /// `dot_vec` scores, the softmax over the whole row, `p_j·v_j` into lane `j % slots`.
    #[allow(clippy::too_many_arguments)]
    fn reference_row(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: &AttentionShape,
        scale: f32,
        softcap: Option<f32>,
        window: Option<usize>,
        sinks: Option<&[f32]>,
        idx: usize,
    ) -> Vec<f32> {
        let AttentionShape {
            heads,
            kv_heads,
            queries,
            kv_len,
            head_dim: d,
            kv_head_stride: hs,
        } = *shape;
        let (t, h) = (idx / heads, idx % heads);
        let kh = h / (heads / kv_heads);
        let qv = &q[(h * queries + t) * d..][..d];
        let pos = kv_len - queries + t;
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let mut p = vec![f32::NEG_INFINITY; kv_len];
        for j in first..=pos {
            p[j] = dot_vec(qv, &k[kh * hs + j * d..][..d]);
        }
        let mut sm = scale;
        if let Some(c) = softcap {
            for pj in &mut p[first..=pos] {
                *pj = (*pj * scale * (1.0 / c)).tanh() * c;
            }
            sm = 1.0;
        }
        let mut max = f32::NEG_INFINITY;
        for x in p.iter_mut() {
            *x *= sm;
            max = max.max(*x);
        }
        let sink = sinks.map(|s| s[h]);
        if let Some(sk) = sink {
            max = max.max(sk);
        }
        let mut sum = 0f64;
        for c in p.chunks_mut(LANES) {
            let mut e = [0f32; LANES];
            for (ei, x) in e.iter_mut().zip(c.iter_mut()) {
                *x = expf(*x - max);
                *ei = *x;
            }
            sum += reduce_add16(&e) as f64;
        }
        if let Some(sk) = sink {
            sum += expf(sk - max) as f64;
        }
        let inv = (1.0 / sum) as f32;
        p.iter_mut().for_each(|x| *x *= inv);
        let groups = if queries == 1 { 4 } else { 1 };
        let mut acc = vec![0f32; groups * LANES * d];
        for j in 0..=pos {
            for c in 0..d {
                let a = &mut acc[(j % (groups * LANES)) * d + c];
                *a = p[j].mul_add(v[kh * hs + j * d + c], *a);
            }
        }
        (0..d)
            .map(|c| {
                let mut lanes = [0f32; LANES];
                for (l, x) in lanes.iter_mut().enumerate() {
                    let at = |g: usize| acc[(g * LANES + l) * d + c];
                    *x = if groups == 4 {
                        (at(0) + at(2)) + (at(1) + at(3))
                    } else {
                        at(0)
                    };
                }
                reduce_add16(&lanes)
            })
            .collect()
    }

    #[test]
    fn attention_keeps_ggml_order_bit_for_bit() {
        // Head dims with and without a tail after the 64-value steps, a window, a soft-cap,
        // grouped-query heads, a cache deeper than the queries and not a multiple of 16.
        // Attention sinks (gpt-oss) on some, one of them large enough to dominate.
        let sinks = [0.5f32, -1.0, 3.0, 40.0];
        for (d, window, softcap, queries, sinks) in [
            (64, None, None, 20, None),
            (80, Some(7), None, 20, None),
            (128, None, Some(30.0), 20, None),
            (40, None, None, 20, None),
            (64, None, None, 1, None),
            (128, Some(9), None, 1, None),
            (80, None, None, 1, None),
            (64, Some(7), None, 20, Some(&sinks[..])),
            (64, None, None, 1, Some(&sinks[..])),
        ] {
            let (heads, kv_heads, kv_len) = (4, 2, 37);
            let hs = kv_len * d + 3;
            let q = values(heads * queries * d, 1);
            let k = values(kv_heads * hs, 2);
            let v = values(kv_heads * hs, 3);
            let shape = AttentionShape {
                heads,
                kv_heads,
                queries,
                kv_len,
                head_dim: d,
                kv_head_stride: hs,
            };
            let mut got = vec![0f32; heads * queries * d];
            attention(&q, &k, &v, shape, 0.125, softcap, window, sinks, &mut got);
            for (idx, got) in got.chunks(d).enumerate() {
                let want = reference_row(&q, &k, &v, &shape, 0.125, softcap, window, sinks, idx);
                assert_eq!(got, want, "d={d} queries={queries} row {idx}");
            }
        }
    }

    /// The paged kernel over a block table equals the contiguous kernel on the same keys and
    /// values bit for bit, and its f16 twin the paged kernel on the widened f16 blocks:
    /// lengths on both sides of block edges, blocks of 16 and 5
    /// positions, grouped-query heads, head dims with and without the register paths, a
    /// window, a soft-cap, sinks, one query (decode) and a few.
    #[test]
    fn paged_attention_equals_contiguous_attention_bit_for_bit() {
        let sinks = [0.5f32, -1.0, 3.0, 40.0, 0.0, 1.0, 2.0, -2.0];
        let mut cases = 0;
        for (heads, kv_heads, d, window, softcap, sinks) in [
            (4, 2, 64, None, None, None),
            (8, 2, 128, Some(20), None, None),
            (4, 4, 16, None, Some(30.0), None),
            (8, 1, 40, None, None, Some(&sinks[..])),
            (4, 2, 64, Some(7), Some(20.0), Some(&sinks[..])),
        ] {
            for block in [16, 5] {
                for kv_len in [1usize, 15, 16, 17, 31, 32, 33, 64, 100] {
                    for queries in [1, 3] {
                        if queries > kv_len {
                            continue;
                        }
                        let blocks = kv_len.div_ceil(block);
                        let q = values(heads * queries * d, 1 + kv_len as u32);
                        // Blocks `[kv_heads, block, d]`, filled past `kv_len` with values that
                        // must not be read.
                        let kb: Vec<Vec<f32>> = (0..blocks)
                            .map(|b| values(kv_heads * block * d, 100 + b as u32))
                            .collect();
                        let vb: Vec<Vec<f32>> = (0..blocks)
                            .map(|b| values(kv_heads * block * d, 900 + b as u32))
                            .collect();
                        // The same positions laid out `[kv_heads, kv_len, d]`.
                        let gather = |bl: &[Vec<f32>]| {
                            let mut out = vec![0f32; kv_heads * kv_len * d];
                            for h in 0..kv_heads {
                                for j in 0..kv_len {
                                    let src = &bl[j / block][(h * block + j % block) * d..][..d];
                                    out[(h * kv_len + j) * d..][..d].copy_from_slice(src);
                                }
                            }
                            out
                        };
                        let (k, v) = (gather(&kb), gather(&vb));
                        let shape = AttentionShape {
                            heads,
                            kv_heads,
                            queries,
                            kv_len,
                            head_dim: d,
                            kv_head_stride: kv_len * d,
                        };
                        let mut want = vec![0f32; heads * queries * d];
                        attention(&q, &k, &v, shape, 0.125, softcap, window, sinks, &mut want);
                        let paged = PagedShape {
                            heads,
                            kv_heads,
                            queries,
                            kv_len,
                            head_dim: d,
                            block,
                        };
                        let kr: Vec<&[f32]> = kb.iter().map(Vec::as_slice).collect();
                        let vr: Vec<&[f32]> = vb.iter().map(Vec::as_slice).collect();
                        let mut got = vec![f32::NAN; heads * queries * d];
                        attention_paged(
                            &q, &kr, &vr, paged, 0.125, softcap, window, sinks, &mut got,
                        );
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "heads {heads}/{kv_heads} d {d} block {block} kv_len {kv_len} \
                             queries {queries}"
                        );
                        // f16 blocks: the f32 kernel on their widened values, bit for bit.
                        let half = |bl: &[Vec<f32>]| -> Vec<Vec<half::f16>> {
                            bl.iter()
                                .map(|b| b.iter().map(|&x| half::f16::from_f32(x)).collect())
                                .collect()
                        };
                        let wide = |bl: &[Vec<half::f16>]| -> Vec<Vec<f32>> {
                            bl.iter()
                                .map(|b| b.iter().map(|x| x.to_f32()).collect())
                                .collect()
                        };
                        let (kh, vh) = (half(&kb), half(&vb));
                        let (kw, vw) = (wide(&kh), wide(&vh));
                        let kw: Vec<&[f32]> = kw.iter().map(Vec::as_slice).collect();
                        let vw: Vec<&[f32]> = vw.iter().map(Vec::as_slice).collect();
                        let mut want16 = vec![f32::NAN; heads * queries * d];
                        attention_paged(
                            &q,
                            &kw,
                            &vw,
                            paged,
                            0.125,
                            softcap,
                            window,
                            sinks,
                            &mut want16,
                        );
                        let kh: Vec<&[half::f16]> = kh.iter().map(Vec::as_slice).collect();
                        let vh: Vec<&[half::f16]> = vh.iter().map(Vec::as_slice).collect();
                        let mut got16 = vec![f32::NAN; heads * queries * d];
                        attention_paged_f16(
                            &q, &kh, &vh, paged, 0.125, softcap, window, sinks, &mut got16,
                        );
                        assert_eq!(bits(&got16), bits(&want16), "f16 blocks");
                        cases += 1;
                    }
                }
            }
        }
        assert!(cases > 150);
    }

    /// A test case of `attention`: `(heads, kv_heads, head_dim, queries or earlier positions,
    /// earlier positions or extra head stride, window, softcap, sinks)` (see each test).
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        Option<usize>,
        Option<f32>,
        bool,
    );

    /// Operands for `attention` tests: `q: [heads, queries, d]`, `k`, `v` with heads `hs`
    /// apart, and the shape (`past` earlier positions, `extra` values between kv heads).
    #[allow(clippy::type_complexity)]
    fn operands(
        (heads, kv_heads, d, queries, past, extra): (usize, usize, usize, usize, usize, usize),
        seed: u32,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, AttentionShape) {
        let kv_len = queries + past;
        let hs = kv_len * d + extra;
        let shape = AttentionShape {
            heads,
            kv_heads,
            queries,
            kv_len,
            head_dim: d,
            kv_head_stride: hs,
        };
        let q = values(heads * queries * d, 3 * seed + 1)
            .iter()
            .map(|x| 2.0 * x)
            .collect();
        let k = values(kv_heads * hs, 3 * seed + 2)
            .iter()
            .map(|x| 2.0 * x)
            .collect();
        (q, k, values(kv_heads * hs, 3 * seed + 3), shape)
    }

    /// The AVX-512 tiles of the row kernel (`attn_exact`, 4 rows per key and value load) keep
    /// ggml's order bit for bit, on query counts from 2 to 70 (16 and more take the tiles),
    /// key counts that are not multiples of 16, head dims with and without a tail after the
    /// 64-value steps, grouped-query ratios 1, 4 and 8, caches with earlier positions, windows,
    /// soft-capping and sinks.
    #[test]
    fn exact_tiles_keep_ggml_order_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if !crate::kernels::attn_exact::applies(64, 2) {
            eprintln!("SKIPPED exact_tiles_keep_ggml_order_bit_for_bit: no AVX-512F here");
            return;
        }
        let sinks = [0.5f32, -1.0, 3.0, 40.0, -0.25, 2.0, 0.0, 1.0];
        // (heads, kv_heads, d, past, extra, window, softcap, sinks)
        let configs: [Case; 6] = [
            (4, 4, 64, 0, 0, None, None, false),
            (8, 2, 64, 19, 16, None, None, false),
            (8, 1, 128, 37, 0, Some(13), None, true),
            (4, 1, 80, 5, 3, None, Some(3.0), false),
            (4, 2, 16, 3, 0, Some(40), None, true),
            (8, 2, 128, 100, 0, None, None, true),
        ];
        for queries in [2, 5, 15, 16, 17, 31, 33, 64, 70] {
            for (ci, &(heads, kv_heads, d, past, extra, window, softcap, with_sinks)) in
                configs.iter().enumerate()
            {
                let (q, k, v, shape) = operands(
                    (heads, kv_heads, d, queries, past, extra),
                    queries as u32 + 7 * ci as u32,
                );
                let sinks = with_sinks.then_some(&sinks[..heads]);
                let scale = 1.0 / (d as f32).sqrt();
                let mut got = vec![0f32; heads * queries * d];
                attention(&q, &k, &v, shape, scale, softcap, window, sinks, &mut got);
                for (idx, got) in got.chunks(d).enumerate() {
                    let want =
                        reference_row(&q, &k, &v, &shape, scale, softcap, window, sinks, idx);
                    assert_eq!(got, want, "config {ci} queries={queries} row {idx}");
                }
            }
        }
    }

    /// Rounds to f16 (what an f16 KV cache holds).
    fn to_f16(x: &[f32]) -> Vec<half::f16> {
        x.iter().map(|&v| half::f16::from_f32(v)).collect()
    }

    /// The f16 values as f32 (exact).
    fn widened(x: &[half::f16]) -> Vec<f32> {
        x.iter().map(|v| v.to_f32()).collect()
    }

    /// The f16 cache's attention ([`attention_f16`]: decode rows on a per-thread widened kv
    /// head, prefills on keys widened in their transposition) equals the f32 attention over
    /// the f16-rounded keys and values bit for bit (tolerance 0), and its rows equal the
    /// plain scalar reference row ([`reference_row`]) where the row kernel runs: one to 70
    /// queries, grouped-query ratios 1 to 8, head dims 16 to 128, strided heads, windows,
    /// soft-capping and sinks; and with 64 queries over 1,024+ positions the tiled kernel.
    #[test]
    fn f16_cache_attention_equals_f32_attention_on_rounded_cache() {
        let sinks = [0.5f32, -1.0, 3.0, 40.0, -0.25, 2.0, 0.0, 1.0];
        // (heads, kv_heads, d, past, extra, window, softcap, sinks)
        let configs: [Case; 7] = [
            (4, 4, 64, 0, 0, None, None, false),
            (8, 2, 64, 19, 16, None, None, false),
            (8, 1, 128, 37, 0, Some(13), None, true),
            (4, 1, 80, 5, 3, None, Some(3.0), false),
            (4, 2, 16, 3, 0, Some(40), None, true),
            (8, 2, 128, 100, 0, None, None, true),
            (8, 8, 64, 300, 8, None, None, false),
        ];
        for queries in [1, 2, 5, 15, 16, 17, 64, 70] {
            for (ci, &(heads, kv_heads, d, past, extra, window, softcap, with_sinks)) in
                configs.iter().enumerate()
            {
                let (q, k, v, shape) = operands(
                    (heads, kv_heads, d, queries, past, extra),
                    queries as u32 + 11 * ci as u32,
                );
                let (k16, v16) = (to_f16(&k), to_f16(&v));
                let (kr, vr) = (widened(&k16), widened(&v16));
                let sinks = with_sinks.then_some(&sinks[..heads]);
                let scale = 1.0 / (d as f32).sqrt();
                let n = heads * queries * d;
                let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
                attention_f16(
                    &q, &k16, &v16, shape, scale, softcap, window, sinks, &mut got,
                );
                attention(
                    &q, &kr, &vr, shape, scale, softcap, window, sinks, &mut want,
                );
                assert_eq!(got, want, "config {ci} queries={queries}");
                for (idx, row) in got.chunks(d).enumerate() {
                    let r = reference_row(&q, &kr, &vr, &shape, scale, softcap, window, sinks, idx);
                    assert_eq!(row, r, "config {ci} queries={queries} row {idx}: scalar");
                }
            }
        }
        // Long prefills: the tiled kernel (where the CPU has AVX-512), on keys widened in
        // their transposition.
        for (ci, &(heads, kv_heads, d, past, window)) in
            [(8, 2, 64, 1000, None), (4, 1, 128, 1100, Some(700))]
                .iter()
                .enumerate()
        {
            let queries = 64;
            let (q, k, v, shape) = operands((heads, kv_heads, d, queries, past, 16), 5 + ci as u32);
            let (k16, v16) = (to_f16(&k), to_f16(&v));
            let (kr, vr) = (widened(&k16), widened(&v16));
            let scale = 1.0 / (d as f32).sqrt();
            let n = heads * queries * d;
            let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
            attention_f16(&q, &k16, &v16, shape, scale, None, window, None, &mut got);
            attention(&q, &kr, &vr, shape, scale, None, window, None, &mut want);
            assert_eq!(got, want, "long prefill {ci}");
        }
    }

    /// Every path of [`widen_f16`] (AVX-512F, F16C where the CPU has them) gives the scalar
    /// `half` conversion's bits on all 65,536 f16 values (NaNs: a NaN), at lengths that leave
    /// tails of every size.
    #[test]
    fn widen_f16_simd_paths_equal_scalar() {
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let same = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
        };
        for len in [all.len(), 1, 7, 8, 15, 16, 17, 33, 1000] {
            let src = &all[all.len() - len..];
            let mut want = vec![0f32; len];
            widen_f16_scalar(src, &mut want);
            let mut got = vec![0f32; len];
            widen_f16(src, &mut got);
            assert!(same(&got, &want), "dispatch, len {len}");
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    let mut g = vec![0f32; len];
                    // SAFETY: the CPU has AVX-512F; the lengths agree.
                    unsafe { widen_f16_avx512(src, &mut g) };
                    assert!(same(&g, &want), "AVX-512, len {len}");
                } else {
                    eprintln!("widen_f16: no AVX-512F here, its path untested");
                }
                if std::arch::is_x86_feature_detected!("f16c") {
                    let mut g = vec![0f32; len];
                    // SAFETY: the CPU has F16C (and so AVX); the lengths agree.
                    unsafe { widen_f16_f16c(src, &mut g) };
                    assert!(same(&g, &want), "F16C, len {len}");
                }
            }
        }
    }

    /// Softmax attention computed plainly in `f64`: `[queries, heads, d]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_f64(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: &AttentionShape,
        scale: f32,
        softcap: Option<f32>,
        window: Option<usize>,
        sinks: Option<&[f32]>,
    ) -> Vec<f32> {
        let &AttentionShape {
            heads,
            kv_heads,
            queries,
            kv_len,
            head_dim: d,
            kv_head_stride: hs,
        } = shape;
        let mut out = vec![0f32; queries * heads * d];
        for t in 0..queries {
            let pos = kv_len - queries + t;
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            for h in 0..heads {
                let kh = h / (heads / kv_heads);
                let qv = &q[(h * queries + t) * d..][..d];
                let s: Vec<f64> = (first..=pos)
                    .map(|j| {
                        let kj = &k[kh * hs + j * d..][..d];
                        let x = qv
                            .iter()
                            .zip(kj)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale as f64;
                        softcap.map_or(x, |c| (x / c as f64).tanh() * c as f64)
                    })
                    .collect();
                let sink = sinks.map(|s| s[h] as f64);
                let m = s
                    .iter()
                    .copied()
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().chain(sink.as_ref()).map(|x| (x - m).exp()).sum();
                for c in 0..d {
                    let o: f64 = (first..=pos)
                        .zip(&s)
                        .map(|(j, x)| (x - m).exp() * v[kh * hs + j * d + c] as f64)
                        .sum();
                    out[(t * heads + h) * d + c] = (o / z) as f32;
                }
            }
        }
        out
    }

    /// Both fast kernels (the exact-order tiles below 1,024 keys, the online-softmax tiles
    /// from there on) against attention in `f64`, within `2e-5` absolute (queries and keys in
    /// `[-2, 2)`, values in `[-1, 1)`, so outputs within 1): query counts 1 to 70, keys not a
    /// multiple of the tiles, head dims 64, 80 and 128, grouped-query ratios 1, 4 and 8,
    /// earlier positions, windows, soft-capping (row kernel only) and sinks.
    #[test]
    fn attention_matches_f64_softmax_attention() {
        let sinks = [0.5f32, -1.0, 3.0, 40.0, -0.25, 2.0, 0.0, 1.0];
        // (heads, kv_heads, d, queries, past, window, softcap, sinks)
        let cases: [Case; 10] = [
            (8, 2, 64, 1, 40, None, None, false),
            (8, 8, 64, 17, 0, None, None, false),
            (8, 1, 80, 33, 9, Some(20), None, true),
            (4, 1, 128, 70, 3, None, Some(5.0), false),
            (8, 2, 128, 64, 500, None, None, true),
            // The tiled kernel: 64+ queries over 1,024+ keys.
            (8, 2, 64, 64, 1000, None, None, false),
            (8, 1, 64, 70, 1001, Some(300), None, true),
            (4, 4, 128, 65, 1037, None, None, false),
            (8, 2, 80, 67, 990, None, None, false),
            (8, 2, 64, 70, 1100, Some(1090), None, false),
        ];
        for (ci, &(heads, kv_heads, d, queries, past, window, softcap, with_sinks)) in
            cases.iter().enumerate()
        {
            let (q, k, v, shape) =
                operands((heads, kv_heads, d, queries, past, 0), 100 + ci as u32);
            let sinks = with_sinks.then_some(&sinks[..heads]);
            let scale = 1.0 / (d as f32).sqrt();
            let mut got = vec![0f32; heads * queries * d];
            attention(&q, &k, &v, shape, scale, softcap, window, sinks, &mut got);
            let want = attention_f64(&q, &k, &v, &shape, scale, softcap, window, sinks);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 2e-5, "case {ci}: max difference {worst}");
        }
    }

    #[test]
    fn expf_is_within_two_ulp_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (expf(x), x.exp());
            let ulp = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}): {a} vs {b}");
            x += 0.01237;
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        // Subnormal results round once.
        assert!((expf(-100.0) - (-100f32).exp()).abs() <= f32::from_bits(2));
    }

    #[test]
    fn reductions_sum_correctly() {
        let a: Vec<f32> = (0..100).map(|i| i as f32 * 0.5 - 7.0).collect();
        let b: Vec<f32> = (0..100).map(|i| (i % 7) as f32 - 3.0).collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
        assert!((dot_tinyblas(&a, &b) as f64 - exact).abs() < 1e-3);
        assert!((dot_vec(&a, &b) as f64 - exact).abs() < 1e-3);
        let mut v = [0f32; 16];
        v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
        assert_eq!(reduce_add16(&v), 120.0);
    }

    #[test]
    fn geglu_follows_the_formula_to_f16_precision() {
        let gate: Vec<f32> = (0..4000).map(|i| i as f32 * 0.007 - 12.0).collect();
        let up: Vec<f32> = (0..4000).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
        let mut y = vec![0f32; gate.len()];
        geglu(&gate, &up, &mut y);
        for ((&g, &u), &v) in gate.iter().zip(&up).zip(&y) {
            let x = g as f64;
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let want = 0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh()) * u as f64;
            // f16 rounding of the input and of the table entry.
            let tol = 2e-3 * want.abs() + 1e-4;
            assert!(
                (v as f64 - want).abs() <= tol,
                "geglu({g}, {u}) = {v}, want {want}"
            );
        }
        // The clamps: 0 below -10, identity from 10 on.
        assert_eq!(y[0], 0.0);
        assert_eq!(y[3999], gate[3999] * up[3999]);
    }

    #[test]
    fn softmax_sums_to_one_and_masks() {
        let mut x = vec![1.0, 2.0, f32::NEG_INFINITY, 3.0, 0.5];
        softmax_scaled(&mut x, 0.5);
        assert_eq!(x[2], 0.0);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[3] > x[1] && x[1] > x[0]);
        let mut m = vec![f32::NEG_INFINITY; 3];
        softmax_scaled(&mut m, 1.0);
        assert_eq!(m, vec![0.0; 3]);
    }

    #[test]
    fn rms_norm_and_rope_match_their_formulas() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 2.0, 0.5, 1.0];
        let mut y = [0f32; 4];
        rms_norm(&x, &w, 1e-5, &mut y);
        let r = (x.iter().map(|v| v * v).sum::<f32>() / 4.0 + 1e-5).sqrt();
        for i in 0..4 {
            assert!((y[i] - x[i] / r * w[i]).abs() < 1e-6);
        }
        let cs = rope_cos_sin(3, 4, 10000.0, 1.0, None);
        assert!((cs[0].0 - 3f32.cos()).abs() < 1e-6);
        assert!((cs[1].1 - (3.0 / 100f32).sin()).abs() < 1e-6);
        let mut v = [1.0f32, 0.0, 0.0, 1.0];
        rope_apply(&mut v, &cs, true);
        assert!((v[0] - 3f32.cos()).abs() < 1e-6 && (v[1] - 3f32.sin()).abs() < 1e-6);
    }
}
