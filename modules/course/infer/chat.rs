//! Chat prompts: the Jinja chat template a model ships with (a GGUF's `tokenizer.chat_template`,
//! a model directory's `tokenizer_config.json`), rendered with minijinja configured as Hugging
//! Face's TGI and mistral.rs configure it (`trim_blocks`, `lstrip_blocks`, Python string methods,
//! `raise_exception`); and [`ChatModel`], a Llama with its tokenizer and template, loaded from a
//! GGUF or a model directory.

use crate::io::gguf::GgufFile;
use crate::io::gguf_tokenizer::{tokenizer_from_gguf, SpecialTokens};
use crate::models::llama::Llama;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind};
use tokenizers::Tokenizer;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
    pub fn system(content: &str) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: &str) -> Self {
        Self::new("assistant", content)
    }
}

/// The roles a chat template is rendered with.
pub const ROLES: &[&str] = &["system", "user", "assistant"];

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({} bytes, bos {:?}, eos {:?})", self.source.len(), self.bos_token, self.eos_token)
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names the line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| anyhow::anyhow!("chat template: {e:#}"))?;
        Ok(Self { env, source: source.into(), bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// The template in a GGUF (`tokenizer.chat_template`), with its BOS and EOS token strings.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let source = f.require_str("tokenizer.chat_template")?;
        let tokens = f.require_strings("tokenizer.ggml.tokens")?;
        let ids = SpecialTokens::from_gguf(f);
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).copied().unwrap_or("");
        Self::new(source, name(ids.bos), name(ids.eos)).with_context(|| f.path().display().to_string())
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the assistant's
    /// answer begins. Roles must be system, user or assistant.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        for (i, m) in messages.iter().enumerate() {
            if !ROLES.contains(&m.role.as_str()) {
                bail!("message {i}: role {:?} is not one of {ROLES:?}", m.role);
            }
        }
        let t = self.env.get_template("chat").expect("added in new");
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| anyhow::anyhow!("rendering the chat template: {e:#}"))
    }
}

/// A Llama chat model: weights, tokenizer, chat template and the tokens that end an answer.
pub struct ChatModel {
    pub model: Llama,
    pub vs: VarStore,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Token ids that end generation (the EOS and, for ChatML models, `<|im_end|>`).
    pub stop_ids: Vec<i64>,
    pub kind: Kind,
}

impl std::fmt::Debug for ChatModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatModel({:?}, {:?}, {:?})", self.model.cfg, self.kind, self.template)
    }
}

impl ChatModel {
    /// Loads a `.gguf` file or a model directory (`config.json`, `model.safetensors`,
    /// `tokenizer.json`, `tokenizer_config.json` with the chat template), in `kind`.
    pub fn load(path: &Path, kind: Kind, device: Device) -> Result<Self> {
        let mut vs = VarStore::new(device);
        let (model, tokenizer, template) = if path.is_file() {
            let f = GgufFile::open(path)?;
            let model = Llama::from_gguf(&mut vs, &f, kind)?;
            (model, tokenizer_from_gguf(&f)?, ChatTemplate::from_gguf(&f)?)
        } else {
            let model = Llama::from_dir(&mut vs, path, kind)?;
            let tj = path.join("tokenizer.json");
            let tokenizer = Tokenizer::from_file(&tj).map_err(|e| anyhow::anyhow!("{}: {e}", tj.display()))?;
            let tc = path.join("tokenizer_config.json");
            let text = std::fs::read_to_string(&tc).with_context(|| format!("reading {}", tc.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not JSON", tc.display()))?;
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
            let source = v
                .get("chat_template")
                .and_then(|x| x.as_str())
                .with_context(|| format!("{}: no \"chat_template\"", tc.display()))?;
            (
                model,
                tokenizer,
                ChatTemplate::new(source, &s("bos_token"), &s("eos_token"))
                    .with_context(|| tc.display().to_string())?,
            )
        };
        // Inference: frozen weights (no gradients, and the model's stacked q/k/v path).
        vs.freeze();
        let mut stop_ids: Vec<i64> = model.cfg.eos_token_id.into_iter().collect();
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = tokenizer.token_to_id(t) {
                if !stop_ids.contains(&(id as i64)) {
                    stop_ids.push(id as i64);
                }
            }
        }
        Ok(Self { model, vs, tokenizer, template, stop_ids, kind })
    }

    /// Token ids of `text` (special tokens in it are matched as such; nothing is prepended).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let e = self.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(e.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    /// Saves a Hugging Face model directory: config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json (with the chat template) and generation_config.json.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cfg = self.model.config_json(self.kind)?;
        let gen = serde_json::json!({
            "bos_token_id": self.model.cfg.bos_token_id,
            "eos_token_id": self.model.cfg.eos_token_id,
            "pad_token_id": self.model.cfg.pad_token_id,
        });
        crate::io::hf::write_model_files(dir, &cfg, &self.vs, Some(&gen))?;
        let tj = dir.join("tokenizer.json");
        let json = self.tokenizer.to_string(true).map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
        crate::sys::fsutil::write_atomic(&tj, json.as_bytes())?;
        let id_str = |id: Option<i64>| id.and_then(|i| self.tokenizer.id_to_token(i as u32));
        let tc = serde_json::json!({
            "tokenizer_class": "GPT2Tokenizer",
            "chat_template": self.template.source,
            "bos_token": id_str(self.model.cfg.bos_token_id),
            "eos_token": id_str(self.model.cfg.eos_token_id),
            "pad_token": id_str(self.model.cfg.pad_token_id),
            "unk_token": "<|endoftext|>",
            "add_bos_token": false,
            "add_prefix_space": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": self.model.cfg.max_position_embeddings,
        });
        crate::sys::fsutil::write_json_atomic(&dir.join("tokenizer_config.json"), &tc)
    }
}
