// Runtime shim: the parts of libtorch's C++ API the course needs and tch does not bind —
// determinism switches, CPU/CUDA autocast with any dtype, versions, the CPU instruction set
// ATen dispatches to, accelerator caching-allocator stats and the process's RSS.
#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/Version.h>
#include <c10/core/InferenceMode.h>
#include <torch/headeronly/version.h>

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <mutex>

#include "ops.h"

namespace {

c10::DeviceType device_type_of(int code) {
  switch (code) {
    case 0:
      return c10::DeviceType::CPU;
    case 1:
      return c10::DeviceType::CUDA;
    default:
      TORCH_CHECK(false, "autocast: unknown device type code ", code, " (0 = cpu, 1 = cuda)");
  }
}

c10::ScalarType autocast_dtype_of(c10::DeviceType dev, int code) {
  TORCH_CHECK(code >= 0 && code < static_cast<int>(c10::ScalarType::NumOptions), "autocast: bad dtype code ", code);
  auto dt = static_cast<c10::ScalarType>(code);
  TORCH_CHECK(dt == c10::kHalf || dt == c10::kBFloat16, "autocast on ", dev, " supports float16 and bfloat16, got ", dt);
  return dt;
}

}  // namespace

extern "C" {

void course_free_error(char* msg) {
  if (msg != course::out_of_memory_error()) std::free(msg);
}

void course_set_deterministic(int enabled, int warn_only) {
  at::globalContext().setDeterministicAlgorithms(enabled != 0, warn_only != 0);
  // Also make the CPU fill of uninitialised memory deterministic, as torch.use_deterministic_algorithms does.
  at::globalContext().setDeterministicFillUninitializedMemory(enabled != 0);
}

int course_deterministic(void) { return at::globalContext().deterministicAlgorithms() ? 1 : 0; }

void course_set_cudnn(int benchmark, int deterministic) {
  at::globalContext().setBenchmarkCuDNN(benchmark != 0);
  at::globalContext().setDeterministicCuDNN(deterministic != 0);
}

char* course_autocast_enter(int device_type, int enabled, int dtype, int* prev_enabled, int* prev_dtype) {
  COURSE_TRY({
    auto dev = device_type_of(device_type);
    *prev_enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(dev));
    if (enabled) at::autocast::set_autocast_dtype(dev, autocast_dtype_of(dev, dtype));
    at::autocast::set_autocast_enabled(dev, enabled != 0);
    at::autocast::increment_nesting();
  })
}

char* course_autocast_exit(int device_type, int prev_enabled, int prev_dtype) {
  COURSE_TRY({
    auto dev = device_type_of(device_type);
    // Leaving the outermost region drops the cache of casted weights, as torch.autocast does.
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(dev, prev_enabled != 0);
    at::autocast::set_autocast_dtype(dev, static_cast<c10::ScalarType>(prev_dtype));
  })
}

char* course_autocast_state(int device_type, int* enabled, int* dtype) {
  COURSE_TRY({
    auto dev = device_type_of(device_type);
    *enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
    *dtype = static_cast<int>(at::autocast::get_autocast_dtype(dev));
  })
}

const char* course_torch_version(void) { return TORCH_VERSION; }

const char* course_cpu_capability(void) {
  static const std::string cap = at::get_cpu_capability();
  return cap.c_str();
}

char* course_parallel_info(void) {
  try {
    return course::dup_error(at::get_parallel_info().c_str());
  } catch (...) {
    return course::dup_error("at::get_parallel_info failed");
  }
}

long course_cuda_runtime_version(void) {
  try {
    const auto& hooks = at::detail::getCUDAHooks();
    return hooks.hasCUDART() ? hooks.versionCUDART() : 0;
  } catch (...) {
    return 0;
  }
}

long course_cudnn_version(void) {
  try {
    const auto& hooks = at::detail::getCUDAHooks();
    return hooks.hasCuDNN() ? hooks.versionCuDNN() : 0;
  } catch (...) {
    return 0;
  }
}

int course_cuda_device_count(void) {
  try {
    return at::detail::getCUDAHooks().getNumGPUs();
  } catch (...) {
    return 0;
  }
}

char* course_accel_memory(int device_index, int64_t* alloc_cur, int64_t* alloc_peak, int64_t* reserved_cur,
                          int64_t* reserved_peak) {
  COURSE_TRY({
    TORCH_CHECK(course_cuda_device_count() > device_index && device_index >= 0, "no CUDA device ", device_index,
                " (", course_cuda_device_count(), " visible)");
    auto stats = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device_index));
    // Index 0 of each StatArray is the aggregate over small and large pools.
    *alloc_cur = stats.allocated_bytes[0].current;
    *alloc_peak = stats.allocated_bytes[0].peak;
    *reserved_cur = stats.reserved_bytes[0].current;
    *reserved_peak = stats.reserved_bytes[0].peak;
  })
}

char* course_accel_reset_peak(int device_index) {
  COURSE_TRY({
    TORCH_CHECK(course_cuda_device_count() > device_index && device_index >= 0, "no CUDA device ", device_index);
    at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device_index));
  })
}

// The default generator of a device (0 = CPU, 1 = CUDA) as a byte tensor, and back: what a
// checkpoint needs for dropout and other torch randomness to resume exactly.
char* course_generator_get_state(int device_type, int index, course_tensor* out) {
  COURSE_TRY({
    auto dev = device_type == 0 ? c10::Device(c10::DeviceType::CPU) : c10::Device(device_type_of(device_type), index);
    auto gen = at::globalContext().defaultGenerator(dev);
    std::lock_guard<std::mutex> lock(gen.mutex());
    *out = new at::Tensor(gen.get_state());
  })
}

char* course_generator_set_state(int device_type, int index, course_tensor state) {
  COURSE_TRY({
    auto dev = device_type == 0 ? c10::Device(c10::DeviceType::CPU) : c10::Device(device_type_of(device_type), index);
    auto gen = at::globalContext().defaultGenerator(dev);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*static_cast<at::Tensor*>(state));
  })
}

// Drops a tensor's .grad (PyTorch's zero_grad(set_to_none=True)): the next backward writes a
// fresh gradient instead of adding into a zeroed buffer, and the memory is freed in between.
void course_clear_grad(course_tensor t) {
  try {
    static_cast<at::Tensor*>(t)->mutable_grad().reset();
  } catch (...) {
  }
}

void* course_inference_mode_enter(void) { return new c10::InferenceMode(true); }
void course_inference_mode_exit(void* guard) { delete static_cast<c10::InferenceMode*>(guard); }
int course_is_inference(course_tensor t) { return static_cast<at::Tensor*>(t)->is_inference() ? 1 : 0; }

int64_t course_peak_rss_bytes(void) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0) return -1;
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

int64_t course_current_rss_bytes(void) {
  long pages = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return -1;
  int n = std::fscanf(f, "%ld %ld", &pages, &resident);
  std::fclose(f);
  if (n != 2) return -1;
  return static_cast<int64_t>(resident) * sysconf(_SC_PAGESIZE);
}

}  // extern "C"
