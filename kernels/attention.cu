// One decode step of attention over a ring KV cache, in two kernels (or one, below):
//  - rope_kv_write_bf16: interleaved RoPE on the step's query and key, the rotated key and the
//    value written straight into the ring at each slot's write index (a device value, so a CUDA
//    graph can replay the step);
//  - ring_attention_part_bf16 + ring_attention_join: softmax(q·kᵀ·scale + mask)·v over only the
//    first `len` ring entries (the filled part), split into chunks of keys, f32 inside.
// Each has an 8-bit twin (`rope_kv_write_int8`, `ring_attention_part_int8`) for rings that hold
// int8 codes with one f32 scale per (row, head, entry) for the keys and one for the values:
// half the bytes a long history costs every step. When the attended entries fit one chunk (the
// depformer's few steps), `ring_write_attend_{bf16,int8}` does the write and the attention in
// one launch.
// `masked_attention_f32` (at the end) is Mimi's: f32, every query of a step, an explicit mask, after
// `rope_ring_write_f32`, Mimi's RoPE and ring write in one launch.
// CPU references: `nn::RopeTables::apply`, `kv::RingCache::append`, `kv::attention`;
// `quant::quantize_rows` and `quant::dequantize_rows` for the 8-bit rings.
#include "common.cuh"
#include <math.h>

// One thread's pair (2 · pair, 2 · pair + 1) of a (row, head)'s new token: the query and key turned
// by interleaved RoPE, the value as it is.
struct TokenPair {
  float q0, q1, k0, k1, v0, v1;
};

// qkv [rows, 3, heads, head_dim] (the packed in-projection of one token per slot); cos, sin
// [rows, head_dim / 2] f32.
__device__ __forceinline__ TokenPair rotate_pair(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
                                                 const float* __restrict__ sin, int b, int h, int pair, int heads,
                                                 int head_dim) {
  const int half = head_dim / 2, even = 2 * pair, odd = 2 * pair + 1;
  const size_t token = (size_t)b * 3 * heads * head_dim;
  const __nv_bfloat16* q = qkv + token + (size_t)h * head_dim;
  const __nv_bfloat16* k = qkv + token + (size_t)(heads + h) * head_dim;
  const __nv_bfloat16* v = qkv + token + (size_t)(2 * heads + h) * head_dim;
  const float c = cos[(size_t)b * half + pair], s = sin[(size_t)b * half + pair];
  const float q0 = __bfloat162float(q[even]), q1 = __bfloat162float(q[odd]);
  const float k0 = __bfloat162float(k[even]), k1 = __bfloat162float(k[odd]);
  TokenPair t;
  t.q0 = q0 * c - q1 * s;
  t.q1 = q0 * s + q1 * c;
  t.k0 = k0 * c - k1 * s;
  t.k1 = k0 * s + k1 * c;
  t.v0 = __bfloat162float(v[even]);
  t.v1 = __bfloat162float(v[odd]);
  return t;
}

// An entry's scale (its largest magnitude / 127, 1 for an all-zero entry) and a value's code
// x / scale rounded half away from zero: `quant::quantize_rows` on the CPU computes the same.
__device__ __forceinline__ float int8_scale(float amax) { return amax > 0.f ? amax * (1.f / 127.f) : 1.f; }
__device__ __forceinline__ int8_t int8_code(float x, float scale) {
  return (int8_t)fminf(127.f, fmaxf(-127.f, roundf(x / scale)));
}

// How a new token's key and value go into a ring, at entry `entry` (counted in entries of
// head_dim values from the ring's start). Every thread of the block calls `write`; those past
// the head's pairs pass owns = false.
struct Bf16RingWriter {
  __nv_bfloat16* k;
  __nv_bfloat16* v;
  __device__ void write(size_t entry, int pair, bool owns, const TokenPair& t, int head_dim, float*) const {
    if (!owns) return;
    const size_t at = entry * head_dim + 2 * pair;
    k[at] = __float2bfloat16(t.k0);
    k[at + 1] = __float2bfloat16(t.k1);
    v[at] = __float2bfloat16(t.v0);
    v[at + 1] = __float2bfloat16(t.v1);
  }
};

// int8 codes with `int8_scale` of the entry's rotated key, of its value; the block reduces the
// entry's largest magnitude, so its threads are whole warps.
struct Int8RingWriter {
  int8_t* k;
  int8_t* v;
  float* k_scale;
  float* v_scale;
  __device__ void write(size_t entry, int pair, bool owns, const TokenPair& t, int head_dim, float* scratch) const {
    const float ks = int8_scale(block_max(fmaxf(fabsf(t.k0), fabsf(t.k1)), scratch));
    const float vs = int8_scale(block_max(fmaxf(fabsf(t.v0), fabsf(t.v1)), scratch));
    if (owns) {
      const size_t at = entry * head_dim + 2 * pair;
      k[at] = int8_code(t.k0, ks);
      k[at + 1] = int8_code(t.k1, ks);
      v[at] = int8_code(t.v0, vs);
      v[at + 1] = int8_code(t.v1, vs);
    }
    if (threadIdx.x == 0) {
      k_scale[entry] = ks;
      v_scale[entry] = vs;
    }
  }
};

// The block's (row, head) = blockIdx.x: its rotated query (bf16) into q_out [head_dim], its key
// and value into the ring at write_idx[row] (< 0 or past capacity: left alone). Returns whether
// it wrote. Every thread of the block calls it.
template <class Writer>
__device__ __forceinline__ bool rope_write_token(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
                                                 const float* __restrict__ sin, __nv_bfloat16* q_out,
                                                 const Writer ring, const int64_t* __restrict__ write_idx, int heads,
                                                 int head_dim, int capacity, float* scratch) {
  const int pair = threadIdx.x;
  const bool owns = pair < head_dim / 2;
  const int b = blockIdx.x / heads, h = blockIdx.x % heads;
  TokenPair t = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (owns) {
    t = rotate_pair(qkv, cos, sin, b, h, pair, heads, head_dim);
    q_out[2 * pair] = __float2bfloat16(t.q0);
    q_out[2 * pair + 1] = __float2bfloat16(t.q1);
  }
  // The same for every thread of the block, so a writer's reductions are reached by all.
  const int64_t at = write_idx[b];
  if (at < 0 || at >= capacity) return false;
  ring.write(((size_t)b * heads + h) * capacity + (size_t)at, pair, owns, t, head_dim, scratch);
  return true;
}

// q_out [rows, heads, head_dim]; ring_k, ring_v [rows, heads, capacity, head_dim]; write_idx
// [rows] (< 0: leave the ring alone). Grid: rows * heads blocks of head_dim / 2 threads, one per
// rotated pair.
extern "C" __global__ void rope_kv_write_bf16(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
                                              const float* __restrict__ sin, __nv_bfloat16* __restrict__ q_out,
                                              __nv_bfloat16* __restrict__ ring_k, __nv_bfloat16* __restrict__ ring_v,
                                              const int64_t* __restrict__ write_idx, int heads, int head_dim,
                                              int capacity) {
  grid_dependency_sync();
  rope_write_token(qkv, cos, sin, q_out + (size_t)blockIdx.x * head_dim, Bf16RingWriter{ring_k, ring_v}, write_idx,
                   heads, head_dim, capacity, nullptr);
}

// rope_kv_write_bf16 for an 8-bit ring: ring_k, ring_v int8 codes, k_scale, v_scale [rows, heads,
// capacity] f32. Grid: rows * heads blocks of head_dim / 2 threads rounded up to whole warps.
extern "C" __global__ void rope_kv_write_int8(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
                                              const float* __restrict__ sin, __nv_bfloat16* __restrict__ q_out,
                                              int8_t* __restrict__ ring_k, int8_t* __restrict__ ring_v,
                                              float* __restrict__ k_scale, float* __restrict__ v_scale,
                                              const int64_t* __restrict__ write_idx, int heads, int head_dim,
                                              int capacity) {
  grid_dependency_sync();
  __shared__ float scratch[32];
  rope_write_token(qkv, cos, sin, q_out + (size_t)blockIdx.x * head_dim,
                   Int8RingWriter{ring_k, ring_v, k_scale, v_scale}, write_idx, heads, head_dim, capacity, scratch);
}

// Attention of one query per (slot, head) over the first `len` ring entries, split over the keys
// so that a long ring keeps every SM busy (flash-decoding): `ring_attention_part_bf16` scores one
// chunk of ATTENTION_CHUNK keys per block and writes its running max, its sum of exponentials and
// its unnormalised weighted values; `ring_attention_join` folds the chunks of a head together.
// Shared memory is static, so no launch can size it wrong.
// ATTENTION_CHUNK keys per block by default, and in the one-launch write and attention;
// ring_attention_part takes its keys per block (at most MAX_KEYS_PER_BLOCK) as an argument, and
// blocks of up to MAX_ATTENTION_THREADS threads (the host's choice: `cuda::AttentionLaunch`).
#define ATTENTION_CHUNK 128
#define ATTENTION_THREADS 128
#define MAX_KEYS_PER_BLOCK 256
#define MAX_ATTENTION_THREADS 256

// How the attention kernel reads a ring's entries (`entry` counts entries of head_dim values
// from the ring's start): the keys and the values 8 dimensions at a time, as f32 (a key's scale
// apart, applied to its dot).
struct Bf16Ring {
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  // 8 keys' dimensions from one 16-byte load.
  __device__ void key8(size_t entry, int octet, int head_dim, float* out) const {
    bf16x8_to_f32(*reinterpret_cast<const uint4*>(k + entry * head_dim + octet * 8), out);
  }
  __device__ float key_scale(size_t) const { return 1.f; }
  // 8 values' dimensions from one 16-byte load.
  __device__ void value8(size_t entry, int octet, int head_dim, float* out) const {
    bf16x8_to_f32(*reinterpret_cast<const uint4*>(v + entry * head_dim + octet * 8), out);
  }
  // Read in place: nothing to wait for.
  __device__ void keys_ready() const {}
  __device__ void values_ready() const {}
};

struct Int8Ring {
  const int8_t* k;
  const int8_t* v;
  const float* k_scale;
  const float* v_scale;
  // 8 keys' dimensions from one 8-byte load, as their codes (the scale applies to the dot).
  __device__ void key8(size_t entry, int octet, int head_dim, float* out) const {
    const uint2 raw = *reinterpret_cast<const uint2*>(k + entry * head_dim + octet * 8);
    int8x4_to_f32(raw.x, out);
    int8x4_to_f32(raw.y, out + 4);
  }
  __device__ float key_scale(size_t entry) const { return k_scale[entry]; }
  // 8 values' dimensions from one 8-byte load, scaled.
  __device__ void value8(size_t entry, int octet, int head_dim, float* out) const {
    const uint2 raw = *reinterpret_cast<const uint2*>(v + entry * head_dim + octet * 8);
    int8x4_to_f32(raw.x, out);
    int8x4_to_f32(raw.y, out + 4);
    const float scale = v_scale[entry];
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] *= scale;
  }
  __device__ void keys_ready() const {}
  __device__ void values_ready() const {}
};

// The staged variant (`ring_attention_part_*_staged`): a block copies its whole chunk of the ring into
// shared memory with asynchronous copies before it reads any of it, keys in one group and values in the
// next, so the block waits for memory about once instead of once per batch of keys in flight. A chunk is at
// most STAGED_MAX_KEYS entries of at most 128 dimensions: 32 KB as bf16 keys and values.
#define STAGED_MAX_KEYS 64
#define STAGED_BYTES (2 * STAGED_MAX_KEYS * 128 * 2)

// A chunk of a ring staged in shared memory: the entries from `base` on, read through the same entry
// numbers as the ring in global memory (8-bit codes with their scales for the int8 twin).
template <class Code, bool SCALED>
struct StagedRing {
  const Code* k;
  const Code* v;
  const float* k_scale;  // SCALED only
  const float* v_scale;
  size_t base;
  __device__ void key8(size_t entry, int octet, int head_dim, float* out) const {
    load8(k + (entry - base) * head_dim + octet * 8, out);
  }
  __device__ float key_scale(size_t entry) const { return SCALED ? k_scale[entry - base] : 1.f; }
  __device__ void value8(size_t entry, int octet, int head_dim, float* out) const {
    load8(v + (entry - base) * head_dim + octet * 8, out);
    if (SCALED) {
      const float scale = v_scale[entry - base];
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] *= scale;
    }
  }
  // Each thread waits for its own copies; the barrier after makes them the block's (attend_chunk has one
  // after keys_ready, values_ready brings its own).
  __device__ void keys_ready() const { cp_async_wait<1>(); }
  __device__ void values_ready() const {
    cp_async_wait<0>();
    __syncthreads();
  }

 private:
  __device__ static void load8(const __nv_bfloat16* at, float* out) {
    bf16x8_to_f32(*reinterpret_cast<const uint4*>(at), out);
  }
  __device__ static void load8(const int8_t* at, float* out) {
    const uint2 raw = *reinterpret_cast<const uint2*>(at);
    int8x4_to_f32(raw.x, out);
    int8x4_to_f32(raw.y, out + 4);
  }
};

// Issues the copies of `count` entries from `base` (keys and their scales, then values and theirs) into
// `staged` and returns the chunk as read from there. Nothing waits.
__device__ __forceinline__ StagedRing<__nv_bfloat16, false> stage_chunk(const Bf16Ring ring, size_t base, int count,
                                                                        int head_dim, unsigned char* staged) {
  const size_t values = (size_t)count * head_dim;
  __nv_bfloat16* k = reinterpret_cast<__nv_bfloat16*>(staged);
  __nv_bfloat16* v = k + STAGED_MAX_KEYS * 128;
  stage_async(k, ring.k + base * head_dim, values * sizeof(__nv_bfloat16));
  cp_async_commit();
  stage_async(v, ring.v + base * head_dim, values * sizeof(__nv_bfloat16));
  cp_async_commit();
  return {k, v, nullptr, nullptr, base};
}

__device__ __forceinline__ StagedRing<int8_t, true> stage_chunk(const Int8Ring ring, size_t base, int count,
                                                                int head_dim, unsigned char* staged) {
  const size_t values = (size_t)count * head_dim;
  int8_t* k = reinterpret_cast<int8_t*>(staged);
  int8_t* v = k + STAGED_MAX_KEYS * 128;
  float* k_scale = reinterpret_cast<float*>(v + STAGED_MAX_KEYS * 128);
  float* v_scale = k_scale + STAGED_MAX_KEYS;
  stage_async(k, ring.k + base * head_dim, values);
  stage_async(k_scale, ring.k_scale + base, count * sizeof(float));
  cp_async_commit();
  stage_async(v, ring.v + base * head_dim, values);
  stage_async(v_scale, ring.v_scale + base, count * sizeof(float));
  cp_async_commit();
  return {k, v, k_scale, v_scale, base};
}

// What attend_chunk writes for a chunk whose every key the mask hides: with `partial` (null when the chunk is
// the head's only one and writes its result itself) its max -inf and its sum and weighted values 0, for the
// join; else zeros to the head's output.
__device__ __forceinline__ void write_hidden_chunk(float* __restrict__ partial, __nv_bfloat16* __restrict__ out,
                                                   int head, int head_dim) {
  if (partial == nullptr) {
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) out[(size_t)head * head_dim + d] = __float2bfloat16(0.f);
  } else {
    for (int d = threadIdx.x; d < head_dim + 2; d += blockDim.x) partial[d] = d == head_dim ? -INFINITY : 0.f;
  }
}

// The attention of block (row · heads + head, chunk) over its chunk of keys_per_block ring
// entries. query [head_dim] f32 (block-visible: shared memory); the ring [rows, heads, capacity,
// head_dim] read through `Ring`; mask [rows, len] f32 additive (0 visible, -inf hidden);
// prefix_len [rows]: a row's first prefix_len entries are a pinned prefix stored at its prompt
// positions, scored against the query turned back by unturn_cos/unturn_sin ([rows, head_dim / 2]
// f32, RoPE by minus the distance the window has slid past the prefix), which equals turning
// those keys forward.
// With `out` null it writes part [rows * heads, chunks, head_dim + 2] f32: per chunk the weighted
// values, then its max score and its sum of exponentials (max -inf, sum 0 when the mask hides the
// whole chunk), for ring_attention_join. With one chunk it may instead write the normalised
// result straight to out [rows * heads, head_dim] bf16 (zeros where the mask hides every key).
// Blocks of whole warps, at most MAX_ATTENTION_THREADS threads, each over keys_per_block ring
// entries (at most MAX_KEYS_PER_BLOCK); head_dim a multiple of 8, at most 128; rows of the ring
// 16-byte aligned (bf16) or 8-byte aligned (int8).
// SCORE_BATCH and VALUE_BATCH: the keys whose loads each thread has in flight at once, in the
// scores and in the weighted values.
template <int SCORE_BATCH, int VALUE_BATCH, class Ring>
__device__ void attend_chunk(const float* query, const Ring ring, const float* __restrict__ mask,
                             const unsigned int* __restrict__ prefix_len, const float* __restrict__ unturn_cos,
                             const float* __restrict__ unturn_sin, float* __restrict__ part,
                             __nv_bfloat16* __restrict__ out, int heads, int head_dim, int capacity, int len,
                             float scale, int keys_per_block) {
  __shared__ float qs[128];
  __shared__ float qp[128];
  __shared__ float scores[MAX_KEYS_PER_BLOCK];
  __shared__ float sums[8 * MAX_ATTENTION_THREADS];
  __shared__ float scratch[32];
  const int head = blockIdx.x, b = head / heads, chunk = blockIdx.y, chunks = gridDim.y;
  const int first = chunk * keys_per_block, count = min(keys_per_block, len - first);
  const int half = head_dim / 2;
  const bool final = out != nullptr && chunks == 1;
  float* partial = final ? nullptr : part + ((size_t)head * chunks + chunk) * (head_dim + 2);
  // Whether the mask leaves any key of the chunk visible, read beside the query's rotations: a chunk it wholly
  // hides (past a young session's history, which a whole-ring step still spans) then loads no key and no value.
  int visible = 0;
  for (int j = threadIdx.x; j < count; j += blockDim.x) visible |= mask[(size_t)b * len + first + j] != -INFINITY;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float q0 = query[2 * i], q1 = query[2 * i + 1];
    const float c = unturn_cos[(size_t)b * half + i], s = unturn_sin[(size_t)b * half + i];
    qs[2 * i] = q0 * scale;
    qs[2 * i + 1] = q1 * scale;
    qp[2 * i] = (q0 * c - q1 * s) * scale;
    qp[2 * i + 1] = (q0 * s + q1 * c) * scale;
  }
  const int pinned = (int)prefix_len[b];
  ring.keys_ready();
  if (!__syncthreads_or(visible)) {
    ring.values_ready();  // a staged chunk's copies were issued all the same: they must land first
    write_hidden_chunk(partial, out, head, head_dim);
    return;
  }

  // Scores: a team of lanes per key, 8 dimensions per lane (one load), SCORE_BATCH keys' loads
  // in flight per lane before any is used: a block's time is the latency of its loads.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int octets = head_dim / 8;
  int team = 1;
  while (team < octets) team <<= 1;
  const int keys_per_warp = 32 / team, member = lane % team, stride = warps * keys_per_warp;
  const size_t base = (size_t)head * capacity + first;
  // j0 is the warp's: every lane runs the same iterations, as the shuffles need.
  for (int j0 = warp * keys_per_warp; j0 < count; j0 += stride * SCORE_BATCH) {
    float k8[SCORE_BATCH][8];
    float masked[SCORE_BATCH];
#pragma unroll
    for (int u = 0; u < SCORE_BATCH; ++u) {
      const int j = j0 + u * stride + lane / team;
      masked[u] = 0.f;
      if (j < count && member < octets) {
        ring.key8(base + j, member, head_dim, k8[u]);
        masked[u] = mask[(size_t)b * len + first + j];
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) k8[u][i] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < SCORE_BATCH; ++u) {
      const int j = j0 + u * stride + lane / team;
      const float* q = first + j < pinned ? qp : qs;
      float dot = 0.f;
      if (member < octets) {
#pragma unroll
        for (int i = 0; i < 8; ++i) dot += q[member * 8 + i] * k8[u][i];
      }
      for (int offset = team / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      if (member == 0 && j < count) scores[j] = dot * ring.key_scale(base + j) + masked[u];
    }
  }
  __syncthreads();

  float local_max = -INFINITY;
  for (int j = threadIdx.x; j < count; j += blockDim.x) local_max = fmaxf(local_max, scores[j]);
  const float max_score = block_max(local_max, scratch);
  ring.values_ready();  // before any return: no copy may land after its block is gone
  if (max_score == -INFINITY) {
    write_hidden_chunk(partial, out, head, head_dim);
    return;
  }
  float local_sum = 0.f;
  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    const float p = __expf(scores[j] - max_score);
    scores[j] = p;
    local_sum += p;
  }
  const float total = block_sum(local_sum, scratch);

  // Weighted values: a thread per 8 dimensions (one load) and per group of keys, VALUE_BATCH
  // loads in flight, the groups summed through shared memory (groups · head_dim is at most
  // 8 · MAX_ATTENTION_THREADS floats).
  const int groups = blockDim.x / octets;
  const int octet = threadIdx.x % octets, group = threadIdx.x / octets;
  if (group < groups) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j0 = group; j0 < count; j0 += groups * VALUE_BATCH) {
      float v8[VALUE_BATCH][8];
      float weight[VALUE_BATCH];
#pragma unroll
      for (int u = 0; u < VALUE_BATCH; ++u) {
        const int j = j0 + u * groups;
        weight[u] = 0.f;
        if (j < count) {
          ring.value8(base + j, octet, head_dim, v8[u]);
          weight[u] = scores[j];
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) v8[u][i] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < VALUE_BATCH; ++u) {
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += weight[u] * v8[u][i];
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sums[group * head_dim + octet * 8 + i] = acc[i];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float v = 0.f;
    for (int g = 0; g < groups; ++g) v += sums[g * head_dim + d];
    if (final) {
      out[(size_t)head * head_dim + d] = __float2bfloat16(total > 0.f ? v / total : 0.f);
    } else {
      partial[d] = v;
    }
  }
  if (threadIdx.x == 0 && !final) {
    partial[head_dim] = max_score;
    partial[head_dim + 1] = total;
  }
}

// The block's query (bf16, [rows * heads, head_dim]) as f32 in shared memory.
__device__ __forceinline__ const float* load_query(const __nv_bfloat16* __restrict__ q, int head_dim) {
  __shared__ float query[128];
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) query[d] = __bfloat162float(q[(size_t)blockIdx.x * head_dim + d]);
  __syncthreads();
  return query;
}

// q [rows, heads, head_dim] bf16; the rest as `attend_chunk` says. Grid: (rows * heads, chunks)
// blocks of at most MAX_ATTENTION_THREADS threads, each over keys_per_block ring entries (at most
// MAX_KEYS_PER_BLOCK); out non-null only with one chunk (no join needed). The int8 twin reads
// ring_k, ring_v as int8 codes and k_scale, v_scale [rows, heads, capacity] f32. Each
// (SCORE_BATCH, VALUE_BATCH) pair is a kernel of its own; the unsuffixed one is the default.
#define RING_ATTENTION_PART(suffix, score_batch, value_batch)                                                       \
  extern "C" __global__ void ring_attention_part_bf16##suffix(                                                      \
      const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ ring_k,                                \
      const __nv_bfloat16* __restrict__ ring_v, const float* __restrict__ mask,                                     \
      const unsigned int* __restrict__ prefix_len, const float* __restrict__ unturn_cos,                            \
      const float* __restrict__ unturn_sin, float* __restrict__ part, __nv_bfloat16* __restrict__ out, int heads,   \
      int head_dim, int capacity, int len, float scale, int keys_per_block) {                                       \
    grid_dependency_sync();                                                                                         \
    attend_chunk<score_batch, value_batch>(load_query(q, head_dim), Bf16Ring{ring_k, ring_v}, mask, prefix_len,     \
                                           unturn_cos, unturn_sin, part, out, heads, head_dim, capacity, len,       \
                                           scale, keys_per_block);                                                  \
  }                                                                                                                 \
  extern "C" __global__ void ring_attention_part_int8##suffix(                                                      \
      const __nv_bfloat16* __restrict__ q, const int8_t* __restrict__ ring_k, const int8_t* __restrict__ ring_v,    \
      const float* __restrict__ k_scale, const float* __restrict__ v_scale, const float* __restrict__ mask,         \
      const unsigned int* __restrict__ prefix_len, const float* __restrict__ unturn_cos,                            \
      const float* __restrict__ unturn_sin, float* __restrict__ part, __nv_bfloat16* __restrict__ out, int heads,   \
      int head_dim, int capacity, int len, float scale, int keys_per_block) {                                       \
    grid_dependency_sync();                                                                                         \
    attend_chunk<score_batch, value_batch>(load_query(q, head_dim), Int8Ring{ring_k, ring_v, k_scale, v_scale},     \
                                           mask, prefix_len, unturn_cos, unturn_sin, part, out, heads, head_dim,    \
                                           capacity, len, scale, keys_per_block);                                   \
  }

RING_ATTENTION_PART(, 4, 4)
RING_ATTENTION_PART(_s2v2, 2, 2)
RING_ATTENTION_PART(_s4v8, 4, 8)
RING_ATTENTION_PART(_s8v8, 8, 8)

// The part kernels with their chunk staged in shared memory first (`stage_chunk`): arguments and grid as
// RING_ATTENTION_PART's, keys_per_block at most STAGED_MAX_KEYS and head_dim at most 128.
template <class Ring>
__device__ void attend_staged(const __nv_bfloat16* __restrict__ q, const Ring ring, const float* __restrict__ mask,
                              const unsigned int* __restrict__ prefix_len, const float* __restrict__ unturn_cos,
                              const float* __restrict__ unturn_sin, float* __restrict__ part,
                              __nv_bfloat16* __restrict__ out, int heads, int head_dim, int capacity, int len,
                              float scale, int keys_per_block) {
  __shared__ __align__(16) unsigned char staged[STAGED_BYTES];
  const int first = blockIdx.y * keys_per_block, count = min(keys_per_block, len - first);
  const auto chunk = stage_chunk(ring, (size_t)blockIdx.x * capacity + first, count, head_dim, staged);
  attend_chunk<4, 4>(load_query(q, head_dim), chunk, mask, prefix_len, unturn_cos, unturn_sin, part, out, heads,
                     head_dim, capacity, len, scale, keys_per_block);
}

extern "C" __global__ void ring_attention_part_bf16_staged(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ ring_k,
    const __nv_bfloat16* __restrict__ ring_v, const float* __restrict__ mask,
    const unsigned int* __restrict__ prefix_len, const float* __restrict__ unturn_cos,
    const float* __restrict__ unturn_sin, float* __restrict__ part, __nv_bfloat16* __restrict__ out, int heads,
    int head_dim, int capacity, int len, float scale, int keys_per_block) {
  grid_dependency_sync();
  attend_staged(q, Bf16Ring{ring_k, ring_v}, mask, prefix_len, unturn_cos, unturn_sin, part, out, heads, head_dim,
                capacity, len, scale, keys_per_block);
}

extern "C" __global__ void ring_attention_part_int8_staged(
    const __nv_bfloat16* __restrict__ q, const int8_t* __restrict__ ring_k, const int8_t* __restrict__ ring_v,
    const float* __restrict__ k_scale, const float* __restrict__ v_scale, const float* __restrict__ mask,
    const unsigned int* __restrict__ prefix_len, const float* __restrict__ unturn_cos,
    const float* __restrict__ unturn_sin, float* __restrict__ part, __nv_bfloat16* __restrict__ out, int heads,
    int head_dim, int capacity, int len, float scale, int keys_per_block) {
  grid_dependency_sync();
  attend_staged(q, Int8Ring{ring_k, ring_v, k_scale, v_scale}, mask, prefix_len, unturn_cos, unturn_sin, part, out,
                heads, head_dim, capacity, len, scale, keys_per_block);
}

// rope_kv_write then the attention, in one launch, when the attended entries fit one chunk
// (len <= ATTENTION_CHUNK): each block writes its (row, head)'s entry, then reads the chunk
// holding it, after a barrier; no other block reads that ring. Arguments as the two kernels'
// (out [rows, heads, head_dim] bf16); the ring is written and read here, so its pointers are not
// __restrict__. Grid: rows * heads blocks of ATTENTION_THREADS threads.
template <class Writer, class Ring>
__device__ void write_attend(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
                             const float* __restrict__ sin, const Writer writer, const Ring ring,
                             const int64_t* __restrict__ write_idx, const float* __restrict__ mask,
                             const unsigned int* __restrict__ prefix_len, const float* __restrict__ unturn_cos,
                             const float* __restrict__ unturn_sin, __nv_bfloat16* __restrict__ out, int heads,
                             int head_dim, int capacity, int len, float scale) {
  __shared__ __nv_bfloat16 rotated[128];
  __shared__ float query[128];
  __shared__ float scratch[32];
  rope_write_token(qkv, cos, sin, rotated, writer, write_idx, heads, head_dim, capacity, scratch);
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) query[d] = __bfloat162float(rotated[d]);
  __syncthreads();
  attend_chunk<4, 4>(query, ring, mask, prefix_len, unturn_cos, unturn_sin, nullptr, out, heads, head_dim, capacity,
                     len, scale, ATTENTION_CHUNK);
}

extern "C" __global__ void ring_write_attend_bf16(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
                                                  const float* __restrict__ sin, __nv_bfloat16* ring_k,
                                                  __nv_bfloat16* ring_v,
                                                  const int64_t* __restrict__ write_idx,
                                                  const float* __restrict__ mask,
                                                  const unsigned int* __restrict__ prefix_len,
                                                  const float* __restrict__ unturn_cos,
                                                  const float* __restrict__ unturn_sin,
                                                  __nv_bfloat16* __restrict__ out, int heads, int head_dim,
                                                  int capacity, int len, float scale) {
  grid_dependency_sync();
  write_attend(qkv, cos, sin, Bf16RingWriter{ring_k, ring_v}, Bf16Ring{ring_k, ring_v}, write_idx, mask, prefix_len,
               unturn_cos, unturn_sin, out, heads, head_dim, capacity, len, scale);
}

extern "C" __global__ void ring_write_attend_int8(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
                                                  const float* __restrict__ sin, int8_t* ring_k,
                                                  int8_t* ring_v, float* k_scale,
                                                  float* v_scale,
                                                  const int64_t* __restrict__ write_idx,
                                                  const float* __restrict__ mask,
                                                  const unsigned int* __restrict__ prefix_len,
                                                  const float* __restrict__ unturn_cos,
                                                  const float* __restrict__ unturn_sin,
                                                  __nv_bfloat16* __restrict__ out, int heads, int head_dim,
                                                  int capacity, int len, float scale) {
  grid_dependency_sync();
  write_attend(qkv, cos, sin, Int8RingWriter{ring_k, ring_v, k_scale, v_scale},
               Int8Ring{ring_k, ring_v, k_scale, v_scale}, write_idx, mask, prefix_len, unturn_cos, unturn_sin, out,
               heads, head_dim, capacity, len, scale);
}

// Folds head `head`'s chunks of part [rows * heads, chunks, head_dim + 2] (as attend_chunk writes them) into
// out [rows * heads, head_dim] bf16 (zeros where the mask hides every key), the block's threads taking the
// dimensions in turn. The loads bypass L1 (`__ldcg`): the fused join reads parts other blocks wrote in its launch.
__device__ void join_head(const float* part, __nv_bfloat16* __restrict__ out, int head, int head_dim, int chunks) {
  const float* parts = part + (size_t)head * chunks * (head_dim + 2);
  float max_score = -INFINITY;
#pragma unroll 8
  for (int c = 0; c < chunks; ++c) max_score = fmaxf(max_score, __ldcg(parts + (size_t)c * (head_dim + 2) + head_dim));
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float total = 0.f, acc = 0.f;
    if (max_score != -INFINITY) {
#pragma unroll 8
      for (int c = 0; c < chunks; ++c) {
        const float* p = parts + (size_t)c * (head_dim + 2);
        const float chunk_max = __ldcg(p + head_dim);
        if (chunk_max == -INFINITY) continue;
        const float weight = __expf(chunk_max - max_score);
        total += weight * __ldcg(p + head_dim + 1);
        acc += weight * __ldcg(p + d);
      }
    }
    out[(size_t)head * head_dim + d] = __float2bfloat16(total > 0.f ? acc / total : 0.f);
  }
}

// part as written by ring_attention_part_bf16 or _int8 → out [rows, heads, head_dim] bf16 (zeros where
// the mask hides every key). Grid: rows * heads blocks of whole warps.
extern "C" __global__ void ring_attention_join(const float* __restrict__ part, __nv_bfloat16* __restrict__ out,
                                               int head_dim, int chunks) {
  grid_dependency_sync();
  join_head(part, out, blockIdx.x, head_dim, chunks);
}

// The join inside the part kernels (`_joined`): once its chunk's part is written, the block that finishes its
// head's chunks last folds them into out, so no join kernel runs. arrivals[head] counts the blocks done and
// wraps to 0 with the last (atomicInc), ready for the next launch. Each thread's fence orders its part writes
// before the count; the last block's orders the count before its reads. With one chunk attend_chunk wrote out
// itself (arrivals may then be null).
__device__ void join_if_last(const float* part, __nv_bfloat16* __restrict__ out, unsigned int* __restrict__ arrivals,
                             int head_dim) {
  const int chunks = gridDim.y;
  if (chunks == 1) return;
  __shared__ unsigned int arrived;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) arrived = atomicInc(arrivals + blockIdx.x, (unsigned int)(chunks - 1));
  __syncthreads();
  if (arrived != (unsigned int)(chunks - 1)) return;
  __threadfence();
  join_head(part, out, blockIdx.x, head_dim, chunks);
}

// The default part kernel's body with the arguments of attend_staged's.
template <class Ring>
__device__ __forceinline__ void attend_plain(const __nv_bfloat16* __restrict__ q, const Ring ring,
                                             const float* __restrict__ mask,
                                             const unsigned int* __restrict__ prefix_len,
                                             const float* __restrict__ unturn_cos,
                                             const float* __restrict__ unturn_sin, float* part,
                                             __nv_bfloat16* __restrict__ out, int heads, int head_dim, int capacity,
                                             int len, float scale, int keys_per_block) {
  attend_chunk<4, 4>(load_query(q, head_dim), ring, mask, prefix_len, unturn_cos, unturn_sin, part, out, heads,
                     head_dim, capacity, len, scale, keys_per_block);
}

// The part kernels with the join fused in: arguments and grid as the default (`_joined`, attend_plain) or the
// staged (`_staged_joined`, attend_staged) part kernel's, `out` given whatever the number of chunks, then
// arrivals [rows * heads] u32, zero at launch and left zero (null with one chunk).
#define RING_ATTENTION_JOINED(suffix, attend)                                                                       \
  extern "C" __global__ void ring_attention_part_bf16##suffix(                                                      \
      const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ ring_k,                                \
      const __nv_bfloat16* __restrict__ ring_v, const float* __restrict__ mask,                                     \
      const unsigned int* __restrict__ prefix_len, const float* __restrict__ unturn_cos,                            \
      const float* __restrict__ unturn_sin, float* part, __nv_bfloat16* __restrict__ out, int heads, int head_dim,  \
      int capacity, int len, float scale, int keys_per_block, unsigned int* __restrict__ arrivals) {                 \
    grid_dependency_sync();                                                                                         \
    attend(q, Bf16Ring{ring_k, ring_v}, mask, prefix_len, unturn_cos, unturn_sin, part, out, heads, head_dim,       \
           capacity, len, scale, keys_per_block);                                                                   \
    join_if_last(part, out, arrivals, head_dim);                                                                    \
  }                                                                                                                 \
  extern "C" __global__ void ring_attention_part_int8##suffix(                                                      \
      const __nv_bfloat16* __restrict__ q, const int8_t* __restrict__ ring_k, const int8_t* __restrict__ ring_v,    \
      const float* __restrict__ k_scale, const float* __restrict__ v_scale, const float* __restrict__ mask,         \
      const unsigned int* __restrict__ prefix_len, const float* __restrict__ unturn_cos,                            \
      const float* __restrict__ unturn_sin, float* part, __nv_bfloat16* __restrict__ out, int heads, int head_dim,  \
      int capacity, int len, float scale, int keys_per_block, unsigned int* __restrict__ arrivals) {                 \
    grid_dependency_sync();                                                                                         \
    attend(q, Int8Ring{ring_k, ring_v, k_scale, v_scale}, mask, prefix_len, unturn_cos, unturn_sin, part, out,      \
           heads, head_dim, capacity, len, scale, keys_per_block);                                                  \
    join_if_last(part, out, arrivals, head_dim);                                                                    \
  }

RING_ATTENTION_JOINED(_joined, attend_plain)
RING_ATTENTION_JOINED(_staged_joined, attend_staged)

// Mimi's step before its attention, in f32: interleaved RoPE on the queries and keys of qkv [rows, time, 3,
// heads, head_dim] (the in-projection's output) by cos, sin [rows, time, head_dim / 2]; the queries out as
// q_out [rows, heads, time, head_dim], the rotated keys and the values written into the rings ring_k, ring_v
// [batch >= rows, heads, capacity, head_dim] at entry index[r, 0, t, 0] of index i64 [rows, heads, time,
// head_dim] (`kv::RingCache`'s scatter index: one entry per (row, time), repeated over heads and columns; one
// outside the ring writes nothing). Grid: rows * time * heads blocks (head fastest), head_dim / 2 threads.
// CPU reference: `nn::RopeTables::apply` on q and k, `kv::RingCache::append`.
extern "C" __global__ void rope_ring_write_f32(const float* __restrict__ qkv, const float* __restrict__ cos,
                                               const float* __restrict__ sin, const int64_t* __restrict__ index,
                                               float* __restrict__ ring_k, float* __restrict__ ring_v,
                                               float* __restrict__ q_out, int heads, int time, int head_dim,
                                               int capacity) {
  grid_dependency_sync();
  const int h = blockIdx.x % heads, t = (blockIdx.x / heads) % time, r = blockIdx.x / (heads * time);
  const int pair = threadIdx.x, half = head_dim / 2, even = 2 * pair, odd = even + 1;
  if (pair >= half) return;
  const size_t step = (size_t)r * time + t;
  const float* q = qkv + step * 3 * heads * head_dim + (size_t)h * head_dim;
  const float* k = q + (size_t)heads * head_dim;
  const float* v = k + (size_t)heads * head_dim;
  const float c = cos[step * half + pair], s = sin[step * half + pair];
  float* rotated = q_out + (((size_t)r * heads + h) * time + t) * head_dim;
  rotated[even] = q[even] * c - q[odd] * s;
  rotated[odd] = q[even] * s + q[odd] * c;
  const int64_t entry = index[((size_t)r * heads * time + t) * head_dim];
  if (entry < 0 || entry >= capacity) return;
  const size_t at = (((size_t)r * heads + h) * capacity + entry) * head_dim;
  ring_k[at + even] = k[even] * c - k[odd] * s;
  ring_k[at + odd] = k[even] * s + k[odd] * c;
  ring_v[at + even] = v[even];
  ring_v[at + odd] = v[odd];
}

// Mimi's streaming attention in f32, every query of a step at once, its heads merged on the way out:
// out[b, t, h, :] = softmax(q[b, h, t, :] · k[b, h, j, :]ᵀ · scale + mask[b, 0, t, j]) · v[b, h, j, :] over
// j < len (the reference's order of operations: scores scaled, the mask added, the softmax, then the values).
// q [rows, heads, time, head_dim] and mask [rows, 1, time, len] contiguous; k and v the first len entries of
// rings [rows, heads, capacity, head_dim] (capacity >= len; read in place, not copied out); out [rows, time,
// heads, head_dim]. A key the mask hides (-inf) weighs 0; a query that sees no key
// gives NaN, as the softmax does. Grid: rows * heads * time blocks (query fastest, then head); block: whole
// warps, a warp per key for the scores and a thread per value column for the output. Host requirements:
// len <= MASKED_ATTENTION_MAX_KEYS, head_dim <= MASKED_ATTENTION_MAX_HEAD_DIM.
#define MASKED_ATTENTION_MAX_KEYS 1024
#define MASKED_ATTENTION_MAX_HEAD_DIM 256

extern "C" __global__ void masked_attention_f32(const float* __restrict__ q, const float* __restrict__ k,
                                                const float* __restrict__ v, const float* __restrict__ mask,
                                                float* __restrict__ out, int heads, int time, int len, int capacity,
                                                int head_dim, float scale) {
  grid_dependency_sync();
  __shared__ float query[MASKED_ATTENTION_MAX_HEAD_DIM];
  __shared__ float weight[MASKED_ATTENTION_MAX_KEYS];
  __shared__ float shared32[32];
  const int t = blockIdx.x % time, h = (blockIdx.x / time) % heads, b = blockIdx.x / (time * heads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const size_t head = (size_t)b * heads + h;
  const float* keys = k + head * capacity * head_dim;
  const float* values = v + head * capacity * head_dim;
  const float* hidden = mask + ((size_t)b * time + t) * len;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) query[d] = q[(head * time + t) * head_dim + d];
  __syncthreads();
  float largest = -INFINITY;
  for (int j = warp; j < len; j += warps) {
    float dot = 0.f;
    for (int d = lane; d < head_dim; d += 32) dot += query[d] * keys[(size_t)j * head_dim + d];
    const float score = warp_sum(dot) * scale + hidden[j];
    if (lane == 0) weight[j] = score;
    largest = fmaxf(largest, score);
  }
  largest = block_max(largest, shared32);
  float total = 0.f;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    const float e = expf(weight[j] - largest);
    weight[j] = e;
    total += e;
  }
  total = block_sum(total, shared32);
  float* row = out + (((size_t)b * time + t) * heads + h) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < len; ++j) acc += weight[j] * values[(size_t)j * head_dim + d];
    row[d] = acc / total;
  }
}
