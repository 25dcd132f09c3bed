//! `y = x Wᵀ + b` with oneDNN's GEMM for the forward and the input gradient on the CPU in fp32,
//! beside its reference (tch's `linear`). Kernel: `kernels/ops/linear.cpp`.
//!
//! Why a linear of our own: on CPUs where MKL does not run its AVX-512 path (the AMD Zen 4 the
//! course was measured on), oneDNN's JIT GEMM is faster at a Transformer's shapes for the two
//! GEMMs that read `W`; the weight gradient stays with MKL, which was faster there.
//! `cargo bench --bench linear` measures the three GEMMs against `tch` on the machine at hand.

use crate::sys::ffi;
use anyhow::Result;
use tch::Tensor;

/// `input @ weight.T + bias`, differentiable with respect to all three.
///
/// # Shapes
/// - `input`: `(..., K)`
/// - `weight`: `(N, K)`, `bias`: `(N)`, same dtype and device as `input`
/// - returns `(..., N)`
///
/// On the CPU in fp32 (autocast off) the forward and `d input` run through oneDNN
/// (`mkldnn::_linear_pointwise`) and `d weight` through `mm`; anywhere else (fp64, bf16 under
/// autocast, CUDA) this is exactly `tch`'s `linear`. Double backward is not supported on the
/// oneDNN path.
pub fn linear(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    let b = bias.map_or(std::ptr::null_mut(), ffi::ptr);
    // SAFETY: the pointers are live tch tensors (or null for no bias) for the duration of the call.
    ffi::check(unsafe { ffi::course_linear(ffi::ptr(input), ffi::ptr(weight), b, &mut out) })?;
    Ok(ffi::take(out))
}

/// Whether [`linear`] runs oneDNN for this input (the CPU, fp32, autocast off, non-empty).
pub fn linear_uses_onednn(input: &Tensor) -> bool {
    // SAFETY: a live tch tensor.
    unsafe { ffi::course_linear_uses_onednn(ffi::ptr(input)) == 1 }
}

/// `input @ weight.T` by the few-row kernel (`kernels/ops/gemv_cpu.cpp`): what [`linear`] runs
/// for no-grad calls of at most 4 rows on the CPU in fp32 or bf16 (decoding one token). No
/// autograd; fp32 accumulation.
pub fn skinny_matmul(input: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: live tch tensors for the duration of the call.
    ffi::check(unsafe { ffi::course_skinny_matmul(ffi::ptr(input), ffi::ptr(weight), &mut out) })?;
    Ok(ffi::take(out))
}

/// Reference: tch's `linear` (ATen's `addmm`/`mm` through MKL on the CPU).
pub fn linear_reference(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    input.linear(weight, bias)
}
