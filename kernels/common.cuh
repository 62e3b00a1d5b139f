// Shared helpers for duplex's kernels.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// Programmatic dependent launch (sm_90 and later): where a CUDA graph's edge into one of our kernels is
// programmatic (`graph::early`, DUPLEX_PDL=1), the kernel's blocks may be scheduled while the kernel before
// it is still finishing. So every kernel of ours calls this before it touches global memory, weights aside
// (`*prefetch*` calls alone may come first: nothing in a graph writes weights): it waits until the kernels it
// depends on have completed and their writes are visible, then lets the kernel after it be scheduled in turn.
// Outside such an edge both instructions return at once. (tests/kernels_emu.rs checks that every entry point
// calls it first.)
__device__ __forceinline__ void grid_dependency_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asks for the 128-byte line at `p` to be brought into L2 (a hint: no fault, no result).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)*(const volatile char*)p;  // off the GPU (tests/emu), an address past a buffer faults
#endif
}

// Asynchronous copies from global into shared memory (sm_80 and later): issued without waiting, so a block
// can have every load of its data in flight at once. `cp_async_commit` closes the thread's open group of
// copies; `cp_async_wait<N>` waits until all but its N newest closed groups have landed, for this thread
// (a __syncthreads after it makes them the block's). BYTES is 4, 8 or 16 and both addresses are aligned to
// it. tests/emu makes each copy only when it is waited for, so a read before the wait sees poison there.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* shared, const void* global) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // No cp.async before sm_80: a plain copy, already landed when the wait comes.
  struct Granule {
    alignas(BYTES) unsigned char bytes[BYTES];
  };
  *static_cast<Granule*>(shared) = *static_cast<const Granule*>(global);
#elif defined(__CUDA_ARCH__)
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(address), "l"(global) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(address), "l"(global), "n"(BYTES) : "memory");
  }
#elif defined(DUPLEX_EMU)
  emu::cp_async(shared, global, BYTES);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#elif defined(DUPLEX_EMU)
  emu::cp_async_commit();
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#elif defined(DUPLEX_EMU)
  emu::cp_async_wait(N);
#endif
}

// `bytes` from `global` to `shared`, spread over the block's threads as asynchronous copies of the widest
// granule (16, 8 or 4 bytes) that both addresses and `bytes` allow (`bytes` a multiple of 4). Nothing waits.
__device__ __forceinline__ void stage_async(void* shared, const void* global, size_t bytes) {
  const uintptr_t alignment = (uintptr_t)shared | (uintptr_t)global | bytes;
  char* to = static_cast<char*>(shared);
  const char* from = static_cast<const char*>(global);
  if (alignment % 16 == 0) {
    for (size_t i = threadIdx.x * 16; i < bytes; i += blockDim.x * 16) cp_async<16>(to + i, from + i);
  } else if (alignment % 8 == 0) {
    for (size_t i = threadIdx.x * 8; i < bytes; i += blockDim.x * 8) cp_async<8>(to + i, from + i);
  } else {
    for (size_t i = threadIdx.x * 4; i < bytes; i += blockDim.x * 4) cp_async<4>(to + i, from + i);
  }
}

// Sum of `v` over a warp.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over a block of at most 1024 threads (every thread gets the total).
__device__ __forceinline__ float block_sum(float v, float* shared32) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  int warps = (blockDim.x + 31) >> 5;
  float total = (threadIdx.x < warps) ? shared32[threadIdx.x] : 0.f;
  if (warp == 0) total = warp_sum(total);
  if (threadIdx.x == 0) shared32[0] = total;
  __syncthreads();
  total = shared32[0];
  __syncthreads();
  return total;
}

// Max of `v` over the block; every thread gets it.
__device__ __forceinline__ float block_max(float v, float* shared32) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  float m = shared32[0];
  for (int w = 1; w < warps; ++w) m = fmaxf(m, shared32[w]);
  __syncthreads();
  return m;
}

// Eight bf16 values of a 16-byte word as f32.
__device__ __forceinline__ void bf16x8_to_f32(const uint4& word, float* out) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&word);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Four int8 (one word) exactly as f32: a byte with its sign bit flipped is q + 128 in 0..255;
// placed as the low mantissa byte of 2^23 (bits 0x4B000000) it is the float 2^23 + 128 + q.
__device__ __forceinline__ void int8x4_to_f32(uint32_t word, float* out) {
  const uint32_t biased = word ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540 | i)) - 8388736.f;
}

// A counter-based random number in [0, 1): splitmix64 of (seed, counter, index). The Rust
// reference (`model::sampling::uniform`) computes the same bits.
__device__ __forceinline__ float uniform01(uint64_t seed, uint64_t counter, uint64_t index) {
  uint64_t z = seed ^ (counter * 0x9E3779B97F4A7C15ull) ^ (index * 0xD1B54A32D192ED03ull);
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (float)(z >> 40) * (1.0f / 16777216.0f);
}
