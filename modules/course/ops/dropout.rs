//! Dropout (丢弃) with a counter-based mask: number `i` of `x` is kept when a hash of `(seed, i)`
//! clears `p` — MurmurHash3's 32-bit finaliser (fmix32) of `i · 0x9E3779B9 + key(seed)`, its top
//! 24 bits against `round(p · 2²⁴)` — and kept numbers are scaled by `1 / (1 - p)`. The mask is
//! never stored: the backward recomputes it from the seed (`kernels/ops/dropout{,_cpu}.cpp`),
//! which saves the mask's memory and `bernoulli_`'s generator cost (a fifth of a LoRA SFT step
//! with tch's dropout). [`dropout`] draws the seed from tch's generator, so a seeded run repeats
//! and a resumed one continues; [`dropout_reference`] computes the same mask in tch's int64 ops.

use crate::sys::ffi;
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

/// `x` with each number dropped with probability `p` (the mask from a seed drawn from tch's
/// generator) when `train`, `x` itself otherwise. CPU, fp32 or bf16; elsewhere tch's dropout.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.shallow_clone());
    }
    if !COUNTER_BASED.load(Ordering::Relaxed)
        || x.device() != Device::Cpu
        || !matches!(x.kind(), Kind::Float | Kind::BFloat16)
    {
        return Ok(x.dropout(p, true));
    }
    let seed = Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
    dropout_with_seed(x, p, seed)
}

static COUNTER_BASED: AtomicBool = AtomicBool::new(true);

/// Whether [`dropout`] uses the counter-based kernel (on, the default) or tch's `dropout` (a
/// stored Bernoulli mask) for this process: the benchmark's A/B.
pub fn set_counter_based(on: bool) {
    COUNTER_BASED.store(on, Ordering::Relaxed);
}

/// [`dropout`] with a given seed: the same seed gives the same mask, in the forward and in the
/// backward.
pub fn dropout_with_seed(x: &Tensor, p: f64, seed: i64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: a live tch tensor for the duration of the call.
    ffi::check(unsafe { ffi::course_dropout(ffi::ptr(x), p, seed, &mut out) })?;
    Ok(ffi::take(out))
}

/// The 32-bit key of a seed (as the kernel mixes it).
fn key(seed: i64) -> i64 {
    let s = seed as u64;
    ((s as u32) ^ ((s >> 32) as u32).wrapping_mul(0x27D4_EB2F)) as i64
}

/// `(a · c) mod 2³²` for int64 tensors of 32-bit values, without overflowing int64.
fn mul32(a: &Tensor, c: i64) -> Tensor {
    let lo = a * (c & 0xFFFF);
    let hi = (a * (c >> 16)).bitwise_and(0xFFFF).bitwise_left_shift_tensor_scalar(16);
    (lo + hi).bitwise_and(0xFFFF_FFFF)
}

/// The keep mask (1 kept, 0 dropped; fp32, `x`'s shape) of [`dropout_with_seed`], in tch ops.
pub fn dropout_mask_reference(shape: &[i64], p: f64, seed: i64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        bail!("dropout: p = {p} must be in [0, 1)");
    }
    let n: i64 = shape.iter().product();
    let i = Tensor::arange(n, (Kind::Int64, Device::Cpu));
    let mut h = (mul32(&i, 0x9E37_79B9) + key(seed)).bitwise_and(0xFFFF_FFFF);
    let xr = |h: &Tensor, s: i64| h.bitwise_xor_tensor(&h.bitwise_right_shift_tensor_scalar(s));
    h = xr(&h, 16);
    h = mul32(&h, 0x85EB_CA6B);
    h = xr(&h, 13);
    h = mul32(&h, 0xC2B2_AE35);
    h = xr(&h, 16);
    let threshold = (p * 16_777_216.0).round() as i64;
    Ok(h.bitwise_right_shift_tensor_scalar(8).ge(threshold).to_kind(Kind::Float).reshape(shape))
}

/// Reference for [`dropout_with_seed`]: `x · mask / (1 - p)` in fp32 plain tch ops (so autograd
/// gives the reference backward), rounded to `x`'s dtype.
pub fn dropout_reference(x: &Tensor, p: f64, seed: i64) -> Result<Tensor> {
    let m = dropout_mask_reference(&x.size(), p, seed)? * (1.0 / (1.0 - p));
    Ok((x.to_kind(Kind::Float) * m).to_kind(x.kind()))
}
