// Torch's profiler (Kineto, the engine behind torch.profiler.profile) behind the C ABI: start a
// trace of every ATen op this thread runs (and, with a GPU, every CUDA kernel), stop it and save
// the Chrome trace JSON that torch.profiler's export_chrome_trace writes, and named ranges
// (torch.profiler.record_function) that show up in that trace around the ops they contain.
//
// The profiler is thread-local in torch: ops are recorded on the thread that started it (and
// on threads that inherit its state: the autograd engine's workers, ATen's intra-op pool), and
// it must be stopped on that thread. Kineto underneath is one per process; the Rust side allows
// one profiler at a time.
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <set>
#include <string>

#include "ops.h"

namespace {

namespace kineto = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

}  // namespace

extern "C" {

char* course_profiler_start(int cuda, int record_shapes, int profile_memory) {
  COURSE_TRY({
    TORCH_CHECK(!torch::profiler::impl::profilerEnabled(), "profiler: a profiler is already running on this thread");
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda) activities.insert(ActivityType::CUDA);
    // What torch.profiler.profile(activities=..., record_shapes=..., profile_memory=...) builds:
    // state KINETO, no stack, flops or module recording.
    ProfilerConfig config(ProfilerState::KINETO, record_shapes != 0, profile_memory != 0);
    // prepare (Kineto warms up, e.g. CUPTI) then enable, as torch.profiler does on __enter__.
    kineto::prepareProfiler(config, activities);
    kineto::enableProfiler(config, activities);
  })
}

char* course_profiler_stop(const char* path) {
  COURSE_TRY({
    TORCH_CHECK(torch::profiler::impl::profilerEnabled(), "profiler: no profiler is running on this thread");
    auto result = kineto::disableProfiler();
    if (path != nullptr) {
      TORCH_CHECK(result != nullptr, "profiler: torch returned no result to save");
      // Kineto logs, rather than throws, when it cannot open the file; the caller checks that
      // the file exists.
      result->save(path);
    }
  })
}

void* course_record_function_enter(const char* name) {
  try {
    // What torch.profiler.record_function("name") does: a USER_SCOPE RecordFunction that starts
    // now and ends when deleted. Inactive (no callbacks run) when no profiler is on.
    auto* rf = new at::RecordFunction(at::RecordScope::USER_SCOPE);
    if (rf->isActive()) rf->before(std::string_view(name ? name : ""), static_cast<int64_t>(-1));
    return rf;
  } catch (...) {
    return nullptr;
  }
}

void course_record_function_exit(void* guard) {
  // The destructor runs the profiler's end callback, which records the range.
  delete static_cast<at::RecordFunction*>(guard);
}

}  // extern "C"
