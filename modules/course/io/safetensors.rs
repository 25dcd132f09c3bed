//! safetensors files: every variable of a `VarStore` by name, reading a file (tch) and writing
//! one atomically with header metadata (the safetensors crate), and strict loading (every name present, no extra names, same
//! shapes) with errors that name the file and the tensor.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{nn::VarStore, Kind, Tensor};

/// Every variable of `vs` (parameters and buffers), by name, on the CPU.
pub fn named_tensors(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(k, t)| (k, t.detach().to_device(tch::Device::Cpu))).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Writes `tensors` to `path` atomically (temporary file, fsync, rename), with the header
/// metadata `{"format": "pt"}` that transformers and peft expect of PyTorch weights.
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_tensors_with(path, tensors, &[("format", "pt")])
}

/// [`write_tensors`] with the given header metadata (`__metadata__`, string to string).
pub fn write_tensors_with(path: &Path, tensors: &[(String, Tensor)], metadata: &[(&str, &str)]) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        views.push((name.clone(), TensorView::new(t).with_context(|| format!("{}: tensor '{name}'", path.display()))?));
    }
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    crate::sys::fsutil::write_via_temp(path, |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp).with_context(|| format!("writing {}", path.display()))
    })
}

/// One tensor as the safetensors crate reads it: its bytes are copied out one tensor at a time,
/// while the file is written.
struct TensorView {
    tensor: Tensor,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
}

impl TensorView {
    fn new(t: &Tensor) -> Result<TensorView> {
        use safetensors::Dtype as D;
        let dtype = match t.kind() {
            Kind::Float => D::F32,
            Kind::Double => D::F64,
            Kind::BFloat16 => D::BF16,
            Kind::Half => D::F16,
            Kind::Int64 => D::I64,
            Kind::Int => D::I32,
            Kind::Int16 => D::I16,
            Kind::Int8 => D::I8,
            Kind::Uint8 => D::U8,
            Kind::Bool => D::BOOL,
            k => bail!("dtype {k:?} has no safetensors equivalent here"),
        };
        let tensor = t.detach().to_device(tch::Device::Cpu).contiguous();
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        Ok(TensorView { tensor, dtype, shape })
    }
}

impl safetensors::View for TensorView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut bytes = vec![0u8; self.data_len()];
        self.tensor.copy_data_u8(&mut bytes, self.tensor.numel());
        std::borrow::Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
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
