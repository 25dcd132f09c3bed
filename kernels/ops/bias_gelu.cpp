// Fused bias + GELU (tanh approximation) as a torch extension: argument checks, the choice of
// CPU kernel per instruction set or the CUDA kernel, a torch::autograd::Function so that
// `loss.backward()` in Rust flows through it, and the extern "C" entry points.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "dispatch.h"
#include "ops.h"

namespace course {
namespace {

// Checks shared by forward and backward; messages name the argument and what is wrong.
void check_args(const at::Tensor& x, const at::Tensor& b) {
  TORCH_CHECK(x.defined() && b.defined(), "bias_gelu: input and bias must be defined tensors");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
              "bias_gelu: input dtype must be float32, float64 or bfloat16, got ", dt);
  TORCH_CHECK(b.scalar_type() == dt, "bias_gelu: bias dtype ", b.scalar_type(), " differs from input dtype ", dt);
  TORCH_CHECK(x.device() == b.device(), "bias_gelu: input is on ", x.device(), " but bias is on ", b.device());
  TORCH_CHECK(x.dim() >= 1, "bias_gelu: input must have at least one dimension, got a scalar");
  TORCH_CHECK(b.dim() == 1, "bias_gelu: bias must be 1-D, got shape ", b.sizes());
  TORCH_CHECK(b.size(0) == x.size(-1), "bias_gelu: bias has ", b.size(0), " elements but the input's last dimension is ",
              x.size(-1), " (input shape ", x.sizes(), ")");
}

template <typename T>
void cpu_fwd(const T* x, const T* b, T* y, int64_t M, int64_t N) {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512:
      return AVX512::bias_gelu_fwd<T>(x, b, y, M, N);
    case Isa::Avx2:
      return AVX2::bias_gelu_fwd<T>(x, b, y, M, N);
#endif
    default:
      return DEFAULT::bias_gelu_fwd<T>(x, b, y, M, N);
  }
}

template <typename T>
void cpu_bwd(const T* g, const T* x, const T* b, T* gx, T* gb, int64_t M, int64_t N) {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512:
      return AVX512::bias_gelu_bwd<T>(g, x, b, gx, gb, M, N);
    case Isa::Avx2:
      return AVX2::bias_gelu_bwd<T>(g, x, b, gx, gb, M, N);
#endif
    default:
      return DEFAULT::bias_gelu_bwd<T>(g, x, b, gx, gb, M, N);
  }
}

at::Tensor forward_any(const at::Tensor& x, const at::Tensor& b) {
  check_args(x, b);
  if (x.is_cuda()) {
#ifdef COURSE_CUDA
    return bias_gelu_forward_cuda(x, b);
#else
    TORCH_CHECK(false, "bias_gelu: input is on ", x.device(), " but this build has no CUDA kernels; rebuild with `cargo build --release --features cuda`");
#endif
  }
  TORCH_CHECK(x.is_cpu(), "bias_gelu: unsupported device ", x.device());
  return bias_gelu_forward_cpu(x, b);
}

std::tuple<at::Tensor, at::Tensor> backward_any(const at::Tensor& g, const at::Tensor& x, const at::Tensor& b) {
  check_args(x, b);
  TORCH_CHECK(g.sizes() == x.sizes(), "bias_gelu backward: grad shape ", g.sizes(), " differs from input shape ", x.sizes());
  TORCH_CHECK(g.device() == x.device(), "bias_gelu backward: grad is on ", g.device(), " but input is on ", x.device());
  auto gg = g.to(x.scalar_type());
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), "bias_gelu backward: unsupported device ", x.device());
  if (x.is_cuda()) {
#ifdef COURSE_CUDA
    return bias_gelu_backward_cuda(gg, x, b);
#else
    TORCH_CHECK(false, "bias_gelu: input is on ", x.device(), " but this build has no CUDA kernels; rebuild with `cargo build --release --features cuda`");
#endif
  }
  return bias_gelu_backward_cpu(gg, x, b);
}

struct BiasGeluFunction : public torch::autograd::Function<BiasGeluFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& b) {
    // Save the inputs, not u = x + b: backward recomputes u, so the fused op stores no extra
    // activation (the unfused pair keeps x + b alive for gelu's backward).
    ctx->save_for_backward({x, b});
    return forward_any(x, b);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    // With create_graph the engine runs backward in grad mode; our backward kernel is not
    // itself differentiable, so say so rather than return gradients without a graph.
    TORCH_CHECK(!at::GradMode::is_enabled(), "bias_gelu: double backward (create_graph=true) is not supported");
    auto saved = ctx->get_saved_variables();
    auto [gx, gb] = backward_any(grads[0], saved[0], saved[1]);
    return {gx, gb};
  }
};

}  // namespace

at::Tensor bias_gelu_forward_cpu(const at::Tensor& x_in, const at::Tensor& b_in) {
  auto x = x_in.contiguous();
  auto b = b_in.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(-1), M = N == 0 ? 0 : x.numel() / N;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_gelu_forward_cpu", [&] {
    cpu_fwd<scalar_t>(x.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), M, N);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cpu(const at::Tensor& g_in, const at::Tensor& x_in,
                                                          const at::Tensor& b_in) {
  auto g = g_in.contiguous();
  auto x = x_in.contiguous();
  auto b = b_in.contiguous();
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto gb = at::empty_like(b, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(-1), M = N == 0 ? 0 : x.numel() / N;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_gelu_backward_cpu", [&] {
    cpu_bwd<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                      gx.mutable_data_ptr<scalar_t>(), gb.mutable_data_ptr<scalar_t>(), M, N);
  });
  return {gx, gb};
}

}  // namespace course

extern "C" {

char* course_bias_gelu(course_tensor input, course_tensor bias, course_tensor* out) {
  COURSE_TRY({
    auto& x = *static_cast<at::Tensor*>(input);
    auto& b = *static_cast<at::Tensor*>(bias);
    *out = new at::Tensor(course::BiasGeluFunction::apply(x, b));
  })
}

char* course_bias_gelu_forward(course_tensor input, course_tensor bias, course_tensor* out) {
  COURSE_TRY({
    at::NoGradGuard no_grad;
    *out = new at::Tensor(course::forward_any(*static_cast<at::Tensor*>(input), *static_cast<at::Tensor*>(bias)));
  })
}

char* course_bias_gelu_backward(course_tensor grad, course_tensor input, course_tensor bias, course_tensor* grad_input,
                                course_tensor* grad_bias) {
  COURSE_TRY({
    at::NoGradGuard no_grad;
    auto [gx, gb] = course::backward_any(*static_cast<at::Tensor*>(grad), *static_cast<at::Tensor*>(input),
                                         *static_cast<at::Tensor*>(bias));
    *grad_input = new at::Tensor(gx);
    *grad_bias = new at::Tensor(gb);
  })
}

}  // extern "C"
