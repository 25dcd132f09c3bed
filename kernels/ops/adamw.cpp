// AdamW for a list of parameters in one call: ATen's fused AdamW kernel (`_fused_adamw_`, what
// torch.optim.AdamW(fused=True) runs; a vectorised single pass per parameter that reads the
// parameter, its gradient and both moments once and writes them back). The per-parameter tch
// version it replaces is `ops::adamw::adamw_reference` in Rust; tests/optim.rs holds both to
// PyTorch's torch.optim.AdamW fixture.
#include <ATen/ATen.h>

#include <vector>

#include "ops.h"

extern "C" {

char* course_fused_adamw(course_tensor* params, course_tensor* grads, course_tensor* exp_avgs,
                         course_tensor* exp_avg_sqs, const double* steps, int n, double lr, double beta1,
                         double beta2, double weight_decay, double eps) {
  COURSE_TRY({
    TORCH_CHECK(n >= 0, "fused_adamw: negative parameter count ", n);
    std::vector<at::Tensor> p, g, m, v, st;
    p.reserve(n), g.reserve(n), m.reserve(n), v.reserve(n), st.reserve(n);
    for (int i = 0; i < n; ++i) {
      const auto& pi = *static_cast<at::Tensor*>(params[i]);
      const auto& gi = *static_cast<at::Tensor*>(grads[i]);
      const auto& mi = *static_cast<at::Tensor*>(exp_avgs[i]);
      const auto& vi = *static_cast<at::Tensor*>(exp_avg_sqs[i]);
      TORCH_CHECK(gi.defined(), "fused_adamw: parameter ", i, " has no gradient");
      TORCH_CHECK(gi.sizes() == pi.sizes() && mi.sizes() == pi.sizes() && vi.sizes() == pi.sizes(),
                  "fused_adamw: parameter ", i, " has shape ", pi.sizes(), " but its gradient or moments have ",
                  gi.sizes(), ", ", mi.sizes(), ", ", vi.sizes());
      p.push_back(pi), g.push_back(gi), m.push_back(mi), v.push_back(vi);
      // The step each parameter is at, already incremented (torch keeps it as a float tensor).
      st.push_back(at::scalar_tensor(steps[i], at::TensorOptions().dtype(at::kFloat).device(pi.device())));
    }
    std::vector<at::Tensor> max_exp_avg_sqs;  // amsgrad off
    at::_fused_adamw_(p, g, m, v, max_exp_avg_sqs, st, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                      /*maximize=*/false, /*grad_scale=*/std::nullopt, /*found_inf=*/std::nullopt);
  })
}

}  // extern "C"
