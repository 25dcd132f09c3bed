//! Where the data sets and weights live after `python3 scripts/setup.py`, and how to fetch a
//! missing one. The list comes from `scripts/data_manifest.json` (embedded at build time), the
//! same file setup.py verifies against, so it exists once. A set counts as installed when its
//! `data/<dir>/.ok` stamp exists: setup.py writes the stamp last, after checking every hash.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const MANIFEST: &str = include_str!("../../../scripts/data_manifest.json");

#[derive(Debug, Clone)]
pub struct DataSet {
    /// The name setup.py's `--data NAME` takes.
    pub name: String,
    /// Folder under the data root.
    pub dir: String,
    pub desc: String,
    /// The registry package it comes from.
    pub source: String,
}

/// Every data set, in the manifest's order.
pub fn datasets() -> &'static [DataSet] {
    static SETS: OnceLock<Vec<DataSet>> = OnceLock::new();
    SETS.get_or_init(|| {
        // The manifest is part of this source tree; tests/ check it parses.
        let v: serde_json::Value = serde_json::from_str(MANIFEST).expect("scripts/data_manifest.json is valid JSON");
        let str_of = |e: &serde_json::Value, k: &str| e.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        v.as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| !k.starts_with('_'))
                    .map(|(k, e)| DataSet {
                        name: k.clone(),
                        dir: e.get("dir").and_then(|d| d.as_str()).unwrap_or(k).to_string(),
                        desc: str_of(e, "desc"),
                        source: str_of(e, "source"),
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The data root: `$COURSE_DATA` if set, else `data/` under the current directory.
pub fn data_root() -> PathBuf {
    std::env::var_os("COURSE_DATA").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("data"))
}

impl DataSet {
    pub fn path(&self, root: &Path) -> PathBuf {
        root.join(&self.dir)
    }
    /// Installed and verified by setup.py.
    pub fn present(&self, root: &Path) -> bool {
        self.path(root).join(".ok").is_file()
    }
    /// The command that installs this set.
    pub fn fetch_command(&self) -> String {
        format!("python3 scripts/setup.py --data {}", self.name)
    }
}

pub fn find(name: &str) -> Option<&'static DataSet> {
    datasets().iter().find(|d| d.name == name)
}

/// The path of `rel` inside data set `set`, or an error that names the data set and the command
/// that fetches it.
pub fn require(set: &str, rel: &str) -> anyhow::Result<PathBuf> {
    let d = find(set).ok_or_else(|| anyhow::anyhow!("unknown data set '{set}' (not in scripts/data_manifest.json)"))?;
    let root = data_root();
    let p = d.path(&root).join(rel);
    if d.present(&root) && p.exists() {
        return Ok(p);
    }
    anyhow::bail!("{} is missing (data set '{set}'); fetch it with `{}`", p.display(), d.fetch_command())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_lists_every_data_set_with_its_folder() {
        let names: Vec<_> = datasets().iter().map(|d| d.name.as_str()).collect();
        for n in ["mnist", "fashion-mnist", "bbcnews", "spam", "shakespeare", "smollm2", "minilm", "gpt2-tokenizer"] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        assert_eq!(find("spam").unwrap().dir, "spam-assassin");
        assert_eq!(find("minilm").unwrap().dir, "all-MiniLM-L6-v2");
        assert!(datasets().iter().all(|d| !d.desc.is_empty() && !d.source.is_empty()));
    }

    #[test]
    fn a_missing_set_names_the_fetch_command() {
        std::env::set_var("COURSE_DATA", std::env::temp_dir().join("course-no-data-here"));
        let err = require("mnist", "train-images-idx3-ubyte").unwrap_err().to_string();
        std::env::remove_var("COURSE_DATA");
        assert!(err.contains("python3 scripts/setup.py --data mnist"), "{err}");
        assert!(require("nope", "x").unwrap_err().to_string().contains("unknown data set 'nope'"));
    }
}
