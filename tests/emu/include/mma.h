// The part of CUDA's wmma (nvcuda::wmma) that kernels/w8a16.cu uses, for 16x16x16 tiles, on the emulator.
//
// A fragment holds its whole tile in every lane (the hardware spreads it over the warp in an unspecified
// way, and our kernels never index one). The `_sync` calls are warp-collective: like a shuffle, each waits
// until all 32 lanes of its warp reach the same call (a partial or divergent warp deadlocks, and is reported
// so). mma_sync computes, and store_matrix_sync writes, in each lane only the elements it owns (element e of
// the tile in lane e % 32), so a lane that skipped either leaves holes; the others are left NaN in the result.
// Pointers must be 32-byte aligned and a leading dimension a multiple of 16 bytes, as on the GPU.
// mma_sync accumulates in f32 in k order; the tensor cores' order and rounding may differ.
#pragma once

#include <cuda_bf16.h>

#include <limits>
#include <type_traits>

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline constexpr int kTile = 16;

template <class Use, int m, int n, int k, class T, class Layout = void>
struct fragment {
  static_assert(m == kTile && n == kTile && k == kTile, "the emulator has 16x16x16 fragments only");
  float element[kTile][kTile];  // [row][column] of the tile: A is m x k, B is k x n, an accumulator m x n
};

namespace detail {

inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float value(float v) { return v; }

// Checks a collective call's pointer and leading dimension, then waits for the rest of the warp.
template <class T>
void collective(const char* call, const T* pointer, unsigned ldm, const std::source_location& site) {
  if ((uintptr_t)pointer % 32 != 0)
    emu::fail("wmma::%s at %s: %p is not 32-byte aligned", call, emu::where(site).c_str(),
              static_cast<const void*>(pointer));
  if (ldm * sizeof(T) % 16 != 0)
    emu::fail("wmma::%s at %s: leading dimension %u is not a multiple of 16 bytes", call, emu::where(site).c_str(),
              ldm);
  emu::wait_at(emu::State::at_shuffle, site);
}

inline bool owns(int row, int column) { return unsigned(row * kTile + column) % 32 == emu::lane(); }

// Offset of (row, column) in memory of the given layout.
inline size_t offset(int row, int column, unsigned ldm, bool row_major) {
  return row_major ? size_t(row) * ldm + column : row + size_t(column) * ldm;
}

}  // namespace detail

template <class Use, class T, class Layout, class V>
void fill_fragment(fragment<Use, kTile, kTile, kTile, T, Layout>& fragment, V v) {
  for (auto& row : fragment.element)
    for (float& e : row) e = detail::value(T(v));
}

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, kTile, kTile, kTile, T, Layout>& fragment, const T* pointer, unsigned ldm,
                      std::source_location site = std::source_location::current()) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "only matrix_a and matrix_b fragments load without a layout argument");
  detail::collective("load_matrix_sync", pointer, ldm, site);
  for (int r = 0; r < kTile; ++r)
    for (int c = 0; c < kTile; ++c)
      fragment.element[r][c] = detail::value(pointer[detail::offset(r, c, ldm, std::is_same_v<Layout, row_major>)]);
}

template <class A, class LA, class B, class LB>
void mma_sync(fragment<accumulator, kTile, kTile, kTile, float>& d, const fragment<matrix_a, kTile, kTile, kTile, A, LA>& a,
              const fragment<matrix_b, kTile, kTile, kTile, B, LB>& b,
              const fragment<accumulator, kTile, kTile, kTile, float>& c,
              std::source_location site = std::source_location::current()) {
  emu::wait_at(emu::State::at_shuffle, site);
  for (int r = 0; r < kTile; ++r)
    for (int col = 0; col < kTile; ++col) {
      if (!detail::owns(r, col)) {
        d.element[r][col] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      float sum = c.element[r][col];
      for (int i = 0; i < kTile; ++i) sum = fmaf(a.element[r][i], b.element[i][col], sum);
      d.element[r][col] = sum;
    }
}

inline void store_matrix_sync(float* pointer, const fragment<accumulator, kTile, kTile, kTile, float>& fragment,
                              unsigned ldm, layout_t layout,
                              std::source_location site = std::source_location::current()) {
  detail::collective("store_matrix_sync", pointer, ldm, site);
  for (int r = 0; r < kTile; ++r)
    for (int c = 0; c < kTile; ++c)
      if (detail::owns(r, c)) pointer[detail::offset(r, c, ldm, layout == mem_row_major)] = fragment.element[r][c];
}

}  // namespace nvcuda::wmma
