// Mimi's causal streaming convolutions (`mimi::conv::Conv1d::step`) on the GPU: the input a conv
// multiplies by its weights, laid out for one matrix product, with the conv's left context
// prepended, the ELU before it applied, and the context updated for the next step, all in one
// launch. On candle's ops that was the ELU, the concatenation, the select of the new context by
// the row mask, its store and the im2col copy: five launches.
// CPU reference: `Conv1d::step` composed of candle's ops (`tests/kernels.rs` compares the two).
#include "common.cuh"

// The most positions of context a conv keeps (Mimi's largest: 8, the 16-tap downsample of stride 8).
#define STREAM_CONV_MAX_CONTEXT 1024

// ELU with alpha 1, as candle's `elu`.
__device__ __forceinline__ float elu1(float v) { return v >= 0.f ? v : expf(v) - 1.f; }

// One (row r, channel c) a block: the sequence s = [prev[r, c, 0 .. context) | f(x[r, c, 0 .. t_in))]
// with f = ELU when `elu` (prev already holds f of what it kept), and
//   col[r, c * kernel + j, t] = s[t * stride + j * dilation]   for j < kernel, t < t_out,
// so that a weight [c_out, c_in * kernel] times col[r] is the conv's output [c_out, t_out]. Then, where
// active[r] is 1, prev[r, c] becomes the last `context` values of s (context = (kernel - 1) * dilation
// + 1 - stride, t_in = t_out * stride: the sequence is context + t_in long and the last tap of the last
// output reads its end). x [rows, c_in, t_in], prev [batch >= rows, c_in, context] (null when
// context is 0), active u8 [rows], col [rows, c_in * kernel, t_out], all f32 but active.
// Grid: rows * c_in blocks, any whole number of warps; context at most STREAM_CONV_MAX_CONTEXT.
extern "C" __global__ void stream_im2col_f32(const float* __restrict__ x, float* __restrict__ prev,
                                             const uint8_t* __restrict__ active, float* __restrict__ col,
                                             int c_in, int t_in, int context, int kernel, int stride, int dilation,
                                             int t_out, int elu) {
  grid_dependency_sync();
  __shared__ float tail[STREAM_CONV_MAX_CONTEXT];
  const int r = blockIdx.x / c_in;
  const size_t channel = blockIdx.x;  // r * c_in + c
  const float* xs = x + channel * t_in;
  float* kept = context > 0 ? prev + channel * context : nullptr;
  auto at = [&](int p) { return p < context ? kept[p] : (elu ? elu1(xs[p - context]) : xs[p - context]); };
  float* out = col + channel * kernel * t_out;
  for (int i = threadIdx.x; i < kernel * t_out; i += blockDim.x) {
    const int j = i / t_out, t = i % t_out;
    out[i] = at(t * stride + j * dilation);
  }
  if (context == 0 || !active[r]) return;
  // Every read of the old context (above and here) before any write of the new one.
  for (int q = threadIdx.x; q < context; q += blockDim.x) tail[q] = at(t_in + q);
  __syncthreads();
  for (int q = threadIdx.x; q < context; q += blockDim.x) kept[q] = tail[q];
}

// y[r, o, t] = y[r, o, t] + bias[o] (+ residual[r, o, t]), in place: the conv's product finished,
// with the skip connection of a residual block where there is one. bias [c_out] and residual
// [rows, c_out, t] may be null. Any 1-D grid over rows * c_out * t threads.
extern "C" __global__ void conv_bias_residual_f32(float* __restrict__ y, const float* __restrict__ bias,
                                                  const float* __restrict__ residual, int c_out, int t, int count) {
  grid_dependency_sync();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float v = y[i];
  if (bias) v += bias[(i / t) % c_out];
  if (residual) v += residual[i];
  y[i] = v;
}
