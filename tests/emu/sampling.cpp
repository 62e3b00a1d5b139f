// Checks kernels/sampling.cu's topk_sample_f32 (temperature + top-k, one block per row) on the CPU emulator
// against a reference written from its documented contract, following src/model/sampling.rs's
// `topk_reference` step for step in f32 (so both draw the same token), with common.cuh's counter-based
// uniform01 written afresh. The kernel takes no forced tokens: forcing happens before it. Build and run:
// tests/emu/README.md.
#include "check.h"

#include "sampling.cu"

namespace {

// The host's block for a row of `vocab` logits (`cuda::sampling_threads`): an eighth of the row rounded up
// to a power of two, 128 to 1024.
unsigned host_threads(int vocab) {
  unsigned threads = 128;
  while (threads < 1024 && threads < unsigned(vocab) / 8) threads *= 2;
  return threads;
}
constexpr uint32_t kUntouchedToken = 0xDEADBEEF;

// ---- The reference ----

// splitmix64 of (seed, counter, index), its top 24 bits as a float in [0, 1).
float reference_uniform01(uint64_t seed, uint64_t counter, uint64_t index) {
  uint64_t z = seed ^ (counter * 0x9E3779B97F4A7C15ull) ^ (index * 0xD1B54A32D192ED03ull);
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return float(z >> 40) * (1.0f / 16777216.0f);
}

// NaN ranks as -inf, +inf as the largest finite value.
float reference_ranked(float logit) { return std::isnan(logit) ? -INFINITY : std::min(logit, FLT_MAX); }

// The index of the largest ranked value, the first one on ties; 0 when none is above -inf.
int reference_argmax(const float* values, int count) {
  int best = 0;
  float best_value = -INFINITY;
  for (int i = 0; i < count; ++i)
    if (reference_ranked(values[i]) > best_value) best = i, best_value = reference_ranked(values[i]);
  return best;
}

// Row r's own parameters, as the host passes them.
struct RowSetting {
  int64_t top_k;
  float temperature;
  uint64_t seed, counter;
};

bool is_greedy(const RowSetting& setting) { return !(setting.temperature > 0) || setting.top_k <= 1; }

// The k-th largest ranked logit above -inf (ties counted), or the smallest of them when k passes their number:
// the logits at or above it are the ones drawn from.
float reference_threshold(const float* logits, int vocab, int64_t k) {
  std::vector<float> kept;
  for (int i = 0; i < vocab; ++i)
    if (reference_ranked(logits[i]) > -INFINITY) kept.push_back(reference_ranked(logits[i]));
  const size_t rank = size_t(std::min<int64_t>(k, int64_t(kept.size()))) - 1;
  std::nth_element(kept.begin(), kept.begin() + rank, kept.end(), std::greater<float>());
  return kept[rank];
}

// Greedy (also when no logit is above -inf), or among the ranked logits at or above the threshold the first
// maximiser of exp((l - max) / t) / E, E = -ln(1 - uniform01(seed, counter, index)).
int reference_draw(const float* logits, int vocab, const RowSetting& setting) {
  const int best = reference_argmax(logits, vocab);
  const float max_logit = reference_ranked(logits[best]), t = setting.temperature;
  if (is_greedy(setting) || max_logit == -INFINITY) return best;
  const float low = reference_threshold(logits, vocab, setting.top_k);
  float chosen_score = -1.f;
  int chosen = vocab;
  for (int i = 0; i < vocab; ++i) {
    const float v = reference_ranked(logits[i]);
    if (!(v >= low)) continue;
    const float p = expf((v - max_logit) / t);
    const float e = -logf(fmaxf(1.f - reference_uniform01(setting.seed, setting.counter, uint64_t(i)), 1e-30f));
    const float score = p / fmaxf(e, 1e-30f);
    if (score > chosen_score) chosen_score = score, chosen = i;
  }
  return chosen;
}

// The k-th largest ranked logit above -inf (ties counted), or -infinity when k passes their number: a sampled
// token's logit reaches it, whatever the select did.
float kth_largest(const float* logits, int vocab, int64_t k) {
  std::vector<float> sorted;
  for (int i = 0; i < vocab; ++i)
    if (reference_ranked(logits[i]) > -INFINITY) sorted.push_back(reference_ranked(logits[i]));
  if (k > int64_t(sorted.size())) return -INFINITY;
  std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<float>());
  return sorted[k - 1];
}

// ---- Launch and check ----

// Rows of logits and their settings, on the device.
struct Batch {
  int vocab;
  std::vector<RowSetting> settings;
  float* logits;  // [rows, vocab]
  uint64_t* seeds;
  uint64_t* counters;
  int64_t* top_k;
  float* temperatures;

  int rows() const { return int(settings.size()); }
  const float* row(int r) const { return logits + size_t(r) * vocab; }
};

Batch make_batch(emu::DeviceMemory& memory, int vocab, std::vector<RowSetting> settings) {
  const int rows = int(settings.size());
  Batch batch{vocab,
              std::move(settings),
              memory.alloc<float>(size_t(rows) * vocab),
              memory.alloc<uint64_t>(rows),
              memory.alloc<uint64_t>(rows),
              memory.alloc<int64_t>(rows),
              memory.alloc<float>(rows)};
  for (int r = 0; r < rows; ++r) {
    const RowSetting& setting = batch.settings[r];
    batch.seeds[r] = setting.seed;
    batch.counters[r] = setting.counter;
    batch.top_k[r] = setting.top_k;
    batch.temperatures[r] = setting.temperature;
  }
  return batch;
}

// The host contract: one block of 256 threads per row.
std::vector<uint32_t> run_sampling(emu::DeviceMemory& memory, const Batch& batch) {
  uint32_t* tokens = memory.alloc<uint32_t>(batch.rows());
  std::fill_n(tokens, batch.rows(), kUntouchedToken);
  emu::launch("topk_sample_f32", dim3(batch.rows()), dim3(host_threads(batch.vocab)), [&] {
    topk_sample_f32(batch.logits, tokens, batch.seeds, batch.counters, batch.top_k, batch.temperatures,
                    batch.vocab);
  });
  return std::vector<uint32_t>(tokens, tokens + batch.rows());
}

// Each row's token is the reference's draw and lies where the contract puts it: the first maximum when
// greedy, at or above the k-th largest logit otherwise. Returns the counts for the report line.
std::string check_tokens(Case& check, const Batch& batch, const std::vector<uint32_t>& tokens) {
  int sampled = 0, off_argmax = 0;
  for (int r = 0; r < batch.rows(); ++r) {
    const RowSetting& setting = batch.settings[r];
    const float* logits = batch.row(r);
    const int expected = reference_draw(logits, batch.vocab, setting), got = int(tokens[r]);
    const int argmax = reference_argmax(logits, batch.vocab);
    check.expect(got == expected, "row %d (k %ld, t %g): token %d, expected %d", r, long(setting.top_k),
                 setting.temperature, got, expected);
    if (got < 0 || got >= batch.vocab) continue;
    if (is_greedy(setting)) {
      check.expect(got == argmax, "row %d greedy: token %d is not the first maximum %d", r, got, argmax);
      continue;
    }
    ++sampled;
    off_argmax += got != argmax;
    const float floor = kth_largest(logits, batch.vocab, setting.top_k), logit = reference_ranked(logits[got]);
    check.expect(logit >= floor, "row %d: token %d (%g) outside the top %ld (from %g)", r, got, logits[got],
                 long(setting.top_k), floor);
    check.expect(logit > -INFINITY || reference_ranked(logits[argmax]) == -INFINITY,
                 "row %d: token %d has logit %g while others are above -inf", r, got, logits[got]);
  }
  return format("%d greedy rows, %d sampled (%d off the argmax)", batch.rows() - sampled, sampled, off_argmax);
}

// ---- Cases ----

// Settings made so far (at namespace scope: the emulator takes a function's zeroed statics for __shared__).
uint64_t draws = 0;

// Distinct seeds and counters, the high bits set in some.
RowSetting setting(int64_t top_k, float temperature) {
  ++draws;
  return {top_k, temperature, 0x9E3779B97F4A7C15ull * draws ^ (draws << 60), draws * 1000003 + (draws << 40)};
}

// Greedy by temperature (0, negative) and by k (1, 0, negative); the text and audio defaults; k of 2, just
// under and at the vocabulary, past it, far past it (1 << 40, clamped by the kernel), near-zero and high
// temperatures.
std::vector<RowSetting> mixed_settings(int vocab) {
  return {setting(250, 0.f),        setting(25, -1.f),     setting(1, 0.8f),        setting(0, 1.f),
          setting(-3, 1.f),         setting(25, 0.7f),     setting(250, 0.8f),      setting(2, 1.f),
          setting(vocab - 1, 2.f),  setting(vocab, 1.5f),  setting(vocab + 7, 1.f), setting(1ll << 40, 1.f),
          setting(5, 0.01f),        setting(40, 3.f)};
}

// Logits in ±8, row 0's maximum tied where the indices fit: at 10 and 266 (both thread 10's), 259 (thread 3,
// an earlier lane of the same warp), 40 (warp 1) and vocab - 1, so that each of the thread's, the warp's
// and the block's tie rules (lowest index) must hold for 10 to win.
void fill_random_logits(const Batch& batch) {
  for (size_t i = 0; i < size_t(batch.rows()) * batch.vocab; ++i) batch.logits[i] = float(uniform(-8, 8));
  for (int index : {10, 40, 259, 266, batch.vocab - 1})
    if (index < batch.vocab) batch.logits[index] = 9.f;
}

void test_mixed_rows(int vocab) {
  Case check(format("topk_sample_f32 vocab=%d, per-row settings (greedy, k 0..vocab+7, t 0.01..3)", vocab));
  emu::DeviceMemory memory;
  const Batch batch = make_batch(memory, vocab, mixed_settings(vocab));
  fill_random_logits(batch);
  check.finish(check_tokens(check, batch, run_sampling(memory, batch)));
}

// Logits of few values (0..9 in steps of 1), so the k-th largest is tied and every tie is a candidate.
void test_tied_logits(int vocab) {
  Case check(format("topk_sample_f32 vocab=%d, logits tied at the k-th value", vocab));
  emu::DeviceMemory memory;
  std::vector<RowSetting> settings;
  for (int64_t k : {2, 3, 25, 250, 1, 100}) settings.push_back(setting(k, 1.f));
  const Batch batch = make_batch(memory, vocab, settings);
  for (size_t i = 0; i < size_t(batch.rows()) * vocab; ++i) batch.logits[i] = float(uniform_int(0, 9));
  check.finish(check_tokens(check, batch, run_sampling(memory, batch)));
}

// Masked and broken logits: rows with -inf here and there (k still counts only the others), fewer logits above
// -inf than k, NaN, +inf (ties among the largest), nothing above -inf (token 0, greedy or not), and the largest
// finite magnitudes (no overflow in the scores). Greedy and sampled settings alternate.
void test_non_finite_logits(int vocab) {
  Case check(format("topk_sample_f32 vocab=%d, -inf, NaN and +inf logits", vocab));
  emu::DeviceMemory memory;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<std::function<float(int)>> rows = {
      [](int i) { return i % 3 == 0 ? -INFINITY : float(i % 11); },
      [&](int i) { return i < 3 ? float(i) : (i % 2 ? -INFINITY : nan); },
      [&](int i) { return i % 5 == 1 ? nan : float(i % 7); },
      [](int i) { return i % 9 == 4 ? INFINITY : float(i % 13); },
      [&](int i) { return i % 2 ? -INFINITY : nan; },
      [](int i) { return i % 2 ? FLT_MAX : -FLT_MAX; },
      [&](int i) { return i == vocab - 1 ? 1.f : -INFINITY; },
  };
  std::vector<RowSetting> settings;
  for (size_t r = 0; r < rows.size(); ++r)
    for (RowSetting s : {setting(25, 0.7f), setting(1, 0.f), setting(250, 1.3f), setting(4, 1.f)}) settings.push_back(s);
  const Batch batch = make_batch(memory, vocab, settings);
  for (int r = 0; r < batch.rows(); ++r)
    for (int i = 0; i < vocab; ++i) batch.logits[size_t(r) * vocab + i] = rows[r / 4](i);
  const std::vector<uint32_t> tokens = run_sampling(memory, batch);
  for (int r = 16; r < 20; ++r)
    check.expect(tokens[r] == 0, "row %d: nothing above -inf, token %u, expected 0", r, tokens[r]);
  check.finish(check_tokens(check, batch, tokens));
}

// One row of logits drawn `rows` times (counters 0..rows-1): besides matching the reference, the shares
// follow softmax(l / t) over the top k, each within 4.5 standard deviations.
void test_distribution(int vocab, int64_t k, float temperature, int rows) {
  Case check(format("topk_sample_f32 vocab=%d k=%ld t=%g, %d draws follow the softmax", vocab, long(k), temperature,
                    rows));
  emu::DeviceMemory memory;
  std::vector<double> row(vocab);
  for (int i = 0; i < vocab; ++i) row[i] = uniform(-1.5, 1.5);
  std::vector<RowSetting> settings;
  for (int r = 0; r < rows; ++r) settings.push_back({k, temperature, 0xC0FFEEull, uint64_t(r)});
  const Batch batch = make_batch(memory, vocab, settings);
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < vocab; ++i) batch.logits[size_t(r) * vocab + i] = float(row[i]);
  const std::vector<uint32_t> tokens = run_sampling(memory, batch);
  const float floor = kth_largest(batch.logits, vocab, k);
  double total = 0;
  for (int i = 0; i < vocab; ++i) total += batch.logits[i] >= floor ? std::exp(row[i] / temperature) : 0.0;
  double worst = 0;
  for (int i = 0; i < vocab; ++i) {
    const double p = batch.logits[i] >= floor ? std::exp(row[i] / temperature) / total : 0.0;
    const double share = double(std::count(tokens.begin(), tokens.end(), uint32_t(i))) / rows;
    const double sigma = std::sqrt(std::max(p * (1 - p), 1e-12) / rows), deviation = std::abs(share - p) / sigma;
    worst = std::max(worst, deviation);
    check.expect(p == 0 ? share == 0 : deviation <= 4.5, "token %d: share %.4f, expected %.4f", i, share, p);
  }
  const std::string counts = check_tokens(check, batch, tokens);
  check.finish(format("shares within %.2f standard deviations; %s", worst, counts.c_str()));
}

// common.cuh's generator gives the reference's bits.
void test_uniform01() {
  Case check("uniform01 against splitmix64 of (seed, counter, index)");
  int checked = 0;
  for (uint64_t seed : {0ull, 5ull, 0xFFFFFFFFFFFFFFFFull, 0x0123456789ABCDEFull})
    for (uint64_t counter : {0ull, 9ull, 1ull << 50})
      for (uint64_t index = 0; index < 1000; ++index, ++checked) {
        const float got = uniform01(seed, counter, index), expected = reference_uniform01(seed, counter, index);
        check.expect(got == expected && got >= 0 && got < 1, "(%llu, %llu, %llu): %.9g, expected %.9g",
                     (unsigned long long)seed, (unsigned long long)counter, (unsigned long long)index, got, expected);
      }
  check.finish(format("%d values equal", checked));
}

}  // namespace

int main() {
  test_uniform01();
  // Vocabularies under a warp, a partial warp past one, one block's worth, not a multiple of the block (1000,
  // 2049: one token past 8 blocks' worth), Mimi's 2048 and the text vocabulary 32000.
  for (int vocab : {5, 37, 256, 1000, 2048, 2049, 32000}) test_mixed_rows(vocab);
  for (int vocab : {37, 1000}) test_tied_logits(vocab);
  for (int vocab : {5, 300, 2049}) test_non_finite_logits(vocab);
  test_distribution(7, 4, 1.f, 500);
  test_distribution(300, 3, 0.5f, 300);
  return summarise("sampling");
}
