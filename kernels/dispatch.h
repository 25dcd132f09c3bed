// Run-time choice among the CPU kernels compiled once per instruction set (build.rs compiles
// bias_gelu_cpu.cpp with CPU_CAPABILITY = DEFAULT, AVX2 and AVX512), following ATen's own
// dispatch: at::get_cpu_capability() reads the CPU and honours ATEN_CPU_CAPABILITY.
#pragma once
#include <cstdint>
#include <c10/util/BFloat16.h>

namespace course {

// Raw-pointer kernels: x (M, N) row-major, bias (N).
#define COURSE_DECLARE_CPU_KERNELS(CAP)                                                                \
  namespace CAP {                                                                                      \
  template <typename T>                                                                                \
  void bias_gelu_fwd(const T* x, const T* b, T* y, int64_t M, int64_t N);                              \
  template <typename T>                                                                                \
  void bias_gelu_bwd(const T* g, const T* x, const T* b, T* gx, T* gb, int64_t M, int64_t N);          \
  }

COURSE_DECLARE_CPU_KERNELS(DEFAULT)
COURSE_DECLARE_CPU_KERNELS(AVX2)
COURSE_DECLARE_CPU_KERNELS(AVX512)

}  // namespace course
