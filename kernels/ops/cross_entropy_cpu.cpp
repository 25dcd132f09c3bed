// CPU kernels for the fused softmax cross-entropy and its backward, vectorised with ATen's
// at::vec::Vectorized and parallel over rows with at::parallel_for. Like bias_gelu_cpu.cpp this
// file is compiled three times (CPU_CAPABILITY = DEFAULT, AVX2, AVX512); kernels/dispatch.h
// declares each copy and cross_entropy.cpp picks one at run time.
//
// Math per row i of logits x (V classes), target t_i (-100 = ignored):
//   m_i   = max_j x_ij
//   lse_i = m_i + log sum_j exp(x_ij - m_i)          (subtracting m keeps every exp <= 1)
//   loss  = sum_{i: t_i != kIgnoreIndex} (lse_i - x_{i,t_i}) / count,   count = #{i: t_i != kIgnoreIndex}
//   dloss/dx_ij = (exp(x_ij - lse_i) - [j == t_i]) * g / count   (0 for ignored rows)
// bf16 and fp16 are computed in fp32 (PyTorch's opmath type) and rounded once on store.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cmath>
#include <limits>

#include "dispatch.h"
#include "ops.h"

namespace course {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// bf16 and fp16 load as Vectorized<T> (16 or 32 lanes) and widen to two fp32 vectors.
template <typename T>
constexpr int kParts = (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) ? 2 : 1;

// Elements per online-softmax block: 2048 fp32 = 8 KiB, so the block is still in L1 when the
// second look at it (the exp-sum after the block max) comes. Memory is read once per row either way.
constexpr int64_t kBlock = 2048;

// Loads up to Vectorized<T>::size() elements at p as kParts<T> accumulator vectors; lanes past
// n (a row's tail) hold `fill`, chosen so that they cannot change the reduction.
template <typename T, typename A>
inline std::array<Vectorized<A>, kParts<T>> load_acc(const T* p, int64_t n, A fill) {
  using VT = Vectorized<T>;
  using VA = Vectorized<A>;
  const bool full = n >= VT::size();
  std::array<VA, kParts<T>> out;
  if constexpr (kParts<T> == 2) {
    auto [a, b] = at::vec::convert_to_float<T>(full ? VT::loadu(p) : VT::loadu(p, n));
    out = {a, b};
  } else {
    out[0] = full ? VT::loadu(p) : VT::loadu(p, n);
  }
  if (!full) {
    for (int k = 0; k < kParts<T>; ++k) {
      const int64_t valid = std::clamp<int64_t>(n - k * VA::size(), 0, VA::size());
      out[k] = VA::set(VA(fill), out[k], valid);
    }
  }
  return out;
}

// Stores kParts<T> accumulator vectors as n elements of T (one rounding for bf16/fp16).
template <typename T, typename A>
inline void store_acc(T* p, int64_t n, const std::array<Vectorized<A>, kParts<T>>& v) {
  if constexpr (kParts<T> == 2) {
    at::vec::convert_from_float<T>(v[0], v[1]).store(p, n);
  } else {
    v[0].store(p, n);
  }
}

// exp for the accumulator type. fp32 uses ATen's exp_u20 (a degree-5 polynomial, at most 20 ulp
// = 2.4e-6 relative, per its comment in vec256_float.h), about twice as fast as Sleef's 1-ulp exp;
// that error is below every tolerance of the fp32 loss and far below bf16's rounding. fp64 keeps
// the 1-ulp exp so that the f64 path stays a reference-grade check.
template <typename A>
inline Vectorized<A> fast_exp(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<A, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// Horizontal max (NaN wins, as in at::vec::maximum) and sum of one vector's lanes. The AVX
// builds use ATen's shuffle-based vec_reduce_all; in the DEFAULT build that function takes a
// 32-byte struct by value, which makes GCC print an ABI note (-Wpsabi) no pragma silences, and
// there the lanes are plain scalars anyway.
template <typename A>
inline A lanes_max(const Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return at::vec::maximum(a, b); }, v);
#else
  alignas(64) A lanes[Vectorized<A>::size()];
  v.store(lanes);
  A r = lanes[0];
  for (int64_t i = 1; i < Vectorized<A>::size(); ++i) r = (lanes[i] > r || std::isnan(lanes[i])) ? lanes[i] : r;
  return r;
#endif
}

template <typename A>
inline A lanes_sum(const Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return a + b; }, v);
#else
  alignas(64) A lanes[Vectorized<A>::size()];
  v.store(lanes);
  A r = lanes[0];
  for (int64_t i = 1; i < Vectorized<A>::size(); ++i) r += lanes[i];
  return r;
#endif
}

// Rows per task so that a task touches about 64K elements (as bias_gelu_cpu.cpp).
inline int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// The max m of one row and log sum_j exp(x_j - m) (their sum is the logsumexp), in one pass over
// memory: per block of kBlock elements take the block max, rescale the running sum if the max
// grew (online softmax, Milakov & Gimelshein 2018), then add the block's exp(x - m) while the
// block is in L1. One exp per element.
template <typename T, typename A>
inline std::pair<A, A> row_max_logsumexp(const T* x, int64_t V) {
  using VA = Vectorized<A>;
  constexpr int64_t step = Vectorized<T>::size();
  constexpr A ninf = -std::numeric_limits<A>::infinity();
  A m = ninf, s = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t end = std::min(V, j0 + kBlock);
    VA vmax(ninf);
    for (int64_t j = j0; j < end; j += step) {
      for (const auto& v : load_acc<T, A>(x + j, end - j, ninf)) vmax = at::vec::maximum(vmax, v);
    }
    const A bm = lanes_max(vmax);
    if (bm == ninf) continue;  // a block of -inf adds nothing (and -inf - -inf would be NaN)
    if (bm > m) {
      if (m != ninf) s *= std::exp(m - bm);  // (on the first block s is 0: no exp to pay for)
      m = bm;
    } else if (std::isnan(bm)) {
      return {bm, bm};  // NaN in the row: the loss is NaN, as in PyTorch
    }
    const VA vm(m);
    VA vs(A(0));
    // Tail lanes load as -inf, whose exp is 0.
    for (int64_t j = j0; j < end; j += step) {
      for (const auto& v : load_acc<T, A>(x + j, end - j, ninf)) vs += fast_exp(v - vm);
    }
    s += lanes_sum(vs);
  }
  return {m, std::log(s)};
}

// Targets were checked (range) and counted by the caller, cross_entropy.cpp; -100 (kIgnoreIndex) marks an ignored row.
template <typename T, typename A>
void cross_entropy_fwd(const T* x, const int64_t* t, A* lse, A* loss, int64_t N, int64_t V) {
  at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * V;
      const auto [m, log_s] = row_max_logsumexp<T, A>(xr, V);
      lse[r] = m + log_s;
      // (m - x_t) + log s rather than lse - x_t: with logits near 1e4, lse rounded to fp32 is
      // off by up to 5e-4, which the subtraction would pass on to a loss of order 1.
      loss[r] = t[r] == kIgnoreIndex ? A(0) : (m - static_cast<A>(xr[t[r]])) + log_s;
    }
  });
}

template <typename T, typename A>
void cross_entropy_bwd(const T* x, const int64_t* t, const A* lse, A scale, T* gx, int64_t N, int64_t V) {
  using VA = Vectorized<A>;
  constexpr int64_t step = Vectorized<T>::size();
  at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * V;
      T* gr = gx + r * V;
      const int64_t tr = t[r];
      if (tr == kIgnoreIndex) {
        // Ignored row: no gradient.
        std::fill(gr, gr + V, T(0));
        continue;
      }
      // softmax * scale for every class, then the target's -scale added in the accumulator
      // type before its single rounding (not to an already rounded bf16 value). exp(x - lse)
      // with lse saved in fp32 is off by |lse| * 2^-24 relative (6e-6 at |lse| = 100), the
      // price of keeping one number per row, as FlashAttention does with its saved logsumexp.
      const VA vl(lse[r]), vs(scale);
      for (int64_t j = 0; j < V; j += step) {
        const int64_t n = std::min(step, V - j);
        auto v = load_acc<T, A>(xr + j, n, A(0));
        for (auto& p : v) p = fast_exp(p - vl) * vs;
        store_acc<T, A>(gr + j, n, v);
      }
      gr[tr] = static_cast<T>((std::exp(static_cast<A>(xr[tr]) - lse[r]) - A(1)) * scale);
    }
  });
}

#define COURSE_INSTANTIATE_CE(T, A)                                                               \
  template void cross_entropy_fwd<T, A>(const T*, const int64_t*, A*, A*, int64_t, int64_t);    \
  template void cross_entropy_bwd<T, A>(const T*, const int64_t*, const A*, A, T*, int64_t, int64_t);
COURSE_INSTANTIATE_CE(float, float)
COURSE_INSTANTIATE_CE(double, double)
COURSE_INSTANTIATE_CE(c10::BFloat16, float)
COURSE_INSTANTIATE_CE(c10::Half, float)

}  // namespace CPU_CAPABILITY
}  // namespace course
