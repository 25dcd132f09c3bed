//! Module m02's MLP with a selectable initialisation and dropout. Every layer sits on its own
//! VarStore path named as PyTorch would name it (`fc1.weight`, ...); the config is serialisable so
//! it is saved as config.json beside the weights.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// How weights are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum InitKind {
    /// PyTorch's nn.Linear default: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    Default,
    /// Glorot & Bengio 2010: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); biases 0.
    XavierUniform,
    /// He et al. 2015: N(0, 2 / fan_in), for ReLU networks; biases 0.
    KaimingNormal,
}

/// A linear layer `fan_in -> fan_out` initialised by `init`.
pub fn linear(p: nn::Path, fan_in: i64, fan_out: i64, init: InitKind) -> nn::Linear {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let cfg = match init {
        InitKind::Default => nn::LinearConfig {
            ws_init: nn::Init::Uniform { lo: -bound, up: bound },
            bs_init: Some(nn::Init::Uniform { lo: -bound, up: bound }),
            bias: true,
        },
        InitKind::XavierUniform => {
            let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
            nn::LinearConfig {
                ws_init: nn::Init::Uniform { lo: -a, up: a },
                bs_init: Some(nn::Init::Const(0.0)),
                bias: true,
            }
        }
        InitKind::KaimingNormal => nn::LinearConfig {
            ws_init: nn::Init::Randn { mean: 0.0, stdev: (2.0 / fan_in as f64).sqrt() },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    };
    nn::linear(p, fan_in, fan_out, cfg)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    pub input: i64,
    pub hidden: Vec<i64>,
    pub classes: i64,
    pub dropout: f64,
    pub init: InitKind,
}

impl MlpConfig {
    /// m02's MLP for 28x28 digits: 784-512-256-10, dropout 0.2, Kaiming-normal weights.
    pub fn mnist() -> Self {
        MlpConfig { input: 784, hidden: vec![512, 256], classes: 10, dropout: 0.2, init: InitKind::KaimingNormal }
    }
}

/// Flatten, then Linear-ReLU-Dropout per hidden layer, then a Linear to the classes.
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<nn::Linear>,
    dropout: f64,
}

impl Mlp {
    pub fn new(vs: &nn::Path, cfg: &MlpConfig) -> Self {
        let mut sizes = vec![cfg.input];
        sizes.extend(&cfg.hidden);
        sizes.push(cfg.classes);
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| linear(vs / format!("fc{}", i + 1), w[0], w[1], cfg.init))
            .collect();
        Self { layers, dropout: cfg.dropout }
    }
}

impl ModuleT for Mlp {
    /// # Shapes
    /// `(B, ...)` with `input` features per example -> `(B, classes)` logits
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = xs.flatten(1, -1); // (B, input)
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h);
            if i < last {
                h = h.relu().dropout(self.dropout, train);
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::param_count;
    use tch::{Device, Kind};

    #[test]
    fn shapes_names_and_parameter_counts() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mlp = Mlp::new(
            &vs.root(),
            &MlpConfig { input: 784, hidden: vec![64, 32], classes: 10, dropout: 0.1, init: InitKind::XavierUniform },
        );
        assert_eq!(mlp.forward_t(&Tensor::zeros([3, 1, 28, 28], (Kind::Float, Device::Cpu)), true).size(), [3, 10]);
        assert_eq!(param_count(&vs), 784 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(names, ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "fc3.bias", "fc3.weight"]);
    }

    #[test]
    fn inits_have_the_documented_spread() {
        for (init, want_std) in [
            (InitKind::XavierUniform, (6.0f64 / (1000.0 + 500.0)).sqrt() / 3f64.sqrt()),
            (InitKind::KaimingNormal, (2.0f64 / 1000.0).sqrt()),
            (InitKind::Default, 1.0 / 1000f64.sqrt() / 3f64.sqrt()),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let l = linear(vs.root() / "l", 1000, 500, init);
            let std = l.ws.std(true).double_value(&[]);
            assert!((std / want_std - 1.0).abs() < 0.02, "{init:?}: std {std} vs {want_std}");
        }
    }
}
