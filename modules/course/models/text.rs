//! m03's two text classifiers — the Transformer encoder trained from scratch and the fine-tuned
//! MiniLM — behind one type, saved as and loaded from `io::hf` model directories.

use crate::data::text::{collate_tokens, TextBatch, TextTask};
use crate::data::tokenize;
use crate::io::hf::ModelDir;
use crate::models::bert::{BertClassifier, BertConfig};
use crate::models::encoder::{EncoderClassifier, EncoderConfig};
use crate::models::Classifier;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

/// What a text classifier's `config.json` holds: enough to rebuild it. The fine-tuned MiniLM is a
/// Hugging Face BERT config (model_type "bert", its fields at the top level, `architectures`
/// naming the encoder as a BertModel) with the classes and the course's mean-pool head; the
/// scratch encoder is "course_encoder".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "model_type")]
pub enum TextClassifierConfig {
    #[serde(rename = "course_encoder")]
    Scratch { encoder: EncoderConfig, classes: Vec<String>, max_len: usize, task: TextTask },
    #[serde(rename = "bert")]
    Minilm {
        #[serde(flatten)]
        bert: BertConfig,
        /// Hugging Face's `architectures`: the encoder alone is a BertModel.
        architectures: Vec<String>,
        classes: Vec<String>,
        max_len: usize,
        task: TextTask,
    },
}

impl TextClassifierConfig {
    /// The model types a text classifier directory may have.
    pub const MODEL_TYPES: [&'static str; 2] = ["course_encoder", "bert"];

    pub fn classes(&self) -> &[String] {
        match self {
            Self::Scratch { classes, .. } | Self::Minilm { classes, .. } => classes,
        }
    }
    pub fn max_len(&self) -> usize {
        match self {
            Self::Scratch { max_len, .. } | Self::Minilm { max_len, .. } => *max_len,
        }
    }
}

/// Either model, behind one interface.
#[derive(Debug)]
pub enum TextClassifier {
    Scratch(EncoderClassifier),
    Minilm(BertClassifier),
}

impl TextClassifier {
    pub fn build(vs: &VarStore, cfg: &TextClassifierConfig) -> Result<Self> {
        Ok(match cfg {
            TextClassifierConfig::Scratch { encoder, .. } => {
                Self::Scratch(EncoderClassifier::new(&vs.root(), encoder)?)
            }
            TextClassifierConfig::Minilm { bert, classes, .. } => {
                Self::Minilm(BertClassifier::new(&vs.root(), bert, classes.len() as i64)?)
            }
        })
    }

    /// Last layer's attention `(B, H, T, T)` for one batch, in eval mode.
    pub fn last_attention(&self, ids: &Tensor, mask: &Tensor) -> Option<Tensor> {
        tch::no_grad(|| match self {
            Self::Scratch(m) => m.encode(ids, mask, false, true).1.pop(),
            Self::Minilm(m) => m.bert.forward_with_attention(ids, mask, false).1.pop(),
        })
    }

    /// Loads a model directory (`io::hf`): config.json, tokenizer.json, model.safetensors.
    pub fn load(dir: &Path, device: Device) -> Result<LoadedTextClassifier> {
        let md = ModelDir::open(dir)?;
        md.expect_type(&TextClassifierConfig::MODEL_TYPES)?;
        let config: TextClassifierConfig = md.config_as()?;
        let tokenizer = tokenize::load(&md.require("tokenizer.json")?)?;
        let vs = VarStore::new(device);
        let model = Self::build(&vs, &config)?;
        crate::io::safetensors::load_into(&vs, &md.weights())?;
        Ok(LoadedTextClassifier { config, tokenizer, model, _vs: vs, device })
    }
}

impl Classifier<TextBatch> for TextClassifier {
    fn logits(&self, b: &TextBatch, device: Device, train: bool) -> Tensor {
        match self {
            Self::Scratch(m) => Classifier::logits(m, b, device, train),
            Self::Minilm(m) => Classifier::logits(m, b, device, train),
        }
    }
}

/// A text classifier loaded from its directory, with its tokenizer: ready to classify.
pub struct LoadedTextClassifier {
    pub config: TextClassifierConfig,
    pub tokenizer: Tokenizer,
    pub model: TextClassifier,
    _vs: VarStore,
    device: Device,
}

impl LoadedTextClassifier {
    /// Class probabilities `(N, classes)` for `texts`, on the CPU.
    pub fn probabilities(&self, texts: &[&str]) -> Result<Tensor> {
        let ids = tokenize::encode_all(&self.tokenizer, texts, self.config.max_len())?;
        let pad = self.tokenizer.token_to_id("[PAD]").unwrap_or(0) as i64;
        let batch = collate_tokens(pad)(ids.into_iter().map(|s| (s, 0)).collect())?;
        Ok(tch::no_grad(|| self.model.logits(&batch, self.device, false).softmax(-1, Kind::Float))
            .to_device(Device::Cpu))
    }
}
