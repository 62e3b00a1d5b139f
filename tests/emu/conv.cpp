// Checks kernels/conv.cu's stream_im2col_f32 (a streaming conv's input laid out for its product, with its left
// context, the ELU before it and the context's update) and conv_finish_f32 (the product turned to rows, with
// bias and skip connection) on the CPU emulator against references written from the documented contracts.
// Build and run: tests/emu/README.md.
#include "check.h"

#include "conv.cu"

namespace {

constexpr float kUntouched = -12345.f;

double elu(double v) { return v >= 0 ? v : std::exp(v) - 1; }

struct Shape {
  int rows, batch, c_in, t_out, kernel, stride, dilation;
  bool elu;
  int context() const { return (kernel - 1) * dilation + 1 - stride; }
  int t_in() const { return t_out * stride; }
};

// Every entry of col and of the context after the launch, against the sequence [old context | f(x)]. The host
// contract: grid (rows * c_in, ceil(t_out / t_chunk)), t_chunk at least ceil(context / stride).
void check_im2col(const Shape& s, int threads, int t_chunk, std::vector<uint8_t> active_rows) {
  const int context = s.context(), t_in = s.t_in(), kernel = s.kernel, t_out = s.t_out;
  Case check(format("stream_im2col_f32 rows=%d/%d c_in=%d t_in=%d kernel=%d stride=%d dilation=%d elu=%d threads=%d "
                    "t_chunk=%d",
                    s.rows, s.batch, s.c_in, t_in, kernel, s.stride, s.dilation, s.elu, threads, t_chunk));
  emu::DeviceMemory memory;
  float* x = memory.alloc<float>(size_t(s.rows) * s.c_in * t_in);
  float* prev = context > 0 ? memory.alloc<float>(size_t(s.batch) * s.c_in * context) : nullptr;
  uint8_t* active = memory.alloc<uint8_t>(s.rows);
  float* col = memory.alloc<float>(size_t(s.rows) * s.c_in * kernel * t_out);
  for (size_t i = 0; i < size_t(s.rows) * s.c_in * t_in; ++i) x[i] = float(uniform(-3, 3));
  std::vector<float> old_prev(size_t(s.batch) * s.c_in * std::max(context, 0));
  for (size_t i = 0; i < old_prev.size(); ++i) prev[i] = old_prev[i] = float(uniform(-1, 1));
  for (int r = 0; r < s.rows; ++r) active[r] = active_rows[r];
  std::fill_n(col, size_t(s.rows) * s.c_in * kernel * t_out, kUntouched);
  const unsigned chunks = (t_out + t_chunk - 1) / t_chunk;
  emu::launch("stream_im2col_f32", dim3(s.rows * s.c_in, chunks), dim3(threads), [&] {
    stream_im2col_f32(x, prev, active, col, s.c_in, t_in, context, kernel, s.stride, s.dilation, t_out, t_chunk,
                      s.elu);
  });
  const size_t columns = size_t(s.rows) * t_out;
  for (int r = 0; r < s.rows; ++r)
    for (int c = 0; c < s.c_in; ++c) {
      const size_t channel = size_t(r) * s.c_in + c;
      auto sequence = [&](int p) -> double {
        if (p < context) return old_prev[channel * context + p];
        const double v = x[channel * t_in + p - context];
        return s.elu ? elu(v) : v;
      };
      for (int j = 0; j < kernel; ++j)
        for (int t = 0; t < t_out; ++t) {
          const double expected = sequence(t * s.stride + j * s.dilation);
          const double got = col[(size_t(c) * kernel + j) * columns + size_t(r) * t_out + t];
          check.expect(std::abs(got - expected) <= 1e-6 * (1 + std::abs(expected)),
                       "row %d channel %d tap %d output %d: %g, expected %g", r, c, j, t, got, expected);
        }
      for (int q = 0; q < context; ++q) {
        const double expected = active[r] ? sequence(t_in + q) : old_prev[channel * context + q];
        const double got = prev[channel * context + q];
        check.expect(std::abs(got - expected) <= 1e-6 * (1 + std::abs(expected)),
                     "row %d channel %d context %d: %g, expected %g (active %d)", r, c, q, got, expected, active[r]);
      }
    }
  // Slots past the step's rows keep their context.
  for (size_t i = size_t(s.rows) * s.c_in * std::max(context, 0); i < old_prev.size(); ++i)
    check.expect(prev[i] == old_prev[i], "context %zu of a slot outside the step changed", i);
  check.finish(format("context %d", context));
}

void check_finish(int rows, int c_out, int t, bool bias, bool residual) {
  Case check(format("conv_finish_f32 rows=%d c_out=%d t=%d bias=%d residual=%d", rows, c_out, t, bias, residual));
  emu::DeviceMemory memory;
  const int count = rows * c_out * t;
  float* y = memory.alloc<float>(count);  // [c_out, rows * t]
  float* out = memory.alloc<float>(count);
  float* b = bias ? memory.alloc<float>(c_out) : nullptr;
  float* skip = residual ? memory.alloc<float>(count) : nullptr;
  for (int i = 0; i < count; ++i) y[i] = float(uniform(-2, 2));
  std::fill_n(out, count, kUntouched);
  if (b)
    for (int o = 0; o < c_out; ++o) b[o] = float(uniform(-1, 1));
  if (skip)
    for (int i = 0; i < count; ++i) skip[i] = float(uniform(-1, 1));
  const int threads = 256;
  emu::launch("conv_finish_f32", dim3((count + threads - 1) / threads), dim3(threads),
              [&] { conv_finish_f32(y, b, skip, out, rows, c_out, t); });
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < c_out; ++o)
      for (int u = 0; u < t; ++u) {
        const int at = (r * c_out + o) * t + u;
        // The same f32 additions in the same order: exact.
        float expected = y[o * rows * t + r * t + u];
        if (b) expected += b[o];
        if (skip) expected += skip[at];
        check.expect(out[at] == expected, "row %d channel %d time %d: %g, expected %g", r, o, u, out[at], expected);
      }
  check.finish("exact");
}

}  // namespace

int main() {
  // Mimi's shapes, one frame of 1920 samples: the first conv (7 taps, no ELU), a residual block's dilated 3-tap
  // conv and its 1-tap one (no context), the 4x downsample (8 taps, stride 4), the last stage's 16 taps of stride
  // 8 over 16 samples, the decoder's 7-tap conv at 1920.
  // t_chunk as the host picks it (cuda::StreamConv::outputs_per_block); 1920 / 37 leaves a partial last chunk.
  check_im2col({1, 1, 1, 1920, 7, 1, 1, false}, 128, 37, {1});
  check_im2col({2, 3, 64, 1920, 3, 1, 1, true}, 128, 86, {1, 0});
  check_im2col({2, 2, 32, 1920, 1, 1, 1, true}, 128, 256, {1, 1});
  check_im2col({1, 1, 64, 480, 8, 4, 1, true}, 128, 32, {1});
  check_im2col({3, 4, 512, 2, 16, 8, 1, true}, 32, 16, {1, 0, 1});
  // Dilation 3 (context 6); a context longer than the chunk (7 taps over 2 samples: the new context is 4 old
  // values and the 2 new ones, read and written in place); a block smaller than the context and the columns.
  // Chunks of the smallest size the context allows: 6 outputs of dilation 3, then 1 output at a time.
  check_im2col({2, 2, 5, 40, 3, 1, 3, false}, 32, 6, {0, 1});
  check_im2col({2, 3, 4, 2, 7, 1, 1, true}, 32, 6, {1, 1});
  check_im2col({1, 1, 3, 1, 50, 1, 20, true}, 32, 980, {1});  // context 980, of at most 1024
  check_im2col({2, 2, 3, 8, 8, 4, 1, true}, 32, 1, {1, 1});
  for (bool bias : {false, true})
    for (bool residual : {false, true}) check_finish(3, 64, 40, bias, residual);
  check_finish(1, 1024, 2, true, false);
  return summarise("conv");
}
