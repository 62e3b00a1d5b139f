// Checks kernels/norm.cu's rms_norm_bf16 and swiglu_bf16 on the CPU emulator against double-precision references
// written from the documented contracts. Build and run: tests/emu/README.md.
#include "check.h"

#include "norm.cu"

namespace {

constexpr bf16 kUntouched = {0xDEAD};
constexpr int kThreads = 256;           // the host's block for both kernels
constexpr unsigned kMaxBlocks = 65535;  // the host's cap on swiglu's grid

// A bf16 result rounded from f32: off by at most 2^-8 of the value, plus f32 arithmetic's slack (relative,
// and absolute where the value lies below bf16's smallest subnormal).
double bf16_tolerance(double expected, double f32_slack) {
  return std::abs(expected) * (1.0 / 256 + f32_slack) + 1e-38;
}

// ---- rms_norm_bf16 ----

// Row r's magnitude: ±(r + 1) for most rows; row 1 all zeros (y = 0 through eps); row 2 around 1e-3, where
// eps outweighs mean(x^2).
double row_span(int row) { return row == 1 ? 0.0 : row == 2 ? 1e-3 : row + 1.0; }

std::vector<double> expected_norm_row(const bf16* x, const float* alpha, int dim, float eps) {
  double sum_of_squares = 0;
  for (int i = 0; i < dim; ++i) sum_of_squares += to_double(x[i]) * to_double(x[i]);
  const double inv_rms = 1 / std::sqrt(sum_of_squares / dim + eps);
  std::vector<double> y(dim);
  for (int i = 0; i < dim; ++i) y[i] = to_double(x[i]) * alpha[i] * inv_rms;
  return y;
}

// The host contract: one block of 256 threads per row.
void test_rms_norm(int rows, int dim, float eps) {
  Case check(format("rms_norm_bf16 rows=%d dim=%d eps=%g", rows, dim, eps));
  emu::DeviceMemory memory;
  bf16* x = memory.alloc<bf16>(size_t(rows) * dim);
  float* alpha = memory.alloc<float>(dim);
  bf16* y = memory.alloc<bf16>(size_t(rows) * dim);
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < dim; ++i) x[size_t(r) * dim + i] = to_bf16(uniform(-1, 1) * row_span(r));
  for (int i = 0; i < dim; ++i) alpha[i] = float(uniform(0.5, 1.5));
  std::fill_n(y, size_t(rows) * dim, kUntouched);
  emu::launch("rms_norm_bf16", dim3(rows), dim3(kThreads), [&] { rms_norm_bf16(x, alpha, y, dim, eps); });
  double max_relative = 0;
  for (int r = 0; r < rows; ++r) {
    const std::vector<double> expected = expected_norm_row(x + size_t(r) * dim, alpha, dim, eps);
    for (int i = 0; i < dim; ++i) {
      const double got = to_double(y[size_t(r) * dim + i]), error = std::abs(got - expected[i]);
      if (expected[i] != 0) max_relative = std::max(max_relative, error / std::abs(expected[i]));
      check.expect(error <= bf16_tolerance(expected[i], 2e-5), "row %d dim %d: %g, expected %g", r, i, got,
                   expected[i]);
    }
  }
  check.finish(format("max relative error %.3g", max_relative));
}

// ---- swiglu_bf16 ----

double silu(double a) { return a / (1 + std::exp(-a)); }

// Gates mostly in ±8, with saturated ones (±20, ±100) and zeros at fixed places; values in ±4.
bf16 random_gate(size_t index) {
  static constexpr double kExtremes[] = {-100, -20, 0, 20, 100};
  return to_bf16(index % 97 < 5 ? kExtremes[index % 97] : uniform(-8, 8));
}

void fill_swiglu_input(bf16* in, int rows, int hidden) {
  for (size_t r = 0; r < size_t(rows); ++r)
    for (size_t j = 0; j < size_t(hidden); ++j) {
      in[r * 2 * hidden + j] = random_gate(r * hidden + j);
      in[r * 2 * hidden + hidden + j] = to_bf16(uniform(-4, 4));
    }
}

// The host contract: 256 threads a block, ceil(rows * hidden / 256) blocks up to 65535 (a grid-stride loop
// covers the rest).
dim3 swiglu_grid(size_t total) {
  return dim3(unsigned(std::min<size_t>((total + kThreads - 1) / kThreads, kMaxBlocks)));
}

void test_swiglu(int rows, int hidden) {
  const size_t total = size_t(rows) * hidden;
  const dim3 grid = swiglu_grid(total);
  Case check(format("swiglu_bf16 rows=%d hidden=%d (%u blocks)", rows, hidden, grid.x));
  emu::DeviceMemory memory;
  bf16* in = memory.alloc<bf16>(2 * total);
  bf16* out = memory.alloc<bf16>(total);
  fill_swiglu_input(in, rows, hidden);
  std::fill_n(out, total, kUntouched);
  emu::launch("swiglu_bf16", grid, dim3(kThreads), [&] { swiglu_bf16(in, out, rows, hidden); });
  double max_relative = 0;
  for (size_t r = 0; r < size_t(rows); ++r)
    for (size_t j = 0; j < size_t(hidden); ++j) {
      const double a = to_double(in[r * 2 * hidden + j]), b = to_double(in[r * 2 * hidden + hidden + j]);
      const double expected = silu(a) * b, got = to_double(out[r * hidden + j]);
      const double error = std::abs(got - expected);
      if (std::abs(expected) > 1e-30) max_relative = std::max(max_relative, error / std::abs(expected));
      check.expect(error <= bf16_tolerance(expected, 1e-5), "row %zu column %zu: %g, expected %g", r, j, got,
                   expected);
    }
  check.finish(format("max relative error %.3g", max_relative));
}

// ---- skip_layer_norm_f32 ----

enum class Skip { None, Unscaled, Scaled };

// `kind`: no update (a plain LayerNorm), an update added as it is, or scaled first. Row r's values lie around
// an offset of r (so the mean matters), with spans as rms_norm's rows (row 1 constant: y = bias through eps).
void test_skip_layer_norm(int rows, int dim, int threads, Skip kind) {
  static const char* kNames[] = {"plain", "skip", "scaled skip"};
  Case check(format("skip_layer_norm_f32 %s rows=%d dim=%d threads=%d", kNames[int(kind)], rows, dim, threads));
  constexpr float kEps = 1e-5f, kSentinel = -1234.5f;
  emu::DeviceMemory memory;
  const size_t total = size_t(rows) * dim;
  float* x = memory.alloc<float>(total);
  float* update = kind == Skip::None ? nullptr : memory.alloc<float>(total);
  float* scale = kind == Skip::Scaled ? memory.alloc<float>(dim) : nullptr;
  float* weight = memory.alloc<float>(dim);
  float* bias = memory.alloc<float>(dim);
  float* x_out = memory.alloc<float>(total);
  float* y = memory.alloc<float>(total);
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < dim; ++i) {
      const size_t at = size_t(r) * dim + i;
      x[at] = float(r + uniform(-1, 1) * row_span(r));
      if (update) update[at] = r == 1 ? 0.f : float(uniform(-3, 3));
    }
  for (int i = 0; i < dim; ++i) {
    if (scale) scale[i] = float(uniform(-0.1, 0.1));
    weight[i] = float(uniform(0.5, 1.5));
    bias[i] = float(uniform(-0.5, 0.5));
  }
  std::fill_n(x_out, total, kSentinel);
  std::fill_n(y, total, kSentinel);
  emu::launch("skip_layer_norm_f32", dim3(rows), dim3(threads),
              [&] { skip_layer_norm_f32(x, update, scale, weight, bias, x_out, y, dim, kEps); });
  double max_error = 0;
  for (int r = 0; r < rows; ++r) {
    std::vector<float> v(dim);
    double mean = 0, var = 0;
    for (int i = 0; i < dim; ++i) {
      const size_t at = size_t(r) * dim + i;
      // Two f32 operations, each rounded (the intrinsics keep the host compiler from fusing them).
      const float scaled = update ? (scale ? __fmul_rn(scale[i], update[at]) : update[at]) : 0.f;
      v[i] = update ? __fadd_rn(x[at], scaled) : x[at];
      mean += v[i];
    }
    mean /= dim;
    for (int i = 0; i < dim; ++i) var += (v[i] - mean) * (v[i] - mean);
    const double inv = 1 / std::sqrt(var / dim + kEps);
    for (int i = 0; i < dim; ++i) {
      const size_t at = size_t(r) * dim + i;
      const float kept = update ? v[i] : kSentinel;
      check.expect(std::memcmp(&x_out[at], &kept, sizeof(float)) == 0, "row %d dim %d: x_out %g, expected %g", r,
                   i, x_out[at], kept);
      const double z = (v[i] - mean) * inv, expected = z * weight[i] + bias[i];
      const double error = std::abs(y[at] - expected);
      max_error = std::max(max_error, error / (std::abs(z) + 1));
      check.expect(error <= 5e-5 * ((std::abs(z) + 1) * weight[i] + std::abs(bias[i])),
                   "row %d dim %d: %g, expected %g", r, i, y[at], expected);
    }
  }
  check.finish(format("max error %.3g of (|z| + 1)", max_error));
}

}  // namespace

int main() {
  // Widths below a warp, a partial warp (100), one block's worth (256), not a multiple of it (1000, 3077) and
  // a model's 4096; a second eps, which the tiny row (mean(x^2) ~ 3e-7) feels.
  for (int dim : {1, 7, 100, 256, 1000, 3077, 4096}) test_rms_norm(5, dim, 1e-5f);
  test_rms_norm(3, 4096, 1e-6f);
  // One element; a partial block; rows that straddle blocks; a grid past the 65535-block cap, so the
  // grid-stride loop takes the last 1263 elements round a second time.
  const std::pair<int, int> swiglu_shapes[] = {{1, 1}, {3, 100}, {5, 1000}, {7, 2731}, {2, 4096}, {1491, 11253}};
  for (const auto& [rows, hidden] : swiglu_shapes) test_swiglu(rows, hidden);
  // Mimi's 512 at the host's 128 threads, and widths and blocks around it (a partial warp, fewer threads than
  // values, more threads than values).
  for (Skip kind : {Skip::None, Skip::Unscaled, Skip::Scaled}) {
    for (int dim : {1, 7, 100, 512, 1000, 4096}) test_skip_layer_norm(4, dim, 128, kind);
    test_skip_layer_norm(3, 512, 32, kind);
    test_skip_layer_norm(3, 100, 1024, kind);
  }
  return summarise("norm");
}
