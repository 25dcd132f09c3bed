//! Fused softmax cross-entropy, forward and backward, beside its unfused reference.
//! Kernels: `kernels/ops/cross_entropy*.{cpp,cu}`.

use crate::sys::ffi;
use anyhow::{Context, Result};
use tch::Tensor;

/// The target that leaves a row out of the mean: PyTorch's and Hugging Face's `ignore_index`,
/// the same in the fused kernel (`kIgnoreIndex` in kernels/ops.h), its reference and
/// `nn::loss`. Instruction tuning marks prompt tokens with it.
pub const IGNORE_INDEX: i64 = -100;

/// Softmax cross-entropy of `logits` against class indices `targets`, averaged over the rows
/// whose target is not [`IGNORE_INDEX`] (-100), in one fused op differentiable with respect to `logits`: the same
/// value as `F.cross_entropy(logits.float(), targets, ignore_index=-100)`.
///
/// # Shapes
/// - `logits`: `(N, V)`, float32, float64, bfloat16 or float16, CPU or (with `--features cuda`)
///   CUDA; flatten `(B, T, V)` to `(B*T, V)` first
/// - `targets`: `(N)`, int64 in `[0, V)`, or -100 for a row left out of the mean
/// - returns `()`: the mean loss, float32 (float64 for float64 logits); NaN when every row is -100
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

/// Reference: tch's unfused `log_softmax` then `nll_loss(ignore_index = -100)`, in float32
/// (float64 for float64 logits), so that it keeps the `(N, V)` log-probabilities for backward.
pub fn cross_entropy_reference(logits: &Tensor, targets: &Tensor) -> Tensor {
    let acc = if logits.kind() == tch::Kind::Double { tch::Kind::Double } else { tch::Kind::Float };
    logits.to_kind(acc).cross_entropy_loss::<Tensor>(targets, None, tch::Reduction::Mean, IGNORE_INDEX, 0.0)
}
