// Synchronised batch normalisation (torch.nn.SyncBatchNorm) over a c10d process group, as a
// torch::autograd::Function. Under data parallelism each rank sees b samples; plain batch norm
// would normalise with per-rank statistics, so N ranks of batch b would not train like one
// process of batch N*b. Here the forward allreduces (sum, sum of squares, count) per channel
// and the backward allreduces (sum dy, sum dy*(x-mean)), exactly as PyTorch's SyncBatchNorm
// does with batch_norm_backward_reduce / _elemt. Sums accumulate in float64 (without a float64
// copy of the activations), so the result matches single-process batch norm to rounding.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

#include "c10d.h"
#include "ops.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// Every dimension but the channel one (1): the reduction dims of batch norm.
std::vector<int64_t> reduce_dims(const at::Tensor& x) {
  std::vector<int64_t> d{0};
  for (int64_t i = 2; i < x.dim(); ++i) d.push_back(i);
  return d;
}

// (C) -> (1, C, 1, ...) to broadcast against x.
at::Tensor per_channel(const at::Tensor& v, const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return v.reshape(shape);
}

struct SyncBatchNormFunction : public torch::autograd::Function<SyncBatchNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, at::Tensor running_mean, at::Tensor running_var, double momentum,
                            double eps, int64_t group) {
    auto* g = reinterpret_cast<course::GroupHandle*>(group);
    TORCH_CHECK(x.dim() >= 2, "sync_batch_norm: input must be (N, C, ...), got ", x.sizes());
    const int64_t C = x.size(1);
    auto dims = reduce_dims(x);
    // [sum (C), sum of squares (C), count (1)] in one allreduce; sums accumulate in float64
    // without a float64 copy of x.
    auto count = at::full({1}, static_cast<double>(x.numel() / C), x.options().dtype(at::kDouble));
    auto stats = at::cat({x.sum(dims, false, at::kDouble), (x * x).sum(dims, false, at::kDouble), count});
    course::allreduce_blocking(*g, stats, false);
    const double n = stats[2 * C].item<double>();
    TORCH_CHECK(n > 1, "sync_batch_norm: expected more than 1 value per channel in training, got ", n);
    auto mean = stats.slice(0, 0, C) / n;
    auto var = (stats.slice(0, C, 2 * C) / n - mean * mean).clamp_min(0);
    auto invstd = (var + eps).rsqrt();
    {
      at::NoGradGuard ng;
      if (running_mean.defined()) running_mean.mul_(1 - momentum).add_((mean * momentum).to(running_mean.dtype()));
      if (running_var.defined())
        running_var.mul_(1 - momentum).add_((var * (momentum * n / (n - 1))).to(running_var.dtype()));
    }
    // y = x * scale + shift with per-channel scale = w / std, shift = b - mean * scale: one pass.
    auto scale = weight.defined() ? invstd * weight.to(at::kDouble) : invstd;
    auto shift = -mean * scale;
    if (bias.defined()) shift = shift + bias.to(at::kDouble);
    auto y = at::addcmul(per_channel(shift.to(x.scalar_type()), x), x, per_channel(scale.to(x.scalar_type()), x));
    ctx->save_for_backward({x, weight, mean, invstd});
    ctx->saved_data["group"] = group;
    ctx->saved_data["n"] = n;
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "sync_batch_norm: double backward is not supported");
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], weight = saved[1], mean = saved[2], invstd = saved[3];
    auto* g = reinterpret_cast<course::GroupHandle*>(ctx->saved_data["group"].toInt());
    const double n = ctx->saved_data["n"].toDouble();
    const int64_t C = x.size(1);
    auto dims = reduce_dims(x);
    auto dy = grads[0].contiguous();
    auto xmu = x - per_channel(mean.to(x.scalar_type()), x);
    // This rank's sums give the weight and bias gradients (DDP averages those like any other).
    auto sum_dy = dy.sum(dims, false, at::kDouble);
    auto sum_dy_xmu = (dy * xmu).sum(dims, false, at::kDouble);
    at::Tensor grad_w, grad_b;
    if (weight.defined()) grad_w = (sum_dy_xmu * invstd).to(weight.scalar_type());
    if (ctx->needs_input_grad(2)) grad_b = sum_dy.to(x.scalar_type());
    // The input gradient needs the sums over every rank's samples:
    // dx = k1 (dy - mean_dy) + k2 (x - mean), k1 = w / std, k2 = -k1 mean_dy_xmu / var.
    auto both = at::cat({sum_dy, sum_dy_xmu});
    course::allreduce_blocking(*g, both, false);
    auto mean_dy = both.slice(0, 0, C) / n;
    auto mean_dy_xmu = both.slice(0, C, 2 * C) / n;
    auto k1 = weight.defined() ? invstd * weight.to(at::kDouble) : invstd;
    auto k2 = -k1 * invstd * invstd * mean_dy_xmu;
    auto t = x.scalar_type();
    auto dx = (dy - per_channel(mean_dy.to(t), x)) * per_channel(k1.to(t), x) + xmu * per_channel(k2.to(t), x);
    return {dx, grad_w, grad_b, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Training-mode batch norm with statistics over every rank of `group` (a course_pg_new handle).
// running_mean / running_var may be NULL (track_running_stats=False); weight / bias too.
char* course_sync_batch_norm(course_tensor x, course_tensor weight, course_tensor bias, course_tensor running_mean,
                             course_tensor running_var, double momentum, double eps, void* group, course_tensor* out) {
  COURSE_TRY({
    TORCH_CHECK(group != nullptr, "sync_batch_norm: null process group");
    TORCH_CHECK(x != nullptr, "sync_batch_norm: null input");
    auto opt = [](course_tensor t) { return t ? *static_cast<at::Tensor*>(t) : at::Tensor(); };
    auto y = SyncBatchNormFunction::apply(*static_cast<at::Tensor*>(x), opt(weight), opt(bias), opt(running_mean),
                                          opt(running_var), momentum, eps, reinterpret_cast<int64_t>(group));
    *out = new at::Tensor(y);
  })
}

}  // extern "C"
