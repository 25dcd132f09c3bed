//! AdamW's update for a list of parameters in one call, through ATen's fused kernel (what
//! `torch.optim.AdamW(fused=True)` runs: one vectorised pass per parameter that reads the
//! parameter, its gradient and both moments once), beside the per-parameter reference in plain
//! tch ops (`torch.optim.AdamW`'s for-loop implementation). Kernel: `kernels/ops/adamw.cpp`.

use crate::sys::ffi;
use anyhow::{bail, Result};
use std::os::raw::c_int;
use tch::Tensor;

/// AdamW's hyper-parameters for one call (one parameter group).
#[derive(Debug, Clone, Copy)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW step for every `params[i]` with gradient `grads[i]` and moments `exp_avgs[i]`,
/// `exp_avg_sqs[i]` (updated in place), `steps[i]` being the parameter's step count including this
/// step: `p *= 1 - lr wd; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g²;
/// p -= lr / (1 - b1^t) · m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. Errors name the parameter whose
/// gradient is missing or whose shapes disagree.
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[f64],
    h: AdamWHyper,
) -> Result<()> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()].iter().any(|&l| l != n) {
        bail!(
            "fused_adamw: {n} parameters but {} gradients, {} and {} moments, {} step counts",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len(),
            steps.len()
        );
    }
    let ptrs = |v: &[Tensor]| v.iter().map(ffi::ptr).collect::<Vec<_>>();
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    let n = c_int::try_from(n)?;
    // SAFETY: every pointer is a live tch tensor for the duration of the call; the arrays hold n each.
    ffi::check(unsafe {
        ffi::course_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            steps.as_ptr(),
            n,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
        )
    })
}

/// Reference: the same step for one parameter in plain tch ops (PyTorch's `_single_tensor_adamw`).
pub fn adamw_reference(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    step: f64,
    h: AdamWHyper,
) -> Result<()> {
    let _g = tch::no_grad_guard();
    let mut p = param.shallow_clone();
    if h.weight_decay != 0.0 {
        let _ = p.f_mul_scalar_(1.0 - h.lr * h.weight_decay)?;
    }
    let _ = exp_avg.shallow_clone().f_lerp_(grad, 1.0 - h.beta1)?;
    let _ = exp_avg_sq.shallow_clone().f_mul_scalar_(h.beta2)?.f_addcmul_(&(grad * (1.0 - h.beta2)), grad)?;
    let bc1 = 1.0 - h.beta1.powf(step);
    let bc2_sqrt = (1.0 - h.beta2.powf(step)).sqrt();
    let denom = exp_avg_sq.sqrt() / bc2_sqrt + h.eps;
    let _ = p.f_addcdiv_(&(exp_avg * (-h.lr / bc1)), &denom)?;
    Ok(())
}
