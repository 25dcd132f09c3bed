//! Fused bias + GELU (tanh approximation), forward and backward, beside its two-op reference.
//! Kernels: `kernels/ops/bias_gelu*.{cpp,cu}`.

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
