// y = x W^T + b with the two GEMMs that read W (the forward and the input gradient) run by
// oneDNN, ATen's `mkldnn::_linear_pointwise`, and the weight gradient by ATen's mm (MKL).
//
// Why: on CPUs where MKL does not take its AVX-512 path (an AMD Zen 4 here), oneDNN's JIT GEMM
// is faster at a Transformer's shapes (tokens x width: 1024 x 256 -> 768, 1024 -> 256, ...):
// 1.05-1.12x for the forward and 1.07-1.11x for the input gradient on that machine, while its
// weight gradient (both operands transposed) was 0.82-0.98x, so that one stays with mm.
// Prepacking W for oneDNN (`_reorder_linear_weight`) would gain a little more per GEMM, but
// the reorder costs about as much as it saves when W changes every step, so W is used as is.
//
// Decoding multiplies one token (a few rows) by each weight: there a matrix-vector kernel of our
// own (gemv_cpu.cpp, fp32 and bf16) streams the weight with both cores, for no-grad calls of at
// most 4 rows.
//
// Where oneDNN does not apply (not the CPU, not fp32, autocast on, an empty input, a build
// without MKLDNN) the op is exactly at::linear, so fp64 tests and bf16 autocast runs are
// unchanged. Outside autograd (no gradient wanted) the forward runs without saving anything.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <string_view>

#include "dispatch.h"
#include "ops.h"

namespace course {
namespace {

void check_args(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.defined() && w.defined(), "linear: input and weight must be defined tensors");
  TORCH_CHECK(w.dim() == 2, "linear: weight must be 2-D (out_features, in_features), got shape ", w.sizes());
  TORCH_CHECK(x.dim() >= 1, "linear: input must have at least one dimension, got a scalar");
  TORCH_CHECK(x.size(-1) == w.size(1), "linear: input's last dimension is ", x.size(-1), " (input shape ",
              x.sizes(), ") but the weight has in_features ", w.size(1), " (weight shape ", w.sizes(), ")");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear: input dtype ", x.scalar_type(),
              " differs from weight dtype ", w.scalar_type());
  TORCH_CHECK(x.device() == w.device(), "linear: input is on ", x.device(), " but weight is on ", w.device());
  if (b) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "linear: bias must have shape (", w.size(0),
                "), got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == x.scalar_type() && b->device() == x.device(), "linear: bias is ",
                b->scalar_type(), " on ", b->device(), " but the input is ", x.scalar_type(), " on ", x.device());
  }
}

// True where this op runs oneDNN; everything else is at::linear.
bool use_onednn(const at::Tensor& x) {
  return at::hasMKLDNN() && x.is_cpu() && x.scalar_type() == at::kFloat && x.numel() > 0 &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

// out = a @ wlike^T (+ bias): `a` is (..., K), `wlike` is (N, K), any strides.
at::Tensor onednn_mm(const at::Tensor& a, const at::Tensor& wlike, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         std::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<std::string_view>)>();
  return op.call(a.contiguous(), wlike, bias, "none", c10::List<std::optional<at::Scalar>>(), std::string_view(""));
}

// Inputs of at most this many rows (tokens) take the skinny kernel when no gradient is wanted.
constexpr int64_t kSkinnyRows = 4;

template <typename T>
void skinny_cpu(const T* x, const T* w, T* y, int64_t M, int64_t N, int64_t K) {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512:
      return AVX512::skinny_matmul<T>(x, w, y, M, N, K);
    case Isa::Avx2:
      return AVX2::skinny_matmul<T>(x, w, y, M, N, K);
#endif
    default:
      return DEFAULT::skinny_matmul<T>(x, w, y, M, N, K);
  }
}

// y (..., N) = x (..., K) w (N, K)^T through the skinny kernel: CPU, fp32 or bf16, same dtype.
at::Tensor skinny_matmul(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(x_in.is_cpu() && w_in.is_cpu(), "skinny_matmul: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == w_in.scalar_type() &&
                  (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "skinny_matmul: input and weight must both be float32 or both bfloat16, got ", x_in.scalar_type(),
              " and ", w_in.scalar_type());
  TORCH_CHECK(w_in.dim() == 2 && x_in.dim() >= 1 && x_in.size(-1) == w_in.size(1), "skinny_matmul: input ",
              x_in.sizes(), " does not match weight ", w_in.sizes());
  auto x = x_in.contiguous();
  auto w = w_in.contiguous();
  const int64_t K = w.size(1), N = w.size(0), M = x.numel() / std::max<int64_t>(K, 1);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  auto y = at::empty(out_shape, x.options());
  if (x.scalar_type() == at::kFloat) {
    skinny_cpu<float>(x.const_data_ptr<float>(), w.const_data_ptr<float>(), y.mutable_data_ptr<float>(), M, N, K);
  } else {
    skinny_cpu<c10::BFloat16>(x.const_data_ptr<c10::BFloat16>(), w.const_data_ptr<c10::BFloat16>(),
                              y.mutable_data_ptr<c10::BFloat16>(), M, N, K);
  }
  return y;
}

// True where a no-grad call takes the skinny kernel.
bool use_skinny(const at::Tensor& x, const at::Tensor& w) {
  const auto dt = x.scalar_type();
  return x.is_cpu() && w.is_cpu() && (dt == at::kFloat || dt == at::kBFloat16) && w.scalar_type() == dt &&
         x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1) && x.size(-1) > 0 && x.numel() > 0 &&
         x.numel() / x.size(-1) <= kSkinnyRows && !at::autocast::is_autocast_enabled(at::kCPU);
}

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& b) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["has_bias"] = b.has_value();
    return onednn_mm(x, w, b);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "linear: double backward (create_graph=true) is not supported");
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const int64_t n = w.size(0), k = w.size(1);
    auto g = grads[0].contiguous().reshape({-1, n});
    at::Tensor gx, gw, gb;
    if (ctx->needs_input_grad(0)) gx = onednn_mm(g, w.t(), std::nullopt).view(x.sizes());
    if (ctx->needs_input_grad(1)) gw = g.t().mm(x.reshape({-1, k}));
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) gb = g.sum(0);
    return {gx, gw, gb};
  }
};

at::Tensor linear_any(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad() || (b && b->requires_grad()));
  if (!grad && use_skinny(x, w)) {
    check_args(x, w, b);
    auto y = skinny_matmul(x, w);
    return b ? y.add_(*b) : y;
  }
  // at::linear checks its own arguments (and under autocast its inputs' dtypes may differ).
  if (!use_onednn(x)) return at::linear(x, w, b);
  check_args(x, w, b);
  if (!grad) return onednn_mm(x, w, b);
  return LinearFunction::apply(x, w, b);
}

}  // namespace
}  // namespace course

extern "C" {

char* course_linear(course_tensor input, course_tensor weight, course_tensor bias, course_tensor* out) {
  COURSE_TRY({
    std::optional<at::Tensor> b;
    if (bias) b = *static_cast<at::Tensor*>(bias);
    *out = new at::Tensor(
        course::linear_any(*static_cast<at::Tensor*>(input), *static_cast<at::Tensor*>(weight), b));
  })
}

char* course_skinny_matmul(course_tensor input, course_tensor weight, course_tensor* out) {
  COURSE_TRY({
    at::NoGradGuard no_grad;
    *out = new at::Tensor(course::skinny_matmul(*static_cast<at::Tensor*>(input), *static_cast<at::Tensor*>(weight)));
  })
}

int course_linear_uses_onednn(course_tensor input) {
  try {
    return course::use_onednn(*static_cast<at::Tensor*>(input)) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

}  // extern "C"
