// What the emulated kernel tests share: random inputs, bf16 conversions and a per-case report.
// Include it before the kernel source: it brings in the standard headers the tests use, which must come
// before the emulator redefines reinterpret_cast.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <cuda_bf16.h>

using bf16 = __nv_bfloat16;

inline double to_double(bf16 value) { return __bfloat162float(value); }
inline bf16 to_bf16(double value) { return __float2bfloat16(float(value)); }

inline std::mt19937_64 random_engine(1234);
inline double uniform(double low, double high) {
  return std::uniform_real_distribution<double>(low, high)(random_engine);
}
inline int uniform_int(int low, int high) { return std::uniform_int_distribution<int>(low, high)(random_engine); }

__attribute__((format(printf, 1, 2))) inline std::string format(const char* pattern, ...) {
  char text[512];
  va_list args;
  va_start(args, pattern);
  vsnprintf(text, sizeof text, pattern, args);
  va_end(args);
  return text;
}

inline int cases_run = 0, cases_failed = 0;

// One checked case: counts the mismatches (printing the first few) and the emulator errors raised while it
// ran, and prints one PASS or FAIL line.
class Case {
 public:
  explicit Case(std::string title) : title_(std::move(title)), errors_before_(emu::error_count) {}

  __attribute__((format(printf, 3, 4))) void expect(bool ok, const char* pattern, ...) {
    if (ok || ++mismatches_ > kShownMismatches) return;
    char text[512];
    va_list args;
    va_start(args, pattern);
    vsnprintf(text, sizeof text, pattern, args);
    va_end(args);
    printf("  mismatch: %s\n", text);
  }

  // `measures`: the largest errors seen, for the report line.
  void finish(const std::string& measures) {
    const int errors = emu::error_count - errors_before_;
    const bool passed = mismatches_ == 0 && errors == 0;
    ++cases_run;
    cases_failed += !passed;
    printf("%s %s: %s", passed ? "PASS" : "FAIL", title_.c_str(), measures.c_str());
    if (mismatches_) printf(", %d mismatches", mismatches_);
    if (errors) printf(", %d emulator errors", errors);
    printf("\n");
  }

 private:
  static constexpr int kShownMismatches = 3;
  std::string title_;
  int errors_before_;
  int mismatches_ = 0;
};

// Prints the final line; the exit status is 0 only if every case passed.
inline int summarise(const char* suite) {
  printf("%s: %d cases, %d failed, %d emulator errors\n", suite, cases_run, cases_failed, emu::error_count);
  return cases_failed == 0 && emu::error_count == 0 ? 0 : 1;
}
