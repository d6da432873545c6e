// Token sampling on the GPU (src/cuda/sample.rs): the chain of src/sampling.rs (sanitize, an
// added mask such as a grammar's, repetition penalty, log-softmax when top-p is on, top-k,
// min-p, top-p, temperature, then one draw by inverse CDF in token-id order) in one kernel of
// one 1024-thread block, with no sort of the vocabulary: the filters keep a prefix of the
// ranking (larger value first, lower id on ties), so a histogram of the distance to the top
// logit picks a threshold, the tokens above it (a few hundred) are gathered and sorted in
// shared memory, and the kept prefix is found on them. With no filter (temperature only) the
// draw runs over the whole vocabulary as a block scan. Only the token id (and a status) is
// written back. Built by build.rs with nvcc into a fat binary.
#include <stdint.h>

#define SAMPLE_THREADS 1024
// Histogram bins over SAMPLE_RANGE nats below the top logit; the last bin holds the rest.
#define SAMPLE_BINS 2048
#define SAMPLE_RANGE 32.f
// Most candidates gathered for the sort; more (a very flat distribution) -> status 1.
#define SAMPLE_CAP 2048

__device__ __forceinline__ float sanitize(float v) {
  if (isnan(v)) return -INFINITY;
  if (v == INFINITY) return 3.402823466e38f;
  return v;
}

__device__ __forceinline__ int bin_of(float max, float x) {
  const float d = (max - x) * ((SAMPLE_BINS - 1) / SAMPLE_RANGE);
  return d >= (float)(SAMPLE_BINS - 1) ? SAMPLE_BINS - 1 : (int)d;
}

// Ranking of the filters: a before b when a's value is larger, or equal with a lower id.
__device__ __forceinline__ bool before(float va, unsigned ia, float vb, unsigned ib) {
  return va > vb || (va == vb && ia < ib);
}

// f(i, x) for every i < n, x = p[i]: 16-byte loads (p 16-byte aligned), unrolled so that each
// thread keeps several loads in flight (one block streams the whole vocabulary), then the tail.
template <typename F>
__device__ __forceinline__ void for_each(const float *__restrict__ p, int n, F f) {
  const int n4 = n >> 2;
  const float4 *p4 = reinterpret_cast<const float4 *>(p);
#pragma unroll 4
  for (int j = threadIdx.x; j < n4; j += blockDim.x) {
    const float4 v = p4[j];
    f(4 * j, v.x);
    f(4 * j + 1, v.y);
    f(4 * j + 2, v.z);
    f(4 * j + 3, v.w);
  }
  for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) f(i, p[i]);
}

template <typename T>
__device__ T block_reduce(T v, T (*op)(T, T), T *red) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) red[wid] = v;
  __syncthreads();
  T r = red[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); w++) r = op(r, red[w]);
  return r;
}
__device__ float op_max(float a, float b) { return fmaxf(a, b); }
__device__ double op_add(double a, double b) { return a + b; }
__device__ int op_maxi(int a, int b) { return max(a, b); }
__device__ int op_addi(int a, int b) { return a + b; }

// Bitonic sort of n (a power of two <= SAMPLE_CAP) (value, id) pairs in shared memory: by
// ranking (BY_ID false) or by id ascending (BY_ID true).
template <bool BY_ID>
__device__ void bitonic(float *v, unsigned *id, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int l = i ^ j;
        if (l > i) {
          const bool up = (i & k) == 0;
          const bool lfirst = BY_ID ? id[l] < id[i] : before(v[l], id[l], v[i], id[i]);
          if (lfirst == up) {
            const float tv = v[i];
            v[i] = v[l];
            v[l] = tv;
            const unsigned ti = id[i];
            id[i] = id[l];
            id[l] = ti;
          }
        }
      }
      __syncthreads();
    }
  }
}

// sample_row (one block): logits [n] f32 (read only) -> out[0] the token id, out[1] the
// status: 0 drawn, 1 too many candidates (the caller samples on the CPU with the same draw u).
// work [n] f32 scratch.
// pen_ids [n_pen]: distinct ids < n whose logit the repetition penalty rewrites (x < 0: x *
// penalty, else x / penalty). top_k 0: off; top_p >= 1: off (and no log-softmax); ln_min_p
// -inf: min-p off (else ln(min_p), computed by the caller as the CPU does); inv_temp = 1 / T;
// u in [0, 1) the uniform draw. mask (may be null): ceil(n / 32) words, bit i % 32 of word i / 32
// set when id i may be drawn (a grammar's mask; the others are -inf from the start).
__device__ __forceinline__ void sample_row(const float *__restrict__ logits,
                                           float *__restrict__ work, int n,
                                           const unsigned *__restrict__ mask,
                                           const unsigned *__restrict__ pen_ids, int n_pen,
                                           float penalty, int top_k, float top_p,
                                           float ln_min_p, float inv_temp, double u,
                                           unsigned *__restrict__ out) {
  __shared__ float sv[SAMPLE_CAP];
  __shared__ unsigned si[SAMPLE_CAP];
  __shared__ int hist[SAMPLE_BINS];
  __shared__ double mass[SAMPLE_BINS];
  __shared__ double redd[32];
  __shared__ float redf[32];
  __shared__ int redi[32];
  __shared__ int s_count, s_keep, s_bin;
  const int tid = threadIdx.x, nt = blockDim.x;
  const bool use_p = top_p < 1.f;
  // 1. sanitize, the mask, penalty; the top value and the drawable count.
  if (mask)
    for_each(logits, n, [&](int i, float x) {
      work[i] = (mask[i >> 5] >> (i & 31)) & 1u ? sanitize(x) : -INFINITY;
    });
  else
    for_each(logits, n, [&](int i, float x) { work[i] = sanitize(x); });
  __syncthreads();
  for (int j = tid; j < n_pen; j += nt) {
    const float l = work[pen_ids[j]];
    work[pen_ids[j]] = l < 0.f ? l * penalty : l / penalty;
  }
  __syncthreads();
  float mx = -INFINITY;
  int drawable = 0;
  for_each(work, n, [&](int, float x) {
    mx = fmaxf(mx, x);
    drawable += x > -INFINITY;
  });
  mx = block_reduce<float>(mx, op_max, redf);
  if (mx == -INFINITY) {  // nothing drawable: the CPU returns 0
    if (tid == 0) out[0] = 0, out[1] = 0;
    return;
  }
  const bool filters = top_k > 0 || use_p || ln_min_p > -INFINITY;
  if (!filters) {
    // 2a. Temperature only: inverse CDF over the whole vocabulary in id order. Each thread
    // sums a contiguous range; a scan of the range sums finds the range holding the target.
    const float vmax = mx * inv_temp;
    const int per = (n + nt - 1) / nt, lo = min(n, tid * per), hi = min(n, lo + per);
    // __fmul_rn: the product rounded before the subtraction (no FMA), as on the CPU.
    auto weight = [&](float x) { return x > -INFINITY ? expf(__fmul_rn(x, inv_temp) - vmax) : 0.f; };
    double sum = 0.0;
    int last = -1;
    for (int i = lo; i < hi; i++) {
      const float w = weight(work[i]);
      if (w > 0.f) sum += (double)w, last = i;
    }
    // Inclusive scan of the range sums: in the warp, then over the warps' totals. A thread's
    // range is [before + excl, before + incl), the next one's starts at the same number.
    const int lane = tid & 31, wid = tid >> 5;
    double incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    double excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = 0.0;
    __syncthreads();
    if (lane == 31) redd[wid] = incl;
    __syncthreads();
    double before_w = 0.0, total = 0.0;
    for (int w = 0; w < (nt >> 5); w++) {
      if (w == wid) before_w = total;
      total += redd[w];
    }
    const int last_all = block_reduce<int>(last, op_maxi, redi);
    const double lower = before_w + excl, upper = before_w + incl, target = u * total;
    if (tid == 0) out[0] = (unsigned)max(last_all, 0), out[1] = 0;
    __syncthreads();
    if (sum > 0.0 && target >= lower && target < upper) {
      double acc = lower;
      int pick = last;
      for (int i = lo; i < hi; i++) {
        const float w = weight(work[i]);
        if (w > 0.f) {
          acc += (double)w;
          if (target < acc) {
            pick = i;
            break;
          }
        }
      }
      out[0] = (unsigned)pick;
    }
    return;
  }
  // 3. Histogram of the distance to the top: counts, and masses exp(x - max) where top-p must
  // find its own bin (a binding top-k already bounds the kept prefix, and the masses' double
  // atomics serialize when the logits crowd into a few bins: 0.13 ms a token on a 128k
  // vocabulary). The total mass (top-p's log-sum-exp) is a block reduction.
  const int valid = block_reduce<int>(drawable, op_addi, redi);
  const bool bin_mass = use_p && !(top_k > 0 && top_k < valid);
  for (int b = tid; b < SAMPLE_BINS; b += nt) hist[b] = 0, mass[b] = 0.0;
  __syncthreads();
  double local_mass = 0.0;
  for_each(work, n, [&](int, float x) {
    if (x > -INFINITY) {
      const int b = bin_of(mx, x);
      atomicAdd(&hist[b], 1);
      if (use_p) {
        const double e = (double)expf(x - mx);
        local_mass += e;
        if (bin_mass) atomicAdd(&mass[b], e);
      }
    }
  });
  const double total = use_p ? block_reduce<double>(local_mass, op_add, redd) : 0.0;
  __syncthreads();
  // Inclusive scans of the counts and masses over the bins (Hillis-Steele, in place).
  for (int off = 1; off < SAMPLE_BINS; off <<= 1) {
    int hc[SAMPLE_BINS / SAMPLE_THREADS];
    double mc[SAMPLE_BINS / SAMPLE_THREADS];
#pragma unroll
    for (int r = 0; r < SAMPLE_BINS / SAMPLE_THREADS; r++) {
      const int b = tid + r * SAMPLE_THREADS;
      hc[r] = b >= off ? hist[b - off] : 0;
      mc[r] = b >= off ? mass[b - off] : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < SAMPLE_BINS / SAMPLE_THREADS; r++) {
      const int b = tid + r * SAMPLE_THREADS;
      hist[b] += hc[r];
      mass[b] += mc[r];
    }
    __syncthreads();
  }
  // The last bin the kept prefix may reach (the first bin where the count reaches top-k, where
  // the mass reaches top-p, the bin of the min-p threshold), plus one bin of slack for rounding.
  if (tid == 0) s_bin = SAMPLE_BINS - 1;
  __syncthreads();
  for (int b = tid; b < SAMPLE_BINS; b += nt) {
    const int below = b > 0 ? hist[b - 1] : 0;
    if (top_k > 0 && top_k < valid && hist[b] >= top_k && below < top_k) atomicMin(&s_bin, b);
    const double mbelow = b > 0 ? mass[b - 1] : 0.0, target = (double)top_p * total;
    if (bin_mass && mass[b] >= target && mbelow < target) atomicMin(&s_bin, b);
  }
  __syncthreads();
  if (tid == 0) {
    int stop = s_bin;
    if (ln_min_p > -INFINITY) stop = min(stop, bin_of(mx, mx + ln_min_p));
    stop = min(stop + 1, SAMPLE_BINS - 1);
    const int count = hist[stop];
    s_bin = stop;
    // The last bin holds every value from SAMPLE_RANGE below the top on: reaching it gathers
    // every drawable token, which fits when few are left (a grammar's mask).
    s_count = count > SAMPLE_CAP ? -1 : count;
    s_keep = 0;
    // The log-softmax's log-sum-exp (top-p only): max + ln(sum of exp(x - max)).
    redd[0] = (double)mx + log(total);
  }
  __syncthreads();
  if (s_count < 0) {
    if (tid == 0) out[0] = 0, out[1] = 1;
    return;
  }
  // 4. Gather the candidates (their values after the log-softmax), sort them by ranking.
  const int stop = s_bin, count = s_count;
  const double lse = redd[0];
  for_each(work, n, [&](int i, float x) {
    if (x > -INFINITY && bin_of(mx, x) <= stop) {
      const int k = atomicAdd(&s_keep, 1);
      sv[k] = use_p ? (float)((double)x - lse) : x;
      si[k] = (unsigned)i;
    }
  });
  int np2 = 1;
  while (np2 < count) np2 <<= 1;
  for (int k = count + tid; k < np2; k += nt) sv[k] = -INFINITY, si[k] = 0xffffffffu;
  __syncthreads();
  bitonic<false>(sv, si, np2);
  // 5. The kept prefix: top-k, then min-p against the top value, then top-p (mass of the
  // tokens ranked above < top_p), as the CPU chain applies them.
  if (tid == 0) {
    int keep = count;
    if (top_k > 0 && top_k < keep) keep = top_k;
    if (ln_min_p > -INFINITY) {
      const float thr = sv[0] + ln_min_p;
      for (int r = 0; r < keep; r++)
        if (sv[r] < thr) {
          keep = r;
          break;
        }
    }
    if (use_p) {
      double above = 0.0;
      for (int r = 0; r < keep; r++) {
        if (above >= (double)top_p) {
          keep = r;
          break;
        }
        above += (double)expf(sv[r]);
      }
    }
    s_keep = keep;
    redf[0] = sv[0] * inv_temp;
  }
  __syncthreads();
  const int keep = s_keep;
  const float vmax = redf[0];
  __syncthreads();
  // 6. The draw: weights exp(v * inv_temp - vmax) in id order.
  int kp2 = 1;
  while (kp2 < keep) kp2 <<= 1;
  for (int k = keep + tid; k < kp2; k += nt) sv[k] = -INFINITY, si[k] = 0xffffffffu;
  __syncthreads();
  bitonic<true>(sv, si, kp2);
  if (tid == 0) {
    double total = 0.0;
    for (int r = 0; r < keep; r++) {
      const float w = expf(__fmul_rn(sv[r], inv_temp) - vmax);
      if (w > 0.f) total += (double)w;
    }
    const double target = u * total;
    double acc = 0.0;
    unsigned pick = si[0];
    for (int r = 0; r < keep; r++) {
      const float w = expf(__fmul_rn(sv[r], inv_temp) - vmax);
      if (w > 0.f) {
        acc += (double)w;
        pick = si[r];
        if (target < acc) break;
      }
    }
    out[0] = pick;
    out[1] = 0;
  }
}

// The rows of a batch's logits at once, one block a row: row r of logits [rows, stride] f32
// (its first n values; stride a multiple of 4, for for_each's 16-byte loads) is drawn as
// sample_row draws it alone, with work [rows, stride] scratch and params [rows, 8] u32: the
// first of its penalized ids in pen_ids, their count, penalty (f32 bits), top_k, top_p (f32
// bits), ln_min_p (f32 bits), inv_temp (f32 bits), and its mask (0: none; m > 0: words
// (m - 1) * ceil(n / 32) .. of masks); us[r] its draw; out[2r], out[2r + 1] its id and status.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_tokens(const float *__restrict__ logits, long long stride, float *__restrict__ work,
                  int n, const unsigned *__restrict__ pen_ids,
                  const unsigned *__restrict__ params, const double *__restrict__ us,
                  const unsigned *__restrict__ masks, unsigned *__restrict__ out) {
  const int r = blockIdx.x;
  const unsigned *p = params + 8 * r;
  const unsigned *mask = p[7] ? masks + (size_t)(p[7] - 1) * ((n + 31) / 32) : nullptr;
  sample_row(logits + (long long)r * stride, work + (long long)r * stride, n, mask,
             pen_ids + p[0], (int)p[1], __uint_as_float(p[2]), (int)p[3],
             __uint_as_float(p[4]), __uint_as_float(p[5]), __uint_as_float(p[6]), us[r],
             out + 2 * r);
}
