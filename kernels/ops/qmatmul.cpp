// y = x W^T with W (N, K) stored quantized — int8 per row, NF4 (block 64, double-quantized
// absmaxes), ggml Q4_1 and Q8_0 — for inference and for LoRA / QLoRA training over a frozen
// quantized base. Argument checks, the choice of instruction set, the GEMM path, the autograd
// function and the C ABI over the kernels of qmatmul_cpu.cpp (and, with --features cuda, of
// qmatmul.cu: a warp-per-row GEMV, and W decoded for cuBLAS where rows are many). The references (dequantize, then
// a matmul in fp32) are in modules/course/ops/qmatmul.rs.
//
// - At most kGemvRows (8) rows of x (decoding): qgemv, W decoded in registers, both cores over rows
//   of W.
// - More rows (prefill, training): W in panels of rows, each decoded into a tile in x's dtype
//   (a few hundred KB, in L2) and multiplied by ATen's GEMM on one core; the cores take panels.
//   A panel is decoded once for all the rows of x, so decoding costs K N against the GEMM's
//   M K N.
// - Backward (the gradient to x only: W is frozen): dx = dy W, with W decoded into a temporary
//   in dy's dtype and freed; the graph keeps only the quantized bytes, never a dense W.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "dispatch.h"
#include "ops.h"

namespace course {
namespace {

// Up to 8 rows (continuous batching's decode step: a few sequences, one token each) the GEMV reads
// W once for all of them (the CUDA GEMV takes at most 4).
constexpr int64_t kGemvRows = 8;
constexpr int64_t kGemvRowsCuda = 4;

#ifdef COURSE_CUDA
}  // namespace
// qmatmul.cu: the GEMV (at most 4 rows) and W decoded into `out`, on the current CUDA stream.
void qgemv_cuda(const QWeight& w, const at::Tensor& x, at::Tensor& y);
void qdequant_cuda(const QWeight& w, at::Tensor& out);
namespace {
#endif

const char* format_name(QFormat f) {
  switch (f) {
    case QFormat::Int8: return "int8";
    case QFormat::Nf4: return "nf4";
    case QFormat::Q4_1: return "q4_1";
    case QFormat::Q8_0: return "q8_0";
  }
  return "?";
}

// The weight's tensors: data, scale, absmax_q, code8, code16 (unused ones undefined).
struct QTensors {
  QFormat format;
  int64_t N, K;
  at::Tensor data, scale, absmax_q, code8, code16;
  double offset;
  bool act8 = false;  // the GEMV may quantize x to int8 blocks (qlinear_int8_activations)
  at::Tensor tiles;   // Q4_1 / Q8_0: the blocks in row-interleaved tiles (course_qtiles), or undefined
};

void check_tensor(const char* fmt, const char* what, const at::Tensor& t, at::ScalarType dt, int64_t numel,
                  int64_t N, int64_t K) {
  TORCH_CHECK(t.defined(), "qlinear (", fmt, "): ", what, " is missing");
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), "qlinear (", fmt, "): ", what, " must be on the CPU or a CUDA device, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dt, "qlinear (", fmt, "): ", what, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "qlinear (", fmt, "): ", what, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, "qlinear (", fmt, "): ", what, " holds ", t.numel(), " numbers, expected ", numel,
              " for a (", N, ", ", K, ") weight");
}

void check_weight(const QTensors& q) {
  const char* f = format_name(q.format);
  for (const at::Tensor* t : {&q.scale, &q.absmax_q, &q.code8, &q.code16}) {
    TORCH_CHECK(!t->defined() || !q.data.defined() || t->device() == q.data.device(), "qlinear (", f,
                "): the weight's tensors are on different devices (", q.data.device(), " and ", t->device(), ")");
  }
  TORCH_CHECK(q.N > 0 && q.K > 0, "qlinear (", f, "): the weight's shape (", q.N, ", ", q.K, ") must be positive");
  switch (q.format) {
    case QFormat::Int8:
      check_tensor(f, "q", q.data, at::kChar, q.N * q.K, q.N, q.K);
      check_tensor(f, "scale", q.scale, at::kFloat, q.N, q.N, q.K);
      break;
    case QFormat::Nf4: {
      TORCH_CHECK(q.K % 2 == 0, "qlinear (nf4): in_features ", q.K, " must be even (two numbers a byte, rows whole)");
      TORCH_CHECK((q.N * q.K) % kNf4Block == 0, "qlinear (nf4): the weight's ", q.N, " x ", q.K,
                  " numbers are not a whole number of 64-number blocks");
      const int64_t nb = q.N * q.K / kNf4Block;
      check_tensor(f, "packed", q.data, at::kByte, q.N * q.K / 2, q.N, q.K);
      check_tensor(f, "absmax_q", q.absmax_q, at::kByte, nb, q.N, q.K);
      check_tensor(f, "nested_absmax", q.scale, at::kFloat, (nb + kNf4NestedBlock - 1) / kNf4NestedBlock, q.N, q.K);
      check_tensor(f, "nested_code", q.code8, at::kFloat, 256, q.N, q.K);
      check_tensor(f, "code", q.code16, at::kFloat, 16, q.N, q.K);
      break;
    }
    case QFormat::Q4_1:
    case QFormat::Q8_0: {
      TORCH_CHECK(q.K % 32 == 0, "qlinear (", f, "): in_features ", q.K, " must be a multiple of ggml's block of 32");
      const int64_t bb = q.format == QFormat::Q4_1 ? 20 : 34;
      check_tensor(f, "blocks", q.data, at::kByte, q.N * (q.K / 32) * bb, q.N, q.K);
      break;
    }
  }
}

QWeight raw(const QTensors& q) {
  QWeight w{};
  w.format = q.format;
  w.N = q.N;
  w.K = q.K;
  w.data = static_cast<const uint8_t*>(q.data.const_data_ptr());
  if (q.scale.defined()) w.scale = q.scale.const_data_ptr<float>();
  if (q.absmax_q.defined()) w.absmax_q = q.absmax_q.const_data_ptr<uint8_t>();
  if (q.code8.defined()) w.code8 = q.code8.const_data_ptr<float>();
  if (q.code16.defined()) w.code16 = q.code16.const_data_ptr<float>();
  w.offset = static_cast<float>(q.offset);
  w.act8 = q.act8;
  if (q.tiles.defined() && q.tiles.is_cpu()) w.tiles = q.tiles.const_data_ptr<uint8_t>();
  return w;
}

template <typename T>
void gemv_isa(const QWeight& w, const T* x, T* y, int64_t M) {
  COURSE_ISA_CALL(qgemv<T>, w, x, y, M)
}
bool act8_isa(const QWeight& w) { COURSE_ISA_CALL(qgemv_act8_supported, w) }
template <typename T>
void dequant_isa(const QWeight& w, int64_t n0, int64_t n1, T* out) {
  COURSE_ISA_CALL(qdequant_rows<T>, w, n0, n1, out)
}

void check_input(const QTensors& q, const at::Tensor& x) {
  const char* f = format_name(q.format);
  TORCH_CHECK(x.defined(), "qlinear (", f, "): the input is undefined");
  TORCH_CHECK(x.device() == q.data.device(), "qlinear (", f, "): the input is on ", x.device(),
              " but the weight on ", q.data.device());
#ifndef COURSE_CUDA
  TORCH_CHECK(x.is_cpu(), "qlinear (", f, "): the input is on ", x.device(),
              ", and this build has only the CPU kernels (build with --features cuda)");
#endif
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "qlinear (", f,
              "): the input must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == q.K, "qlinear (", f, "): the input's last dimension is ",
              x.dim() ? x.size(-1) : 0, " (shape ", x.sizes(), ") but the weight has in_features ", q.K);
}

// W decoded, (N, K) in dtype dt on the weight's device; on the CPU all cores over rows.
at::Tensor dequantize(const QTensors& q, at::ScalarType dt) {
  auto out = at::empty({q.N, q.K}, q.data.options().dtype(dt));
  const QWeight w = raw(q);
#ifdef COURSE_CUDA
  if (out.is_cuda()) {
    qdequant_cuda(w, out);
    return out;
  }
#endif
  at::parallel_for(0, q.N, 16, [&](int64_t n0, int64_t n1) {
    if (dt == at::kFloat)
      dequant_isa<float>(w, n0, n1, out.mutable_data_ptr<float>() + n0 * q.K);
    else
      dequant_isa<c10::BFloat16>(w, n0, n1, out.mutable_data_ptr<c10::BFloat16>() + n0 * q.K);
  });
  return out;
}

#if defined(__x86_64__)
// The AMX GEMM is opt-in: COURSE_AMX=1, or course_qmatmul_amx(1) (the benchmark's A/B switch).
// On the Intel Xeon it measured slower than the default path, whose ATen bf16 GEMM (oneDNN) runs
// on AMX tiles itself: 0.90 against 0.63 ms for 128 x 576 -> 1536 (benches/qmatmul.rs), as our
// decode-and-pack of W is not yet vectorised.
bool amx_default() {
  const char* e = std::getenv("COURSE_AMX");
  return e && std::strcmp(e, "1") == 0;
}
std::atomic<bool> amx_wanted{amx_default()};
// A cap below AVX-512 (ATEN_CPU_CAPABILITY) keeps the tiles off too.
bool amx_enabled() {
  return amx_wanted.load(std::memory_order_relaxed) && cpu_isa() == Isa::Avx512 && amx::ready();
}

// y (M, N) bf16 = x2 (M, K) bf16 W^T on AMX tiles: x copied once into a zero-padded (Mp, Kp)
// buffer; per panel of W, its rows decoded to bf16 (the AVX-512 decoders), packed into AMX's pair
// layout, multiplied into an fp32 (Mp, panel) block and rounded into y. No autograd or tensor
// work happens in the workers.
void gemm_amx(const QWeight& w, const at::Tensor& x2, at::Tensor& y, int64_t panel, int64_t panels) {
  const int64_t M = x2.size(0), K = w.K, N = w.N;
  const int64_t Kp = (K + 31) / 32 * 32, Mp = (M + 15) / 16 * 16;
  std::vector<uint16_t> xp(Mp * Kp, 0);
  const auto* xs = reinterpret_cast<const uint16_t*>(x2.const_data_ptr<c10::BFloat16>());
  for (int64_t m = 0; m < M; ++m) std::memcpy(xp.data() + m * Kp, xs + m * K, K * 2);
  auto* ys = y.mutable_data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<c10::BFloat16> tile(panel * K);
    std::vector<uint32_t> bp(panel / 16 * (Kp / 2) * 16);
    std::vector<float> c(Mp * panel);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * panel, nn = std::min(panel, N - n0), np = (nn + 15) / 16;
      dequant_isa<c10::BFloat16>(w, n0, n0 + nn, tile.data());
      amx::pack_b(reinterpret_cast<const uint16_t*>(tile.data()), nn, K, Kp, bp.data());
      amx::gemm_bf16(xp.data(), Kp, Mp, Kp, bp.data(), np, c.data(), np * 16);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < nn; ++n) ys[m * N + n0 + n] = static_cast<c10::BFloat16>(c[m * np * 16 + n]);
    }
  });
}
#endif

at::Tensor forward_nograd(const QTensors& q, const at::Tensor& x_in) {
  auto x = x_in.contiguous();
  const int64_t M = x.numel() / q.K;
  auto shape = x.sizes().vec();
  shape.back() = q.N;
  auto y = at::empty({M, q.N}, x.options());
  if (M == 0) return y.view(shape);
  const QWeight w = raw(q);
#ifdef COURSE_CUDA
  if (x.is_cuda()) {
    if (M <= kGemvRowsCuda) {
      qgemv_cuda(w, x, y);
      return y.view(shape);
    }
    return at::mm(x.view({M, q.K}), dequantize(q, x.scalar_type()).t()).view(shape);
  }
#endif
  // With tiles (Q4_1 / Q8_0 and int8 activations) every row count takes the GEMV, in passes of
  // 8 rows over the tiles: on 2 cores it prefills ~4x faster than the dequantizing GEMM.
  const bool tiled = w.act8 && w.tiles && qtile_ok(w.format, w.N, w.K) && act8_isa(w);
  if (M <= kGemvRows || tiled) {
    if (x.scalar_type() == at::kFloat)
      gemv_isa<float>(w, x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), M);
    else
      gemv_isa<c10::BFloat16>(w, x.const_data_ptr<c10::BFloat16>(), y.mutable_data_ptr<c10::BFloat16>(), M);
    return y.view(shape);
  }
  // Panels of rows of W: two per thread at least (for balance), 16 to 256 rows each.
  const int64_t threads = at::get_num_threads();
  int64_t panel = (q.N + 2 * threads - 1) / (2 * threads);
  panel = std::min<int64_t>(256, std::max<int64_t>(16, (panel + 15) / 16 * 16));
  const int64_t panels = (q.N + panel - 1) / panel;
  auto x2 = x.view({M, q.K});
  const auto dt = x.scalar_type();
#if defined(__x86_64__)
  if (dt == at::kBFloat16 && amx_enabled()) {
    gemm_amx(w, x2, y, panel, panels);
    return y.view(shape);
  }
#endif
  // The caller's inference mode, for the worker threads (y is an inference tensor when the
  // caller is in inference mode, and only inference mode may write into one).
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    c10::InferenceMode mode(inference);
    at::NoGradGuard no_grad;
    auto tile = at::empty({panel, q.K}, x.options());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * panel, nn = std::min(panel, q.N - n0);
      if (dt == at::kFloat)
        dequant_isa<float>(w, n0, n0 + nn, tile.mutable_data_ptr<float>());
      else
        dequant_isa<c10::BFloat16>(w, n0, n0 + nn, tile.mutable_data_ptr<c10::BFloat16>());
      y.narrow(1, n0, nn).copy_(at::mm(x2, tile.narrow(0, 0, nn).t()));
    }
  });
  return y.view(shape);
}

struct QLinearFunction : public torch::autograd::Function<QLinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& data,
                            const at::Tensor& scale, const at::Tensor& absmax_q, const at::Tensor& code8,
                            const at::Tensor& code16, int64_t format, double offset, int64_t N, int64_t K) {
    ctx->save_for_backward({data, scale, absmax_q, code8, code16});
    ctx->saved_data["format"] = format;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["N"] = N;
    ctx->saved_data["K"] = K;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto u = [](const at::Tensor& t) { return t.numel() ? t : at::Tensor(); };
    QTensors q{static_cast<QFormat>(format), N, K, data, u(scale), u(absmax_q), u(code8), u(code16), offset};
    return forward_nograd(q, x);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "qlinear: double backward (create_graph=true) is not supported");
    auto s = ctx->get_saved_variables();
    auto u = [](const at::Tensor& t) { return t.numel() ? t : at::Tensor(); };  // see placeholder()
    QTensors q{static_cast<QFormat>(ctx->saved_data["format"].toInt()),
               ctx->saved_data["N"].toInt(),
               ctx->saved_data["K"].toInt(),
               s[0],
               u(s[1]),
               u(s[2]),
               u(s[3]),
               u(s[4]),
               ctx->saved_data["offset"].toDouble()};
    auto g = grads[0].contiguous();
    auto shape = g.sizes().vec();
    shape.back() = q.K;
    auto gx = at::mm(g.view({-1, q.N}), dequantize(q, g.scalar_type())).view(shape);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// autograd's apply refuses undefined tensor arguments: a format's unused side tensors travel as
// empty ones and come back undefined in the backward.
at::Tensor placeholder(const at::Tensor& t) { return t.defined() ? t : at::empty({0}); }

// format: the id (0 int8, 1 nf4, 2 q4_1, 3 q8_0), plus kAct8 for int8 activations in the GEMV.
constexpr int kAct8 = 0x100;

QTensors from_abi(int format, course_tensor* t, double offset, int64_t N, int64_t K) {
  const bool act8 = format & kAct8;
  format &= ~kAct8;
  TORCH_CHECK(format >= 0 && format <= 3, "qlinear: unknown format id ", format, " (0 int8, 1 nf4, 2 q4_1, 3 q8_0)");
  auto get = [&](int i) { return t[i] ? *static_cast<at::Tensor*>(t[i]) : at::Tensor(); };
  QTensors q{static_cast<QFormat>(format), N, K, get(0), get(1), get(2), get(3), get(4), offset, act8, get(5)};
  check_weight(q);
  if (q.tiles.defined()) {
    const char* f = format_name(q.format);
    TORCH_CHECK(qtile_ok(q.format, N, K), "qlinear (", f, "): tiles need Q4_1 or Q8_0 with out_features ", N,
                " a multiple of 16 and in_features ", K, " of 32");
    TORCH_CHECK(q.tiles.device() == q.data.device(), "qlinear (", f, "): the tiles are on ", q.tiles.device(),
                " but the weight on ", q.data.device());
    check_tensor(f, "tiles", q.tiles, at::kByte, N / kTileRows * (K / 32) * qtile_block_bytes(q.format), N, K);
  }
  return q;
}

}  // namespace
}  // namespace course

extern "C" {

// tensors: data, scale, absmax_q, code8, code16 (null where the format has none).
char* course_qlinear(int format, course_tensor input, course_tensor* tensors, double offset, int64_t N, int64_t K,
                     course_tensor* out) {
  COURSE_TRY({
    auto q = course::from_abi(format, tensors, offset, N, K);
    const auto& x = *static_cast<at::Tensor*>(input);
    course::check_input(q, x);
    at::Tensor y;
    if (at::GradMode::is_enabled() && x.requires_grad()) {
      using course::placeholder;
      y = course::QLinearFunction::apply(x, q.data, placeholder(q.scale), placeholder(q.absmax_q),
                                         placeholder(q.code8), placeholder(q.code16),
                                         static_cast<int64_t>(q.format), q.offset, q.N, q.K);
    } else {
      y = course::forward_nograd(q, x);
    }
    *out = new at::Tensor(y);
  })
}

// Whether the bf16 GEMM runs on AMX tiles (1) or not (0), and why, into `why` (at most `cap`
// bytes with the NUL). `enable` >= 0 first switches AMX on (1) or off (0) for this process (on
// only takes where the CPU and the kernel allow it); -1 leaves it. Asking (any `enable`) makes
// the one arch_prctl request for the tile state.
int course_qmatmul_amx(int enable, char* why, int64_t cap) {
#if defined(__x86_64__)
  if (enable >= 0) course::amx_wanted.store(enable != 0);
  std::string s = course::amx::describe();
  if (course::amx::ready() && course::cpu_isa() != course::Isa::Avx512)
    s = "off: ATen's CPU capability is below AVX-512 (ATEN_CPU_CAPABILITY)";
  else if (!course::amx_wanted.load() && course::amx::ready())
    s = "available, off (opt-in: COURSE_AMX=1 or set_amx(true))";
  const int on = course::amx_enabled() ? 1 : 0;
#else
  (void)enable;
  std::string s = "not on this CPU (not x86-64)";
  const int on = 0;
#endif
  if (why && cap > 0) {
    const size_t n = std::min<size_t>(s.size(), static_cast<size_t>(cap - 1));
    std::memcpy(why, s.data(), n);
    why[n] = 0;
  }
  return on;
}

// Whether the GEMV (at most 8 rows of x) of a weight of this format (id) and in_features K takes
// the int8-activation path when asked (AVX-512 VNNI; K % 32 == 0, NF4 K % 64 == 0): 1 or 0.
int course_qgemv_int8_activations(int format, int64_t K) {
  course::QWeight w{};
  w.format = static_cast<course::QFormat>(format & 0xFF);
  w.K = K;
  return format >= 0 && (format & 0xFF) <= 3 && course::act8_isa(w) ? 1 : 0;
}

int course_qgemv_prefetch(int mode) {
  if (mode >= 0 && mode <= 2) course::qgemv_prefetch().store(mode);
  return course::qgemv_prefetch().load();
}

// The weight's blocks (tensors[0]) repacked into row-interleaved tiles (dispatch.h), a new byte
// tensor on the CPU, for tensors[5] of the int8-activation GEMV.
char* course_qtiles(int format, course_tensor* tensors, int64_t N, int64_t K, course_tensor* out) {
  COURSE_TRY({
    auto q = course::from_abi(format & 0xFF, tensors, 0.0, N, K);
    TORCH_CHECK(course::qtile_ok(q.format, N, K), "qtiles (", course::format_name(q.format),
                "): tiles need Q4_1 or Q8_0 with out_features ", N, " a multiple of 16 and in_features ", K,
                " of 32");
    TORCH_CHECK(q.data.is_cpu(), "qtiles: the weight must be on the CPU, got ", q.data.device());
    auto t = at::empty({N / course::kTileRows * (K / 32) * course::qtile_block_bytes(q.format)},
                       q.data.options().dtype(at::kByte));
    course::qtile_pack(q.format, q.data.const_data_ptr<uint8_t>(), N, K, t.mutable_data_ptr<uint8_t>());
    *out = new at::Tensor(t);
  })
}

// W decoded into a new (N, K) tensor; kind 0 float32, 1 bfloat16.
char* course_qdequantize(int format, course_tensor* tensors, double offset, int64_t N, int64_t K, int kind,
                         course_tensor* out) {
  COURSE_TRY({
    auto q = course::from_abi(format, tensors, offset, N, K);
    TORCH_CHECK(kind == 0 || kind == 1, "qdequantize: kind ", kind, " must be 0 (float32) or 1 (bfloat16)");
    at::NoGradGuard no_grad;
    *out = new at::Tensor(course::dequantize(q, kind == 0 ? at::kFloat : at::kBFloat16));
  })
}

}  // extern "C"
