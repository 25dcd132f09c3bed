//! Instruction tuning data (指令微调数据): conversations in LLaMA-Factory's Alpaca format
//! (`instruction`, `input`, `output`, optional `system` and `history`), with `{{name}}`-style
//! placeholders filled, a fixed held-out split, and batches of tokenized examples whose targets
//! are the assistant's tokens only (-100 elsewhere, the ignore index every loss shares).
//!
//! How an example becomes token ids and targets is the chat model's business (its template and
//! tokenizer: `infer::ChatModel::encode_for_training`); this file holds the records, the split and
//! the batching, which know no model.

use crate::data::lm::{BatchSource, Split};
use crate::sys::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Tensor};

/// The target that leaves a position out of the loss (PyTorch's and Hugging Face's).
pub const IGNORE: i64 = -100;

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

/// One Alpaca-format record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlpacaRecord {
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    pub output: String,
    #[serde(default)]
    pub system: Option<String>,
    /// Earlier (user, assistant) turns.
    #[serde(default)]
    pub history: Vec<(String, String)>,
}

impl AlpacaRecord {
    /// The user's turn: the instruction, and the input on a new line when there is one (as
    /// LLaMA-Factory joins them).
    pub fn prompt(&self) -> String {
        if self.input.trim().is_empty() {
            self.instruction.clone()
        } else {
            format!("{}\n{}", self.instruction, self.input)
        }
    }

    /// The conversation: the system prompt if any, the history, the prompt and the answer.
    pub fn messages(&self) -> Vec<Message> {
        let mut m = vec![];
        if let Some(s) = self.system.as_deref().filter(|s| !s.is_empty()) {
            m.push(Message::system(s));
        }
        for (u, a) in &self.history {
            m.push(Message::user(u));
            m.push(Message::assistant(a));
        }
        m.push(Message::user(&self.prompt()));
        m.push(Message::assistant(&self.output));
        m
    }

    /// Replaces every `{{key}}` in the instruction, input and output with its value.
    pub fn fill(&mut self, values: &[(&str, &str)]) {
        for f in [&mut self.instruction, &mut self.input, &mut self.output] {
            for (k, v) in values {
                *f = f.replace(&format!("{{{{{k}}}}}"), v);
            }
        }
    }
}

/// Reads an Alpaca-format JSON array; an error names the file and the record.
pub fn read_alpaca(path: &Path) -> Result<Vec<AlpacaRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw: Vec<serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("{}: not a JSON array of records", path.display()))?;
    raw.into_iter()
        .enumerate()
        .map(|(i, v)| {
            let r: AlpacaRecord = serde_json::from_value(v).with_context(|| {
                format!("{}: record {i}: not an Alpaca record (instruction, input, output)", path.display())
            })?;
            if r.output.trim().is_empty() {
                bail!("{}: record {i}: empty output", path.display());
            }
            Ok(r)
        })
        .collect()
}

/// Splits `records` into (train, held out): every `every`-th record, from `offset`, is held out.
/// Fixed by position, so the same file always gives the same split.
pub fn hold_out<T: Clone>(records: &[T], every: usize, offset: usize) -> (Vec<T>, Vec<T>) {
    let (mut train, mut held) = (vec![], vec![]);
    for (i, r) in records.iter().enumerate() {
        if every > 0 && i % every == offset % every {
            held.push(r.clone());
        } else {
            train.push(r.clone());
        }
    }
    (train, held)
}

/// A tokenized example: `ids` of the whole conversation and, per position, the id to learn there
/// or [`IGNORE`] (the prompt, the template's markup, padding).
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    pub ids: Vec<i64>,
    pub targets: Vec<i64>,
}

impl SftExample {
    /// Cuts the example to `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.ids.truncate(len);
        self.targets.truncate(len);
    }

    /// Positions that count in the loss.
    pub fn trained(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

/// What [`SftData`] does to a split: cuts each example to `max_len` tokens, drops the ones left
/// with no trained position, and sorts them by length. `what` names the split in errors.
pub fn prepare(mut v: Vec<SftExample>, max_len: usize, what: &str) -> Result<Vec<SftExample>> {
    for e in &mut v {
        if e.ids.len() != e.targets.len() {
            bail!("{what} example: {} ids but {} targets", e.ids.len(), e.targets.len());
        }
        e.truncate(max_len);
    }
    // A target is predicted from the positions before it: one trained position after the first
    // is needed.
    v.retain(|e| e.targets.iter().skip(1).any(|&t| t != IGNORE));
    if v.is_empty() {
        bail!("no {what} example keeps an assistant token within {max_len} tokens");
    }
    v.sort_by_key(|e| e.ids.len());
    Ok(v)
}

/// `chosen` as one batch: inputs `x` padded with `pad_id`, next-token targets `y` padded with
/// -100, both `(rows, T)` with T the longest example's length minus one, capped at `block`.
pub fn pad_batch(chosen: &[SftExample], block: i64, pad_id: i64, device: Device) -> (Tensor, Tensor) {
    let rows = chosen.len();
    let t = chosen.iter().map(|e| e.ids.len() - 1).max().unwrap_or(1).min(block.max(1) as usize);
    let (mut x, mut y) = (vec![pad_id; rows * t], vec![IGNORE; rows * t]);
    for (r, e) in chosen.iter().enumerate() {
        let n = (e.ids.len() - 1).min(t);
        x[r * t..r * t + n].copy_from_slice(&e.ids[..n]);
        y[r * t..r * t + n].copy_from_slice(&e.targets[1..n + 1]);
    }
    let shape = [rows as i64, t as i64];
    (Tensor::from_slice(&x).view(shape).to(device), Tensor::from_slice(&y).view(shape).to(device))
}

/// Examples of both splits, each sorted by length: a batch takes neighbours in that order, so it
/// pads little (batching by length).
pub struct SftData {
    train: Vec<SftExample>,
    val: Vec<SftExample>,
    pad_id: i64,
}

impl SftData {
    /// `max_len` caps each example (longer ones are cut; ones left with no trained position are
    /// dropped). `pad_id` fills the inputs after an example's end.
    pub fn new(train: Vec<SftExample>, val: Vec<SftExample>, max_len: usize, pad_id: i64) -> Result<SftData> {
        Ok(SftData { train: prepare(train, max_len, "training")?, val: prepare(val, max_len, "held-out")?, pad_id })
    }

    pub fn split(&self, split: Split) -> &[SftExample] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Trained (assistant) positions in the split.
    pub fn trained_tokens(&self, split: Split) -> usize {
        self.split(split).iter().map(|e| e.trained()).sum()
    }
}

impl BatchSource for SftData {
    /// `rows` examples that are neighbours in length, inputs `x` (rows, T) and next-token targets
    /// `y` (rows, T) with T the longest example's length minus one, capped at `block`. Padding:
    /// `pad_id` in `x` and -100 in `y`; it sits after each example's end, where causal attention
    /// keeps it from every real position, so no attention mask is needed.
    fn batch(&self, split: Split, rows: i64, block: i64, rng: &mut Rng, device: Device) -> Result<(Tensor, Tensor)> {
        let set = self.split(split);
        let rows = (rows.max(1) as usize).min(set.len());
        let start = rng.below((set.len() - rows + 1) as u64) as usize;
        Ok(pad_batch(&set[start..start + rows], block, self.pad_id, device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_fill_split_and_batch_with_targets_shifted_and_padding_ignored() {
        let mut r = AlpacaRecord {
            instruction: "Who are you, {{name}}?".into(),
            input: "".into(),
            output: "I am {{name}}, made by {{author}}.".into(),
            system: None,
            history: vec![],
        };
        r.fill(&[("name", "Ada"), ("author", "the course")]);
        assert_eq!(r.output, "I am Ada, made by the course.");
        assert_eq!(
            r.messages(),
            vec![Message::user("Who are you, Ada?"), Message::assistant("I am Ada, made by the course.")]
        );
        r.input = "in French".into();
        assert_eq!(r.prompt(), "Who are you, Ada?\nin French");
        let (train, held) = hold_out(&(0..10).collect::<Vec<_>>(), 5, 2);
        assert_eq!(held, vec![2, 7]);
        assert_eq!(train.len(), 8);

        let ex = |n: i64, from: i64| SftExample {
            ids: (0..n).map(|i| 10 + i).collect(),
            targets: (0..n).map(|i| if i >= from { 10 + i } else { IGNORE }).collect(),
        };
        let data = SftData::new(vec![ex(6, 3), ex(4, 2)], vec![ex(5, 1)], 100, 0).unwrap();
        let mut rng = Rng::new(0);
        let (x, y) = data.batch(Split::Train, 2, 64, &mut rng, Device::Cpu).unwrap();
        assert_eq!(x.size(), [2, 5]);
        // Sorted by length: the 4-token example first, padded with 0 in x and -100 in y.
        let xs: Vec<i64> = Vec::try_from(x.flatten(0, -1)).unwrap();
        let ys: Vec<i64> = Vec::try_from(y.flatten(0, -1)).unwrap();
        assert_eq!(xs, vec![10, 11, 12, 0, 0, 10, 11, 12, 13, 14]);
        assert_eq!(ys, vec![IGNORE, 12, 13, IGNORE, IGNORE, IGNORE, IGNORE, 13, 14, 15]);
        // The cap cuts inputs and targets alike.
        let (x, _) = data.batch(Split::Train, 2, 3, &mut rng, Device::Cpu).unwrap();
        assert_eq!(x.size(), [2, 3]);
        assert!(SftData::new(vec![ex(6, 5)], vec![ex(5, 1)], 4, 0).is_err(), "no assistant token within 4 tokens");
        let (x, y) = pad_batch(data.split(Split::Train), 64, 7, Device::Cpu);
        assert_eq!(x.size(), [2, 5]);
        assert_eq!(x.int64_value(&[0, 4]), 7);
        assert_eq!(y.int64_value(&[0, 4]), IGNORE);
    }
}
