// Just enough of CUDA's wmma (nvcuda::wmma) for kernels/w8a16.cu to compile under the emulator, which has
// no tensor cores: every wmma call aborts, naming itself, so `w8a16_mma_bf16` cannot run here.
#pragma once

#include <cuda_bf16.h>
#include <stdlib.h>

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int m, int n, int k, class T, class Layout = void>
struct fragment {};

[[noreturn]] inline void unemulated(const char* call) {
  fprintf(stderr, "EMU: wmma::%s in %s: wmma is not emulated (tests/emu/README.md)\n", call,
          emu::kernel_name.c_str());
  abort();
}

template <class Fragment, class T>
void fill_fragment(Fragment&, T) {
  unemulated("fill_fragment");
}
template <class Fragment, class T>
void load_matrix_sync(Fragment&, const T*, unsigned) {
  unemulated("load_matrix_sync");
}
template <class D, class A, class B, class C>
void mma_sync(D&, const A&, const B&, const C&) {
  unemulated("mma_sync");
}
template <class T, class Fragment>
void store_matrix_sync(T*, const Fragment&, unsigned, layout_t) {
  unemulated("store_matrix_sync");
}

}  // namespace nvcuda::wmma
