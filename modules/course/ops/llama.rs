//! The Llama decoder's small ops outside autograd, one pass each, beside their references in
//! plain tch ops (Hugging Face's `LlamaRMSNorm`, `silu(gate) * up`, `apply_rotary_pos_emb` +
//! the cache write + SDPA). Kernels: `kernels/ops/llama{,_cpu}.cpp`.
//!
//! Why: between its matrix products, decoding one token ran about 35 ATen ops per layer (norm
//! statistics, dtype casts, the rotation's narrow/neg/cat, the cache copies), each a few
//! microseconds for a few hundred numbers: a third of a bf16 token on a 2-core Zen 4. These
//! three ops do the same arithmetic, rounded where Hugging Face's ops round, in 3 calls.
//!
//! All three run on the CPU in fp32 or bf16, with no gradient: an input that requires grad is
//! refused. The models take the references when they train.

use crate::sys::ffi;
use anyhow::Result;
use tch::{Kind, Tensor};

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · weight`, statistics in fp32,
/// the normalised value rounded to the input's dtype before the weight multiplies it.
///
/// # Shapes
/// `x`: `(..., C)`, `weight`: `(C)` -> `(..., C)`
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: live tch tensors (and null for no residual) for the duration of the call.
    ffi::check(unsafe { ffi::course_rms_norm(ffi::ptr(x), std::ptr::null_mut(), ffi::ptr(weight), eps, &mut out) })?;
    Ok(ffi::take(out))
}

/// The residual add and the next RMSNorm in one pass: `x += residual` in place (rounded to the
/// dtype, as `x + residual` is), then returns [`rms_norm`] of the sum. `x` must be contiguous.
pub fn add_rms_norm_(x: &mut Tensor, residual: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: live tch tensors; the kernel writes into x's storage, which `&mut` holds.
    ffi::check(unsafe { ffi::course_rms_norm(ffi::ptr(x), ffi::ptr(residual), ffi::ptr(weight), eps, &mut out) })?;
    Ok(ffi::take(out))
}

/// Reference for [`rms_norm`]: Hugging Face's `LlamaRMSNorm` in tch ops.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.square().mean_dim(-1, true, Kind::Float);
    weight * (xf * (var + eps).rsqrt()).to_kind(kind)
}

/// SwiGLU of a packed gate/up product: `silu(gu[..., :F]) · gu[..., F:]`.
///
/// # Shapes
/// `gate_up`: `(..., 2F)` -> `(..., F)`
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: a live tch tensor for the duration of the call.
    ffi::check(unsafe { ffi::course_swiglu(ffi::ptr(gate_up), &mut out) })?;
    Ok(ffi::take(out))
}

/// Reference for [`swiglu`].
pub fn swiglu_reference(gate_up: &Tensor) -> Tensor {
    let f = gate_up.size().last().copied().unwrap_or(0) / 2;
    gate_up.narrow(-1, 0, f).silu() * gate_up.narrow(-1, f, f)
}

/// One new token per sequence attending over its KV cache, from the packed q/k/v projection:
/// rotates q and k to each sequence's position (Hugging Face's half-split RoPE), writes k and v
/// into the caches at that position, and returns softmax(q kᵀ / √hd) v over positions
/// `0..=positions[b]`, computed in fp32. Grouped-query: query head `h` reads kv head
/// `h / (heads / kv_heads)`.
///
/// # Shapes
/// - `qkv`: `(B, 1, (heads + 2·kv_heads)·hd)`, rows q, then k, then v (`Llama::pack`'s order)
/// - `cos`, `sin`: `(P, hd)` in `qkv`'s dtype
/// - `cache_k`, `cache_v`: `(B, kv_heads, capacity, hd)`, fp32 or `qkv`'s dtype, contiguous
/// - `positions`: `(B)` int64, each below `capacity` and `P`
/// - returns `(B, 1, heads·hd)`
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    cache_k: &mut Tensor,
    cache_v: &mut Tensor,
    positions: &Tensor,
    heads: i64,
    kv_heads: i64,
) -> Result<Tensor> {
    decode_attention_rows(qkv, cos, sin, cache_k, cache_v, positions, None, heads, kv_heads)
}

/// [`decode_attention`] for sequences that hold rows of a larger cache (continuous batching's
/// slots): with `rows`, sequence `b` reads and writes cache row `rows[b]`, at position
/// `positions[b]` (without, row `b`).
///
/// # Shapes
/// - `qkv`: `(B, 1, (heads + 2·kv_heads)·hd)`
/// - `cache_k`, `cache_v`: `(S, kv_heads, capacity, hd)` with `S >= B` (`S == B` without `rows`),
///   contiguous
/// - `positions`, `rows`: `(B)` int64; `rows` distinct and below `S`
/// - returns `(B, 1, heads·hd)`
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_rows(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    cache_k: &mut Tensor,
    cache_v: &mut Tensor,
    positions: &Tensor,
    rows: Option<&Tensor>,
    heads: i64,
    kv_heads: i64,
) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: live tch tensors (or null for `rows`); the kernel writes into the caches, which
    // `&mut` holds.
    ffi::check(unsafe {
        ffi::course_decode_attention(
            ffi::ptr(qkv),
            ffi::ptr(cos),
            ffi::ptr(sin),
            ffi::ptr(cache_k),
            ffi::ptr(cache_v),
            ffi::ptr(positions),
            rows.map_or(std::ptr::null_mut(), ffi::ptr),
            heads,
            kv_heads,
            &mut out,
        )
    })?;
    Ok(ffi::take(out))
}

/// Reference for [`decode_attention`] in tch ops, one sequence at a time: rotation as Hugging
/// Face's `apply_rotary_pos_emb` (in `qkv`'s dtype), `copy_` into the caches, then SDPA in the
/// caches' dtype over the positions so far.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_reference(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    cache_k: &mut Tensor,
    cache_v: &mut Tensor,
    positions: &[i64],
    heads: i64,
    kv_heads: i64,
) -> Tensor {
    let hd = cache_k.size()[3];
    let rows: Vec<Tensor> = positions
        .iter()
        .enumerate()
        .map(|(b, &p)| {
            let b = b as i64;
            let all = qkv.narrow(0, b, 1).view([1, 1, heads + 2 * kv_heads, hd]).transpose(1, 2);
            let (c, s) = (cos.narrow(0, p, 1), sin.narrow(0, p, 1));
            let rope = |x: &Tensor| {
                let (x1, x2) = (x.narrow(-1, 0, hd / 2), x.narrow(-1, hd / 2, hd / 2));
                x * &c + Tensor::cat(&[&(-&x2), &x1], -1) * &s
            };
            let q = rope(&all.narrow(1, 0, heads));
            let k = rope(&all.narrow(1, heads, kv_heads));
            let v = all.narrow(1, heads + kv_heads, kv_heads);
            cache_k.narrow(0, b, 1).narrow(2, p, 1).copy_(&k);
            cache_v.narrow(0, b, 1).narrow(2, p, 1).copy_(&v);
            let (ck, cv) = (cache_k.narrow(0, b, 1).narrow(2, 0, p + 1), cache_v.narrow(0, b, 1).narrow(2, 0, p + 1));
            let y = Tensor::scaled_dot_product_attention(
                &q.to_kind(ck.kind()),
                &ck,
                &cv,
                None::<&Tensor>,
                0.0,
                false,
                None,
                true,
            );
            y.to_kind(qkv.kind()).transpose(1, 2).reshape([1, 1, heads * hd])
        })
        .collect();
    Tensor::cat(&rows, 0)
}
