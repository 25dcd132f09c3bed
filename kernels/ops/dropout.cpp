// Counter-based dropout as a torch extension (kernels in dropout_cpu.cpp): checks, the autograd
// function that keeps only the seed and recomputes the mask in the backward, and the C ABI.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "dispatch.h"
#include "ops.h"

namespace course {
namespace {

template <typename T>
void apply_isa(const T* x, T* y, int64_t n, uint32_t key, uint32_t threshold, float scale) {
  COURSE_ISA_CALL(dropout_apply<T>, x, y, n, key, threshold, scale)
}

// The 32-bit key of a 64-bit seed (both halves mixed).
uint32_t key_of(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return static_cast<uint32_t>(s) ^ static_cast<uint32_t>(s >> 32) * 0x27D4EB2Fu;
}

at::Tensor masked(const at::Tensor& x_in, double p, int64_t seed) {
  auto x = x_in.contiguous();
  auto y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const auto threshold = static_cast<uint32_t>(std::llround(p * 16777216.0));
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  if (x.scalar_type() == at::kFloat)
    apply_isa<float>(x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), n, key_of(seed), threshold, scale);
  else
    apply_isa<c10::BFloat16>(x.const_data_ptr<c10::BFloat16>(), y.mutable_data_ptr<c10::BFloat16>(), n, key_of(seed),
                             threshold, scale);
  return y;
}

void check(const at::Tensor& x, double p) {
  TORCH_CHECK(x.defined(), "dropout: the input is undefined");
  TORCH_CHECK(x.is_cpu(), "dropout: the input is on ", x.device(), "; this kernel runs on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "dropout: the input must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout: p = ", p, " must be in [0, 1)");
  TORCH_CHECK(x.numel() < (int64_t{1} << 32), "dropout: ", x.numel(),
              " numbers are more than the 32-bit counter addresses (2^32)");
}

struct DropoutFunction : public torch::autograd::Function<DropoutFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double p, int64_t seed) {
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    at::AutoDispatchBelowADInplaceOrView guard;
    return masked(x, p, seed);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    // The same mask, from the same seed: the gradient of x * m * s is g * m * s.
    return {masked(grads[0], ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt()), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace
}  // namespace course

extern "C" {

char* course_dropout(course_tensor input, double p, int64_t seed, course_tensor* out) {
  COURSE_TRY({
    const auto& x = *static_cast<at::Tensor*>(input);
    course::check(x, p);
    at::Tensor y = at::GradMode::is_enabled() && x.requires_grad() ? course::DropoutFunction::apply(x, p, seed)
                                                                    : course::masked(x, p, seed);
    *out = new at::Tensor(y);
  })
}

}  // extern "C"
