// Fused RMS normalisation of bf16 rows, computed in f32: y = x * alpha / sqrt(mean(x^2) + eps).
// One block per row.
#include "common.cuh"

extern "C" __global__ void rms_norm_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ alpha,
                                         __nv_bfloat16* __restrict__ y, int dim, float eps) {
  __shared__ float shared[32];
  const __nv_bfloat16* xr = x + (size_t)blockIdx.x * dim;
  __nv_bfloat16* yr = y + (size_t)blockIdx.x * dim;
  float sum = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = __bfloat162float(xr[i]);
    sum += v * v;
  }
  const float inv = rsqrtf(block_sum(sum, shared) / (float)dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    yr[i] = __float2bfloat16(__bfloat162float(xr[i]) * inv * alpha[i]);
  }
}

// The gated FFN's activation: out[r, j] = silu(in[r, j]) * in[r, h + j] for rows of width 2h.
extern "C" __global__ void swiglu_bf16(const __nv_bfloat16* __restrict__ in, __nv_bfloat16* __restrict__ out,
                                       int rows, int hidden) {
  const size_t total = (size_t)rows * hidden;
  for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
    const size_t r = idx / hidden, j = idx % hidden;
    const float a = __bfloat162float(in[r * 2 * hidden + j]);
    const float b = __bfloat162float(in[r * 2 * hidden + hidden + j]);
    out[idx] = __float2bfloat16(a / (1.f + __expf(-a)) * b);
  }
}
