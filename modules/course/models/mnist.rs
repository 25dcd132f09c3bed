//! Module m02's models and losses: an MLP with a selectable initialisation and dropout, and a
//! LeNet-5-style CNN with batch norm. Every layer sits on its own VarStore path named as
//! PyTorch would name it (`fc1.weight`, `bn1.running_mean`, ...), and each model's config is
//! serialisable so it is saved as config.json beside the weights.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Reduction, Tensor};

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

fn linear(p: nn::Path, fan_in: i64, fan_out: i64, init: InitKind) -> nn::Linear {
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

fn conv_bias_default() -> bool {
    true
}

/// LeNet-5 (LeCun et al. 1998) with batch norm and ReLU: conv5x5(pad 2)-BN-ReLU-maxpool,
/// conv5x5-BN-ReLU-maxpool, FC-ReLU-dropout, FC.
#[derive(Debug)]
pub struct LeNet {
    conv1: nn::Conv2D,
    bn1: Norm,
    conv2: nn::Conv2D,
    bn2: Norm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    dropout: f64,
}

/// Plain batch norm, or batch norm synchronised over a process group (m05's DDP); both keep
/// the same variable names, so checkpoints load into either.
#[derive(Debug)]
enum Norm {
    Local(nn::BatchNorm),
    Sync(crate::dist::ddp::SyncBatchNorm),
}

impl ModuleT for Norm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Norm::Local(n) => n.forward_t(xs, train),
            Norm::Sync(n) => n.forward_t(xs, train),
        }
    }
}

impl LeNet {
    pub fn new(vs: &nn::Path, cfg: &CnnConfig) -> Self {
        Self::with_group(vs, cfg, None)
    }

    /// With a process group, the batch norms use the statistics of every rank's samples
    /// (torch's `SyncBatchNorm.convert_sync_batchnorm`), so N ranks of batch b train like one
    /// process of batch N·b.
    pub fn with_group(
        vs: &nn::Path,
        cfg: &CnnConfig,
        group: Option<std::sync::Arc<crate::dist::c10d::ProcessGroup>>,
    ) -> Self {
        let norm = |name: &str, c: i64| match &group {
            Some(g) => Norm::Sync(crate::dist::ddp::SyncBatchNorm::new(&(vs / name), c, Some(g.clone()))),
            None => Norm::Local(nn::batch_norm2d(vs / name, c, Default::default())),
        };
        let (c1, c2) = cfg.channels;
        let conv = |name: &str, i, o, pad| {
            nn::conv2d(vs / name, i, o, 5, nn::ConvConfig { padding: pad, bias: cfg.conv_bias, ..Default::default() })
        };
        Self {
            conv1: conv("conv1", 1, c1, 2),
            bn1: norm("bn1", c1),
            conv2: conv("conv2", c1, c2, 0),
            bn2: norm("bn2", c2),
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
        let h = self.conv1.forward(xs).apply_t(&self.bn1, train).relu().max_pool2d_default(2); // (B, c1, 14, 14)
        let h = self.conv2.forward(&h).apply_t(&self.bn2, train).relu().max_pool2d_default(2); // (B, c2, 5, 5)
        let h = h.flatten(1, -1); // (B, c2 * 25)
        let h = self.fc1.forward(&h).relu().dropout(self.dropout, train); // (B, hidden)
        self.fc2.forward(&h) // (B, classes)
    }
}

/// Either model, built from its config (which is what config.json holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case")]
pub enum ModelConfig {
    Mlp(MlpConfig),
    Cnn(CnnConfig),
}

impl ModelConfig {
    pub fn build(&self, vs: &nn::Path) -> Box<dyn ModuleT + Send> {
        match self {
            ModelConfig::Mlp(c) => Box::new(Mlp::new(vs, c)),
            ModelConfig::Cnn(c) => Box::new(LeNet::new(vs, c)),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            ModelConfig::Mlp(_) => "mlp",
            ModelConfig::Cnn(_) => "cnn",
        }
    }
}

/// Trainable parameters in a VarStore (buffers such as batch-norm running stats excluded).
pub fn param_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

/// Mean cross-entropy of logits `(B, C)` against class indices `(B)`, with label smoothing
/// (Szegedy et al. 2016): the target puts `1 - s + s/C` on the true class and `s/C` elsewhere.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, label_smoothing: f64) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, -100, label_smoothing)
}

/// Mean squared error.
pub fn mse(pred: &Tensor, target: &Tensor) -> Tensor {
    pred.mse_loss(target, Reduction::Mean)
}

/// Mean of a loss over a batch in f64 (for logging).
pub fn scalar(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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

    #[test]
    fn label_smoothing_matches_the_analytic_loss() {
        let logits = Tensor::from_slice(&[2.0f64, 0.0, -1.0]).view([1, 3]);
        let labels = Tensor::from_slice(&[0i64]);
        let lp: Vec<f64> = Vec::try_from(logits.log_softmax(-1, Kind::Double).view([3])).unwrap();
        let s = 0.1;
        let want = -((1.0 - s + s / 3.0) * lp[0] + s / 3.0 * (lp[1] + lp[2]));
        assert!((scalar(&cross_entropy(&logits, &labels, s)) - want).abs() < 1e-12);
        assert!((scalar(&cross_entropy(&logits, &labels, 0.0)) + lp[0]).abs() < 1e-12);
        let a = Tensor::from_slice(&[1.0f64, 2.0]);
        assert_eq!(scalar(&mse(&a, &Tensor::from_slice(&[0.0f64, 0.0]))), 2.5);
    }
}
