//! Tokenizers through Hugging Face's `tokenizers` crate: train a WordPiece (BERT-style) or a
//! byte-level BPE (GPT-2-style) tokenizer on a corpus, load a `tokenizer.json` (MiniLM's) or
//! GPT-2's `vocab.json` + `merges.txt`, encode with truncation and no padding, and pad a batch
//! into `(ids, attention_mask)` tensors.
//!
//! Padding is off when a tokenizer is loaded (MiniLM's file pads every text to 128): the batch
//! collate step pads to the longest sequence of each batch instead, which wastes less compute.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tch::Tensor;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// Which kind of tokenizer to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// BERT's: lower-cased, split on whitespace and punctuation, `##` continuation pieces,
    /// `[CLS] ... [SEP]` around every text.
    Wordpiece,
    /// GPT-2's: byte-level (no unknown tokens), merges learned from pair counts.
    Bpe,
}

fn tk(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

pub const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Trains a tokenizer of `kind` with at most `vocab_size` tokens on `texts`. Special tokens
/// come first, so `[PAD]` is id 0.
pub fn train<S: AsRef<str> + Send>(
    kind: TokenizerKind,
    texts: impl Iterator<Item = S> + Send,
    vocab_size: usize,
    min_frequency: u64,
) -> Result<Tokenizer> {
    if vocab_size < 300 {
        bail!("--vocab-size must be at least 300 (the byte alphabet and special tokens), got {vocab_size}");
    }
    let specials: Vec<AddedToken> = SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect();
    let mut tok = match kind {
        TokenizerKind::Wordpiece => {
            let mut t = Tokenizer::new(WordPiece::builder().unk_token("[UNK]".into()).build().map_err(tk)?);
            t.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
            t.with_pre_tokenizer(Some(BertPreTokenizer));
            t.with_decoder(Some(WordPieceDecoder::default()));
            t
        }
        TokenizerKind::Bpe => {
            let mut t = Tokenizer::new(BPE::default());
            t.with_pre_tokenizer(Some(ByteLevel::default()));
            t.with_decoder(Some(ByteLevelDecoder::default()));
            t
        }
    };
    let mut trainer = match kind {
        TokenizerKind::Wordpiece => TrainerWrapper::WordPieceTrainer(
            WordPieceTrainer::builder()
                .vocab_size(vocab_size)
                .min_frequency(min_frequency)
                .special_tokens(specials)
                .show_progress(false)
                .build(),
        ),
        TokenizerKind::Bpe => TrainerWrapper::BpeTrainer(
            BpeTrainer::builder()
                .vocab_size(vocab_size)
                .min_frequency(min_frequency)
                .special_tokens(specials)
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .show_progress(false)
                .build(),
        ),
    };
    tok.train(&mut trainer, texts).map_err(tk).context("training the tokenizer")?;
    let id = |s: &str| tok.token_to_id(s).ok_or_else(|| anyhow!("the trained vocabulary lacks {s}"));
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    tok.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
    Ok(tok)
}

/// Loads a `tokenizer.json` with padding and truncation turned off.
pub fn load(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        bail!("{}: no such tokenizer file", path.display());
    }
    let mut t =
        Tokenizer::from_file(path).map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", path.display()))?;
    t.with_padding(None);
    t.with_truncation(None).map_err(tk)?;
    Ok(t)
}

/// GPT-2's tokenizer from its `vocab.json` (= `encoder.json`) and `merges.txt` (= `vocab.bpe`).
pub fn gpt2(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
    for p in [vocab, merges] {
        if !p.is_file() {
            bail!("{}: no such file", p.display());
        }
    }
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| anyhow!("{} + {}: {e}", vocab.display(), merges.display()))?;
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(t)
}

/// Saves `tokenizer.json` atomically.
pub fn save(tok: &Tokenizer, path: &Path) -> Result<()> {
    let json = tok.to_string(true).map_err(tk)?;
    crate::sys::fsutil::write_atomic(path, json.as_bytes())
}

/// Token ids of each text, with special tokens, cut to at most `max_len` (the final `[SEP]`
/// is kept when the tokenizer adds one).
pub fn encode_all(tok: &Tokenizer, texts: &[&str], max_len: usize) -> Result<Vec<Vec<i64>>> {
    if max_len < 2 {
        bail!("--max-len must be at least 2, got {max_len}");
    }
    let enc = tok.encode_batch(texts.to_vec(), true).map_err(tk).context("tokenizing")?;
    let sep = tok.token_to_id("[SEP]");
    Ok(enc
        .into_iter()
        .map(|e| {
            let ids = e.get_ids();
            let mut v: Vec<i64> = ids.iter().take(max_len).map(|&i| i as i64).collect();
            if ids.len() > max_len {
                if let (Some(s), Some(&last)) = (sep, ids.last()) {
                    if last == s {
                        *v.last_mut().expect("max_len >= 2") = s as i64;
                    }
                }
            }
            v
        })
        .collect())
}

/// Pads sequences to the longest one: `(ids (B, T), attention_mask (B, T))`, both int64,
/// mask 1 on real tokens.
pub fn pad_batch(seqs: &[&[i64]], pad_id: i64) -> (Tensor, Tensor) {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let b = seqs.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0i64; b * t];
    for (i, s) in seqs.iter().enumerate() {
        ids[i * t..i * t + s.len()].copy_from_slice(s);
        mask[i * t..i * t + s.len()].fill(1);
    }
    let shape = [b as i64, t as i64];
    (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape))
}
/// The tokenizer at `cache` if it is there, else one trained on `texts` and saved there; says
/// which it did. Training once and reusing the file makes every later run bit-reproducible: the
/// tokenizers crate breaks ties between equally frequent merges by ids that follow its randomly
/// seeded hash maps, so two trainings can differ in their last few tokens.
pub fn load_or_train<S: AsRef<str> + Send>(
    cache: &std::path::Path,
    kind: TokenizerKind,
    texts: impl Iterator<Item = S> + Send,
    vocab_size: usize,
    min_frequency: u64,
) -> Result<Tokenizer> {
    if cache.is_file() {
        let t = load(cache)?;
        println!("reusing the {kind:?} tokenizer trained on the training split: {}", cache.display());
        return Ok(t);
    }
    let t0 = std::time::Instant::now();
    let t = train(kind, texts, vocab_size, min_frequency)?;
    if let Some(dir) = cache.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    save(&t, cache)?;
    println!(
        "trained a {kind:?} tokenizer on the training split in {:.1} s, saved to {}",
        t0.elapsed().as_secs_f64(),
        cache.display()
    );
    Ok(t)
}
