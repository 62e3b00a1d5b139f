// kprof.cpp's bookkeeping without a GPU (`.ci/kprof-check` builds and runs it): the profiler span
// opened by cudaProfilerStart and the cuProfilerStart inside it, closed by the stop, records made
// from CUPTI's structs, and the file `.ci/kprof-summary` then reads. CUPTI's own calls fail here,
// with no driver, and say so on stderr; the file is written all the same.
#include "kprof.cpp"

namespace {

void call(CUpti_CallbackDomain domain, CUpti_CallbackId id, CUpti_ApiCallbackSite site, uint32_t correlation) {
  CUpti_CallbackData data{};
  data.callbackSite = site;
  data.correlationId = correlation;
  on_api(nullptr, domain, id, &data);
}

CUpti_ActivityKernel10 kernel(uint32_t correlation, uint64_t start, uint64_t end, uint32_t graph, const char* name) {
  CUpti_ActivityKernel10 k{};
  k.kind = CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
  k.correlationId = correlation;
  k.start = start;
  k.end = end;
  k.graphId = graph;
  k.gridX = 1024, k.gridY = k.gridZ = 1;
  k.blockX = 256, k.blockY = k.blockZ = 1;
  k.name = name;
  return k;
}

}  // namespace

int main() {
  records.push_back(kernel_record(kernel(5, 100, 900, 0, "before_the_span")));
  // The runtime's start, then the driver's inside it: one span, from the first.
  call(CUPTI_CB_DOMAIN_RUNTIME_API, CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000, CUPTI_API_ENTER, 9);
  call(CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStart, CUPTI_API_EXIT, 10);
  call(CUPTI_CB_DOMAIN_RUNTIME_API, CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000, CUPTI_API_EXIT, 9);
  records.push_back(kernel_record(kernel(11, 1000, 3000, 7, "_Z6squarePfi")));
  records.push_back(kernel_record(kernel(12, 2500, 4000, 0, "gemv_splitk_int8_b1")));
  CUpti_ActivityMemcpy6 copy{};
  copy.kind = CUPTI_ACTIVITY_KIND_MEMCPY;
  copy.copyKind = CUPTI_ACTIVITY_MEMCPY_KIND_DTOH;
  copy.runtimeCorrelationId = 13;  // a runtime call's copy: no driver call's id
  copy.start = 5000, copy.end = 5500, copy.bytes = 4096;
  records.push_back(copy_record(copy));
  call(CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStop, CUPTI_API_ENTER, 20);
  // Launched after the stop: outside the span.
  records.push_back(kernel_record(kernel(25, 6000, 9000, 0, "after_the_span")));
  at_exit();
  return ranges.size() == 1 && !range_open ? 0 : 1;
}
