//! The models: m02's MLP and LeNet, m03's Transformer encoder and BERT, m04's GPT, and the Llama
//! decoder (SmolLM2) of m06-m08. Each is a
//! struct built on a tch `nn::Path` from its config, with parameter names matching PyTorch / Hugging
//! Face; none knows how it is trained or distributed. The two traits the training loops take live
//! here, and each model implements them in its own file.

pub mod bert;
pub mod encoder;
pub mod gpt;
pub mod lenet;
pub mod llama;
pub mod mlp;
pub mod text;

use crate::data::vision::ImageBatch;
pub use lenet::{CnnConfig, LeNet};
pub use mlp::{InitKind, Mlp, MlpConfig};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

/// A model that turns a batch of kind `B` into class logits `(B, classes)`. Every tch
/// `ModuleT` is one for image batches; m03's text models implement it for token batches.
pub trait Classifier<B> {
    fn logits(&self, batch: &B, device: Device, train: bool) -> Tensor;
}

impl<M: ModuleT + ?Sized> Classifier<ImageBatch> for M {
    fn logits(&self, batch: &ImageBatch, device: Device, train: bool) -> Tensor {
        self.forward_t(&batch.images.to_device(device), train)
    }
}

/// A model the LM loop can train: the mean next-token loss of `(B, T)` inputs against `(B, T)`
/// targets, where a target of -100 (`nn::loss::IGNORE_INDEX`) leaves its position out of the mean
/// (prompt tokens in instruction tuning, padding).
pub trait LanguageModel {
    fn loss(&self, x: &Tensor, y: &Tensor, train: bool, fused_loss: bool) -> Tensor;
}

/// A model that predicts the next token: what generation (`infer::generate`) needs.
pub trait CausalLm {
    fn vocab_size(&self) -> i64;
    /// The longest input the model attends over (the GPT's block size).
    fn context_len(&self) -> i64;
    fn device(&self) -> Device;
    /// Logits `(B, T, V)` for token ids `(B, T)`, in eval mode.
    fn logits(&self, ids: &Tensor) -> Tensor;
}

/// Either model, built from its config (which is what config.json holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model_type")]
pub enum ModelConfig {
    #[serde(rename = "course_mlp")]
    Mlp(MlpConfig),
    #[serde(rename = "course_lenet")]
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
