//! m03's Transformer encoder trained from scratch: a pre-LayerNorm encoder block and an encoder
//! classifier with CLS or mean pooling, over the layers in `nn`.

use crate::data::text::TextBatch;
use crate::nn::attention::{padding_mask, MultiHeadAttention, Pass};
use crate::nn::pool::{pool, Pooling};
use crate::nn::positions::{sinusoidal, Positions, Rope, RopeStyle};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

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

impl super::Classifier<TextBatch> for EncoderClassifier {
    fn logits(&self, b: &TextBatch, device: Device, train: bool) -> Tensor {
        EncoderClassifier::logits(self, &b.ids.to_device(device), &b.mask.to_device(device), train)
    }
}
