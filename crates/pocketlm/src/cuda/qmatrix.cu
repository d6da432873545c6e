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
  const int b = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (b >= nblocks) return;
  quant_block32(x[(size_t)b * 32 + lane], lane, xq + (size_t)b * 32, xd + b);
}

// Integer dot product of one 32-value weight block (codes at q) with an activation block.
template <int BITS, bool SIGNED>
__device__ __forceinline__ int block_dot(const uint8_t *__restrict__ q, const int4 x0,
                                         const int4 x1) {
  int isum = 0;
  if (BITS == 4) {
    const uint4 c = __ldg(reinterpret_cast<const uint4 *>(q));
    isum = dp4a_ss((int)(c.x & 0x0F0F0F0Fu), x0.x, isum);
    isum = dp4a_ss((int)(c.y & 0x0F0F0F0Fu), x0.y, isum);
    isum = dp4a_ss((int)(c.z & 0x0F0F0F0Fu), x0.z, isum);
    isum = dp4a_ss((int)(c.w & 0x0F0F0F0Fu), x0.w, isum);
    isum = dp4a_ss((int)((c.x >> 4) & 0x0F0F0F0Fu), x1.x, isum);
    isum = dp4a_ss((int)((c.y >> 4) & 0x0F0F0F0Fu), x1.y, isum);
    isum = dp4a_ss((int)((c.z >> 4) & 0x0F0F0F0Fu), x1.z, isum);
    isum = dp4a_ss((int)((c.w >> 4) & 0x0F0F0F0Fu), x1.w, isum);
  } else {
    const uint4 *qv = reinterpret_cast<const uint4 *>(q);
    const uint4 c0 = __ldg(qv), c1 = __ldg(qv + 1);
    if (SIGNED) {
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
  }
  return isum;
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
      const float s = to_f32(sc[row * groups + g]);
      if (BIAS) {
        acc[k] += s * dx.x * (float)isum + to_f32(bi[row * groups + g]) * dx.y;
      } else if (BITS == 4) {
        acc[k] += s * (dx.x * (float)isum - 8.f * dx.y);
      } else {
        acc[k] += s * dx.x * (float)isum;
      }
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

// y[i, r] (op)= row r . x_i for the activation row i = blockIdx.y. Block b takes R weight rows.
// EPI 0: write; 1: add to y (a residual); 2: SwiGLU, y[i, r] = silu(row r . x) * (row r+rows . x)
// (gate rows first, then up rows, stacked in one matrix of 2*rows rows; block b takes outputs
// r = b*R/2 .. +R/2, reading their gate and up rows).
template <int BITS, bool SIGNED, bool BIAS, typename S, int EPI, int R>
__device__ void qgemv(const uint8_t *__restrict__ qs, const S *__restrict__ sc,
                      const S *__restrict__ bi, const int8_t *__restrict__ xq,
                      const float2 *__restrict__ xd, float *__restrict__ y, int rows, int cols,
                      int group) {
  constexpr int H = R / 2;
  const int blk = blockIdx.x;
  const int first = EPI == 2 ? blk * H : blk * R;
  if (first >= rows) return;
  int rr[R];
#pragma unroll
  for (int k = 0; k < R; k++) {
    if (EPI == 2)
      rr[k] = k < H ? min(first + k, rows - 1) : min(first + k - H, rows - 1) + rows;
    else
      rr[k] = min(first + k, rows - 1);
  }
  const int i = blockIdx.y;
  float tot[R];
  rows_dot<BITS, SIGNED, BIAS, S, R>(qs, sc, bi, xq + (size_t)i * cols,
                                     xd + (size_t)i * (cols >> 5), rr, cols, group, tot);
  if (threadIdx.x != 0) return;
  y += (size_t)i * rows;
#pragma unroll
  for (int k = 0; k < (EPI == 2 ? H : R); k++) {
    if (first + k >= rows) break;
    if (EPI == 2) {
      const float g = tot[k];
      y[first + k] = g / (1.f + expf(-g)) * tot[k + H];
    } else if (EPI == 1) {
      y[first + k] += tot[k];
    } else {
      y[first + k] = tot[k];
    }
  }
}

// The stacked q/k/v projection of the decode step with RoPE (Su et al. 2021) and the KV-cache
// append in its epilogue: block b computes the two rows of one rotated pair (q or k: (2i, 2i+1)
// of a head when interleaved, else (i, i + head_dim/2)) or two adjacent v rows, rotates q/k by
// the tables cos/sin [positions, head_dim/2] at position params[0], and writes q to q_out and
// k, v to the layer's cache at that position (see the decode-step notes below for params, kv).
template <int BITS, bool SIGNED, bool BIAS, typename S>
__device__ void qgemv_rope(const uint8_t *__restrict__ qs, const S *__restrict__ sc,
                           const S *__restrict__ bi, const int8_t *__restrict__ xq,
                           const float2 *__restrict__ xd, int cols, int group,
                           const float *__restrict__ cos_t, const float *__restrict__ sin_t,
                           const int *__restrict__ params, const unsigned long long *__restrict__ kv,
                           int layer, float *__restrict__ q_out, int n_heads, int n_kv, int hd,
                           int interleaved, int kv_half) {
  const int half = hd >> 1;
  const int pairs_qk = (n_heads + n_kv) * half;
  const int blk = blockIdx.x;
  if (blk >= pairs_qk + n_kv * half) return;
  int rr[2];
  int head = 0, i = 0, i0 = 0, i1 = 0;
  if (blk < pairs_qk) {
    head = blk / half;
    i = blk % half;
    i0 = interleaved ? 2 * i : i;
    i1 = interleaved ? 2 * i + 1 : i + half;
    rr[0] = head * hd + i0;
    rr[1] = head * hd + i1;
  } else {
    rr[0] = (n_heads + n_kv) * hd + 2 * (blk - pairs_qk);
    rr[1] = rr[0] + 1;
  }
  float tot[2];
  rows_dot<BITS, SIGNED, BIAS, S, 2>(qs, sc, bi, xq, xd, rr, cols, group, tot);
  if (threadIdx.x != 0) return;
  const int pos = params[0], cap = params[2];
  // The cache holds f32, or f16 when kv_half (rounded to nearest).
  auto put = [&](unsigned long long base, size_t at, float val) {
    if (kv_half)
      reinterpret_cast<__half *>(base)[at] = __float2half_rn(val);
    else
      reinterpret_cast<float *>(base)[at] = val;
  };
  const unsigned long long kc = kv[2 * layer], vc = kv[2 * layer + 1];
  if (blk < pairs_qk) {
    const float c = cos_t[(size_t)pos * half + i], s = sin_t[(size_t)pos * half + i];
    const float a = tot[0], b = tot[1];
    const float r0 = a * c - b * s, r1 = a * s + b * c;
    if (head < n_heads) {
      q_out[(size_t)head * hd + i0] = r0;
      q_out[(size_t)head * hd + i1] = r1;
    } else {
      const size_t row = ((size_t)(head - n_heads) * cap + pos) * hd;
      put(kc, row + i0, r0);
      put(kc, row + i1, r1);
    }
  } else {
    const int u = rr[0] - (n_heads + n_kv) * hd, kvh = u / hd, d = u % hd;
    const size_t at = ((size_t)kvh * cap + pos) * hd + d;
    put(vc, at, tot[0]);
    put(vc, at + 1, tot[1]);
  }
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

#define QGEMV(NAME, BITS, SIGNED, BIAS, S, EPIN, EPI, R)                                       \
  extern "C" __global__ void qgemv##EPIN##R##_##NAME(const uint8_t *qs, const S *sc,             \
                                                     const S *bi, const int8_t *xq,                \
                                                     const float2 *xd, float *y, int rows,         \
                                                     int cols, int group) {                        \
    qgemv<BITS, SIGNED, BIAS, S, EPI, R>(qs, sc, bi, xq, xd, y, rows, cols, group);                \
  }
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
  extern "C" __global__ void qgemv_rope_##NAME(                                                     \
      const uint8_t *qs, const S *sc, const S *bi, const int8_t *xq, const float2 *xd, int cols,  \
      int group, const float *cos_t, const float *sin_t, const int *params,                        \
      const unsigned long long *kv, int layer, float *q_out, int n_heads, int n_kv, int hd,        \
      int interleaved, int kv_half) {                                                              \
    qgemv_rope<BITS, SIGNED, BIAS, S>(qs, sc, bi, xq, xd, cols, group, cos_t, sin_t, params, kv,  \
                                      layer, q_out, n_heads, n_kv, hd, interleaved, kv_half);      \
  }                                                                                                \
  extern "C" __global__ void qembed_##NAME(const uint8_t *qs, const S *sc, const S *bi,           \
                                           const unsigned int *ids, float *out, int n_ids,         \
                                           int cols, int group) {                                  \
    qembed<BITS, SIGNED, BIAS, S>(qs, sc, bi, ids, out, n_ids, cols, group);                       \
  }                                                                                                \
  extern "C" __global__ void qdequant_##NAME(const uint8_t *qs, const S *sc, const S *bi,         \
                                             uint4 *out, int rows, int cols, int group) {          \
    qdequant<BITS, SIGNED, BIAS, S>(qs, sc, bi, out, rows, cols, group);                           \
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
// `params` (device memory, set before each step): [0] position of the new token, [1] number of
// positions to attend (position + 1), [2] capacity of the KV cache buffers (positions).
// `kv` (device memory): per layer the addresses of its key and value buffers, each
// [kv_heads, capacity, head_dim] f32 or f16 (the decoder's choice, one for all layers).

// RMSNorm (Zhang & Sennrich 2019) of one row as ggml computes it (x * 1/sqrt(mean(x^2) + eps),
// then * weight), quantized to 8 bits per 32 values for the next GEMV. One block per row; each
// thread holds up to RMS_CHUNKS runs of 4 values in registers (n <= 4 * RMS_CHUNKS * blockDim.x,
// n a multiple of 32), and the 8 threads of a 32-value block reduce among themselves.
#define RMS_CHUNKS 4
extern "C" __global__ void rmsnorm_q8(const float *__restrict__ x, const float *__restrict__ w,
                                      float eps, int n, int8_t *__restrict__ xq,
                                      float2 *__restrict__ xd) {
  __shared__ float red[32];
  __shared__ float scale_s;
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nw = blockDim.x >> 5;
  float4 v[RMS_CHUNKS];
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < RMS_CHUNKS; c++) {
    const int i = 4 * (tid + c * blockDim.x);
    if (i < n) {
      v[c] = *reinterpret_cast<const float4 *>(x + i);
      ss += v[c].x * v[c].x + v[c].y * v[c].y + v[c].z * v[c].z + v[c].w * v[c].w;
    }
  }
  ss = warp_sum(ss);
  if (lane == 0) red[wid] = ss;
  __syncthreads();
  if (wid == 0) {
    float t = lane < nw ? red[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) scale_s = 1.f / sqrtf(t / (float)n + eps);
  }
  __syncthreads();
  const float scale = scale_s;
#pragma unroll
  for (int c = 0; c < RMS_CHUNKS; c++) {
    const int i = 4 * (tid + c * blockDim.x);
    if (4 * (c * blockDim.x) >= n) break;  // uniform across the block
    const bool in = i < n;
    float4 y = make_float4(0.f, 0.f, 0.f, 0.f);
    if (in) {
      const float4 ww = *reinterpret_cast<const float4 *>(w + i);
      y = make_float4((v[c].x * scale) * ww.x, (v[c].y * scale) * ww.y, (v[c].z * scale) * ww.z,
                      (v[c].w * scale) * ww.w);
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

// Final RMSNorm without quantization (the output layer may be another kernel's).
extern "C" __global__ void rmsnorm_f32(const float *__restrict__ x, const float *__restrict__ w,
                                       float eps, int n, float *__restrict__ y) {
  __shared__ float red[32];
  __shared__ float scale_s;
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nw = blockDim.x >> 5;
  float ss = 0.f;
  for (int i = tid; i < n; i += blockDim.x) ss += x[i] * x[i];
  ss = warp_sum(ss);
  if (lane == 0) red[wid] = ss;
  __syncthreads();
  if (wid == 0) {
    float v = lane < nw ? red[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) scale_s = 1.f / sqrtf(v / (float)n + eps);
  }
  __syncthreads();
  for (int i = tid; i < n; i += blockDim.x) y[i] = (x[i] * scale_s) * w[i];
}

// Decode attention split across blocks over the cached positions (flash-decoding, Dao et al.
// 2023) with grouped-query sharing: block (g, sp) of 4 warps attends the G query heads
// g*G .. g*G+G-1, which share one key/value head, to its share of the params[1] cached positions,
// so each key and value row is loaded once for the G heads. The split count follows the length:
// each split takes ceil(len / gridDim.y) positions but at least ATTN_MIN_CHUNK, and blocks past
// the last needed split exit at once (the graph is recorded once, with gridDim.y = the most
// splits). Each warp walks ATTN_TILE positions at a time (independent loads in flight), with an
// online softmax (Milakov & Gimelshein 2018); the block writes the unnormalized output and
// (max, sum) per head, and the last block of the group to finish (counted in done[g], reset
// after) merges the splits and quantizes the heads' outputs for the output projection.
// head_dim = 32 * EPL.
#define ATTN_MIN_CHUNK 16
#define ATTN_TILE 8
// Most splits (gridDim.y) the merge takes.
#define ATTN_MAX_SPLITS 128
// EPL values of row t at lane's offset, widened to f32 (the cache holds float or __half).
template <int EPL>
__device__ __forceinline__ void load_row(const float *__restrict__ src, float *out) {
  if (EPL == 4) {
    const float4 v = __ldcs(reinterpret_cast<const float4 *>(src));
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    const float2 v = __ldcs(reinterpret_cast<const float2 *>(src));
    out[0] = v.x, out[1] = v.y;
  }
}
template <int EPL>
__device__ __forceinline__ void load_row(const __half *__restrict__ src, float *out) {
  if (EPL == 4) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2 *>(src));
    const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&v.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&v.y));
    out[0] = a.x, out[1] = a.y, out[2] = b.x, out[3] = b.y;
  } else {
    const unsigned v = __ldcs(reinterpret_cast<const unsigned *>(src));
    const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&v));
    out[0] = a.x, out[1] = a.y;
  }
}

template <int EPL, int G, typename KT>
__device__ void attn_gqa(const float *__restrict__ q, const int *__restrict__ params,
                         const unsigned long long *__restrict__ kv, int layer, int n_heads,
                         int n_kv, float scale, float *__restrict__ part_o,
                         float2 *__restrict__ part_ml, unsigned int *__restrict__ done,
                         int8_t *__restrict__ xq, float2 *__restrict__ xd) {
  constexpr int HD = 32 * EPL;
  __shared__ float sm_o[4][G][HD];
  __shared__ float sm_m[4][G], sm_l[4][G];
  __shared__ bool last;
  const int grp = blockIdx.x, sp = blockIdx.y, maxsplit = gridDim.y;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int len = params[1], cap = params[2];
  const int chunk = max(ATTN_MIN_CHUNK, (len + maxsplit - 1) / maxsplit);
  const int nsplit = (len + chunk - 1) / chunk;
  if (sp >= nsplit) return;
  const int start = sp * chunk, end = min(len, start + chunk);
  const int h0 = grp * G;
  const int kvh = h0 / (n_heads / n_kv);
  const KT *K = reinterpret_cast<const KT *>(kv[2 * layer]) + (size_t)kvh * cap * HD;
  const KT *V = reinterpret_cast<const KT *>(kv[2 * layer + 1]) + (size_t)kvh * cap * HD;
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
        load_row<EPL>(K + (size_t)t * HD + lane * EPL, kr[p]);
        load_row<EPL>(V + (size_t)t * HD + lane * EPL, vr[p]);
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
      for (int p = 0; p < ATTN_TILE; p++) s[g][p] = warp_sum(s[g][p]);
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
    for (int e = 0; e < EPL; e++) sm_o[w][g][lane * EPL + e] = acc[g][e];
    if (lane == 0) {
      sm_m[w][g] = m[g];
      sm_l[w][g] = l[g];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
    const int g = i / HD, d = i % HD;
    float M = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; j++) M = fmaxf(M, sm_m[j][g]);
    float o = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++)
      if (sm_l[j][g] > 0.f) o += sm_o[j][g][d] * expf(sm_m[j][g] - M);
    part_o[((size_t)(h0 + g) * maxsplit + sp) * HD + d] = o;
  }
  if (threadIdx.x < G) {
    const int g = threadIdx.x;
    float M = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; j++) M = fmaxf(M, sm_m[j][g]);
    float L = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++)
      if (sm_l[j][g] > 0.f) L += sm_l[j][g] * expf(sm_m[j][g] - M);
    part_ml[(size_t)(h0 + g) * maxsplit + sp] = make_float2(M, L);
  }
  // The last block of the group merges (threadFenceReduction pattern).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int prev = atomicAdd(done + grp, 1u);
    last = prev == (unsigned int)nsplit - 1;
    if (last) done[grp] = 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  // The merge: split weights exp(m_s - max) once per head in shared memory, then each output
  // sums its splits with independent loads.
  __shared__ float sm_f[G][ATTN_MAX_SPLITS], sm_ml[G][ATTN_MAX_SPLITS][2], sm_inv[G];
  for (int i = threadIdx.x; i < G * nsplit; i += blockDim.x) {
    const int g = i / nsplit, s2 = i % nsplit;
    const float2 ml = __ldcg(part_ml + (size_t)(h0 + g) * maxsplit + s2);
    sm_ml[g][s2][0] = ml.x;
    sm_ml[g][s2][1] = ml.y;
  }
  __syncthreads();
  if (threadIdx.x < G) {
    const int g = threadIdx.x;
    float Mx = -INFINITY;
    for (int s2 = 0; s2 < nsplit; s2++)
      if (sm_ml[g][s2][1] > 0.f) Mx = fmaxf(Mx, sm_ml[g][s2][0]);
    float L = 0.f;
    for (int s2 = 0; s2 < nsplit; s2++) {
      const float f = sm_ml[g][s2][1] > 0.f ? expf(sm_ml[g][s2][0] - Mx) : 0.f;
      sm_f[g][s2] = f;
      L += sm_ml[g][s2][1] * f;
    }
    sm_inv[g] = 1.f / L;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
    const int g = i / HD, d = i % HD, h = h0 + g;
    const float *po = part_o + (size_t)h * maxsplit * HD + d;
    float O = 0.f;
#pragma unroll 8
    for (int s2 = 0; s2 < nsplit; s2++) O += __ldcg(po + (size_t)s2 * HD) * sm_f[g][s2];
    const int k = h * HD + d;
    // A warp covers 32 consecutive outputs of one head: one quantization block.
    quant_block32(O * sm_inv[g], d & 31, xq + (k & ~31), xd + (k >> 5));
  }
}

#define ATTN_KERNEL(HDIM, EPL, G, KT, KN)                                                          \
  extern "C" __global__ void __launch_bounds__(128)                                                \
      attn_gqa_d##HDIM##_g##G##_##KN(const float *q, const int *params,                            \
                                     const unsigned long long *kv, int layer, int n_heads,         \
                                     int n_kv, float scale, float *part_o, float2 *part_ml,        \
                                     unsigned int *done, int8_t *xq, float2 *xd) {                 \
    attn_gqa<EPL, G, KT>(q, params, kv, layer, n_heads, n_kv, scale, part_o, part_ml, done, xq,    \
                         xd);                                                                      \
  }
#define ATTN_KERNELS(G)                                                                            \
  ATTN_KERNEL(64, 2, G, float, f32)                                                                \
  ATTN_KERNEL(128, 4, G, float, f32)                                                               \
  ATTN_KERNEL(64, 2, G, __half, f16)                                                               \
  ATTN_KERNEL(128, 4, G, __half, f16)
ATTN_KERNELS(1)
ATTN_KERNELS(2)
ATTN_KERNELS(4)
ATTN_KERNELS(8)

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
