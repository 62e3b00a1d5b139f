// One decode step of attention over a ring KV cache, in two kernels:
//  - rope_kv_write_bf16: interleaved RoPE on the step's query and key, the rotated key and the
//    value written straight into the ring at each slot's write index (a device value, so a CUDA
//    graph can replay the step);
//  - ring_attention_bf16: softmax(q·kᵀ·scale + mask)·v over only the first `len` ring entries
//    (the filled part), one block per (slot, head), f32 inside.
// CPU references: `nn::RopeTables::apply`, `kv::RingCache::append`, `kv::attention`.
#include "common.cuh"
#include <float.h>

// qkv [rows, 3, heads, head_dim] (the packed in-projection of one token per slot);
// cos, sin [rows, head_dim / 2] f32; q_out [rows, heads, head_dim];
// ring_k, ring_v [rows, heads, capacity, head_dim]; write_idx [rows] (< 0: leave the ring alone).
// Grid: rows * heads blocks of head_dim / 2 threads, one per rotated pair.
extern "C" __global__ void rope_kv_write_bf16(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
                                              const float* __restrict__ sin, __nv_bfloat16* __restrict__ q_out,
                                              __nv_bfloat16* __restrict__ ring_k, __nv_bfloat16* __restrict__ ring_v,
                                              const int64_t* __restrict__ write_idx, int heads, int head_dim,
                                              int capacity) {
  const int half = head_dim / 2;
  const int pair = threadIdx.x;
  if (pair >= half) return;
  const int b = blockIdx.x / heads, h = blockIdx.x % heads;
  const size_t token = (size_t)b * 3 * heads * head_dim;
  const __nv_bfloat16* q = qkv + token + (size_t)h * head_dim;
  const __nv_bfloat16* k = qkv + token + (size_t)(heads + h) * head_dim;
  const __nv_bfloat16* v = qkv + token + (size_t)(2 * heads + h) * head_dim;
  const float c = cos[(size_t)b * half + pair], s = sin[(size_t)b * half + pair];
  const int even = 2 * pair, odd = 2 * pair + 1;
  const float q0 = __bfloat162float(q[even]), q1 = __bfloat162float(q[odd]);
  __nv_bfloat16* qo = q_out + ((size_t)b * heads + h) * head_dim;
  qo[even] = __float2bfloat16(q0 * c - q1 * s);
  qo[odd] = __float2bfloat16(q0 * s + q1 * c);
  const int64_t at = write_idx[b];
  if (at < 0 || at >= capacity) return;
  const size_t slot = (((size_t)b * heads + h) * capacity + (size_t)at) * head_dim;
  const float k0 = __bfloat162float(k[even]), k1 = __bfloat162float(k[odd]);
  ring_k[slot + even] = __float2bfloat16(k0 * c - k1 * s);
  ring_k[slot + odd] = __float2bfloat16(k0 * s + k1 * c);
  ring_v[slot + even] = v[even];
  ring_v[slot + odd] = v[odd];
}

// q [rows, heads, head_dim]; ring_k, ring_v [rows, heads, capacity, head_dim]; mask [rows, len]
// f32 additive (0 visible, -inf hidden); out [rows, heads, head_dim].
// Grid: rows * heads blocks; block: 128 threads (4 warps); dynamic shared memory: len floats.
// head_dim <= 128 and even (lanes past head_dim add nothing to a dot product).
extern "C" __global__ void ring_attention_bf16(const __nv_bfloat16* __restrict__ q,
                                               const __nv_bfloat16* __restrict__ ring_k,
                                               const __nv_bfloat16* __restrict__ ring_v,
                                               const float* __restrict__ mask, __nv_bfloat16* __restrict__ out,
                                               int heads, int head_dim, int capacity, int len, float scale) {
  extern __shared__ float scores[];
  __shared__ float qs[128];
  __shared__ float reduce[32];
  const int b = blockIdx.x / heads, h = blockIdx.x % heads;
  const size_t head = (size_t)b * heads + h;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = __bfloat162float(q[head * head_dim + d]);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const __nv_bfloat16* keys = ring_k + head * capacity * head_dim;
  // Scores: a warp per key, lanes across the head dimension (coalesced reads of one key row).
  for (int j = warp; j < len; j += warps) {
    float dot = 0.f;
    for (int d = lane; d < head_dim; d += 32) dot += qs[d] * __bfloat162float(keys[(size_t)j * head_dim + d]);
    dot = warp_sum(dot);
    if (lane == 0) scores[j] = dot * scale + mask[(size_t)b * len + j];
  }
  __syncthreads();
  float local_max = -FLT_MAX;
  for (int j = threadIdx.x; j < len; j += blockDim.x) local_max = fmaxf(local_max, scores[j]);
  // Block max via the shared scratch (block_sum's pattern with fmaxf).
  for (int offset = 16; offset > 0; offset >>= 1) local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, offset));
  if (lane == 0) reduce[warp] = local_max;
  __syncthreads();
  float max_score = reduce[0];
  for (int w = 1; w < warps; ++w) max_score = fmaxf(max_score, reduce[w]);
  __syncthreads();
  float local_sum = 0.f;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    const float p = __expf(scores[j] - max_score);
    scores[j] = p;
    local_sum += p;
  }
  const float total = block_sum(local_sum, reduce);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  // Output: a thread per head dimension, summing over keys (coalesced reads of each value row).
  const __nv_bfloat16* values = ring_v + head * capacity * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < len; ++j) acc += scores[j] * __bfloat162float(values[(size_t)j * head_dim + d]);
    out[head * head_dim + d] = __float2bfloat16(acc * inv);
  }
}
