// MLX affine group-quantized matrices on NVIDIA GPUs (see src/quant/mlx_affine.rs for the layout):
// weight [rows, cols*bits/32] u32 with code j of a word at bits [j*bits, (j+1)*bits) (low bits
// first), scales/biases [rows, cols/group] in T (f32, f16 or bf16); w = scale * q + bias.
// Built by build.rs with nvcc into PTX for compute_90 when the `cuda` feature is on.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// y[i, r] = sum_k x[i, k] * (s[r, k/g] * q[r, k] + b[r, k/g]) for i < m (m <= 8).
// One warp per output row; each lane reads 16 bytes of codes at a time (32 codes at 4 bits,
// 16 at 8 bits, all inside one group since g >= 32), and per chunk forms
// s * dot(q, x) + b * sum(x). Warp shuffle reduction at the end.
template <int BITS, typename T, int M>
__device__ void gemv(const float *__restrict__ x, const uint32_t *__restrict__ w,
                     const T *__restrict__ scales, const T *__restrict__ biases,
                     float *__restrict__ y, int m, int rows, int cols, int group) {
  constexpr int VPW = 32 / BITS;          // codes per word
  constexpr int VPC = 4 * VPW;            // codes per 16-byte chunk
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= rows) return;
  const int r = warp;
  const int chunks = cols / VPC;
  const int groups = cols / group;
  const uint4 *wr = reinterpret_cast<const uint4 *>(w + (size_t)r * (cols / VPW));
  const T *sr = scales + (size_t)r * groups;
  const T *br = biases + (size_t)r * groups;
  float acc[M];
#pragma unroll
  for (int i = 0; i < M; i++) acc[i] = 0.f;
#pragma unroll 4
  for (int c = lane; c < chunks; c += 32) {
    const uint4 q4 = __ldg(wr + c);
    const int g = (c * VPC) / group;
    const float s = to_f32(sr[g]);
    const float b = to_f32(br[g]);
    const uint32_t words[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
    for (int i = 0; i < M; i++) {
      if (i >= m) break;
      const float4 *xv = reinterpret_cast<const float4 *>(x + (size_t)i * cols + (size_t)c * VPC);
      float dot = 0.f, xs = 0.f;
#pragma unroll
      for (int wi = 0; wi < 4; wi++) {
#pragma unroll
        for (int j4 = 0; j4 < VPW / 4; j4++) {
          const float4 xx = __ldg(xv + wi * (VPW / 4) + j4);
          const uint32_t word = words[wi] >> (j4 * 4 * BITS);
          dot += xx.x * (float)(word & MASK) + xx.y * (float)((word >> BITS) & MASK) +
                 xx.z * (float)((word >> (2 * BITS)) & MASK) +
                 xx.w * (float)((word >> (3 * BITS)) & MASK);
          xs += (xx.x + xx.y) + (xx.z + xx.w);
        }
      }
      acc[i] += s * dot + b * xs;
    }
  }
#pragma unroll
  for (int i = 0; i < M; i++) {
    if (i >= m) break;
    float v = acc[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) y[(size_t)i * rows + r] = v;
  }
}

// out[r, k] = (half)(s * q + b): the weight for a cuBLAS f16 GEMM (prefill). One thread per word.
template <int BITS, typename T>
__device__ void dequant_f16(const uint32_t *__restrict__ w, const T *__restrict__ scales,
                            const T *__restrict__ biases, __half *__restrict__ out, int rows,
                            int cols, int group) {
  constexpr int VPW = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const size_t words_per_row = cols / VPW;
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)rows * words_per_row) return;
  const size_t r = idx / words_per_row;
  const size_t k0 = (idx % words_per_row) * VPW;
  const size_t gi = r * (cols / group) + k0 / group;
  const float s = to_f32(scales[gi]);
  const float b = to_f32(biases[gi]);
  const uint32_t word = w[idx];
  __half *o = out + r * cols + k0;
#pragma unroll
  for (int j = 0; j < VPW; j++) o[j] = __float2half(s * (float)((word >> (j * BITS)) & MASK) + b);
}

#define GEMV(BITS, T, TN)                                                                          \
  extern "C" __global__ void mlx_gemv1_b##BITS##_##TN(const float *x, const uint32_t *w,           \
                                                      const T *s, const T *b, float *y, int m,     \
                                                      int rows, int cols, int group) {             \
    gemv<BITS, T, 1>(x, w, s, b, y, m, rows, cols, group);                                          \
  }                                                                                                \
  extern "C" __global__ void mlx_gemv8_b##BITS##_##TN(const float *x, const uint32_t *w,           \
                                                      const T *s, const T *b, float *y, int m,     \
                                                      int rows, int cols, int group) {             \
    gemv<BITS, T, 8>(x, w, s, b, y, m, rows, cols, group);                                          \
  }                                                                                                \
  extern "C" __global__ void mlx_dequant_b##BITS##_##TN(const uint32_t *w, const T *s,             \
                                                        const T *b, __half *out, int rows,         \
                                                        int cols, int group) {                     \
    dequant_f16<BITS, T>(w, s, b, out, rows, cols, group);                                          \
  }

GEMV(4, float, f32)
GEMV(4, __half, f16)
GEMV(4, __nv_bfloat16, bf16)
GEMV(8, float, f32)
GEMV(8, __half, f16)
GEMV(8, __nv_bfloat16, bf16)
