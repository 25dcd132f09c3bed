//! The tokenizer stored in a GGUF's metadata, rebuilt as a Hugging Face `tokenizers::Tokenizer`
//! (and so savable as `tokenizer.json`).
//!
//! Keys read: `tokenizer.ggml.model` (only `gpt2`, byte-level BPE, is rebuilt),
//! `tokenizer.ggml.tokens` (id -> token string, in GPT-2's byte-to-unicode alphabet),
//! `tokenizer.ggml.merges` (`"a b"` pairs in rank order), `tokenizer.ggml.token_type` (3 =
//! control: added as special tokens, matched before BPE and never split),
//! `tokenizer.ggml.pre` (the pre-tokenizer llama.cpp names: `smollm` splits every digit on its
//! own before GPT-2's regex; `gpt-2` and `default` are GPT-2's regex alone) and
//! `tokenizer.ggml.add_bos_token`.

use super::gguf::{GgufFile, Value};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// llama.cpp's token type for control tokens (`LLAMA_TOKEN_TYPE_CONTROL`).
const TOKEN_TYPE_CONTROL: u64 = 3;

/// The special token ids a GGUF names (`tokenizer.ggml.*_token_id`), where present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
}

impl SpecialTokens {
    pub fn from_gguf(f: &GgufFile) -> Self {
        let id = |k: &str| f.get(&format!("tokenizer.ggml.{k}_token_id")).and_then(Value::as_u64).map(|v| v as u32);
        Self { bos: id("bos"), eos: id("eos"), unk: id("unknown"), pad: id("padding") }
    }
}

/// Rebuilds the byte-level BPE tokenizer of `f`. Refuses tokenizer models and pre-tokenizers it
/// does not reproduce, naming the metadata key and its value.
pub fn tokenizer_from_gguf(f: &GgufFile) -> Result<Tokenizer> {
    let file = f.path().display().to_string();
    let model = f.require_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!("{file}: tokenizer.ggml.model is {model:?}; only \"gpt2\" (byte-level BPE) is rebuilt here");
    }
    let tokens = f.require_strings("tokenizer.ggml.tokens")?;
    let mut seen = HashSet::with_capacity(tokens.len());
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| !seen.insert(**t)) {
        bail!("{file}: tokenizer.ggml.tokens has {t:?} twice (again at id {i})");
    }
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let merges = f
        .require_strings("tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (a, b) = m
                .split_once(' ')
                .with_context(|| format!("{file}: tokenizer.ggml.merges[{i}] = {m:?} is not \"a b\""))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("{file}: building the BPE model from tokens and merges: {e}"))?;
    let mut tok = Tokenizer::new(bpe);

    let pre = f.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let byte_level = ByteLevel::new(false, false, true);
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt-2" | "gpt2" | "default" => byte_level.into(),
        other => bail!("{file}: tokenizer.ggml.pre is {other:?}; rebuilt here: \"smollm\", \"gpt-2\", \"default\""),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    // Control tokens are matched whole before the model sees the text.
    let types = match f.get("tokenizer.ggml.token_type") {
        Some(v) => {
            v.as_array().with_context(|| format!("{file}: tokenizer.ggml.token_type is {v}, expected an array"))?
        }
        None => &[],
    };
    if !types.is_empty() && types.len() != tokens.len() {
        bail!("{file}: tokenizer.ggml.token_type has {} entries for {} tokens", types.len(), tokens.len());
    }
    let specials: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| t.as_u64() == Some(TOKEN_TYPE_CONTROL))
        .map(|(i, _)| AddedToken::from(tokens[i].to_string(), true).normalized(false))
        .collect();
    tok.add_special_tokens(&specials);

    let ids = SpecialTokens::from_gguf(f);
    if f.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool) == Some(true) {
        let bos = ids.bos.with_context(|| format!("{file}: add_bos_token is true but there is no bos_token_id"))?;
        let name =
            tokens.get(bos as usize).with_context(|| format!("{file}: bos_token_id {bos} is out of the vocabulary"))?;
        let post = TemplateProcessing::builder()
            .try_single(format!("{name}:0 $A:0"))
            .and_then(|b| b.try_pair(format!("{name}:0 $A:0 $B:1")))
            .map_err(|e| anyhow::anyhow!("{file}: BOS template: {e}"))?
            .special_tokens(vec![(name.to_string(), bos)])
            .build()
            .map_err(|e| anyhow::anyhow!("{file}: BOS template: {e}"))?;
        tok.with_post_processor(Some(post));
    }
    Ok(tok)
}
