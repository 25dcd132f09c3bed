//! A BERT encoder (Devlin et al. 2019) whose variables carry Hugging Face's `BertModel` names,
//! so a checkpoint such as all-MiniLM-L6-v2's `model.safetensors` loads by name, strictly; plus
//! sentence embeddings (mean pooling + L2 normalisation, as sentence-transformers computes
//! them) and a classifier head for fine-tuning.
//!
//! BERT is post-LayerNorm: each sub-layer is `LayerNorm(x + sublayer(x))`, unlike the pre-LN
//! blocks of [`crate::nn::attention`]. Its attention is the same code, [`attention::attend`].

use crate::data::text::TextBatch;
use crate::io::safetensors::copy_strict;
use crate::nn::attention::{self, merge_heads, padding_mask, split_heads};
use crate::nn::pool::mean_pool;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// The fields of a Hugging Face BERT `config.json` that shape the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub hidden_act: String,
}

impl BertConfig {
    /// Reads and checks a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: BertConfig =
            serde_json::from_str(&text).with_context(|| format!("{}: not a BERT config", path.display()))?;
        c.check().with_context(|| format!("{}", path.display()))?;
        Ok(c)
    }

    pub fn check(&self) -> Result<()> {
        if self.hidden_act != "gelu" {
            bail!("hidden_act '{}' is not supported (only 'gelu')", self.hidden_act);
        }
        if self.num_attention_heads < 1 || self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v < 1 {
                bail!("{k} must be positive, got {v}");
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Layer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attn_out: nn::Linear,
    attn_ln: nn::LayerNorm,
    inter: nn::Linear,
    out: nn::Linear,
    out_ln: nn::LayerNorm,
}

/// `BertModel`: embeddings, encoder layers, pooler (kept so the checkpoint loads strictly).
#[derive(Debug)]
pub struct Bert {
    pub cfg: BertConfig,
    word: nn::Embedding,
    position: nn::Embedding,
    token_type: nn::Embedding,
    emb_ln: nn::LayerNorm,
    layers: Vec<Layer>,
    pooler: nn::Linear,
}

impl Bert {
    /// Builds the variables under `vs` with Hugging Face's names (`embeddings.word_embeddings.weight`,
    /// `encoder.layer.0.attention.self.query.weight`, ...).
    pub fn new(vs: &nn::Path, cfg: &BertConfig) -> Result<Self> {
        cfg.check()?;
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let ln = |p: nn::Path| {
            nn::layer_norm(
                p / "LayerNorm",
                vec![h],
                nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() },
            )
        };
        let lin = |p: nn::Path, i, o| nn::linear(p, i, o, Default::default());
        let e = vs / "embeddings";
        let emb = |name: &str, n| nn::embedding(&e / name, n, h, Default::default());
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vs / "encoder" / "layer" / i;
                let a = &l / "attention";
                Layer {
                    query: lin(&a / "self" / "query", h, h),
                    key: lin(&a / "self" / "key", h, h),
                    value: lin(&a / "self" / "value", h, h),
                    attn_out: lin(&a / "output" / "dense", h, h),
                    attn_ln: ln(&a / "output"),
                    inter: lin(&l / "intermediate" / "dense", h, f),
                    out: lin(&l / "output" / "dense", f, h),
                    out_ln: ln(&l / "output"),
                }
            })
            .collect();
        Ok(Self {
            word: emb("word_embeddings", cfg.vocab_size),
            position: emb("position_embeddings", cfg.max_position_embeddings),
            token_type: emb("token_type_embeddings", cfg.type_vocab_size),
            emb_ln: ln(vs / "embeddings"),
            layers,
            pooler: lin(vs / "pooler" / "dense", h, h),
            cfg: cfg.clone(),
        })
    }

    /// Token states `(B, T, H)` for ids and attention mask `(B, T)` (one segment: token type 0).
    /// Tokens past `max_position_embeddings` are dropped.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        self.run(ids, mask, train, false).0
    }

    /// As [`Bert::forward`], plus each layer's attention weights `(B, heads, T, T)`.
    pub fn forward_with_attention(&self, ids: &Tensor, mask: &Tensor, train: bool) -> (Tensor, Vec<Tensor>) {
        self.run(ids, mask, train, true)
    }

    fn run(&self, ids: &Tensor, mask: &Tensor, train: bool, need_weights: bool) -> (Tensor, Vec<Tensor>) {
        let t = ids.size()[1].min(self.cfg.max_position_embeddings);
        let (ids, mask) = (ids.narrow(1, 0, t), mask.narrow(1, 0, t));
        let (pd, ad) = (self.cfg.hidden_dropout_prob, self.cfg.attention_probs_dropout_prob);
        let pos = Tensor::arange(t, (Kind::Int64, ids.device()));
        let x = self.word.forward(&ids) + self.position.forward(&pos) + self.token_type.forward(&pos.zeros_like());
        let mut x = self.emb_ln.forward(&x).dropout(pd, train);
        let keep = padding_mask(&mask);
        let heads = self.cfg.num_attention_heads;
        let mut all = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (q, k, v) = (
                split_heads(&l.query.forward(&x), heads),
                split_heads(&l.key.forward(&x), heads),
                split_heads(&l.value.forward(&x), heads),
            );
            let pass = attention::Pass { keep: Some(&keep), rope: None, train, need_weights };
            let (ctx, w) = attention::attend(&q, &k, &v, ad, pass);
            let a = l.attn_out.forward(&merge_heads(&ctx)).dropout(pd, train);
            x = l.attn_ln.forward(&(a + &x));
            let f = l.out.forward(&l.inter.forward(&x).gelu("none")).dropout(pd, train);
            x = l.out_ln.forward(&(f + &x));
            all.extend(w);
        }
        (x, all)
    }

    /// BERT's pooler: `tanh(W h_[CLS] + b)` (next-sentence head; unused by sentence embeddings).
    pub fn pooled(&self, states: &Tensor) -> Tensor {
        self.pooler.forward(&states.select(1, 0)).tanh()
    }

    /// Sentence embeddings `(B, H)`: mean over real tokens, then unit L2 norm.
    pub fn embed(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let h = self.forward(ids, mask, false);
        let t = h.size()[1];
        let e = mean_pool(&h, &mask.narrow(1, 0, t));
        let n = e.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
        e / n
    }
}

/// Loads a Hugging Face BERT `model.safetensors` into `vs` (built by [`Bert::new`] at its
/// root), strictly by name. `embeddings.position_ids`, a buffer Hugging Face saves, is checked
/// to be `0..max_position_embeddings` and then not needed. Variables under `skip_prefixes`
/// (a classifier head) are left as they are.
pub fn load_hf(vs: &nn::VarStore, path: &Path, cfg: &BertConfig, skip_prefixes: &[&str]) -> Result<()> {
    let mut saved: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?.into_iter().collect();
    if let Some(p) = saved.remove("embeddings.position_ids") {
        let want = Tensor::arange(cfg.max_position_embeddings, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        if p.size() != want.size() || p.to_kind(Kind::Int64) != want {
            bail!("{}: 'embeddings.position_ids' is not 0..{}", path.display(), cfg.max_position_embeddings);
        }
    }
    copy_strict(vs, &saved, skip_prefixes, &path.display().to_string())
}

/// A pretrained BERT directory in Hugging Face's layout: `config.json`, `model.safetensors`,
/// `tokenizer.json`.
pub struct Pretrained {
    pub cfg: BertConfig,
    pub weights: std::path::PathBuf,
    pub tokenizer: std::path::PathBuf,
}

impl Pretrained {
    pub fn at(dir: &Path) -> Result<Self> {
        let cfg = BertConfig::from_file(&dir.join("config.json"))?;
        let (weights, tokenizer) = (dir.join("model.safetensors"), dir.join("tokenizer.json"));
        for p in [&weights, &tokenizer] {
            if !p.is_file() {
                bail!("{}: missing", p.display());
            }
        }
        Ok(Self { cfg, weights, tokenizer })
    }
}

/// BERT + dropout + a linear head over mean-pooled token states.
#[derive(Debug)]
pub struct BertClassifier {
    pub bert: Bert,
    head: nn::Linear,
    dropout: f64,
}

/// Where the head's variables live (skipped when loading the pretrained encoder).
pub const HEAD: &str = "classifier";

impl BertClassifier {
    pub fn new(vs: &nn::Path, cfg: &BertConfig, classes: i64) -> Result<Self> {
        Ok(Self {
            bert: Bert::new(vs, cfg)?,
            head: nn::linear(vs / HEAD, cfg.hidden_size, classes, Default::default()),
            dropout: cfg.hidden_dropout_prob,
        })
    }

    pub fn logits(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let h = self.bert.forward(ids, mask, train);
        let t = h.size()[1];
        let pooled = mean_pool(&h, &mask.narrow(1, 0, t));
        self.head.forward(&pooled.dropout(self.dropout, train))
    }
}

impl super::Classifier<TextBatch> for BertClassifier {
    fn logits(&self, b: &TextBatch, device: Device, train: bool) -> Tensor {
        BertClassifier::logits(self, &b.ids.to_device(device), &b.mask.to_device(device), train)
    }
}

/// Stops gradients for every variable of `vs` outside the classifier head (frozen encoder).
pub fn freeze_encoder(vs: &nn::VarStore) {
    for (name, t) in vs.variables() {
        if !name.starts_with(HEAD) {
            let _ = t.set_requires_grad(false);
        }
    }
}
