//! Attention from scratch: scaled dot-product attention with causal and padding masks, heads
//! split and merged by hand, and multi-head self-attention (optionally with RoPE from
//! [`super::positions`]), beside libtorch's fused kernel.
//!
//! Shapes: `B` batch, `T` tokens, `D` model width, `H` heads, `Dh = D / H` head width.
//! Masks are *keep* masks (`true` where attention is allowed), broadcastable to `(B, H, Tq, Tk)`,
//! as `torch.nn.functional.scaled_dot_product_attention` takes them.

use super::positions::Rope;
use anyhow::{bail, Result};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// `(B, T, D)` -> `(B, H, T, Dh)`: each head sees its own `Dh`-wide slice of every token.
pub fn split_heads(x: &Tensor, heads: i64) -> Tensor {
    let s = x.size();
    let (b, t, d) = (s[0], s[1], s[2]);
    x.view([b, t, heads, d / heads]).transpose(1, 2)
}

/// `(B, H, T, Dh)` -> `(B, T, H * Dh)`, the inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Tensor {
    let s = x.size();
    let (b, h, t, dh) = (s[0], s[1], s[2], s[3]);
    x.transpose(1, 2).contiguous().view([b, t, h * dh])
}

/// `(T, T)` keep-mask: query `i` may attend to keys `0..=i`.
pub fn causal_mask(t: i64, device: Device) -> Tensor {
    Tensor::ones([t, t], (Kind::Bool, device)).tril(0)
}

/// `(B, T)` attention mask (1 = real token, 0 = padding) -> `(B, 1, 1, T)` keep-mask over keys.
pub fn padding_mask(attention_mask: &Tensor) -> Tensor {
    attention_mask.ne(0).unsqueeze(1).unsqueeze(1)
}

/// Both masks at once: `(B, 1, T, T)`, keys that are real and not in the future.
pub fn causal_padding_mask(attention_mask: &Tensor) -> Tensor {
    let t = attention_mask.size()[1];
    padding_mask(attention_mask).logical_and(&causal_mask(t, attention_mask.device()))
}

/// The most negative finite value of a float kind: masked scores get it instead of -inf, so a
/// row with every key masked (a padding query) gives uniform weights rather than NaN.
fn masked_score(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 | Kind::Float => -3.389e38,
        _ => f64::MIN,
    }
}

/// `softmax(q kᵀ / √Dh, masked) v` with dropout on the weights. `q`: `(.., Tq, Dh)`, `k` and `v`:
/// `(.., Tk, Dh)`. Returns the output `(.., Tq, Dh)` and the weights `(.., Tq, Tk)` (before
/// dropout), which is what the attention heatmaps draw.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: Option<&Tensor>,
    dropout: f64,
    train: bool,
) -> (Tensor, Tensor) {
    let dh = *q.size().last().expect("attention: q has no dimensions");
    let scores = q.matmul(&k.transpose(-2, -1)) * (1.0 / (dh as f64).sqrt());
    let scores = match keep {
        Some(m) => scores.masked_fill(&m.logical_not(), masked_score(scores.kind())),
        None => scores,
    };
    let weights = scores.softmax(-1, scores.kind());
    let out = weights.dropout(dropout, train).matmul(v);
    (out, weights)
}

/// The same attention through libtorch's fused kernel (`scaled_dot_product_attention`, flash
/// attention on CPU and CUDA), which never materialises the `(Tq, Tk)` weights: faster and
/// lighter, and equal to [`attention`] in values and gradients (tests/attention.rs). Models use
/// it unless a chart asks for the weights.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, keep: Option<&Tensor>, dropout: f64, train: bool) -> Tensor {
    Tensor::scaled_dot_product_attention(q, k, v, keep, if train { dropout } else { 0.0 }, false, None, false)
}

/// [`attention`] when `p` asks for the weights, else [`fused_attention`]. (RoPE, if any, has
/// been applied to `q` and `k` already.)
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, dropout: f64, p: Pass) -> (Tensor, Option<Tensor>) {
    if p.need_weights {
        let (o, w) = attention(q, k, v, p.keep, dropout, p.train);
        (o, Some(w))
    } else {
        (fused_attention(q, k, v, p.keep, dropout, p.train), None)
    }
}

/// What one forward pass through attention layers needs besides the input: the keep-mask,
/// RoPE if the model uses it, train/eval mode, and whether to return the attention weights.
#[derive(Clone, Copy)]
pub struct Pass<'a> {
    pub keep: Option<&'a Tensor>,
    pub rope: Option<&'a Rope>,
    pub train: bool,
    pub need_weights: bool,
}

/// Multi-head self-attention with one fused `D -> 3D` projection for q, k, v and an output
/// projection; optional RoPE on q and k.
#[derive(Debug)]
pub struct MultiHeadAttention {
    qkv: nn::Linear,
    out: nn::Linear,
    heads: i64,
    dropout: f64,
}

impl MultiHeadAttention {
    pub fn new(vs: &nn::Path, d: i64, heads: i64, dropout: f64) -> Result<Self> {
        if heads < 1 || d % heads != 0 {
            bail!("the model width {d} must be a multiple of the number of heads {heads}");
        }
        Ok(Self {
            qkv: nn::linear(vs / "qkv", d, 3 * d, Default::default()),
            out: nn::linear(vs / "out", d, d, Default::default()),
            heads,
            dropout,
        })
    }

    /// `x`: `(B, T, D)` -> `((B, T, D), weights (B, H, T, T) if asked for)`.
    pub fn forward(&self, x: &Tensor, p: Pass) -> (Tensor, Option<Tensor>) {
        let qkv = self.qkv.forward(x).chunk(3, -1);
        let (mut q, mut k, v) =
            (split_heads(&qkv[0], self.heads), split_heads(&qkv[1], self.heads), split_heads(&qkv[2], self.heads));
        if let Some(r) = p.rope {
            q = r.apply(&q, 0);
            k = r.apply(&k, 0);
        }
        let (o, w) = attend(&q, &k, &v, self.dropout, p);
        (self.out.forward(&merge_heads(&o)), w)
    }
}
