// Decode attention over a paged KV cache (see src/model/paged.rs): one thread block per
// (sequence, query head), four warps that each take every fourth cached token, an online
// softmax per warp in f32, and the warps' partial results combined in shared memory.
//
// q:      [n, heads, D]                 the step's queries (RoPE applied)
// k, v:   [blocks * 16, kv_heads * D]   a layer's pools, row = block * 16 + offset
// meta:   [n, meta_w] u32               per sequence: its length, then its block ids
// out:    [n, heads, D]
//
// Grouped-query heads: query head h reads kv head h / (heads / kv_heads). Each lane holds
// D / 32 consecutive elements of the query and of the accumulator.
#include "common.cuh"

#define KV_BLOCK 16
#define WARPS 4

template <typename T, int D>
__device__ void paged_attention(const T *__restrict__ q, const T *__restrict__ k,
                                const T *__restrict__ v, const uint32_t *__restrict__ meta,
                                T *__restrict__ out, uint32_t heads, uint32_t kv_heads,
                                uint32_t meta_w, float scale) {
  constexpr int E = D / 32;
  __shared__ float sm[WARPS], sl[WARPS];
  __shared__ float sacc[WARPS][D];
  const uint32_t seq = blockIdx.x, h = blockIdx.y;
  const uint32_t kvh = h / (heads / kv_heads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t *row = meta + (size_t)seq * meta_w;
  const uint32_t len = row[0];
  const uint32_t *table = row + 1;
  const size_t width = (size_t)kv_heads * D;
  const T *qh = q + ((size_t)seq * heads + h) * D + lane * E;
  float qr[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; e++) {
    qr[e] = to_f(qh[e]) * scale;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (uint32_t t = warp; t < len; t += WARPS) {
    const size_t r = (size_t)table[t / KV_BLOCK] * KV_BLOCK + t % KV_BLOCK;
    const T *kr = k + r * width + kvh * D + lane * E;
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) s += qr[e] * to_f(kr[e]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    const float mn = fmaxf(m, s);
    const float corr = __expf(m - mn), p = __expf(s - mn);
    l = l * corr + p;
    const T *vr = v + r * width + kvh * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; e++) acc[e] = acc[e] * corr + p * to_f(vr[e]);
    m = mn;
  }
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < E; e++) sacc[warp][lane * E + e] = acc[e];
  __syncthreads();
  float mx = -INFINITY;
#pragma unroll
  for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm[w]);
  float total = 0.f, f[WARPS];
#pragma unroll
  for (int w = 0; w < WARPS; w++) {
    f[w] = sl[w] > 0.f ? __expf(sm[w] - mx) : 0.f;
    total += sl[w] * f[w];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T *o = out + ((size_t)seq * heads + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float y = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; w++) y += sacc[w][d] * f[w];
    o[d] = from_f<T>(y * inv);
  }
}

#define PAGED(T, SUF, D)                                                                    \
  extern "C" __global__ void paged_attention_##D##_##SUF(                                   \
      const T *q, const T *k, const T *v, const uint32_t *meta, T *out, uint32_t heads,      \
      uint32_t kv_heads, uint32_t meta_w, float scale) {                                     \
    paged_attention<T, D>(q, k, v, meta, out, heads, kv_heads, meta_w, scale);               \
  }

PAGED(__nv_bfloat16, bf16, 64)
PAGED(__nv_bfloat16, bf16, 128)
PAGED(float, f32, 64)
PAGED(float, f32, 128)

// One decode step's fused QKV epilogue: from the fused projection qkv [n, (heads + 2 *
// kv_heads) * D] (bias not yet added), adds the bias (when has_bias), applies RoPE at each
// row's position (cos, sin: [n, D / 2]; NeoX halves or interleaved pairs), writes the query
// to q_out [n, heads, D] and the key and value into the pools' row rows[i] in place.
// Grid (n, heads + 2 * kv_heads), D / 2 threads: one rotation pair each.
template <typename T>
__device__ void qkv_rope_write(const T *__restrict__ qkv, const T *__restrict__ bias,
                               const float *__restrict__ cos, const float *__restrict__ sin,
                               const uint32_t *__restrict__ rows, T *__restrict__ q_out,
                               T *__restrict__ kpool, T *__restrict__ vpool, uint32_t heads,
                               uint32_t kv_heads, uint32_t d, uint32_t has_bias,
                               uint32_t neox) {
  const uint32_t i = blockIdx.x, head = blockIdx.y, p = threadIdx.x, half = d / 2;
  if (p >= half) return;
  const size_t w = (size_t)(heads + 2 * kv_heads) * d;
  const T *src = qkv + i * w + (size_t)head * d;
  const T *b = bias + (size_t)head * d;
  const uint32_t a = neox ? p : 2 * p, c = neox ? p + half : 2 * p + 1;
  float x1 = to_f(src[a]), x2 = to_f(src[c]);
  if (has_bias) {
    x1 += to_f(b[a]);
    x2 += to_f(b[c]);
  }
  const size_t width = (size_t)kv_heads * d;
  if (head >= heads + kv_heads) {  // value: no rotation
    T *dst = vpool + (size_t)rows[i] * width + (size_t)(head - heads - kv_heads) * d;
    dst[a] = from_f<T>(x1);
    dst[c] = from_f<T>(x2);
    return;
  }
  const float cs = cos[(size_t)i * half + p], sn = sin[(size_t)i * half + p];
  const float y1 = x1 * cs - x2 * sn, y2 = x1 * sn + x2 * cs;
  T *dst = head < heads ? q_out + ((size_t)i * heads + head) * d
                        : kpool + (size_t)rows[i] * width + (size_t)(head - heads) * d;
  dst[a] = from_f<T>(y1);
  dst[c] = from_f<T>(y2);
}

#define QKV(T, SUF)                                                                          \
  extern "C" __global__ void qkv_rope_write_##SUF(                                            \
      const T *qkv, const T *bias, const float *cos, const float *sin, const uint32_t *rows,  \
      T *q_out, T *kpool, T *vpool, uint32_t heads, uint32_t kv_heads, uint32_t d,           \
      uint32_t has_bias, uint32_t neox) {                                                     \
    qkv_rope_write<T>(qkv, bias, cos, sin, rows, q_out, kpool, vpool, heads, kv_heads, d,     \
                      has_bias, neox);                                                        \
  }
QKV(__nv_bfloat16, bf16)
QKV(float, f32)

// silu(g) * u from the fused gate/up projection gu [n, 2 * inter] (gate first) into
// out [n, inter].
template <typename T>
__device__ void swiglu(const T *__restrict__ gu, T *__restrict__ out, uint32_t inter,
                       size_t total) {
  for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
       k += (size_t)gridDim.x * blockDim.x) {
    const size_t r = k / inter, j = k % inter;
    const float g = to_f(gu[r * 2 * inter + j]), u = to_f(gu[r * 2 * inter + inter + j]);
    out[k] = from_f<T>(g / (1.f + __expf(-g)) * u);
  }
}
#define SWIGLU(T, SUF)                                                                       \
  extern "C" __global__ void swiglu_##SUF(const T *gu, T *out, uint32_t inter, size_t total) { \
    swiglu<T>(gu, out, inter, total);                                                         \
  }
SWIGLU(__nv_bfloat16, bf16)
SWIGLU(float, f32)
