// Weight-only int8 matrix-vector products: y[b, n] = scale[n] * sum_k x[b, k] * w[n, k], with bf16
// activations, int8 weights stored [n, k] row-major, one f32 scale per output channel, f32
// accumulation. Four output rows per warp: each lane keeps four 128-bit weight loads in flight and
// reads its 16 activations once (two 128-bit loads) for all four rows, so activations are read a
// quarter as often and memory latency overlaps (on an H200 this took the 4096 -> 22528 product at
// batch 1 from 63.5 us with one row per warp to 38.4 us; cuBLAS bf16 takes 55 us). Batch tiles of
// 4 rows keep the 16 accumulators in registers; past a few rows cuBLAS bf16 is faster.
// Host requirements: k % 16 == 0, x and w 16-byte aligned; n need not divide by 4.
#include "common.cuh"

#define W8A16_WARPS_PER_BLOCK 4
#define W8A16_ROWS_PER_WARP 4
#define W8A16_BATCH_TILE 4

extern "C" __global__ void w8a16_bf16(const __nv_bfloat16* __restrict__ x, const int8_t* __restrict__ w,
                                      const float* __restrict__ scale, __nv_bfloat16* __restrict__ y,
                                      int batch, int n, int k) {
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * W8A16_WARPS_PER_BLOCK + (threadIdx.x >> 5)) * W8A16_ROWS_PER_WARP;
  if (row0 >= n) return;
  for (int b0 = 0; b0 < batch; b0 += W8A16_BATCH_TILE) {
    const int rows = min(W8A16_BATCH_TILE, batch - b0);
    float acc[W8A16_ROWS_PER_WARP][W8A16_BATCH_TILE];
#pragma unroll
    for (int r = 0; r < W8A16_ROWS_PER_WARP; ++r)
#pragma unroll
      for (int b = 0; b < W8A16_BATCH_TILE; ++b) acc[r][b] = 0.f;
    for (int i = lane * 16; i < k; i += 32 * 16) {
      int4 packed[W8A16_ROWS_PER_WARP];
#pragma unroll
      for (int r = 0; r < W8A16_ROWS_PER_WARP; ++r)
        packed[r] = (row0 + r < n) ? __ldg(reinterpret_cast<const int4*>(w + (size_t)(row0 + r) * k + i))
                                   : make_int4(0, 0, 0, 0);
#pragma unroll
      for (int b = 0; b < W8A16_BATCH_TILE; ++b) {
        if (b < rows) {
          const int4* xv = reinterpret_cast<const int4*>(x + (size_t)(b0 + b) * k + i);
          const int4 xa = xv[0], xb = xv[1];
          const __nv_bfloat162* xp[2] = {reinterpret_cast<const __nv_bfloat162*>(&xa),
                                         reinterpret_cast<const __nv_bfloat162*>(&xb)};
          float xf[16];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float2 f = __bfloat1622float2(xp[j / 4][j % 4]);
            xf[2 * j] = f.x;
            xf[2 * j + 1] = f.y;
          }
#pragma unroll
          for (int r = 0; r < W8A16_ROWS_PER_WARP; ++r) {
            const int8_t* q = reinterpret_cast<const int8_t*>(&packed[r]);
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < 16; ++j) s += xf[j] * (float)q[j];
            acc[r][b] += s;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < W8A16_ROWS_PER_WARP; ++r) {
#pragma unroll
      for (int b = 0; b < W8A16_BATCH_TILE; ++b) {
        if (b < rows) {
          const float v = warp_sum(acc[r][b]);
          if (lane == 0 && row0 + r < n) y[(size_t)(b0 + b) * n + row0 + r] = __float2bfloat16(v * scale[row0 + r]);
        }
      }
    }
  }
}

// The same product for batches of 1 to 4 rows, shaped for memory bandwidth. The kernel above
// leaves two limits: (1) for the 4096-channel matrices it runs only 256 blocks, about 8 warps
// per SM, too few 16-byte loads in flight to cover memory latency; (2) `(float)q` is an
// integer-to-float conversion, which Hopper issues at 16 per clock per SM, about what HBM3
// delivers in int8 weights, so the conversions alone can hold the kernel below bandwidth.
// Here a block of up to 8 warps shares 4 output channels, each warp reading every 8th
// 512-byte chunk of their rows (split K), 2 chunks' loads in flight per lane, the partial sums
// meeting in shared memory; and weights widen with a byte permute and a float subtract
// (`int8x4_to_f32`) on the full-rate pipes.
// Entry points `w8a16_splitk_bf16_b1` .. `_b4`, one per batch size. Host requirements:
// k % 16 == 0, x and w 16-byte aligned; blockDim.x = 32 * min(8, ceil(k / 512)); gridDim.x =
// ceil(n / 4).

#define W8A16_SPLITK_CHANNELS 4
#define W8A16_SPLITK_MAX_WARPS 8
#define W8A16_SPLITK_MAX_BATCH 4
#define W8A16_SPLITK_UNROLL 2
#define W8A16_SPLITK_CHUNK 512

// Four int8 (one word) exactly as f32: a byte with its sign bit flipped is q + 128 in 0..255;
// placed as the low mantissa byte of 2^23 (bits 0x4B000000) it is the float 2^23 + 128 + q.
__device__ __forceinline__ void int8x4_to_f32(uint32_t word, float* out) {
  const uint32_t biased = word ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540 | i)) - 8388736.f;
}

// One bf16 of a packed pair as f32 (bf16 is the high half of an f32).
__device__ __forceinline__ float bf16_lo(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }

// BATCH: the rows, a compile-time constant so a batch of one keeps only its own registers.
template <int BATCH>
__device__ __forceinline__ void w8a16_splitk(const __nv_bfloat16* __restrict__ x, const int8_t* __restrict__ w,
                                             const float* __restrict__ scale, __nv_bfloat16* __restrict__ y,
                                             int n, int k) {
  __shared__ float partial[W8A16_SPLITK_MAX_WARPS][W8A16_SPLITK_CHANNELS * W8A16_SPLITK_MAX_BATCH];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int row0 = blockIdx.x * W8A16_SPLITK_CHANNELS;
  const int chunks = (k + W8A16_SPLITK_CHUNK - 1) / W8A16_SPLITK_CHUNK;
  float acc[W8A16_SPLITK_CHANNELS][BATCH];
#pragma unroll
  for (int r = 0; r < W8A16_SPLITK_CHANNELS; ++r)
#pragma unroll
    for (int b = 0; b < BATCH; ++b) acc[r][b] = 0.f;
  for (int c0 = warp; c0 < chunks; c0 += warps * W8A16_SPLITK_UNROLL) {
    // Every load of this round first, then the arithmetic: the loads overlap in flight.
    int4 packed[W8A16_SPLITK_UNROLL][W8A16_SPLITK_CHANNELS];
#pragma unroll
    for (int u = 0; u < W8A16_SPLITK_UNROLL; ++u) {
      const int i = (c0 + u * warps) * W8A16_SPLITK_CHUNK + lane * 16;
#pragma unroll
      for (int r = 0; r < W8A16_SPLITK_CHANNELS; ++r)
        packed[u][r] = (i < k && row0 + r < n) ? __ldg(reinterpret_cast<const int4*>(w + (size_t)(row0 + r) * k + i))
                                               : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < W8A16_SPLITK_UNROLL; ++u) {
      const int i = (c0 + u * warps) * W8A16_SPLITK_CHUNK + lane * 16;
      if (i >= k) continue;
      uint4 xs[BATCH][2];
#pragma unroll
      for (int b = 0; b < BATCH; ++b) {
        const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)b * k + i);
        xs[b][0] = xv[0];
        xs[b][1] = xv[1];
      }
#pragma unroll
      for (int r = 0; r < W8A16_SPLITK_CHANNELS; ++r) {
        float wf[16];
        const uint32_t* words = reinterpret_cast<const uint32_t*>(&packed[u][r]);
#pragma unroll
        for (int j = 0; j < 4; ++j) int8x4_to_f32(words[j], wf + 4 * j);
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
          const uint32_t* pairs = reinterpret_cast<const uint32_t*>(xs[b]);
          float s = acc[r][b];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            s = fmaf(bf16_lo(pairs[j]), wf[2 * j], s);
            s = fmaf(bf16_hi(pairs[j]), wf[2 * j + 1], s);
          }
          acc[r][b] = s;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < W8A16_SPLITK_CHANNELS; ++r)
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const float v = warp_sum(acc[r][b]);
      if (lane == 0) partial[warp][r * W8A16_SPLITK_MAX_BATCH + b] = v;
    }
  __syncthreads();
  const int t = threadIdx.x, r = t / W8A16_SPLITK_MAX_BATCH, b = t % W8A16_SPLITK_MAX_BATCH;
  if (t < W8A16_SPLITK_CHANNELS * W8A16_SPLITK_MAX_BATCH && b < BATCH && row0 + r < n) {
    float v = 0.f;
    for (int wi = 0; wi < warps; ++wi) v += partial[wi][t];
    y[(size_t)b * n + row0 + r] = __float2bfloat16(v * scale[row0 + r]);
  }
}

#define W8A16_SPLITK_ENTRY(B)                                                                          \
  extern "C" __global__ void w8a16_splitk_bf16_b##B(const __nv_bfloat16* __restrict__ x,               \
                                                    const int8_t* __restrict__ w,                      \
                                                    const float* __restrict__ scale,                   \
                                                    __nv_bfloat16* __restrict__ y, int n, int k) {     \
    w8a16_splitk<B>(x, w, scale, y, n, k);                                                              \
  }
W8A16_SPLITK_ENTRY(1)
W8A16_SPLITK_ENTRY(2)
W8A16_SPLITK_ENTRY(3)
W8A16_SPLITK_ENTRY(4)

// The same product on the tensor cores, for batches where the matrix-vector kernel above loses
// to cuBLAS bf16: int8 weights are exact in bf16, so each block converts a 64-channel slice of
// weights to bf16 in shared memory once and multiplies every row of its tile by it with WMMA
// (16x16x16 bf16 in, f32 accumulate); the scale is applied to the output columns at the end.
// Block: 4 warps, one per 16 output channels; a tile of up to 64 rows (gridDim.y tiles).
// Host requirements: k % 16 == 0, x and w 16-byte aligned.
#include <mma.h>

#define W8A16_MMA_CHANNELS 64
#define W8A16_MMA_ROWS 64
#define W8A16_MMA_K 64
#define W8A16_MMA_LD (W8A16_MMA_K + 8)
#define W8A16_MMA_OUT_LD (W8A16_MMA_CHANNELS + 4)

extern "C" __global__ void w8a16_mma_bf16(const __nv_bfloat16* __restrict__ x, const int8_t* __restrict__ w,
                                          const float* __restrict__ scale, __nv_bfloat16* __restrict__ y,
                                          int batch, int n, int k) {
  using namespace nvcuda;
  __shared__ __align__(32) __nv_bfloat16 xs[W8A16_MMA_ROWS * W8A16_MMA_LD];
  __shared__ __align__(32) __nv_bfloat16 ws[W8A16_MMA_CHANNELS * W8A16_MMA_LD];
  __shared__ __align__(32) float out[W8A16_MMA_ROWS * W8A16_MMA_OUT_LD];
  const int warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * W8A16_MMA_CHANNELS, b0 = blockIdx.y * W8A16_MMA_ROWS;
  const int rows = min(W8A16_MMA_ROWS, batch - b0);
  const int frags = (rows + 15) / 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[W8A16_MMA_ROWS / 16];
#pragma unroll
  for (int m = 0; m < W8A16_MMA_ROWS / 16; ++m) wmma::fill_fragment(acc[m], 0.f);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int k0 = 0; k0 < k; k0 += W8A16_MMA_K) {
    // Activations: rows x 64 bf16, 8 per 16-byte load; rows past the batch and k are zero.
    for (int i = threadIdx.x; i < W8A16_MMA_ROWS * W8A16_MMA_K / 8; i += blockDim.x) {
      const int r = i / (W8A16_MMA_K / 8), c = (i % (W8A16_MMA_K / 8)) * 8;
      const bool inside = r < rows && k0 + c < k;
      const uint4 v = inside ? *reinterpret_cast<const uint4*>(x + (size_t)(b0 + r) * k + k0 + c) : zero;
      *reinterpret_cast<uint4*>(xs + r * W8A16_MMA_LD + c) = v;
    }
    // Weights: 64 channels x 64 int8, 16 per load, widened to bf16 (exact).
    for (int i = threadIdx.x; i < W8A16_MMA_CHANNELS * W8A16_MMA_K / 16; i += blockDim.x) {
      const int ch = i / (W8A16_MMA_K / 16), c = (i % (W8A16_MMA_K / 16)) * 16;
      const bool inside = n0 + ch < n && k0 + c < k;
      const uint4 raw = inside ? __ldg(reinterpret_cast<const uint4*>(w + (size_t)(n0 + ch) * k + k0 + c)) : zero;
      const int8_t* q = reinterpret_cast<const int8_t*>(&raw);
      __nv_bfloat16* dst = ws + ch * W8A16_MMA_LD + c;
#pragma unroll
      for (int j = 0; j < 16; ++j) dst[j] = __int2bfloat16_rn((int)q[j]);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < W8A16_MMA_K; kk += 16) {
      // B is k x channels; ws holds it channel-major, i.e. column-major with ld W8A16_MMA_LD.
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
      wmma::load_matrix_sync(b, ws + warp * 16 * W8A16_MMA_LD + kk, W8A16_MMA_LD);
#pragma unroll
      for (int m = 0; m < W8A16_MMA_ROWS / 16; ++m) {
        if (m < frags) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
          wmma::load_matrix_sync(a, xs + m * 16 * W8A16_MMA_LD + kk, W8A16_MMA_LD);
          wmma::mma_sync(acc[m], a, b, acc[m]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < W8A16_MMA_ROWS / 16; ++m)
    if (m < frags)
      wmma::store_matrix_sync(out + m * 16 * W8A16_MMA_OUT_LD + warp * 16, acc[m], W8A16_MMA_OUT_LD, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < rows * W8A16_MMA_CHANNELS; i += blockDim.x) {
    const int r = i / W8A16_MMA_CHANNELS, ch = i % W8A16_MMA_CHANNELS;
    if (n0 + ch < n)
      y[(size_t)(b0 + r) * n + n0 + ch] = __float2bfloat16(out[r * W8A16_MMA_OUT_LD + ch] * scale[n0 + ch]);
  }
}
