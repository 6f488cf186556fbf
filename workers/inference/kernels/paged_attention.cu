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
#include <cuda_bf16.h>
#include <stdint.h>

#define KV_BLOCK 16
#define WARPS 4

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

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
