//! Chat prompts: the Jinja chat template a model ships with (a GGUF's `tokenizer.chat_template`,
//! a model directory's `tokenizer_config.json`), rendered with minijinja configured as Hugging
//! Face's TGI and mistral.rs configure it (`trim_blocks`, `lstrip_blocks`, Python string methods,
//! `raise_exception`); and [`ChatModel`], a Llama with its tokenizer and template, loaded from a
//! GGUF or a model directory.

use crate::io::gguf::{GgmlType, GgufFile, GgufWriter, Value, ValueType};
use crate::io::gguf_tokenizer::{tokenizer_from_gguf, SpecialTokens};
use crate::models::llama::{gguf_names, permute_rope_rows, Llama, WeightFormat};
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind};
use tokenizers::Tokenizer;

pub use crate::data::sft::Message;
use crate::data::sft::{SftExample, IGNORE};

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
        Self::load_as(path, kind, device, WeightFormat::Dense)
    }

    /// [`Self::load`] with the weights stored as `format` (`Llama::from_gguf_as`; a model
    /// directory is quantized after loading, and has no Q4_1 blocks to keep).
    pub fn load_as(path: &Path, kind: Kind, device: Device, format: WeightFormat) -> Result<Self> {
        let mut vs = VarStore::new(device);
        let (model, tokenizer, template) = if path.is_file() {
            let f = GgufFile::open(path)?;
            let model = Llama::from_gguf_as(&mut vs, &f, kind, format)?;
            (model, tokenizer_from_gguf(&f)?, ChatTemplate::from_gguf(&f)?)
        } else {
            let mut model = Llama::from_dir(&mut vs, path, kind)?;
            match format {
                WeightFormat::Dense => {}
                WeightFormat::Q4_1 => bail!(
                    "{}: q4_1 keeps a GGUF file's own blocks, and a model directory has none (use int8 or nf4, or the .gguf)",
                    path.display()
                ),
                other => model.quantize(other).with_context(|| path.display().to_string())?,
            }
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

    /// Writers take the dense weights (a merged adapter included); quantized ones are refused.
    fn check_dense(&self, what: &str) -> Result<()> {
        if self.model.format() != WeightFormat::Dense {
            bail!(
                "{what}: the model's weights are {}; load it dense (f32 or bf16) to write it (a GGUF export quantizes with --gguf-type)",
                self.model.format().name()
            );
        }
        Ok(())
    }

    /// Token ids of `text` (special tokens in it are matched as such; nothing is prepended).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let e = self.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(e.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// A conversation as a training example: the ids of the whole rendered conversation, and
    /// as targets the tokens of every assistant answer plus the end-of-turn token the template
    /// puts after it (so the model learns to stop), -100 everywhere else. Each answer is found
    /// as what the template adds after rendering the turns before it with the generation prompt.
    pub fn encode_for_training(&self, messages: &[Message]) -> Result<SftExample> {
        let full = self.template.render(messages, false)?;
        let end_tokens: Vec<String> =
            self.stop_ids.iter().filter_map(|&i| self.tokenizer.id_to_token(i as u32)).collect();
        let mut spans = vec![];
        for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            let prefix = self.template.render(&messages[..i], true)?;
            if !full.starts_with(&prefix) {
                bail!("message {i}: the chat template does not render the conversation as the prompt before this answer plus the answer, so its tokens cannot be found");
            }
            let rest = &full[prefix.len()..];
            let at = rest.find(m.content.as_str()).with_context(|| {
                format!("message {i}: the rendered conversation does not contain the answer as written")
            })?;
            let mut end = prefix.len() + at + m.content.len();
            if let Some(t) = end_tokens.iter().find(|t| full[end..].starts_with(t.as_str())) {
                end += t.len();
            }
            spans.push((prefix.len(), end));
        }
        let enc = self.tokenizer.encode(full.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
        let targets = ids
            .iter()
            .zip(enc.get_offsets())
            .map(|(&id, &(a, b))| if spans.iter().any(|&(s, e)| a >= s && b <= e && b > a) { id } else { IGNORE })
            .collect();
        Ok(SftExample { ids, targets })
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    /// Saves a Hugging Face model directory: config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json (with the chat template) and generation_config.json.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.check_dense("saving a model folder")?;
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

impl ChatModel {
    /// Writes the model as a llama-architecture GGUF that llama.cpp, Ollama and transformers
    /// read: the `llama.*` shape keys, the tokenizer (tokens, merges, token types, special ids)
    /// and the chat template, the norms in F32, the matrices in `ty` (F32, F16, BF16, Q8_0, Q4_0
    /// or Q4_1), Q and K rows permuted back to llama.cpp's RoPE order.
    pub fn save_gguf(&self, path: &Path, ty: GgmlType) -> Result<()> {
        self.check_dense("GGUF export")?;
        if !ty.is_supported() {
            bail!("GGUF export: {ty} cannot be written here (F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
        }
        let c = &self.model.cfg;
        let mut w = GgufWriter::new();
        let u32v = |x: i64| Value::U32(x as u32);
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        // llama.cpp's LLAMA_FTYPE codes for "all F32", "mostly F16", ...
        let file_type = match ty {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 7,
            _ => 32, // BF16
        };
        let meta = [
            ("general.architecture", Value::Str("llama".into())),
            ("general.name", Value::Str(name)),
            ("general.file_type", Value::U32(file_type)),
            ("general.quantization_version", Value::U32(2)),
            ("llama.block_count", u32v(c.num_hidden_layers)),
            ("llama.context_length", u32v(c.max_position_embeddings)),
            ("llama.embedding_length", u32v(c.hidden_size)),
            ("llama.feed_forward_length", u32v(c.intermediate_size)),
            ("llama.attention.head_count", u32v(c.num_attention_heads)),
            ("llama.attention.head_count_kv", u32v(c.num_key_value_heads)),
            ("llama.rope.freq_base", Value::F32(c.rope_theta as f32)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(c.rms_norm_eps as f32)),
            ("llama.rope.dimension_count", u32v(c.head_dim())),
            ("llama.vocab_size", u32v(c.vocab_size)),
        ];
        for (k, v) in meta {
            w.set(k, v)?;
        }
        self.tokenizer_metadata(&mut w)?;
        let vars = self.vs.variables();
        for (hf, gguf, heads) in gguf_names(c) {
            let t = vars.get(&hf).with_context(|| format!("GGUF export: the model has no {hf}"))?;
            let t = tch::no_grad(|| t.to_kind(Kind::Float).to_device(Device::Cpu));
            let t = match heads {
                Some(h) => permute_rope_rows(&t, h)?,
                None => t,
            };
            // Norms stay F32 (as llama.cpp's converter keeps them); so does any row of a width
            // the block type cannot hold.
            let tt = if t.dim() == 1 || t.size()[1] % ty.block_elems() as i64 != 0 { GgmlType::F32 } else { ty };
            w.add_tensor(&gguf, &t, tt)?;
        }
        w.write(path)
    }

    /// The `tokenizer.*` keys of a GGUF for this byte-level BPE tokenizer.
    fn tokenizer_metadata(&self, w: &mut GgufWriter) -> Result<()> {
        let json: serde_json::Value = serde_json::from_str(
            &self.tokenizer.to_string(false).map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?,
        )?;
        let model = &json["model"];
        if model["type"] != "BPE" {
            bail!("GGUF export: only a BPE tokenizer can be written, this one is {}", model["type"]);
        }
        let n = self.tokenizer.get_vocab_size(true);
        let mut tokens = vec![String::new(); n];
        for (t, id) in self.tokenizer.get_vocab(true) {
            *tokens.get_mut(id as usize).with_context(|| format!("token id {id} beyond the vocabulary of {n}"))? = t;
        }
        let special: std::collections::HashSet<u32> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let merges: Vec<Value> = model["merges"]
            .as_array()
            .context("GGUF export: the BPE model has no merges")?
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(Value::Str(s.clone())),
                serde_json::Value::Array(p) if p.len() == 2 => {
                    Ok(Value::Str(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or(""))))
                }
                other => bail!("GGUF export: a merge is {other}"),
            })
            .collect::<Result<_>>()?;
        let pre = match json["pre_tokenizer"]["type"].as_str() {
            Some("Sequence") => "smollm",
            _ => "gpt-2",
        };
        let id = |t: Option<i64>| t.map(|x| Value::U32(x as u32));
        let c = &self.model.cfg;
        w.set("tokenizer.ggml.model", Value::Str("gpt2".into()))?;
        w.set("tokenizer.ggml.pre", Value::Str(pre.into()))?;
        let types = (0..n as u32).map(|i| Value::I32(if special.contains(&i) { 3 } else { 1 })).collect();
        w.set("tokenizer.ggml.tokens", Value::Array(ValueType::Str, tokens.into_iter().map(Value::Str).collect()))?;
        w.set("tokenizer.ggml.token_type", Value::Array(ValueType::I32, types))?;
        w.set("tokenizer.ggml.merges", Value::Array(ValueType::Str, merges))?;
        for (k, v) in [("bos", id(c.bos_token_id)), ("eos", id(c.eos_token_id)), ("padding", id(c.pad_token_id))] {
            if let Some(v) = v {
                w.set(&format!("tokenizer.ggml.{k}_token_id"), v)?;
            }
        }
        if let Some(unk) = self.tokenizer.token_to_id("<|endoftext|>") {
            w.set("tokenizer.ggml.unknown_token_id", Value::U32(unk))?;
        }
        w.set("tokenizer.ggml.add_bos_token", Value::Bool(false))?;
        w.set("tokenizer.ggml.add_space_prefix", Value::Bool(false))?;
        w.set("tokenizer.chat_template", Value::Str(self.template.source.clone()))?;
        Ok(())
    }
}
