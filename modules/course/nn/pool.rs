//! Pooling: how a sequence of token states `(B, T, D)` becomes one vector per sequence.

use serde::{Deserialize, Serialize};
use tch::Tensor;

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
