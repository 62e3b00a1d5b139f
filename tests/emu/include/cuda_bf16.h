// A CPU emulation of the part of CUDA that kernels/*.cu use, picked up by their `#include <cuda_bf16.h>`
// when tests/emu/include comes first on the include path (see tests/emu/README.md).
//
// Every CUDA thread of a block is a fiber with its own stack; blocks run one after another (both in index
// order, or last first under EMU_ORDER=reverse). A fiber runs until it reaches __syncthreads or a warp
// shuffle, which are the only points where threads interleave.
// A block barrier opens when every thread of the block waits at it, a shuffle when all 32 lanes of the
// warp do; when nothing can run any more the block is reported as deadlocked. Device buffers sit between
// PROT_NONE pages, and reinterpret_cast checks the alignment its target type needs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <source_location>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <elf.h>
#include <link.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

// The kernels compare threadIdx.x and blockDim.x, unsigned as in CUDA, with ints.
#pragma GCC diagnostic ignored "-Wsign-compare"
// They carry nvcc's `#pragma unroll`. (GCC 12's C++ front end applies this too late for that warning, GCC
// bug 53431: there add -Wno-unknown-pragmas to the command line.)
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

// ---- Qualifiers and built-in types ----

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(bytes) __attribute__((aligned(bytes)))
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Kernels reinterpret loaded words as other vector types (a uint4 as bf16 pairs), which nvcc allows;
// may_alias keeps GCC's strict-aliasing optimisations from breaking that.
#define EMU_VECTOR_TYPE(bytes) __attribute__((may_alias, aligned(bytes)))
struct EMU_VECTOR_TYPE(8) float2 {
  float x, y;
};
struct EMU_VECTOR_TYPE(16) float4 {
  float x, y, z, w;
};
struct EMU_VECTOR_TYPE(8) uint2 {
  unsigned x, y;
};
struct EMU_VECTOR_TYPE(16) uint4 {
  unsigned x, y, z, w;
};
struct EMU_VECTOR_TYPE(16) int4 {
  int x, y, z, w;
};
struct EMU_VECTOR_TYPE(2) char2 {
  signed char x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline uint3 threadIdx, blockIdx, blockDim, gridDim;
inline constexpr int warpSize = 32;

// ---- bf16 ----

struct EMU_VECTOR_TYPE(2) __nv_bfloat16 {
  uint16_t bits;
};
struct EMU_VECTOR_TYPE(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __uint_as_float(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}
inline uint32_t __float_as_uint(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  return bits;
}
inline float __bfloat162float(__nv_bfloat16 value) { return __uint_as_float(uint32_t(value.bits) << 16); }
// Round to nearest even; a NaN stays a (quiet) NaN.
inline __nv_bfloat16 __float2bfloat16(float value) {
  uint32_t bits = __float_as_uint(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return {uint16_t((bits >> 16) | 0x40)};
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return {uint16_t(bits >> 16)};
}
// Exact for |value| < 2^24 (through f32), all that kernels/w8a16.cu converts.
inline __nv_bfloat16 __int2bfloat16_rn(int value) { return __float2bfloat16(float(value)); }
inline float2 __bfloat1622float2(__nv_bfloat162 pair) { return {__bfloat162float(pair.x), __bfloat162float(pair.y)}; }

// ---- Arithmetic intrinsics (computed exactly where the GPU approximates) ----

// Bytes 0..7 are x's then y's, lowest first; byte n of the result is the one that selector nibble n names.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned selector) {
  const uint64_t bytes = (uint64_t(y) << 32) | x;
  unsigned result = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned pick = (selector >> (4 * n)) & 7u;
    result |= unsigned((bytes >> (8 * pick)) & 0xffu) << (8 * n);
  }
  return result;
}
inline float __expf(float x) { return expf(x); }
// One f32 operation, rounded alone (nvcc never fuses these into a multiply-add; the volatile
// keeps a host compiler that contracts, as GCC does on arm64, from fusing them either).
inline float __fadd_rn(float a, float b) {
  volatile float sum = a + b;
  return sum;
}
inline float __fmul_rn(float a, float b) {
  volatile float product = a * b;
  return product;
}
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline int min(int a, int b) { return std::min(a, b); }
inline int max(int a, int b) { return std::max(a, b); }
inline unsigned min(unsigned a, unsigned b) { return std::min(a, b); }
inline unsigned max(unsigned a, unsigned b) { return std::max(a, b); }
inline int64_t min(int64_t a, int64_t b) { return std::min(a, b); }
inline int64_t max(int64_t a, int64_t b) { return std::max(a, b); }

// ---- Errors ----

namespace emu {

inline std::string kernel_name;
inline bool in_kernel = false;
inline int error_count = 0;

// Records an emulator error (the first 20 are printed) against the running kernel and block.
__attribute__((format(printf, 1, 2))) inline void fail(const char* format, ...) {
  if (++error_count > 20) return;
  char message[512];
  va_list args;
  va_start(args, format);
  vsnprintf(message, sizeof message, format, args);
  va_end(args);
  fprintf(stderr, "EMU ERROR in %s block (%u,%u,%u): %s\n", kernel_name.c_str(), blockIdx.x, blockIdx.y, blockIdx.z,
          message);
}

inline std::string where(const std::source_location& site) {
  return std::string(site.file_name()) + ":" + std::to_string(site.line()) + ":" + std::to_string(site.column());
}

// ---- Fibers ----

// emu_switch_stack(save, load): pushes the callee-saved registers and the return address, stores the stack
// pointer in *save, switches to the stack `load` and pops what the fiber saved there. A fresh fiber's stack
// holds a frame of `kFrameSlots` words: zeros for the registers and fiber_main as the return address.
extern "C" void emu_switch_stack(void** save, void* load);
#if defined(__x86_64__)
asm(R"(
  .pushsection .text
  .globl emu_switch_stack
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
  .popsection
)");
// r15 r14 r13 r12 rbx rbp, the return address, then a dummy one so that fiber_main starts as if called.
inline constexpr int kFrameSlots = 8, kReturnSlot = 6;
// A return onto another fiber's stack breaks a CET shadow stack.
inline bool shadow_stack_enabled() {
  unsigned long features = 0;
  return syscall(SYS_arch_prctl, 0x5005 /* ARCH_SHSTK_STATUS */, &features) == 0 && (features & 1);
}
#elif defined(__aarch64__)
asm(R"(
  .pushsection .text
  .globl emu_switch_stack
  .type emu_switch_stack, %function
emu_switch_stack:
  sub sp, sp, #160
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #160
  ret
  .size emu_switch_stack, .-emu_switch_stack
  .popsection
)");
// x19..x28, x29 (frame pointer), x30 (return address), d8..d15.
inline constexpr int kFrameSlots = 20, kReturnSlot = 11;
// A return onto another fiber's stack breaks a guarded control stack.
inline bool shadow_stack_enabled() {
  unsigned long status = 0;
  return prctl(74 /* PR_GET_SHADOW_STACK_STATUS */, &status, 0, 0, 0) == 0 && (status & 1);
}
#else
#error "tests/emu has a fiber switch for x86_64 and aarch64 only"
#endif

enum class State { ready, at_syncthreads, at_shuffle, done };

struct Fiber {
  void* saved_sp = nullptr;
  char* stack = nullptr;  // lowest usable byte, above a PROT_NONE guard page
  State state = State::done;
  std::source_location site;  // the barrier it waits at
  unsigned shuffles = 0;      // shuffles done in this block; its parity picks the exchange buffer
  unsigned votes = 0;         // __syncthreads_or calls done in this block; likewise
};

inline constexpr size_t kStackBytes = 256 * 1024, kPageBytes = 4096;
inline constexpr int kMaxThreads = 1024;
inline constexpr unsigned kFullMask = 0xffffffffu;

inline std::vector<Fiber> fibers;
inline void* scheduler_sp = nullptr;
inline int current = -1;  // the running fiber; -1 for the scheduler
inline unsigned block_threads = 0;
inline std::function<void()> kernel_body;  // the launched kernel, called by each fiber
// Values offered to a shuffle, by thread; two buffers so a warp can start the next shuffle while a slow
// lane still reads this one.
inline uint64_t shuffle_values[2][kMaxThreads];
// Predicates offered to __syncthreads_or, by thread; two buffers for the same reason (no thread can be two
// barriers ahead of another).
inline bool barrier_votes[2][kMaxThreads];

inline void switch_to(int next);
inline int pick_next();

// Each fiber runs the kernel once per block, then parks until the next block starts it again.
[[noreturn]] inline void fiber_main() {
  for (;;) {
    kernel_body();
    fibers[current].state = State::done;
    switch_to(pick_next());
  }
}

inline void reset_frame(Fiber& fiber) {
  if (!fiber.stack) {
    void* mapping = mmap(nullptr, kStackBytes + kPageBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                         -1, 0);
    if (mapping == MAP_FAILED) {
      perror("emu: fiber stack");
      _exit(3);
    }
    mprotect(mapping, kPageBytes, PROT_NONE);
    fiber.stack = static_cast<char*>(mapping) + kPageBytes;
  }
  void** top = reinterpret_cast<void**>(fiber.stack + kStackBytes);
  void** frame = top - kFrameSlots;
  std::fill(frame, top, nullptr);
  frame[kReturnSlot] = reinterpret_cast<void*>(&fiber_main);
  fiber.saved_sp = frame;
}

// Switches from the running fiber (or the scheduler) to `next` (-1: the scheduler).
inline void switch_to(int next) {
  const int from = current;
  if (next == from) return;
  current = next;
  if (next >= 0) threadIdx = {unsigned(next), 0, 0};
  void** save = from < 0 ? &scheduler_sp : &fibers[from].saved_sp;
  emu_switch_stack(save, next < 0 ? scheduler_sp : fibers[next].saved_sp);
}

// EMU_ORDER=reverse in the environment runs a block's threads, and a grid's blocks, last first. A kernel
// whose result changes with the order reads what another thread or block writes without a barrier between
// them (or reads shared memory no thread of its block wrote): on a GPU any order can happen.
inline const bool kReverse = [] {
  const char* order = getenv("EMU_ORDER");
  return order && strcmp(order, "reverse") == 0;
}();

// The first ready fiber from `from` on, in the schedule's order (`from` may be -1 or block_threads).
inline int find_ready(int from) {
  const int step = kReverse ? -1 : 1;
  for (int t = from; t >= 0 && t < int(block_threads); t += step)
    if (fibers[t].state == State::ready) return t;
  return -1;
}

inline int first_thread() { return kReverse ? int(block_threads) - 1 : 0; }

inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && strcmp(a.file_name(), b.file_name()) == 0;
}

// Lets the threads in [first, end) that wait at `barrier` past it; they must all wait at the same call.
inline void release(State barrier, unsigned first, unsigned end) {
  int leader = -1;
  bool reported = false;
  for (unsigned t = first; t < end; ++t) {
    if (fibers[t].state != barrier) continue;
    if (leader < 0) leader = int(t);
    if (!reported && !same_site(fibers[t].site, fibers[leader].site)) {
      fail("threads %d and %u meet at different barriers (%s, %s)", leader, t, where(fibers[leader].site).c_str(),
           where(fibers[t].site).c_str());
      reported = true;
    }
    fibers[t].state = State::ready;
  }
}

inline bool release_syncthreads() {
  unsigned waiting = 0, returned = 0;
  for (unsigned t = 0; t < block_threads; ++t) {
    waiting += fibers[t].state == State::at_syncthreads;
    returned += fibers[t].state == State::done;
  }
  if (waiting == 0 || waiting + returned != block_threads) return false;
  if (returned) fail("__syncthreads reached after %u of the block's threads returned", returned);
  release(State::at_syncthreads, 0, block_threads);
  return true;
}

// A warp's shuffle completes once all 32 lanes reach it; a partial warp's never does.
inline bool release_shuffle(unsigned warp) {
  const unsigned first = warp * 32;
  if (first + 32 > block_threads) return false;
  for (unsigned t = first; t < first + 32; ++t)
    if (fibers[t].state != State::at_shuffle) return false;
  release(State::at_shuffle, first, first + 32);
  return true;
}

inline bool release_barriers() {
  bool released = release_syncthreads();
  for (unsigned warp = 0; warp * 32 < block_threads; ++warp) released |= release_shuffle(warp);
  return released;
}

// The next fiber to run, in the schedule's order, or -1 when every thread returned or the block is stuck.
inline int pick_next() {
  const int next = find_ready(kReverse ? current - 1 : current + 1);
  if (next >= 0) return next;
  return release_barriers() ? find_ready(first_thread()) : -1;
}

inline void wait_at(State barrier, const std::source_location& site) {
  fibers[current].state = barrier;
  fibers[current].site = site;
  switch_to(pick_next());
}

inline void report_deadlock() {
  static const char* const kWaitingFor[] = {"ready", "at __syncthreads", "at a shuffle", "returned"};
  std::map<std::pair<int, std::string>, int> threads_by_wait;
  for (unsigned t = 0; t < block_threads; ++t) {
    const Fiber& fiber = fibers[t];
    const std::string site = fiber.state == State::done ? "" : " (" + where(fiber.site) + ")";
    ++threads_by_wait[{int(fiber.state), site}];
  }
  std::string summary;
  for (const auto& [wait, count] : threads_by_wait)
    summary += "; " + std::to_string(count) + " " + kWaitingFor[wait.first] + wait.second;
  fail("deadlock (a shuffle in a partial warp or with returned lanes never completes)%s", summary.c_str());
}

// A block-shared static: where it lies and how many bytes.
struct SharedStatic {
  char* start;
  size_t bytes;
};

// The program's load address (it is position-independent): the first object dl_iterate_phdr reports.
inline uintptr_t load_bias() {
  uintptr_t bias = 0;
  dl_iterate_phdr([](dl_phdr_info* info, size_t, void* out) { return *static_cast<uintptr_t*>(out) = info->dlpi_addr, 1; },
                  &bias);
  return bias;
}

// Every __shared__ static, from the program's own symbol table: the function-local statics (mangled
// `_ZZ…`) that start zeroed (.bss), the emulator's and the standard library's own aside. Kernels hold no
// other function-local statics (CUDA allows only __shared__ ones), and the tests keep theirs at namespace
// scope.
inline bool is_kernel_static(const char* name) {
  if (strncmp(name, "_ZZ", 3) != 0) return false;
  for (const char* library : {"_ZZN3emu", "_ZZNSt", "_ZZSt", "_ZZNKSt", "_ZZN9__gnu_cxx", "_ZZNK9__gnu_cxx"})
    if (strncmp(name, library, strlen(library)) == 0) return false;
  return true;
}

inline std::vector<SharedStatic> find_shared_statics() {
  std::vector<char> image;
  if (FILE* file = fopen("/proc/self/exe", "rb")) {
    char buffer[1 << 16];
    for (size_t got; (got = fread(buffer, 1, sizeof buffer, file)) > 0;) image.insert(image.end(), buffer, buffer + got);
    fclose(file);
  }
  const auto* header = reinterpret_cast<const Elf64_Ehdr*>(image.data());
  if (image.size() < sizeof(Elf64_Ehdr) || memcmp(header->e_ident, ELFMAG, SELFMAG) != 0) {
    fprintf(stderr, "EMU: cannot read this program's ELF image to find its __shared__ statics\n");
    _exit(3);
  }
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(image.data() + header->e_shoff);
  const char* section_names = image.data() + sections[header->e_shstrndx].sh_offset;
  unsigned bss = 0;
  const Elf64_Shdr* symtab = nullptr;
  for (unsigned n = 0; n < header->e_shnum; ++n) {
    if (strcmp(section_names + sections[n].sh_name, ".bss") == 0) bss = n;
    if (sections[n].sh_type == SHT_SYMTAB) symtab = &sections[n];
  }
  if (!symtab) {
    fprintf(stderr, "EMU: this program has no symbol table (stripped?), so its __shared__ statics cannot be found\n");
    _exit(3);
  }
  const char* names = image.data() + sections[symtab->sh_link].sh_offset;
  const auto* symbols = reinterpret_cast<const Elf64_Sym*>(image.data() + symtab->sh_offset);
  const uintptr_t bias = load_bias();
  std::vector<SharedStatic> found;
  for (size_t n = 0; n < symtab->sh_size / sizeof(Elf64_Sym); ++n) {
    const Elf64_Sym& symbol = symbols[n];
    const char* name = names + symbol.st_name;
    if (ELF64_ST_TYPE(symbol.st_info) != STT_OBJECT || symbol.st_shndx != bss || symbol.st_size == 0) continue;
    if (!is_kernel_static(name)) continue;
    found.push_back({reinterpret_cast<char*>(bias + symbol.st_value), size_t(symbol.st_size)});
  }
  return found;
}

inline void poison_shared_memory() {
  static const std::vector<SharedStatic> shared = find_shared_statics();
  for (const SharedStatic& block : shared) memset(block.start, 0xff, block.bytes);
}

// ---- Asynchronous copies (cp.async) ----

// A copy a thread issued and has not waited for yet, in its group (the thread's count of commits then).
struct PendingCopy {
  void* to;
  const void* from;
  unsigned bytes, group;
};

// Per thread: its copies not made yet and how many groups it has committed.
static std::vector<PendingCopy> pending_copies[kMaxThreads];
static unsigned committed_groups[kMaxThreads];

// Records the copy; it is made when the thread waits for its group, the latest moment the GPU allows.
inline void cp_async(void* to, const void* from, unsigned bytes) {
  if (reinterpret_cast<uintptr_t>(to) % bytes || reinterpret_cast<uintptr_t>(from) % bytes)
    fail("thread %d: cp.async of %u bytes from %p to %p, not aligned to it", current, bytes, from, to);
  pending_copies[current].push_back({to, from, bytes, committed_groups[current]});
}

inline void cp_async_commit() { ++committed_groups[current]; }

// Makes the copies of every committed group but the newest `newest_left`.
inline void cp_async_wait(int newest_left) {
  std::vector<PendingCopy>& pending = pending_copies[current];
  const unsigned done = committed_groups[current] - std::min<unsigned>(newest_left, committed_groups[current]);
  std::erase_if(pending, [&](const PendingCopy& copy) {
    if (copy.group >= done) return false;
    memcpy(copy.to, copy.from, copy.bytes);
    return true;
  });
}

inline void reset_copies() {
  for (unsigned t = 0; t < block_threads; ++t) {
    pending_copies[t].clear();
    committed_groups[t] = 0;
  }
}

// A thread that ends with copies in flight leaves its shared memory to be written after it is gone.
inline void check_copies_waited() {
  for (unsigned t = 0; t < block_threads; ++t)
    if (!pending_copies[t].empty())
      return fail("thread %u ended with %zu cp.async copies not waited for", t, pending_copies[t].size());
}

// Runs one block to completion; false if it deadlocked.
inline bool run_block() {
  poison_shared_memory();
  reset_copies();
  for (unsigned t = 0; t < block_threads; ++t) {
    fibers[t].state = State::ready;
    fibers[t].shuffles = 0;
    fibers[t].votes = 0;
    barrier_votes[0][t] = barrier_votes[1][t] = false;
  }
  switch_to(first_thread());
  bool finished = true;
  for (unsigned t = 0; t < block_threads; ++t) finished &= fibers[t].state == State::done;
  check_copies_waited();
  if (finished) return true;
  report_deadlock();
  for (Fiber& fiber : fibers) reset_frame(fiber);  // the stuck ones are still inside the kernel
  return false;
}

// ---- Launch ----

inline void report_fault(int signal_number) {
  char message[256];
  int length = snprintf(message, sizeof message, "EMU: signal %d (bad memory access) outside any kernel\n",
                        signal_number);
  if (in_kernel)
    length = snprintf(message, sizeof message, "EMU: signal %d (bad memory access) in %s block (%u,%u,%u) thread %d\n",
                      signal_number, kernel_name.c_str(), blockIdx.x, blockIdx.y, blockIdx.z, current);
  if (write(STDERR_FILENO, message, length) < 0) _exit(4);
  _exit(3);
}

// Reports bad memory accesses, on a stack of its own so that a fiber overflowing its stack is reported too.
inline void prepare_process() {
  static bool prepared = false;
  if (prepared) return;
  prepared = true;
  if (shadow_stack_enabled()) {
    fprintf(stderr, "EMU: shadow stacks are on, which fibers cannot use; on x86_64 run with "
                    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-SHSTK\n");
    _exit(3);
  }
  static char signal_stack[64 * 1024];
  stack_t stack{};
  stack.ss_sp = signal_stack;
  stack.ss_size = sizeof signal_stack;
  sigaltstack(&stack, nullptr);
  struct sigaction action{};
  action.sa_handler = report_fault;
  action.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &action, nullptr);
  sigaction(SIGBUS, &action, nullptr);
}

inline void ensure_fibers(unsigned count) {
  const size_t had = fibers.size();
  if (count <= had) return;
  fibers.resize(count);
  for (size_t t = had; t < count; ++t) reset_frame(fibers[t]);
}

inline void run_grid(dim3 grid, const std::function<bool(uint3)>& runs) {
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t n = 0; n < blocks; ++n) {
    const uint64_t index = kReverse ? blocks - 1 - n : n;
    blockIdx = {unsigned(index % grid.x), unsigned(index / grid.x % grid.y), unsigned(index / grid.x / grid.y)};
    if (runs && !runs(blockIdx)) continue;
    if (!run_block()) return;
  }
}

// Runs `kernel` (a call of the kernel function with its arguments) for every thread of every block, or of the
// blocks `runs` picks: a test may run a launch in two parts, to look at it halfway, as if the blocks of the
// second part had not started yet.
inline void launch(const std::string& name, dim3 grid, dim3 block, const std::function<void()>& kernel,
                   const std::function<bool(uint3)>& runs = nullptr) {
  prepare_process();
  kernel_name = name;
  if (block.y != 1 || block.z != 1) return fail("only 1-D blocks are emulated");
  if (block.x == 0 || block.x > kMaxThreads) return fail("a block of %u threads", block.x);
  ensure_fibers(block.x);
  block_threads = block.x;
  kernel_body = kernel;
  gridDim = {grid.x, grid.y, grid.z};
  blockDim = {block.x, block.y, block.z};
  in_kernel = true;
  run_grid(grid, runs);
  in_kernel = false;
  kernel_body = nullptr;
}

// ---- Warp shuffles ----

template <class T>
T shuffle(unsigned mask, T value, int width, unsigned source_lane, const std::source_location& site) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  if (mask != kFullMask)
    fail("shuffle mask %#x at %s: only full-warp shuffles are emulated", mask, where(site).c_str());
  if (width != warpSize) fail("shuffle width %d at %s: only whole warps are emulated", width, where(site).c_str());
  const int self = current;
  uint64_t* values = shuffle_values[fibers[self].shuffles++ & 1];
  values[self] = 0;
  memcpy(&values[self], &value, sizeof value);
  wait_at(State::at_shuffle, site);
  T result;
  memcpy(&result, &values[(self & ~31) | (source_lane & 31)], sizeof result);
  return result;
}

inline unsigned lane() { return threadIdx.x & 31; }

// ---- Checked pointer casts ----

template <class To, class From>
To checked_cast(From* pointer, std::source_location site = std::source_location::current()) {
  static_assert(std::is_pointer_v<To>, "the emulator's reinterpret_cast handles pointers only");
  using Target = std::remove_cv_t<std::remove_pointer_t<To>>;
  if constexpr (!std::is_void_v<Target>) {
    if (reinterpret_cast<uintptr_t>(pointer) % alignof(Target) != 0)
      fail("reinterpret_cast at %s: %p is not %zu-byte aligned", where(site).c_str(), static_cast<const void*>(pointer),
           alignof(Target));
  }
  return reinterpret_cast<To>(pointer);
}

// ---- Device memory ----

// Buffers for one test case, freed together. Each buffer ends right before a PROT_NONE page and starts
// right after one, so an access past either end faults; it is aligned to the largest power of two (up to
// a page) that divides its size in bytes, and starts filled with 0xEE bytes.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    for (const auto& [mapping, bytes] : mappings_) munmap(mapping, bytes);
  }

  template <class T>
  T* alloc(size_t count) {
    const size_t bytes = count * sizeof(T);
    const size_t pages = (bytes + kPageBytes - 1) / kPageBytes;
    const size_t mapped = (pages + 2) * kPageBytes;
    void* mapping = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping == MAP_FAILED) {
      perror("emu: device buffer");
      _exit(3);
    }
    char* first_page = static_cast<char*>(mapping);
    char* end = first_page + (pages + 1) * kPageBytes;
    mprotect(first_page, kPageBytes, PROT_NONE);
    mprotect(end, kPageBytes, PROT_NONE);
    mappings_.emplace_back(mapping, mapped);
    memset(end - bytes, 0xEE, bytes);
    return reinterpret_cast<T*>(end - bytes);
  }

  // Makes the whole pages of [start, start + bytes) fault when touched, as past a buffer's end: to show that a
  // kernel never reads them. Both ends must lie on page boundaries (a buffer whose size is a multiple of a
  // page starts on one).
  void forbid(const void* start, size_t bytes) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(start);
    if (address % kPageBytes != 0 || bytes % kPageBytes != 0) {
      fprintf(stderr, "emu: forbid(%p, %zu) is not whole pages\n", start, bytes);
      _exit(3);
    }
    mprotect(const_cast<void*>(start), bytes, PROT_NONE);
  }

 private:
  std::vector<std::pair<void*, size_t>> mappings_;
};

}  // namespace emu

// ---- CUDA's synchronisation and load intrinsics ----

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  emu::wait_at(emu::State::at_syncthreads, site);
}

// __syncthreads that also says whether any thread of the block passed a non-zero predicate.
inline int __syncthreads_or(int predicate, std::source_location site = std::source_location::current()) {
  bool* votes = emu::barrier_votes[emu::fibers[emu::current].votes++ & 1];
  votes[emu::current] = predicate != 0;
  emu::wait_at(emu::State::at_syncthreads, site);
  return std::any_of(votes, votes + emu::block_threads, [](bool vote) { return vote; });
}

template <class T>
T __shfl_sync(unsigned mask, T value, int source_lane, int width = warpSize,
              std::source_location site = std::source_location::current()) {
  return emu::shuffle(mask, value, width, unsigned(source_lane), site);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize,
                  std::source_location site = std::source_location::current()) {
  return emu::shuffle(mask, value, width, emu::lane() ^ unsigned(lane_mask), site);
}

// A lane whose source would lie past the warp keeps its own value.
template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize,
                   std::source_location site = std::source_location::current()) {
  const unsigned source = emu::lane() + delta;
  return emu::shuffle(mask, value, width, source < 32 ? source : emu::lane(), site);
}

// A lane whose source would lie before the warp keeps its own value.
template <class T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize,
                 std::source_location site = std::source_location::current()) {
  const unsigned self = emu::lane();
  return emu::shuffle(mask, value, width, self >= delta ? self - delta : self, site);
}

// The lanes whose `value` equals this lane's, as a bit mask (a shuffle from every lane in turn).
template <class T>
unsigned __match_any_sync(unsigned mask, T value, std::source_location site = std::source_location::current()) {
  unsigned peers = 0;
  for (unsigned source = 0; source < 32; ++source)
    if (emu::shuffle(mask, value, warpSize, source, site) == value) peers |= 1u << source;
  return peers;
}

inline int __popc(unsigned bits) { return __builtin_popcount(bits); }
inline int __ffs(unsigned bits) { return __builtin_ffs(int(bits)); }

// Threads switch only at barriers and shuffles, so a plain read-modify-write is atomic here.
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}

// Adds 1, wrapping to 0 once the count has reached `limit`.
inline unsigned atomicInc(unsigned* address, unsigned limit) {
  const unsigned old = *address;
  *address = old >= limit ? 0 : old + 1;
  return old;
}

template <class T>
T __ldg(const T* pointer, std::source_location site = std::source_location::current()) {
  return *emu::checked_cast<const T*>(pointer, site);
}

// A load that skips L1: the same read here (one memory, no caches).
template <class T>
T __ldcg(const T* pointer, std::source_location site = std::source_location::current()) {
  return *emu::checked_cast<const T*>(pointer, site);
}

// Blocks of a launch run one after another and their writes land at once: nothing to order.
inline void __threadfence() {}

// Blocks run one after another, so one static per declaration is exactly a block's shared memory.
// run_block fills them all with 0xff bytes before each block (poison_shared_memory): a read before any
// write sees NaN (f32 and bf16) or -1, not the previous block's values.
#define __shared__ static
// kernels/common.cuh calls the emulator's cp.async where it would issue the instruction.
#define DUPLEX_EMU 1
// Placed after every standard header: a keyword redefined as a macro would break them.
#define reinterpret_cast emu::checked_cast
