//! Model directories in the Hugging Face shape, the one format for every model the course saves:
//!
//! - `config.json`: the model's own config, bare, with its `"model_type"` (and Hugging Face's
//!   field names where the model has a Hugging Face equivalent);
//! - `model.safetensors`: every variable by its PyTorch / Hugging Face name;
//! - the tokenizer's files (`tokenizer.json`, or m04's `vocab.json`);
//! - `generation_config.json` for language models (the sampling defaults);
//! - `trainer_state.json`, where a trainer wrote it: which epoch made it best, and its scores.
//!
//! [`ModelDir::open`] reads any of them and names the file and field of whatever is wrong; a
//! directory saved in the course's earlier shape (the config wrapped under `"model"`, no
//! `model_type`) is refused with the advice to re-run the module that wrote it.

use crate::io::safetensors::{named_tensors, write_tensors};
use crate::sys::fsutil::write_json_atomic;
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const GENERATION_CONFIG: &str = "generation_config.json";
pub const TRAINER_STATE: &str = "trainer_state.json";

/// `config` as a JSON object with `"model_type": model_type` added: what `config.json` holds.
pub fn tagged_config<C: Serialize + ?Sized>(model_type: &str, config: &C) -> Result<serde_json::Value> {
    let v = serde_json::to_value(config).context("serialising the model config")?;
    let serde_json::Value::Object(fields) = v else {
        bail!("a model config must serialise to a JSON object, got {v}");
    };
    let mut out = serde_json::Map::new();
    out.insert("model_type".into(), model_type.into());
    out.extend(fields.into_iter().filter(|(k, _)| k != "model_type"));
    Ok(serde_json::Value::Object(out))
}

/// Writes the model-directory files into `dir` (an existing, usually temporary, folder; the
/// trainer swaps it into place as a whole): `config.json` (already tagged, see
/// [`tagged_config`]), the weights of `vs`, and `generation_config.json` when given.
pub fn write_model_files(
    dir: &Path,
    config: &serde_json::Value,
    vs: &VarStore,
    generation: Option<&serde_json::Value>,
) -> Result<()> {
    if config.get("model_type").and_then(|t| t.as_str()).is_none() {
        bail!("{}: a model config needs a string \"model_type\"", dir.join(CONFIG).display());
    }
    write_json_atomic(&dir.join(CONFIG), config)?;
    write_tensors(&dir.join(WEIGHTS), &named_tensors(vs))?;
    if let Some(g) = generation {
        write_json_atomic(&dir.join(GENERATION_CONFIG), g)?;
    }
    Ok(())
}

/// A model directory, opened and checked: its `config.json` parsed, its weights present.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub path: PathBuf,
    /// `config.json` as written (with `model_type`).
    pub config: serde_json::Value,
}

impl ModelDir {
    pub fn open(path: &Path) -> Result<ModelDir> {
        if !path.is_dir() {
            bail!("{} is not a model directory (no such folder)", path.display());
        }
        let cfg = path.join(CONFIG);
        let text = std::fs::read_to_string(&cfg)
            .with_context(|| format!("reading {} (is {} a model directory?)", cfg.display(), path.display()))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", cfg.display()))?;
        match config.get("model_type") {
            Some(serde_json::Value::String(_)) => {}
            Some(other) => bail!("{}: \"model_type\" must be a string, got {other}", cfg.display()),
            None => bail!(
                "{}: no \"model_type\" — this model directory is in the course's earlier shape{}; re-run the module that wrote it to save it again",
                cfg.display(),
                if config.get("model").is_some() { " (the config wrapped under \"model\")" } else { "" }
            ),
        }
        let weights = path.join(WEIGHTS);
        if !weights.is_file() {
            bail!("{}: missing (a model directory holds its weights as {WEIGHTS})", weights.display());
        }
        Ok(ModelDir { path: path.to_path_buf(), config })
    }

    pub fn model_type(&self) -> &str {
        self.config["model_type"].as_str().unwrap_or_default()
    }

    /// Fails naming the directory unless its `model_type` is one of `want`.
    pub fn expect_type(&self, want: &[&str]) -> Result<&str> {
        let t = self.model_type();
        if !want.contains(&t) {
            bail!(
                "{}: model_type \"{t}\", but this needs {}",
                self.path.join(CONFIG).display(),
                want.iter().map(|w| format!("\"{w}\"")).collect::<Vec<_>>().join(" or ")
            );
        }
        Ok(t)
    }

    /// The config as the model's own type (unknown fields, such as `model_type`, are the type's
    /// business: serde ignores them unless it denies them).
    pub fn config_as<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.config.clone())
            .with_context(|| format!("{}: not a valid {} config", self.path.join(CONFIG).display(), self.model_type()))
    }

    pub fn weights(&self) -> PathBuf {
        self.path.join(WEIGHTS)
    }

    /// A file of the directory, if present (`tokenizer.json`, `vocab.json`, ...).
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let p = self.path.join(name);
        p.is_file().then_some(p)
    }

    /// A file the model needs: an error naming it when it is missing.
    pub fn require(&self, name: &str) -> Result<PathBuf> {
        self.file(name).with_context(|| format!("{}: missing {name}", self.path.display()))
    }

    /// `generation_config.json`, if the directory has one.
    pub fn generation_config(&self) -> Result<Option<serde_json::Value>> {
        let Some(p) = self.file(GENERATION_CONFIG) else { return Ok(None) };
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("course-hf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_written_directory_opens_and_an_old_one_is_refused() {
        let d = tmp("rt");
        let vs = VarStore::new(Device::Cpu);
        let _ = nn::linear(vs.root() / "fc", 3, 2, Default::default());
        let cfg = tagged_config("course_mlp", &serde_json::json!({"input": 3, "model_type": "ignored"})).unwrap();
        assert_eq!(cfg["model_type"], "course_mlp", "the config's own model_type gives way: {cfg}");
        write_model_files(&d, &cfg, &vs, Some(&serde_json::json!({"temperature": 0.8}))).unwrap();
        let m = ModelDir::open(&d).unwrap();
        assert_eq!((m.model_type(), m.config["input"].as_i64()), ("course_mlp", Some(3)));
        assert_eq!(m.generation_config().unwrap().unwrap()["temperature"], 0.8);
        assert!(m.expect_type(&["nanogpt"]).unwrap_err().to_string().contains("model_type \"course_mlp\""));
        // The earlier shape: the config under "model", no model_type.
        std::fs::write(d.join(CONFIG), r#"{"model": {"input": 3}, "epoch": 2}"#).unwrap();
        let e = ModelDir::open(&d).unwrap_err().to_string();
        assert!(e.contains("no \"model_type\"") && e.contains("re-run the module"), "{e}");
        std::fs::remove_file(d.join(WEIGHTS)).unwrap();
        std::fs::write(d.join(CONFIG), r#"{"model_type": "course_mlp"}"#).unwrap();
        assert!(ModelDir::open(&d).unwrap_err().to_string().contains("model.safetensors"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
