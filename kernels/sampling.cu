// Temperature + top-k sampling on the device, one block per row (slot), no host round trip.
// The k-th largest logit is found exactly by a radix select on the value's bits (four passes of
// a 256-bin histogram, most significant byte first); among logits at or above it, the token
// maximising exp((l - max) / t) / E with E ~ Exp(1) is an exact draw from softmax(l / t)
// restricted to the top k. temperature not above 0, or k <= 1: argmax.
// Logits are ranked as `ranked` says: -inf and NaN are never drawn nor counted among the k, unless no
// logit is above -inf; then the token is 0. With fewer than k logits above -inf, all of them are kept.
// E comes from the counter-based generator in common.cuh, and the CPU reference
// (`model::sampling::topk_reference`) selects the same logits, so both draw the same tokens.
#include "common.cuh"
#include <float.h>

// Logits each thread loads at once in a pass over the row: a block is alone on its SM, so a
// pass takes as many load latencies as it has rounds.
#define SAMPLE_LOADS 4

// NaN as -inf, +inf as the largest finite value: every score stays a number and +inf logits tie.
__device__ __forceinline__ float ranked(float logit) { return isnan(logit) ? -INFINITY : fminf(logit, FLT_MAX); }

// A float's bits reordered so that a larger value is a larger unsigned key, and back.
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Largest (value, lowest index) over the block; every thread gets the winner.
__device__ __forceinline__ void block_argmax(float* v, int* idx, float* sv, int* si) {
  float value = *v;
  int index = *idx;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, value, offset);
    const int oi = __shfl_xor_sync(0xffffffffu, index, offset);
    if (ov > value || (ov == value && oi < index)) { value = ov; index = oi; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sv[warp] = value; si[warp] = index; }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    for (int w = 1; w < warps; ++w)
      if (sv[w] > sv[0] || (sv[w] == sv[0] && si[w] < si[0])) { sv[0] = sv[w]; si[0] = si[w]; }
  }
  __syncthreads();
  *v = sv[0];
  *idx = si[0];
  __syncthreads();
}

// The value of the k-th largest logit above -inf (the smallest of them when fewer than k are):
// per pass, a histogram of the next byte of the keys that share the bytes chosen so far, and the
// byte whose bin holds the k-th. Every thread of the block gets it.
__device__ float kth_largest(const float* __restrict__ row, int vocab, unsigned int k) {
  __shared__ unsigned int bins[256];
  __shared__ uint32_t chosen_prefix;
  __shared__ unsigned int chosen_rank;
  uint32_t prefix = 0, mask = 0;
  unsigned int rank = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) bins[i] = 0;
    __syncthreads();
    // Lanes holding the same byte add once (most logits share their first byte): the whole
    // block walks the row together, so every lane reaches the match; SAMPLE_LOADS loads in
    // flight per thread.
    for (int start = 0; start < vocab; start += SAMPLE_LOADS * blockDim.x) {
      float v[SAMPLE_LOADS];
#pragma unroll
      for (int u = 0; u < SAMPLE_LOADS; ++u) {
        const int i = start + u * blockDim.x + threadIdx.x;
        v[u] = i < vocab ? ranked(row[i]) : -INFINITY;
      }
#pragma unroll
      for (int u = 0; u < SAMPLE_LOADS; ++u) {
        const uint32_t key = order_key(v[u]);
        const uint32_t digit = v[u] > -INFINITY && (key & mask) == prefix ? (key >> shift) & 255u : 256u;
        const unsigned int peers = __match_any_sync(0xffffffffu, digit);
        if (digit < 256u && (int)(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&bins[digit], (unsigned int)__popc(peers));
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l holds bins 255 - 8l down to 248 - 8l; `above` counts the keys in higher bins.
      const int lane = threadIdx.x;
      unsigned int counts[8], own = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        counts[j] = bins[255 - (lane * 8 + j)];
        own += counts[j];
      }
      unsigned int through = own;
      for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned int other = __shfl_up_sync(0xffffffffu, through, offset);
        if (lane >= offset) through += other;
      }
      // The first pass counts every logit above -inf: fewer than k keep them all.
      const unsigned int total = __shfl_sync(0xffffffffu, through, 31);
      const unsigned int wanted = min(rank, total);
      unsigned int above = through - own;
      if (above < wanted && wanted <= through) {
        for (int j = 0; j < 8; ++j) {
          if (above + counts[j] >= wanted) {
            chosen_prefix = prefix | ((uint32_t)(255 - (lane * 8 + j)) << shift);
            chosen_rank = wanted - above;
            break;
          }
          above += counts[j];
        }
      }
    }
    __syncthreads();
    prefix = chosen_prefix;
    rank = chosen_rank;
    mask |= 255u << shift;
  }
  return key_value(prefix);
}

// Row r uses its own seeds[r], counters[r], top_k[r] and temperatures[r].
extern "C" __global__ void topk_sample_f32(const float* __restrict__ logits, uint32_t* __restrict__ tokens,
                                           const uint64_t* __restrict__ seeds, const uint64_t* __restrict__ counters,
                                           const int64_t* __restrict__ top_k, const float* __restrict__ temperatures,
                                           int vocab) {
  grid_dependency_sync();
  const int k = (int)min(top_k[blockIdx.x], (int64_t)vocab + 1);
  const float temperature = temperatures[blockIdx.x];
  __shared__ float sv[32];
  __shared__ int si[32];
  const float* row = logits + (size_t)blockIdx.x * vocab;
  float max_logit = -INFINITY;
  int argmax = vocab;
  for (int start = threadIdx.x; start < vocab; start += SAMPLE_LOADS * blockDim.x) {
    float v[SAMPLE_LOADS];
#pragma unroll
    for (int u = 0; u < SAMPLE_LOADS; ++u) {
      const int i = start + u * blockDim.x;
      v[u] = i < vocab ? ranked(row[i]) : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < SAMPLE_LOADS; ++u)
      if (v[u] > max_logit) { max_logit = v[u]; argmax = start + u * blockDim.x; }
  }
  block_argmax(&max_logit, &argmax, sv, si);
  if (argmax == vocab) argmax = 0;  // nothing above -inf
  if (!(temperature > 0.f) || k <= 1 || max_logit == -INFINITY) {
    if (threadIdx.x == 0) tokens[blockIdx.x] = (uint32_t)argmax;
    return;
  }
  const float low = kth_largest(row, vocab, (unsigned int)k);
  const uint64_t seed = seeds[blockIdx.x], counter = counters[blockIdx.x];
  float best = -1.f;
  int token = vocab;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = ranked(row[i]);
    if (v >= low) {
      const float p = expf((v - max_logit) / temperature);
      const float e = -logf(fmaxf(1.f - uniform01(seed, counter, (uint64_t)i), 1e-30f));
      const float score = p / fmaxf(e, 1e-30f);
      if (score > best) { best = score; token = i; }
    }
  }
  block_argmax(&best, &token, sv, si);
  if (threadIdx.x == 0) tokens[blockIdx.x] = (uint32_t)token;
}
