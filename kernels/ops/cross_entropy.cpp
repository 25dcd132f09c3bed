// Fused softmax cross-entropy as a torch extension: argument checks, the choice of CPU kernel per
// instruction set or the CUDA kernel, a torch::autograd::Function so that `loss.backward()` in
// Rust flows through it, and the extern "C" entry points. The kernels are cross_entropy_cpu.cpp and
// cross_entropy.cu.
//
// Why fuse: the unfused path (log_softmax, then nll_loss) writes an (N, V) log-probability tensor
// in forward and keeps it for backward, and its backward reads it again to write an (N, V)
// gradient through two kernels. Here forward reads the logits once and keeps only the per-row
// logsumexp (N values); backward reads the logits once and writes the gradient once. At a GPT-2
// vocabulary (V = 50304) that is the difference between 1 and 3+ passes over the largest
// activation of the model.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Version.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

#include "dispatch.h"
#include "ops.h"

namespace course {
namespace {

// The accumulator dtype: also the dtype of the loss and of the saved logsumexp.
at::ScalarType acc_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// Checks shared by forward and backward; messages name the argument and what is wrong.
void check_args(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.defined() && targets.defined(), "cross_entropy: logits and targets must be defined tensors");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "cross_entropy: logits dtype must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(targets.scalar_type() == at::kLong, "cross_entropy: targets dtype must be int64 (class indices), got ",
              targets.scalar_type());
  TORCH_CHECK(logits.device() == targets.device(), "cross_entropy: logits are on ", logits.device(),
              " but targets are on ", targets.device());
  TORCH_CHECK(logits.dim() == 2, "cross_entropy: logits must be 2-D (N, V), got shape ", logits.sizes(),
              " (flatten (B, T, V) to (B*T, V) first)");
  TORCH_CHECK(targets.dim() == 1, "cross_entropy: targets must be 1-D (N), got shape ", targets.sizes());
  TORCH_CHECK(targets.size(0) == logits.size(0), "cross_entropy: targets have ", targets.size(0),
              " rows but logits have ", logits.size(0), " (logits shape ", logits.sizes(), ")");
  TORCH_CHECK(logits.size(1) > 0, "cross_entropy: logits have no classes (shape ", logits.sizes(), ")");
}

// Extra checks of the raw backward's inputs (autograd always passes consistent ones).
void check_backward_args(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse) {
  TORCH_CHECK(grad.defined() && grad.numel() == 1, "cross_entropy backward: grad must be the loss's 0-dim gradient, got shape ",
              grad.defined() ? grad.sizes() : at::IntArrayRef{});
  TORCH_CHECK(grad.device() == logits.device(), "cross_entropy backward: grad is on ", grad.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(lse.defined() && lse.dim() == 1 && lse.size(0) == logits.size(0),
              "cross_entropy backward: lse must have shape (", logits.size(0), "), got ",
              lse.defined() ? lse.sizes() : at::IntArrayRef{});
  TORCH_CHECK(lse.scalar_type() == acc_dtype(logits.scalar_type()), "cross_entropy backward: lse dtype must be ",
              acc_dtype(logits.scalar_type()), " for ", logits.scalar_type(), " logits, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == logits.device(), "cross_entropy backward: lse is on ", lse.device(),
              " but logits are on ", logits.device());
}

template <typename T, typename A>
void cpu_fwd(const T* x, const int64_t* t, A* lse, A* loss, int64_t N, int64_t V) {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512:
      return AVX512::cross_entropy_fwd<T, A>(x, t, lse, loss, N, V);
    case Isa::Avx2:
      return AVX2::cross_entropy_fwd<T, A>(x, t, lse, loss, N, V);
#endif
    default:
      return DEFAULT::cross_entropy_fwd<T, A>(x, t, lse, loss, N, V);
  }
}

template <typename T, typename A>
void cpu_bwd(const T* x, const int64_t* t, const A* lse, A scale, T* gx, int64_t N, int64_t V) {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512:
      return AVX512::cross_entropy_bwd<T, A>(x, t, lse, scale, gx, N, V);
    case Isa::Avx2:
      return AVX2::cross_entropy_bwd<T, A>(x, t, lse, scale, gx, N, V);
#endif
    default:
      return DEFAULT::cross_entropy_bwd<T, A>(x, t, lse, scale, gx, N, V);
  }
}

// Checks every target against [0, V) or -100 and returns how many rows count in the mean. A serial
// scan of N integers: noise beside the N x V kernel, and it keeps exceptions out of the workers.
int64_t count_targets(const at::Tensor& t, int64_t V) {
  const int64_t* p = t.const_data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    if (p[i] == kIgnoreIndex) continue;
    TORCH_CHECK(p[i] >= 0 && p[i] < V, "cross_entropy: targets[", i, "] = ", p[i], " is out of range [0, ", V,
                ") (-100 marks a row to ignore)");
    ++count;
  }
  return count;
}

std::tuple<at::Tensor, at::Tensor> forward_any(const at::Tensor& logits, const at::Tensor& targets) {
  check_args(logits, targets);
  if (logits.is_cuda()) {
#ifdef COURSE_CUDA
    return cross_entropy_forward_cuda(logits, targets);
#else
    TORCH_CHECK(false, "cross_entropy: logits are on ", logits.device(),
                " but this build has no CUDA kernels; rebuild with `cargo build --release --features cuda`");
#endif
  }
  TORCH_CHECK(logits.is_cpu(), "cross_entropy: unsupported device ", logits.device());
  return cross_entropy_forward_cpu(logits, targets);
}

at::Tensor backward_any(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                        const at::Tensor& lse) {
  check_args(logits, targets);
  check_backward_args(grad, logits, lse);
  if (logits.is_cuda()) {
#ifdef COURSE_CUDA
    return cross_entropy_backward_cuda(grad, logits, targets, lse);
#else
    TORCH_CHECK(false, "cross_entropy: logits are on ", logits.device(),
                " but this build has no CUDA kernels; rebuild with `cargo build --release --features cuda`");
#endif
  }
  TORCH_CHECK(logits.is_cpu(), "cross_entropy backward: unsupported device ", logits.device());
  return cross_entropy_backward_cpu(grad, logits, targets, lse);
}

struct CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& targets) {
    auto [loss, lse] = forward_any(logits, targets);
    // The logits (an input, so no copy) and N logsumexps: backward rebuilds the softmax from them
    // instead of keeping an (N, V) probability tensor alive between the passes.
    ctx->save_for_backward({logits, targets, lse});
    return loss;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    // Our backward kernel is not itself differentiable: refuse create_graph rather than return
    // gradients without a graph.
    TORCH_CHECK(!at::GradMode::is_enabled(), "cross_entropy: double backward (create_graph=true) is not supported");
    auto saved = ctx->get_saved_variables();
    // Targets are integers: no gradient (an undefined tensor).
    return {backward_any(grads[0], saved[0], saved[1], saved[2]), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& targets) {
  auto x = logits.contiguous();
  auto t = targets.contiguous();
  const int64_t N = x.size(0), V = x.size(1);
  const int64_t count = count_targets(t, V);
  const auto acc = acc_dtype(x.scalar_type());
  auto lse = at::empty({N}, x.options().dtype(acc));
  auto row_loss = at::empty({N}, x.options().dtype(acc));
  double sum = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cross_entropy_forward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    cpu_fwd<scalar_t, A>(x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(), lse.mutable_data_ptr<A>(),
                         row_loss.mutable_data_ptr<A>(), N, V);
    // The mean in fp64, in row order: deterministic for any thread count, and exact enough for
    // any N (ignored rows hold 0).
    const A* l = row_loss.const_data_ptr<A>();
    for (int64_t i = 0; i < N; ++i) sum += static_cast<double>(l[i]);
  });
  // count == 0 (every row ignored, or N == 0) gives 0 / 0 = NaN, as F.cross_entropy does.
  auto loss = at::scalar_tensor(sum / static_cast<double>(count), x.options().dtype(acc));
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                   const at::Tensor& lse_in) {
  auto x = logits.contiguous();
  auto t = targets.contiguous();
  auto lse = lse_in.contiguous();
  const int64_t N = x.size(0), V = x.size(1);
  const int64_t count = count_targets(t, V);
  // d(mean)/d(row loss) = 1 / count; with count == 0 every row is ignored and every gradient is 0.
  const double scale = count > 0 ? grad.item<double>() / static_cast<double>(count) : 0.0;
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cross_entropy_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    cpu_bwd<scalar_t, A>(x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(), lse.const_data_ptr<A>(),
                         static_cast<A>(scale), gx.mutable_data_ptr<scalar_t>(), N, V);
  });
  return gx;
}

}  // namespace course

extern "C" {

char* course_cross_entropy(course_tensor logits, course_tensor targets, course_tensor* loss) {
  COURSE_TRY({
    auto& x = *static_cast<at::Tensor*>(logits);
    auto& t = *static_cast<at::Tensor*>(targets);
    *loss = new at::Tensor(course::CrossEntropyFunction::apply(x, t));
  })
}

char* course_cross_entropy_forward(course_tensor logits, course_tensor targets, course_tensor* loss,
                                   course_tensor* lse) {
  COURSE_TRY({
    at::NoGradGuard no_grad;
    auto [l, s] = course::forward_any(*static_cast<at::Tensor*>(logits), *static_cast<at::Tensor*>(targets));
    *loss = new at::Tensor(l);
    *lse = new at::Tensor(s);
  })
}

char* course_cross_entropy_backward(course_tensor grad, course_tensor logits, course_tensor targets,
                                    course_tensor lse, course_tensor* grad_logits) {
  COURSE_TRY({
    at::NoGradGuard no_grad;
    *grad_logits = new at::Tensor(course::backward_any(*static_cast<at::Tensor*>(grad), *static_cast<at::Tensor*>(logits),
                                                       *static_cast<at::Tensor*>(targets), *static_cast<at::Tensor*>(lse)));
  })
}

}  // extern "C"
