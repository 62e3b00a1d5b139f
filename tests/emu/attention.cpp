// Checks kernels/attention.cu on the CPU emulator against double-precision references written from the
// kernels' documented contracts: rope_kv_write_{bf16,int8}, ring_attention_part_{bf16,int8} with
// ring_attention_join or writing a single chunk's result itself, and ring_write_attend_{bf16,int8}.
// Build and run: tests/emu/README.md.
#include "check.h"

#include "attention.cu"

namespace {

constexpr int kRows = 3;            // slots of the decode step
constexpr int kRopeCapacity = 16;  // ring entries per (row, head) in the RoPE cases
constexpr bf16 kUntouched = {0xDEAD};
constexpr bf16 kNanBf16 = {0x7FC0};
constexpr int8_t kUntouchedCode = 0x5A;
constexpr float kUntouchedScale = -7.f;

// A bf16 result rounded from f32: off by at most 2^-8 of the value, plus f32 arithmetic's slack.
bool within_bf16_rounding(double got, double expected) {
  return std::abs(got - expected) <= std::abs(expected) / 256 + 1e-6;
}

std::vector<double> widened(const bf16* x, int count) {
  std::vector<double> out(count);
  for (int i = 0; i < count; ++i) out[i] = to_double(x[i]);
  return out;
}

// Interleaved RoPE of one head: each pair (x[2i], x[2i + 1]) turned by the angle of cosine cos_row[i]
// and sine sin_row[i].
std::vector<double> rotated(const bf16* x, const float* cos_row, const float* sin_row, int head_dim) {
  std::vector<double> out(head_dim);
  for (int i = 0; i < head_dim / 2; ++i) {
    const double even = to_double(x[2 * i]), odd = to_double(x[2 * i + 1]);
    out[2 * i] = even * cos_row[i] - odd * sin_row[i];
    out[2 * i + 1] = even * sin_row[i] + odd * cos_row[i];
  }
  return out;
}

// Cosines and sines of random angles, [rows, head_dim / 2] each.
struct Angles {
  float* cos;
  float* sin;
};

Angles random_angles(emu::DeviceMemory& memory, int head_dim) {
  const int count = kRows * head_dim / 2;
  const Angles angles{memory.alloc<float>(count), memory.alloc<float>(count)};
  for (int i = 0; i < count; ++i) {
    const double angle = uniform(-3.2, 3.2);
    angles.cos[i] = float(std::cos(angle));
    angles.sin[i] = float(std::sin(angle));
  }
  return angles;
}

struct Bf16RingBuffers {
  bf16* k;  // [rows, heads, capacity, head_dim]
  bf16* v;
};

struct Int8RingBuffers {
  int8_t* k;  // [rows, heads, capacity, head_dim]
  int8_t* v;
  float* k_scale;  // [rows, heads, capacity]
  float* v_scale;
};

// ---- rope_kv_write ----

struct RopeCase {
  int heads, head_dim;
  std::array<int64_t, kRows> write_idx;

  std::string title(const char* kernel) const {
    return format("%s heads=%d head_dim=%d write_idx={%ld,%ld,%ld}", kernel, heads, head_dim, long(write_idx[0]),
                  long(write_idx[1]), long(write_idx[2]));
  }
  size_t entries() const { return size_t(kRows) * heads * kRopeCapacity; }
};

struct RopeInputs {
  bf16* qkv;  // [rows, 3, heads, head_dim]
  Angles angles;
  int64_t* write_idx;
  bf16* q_out;  // [rows, heads, head_dim]
};

// Head `head` of part `part` (0 query, 1 key, 2 value) of row `row` of qkv.
bf16* qkv_head(const RopeInputs& in, const RopeCase& rope, int row, int part, int head) {
  return in.qkv + ((size_t(row) * 3 + part) * rope.heads + head) * rope.head_dim;
}

// Random q, k, v, except an all-zero value (row 0, head 1) and key (row 2, head 0): int8 scale 1.
RopeInputs make_rope_inputs(emu::DeviceMemory& memory, const RopeCase& rope) {
  const size_t head_values = size_t(kRows) * rope.heads * rope.head_dim;
  const RopeInputs in{memory.alloc<bf16>(3 * head_values), random_angles(memory, rope.head_dim),
                      memory.alloc<int64_t>(kRows), memory.alloc<bf16>(head_values)};
  for (size_t i = 0; i < 3 * head_values; ++i) in.qkv[i] = to_bf16(uniform(-2, 2));
  std::fill_n(qkv_head(in, rope, 0, 2, 1), rope.head_dim, to_bf16(0));
  std::fill_n(qkv_head(in, rope, 2, 1, 0), rope.head_dim, to_bf16(0));
  std::copy(rope.write_idx.begin(), rope.write_idx.end(), in.write_idx);
  return in;
}

// The rotated query, key, or the value of (row, head), as the contract defines them.
std::vector<double> rope_reference(const RopeInputs& in, const RopeCase& rope, int row, int part, int head) {
  const bf16* x = qkv_head(in, rope, row, part, head);
  if (part == 2) return widened(x, rope.head_dim);
  const size_t angle_row = size_t(row) * rope.head_dim / 2;
  return rotated(x, in.angles.cos + angle_row, in.angles.sin + angle_row, rope.head_dim);
}

double check_q_out(Case& check, const RopeInputs& in, const RopeCase& rope) {
  double max_error = 0;
  for (int row = 0; row < kRows; ++row)
    for (int head = 0; head < rope.heads; ++head) {
      const std::vector<double> expected = rope_reference(in, rope, row, 0, head);
      const bf16* got = in.q_out + (size_t(row) * rope.heads + head) * rope.head_dim;
      for (int d = 0; d < rope.head_dim; ++d) {
        const double value = to_double(got[d]);
        max_error = std::max(max_error, std::abs(value - expected[d]));
        check.expect(within_bf16_rounding(value, expected[d]), "q row %d head %d dim %d: %g, expected %g", row,
                     head, d, value, expected[d]);
      }
    }
  return max_error;
}

// Calls visit(row, head, slot, entry) for every ring entry, `entry` counting from the ring's start.
template <class Visit>
void for_each_entry(const RopeCase& rope, Visit visit) {
  for (int row = 0; row < kRows; ++row)
    for (int head = 0; head < rope.heads; ++head)
      for (int slot = 0; slot < kRopeCapacity; ++slot)
        visit(row, head, slot, (size_t(row) * rope.heads + head) * kRopeCapacity + slot);
}

template <class T>
bool all_equal(const T* values, int count, T expected) {
  return std::all_of(values, values + count, [&](T value) { return memcmp(&value, &expected, sizeof value) == 0; });
}

// The written entries hold the rotated key and the value, the others are untouched. Returns the largest key error.
double check_bf16_ring(Case& check, const RopeInputs& in, const RopeCase& rope, const Bf16RingBuffers& ring) {
  const int head_dim = rope.head_dim;
  double k_error = 0;
  for_each_entry(rope, [&](int row, int head, int slot, size_t entry) {
    const bf16* key = ring.k + entry * head_dim;
    const bf16* value = ring.v + entry * head_dim;
    if (slot != rope.write_idx[row]) {
      check.expect(all_equal(key, head_dim, kUntouched) && all_equal(value, head_dim, kUntouched),
                   "row %d head %d slot %d written", row, head, slot);
      return;
    }
    const std::vector<double> key_expected = rope_reference(in, rope, row, 1, head);
    const std::vector<double> value_expected = rope_reference(in, rope, row, 2, head);
    for (int d = 0; d < head_dim; ++d) {
      const double key_got = to_double(key[d]), value_got = to_double(value[d]);
      k_error = std::max(k_error, std::abs(key_got - key_expected[d]));
      check.expect(within_bf16_rounding(key_got, key_expected[d]), "k row %d head %d dim %d: %g, expected %g", row,
                   head, d, key_got, key_expected[d]);
      check.expect(value_got == value_expected[d], "v row %d head %d dim %d: %g, expected %g", row, head, d,
                   value_got, value_expected[d]);
    }
  });
  return k_error;
}

Bf16RingBuffers make_untouched_bf16_ring(emu::DeviceMemory& memory, size_t entries, int head_dim) {
  const Bf16RingBuffers ring{memory.alloc<bf16>(entries * head_dim), memory.alloc<bf16>(entries * head_dim)};
  std::fill_n(ring.k, entries * head_dim, kUntouched);
  std::fill_n(ring.v, entries * head_dim, kUntouched);
  return ring;
}

void test_rope_bf16(const RopeCase& rope) {
  Case check(rope.title("rope_kv_write_bf16"));
  emu::DeviceMemory memory;
  const RopeInputs in = make_rope_inputs(memory, rope);
  const Bf16RingBuffers ring = make_untouched_bf16_ring(memory, rope.entries(), rope.head_dim);
  emu::launch("rope_kv_write_bf16", dim3(kRows * rope.heads), dim3(rope.head_dim / 2), [&] {
    rope_kv_write_bf16(in.qkv, in.angles.cos, in.angles.sin, in.q_out, ring.k, ring.v, in.write_idx, rope.heads,
                       rope.head_dim, kRopeCapacity);
  });
  const double q_error = check_q_out(check, in, rope);
  const double k_error = check_bf16_ring(check, in, rope, ring);
  check.finish(format("max |q error| %.3g, max |k error| %.3g", q_error, k_error));
}

// The contract: scale = largest |x| / 127 (1 for all zeros), codes = x / scale rounded half away from zero
// (std::round), clamped to ±127. Codes may differ by one where f32 rotation lands across a rounding
// boundary. Returns the largest code difference.
int check_int8_entry(Case& check, const std::vector<double>& expected, const int8_t* codes, float scale,
                     const char* what, int row, int head) {
  double largest = 0;
  for (double x : expected) largest = std::max(largest, std::abs(x));
  const double expected_scale = largest > 0 ? largest / 127 : 1;
  check.expect(std::abs(scale - expected_scale) <= 1e-5 * expected_scale, "%s scale row %d head %d: %g, expected %g",
               what, row, head, scale, expected_scale);
  int worst = 0;
  for (size_t d = 0; d < expected.size(); ++d) {
    const double code = std::clamp(std::round(expected[d] / expected_scale), -127.0, 127.0);
    const int difference = int(std::abs(codes[d] - code));
    worst = std::max(worst, difference);
    check.expect(difference <= 1, "%s code row %d head %d dim %zu: %d, expected %g", what, row, head, d, codes[d],
                 code);
  }
  return worst;
}

// Returns the largest code difference.
int check_int8_ring(Case& check, const RopeInputs& in, const RopeCase& rope, const Int8RingBuffers& ring) {
  const int head_dim = rope.head_dim;
  int code_difference = 0;
  for_each_entry(rope, [&](int row, int head, int slot, size_t entry) {
    const int8_t* key = ring.k + entry * head_dim;
    const int8_t* value = ring.v + entry * head_dim;
    const float k_scale = ring.k_scale[entry], v_scale = ring.v_scale[entry];
    if (slot != rope.write_idx[row]) {
      check.expect(all_equal(key, head_dim, kUntouchedCode) && all_equal(value, head_dim, kUntouchedCode) &&
                       k_scale == kUntouchedScale && v_scale == kUntouchedScale,
                   "row %d head %d slot %d written", row, head, slot);
      return;
    }
    const int key_difference =
        check_int8_entry(check, rope_reference(in, rope, row, 1, head), key, k_scale, "k", row, head);
    const int value_difference =
        check_int8_entry(check, rope_reference(in, rope, row, 2, head), value, v_scale, "v", row, head);
    code_difference = std::max({code_difference, key_difference, value_difference});
  });
  return code_difference;
}

Int8RingBuffers make_untouched_int8_ring(emu::DeviceMemory& memory, size_t entries, int head_dim) {
  const Int8RingBuffers ring{memory.alloc<int8_t>(entries * head_dim), memory.alloc<int8_t>(entries * head_dim),
                             memory.alloc<float>(entries), memory.alloc<float>(entries)};
  std::fill_n(ring.k, entries * head_dim, kUntouchedCode);
  std::fill_n(ring.v, entries * head_dim, kUntouchedCode);
  std::fill_n(ring.k_scale, entries, kUntouchedScale);
  std::fill_n(ring.v_scale, entries, kUntouchedScale);
  return ring;
}

void test_rope_int8(const RopeCase& rope) {
  Case check(rope.title("rope_kv_write_int8"));
  emu::DeviceMemory memory;
  const RopeInputs in = make_rope_inputs(memory, rope);
  const Int8RingBuffers ring = make_untouched_int8_ring(memory, rope.entries(), rope.head_dim);
  const unsigned threads = (rope.head_dim / 2 + 31) / 32 * 32;
  emu::launch("rope_kv_write_int8", dim3(kRows * rope.heads), dim3(threads), [&] {
    rope_kv_write_int8(in.qkv, in.angles.cos, in.angles.sin, in.q_out, ring.k, ring.v, ring.k_scale, ring.v_scale,
                       in.write_idx, rope.heads, rope.head_dim, kRopeCapacity);
  });
  const double q_error = check_q_out(check, in, rope);
  const int code_difference = check_int8_ring(check, in, rope, ring);
  check.finish(format("max |q error| %.3g, codes off by at most %d", q_error, code_difference));
}

// ---- ring_attention_part + ring_attention_join ----

// Pinned prefix lengths of the rows (clipped to len).
constexpr std::array<unsigned, kRows> kPrefixLengths = {3, 0, 9};

// A part kernel's (SCORE_BATCH, VALUE_BATCH) variant.
struct PartVariant {
  const char* suffix;
  decltype(&ring_attention_part_bf16) bf16;
  decltype(&ring_attention_part_int8) int8;
};
constexpr PartVariant kDefaultPart = {"", ring_attention_part_bf16, ring_attention_part_int8};
constexpr PartVariant kPartVariants[] = {
    {"_s2v2", ring_attention_part_bf16_s2v2, ring_attention_part_int8_s2v2},
    {"_s4v8", ring_attention_part_bf16_s4v8, ring_attention_part_int8_s4v8},
    {"_s8v8", ring_attention_part_bf16_s8v8, ring_attention_part_int8_s8v8},
};
// Its chunk copied into shared memory first (at most STAGED_MAX_KEYS keys a block).
constexpr PartVariant kStagedPart = {"_staged", ring_attention_part_bf16_staged, ring_attention_part_int8_staged};

struct AttentionCase {
  int heads, capacity, head_dim, len;
  bool row1_hidden;  // the mask hides every key of row 1
  // How the part kernel is launched: keys per block, threads per block, which variant.
  int keys = ATTENTION_CHUNK;
  unsigned threads = ATTENTION_THREADS;
  PartVariant part = kDefaultPart;

  std::string title(const char* kernel) const {
    const bool default_launch = keys == ATTENTION_CHUNK && threads == ATTENTION_THREADS && part.suffix[0] == 0;
    const std::string launch =
        default_launch ? "" : format(" (%s, %d keys, %u threads a block)", part.suffix, keys, threads);
    return format("%s heads=%d capacity=%d head_dim=%d len=%d%s%s", kernel, heads, capacity, head_dim, len,
                  row1_hidden ? " row 1 hidden" : "", launch.c_str());
  }
  int chunks() const { return (len + keys - 1) / keys; }
  size_t ring_values() const { return size_t(kRows) * heads * capacity * head_dim; }
  size_t part_values() const { return size_t(kRows) * heads * chunks() * (head_dim + 2); }
  // Whether ring value `i` belongs to one of the first `len` entries of its (row, head).
  bool filled(size_t i) const { return (i / head_dim) % capacity < size_t(len); }
  float scale() const { return 1.f / std::sqrt(float(head_dim)); }
};

struct AttentionInputs {
  bf16* q;     // [rows, heads, head_dim]
  float* mask;  // [rows, len]
  unsigned* prefix_len;
  Angles unturn;
  std::vector<double> keys, values;  // the ring as the kernel should read it, [rows, heads, capacity, head_dim]
};

// Keys hidden at random, row 2's past key 20 (so its later chunks are wholly hidden), row 1's all if asked;
// row 0's first key visible.
void fill_mask(float* mask, const AttentionCase& shape) {
  for (int row = 0; row < kRows; ++row)
    for (int key = 0; key < shape.len; ++key) {
      const bool hidden = uniform(0, 1) < 0.15 || (row == 2 && key > 20) || (row == 1 && shape.row1_hidden);
      mask[row * shape.len + key] = hidden ? -INFINITY : 0.f;
    }
  mask[0] = 0.f;
}

AttentionInputs make_attention_inputs(emu::DeviceMemory& memory, const AttentionCase& shape) {
  const size_t query_values = size_t(kRows) * shape.heads * shape.head_dim;
  AttentionInputs in{memory.alloc<bf16>(query_values),
                     memory.alloc<float>(size_t(kRows) * shape.len),
                     memory.alloc<unsigned>(kRows),
                     random_angles(memory, shape.head_dim),
                     std::vector<double>(shape.ring_values()),
                     std::vector<double>(shape.ring_values())};
  for (size_t i = 0; i < query_values; ++i) in.q[i] = to_bf16(uniform(-3, 3));
  fill_mask(in.mask, shape);
  for (int row = 0; row < kRows; ++row) in.prefix_len[row] = std::min(kPrefixLengths[row], unsigned(shape.len));
  return in;
}

// Random entries up to len, NaN past it: reading those would poison the output.
Bf16RingBuffers make_bf16_ring(emu::DeviceMemory& memory, const AttentionCase& shape, AttentionInputs& in) {
  const Bf16RingBuffers ring{memory.alloc<bf16>(shape.ring_values()), memory.alloc<bf16>(shape.ring_values())};
  for (size_t i = 0; i < shape.ring_values(); ++i) {
    ring.k[i] = shape.filled(i) ? to_bf16(uniform(-1, 1)) : kNanBf16;
    ring.v[i] = shape.filled(i) ? to_bf16(uniform(-1, 1)) : kNanBf16;
    in.keys[i] = to_double(ring.k[i]);
    in.values[i] = to_double(ring.v[i]);
  }
  return ring;
}

// Random codes; random scales up to len, NaN past it.
Int8RingBuffers make_int8_ring(emu::DeviceMemory& memory, const AttentionCase& shape, AttentionInputs& in) {
  const size_t entries = shape.ring_values() / shape.head_dim;
  const Int8RingBuffers ring{memory.alloc<int8_t>(shape.ring_values()), memory.alloc<int8_t>(shape.ring_values()),
                             memory.alloc<float>(entries), memory.alloc<float>(entries)};
  for (size_t entry = 0; entry < entries; ++entry) {
    const bool filled = shape.filled(entry * shape.head_dim);
    ring.k_scale[entry] = filled ? float(uniform(0.005, 0.012)) : NAN;
    ring.v_scale[entry] = filled ? float(uniform(0.005, 0.012)) : NAN;
  }
  for (size_t i = 0; i < shape.ring_values(); ++i) {
    ring.k[i] = int8_t(uniform_int(-127, 127));
    ring.v[i] = int8_t(uniform_int(-127, 127));
    in.keys[i] = ring.k[i] * double(ring.k_scale[i / shape.head_dim]);
    in.values[i] = ring.v[i] * double(ring.v_scale[i / shape.head_dim]);
  }
  return ring;
}

// softmax(q·kᵀ·scale + mask)·v over the first len entries of (row, head), the query turned back by the
// unturn angles for the row's pinned prefix; zeros when the mask hides every key.
std::vector<double> reference_attention(const AttentionCase& shape, const AttentionInputs& in, int row, int head) {
  const int head_dim = shape.head_dim;
  const size_t head_index = size_t(row) * shape.heads + head;
  const bf16* q = in.q + head_index * head_dim;
  const size_t angle_row = size_t(row) * head_dim / 2;
  const std::vector<double> query = widened(q, head_dim);
  const std::vector<double> unturned = rotated(q, in.unturn.cos + angle_row, in.unturn.sin + angle_row, head_dim);
  std::vector<double> scores(shape.len);
  for (int key = 0; key < shape.len; ++key) {
    const std::vector<double>& used = unsigned(key) < in.prefix_len[row] ? unturned : query;
    const double* k = &in.keys[(head_index * shape.capacity + key) * head_dim];
    double dot = 0;
    for (int d = 0; d < head_dim; ++d) dot += used[d] * k[d];
    scores[key] = dot * shape.scale() + in.mask[row * shape.len + key];
  }
  std::vector<double> out(head_dim, 0.0);
  const double max_score = *std::max_element(scores.begin(), scores.end());
  if (max_score == -INFINITY) return out;
  double total = 0;
  for (int key = 0; key < shape.len; ++key) {
    const double weight = std::exp(scores[key] - max_score);
    if (weight == 0) continue;
    total += weight;
    const double* v = &in.values[(head_index * shape.capacity + key) * head_dim];
    for (int d = 0; d < head_dim; ++d) out[d] += weight * v[d];
  }
  for (double& x : out) x /= total;
  return out;
}

float* make_part(emu::DeviceMemory& memory, const AttentionCase& shape) {
  float* part = memory.alloc<float>(shape.part_values());
  std::fill_n(part, shape.part_values(), NAN);
  return part;
}

bf16* run_join(emu::DeviceMemory& memory, const AttentionCase& shape, const float* part) {
  const size_t out_values = size_t(kRows) * shape.heads * shape.head_dim;
  bf16* out = memory.alloc<bf16>(out_values);
  std::fill_n(out, out_values, kUntouched);
  const unsigned threads = (shape.head_dim + 31) / 32 * 32;
  emu::launch("ring_attention_join", dim3(kRows * shape.heads), dim3(threads),
              [&] { ring_attention_join(part, out, shape.head_dim, shape.chunks()); });
  return out;
}

// Every part value written (when there is a part buffer); each head's output within 1% of its largest magnitude (bf16 rounding, f32
// softmax and sums), exactly zero where the mask hides every key.
void check_attention(Case& check, const AttentionCase& shape, const AttentionInputs& in, const float* part,
                     const bf16* out) {
  if (part) {
    const long unwritten = std::count_if(part, part + shape.part_values(), [](float x) { return std::isnan(x); });
    check.expect(unwritten == 0, "%ld part values unwritten or NaN", unwritten);
  }
  double max_error = 0, max_relative = 0;
  for (int row = 0; row < kRows; ++row)
    for (int head = 0; head < shape.heads; ++head) {
      const std::vector<double> expected = reference_attention(shape, in, row, head);
      double magnitude = 0;
      for (double x : expected) magnitude = std::max(magnitude, std::abs(x));
      const bf16* got = out + (size_t(row) * shape.heads + head) * shape.head_dim;
      for (int d = 0; d < shape.head_dim; ++d) {
        const double value = to_double(got[d]), error = std::abs(value - expected[d]);
        max_error = std::max(max_error, error);
        if (magnitude > 0) max_relative = std::max(max_relative, error / magnitude);
        check.expect(magnitude > 0 ? error <= 1e-2 * magnitude : value == 0, "row %d head %d dim %d: %g, expected %g",
                     row, head, d, value, expected[d]);
      }
    }
  check.finish(format("max |error| %.3g (%.3g of the head's largest output)", max_error, max_relative));
}

void test_attention_bf16(const AttentionCase& shape) {
  Case check(shape.title("ring_attention_part_bf16 + join"));
  emu::DeviceMemory memory;
  AttentionInputs in = make_attention_inputs(memory, shape);
  const Bf16RingBuffers ring = make_bf16_ring(memory, shape, in);
  float* part = make_part(memory, shape);
  emu::launch("ring_attention_part_bf16", dim3(kRows * shape.heads, shape.chunks()), dim3(shape.threads), [&] {
    shape.part.bf16(in.q, ring.k, ring.v, in.mask, in.prefix_len, in.unturn.cos, in.unturn.sin, part, nullptr,
                    shape.heads, shape.head_dim, shape.capacity, shape.len, shape.scale(), shape.keys);
  });
  check_attention(check, shape, in, part, run_join(memory, shape, part));
}

void test_attention_int8(const AttentionCase& shape) {
  Case check(shape.title("ring_attention_part_int8 + join"));
  emu::DeviceMemory memory;
  AttentionInputs in = make_attention_inputs(memory, shape);
  const Int8RingBuffers ring = make_int8_ring(memory, shape, in);
  float* part = make_part(memory, shape);
  emu::launch("ring_attention_part_int8", dim3(kRows * shape.heads, shape.chunks()), dim3(shape.threads), [&] {
    shape.part.int8(in.q, ring.k, ring.v, ring.k_scale, ring.v_scale, in.mask, in.prefix_len, in.unturn.cos,
                    in.unturn.sin, part, nullptr, shape.heads, shape.head_dim, shape.capacity, shape.len,
                    shape.scale(), shape.keys);
  });
  check_attention(check, shape, in, part, run_join(memory, shape, part));
}

// ---- the part kernels with the join inside (`_joined`) ----

bf16* make_out(emu::DeviceMemory& memory, const AttentionCase& shape) {
  const size_t out_values = size_t(kRows) * shape.heads * shape.head_dim;
  bf16* out = memory.alloc<bf16>(out_values);
  std::fill_n(out, out_values, kUntouched);
  return out;
}


struct JoinedVariant {
  const char* suffix;
  decltype(&ring_attention_part_bf16_joined) bf16;
  decltype(&ring_attention_part_int8_joined) int8;
};
constexpr JoinedVariant kJoinedParts[] = {
    {"_joined", ring_attention_part_bf16_joined, ring_attention_part_int8_joined},
    {"_staged_joined", ring_attention_part_bf16_staged_joined, ring_attention_part_int8_staged_joined},
};

// Three launches in a row on one arrivals buffer, each against the reference: the last block of a head must
// leave its count at zero for the next launch (else no block of the next one joins, and out stays untouched).
// The first launch runs in two parts: every chunk but each head's last, after which nothing may have joined
// yet (out untouched, each head's count one short), then the last chunks. With one chunk the buffer is null,
// as the host passes it.
void test_joined(const AttentionCase& shape, const JoinedVariant& variant, bool int8) {
  emu::DeviceMemory memory;
  AttentionInputs in = make_attention_inputs(memory, shape);
  const Bf16RingBuffers bf16_ring = int8 ? Bf16RingBuffers{} : make_bf16_ring(memory, shape, in);
  const Int8RingBuffers int8_ring = int8 ? make_int8_ring(memory, shape, in) : Int8RingBuffers{};
  const size_t heads_total = size_t(kRows) * shape.heads;
  const unsigned chunks = shape.chunks();
  unsigned* arrivals = chunks == 1 ? nullptr : memory.alloc<unsigned>(heads_total);
  if (arrivals) std::fill_n(arrivals, heads_total, 0u);
  const auto counted = [&](unsigned count) {
    return arrivals ? std::count(arrivals, arrivals + heads_total, count) : long(heads_total);
  };
  const std::string kernel = format("ring_attention_part_%s%s", int8 ? "int8" : "bf16", variant.suffix);
  for (int launch = 1; launch <= 3; ++launch) {
    Case check(shape.title(format("%s, launch %d", kernel.c_str(), launch).c_str()));
    float* part = chunks == 1 ? nullptr : make_part(memory, shape);
    bf16* out = make_out(memory, shape);
    const auto run = [&](const std::function<bool(uint3)>& runs) {
      emu::launch(kernel.c_str(), dim3(heads_total, chunks), dim3(shape.threads), [&] {
        if (int8) {
          variant.int8(in.q, int8_ring.k, int8_ring.v, int8_ring.k_scale, int8_ring.v_scale, in.mask, in.prefix_len,
                       in.unturn.cos, in.unturn.sin, part, out, shape.heads, shape.head_dim, shape.capacity,
                       shape.len, shape.scale(), shape.keys, arrivals);
        } else {
          variant.bf16(in.q, bf16_ring.k, bf16_ring.v, in.mask, in.prefix_len, in.unturn.cos, in.unturn.sin, part,
                       out, shape.heads, shape.head_dim, shape.capacity, shape.len, shape.scale(), shape.keys,
                       arrivals);
        }
      }, runs);
    };
    if (launch == 1 && chunks > 1) {
      run([&](uint3 block) { return block.y != chunks - 1; });
      const size_t outputs = heads_total * shape.head_dim;
      check.expect(all_equal(out, outputs, kUntouched), "outputs written before the last chunks ran");
      check.expect(counted(chunks - 1) == long(heads_total), "%ld heads' counts not one short halfway",
                   long(heads_total) - counted(chunks - 1));
      run([&](uint3 block) { return block.y == chunks - 1; });
    } else {
      run(nullptr);
    }
    check.expect(counted(0) == long(heads_total), "%ld heads' arrival counts left non-zero",
                 long(heads_total) - counted(0));
    check_attention(check, shape, in, part, out);
  }
}

// ---- a young session's ring: wholly hidden chunks load nothing ----

// Each row's history in a whole-ring step (row 1's ends inside a chunk).
constexpr std::array<int, kRows> kHistory = {40, 100, 10};

// 2 heads of 128 over a 256-entry ring, all of it attended, 64 keys a block: a chunk's keys and values are
// whole pages (bf16 and int8), so they can be made to fault.
AttentionCase young_ring() {
  AttentionCase shape{2, 256, 128, 256, false};
  shape.keys = 64;
  return shape;
}

// Keys past a row's history hidden, and some before it (never its first); row 2 also sees the last 8 keys of
// its second chunk alone (a chunk visible only at its end must still be attended).
void hide_past_history(float* mask, const AttentionCase& shape) {
  for (int row = 0; row < kRows; ++row)
    for (int key = 0; key < shape.len; ++key) {
      const bool tail = row == 2 && key >= 2 * shape.keys - 8 && key < 2 * shape.keys;
      const bool visible = (key < kHistory[row] && (key == 0 || uniform(0, 1) >= 0.15)) || tail;
      mask[row * shape.len + key] = visible ? 0.f : -INFINITY;
    }
}

// The pages of every chunk the mask wholly hides, keys and values, made to fault.
template <class T>
void forbid_hidden_chunks(emu::DeviceMemory& memory, const AttentionCase& shape, const float* mask, const T* k,
                          const T* v) {
  const size_t chunk_bytes = size_t(shape.keys) * shape.head_dim * sizeof(T);
  for (int row = 0; row < kRows; ++row)
    for (int chunk = 0; chunk < shape.chunks(); ++chunk) {
      const float* keys = mask + row * shape.len + chunk * shape.keys;
      if (std::any_of(keys, keys + shape.keys, [](float m) { return m != -INFINITY; })) continue;
      for (int head = 0; head < shape.heads; ++head) {
        const size_t at = ((size_t(row) * shape.heads + head) * shape.capacity + chunk * shape.keys) * shape.head_dim;
        memory.forbid(k + at, chunk_bytes);
        memory.forbid(v + at, chunk_bytes);
      }
    }
}

// The part kernels (and the joined one) over a young ring whose wholly hidden chunks fault when read: the
// result matches the reference, and no such chunk was touched (a touch ends the program with a bad access).
// The staged kernels copy their chunk before they look at the mask, so they are not run here.
void test_young_ring(const char* suffix, const std::function<void(AttentionInputs&, const void* ring, float* part,
                                                                   bf16* out, unsigned* arrivals)>& launch,
                     bool int8, bool joined) {
  const AttentionCase shape = young_ring();
  Case check(shape.title(format("ring_attention_part_%s%s, hidden chunks unread", int8 ? "int8" : "bf16",
                                suffix).c_str()));
  emu::DeviceMemory memory;
  AttentionInputs in = make_attention_inputs(memory, shape);
  hide_past_history(in.mask, shape);
  const Bf16RingBuffers bf16_ring = int8 ? Bf16RingBuffers{} : make_bf16_ring(memory, shape, in);
  const Int8RingBuffers int8_ring = int8 ? make_int8_ring(memory, shape, in) : Int8RingBuffers{};
  if (int8) {
    forbid_hidden_chunks(memory, shape, in.mask, int8_ring.k, int8_ring.v);
  } else {
    forbid_hidden_chunks(memory, shape, in.mask, bf16_ring.k, bf16_ring.v);
  }
  float* part = make_part(memory, shape);
  unsigned* arrivals = memory.alloc<unsigned>(size_t(kRows) * shape.heads);
  std::fill_n(arrivals, size_t(kRows) * shape.heads, 0u);
  bf16* out = joined ? make_out(memory, shape) : nullptr;
  launch(in, int8 ? static_cast<const void*>(&int8_ring) : &bf16_ring, part, out, arrivals);
  check_attention(check, shape, in, part, joined ? out : run_join(memory, shape, part));
}

void test_young_rings() {
  const AttentionCase shape = young_ring();
  const dim3 grid(kRows * shape.heads, shape.chunks());
  for (const PartVariant& variant : {kDefaultPart, kPartVariants[0], kPartVariants[1], kPartVariants[2]})
    for (bool int8 : {false, true})
      test_young_ring(variant.suffix, [&](AttentionInputs& in, const void* ring, float* part, bf16*, unsigned*) {
        emu::launch("ring_attention_part", grid, dim3(shape.threads), [&] {
          if (int8) {
            const auto& r = *static_cast<const Int8RingBuffers*>(ring);
            variant.int8(in.q, r.k, r.v, r.k_scale, r.v_scale, in.mask, in.prefix_len, in.unturn.cos, in.unturn.sin,
                         part, nullptr, shape.heads, shape.head_dim, shape.capacity, shape.len, shape.scale(),
                         shape.keys);
          } else {
            const auto& r = *static_cast<const Bf16RingBuffers*>(ring);
            variant.bf16(in.q, r.k, r.v, in.mask, in.prefix_len, in.unturn.cos, in.unturn.sin, part, nullptr,
                         shape.heads, shape.head_dim, shape.capacity, shape.len, shape.scale(), shape.keys);
          }
        });
      }, int8, false);
  const JoinedVariant& joined = kJoinedParts[0];
  for (bool int8 : {false, true})
    test_young_ring(joined.suffix, [&](AttentionInputs& in, const void* ring, float* part, bf16* out,
                                       unsigned* arrivals) {
      emu::launch("ring_attention_part_joined", grid, dim3(shape.threads), [&] {
        if (int8) {
          const auto& r = *static_cast<const Int8RingBuffers*>(ring);
          joined.int8(in.q, r.k, r.v, r.k_scale, r.v_scale, in.mask, in.prefix_len, in.unturn.cos, in.unturn.sin,
                      part, out, shape.heads, shape.head_dim, shape.capacity, shape.len, shape.scale(), shape.keys,
                      arrivals);
        } else {
          const auto& r = *static_cast<const Bf16RingBuffers*>(ring);
          joined.bf16(in.q, r.k, r.v, in.mask, in.prefix_len, in.unturn.cos, in.unturn.sin, part, out,
                      shape.heads, shape.head_dim, shape.capacity, shape.len, shape.scale(), shape.keys, arrivals);
        }
      });
    }, int8, true);
}

// ---- one chunk: the part kernel's own result, and ring_write_attend ----

// A single chunk's part kernel given `out` normalises its result itself (no part buffer, no join).
void test_one_chunk_part(const AttentionCase& shape, bool int8) {
  Case check(shape.title(int8 ? "ring_attention_part_int8, one chunk" : "ring_attention_part_bf16, one chunk"));
  emu::DeviceMemory memory;
  AttentionInputs in = make_attention_inputs(memory, shape);
  bf16* out = make_out(memory, shape);
  if (int8) {
    const Int8RingBuffers ring = make_int8_ring(memory, shape, in);
    emu::launch("ring_attention_part_int8", dim3(kRows * shape.heads), dim3(shape.threads), [&] {
      shape.part.int8(in.q, ring.k, ring.v, ring.k_scale, ring.v_scale, in.mask, in.prefix_len, in.unturn.cos,
                      in.unturn.sin, nullptr, out, shape.heads, shape.head_dim, shape.capacity, shape.len,
                      shape.scale(), shape.keys);
    });
  } else {
    const Bf16RingBuffers ring = make_bf16_ring(memory, shape, in);
    emu::launch("ring_attention_part_bf16", dim3(kRows * shape.heads), dim3(shape.threads), [&] {
      shape.part.bf16(in.q, ring.k, ring.v, in.mask, in.prefix_len, in.unturn.cos, in.unturn.sin, nullptr, out,
                      shape.heads, shape.head_dim, shape.capacity, shape.len, shape.scale(), shape.keys);
    });
  }
  check_attention(check, shape, in, nullptr, out);
}

// Rows 0 and 1 write their new token inside the attended entries (the last one, the first one); row 2 writes
// nothing.
std::array<int64_t, kRows> attended_write_idx(const AttentionCase& shape) { return {shape.len - 1, 0, -1}; }

// What ring_write_attend should leave in the reference ring for (row, head): the rotated key (rounded to
// bf16, or to int8 codes at the entry's scale) and the value at the row's write index.
void write_reference_entry(const AttentionCase& shape, AttentionInputs& in, const RopeInputs& token,
                           const RopeCase& rope, int row, int head, bool int8) {
  const int64_t at = token.write_idx[row];
  if (at < 0) return;
  const size_t first = ((size_t(row) * shape.heads + head) * shape.capacity + at) * shape.head_dim;
  for (int part = 1; part <= 2; ++part) {
    const std::vector<double> x = rope_reference(token, rope, row, part, head);
    double amax = 0;
    for (double value : x) amax = std::max(amax, std::abs(value));
    const double scale = amax > 0 ? amax / 127 : 1;
    std::vector<double>& ring = part == 1 ? in.keys : in.values;
    for (int d = 0; d < shape.head_dim; ++d)
      ring[first + d] = int8 ? std::round(x[d] / scale) * scale : to_double(to_bf16(x[d]));
  }
}

void test_write_attend(const AttentionCase& shape, bool int8) {
  Case check(shape.title(int8 ? "ring_write_attend_int8" : "ring_write_attend_bf16"));
  emu::DeviceMemory memory;
  AttentionInputs in = make_attention_inputs(memory, shape);
  const RopeCase rope{shape.heads, shape.head_dim, attended_write_idx(shape)};
  const RopeInputs token = make_rope_inputs(memory, rope);
  bf16* out = make_out(memory, shape);
  const Bf16RingBuffers bf16_ring = int8 ? Bf16RingBuffers{} : make_bf16_ring(memory, shape, in);
  const Int8RingBuffers int8_ring = int8 ? make_int8_ring(memory, shape, in) : Int8RingBuffers{};
  const char* name = int8 ? "ring_write_attend_int8" : "ring_write_attend_bf16";
  emu::launch(name, dim3(kRows * shape.heads), dim3(ATTENTION_THREADS), [&] {
    if (int8) {
      ring_write_attend_int8(token.qkv, token.angles.cos, token.angles.sin, int8_ring.k, int8_ring.v,
                             int8_ring.k_scale, int8_ring.v_scale, token.write_idx, in.mask, in.prefix_len,
                             in.unturn.cos, in.unturn.sin, out, shape.heads, shape.head_dim, shape.capacity, shape.len,
                             shape.scale());
    } else {
      ring_write_attend_bf16(token.qkv, token.angles.cos, token.angles.sin, bf16_ring.k, bf16_ring.v,
                             token.write_idx, in.mask, in.prefix_len, in.unturn.cos, in.unturn.sin, out, shape.heads,
                             shape.head_dim, shape.capacity, shape.len, shape.scale());
    }
  });
  // The reference: the token's rotated query (rounded to bf16, as the kernel hands it on) attends over the
  // ring with the token's entry written.
  for (int row = 0; row < kRows; ++row)
    for (int head = 0; head < shape.heads; ++head) {
      write_reference_entry(shape, in, token, rope, row, head, int8);
      const std::vector<double> query = rope_reference(token, rope, row, 0, head);
      bf16* q = in.q + (size_t(row) * shape.heads + head) * shape.head_dim;
      for (int d = 0; d < shape.head_dim; ++d) q[d] = to_bf16(query[d]);
    }
  check_attention(check, shape, in, nullptr, out);
}

}  // namespace

// ---- rope_ring_write_f32 (Mimi) ----

// Rows 0..rows-1 of a batch of rows + 1 slots; entries per (row, time) from `entries` (-1 and capacity: not
// written).
void test_rope_ring_write(int rows, int heads, int time, int head_dim, int capacity, std::vector<int64_t> entries) {
  Case check(format("rope_ring_write_f32 rows=%d heads=%d time=%d head_dim=%d capacity=%d", rows, heads, time,
                    head_dim, capacity));
  emu::DeviceMemory memory;
  const int half = head_dim / 2, batch = rows + 1;
  const size_t qkv_count = size_t(rows) * time * 3 * heads * head_dim;
  const size_t ring_count = size_t(batch) * heads * capacity * head_dim;
  float* qkv = memory.alloc<float>(qkv_count);
  float* cos = memory.alloc<float>(size_t(rows) * time * half);
  float* sin = memory.alloc<float>(size_t(rows) * time * half);
  int64_t* index = memory.alloc<int64_t>(size_t(rows) * heads * time * head_dim);
  float* ring_k = memory.alloc<float>(ring_count);
  float* ring_v = memory.alloc<float>(ring_count);
  float* q_out = memory.alloc<float>(size_t(rows) * heads * time * head_dim);
  for (size_t i = 0; i < qkv_count; ++i) qkv[i] = float(uniform(-2, 2));
  for (int i = 0; i < rows * time * half; ++i) {
    const double angle = uniform(-10, 10);
    cos[i] = float(std::cos(angle));
    sin[i] = float(std::sin(angle));
  }
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < heads; ++h)
      for (int t = 0; t < time; ++t)
        for (int d = 0; d < head_dim; ++d)
          index[((size_t(r) * heads + h) * time + t) * head_dim + d] = entries[size_t(r) * time + t];
  std::vector<float> old_k(ring_count), old_v(ring_count);
  for (size_t i = 0; i < ring_count; ++i) {
    ring_k[i] = old_k[i] = float(uniform(-1, 1));
    ring_v[i] = old_v[i] = float(uniform(-1, 1));
  }
  emu::launch("rope_ring_write_f32", dim3(rows * time * heads), dim3(half), [&] {
    rope_ring_write_f32(qkv, cos, sin, index, ring_k, ring_v, q_out, heads, time, head_dim, capacity);
  });
  std::vector<float> want_k = old_k, want_v = old_v;
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < time; ++t)
      for (int h = 0; h < heads; ++h)
        for (int p = 0; p < half; ++p) {
          const size_t step = size_t(r) * time + t, token = step * 3 * heads * head_dim;
          const double c = cos[step * half + p], s = sin[step * half + p];
          auto turned = [&](int part, int which) {
            const float* x = qkv + token + (size_t(part) * heads + h) * head_dim;
            return which == 0 ? x[2 * p] * c - x[2 * p + 1] * s : x[2 * p] * s + x[2 * p + 1] * c;
          };
          for (int which = 0; which < 2; ++which) {
            const double expected = turned(0, which);
            const float got = q_out[((size_t(r) * heads + h) * time + t) * head_dim + 2 * p + which];
            check.expect(std::abs(got - expected) <= 1e-5 * (1 + std::abs(expected)),
                         "query row %d head %d time %d column %d: %g, expected %g", r, h, t, 2 * p + which, got,
                         expected);
          }
          const int64_t entry = entries[step];
          if (entry < 0 || entry >= capacity) continue;
          const size_t at = ((size_t(r) * heads + h) * capacity + entry) * head_dim + 2 * p;
          for (int which = 0; which < 2; ++which) {
            want_k[at + which] = float(turned(1, which));
            want_v[at + which] = qkv[token + (size_t(2) * heads + h) * head_dim + 2 * p + which];
          }
        }
  for (size_t i = 0; i < ring_count; ++i) {
    check.expect(std::abs(ring_k[i] - want_k[i]) <= 1e-5 * (1 + std::abs(want_k[i])), "key value %zu: %g, expected %g",
                 i, ring_k[i], want_k[i]);
    check.expect(ring_v[i] == want_v[i], "value %zu: %g, expected %g", i, ring_v[i], want_v[i]);
  }
  check.finish("rings and queries");
}

// ---- masked_attention_f32 (Mimi) ----

struct MaskedCase {
  int rows, heads, time, len, head_dim;
  unsigned threads;
  int capacity = 0;  // the rings' entries per head; 0: len
};

// Row 0 sees a causal window over the ring's last `time` entries, row 1 everything, row 2 (if any) only its
// first key; a mask of -inf elsewhere.
float masked_cell(int row, int query, int key, int time, int len) {
  if (row == 1) return 0.f;
  if (row == 2) return key == 0 ? 0.f : -INFINITY;
  const int newest = len - time + query;
  return key <= newest && newest - key < 100 ? 0.f : -INFINITY;
}

void test_masked_attention(const MaskedCase& c) {
  const int capacity = c.capacity ? c.capacity : c.len;
  Case check(format("masked_attention_f32 rows=%d heads=%d time=%d len=%d capacity=%d head_dim=%d threads=%u", c.rows,
                    c.heads, c.time, c.len, capacity, c.head_dim, c.threads));
  emu::DeviceMemory memory;
  const size_t heads = size_t(c.rows) * c.heads, q_count = heads * c.time * c.head_dim;
  // The rings end where the last head's len-th entry does: a read past it faults.
  const size_t kv_count = ((heads - 1) * capacity + c.len) * c.head_dim;
  float* q = memory.alloc<float>(q_count);
  float* k = memory.alloc<float>(kv_count);
  float* v = memory.alloc<float>(kv_count);
  float* mask = memory.alloc<float>(size_t(c.rows) * c.time * c.len);
  float* out = memory.alloc<float>(q_count);
  for (size_t i = 0; i < q_count; ++i) q[i] = float(uniform(-1, 1));
  for (size_t i = 0; i < kv_count; ++i) {
    k[i] = float(uniform(-1, 1));
    v[i] = float(uniform(-2, 2));
  }
  for (int r = 0; r < c.rows; ++r)
    for (int t = 0; t < c.time; ++t)
      for (int j = 0; j < c.len; ++j) mask[(size_t(r) * c.time + t) * c.len + j] = masked_cell(r, t, j, c.time, c.len);
  std::fill_n(out, q_count, -1234.5f);
  const float scale = 1.f / std::sqrt(float(c.head_dim));
  emu::launch("masked_attention_f32", dim3(unsigned(heads) * c.time), dim3(c.threads), [&] {
    masked_attention_f32(q, k, v, mask, out, c.heads, c.time, c.len, capacity, c.head_dim, scale);
  });
  double max_error = 0;
  for (int r = 0; r < c.rows; ++r)
    for (int h = 0; h < c.heads; ++h)
      for (int t = 0; t < c.time; ++t) {
        const size_t head = size_t(r) * c.heads + h;
        std::vector<double> weights(c.len);
        double largest = -INFINITY, total = 0;
        for (int j = 0; j < c.len; ++j) {
          double dot = 0;
          for (int d = 0; d < c.head_dim; ++d)
            dot += double(q[(head * c.time + t) * c.head_dim + d]) * k[(head * capacity + j) * c.head_dim + d];
          weights[j] = dot * scale + mask[(size_t(r) * c.time + t) * c.len + j];
          largest = std::max(largest, weights[j]);
        }
        for (double& w : weights) total += w = std::exp(w - largest);
        for (int d = 0; d < c.head_dim; ++d) {
          double expected = 0;
          for (int j = 0; j < c.len; ++j) expected += weights[j] * v[(head * capacity + j) * c.head_dim + d] / total;
          const float got = out[((size_t(r) * c.time + t) * c.heads + h) * c.head_dim + d];
          const double error = std::abs(got - expected);
          max_error = std::max(max_error, error);
          check.expect(error <= 2e-5 * (1 + std::abs(expected)), "row %d head %d query %d column %d: %g, expected %g",
                       r, h, t, d, got, expected);
        }
      }
  check.finish(format("max error %.3g", max_error));
}

int main() {
  // Write indices inside the ring, negative (leave it alone) and at or past its capacity.
  const std::array<int64_t, kRows> write_sets[] = {{5, -1, 15}, {16, 0, -2}};
  for (int heads : {2, 4})
    for (int head_dim : {16, 128})
      for (const auto& write_idx : write_sets) {
        test_rope_bf16({heads, head_dim, write_idx});
        test_rope_int8({heads, head_dim, write_idx});
      }
  for (int head_dim : {24, 64}) {
    test_rope_bf16({2, head_dim, write_sets[0]});
    test_rope_int8({2, head_dim, write_sets[0]});
  }
  // One chunk; many chunks with a short team (head_dim 16, 8); a full ring; 128-dim heads; a head_dim of
  // 3 octets (a team with an idle member); len just past a chunk boundary.
  const AttentionCase shapes[] = {{4, 40, 128, 33, false}, {2, 700, 16, 650, false}, {2, 384, 64, 384, false},
                                  {4, 300, 128, 290, false}, {2, 200, 24, 129, false}, {2, 260, 8, 257, false},
                                  {2, 300, 64, 290, true}};
  for (const AttentionCase& shape : shapes) {
    test_attention_bf16(shape);
    test_attention_int8(shape);
  }
  // The other launches the host may choose: each variant, smaller and larger blocks of keys, more threads.
  for (const PartVariant& part : kPartVariants)
    for (const auto& [keys, threads] : {std::pair{ATTENTION_CHUNK, unsigned(ATTENTION_THREADS)}, std::pair{64, 256u},
                                        std::pair{MAX_KEYS_PER_BLOCK, 128u}, std::pair{MAX_KEYS_PER_BLOCK, 256u}})
      for (AttentionCase shape : {AttentionCase{4, 300, 128, 290, false}, AttentionCase{2, 300, 64, 290, true},
                                  AttentionCase{2, 200, 24, 129, false}}) {
        shape.keys = keys;
        shape.threads = threads;
        shape.part = part;
        test_attention_bf16(shape);
        test_attention_int8(shape);
      }
  // The staged variant at its most keys a block and fewer (partial chunks, granules of 16, 8 and 4 bytes:
  // int8 heads of 24 and 8 dimensions), with 32 to 256 threads; the temporal model's heads of 128 over 290
  // entries, a row wholly hidden (its blocks return early, after waiting for their copies).
  for (const auto& [keys, threads] : {std::pair{STAGED_MAX_KEYS, 128u}, std::pair{40, 256u}, std::pair{8, 32u}})
    for (AttentionCase shape : {AttentionCase{4, 300, 128, 290, false}, AttentionCase{2, 300, 64, 290, true},
                                AttentionCase{2, 200, 24, 129, false}, AttentionCase{2, 260, 8, 257, false}}) {
      shape.keys = keys;
      shape.threads = threads;
      shape.part = kStagedPart;
      test_attention_bf16(shape);
      test_attention_int8(shape);
    }
  // The join inside the part kernel, default and staged: many chunks (a row wholly hidden, a head of 24 with a
  // one-key last chunk), fewer threads than a head's dimensions, and one chunk (no join at all).
  for (const JoinedVariant& variant : kJoinedParts)
    for (const auto& [keys, threads] : {std::pair{STAGED_MAX_KEYS, 128u}, std::pair{8, 32u}})
      for (AttentionCase shape : {AttentionCase{4, 300, 128, 290, false}, AttentionCase{2, 300, 64, 290, true},
                                  AttentionCase{2, 200, 24, 129, false}, AttentionCase{2, 40, 16, 33, true}}) {
        shape.keys = keys;
        shape.threads = threads;
        for (bool int8 : {false, true}) test_joined(shape, variant, int8);
      }
  test_young_rings();
  // One chunk: the depformer's few entries (16 heads of 64, 8 entries), a whole chunk, a pinned prefix; the
  // staged variant with a whole chunk and a partial one, normalising its own result.
  const AttentionCase one_chunk[] = {{16, 16, 64, 8, false}, {4, 128, 128, 128, false}, {2, 40, 16, 33, true}};
  for (const AttentionCase& shape : one_chunk)
    for (bool int8 : {false, true}) {
      test_one_chunk_part(shape, int8);
      test_write_attend(shape, int8);
    }
  for (AttentionCase shape : {AttentionCase{4, 64, 128, 64, false}, AttentionCase{2, 40, 24, 33, true}}) {
    shape.keys = STAGED_MAX_KEYS;
    shape.part = kStagedPart;
    for (bool int8 : {false, true}) test_one_chunk_part(shape, int8);
  }
  // Mimi's 8 heads of 64 over its 250-entry ring, 2 queries a step, at the host's 128 threads; a single key;
  // head widths below and past a warp, more keys than threads, one warp, the most keys and the widest heads.
  const MaskedCase masked[] = {{2, 8, 2, 250, 64, 128}, {1, 1, 1, 1, 8, 32},  {3, 2, 3, 40, 24, 128},
                               {3, 2, 2, 300, 80, 64},  {2, 2, 2, 90, 64, 32}, {2, 1, 1, 1024, 256, 256},
                               // Rings read in place: Mimi's 250 entries filled to 37 and to 249; 5 of 1000.
                               {2, 8, 2, 37, 64, 128, 250}, {3, 2, 1, 249, 24, 64, 250}, {1, 4, 2, 5, 32, 32, 1000}};
  for (const MaskedCase& c : masked) test_masked_attention(c);
  // Mimi's 8 heads of 64, 2 steps a frame, 2 rows over a 250-entry ring (the second row wrapping round); an
  // entry past the ring and a negative one (nothing written); one head of 2 columns.
  test_rope_ring_write(2, 8, 2, 64, 250, {10, 11, 249, 0});
  test_rope_ring_write(3, 2, 1, 16, 5, {4, -1, 5});
  test_rope_ring_write(1, 1, 3, 2, 3, {0, 1, 2});
  return summarise("attention");
}
