//! Checkpoints as directories of safetensors + JSON, replaced atomically as a whole:
//!
//! - `best/`: a model directory in the Hugging Face shape (`io::hf`: `config.json` with its
//!   `model_type`, `model.safetensors`, the tokenizer) plus `trainer_state.json` (what made it
//!   best) — enough to rebuild the model for inference;
//! - `last/`: the model, `optimizer.safetensors` (moment buffers), `rng.safetensors` (torch's
//!   generator), and `state.json` (epoch, step, optimizer scalars, scheduler, early stopping,
//!   the data order's seed, history) — enough to resume exactly.
//!
//! A save writes a fresh temporary directory, fsyncs every file, moves the previous checkpoint
//! aside, renames the new one into place, then deletes the old one. A crash at any point leaves
//! a loadable checkpoint: the new one, or the previous one (found again under its
//! moved-aside name by [`resolve`]).

use crate::io::hf::{write_model_files, TRAINER_STATE};
use crate::io::safetensors::{load_into, named_tensors, read_tensors, write_tensors};
use crate::train::optim::OptimizerState;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Tensor};

/// Where a simulated crash happens during [`write_dir`] (tests only).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailAt {
    /// The new directory is complete but not yet renamed into place.
    BeforeSwap,
    /// The old directory has been moved aside; the new one is not yet in place.
    MidSwap,
}

fn aside_name(target: &Path) -> Result<PathBuf> {
    let name = target.file_name().context("checkpoint path has no name")?.to_string_lossy().into_owned();
    Ok(target.with_file_name(format!(".{name}.old")))
}

fn sync_dir(p: &Path) {
    if let Ok(d) = File::open(p) {
        let _ = d.sync_all();
    }
}

/// Writes a checkpoint directory atomically: `fill` writes the files into a temporary
/// directory, which then replaces `target`.
pub fn write_dir(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_dir_failing(target, fill, None)
}

#[doc(hidden)]
pub fn write_dir_failing(target: &Path, fill: impl FnOnce(&Path) -> Result<()>, fail: Option<FailAt>) -> Result<()> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = target.file_name().context("checkpoint path has no name")?.to_string_lossy().into_owned();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint {}", target.display())));
    }
    for entry in fs::read_dir(&tmp)? {
        File::open(entry?.path())?.sync_all()?;
    }
    sync_dir(&tmp);
    if fail == Some(FailAt::BeforeSwap) {
        bail!("simulated crash before the swap");
    }
    let aside = aside_name(target)?;
    if target.exists() {
        let _ = fs::remove_dir_all(&aside);
        fs::rename(target, &aside).with_context(|| format!("moving {} aside", target.display()))?;
    }
    if fail == Some(FailAt::MidSwap) {
        bail!("simulated crash in the middle of the swap");
    }
    fs::rename(&tmp, target).with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
    sync_dir(parent);
    let _ = fs::remove_dir_all(&aside);
    Ok(())
}

/// The directory to load `target` from: itself, or the previous checkpoint a crash left moved
/// aside; None when neither exists.
pub fn resolve(target: &Path) -> Option<PathBuf> {
    if target.is_dir() {
        return Some(target.to_path_buf());
    }
    let aside = aside_name(target).ok()?;
    aside.is_dir().then_some(aside)
}

/// What a saved model directory holds besides its weights (see `io::hf`).
pub struct ModelFiles<'a> {
    /// `config.json`: the bare model config tagged with its `model_type` (`io::hf::tagged_config`).
    pub config: serde_json::Value,
    /// `generation_config.json` (language models).
    pub generation: Option<serde_json::Value>,
    /// Writes whatever else the model needs into the new directory (its tokenizer).
    pub extra: Option<&'a dyn Fn(&Path) -> Result<()>>,
}

/// Writes `<dir>/best/`, a model directory in the Hugging Face shape (`io::hf`): config.json,
/// model.safetensors, the generation config and extra files, and `trainer_state` (what made it
/// best) as trainer_state.json. Replaced as a whole, like every checkpoint.
pub fn save_best(
    dir: &Path,
    vs: &VarStore,
    files: &ModelFiles,
    trainer_state: Option<&serde_json::Value>,
) -> Result<()> {
    write_dir(&dir.join("best"), |tmp| {
        write_model_files(tmp, &files.config, vs, files.generation.as_ref())?;
        if let Some(t) = trainer_state {
            crate::sys::fsutil::write_json_atomic(&tmp.join(TRAINER_STATE), t)?;
        }
        match files.extra {
            Some(f) => f(tmp),
            None => Ok(()),
        }
    })
}

/// What `last/` holds besides the model weights.
pub struct TrainingState {
    pub optimizer: OptimizerState,
    /// torch's CPU generator (dropout and other torch randomness).
    pub torch_rng: Tensor,
    /// Everything else: epoch, step, scheduler, early stopping, history, data seed, config.
    pub state: serde_json::Value,
}

#[doc(hidden)]
pub fn save_last_failing(dir: &Path, vs: &VarStore, t: &TrainingState, fail: Option<FailAt>) -> Result<()> {
    write_dir_failing(
        &dir.join("last"),
        |tmp| {
            write_tensors(&tmp.join("model.safetensors"), &named_tensors(vs))?;
            let opt: Vec<(String, Tensor)> =
                t.optimizer.tensors.iter().map(|(k, v)| (k.clone(), v.to_device(tch::Device::Cpu))).collect();
            write_tensors(&tmp.join("optimizer.safetensors"), &opt)?;
            write_tensors(&tmp.join("rng.safetensors"), &[("torch_cpu".to_string(), t.torch_rng.shallow_clone())])?;
            let state = serde_json::json!({"optimizer": t.optimizer.json, "trainer": t.state});
            crate::sys::fsutil::write_json_atomic(&tmp.join("state.json"), &state)
        },
        fail,
    )
}

/// Writes `<dir>/last/`.
pub fn save_last(dir: &Path, vs: &VarStore, t: &TrainingState) -> Result<()> {
    save_last_failing(dir, vs, t, None)
}

/// Loads `<dir>/last/` (or the previous one a crash left aside) into `vs`; None if there is none.
pub fn load_last(dir: &Path, vs: &VarStore) -> Result<Option<TrainingState>> {
    let Some(d) = resolve(&dir.join("last")) else {
        return Ok(None);
    };
    load_into(vs, &d.join("model.safetensors"))?;
    let optimizer_tensors = if d.join("optimizer.safetensors").exists() {
        read_tensors(&d.join("optimizer.safetensors"))?
    } else {
        BTreeMap::new()
    };
    let rng = read_tensors(&d.join("rng.safetensors"))?;
    let torch_rng = rng
        .get("torch_cpu")
        .with_context(|| format!("{}: no 'torch_cpu' generator state", d.join("rng.safetensors").display()))?
        .shallow_clone();
    let text = fs::read_to_string(d.join("state.json"))
        .with_context(|| format!("reading {}", d.join("state.json").display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", d.join("state.json").display()))?;
    Ok(Some(TrainingState {
        optimizer: OptimizerState { tensors: optimizer_tensors, json: v["optimizer"].clone() },
        torch_rng,
        state: v["trainer"].clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    fn store(v: f64) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let _ = vs.root().var("w", &[2, 3], nn::Init::Const(v));
        vs
    }

    fn state() -> TrainingState {
        TrainingState {
            optimizer: OptimizerState {
                tensors: BTreeMap::from([("w.exp_avg".to_string(), Tensor::ones([2, 3], (Kind::Float, Device::Cpu)))]),
                json: serde_json::json!({"kind": "adamw"}),
            },
            torch_rng: crate::sys::runtime::generator_state(Device::Cpu).unwrap(),
            state: serde_json::json!({"epoch": 1}),
        }
    }

    fn value(vs: &VarStore) -> f64 {
        vs.variables()["w"].double_value(&[0, 0])
    }

    #[test]
    fn an_interrupted_save_leaves_the_previous_checkpoint_loadable() {
        let dir = std::env::temp_dir().join(format!("course-ckpt-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        save_last(&dir, &store(1.0), &state()).unwrap();
        for fail in [FailAt::BeforeSwap, FailAt::MidSwap] {
            assert!(save_last_failing(&dir, &store(2.0), &state(), Some(fail)).is_err());
            let back = store(0.0);
            let t = load_last(&dir, &back).unwrap().expect("a checkpoint survives");
            assert_eq!(value(&back), 1.0, "{fail:?}: the old weights");
            assert_eq!(t.state["epoch"], 1);
            // The next successful save replaces whatever the crash left.
            save_last(&dir, &store(1.0), &state()).unwrap();
        }
        save_last(&dir, &store(3.0), &state()).unwrap();
        let back = store(0.0);
        let t = load_last(&dir, &back).unwrap().unwrap();
        assert_eq!(value(&back), 3.0);
        assert_eq!(t.optimizer.json["kind"], "adamw");
        assert!(t.optimizer.tensors["w.exp_avg"].equal(&Tensor::ones([2, 3], (Kind::Float, Device::Cpu))));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strict_loading_names_missing_extra_and_misshapen_tensors() {
        let dir = std::env::temp_dir().join(format!("course-ckpt-strict-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.safetensors");
        let t = |s: &[i64]| Tensor::zeros(s, (Kind::Float, Device::Cpu));
        write_tensors(&p, &[("w".into(), t(&[3, 2]))]).unwrap();
        assert!(format!("{:#}", load_into(&store(0.0), &p).unwrap_err())
            .contains("'w' has shape [3, 2], the model expects [2, 3]"));
        write_tensors(&p, &[("w".into(), t(&[2, 3])), ("v".into(), t(&[1]))]).unwrap();
        assert!(format!("{:#}", load_into(&store(0.0), &p).unwrap_err()).contains("unexpected tensor 'v'"));
        write_tensors(&p, &[("v".into(), t(&[1]))]).unwrap();
        let e = format!("{:#}", load_into(&store(0.0), &p).unwrap_err());
        assert!(e.contains("unexpected tensor 'v'") || e.contains("missing tensor 'w'"), "{e}");
        assert!(load_last(&dir.join("nothing"), &store(0.0)).unwrap().is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
