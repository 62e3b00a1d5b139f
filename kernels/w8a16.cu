// Weight-only int8 matrix-vector products: y[b, n] = scale[n] * sum_k x[b, k] * w[n, k], with bf16
// activations, int8 weights stored [n, k] row-major, one f32 scale per output channel, f32
// accumulation. One warp per output row reads 16 weights per lane with one 128-bit load and
// applies them to up to 8 batch rows at once: the weight matrix is read once per 8 rows.
// Host requirements: k % 16 == 0, w 16-byte aligned.
#include "common.cuh"

#define W8A16_WARPS_PER_BLOCK 4
#define W8A16_BATCH_TILE 8

extern "C" __global__ void w8a16_bf16(const __nv_bfloat16* __restrict__ x, const int8_t* __restrict__ w,
                                      const float* __restrict__ scale, __nv_bfloat16* __restrict__ y,
                                      int batch, int n, int k) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * W8A16_WARPS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= n) return;
  const int8_t* w_row = w + (size_t)row * k;
  for (int b0 = 0; b0 < batch; b0 += W8A16_BATCH_TILE) {
    const int rows = min(W8A16_BATCH_TILE, batch - b0);
    float acc[W8A16_BATCH_TILE];
#pragma unroll
    for (int b = 0; b < W8A16_BATCH_TILE; ++b) acc[b] = 0.f;
    for (int i = lane * 16; i < k; i += 32 * 16) {
      const int4 packed = *reinterpret_cast<const int4*>(w_row + i);
      const int8_t* q = reinterpret_cast<const int8_t*>(&packed);
      float wf[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) wf[j] = (float)q[j];
#pragma unroll
      for (int b = 0; b < W8A16_BATCH_TILE; ++b) {
        if (b < rows) {
          const __nv_bfloat162* xr = reinterpret_cast<const __nv_bfloat162*>(x + (size_t)(b0 + b) * k + i);
          float s = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float2 xf = __bfloat1622float2(xr[j]);
            s += xf.x * wf[2 * j] + xf.y * wf[2 * j + 1];
          }
          acc[b] += s;
        }
      }
    }
#pragma unroll
    for (int b = 0; b < W8A16_BATCH_TILE; ++b) {
      if (b < rows) {
        const float v = warp_sum(acc[b]);
        if (lane == 0) y[(size_t)(b0 + b) * n + row] = __float2bfloat16(v * scale[row]);
      }
    }
  }
}
