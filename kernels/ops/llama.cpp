// The Llama decoder's small ops outside autograd: argument checks, the choice of instruction set
// and the C ABI over the kernels in llama_cpu.cpp. Their references in plain tch ops are in
// modules/course/ops/llama.rs, which is also where the models call them from.
#include <ATen/ATen.h>

#include "dispatch.h"
#include "ops.h"

namespace course {
namespace {

template <typename T>
void rms_norm_isa(T* x, const T* r, const T* w, T* y, int64_t M, int64_t C, float eps) {
  COURSE_ISA_CALL(rms_norm_rows<T>, x, r, w, y, M, C, eps)
}
template <typename T>
void swiglu_isa(const T* gu, T* y, int64_t M, int64_t F) {
  COURSE_ISA_CALL(swiglu_rows<T>, gu, y, M, F)
}
template <typename T, typename C>
void attention_isa(const T* qkv, const T* cos, const T* sin, C* ck, C* cv, const int64_t* pos, const int64_t* rows,
                   T* y, int64_t B, int64_t H, int64_t KV, int64_t hd, int64_t cap) {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512: return AVX512::decode_attention<T, C>(qkv, cos, sin, ck, cv, pos, rows, y, B, H, KV, hd, cap);
    case Isa::Avx2: return AVX2::decode_attention<T, C>(qkv, cos, sin, ck, cv, pos, rows, y, B, H, KV, hd, cap);
#endif
    default: return DEFAULT::decode_attention<T, C>(qkv, cos, sin, ck, cv, pos, rows, y, B, H, KV, hd, cap);
  }
}

void check_float(const char* op, const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", what, " is undefined");
  TORCH_CHECK(t.is_cpu(), op, ": ", what, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", what,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(!t.requires_grad(), op, ": ", what, " requires grad, and this op has no backward (use its reference)");
}

void check_same(const char* op, const char* what, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.defined(), op, ": ", what, " is undefined");
  TORCH_CHECK(!t.requires_grad(), op, ": ", what, " requires grad, and this op has no backward (use its reference)");
  TORCH_CHECK(t.is_cpu(), op, ": ", what, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", what, " must be ", like.scalar_type(), " like the input, got ",
              t.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& w, double eps) {
  const char* op = "rms_norm";
  check_float(op, "input", x);
  check_same(op, "weight", w, x);
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), op, ": weight ", w.sizes(),
              " does not match the last dimension of input ", x.sizes());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const int64_t C = x.size(-1), M = C == 0 ? 0 : x.numel() / C;
  auto wc = w.contiguous();
  if (residual) {
    check_same(op, "residual", *residual, x);
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual ", residual->sizes(), " does not match input ",
                x.sizes());
    // The sum is written into x: it must be its own memory, laid out densely.
    TORCH_CHECK(x.is_contiguous(), op, ": with a residual the input is updated in place and must be contiguous");
  }
  auto xc = residual ? x : x.contiguous();
  auto rc = residual ? residual->contiguous() : at::Tensor();
  auto y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  if (M == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    rms_norm_isa<float>(xc.mutable_data_ptr<float>(), residual ? rc.const_data_ptr<float>() : nullptr,
                        wc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), M, C, static_cast<float>(eps));
  } else {
    using B = c10::BFloat16;
    rms_norm_isa<B>(xc.mutable_data_ptr<B>(), residual ? rc.const_data_ptr<B>() : nullptr, wc.const_data_ptr<B>(),
                    y.mutable_data_ptr<B>(), M, C, static_cast<float>(eps));
  }
  return y;
}

at::Tensor swiglu(const at::Tensor& gu_in) {
  const char* op = "swiglu";
  check_float(op, "input", gu_in);
  TORCH_CHECK(gu_in.dim() >= 1 && gu_in.size(-1) % 2 == 0, op, ": the last dimension of input ", gu_in.sizes(),
              " must be even (gate, then up)");
  auto gu = gu_in.contiguous();
  const int64_t F = gu.size(-1) / 2, M = F == 0 ? 0 : gu.numel() / (2 * F);
  auto shape = gu.sizes().vec();
  shape.back() = F;
  auto y = at::empty(shape, gu.options());
  if (M == 0) return y;
  if (gu.scalar_type() == at::kFloat) {
    swiglu_isa<float>(gu.const_data_ptr<float>(), y.mutable_data_ptr<float>(), M, F);
  } else {
    swiglu_isa<c10::BFloat16>(gu.const_data_ptr<c10::BFloat16>(), y.mutable_data_ptr<c10::BFloat16>(), M, F);
  }
  return y;
}

at::Tensor decode_attention(const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                            at::Tensor& ck, at::Tensor& cv, const at::Tensor& pos_in,
                            const std::optional<at::Tensor>& rows_in, int64_t H, int64_t KV) {
  const char* op = "decode_attention";
  check_float(op, "qkv", qkv_in);
  check_same(op, "cos", cos_in, qkv_in);
  check_same(op, "sin", sin_in, qkv_in);
  TORCH_CHECK(H > 0 && KV > 0 && H % KV == 0, op, ": heads (", H, ") must be a positive multiple of kv_heads (", KV,
              ")");
  TORCH_CHECK(ck.dim() == 4 && cv.sizes() == ck.sizes(), op, ": the caches must be (batch, kv_heads, capacity, head_dim) and alike, got ",
              ck.sizes(), " and ", cv.sizes());
  const int64_t S = ck.size(0), cap = ck.size(2), hd = ck.size(3);
  const int64_t B = rows_in ? rows_in->numel() : S;
  TORCH_CHECK(ck.size(1) == KV, op, ": the caches hold ", ck.size(1), " kv heads, kv_heads is ", KV);
  TORCH_CHECK(hd > 0 && hd % 2 == 0, op, ": head_dim must be even, got ", hd);
  TORCH_CHECK(qkv_in.dim() == 3 && qkv_in.size(0) == B && qkv_in.size(1) == 1 && qkv_in.size(2) == (H + 2 * KV) * hd,
              op, ": qkv must be (", B, ", 1, ", (H + 2 * KV) * hd, ") for ", H, " + 2 x ", KV, " heads of ", hd,
              ", got ", qkv_in.sizes());
  TORCH_CHECK(cos_in.dim() == 2 && cos_in.size(1) == hd && sin_in.sizes() == cos_in.sizes(), op,
              ": cos and sin must be (positions, ", hd, ") and alike, got ", cos_in.sizes(), " and ", sin_in.sizes());
  TORCH_CHECK(ck.is_cpu() && cv.is_cpu(), op, ": the caches must be on the CPU");
  TORCH_CHECK(ck.scalar_type() == cv.scalar_type() &&
                  (ck.scalar_type() == qkv_in.scalar_type() || ck.scalar_type() == at::kFloat),
              op, ": the caches must both be float32 or both ", qkv_in.scalar_type(), ", got ", ck.scalar_type(), " and ",
              cv.scalar_type());
  TORCH_CHECK(ck.is_contiguous() && cv.is_contiguous(), op, ": the caches are written in place and must be contiguous");
  TORCH_CHECK(pos_in.is_cpu() && pos_in.scalar_type() == at::kLong && pos_in.dim() == 1 && pos_in.size(0) == B, op,
              ": positions must be a CPU int64 tensor of ", B, " entries, got ", pos_in.scalar_type(), " ",
              pos_in.sizes());
  auto pos = pos_in.contiguous();
  at::Tensor rows;
  if (rows_in) {
    TORCH_CHECK(rows_in->is_cpu() && rows_in->scalar_type() == at::kLong && rows_in->dim() == 1, op,
                ": rows must be a CPU int64 tensor of one dimension, got ", rows_in->scalar_type(), " ",
                rows_in->sizes());
    rows = rows_in->contiguous();
    std::vector<bool> taken(S, false);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = rows.const_data_ptr<int64_t>()[b];
      TORCH_CHECK(r >= 0 && r < S, op, ": rows[", b, "] = ", r, " is outside the cache's 0..", S, " rows");
      TORCH_CHECK(!taken[r], op, ": rows[", b, "] = ", r, " is given twice (two sequences cannot share a cache row)");
      taken[r] = true;
    }
  }
  const int64_t* rp = rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr;
  const int64_t limit = std::min(cap, cos_in.size(0));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = pos.const_data_ptr<int64_t>()[b];
    TORCH_CHECK(p >= 0 && p < limit, op, ": positions[", b, "] = ", p, " is outside 0..", limit,
                " (the cache holds ", cap, " positions, the rotary table ", cos_in.size(0), ")");
  }
  auto qkv = qkv_in.contiguous();
  auto cos = cos_in.contiguous();
  auto sin = sin_in.contiguous();
  auto y = at::empty({B, 1, H * hd}, qkv.options());
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  if (qkv.scalar_type() == at::kFloat) {
    attention_isa<float, float>(qkv.const_data_ptr<float>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(),
                                ck.mutable_data_ptr<float>(), cv.mutable_data_ptr<float>(), pp, rp,
                                y.mutable_data_ptr<float>(), B, H, KV, hd, cap);
  } else {
    using Bf = c10::BFloat16;
    const Bf *q = qkv.const_data_ptr<Bf>(), *c = cos.const_data_ptr<Bf>(), *s = sin.const_data_ptr<Bf>();
    Bf* yo = y.mutable_data_ptr<Bf>();
    if (ck.scalar_type() == at::kFloat) {
      attention_isa<Bf, float>(q, c, s, ck.mutable_data_ptr<float>(), cv.mutable_data_ptr<float>(), pp, rp, yo, B, H,
                               KV, hd, cap);
    } else {
      attention_isa<Bf, Bf>(q, c, s, ck.mutable_data_ptr<Bf>(), cv.mutable_data_ptr<Bf>(), pp, rp, yo, B, H, KV, hd,
                            cap);
    }
  }
  return y;
}

at::Tensor& tensor(course_tensor t) { return *static_cast<at::Tensor*>(t); }

}  // namespace
}  // namespace course

extern "C" {

char* course_rms_norm(course_tensor x, course_tensor residual, course_tensor weight, double eps, course_tensor* out) {
  COURSE_TRY({
    std::optional<at::Tensor> r;
    if (residual) r = course::tensor(residual);
    *out = new at::Tensor(course::rms_norm(course::tensor(x), r, course::tensor(weight), eps));
  })
}

char* course_swiglu(course_tensor gate_up, course_tensor* out) {
  COURSE_TRY({
    *out = new at::Tensor(course::swiglu(course::tensor(gate_up)));
  })
}

char* course_decode_attention(course_tensor qkv, course_tensor cos, course_tensor sin, course_tensor cache_k,
                              course_tensor cache_v, course_tensor positions, course_tensor rows, int64_t heads,
                              int64_t kv_heads, course_tensor* out) {
  COURSE_TRY({
    std::optional<at::Tensor> r;
    if (rows) r = course::tensor(rows);
    *out = new at::Tensor(course::decode_attention(course::tensor(qkv), course::tensor(cos), course::tensor(sin),
                                                   course::tensor(cache_k), course::tensor(cache_v),
                                                   course::tensor(positions), r, heads, kv_heads));
  })
}

}  // extern "C"
