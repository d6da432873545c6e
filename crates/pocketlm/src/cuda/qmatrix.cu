// Block-quantized matrices on NVIDIA GPUs in one layout for GGUF Q4_0 / Q4_1 / Q8_0 and MLX
// affine 4- and 8-bit weights (see src/cuda/qmatrix.rs), and the kernels of the fused Llama decode
// step (src/cuda/decoder.rs). Built by build.rs with nvcc into PTX when the `cuda` feature is on.
//
// Weight layout, per row of `cols` values, in blocks of 32 values:
//   codes  [rows, cols/32, 16 B] at 4 bits: byte j of a block holds value j (low nibble) and value
//          j + 16 (high nibble), ggml's Q4_0 order; [rows, cols/32, 32 B] at 8 bits, value j in
//          byte j (signed for Q8_0, unsigned for MLX).
//   scales [rows, cols/group] in S (f16, bf16 or f32); biases the same, when the format has them.
//   w = scale * q + bias (MLX, Q4_1); w = scale * (q - 8) (Q4_0); w = scale * q (Q8_0).
// Activations are quantized to 8 bits per 32 values as ggml does on the CPU (q8_1: d = amax/127,
// codes rounded to nearest even, d and d*sum(codes) rounded to f16), so that products are integer
// dot products (dp4a) of a weight block with an activation block.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum_i(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float round_f16(float v) { return __half2float(__float2half(v)); }

// Signed x signed and unsigned x signed 4-way byte dot products.
__device__ __forceinline__ int dp4a_ss(int a, int b, int c) { return __dp4a(a, b, c); }
__device__ __forceinline__ int dp4a_us(unsigned a, int b, int c) {
  int r;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// Programmatic dependent launch (Hopper and later; CUDA programming guide, "Programmatic
// Dependent Launch and Synchronization"): the decode step launches its kernels with the PDL
// attribute, so a kernel's blocks may be scheduled while the kernel before it in the stream
// finishes. pdl_enter() first waits until that kernel has completed and its writes are visible
// (griddepcontrol.wait), so everything after it runs as if launched in order, then lets the
// next kernel start launching (griddepcontrol.launch_dependents). Every kernel the decode step
// launches calls it before it reads or writes anything another kernel of the step writes (the
// GEMVs prefetch their weights, and RMSNorm loads its weight, before it); for a kernel
// launched without the attribute both instructions do nothing.
__device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// One lane holds value `lane` of a 32-value block: writes its 8-bit code and, from lane 0, the
// block's (d, d * sum(codes)), both rounded to f16 precision (ggml's block_q8_1 on the CPU).
__device__ __forceinline__ void quant_block32(float v, int lane, int8_t *__restrict__ xq,
                                              float2 *__restrict__ xd) {
  const float amax = warp_max(fabsf(v));
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  const int q = __float2int_rn(v * id);
  const int s = warp_sum_i(q);
  xq[lane] = (int8_t)q;
  if (lane == 0) *xd = make_float2(round_f16(d), round_f16((float)s * d));
}

// x [m, cols] f32 -> codes [m, cols] int8 and per-block (d, d*sum) [m, cols/32]; one warp a block.
extern "C" __global__ void quantize_q8(const float *__restrict__ x, int8_t *__restrict__ xq,
                                       float2 *__restrict__ xd, int nblocks) {
  pdl_enter();
  const int b = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (b >= nblocks) return;
  quant_block32(x[(size_t)b * 32 + lane], lane, xq + (size_t)b * 32, xd + b);
}

// One 32-value weight block's codes (at q): 16 bytes for 4 bits (c1 unused), 32 for 8 bits.
template <int BITS>
__device__ __forceinline__ void block_codes(const uint8_t *__restrict__ q, uint4 &c0, uint4 &c1) {
  const uint4 *qv = reinterpret_cast<const uint4 *>(q);
  c0 = __ldg(qv);
  if (BITS == 8) c1 = __ldg(qv + 1);
}

// Integer dot product of one 32-value weight block's codes (block_codes) with an activation
// block.
template <int BITS, bool SIGNED>
__device__ __forceinline__ int codes_dot(const uint4 c0, const uint4 c1, const int4 x0,
                                         const int4 x1) {
  int isum = 0;
  if (BITS == 4) {
    isum = dp4a_ss((int)(c0.x & 0x0F0F0F0Fu), x0.x, isum);
    isum = dp4a_ss((int)(c0.y & 0x0F0F0F0Fu), x0.y, isum);
    isum = dp4a_ss((int)(c0.z & 0x0F0F0F0Fu), x0.z, isum);
    isum = dp4a_ss((int)(c0.w & 0x0F0F0F0Fu), x0.w, isum);
    isum = dp4a_ss((int)((c0.x >> 4) & 0x0F0F0F0Fu), x1.x, isum);
    isum = dp4a_ss((int)((c0.y >> 4) & 0x0F0F0F0Fu), x1.y, isum);
    isum = dp4a_ss((int)((c0.z >> 4) & 0x0F0F0F0Fu), x1.z, isum);
    isum = dp4a_ss((int)((c0.w >> 4) & 0x0F0F0F0Fu), x1.w, isum);
  } else if (SIGNED) {
    isum = dp4a_ss((int)c0.x, x0.x, isum);
    isum = dp4a_ss((int)c0.y, x0.y, isum);
    isum = dp4a_ss((int)c0.z, x0.z, isum);
    isum = dp4a_ss((int)c0.w, x0.w, isum);
    isum = dp4a_ss((int)c1.x, x1.x, isum);
    isum = dp4a_ss((int)c1.y, x1.y, isum);
    isum = dp4a_ss((int)c1.z, x1.z, isum);
    isum = dp4a_ss((int)c1.w, x1.w, isum);
  } else {
    isum = dp4a_us(c0.x, x0.x, isum);
    isum = dp4a_us(c0.y, x0.y, isum);
    isum = dp4a_us(c0.z, x0.z, isum);
    isum = dp4a_us(c0.w, x0.w, isum);
    isum = dp4a_us(c1.x, x1.x, isum);
    isum = dp4a_us(c1.y, x1.y, isum);
    isum = dp4a_us(c1.z, x1.z, isum);
    isum = dp4a_us(c1.w, x1.w, isum);
  }
  return isum;
}

// Integer dot product of one 32-value weight block (codes at q) with an activation block.
template <int BITS, bool SIGNED>
__device__ __forceinline__ int block_dot(const uint8_t *__restrict__ q, const int4 x0,
                                         const int4 x1) {
  uint4 c0, c1 = make_uint4(0u, 0u, 0u, 0u);
  block_codes<BITS>(q, c0, c1);
  return codes_dot<BITS, SIGNED>(c0, c1, x0, x1);
}

// One 32-value block's share of a row's dot product: the integer sum `isum` of the block's
// codes with the activation block (dx = its (d, d * sum(codes))), times the block's scale `s`
// (index gi), plus its bias times d * sum(codes) for the affine formats, or less 8 s d
// sum(codes) for Q4_0's offset codes.
template <int BITS, bool BIAS, typename S>
__device__ __forceinline__ float block_term(int isum, const S *__restrict__ sc,
                                            const S *__restrict__ bi, size_t gi, float2 dx) {
  const float s = to_f32(sc[gi]);
  if (BIAS) return s * dx.x * (float)isum + to_f32(bi[gi]) * dx.y;
  if (BITS == 4) return s * (dx.x * (float)isum - 8.f * dx.y);
  return s * dx.x * (float)isum;
}

// Most warps a GEMV block may have.
#define GEMV_MAX_WARPS 16

// The dot products of R weight rows rr[] with the quantized activations, split over the block's
// warps (threads stride over the 32-value blocks; each activation block is loaded once for all
// R rows), summed through shared memory; the totals are valid in thread 0.
template <int BITS, bool SIGNED, bool BIAS, typename S, int R>
__device__ __forceinline__ void rows_dot(const uint8_t *__restrict__ qs,
                                         const S *__restrict__ sc, const S *__restrict__ bi,
                                         const int8_t *__restrict__ xq,
                                         const float2 *__restrict__ xd, const int *rr, int cols,
                                         int group, float *tot) {
  __shared__ float red[GEMV_MAX_WARPS][R];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int nblocks = cols >> 5;
  const int groups = cols / group;
  const int bpg = group >> 5;
  constexpr int BB = BITS == 4 ? 16 : 32;
  float acc[R];
#pragma unroll
  for (int k = 0; k < R; k++) acc[k] = 0.f;
#pragma unroll 2
  for (int b = threadIdx.x; b < nblocks; b += blockDim.x) {
    const int4 *xv = reinterpret_cast<const int4 *>(xq + (size_t)b * 32);
    const int4 x0 = __ldg(xv), x1 = __ldg(xv + 1);
    const float2 dx = __ldg(xd + b);
    const int g = b / bpg;
#pragma unroll
    for (int k = 0; k < R; k++) {
      const size_t row = (size_t)rr[k];
      const int isum = block_dot<BITS, SIGNED>(qs + (row * nblocks + b) * BB, x0, x1);
      acc[k] += block_term<BITS, BIAS, S>(isum, sc, bi, row * groups + g, dx);
    }
  }
#pragma unroll
  for (int k = 0; k < R; k++) {
    const float v = warp_sum(acc[k]);
    if (lane == 0) red[wid][k] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < R; k++) {
      float v = 0.f;
      for (int w = 0; w < nw; w++) v += red[w][k];
      tot[k] = v;
    }
  }
}

// Asks L2 for `bytes` bytes from p, one request per 128-byte line spread over the block's
// threads (sm_90 and later; a hint, nothing elsewhere).
__device__ __forceinline__ void prefetch_l2(const void *p, size_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint8_t *b = reinterpret_cast<const uint8_t *>(p);
  for (size_t o = (size_t)threadIdx.x * 128; o < bytes; o += (size_t)blockDim.x * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(b + o));
#endif
}

// Asks L2 for the 128-byte line at p (sm_90 and later; a hint, nothing elsewhere).
__device__ __forceinline__ void prefetch_line(const void *p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// Asks L2 for the R weight rows rr[] (codes, scales, biases) of a GEMV block. The weights do not depend on the kernel
// before in the stream, so the GEMVs issue this before pdl_enter(): with programmatic dependent
// launch their blocks become resident while that kernel (RMSNorm, attention, quantization) is
// still running, and the weights stream in during it instead of after it.
template <int BITS, bool BIAS, typename S, int R>
__device__ __forceinline__ void prefetch_rows(const uint8_t *__restrict__ qs,
                                              const S *__restrict__ sc,
                                              const S *__restrict__ bi, const int *rr, int cols,
                                              int group) {
  const size_t row_bytes = (size_t)cols * BITS / 8, groups = (size_t)(cols / group);
#pragma unroll
  for (int k = 0; k < R; k++) {
    prefetch_l2(qs + (size_t)rr[k] * row_bytes, row_bytes);
    prefetch_l2(sc + (size_t)rr[k] * groups, groups * sizeof(S));
    if (BIAS) prefetch_l2(bi + (size_t)rr[k] * groups, groups * sizeof(S));
  }
}

// GELU with the tanh approximation (Hendrycks & Gimpel 2016; PyTorch's gelu(approximate="tanh")).
__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// y [m, 2n] (the gate columns, then the up columns) -> the codes [m, n] int8 and per-block
// (d, d * sum) [m, n / 32] of act(gate) * up, act SiLU or (gelu) GELU-tanh, as the gated
// epilogues of qgemv/qmmq and then quantize_q8 give; one warp a 32-value block. For the batched
// step's gated products split over the columns (whose sums cannot take the epilogue).
extern "C" __global__ void glu_q8(const float *__restrict__ y, int8_t *__restrict__ xq,
                                  float2 *__restrict__ xd, int m, int n, int gelu) {
  pdl_enter();
  const int b = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31, nb = n >> 5;
  if (b >= m * nb) return;
  const int i = b / nb, j = (b % nb) * 32 + lane;
  const float g = y[(size_t)i * 2 * n + j], u = y[(size_t)i * 2 * n + n + j];
  const float v = (gelu ? gelu_tanh(g) : g / (1.f + expf(-g))) * u;
  quant_block32(v, lane, xq + (size_t)b * 32, xd + b);
}

// y[i, r] (op)= row r . x_i for the activation row i = blockIdx.y. Block b takes R weight rows.
// EPI 0: write; 1: add to y (a residual); 2: SwiGLU, y[i, r] = silu(row r . x) * (row r+rows . x)
// (gate rows first, then up rows, stacked in one matrix of 2*rows rows; block b takes outputs
// r = b*R/2 .. +R/2, reading their gate and up rows); 3: GeGLU, the same with gelu_tanh.
template <int BITS, bool SIGNED, bool BIAS, typename S, int EPI, int R>
__device__ void qgemv(const uint8_t *__restrict__ qs, const S *__restrict__ sc,
                      const S *__restrict__ bi, const int8_t *__restrict__ xq,
                      const float2 *__restrict__ xd, float *__restrict__ y, int rows, int cols,
                      int group) {
  constexpr int H = R / 2;
  const int blk = blockIdx.x;
  constexpr bool GATED = EPI == 2 || EPI == 3;
  const int first = GATED ? blk * H : blk * R;
  if (first >= rows) return;
  int rr[R];
#pragma unroll
  for (int k = 0; k < R; k++) {
    if (GATED)
      rr[k] = k < H ? min(first + k, rows - 1) : min(first + k - H, rows - 1) + rows;
    else
      rr[k] = min(first + k, rows - 1);
  }
  if (blockIdx.y == 0) prefetch_rows<BITS, BIAS, S, R>(qs, sc, bi, rr, cols, group);
  pdl_enter();
  const int i = blockIdx.y;
  float tot[R];
  rows_dot<BITS, SIGNED, BIAS, S, R>(qs, sc, bi, xq + (size_t)i * cols,
                                     xd + (size_t)i * (cols >> 5), rr, cols, group, tot);
  if (threadIdx.x != 0) return;
  y += (size_t)i * rows;
#pragma unroll
  for (int k = 0; k < (GATED ? H : R); k++) {
    if (first + k >= rows) break;
    if (EPI == 2) {
      const float g = tot[k];
      y[first + k] = g / (1.f + expf(-g)) * tot[k + H];
    } else if (EPI == 3) {
      y[first + k] = gelu_tanh(tot[k]) * tot[k + H];
    } else if (EPI == 1) {
      y[first + k] += tot[k];
    } else {
      y[first + k] = tot[k];
    }
  }
}

// A decode step's per-sequence `params` (KV_PARAMS ints; see "The fused decode step" below) and
// the positions of a block of a paged KV cache (kv_pool::BLOCK on the Rust side).
#define KV_PARAMS 8
#define KV_BLOCK 16

// The block table of a sequence whose KV cache is paged: params[4], params[5] hold its device
// address (low, high word); null for a contiguous cache.
__device__ __forceinline__ const int *kv_table(const int *__restrict__ params) {
  const unsigned long long a =
      ((unsigned long long)(unsigned)params[5] << 32) | (unsigned long long)(unsigned)params[4];
  return reinterpret_cast<const int *>(a);
}

// The offset, in values, of position t of key/value head h in a layer's cache buffer: a
// contiguous [n_kv, cap, hd] buffer (tbl null), or the pool layer's [n_blocks, n_kv, KV_BLOCK,
// hd] blocks read through the block table tbl (vLLM's PagedAttention, Kwon et al. 2023).
__device__ __forceinline__ size_t kv_offset(const int *__restrict__ tbl, int cap, int n_kv, int h,
                                            int t, int hd) {
  if (tbl)
    return (((size_t)tbl[t / KV_BLOCK] * n_kv + h) * KV_BLOCK + (t % KV_BLOCK)) * (size_t)hd;
  return ((size_t)h * cap + t) * (size_t)hd;
}

// The decode step's q/k/v outputs are taken in pairs: pair p of the stacked q, k, v heads
// ((n_heads + 2 n_kv) hd / 2 of them) is, for a q or k head, the two rows RoPE rotates together
// ((2i, 2i+1) of the head when interleaved, else (i, i + hd/2)) and, for a v head, two
// adjacent rows (2i, 2i+1).
struct QkvPair {
  int head, i, i0, i1;
};
__device__ __forceinline__ QkvPair qkv_pair(int head, int i, int n_heads, int n_kv, int hd,
                                            int interleaved) {
  const bool rotated = head < n_heads + n_kv;
  const int half = hd >> 1;
  QkvPair p;
  p.head = head;
  p.i = i;
  p.i0 = rotated && !interleaved ? i : 2 * i;
  p.i1 = rotated && !interleaved ? i + half : 2 * i + 1;
  return p;
}

// Stores pair p's values (a, b) at position params[0]: q/k rotated by RoPE (Su et al. 2021)
// at position params[0] + params[3] (a vision-language model's text positions run behind or
// ahead of the cache's after its images: Qwen2-VL's M-RoPE delta; 0 otherwise)
// with the tables cos/sin [positions, hd/2], q into q_out [n_heads, hd], k and v into the
// layer's cache (see the decode-step notes below for params, kv; f32, or f16 when kv_half,
// rounded to nearest).
__device__ __forceinline__ void qkv_store(const QkvPair &p, float a, float b,
                                          const float *__restrict__ cos_t,
                                          const float *__restrict__ sin_t,
                                          const int *__restrict__ params,
                                          const unsigned long long *__restrict__ kv, int layer,
                                          float *__restrict__ q_out, int n_heads, int n_kv, int hd,
                                          int kv_half) {
  const int pos = params[0], cap = params[2], half = hd >> 1;
  const int *tbl = kv_table(params);
  auto put = [&](unsigned long long base, size_t at, float val) {
    if (kv_half)
      reinterpret_cast<__half *>(base)[at] = __float2half_rn(val);
    else
      reinterpret_cast<float *>(base)[at] = val;
  };
  if (p.head >= n_heads + n_kv) {
    const size_t at = kv_offset(tbl, cap, n_kv, p.head - n_heads - n_kv, pos, hd);
    put(kv[2 * layer + 1], at + p.i0, a);
    put(kv[2 * layer + 1], at + p.i1, b);
    return;
  }
  const size_t rp = (size_t)(pos + params[3]);
  const float c = cos_t[rp * half + p.i], s = sin_t[rp * half + p.i];
  const float r0 = a * c - b * s, r1 = a * s + b * c;
  if (p.head < n_heads) {
    q_out[(size_t)p.head * hd + p.i0] = r0;
    q_out[(size_t)p.head * hd + p.i1] = r1;
  } else {
    const size_t row = kv_offset(tbl, cap, n_kv, p.head - n_heads, pos, hd);
    put(kv[2 * layer], row + p.i0, r0);
    put(kv[2 * layer], row + p.i1, r1);
  }
}

// The stacked q/k/v projection of the decode step with RoPE and the KV-cache append in its
// epilogue: block b computes the two rows of pair b (see QkvPair) and stores them (qkv_store).
// `lbias` (may be null): the projection's bias [(n_heads + 2 n_kv) hd] f32 (Qwen2), added
// before the rotation.
template <int BITS, bool SIGNED, bool BIAS, typename S>
__device__ void qgemv_rope(const uint8_t *__restrict__ qs, const S *__restrict__ sc,
                           const S *__restrict__ bi, const int8_t *__restrict__ xq,
                           const float2 *__restrict__ xd, int cols, int group,
                           const float *__restrict__ cos_t, const float *__restrict__ sin_t,
                           const int *__restrict__ params, const unsigned long long *__restrict__ kv,
                           int layer, float *__restrict__ q_out, int n_heads, int n_kv, int hd,
                           int interleaved, int kv_half, const float *__restrict__ lbias) {
  const int half = hd >> 1;
  const int blk = blockIdx.x;
  if (blk >= (n_heads + 2 * n_kv) * half) return;
  const QkvPair p = qkv_pair(blk / half, blk % half, n_heads, n_kv, hd, interleaved);
  const int rr[2] = {p.head * hd + p.i0, p.head * hd + p.i1};
  prefetch_rows<BITS, BIAS, S, 2>(qs, sc, bi, rr, cols, group);
  pdl_enter();
  float tot[2];
  rows_dot<BITS, SIGNED, BIAS, S, 2>(qs, sc, bi, xq, xd, rr, cols, group, tot);
  if (threadIdx.x != 0) return;
  if (lbias) {
    tot[0] += lbias[rr[0]];
    tot[1] += lbias[rr[1]];
  }
  qkv_store(p, tot[0], tot[1], cos_t, sin_t, params, kv, layer, q_out, n_heads, n_kv, hd,
            kv_half);
}

// The decode step's q/k/v rows after a plain GEMV (y [(n_heads + 2 n_kv) hd] f32), for layers
// that normalize each query and key head before RoPE (Qwen3, Gemma 3; HF `Qwen3Attention`
// q_norm / k_norm): adds the projection's bias (`lbias`, may be null), applies RMSNorm
// (x / sqrt(mean(x^2) + eps) * w, w [hd] f32, as ggml's rms_norm then mul) to each q head with
// q_norm and each k head with k_norm (either may be null: none), then stores as qkv_store.
// Block b takes head b; thread t pair t of it (blockDim: hd / 2 rounded up to a warp, at most
// 256 threads).
extern "C" __global__ void qkv_post(const float *__restrict__ y, const float *__restrict__ lbias,
                                    const float *__restrict__ q_norm,
                                    const float *__restrict__ k_norm, float eps,
                                    const float *__restrict__ cos_t,
                                    const float *__restrict__ sin_t,
                                    const int *__restrict__ params,
                                    const unsigned long long *__restrict__ kv, int layer,
                                    float *__restrict__ q_out, int n_heads, int n_kv, int hd,
                                    int interleaved, int kv_half, int kv_stride) {
  __shared__ float red[8];
  const int head = blockIdx.x, t = threadIdx.x, half = hd >> 1;
  {  // Sequence blockIdx.y of a batch: its own q/k/v row, params, cache table and queries.
    const size_t z = blockIdx.y;
    y += z * gridDim.x * hd, params += KV_PARAMS * z, kv += z * kv_stride,
        q_out += z * n_heads * hd;
  }
  const bool on = t < half;
  const QkvPair p = qkv_pair(head, on ? t : 0, n_heads, n_kv, hd, interleaved);
  const float *w = head < n_heads ? q_norm : head < n_heads + n_kv ? k_norm : nullptr;
  pdl_enter();
  const size_t base = (size_t)head * hd;
  float a = 0.f, b = 0.f;
  if (on) {
    a = y[base + p.i0];
    b = y[base + p.i1];
    if (lbias) {
      a += lbias[base + p.i0];
      b += lbias[base + p.i1];
    }
  }
  if (w) {  // uniform across the block
    float ss = warp_sum(a * a + b * b);
    if ((t & 31) == 0) red[t >> 5] = ss;
    __syncthreads();
    ss = 0.f;
    for (int k = 0; k < (int)(blockDim.x >> 5); k++) ss += red[k];
    const float r = 1.f / sqrtf(ss / (float)hd + eps);
    a = (a * r) * (on ? w[p.i0] : 0.f);
    b = (b * r) * (on ? w[p.i1] : 0.f);
  }
  if (on) qkv_store(p, a, b, cos_t, sin_t, params, kv, layer, q_out, n_heads, n_kv, hd, kv_half);
}

// out[r, k..k+8] = (half) w[r, k..k+8]: the weight for a cuBLAS f16 GEMM (prefill); one thread
// per 8 values (one 16-byte store), so that a warp writes 512 contiguous bytes.
template <int BITS, bool SIGNED, bool BIAS, typename S>
__device__ void qdequant(const uint8_t *__restrict__ qs, const S *__restrict__ sc,
                         const S *__restrict__ bi, uint4 *__restrict__ out, int rows, int cols,
                         int group) {
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)rows * cols / 8) return;
  const size_t v = idx * 8;
  const size_t r = v / cols;
  const int k = (int)(v % cols);
  const int j = k & 31;
  const size_t blk = r * (cols >> 5) + (k >> 5);
  const size_t gi = r * (cols / group) + k / group;
  const float s = to_f32(sc[gi]);
  const float bb = BIAS ? to_f32(bi[gi]) : 0.f;
  int c[8];
  if (BITS == 4) {
    const uint2 w = *reinterpret_cast<const uint2 *>(qs + blk * 16 + (j & 15));
    const int sh = j >= 16 ? 4 : 0;
#pragma unroll
    for (int t = 0; t < 4; t++) {
      c[t] = (w.x >> (8 * t + sh)) & 15;
      c[t + 4] = (w.y >> (8 * t + sh)) & 15;
    }
  } else {
    const uint2 w = *reinterpret_cast<const uint2 *>(qs + blk * 32 + j);
#pragma unroll
    for (int t = 0; t < 4; t++) {
      const unsigned b0 = (w.x >> (8 * t)) & 255u, b1 = (w.y >> (8 * t)) & 255u;
      c[t] = SIGNED ? (int)(int8_t)b0 : (int)b0;
      c[t + 4] = SIGNED ? (int)(int8_t)b1 : (int)b1;
    }
  }
  __half h[8];
#pragma unroll
  for (int t = 0; t < 8; t++) {
    float f;
    if (BITS == 4 && !BIAS)
      f = (float)(c[t] - 8) * s;
    else if (BIAS)
      f = s * (float)c[t] + bb;
    else
      f = (float)c[t] * s;
    h[t] = __float2half(f);
  }
  out[idx] = *reinterpret_cast<const uint4 *>(h);
}

__device__ __forceinline__ float round_to(float v, float) { return v; }
__device__ __forceinline__ float round_to(float v, __half) {
  return __half2float(__float2half_rn(v));
}
__device__ __forceinline__ float round_to(float v, __nv_bfloat16) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// Embedding lookup: out[i, k] (f32) = value k of row ids[i]. Affine formats compute it as
// mx.dequantize does, in the dtype S of the scales (rounded to S after the product and after
// the bias), then widen it (AffineQuantized::dequantize_row on the CPU); Q4_0 / Q8_0 as ggml
// (f32). One thread per value.
template <int BITS, bool SIGNED, bool BIAS, typename S>
__device__ void qembed(const uint8_t *__restrict__ qs, const S *__restrict__ sc,
                       const S *__restrict__ bi, const unsigned int *__restrict__ ids,
                       float *__restrict__ out, int n_ids, int cols, int group) {
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)n_ids * cols) return;
  const size_t r = ids[idx / cols];
  const int k = (int)(idx % cols);
  const int j = k & 31;
  const size_t blk = r * (cols >> 5) + (k >> 5);
  const size_t gi = r * (cols / group) + k / group;
  const float s = to_f32(sc[gi]);
  int c;
  if (BITS == 4) {
    c = (qs[blk * 16 + (j & 15)] >> (j >= 16 ? 4 : 0)) & 15;
  } else {
    const uint8_t b = qs[blk * 32 + j];
    c = SIGNED ? (int)(int8_t)b : (int)b;
  }
  float v;
  if (BIAS) {
    // __fmul_rn / __fadd_rn: never contracted into an FMA (the CPU rounds the product first).
    const float p = round_to(__fmul_rn((float)c, s), S());
    v = round_to(__fadd_rn(p, to_f32(bi[gi])), S());
  } else if (BITS == 4) {
    v = (float)(c - 8) * s;
  } else {
    v = (float)c * s;
  }
  out[idx] = v;
}

// ---- Mixture of experts in the decode step (one token) ----
// The router's logits in f32 and the choice (in the router's last block): softmax over all
// experts, the top_k highest (the lower index first among equals, as a stable sort), weights
// divided by the chosen ones' sum when `norm` (transformers' Qwen3MoeSparseMoeBlock). The
// chosen experts are kept in expert order: slot k is the k-th chosen by index, and the down
// kernel sums the weighted outputs in that order (as the CPU's index_add).
// `sel` [1 + 2 * MOE_MAX_TOPK] u32: [0] a block counter (0 between steps), then the chosen
// experts' ids, then their weights (f32 bits).
// `table` holds per expert 9 addresses: codes, scales, biases of its gate, up, down matrices.
#define MOE_MAX_EXPERTS 512
#define MOE_MAX_TOPK 16
#define MOE_DOWN_ROWS 4
// Most rows of a batched step (MMQ_MAX_ROWS); a row mask is 64 bits.
#define MOE_MAX_ROWS 64
// Output rows of one warp of moe_down_rows.
#define MOE_DOWN_WARP_ROWS 8

// One expert matrix's codes, scales and biases: matrix m (0 gate, 1 up, 2 down) of the
// expert whose 9 table addresses start at t.
template <typename S>
struct ExpertMat {
  const uint8_t *q;
  const S *s;
  const S *b;
};
template <typename S>
__device__ __forceinline__ ExpertMat<S> expert_mat(const unsigned long long *__restrict__ t,
                                                   int m) {
  return {reinterpret_cast<const uint8_t *>(t[3 * m]), reinterpret_cast<const S *>(t[3 * m + 1]),
          reinterpret_cast<const S *>(t[3 * m + 2])};
}

// The choice from `logits` (n experts) into shared s_id / s_w (top_k each, in expert order);
// every thread of the block calls it; valid in all threads when it returns.
__device__ void moe_select(const float *__restrict__ logits, int n, int top_k, int norm,
                           int *s_id, float *s_w) {
  __shared__ float s_l[MOE_MAX_EXPERTS];
  __shared__ unsigned s_bits[MOE_MAX_EXPERTS / 32];
  __shared__ float s_ms[2];
  const int tid = threadIdx.x;
  for (int e = tid; e < n; e += blockDim.x) s_l[e] = __ldcg(logits + e);
  for (int i = tid; i < MOE_MAX_EXPERTS / 32; i += blockDim.x) s_bits[i] = 0u;
  __syncthreads();
  if (tid < 32) {
    float m = -INFINITY;
    for (int e = tid; e < n; e += 32) m = fmaxf(m, s_l[e]);
    m = warp_max(m);
    float sum = 0.f;
    for (int e = tid; e < n; e += 32) sum += expf(s_l[e] - m);
    sum = warp_sum(sum);
    if (tid == 0) {
      s_ms[0] = m;
      s_ms[1] = sum;
    }
  }
  for (int e = tid; e < n; e += blockDim.x) {
    const float v = s_l[e];
    int rank = 0;
    for (int j = 0; j < n; j++) {
      const float u = s_l[j];
      rank += (u > v) || (u == v && j < e);
    }
    if (rank < top_k) atomicOr(&s_bits[e >> 5], 1u << (e & 31));
  }
  __syncthreads();
  if (tid == 0) {
    const float m = s_ms[0], sum = s_ms[1];
    int k = 0;
    float chosen = 0.f;
    for (int wd = 0; wd < (n + 31) / 32 && k < top_k; wd++) {
      unsigned bits = s_bits[wd];
      while (bits && k < top_k) {
        const int e = wd * 32 + __ffs(bits) - 1;
        bits &= bits - 1;
        const float sc = expf(s_l[e] - m) / sum;
        s_id[k] = e;
        s_w[k] = sc;
        chosen += sc;
        k++;
      }
    }
    for (; k < top_k; k++) {  // only with NaN logits: no expert, no weight
      s_id[k] = 0;
      s_w[k] = 0.f;
    }
    if (norm && chosen > 0.f)
      for (int j = 0; j < top_k; j++) s_w[j] /= chosen;
  }
  __syncthreads();
}

// The rows' choices grouped by expert, for the batched step's kernels (moe_gate_up_rows,
// moe_down_rows): `grp` [MOE_GRP_WORDS] u32: [0] a block counter (0 between steps), [1] the
// number of experts chosen by any row, [MOE_GRP_IDS + i] the i-th of them (in expert order),
// [MOE_GRP_OFF + i .. + i + 1] the range of its entries in [MOE_GRP_ENTRIES ..], each entry
// row * MOE_MAX_TOPK + slot, in row order.
#define MOE_SEL_WORDS (1 + 2 * MOE_MAX_TOPK)
#define MOE_GRP_IDS 2
#define MOE_GRP_OFF (MOE_GRP_IDS + MOE_MAX_EXPERTS)
#define MOE_GRP_ENTRIES (MOE_GRP_OFF + MOE_MAX_EXPERTS + 1)

// Groups the `rows` rows' choices in `sel` (MOE_SEL_WORDS a row; rows <= 64) by expert into
// `grp` (see above); every thread of the block calls it. Per expert a mask of the rows that
// chose it: an entry's place among its expert's entries is the number of earlier rows in the
// mask (a row chooses an expert at most once), so the entries come out in row order. Only a
// row of NaN logits repeats an expert (expert 0 in its empty slots, at weight 0): its entries
// share one place, so one of those slots is computed and the others keep part's old values,
// which moe_combine multiplies by their weight 0.
__device__ void moe_group(const unsigned *__restrict__ sel, int rows, int n, int top_k,
                          unsigned *__restrict__ grp) {
  __shared__ unsigned long long s_mask[MOE_MAX_EXPERTS];
  __shared__ int s_off[MOE_MAX_EXPERTS];
  __shared__ int s_ent[MOE_MAX_ROWS * MOE_MAX_TOPK];
  const int tid = threadIdx.x, lane = tid & 31, entries = rows * top_k;
  for (int e = tid; e < n; e += blockDim.x) s_mask[e] = 0ull;
  __syncthreads();
  for (int i = tid; i < entries; i += blockDim.x) {
    const int r = i / top_k, e = (int)__ldcg(sel + r * MOE_SEL_WORDS + 1 + i % top_k);
    s_ent[i] = e;
    atomicOr(&s_mask[e], 1ull << r);
  }
  __syncthreads();
  if (tid < 32) {  // prefix sums of the entry counts and of the chosen experts, in expert order
    int off = 0, act = 0;
    for (int e0 = 0; e0 < n; e0 += 32) {
      const int e = e0 + lane;
      const int c = e < n ? __popcll(s_mask[e]) : 0;
      int ci = c, ai = c > 0;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int cu = __shfl_up_sync(0xffffffffu, ci, d), au = __shfl_up_sync(0xffffffffu, ai, d);
        if (lane >= d) ci += cu, ai += au;
      }
      if (e < n) {
        s_off[e] = off + ci - c;
        if (c > 0) {
          grp[MOE_GRP_IDS + act + ai - 1] = (unsigned)e;
          grp[MOE_GRP_OFF + act + ai - 1] = (unsigned)(off + ci - c);
        }
      }
      off += __shfl_sync(0xffffffffu, ci, 31);
      act += __shfl_sync(0xffffffffu, ai, 31);
    }
    if (lane == 0) {
      grp[MOE_GRP_OFF + act] = (unsigned)off;
      grp[1] = (unsigned)act;
    }
  }
  __syncthreads();
  for (int i = tid; i < entries; i += blockDim.x) {
    const int r = i / top_k, e = s_ent[i];
    const int at = s_off[e] + __popcll(s_mask[e] & ((1ull << r) - 1ull));
    grp[MOE_GRP_ENTRIES + at] = (unsigned)(r * MOE_MAX_TOPK + i % top_k);
  }
}

// logits[e] = w[e] . xn in f32, one block per expert and row (blockIdx.y of a batch; xn
// [rows, hidden], logits [rows, n_experts], sel [rows, MOE_SEL_WORDS]); the last block of a
// row to finish makes its choice (moe_select) and writes it to the row's `sel` (see above),
// resetting its counter. With `grp` (batched steps), the last row to be chosen groups all
// rows' choices by expert into it (moe_group).
extern "C" __global__ void moe_router(const float *__restrict__ w, const float *__restrict__ xn,
                                      float *__restrict__ logits, int n_experts, int hidden,
                                      int top_k, int norm, unsigned *__restrict__ sel,
                                      unsigned *__restrict__ grp) {
  __shared__ float red[32];
  __shared__ int s_id[MOE_MAX_TOPK];
  __shared__ float s_w[MOE_MAX_TOPK];
  __shared__ bool last;
  const int e = blockIdx.x, tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  unsigned *const sel0 = sel;
  {
    const size_t r = blockIdx.y;
    xn += r * hidden, logits += r * n_experts, sel += r * MOE_SEL_WORDS;
  }
  const float *row = w + (size_t)e * hidden;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  for (int o = tid * 32; o < hidden; o += blockDim.x * 32)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(row + o));
#endif
  pdl_enter();
  float acc = 0.f;
  for (int k = tid * 4; k < hidden; k += blockDim.x * 4) {
    const float4 a = __ldg(reinterpret_cast<const float4 *>(row + k));
    const float4 b = *reinterpret_cast<const float4 *>(xn + k);
    acc += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
  }
  acc = warp_sum(acc);
  if (lane == 0) red[wid] = acc;
  __syncthreads();
  if (tid == 0) {
    float v = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) v += red[i];
    logits[e] = v;
    __threadfence();
    last = atomicAdd(sel, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;  // uniform across the block
  __threadfence();
  moe_select(logits, n_experts, top_k, norm, s_id, s_w);
  if (tid < top_k) {
    sel[1 + tid] = (unsigned)s_id[tid];
    sel[1 + MOE_MAX_TOPK + tid] = __float_as_uint(s_w[tid]);
  }
  if (tid == 0) sel[0] = 0u;
  if (!grp) return;
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(grp, 1u) == gridDim.y - 1;
  __syncthreads();
  if (!last) return;  // uniform across the block
  __threadfence();
  moe_group(sel0, gridDim.y, n_experts, top_k, grp);
  if (tid == 0) grp[0] = 0u;
}

// Gate/up of the chosen experts, quantized for the down projection: block (b, k), 8 warps,
// computes outputs r = 32 b .. 32 b + 31 of slot k (warp w rows 32 b + 4 w .. + 3),
// h[k, r] = act(gate_e[r] . x) * (up_e[r] . x) for its expert e (act SiLU, or GELU-tanh with
// `gelu`), x the quantized input (one row), and writes them as one 8-bit block of
// hq [top_k, inter] / hd [top_k, inter / 32] (as quantize_q8).
template <int BITS, bool SIGNED, bool BIAS, typename S>
__device__ void moe_gate_up(const unsigned long long *__restrict__ table,
                            const unsigned *__restrict__ sel, const int8_t *__restrict__ xq,
                            const float2 *__restrict__ xd, int8_t *__restrict__ hq,
                            float2 *__restrict__ hd, int inter, int cols, int group, int gelu) {
  __shared__ float sh[32];
  pdl_enter();
  const int slot = blockIdx.y, lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const unsigned long long *t = table + (size_t)sel[1 + slot] * 9;
  const ExpertMat<S> gm = expert_mat<S>(t, 0), um = expert_mat<S>(t, 1);
  const uint8_t *gq = gm.q, *uq = um.q;
  const S *gs = gm.s, *gb = gm.b, *us = um.s, *ub = um.b;
  const int first = blockIdx.x * 32 + wid * 4;
  const int nblocks = cols >> 5, groups = cols / group, bpg = group >> 5;
  constexpr int BB = BITS == 4 ? 16 : 32;
  float ag[4] = {0.f, 0.f, 0.f, 0.f}, au[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
  for (int b = lane; b < nblocks; b += 32) {
    const int4 *xv = reinterpret_cast<const int4 *>(xq + (size_t)b * 32);
    const int4 x0 = xv[0], x1 = xv[1];
    const float2 dx = xd[b];
    const int g = b / bpg;
#pragma unroll
    for (int k = 0; k < 4; k++) {
      const size_t row = (size_t)(first + k);
      const size_t at = (row * nblocks + b) * BB, gi = row * groups + g;
      ag[k] += block_term<BITS, BIAS, S>(block_dot<BITS, SIGNED>(gq + at, x0, x1), gs, gb, gi, dx);
      au[k] += block_term<BITS, BIAS, S>(block_dot<BITS, SIGNED>(uq + at, x0, x1), us, ub, gi, dx);
    }
  }
#pragma unroll
  for (int k = 0; k < 4; k++) {
    const float g = warp_sum(ag[k]), u = warp_sum(au[k]);
    if (lane == 0) sh[wid * 4 + k] = (gelu ? gelu_tanh(g) : g / (1.f + expf(-g))) * u;
  }
  __syncthreads();
  if (wid == 0) {
    const size_t blk = (size_t)slot * (inter >> 5) + blockIdx.x;
    quant_block32(sh[lane], lane, hq + blk * 32, hd + blk);
  }
}

// Down of the chosen experts, weighted and summed: block b takes rows r = b*R .. +R of the
// output; warp k (one per slot, blockDim.x = 32 * top_k) dots them for slot k's expert with
// row k of the quantized h [top_k, cols]; then y[r] (+)= sum_k w_k * dot_k in slot order.
template <int BITS, bool SIGNED, bool BIAS, typename S, int R>
__device__ void moe_down(const unsigned long long *__restrict__ table,
                         const unsigned *__restrict__ sel, int top_k,
                         const int8_t *__restrict__ hq, const float2 *__restrict__ hd,
                         float *__restrict__ y, int rows, int cols, int group, int add) {
  __shared__ float red[MOE_MAX_TOPK][R];
  pdl_enter();
  const int first = blockIdx.x * R;
  const int lane = threadIdx.x & 31, slot = threadIdx.x >> 5;
  const ExpertMat<S> dm = expert_mat<S>(table + (size_t)sel[1 + slot] * 9, 2);
  const uint8_t *qs = dm.q;
  const S *sc = dm.s, *bi = dm.b;
  const int nblocks = cols >> 5, groups = cols / group, bpg = group >> 5;
  constexpr int BB = BITS == 4 ? 16 : 32;
  const int8_t *xqs = hq + (size_t)slot * cols;
  const float2 *xds = hd + (size_t)slot * nblocks;
  float acc[R];
#pragma unroll
  for (int k = 0; k < R; k++) acc[k] = 0.f;
  for (int b = lane; b < nblocks; b += 32) {
    const int4 *xv = reinterpret_cast<const int4 *>(xqs + (size_t)b * 32);
    const int4 x0 = xv[0], x1 = xv[1];
    const float2 dx = xds[b];
    const int g = b / bpg;
#pragma unroll
    for (int k = 0; k < R; k++) {
      const size_t row = (size_t)min(first + k, rows - 1);
      const int isum = block_dot<BITS, SIGNED>(qs + (row * nblocks + b) * BB, x0, x1);
      acc[k] += block_term<BITS, BIAS, S>(isum, sc, bi, row * groups + g, dx);
    }
  }
#pragma unroll
  for (int k = 0; k < R; k++) {
    const float v = warp_sum(acc[k]);
    if (lane == 0) red[slot][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < R && first + (int)threadIdx.x < rows) {
    const int k = threadIdx.x;
    float v = 0.f;
    for (int j = 0; j < top_k; j++) v += red[j][k] * __uint_as_float(sel[1 + MOE_MAX_TOPK + j]);
    if (add)
      y[first + k] += v;
    else
      y[first + k] = v;
  }
}

// ---- Mixture of experts in the batched decode step ----
// The rows' choices grouped by expert (moe_group): one block per tile and chosen expert reads
// that expert's weights once for every row that chose it, MOE_CHUNK rows at a time. Each
// output value is summed in the order the one-token kernels above sum it (the same lanes over
// the same 32-value blocks, then warp_sum; moe_combine sums the slots in slot order), so from
// the same input a row's expert output has the bits the one-token kernels give it (the batched
// step's other projections, on the small-batch GEMM, add their column splits atomically unless
// POCKETLM_MMQ_DETERMINISTIC=1).
#define MOE_CHUNK 4

// The entries [c0, c0 + n) of the grouped choices as (row, slot), n <= MOE_CHUNK (entries
// past n repeat the last one).
__device__ __forceinline__ void moe_entries(const unsigned *__restrict__ grp, int c0, int n,
                                            int *rr, int *slot) {
#pragma unroll
  for (int j = 0; j < MOE_CHUNK; j++) {
    const unsigned ent = grp[MOE_GRP_ENTRIES + c0 + min(j, n - 1)];
    rr[j] = (int)(ent / MOE_MAX_TOPK);
    slot[j] = (int)(ent % MOE_MAX_TOPK);
  }
}

// Gate/up of the chosen experts for a batch: block (b, a), 8 warps, takes outputs
// 32 b .. 32 b + 31 of the a-th chosen expert (grp) for each row that chose it, as
// moe_gate_up does for one: h[row, slot] from row `row` of the quantized input xq [rows, cols]
// into hq [rows * top_k, inter] / hd [rows * top_k, inter / 32]. Blocks past the number of
// chosen experts return.
template <int BITS, bool SIGNED, bool BIAS, typename S>
__device__ void moe_gate_up_rows(const unsigned long long *__restrict__ table,
                                 const unsigned *__restrict__ grp, int top_k,
                                 const int8_t *__restrict__ xq, const float2 *__restrict__ xd,
                                 int8_t *__restrict__ hq, float2 *__restrict__ hd, int inter,
                                 int cols, int group, int gelu) {
  __shared__ float sh[MOE_CHUNK][32];
  pdl_enter();
  const int a = blockIdx.y;
  if (a >= (int)grp[1]) return;  // uniform across the block
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const int begin = (int)grp[MOE_GRP_OFF + a], end = (int)grp[MOE_GRP_OFF + a + 1];
  const unsigned long long *t = table + (size_t)grp[MOE_GRP_IDS + a] * 9;
  const ExpertMat<S> gm = expert_mat<S>(t, 0), um = expert_mat<S>(t, 1);
  const uint8_t *gq = gm.q, *uq = um.q;
  const S *gs = gm.s, *gb = gm.b, *us = um.s, *ub = um.b;
  const int first = blockIdx.x * 32 + wid * 4;
  const int nblocks = cols >> 5, groups = cols / group, bpg = group >> 5;
  constexpr int BB = BITS == 4 ? 16 : 32;
  for (int c0 = begin; c0 < end; c0 += MOE_CHUNK) {
    const int n = min(MOE_CHUNK, end - c0);
    int rr[MOE_CHUNK], slot[MOE_CHUNK];
    moe_entries(grp, c0, n, rr, slot);
    float ag[MOE_CHUNK][4], au[MOE_CHUNK][4];
#pragma unroll
    for (int j = 0; j < MOE_CHUNK; j++)
#pragma unroll
      for (int k = 0; k < 4; k++) ag[j][k] = au[j][k] = 0.f;
    for (int b = lane; b < nblocks; b += 32) {
      int4 x0[MOE_CHUNK], x1[MOE_CHUNK];
      float2 dx[MOE_CHUNK];
#pragma unroll
      for (int j = 0; j < MOE_CHUNK; j++) {
        const int4 *xv = reinterpret_cast<const int4 *>(xq + (size_t)rr[j] * cols + (size_t)b * 32);
        x0[j] = xv[0];
        x1[j] = xv[1];
        dx[j] = xd[(size_t)rr[j] * nblocks + b];
      }
      const int g = b / bpg;
#pragma unroll
      for (int k = 0; k < 4; k++) {
        const size_t row = (size_t)(first + k);
        const size_t at = (row * nblocks + b) * BB, gi = row * groups + g;
        uint4 g0, g1 = make_uint4(0u, 0u, 0u, 0u), u0, u1 = g1;
        block_codes<BITS>(gq + at, g0, g1);
        block_codes<BITS>(uq + at, u0, u1);
#pragma unroll
        for (int j = 0; j < MOE_CHUNK; j++) {
          if (j < n) {
            ag[j][k] += block_term<BITS, BIAS, S>(codes_dot<BITS, SIGNED>(g0, g1, x0[j], x1[j]),
                                                  gs, gb, gi, dx[j]);
            au[j][k] += block_term<BITS, BIAS, S>(codes_dot<BITS, SIGNED>(u0, u1, x0[j], x1[j]),
                                                  us, ub, gi, dx[j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < MOE_CHUNK; j++) {
      if (j < n) {
#pragma unroll
        for (int k = 0; k < 4; k++) {
          const float g = warp_sum(ag[j][k]), u = warp_sum(au[j][k]);
          if (lane == 0) sh[j][wid * 4 + k] = (gelu ? gelu_tanh(g) : g / (1.f + expf(-g))) * u;
        }
      }
    }
    __syncthreads();
    if (wid < n) {
      const unsigned ent = grp[MOE_GRP_ENTRIES + c0 + wid];
      const size_t hrow = (size_t)(ent / MOE_MAX_TOPK) * top_k + ent % MOE_MAX_TOPK;
      const size_t blk = hrow * (inter >> 5) + blockIdx.x;
      quant_block32(sh[wid][lane], lane, hq + blk * 32, hd + blk);
    }
    __syncthreads();
  }
}

// Down of the chosen experts for a batch, unweighted: block (b, a), warp w takes output rows
// r = (b * warps + w) * R .. + R of the a-th chosen expert (grp) for each row that chose it,
// dotted with the row's h (hq [rows * top_k, cols]) as moe_down does for one, into
// part [rows * top_k, out_rows]; moe_combine weights and sums them.
template <int BITS, bool SIGNED, bool BIAS, typename S, int R>
__device__ void moe_down_rows(const unsigned long long *__restrict__ table,
                              const unsigned *__restrict__ grp, int top_k,
                              const int8_t *__restrict__ hq, const float2 *__restrict__ hd,
                              float *__restrict__ part, int rows, int cols, int group) {
  pdl_enter();
  const int a = blockIdx.y;
  if (a >= (int)grp[1]) return;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const int first = (blockIdx.x * (blockDim.x >> 5) + wid) * R;
  if (first >= rows) return;  // uniform across the warp; no block barrier below
  const int begin = (int)grp[MOE_GRP_OFF + a], end = (int)grp[MOE_GRP_OFF + a + 1];
  const ExpertMat<S> dm = expert_mat<S>(table + (size_t)grp[MOE_GRP_IDS + a] * 9, 2);
  const uint8_t *qs = dm.q;
  const S *sc = dm.s, *bi = dm.b;
  const int nblocks = cols >> 5, groups = cols / group, bpg = group >> 5;
  constexpr int BB = BITS == 4 ? 16 : 32;
  for (int c0 = begin; c0 < end; c0 += MOE_CHUNK) {
    const int n = min(MOE_CHUNK, end - c0);
    int rr[MOE_CHUNK], slot[MOE_CHUNK];
    moe_entries(grp, c0, n, rr, slot);
    float acc[MOE_CHUNK][R];
#pragma unroll
    for (int j = 0; j < MOE_CHUNK; j++)
#pragma unroll
      for (int k = 0; k < R; k++) acc[j][k] = 0.f;
    for (int b = lane; b < nblocks; b += 32) {
      int4 x0[MOE_CHUNK], x1[MOE_CHUNK];
      float2 dx[MOE_CHUNK];
#pragma unroll
      for (int j = 0; j < MOE_CHUNK; j++) {
        const size_t hrow = (size_t)rr[j] * top_k + slot[j];
        const int4 *xv = reinterpret_cast<const int4 *>(hq + hrow * cols + (size_t)b * 32);
        x0[j] = xv[0];
        x1[j] = xv[1];
        dx[j] = hd[hrow * nblocks + b];
      }
      const int g = b / bpg;
#pragma unroll
      for (int k = 0; k < R; k++) {
        const size_t row = (size_t)min(first + k, rows - 1);
        uint4 c0w, c1w = make_uint4(0u, 0u, 0u, 0u);
        block_codes<BITS>(qs + (row * nblocks + b) * BB, c0w, c1w);
#pragma unroll
        for (int j = 0; j < MOE_CHUNK; j++)
          if (j < n)
            acc[j][k] += block_term<BITS, BIAS, S>(codes_dot<BITS, SIGNED>(c0w, c1w, x0[j], x1[j]),
                                                   sc, bi, row * groups + g, dx[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < MOE_CHUNK; j++) {
      if (j < n) {
        const size_t hrow = (size_t)rr[j] * top_k + slot[j];
#pragma unroll
        for (int k = 0; k < R; k++) {
          const float v = warp_sum(acc[j][k]);
          if (lane == 0 && first + k < rows) part[hrow * rows + first + k] = v;
        }
      }
    }
  }
}

// y[row, i] (+)= sum_k w_k * part[row * top_k + k, i] over the row's slots in slot order, its
// weights w_k from `sel` (MOE_SEL_WORDS a row): block (b, row), value i = b * blockDim.x + tid.
extern "C" __global__ void moe_combine(const unsigned *__restrict__ sel,
                                       const float *__restrict__ part, float *__restrict__ y,
                                       int rows, int top_k, int add) {
  pdl_enter();
  const int r = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const unsigned *s = sel + (size_t)r * MOE_SEL_WORDS;
  float v = 0.f;
  for (int j = 0; j < top_k; j++)
    v += part[((size_t)r * top_k + j) * rows + i] * __uint_as_float(s[1 + MOE_MAX_TOPK + j]);
  float *o = y + (size_t)r * rows + i;
  if (add)
    *o += v;
  else
    *o = v;
}

// 16 bytes from global memory to shared memory, asynchronously (cp.async, sm_80+; bypassing L1);
// with `valid` false the 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- Small-batch quantized GEMM on the tensor cores (batched decode) ----
// y[i, r] (op)= row r . x_i for m activation rows (m <= 8 * NT), every weight block read once for
// all m rows: int8 mma.m16n8k32 (PTX ISA, "Matrix Fragments for mma.m16n8k32") of a 32-value
// weight block of 16 rows (A: codes, u8 or s8) with the same block of 8 activation rows (B: q8
// codes), one 16x8 integer tile per block and mma, then scaled into f32 accumulators as the GEMV
// does (block_term: s * d * isum + bias * d * sum(codes), or less 8 s d sum(codes) for Q4_0's
// offset codes), as llama.cpp's MMQ kernels do. A block of MMQ_WARPS warps takes MMQ_ROWS
// weight rows (16 a warp) and all m activation rows, and walks its columns in chunks of MMQ_KC
// weight blocks staged in shared memory (codes and activations by cp.async, two stages: the
// next chunk is in flight while this one is used; rows padded by 16 bytes so that the fragment
// reads hit 32 different banks). blockIdx.y splits the columns into gridDim.y shares whose
// results are added to y atomically (EPI 0 and 1 only; the caller zeroes y first for EPI 0).
// EPI as qgemv: 0 write, 1 add, 2 SwiGLU, 3 GeGLU (a warp's 16 rows are then 8 gate rows and
// their 8 up rows, a block's outputs 32).
#define MMQ_WARPS 4
#define MMQ_ROWS 64
#define MMQ_KC 4

template <bool SIGNED>
__device__ __forceinline__ void mma_16832(int *c, const unsigned *a, unsigned b0, unsigned b1) {
  if (SIGNED)
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// block_term with the block's scale (and bias) already loaded.
template <int BITS, bool BIAS>
__device__ __forceinline__ float mmq_term(int isum, float s, float b, float2 dx) {
  if (BIAS) return s * dx.x * (float)isum + b * dx.y;
  if (BITS == 4) return s * (dx.x * (float)isum - 8.f * dx.y);
  return s * dx.x * (float)isum;
}

// One stage of a qmmq block: a chunk of MMQ_KC weight blocks of its MMQ_ROWS rows (codes,
// scales and biases in f32) and of its 8 * NT activation rows (codes, (d, d * sum)).
template <int BITS, int NT> struct MmqStage {
  static constexpr int WB = MMQ_KC * (BITS == 4 ? 16 : 32) + 16;
  static constexpr int XB = MMQ_KC * 32 + 16;
  uint8_t w[MMQ_ROWS][WB];
  int8_t x[8 * NT][XB];
  float2 dx[8 * NT][MMQ_KC];
  float s[MMQ_ROWS][MMQ_KC];
  float b[MMQ_ROWS][MMQ_KC];
};

template <int BITS, bool SIGNED, bool BIAS, typename S, int EPI, int NT>
__device__ void qmmq(const uint8_t *__restrict__ qs, const S *__restrict__ sc,
                     const S *__restrict__ bi, const int8_t *__restrict__ xq,
                     const float2 *__restrict__ xd, float *__restrict__ y, int rows, int cols,
                     int group, int m, unsigned *__restrict__ turn) {
  constexpr bool GATED = EPI == 2 || EPI == 3;
  constexpr int BB = BITS == 4 ? 16 : 32;
  constexpr int NTOK = 8 * NT;
  // Per thread: scale/bias entries and (d, d * sum) entries of a chunk it loads.
  constexpr int SE = MMQ_ROWS * MMQ_KC / (32 * MMQ_WARPS);
  constexpr int DE = (NTOK * MMQ_KC + 32 * MMQ_WARPS - 1) / (32 * MMQ_WARPS);
  __shared__ __align__(16) MmqStage<BITS, NT> st[2];
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, q = lane & 3;
  const int nblocks = cols >> 5, groups = cols / group, bpg = group >> 5;
  const int out0 = blockIdx.x * (GATED ? MMQ_ROWS / 2 : MMQ_ROWS);
  const int per = ((nblocks + gridDim.y - 1) / gridDim.y + MMQ_KC - 1) / MMQ_KC * MMQ_KC;
  const int kb0 = min(nblocks, (int)blockIdx.y * per), kb1 = min(nblocks, kb0 + per);
  // The weight row of the block's local row lr (clamped into range).
  auto wrow = [&](int lr) {
    if (GATED) {
      const int k = lr & 15, o = min(out0 + (lr >> 4) * 8 + (k & 7), rows - 1);
      return k < 8 ? o : o + rows;
    }
    return min(out0 + lr, rows - 1);
  };
  // The weights do not depend on the kernel before: asked of L2 before the wait, as the GEMVs
  // do (prefetch_rows).
  if (kb0 < kb1) {
    const size_t lo = (size_t)kb0 * BB;
    const int nl = (int)(((size_t)(kb1 - kb0) * BB + 127) / 128);
    for (int i = tid; i < MMQ_ROWS * nl; i += blockDim.x)
      prefetch_line(qs + (size_t)wrow(i / nl) * nblocks * BB + lo + (size_t)(i % nl) * 128);
  }
  pdl_enter();
  const int nchunks = (kb1 - kb0 + MMQ_KC - 1) / MMQ_KC;
  // Codes and activations of chunk c into stage st[c & 1] (cp.async; zeros past kb1).
  auto load_async = [&](int c) {
    MmqStage<BITS, NT> &t = st[c & 1];
    const int kb = kb0 + c * MMQ_KC;
    constexpr int WP = MMQ_KC * BB / 16, XP = MMQ_KC * 2;
    for (int i = tid; i < MMQ_ROWS * WP; i += blockDim.x) {
      const int lr = i / WP, p = i % WP, j = p * 16 / BB;
      const bool ok = kb + j < kb1;
      const uint8_t *src = qs + ((size_t)wrow(lr) * nblocks + (ok ? kb : kb0)) * BB + p * 16;
      cp_async16(&t.w[lr][p * 16], src, ok);
    }
    for (int i = tid; i < NTOK * XP; i += blockDim.x) {
      const int tk = i / XP, p = i % XP, j = p >> 1;
      const bool ok = kb + j < kb1;
      const int8_t *src = xq + (size_t)min(tk, m - 1) * cols + (size_t)(ok ? kb : kb0) * 32 + p * 16;
      cp_async16(&t.x[tk][p * 16], src, ok);
    }
    cp_async_commit();
  };
  // Scales, biases and (d, d * sum) of chunk c, into registers (stored by store_regs).
  float rs[SE], rb[SE];
  float2 rd[DE];
  auto load_regs = [&](int c) {
    const int kb = kb0 + c * MMQ_KC;
#pragma unroll
    for (int e = 0; e < SE; e++) {
      const int i = tid + e * 32 * MMQ_WARPS, lr = i / MMQ_KC, j = i % MMQ_KC;
      const bool ok = kb + j < kb1;
      const size_t gi = (size_t)wrow(lr) * groups + (ok ? kb + j : kb0) / bpg;
      rs[e] = ok ? to_f32(sc[gi]) : 0.f;
      rb[e] = BIAS && ok ? to_f32(bi[gi]) : 0.f;
    }
#pragma unroll
    for (int e = 0; e < DE; e++) {
      const int i = tid + e * 32 * MMQ_WARPS, tk = i / MMQ_KC, j = i % MMQ_KC;
      const bool ok = i < NTOK * MMQ_KC && kb + j < kb1;
      rd[e] = ok ? __ldg(xd + (size_t)min(tk, m - 1) * nblocks + kb + j) : make_float2(0.f, 0.f);
    }
  };
  auto store_regs = [&](int c) {
    MmqStage<BITS, NT> &t = st[c & 1];
#pragma unroll
    for (int e = 0; e < SE; e++) {
      const int i = tid + e * 32 * MMQ_WARPS;
      t.s[i / MMQ_KC][i % MMQ_KC] = rs[e];
      t.b[i / MMQ_KC][i % MMQ_KC] = rb[e];
    }
#pragma unroll
    for (int e = 0; e < DE; e++) {
      const int i = tid + e * 32 * MMQ_WARPS;
      if (i < NTOK * MMQ_KC) t.dx[i / MMQ_KC][i % MMQ_KC] = rd[e];
    }
  };
  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  if (nchunks > 0) {
    load_async(0);
    load_regs(0);
    store_regs(0);
    cp_async_wait<0>();
    __syncthreads();
  }
  const int lo = 16 * w + g, hi = lo + 8;
  for (int c = 0; c < nchunks; c++) {
    const bool next = c + 1 < nchunks;
    if (next) {
      load_async(c + 1);
      load_regs(c + 1);
    }
    const MmqStage<BITS, NT> &t = st[c & 1];
#pragma unroll
    for (int j = 0; j < MMQ_KC; j++) {
      unsigned a[4];
      if (BITS == 4) {
        const unsigned wl = *reinterpret_cast<const unsigned *>(&t.w[lo][j * 16 + 4 * q]);
        const unsigned wh = *reinterpret_cast<const unsigned *>(&t.w[hi][j * 16 + 4 * q]);
        a[0] = wl & 0x0F0F0F0Fu;
        a[1] = wh & 0x0F0F0F0Fu;
        a[2] = (wl >> 4) & 0x0F0F0F0Fu;
        a[3] = (wh >> 4) & 0x0F0F0F0Fu;
      } else {
        a[0] = *reinterpret_cast<const unsigned *>(&t.w[lo][j * 32 + 4 * q]);
        a[1] = *reinterpret_cast<const unsigned *>(&t.w[hi][j * 32 + 4 * q]);
        a[2] = *reinterpret_cast<const unsigned *>(&t.w[lo][j * 32 + 16 + 4 * q]);
        a[3] = *reinterpret_cast<const unsigned *>(&t.w[hi][j * 32 + 16 + 4 * q]);
      }
      const float slo = t.s[lo][j], shi = t.s[hi][j];
      const float blo = BIAS ? t.b[lo][j] : 0.f, bhi = BIAS ? t.b[hi][j] : 0.f;
#pragma unroll
      for (int n = 0; n < NT; n++) {
        const unsigned b0 = *reinterpret_cast<const unsigned *>(&t.x[8 * n + g][j * 32 + 4 * q]);
        const unsigned b1 =
            *reinterpret_cast<const unsigned *>(&t.x[8 * n + g][j * 32 + 16 + 4 * q]);
        const float2 d0 = t.dx[8 * n + 2 * q][j], d1 = t.dx[8 * n + 2 * q + 1][j];
        int cc[4] = {0, 0, 0, 0};
        mma_16832<SIGNED>(cc, a, b0, b1);
        acc[n][0] += mmq_term<BITS, BIAS>(cc[0], slo, blo, d0);
        acc[n][1] += mmq_term<BITS, BIAS>(cc[1], slo, blo, d1);
        acc[n][2] += mmq_term<BITS, BIAS>(cc[2], shi, bhi, d0);
        acc[n][3] += mmq_term<BITS, BIAS>(cc[3], shi, bhi, d1);
      }
    }
    if (next) {
      // Stage (c + 1) & 1 held chunk c - 1, which every warp finished before the last barrier.
      store_regs(c + 1);
      cp_async_wait<0>();
    }
    __syncthreads();
  }
  // Column splits (gridDim.y > 1) add their sums into y: with `turn` (a counter per row tile,
  // 0 between launches) in split order, one split after the other (CUTLASS's serial split-K),
  // so that every output is ((s0 + s1) + s2) ... the same bits run after run; split 0 writes
  // (EPI 0) or adds to y (EPI 1) and the last sets the counter back to 0. Blocks start in
  // order of their linear index, so split s - 1 of a tile has started before split s waits
  // for it. Without `turn`, atomically, in the order the splits finish (y zeroed first for
  // EPI 0).
  const bool split = gridDim.y > 1, serial = split && turn != nullptr;
  if (serial) {
    if (tid == 0) {
      const volatile unsigned *t = turn + blockIdx.x;
      while (*t != blockIdx.y) {
      }
      __threadfence();
    }
    __syncthreads();
  }
#pragma unroll
  for (int n = 0; n < NT; n++) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int tok = 8 * n + 2 * q + h;
      if (tok >= m) continue;
      float *yr = y + (size_t)tok * rows;
      if (GATED) {
        const int o = out0 + 8 * w + g;
        if (o >= rows) continue;
        const float gv = acc[n][h], uv = acc[n][2 + h];
        yr[o] = (EPI == 3 ? gelu_tanh(gv) : gv / (1.f + expf(-gv))) * uv;
      } else {
#pragma unroll
        for (int half = 0; half < 2; half++) {
          const int o = out0 + 16 * w + g + 8 * half;
          if (o >= rows) continue;
          const float v = acc[n][2 * half + h];
          if (serial)
            __stcg(yr + o, EPI == 0 && blockIdx.y == 0 ? v : __ldcg(yr + o) + v);
          else if (split)
            atomicAdd(yr + o, v);
          else if (EPI == 1)
            yr[o] += v;
          else
            yr[o] = v;
        }
      }
    }
  }
  if (serial) {
    __threadfence();
    __syncthreads();
    if (tid == 0) atomicExch(turn + blockIdx.x, blockIdx.y + 1 == gridDim.y ? 0u : blockIdx.y + 1);
  }
}

#define QGEMV(NAME, BITS, SIGNED, BIAS, S, EPIN, EPI, R)                                       \
  extern "C" __global__ void qgemv##EPIN##R##_##NAME(const uint8_t *qs, const S *sc,             \
                                                     const S *bi, const int8_t *xq,                \
                                                     const float2 *xd, float *y, int rows,         \
                                                     int cols, int group) {                        \
    qgemv<BITS, SIGNED, BIAS, S, EPI, R>(qs, sc, bi, xq, xd, y, rows, cols, group);                \
  }
#define QMMQ(NAME, BITS, SIGNED, BIAS, S, EPIN, EPI, NT)                                       \
  extern "C" __global__ void __launch_bounds__(32 * MMQ_WARPS) qmmq##EPIN##NT##_##NAME(          \
      const uint8_t *qs, const S *sc, const S *bi, const int8_t *xq, const float2 *xd, float *y,  \
      int rows, int cols, int group, int m, unsigned *turn) {                                      \
    qmmq<BITS, SIGNED, BIAS, S, EPI, NT>(qs, sc, bi, xq, xd, y, rows, cols, group, m, turn);       \
  }
#define QMMQS(NAME, BITS, SIGNED, BIAS, S, EPIN, EPI)                                              \
  QMMQ(NAME, BITS, SIGNED, BIAS, S, EPIN, EPI, 1)                                                  \
  QMMQ(NAME, BITS, SIGNED, BIAS, S, EPIN, EPI, 2)                                                  \
  QMMQ(NAME, BITS, SIGNED, BIAS, S, EPIN, EPI, 4)                                                  \
  QMMQ(NAME, BITS, SIGNED, BIAS, S, EPIN, EPI, 8)
#define QKERNELS(NAME, BITS, SIGNED, BIAS, S)                                                      \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _w, 0, 1)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _w, 0, 2)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _w, 0, 4)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _w, 0, 8)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _a, 1, 1)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _a, 1, 2)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _a, 1, 4)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _a, 1, 8)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _s, 2, 2)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _s, 2, 4)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _s, 2, 8)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _g, 3, 2)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _g, 3, 4)                                                     \
  QGEMV(NAME, BITS, SIGNED, BIAS, S, _g, 3, 8)                                                     \
  QMMQS(NAME, BITS, SIGNED, BIAS, S, _w, 0)                                                        \
  QMMQS(NAME, BITS, SIGNED, BIAS, S, _a, 1)                                                        \
  QMMQS(NAME, BITS, SIGNED, BIAS, S, _s, 2)                                                        \
  QMMQS(NAME, BITS, SIGNED, BIAS, S, _g, 3)                                                        \
  extern "C" __global__ void qgemv_rope_##NAME(                                                     \
      const uint8_t *qs, const S *sc, const S *bi, const int8_t *xq, const float2 *xd, int cols,  \
      int group, const float *cos_t, const float *sin_t, const int *params,                        \
      const unsigned long long *kv, int layer, float *q_out, int n_heads, int n_kv, int hd,        \
      int interleaved, int kv_half, const float *lbias) {                                          \
    qgemv_rope<BITS, SIGNED, BIAS, S>(qs, sc, bi, xq, xd, cols, group, cos_t, sin_t, params, kv,  \
                                      layer, q_out, n_heads, n_kv, hd, interleaved, kv_half,       \
                                      lbias);                                                      \
  }                                                                                                \
  extern "C" __global__ void qembed_##NAME(const uint8_t *qs, const S *sc, const S *bi,           \
                                           const unsigned int *ids, float *out, int n_ids,         \
                                           int cols, int group) {                                  \
    qembed<BITS, SIGNED, BIAS, S>(qs, sc, bi, ids, out, n_ids, cols, group);                       \
  }                                                                                                \
  extern "C" __global__ void qdequant_##NAME(const uint8_t *qs, const S *sc, const S *bi,         \
                                             uint4 *out, int rows, int cols, int group) {          \
    qdequant<BITS, SIGNED, BIAS, S>(qs, sc, bi, out, rows, cols, group);                           \
  }                                                                                                \
  extern "C" __global__ void moe_gate_up_##NAME(                                                    \
      const unsigned long long *table, const unsigned *sel, const int8_t *xq, const float2 *xd,   \
      int8_t *hq, float2 *hd, int inter, int cols, int group, int gelu) {                          \
    moe_gate_up<BITS, SIGNED, BIAS, S>(table, sel, xq, xd, hq, hd, inter, cols, group, gelu);     \
  }                                                                                                \
  extern "C" __global__ void moe_down_##NAME(                                                       \
      const unsigned long long *table, const unsigned *sel, int top_k, const int8_t *hq,          \
      const float2 *hd, float *y, int rows, int cols, int group, int add) {                        \
    moe_down<BITS, SIGNED, BIAS, S, MOE_DOWN_ROWS>(table, sel, top_k, hq, hd, y, rows, cols,      \
                                                   group, add);                                    \
  }                                                                                                \
  extern "C" __global__ void moe_gate_up_rows_##NAME(                                               \
      const unsigned long long *table, const unsigned *grp, int top_k, const int8_t *xq,          \
      const float2 *xd, int8_t *hq, float2 *hd, int inter, int cols, int group, int gelu) {       \
    moe_gate_up_rows<BITS, SIGNED, BIAS, S>(table, grp, top_k, xq, xd, hq, hd, inter, cols,      \
                                            group, gelu);                                          \
  }                                                                                                \
  extern "C" __global__ void moe_down_rows_##NAME(                                                  \
      const unsigned long long *table, const unsigned *grp, int top_k, const int8_t *hq,          \
      const float2 *hd, float *part, int rows, int cols, int group) {                              \
    moe_down_rows<BITS, SIGNED, BIAS, S, MOE_DOWN_WARP_ROWS>(table, grp, top_k, hq, hd, part,     \
                                                             rows, cols, group);                   \
  }

QKERNELS(q4_0, 4, false, false, __half)
QKERNELS(q8_0, 8, true, false, __half)
QKERNELS(a4_f16, 4, false, true, __half)
QKERNELS(a4_bf16, 4, false, true, __nv_bfloat16)
QKERNELS(a4_f32, 4, false, true, float)
QKERNELS(a8_f16, 8, false, true, __half)
QKERNELS(a8_bf16, 8, false, true, __nv_bfloat16)
QKERNELS(a8_f32, 8, false, true, float)

// ---- The fused decode step (one token) ----
// `params` (device memory, set before each step; KV_PARAMS ints a sequence): [0] position of the
// new token, [1] number of positions to attend (position + 1), [2] capacity of the KV cache
// buffers (positions), [3] the RoPE position's offset from [0] (Qwen2-VL's M-RoPE delta after
// images; else 0), [4] and [5] the address of the sequence's block table (kv_table; 0: a
// contiguous cache), [6], [7] unused.
// `kv` (device memory): per layer the addresses of its key and value buffers, each
// [kv_heads, capacity, head_dim] f32 or f16 (the decoder's choice, one for all layers), or for a
// paged cache the pool layer's blocks [n_blocks, kv_heads, KV_BLOCK, head_dim] (kv_offset).

// The scale 1 / sqrt(sum / n + eps) of a block-wide sum of squares (each thread's share in
// `ss`), in every thread; `red` is scratch of 32 floats (free again when it returns).
__device__ __forceinline__ float block_rms_scale(float ss, int n, float eps, float *red) {
  __shared__ float scale_s;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  ss = warp_sum(ss);
  if (lane == 0) red[wid] = ss;
  __syncthreads();
  if (wid == 0) {
    float t = lane < nw ? red[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) scale_s = 1.f / sqrtf(t / (float)n + eps);
  }
  __syncthreads();
  return scale_s;
}

// RMSNorm (Zhang & Sennrich 2019) of one row as ggml computes it (x * 1/sqrt(mean(x^2) + eps),
// then * weight), quantized to 8 bits per 32 values for the next GEMV. One block per row; each
// thread holds up to RMS_CHUNKS runs of 4 values in registers (n <= 4 * RMS_CHUNKS * blockDim.x,
// n a multiple of 32), and the 8 threads of a 32-value block reduce among themselves.
// With `y` (else null): first x += RMSNorm(y) * w_post, written back to x (Gemma's post norm of
// the projection y before the residual add, fused with the next block's pre-norm). With `xn`
// (else null) the normalized values are also written there in f32 (a mixture of experts'
// router reads them).
#define RMS_CHUNKS 4
extern "C" __global__ void rmsnorm_q8(float *__restrict__ x, const float *__restrict__ w,
                                      float eps, int n, int8_t *__restrict__ xq,
                                      float2 *__restrict__ xd, const float *__restrict__ y,
                                      const float *__restrict__ w_post, float *__restrict__ xn) {
  __shared__ float red[32];
  const int tid = threadIdx.x, lane = tid & 31;
  {  // Row blockIdx.y of a batch: the buffers are [rows, n] (xd [rows, n / 32]).
    const size_t r = blockIdx.y;
    x += r * n, xq += r * n, xd += r * (n >> 5);
    if (y) y += r * n;
    if (xn) xn += r * n;
  }
  // The weights do not depend on the previous kernel: their loads are issued before the wait,
  // so that they overlap it and the reduction (one memory round trip instead of two).
  float4 v[RMS_CHUNKS], ww[RMS_CHUNKS], wp[RMS_CHUNKS];
#pragma unroll
  for (int c = 0; c < RMS_CHUNKS; c++) {
    const int i = 4 * (tid + c * blockDim.x);
    if (i < n) {
      ww[c] = __ldg(reinterpret_cast<const float4 *>(w + i));
      if (y) wp[c] = __ldg(reinterpret_cast<const float4 *>(w_post + i));
    }
  }
  pdl_enter();
  if (y) {  // uniform across the block
    float4 yv[RMS_CHUNKS];
    float ssy = 0.f;
#pragma unroll
    for (int c = 0; c < RMS_CHUNKS; c++) {
      const int i = 4 * (tid + c * blockDim.x);
      if (i < n) {
        yv[c] = *reinterpret_cast<const float4 *>(y + i);
        ssy += yv[c].x * yv[c].x + yv[c].y * yv[c].y + yv[c].z * yv[c].z + yv[c].w * yv[c].w;
      }
    }
    const float sy = block_rms_scale(ssy, n, eps, red);
#pragma unroll
    for (int c = 0; c < RMS_CHUNKS; c++) {
      const int i = 4 * (tid + c * blockDim.x);
      if (i < n) {
        const float4 r = *reinterpret_cast<const float4 *>(x + i);
        v[c] = make_float4(r.x + (yv[c].x * sy) * wp[c].x, r.y + (yv[c].y * sy) * wp[c].y,
                           r.z + (yv[c].z * sy) * wp[c].z, r.w + (yv[c].w * sy) * wp[c].w);
        *reinterpret_cast<float4 *>(x + i) = v[c];
      }
    }
  } else {
#pragma unroll
    for (int c = 0; c < RMS_CHUNKS; c++) {
      const int i = 4 * (tid + c * blockDim.x);
      if (i < n) v[c] = *reinterpret_cast<const float4 *>(x + i);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < RMS_CHUNKS; c++) {
    const int i = 4 * (tid + c * blockDim.x);
    if (i < n) ss += v[c].x * v[c].x + v[c].y * v[c].y + v[c].z * v[c].z + v[c].w * v[c].w;
  }
  const float scale = block_rms_scale(ss, n, eps, red);
#pragma unroll
  for (int c = 0; c < RMS_CHUNKS; c++) {
    const int i = 4 * (tid + c * blockDim.x);
    if (4 * (c * blockDim.x) >= n) break;  // uniform across the block
    const bool in = i < n;
    float4 y = make_float4(0.f, 0.f, 0.f, 0.f);
    if (in) {
      y = make_float4((v[c].x * scale) * ww[c].x, (v[c].y * scale) * ww[c].y,
                      (v[c].z * scale) * ww[c].z, (v[c].w * scale) * ww[c].w);
    }
    float amax = fmaxf(fmaxf(fabsf(y.x), fabsf(y.y)), fmaxf(fabsf(y.z), fabsf(y.w)));
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    const int q0 = __float2int_rn(y.x * id), q1 = __float2int_rn(y.y * id),
              q2 = __float2int_rn(y.z * id), q3 = __float2int_rn(y.w * id);
    int sum = q0 + q1 + q2 + q3;
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (in && xn) *reinterpret_cast<float4 *>(xn + i) = y;
    if (in) {
      char4 q;
      q.x = (signed char)q0;
      q.y = (signed char)q1;
      q.z = (signed char)q2;
      q.w = (signed char)q3;
      *reinterpret_cast<char4 *>(xq + i) = q;
      if ((lane & 7) == 0) xd[i >> 5] = make_float2(round_f16(d), round_f16((float)sum * d));
    }
  }
}

// RMSNorm without quantization: y = x / sqrt(mean(x^2) + eps) * w, or with `accumulate`
// y += that (the final norm when the output layer is another kernel's; Gemma's post-attention
// and post-feed-forward norms added to the residual). One block.
extern "C" __global__ void rmsnorm_f32(const float *__restrict__ x, const float *__restrict__ w,
                                       float eps, int n, float *__restrict__ y, int accumulate) {
  pdl_enter();
  x += (size_t)blockIdx.y * n, y += (size_t)blockIdx.y * n;  // row blockIdx.y of [rows, n]
  __shared__ float red[32];
  const int tid = threadIdx.x;
  float ss = 0.f;
  for (int i = tid; i < n; i += blockDim.x) ss += x[i] * x[i];
  const float scale_s = block_rms_scale(ss, n, eps, red);
  for (int i = tid; i < n; i += blockDim.x)
    y[i] = (accumulate ? y[i] : 0.f) + (x[i] * scale_s) * w[i];
}

// Decode attention split across blocks over the cached positions (flash-decoding, Dao et al.
// 2023) with grouped-query sharing: block (g, sp) of 4 warps attends the G query heads
// g*G .. g*G+G-1, which share one key/value head, to its share of the params[1] cached positions,
// so each key and value row is loaded once for the G heads. The split count follows the length:
// each split takes ceil(len / gridDim.y) positions but at least min_chunk, and blocks past
// the last needed split exit at once (the graph is recorded once, with gridDim.y = the most
// splits). Each warp walks ATTN_TILE positions at a time (independent loads in flight), with an
// online softmax (Milakov & Gimelshein 2018); the block writes the unnormalized output and
// (max, sum) per head, and attn_merge (the next kernel) merges the splits and quantizes the
// heads' outputs for the output projection. (A last-block merge inside this kernel, behind a
// fence and an atomic counter, cost about 0.14 us a split on the H200: 4.4 us a call at 32
// splits.) head_dim = 32 * EPL.
#define ATTN_TILE 8
// Most splits (gridDim.y) the merge takes.
#define ATTN_MAX_SPLITS 256
// The splits of `len` cached positions (see above): (positions a split takes, splits used).
// Up to `direct` positions take one split, which then normalizes and quantizes its heads'
// outputs itself (attn_split_out), and the merge kernel has nothing to do.
__device__ __forceinline__ int2 attn_splits(int len, int min_chunk, int maxsplit, int direct) {
  if (len <= direct) return make_int2(max(len, 1), 1);
  const int chunk = max(min_chunk, (len + maxsplit - 1) / maxsplit);
  return make_int2(chunk, (len + chunk - 1) / chunk);
}
// The first position a query attends of the `len` cached ones: 0, or with a sliding window
// (`window` > 0: the query sees itself and the window - 1 keys before it) len - window.
__device__ __forceinline__ int attn_lo(int len, int window) {
  return window > 0 ? max(0, len - window) : 0;
}
// EPL values of row t at lane's offset, widened to f32 (the cache holds float or __half).
template <int EPL>
__device__ __forceinline__ void load_row(const float *__restrict__ src, float *out) {
  if (EPL == 8) {
    const float4 a = __ldcs(reinterpret_cast<const float4 *>(src));
    const float4 b = __ldcs(reinterpret_cast<const float4 *>(src) + 1);
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
    out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  } else if (EPL == 4) {
    const float4 v = __ldcs(reinterpret_cast<const float4 *>(src));
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else if (EPL == 2) {
    const float2 v = __ldcs(reinterpret_cast<const float2 *>(src));
    out[0] = v.x, out[1] = v.y;
  } else {
#pragma unroll
    for (int e = 0; e < EPL; e++) out[e] = __ldcs(src + e);
  }
}
template <int EPL>
__device__ __forceinline__ void load_row(const __half *__restrict__ src, float *out) {
  if (EPL == 8) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4 *>(src));
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&u[j]));
      out[2 * j] = a.x, out[2 * j + 1] = a.y;
    }
  } else if (EPL == 4) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2 *>(src));
    const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&v.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&v.y));
    out[0] = a.x, out[1] = a.y, out[2] = b.x, out[3] = b.y;
  } else if (EPL == 2) {
    const unsigned v = __ldcs(reinterpret_cast<const unsigned *>(src));
    const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&v));
    out[0] = a.x, out[1] = a.y;
  } else {
#pragma unroll
    for (int e = 0; e < EPL; e++) out[e] = __half2float(__ldcs(src + e));
  }
}

// Tensor-core helpers (sm_80+; the cp.async ones are above).
__device__ __forceinline__ void mma_16816(float *c, const unsigned *a, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned pack_h2(float x, float y) {
  const __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<const unsigned *>(&h);
}
// Four 8x8 f16 matrices from shared memory, transposed: lanes 8i .. 8i + 7 give the row
// addresses of matrix i; register i holds matrix i's B fragment.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned *r, const __half *p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned *r, const __half *p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// Shared memory of the end of a split (attn_split_out): per warp and head the unnormalized
// output, max and sum.
template <int G, int HD> struct AttnFinishSmem {
  float o[4][G][HD];
  float m[4][G], l[4][G];
};

// The end of a split block: its 4 warps have written their (unnormalized output, max, sum) per
// head into sm (natural-log units); the block combines them into its split's part_o / part_ml,
// which attn_merge then combines over the splits. When it is the only split (nsplit == 1) it
// finishes the heads' outputs itself: O = o / l, quantized into xq / xd as attn_merge does
// (one split: the merge's weights are exp(0) = 1, so these are the merge's bits), and the
// merge kernel leaves them.
template <int G, int HD>
__device__ void attn_split_out(AttnFinishSmem<G, HD> &sm, int h0, int sp, int maxsplit,
                               float *__restrict__ part_o, float2 *__restrict__ part_ml,
                               int nsplit, int8_t *__restrict__ xq, float2 *__restrict__ xd) {
  __syncthreads();
  if (nsplit == 1) {
    // G * HD is a multiple of 32 and the block of 128 threads: each warp takes whole 32-value
    // quantization blocks of one head.
    const int lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
      const int g = i / HD, d = i % HD;
      float M = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; j++) M = fmaxf(M, sm.m[j][g]);
      float o = 0.f, L = 0.f;
#pragma unroll
      for (int j = 0; j < 4; j++)
        if (sm.l[j][g] > 0.f) {
          const float f = expf(sm.m[j][g] - M);
          o += sm.o[j][g][d] * f;
          L += sm.l[j][g] * f;
        }
      const int k = (h0 + g) * HD + d;
      quant_block32(o / L, lane, xq + (k & ~31), xd + (k >> 5));
    }
    return;
  }
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
    const int g = i / HD, d = i % HD;
    float M = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; j++) M = fmaxf(M, sm.m[j][g]);
    float o = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++)
      if (sm.l[j][g] > 0.f) o += sm.o[j][g][d] * expf(sm.m[j][g] - M);
    part_o[((size_t)(h0 + g) * maxsplit + sp) * HD + d] = o;
  }
  if (threadIdx.x < G) {
    const int g = threadIdx.x;
    float M = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; j++) M = fmaxf(M, sm.m[j][g]);
    float L = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++)
      if (sm.l[j][g] > 0.f) L += sm.l[j][g] * expf(sm.m[j][g] - M);
    part_ml[(size_t)(h0 + g) * maxsplit + sp] = make_float2(M, L);
  }
}

// Asks L2 for a split's key and value rows: positions [start, end) of one key/value head are
// contiguous in each buffer. Issued before pdl_enter() (the cached positions before this
// token's were written by earlier steps; a line the previous kernel is still writing is read
// again from L2 after the wait), so that they stream in while the q/k/v GEMV runs.
// A paged cache's rows are contiguous within a block: one request per block's run.
template <typename KT>
__device__ __forceinline__ void prefetch_kv(const KT *K, const KT *V, const int *tbl, int cap,
                                            int n_kv, int h, int start, int end, int hd) {
  for (int t = start; t < end;) {
    const int run = tbl ? min(end, (t / KV_BLOCK + 1) * KV_BLOCK) - t : end - t;
    const size_t off = kv_offset(tbl, cap, n_kv, h, t, hd);
    const size_t bytes = (size_t)run * hd * sizeof(KT);
    prefetch_l2(K + off, bytes);
    prefetch_l2(V + off, bytes);
    t += run;
  }
}

// The reduction of flash-decoding (Dao et al. 2023), as its own kernel launched after the split
// kernel: block h combines head h's nsplit partial results (unnormalized output, max, sum) into
// its output, O = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s, and quantizes it for the
// output projection. ATTN_MERGE_THREADS threads: thread (part, d) sums dimension d over the
// splits part, part + P, ... (P = threads / HD parts, loads unrolled 8 deep), so that many
// loads of the partial outputs are in flight at once; the parts are added in shared memory.
#define ATTN_MERGE_THREADS 512
template <int HD>
__device__ void attn_merge(const int *__restrict__ params, int window, int min_chunk,
                           int direct, int maxsplit, const float *__restrict__ part_o,
                           const float2 *__restrict__ part_ml, int8_t *__restrict__ xq,
                           float2 *__restrict__ xd) {
  constexpr int P = ATTN_MERGE_THREADS / HD, NW = ATTN_MERGE_THREADS / 32;
  __shared__ float f[ATTN_MAX_SPLITS];
  __shared__ float acc[P][HD];
  __shared__ float red[NW];
  pdl_enter();
  const int h = blockIdx.x, tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  {  // Sequence blockIdx.y of a batch: its params, partial results and output row.
    const size_t z = blockIdx.y, nh = gridDim.x;
    params += KV_PARAMS * z, part_o += z * nh * maxsplit * HD, part_ml += z * nh * maxsplit;
    xq += z * nh * HD, xd += z * nh * HD / 32;
  }
  const int len = params[1];
  const int nsplit = attn_splits(len - attn_lo(len, window), min_chunk, maxsplit, direct).y;
  // One split finished the output itself (attn_split_out); the wait above is kept, so that the
  // next kernel's wait on this one still covers it.
  if (nsplit == 1) return;
  const float2 *ml = part_ml + (size_t)h * maxsplit;
  float M = -INFINITY;
  for (int s = tid; s < nsplit; s += ATTN_MERGE_THREADS) {
    const float2 v = __ldcg(ml + s);
    if (v.y > 0.f) M = fmaxf(M, v.x);
  }
  M = warp_max(M);
  if (lane == 0) red[wid] = M;
  __syncthreads();
  M = red[0];
#pragma unroll
  for (int w = 1; w < NW; w++) M = fmaxf(M, red[w]);
  __syncthreads();
  float L = 0.f;
  for (int s = tid; s < nsplit; s += ATTN_MERGE_THREADS) {
    const float2 v = __ldcg(ml + s);
    const float w = v.y > 0.f ? expf(v.x - M) : 0.f;
    f[s] = w;
    L += v.y * w;
  }
  L = warp_sum(L);
  if (lane == 0) red[wid] = L;
  __syncthreads();
  L = 0.f;
#pragma unroll
  for (int w = 0; w < NW; w++) L += red[w];
  // With HD not dividing the block (96), the threads past P * HD have no part.
  const int d = tid % HD, part = tid / HD;
  if (part < P) {
    const float *po = part_o + (size_t)h * maxsplit * HD + d;
    float o = 0.f;
#pragma unroll 8
    for (int s = part; s < nsplit; s += P) o += __ldcg(po + (size_t)s * HD) * f[s];
    acc[part][d] = o;
  }
  __syncthreads();
  if (tid < HD) {
    float t = 0.f;
#pragma unroll
    for (int p = 0; p < P; p++) t += acc[p][tid];
    const int k = h * HD + tid;
    // A warp covers 32 consecutive outputs of the head: one quantization block.
    quant_block32(t / L, lane, xq + (k & ~31), xd + (k >> 5));
  }
}

template <int EPL, int G, typename KT>
__device__ void attn_gqa(const float *__restrict__ q, const int *__restrict__ params,
                         const unsigned long long *__restrict__ kv, int layer, int n_heads,
                         int n_kv, float scale, int window, int min_chunk, int direct,
                         float *__restrict__ part_o, float2 *__restrict__ part_ml,
                         int8_t *__restrict__ xq, float2 *__restrict__ xd, int kv_stride,
                         float softcap) {
  constexpr int HD = 32 * EPL;
  __shared__ AttnFinishSmem<G, HD> sm;
  const int grp = blockIdx.x, sp = blockIdx.y, maxsplit = gridDim.y;
  {  // Sequence blockIdx.z of a batch: its queries, params, cache table and partial results.
    const size_t z = blockIdx.z;
    q += z * n_heads * HD, params += KV_PARAMS * z, kv += z * kv_stride;
    part_o += z * n_heads * gridDim.y * HD, part_ml += z * n_heads * gridDim.y;
    xq += z * n_heads * HD, xd += z * n_heads * HD / 32;
  }
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int len = params[1], cap = params[2], lo = attn_lo(len, window);
  const int2 splits = attn_splits(len - lo, min_chunk, maxsplit, direct);
  const int chunk = splits.x, nsplit = splits.y;
  if (sp >= nsplit) return;
  const int start = lo + sp * chunk, end = min(len, start + chunk);
  const int h0 = grp * G;
  const int kvh = h0 / (n_heads / n_kv);
  const int *tbl = kv_table(params);
  const KT *K = reinterpret_cast<const KT *>(kv[2 * layer]);
  const KT *V = reinterpret_cast<const KT *>(kv[2 * layer + 1]);
  prefetch_kv(K, V, tbl, cap, n_kv, kvh, start, end, HD);
  pdl_enter();
  float qr[G][EPL], acc[G][EPL], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; g++) {
#pragma unroll
    for (int e = 0; e < EPL; e++) {
      qr[g][e] = q[(size_t)(h0 + g) * HD + lane * EPL + e] * scale;
      acc[g][e] = 0.f;
    }
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  for (int t0 = start + w * ATTN_TILE; t0 < end; t0 += 4 * ATTN_TILE) {
    // The tile's key and value rows are all requested before any is used.
    float kr[ATTN_TILE][EPL], vr[ATTN_TILE][EPL], s[G][ATTN_TILE];
#pragma unroll
    for (int p = 0; p < ATTN_TILE; p++) {
      const int t = t0 + p;
#pragma unroll
      for (int e = 0; e < EPL; e++) kr[p][e] = 0.f, vr[p][e] = 0.f;
      if (t < end) {
        const size_t off = kv_offset(tbl, cap, n_kv, kvh, t, HD) + lane * EPL;
        load_row<EPL>(K + off, kr[p]);
        load_row<EPL>(V + off, vr[p]);
      }
    }
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
      for (int p = 0; p < ATTN_TILE; p++) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; e++) d += qr[g][e] * kr[p][e];
        s[g][p] = d;
      }
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
      for (int p = 0; p < ATTN_TILE; p++) {
        s[g][p] = warp_sum(s[g][p]);
        // Gemma 2's attention soft-cap: c tanh(s / c) (softcap = c; 0: none).
        if (softcap > 0.f) s[g][p] = softcap * tanhf(s[g][p] / softcap);
      }
#pragma unroll
    for (int g = 0; g < G; g++) {
      float mn = m[g];
#pragma unroll
      for (int p = 0; p < ATTN_TILE; p++)
        if (t0 + p < end) mn = fmaxf(mn, s[g][p]);
      const float corr = expf(m[g] - mn);
      float pr[ATTN_TILE], ps = 0.f;
#pragma unroll
      for (int p = 0; p < ATTN_TILE; p++) {
        pr[p] = t0 + p < end ? expf(s[g][p] - mn) : 0.f;
        ps += pr[p];
      }
      l[g] = l[g] * corr + ps;
#pragma unroll
      for (int e = 0; e < EPL; e++) {
        float a = acc[g][e] * corr;
#pragma unroll
        for (int p = 0; p < ATTN_TILE; p++) a += pr[p] * vr[p][e];
        acc[g][e] = a;
      }
      m[g] = mn;
    }
  }
#pragma unroll
  for (int g = 0; g < G; g++) {
#pragma unroll
    for (int e = 0; e < EPL; e++) sm.o[w][g][lane * EPL + e] = acc[g][e];
    if (lane == 0) {
      sm.m[w][g] = m[g];
      sm.l[w][g] = l[g];
    }
  }
  attn_split_out<G, HD>(sm, h0, sp, maxsplit, part_o, part_ml, nsplit, xq, xd);
}

// The same split decode attention on the tensor cores, for an f16 cache: block (g, sp) streams
// its positions through shared memory in tiles of AM_TILE rows of keys and values (cp.async, two
// stages: the next tile is in flight while this one is used); warp w takes rows 8w .. 8w + 7 of
// each tile. The G query heads (scaled into base 2, f16) are the first G rows of an m16n8k16 A
// fragment: S = Q K^T is one 16x8 tile (HD / 16 products), and O += P V takes P as an A fragment
// whose upper 8 keys are zero (HD / 8 products). Rows G .. 15 are zero queries, never stored.
#define AM_TILE 32
template <int HD, int G> struct AttnMmaSmem {
  __half k[2][AM_TILE][HD + 8];
  __half v[2][AM_TILE][HD + 8];
};

template <int HD, int G>
__device__ void attn_mma(const float *__restrict__ q, const int *__restrict__ params,
                         const unsigned long long *__restrict__ kv, int layer, int n_heads,
                         int n_kv, float scale, int window, int min_chunk, int direct,
                         float *__restrict__ part_o, float2 *__restrict__ part_ml,
                         int8_t *__restrict__ xq, float2 *__restrict__ xd, int kv_stride,
                         float softcap) {
  constexpr int KS = HD / 16, DT = HD / 8, CH = HD / 8;  // CH: 16-byte chunks a row
  constexpr size_t SZ = sizeof(AttnMmaSmem<HD, G>) > sizeof(AttnFinishSmem<G, HD>)
                            ? sizeof(AttnMmaSmem<HD, G>)
                            : sizeof(AttnFinishSmem<G, HD>);
  __shared__ __align__(16) unsigned char raw[SZ];
  AttnMmaSmem<HD, G> &st = *reinterpret_cast<AttnMmaSmem<HD, G> *>(raw);
  AttnFinishSmem<G, HD> &sm = *reinterpret_cast<AttnFinishSmem<G, HD> *>(raw);
  const int grp = blockIdx.x, sp = blockIdx.y, maxsplit = gridDim.y;
  {  // Sequence blockIdx.z of a batch: its queries, params, cache table and partial results.
    const size_t z = blockIdx.z;
    q += z * n_heads * HD, params += KV_PARAMS * z, kv += z * kv_stride;
    part_o += z * n_heads * gridDim.y * HD, part_ml += z * n_heads * gridDim.y;
    xq += z * n_heads * HD, xd += z * n_heads * HD / 32;
  }
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, quad = lane & 3, r = lane >> 2;
  const int len = params[1], cap = params[2], lo = attn_lo(len, window);
  const int2 splits = attn_splits(len - lo, min_chunk, maxsplit, direct);
  const int chunk = splits.x, nsplit = splits.y;
  if (sp >= nsplit) return;
  const int start = lo + sp * chunk, end = min(len, start + chunk);
  const int h0 = grp * G;
  const int kvh = h0 / (n_heads / n_kv);
  const int *tbl = kv_table(params);
  const __half *K = reinterpret_cast<const __half *>(kv[2 * layer]);
  const __half *V = reinterpret_cast<const __half *>(kv[2 * layer + 1]);
  prefetch_kv(K, V, tbl, cap, n_kv, kvh, start, end, HD);
  pdl_enter();
  const float sl = scale * 1.4426950408889634f;
  // Q rows r (a0, a2) and r + 8 (a1, a3, always zero: G <= 8).
  unsigned qf[KS][4];
#pragma unroll
  for (int j = 0; j < KS; j++) {
    qf[j][1] = qf[j][3] = 0u;
    if (r < G) {
      const float *qh = q + (size_t)(h0 + r) * HD + 16 * j + 2 * quad;
      qf[j][0] = pack_h2(qh[0] * sl, qh[1] * sl);
      qf[j][2] = pack_h2(qh[8] * sl, qh[9] * sl);
    } else {
      qf[j][0] = qf[j][2] = 0u;
    }
  }
  auto load_tile = [&](int stage, int t0) {
    for (int i = threadIdx.x; i < AM_TILE * CH; i += blockDim.x) {
      const int row = i / CH, c = (i % CH) * 8, t = t0 + row;
      const bool ok = t < end;
      const size_t off = kv_offset(tbl, cap, n_kv, kvh, ok ? t : start, HD) + c;
      cp_async16(&st.k[stage][row][c], K + off, ok);
      cp_async16(&st.v[stage][row][c], V + off, ok);
    }
    cp_async_commit();
  };
  float o[DT][4];
#pragma unroll
  for (int n = 0; n < DT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m = -INFINITY, l = 0.f;
  const int ntiles = (end - start + AM_TILE - 1) / AM_TILE;
  load_tile(0, start);
  for (int it = 0; it < ntiles; it++) {
    const int stage = it & 1, t0 = start + it * AM_TILE;
    if (it + 1 < ntiles) {
      load_tile(stage ^ 1, t0 + AM_TILE);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // S (16 x 8): keys t0 + 8w + 0..7.
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < KS; j += 2) {
      // Matrices: (keys, dims 16j..+7), (keys, 16j+8..), (keys, 16j+16..), (keys, 16j+24..).
      unsigned b[4];
      ldmatrix_x4(b, &st.k[stage][8 * w + (lane & 7)][16 * j + 8 * (lane >> 3)]);
      mma_16816(sc, qf[j], b[0], b[1]);
      mma_16816(sc, qf[j + 1], b[2], b[3]);
    }
    // Gemma 2's attention soft-cap, c tanh(s / c), in base-2 units (softcap = c log2(e); 0:
    // none), before the mask.
    if (softcap > 0.f) {
#pragma unroll
      for (int e = 0; e < 4; e++) sc[e] = softcap * tanhf(sc[e] / softcap);
    }
    const int ta = t0 + 8 * w + 2 * quad;
    if (ta >= end) sc[0] = -INFINITY;
    if (ta + 1 >= end) sc[1] = -INFINITY;
    float x = fmaxf(sc[0], sc[1]);
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    const float mn = fmaxf(m, x);
    const float base = mn == -INFINITY ? 0.f : mn;
    const float f = exp2f(m - base);
    const float p0 = exp2f(sc[0] - base), p1 = exp2f(sc[1] - base);
    m = mn;
    l = l * f + p0 + p1;
    const unsigned pf[4] = {pack_h2(p0, p1), 0u, 0u, 0u};
#pragma unroll
    for (int n = 0; n < DT; n += 4) {
      // Matrices: keys 8w..8w+7 at dims 8n.., 8n+8.., 8n+16.., 8n+24.. (the zero half of P
      // takes the same rows).
      unsigned b[4];
      ldmatrix_x4_trans(b, &st.v[stage][8 * w + (lane & 7)][8 * n + 8 * (lane >> 3)]);
#pragma unroll
      for (int e = 0; e < 4; e++) {
        o[n + e][0] *= f, o[n + e][1] *= f;
        mma_16816(o[n + e], pf, b[e], b[e]);
      }
    }
    __syncthreads();
  }
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  // The pipeline's buffers become the finish's (all copies are done and read).
  if (r < G) {
#pragma unroll
    for (int n = 0; n < DT; n++) {
      sm.o[w][r][n * 8 + 2 * quad] = o[n][0];
      sm.o[w][r][n * 8 + 2 * quad + 1] = o[n][1];
    }
    if (quad == 0) {
      // Natural-log units, as the SIMT kernel's.
      sm.m[w][r] = m * 0.6931471805599453f;
      sm.l[w][r] = l;
    }
  }
  attn_split_out<G, HD>(sm, h0, sp, maxsplit, part_o, part_ml, nsplit, xq, xd);
}

#define ATTN_KERNEL(HDIM, EPL, G, KT, KN)                                                          \
  extern "C" __global__ void __launch_bounds__(128)                                                \
      attn_gqa_d##HDIM##_g##G##_##KN(                                                           \
          const float *q, const int *params, const unsigned long long *kv, int layer, int n_heads, \
          int n_kv, float scale, int window, int min_chunk, int direct, float *part_o,             \
          float2 *part_ml, int8_t *xq, float2 *xd, int kv_stride, float softcap) {                 \
    attn_gqa<EPL, G, KT>(q, params, kv, layer, n_heads, n_kv, scale, window, min_chunk, direct,    \
                         part_o, part_ml, xq, xd, kv_stride, softcap);                             \
  }
#define ATTN_KERNELS(G)                                                                            \
  ATTN_KERNEL(64, 2, G, float, f32)                                                                \
  ATTN_KERNEL(96, 3, G, float, f32)                                                                \
  ATTN_KERNEL(128, 4, G, float, f32)                                                               \
  ATTN_KERNEL(256, 8, G, float, f32)                                                               \
  ATTN_KERNEL(64, 2, G, __half, f16)                                                               \
  ATTN_KERNEL(96, 3, G, __half, f16)                                                               \
  ATTN_KERNEL(128, 4, G, __half, f16)                                                              \
  ATTN_KERNEL(256, 8, G, __half, f16)
ATTN_KERNELS(1)
ATTN_KERNELS(2)
ATTN_KERNELS(4)
ATTN_KERNELS(8)

#define ATTN_MMA_KERNEL(HDIM, G)                                                                   \
  extern "C" __global__ void __launch_bounds__(128, 4)                                             \
      attn_mma_d##HDIM##_g##G##_f16(                                                            \
          const float *q, const int *params, const unsigned long long *kv, int layer, int n_heads, \
          int n_kv, float scale, int window, int min_chunk, int direct, float *part_o,             \
          float2 *part_ml, int8_t *xq, float2 *xd, int kv_stride, float softcap) {                 \
    attn_mma<HDIM, G>(q, params, kv, layer, n_heads, n_kv, scale, window, min_chunk, direct,       \
                      part_o, part_ml, xq, xd, kv_stride, softcap);                                \
  }
#define ATTN_MMA_KERNELS(G)                                                                        \
  ATTN_MMA_KERNEL(64, G)                                                                           \
  ATTN_MMA_KERNEL(96, G)                                                                           \
  ATTN_MMA_KERNEL(128, G)
ATTN_MMA_KERNELS(1)
ATTN_MMA_KERNELS(2)
ATTN_MMA_KERNELS(4)
ATTN_MMA_KERNELS(8)

#define ATTN_MERGE_KERNEL(HDIM)                                                                    \
  extern "C" __global__ void __launch_bounds__(ATTN_MERGE_THREADS) attn_merge_d##HDIM(             \
      const int *params, int window, int min_chunk, int direct, int maxsplit,                      \
      const float *part_o, const float2 *part_ml, int8_t *xq, float2 *xd) {                        \
    attn_merge<HDIM>(params, window, min_chunk, direct, maxsplit, part_o, part_ml, xq, xd);        \
  }
ATTN_MERGE_KERNEL(64)
ATTN_MERGE_KERNEL(96)
ATTN_MERGE_KERNEL(128)
ATTN_MERGE_KERNEL(256)

// ---- Prefill helpers ----

// SwiGLU on a stacked gate/up product: y [m, 2n] (gate columns, then up) -> out [m, n],
// out = silu(gate) * up.
extern "C" __global__ void swiglu_stacked(const float *__restrict__ y, float *__restrict__ out,
                                          int m, int n) {
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)m * n) return;
  const size_t i = idx / n, j = idx % n;
  const float g = y[i * 2 * n + j], u = y[i * 2 * n + n + j];
  out[idx] = g / (1.f + expf(-g)) * u;
}

// In place, per row r of att [rows, cols]: softmax(att[r] * scale + mask[r % q_len]) (mask
// [q_len, cols] additive, -inf for masked positions; null for none). One block per row.
extern "C" __global__ void softmax_scaled_masked(float *__restrict__ att,
                                                 const float *__restrict__ mask, int cols,
                                                 int q_len, float scale) {
  __shared__ float red[32];
  const size_t r = blockIdx.x;
  float *row = att + r * cols;
  const float *mrow = mask ? mask + (size_t)(r % q_len) * cols : nullptr;
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nw = blockDim.x >> 5;
  float mx = -INFINITY;
  for (int j = tid; j < cols; j += blockDim.x) {
    const float v = row[j] * scale + (mrow ? mrow[j] : 0.f);
    row[j] = v;
    mx = fmaxf(mx, v);
  }
  mx = warp_max(mx);
  if (lane == 0) red[wid] = mx;
  __syncthreads();
  mx = -INFINITY;
  for (int w = 0; w < nw; w++) mx = fmaxf(mx, red[w]);
  __syncthreads();
  float sum = 0.f;
  for (int j = tid; j < cols; j += blockDim.x) {
    const float e = row[j] == -INFINITY ? 0.f : expf(row[j] - mx);
    row[j] = e;
    sum += e;
  }
  sum = warp_sum(sum);
  if (lane == 0) red[wid] = sum;
  __syncthreads();
  sum = 0.f;
  for (int w = 0; w < nw; w++) sum += red[w];
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int j = tid; j < cols; j += blockDim.x) row[j] *= inv;
}

// ---- Fused prefill attention (flash attention, Dao 2023: FlashAttention-2) ----
//
// softmax(q k^T * scale, causal) v for the s queries of one sequence at positions
// kv_len - s .. kv_len - 1 over keys 0 .. kv_len - 1, without the score matrix in memory.
// q [heads, s, D] f32, k and v [n_kv, kv_len, D] (heads kv_head_stride elements apart, rows D
// apart) in KT (float or __half), or with a block table `tbl` (else null) a paged cache's pool
// layer [n_blocks, n_kv, KV_BLOCK, D] whose block tbl[t / KV_BLOCK] holds position t (kv_offset's
// layout, read in place), out [s, heads, D] f32 (the input of the output projection).
// The G = heads / n_kv query heads that share a key/value head are rows of one matrix: row
// r = pos * G + g, so each key/value tile loaded into shared memory serves all of them. Block
// (x, kvh) of 4 warps takes rows 64x .. 64x + 63 of head group kvh, each warp 16 of them, and
// walks the keys those rows can see in tiles of 64: S = Q K^T and O += P V on the tensor cores
// (mma.sync m16n8k16, f16 operands, f32 accumulators; P stays in registers), with the online
// softmax in base 2 (q is scaled by scale * log2(e) once, as it is converted to f16).
#define FA_BM 64
#define FA_BN 64

// 8 consecutive values of a row of K or V as 8 f16, 16 bytes.
__device__ __forceinline__ uint4 load8_h(const __half *p) {
  return *reinterpret_cast<const uint4 *>(p);
}
__device__ __forceinline__ uint4 load8_h(const float *p) {
  const float4 a = *reinterpret_cast<const float4 *>(p);
  const float4 b = *reinterpret_cast<const float4 *>(p + 4);
  uint4 r;
  r.x = pack_h2(a.x, a.y), r.y = pack_h2(a.z, a.w), r.z = pack_h2(b.x, b.y), r.w = pack_h2(b.z, b.w);
  return r;
}

//
// PIPE (f16 caches only): the tiles come in by cp.async, K and V each single-buffered but a step
// ahead, as FlashAttention-2's kernel does: K of the next tile is in flight during this tile's
// softmax and P V, V of the next during the next S = Q K^T. Otherwise (and for f32 caches, which
// are converted on the way) each tile is loaded through registers, then used.
template <int D, typename KT, bool PIPE>
__device__ void flash_prefill(const float *__restrict__ q, const KT *__restrict__ k,
                              const KT *__restrict__ v, float *__restrict__ out, int s, int heads,
                              int n_kv, int kv_len, long long kv_head_stride,
                              const int *__restrict__ tbl, float scale_log2) {
  static_assert(!PIPE || sizeof(KT) == 2, "the cp.async pipeline copies f16 rows as stored");
  constexpr int LD = D + 8;  // padded rows: conflict-free fragment loads and ldmatrix
  constexpr int KS = D / 16, NT = FA_BN / 8, DT = D / 8;
  __shared__ __align__(16) __half ks[FA_BN][LD];
  __shared__ __align__(16) __half vs[FA_BN][LD];
  const int G = heads / n_kv, kvh = blockIdx.y;
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, quad = lane & 3;
  const int rows = s * G, offset = kv_len - s;
  const int r0 = blockIdx.x * FA_BM;
  // This thread's two rows (fragment rows lane/4 and lane/4 + 8 of the warp's 16); rows past the
  // end repeat the last one and are not stored.
  const int ra = r0 + w * 16 + (lane >> 2), rb = ra + 8;
  const int ca = min(ra, rows - 1), cb = min(rb, rows - 1);
  const int pa = ca / G, pb = cb / G, ha = kvh * G + ca % G, hb = kvh * G + cb % G;
  // Row t of key/value head kvh in `base` (k or v): through the block table as the decode
  // kernels read it (kv_offset; its capacity is not read then), else heads kv_head_stride apart.
  auto row = [&](const KT *base, int t) -> const KT * {
    if (tbl) return base + kv_offset(tbl, 0, n_kv, kvh, t, D);
    return base + (size_t)kvh * kv_head_stride + (size_t)t * D;
  };
  // Q as A fragments, scaled into base 2.
  unsigned qf[KS][4];
  {
    const float *qa = q + ((size_t)ha * s + pa) * D, *qb = q + ((size_t)hb * s + pb) * D;
#pragma unroll
    for (int j = 0; j < KS; j++) {
      const int c = 16 * j + 2 * quad;
      const float2 a0 = *reinterpret_cast<const float2 *>(qa + c);
      const float2 a1 = *reinterpret_cast<const float2 *>(qb + c);
      const float2 a2 = *reinterpret_cast<const float2 *>(qa + c + 8);
      const float2 a3 = *reinterpret_cast<const float2 *>(qb + c + 8);
      qf[j][0] = pack_h2(a0.x * scale_log2, a0.y * scale_log2);
      qf[j][1] = pack_h2(a1.x * scale_log2, a1.y * scale_log2);
      qf[j][2] = pack_h2(a2.x * scale_log2, a2.y * scale_log2);
      qf[j][3] = pack_h2(a3.x * scale_log2, a3.y * scale_log2);
    }
  }
  float o[DT][4];
#pragma unroll
  for (int n = 0; n < DT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float ma = -INFINITY, mb = -INFINITY, la = 0.f, lb = 0.f;
  const int pmin = r0 / G, pmax = min(rows - 1, r0 + FA_BM - 1) / G;
  const int kend = offset + pmax + 1;   // keys any row of the block sees
  const int kfull = offset + pmin + 1;  // keys every row of the block sees
  // One tile of keys (or values) from position kt on, by cp.async; rows past the cache are zero.
  auto load_async = [&](__half(*dst)[LD], const KT *src, int kt) {
    for (int i = threadIdx.x; i < FA_BN * D / 8; i += blockDim.x) {
      const int r = i / (D / 8), c = (i % (D / 8)) * 8, t = kt + r;
      const bool ok = t < kv_len;
      cp_async16(&dst[r][c], row(src, ok ? t : 0) + c, ok);
    }
    cp_async_commit();
  };
  if constexpr (PIPE) {
    load_async(ks, k, 0);
    load_async(vs, v, 0);
  }
  for (int kt = 0; kt < kend; kt += FA_BN) {
    if constexpr (PIPE) {
      cp_async_wait<1>();  // this tile's keys (its values may still be in flight)
      __syncthreads();
    } else {
      __syncthreads();
      for (int i = threadIdx.x; i < FA_BN * D / 8; i += blockDim.x) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8, t = kt + r;
        uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
        if (t < kv_len) {
          kx = load8_h(row(k, t) + c);
          vx = load8_h(row(v, t) + c);
        }
        *reinterpret_cast<uint4 *>(&ks[r][c]) = kx;
        *reinterpret_cast<uint4 *>(&vs[r][c]) = vx;
      }
      __syncthreads();
    }
    float sc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) {
      sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
      const __half *kr = &ks[n * 8 + (lane >> 2)][2 * quad];
#pragma unroll
      for (int j = 0; j < KS; j++) {
        const unsigned b0 = *reinterpret_cast<const unsigned *>(kr + 16 * j);
        const unsigned b1 = *reinterpret_cast<const unsigned *>(kr + 16 * j + 8);
        mma_16816(sc[n], qf[j], b0, b1);
      }
    }
    if constexpr (PIPE) {
      __syncthreads();  // every warp is done with ks: the next tile's keys may come in
      if (kt + FA_BN < kend) {
        load_async(ks, k, kt + FA_BN);
      } else {
        cp_async_commit();  // an empty group keeps the wait counts below the same
      }
    }
    if (kt + FA_BN > kfull) {
#pragma unroll
      for (int n = 0; n < NT; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int t = kt + n * 8 + 2 * quad + (e & 1);
          if (t > offset + (e < 2 ? pa : pb)) sc[n][e] = -INFINITY;
        }
    }
    float xa = -INFINITY, xb = -INFINITY;
#pragma unroll
    for (int n = 0; n < NT; n++) {
      xa = fmaxf(xa, fmaxf(sc[n][0], sc[n][1]));
      xb = fmaxf(xb, fmaxf(sc[n][2], sc[n][3]));
    }
    xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 1));
    xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 2));
    xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 1));
    xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 2));
    // Key 0 is in the first tile and every row sees it, so the maxima are finite from there on.
    const float na = fmaxf(ma, xa), nb = fmaxf(mb, xb);
    const float fa = exp2f(ma - na), fb = exp2f(mb - nb);
    ma = na, mb = nb;
    float sa = 0.f, sb = 0.f;
#pragma unroll
    for (int n = 0; n < NT; n++) {
      sc[n][0] = exp2f(sc[n][0] - na), sc[n][1] = exp2f(sc[n][1] - na);
      sc[n][2] = exp2f(sc[n][2] - nb), sc[n][3] = exp2f(sc[n][3] - nb);
      sa += sc[n][0] + sc[n][1];
      sb += sc[n][2] + sc[n][3];
    }
    la = la * fa + sa;
    lb = lb * fb + sb;
#pragma unroll
    for (int n = 0; n < DT; n++) o[n][0] *= fa, o[n][1] *= fa, o[n][2] *= fb, o[n][3] *= fb;
    if constexpr (PIPE) {
      cp_async_wait<1>();  // this tile's values
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < FA_BN / 16; j++) {
      // The score accumulators of key tiles 2j and 2j + 1 are the A fragment of P.
      const unsigned pf[4] = {pack_h2(sc[2 * j][0], sc[2 * j][1]),
                              pack_h2(sc[2 * j][2], sc[2 * j][3]),
                              pack_h2(sc[2 * j + 1][0], sc[2 * j + 1][1]),
                              pack_h2(sc[2 * j + 1][2], sc[2 * j + 1][3])};
#pragma unroll
      for (int n = 0; n < D / 16; n++) {
        unsigned b[4];
        ldmatrix_x4_trans(b, &vs[16 * j + (lane & 15)][16 * n + (lane >> 4) * 8]);
        mma_16816(o[2 * n], pf, b[0], b[1]);
        mma_16816(o[2 * n + 1], pf, b[2], b[3]);
      }
    }
    if constexpr (PIPE) {
      __syncthreads();  // every warp is done with vs
      if (kt + FA_BN < kend) {
        load_async(vs, v, kt + FA_BN);
      } else {
        cp_async_commit();
      }
    }
  }
  la += __shfl_xor_sync(0xffffffffu, la, 1);
  la += __shfl_xor_sync(0xffffffffu, la, 2);
  lb += __shfl_xor_sync(0xffffffffu, lb, 1);
  lb += __shfl_xor_sync(0xffffffffu, lb, 2);
  const float ia = 1.f / la, ib = 1.f / lb;
  float *oa = out + ((size_t)pa * heads + ha) * D, *ob = out + ((size_t)pb * heads + hb) * D;
#pragma unroll
  for (int n = 0; n < DT; n++) {
    const int c = n * 8 + 2 * quad;
    if (ra < rows) *reinterpret_cast<float2 *>(oa + c) = make_float2(o[n][0] * ia, o[n][1] * ia);
    if (rb < rows) *reinterpret_cast<float2 *>(ob + c) = make_float2(o[n][2] * ib, o[n][3] * ib);
  }
}

#define FLASH_KERNEL(D, KT, KN, PIPE)                                                              \
  extern "C" __global__ void __launch_bounds__(128, 3) flash_prefill_d##D##_##KN(                  \
      const float *q, const KT *k, const KT *v, float *out, int s, int heads, int n_kv,            \
      int kv_len, long long kv_head_stride, const int *tbl, float scale_log2) {                   \
    flash_prefill<D, KT, PIPE>(q, k, v, out, s, heads, n_kv, kv_len, kv_head_stride, tbl,         \
                               scale_log2);                                                        \
  }
FLASH_KERNEL(64, float, f32, false)
FLASH_KERNEL(128, float, f32, false)
FLASH_KERNEL(64, __half, f16, false)
FLASH_KERNEL(128, __half, f16, false)
FLASH_KERNEL(64, __half, f16p, true)
FLASH_KERNEL(128, __half, f16p, true)
