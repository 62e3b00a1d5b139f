// Temperature + top-k sampling on the device, one block per row (slot), no host round trip.
// The k-th largest logit is found by bisection on the value (a block-wide count per probe);
// among logits at or above it, the token maximising exp((l - max) / t) / E with E ~ Exp(1) is an
// exact draw from softmax(l / t) restricted to the top k. temperature not above 0, or k <= 1: argmax.
// Logits are ranked as `ranked` says: -inf and NaN are never drawn nor counted among the k, unless no
// logit is above -inf; then the token is 0.
// E comes from the counter-based generator in common.cuh, and the CPU reference
// (`model::sampling::topk_reference`) follows the same steps, so both draw the same tokens.
#include "common.cuh"
#include <float.h>

#define BISECTION_STEPS 40

// NaN as -inf, +inf as the largest finite value: every score stays a number and +inf logits tie.
__device__ __forceinline__ float ranked(float logit) { return isnan(logit) ? -INFINITY : fminf(logit, FLT_MAX); }

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

// Row r uses its own seeds[r], counters[r], top_k[r] and temperatures[r].
extern "C" __global__ void topk_sample_f32(const float* __restrict__ logits, uint32_t* __restrict__ tokens,
                                           const uint64_t* __restrict__ seeds, const uint64_t* __restrict__ counters,
                                           const int64_t* __restrict__ top_k, const float* __restrict__ temperatures,
                                           int vocab) {
  const int k = (int)min(top_k[blockIdx.x], (int64_t)vocab + 1);
  const float temperature = temperatures[blockIdx.x];
  __shared__ float shared[32];
  __shared__ float sv[32];
  __shared__ int si[32];
  const float* row = logits + (size_t)blockIdx.x * vocab;
  float max_logit = -INFINITY, neg_min = -FLT_MAX;
  int argmax = vocab, unused = 0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = ranked(row[i]);
    if (v > max_logit) { max_logit = v; argmax = i; }
    if (v > -INFINITY) neg_min = fmaxf(neg_min, -v);
  }
  block_argmax(&max_logit, &argmax, sv, si);
  block_argmax(&neg_min, &unused, sv, si);
  if (argmax == vocab) argmax = 0;  // nothing above -inf
  if (!(temperature > 0.f) || k <= 1 || max_logit == -INFINITY) {
    if (threadIdx.x == 0) tokens[blockIdx.x] = (uint32_t)argmax;
    return;
  }
  // Invariant: at least k logits are >= low, fewer than k are >= high (unless all tie). Halves first: low + high
  // can overflow.
  float low = -neg_min - 1.f, high = max_logit;
  for (int step = 0; step < BISECTION_STEPS; ++step) {
    const float mid = 0.5f * low + 0.5f * high;
    float count = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) count += ranked(row[i]) >= mid ? 1.f : 0.f;
    if (block_sum(count, shared) >= (float)k) low = mid; else high = mid;
  }
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
