// CPU kernel for y = x W^T when x has a handful of rows (decoding: one token per sequence), W
// (N, K) fp32 or bf16 row-major, accumulation in fp32. At M = 1 this is a matrix-vector product
// bound by reading W once from memory; the kernel streams W's rows in order, four at a time,
// each thread over its own block of rows (at::parallel_for), so both cores pull from DRAM.
// libtorch's own path (MKL's gemv) ran single-threaded at 10-15 GB/s on the Zen 4 for these
// shapes, against 26 GB/s for a plain 2-thread read. Compiled once per instruction set like the
// other CPU kernels (see dispatch.h).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <array>
#include <tuple>
#include <vector>

#include "dispatch.h"

namespace course {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using VF = Vectorized<float>;

// Up to this many rows of x per pass (the op splits larger M).
constexpr int64_t kMaxRows = 4;
// Rows of W per pass: four independent accumulator chains per row of x.
constexpr int64_t kRowsW = 4;
// Software prefetch distance in rows of W. On the 2-core Zen 4, reading every weight of a
// SmolLM2 token once from DRAM took 17-22 ms in bf16 without it and 13.6-15.6 ms with 8 rows
// (examples of 3 interleaved runs; 4, 12, 16, 24, 32 and 64 rows were no better). Only where
// nta_prefetch() says so (dispatch.h: they hurt on the Intel Xeon).
constexpr int64_t kPrefetchRows = 8;

// Two fp32 vectors (2 x VF::size() = 32 columns on AVX-512) of row `p` from column 0, n of them
// valid (a partial load at the tail: the rest read as 0).
inline void load2(const float* p, int64_t n, VF& a, VF& b) {
  constexpr int64_t L = VF::size();
  a = VF::loadu(p, std::min(n, L));
  b = n > L ? VF::loadu(p + L, n - L) : VF(0.f);
}
inline void load2(const c10::BFloat16* p, int64_t n, VF& a, VF& b) {
  // bf16 is the top half of an fp32: one load of 32, widened into two fp32 vectors.
  using VB = Vectorized<c10::BFloat16>;
  static_assert(VB::size() == 2 * VF::size());
  std::tie(a, b) = at::vec::convert_to_float<c10::BFloat16>(VB::loadu(p, n));
}

inline float hsum(const VF& v) {
  float tmp[VF::size()];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < VF::size(); ++i) s += tmp[i];
  return s;
}

template <typename T, int64_t M>
void rows_block(const T* x, const T* w, T* y, int64_t n0, int64_t n1, int64_t N, int64_t K) {
  const int64_t n_end = n1;
  const bool prefetch = nta_prefetch();
  constexpr int64_t L = VF::size(), S = 2 * L;
  // x as fp32 once per block, zero-padded to whole steps of S columns.
  const int64_t Kp = (K + S - 1) / S * S;
  std::array<std::vector<float>, M> xf;
  for (int64_t m = 0; m < M; ++m) {
    xf[m].assign(Kp, 0.f);
    for (int64_t k = 0; k < K; ++k) xf[m][k] = static_cast<float>(x[m * K + k]);
  }
  auto block = [&](int64_t n, int64_t rows) {
    VF acc[M][kRowsW];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < kRowsW; ++r) acc[m][r] = VF(0.f);
    for (int64_t k = 0; k < K; k += S) {
      const int64_t len = std::min(S, K - k);
      VF wa[kRowsW], wb[kRowsW];
      for (int64_t r = 0; r < rows; ++r) load2(w + (n + r) * K + k, len, wa[r], wb[r]);
      if (prefetch && n + kPrefetchRows + kRowsW <= n_end) {
        // The same columns kPrefetchRows rows on: the hardware prefetcher alone left the DRAM
        // stream at about 60 % of the two cores' read bandwidth.
        for (int64_t r = 0; r < kRowsW; ++r) {
          const char* p = reinterpret_cast<const char*>(w + (n + kPrefetchRows + r) * K + k);
          for (int64_t b = 0; b < static_cast<int64_t>(S * sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, 0);
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        const VF xa = VF::loadu(xf[m].data() + k), xb = VF::loadu(xf[m].data() + k + L);
        for (int64_t r = 0; r < rows; ++r) acc[m][r] = at::vec::fmadd(wb[r], xb, at::vec::fmadd(wa[r], xa, acc[m][r]));
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < rows; ++r) y[m * N + n + r] = static_cast<T>(hsum(acc[m][r]));
  };
  int64_t n = n0;
  for (; n + kRowsW <= n1; n += kRowsW) block(n, kRowsW);
  if (n < n1) block(n, n1 - n);
}

template <typename T>
void skinny_matmul(const T* x, const T* w, T* y, int64_t M, int64_t N, int64_t K) {
  // Blocks of 64 rows of W (at K = 576, 144 KB of fp32): enough work per task to hide the fork.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int64_t mm = std::min(kMaxRows, M - m0);
      const T* xm = x + m0 * K;
      T* ym = y + m0 * N;
      switch (mm) {
        case 1: rows_block<T, 1>(xm, w, ym, n0, n1, N, K); break;
        case 2: rows_block<T, 2>(xm, w, ym, n0, n1, N, K); break;
        case 3: rows_block<T, 3>(xm, w, ym, n0, n1, N, K); break;
        default: rows_block<T, 4>(xm, w, ym, n0, n1, N, K); break;
      }
    }
  });
}

template void skinny_matmul<float>(const float*, const float*, float*, int64_t, int64_t, int64_t);
template void skinny_matmul<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, c10::BFloat16*, int64_t,
                                          int64_t, int64_t);

}  // namespace CPU_CAPABILITY
}  // namespace course
