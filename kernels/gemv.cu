// Matrix-vector products for 1 to 4 rows, shaped for memory bandwidth: y[b, n] = residual[b, n]
// + scale[n] * sum_k x'[b, k] * w[n, k], bf16 activations, weights stored [n, k] row-major as
// int8 (one f32 scale per output channel) or bf16 (no scale), f32 accumulation. The two ends of
// a transformer's sublayer can ride along, each optional (null): `residual` (bf16), the skip
// connection, added before the one rounding; `alpha` (f32 [k]), a pre-norm: x' = x * alpha /
// sqrt(mean(x^2) + eps) per row (norm.cu's RMSNorm, not rounded to bf16 in between), else x' = x.
// With GEMV_GATED in `flags`, the product is a gated FFN's in-projection and leaves its gate applied: n = 2h
// channels, gate then up, give y[b, j] = silu(a) * u of a = y'[b, j] and u = y'[b, h + j], each
// rounded to bf16 first as the product alone would be (so the bits equal the product followed by
// norm.cu's swiglu_bf16); y is [batch, h], and residual must be null. With GEMV_PREFETCH, each
// block asks for its first weights into L2 before it waits for the kernel before it (for graphs
// whose kernels may start early: `grid_dependency_sync` in common.cuh).
//
// Why not `w8a16_bf16` (w8a16.cu) for these rows: (1) for the 4096-channel matrices it runs only
// 256 blocks, about 8 warps per SM, too few 16-byte loads in flight to cover memory latency;
// (2) `(float)q` is an integer-to-float conversion, which Hopper issues at 16 per clock per SM,
// about what HBM3 delivers in int8 weights, so the conversions alone can hold it below
// bandwidth. Here a block of up to 8 warps shares 4 output channels, each warp reading every
// 8th 512-byte chunk of their rows (split K) with two chunks' loads in flight per lane, the
// partial sums meeting in shared memory; int8 weights widen with a byte permute and a float
// subtract (`int8x4_to_f32`) on the full-rate pipes.
//
// Entry points `gemv_splitk_int8_b1` .. `_b4` and `gemv_splitk_bf16_b1` .. `_b4`, one per
// batch size (a compile-time batch keeps a batch of one to its own registers). Host
// requirements: k a multiple of the elements in 16 bytes (16 int8, 8 bf16), x and w 16-byte
// aligned; blockDim.x = 32 * min(8, ceil(k / chunk)) with chunk = 32 * those elements;
// gridDim.x = ceil(n / 4) (when gated, n even: a block's four channels are two gate and two up).
#include "common.cuh"

#define GEMV_CHANNELS 4
#define GEMV_MAX_WARPS 8
#define GEMV_MAX_BATCH 4
#define GEMV_UNROLL 2
// The bits of the entry points' `flags`.
#define GEMV_GATED 1
#define GEMV_PREFETCH 2

// One bf16 of a packed pair as f32 (bf16 is the high half of an f32).
__device__ __forceinline__ float bf16_lo(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }

// How each kind of weight is read: elements per 16-byte load, widening, the channel's scale.
struct Int8Weights {
  typedef int8_t T;
  static constexpr int PER_LOAD = 16;
  __device__ static void widen(const int4& packed, float* out) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(&packed);
#pragma unroll
    for (int j = 0; j < 4; ++j) int8x4_to_f32(words[j], out + 4 * j);
  }
  __device__ static float scale(const float* scale, int channel) { return scale[channel]; }
};

struct Bf16Weights {
  typedef __nv_bfloat16 T;
  static constexpr int PER_LOAD = 8;
  __device__ static void widen(const int4& packed, float* out) {
    const uint32_t* pairs = reinterpret_cast<const uint32_t*>(&packed);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = bf16_lo(pairs[j]);
      out[2 * j + 1] = bf16_hi(pairs[j]);
    }
  }
  __device__ static float scale(const float*, int) { return 1.f; }
};

// 1 / sqrt(mean(x[b]^2) + eps) of each of the BATCH rows of x, computed by the whole block.
template <int BATCH>
__device__ __forceinline__ void inv_rms_rows(const __nv_bfloat16* __restrict__ x, int k, float eps, float* inv) {
  __shared__ float shared32[32];
#pragma unroll
  for (int b = 0; b < BATCH; ++b) {
    float sum = 0.f;
    for (int i = threadIdx.x * 8; i < k; i += blockDim.x * 8) {
      const uint4 raw = *reinterpret_cast<const uint4*>(x + (size_t)b * k + i);
      const uint32_t* pairs = reinterpret_cast<const uint32_t*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float lo = bf16_lo(pairs[j]), hi = bf16_hi(pairs[j]);
        sum += lo * lo + hi * hi;
      }
    }
    inv[b] = rsqrtf(block_sum(sum, shared32) / (float)k + eps);
  }
}

// The weight row of this block's output channel r (n when there is none): four consecutive channels, or when
// gated, gate channels j, j + 1 (r = 0, 1) and their up channels h + j, h + j + 1 (r = 2, 3).
__device__ __forceinline__ int block_channel(int r, int gated, int n) {
  if (!gated) {
    const int channel = blockIdx.x * GEMV_CHANNELS + r;
    return channel < n ? channel : n;
  }
  const int h = n / 2, j = blockIdx.x * (GEMV_CHANNELS / 2) + r % (GEMV_CHANNELS / 2);
  return j < h ? j + (r / (GEMV_CHANNELS / 2)) * h : n;
}

// Channel r's sum for row b, its warps' partial sums added in warp order.
__device__ __forceinline__ float channel_sum(const float (*partial)[GEMV_CHANNELS * GEMV_MAX_BATCH], int warps, int r,
                                             int b) {
  float v = 0.f;
  for (int wi = 0; wi < warps; ++wi) v += partial[wi][r * GEMV_MAX_BATCH + b];
  return v;
}

// With GEMV_PREFETCH in `flags`: the weight lines of each lane's first round of loads in `gemv_splitk`, asked
// into L2 before the block waits for the kernel before it (the weights are never written, so this may run while
// that kernel finishes).
template <typename W>
__device__ __forceinline__ void gemv_prefetch(const typename W::T* __restrict__ w, int flags, int n, int k) {
  if (!(flags & GEMV_PREFETCH)) return;
  constexpr int PER = W::PER_LOAD, CHUNK = 32 * PER, LANES_PER_LINE = 128 / 16;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane % LANES_PER_LINE != 0) return;
#pragma unroll
  for (int u = 0; u < GEMV_UNROLL; ++u) {
    const int i = (warp + u * warps) * CHUNK + lane * PER;
    if (i >= k) break;
#pragma unroll
    for (int r = 0; r < GEMV_CHANNELS; ++r) {
      const int channel = block_channel(r, flags & GEMV_GATED, n);
      if (channel < n) prefetch_l2(w + (size_t)channel * k + i);
    }
  }
}

// One round of a warp's weight loads, every one before any arithmetic so they overlap in flight: for
// each of GEMV_UNROLL chunks (c0, c0 + warps, …) and each of the block's channels, the lane's 16 bytes
// (zeros past k or past the last channel). PER: elements of T in 16 bytes.
template <typename T, int PER>
__device__ __forceinline__ void load_weight_round(int4 (&packed)[GEMV_UNROLL][GEMV_CHANNELS], const T* __restrict__ w,
                                                  const int* channel, int c0, int warps, int lane, int n, int k) {
  constexpr int CHUNK = 32 * PER;
#pragma unroll
  for (int u = 0; u < GEMV_UNROLL; ++u) {
    const int i = (c0 + u * warps) * CHUNK + lane * PER;
#pragma unroll
    for (int r = 0; r < GEMV_CHANNELS; ++r)
      packed[u][r] = (i < k && channel[r] < n) ? __ldg(reinterpret_cast<const int4*>(w + (size_t)channel[r] * k + i))
                                               : make_int4(0, 0, 0, 0);
  }
}

// Each warp's sums of each channel and row into `partial` (read by `channel_sum`), then the block's barrier.
template <int BATCH>
__device__ __forceinline__ void share_partials(const float (&acc)[GEMV_CHANNELS][BATCH],
                                               float (*partial)[GEMV_CHANNELS * GEMV_MAX_BATCH], int lane, int warp) {
#pragma unroll
  for (int r = 0; r < GEMV_CHANNELS; ++r)
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const float v = warp_sum(acc[r][b]);
      if (lane == 0) partial[warp][r * GEMV_MAX_BATCH + b] = v;
    }
  __syncthreads();
}

template <typename W, int BATCH>
__device__ __forceinline__ void gemv_splitk(const __nv_bfloat16* __restrict__ x, const typename W::T* __restrict__ w,
                                            const float* __restrict__ scale,
                                            const __nv_bfloat16* __restrict__ residual,
                                            const float* __restrict__ alpha, float eps, int gated,
                                            __nv_bfloat16* __restrict__ y, int n, int k) {
  constexpr int PER = W::PER_LOAD, CHUNK = 32 * PER, X_LOADS = PER / 8;
  __shared__ float partial[GEMV_MAX_WARPS][GEMV_CHANNELS * GEMV_MAX_BATCH];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float inv_rms[BATCH];
  if (alpha) inv_rms_rows<BATCH>(x, k, eps, inv_rms);
  int channel[GEMV_CHANNELS];
#pragma unroll
  for (int r = 0; r < GEMV_CHANNELS; ++r) channel[r] = block_channel(r, gated, n);
  const int chunks = (k + CHUNK - 1) / CHUNK;
  float acc[GEMV_CHANNELS][BATCH];
#pragma unroll
  for (int r = 0; r < GEMV_CHANNELS; ++r)
#pragma unroll
    for (int b = 0; b < BATCH; ++b) acc[r][b] = 0.f;
  for (int c0 = warp; c0 < chunks; c0 += warps * GEMV_UNROLL) {
    int4 packed[GEMV_UNROLL][GEMV_CHANNELS];
    load_weight_round<typename W::T, PER>(packed, w, channel, c0, warps, lane, n, k);
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) {
      const int i = (c0 + u * warps) * CHUNK + lane * PER;
      if (i >= k) continue;
      // This chunk of each row's input as f32 (normalised when asked), shared by the channels.
      float xf[BATCH][PER];
#pragma unroll
      for (int b = 0; b < BATCH; ++b) {
#pragma unroll
        for (int l = 0; l < X_LOADS; ++l) {
          const uint4 raw = reinterpret_cast<const uint4*>(x + (size_t)b * k + i)[l];
          const uint32_t* pairs = reinterpret_cast<const uint32_t*>(&raw);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            xf[b][8 * l + 2 * j] = bf16_lo(pairs[j]);
            xf[b][8 * l + 2 * j + 1] = bf16_hi(pairs[j]);
          }
        }
        if (alpha) {
#pragma unroll
          for (int j = 0; j < PER; ++j) xf[b][j] *= alpha[i + j] * inv_rms[b];
        }
      }
#pragma unroll
      for (int r = 0; r < GEMV_CHANNELS; ++r) {
        float wf[PER];
        W::widen(packed[u][r], wf);
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
          float s = acc[r][b];
#pragma unroll
          for (int j = 0; j < PER; ++j) s = fmaf(xf[b][j], wf[j], s);
          acc[r][b] = s;
        }
      }
    }
  }
  share_partials<BATCH>(acc, partial, lane, warp);
  const int t = threadIdx.x, r = t / GEMV_MAX_BATCH, b = t % GEMV_MAX_BATCH;
  if (b >= BATCH || t >= GEMV_CHANNELS * GEMV_MAX_BATCH) return;
  if (!gated) {
    if (channel[r] >= n) return;
    const size_t out = (size_t)b * n + channel[r];
    const float skip = residual ? __bfloat162float(residual[out]) : 0.f;
    y[out] = __float2bfloat16(skip + channel_sum(partial, warps, r, b) * W::scale(scale, channel[r]));
    return;
  }
  // Thread (r, b) of the first two r: gate channel r and its up channel r + 2.
  if (r >= GEMV_CHANNELS / 2 || channel[r] >= n) return;
  const int up = r + GEMV_CHANNELS / 2;
  const float a = __bfloat162float(__float2bfloat16(0.f + channel_sum(partial, warps, r, b) * W::scale(scale, channel[r])));
  const float u = __bfloat162float(__float2bfloat16(0.f + channel_sum(partial, warps, up, b) * W::scale(scale, channel[up])));
  y[(size_t)b * (n / 2) + channel[r]] = __float2bfloat16(a / (1.f + __expf(-a)) * u);
}

#define GEMV_ENTRY(NAME, W, B)                                                                            \
  extern "C" __global__ void NAME##_b##B(const __nv_bfloat16* __restrict__ x, const W::T* __restrict__ w,  \
                                         const float* __restrict__ scale,                                  \
                                         const __nv_bfloat16* __restrict__ residual,                       \
                                         const float* __restrict__ alpha, float eps, int flags,            \
                                         __nv_bfloat16* __restrict__ y, int n, int k) {                    \
    gemv_prefetch<W>(w, flags, n, k);                                                                      \
    grid_dependency_sync();                                                                                \
    gemv_splitk<W, B>(x, w, scale, residual, alpha, eps, flags & GEMV_GATED, y, n, k);                     \
  }
// Mimi's products in f32 (its transformers' few rows a step): y[b, n] = sum_k x[b, k] * w[n, k], f32 rows,
// weights and output, nothing around the product. The split of K, the blocks and the meeting of partial sums
// are gemv_splitk's, with chunks of 32 lanes' four f32. Host requirements: k % 4 == 0, x and w 16-byte
// aligned; the launch as above with 16-byte loads of 4 elements.
template <int BATCH>
__device__ __forceinline__ void gemv_splitk_f32(const float* __restrict__ x, const float* __restrict__ w,
                                                float* __restrict__ y, int n, int k) {
  constexpr int PER = 4, CHUNK = 32 * PER;
  __shared__ float partial[GEMV_MAX_WARPS][GEMV_CHANNELS * GEMV_MAX_BATCH];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int channel[GEMV_CHANNELS];
#pragma unroll
  for (int r = 0; r < GEMV_CHANNELS; ++r) channel[r] = block_channel(r, 0, n);
  const int chunks = (k + CHUNK - 1) / CHUNK;
  float acc[GEMV_CHANNELS][BATCH] = {};
  for (int c0 = warp; c0 < chunks; c0 += warps * GEMV_UNROLL) {
    int4 packed[GEMV_UNROLL][GEMV_CHANNELS];
    load_weight_round<float, PER>(packed, w, channel, c0, warps, lane, n, k);
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) {
      const int i = (c0 + u * warps) * CHUNK + lane * PER;
      if (i >= k) continue;
#pragma unroll
      for (int b = 0; b < BATCH; ++b) {
        const float4 xv = *reinterpret_cast<const float4*>(x + (size_t)b * k + i);
#pragma unroll
        for (int r = 0; r < GEMV_CHANNELS; ++r) {
          const float4 wv = *reinterpret_cast<const float4*>(&packed[u][r]);
          acc[r][b] = fmaf(xv.w, wv.w, fmaf(xv.z, wv.z, fmaf(xv.y, wv.y, fmaf(xv.x, wv.x, acc[r][b]))));
        }
      }
    }
  }
  share_partials<BATCH>(acc, partial, lane, warp);
  const int t = threadIdx.x, r = t / GEMV_MAX_BATCH, b = t % GEMV_MAX_BATCH;
  if (b >= BATCH || t >= GEMV_CHANNELS * GEMV_MAX_BATCH || channel[r] >= n) return;
  y[(size_t)b * n + channel[r]] = channel_sum(partial, warps, r, b);
}

#define GEMV_F32_ENTRY(B)                                                                                      \
  extern "C" __global__ void gemv_splitk_f32_b##B(const float* __restrict__ x, const float* __restrict__ w,     \
                                                  float* __restrict__ y, int n, int k) {                       \
    grid_dependency_sync();                                                                                    \
    gemv_splitk_f32<B>(x, w, y, n, k);                                                                         \
  }
GEMV_F32_ENTRY(1)
GEMV_F32_ENTRY(2)
GEMV_F32_ENTRY(3)
GEMV_F32_ENTRY(4)

GEMV_ENTRY(gemv_splitk_int8, Int8Weights, 1)
GEMV_ENTRY(gemv_splitk_int8, Int8Weights, 2)
GEMV_ENTRY(gemv_splitk_int8, Int8Weights, 3)
GEMV_ENTRY(gemv_splitk_int8, Int8Weights, 4)
GEMV_ENTRY(gemv_splitk_bf16, Bf16Weights, 1)
GEMV_ENTRY(gemv_splitk_bf16, Bf16Weights, 2)
GEMV_ENTRY(gemv_splitk_bf16, Bf16Weights, 3)
GEMV_ENTRY(gemv_splitk_bf16, Bf16Weights, 4)
