//! Text classification corpora and their fixed splits: BBC News (5 topics) and SpamAssassin
//! (ham/spam), the installable stand-ins for AG News and IMDb-style benchmarks.
//!
//! Files are read as bytes; one that is not valid UTF-8 is decoded lossily (invalid bytes become
//! U+FFFD) and counted, so a report can say how many there were. Emails lose their headers (all
//! lines up to the first blank one). The train/validation/test split is stratified by class,
//! drawn once from a seed and written to `data/splits/<task>.json`; later runs reuse that file,
//! so every run and every model sees the same test set.

use crate::data::registry;
use crate::sys::fsutil::write_atomic;
use crate::sys::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TextTask {
    /// BBC News articles, 5 topics.
    Bbc,
    /// SpamAssassin emails, ham or spam.
    Spam,
}

impl TextTask {
    pub fn name(self) -> &'static str {
        match self {
            TextTask::Bbc => "bbc",
            TextTask::Spam => "spam",
        }
    }
    pub fn classes(self) -> &'static [&'static str] {
        match self {
            TextTask::Bbc => &["business", "entertainment", "politics", "sports", "tech"],
            TextTask::Spam => &["ham", "spam"],
        }
    }
    /// The data set (in scripts/data_manifest.json) that holds the corpus.
    pub fn dataset(self) -> &'static str {
        match self {
            TextTask::Bbc => "bbcnews",
            TextTask::Spam => "spam",
        }
    }
    /// Folder -> class index.
    fn folders(self) -> &'static [(&'static str, usize)] {
        match self {
            TextTask::Bbc => &[("business", 0), ("entertainment", 1), ("politics", 2), ("sports", 3), ("tech", 4)],
            TextTask::Spam => &[("easy-ham-1", 0), ("easy-ham-2", 0), ("hard-ham-1", 0), ("spam-1", 1), ("spam-2", 1)],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Document {
    /// Path relative to the corpus folder, e.g. `tech/001.txt`: the document's identity in splits.
    pub id: String,
    pub text: String,
    pub label: usize,
}

#[derive(Debug)]
pub struct Corpus {
    pub task: TextTask,
    /// Sorted by id.
    pub docs: Vec<Document>,
    /// Ids of the files that were not valid UTF-8 (decoded lossily).
    pub lossy: Vec<String>,
}

/// Everything after the header block of an RFC 822 message (the first empty line).
pub fn strip_email_headers(raw: &str) -> &str {
    let first = ["\r\n\r\n", "\n\n"].iter().filter_map(|sep| raw.find(sep).map(|i| (i, sep.len()))).min();
    match first {
        Some((i, n)) => &raw[i + n..],
        None => "",
    }
}

impl Corpus {
    /// Reads the task's corpus from the data folder (`data/` or `$COURSE_DATA`).
    pub fn load(task: TextTask) -> Result<Self> {
        let root = registry::require(task.dataset(), "")?;
        Self::load_from(task, &root)
    }

    /// Reads the corpus from `root`, which holds one folder per group (see the data manifest).
    pub fn load_from(task: TextTask, root: &Path) -> Result<Self> {
        let (mut docs, mut lossy) = (Vec::new(), Vec::new());
        for &(folder, label) in task.folders() {
            let dir = root.join(folder);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .with_context(|| format!("reading {} (the {} corpus)", dir.display(), task.name()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "txt"))
                .collect();
            if files.is_empty() {
                bail!(
                    "{} holds no .txt files; reinstall with `python3 scripts/setup.py --data {} --force`",
                    dir.display(),
                    task.dataset()
                );
            }
            files.sort();
            for f in files {
                let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
                let id = format!("{folder}/{}", f.file_name().unwrap_or_default().to_string_lossy());
                let text = match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(e) => {
                        lossy.push(id.clone());
                        String::from_utf8_lossy(e.as_bytes()).into_owned()
                    }
                };
                let text = match task {
                    TextTask::Spam => strip_email_headers(&text).to_string(),
                    TextTask::Bbc => text,
                };
                docs.push(Document { id, text, label });
            }
        }
        docs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Self { task, docs, lossy })
    }

    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.task.classes().len()];
        for d in &self.docs {
            c[d.label] += 1;
        }
        c
    }
}

/// Document ids of each part of a split, as saved in `data/splits/<task>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub task: TextTask,
    pub seed: u64,
    /// Validation and test fractions of every class.
    pub val_fraction: f64,
    pub test_fraction: f64,
    pub train: Vec<String>,
    pub val: Vec<String>,
    pub test: Vec<String>,
}

impl Split {
    /// Stratified split: each class's documents are shuffled with the seed, and the first
    /// `round(n * test_fraction)` go to test, the next `round(n * val_fraction)` to validation.
    pub fn stratified(corpus: &Corpus, seed: u64, val_fraction: f64, test_fraction: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&(val_fraction + test_fraction)) || val_fraction <= 0.0 || test_fraction <= 0.0 {
            bail!("split fractions must be positive and sum below 1, got val {val_fraction}, test {test_fraction}");
        }
        let mut by_class: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        for d in &corpus.docs {
            by_class.entry(d.label).or_default().push(&d.id);
        }
        let mut rng = Rng::new(seed);
        let (mut train, mut val, mut test) = (vec![], vec![], vec![]);
        for ids in by_class.values_mut() {
            rng.shuffle(ids);
            let n = ids.len() as f64;
            let nt = (n * test_fraction).round() as usize;
            let nv = (n * val_fraction).round() as usize;
            test.extend(ids[..nt].iter().map(|s| s.to_string()));
            val.extend(ids[nt..nt + nv].iter().map(|s| s.to_string()));
            train.extend(ids[nt + nv..].iter().map(|s| s.to_string()));
        }
        for v in [&mut train, &mut val, &mut test] {
            v.sort();
        }
        Ok(Self { task: corpus.task, seed, val_fraction, test_fraction, train, val, test })
    }

    /// The split saved at `path`, or a new stratified one written there (atomically) if there
    /// is none. A saved split must cover exactly the corpus's documents.
    pub fn load_or_create(path: &Path, corpus: &Corpus, seed: u64) -> Result<Self> {
        if path.exists() {
            let s: Split =
                serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
                    .with_context(|| format!("{}: not a split file (delete it to draw a new split)", path.display()))?;
            s.check(corpus).with_context(|| format!("{}: delete it to draw a new split", path.display()))?;
            return Ok(s);
        }
        let s = Self::stratified(corpus, seed, 0.1, 0.1)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_atomic(path, serde_json::to_string_pretty(&s)?.as_bytes())?;
        Ok(s)
    }

    /// Every document in exactly one part, and no unknown ids.
    pub fn check(&self, corpus: &Corpus) -> Result<()> {
        if self.task != corpus.task {
            bail!("the split is for task '{}', not '{}'", self.task.name(), corpus.task.name());
        }
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for (part, ids) in [("train", &self.train), ("val", &self.val), ("test", &self.test)] {
            for id in ids {
                if let Some(other) = seen.insert(id, part) {
                    bail!("document '{id}' is in both '{other}' and '{part}'");
                }
            }
        }
        for d in &corpus.docs {
            if seen.remove(d.id.as_str()).is_none() {
                bail!("document '{}' of the corpus is in no part of the split", d.id);
            }
        }
        if let Some(id) = seen.keys().next() {
            bail!("the split names '{id}', which is not in the corpus");
        }
        Ok(())
    }

    /// The documents of one part, in the split's order.
    pub fn part<'a>(&self, corpus: &'a Corpus, part: &[String]) -> Vec<&'a Document> {
        let index: HashMap<&str, &Document> = corpus.docs.iter().map(|d| (d.id.as_str(), d)).collect();
        part.iter().filter_map(|id| index.get(id.as_str()).copied()).collect()
    }
}

/// `data/splits/<task>.json` under the data root.
pub fn split_path(task: TextTask) -> PathBuf {
    registry::data_root().join("splits").join(format!("{}.json", task.name()))
}

/// Token ids and labels of a tokenized corpus part, for the [`DataLoader`](crate::data::loader::DataLoader).
pub struct TokenDataset {
    pub ids: Vec<Vec<i64>>,
    pub labels: Vec<i64>,
}

impl crate::data::loader::Dataset for TokenDataset {
    type Item = (Vec<i64>, i64);
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn get(&self, index: usize, _rng: &mut Rng) -> Result<Self::Item> {
        match (self.ids.get(index), self.labels.get(index)) {
            (Some(i), Some(&l)) => Ok((i.clone(), l)),
            _ => bail!("token data set: index {index} out of range (length {})", self.ids.len()),
        }
    }
}

/// Token ids `(B, T)`, attention mask `(B, T)` and labels `(B)`, on the CPU.
pub struct TextBatch {
    pub ids: tch::Tensor,
    pub mask: tch::Tensor,
    pub labels: tch::Tensor,
}

impl crate::data::loader::Batch for TextBatch {
    fn labels(&self) -> &tch::Tensor {
        &self.labels
    }
}

/// Collate for [`TokenDataset`]: pads each batch to its longest sequence with `pad_id`.
pub fn collate_tokens(pad_id: i64) -> impl Fn(Vec<(Vec<i64>, i64)>) -> Result<TextBatch> + Send + Sync {
    move |items| {
        let seqs: Vec<&[i64]> = items.iter().map(|(s, _)| s.as_slice()).collect();
        let (ids, mask) = crate::data::tokenize::pad_batch(&seqs, pad_id);
        let labels: Vec<i64> = items.iter().map(|(_, l)| *l).collect();
        Ok(TextBatch { ids, mask, labels: tch::Tensor::from_slice(&labels) })
    }
}
