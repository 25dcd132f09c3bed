// Run-time choice among the CPU kernels compiled once per instruction set (build.rs compiles
// bias_gelu_cpu.cpp, cross_entropy_cpu.cpp, gemv_cpu.cpp, llama_cpu.cpp, qmatmul_cpu.cpp and dropout_cpu.cpp with CPU_CAPABILITY = DEFAULT, AVX2 and AVX512), following ATen's own
// dispatch: at::get_cpu_capability() reads the CPU and honours ATEN_CPU_CAPABILITY.
#pragma once
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#if defined(__x86_64__) && !defined(__CUDACC__)
#include <cpuid.h>
#endif

namespace course {

// The instruction set ATen itself dispatches to ("DEFAULT", "AVX2", "AVX512", ...; honours the
// ATEN_CPU_CAPABILITY environment variable), read once.
enum class Isa { Default, Avx2, Avx512 };
inline Isa cpu_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(__x86_64__)
    if (cap.rfind("AVX512", 0) == 0) return Isa::Avx512;
    if (cap == "AVX2") return Isa::Avx2;
#endif
    return Isa::Default;
  }();
  return isa;
}

// Whether the GEMV kernels (gemv_cpu.cpp, qmatmul_cpu.cpp) issue non-temporal software prefetches
// of W's rows ahead. On the 2-core AMD Zen 4 they lifted the DRAM stream from about 60 % of the
// read bandwidth (the hardware prefetcher alone); on the Intel Xeon with a 300 MB L3 the same
// prefetches made the int8 GEMV at 4096 x 4096 3.3x slower (0.77 -> 2.5 ms): the lines they
// bring skip L2 and left the 48 KB L1 before their use. So: on for AMD, off elsewhere;
// COURSE_PREFETCH=1 or 0 overrides (the quantized GEMVs follow qgemv_prefetch() below).
inline bool nta_prefetch() {
  static const bool on = [] {
    const char* e = std::getenv("COURSE_PREFETCH");
    if (e && *e) return e[0] == '1';
#if defined(__x86_64__) && !defined(__CUDACC__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
#else
    return false;
#endif
  }();
  return on;
}

// How the quantized GEMVs (qmatmul_cpu.cpp) prefetch W in software: 0 not at all, 1 non-temporal
// (prefetchnta of whole rows, 8 rows ahead, as nta_prefetch() above), 2 streamed (prefetcht0 in
// the row loops, one line for each 64 bytes read, 6 KB ahead). The default: 1 on AMD (measured
// there as nta_prefetch() says), 2 elsewhere — on the Intel Xeon the streamed prefetch took the
// int8-activation GEMVs at 4096 x 4096 from DRAM from 1.8-3.1x to 2.8-4.4x fp32, where the other
// two modes were no faster than none (benches/qmatmul.rs times all three side by side, warm and
// from DRAM). COURSE_PREFETCH=0, 1 or 2 overrides, and course_qgemv_prefetch() sets it for the
// process.
inline int qgemv_prefetch_default() {
  const char* e = std::getenv("COURSE_PREFETCH");
  if (e && (*e == '0' || *e == '1' || *e == '2')) return *e - '0';
  return nta_prefetch() ? 1 : 2;
}
inline std::atomic<int>& qgemv_prefetch() {
  static std::atomic<int> mode{qgemv_prefetch_default()};
  return mode;
}

// `return <ISA>::fn(args...)` for the instruction set cpu_isa() reads (in a function of the
// op's .cpp file, inside namespace course).
#if defined(__x86_64__)
#define COURSE_ISA_CALL(fn, ...)                      \
  switch (cpu_isa()) {                                \
    case Isa::Avx512: return AVX512::fn(__VA_ARGS__); \
    case Isa::Avx2: return AVX2::fn(__VA_ARGS__);     \
    default: return DEFAULT::fn(__VA_ARGS__);         \
  }
#else
#define COURSE_ISA_CALL(fn, ...) return DEFAULT::fn(__VA_ARGS__);
#endif

// A quantized weight W (N, K) as raw pointers (qmatmul_cpu.cpp; the formats are defined in
// modules/course/nn/quant.rs and io/gguf.rs).
enum class QFormat : int32_t { Int8 = 0, Nf4 = 1, Q4_1 = 2, Q8_0 = 3 };
constexpr int64_t kNf4Block = 64;         // numbers per NF4 absmax
constexpr int64_t kNf4NestedBlock = 256;  // NF4 absmaxes per fp32 nested scale
struct QWeight {
  QFormat format;
  int64_t N, K;
  const uint8_t* data;        // int8: q (N, K); nf4: N K / 2 packed bytes; ggml: N rows of blocks
  const float* scale;         // int8: per row (N); nf4: the nested absmaxes
  const uint8_t* absmax_q;    // nf4: a byte per 64 numbers
  const float* code8;         // nf4: the 256-value code of the absmaxes
  const float* code16;        // nf4: the 16 NF4 values
  float offset;               // nf4: the absmaxes' mean
  bool act8 = false;          // the GEMV may quantize x to int8 blocks (qmatmul_cpu.cpp, VNNI)
  const uint8_t* tiles = nullptr;  // Q4_1 / Q8_0: the blocks repacked 16 rows at a time (qtile_*)
};

// Row-interleaved tiles of a Q4_1 / Q8_0 weight for the int8-activation GEMV: N / 16 tiles of
// K / 32 tile-blocks, tile-major. A tile-block holds 16 rows' block b: their 16 fp16 d's, then
// (Q4_1) their 16 fp16 m's and 4 x 64 nibble bytes, byte 4r + i of chunk c holding row r's
// numbers 4c + i (low nibble) and 16 + 4c + i (high), exactly the file's byte 4c + i of that
// block; or (Q8_0) 8 x 64 bytes, byte 4r + i of chunk j holding row r's number 4j + i plus 128.
// So one 512-bit register holds 4 numbers of each of 16 rows, one int32 lane a row.
constexpr int64_t kTileRows = 16;
inline int64_t qtile_block_bytes(QFormat f) { return f == QFormat::Q4_1 ? 320 : 544; }
inline bool qtile_ok(QFormat f, int64_t N, int64_t K) {
  return (f == QFormat::Q4_1 || f == QFormat::Q8_0) && N % kTileRows == 0 && K % 32 == 0;
}
inline void qtile_pack(QFormat f, const uint8_t* data, int64_t N, int64_t K, uint8_t* out) {
  const int64_t nb = K / 32, bb = f == QFormat::Q4_1 ? 20 : 34, tb = qtile_block_bytes(f);
  for (int64_t t = 0; t < N / kTileRows; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* o = out + (t * nb + b) * tb;
      for (int64_t r = 0; r < kTileRows; ++r) {
        const uint8_t* src = data + ((t * kTileRows + r) * nb + b) * bb;
        o[2 * r] = src[0];
        o[2 * r + 1] = src[1];
        if (f == QFormat::Q4_1) {
          o[32 + 2 * r] = src[2];
          o[32 + 2 * r + 1] = src[3];
          for (int64_t c = 0; c < 4; ++c)
            for (int64_t i = 0; i < 4; ++i) o[64 + 64 * c + 4 * r + i] = src[4 + 4 * c + i];
        } else {
          for (int64_t j = 0; j < 8; ++j)
            for (int64_t i = 0; i < 4; ++i) o[32 + 64 * j + 4 * r + i] = static_cast<uint8_t>(src[2 + 4 * j + i] ^ 0x80);
        }
      }
    }
}

#if defined(__x86_64__)
// qmatmul_amx.cpp: AMX tiles for the bf16 GEMM of qmatmul.cpp (Linux, x86-64).
namespace amx {
// Whether this process may use AMX tiles: the CPU has AMX-TILE and AMX-BF16, the kernel granted
// the tile state (arch_prctl, asked once), and COURSE_AMX is not 0. describe() says which.
bool ready();
const char* describe();
// bp: the bf16 rows w (nn of them, K each) in AMX's pair layout, in ceil(nn / 16) panels of 16
// columns, each Kp / 2 rows of 16 dwords (k and k + 1 of one column in a dword), zero-padded.
void pack_b(const uint16_t* w, int64_t nn, int64_t K, int64_t Kp, uint32_t* bp);
// c (Mp, 16 np) fp32, ldc apart = a (Mp, Kp) bf16, lda apart, times the np packed panels bp;
// Mp a multiple of 16, Kp of 32. Only after ready() said yes.
void gemm_bf16(const uint16_t* a, int64_t lda, int64_t Mp, int64_t Kp, const uint32_t* bp, int64_t np, float* c,
               int64_t ldc);
}  // namespace amx
#endif

// Raw-pointer kernels: x (M, N) row-major, bias (N).
#define COURSE_DECLARE_CPU_KERNELS(CAP)                                                                \
  namespace CAP {                                                                                      \
  template <typename T>                                                                                \
  void bias_gelu_fwd(const T* x, const T* b, T* y, int64_t M, int64_t N);                              \
  template <typename T>                                                                                \
  void bias_gelu_bwd(const T* g, const T* x, const T* b, T* gx, T* gb, int64_t M, int64_t N);          \
  /* cross_entropy_cpu.cpp: logits x (N, V), targets t (N), -1 = ignored; A = fp32 or fp64 accumulator */ \
  template <typename T, typename A>                                                                    \
  void cross_entropy_fwd(const T* x, const int64_t* t, A* lse, A* loss, int64_t N, int64_t V);            \
  template <typename T, typename A>                                                                    \
  void cross_entropy_bwd(const T* x, const int64_t* t, const A* lse, A scale, T* gx, int64_t N, int64_t V); \
  /* gemv_cpu.cpp: y (M, N) = x (M, K) w (N, K)^T for a few rows of x, fp32 accumulation */            \
  template <typename T>                                                                                \
  void skinny_matmul(const T* x, const T* w, T* y, int64_t M, int64_t N, int64_t K);                   \
  /* llama_cpu.cpp: x (M, C); residual (M, C) or null, added into x first; y = rmsnorm(x) w */          \
  template <typename T>                                                                                \
  void rms_norm_rows(T* x, const T* residual, const T* w, T* y, int64_t M, int64_t C, float eps);      \
  /* gu (M, 2F) = [gate | up] -> y (M, F) = silu(gate) * up */                                          \
  template <typename T>                                                                                \
  void swiglu_rows(const T* gu, T* y, int64_t M, int64_t F);                                           \
  /* qkv (B, (H + 2 KV) hd); cos/sin (P, hd); caches (S, KV, cap, hd); pos (B); rows (B) or NULL:  */ \
  /* sequence b uses cache row rows[b] (b when NULL); y (B, H hd) */                                   \
  template <typename T, typename C>                                                                    \
  void decode_attention(const T* qkv, const T* cos, const T* sin, C* cache_k, C* cache_v,              \
                        const int64_t* pos, const int64_t* rows, T* y, int64_t B, int64_t H, int64_t KV, \
                        int64_t hd, int64_t cap);                                                      \
  /* qmatmul_cpu.cpp: y (M, N) = x (M, K) W^T with W quantized; rows n0..n1 of W decoded */        \
  template <typename T>                                                                                \
  void qgemv(const QWeight& w, const T* x, T* y, int64_t M);                                           \
  template <typename T>                                                                                \
  void qdequant_rows(const QWeight& w, int64_t n0, int64_t n1, T* out);                                \
  /* dropout_cpu.cpp: y = x * scale where fmix32(i * 0x9E3779B9 + key) >> 8 >= threshold, else 0 */ \
  template <typename T>                                                                                \
  void dropout_apply(const T* x, T* y, int64_t n, uint32_t key, uint32_t threshold, float scale);      \
  /* whether qgemv takes the int8-activation (VNNI) path for w when w.act8 is set */                  \
  bool qgemv_act8_supported(const QWeight& w);                                                         \
  }

COURSE_DECLARE_CPU_KERNELS(DEFAULT)
COURSE_DECLARE_CPU_KERNELS(AVX2)
COURSE_DECLARE_CPU_KERNELS(AVX512)

}  // namespace course
