// CPU kernels for y = gelu_tanh(x + bias) and its backward, vectorised with ATen's
// at::vec::Vectorized (AVX2 / AVX-512 / scalar, picked by build.rs flags per compilation) and
// parallel over rows with at::parallel_for. This file is compiled three times; kernels/dispatch.h
// declares each copy and bias_gelu.cpp picks one at run time.
//
// Math per element, u = x + b, k = sqrt(2/pi), c = 0.044715, t = tanh(k (u + c u^3)):
//   y     = 0.5 u (1 + t)
//   dy/du = 0.5 (1 + t) + 0.5 u (1 - t^2) k (1 + 3 c u^2)
// computed in the equivalent sigmoid form below (see gelu_fwd).
// bf16 is computed in fp32 (like PyTorch's opmath) and rounded once on store.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <vector>

#include "dispatch.h"
#include "ops.h"

namespace course {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// GELU's tanh form rewritten with 1 + tanh(z) = 2 sigmoid(2z):
//   y = u sigmoid(v),  v = 2 k (u + c u^3)
//   dy/du = s + u v' e s^2,  e = exp(-v), s = 1 / (1 + e), v' = 2k + 6kc u^2
// Neither tail cancels (0.5 u (1 + tanh z) loses all its digits as tanh z -> -1, and
// 1 - tanh^2 z likewise as tanh z -> 1), and one exp is cheaper than Sleef's tanh.
// exp is Sleef's (1 ulp), the same accuracy class as ATen's own GELU. v is clamped so e stays
// finite and e s^2 never computes inf * 0.
template <typename A>
struct ExpClamp;
template <>
struct ExpClamp<float> {
  static constexpr float v = 87.0f;
};
template <>
struct ExpClamp<double> {
  static constexpr double v = 700.0;
};

template <typename A>
inline Vectorized<A> exp_neg_clamped(const Vectorized<A>& v) {
  const Vectorized<A> lim(ExpClamp<A>::v);
  return at::vec::minimum(at::vec::maximum(-v, -lim), lim).exp();
}

template <typename A>
inline Vectorized<A> gelu_fwd(const Vectorized<A>& u) {
  using V = Vectorized<A>;
  const V k2(static_cast<A>(2 * kGeluK)), kc2(static_cast<A>(2 * kGeluK * kGeluC)), one(A(1));
  const V e = exp_neg_clamped(u * at::vec::fmadd(u * u, kc2, k2));
  return u / (one + e);
}

template <typename A>
inline Vectorized<A> gelu_grad(const Vectorized<A>& u) {
  using V = Vectorized<A>;
  const V k2(static_cast<A>(2 * kGeluK)), kc2(static_cast<A>(2 * kGeluK * kGeluC)),
      kc6(static_cast<A>(6 * kGeluK * kGeluC)), one(A(1));
  const V u2 = u * u;
  const V e = exp_neg_clamped(u * at::vec::fmadd(u2, kc2, k2));
  const V s = one / (one + e);
  return at::vec::fmadd(u * at::vec::fmadd(u2, kc6, k2), (e * s) * s, s);
}

// Rows per task so that a task touches about 64K elements: big enough to amortise the fork,
// small enough to balance 2..64 threads.
inline int64_t grain_rows(int64_t N) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(N, 1)); }

template <typename T>
void bias_gelu_fwd(const T* x, const T* b, T* y, int64_t M, int64_t N) {
  at::parallel_for(0, M, grain_rows(N), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        using V = Vectorized<T>;
        for (int64_t j = 0; j < N; j += V::size()) {
          int64_t n = std::min<int64_t>(V::size(), N - j);
          auto [x0, x1] = at::vec::convert_to_float<T>(V::loadu(xr + j, n));
          auto [b0, b1] = at::vec::convert_to_float<T>(V::loadu(b + j, n));
          at::vec::convert_from_float<T>(gelu_fwd(x0 + b0), gelu_fwd(x1 + b1)).store(yr + j, n);
        }
      } else {
        using V = Vectorized<T>;
        for (int64_t j = 0; j < N; j += V::size()) {
          int64_t n = std::min<int64_t>(V::size(), N - j);
          gelu_fwd(V::loadu(xr + j, n) + V::loadu(b + j, n)).store(yr + j, n);
        }
      }
    }
  });
}

template <typename T>
void bias_gelu_bwd(const T* g, const T* x, const T* b, T* gx, T* gb, int64_t M, int64_t N) {
  // Accumulate the bias gradient in fp32 (fp64 for double), one partial row per thread, then
  // reduce the partials in thread order: deterministic for a fixed thread count.
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  using VA = Vectorized<acc_t>;
  const int nthreads = at::get_num_threads();
  std::vector<acc_t> partial(static_cast<size_t>(nthreads) * N, acc_t(0));
  at::parallel_for(0, M, grain_rows(N), [&](int64_t r0, int64_t r1) {
    acc_t* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * N;
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      const T* gr = g + r * N;
      T* gxr = gx + r * N;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        using V = Vectorized<T>;
        for (int64_t j = 0; j < N; j += V::size()) {
          int64_t n = std::min<int64_t>(V::size(), N - j);
          auto [x0, x1] = at::vec::convert_to_float<T>(V::loadu(xr + j, n));
          auto [b0, b1] = at::vec::convert_to_float<T>(V::loadu(b + j, n));
          auto [g0, g1] = at::vec::convert_to_float<T>(V::loadu(gr + j, n));
          auto d0 = g0 * gelu_grad(x0 + b0);
          auto d1 = g1 * gelu_grad(x1 + b1);
          // The bias gradient sums the bf16-rounded input gradient, as autograd would.
          auto rounded = at::vec::convert_from_float<T>(d0, d1);
          rounded.store(gxr + j, n);
          auto [q0, q1] = at::vec::convert_to_float<T>(rounded);
          int64_t n0 = std::min<int64_t>(VA::size(), n), n1 = n - n0;
          (VA::loadu(acc + j, n0) + q0).store(acc + j, n0);
          if (n1 > 0) (VA::loadu(acc + j + VA::size(), n1) + q1).store(acc + j + VA::size(), n1);
        }
      } else {
        using V = Vectorized<T>;
        for (int64_t j = 0; j < N; j += V::size()) {
          int64_t n = std::min<int64_t>(V::size(), N - j);
          auto d = V::loadu(gr + j, n) * gelu_grad(V::loadu(xr + j, n) + V::loadu(b + j, n));
          d.store(gxr + j, n);
          (V::loadu(acc + j, n) + d).store(acc + j, n);
        }
      }
    }
  });
  for (int64_t j = 0; j < N; ++j) {
    acc_t s = 0;
    for (int t = 0; t < nthreads; ++t) s += partial[static_cast<size_t>(t) * N + j];
    gb[j] = static_cast<T>(s);
  }
}

#define COURSE_INSTANTIATE(T)                                                     \
  template void bias_gelu_fwd<T>(const T*, const T*, T*, int64_t, int64_t); \
  template void bias_gelu_bwd<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t);
COURSE_INSTANTIATE(float)
COURSE_INSTANTIATE(double)
COURSE_INSTANTIATE(c10::BFloat16)

}  // namespace CPU_CAPABILITY
}  // namespace course
