// AMX tiles (Intel Sapphire Rapids and later) for the GEMM of qmatmul.cpp: a bf16 panel of the
// quantized weight, decoded by the AVX-512 kernels, is packed into AMX's pair layout once, and
// TDPBF16PS multiplies it with 16 x 32 tiles of x, accumulating in fp32 tiles. Compiled alone
// with -mamx-tile -mamx-bf16 (build.rs), and called only once ready() has said yes.
//
// Linux gives a process no AMX state until it asks: the tile data (8 KB a thread) is an
// "extended feature" that must be requested with arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA) before any thread touches a tile, or the first tile instruction dies with
// SIGILL (llama.cpp built natively does exactly that on such machines). ready() asks once per
// process, checks the grant with ARCH_GET_XCOMP_PERM, and says why when the answer is no: the
// CPU has no AMX, the kernel refused, or COURSE_AMX=0 turned it off. Every caller then takes
// the AVX-512 path instead.
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace course {
namespace amx {
namespace {

constexpr int kArchGetXcompPerm = 0x1022;
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct Status {
  bool ready;
  std::string why;
};

Status probe() {
  const char* env = std::getenv("COURSE_AMX");
  if (env && std::strcmp(env, "0") == 0) return {false, "turned off by COURSE_AMX=0"};
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return {false, "not on this CPU (no cpuid leaf 7)"};
  // cpuid.(eax=7, ecx=0).edx: bit 22 AMX-BF16, bit 24 AMX-TILE.
  if (!(d & (1u << 24)) || !(d & (1u << 22))) return {false, "not on this CPU (no AMX-TILE and AMX-BF16)"};
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return {false, std::string("refused by the kernel: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA): ") +
                       std::strerror(errno)};
  unsigned long mask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &mask) != 0 || !(mask & (1ul << kXfeatureXtiledata)))
    return {false, "refused by the kernel: XTILEDATA is not in the permitted set after the request"};
  return {true, "amx-bf16 (tile data permitted by arch_prctl)"};
}

const Status& status() {
  static const Status s = probe();
  return s;
}

// The tile configuration (palette 1): every tile 16 rows of 64 bytes. Tiles 0-3 hold fp32 C
// blocks of 16 x 16, 4-5 bf16 A blocks of 16 x 32, 6-7 bf16 B blocks of 16 pairs x 16 columns.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// C blocks (MT x NT tiles of 16 x 16) = the A rows (MT x 16, Kp bf16 each, lda apart) times the
// B panels b0, b1 (Kp / 2 rows of 16 dwords each).
template <int MT, int NT>
void block(const uint16_t* a, int64_t lda, int64_t Kp, const uint32_t* b0, const uint32_t* b1, float* c,
           int64_t ldc) {
  _tile_zero(0);
  if (NT == 2) _tile_zero(1);
  if (MT == 2) _tile_zero(2);
  if (MT == 2 && NT == 2) _tile_zero(3);
  for (int64_t k = 0; k < Kp; k += 32) {
    _tile_loadd(4, a + k, lda * 2);
    if (MT == 2) _tile_loadd(5, a + 16 * lda + k, lda * 2);
    _tile_loadd(6, b0 + k / 2 * 16, 64);
    if (NT == 2) _tile_loadd(7, b1 + k / 2 * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if (MT == 2) _tile_dpbf16ps(2, 5, 6);
    if (MT == 2 && NT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ldc * 4);
  if (NT == 2) _tile_stored(1, c + 16, ldc * 4);
  if (MT == 2) _tile_stored(2, c + 16 * ldc, ldc * 4);
  if (MT == 2 && NT == 2) _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

}  // namespace

bool ready() { return status().ready; }
const char* describe() { return status().why.c_str(); }

void pack_b(const uint16_t* w, int64_t nn, int64_t K, int64_t Kp, uint32_t* bp) {
  const int64_t np = (nn + 15) / 16, half = Kp / 2;
  for (int64_t p = 0; p < np; ++p) {
    uint32_t* out = bp + p * half * 16;
    for (int64_t c = 0; c < 16; ++c) {
      const int64_t n = p * 16 + c;
      const uint16_t* row = w + n * K;
      for (int64_t kp = 0; kp < half; ++kp) {
        const int64_t k = 2 * kp;
        uint32_t v = 0;
        if (n < nn) {
          const uint32_t lo = k < K ? row[k] : 0, hi = k + 1 < K ? row[k + 1] : 0;
          v = lo | (hi << 16);
        }
        out[kp * 16 + c] = v;
      }
    }
  }
}

void gemm_bf16(const uint16_t* a, int64_t lda, int64_t Mp, int64_t Kp, const uint32_t* bp, int64_t np, float* c,
               int64_t ldc) {
  configure();
  const int64_t panel = Kp / 2 * 16;  // dwords per 16-column panel of B
  // m outer: a 32-row strip of A (32 Kp bf16) stays in L1/L2 while every B panel passes it.
  for (int64_t m = 0; m < Mp; m += 32) {
    const bool two_m = m + 32 <= Mp;
    const uint16_t* am = a + m * lda;
    for (int64_t j = 0; j < np; j += 2) {
      const bool two_n = j + 2 <= np;
      const uint32_t* b0 = bp + j * panel;
      const uint32_t* b1 = two_n ? b0 + panel : b0;
      float* cm = c + m * ldc + j * 16;
      if (two_m && two_n)
        block<2, 2>(am, lda, Kp, b0, b1, cm, ldc);
      else if (two_m)
        block<2, 1>(am, lda, Kp, b0, b1, cm, ldc);
      else if (two_n)
        block<1, 2>(am, lda, Kp, b0, b1, cm, ldc);
      else
        block<1, 1>(am, lda, Kp, b0, b1, cm, ldc);
    }
  }
  _tile_release();
}

}  // namespace amx
}  // namespace course
