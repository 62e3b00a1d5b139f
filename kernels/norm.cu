// Fused RMS normalisation of bf16 rows, computed in f32: y = x * alpha / sqrt(mean(x^2) + eps).
// One block per row. Rows of whole 16-byte words (8 values, all three buffers aligned) are read
// a word per load, several loads in flight per thread: the block is alone on its SM, so its
// time is the latency of its loads.
#include "common.cuh"

extern "C" __global__ void rms_norm_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ alpha,
                                         __nv_bfloat16* __restrict__ y, int dim, float eps) {
  grid_dependency_sync();
  __shared__ float shared[32];
  const __nv_bfloat16* xr = x + (size_t)blockIdx.x * dim;
  __nv_bfloat16* yr = y + (size_t)blockIdx.x * dim;
  const bool words = dim % 8 == 0 && (((size_t)xr | (size_t)yr | (size_t)alpha) & 15) == 0;
  const int word_count = dim / 8;
  float sum = 0.f;
  if (words) {
    const uint4* xw = reinterpret_cast<const uint4*>(xr);
#pragma unroll 4
    for (int w = threadIdx.x; w < word_count; w += blockDim.x) {
      float v[8];
      bf16x8_to_f32(xw[w], v);
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += v[i] * v[i];
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
      const float v = __bfloat162float(xr[i]);
      sum += v * v;
    }
  }
  const float inv = rsqrtf(block_sum(sum, shared) / (float)dim + eps);
  if (words) {
    const uint4* xw = reinterpret_cast<const uint4*>(xr);
    const float4* aw = reinterpret_cast<const float4*>(alpha);
    uint4* yw = reinterpret_cast<uint4*>(yr);
#pragma unroll 4
    for (int w = threadIdx.x; w < word_count; w += blockDim.x) {
      float v[8];
      bf16x8_to_f32(xw[w], v);
      const float4 a0 = aw[2 * w], a1 = aw[2 * w + 1];
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      uint4 out;
      __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pairs[i].x = __float2bfloat16(v[2 * i] * inv * a[2 * i]);
        pairs[i].y = __float2bfloat16(v[2 * i + 1] * inv * a[2 * i + 1]);
      }
      yw[w] = out;
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
      yr[i] = __float2bfloat16(__bfloat162float(xr[i]) * inv * alpha[i]);
    }
  }
}

// The gated FFN's activation: out[r, j] = silu(in[r, j]) * in[r, h + j] for rows of width 2h.
extern "C" __global__ void swiglu_bf16(const __nv_bfloat16* __restrict__ in, __nv_bfloat16* __restrict__ out,
                                       int rows, int hidden) {
  grid_dependency_sync();
  const size_t total = (size_t)rows * hidden;
  for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
    const size_t r = idx / hidden, j = idx % hidden;
    const float a = __bfloat162float(in[r * 2 * hidden + j]);
    const float b = __bfloat162float(in[r * 2 * hidden + hidden + j]);
    out[idx] = __float2bfloat16(a / (1.f + __expf(-a)) * b);
  }
}

// Mimi's transformer between two sublayers, in f32: the skip connection, then the next LayerNorm.
// v = x + scale * update (each product and sum rounded alone, as two separate f32 ops would),
// x_out = v, y = (v - mean(v)) / sqrt(var(v) + eps) * weight + bias, the variance biased and
// taken around the mean (two passes). `update` null: v = x and x_out is not written (a plain
// LayerNorm); `scale` null: a scale of 1. One block per row, any block size; every pass
// recomputes v from the inputs, so no thread reads another's output.
__device__ __forceinline__ float skipped(const float* __restrict__ x, const float* __restrict__ update,
                                         const float* __restrict__ scale, int i) {
  if (!update) return x[i];
  return __fadd_rn(x[i], scale ? __fmul_rn(scale[i], update[i]) : update[i]);
}

extern "C" __global__ void skip_layer_norm_f32(const float* __restrict__ x, const float* __restrict__ update,
                                               const float* __restrict__ scale, const float* __restrict__ weight,
                                               const float* __restrict__ bias, float* __restrict__ x_out,
                                               float* __restrict__ y, int dim, float eps) {
  grid_dependency_sync();
  __shared__ float shared[32];
  const size_t row = (size_t)blockIdx.x * dim;
  const float* xr = x + row;
  const float* ur = update ? update + row : nullptr;
  float sum = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = skipped(xr, ur, scale, i);
    if (ur) x_out[row + i] = v;
    sum += v;
  }
  const float mean = block_sum(sum, shared) / (float)dim;
  float squares = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float d = skipped(xr, ur, scale, i) - mean;
    squares += d * d;
  }
  const float inv = rsqrtf(block_sum(squares, shared) / (float)dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x)
    y[row + i] = (skipped(xr, ur, scale, i) - mean) * inv * weight[i] + bias[i];
}
