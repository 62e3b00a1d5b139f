// Checks kernels/gemv.cu's split-K products (gemv_splitk_{int8,bf16}_b1..b4) on the CPU emulator against a
// double-precision reference written from the documented contract, and their gated form against the product
// followed by norm.cu's swiglu_bf16. Build and run: tests/emu/README.md.
#include "check.h"

#include "gemv.cu"
#include "norm.cu"

namespace {

constexpr bf16 kUntouched = {0xDEAD};
constexpr float kEps = 1e-5f;

template <class Weight>
using GemvEntry = void (*)(const bf16*, const Weight*, const float*, const bf16*, const float*, float, int, bf16*,
                           int, int);

template <class Weight>
constexpr bool kInt8 = std::is_same_v<Weight, int8_t>;

template <class Weight>
const char* weight_kind() {
  return kInt8<Weight> ? "int8" : "bf16";
}

template <class Weight>
GemvEntry<Weight> entry_point(int batch) {
  if constexpr (kInt8<Weight>) {
    constexpr GemvEntry<int8_t> entries[] = {gemv_splitk_int8_b1, gemv_splitk_int8_b2, gemv_splitk_int8_b3,
                                             gemv_splitk_int8_b4};
    return entries[batch - 1];
  } else {
    constexpr GemvEntry<bf16> entries[] = {gemv_splitk_bf16_b1, gemv_splitk_bf16_b2, gemv_splitk_bf16_b3,
                                           gemv_splitk_bf16_b4};
    return entries[batch - 1];
  }
}

// The host contract: blockDim.x = 32 * min(8, ceil(k / chunk)), a chunk being 32 loads of 16 bytes.
template <class Weight>
dim3 block_for(int k) {
  const int chunk = 32 * int(16 / sizeof(Weight));
  return dim3(32 * std::min(8, (k + chunk - 1) / chunk));
}

template <class Weight>
Weight random_weight() {
  if constexpr (kInt8<Weight>)
    return int8_t(uniform_int(-127, 127));
  else
    return to_bf16(uniform(-1, 1));
}

double weight_value(int8_t code) { return code; }
double weight_value(bf16 weight) { return to_double(weight); }

// The weights and what every batch shares, on the device, with the weights also as doubles.
template <class Weight>
struct Problem {
  int n, k;
  Weight* weights;  // [n, k]
  std::vector<double> weight_values;
  float* scale;  // [n] for int8 weights; null for bf16, which have none to read
  float* alpha;  // [k]
};

template <class Weight>
Problem<Weight> make_problem(emu::DeviceMemory& memory, int n, int k) {
  Problem<Weight> problem{n, k, memory.alloc<Weight>(size_t(n) * k), std::vector<double>(size_t(n) * k),
                          kInt8<Weight> ? memory.alloc<float>(n) : nullptr, memory.alloc<float>(k)};
  for (size_t i = 0; i < problem.weight_values.size(); ++i) {
    problem.weights[i] = random_weight<Weight>();
    problem.weight_values[i] = weight_value(problem.weights[i]);
  }
  if (problem.scale)
    for (int i = 0; i < n; ++i) problem.scale[i] = float(uniform(0.002, 0.01));
  for (int i = 0; i < k; ++i) problem.alpha[i] = float(uniform(0.5, 1.5));
  return problem;
}

struct Rows {
  int batch;
  bf16* x;         // [batch, k]; row b spans ±2 (b + 1), so the rows' RMS differ
  bf16* residual;  // [batch, n]
};

Rows make_rows(emu::DeviceMemory& memory, int batch, int n, int k) {
  const Rows rows{batch, memory.alloc<bf16>(size_t(batch) * k), memory.alloc<bf16>(size_t(batch) * n)};
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < k; ++i) rows.x[size_t(b) * k + i] = to_bf16(uniform(-2, 2) * (b + 1));
  for (int i = 0; i < batch * n; ++i) rows.residual[i] = to_bf16(uniform(-4, 4));
  return rows;
}

// x' of row b: x * alpha / sqrt(mean(x^2) + eps) with the pre-norm, else x.
template <class Weight>
std::vector<double> prepared_row(const Problem<Weight>& problem, const Rows& rows, int b, bool norm) {
  std::vector<double> row(problem.k);
  double sum_of_squares = 0;
  for (int i = 0; i < problem.k; ++i) {
    row[i] = to_double(rows.x[size_t(b) * problem.k + i]);
    sum_of_squares += row[i] * row[i];
  }
  if (!norm) return row;
  const double inv_rms = 1 / std::sqrt(sum_of_squares / problem.k + kEps);
  for (int i = 0; i < problem.k; ++i) row[i] *= problem.alpha[i] * inv_rms;
  return row;
}

struct Expected {
  double value;
  double tolerance;  // bf16 rounding of the output, plus f32 accumulation of the k products
};

// y[b, o] = residual[b, o] + scale[o] * sum_i x'[b, i] * w[o, i].
template <class Weight>
Expected expected_output(const Problem<Weight>& problem, const Rows& rows, const std::vector<double>& row, int b,
                         int o, bool residual) {
  double sum = 0, sum_of_squares = 0;
  for (int i = 0; i < problem.k; ++i) {
    const double product = row[i] * problem.weight_values[size_t(o) * problem.k + i];
    sum += product;
    sum_of_squares += product * product;
  }
  const double scale = problem.scale ? problem.scale[o] : 1.0;
  const double value = sum * scale + (residual ? to_double(rows.residual[size_t(b) * problem.n + o]) : 0.0);
  return {value, std::abs(value) / 256 + 1e-5 * std::sqrt(sum_of_squares) * scale};
}

// Launches the kernel for the batch as the host contract says: gridDim.x = ceil(n / 4). Products with a
// residual, and gated ones, also prefetch (GEMV_PREFETCH), whose addresses the emulator touches.
template <class Weight>
void run_gemv(const Problem<Weight>& problem, const Rows& rows, bool norm, bool residual, bf16* y,
              bool gated = false) {
  const int n = problem.n, k = problem.k;
  const GemvEntry<Weight> gemv = entry_point<Weight>(rows.batch);
  const int flags = (gated ? GEMV_GATED : 0) | (gated || residual ? GEMV_PREFETCH : 0);
  emu::launch(format("gemv_splitk_%s_b%d%s", weight_kind<Weight>(), rows.batch, gated ? " gated" : ""),
              dim3((n + 3) / 4), block_for<Weight>(k), [&] {
                gemv(rows.x, problem.weights, problem.scale, residual ? rows.residual : nullptr,
                     norm ? problem.alpha : nullptr, kEps, flags, y, n, k);
              });
}

// The gated product y [batch, n / 2] equals the product [batch, n] followed by swiglu_bf16 (as the host
// launches it: 256 threads, ceil(total / 256) blocks), value for value; every output written once.
template <class Weight>
void check_gated(const Problem<Weight>& problem, const Rows& rows, bool norm) {
  const int n = problem.n, hidden = n / 2, batch = rows.batch;
  const size_t total = size_t(batch) * hidden;
  Case check(format("gemv_splitk_%s_b%d gated n=%d k=%d norm=%s", weight_kind<Weight>(), batch, n, problem.k,
                    norm ? "on" : "off"));
  emu::DeviceMemory memory;
  bf16* product = memory.alloc<bf16>(size_t(batch) * n);
  bf16* gate_after = memory.alloc<bf16>(total);
  bf16* gated = memory.alloc<bf16>(total);
  std::fill_n(gated, total, kUntouched);
  run_gemv(problem, rows, norm, false, product);
  emu::launch("swiglu_bf16", dim3(unsigned((total + 255) / 256)), dim3(256),
              [&] { swiglu_bf16(product, gate_after, batch, hidden); });
  run_gemv(problem, rows, norm, false, gated, true);
  int nonzero = 0;
  for (size_t i = 0; i < total; ++i) {
    const float got = __bfloat162float(gated[i]), want = __bfloat162float(gate_after[i]);
    nonzero += want != 0;
    check.expect(got == want && gated[i].bits != kUntouched.bits, "row %zu unit %zu: %g, expected %g",
                 i / hidden, i % hidden, got, want);
  }
  check.expect(nonzero > int(total / 2), "only %d of %zu gated outputs are nonzero", nonzero, total);
  check.finish(format("%zu outputs equal the product then the gate", total));
}

template <class Weight>
void check_gemv(const Problem<Weight>& problem, const Rows& rows, bool norm, bool residual) {
  const int n = problem.n, batch = rows.batch;
  Case check(format("gemv_splitk_%s_b%d n=%d k=%d norm=%s residual=%s", weight_kind<Weight>(), batch, n, problem.k,
                    norm ? "on" : "off", residual ? "on" : "off"));
  emu::DeviceMemory memory;
  bf16* y = memory.alloc<bf16>(size_t(batch) * n);
  std::fill_n(y, batch * n, kUntouched);
  run_gemv(problem, rows, norm, residual, y);
  double max_error = 0, max_relative = 0;
  for (int b = 0; b < batch; ++b) {
    const std::vector<double> row = prepared_row(problem, rows, b, norm);
    for (int o = 0; o < n; ++o) {
      const Expected expected = expected_output(problem, rows, row, b, o, residual);
      const double got = to_double(y[size_t(b) * n + o]), error = std::abs(got - expected.value);
      max_error = std::max(max_error, error);
      if (std::abs(expected.value) > 1e-3) max_relative = std::max(max_relative, error / std::abs(expected.value));
      check.expect(error <= expected.tolerance, "row %d channel %d: %g, expected %g", b, o, got, expected.value);
    }
  }
  check.finish(format("max |error| %.3g, max relative error %.3g", max_error, max_relative));
}

template <class Weight>
void test_gemv(int n, int k) {
  emu::DeviceMemory memory;
  const Problem<Weight> problem = make_problem<Weight>(memory, n, k);
  for (int batch = 1; batch <= GEMV_MAX_BATCH; ++batch) {
    const Rows rows = make_rows(memory, batch, n, k);
    for (bool norm : {false, true}) {
      for (bool residual : {false, true}) check_gemv(problem, rows, norm, residual);
      if (n % 2 == 0) check_gated(problem, rows, norm);
    }
  }
}

}  // namespace

// ---- gemv_splitk_f32_b1..b4 (Mimi) ----

void test_gemv_f32(int batch, int n, int k) {
  const dim3 block = block_for<float>(k);
  Case check(format("gemv_splitk_f32_b%d n=%d k=%d (%u threads)", batch, n, k, block.x));
  using Entry = void (*)(const float*, const float*, float*, int, int);
  constexpr Entry entries[] = {gemv_splitk_f32_b1, gemv_splitk_f32_b2, gemv_splitk_f32_b3, gemv_splitk_f32_b4};
  emu::DeviceMemory memory;
  float* x = memory.alloc<float>(size_t(batch) * k);
  float* w = memory.alloc<float>(size_t(n) * k);
  float* y = memory.alloc<float>(size_t(batch) * n);
  for (size_t i = 0; i < size_t(batch) * k; ++i) x[i] = float(uniform(-2, 2));
  for (size_t i = 0; i < size_t(n) * k; ++i) w[i] = float(uniform(-1, 1));
  std::fill_n(y, size_t(batch) * n, -1234.5f);
  const unsigned blocks = unsigned((n + GEMV_CHANNELS - 1) / GEMV_CHANNELS);
  emu::launch(format("gemv_splitk_f32_b%d", batch), dim3(blocks), block, [&] { entries[batch - 1](x, w, y, n, k); });
  double max_error = 0;
  for (int b = 0; b < batch; ++b)
    for (int c = 0; c < n; ++c) {
      double expected = 0, magnitude = 0;
      for (int i = 0; i < k; ++i) {
        expected += double(x[size_t(b) * k + i]) * w[size_t(c) * k + i];
        magnitude += std::abs(double(x[size_t(b) * k + i]) * w[size_t(c) * k + i]);
      }
      const double error = std::abs(y[size_t(b) * n + c] - expected);
      max_error = std::max(max_error, error / magnitude);
      check.expect(error <= 1e-6 * magnitude + 1e-30, "row %d channel %d: %g, expected %g", b, c,
                   y[size_t(b) * n + c], expected);
    }
  check.finish(format("max error %.3g of the terms' magnitude", max_error));
}

int main() {
  // n = 771 leaves the last block 3 channels. k = 1040 ends in a partial chunk; 4224 sends bf16 warps round
  // the chunk loop twice (int8 warp 0 once, with a partial second chunk); 48 is part of one warp's chunk;
  // 8448 sends int8 warps round twice.
  // Gated products (even n): 64 fills its blocks; 770 (h = 385) leaves the last block one gate and its up channel.
  for (int n : {771, 64})
    for (int k : {1040, 4224, 48}) {
      test_gemv<int8_t>(n, k);
      test_gemv<bf16>(n, k);
    }
  test_gemv<int8_t>(67, 8448);
  test_gemv<int8_t>(770, 1040);
  test_gemv<bf16>(770, 1040);
  // Mimi's products (its transformers' 512 -> 1536, 512 -> 512, 512 -> 2048, 2048 -> 512; its quantizer's 512 ->
  // 256, 256 -> 512) at each row count; a last block of 3 channels, a partial chunk (k = 1040), k shorter than
  // one warp's chunk (48), and warps sent round the chunk loop three times (4224).
  for (int batch = 1; batch <= 4; ++batch)
    for (const auto& [n, k] : {std::pair{1536, 512}, std::pair{512, 512}, std::pair{2048, 512}, std::pair{512, 2048},
                               std::pair{256, 512}, std::pair{512, 256}, std::pair{771, 1040}, std::pair{64, 48},
                               std::pair{67, 4224}})
      test_gemv_f32(batch, n, k);
  return summarise("gemv");
}
