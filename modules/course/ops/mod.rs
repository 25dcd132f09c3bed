//! Custom ops from `kernels/`, each beside a `*_reference` written in plain tch ops that the
//! tests and the benchmark compare against.

use crate::sys::ffi;
use anyhow::{Context, Result};
use tch::Tensor;

/// `gelu_tanh(input + bias)` in one pass over memory, differentiable with respect to both.
///
/// # Shapes
/// - `input`: `(..., N)`, float32, float64 or bfloat16, CPU or (with `--features cuda`) CUDA
/// - `bias`: `(N)`, same dtype and device
/// - returns `(..., N)`
///
/// The backward recomputes `input + bias` instead of storing it, so the op keeps one activation
/// fewer than the unfused pair. Double backward is not supported.
pub fn bias_gelu(input: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: both pointers are live tch tensors for the duration of the call.
    ffi::check(unsafe { ffi::course_bias_gelu(ffi::ptr(input), ffi::ptr(bias), &mut out) })?;
    Ok(ffi::take(out))
}

/// The forward kernel alone, outside autograd.
pub fn bias_gelu_forward(input: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    ffi::check(unsafe { ffi::course_bias_gelu_forward(ffi::ptr(input), ffi::ptr(bias), &mut out) })?;
    Ok(ffi::take(out))
}

/// The backward kernel alone: `(grad_input, grad_bias)` for an upstream gradient `grad`.
pub fn bias_gelu_backward(grad: &Tensor, input: &Tensor, bias: &Tensor) -> Result<(Tensor, Tensor)> {
    let (mut gx, mut gb) = (std::ptr::null_mut(), std::ptr::null_mut());
    ffi::check(unsafe {
        ffi::course_bias_gelu_backward(ffi::ptr(grad), ffi::ptr(input), ffi::ptr(bias), &mut gx, &mut gb)
    })
    .context("bias_gelu backward")?;
    Ok((ffi::take(gx), ffi::take(gb)))
}

/// Reference: the two unfused tch ops.
pub fn bias_gelu_reference(input: &Tensor, bias: &Tensor) -> Tensor {
    (input + bias).gelu("tanh")
}

/// Softmax cross-entropy of `logits` against class indices `targets`, averaged over the rows
/// whose target is not -1, in one fused op differentiable with respect to `logits`: the same
/// value as `F.cross_entropy(logits.float(), targets, ignore_index=-1)`.
///
/// # Shapes
/// - `logits`: `(N, V)`, float32, float64, bfloat16 or float16, CPU or (with `--features cuda`)
///   CUDA; flatten `(B, T, V)` to `(B*T, V)` first
/// - `targets`: `(N)`, int64 in `[0, V)`, or -1 for a row left out of the mean
/// - returns `()`: the mean loss, float32 (float64 for float64 logits); NaN when every row is -1
///
/// Forward reads the logits once (online softmax) and keeps only the per-row logsumexp for
/// backward, which writes `(softmax - onehot) * grad / count` in the logits' dtype in one more
/// pass; bf16 and fp16 are computed in fp32. Errors name the argument: a float `targets`, a shape
/// mismatch, a target outside `[0, V)` (with its row). On CUDA the range check costs one host
/// sync per forward. Double backward is not supported.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: both pointers are live tch tensors for the duration of the call.
    ffi::check(unsafe { ffi::course_cross_entropy(ffi::ptr(logits), ffi::ptr(targets), &mut out) })?;
    Ok(ffi::take(out))
}

/// The forward kernel alone, outside autograd: `(loss, lse)`, where `lse` `(N)` is each row's
/// logsumexp (float32, float64 for float64 logits), the input of [`cross_entropy_backward`].
pub fn cross_entropy_forward(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let (mut loss, mut lse) = (std::ptr::null_mut(), std::ptr::null_mut());
    ffi::check(unsafe { ffi::course_cross_entropy_forward(ffi::ptr(logits), ffi::ptr(targets), &mut loss, &mut lse) })?;
    Ok((ffi::take(loss), ffi::take(lse)))
}

/// The backward kernel alone: the gradient of the loss with respect to `logits` `(N, V)`, for
/// the loss's 0-dim upstream gradient `grad` and the `lse` from [`cross_entropy_forward`].
pub fn cross_entropy_backward(grad: &Tensor, logits: &Tensor, targets: &Tensor, lse: &Tensor) -> Result<Tensor> {
    let mut gx = std::ptr::null_mut();
    ffi::check(unsafe {
        ffi::course_cross_entropy_backward(ffi::ptr(grad), ffi::ptr(logits), ffi::ptr(targets), ffi::ptr(lse), &mut gx)
    })
    .context("cross_entropy backward")?;
    Ok(ffi::take(gx))
}

/// Reference: tch's unfused `log_softmax` then `nll_loss(ignore_index = -1)`, in float32
/// (float64 for float64 logits), so that it keeps the `(N, V)` log-probabilities for backward.
pub fn cross_entropy_reference(logits: &Tensor, targets: &Tensor) -> Tensor {
    let acc = if logits.kind() == tch::Kind::Double { tch::Kind::Double } else { tch::Kind::Float };
    logits.to_kind(acc).cross_entropy_loss::<Tensor>(targets, None, tch::Reduction::Mean, -1, 0.0)
}
