// Dropout (丢弃) whose mask is a function of (seed, index) instead of a stored tensor: a
// counter-based generator, as Philox is for torch's CUDA dropout, here the 32-bit finaliser of
// MurmurHash3 (fmix32) over the index mixed with the seed. The backward recomputes the mask from
// the same seed, so nothing but the seed is kept between the passes, and each number costs a few
// integer operations that the compiler vectorises under each instruction set (build.rs compiles
// this file per ISA, see dispatch.h). The reference in modules/course/ops/dropout.rs computes the
// same mask in tch's int64 arithmetic.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "dispatch.h"

namespace course {
namespace CPU_CAPABILITY {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// y[i] = x[i] * scale where the mask keeps i, else 0: keep when the top 24 bits of
// fmix32(i * 0x9E3779B9 + key) are at least `threshold` (= round(p 2^24)).
template <typename T>
void dropout_apply(const T* x, T* y, int64_t n, uint32_t key, uint32_t threshold, float scale) {
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t h = fmix32(static_cast<uint32_t>(i) * 0x9E3779B9u + key);
      const float keep = (h >> 8) >= threshold ? scale : 0.f;
      y[i] = static_cast<T>(static_cast<float>(x[i]) * keep);
    }
  });
}

template void dropout_apply<float>(const float*, float*, int64_t, uint32_t, uint32_t, float);
template void dropout_apply<c10::BFloat16>(const c10::BFloat16*, c10::BFloat16*, int64_t, uint32_t, uint32_t, float);

}  // namespace CPU_CAPABILITY
}  // namespace course
