// CPU kernels for y = x W^T where W is stored quantized (量化): int8 with a scale per output row,
// NF4 in 64-number blocks with double-quantized absmaxes (QLoRA / bitsandbytes), and ggml's Q4_1
// and Q8_0 blocks of 32 as a GGUF file holds them. Compiled once per instruction set like the
// other CPU kernels (see dispatch.h).
//
// - qgemv: a few rows of x (decoding), the weight decoded in registers and never written out.
//   The work is bound by reading W: 4-bit weights are an eighth of fp32's bytes, so the kernel
//   has to decode faster than DRAM delivers. Per 16 numbers on AVX-512 the NF4 decode is a
//   byte duplication, one variable shift, a mask and one 16-entry table lookup in a register
//   (vpermps); Q4_1 is a mask or a shift and a fused multiply-add; int8 a sign extension.
//   Every block's sum is kept in a vector and scaled once per block.
// - qdequant_rows: rows of W decoded to fp32/bf16 (the GEMM tiles of qmatmul.cpp and the
//   backward's dequantization use it).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dispatch.h"

namespace course {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using VF = Vectorized<float>;
constexpr int64_t L = VF::size();

constexpr int64_t kMaxRows = 4;       // rows of x per pass (fp32 x)
constexpr int64_t kMaxRows8 = 8;      // rows of x per pass (int8 x: two accumulators a row)
constexpr int64_t kPrefetchRows = 8;  // rows of W ahead, non-temporal (as in gemv_cpu.cpp)

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return _cvtsh_ss(h);  // F16C: one instruction (c10::Half's portable conversion is a dozen)
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

inline float hsum(const VF& v) {
  return at::vec::vec_reduce_all<float>([](const VF& a, const VF& b) { return a + b; }, v);
}

// ---- decoders: n (<= L) numbers into one fp32 vector; lanes past n are unspecified but finite
// (the x they meet is loaded with zeros there).

// n int8 numbers from p.
inline VF dec_i8(const int8_t* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i b = n >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                            : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1), p);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
#elif defined(CPU_CAPABILITY_AVX2)
  int64_t v = 0;
  std::memcpy(&v, p, n >= 8 ? 8 : n);
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(v)));
#else
  float t[L] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return VF::loadu(t);
#endif
}

// Numbers j .. j + L of a ggml 4-bit block's 16 bytes `qs`: the low nibbles are numbers 0-15,
// the high ones 16-31 (j in [0, 32), a multiple of L).
inline VF dec_q4(const uint8_t* qs, int64_t j) {
  const int64_t byte = j & 15;
  const int shift = j >= 16 ? 4 : 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + byte)));
  return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, shift), _mm512_set1_epi32(15)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + byte)));
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, shift), _mm256_set1_epi32(15)));
#else
  float t[L];
  for (int64_t i = 0; i < L; ++i) t[i] = static_cast<float>((qs[byte + i] >> shift) & 15);
  return VF::loadu(t);
#endif
}

// n (even, <= L) NF4 numbers from their n / 2 bytes at p (the first of a byte in its high
// nibble), as code values.
inline VF dec_nf4(const uint8_t* p, int64_t n, const float* code16) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i b = n >= 16 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))
                            : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (n / 2)) - 1), p);
  const __m512i v = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));  // b0 b0 b1 b1 ...
  const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32(15));
  return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(code16));
#elif defined(CPU_CAPABILITY_AVX2)
  int32_t w = 0;
  std::memcpy(&w, p, n >= 8 ? 4 : n / 2);
  const __m128i b = _mm_cvtsi32_si128(w);
  const __m256i v = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
  const __m256i shifts = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(v, shifts), _mm256_set1_epi32(15));
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(code16), idx);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(code16 + 8), idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
#else
  float t[L] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = code16[(p[i / 2] >> (i % 2 ? 0 : 4)) & 15];
  return VF::loadu(t);
#endif
}

inline VF loadx(const float* x, int64_t n) { return n >= L ? VF::loadu(x) : VF::loadu(x, n); }

// NF4 absmax of block b (double quantization undone).
// Mode 2's prefetch in the row loops: the line kStreamAhead bytes on, into L1 (prefetcht0),
// one for each 64 bytes read, so the lines in flight keep pace with the loop and run on across
// rows and 4 KB pages, where the hardware's streamer stops. On the Intel Xeon (300 MB L3) this
// took the int8-activation GEMVs at 4096 x 4096 from DRAM from about 12 to 15-20 GB/s, where
// row-ahead prefetches (mode 1, or a whole row 8 KB ahead into L2) had changed nothing; 2, 4, 6,
// 8 and 12 KB ahead were all within the machine's noise of each other.
constexpr int64_t kStreamAhead = 6144;
inline void pf(const void* p, int64_t ahead) {
  if (ahead) __builtin_prefetch(static_cast<const char*>(p) + ahead, 0, 3);
}
// One fused multiply-add, spelled out: left to the compiler, whether it contracted the product
// and the sum differed between inlined copies (the GEMV for one row of x and for several), and
// a row's result with it.
inline float nf4_absmax(const QWeight& w, int64_t b) {
  return std::fma(w.code8[w.absmax_q[b]], w.scale[static_cast<uint64_t>(b) / kNf4NestedBlock], w.offset);
}

inline const uint8_t* row_bytes(const QWeight& w, int64_t n) {
  switch (w.format) {
    case QFormat::Int8: return w.data + n * w.K;
    case QFormat::Nf4: return w.data + n * w.K / 2;
    case QFormat::Q4_1: return w.data + n * (w.K / 32) * 20;
    case QFormat::Q8_0: return w.data + n * (w.K / 32) * 34;
  }
  return w.data;
}

inline int64_t row_size(const QWeight& w) {
  switch (w.format) {
    case QFormat::Int8: return w.K;
    case QFormat::Nf4: return w.K / 2;
    case QFormat::Q4_1: return (w.K / 32) * 20;
    case QFormat::Q8_0: return (w.K / 32) * 34;
  }
  return w.K;
}

// The software prefetch of W's rows (qgemv_prefetch() in dispatch.h): mode 1 the whole row
// kPrefetchRows ahead, non-temporal, at the start of each row; mode 2 in the row loops
// (pf above, kStreamAhead bytes ahead).
inline void prefetch_ahead(const QWeight& w, int64_t n, int64_t n1, int64_t rs, int mode) {
  if (mode != 1 || n + kPrefetchRows >= n1) return;
  const char* p = reinterpret_cast<const char*>(row_bytes(w, n + kPrefetchRows));
  for (int64_t b = 0; b < rs; b += 64) __builtin_prefetch(p + b, 0, 0);
}

// The rows of x as the row kernels read them: fp32 (zero-padded), and for NF4 on AVX-512 each
// 32-block of x with its even-indexed numbers first, then the odd ones (`xp`): the order in
// which the high and the low nibbles of 16 NF4 bytes come out, so the bytes need no
// interleaving. Computed once per call.
template <int64_t M>
struct XRows {
  const float* x[M];
  const float* xp[M];
};

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kWide = true;

// The AVX-512 row kernels. Each keeps every product of a block in its own register and the
// blocks' scaled sums in two accumulators taken in turn: with one accumulator a row is a chain
// of dependent fused multiply-adds (4 cycles each), which on the Zen 4 held int8 at 0.78 ms per
// 4096 x 4096 on two cores against 0.44 ms once the chains were split.

inline __m512 i8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int64_t M>
void row_dot_int8(const QWeight& w, const int8_t* q, const XRows<M>& x, float scale, float* out, int64_t pfd) {
  const int64_t K = w.K;
  __m512 acc[M][4];
  for (int64_t m = 0; m < M; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    pf(q + k, pfd);
    const __m512 w0 = i8x16(q + k), w1 = i8x16(q + k + 16), w2 = i8x16(q + k + 32), w3 = i8x16(q + k + 48);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x.x[m] + k;
      acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xm + 48), acc[m][3]);
    }
  }
  for (; k < K; k += 16) {
    const int64_t c = std::min<int64_t>(16, K - k);
    const __mmask16 mk = static_cast<__mmask16>((1u << c) - 1);
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + k)));
    for (int64_t m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, x.x[m] + k), acc[m][0]);
  }
  for (int64_t m = 0; m < M; ++m)
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]))) * scale;
}

// Q8_0 (K % 32 == 0): 34-byte blocks, fp16 d then 32 int8.
template <int64_t M>
void row_dot_q8_0(const QWeight& w, const uint8_t* r, const XRows<M>& x, float* out, int64_t pfd) {
  __m512 acc[M][2];
  for (int64_t m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0, b = 0; k < w.K; k += 32, r += 34, ++b) {
    if ((b & 1) == 0) pf(r, pfd);
    const __m512 dv = _mm512_set1_ps(half_to_float(r));
    const int8_t* q = reinterpret_cast<const int8_t*>(r + 2);
    const __m512 w0 = i8x16(q), w1 = i8x16(q + 16);
    for (int64_t m = 0; m < M; ++m) {
      const __m512 blk =
          _mm512_fmadd_ps(w1, _mm512_loadu_ps(x.x[m] + k + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(x.x[m] + k)));
      acc[m][b & 1] = _mm512_fmadd_ps(blk, dv, acc[m][b & 1]);
    }
  }
  for (int64_t m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

// Q4_1 (K % 32 == 0) and NF4 (K % 32 == 0) share one inner step: 16 bytes widened to 16 lanes,
// and two lookups in a 16-value table held in a register (vpermps reads only an index's low 4
// bits, so the byte itself indexes its low nibble and the byte shifted right by 4 its high one).
// The table is built per block with the block's scale folded in — Q4_1: d i + m for i = 0..15;
// NF4: code[i] times the block's absmax — so the looked-up values are the weights themselves
// and go straight into the accumulators. Q4_1's low nibbles are numbers 0-15 of the block and
// the high ones 16-31; NF4's high nibbles are the even numbers and the low ones the odd, which
// is why NF4 reads x in the even-then-odd order (XRows::xp).
template <int64_t M>
void row_dot_q4_1(const QWeight& w, const uint8_t* r, const XRows<M>& x, float* out, int64_t pfd) {
  __m512 acc[M][4];
  for (int64_t m = 0; m < M; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t k = 0, b = 0; k < w.K; k += 32, r += 20, ++b) {
    if ((b & 3) == 0) pf(r, pfd);
    const __m512 lut = _mm512_fmadd_ps(iota, _mm512_set1_ps(half_to_float(r)), _mm512_set1_ps(half_to_float(r + 2)));
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 4)));
    const __m512 lo = _mm512_permutexvar_ps(v, lut);
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    const int u = 2 * (b & 1);
    for (int64_t m = 0; m < M; ++m) {
      acc[m][u] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x.x[m] + k), acc[m][u]);
      acc[m][u + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x.x[m] + k + 16), acc[m][u + 1]);
    }
  }
  for (int64_t m = 0; m < M; ++m)
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
}

template <int64_t M>
void row_dot_nf4(const QWeight& w, int64_t n, const XRows<M>& x, float* out, int64_t pfd) {
  const int64_t K = w.K, e0 = n * K;
  __m512 acc[M][4];
  for (int64_t m = 0; m < M; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(w.code16);
  for (int64_t k = 0; k < K;) {
    const int64_t b = (e0 + k) / kNf4Block;
    const int64_t end = std::min(K, (b + 1) * kNf4Block - e0);
    const __m512 lut = _mm512_mul_ps(code, _mm512_set1_ps(nf4_absmax(w, b)));
    for (int64_t j = k; j < end; j += 32) {
      if ((j & 127) == 0) pf(w.data + (e0 + j) / 2, pfd);
      const __m512i v =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.data + (e0 + j) / 2)));
      const __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
      const __m512 wl = _mm512_permutexvar_ps(v, lut);
      const int u = (j & 32) ? 2 : 0;
      for (int64_t m = 0; m < M; ++m) {
        acc[m][u] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(x.xp[m] + j), acc[m][u]);
        acc[m][u + 1] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(x.xp[m] + j + 16), acc[m][u + 1]);
      }
    }
    k = end;
  }
  for (int64_t m = 0; m < M; ++m)
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
}

// ---- int8 activations (llama.cpp's route, opt-in through QWeight::act8): each row of x is
// quantized to int8 in blocks (32 numbers for ggml's formats, 64 for NF4: a scale d = absmax /
// 127 and the block's sum s of q), and each block of W meets its block of x in VPDPBUSD, which
// multiplies 64 unsigned by 64 signed bytes and adds them in fours into 16 int32 lanes: one
// instruction for what the fp32 path does in eight. The weights enter as unsigned bytes: Q4_1's
// nibbles as they are (0..15); Q8_0's int8 plus 128 (one xor), NF4's 16 code values as
// round(127 c) + 128 through a byte shuffle; the 128 comes back out as 128 s per block. So
//   Q4_1: d_w d_x sum(q_w q_x) + m_w d_x s;   Q8_0: d_w d_x (sum(u_w q_x) - 128 s);
//   NF4:  (a / 127) d_x (sum(u_w q_x) - 128 s).
// A step takes two blocks (Q4_1, Q8_0: 64 numbers; NF4: 128) in one 512-bit register, x laid out
// to match the order the weight bytes come apart in; a row's last block, when the count is odd,
// goes through 256-bit registers. Needs AVX-512 VNNI (cpuid), K % 32 == 0 (NF4: K % 64 == 0).
#define COURSE_VNNI __attribute__((target("avx512vnni")))

inline bool cpu_has_vnni() {
  static const bool v = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((c >> 11) & 1);
  }();
  return v;
}

// One row of x quantized, in the order of the row kernel's steps.
struct XQ {
  std::vector<int8_t> q;   // K numbers
  std::vector<float> dv;   // per full step, 16 lanes: d_x of the block each int32 lane sums
  std::vector<float> d;    // per block: d_x
  std::vector<float> ds;   // per block: d_x s
  std::vector<float> dsp;  // per full step, 4 lanes: Q4_1 (0, ds_b, 0, ds_b+1), Q8_0 (ds_b, ds_b+1, 0, 0)
};

// The kernel's quantizer (the reference in ops/qmatmul.rs does the same in tch): d = absmax /
// 127, q = round-half-even(x / d), 0 where the block is all zeros.
void quantize_x(const float* x, int64_t K, QFormat f, XQ& o) {
  const int64_t B = f == QFormat::Nf4 ? 64 : 32, nb = K / B;
  std::vector<int8_t> nat(K);
  o.q.resize(K);
  o.d.resize(nb);
  o.ds.resize(nb);
  for (int64_t b = 0; b < nb; ++b) {
    float amax = 0.f;
    for (int64_t i = 0; i < B; ++i) amax = std::max(amax, std::fabs(x[b * B + i]));
    const float d = amax / 127.f;
    int32_t sum = 0;
    for (int64_t i = 0; i < B; ++i) {
      const int32_t q = d > 0.f ? static_cast<int32_t>(std::nearbyint(x[b * B + i] / d)) : 0;
      nat[b * B + i] = static_cast<int8_t>(std::max(-127, std::min(127, q)));
      sum += nat[b * B + i];
    }
    o.d[b] = d;
    o.ds[b] = d * static_cast<float>(sum);
  }
  // Steps of two blocks; lanes of block b+1 under the mask (Q4_1: int32 lanes 4-7 and 12-15;
  // Q8_0, NF4: 8-15).
  const uint32_t mask = f == QFormat::Q4_1 ? 0xF0F0u : 0xFF00u;
  o.dv.assign(nb / 2 * 16, 0.f);
  o.dsp.assign(nb / 2 * 4, 0.f);
  for (int64_t b = 0; b + 2 <= nb; b += 2) {
    for (int l = 0; l < 16; ++l) o.dv[b / 2 * 16 + l] = o.d[b + ((mask >> l) & 1)];
    float* dsp = o.dsp.data() + b / 2 * 4;
    if (f == QFormat::Q4_1) {
      dsp[1] = o.ds[b];
      dsp[3] = o.ds[b + 1];
    } else {
      dsp[0] = o.ds[b];
      dsp[1] = o.ds[b + 1];
    }
    const int8_t* q0 = nat.data() + b * B;
    const int8_t* q1 = q0 + B;
    int8_t* out = o.q.data() + b * B;
    if (f == QFormat::Q4_1) {  // [q0 0-15 | q1 0-15 | q0 16-31 | q1 16-31]: low nibbles, then high
      std::memcpy(out, q0, 16);
      std::memcpy(out + 16, q1, 16);
      std::memcpy(out + 32, q0 + 16, 16);
      std::memcpy(out + 48, q1 + 16, 16);
    } else if (f == QFormat::Nf4) {  // [q0 even | q1 even | q0 odd | q1 odd]: high nibbles, then low
      for (int i = 0; i < 32; ++i) {
        out[i] = q0[2 * i];
        out[32 + i] = q1[2 * i];
        out[64 + i] = q0[2 * i + 1];
        out[96 + i] = q1[2 * i + 1];
      }
    } else {
      std::memcpy(out, q0, 2 * B);
    }
  }
  if (nb % 2) {  // the last block alone: natural order (Q4_1, Q8_0), [even | odd] (NF4)
    const int64_t b = nb - 1;
    const int8_t* q0 = nat.data() + b * B;
    int8_t* out = o.q.data() + b * B;
    if (f == QFormat::Nf4) {
      for (int i = 0; i < 32; ++i) {
        out[i] = q0[2 * i];
        out[32 + i] = q0[2 * i + 1];
      }
    } else {
      std::memcpy(out, q0, B);
    }
  }
}

inline float hsum128(__m128 s) {
  const __m128 t = _mm_add_ps(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehl_ps(t, t)));
}

inline float hsum256(__m256 v) { return hsum128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1))); }

// One full step of the Q4_1 / Q8_0 rows: the weight bytes w of blocks b and b + 1 against each row
// of x, scaled per lane by dw and x's d, into accumulator U; the blocks' pair of scales s4 meets
// x's dsp lanes. The row loops take two steps at a time, one per accumulator, so that U is a
// constant and the accumulators stay in registers (a run-time index kept them on the stack, a
// store-to-load round trip on every step).
template <int64_t M, int U>
COURSE_VNNI inline void pair_step(__m512i w, __m512 dw, __m128 s4, const XQ* x, int64_t b, __m512 (*acc)[2],
                                  __m128* corr4) {
  for (int64_t m = 0; m < M; ++m) {
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(x[m].q.data() + b * 32));
    acc[m][U] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_loadu_ps(x[m].dv.data() + b / 2 * 16)),
                                acc[m][U]);
    corr4[m] = _mm_fmadd_ps(s4, _mm_loadu_ps(x[m].dsp.data() + b / 2 * 4), corr4[m]);
  }
}

// Blocks b and b + 1 of a Q4_1 row (40 bytes at r).
template <int64_t M, int U>
COURSE_VNNI inline void q4_1_pair(const uint8_t* r, int64_t b, const XQ* x, __m512 (*acc)[2], __m128* corr4) {
  const __m512i didx = _mm512_set_epi32(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m256i v = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 4))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 24)), 1);
  const __m512i w = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1), m4);
  // The two blocks' (d, m) in one conversion: (d0, m0, d1, m1); d0 to lanes of block b, d1 to
  // those of b + 1; the m's meet (0, ds_b, 0, ds_b+1) in a 4-lane sum.
  uint32_t h0, h1;
  std::memcpy(&h0, r, 4);
  std::memcpy(&h1, r + 20, 4);
  const __m128 dm = _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<int64_t>(h0 | (static_cast<uint64_t>(h1) << 32))));
  pair_step<M, U>(w, _mm512_permutexvar_ps(didx, _mm512_castps128_ps512(dm)), dm, x, b, acc, corr4);
}

// Blocks b and b + 1 of a Q8_0 row (68 bytes at r).
template <int64_t M, int U>
COURSE_VNNI inline void q8_0_pair(const uint8_t* r, int64_t b, const XQ* x, __m512 (*acc)[2], __m128* corr4) {
  const __m512i didx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i w = _mm512_xor_si512(
      _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 2))),
                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 36)), 1),
      bias);
  // (d0, d1) in one conversion; the 128 s terms as a 4-lane sum against (ds_b, ds_b+1, 0, 0).
  uint16_t h0, h1;
  std::memcpy(&h0, r, 2);
  std::memcpy(&h1, r + 34, 2);
  const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(h0 | (static_cast<uint32_t>(h1) << 16))));
  pair_step<M, U>(w, _mm512_permutexvar_ps(didx, _mm512_castps128_ps512(dd)), dd, x, b, acc, corr4);
}

// The full pairs of blocks of a Q4_1 / Q8_0 row (BB bytes a block, r advanced past them), two
// pairs a loop turn, one per accumulator; returns the index of the block left over, if any.
using PairFn = void (*)(const uint8_t*, int64_t, const XQ*, __m512 (*)[2], __m128*);
template <int64_t BB, PairFn P0, PairFn P1>
COURSE_VNNI inline int64_t full_pairs(const uint8_t*& r, int64_t nb, const XQ* x, __m512 (*acc)[2], __m128* corr4,
                                      int64_t pfd) {
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4, r += 4 * BB) {
    pf(r, pfd);
    if (4 * BB > 64) pf(r + 64, pfd);
    P0(r, b, x, acc, corr4);
    P1(r + 2 * BB, b + 2, x, acc, corr4);
  }
  if (b + 2 <= nb) {
    P0(r, b, x, acc, corr4);
    b += 2;
    r += 2 * BB;
  }
  return b;
}

template <int64_t M>
COURSE_VNNI void row_dot_q4_1_vnni(const uint8_t* r, int64_t K, const XQ* x, float* out, int64_t pfd) {
  const int64_t nb = K / 32;
  __m512 acc[M][2];
  __m128 corr4[M];
  for (int64_t m = 0; m < M; ++m) {
    acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    corr4[m] = _mm_setzero_ps();
  }
  int64_t b = full_pairs<20, q4_1_pair<M, 0>, q4_1_pair<M, 1>>(r, nb, x, acc, corr4, pfd);
  for (int64_t m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + hsum128(corr4[m]);
  if (b < nb) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 4));
    const __m256i w = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1),
                                       _mm256_set1_epi8(0x0F));
    const float d0 = half_to_float(r), m0 = half_to_float(r + 2);
    for (int64_t m = 0; m < M; ++m) {
      const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w,
                                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m].q.data() + b * 32)));
      const float o = std::fma(d0 * x[m].d[b], hsum256(_mm256_cvtepi32_ps(dot)), out[m]);  // fma: see nf4_pair
      out[m] = std::fma(m0, x[m].ds[b], o);
    }
  }
}

template <int64_t M>
COURSE_VNNI void row_dot_q8_0_vnni(const uint8_t* r, int64_t K, const XQ* x, float* out, int64_t pfd) {
  const int64_t nb = K / 32;
  __m512 acc[M][2];
  __m128 corr4[M];
  for (int64_t m = 0; m < M; ++m) {
    acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    corr4[m] = _mm_setzero_ps();
  }
  int64_t b = full_pairs<34, q8_0_pair<M, 0>, q8_0_pair<M, 1>>(r, nb, x, acc, corr4, pfd);
  for (int64_t m = 0; m < M; ++m)
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) - 128.f * hsum128(corr4[m]);
  if (b < nb) {
    const __m256i w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 2)),
                                       _mm256_set1_epi8(static_cast<char>(0x80)));
    const float d0 = half_to_float(r);
    for (int64_t m = 0; m < M; ++m) {
      const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w,
                                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m].q.data() + b * 32)));
      const float o = std::fma(d0 * x[m].d[b], hsum256(_mm256_cvtepi32_ps(dot)), out[m]);  // fma: see nf4_pair
      out[m] = std::fma(-128.f * d0, x[m].ds[b], o);
    }
  }
}

// NF4 (K % 64 == 0, so a row holds whole blocks): the code as bytes, round(127 c) + 128.
inline __m512i nf4_code_bytes(const float* code16) {
  alignas(16) uint8_t t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(127.f * code16[i])) + 128);
  return _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// Blocks j and j + 1 of an NF4 row (64 bytes at p; bj the first one's index in the weight) into
// accumulator U (see pair_step).
template <int64_t M, int U>
COURSE_VNNI inline void nf4_pair(const QWeight& w, const uint8_t* p, int64_t bj, int64_t j, const __m512i lut,
                                 const XQ* x, __m512 (*acc)[2], float (*corr)[2]) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i bytes = _mm512_loadu_si512(p);
  const __m512i wh = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), m4));
  const __m512i wl = _mm512_shuffle_epi8(lut, _mm512_and_si512(bytes, m4));
  constexpr float k127 = 1.f / 127.f;
  const float a0 = nf4_absmax(w, bj) * k127, a1 = nf4_absmax(w, bj + 1) * k127;
  const __m512 sw = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a0), _mm512_set1_ps(a1));
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = x[m].q.data() + j * 64;
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wh, _mm512_loadu_si512(xq)), wl,
                                            _mm512_loadu_si512(xq + 64));
    acc[m][U] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sw, _mm512_loadu_ps(x[m].dv.data() + j / 2 * 16)),
                                acc[m][U]);
    // std::fma spelled out: left to the compiler, the contraction of these scalar products
    // differed between row counts (vectorised across m or not), and a row's result with it.
    corr[m][U] -= 128.f * std::fma(a0, x[m].ds[j], a1 * x[m].ds[j + 1]);
  }
}

template <int64_t M>
COURSE_VNNI void row_dot_nf4_vnni(const QWeight& w, int64_t n, const __m512i lut, const XQ* x, float* out,
                                  int64_t pfd) {
  const int64_t K = w.K, nb = K / 64, b0 = n * nb;  // b0: the row's first block
  const uint8_t* p = w.data + n * K / 2;
  __m512 acc[M][2];
  float corr[M][2];
  for (int64_t m = 0; m < M; ++m) {
    acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    corr[m][0] = corr[m][1] = 0.f;
  }
  int64_t j = 0;
  for (; j + 4 <= nb; j += 4, p += 128) {
    pf(p, pfd);
    pf(p + 64, pfd);
    nf4_pair<M, 0>(w, p, b0 + j, j, lut, x, acc, corr);
    nf4_pair<M, 1>(w, p + 64, b0 + j + 2, j + 2, lut, x, acc, corr);
  }
  if (j + 2 <= nb) {
    nf4_pair<M, 0>(w, p, b0 + j, j, lut, x, acc, corr);
    j += 2;
    p += 64;
  }
  for (int64_t m = 0; m < M; ++m)
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + (corr[m][0] + corr[m][1]);
  if (j < nb) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i lut2 = _mm512_castsi512_si256(lut), m4y = _mm256_set1_epi8(0x0F);
    const __m256i wh = _mm256_shuffle_epi8(lut2, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4y));
    const __m256i wl = _mm256_shuffle_epi8(lut2, _mm256_and_si256(bytes, m4y));
    const float a0 = nf4_absmax(w, b0 + j) * (1.f / 127.f);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xq = x[m].q.data() + j * 64;
      const __m256i dot = _mm256_dpbusd_epi32(
          _mm256_dpbusd_epi32(_mm256_setzero_si256(), wh, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))), wl,
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32)));
      const float o = std::fma(a0 * x[m].d[j], hsum256(_mm256_cvtepi32_ps(dot)), out[m]);
      out[m] = std::fma(-128.f * a0, x[m].ds[j], o);
    }
  }
}

bool act8_ok(const QWeight& w) {
  if (!cpu_has_vnni()) return false;
  switch (w.format) {
    case QFormat::Q4_1:
    case QFormat::Q8_0: return w.K % 32 == 0;
    case QFormat::Nf4: return w.K % 64 == 0;
    default: return false;
  }
}

// ---- the int8-activation GEMV over row-interleaved tiles (QWeight::tiles, dispatch.h). One
// register holds 4 numbers of each of 16 weight rows, so VPDPBUSD against x's 4 bytes broadcast
// gives 16 rows' partial sums at once, and a block's 8 of them end in one int32 register of 16
// rows: one conversion and two FMAs per block per row of x, for 512 products, where the row
// layout pays that per 64. The rows of x share every decoded weight register. A row of x goes
// through the same instructions whatever the others are, so its result does not depend on them.
struct XN {
  std::vector<int8_t> q;  // K numbers, natural order
  std::vector<float> d;   // per block of 32: d_x
  std::vector<float> ds;  // per block: d_x s (Q8_0's: -128 d_x s)
};

// As quantize_x (d = absmax / 127, q = round-half-even(x / d), 0 for an all-zero block), 16
// numbers a step: the division is IEEE's, so q is the scalar quantizer's bit for bit.
COURSE_VNNI void quantize_x_nat(const float* x, int64_t K, bool q8_0, XN& o) {
  const int64_t nb = K / 32;
  o.q.resize(K);
  o.d.resize(nb);
  o.ds.resize(nb);
  const __m512 lim = _mm512_set1_ps(127.f);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + b * 32), x1 = _mm512_loadu_ps(x + b * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float d = amax / 127.f;
    int32_t sum = 0;
    if (d > 0.f) {
      const __m512 vd = _mm512_set1_ps(d);
      auto quant = [&](__m512 v) {
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim));
      };
      const __m512i q0 = quant(x0), q1 = quant(x1);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o.q.data() + b * 32), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o.q.data() + b * 32 + 16), _mm512_cvtsepi32_epi8(q1));
      sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    } else {
      std::memset(o.q.data() + b * 32, 0, 32);
    }
    o.d[b] = d;
    o.ds[b] = (q8_0 ? -128.f : 1.f) * (d * static_cast<float>(sum));
  }
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Tile t's 16 outputs for M rows of x (Q8 = Q8_0, else Q4_1), into out[m * 16 ..].
template <int64_t M, bool Q8>
COURSE_VNNI void tile_dot(const uint8_t* p, int64_t nb, const XN* x, float* out, int64_t pfd) {
  constexpr int64_t TB = Q8 ? 544 : 320;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[M];
  for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, p += TB) {
    if (pfd)
      for (int64_t l = 0; l < TB; l += 64) pf(p + l, pfd);
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    // Q4_1: the rows' m's; Q8_0: d again (its correction is -128 d_w d_x s, the -128 in x's ds).
    const __m512 mw = Q8 ? dw : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
    __m512i w[8];
    if constexpr (Q8) {
      for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(p + 32 + 64 * j);
    } else {
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(p + 64 + 64 * c);
        w[c] = _mm512_and_si512(v, m4);
        w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      }
    }
    // The 8 dot products of a block, quads in the outer loop so the rows' chains interleave;
    // with few rows each row's chain splits in two (int32 sums: exact in any grouping, so a
    // row's result is the same bits whatever M is).
    constexpr int P = M <= 4 ? 2 : 1;
    __m512i s[M][P];
    for (int64_t m = 0; m < M; ++m)
      for (int i = 0; i < P; ++i) s[m][i] = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j)
      for (int64_t m = 0; m < M; ++m)
        s[m][j % P] = _mm512_dpbusd_epi32(s[m][j % P], w[j], _mm512_set1_epi32(load4(x[m].q.data() + b * 32 + 4 * j)));
    for (int64_t m = 0; m < M; ++m) {
      const __m512i t = P == 2 ? _mm512_add_epi32(s[m][0], s[m][P - 1]) : s[m][0];
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(dw, _mm512_set1_ps(x[m].d[b])), acc[m]);
      acc[m] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x[m].ds[b]), acc[m]);
    }
  }
  for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(out + m * 16, acc[m]);
}

// The M rows of x (each K long) quantized for the tile GEMV.
template <typename T>
void quantize_rows_nat(const QWeight& w, const T* x, int64_t M, std::vector<XN>& out) {
  const int64_t K = w.K;
  out.resize(M);
  std::vector<float> xf;
  for (int64_t m = 0; m < M; ++m) {
    const float* row;
    if constexpr (std::is_same<T, float>::value) {
      row = x + m * K;
    } else {
      xf.resize(K);
      for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(x[m * K + k]);
      row = xf.data();
    }
    quantize_x_nat(row, K, w.format == QFormat::Q8_0, out[m]);
  }
}

template <typename T, int64_t M>
void gemv_tiles_act8(const QWeight& w, const XN* xq, T* y, int64_t t0, int64_t t1) {
  const int64_t K = w.K, N = w.N, nb = K / 32;
  const bool q8 = w.format == QFormat::Q8_0;
  const int mode = qgemv_prefetch().load(std::memory_order_relaxed);
  const int64_t pfd = mode == 2 ? kStreamAhead : 0;
  const int64_t tb = qtile_block_bytes(w.format);
  alignas(64) float out[M * 16];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* p = w.tiles + t * nb * tb;
    if (q8)
      tile_dot<M, true>(p, nb, xq, out, pfd);
    else
      tile_dot<M, false>(p, nb, xq, out, pfd);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < 16; ++r) y[m * N + t * 16 + r] = static_cast<T>(out[m * 16 + r]);
  }
}

template <typename T, int64_t M>
void gemv_rows_act8(const QWeight& w, const T* x, T* y, int64_t n0, int64_t n1) {
  const int64_t K = w.K, N = w.N;
  XQ xq[M];
  std::vector<float> xf(K);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(x[m * K + k]);
    quantize_x(xf.data(), K, w.format, xq[m]);
  }
  const __m512i lut = w.format == QFormat::Nf4 ? nf4_code_bytes(w.code16) : _mm512_setzero_si512();
  const int64_t rs = row_size(w);
  const int mode = qgemv_prefetch().load(std::memory_order_relaxed);
  const int64_t pfd = mode == 2 ? kStreamAhead : 0;
  float out[M];
  for (int64_t n = n0; n < n1; ++n) {
    prefetch_ahead(w, n, n1, rs, mode);
    switch (w.format) {
      case QFormat::Q4_1: row_dot_q4_1_vnni<M>(row_bytes(w, n), K, xq, out, pfd); break;
      case QFormat::Q8_0: row_dot_q8_0_vnni<M>(row_bytes(w, n), K, xq, out, pfd); break;
      default: row_dot_nf4_vnni<M>(w, n, lut, xq, out, pfd); break;
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = static_cast<T>(out[m]);
  }
}
#else
constexpr bool kWide = false;
bool act8_ok(const QWeight&) { return false; }
template <typename T, int64_t M>
void gemv_rows_act8(const QWeight&, const T*, T*, int64_t, int64_t) {}
struct XN {};
template <typename T>
void quantize_rows_nat(const QWeight&, const T*, int64_t, std::vector<XN>&) {}
template <typename T, int64_t M>
void gemv_tiles_act8(const QWeight&, const XN*, T*, int64_t, int64_t) {}
#endif

// out[m] = x[m] . W[n] for M rows of x (fp32, each K long).
template <int64_t M>
void row_dot(const QWeight& w, int64_t n, const XRows<M>& xr, float* out, int64_t pfd) {
  const int64_t K = w.K;
  const uint8_t* r = row_bytes(w, n);
#if defined(CPU_CAPABILITY_AVX512)
  switch (w.format) {
    case QFormat::Int8: return row_dot_int8<M>(w, reinterpret_cast<const int8_t*>(r), xr, w.scale[n], out, pfd);
    case QFormat::Q8_0: return row_dot_q8_0<M>(w, r, xr, out, pfd);
    case QFormat::Q4_1: return row_dot_q4_1<M>(w, r, xr, out, pfd);
    case QFormat::Nf4:
      if (K % 32 == 0) return row_dot_nf4<M>(w, n, xr, out, pfd);
      break;
  }
#endif
  const float* const* x = xr.x;
  VF acc[M];
  for (int64_t m = 0; m < M; ++m) acc[m] = VF(0.f);
  switch (w.format) {
    case QFormat::Int8: {
      const int8_t* q = reinterpret_cast<const int8_t*>(r);
      for (int64_t k = 0; k < K; k += L) {
        const int64_t c = std::min(L, K - k);
        const VF wv = dec_i8(q + k, c);
        for (int64_t m = 0; m < M; ++m) acc[m] = at::vec::fmadd(wv, loadx(x[m] + k, c), acc[m]);
      }
      for (int64_t m = 0; m < M; ++m) out[m] = hsum(acc[m]) * w.scale[n];
      return;
    }
    case QFormat::Q8_0: {
      for (int64_t k = 0; k < K; k += 32, r += 34) {
        const VF d(half_to_float(r));
        const int8_t* q = reinterpret_cast<const int8_t*>(r + 2);
        VF blk[M];
        for (int64_t m = 0; m < M; ++m) blk[m] = VF(0.f);
        for (int64_t j = 0; j < 32; j += L) {
          const VF wv = dec_i8(q + j, L);
          for (int64_t m = 0; m < M; ++m) blk[m] = at::vec::fmadd(wv, VF::loadu(x[m] + k + j), blk[m]);
        }
        for (int64_t m = 0; m < M; ++m) acc[m] = at::vec::fmadd(blk[m], d, acc[m]);
      }
      break;
    }
    case QFormat::Q4_1: {
      VF accm[M];
      for (int64_t m = 0; m < M; ++m) accm[m] = VF(0.f);
      for (int64_t k = 0; k < K; k += 32, r += 20) {
        const VF d(half_to_float(r)), mn(half_to_float(r + 2));
        const uint8_t* qs = r + 4;
        VF bq[M], bx[M];
        for (int64_t m = 0; m < M; ++m) bq[m] = bx[m] = VF(0.f);
        for (int64_t j = 0; j < 32; j += L) {
          const VF qv = dec_q4(qs, j);
          for (int64_t m = 0; m < M; ++m) {
            const VF xv = VF::loadu(x[m] + k + j);
            bq[m] = at::vec::fmadd(qv, xv, bq[m]);
            bx[m] = bx[m] + xv;
          }
        }
        // sum (q d + m) x = d sum q x + m sum x
        for (int64_t m = 0; m < M; ++m) {
          acc[m] = at::vec::fmadd(bq[m], d, acc[m]);
          accm[m] = at::vec::fmadd(bx[m], mn, accm[m]);
        }
      }
      for (int64_t m = 0; m < M; ++m) acc[m] = acc[m] + accm[m];
      break;
    }
    case QFormat::Nf4: {
      const int64_t e0 = n * K;  // flat index of the row's first number (blocks run across rows)
      for (int64_t k = 0; k < K;) {
        const int64_t b = (e0 + k) / kNf4Block;
        const int64_t end = std::min(K, (b + 1) * kNf4Block - e0);
        const uint8_t* p = w.data + (e0 + k) / 2;
        VF blk[M];
        for (int64_t m = 0; m < M; ++m) blk[m] = VF(0.f);
        for (int64_t j = k; j < end; j += L, p += L / 2) {
          const int64_t c = std::min(L, end - j);
          const VF cv = dec_nf4(p, c, w.code16);
          for (int64_t m = 0; m < M; ++m) blk[m] = at::vec::fmadd(cv, loadx(x[m] + j, c), blk[m]);
        }
        const VF a(nf4_absmax(w, b));
        for (int64_t m = 0; m < M; ++m) acc[m] = at::vec::fmadd(blk[m], a, acc[m]);
        k = end;
      }
      break;
    }
  }
  for (int64_t m = 0; m < M; ++m) out[m] = hsum(acc[m]);
}

// W's row n decoded into out (K fp32).
void row_decode(const QWeight& w, int64_t n, float* out) {
  const int64_t K = w.K;
  const uint8_t* r = row_bytes(w, n);
  switch (w.format) {
    case QFormat::Int8: {
      const int8_t* q = reinterpret_cast<const int8_t*>(r);
      const VF s(w.scale[n]);
      int64_t k = 0;
      for (; k + L <= K; k += L) (dec_i8(q + k, L) * s).store(out + k);
      if (k < K) (dec_i8(q + k, K - k) * s).store(out + k, K - k);
      return;
    }
    case QFormat::Q8_0:
      for (int64_t k = 0; k < K; k += 32, r += 34) {
        const VF d(half_to_float(r));
        const int8_t* q = reinterpret_cast<const int8_t*>(r + 2);
        for (int64_t j = 0; j < 32; j += L) (dec_i8(q + j, L) * d).store(out + k + j);
      }
      return;
    case QFormat::Q4_1:
      for (int64_t k = 0; k < K; k += 32, r += 20) {
        const VF d(half_to_float(r)), mn(half_to_float(r + 2));
        for (int64_t j = 0; j < 32; j += L) at::vec::fmadd(dec_q4(r + 4, j), d, mn).store(out + k + j);
      }
      return;
    case QFormat::Nf4: {
      const int64_t e0 = n * K;
      for (int64_t k = 0; k < K;) {
        const int64_t b = (e0 + k) / kNf4Block;
        const int64_t end = std::min(K, (b + 1) * kNf4Block - e0);
        const VF a(nf4_absmax(w, b));
        const uint8_t* p = w.data + (e0 + k) / 2;
        for (int64_t j = k; j < end; j += L, p += L / 2) {
          const int64_t c = std::min(L, end - j);
          (dec_nf4(p, c, w.code16) * a).store(out + j, c);
        }
        k = end;
      }
      return;
    }
  }
}

template <typename T, int64_t M>
void gemv_rows(const QWeight& w, const T* x, T* y, int64_t n0, int64_t n1) {
  const int64_t K = w.K, N = w.N;
  // x as fp32, each row padded to a whole number of vectors (ggml blocks read 32 at a time).
  const int64_t Kp = (K + 31) / 32 * 32 + L;
  std::vector<float> xf(M * Kp, 0.f);
  XRows<M> xr;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) xf[m * Kp + k] = static_cast<float>(x[m * K + k]);
    xr.x[m] = xf.data() + m * Kp;
  }
  std::vector<float> xp;
  if (kWide && w.format == QFormat::Nf4 && K % 32 == 0) {
    xp.assign(M * K, 0.f);
    for (int64_t m = 0; m < M; ++m) {
      float* o = xp.data() + m * K;
      for (int64_t c = 0; c < K; c += 32)
        for (int64_t i = 0; i < 16; ++i) {
          o[c + i] = xr.x[m][c + 2 * i];
          o[c + 16 + i] = xr.x[m][c + 2 * i + 1];
        }
      xr.xp[m] = o;
    }
  }
  const int64_t rs = row_size(w);
  const int mode = qgemv_prefetch().load(std::memory_order_relaxed);
  const int64_t pfd = mode == 2 ? kStreamAhead : 0;
  float out[M];
  for (int64_t n = n0; n < n1; ++n) {
    prefetch_ahead(w, n, n1, rs, mode);
    row_dot<M>(w, n, xr, out, pfd);
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = static_cast<T>(out[m]);
  }
}

bool qgemv_act8_supported(const QWeight& w) { return act8_ok(w); }

// f(std::integral_constant<int64_t, m>) for the row count m = mm (1..8): the kernels' M is a
// template argument, so each count has its own unrolled copy.
template <typename F>
void by_rows(int64_t mm, F&& f) {
  switch (mm) {
    case 1: return f(std::integral_constant<int64_t, 1>{});
    case 2: return f(std::integral_constant<int64_t, 2>{});
    case 3: return f(std::integral_constant<int64_t, 3>{});
    case 4: return f(std::integral_constant<int64_t, 4>{});
    case 5: return f(std::integral_constant<int64_t, 5>{});
    case 6: return f(std::integral_constant<int64_t, 6>{});
    case 7: return f(std::integral_constant<int64_t, 7>{});
    default: return f(std::integral_constant<int64_t, 8>{});
  }
}

// The M rows of x in passes of `per` rows: f(rows of this pass, its x, its y).
template <typename T, typename F>
void in_passes(const QWeight& w, const T* x, T* y, int64_t M, int64_t per, F&& f) {
  for (int64_t m0 = 0; m0 < M; m0 += per) f(std::min(per, M - m0), x + m0 * w.K, y + m0 * w.N);
}

template <typename T>
void qgemv(const QWeight& w, const T* x, T* y, int64_t M) {
  const bool act8 = w.act8 && act8_ok(w);
  if (act8 && w.tiles && qtile_ok(w.format, w.N, w.K)) {
    // x quantized once, before the threads split the tiles.
    std::vector<XN> xq;
    quantize_rows_nat(w, x, M, xq);
    at::parallel_for(0, w.N / kTileRows, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows8) {
        by_rows(std::min(kMaxRows8, M - m0),
                [&](auto R) { gemv_tiles_act8<T, R.value>(w, xq.data() + m0, y + m0 * w.N, t0, t1); });
      }
    });
    return;
  }
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) {
    if (act8) {
      in_passes(w, x, y, M, kMaxRows8, [&](int64_t mm, const T* xm, T* ym) {
        by_rows(mm, [&](auto R) { gemv_rows_act8<T, R.value>(w, xm, ym, n0, n1); });
      });
      return;
    }
    in_passes(w, x, y, M, kMaxRows, [&](int64_t mm, const T* xm, T* ym) {
      by_rows(std::min<int64_t>(mm, 4), [&](auto R) {
        if constexpr (R.value <= 4) gemv_rows<T, R.value>(w, xm, ym, n0, n1);
      });
    });
  });
}

template <typename T>
void qdequant_rows(const QWeight& w, int64_t n0, int64_t n1, T* out) {
  std::vector<float> row;
  if (!std::is_same<T, float>::value) row.resize(w.K + L);
  for (int64_t n = n0; n < n1; ++n) {
    T* o = out + (n - n0) * w.K;
    if constexpr (std::is_same<T, float>::value) {
      row_decode(w, n, o);
    } else {
      row_decode(w, n, row.data());
      for (int64_t k = 0; k < w.K; ++k) o[k] = static_cast<T>(row[k]);
    }
  }
}

template void qgemv<float>(const QWeight&, const float*, float*, int64_t);
template void qgemv<c10::BFloat16>(const QWeight&, const c10::BFloat16*, c10::BFloat16*, int64_t);
template void qdequant_rows<float>(const QWeight&, int64_t, int64_t, float*);
template void qdequant_rows<c10::BFloat16>(const QWeight&, int64_t, int64_t, c10::BFloat16*);

}  // namespace CPU_CAPABILITY
}  // namespace course
