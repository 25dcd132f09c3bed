//! Module m02's LeNet-5-style CNN with batch norm, its layers on PyTorch's paths (`conv1.weight`,
//! `bn1.running_mean`, ...). The batch norm is built by a factory, so m05 swaps in SyncBatchNorm
//! without the model knowing about processes.

use super::mlp::{linear, InitKind};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CnnConfig {
    /// Channels of the two convolutions (LeNet-5 has 6 and 16; wider converges faster).
    pub channels: (i64, i64),
    pub hidden: i64,
    pub classes: i64,
    pub dropout: f64,
    /// Biases on the convolutions. Batch norm right after subtracts any bias again, so its
    /// gradient is zero up to rounding; Adam would still move it by ~lr per step on that noise.
    /// m05 turns it off (the usual `bias=False` before BN); m02 keeps it (its checkpoints have it).
    #[serde(default = "conv_bias_default")]
    pub conv_bias: bool,
}

impl CnnConfig {
    /// m02's CNN: LeNet-5's shape, wider (32 and 64 channels, 256 hidden), dropout 0.3.
    pub fn lenet() -> Self {
        CnnConfig { channels: (32, 64), hidden: 256, classes: 10, dropout: 0.3, conv_bias: true }
    }
}

fn conv_bias_default() -> bool {
    true
}

/// LeNet-5 (LeCun et al. 1998) with batch norm and ReLU: conv5x5(pad 2)-BN-ReLU-maxpool,
/// conv5x5-BN-ReLU-maxpool, FC-ReLU-dropout, FC.
#[derive(Debug)]
pub struct LeNet {
    conv1: nn::Conv2D,
    bn1: Box<dyn ModuleT>,
    conv2: nn::Conv2D,
    bn2: Box<dyn ModuleT>,
    fc1: nn::Linear,
    fc2: nn::Linear,
    dropout: f64,
}

/// Builds the batch norm of `channels` at a path. Plain batch norm by default; m05's DDP passes
/// one that builds `SyncBatchNorm` over its process group. Both keep the same variable names, so
/// checkpoints load into either.
pub type NormFactory<'a> = &'a dyn Fn(nn::Path, i64) -> Box<dyn ModuleT>;

/// The default norm: `nn::BatchNorm2d` (eps 1e-5, momentum 0.1, as PyTorch's).
pub fn batch_norm(p: nn::Path, channels: i64) -> Box<dyn ModuleT> {
    Box::new(nn::batch_norm2d(p, channels, Default::default()))
}

impl LeNet {
    pub fn new(vs: &nn::Path, cfg: &CnnConfig) -> Self {
        Self::with_norm(vs, cfg, &batch_norm)
    }

    /// With another batch norm: m05 passes `SyncBatchNorm` over its process group
    /// (torch's `SyncBatchNorm.convert_sync_batchnorm`), so N ranks of batch b train like one
    /// process of batch N·b. The model itself knows nothing of processes.
    pub fn with_norm(vs: &nn::Path, cfg: &CnnConfig, norm: NormFactory) -> Self {
        let (c1, c2) = cfg.channels;
        let conv = |name: &str, i, o, pad| {
            nn::conv2d(vs / name, i, o, 5, nn::ConvConfig { padding: pad, bias: cfg.conv_bias, ..Default::default() })
        };
        Self {
            conv1: conv("conv1", 1, c1, 2),
            bn1: norm(vs / "bn1", c1),
            conv2: conv("conv2", c1, c2, 0),
            bn2: norm(vs / "bn2", c2),
            fc1: linear(vs / "fc1", c2 * 25, cfg.hidden, InitKind::Default),
            fc2: linear(vs / "fc2", cfg.hidden, cfg.classes, InitKind::Default),
            dropout: cfg.dropout,
        }
    }
}

impl ModuleT for LeNet {
    /// # Shapes
    /// `(B, 1, 28, 28)` -> `(B, classes)` logits
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = self.bn1.forward_t(&self.conv1.forward(xs), train).relu().max_pool2d_default(2); // (B, c1, 14, 14)
        let h = self.bn2.forward_t(&self.conv2.forward(&h), train).relu().max_pool2d_default(2); // (B, c2, 5, 5)
        let h = h.flatten(1, -1); // (B, c2 * 25)
        let h = self.fc1.forward(&h).relu().dropout(self.dropout, train); // (B, hidden)
        self.fc2.forward(&h) // (B, classes)
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
        let cnn = LeNet::new(
            &vs.root(),
            &CnnConfig { channels: (6, 16), hidden: 120, classes: 10, dropout: 0.0, conv_bias: true },
        );
        assert_eq!(cnn.forward_t(&Tensor::zeros([2, 1, 28, 28], (Kind::Float, Device::Cpu)), false).size(), [2, 10]);
        // LeNet-5's sizes: conv 1*6*25+6, bn 2*6, conv 6*16*25+16, bn 2*16, fc 400*120+120, fc 120*10+10.
        assert_eq!(param_count(&vs), 156 + 12 + 2416 + 32 + 48120 + 1210);
        assert!(vs.variables().contains_key("bn2.running_var"));
    }
}
