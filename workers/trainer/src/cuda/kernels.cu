// Fused row kernels of the trainer's CUDA path (see cuda.rs): each replaces a chain of
// candle's elementwise and broadcast kernels over a [rows, cols] matrix with one block per
// row and f32 arithmetic, reading the input once or twice and writing the output once.
//
// - masked_softmax: attention probabilities from raw scores, with the causal-and-segment
//   mask computed from segment ids on the fly (no [b, t, t] mask tensor);
// - softmax_bwd: ds = p * (dp - sum(p * dp)) per row;
// - row_lse: log-sum-exp of each row (online max and sum, one pass);
// - ce_grad: (softmax - onehot(target)) * scale from logits and their log-sum-exp;
// - rms_norm_bwd: the RMSNorm input gradient in one pass over each row;
// - swiglu_bwd: both input gradients of silu(g) * u in one elementwise pass.
#include "common.cuh"

#define BLOCK 256

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// Block-wide max and sum (blockDim.x a multiple of 32, at most 1024).
__device__ float block_max(float v, float *sh) {
  v = warp_max(v);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  int nw = blockDim.x >> 5;
  v = (threadIdx.x < nw) ? sh[threadIdx.x] : -INFINITY;
  if (warp == 0) v = warp_max(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  v = sh[0];
  __syncthreads();
  return v;
}
__device__ float block_sum(float v, float *sh) {
  v = warp_sum(v);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  int nw = blockDim.x >> 5;
  v = (threadIdx.x < nw) ? sh[threadIdx.x] : 0.f;
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  v = sh[0];
  __syncthreads();
  return v;
}

// s, p: [rows, t] with rows = b * heads * t (query i of batch row bi is row (bi*heads + h)*t + i).
// seg: [b, t]. Key j is visible to query i when j <= i and seg[j] == seg[i].
template <typename T>
__device__ void masked_softmax(const T *s, T *p, const uint32_t *seg, uint32_t t,
                               uint32_t heads) {
  __shared__ float sh[32];
  const uint64_t row = blockIdx.x;
  const uint32_t i = row % t;
  const uint64_t bi = row / ((uint64_t)t * heads);
  const uint32_t *sg = seg + bi * t;
  const uint32_t si = sg[i];
  const T *x = s + row * t;
  T *y = p + row * t;
  float m = -INFINITY;
  for (uint32_t j = threadIdx.x; j <= i; j += blockDim.x)
    if (sg[j] == si) m = fmaxf(m, to_f(x[j]));
  m = block_max(m, sh);
  float sum = 0.f;
  for (uint32_t j = threadIdx.x; j <= i; j += blockDim.x)
    if (sg[j] == si) sum += __expf(to_f(x[j]) - m);
  sum = block_sum(sum, sh);
  const float inv = 1.f / sum;
  for (uint32_t j = threadIdx.x; j < t; j += blockDim.x) {
    float v = (j <= i && sg[j] == si) ? __expf(to_f(x[j]) - m) * inv : 0.f;
    y[j] = from_f<T>(v);
  }
}

// ds = p * (dp - sum_j p * dp), per row of length t.
template <typename T>
__device__ void softmax_bwd(const T *p, const T *dp, T *ds, uint32_t t) {
  __shared__ float sh[32];
  const uint64_t row = blockIdx.x;
  const T *a = p + row * t;
  const T *g = dp + row * t;
  T *o = ds + row * t;
  float dot = 0.f;
  for (uint32_t j = threadIdx.x; j < t; j += blockDim.x) dot += to_f(a[j]) * to_f(g[j]);
  dot = block_sum(dot, sh);
  for (uint32_t j = threadIdx.x; j < t; j += blockDim.x) {
    float pj = to_f(a[j]);
    o[j] = from_f<T>(pj * (to_f(g[j]) - dot));
  }
}

// lse[row] = log(sum_j exp(x[row, j])), one pass with an online max.
template <typename T>
__device__ void row_lse(const T *x, float *lse, uint32_t cols) {
  __shared__ float sh[32];
  const uint64_t row = blockIdx.x;
  const T *r = x + row * cols;
  float m = -INFINITY, s = 0.f;
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
    float v = to_f(r[j]);
    if (v > m) {
      s = s * __expf(m - v) + 1.f;
      m = v;
    } else {
      s += __expf(v - m);
    }
  }
  float gm = block_max(m, sh);
  s = (m == -INFINITY) ? 0.f : s * __expf(m - gm);
  s = block_sum(s, sh);
  if (threadIdx.x == 0) lse[row] = gm + logf(s);
}

// d[row, j] = (exp(x[row, j] - lse[row]) - [j == target[row]]) * scale.
template <typename T>
__device__ void ce_grad(const T *x, const uint32_t *target, const float *lse, T *d,
                        uint32_t cols, float scale) {
  const uint64_t row = blockIdx.x;
  const T *r = x + row * cols;
  T *o = d + row * cols;
  const float l = lse[row];
  const uint32_t tg = target[row];
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
    float v = __expf(to_f(r[j]) - l) - (j == tg ? 1.f : 0.f);
    o[j] = from_f<T>(v * scale);
  }
}

// RMSNorm backward, per row of length h: with r = rsqrt(mean(x^2) + eps) and g = dy * w,
// dx = r * (g - x * r^2 * mean(g * x)).
template <typename T>
__device__ void rms_norm_bwd(const T *x, const T *w, const T *dy, T *dx, uint32_t h,
                             float eps) {
  __shared__ float sh[32];
  const uint64_t row = blockIdx.x;
  const T *a = x + row * h;
  const T *g = dy + row * h;
  T *o = dx + row * h;
  float s1 = 0.f, s2 = 0.f;
  for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) {
    float xv = to_f(a[j]);
    s1 += xv * xv;
    s2 += to_f(g[j]) * to_f(w[j]) * xv;
  }
  s1 = block_sum(s1, sh);
  s2 = block_sum(s2, sh);
  const float r = rsqrtf(s1 / h + eps);
  const float c = r * r * s2 / h;
  for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) {
    float xv = to_f(a[j]);
    o[j] = from_f<T>(r * (to_f(g[j]) * to_f(w[j]) - xv * c));
  }
}

// SwiGLU backward: h = silu(g) * u; out[0] = dg, out[1] = du (each n values).
template <typename T>
__device__ void swiglu_bwd(const T *g, const T *u, const T *dh, T *out, uint64_t n) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    float gv = to_f(g[i]), uv = to_f(u[i]), d = to_f(dh[i]);
    float sg = 1.f / (1.f + __expf(-gv));
    out[i] = from_f<T>(d * uv * sg * (1.f + gv * (1.f - sg)));
    out[n + i] = from_f<T>(d * gv * sg);
  }
}

#define OPS(T, SUF)                                                                      \
  extern "C" __global__ void masked_softmax_##SUF(const T *s, T *p, const uint32_t *seg,  \
                                                   uint32_t t, uint32_t heads) {          \
    masked_softmax<T>(s, p, seg, t, heads);                                               \
  }                                                                                       \
  extern "C" __global__ void softmax_bwd_##SUF(const T *p, const T *dp, T *ds,            \
                                               uint32_t t) {                              \
    softmax_bwd<T>(p, dp, ds, t);                                                         \
  }                                                                                       \
  extern "C" __global__ void row_lse_##SUF(const T *x, float *lse, uint32_t cols) {       \
    row_lse<T>(x, lse, cols);                                                             \
  }                                                                                       \
  extern "C" __global__ void ce_grad_##SUF(const T *x, const uint32_t *target,            \
                                           const float *lse, T *d, uint32_t cols,         \
                                           float scale) {                                 \
    ce_grad<T>(x, target, lse, d, cols, scale);                                           \
  }                                                                                       \
  extern "C" __global__ void rms_norm_bwd_##SUF(const T *x, const T *w, const T *dy, T *dx, \
                                                uint32_t h, float eps) {                  \
    rms_norm_bwd<T>(x, w, dy, dx, h, eps);                                                \
  }                                                                                       \
  extern "C" __global__ void swiglu_bwd_##SUF(const T *g, const T *u, const T *dh, T *out,  \
                                              uint64_t n) {                               \
    swiglu_bwd<T>(g, u, dh, out, n);                                                      \
  }

OPS(float, f32)
OPS(__nv_bfloat16, bf16)
