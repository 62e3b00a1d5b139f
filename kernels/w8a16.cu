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
  grid_dependency_sync();
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
  grid_dependency_sync();
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
