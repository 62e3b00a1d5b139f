// A kernel profiler for any CUDA process, for GPU machines without Nsight Systems. The CUDA
// driver loads it at cuInit when CUDA_INJECTION64_PATH names it (`.ci/gpu-pack` builds it into
// .gpu/libkprof.so, beside the libcupti.so.13 it needs). Through CUPTI's activity API it records
// every kernel (graph nodes one by one), memcpy and memset, and the ranges between
// cuProfilerStart and cuProfilerStop (or cudaProfilerStart/Stop; `duplex bench step` and
// tests/reference/bench_lm.py bracket their timed frames so). It writes them to
// $KPROF_OUT/kprof-<pid>.tsv (default: the working directory) at each stop and at exit; a
// process that never starts a range writes nothing. `.ci/kprof-summary` reads the files: a
// record belongs to a range when the API call that launched it did (its correlation id lies
// between the start's and the stop's), so work still running at the stop is kept.
#include <cupti.h>
#include <cxxabi.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kBufferBytes = 8 << 20;

struct Record {
  char kind;  // 'K' kernel, 'C' memcpy, 'S' memset
  uint32_t correlation;
  uint64_t start, end;
  uint32_t graph;
  int32_t grid[3], block[3];
  uint32_t registers, shared_bytes;
  uint64_t bytes;
  uint32_t name;  // index into names: the kernel's (demangled) or the copy's direction
};

struct Range {
  uint32_t first_correlation, last_correlation;
  uint64_t started, stopped;  // host timestamps, CUPTI's clock
};

// Never destroyed: CUPTI's thread may still deliver a buffer while the process exits.
std::mutex& lock = *new std::mutex;
std::vector<Record>& records = *new std::vector<Record>;
std::vector<Range>& ranges = *new std::vector<Range>;
bool range_open = false;
std::vector<std::string>& names = *new std::vector<std::string>;
std::unordered_map<std::string, uint32_t>& name_ids = *new std::unordered_map<std::string, uint32_t>;
uint64_t dropped = 0;
uint64_t unreadable = 0;  // buffers that ended at an incomplete record

// Whether `result` is success; else says which call failed and why.
bool succeeded(const char* call, CUptiResult result) {
  if (result == CUPTI_SUCCESS) return true;
  const char* text = nullptr;
  cuptiGetResultString(result, &text);
  fprintf(stderr, "kprof: %s failed: %s\n", call, text ? text : "unknown CUPTI error");
  return false;
}

#define SUCCEEDED(call) succeeded(#call, (call))

uint32_t name_id(const std::string& name) {
  const auto [entry, added] = name_ids.emplace(name, uint32_t(names.size()));
  if (added) names.push_back(name);
  return entry->second;
}

std::string demangled(const char* name) {
  if (!name) return "?";
  int status = 0;
  std::unique_ptr<char, decltype(&free)> plain(abi::__cxa_demangle(name, nullptr, nullptr, &status), &free);
  return status == 0 && plain ? plain.get() : name;
}

const char* copy_direction(uint8_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "memcpy HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "memcpy DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "memcpy DtoD";
    default: return "memcpy other";
  }
}

Record kernel_record(const CUpti_ActivityKernel10& kernel) {
  return {'K', kernel.correlationId, kernel.start, kernel.end, kernel.graphId,
          {kernel.gridX, kernel.gridY, kernel.gridZ}, {kernel.blockX, kernel.blockY, kernel.blockZ},
          kernel.registersPerThread, uint32_t(kernel.staticSharedMemory + kernel.dynamicSharedMemory), 0,
          name_id(demangled(kernel.name))};
}

Record copy_record(const CUpti_ActivityMemcpy6& copy) {
  // A runtime call's copy may carry no driver call's id.
  const uint32_t correlation = copy.correlationId ? copy.correlationId : copy.runtimeCorrelationId;
  return {'C', correlation, copy.start, copy.end, copy.graphId, {}, {}, 0, 0, copy.bytes,
          name_id(copy_direction(copy.copyKind))};
}

Record set_record(const CUpti_ActivityMemset4& set) {
  return {'S', set.correlationId, set.start, set.end, set.graphId, {}, {}, 0, 0, set.bytes, name_id("memset")};
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(aligned_alloc(8, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> held(lock);
  CUpti_Activity* activity = nullptr;
  for (;;) {
    const CUptiResult next = cuptiActivityGetNextRecord(buffer, valid, &activity);
    // An incomplete record ends the buffer (CUPTI's documented loop): say so in the file.
    if (next == CUPTI_ERROR_INVALID_KIND) ++unreadable;
    if (next != CUPTI_SUCCESS) break;
    switch (activity->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
        records.push_back(kernel_record(*reinterpret_cast<CUpti_ActivityKernel10*>(activity)));
        break;
      case CUPTI_ACTIVITY_KIND_MEMCPY:
        records.push_back(copy_record(*reinterpret_cast<CUpti_ActivityMemcpy6*>(activity)));
        break;
      case CUPTI_ACTIVITY_KIND_MEMSET:
        records.push_back(set_record(*reinterpret_cast<CUpti_ActivityMemset4*>(activity)));
        break;
      default:
        break;
    }
  }
  size_t lost = 0;
  if (cuptiActivityGetNumDroppedRecords(context, stream, &lost) == CUPTI_SUCCESS) dropped += lost;
  free(buffer);
}

std::string command_line() {
  std::string line;
  if (FILE* file = fopen("/proc/self/cmdline", "rb")) {
    for (int c; (c = fgetc(file)) != EOF;) line += c ? char(c) : ' ';
    fclose(file);
  }
  return line;
}

// Rewrites this process's file with the ranges and every record so far. Called with `lock` held.
void write_report() {
  if (ranges.empty()) return;
  const char* folder = getenv("KPROF_OUT");
  const std::string path = std::string(folder && *folder ? folder : ".") + "/kprof-" + std::to_string(getpid()) + ".tsv";
  FILE* file = fopen(path.c_str(), "w");
  if (!file) {
    fprintf(stderr, "kprof: cannot write %s\n", path.c_str());
    return;
  }
  fprintf(file, "# kprof: %s\n", command_line().c_str());
  fprintf(file, "# dropped records: %llu\n", (unsigned long long)dropped);
  fprintf(file, "# buffers cut at an incomplete record: %llu\n", (unsigned long long)unreadable);
  for (const Range& range : ranges)
    fprintf(file, "# range\t%u\t%u\t%llu\t%llu\n", range.first_correlation, range.last_correlation,
            (unsigned long long)range.started, (unsigned long long)range.stopped);
  fprintf(file, "kind\tcorrelation\tstart_ns\tend_ns\tgraph\tgrid\tblock\tregisters\tshared_bytes\tbytes\tname\n");
  for (const Record& r : records) {
    fprintf(file, "%c\t%u\t%llu\t%llu\t%u\t%dx%dx%d\t%dx%dx%d\t%u\t%u\t%llu\t%s\n", r.kind, r.correlation,
            (unsigned long long)r.start,
            (unsigned long long)r.end, r.graph, r.grid[0], r.grid[1], r.grid[2], r.block[0], r.block[1], r.block[2],
            r.registers, r.shared_bytes, (unsigned long long)r.bytes, names[r.name].c_str());
  }
  fclose(file);
}

void flush_and_write() {
  SUCCEEDED(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED));
  std::lock_guard<std::mutex> held(lock);
  write_report();
}

void CUPTIAPI on_api(void*, CUpti_CallbackDomain domain, CUpti_CallbackId id, const void* data) {
  const auto* call = static_cast<const CUpti_CallbackData*>(data);
  const bool start = domain == CUPTI_CB_DOMAIN_DRIVER_API ? id == CUPTI_DRIVER_TRACE_CBID_cuProfilerStart
                                                          : id == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000;
  uint64_t now = 0;
  cuptiGetTimestamp(&now);
  if (start && call->callbackSite == CUPTI_API_EXIT) {
    std::lock_guard<std::mutex> held(lock);
    // cudaProfilerStart reaches cuProfilerStart too: the first to arrive opens the range.
    if (!range_open) ranges.push_back({call->correlationId, UINT32_MAX, now, 0});
    range_open = true;
  } else if (!start && call->callbackSite == CUPTI_API_ENTER) {
    {
      std::lock_guard<std::mutex> held(lock);
      if (!range_open) return;
      range_open = false;
      ranges.back().last_correlation = call->correlationId;
      ranges.back().stopped = now;
    }
    flush_and_write();
  }
}

// A range never stopped keeps its open bound: every later record.
void at_exit() { flush_and_write(); }

}  // namespace

// The CUDA driver calls this once, from cuInit, in a process started with
// CUDA_INJECTION64_PATH=<this library>.
extern "C" __attribute__((visibility("default"))) int InitializeInjection(void) {
  CUpti_SubscriberHandle subscriber;
  const bool recording =
      SUCCEEDED(cuptiSubscribe(&subscriber, on_api, nullptr)) &&
      SUCCEEDED(cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStart)) &&
      SUCCEEDED(cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStop)) &&
      SUCCEEDED(cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API,
                                    CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000)) &&
      SUCCEEDED(cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API,
                                    CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000)) &&
      SUCCEEDED(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed)) &&
      // Enabled from the start, not at the range: graphs instantiated before it still report nodes.
      SUCCEEDED(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL)) &&
      SUCCEEDED(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY)) &&
      SUCCEEDED(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET));
  if (!recording) {
    fprintf(stderr, "kprof: not recording\n");
    return 1;
  }
  atexit(at_exit);
  fprintf(stderr, "kprof: recording kernels, memcpys and memsets; ranges from cuProfilerStart to cuProfilerStop\n");
  return 1;
}
