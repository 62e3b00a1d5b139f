// Checks kernels/w8a16.cu's matrix-vector kernels (w8a16_bf16, four output rows per warp, and w8a16_ahead_bf16,
// the same with each warp's next weights loaded ahead) and its tensor-core kernel (w8a16_mma_bf16, tiles of 64
// rows by 64 channels through wmma, emulated by include/mma.h) on the CPU
// emulator against a double-precision reference written from the documented contract. Build and run:
// tests/emu/README.md.
#include "check.h"

#include "w8a16.cu"

namespace {

constexpr bf16 kUntouched = {0xDEAD};

// The int8 weights [n, k] (also as doubles) and their per-channel scales, on the device.
struct Problem {
  int n, k;
  int8_t* weights;
  std::vector<double> weight_values;
  float* scale;  // [n]
};

Problem make_problem(emu::DeviceMemory& memory, int n, int k) {
  Problem problem{n, k, memory.alloc<int8_t>(size_t(n) * k), std::vector<double>(size_t(n) * k),
                  memory.alloc<float>(n)};
  for (size_t i = 0; i < problem.weight_values.size(); ++i) {
    problem.weights[i] = int8_t(uniform_int(-128, 127));
    problem.weight_values[i] = problem.weights[i];
  }
  for (int i = 0; i < n; ++i) problem.scale[i] = float(uniform(0.002, 0.01));
  return problem;
}

// x [batch, k]; row b spans ±(1 + b % 7), so rows differ in size.
bf16* make_rows(emu::DeviceMemory& memory, int batch, int k) {
  bf16* x = memory.alloc<bf16>(size_t(batch) * k);
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < k; ++i) x[size_t(b) * k + i] = to_bf16(uniform(-1, 1) * (1 + b % 7));
  return x;
}

struct Expected {
  double value;
  double tolerance;  // bf16 rounding of the output, plus f32 accumulation of the k products
};

// y[b, o] = scale[o] * sum_i x[b, i] * w[o, i].
Expected expected_output(const Problem& problem, const bf16* x, int b, int o) {
  double sum = 0, sum_of_squares = 0;
  for (int i = 0; i < problem.k; ++i) {
    const double product = to_double(x[size_t(b) * problem.k + i]) * problem.weight_values[size_t(o) * problem.k + i];
    sum += product;
    sum_of_squares += product * product;
  }
  const double value = sum * problem.scale[o];
  return {value, std::abs(value) / 256 + 1e-5 * std::sqrt(sum_of_squares) * problem.scale[o]};
}

// The host contract of both matrix-vector kernels: gridDim.x = ceil(n / 16), 4 warps a block, 4 output rows a warp.
void run_w8a16(const Problem& problem, const bf16* x, int batch, bf16* y, bool ahead) {
  const int rows_per_block = W8A16_WARPS_PER_BLOCK * W8A16_ROWS_PER_WARP;
  emu::launch(ahead ? "w8a16_ahead_bf16" : "w8a16_bf16", dim3((problem.n + rows_per_block - 1) / rows_per_block),
              dim3(32 * W8A16_WARPS_PER_BLOCK), [&] {
                (ahead ? w8a16_ahead_bf16 : w8a16_bf16)(x, problem.weights, problem.scale, y, batch, problem.n,
                                                        problem.k);
              });
}

// The host contract of the tensor-core kernel: gridDim = (ceil(n / 64), ceil(batch / 64), ceil(k / split_k)), 8
// warps a block; with more than one split, f32 partial sums joined by w8a16_mma_join.
void run_w8a16_mma(const Problem& problem, const bf16* x, int batch, bf16* y, int split_k) {
  const int n = problem.n, k = problem.k, splits = (k + split_k - 1) / split_k;
  emu::DeviceMemory memory;
  float* partial = splits > 1 ? memory.alloc<float>(size_t(splits) * batch * n) : nullptr;
  emu::launch("w8a16_mma_bf16",
              dim3((n + W8A16_MMA_CHANNELS - 1) / W8A16_MMA_CHANNELS, (batch + W8A16_MMA_ROWS - 1) / W8A16_MMA_ROWS,
                   splits),
              dim3(W8A16_MMA_THREADS),
              [&] { w8a16_mma_bf16(x, problem.weights, problem.scale, y, partial, batch, n, k, split_k); });
  if (splits == 1) return;
  const int threads = 256, outputs = batch * n;
  emu::launch("w8a16_mma_join", dim3((outputs + threads - 1) / threads), dim3(threads),
              [&] { w8a16_mma_join(partial, problem.scale, y, splits, batch, n); });
}

enum class Kernel { rows, rows_ahead, tensor_cores, tensor_cores_split };

const char* kernel_name(Kernel kernel) {
  switch (kernel) {
    case Kernel::rows:
      return "w8a16_bf16";
    case Kernel::rows_ahead:
      return "w8a16_ahead_bf16";
    case Kernel::tensor_cores:
      return "w8a16_mma_bf16";
    case Kernel::tensor_cores_split:
      return "w8a16_mma_bf16 split_k=256";
  }
  return "?";
}

void check_w8a16(const Problem& problem, int batch, Kernel kernel) {
  const int n = problem.n;
  Case check(format("%s batch=%d n=%d k=%d", kernel_name(kernel), batch, n, problem.k));
  emu::DeviceMemory memory;
  const bf16* x = make_rows(memory, batch, problem.k);
  bf16* y = memory.alloc<bf16>(size_t(batch) * n);
  std::fill_n(y, size_t(batch) * n, kUntouched);
  if (kernel == Kernel::tensor_cores)
    run_w8a16_mma(problem, x, batch, y, std::max(problem.k, 128));
  else if (kernel == Kernel::tensor_cores_split)
    run_w8a16_mma(problem, x, batch, y, 256);
  else
    run_w8a16(problem, x, batch, y, kernel == Kernel::rows_ahead);
  double max_error = 0, max_relative = 0;
  for (int b = 0; b < batch; ++b)
    for (int o = 0; o < n; ++o) {
      const Expected expected = expected_output(problem, x, b, o);
      const double got = to_double(y[size_t(b) * n + o]), error = std::abs(got - expected.value);
      max_error = std::max(max_error, error);
      if (std::abs(expected.value) > 1e-3) max_relative = std::max(max_relative, error / std::abs(expected.value));
      check.expect(error <= expected.tolerance, "row %d channel %d: %g, expected %g", b, o, got, expected.value);
    }
  check.finish(format("max |error| %.3g, max relative error %.3g", max_error, max_relative));
}

void test_w8a16(int n, int k, std::initializer_list<int> batches, Kernel kernel = Kernel::rows) {
  emu::DeviceMemory memory;
  const Problem problem = make_problem(memory, n, k);
  for (int batch : batches) check_w8a16(problem, batch, kernel);
}

}  // namespace

int main() {
  // Batches: one tile, partial tiles (1, 3, 5, 33, 63) and the largest, 64. n = 37 leaves the last block one
  // warp with a single row and two idle warps; 771 leaves its last warp 3 rows; 64 fills every block.
  // k = 16 is lane 0's alone; 528 sends lane 0 round twice; 2000 ends in a pass of 29 lanes; 4096 is whole.
  const std::initializer_list<int> all_batches = {1, 2, 3, 4, 5, 8, 16, 33, 63, 64};
  test_w8a16(37, 16, all_batches);
  test_w8a16(37, 528, all_batches);
  test_w8a16(64, 2000, all_batches);
  test_w8a16(19, 1040, {1, 4, 7, 64});
  test_w8a16(771, 4096, {1, 4, 5, 64});
  // Loads one round ahead: k = 16 never loads ahead; 528, lane 0 alone; 2000, every lane but the last three.
  test_w8a16(37, 16, {1, 3, 4}, Kernel::rows_ahead);
  test_w8a16(37, 528, {1, 2, 4, 5}, Kernel::rows_ahead);
  test_w8a16(64, 2000, {1, 3, 4, 9}, Kernel::rows_ahead);
  test_w8a16(771, 4096, {1, 4}, Kernel::rows_ahead);
  // Tensor cores: tiles of 64 rows (1 and 17: partial 16-row fragments; 65 and 100: a second, partial tile);
  // 771 channels leave the last block 3; k = 1040 ends in a partial 64-input slice, 16 is a quarter of one.
  const std::initializer_list<int> tile_batches = {1, 4, 17, 64, 65, 100};
  test_w8a16(771, 1040, tile_batches, Kernel::tensor_cores);
  test_w8a16(64, 16, tile_batches, Kernel::tensor_cores);
  test_w8a16(130, 4096, {4, 64}, Kernel::tensor_cores);
  // Slices of 128 inputs, each half to 4 warps: k = 208 ends in a slice whose second half is partly past k;
  // 33 and 48 rows stage 3 fragments, 32 two; 192 channels are three whole blocks.
  test_w8a16(192, 208, {32, 33, 48}, Kernel::tensor_cores);
  // Split K, 256 inputs a block: k = 1040 in 5 splits, the last of 16 inputs; 4096 in 16; 208 in one (no join).
  test_w8a16(771, 1040, {4, 17, 65}, Kernel::tensor_cores_split);
  test_w8a16(130, 4096, {8, 64}, Kernel::tensor_cores_split);
  test_w8a16(192, 208, {32}, Kernel::tensor_cores_split);
  return summarise("w8a16");
}
