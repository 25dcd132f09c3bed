//! LoRA (Hu et al. 2021, 低秩适配): a frozen linear layer `W` (out × in) plus a trainable
//! low-rank update, `y = x Wᵀ + (dropout(x) Aᵀ) Bᵀ · s`, with `A` (r × in), `B` (out × r) and the
//! scale `s = α / r` (or `α / √r` with rsLoRA, Kalajdzievski 2023). Initialised as Hugging Face
//! peft does: `A` kaiming-uniform with `a = √5` (uniform in ±1/√in), `B` zeros, so the adapted
//! model starts as the base model exactly and only `B`'s first step moves it.
//!
//! The adapter's numbers are kept in fp32 whatever the base's dtype (peft's
//! `autocast_adapter_dtype`): the update is computed in fp32 and added to the base output, and
//! the sum is cast back to the base's dtype.

use tch::nn;
use tch::{Kind, Tensor};

/// What every adapted layer shares: the rank, the scale and the dropout on the adapter's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSpec {
    /// Rank `r` of the update.
    pub r: i64,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Dropout probability on the adapter's input while training (peft's `lora_dropout`).
    pub dropout: f64,
    /// rsLoRA: scale by `α / √r` instead of `α / r`.
    pub rslora: bool,
}

impl LoraSpec {
    /// The scale `s` applied to the update.
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// One layer's low-rank update.
#[derive(Debug)]
pub struct Lora {
    /// `(r, in)`, variable `lora_A.weight` under the layer's path.
    pub a: Tensor,
    /// `(out, r)`, variable `lora_B.weight`.
    pub b: Tensor,
    pub spec: LoraSpec,
}

impl Lora {
    /// Creates `lora_A.weight` and `lora_B.weight` under `vs` (the adapted layer's path; the
    /// adapter's own fp32 VarStore, apart from the frozen base), initialised as peft does.
    pub fn new(vs: &nn::Path, in_features: i64, out_features: i64, spec: LoraSpec) -> Lora {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = (vs / "lora_A").var("weight", &[spec.r, in_features], nn::Init::Uniform { lo: -bound, up: bound });
        let b = (vs / "lora_B").var("weight", &[out_features, spec.r], nn::Init::Const(0.0));
        Lora { a, b, spec }
    }

    pub fn in_features(&self) -> i64 {
        self.a.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.b.size()[0]
    }

    /// The update alone, `(dropout(x) Aᵀ) Bᵀ · s` in fp32, for `x` `(..., in)`.
    pub fn delta(&self, x: &Tensor, train: bool) -> Tensor {
        let x = x.to_kind(Kind::Float);
        // The counter-based dropout (mask recomputed in the backward, nothing stored).
        let x = crate::ops::dropout::dropout(&x, self.spec.dropout, train)
            .unwrap_or_else(|e| panic!("LoRA dropout: {e:#}"));
        x.matmul(&self.a.tr()).matmul(&self.b.tr()) * self.spec.scaling()
    }

    /// `base_out + delta(x)`, in `base_out`'s dtype: what the adapted layer returns.
    pub fn add_to(&self, base_out: &Tensor, x: &Tensor, train: bool) -> Tensor {
        (base_out.to_kind(Kind::Float) + self.delta(x, train)).to_kind(base_out.kind())
    }

    /// The update as a dense `(out, in)` matrix, `B A · s` in fp32: what merging adds to `W`.
    pub fn dense(&self) -> Tensor {
        self.b.matmul(&self.a) * self.spec.scaling()
    }

    /// Number of trainable numbers, `r · (in + out)`.
    pub fn num_params(&self) -> i64 {
        self.spec.r * (self.in_features() + self.out_features())
    }
}
