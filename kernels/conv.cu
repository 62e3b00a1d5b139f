// Mimi's causal streaming convolutions (`mimi::conv::Conv1d::step`) on the GPU: the input a conv
// multiplies by its weights, laid out for one matrix product, with the conv's left context
// prepended, the ELU before it applied, and the context updated for the next step, all in one
// launch; after the product, its bias and skip connection in another. On candle's ops that was
// the ELU, the concatenation, the select of the new context by the row mask, its store, the
// im2col copy, then the transpose of the product, the bias and the skip: up to nine launches
// besides the product, now two.
// CPU reference: `Conv1d::step` composed of candle's ops (`tests/kernels.rs` compares the two).
#include "common.cuh"

// The most positions of context a conv keeps (Mimi's largest: 8, the 16-tap downsample of stride 8).
#define STREAM_CONV_MAX_CONTEXT 1024

// ELU with alpha 1, as candle's `elu`.
__device__ __forceinline__ float elu1(float v) { return v >= 0.f ? v : expf(v) - 1.f; }

// The input of one conv step, for rows r < rows and channels c < c_in: the sequence
//   s[r, c] = [prev[r, c, 0 .. context) | f(x[r, c, 0 .. t_in))]
// with f = ELU when `elu` (prev already holds f of what it kept), laid out as the right-hand side of one
// product with the weights [c_out, c_in * kernel]:
//   col[c * kernel + j, r * t_out + t] = s[r, c][t * stride + j * dilation]   for j < kernel, t < t_out,
// so that the product is the conv's output [c_out, rows * t_out] (`conv_finish_f32` turns it to rows).
// Then, where active[r] is 1, prev[r, c] becomes the last `context` values of s[r, c] (context =
// (kernel - 1) * dilation + 1 - stride, t_in = t_out * stride: the sequence is context + t_in long and
// the last tap of the last output reads its end).
// x [rows, c_in, t_in], prev [batch >= rows, c_in, context] (null when context is 0), active u8
// [rows], col [c_in * kernel, rows * t_out], all f32 but active.
// Grid: (rows * c_in, ceil(t_out / t_chunk)); block (r * c_in + c, y) lays out outputs y * t_chunk ..
// + t_chunk of (r, c), any whole number of warps. t_chunk >= ceil(context / stride), so only the
// outputs of block y = 0 read the kept context (an output t reads it only where t * stride <
// context); that block alone moves it on, in place, once its threads have read all of it.
// context at most STREAM_CONV_MAX_CONTEXT.
extern "C" __global__ void stream_im2col_f32(const float* __restrict__ x, float* __restrict__ prev,
                                             const uint8_t* __restrict__ active, float* __restrict__ col,
                                             int c_in, int t_in, int context, int kernel, int stride, int dilation,
                                             int t_out, int t_chunk, int elu) {
  grid_dependency_sync();
  __shared__ float tail[STREAM_CONV_MAX_CONTEXT];
  const int rows = gridDim.x / c_in, r = blockIdx.x / c_in, c = blockIdx.x % c_in;
  const size_t channel = blockIdx.x;  // r * c_in + c
  const float* xs = x + channel * t_in;
  float* kept = context > 0 ? prev + channel * context : nullptr;
  auto at = [&](int p) { return p < context ? kept[p] : (elu ? elu1(xs[p - context]) : xs[p - context]); };
  const int t0 = blockIdx.y * t_chunk, count = min(t_chunk, t_out - t0);
  const size_t columns = (size_t)rows * t_out;
  float* out = col + (size_t)c * kernel * columns + (size_t)r * t_out + t0;
  for (int i = threadIdx.x; i < kernel * count; i += blockDim.x) {
    const int j = i / count, t = i % count;
    out[j * columns + t] = at((t0 + t) * stride + j * dilation);
  }
  if (context == 0 || blockIdx.y != 0 || !active[r]) return;
  // Every read of the old context (above and here) before any write of the new one.
  for (int q = threadIdx.x; q < context; q += blockDim.x) tail[q] = at(t_in + q);
  __syncthreads();
  for (int q = threadIdx.x; q < context; q += blockDim.x) kept[q] = tail[q];
}

// out[r, o, u] = y[o, r * t + u] + bias[o] (+ residual[r, o, u]) for u < t: a conv's product [c_out,
// rows * t] turned to [rows, c_out, t], with its bias and the skip connection of a residual block where
// there is one (bias [c_out] and residual [rows, c_out, t] may be null). Any 1-D grid over rows * c_out * t
// threads.
extern "C" __global__ void conv_finish_f32(const float* __restrict__ y, const float* __restrict__ bias,
                                           const float* __restrict__ residual, float* __restrict__ out, int rows,
                                           int c_out, int t) {
  grid_dependency_sync();
  const size_t count = (size_t)rows * c_out * t, i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int r = i / ((size_t)c_out * t), o = (i / t) % c_out, time = i % t;
  float v = y[(size_t)o * rows * t + (size_t)r * t + time];
  if (bias) v += bias[o];
  if (residual) v += residual[i];
  out[i] = v;
}
