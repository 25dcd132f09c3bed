//! safetensors files as tch reads and writes them: every variable of a `VarStore` by name,
//! reading and writing a file, and strict loading (every name present, no extra names, same
//! shapes) with errors that name the file and the tensor.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn::VarStore, Tensor};

/// Every variable of `vs` (parameters and buffers), by name, on the CPU.
pub fn named_tensors(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(k, t)| (k, t.detach().to_device(tch::Device::Cpu))).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    Tensor::write_safetensors(tensors, path).with_context(|| format!("writing {}", path.display()))
}

pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?.into_iter().collect())
}

/// Copies saved weights into `vs` strictly: a missing or unexpected name, or a shape mismatch,
/// is an error naming it.
pub fn load_into(vs: &VarStore, path: &Path) -> Result<()> {
    copy_strict(vs, &read_tensors(path)?, &[], &path.display().to_string())
}

/// Copies `saved` into the variables of `vs` whose names do not start with one of
/// `skip_prefixes`, strictly: a variable without a saved tensor, a saved tensor without a
/// variable, or a shape mismatch is an error naming it. `source` names the file in errors.
pub fn copy_strict(
    vs: &VarStore,
    saved: &BTreeMap<String, Tensor>,
    skip_prefixes: &[&str],
    source: &str,
) -> Result<()> {
    let vars: BTreeMap<String, Tensor> =
        vs.variables().into_iter().filter(|(k, _)| !skip_prefixes.iter().any(|p| k.starts_with(p))).collect();
    if let Some(k) = saved.keys().find(|k| !vars.contains_key(*k)) {
        bail!("{source}: unexpected tensor '{k}' (the model has no such variable)");
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in &vars {
            let src = saved.get(name).with_context(|| format!("{source}: missing tensor '{name}'"))?;
            if src.size() != var.size() {
                bail!("{source}: '{name}' has shape {:?}, the model expects {:?}", src.size(), var.size());
            }
            var.shallow_clone().f_copy_(&src.to_device(var.device()).to_kind(var.kind()))?;
        }
        Ok(())
    })
}
