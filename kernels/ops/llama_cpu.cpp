// CPU kernels for the Llama decoder's small ops outside autograd, the ones that run between the
// matrix products: RMSNorm (with the residual add before it), SwiGLU, and the attention of new
// tokens over a KV cache with the rotary embedding and the cache write in the same pass.
//
// Why: decoding one token of SmolLM2-135M runs about 35 of these element-wise ATen ops per
// layer, each a few microseconds of dispatch, allocation and thread hand-off for a few hundred
// numbers; at 30 layers that was a third of a bf16 token's time. Here each is one pass.
//
// Rounding follows Hugging Face's Llama op by op, so that in bf16 the results are the numbers
// transformers computes (each intermediate rounded to bf16 where its ops round), and in fp32 the
// same arithmetic up to the order of a sum. Compiled once per instruction set (see dispatch.h).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "dispatch.h"

namespace course {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using VF = Vectorized<float>;
constexpr int64_t L = VF::size();

// Round to the storage type and back: what an op that returns T does to its fp32 result.
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// Up to L values of p as fp32 (n valid, the rest 0).
inline VF load(const float* p, int64_t n) { return VF::loadu(p, n); }
inline VF load(const c10::BFloat16* p, int64_t n) {
  float tmp[L];
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return VF::loadu(tmp, n);
}

inline float hsum(const VF& v) {
  float tmp[L];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < L; ++i) s += tmp[i];
  return s;
}

template <typename T>
float sum_squares(const T* x, int64_t n) {
  VF acc(0.f);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const VF v = load(x + i, L);
    acc = at::vec::fmadd(v, v, acc);
  }
  float s = hsum(acc);
  for (; i < n; ++i) s += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  return s;
}

// Rows whose work is under this many elements run on the calling thread: a fork costs more.
constexpr int64_t kSerialElems = 1 << 16;

template <typename T>
void rms_norm_rows(T* x, const T* residual, const T* w, T* y, int64_t M, int64_t C, float eps) {
  const int64_t grain = std::max<int64_t>(1, kSerialElems / std::max<int64_t>(C, 1));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      T* xm = x + m * C;
      if (residual) {
        // x = x + residual, rounded to T as ATen's add does; x keeps the sum.
        const T* rm = residual + m * C;
        for (int64_t c = 0; c < C; ++c) xm[c] = static_cast<T>(static_cast<float>(xm[c]) + static_cast<float>(rm[c]));
      }
      const float inv = 1.f / std::sqrt(sum_squares(xm, C) / static_cast<float>(C) + eps);
      T* ym = y + m * C;
      // Hugging Face: (x_f32 * rsqrt(var + eps)).to(T), then weight * that in T.
      for (int64_t c = 0; c < C; ++c)
        ym[c] = static_cast<T>(static_cast<float>(w[c]) * round_to<T>(static_cast<float>(xm[c]) * inv));
    }
  });
}

template <typename T>
void swiglu_rows(const T* gu, T* y, int64_t M, int64_t F) {
  const int64_t grain = std::max<int64_t>(1, kSerialElems / std::max<int64_t>(F, 1));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    float s[L];
    for (int64_t m = m0; m < m1; ++m) {
      const T* g = gu + m * 2 * F;
      const T* u = g + F;
      T* ym = y + m * F;
      for (int64_t f = 0; f < F; f += L) {
        const int64_t len = std::min(L, F - f);
        // silu(g) = g / (1 + exp(-g)) in fp32 as ATen's vectorised silu, rounded to T; times up in T.
        const VF gf = load(g + f, len);
        (gf / (VF(1.f) + gf.neg().exp())).store(s, len);
        for (int64_t i = 0; i < len; ++i) ym[f + i] = static_cast<T>(round_to<T>(s[i]) * static_cast<float>(u[f + i]));
      }
    }
  });
}

// p[i] = exp(p[i] - sub) for i < n, vectorised; returns the sum.
inline float exp_shifted(float* p, int64_t n, float sub) {
  VF total(0.f);
  const VF vs(sub);
  for (int64_t i = 0; i < n; i += L) {
    const int64_t len = std::min(L, n - i);
    const VF e = (VF::loadu(p + i, len) - vs).exp();
    e.store(p + i, len);
    // The lanes past len hold exp(0 - sub) from the zero fill: mask them out of the sum.
    total = total + (len == L ? e : VF::set(VF(0.f), e, len));
  }
  return hsum(total);
}

// q or k of one head (hd values of T) rotated to position p, Hugging Face's half-split layout:
// out = x * cos + rotate_half(x) * sin with each product and the sum rounded to T.
template <typename T>
void rope_head(const T* x, const T* cos, const T* sin, int64_t hd, float* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; ++i) {
    const float xi = static_cast<float>(x[i]);
    const float rot = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    const float a = round_to<T>(xi * static_cast<float>(cos[i]));
    const float b = round_to<T>(rot * static_cast<float>(sin[i]));
    out[i] = round_to<T>(a + b);
  }
}

// The sum of v's lanes as a tree (the attention's dot products: one per position and head).
inline float hsum_tree(const VF& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  return hsum(v);
#endif
}

// Step 2 of decode_attention for one sequence b and one key/value head j with its G query heads
// at once, head_dim CH * L, fp32 cache: each cached key and value is loaded once for the G
// heads, and the G heads' queries and sums stay in registers (CH * G vectors each).
template <int G, int CH, typename T>
void attend_group(const T* qkv, const T* cos, const T* sin, const float* kh, const float* vh, int64_t b, int64_t j,
                  int64_t p, int64_t H, int64_t KV, T* y, std::vector<float>& scores) {
  constexpr int64_t hd = CH * L;
  const int64_t row = (H + 2 * KV) * hd, n = p + 1;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  VF q[G][CH];
  float qf[hd];
  for (int g = 0; g < G; ++g) {
    rope_head(qkv + b * row + (j * G + g) * hd, cos + p * hd, sin + p * hd, hd, qf);
    for (int c = 0; c < CH; ++c) q[g][c] = VF::loadu(qf + c * L);
  }
  scores.resize(G * n);
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < n; ++s) {
    VF k[CH];
    for (int c = 0; c < CH; ++c) k[c] = VF::loadu(kh + s * hd + c * L);
    for (int g = 0; g < G; ++g) {
      VF d = q[g][0] * k[0];
      for (int c = 1; c < CH; ++c) d = at::vec::fmadd(q[g][c], k[c], d);
      const float sc = hsum_tree(d) * scale;
      scores[g * n + s] = sc;
      mx[g] = std::max(mx[g], sc);
    }
  }
  float total[G];
  for (int g = 0; g < G; ++g) total[g] = exp_shifted(scores.data() + g * n, n, mx[g]);
  VF acc[G][CH];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CH; ++c) acc[g][c] = VF(0.f);
  for (int64_t s = 0; s < n; ++s) {
    VF v[CH];
    for (int c = 0; c < CH; ++c) v[c] = VF::loadu(vh + s * hd + c * L);
    for (int g = 0; g < G; ++g) {
      const VF e(scores[g * n + s]);
      for (int c = 0; c < CH; ++c) acc[g][c] = at::vec::fmadd(e, v[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g) {
    T* yo = y + b * H * hd + (j * G + g) * hd;
    const VF inv(1.f / total[g]);
    float o[hd];
    for (int c = 0; c < CH; ++c) (acc[g][c] * inv).store(o + c * L);
    for (int64_t i = 0; i < hd; ++i) yo[i] = static_cast<T>(o[i]);
  }
}

// Whether attend_group has an instance for g heads a group and head_dim hd with cache type C.
template <typename C>
bool grouped_ok(int64_t g, int64_t hd) {
  return std::is_same<C, float>::value && hd == 4 * L && g >= 1 && g <= 4;
}

// attend_group for a group of g heads (grouped_ok<C>(g, hd) holds).
template <typename T, typename C>
void attend_group_any(int64_t g, const T* qkv, const T* cos, const T* sin, const C* kh, const C* vh, int64_t b,
                      int64_t j, int64_t p, int64_t H, int64_t KV, T* y, std::vector<float>& sc) {
  if constexpr (std::is_same<C, float>::value) {
    switch (g) {
      case 1: return attend_group<1, 4>(qkv, cos, sin, kh, vh, b, j, p, H, KV, y, sc);
      case 2: return attend_group<2, 4>(qkv, cos, sin, kh, vh, b, j, p, H, KV, y, sc);
      case 3: return attend_group<3, 4>(qkv, cos, sin, kh, vh, b, j, p, H, KV, y, sc);
      default: return attend_group<4, 4>(qkv, cos, sin, kh, vh, b, j, p, H, KV, y, sc);
    }
  }
}

template <typename T, typename C>
void decode_attention(const T* qkv, const T* cos, const T* sin, C* cache_k, C* cache_v, const int64_t* pos,
                      const int64_t* rows, T* y, int64_t B, int64_t H, int64_t KV, int64_t hd, int64_t cap) {
  const int64_t row = (H + 2 * KV) * hd;
  // 1. This token's k (rotated) and v into the cache at its position. Small: B * KV * hd * 2.
  std::vector<float> tmp(hd);
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = pos[b], r = rows ? rows[b] : b;
    const T* kb = qkv + b * row + H * hd;
    const T* vb = kb + KV * hd;
    for (int64_t j = 0; j < KV; ++j) {
      rope_head(kb + j * hd, cos + p * hd, sin + p * hd, hd, tmp.data());
      C* kd = cache_k + ((r * KV + j) * cap + p) * hd;
      C* vd = cache_v + ((r * KV + j) * cap + p) * hd;
      for (int64_t i = 0; i < hd; ++i) {
        kd[i] = static_cast<C>(tmp[i]);
        vd[i] = static_cast<C>(static_cast<float>(vb[j * hd + i]));
      }
    }
    work += (p + 1) * hd * H;
  }
  // 2. Each (sequence, query head) over positions 0..=pos of its key/value head, in fp32.
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t group = H / KV;
  const int64_t grain = work * 2 < kSerialElems ? B * H : 1;
  // Grouped: one work item per (sequence, key/value head) and its query heads together.
  if (grouped_ok<C>(group, hd)) {
    at::parallel_for(0, B * KV, work * 2 < kSerialElems ? B * KV : 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> sc;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / KV, j = t % KV, r = rows ? rows[b] : b;
        attend_group_any<T, C>(group, qkv, cos, sin, cache_k + (r * KV + j) * cap * hd,
                               cache_v + (r * KV + j) * cap * hd, b, j, pos[b], H, KV, y, sc);
      }
    });
    return;
  }
  at::parallel_for(0, B * H, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> q(hd), acc(hd), scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H, j = h / group, p = pos[b], n = p + 1, r = rows ? rows[b] : b;
      rope_head(qkv + b * row + h * hd, cos + p * hd, sin + p * hd, hd, q.data());
      const C* kh = cache_k + (r * KV + j) * cap * hd;
      const C* vh = cache_v + (r * KV + j) * cap * hd;
      scores.resize(n);
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < n; ++s) {
        VF d(0.f);
        for (int64_t i = 0; i < hd; i += L) {
          const int64_t len = std::min(L, hd - i);
          d = at::vec::fmadd(VF::loadu(q.data() + i, len), load(kh + s * hd + i, len), d);
        }
        scores[s] = hsum(d) * scale;
        mx = std::max(mx, scores[s]);
      }
      const float total = exp_shifted(scores.data(), n, mx);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < n; ++s) {
        const VF e(scores[s]);
        for (int64_t i = 0; i < hd; i += L) {
          const int64_t len = std::min(L, hd - i);
          at::vec::fmadd(e, load(vh + s * hd + i, len), VF::loadu(acc.data() + i, len)).store(acc.data() + i, len);
        }
      }
      T* yo = y + b * H * hd + h * hd;
      const float invt = 1.f / total;
      for (int64_t i = 0; i < hd; ++i) yo[i] = static_cast<T>(acc[i] * invt);
    }
  });
}

template void rms_norm_rows<float>(float*, const float*, const float*, float*, int64_t, int64_t, float);
template void rms_norm_rows<c10::BFloat16>(c10::BFloat16*, const c10::BFloat16*, const c10::BFloat16*,
                                           c10::BFloat16*, int64_t, int64_t, float);
template void swiglu_rows<float>(const float*, float*, int64_t, int64_t);
template void swiglu_rows<c10::BFloat16>(const c10::BFloat16*, c10::BFloat16*, int64_t, int64_t);
#define COURSE_DECODE_ATTENTION(T, C)                                                                       \
  template void decode_attention<T, C>(const T*, const T*, const T*, C*, C*, const int64_t*, const int64_t*, T*, int64_t, \
                                       int64_t, int64_t, int64_t, int64_t);
COURSE_DECODE_ATTENTION(float, float)
COURSE_DECODE_ATTENTION(c10::BFloat16, float)
COURSE_DECODE_ATTENTION(c10::BFloat16, c10::BFloat16)
#undef COURSE_DECODE_ATTENTION

}  // namespace CPU_CAPABILITY
}  // namespace course
