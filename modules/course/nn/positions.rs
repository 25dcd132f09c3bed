//! Positional encodings: fixed sinusoids, learned embeddings (a flag for the models that own
//! them) and rotary embeddings (RoPE) in both of the layouts in use.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

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
