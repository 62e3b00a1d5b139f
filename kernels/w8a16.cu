// Weight-only int8 matrix-vector products: y[b, n] = scale[n] * sum_k x[b, k] * w[n, k], with bf16
// activations, int8 weights stored [n, k] row-major, one f32 scale per output channel, f32
// accumulation. Four output rows per warp: each lane keeps four 128-bit weight loads in flight and
// reads its 16 activations once (two 128-bit loads) for all four rows, so activations are read a
// quarter as often and memory latency overlaps (on an H200 this took the 4096 -> 22528 product at
// batch 1 from 63.5 us with one row per warp to 38.4 us; cuBLAS bf16 takes 55 us). Batch tiles of
// 4 rows keep the 16 accumulators in registers; past a few rows cuBLAS bf16 is faster. Weights
// widen by a byte permute and a float subtract (`int8x4_to_f32`), not the integer-to-float
// conversion, which Hopper issues at a quarter of the float rate (in the 22528-channel product
// above it ran at 2.5 T conversions a second, more than half of that rate: gemv.cu has the
// arithmetic); the values are the same, exactly.
// Host requirements: k % 16 == 0, x and w 16-byte aligned; n need not divide by 4.
#include "common.cuh"

#define W8A16_WARPS_PER_BLOCK 4
#define W8A16_ROWS_PER_WARP 4
#define W8A16_BATCH_TILE 4

// The four weight rows of a warp from input i (zeros past the last channel).
__device__ __forceinline__ void load_row_words(int4 (&packed)[W8A16_ROWS_PER_WARP], const int8_t* __restrict__ w,
                                               int row0, int n, int k, int i) {
#pragma unroll
  for (int r = 0; r < W8A16_ROWS_PER_WARP; ++r)
    packed[r] = (row0 + r < n) ? __ldg(reinterpret_cast<const int4*>(w + (size_t)(row0 + r) * k + i))
                               : make_int4(0, 0, 0, 0);
}

// acc[r][b] += x[b0 + b, i .. i + 16) . w[row0 + r, i .. i + 16) for the tile's `rows` rows.
__device__ __forceinline__ void multiply_row_words(float (&acc)[W8A16_ROWS_PER_WARP][W8A16_BATCH_TILE],
                                                   const int4 (&packed)[W8A16_ROWS_PER_WARP],
                                                   const __nv_bfloat16* __restrict__ x, int b0, int rows, int k,
                                                   int i) {
#pragma unroll
  for (int b = 0; b < W8A16_BATCH_TILE; ++b) {
    if (b < rows) {
      const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)(b0 + b) * k + i);
      float xf[16];
      bf16x8_to_f32(xv[0], xf);
      bf16x8_to_f32(xv[1], xf + 8);
#pragma unroll
      for (int r = 0; r < W8A16_ROWS_PER_WARP; ++r) {
        const uint32_t* words = reinterpret_cast<const uint32_t*>(&packed[r]);
        float q[16];
#pragma unroll
        for (int j = 0; j < 4; ++j) int8x4_to_f32(words[j], q + 4 * j);
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) s += xf[j] * q[j];
        acc[r][b] += s;
      }
    }
  }
}

// Both entry points below, once they have waited for the kernel before them. With AHEAD, a lane
// loads its next 16 bytes of each row before it multiplies the ones it holds, so each warp keeps
// a round of loads in flight while it computes (16 more registers, four blocks an SM, not five).
template <bool AHEAD>
__device__ __forceinline__ void w8a16_rows(const __nv_bfloat16* __restrict__ x, const int8_t* __restrict__ w,
                                           const float* __restrict__ scale, __nv_bfloat16* __restrict__ y,
                                           int batch, int n, int k) {
  constexpr int STRIDE = 32 * 16;
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
    int4 packed[W8A16_ROWS_PER_WARP];
    if (AHEAD && lane * 16 < k) load_row_words(packed, w, row0, n, k, lane * 16);
    for (int i = lane * 16; i < k; i += STRIDE) {
      if (AHEAD) {
        int4 next[W8A16_ROWS_PER_WARP];
        const bool more = i + STRIDE < k;
        if (more) load_row_words(next, w, row0, n, k, i + STRIDE);
        multiply_row_words(acc, packed, x, b0, rows, k, i);
        if (more)
#pragma unroll
          for (int r = 0; r < W8A16_ROWS_PER_WARP; ++r) packed[r] = next[r];
      } else {
        load_row_words(packed, w, row0, n, k, i);
        multiply_row_words(acc, packed, x, b0, rows, k, i);
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

// Five blocks an SM, as before the widening above, which left alone takes 122 registers on sm_90 (96 before).
extern "C" __global__ void __launch_bounds__(32 * W8A16_WARPS_PER_BLOCK, 5)
    w8a16_bf16(const __nv_bfloat16* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ scale,
               __nv_bfloat16* __restrict__ y, int batch, int n, int k) {
  grid_dependency_sync();
  w8a16_rows<false>(x, w, scale, y, batch, n, k);
}

extern "C" __global__ void __launch_bounds__(32 * W8A16_WARPS_PER_BLOCK, 4)
    w8a16_ahead_bf16(const __nv_bfloat16* __restrict__ x, const int8_t* __restrict__ w,
                     const float* __restrict__ scale, __nv_bfloat16* __restrict__ y, int batch, int n, int k) {
  grid_dependency_sync();
  w8a16_rows<true>(x, w, scale, y, batch, n, k);
}

// The same product on the tensor cores, for batches where the matrix-vector kernel above loses
// to cuBLAS bf16: int8 weights are exact in bf16, so each block widens a 64-channel slice of
// weights to bf16 in shared memory and multiplies every row of its tile by it with WMMA (16x16x16
// bf16 in, f32 accumulate); the scale is applied to the output columns at the end.
// A block of 8 warps takes 64 output channels and a tile of up to 64 rows (gridDim.y tiles) down
// the whole of k, in slices of 128 inputs: warp w multiplies channels 16 (w % 4) .. + 16 over
// inputs 64 (w / 4) .. + 64 of each slice, for every 16-row fragment of the tile that holds a row;
// the two halves' sums meet in shared memory at the end. Each thread loads its share of the next
// slice (2 weight and up to 4 activation 16-byte words) into registers before the warps multiply
// the current one, so a slice's memory latency hides behind the one before it. (Before: 4 warps,
// 64-input slices loaded only after the last was used, the whole 64-row tile staged however few
// its rows; on an H200 at 32 rows the product ran at about 0.2 TB/s.)
// Split K: where the tiles alone would leave SMs idle (64 blocks for a 4096-channel matrix, 16
// for the depformer's 1024), gridDim.z blocks share a tile, block z taking inputs split_k z ..
// + split_k, and write their unscaled sums to `partial` [gridDim.z, batch, n] (f32), which
// `w8a16_mma_join` adds up in z order, scales and rounds; with a null `partial` the block
// writes y itself.
// Host requirements: k % 16 == 0, x and w 16-byte aligned; blockDim.x = 32 * W8A16_MMA_WARPS;
// gridDim = (ceil(n / 64), ceil(batch / 64), ceil(k / split_k)), split_k a multiple of 128
// (W8A16_MMA_K); partial null exactly when gridDim.z = 1.
#include <mma.h>

#define W8A16_MMA_CHANNELS 64
#define W8A16_MMA_ROWS 64
#define W8A16_MMA_K 128
#define W8A16_MMA_WARPS 8
#define W8A16_MMA_THREADS (32 * W8A16_MMA_WARPS)
#define W8A16_MMA_LD (W8A16_MMA_K + 8)
#define W8A16_MMA_OUT_LD (W8A16_MMA_CHANNELS + 4)
// Each thread's 16-byte words of a slice: int8 weights, bf16 activations (at a full tile).
#define W8A16_MMA_W_WORDS (W8A16_MMA_CHANNELS * W8A16_MMA_K / 16 / W8A16_MMA_THREADS)
#define W8A16_MMA_X_WORDS (W8A16_MMA_ROWS * W8A16_MMA_K / 8 / W8A16_MMA_THREADS)

// A thread's share of one slice of weights and activations, on its way to shared memory.
struct MmaSlice {
  uint4 w[W8A16_MMA_W_WORDS];
  uint4 x[W8A16_MMA_X_WORDS];
};

// The tile a block multiplies: its first output channel and row, and how many rows it stages (its
// rows rounded up to whole 16-row fragments; rows past the batch are zeros).
struct MmaTile {
  int n0, b0, rows, staged;
};

// This thread's words of the slice at input k0 (zeros from input k_end, past n and past the tile's rows).
__device__ __forceinline__ void load_mma_slice(MmaSlice& slice, const __nv_bfloat16* __restrict__ x,
                                               const int8_t* __restrict__ w, const MmaTile& tile, int n, int k,
                                               int k_end, int k0) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int j = 0; j < W8A16_MMA_W_WORDS; ++j) {
    const int i = threadIdx.x + j * W8A16_MMA_THREADS;
    const int ch = i / (W8A16_MMA_K / 16), c = (i % (W8A16_MMA_K / 16)) * 16;
    const bool inside = tile.n0 + ch < n && k0 + c < k_end;
    slice.w[j] = inside ? __ldg(reinterpret_cast<const uint4*>(w + (size_t)(tile.n0 + ch) * k + k0 + c)) : zero;
  }
#pragma unroll
  for (int j = 0; j < W8A16_MMA_X_WORDS; ++j) {
    const int i = threadIdx.x + j * W8A16_MMA_THREADS;
    const int r = i / (W8A16_MMA_K / 8), c = (i % (W8A16_MMA_K / 8)) * 8;
    const bool inside = r < tile.rows && k0 + c < k_end;
    slice.x[j] = inside ? *reinterpret_cast<const uint4*>(x + (size_t)(tile.b0 + r) * k + k0 + c) : zero;
  }
}

// The slice into shared memory: activations as they are, weights widened to bf16 (exact: an int8 is
// an f32 whose low 16 bits are zero, so its bf16 is the f32's high half).
__device__ __forceinline__ void store_mma_slice(const MmaSlice& slice, const MmaTile& tile, __nv_bfloat16* xs,
                                                __nv_bfloat16* ws) {
#pragma unroll
  for (int j = 0; j < W8A16_MMA_W_WORDS; ++j) {
    const int i = threadIdx.x + j * W8A16_MMA_THREADS;
    const int ch = i / (W8A16_MMA_K / 16), c = (i % (W8A16_MMA_K / 16)) * 16;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(&slice.w[j]);
    uint32_t pairs[8];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      float f[4];
      int8x4_to_f32(words[q], f);
      pairs[2 * q] = __byte_perm(__float_as_uint(f[0]), __float_as_uint(f[1]), 0x7632);
      pairs[2 * q + 1] = __byte_perm(__float_as_uint(f[2]), __float_as_uint(f[3]), 0x7632);
    }
    // Eight threads store 16 bytes each at a time, 32 bytes apart: threads 4-7 of each eight
    // store their second half first, so the eight fill distinct banks.
    uint4* dst = reinterpret_cast<uint4*>(ws + ch * W8A16_MMA_LD + c);
    const uint4 lo = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
    const uint4 hi = make_uint4(pairs[4], pairs[5], pairs[6], pairs[7]);
    const int second_first = (threadIdx.x >> 2) & 1;
    dst[second_first] = second_first ? hi : lo;
    dst[1 - second_first] = second_first ? lo : hi;
  }
#pragma unroll
  for (int j = 0; j < W8A16_MMA_X_WORDS; ++j) {
    const int i = threadIdx.x + j * W8A16_MMA_THREADS;
    const int r = i / (W8A16_MMA_K / 8), c = (i % (W8A16_MMA_K / 8)) * 8;
    if (r < tile.staged) *reinterpret_cast<uint4*>(xs + r * W8A16_MMA_LD + c) = slice.x[j];
  }
}

extern "C" __global__ void __launch_bounds__(W8A16_MMA_THREADS, 2) w8a16_mma_bf16(const __nv_bfloat16* __restrict__ x, const int8_t* __restrict__ w,
                                          const float* __restrict__ scale, __nv_bfloat16* __restrict__ y,
                                          float* __restrict__ partial, int batch, int n, int k, int split_k) {
  grid_dependency_sync();
  using namespace nvcuda;
  // The staged slice (activations, then weights) while multiplying; each k-half's sums afterwards.
  constexpr int STAGED_BYTES = (W8A16_MMA_ROWS + W8A16_MMA_CHANNELS) * W8A16_MMA_LD * 2;
  constexpr int SUM_BYTES = 2 * W8A16_MMA_ROWS * W8A16_MMA_OUT_LD * 4;
  __shared__ __align__(32) unsigned char shared[STAGED_BYTES > SUM_BYTES ? STAGED_BYTES : SUM_BYTES];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(shared);
  __nv_bfloat16* ws = xs + W8A16_MMA_ROWS * W8A16_MMA_LD;
  float* sums = reinterpret_cast<float*>(shared);
  const int warp = threadIdx.x >> 5, group = warp % 4, half = warp / 4;
  MmaTile tile;
  tile.n0 = blockIdx.x * W8A16_MMA_CHANNELS;
  tile.b0 = blockIdx.y * W8A16_MMA_ROWS;
  tile.rows = min(W8A16_MMA_ROWS, batch - tile.b0);
  const int frags = (tile.rows + 15) / 16;
  tile.staged = frags * 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[W8A16_MMA_ROWS / 16];
#pragma unroll
  for (int m = 0; m < W8A16_MMA_ROWS / 16; ++m) wmma::fill_fragment(acc[m], 0.f);
  const int k_begin = blockIdx.z * split_k, k_end = min(k, k_begin + split_k);
  MmaSlice slice;
  load_mma_slice(slice, x, w, tile, n, k, k_end, k_begin);
  for (int k0 = k_begin; k0 < k_end; k0 += W8A16_MMA_K) {
    store_mma_slice(slice, tile, xs, ws);
    __syncthreads();
    if (k0 + W8A16_MMA_K < k_end) load_mma_slice(slice, x, w, tile, n, k, k_end, k0 + W8A16_MMA_K);
#pragma unroll
    for (int kk = half * (W8A16_MMA_K / 2); kk < (half + 1) * (W8A16_MMA_K / 2); kk += 16) {
      // B is k x channels; ws holds it channel-major, i.e. column-major with ld W8A16_MMA_LD.
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
      wmma::load_matrix_sync(b, ws + group * 16 * W8A16_MMA_LD + kk, W8A16_MMA_LD);
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
  float* half_sums = sums + half * W8A16_MMA_ROWS * W8A16_MMA_OUT_LD;
#pragma unroll
  for (int m = 0; m < W8A16_MMA_ROWS / 16; ++m)
    if (m < frags)
      wmma::store_matrix_sync(half_sums + m * 16 * W8A16_MMA_OUT_LD + group * 16, acc[m], W8A16_MMA_OUT_LD,
                              wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < tile.rows * W8A16_MMA_CHANNELS; i += W8A16_MMA_THREADS) {
    const int r = i / W8A16_MMA_CHANNELS, ch = i % W8A16_MMA_CHANNELS, at = r * W8A16_MMA_OUT_LD + ch;
    if (tile.n0 + ch < n) {
      const float sum = sums[at] + sums[W8A16_MMA_ROWS * W8A16_MMA_OUT_LD + at];
      const size_t out = (size_t)(tile.b0 + r) * n + tile.n0 + ch;
      if (partial)
        partial[(size_t)blockIdx.z * batch * n + out] = sum;
      else
        y[out] = __float2bfloat16(sum * scale[tile.n0 + ch]);
    }
  }
}

// y[b, c] = scale[c] * the sum over z of partial[z, b, c], in z order: the split-K blocks of
// `w8a16_mma_bf16` joined. One thread an output; any 1-D grid covering batch * n.
extern "C" __global__ void w8a16_mma_join(const float* __restrict__ partial, const float* __restrict__ scale,
                                          __nv_bfloat16* __restrict__ y, int splits, int batch, int n) {
  grid_dependency_sync();
  const size_t outputs = (size_t)batch * n, i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= outputs) return;
  float sum = 0.f;
  for (int z = 0; z < splits; ++z) sum += partial[z * outputs + i];
  y[i] = __float2bfloat16(sum * scale[i % n]);
}
