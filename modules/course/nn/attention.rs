//! Attention from scratch: scaled dot-product attention with causal and padding masks, heads
//! split and merged by hand, multi-head self-attention, the three positional encodings
//! (sinusoidal, learned, rotary), a pre-LayerNorm Transformer encoder block and an encoder
//! classifier with CLS or mean pooling.
//!
//! Shapes: `B` batch, `T` tokens, `D` model width, `H` heads, `Dh = D / H` head width.
//! Masks are *keep* masks (`true` where attention is allowed), broadcastable to `(B, H, Tq, Tk)`,
//! as `torch.nn.functional.scaled_dot_product_attention` takes them.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
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

/// How token positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Fixed sines and cosines added to the token embeddings (Vaswani et al. 2017).
    Sinusoidal,
    /// A trained embedding per position (BERT, GPT-2).
    Learned,
    /// Rotary: queries and keys rotated by a position-dependent angle (Su et al. 2021).
    Rope,
}

/// `(T, D)` sinusoidal encoding: `pe[p, 2i] = sin(p / 10000^(2i/D))`, `pe[p, 2i+1] = cos(..)`.
pub fn sinusoidal(len: i64, d: i64) -> Tensor {
    let pos = Tensor::arange(len, (Kind::Double, Device::Cpu)).unsqueeze(1);
    let i = Tensor::arange_start_step(0, d, 2, (Kind::Double, Device::Cpu));
    let angle = pos * (i * (-(10000f64.ln()) / d as f64)).exp().unsqueeze(0); // (T, ceil(D/2))
    let pe = Tensor::stack(&[angle.sin(), angle.cos()], 2).view([len, -1]); // interleave sin, cos
    pe.narrow(1, 0, d).to_kind(Kind::Float)
}

/// Which pairs of a head's dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Dimension `i` with `i + Dh/2` (GPT-NeoX, Hugging Face Llama).
    Half,
    /// Dimension `2i` with `2i + 1` (the paper, GPT-J, llama.cpp's GGUF layout).
    Interleaved,
}

/// Rotary position embedding: pair `j` of a head's dimensions at position `p` is rotated by
/// `p · base^(-2j/Dh)`. Then `q_m · k_n` depends on `m - n` only.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rope {
    pub fn new(head_dim: i64, max_len: i64, base: f64, style: RopeStyle, device: Device) -> Result<Self> {
        if head_dim % 2 != 0 {
            bail!("RoPE needs an even head width, got {head_dim}");
        }
        let inv = (Tensor::arange_start_step(0, head_dim, 2, (Kind::Double, Device::Cpu))
            * (-base.ln() / head_dim as f64))
            .exp();
        let angle = Tensor::arange(max_len, (Kind::Double, Device::Cpu)).unsqueeze(1) * inv.unsqueeze(0); // (T, Dh/2)
        Ok(Self {
            cos: angle.cos().to_kind(Kind::Float).to_device(device),
            sin: angle.sin().to_kind(Kind::Float).to_device(device),
            style,
        })
    }

    pub fn max_len(&self) -> i64 {
        self.cos.size()[0]
    }

    /// Rotates `x`: `(B, H, T, Dh)`, whose first token sits at position `offset`.
    pub fn apply(&self, x: &Tensor, offset: i64) -> Tensor {
        let s = x.size();
        let (t, dh) = (s[2], s[3]);
        let cos = self.cos.narrow(0, offset, t).to_kind(x.kind());
        let sin = self.sin.narrow(0, offset, t).to_kind(x.kind());
        match self.style {
            RopeStyle::Half => {
                let (a, b) = (x.narrow(-1, 0, dh / 2), x.narrow(-1, dh / 2, dh / 2));
                Tensor::cat(&[&a * &cos - &b * &sin, &b * &cos + &a * &sin], -1)
            }
            RopeStyle::Interleaved => {
                let pairs = x.unflatten(-1, [dh / 2, 2]);
                let (a, b) = (pairs.select(-1, 0), pairs.select(-1, 1));
                Tensor::stack(&[&a * &cos - &b * &sin, &a * &sin + &b * &cos], -1).flatten(-2, -1)
            }
        }
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

/// Pre-LayerNorm encoder block: `x + attn(ln1(x))`, then `x + ff(ln2(x))` with a GELU
/// feed-forward, dropout on both residual branches.
#[derive(Debug)]
pub struct EncoderBlock {
    ln1: nn::LayerNorm,
    attn: MultiHeadAttention,
    ln2: nn::LayerNorm,
    ff1: nn::Linear,
    ff2: nn::Linear,
    dropout: f64,
}

impl EncoderBlock {
    pub fn new(vs: &nn::Path, d: i64, heads: i64, d_ff: i64, dropout: f64) -> Result<Self> {
        Ok(Self {
            ln1: nn::layer_norm(vs / "ln1", vec![d], Default::default()),
            attn: MultiHeadAttention::new(&(vs / "attn"), d, heads, dropout)?,
            ln2: nn::layer_norm(vs / "ln2", vec![d], Default::default()),
            ff1: nn::linear(vs / "ff1", d, d_ff, Default::default()),
            ff2: nn::linear(vs / "ff2", d_ff, d, Default::default()),
            dropout,
        })
    }

    /// `x`: `(B, T, D)` -> `((B, T, D), weights (B, H, T, T) if asked for)`.
    pub fn forward(&self, x: &Tensor, p: Pass) -> (Tensor, Option<Tensor>) {
        let (a, w) = self.attn.forward(&self.ln1.forward(x), p);
        let x = x + a.dropout(self.dropout, p.train);
        let f = self.ff2.forward(&self.ff1.forward(&self.ln2.forward(&x)).gelu("none"));
        (&x + f.dropout(self.dropout, p.train), w)
    }
}

/// How a sequence of token states becomes one vector for the classifier head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The state of the first token (`[CLS]`).
    Cls,
    /// The mean over real (unpadded) tokens.
    Mean,
}

/// Mean of `h` `(B, T, D)` over the tokens where `mask` `(B, T)` is nonzero.
pub fn mean_pool(h: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(h.kind()).unsqueeze(-1);
    (h * &m).sum_dim_intlist(1, false, h.kind()) / m.sum_dim_intlist(1, false, h.kind()).clamp_min(1e-9)
}

pub fn pool(h: &Tensor, mask: &Tensor, pooling: Pooling) -> Tensor {
    match pooling {
        Pooling::Cls => h.select(1, 0),
        Pooling::Mean => mean_pool(h, mask),
    }
}

/// The encoder classifier's shape; saved as its `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    pub vocab: i64,
    pub d_model: i64,
    pub heads: i64,
    pub layers: i64,
    pub d_ff: i64,
    pub max_len: i64,
    pub dropout: f64,
    pub positions: Positions,
    pub pooling: Pooling,
    pub classes: i64,
}

/// Token embedding + positions -> pre-LN encoder blocks -> final LayerNorm -> pooling -> linear.
#[derive(Debug)]
pub struct EncoderClassifier {
    pub cfg: EncoderConfig,
    tok: nn::Embedding,
    pos: Option<nn::Embedding>,
    sinus: Option<Tensor>,
    rope: Option<Rope>,
    blocks: Vec<EncoderBlock>,
    ln: nn::LayerNorm,
    head: nn::Linear,
}

impl EncoderClassifier {
    pub fn new(vs: &nn::Path, cfg: &EncoderConfig) -> Result<Self> {
        let c = cfg;
        if c.vocab < 1 || c.d_model < 1 || c.layers < 0 || c.d_ff < 1 || c.max_len < 1 || c.classes < 2 {
            bail!("encoder config: vocab, d_model, d_ff, max_len must be positive and classes at least 2: {c:?}");
        }
        let emb = nn::EmbeddingConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() };
        let blocks = (0..c.layers)
            .map(|i| EncoderBlock::new(&(vs / "blocks" / i), c.d_model, c.heads, c.d_ff, c.dropout))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            tok: nn::embedding(vs / "tok", c.vocab, c.d_model, emb),
            pos: (c.positions == Positions::Learned).then(|| nn::embedding(vs / "pos", c.max_len, c.d_model, emb)),
            sinus: (c.positions == Positions::Sinusoidal)
                .then(|| sinusoidal(c.max_len, c.d_model).to_device(vs.device())),
            rope: match c.positions {
                Positions::Rope => {
                    Some(Rope::new(c.d_model / c.heads, c.max_len, 10000.0, RopeStyle::Half, vs.device())?)
                }
                _ => None,
            },
            blocks,
            ln: nn::layer_norm(vs / "ln", vec![c.d_model], Default::default()),
            head: nn::linear(vs / "head", c.d_model, c.classes, Default::default()),
            cfg: c.clone(),
        })
    }

    /// Final token states `(B, T, D)` and, with `need_weights`, each layer's attention weights
    /// `(B, H, T, T)`. Tokens past `max_len` are dropped (the tokenizer truncates before this).
    pub fn encode(&self, ids: &Tensor, mask: &Tensor, train: bool, need_weights: bool) -> (Tensor, Vec<Tensor>) {
        let t = ids.size()[1].min(self.cfg.max_len);
        let (ids, mask) = (&ids.narrow(1, 0, t), &mask.narrow(1, 0, t));
        let mut x = self.tok.forward(ids);
        if let Some(p) = &self.pos {
            x = x + p.forward(&Tensor::arange(t, (Kind::Int64, ids.device())));
        }
        if let Some(s) = &self.sinus {
            x = x + s.narrow(0, 0, t);
        }
        let mut x = x.dropout(self.cfg.dropout, train);
        let keep = padding_mask(mask);
        let mut weights = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let pass = Pass { keep: Some(&keep), rope: self.rope.as_ref(), train, need_weights };
            let (y, w) = b.forward(&x, pass);
            x = y;
            weights.extend(w);
        }
        (self.ln.forward(&x), weights)
    }

    /// Class logits `(B, classes)` for token ids `(B, T)` and their attention mask `(B, T)`.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let (h, _) = self.encode(ids, mask, train, false);
        let t = h.size()[1];
        self.head.forward(&pool(&h, &mask.narrow(1, 0, t), self.cfg.pooling))
    }
}
