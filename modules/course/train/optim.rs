//! Optimizers whose whole state can be saved and restored exactly (tch's own optimizers keep
//! their state inside libtorch where it cannot be read): SGD with momentum, Nesterov and weight
//! decay, and AdamW, each following PyTorch's update formulas step for step
//! (torch/optim/sgd.py, torch/optim/adamw.py, single-tensor path), with parameter groups.

use crate::ops::adamw::{adamw_reference, fused_adamw, AdamWHyper};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use tch::{nn::VarStore, Tensor};

/// A named parameter and the group it belongs to.
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub group: usize,
}

/// Per-group settings; the optimizer's learning rate is multiplied by `lr_scale`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Group {
    pub name: String,
    pub weight_decay: f64,
    pub lr_scale: f64,
}

/// The trainable variables of `vs`, sorted by name, in two groups: "decay" (matrices and
/// convolution kernels) and "no_decay" (biases and normalisation weights, the 1-D tensors), the
/// usual split (nanoGPT, Hugging Face) since decaying a bias or a norm scale only hurts.
pub fn decay_groups(vs: &VarStore, weight_decay: f64) -> (Vec<Param>, Vec<Group>) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let params = vars.into_iter().map(|(name, t)| Param { group: usize::from(t.dim() < 2), name, tensor: t }).collect();
    let groups = vec![
        Group { name: "decay".into(), weight_decay, lr_scale: 1.0 },
        Group { name: "no_decay".into(), weight_decay: 0.0, lr_scale: 1.0 },
    ];
    (params, groups)
}

/// Everything an optimizer needs to continue exactly where it stopped.
pub struct OptimizerState {
    /// Tensors keyed "<param name>.<buffer>", e.g. "fc1.weight.exp_avg".
    pub tensors: BTreeMap<String, Tensor>,
    /// Scalars: kind, hyper-parameters, learning rate, step counts.
    pub json: serde_json::Value,
}

/// What every optimizer holds: the parameters, their groups and the base learning rate.
pub struct Core {
    pub params: Vec<Param>,
    pub groups: Vec<Group>,
    pub lr: f64,
}

impl Core {
    fn new(params: Vec<Param>, groups: Vec<Group>, lr: f64) -> Result<Self> {
        if let Some(p) = params.iter().find(|p| p.group >= groups.len()) {
            bail!("parameter {} is in group {} but only {} groups exist", p.name, p.group, groups.len());
        }
        Ok(Self { params, groups, lr })
    }

    /// Checks a saved state's kind and restores the learning rate.
    fn load_common(&mut self, kind: &str, s: &OptimizerState) -> Result<()> {
        if s.json["kind"] != kind {
            bail!("optimizer state is for '{}', not {kind}", s.json["kind"]);
        }
        self.lr = s.json["lr"].as_f64().context("optimizer state: missing lr")?;
        Ok(())
    }
}

pub trait Optimizer {
    /// One update from the gradients currently in the parameters' `.grad()`.
    fn step(&mut self) -> Result<()>;
    fn state(&self) -> OptimizerState;
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
    fn core(&self) -> &Core;
    fn core_mut(&mut self) -> &mut Core;

    /// PyTorch's default `zero_grad(set_to_none=True)`: gradients become undefined, so backward
    /// writes fresh ones (no accumulate pass) and their memory is free between steps.
    fn zero_grad(&mut self) {
        for p in &self.core().params {
            crate::sys::runtime::clear_grad(&p.tensor);
        }
    }
    fn lr(&self) -> f64 {
        self.core().lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.core_mut().lr = lr;
    }
    fn params(&self) -> &[Param] {
        &self.core().params
    }
}

fn shape_check(what: &str, t: &Tensor, p: &Param) -> Result<()> {
    if t.size() != p.tensor.size() {
        bail!("optimizer state '{what}' has shape {:?} but parameter {} has {:?}", t.size(), p.name, p.tensor.size());
    }
    Ok(())
}

/// SGD as torch.optim.SGD: weight decay added to the gradient (L2), momentum buffer
/// b = m b + (1 - dampening) g (b = g on its first step), Nesterov g + m b.
pub struct Sgd {
    core: Core,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    bufs: Vec<Option<Tensor>>,
}

impl Sgd {
    pub fn new(params: Vec<Param>, groups: Vec<Group>, lr: f64, momentum: f64, nesterov: bool) -> Result<Self> {
        if !(lr.is_finite() && lr >= 0.0) || !(0.0..1.0).contains(&momentum) {
            bail!("SGD needs lr >= 0 and 0 <= momentum < 1, got lr {lr}, momentum {momentum}");
        }
        if nesterov && momentum == 0.0 {
            bail!("Nesterov momentum needs momentum > 0");
        }
        let n = params.len();
        Ok(Self {
            core: Core::new(params, groups, lr)?,
            momentum,
            dampening: 0.0,
            nesterov,
            bufs: (0..n).map(|_| None).collect(),
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (i, p) in self.core.params.iter().enumerate() {
            let g = p.tensor.grad();
            if !g.defined() {
                continue;
            }
            let grp = &self.core.groups[p.group];
            let mut d = if grp.weight_decay != 0.0 { &g + &p.tensor * grp.weight_decay } else { g.shallow_clone() };
            if self.momentum != 0.0 {
                let buf = match &mut self.bufs[i] {
                    Some(b) => {
                        let _ = b.f_mul_scalar_(self.momentum)?.f_add_(&(&d * (1.0 - self.dampening)))?;
                        b.shallow_clone()
                    }
                    slot @ None => {
                        let b = d.detach().copy();
                        *slot = Some(b.shallow_clone());
                        b
                    }
                };
                d = if self.nesterov { d + buf * self.momentum } else { buf };
            }
            let _ = p.tensor.shallow_clone().f_sub_(&(d * (self.core.lr * grp.lr_scale)))?;
        }
        Ok(())
    }
    fn core(&self) -> &Core {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
    fn state(&self) -> OptimizerState {
        let tensors = self
            .core
            .params
            .iter()
            .zip(&self.bufs)
            .filter_map(|(p, b)| b.as_ref().map(|b| (format!("{}.momentum_buffer", p.name), b.copy())))
            .collect();
        let json = serde_json::json!({"kind": "sgd", "lr": self.core.lr, "momentum": self.momentum, "dampening": self.dampening, "nesterov": self.nesterov, "groups": self.core.groups});
        OptimizerState { tensors, json }
    }
    fn load_state(&mut self, s: &OptimizerState) -> Result<()> {
        self.core.load_common("sgd", s)?;
        for (i, p) in self.core.params.iter().enumerate() {
            self.bufs[i] = match s.tensors.get(&format!("{}.momentum_buffer", p.name)) {
                Some(t) => {
                    shape_check("momentum_buffer", t, p)?;
                    Some(t.to_device(p.tensor.device()).to_kind(p.tensor.kind()))
                }
                None => None,
            };
        }
        Ok(())
    }
}

/// AdamW as torch.optim.AdamW (amsgrad off): decoupled decay p *= 1 - lr wd, then Adam with
/// bias corrections, denom = sqrt(v) / sqrt(1 - b2^t) + eps. By default each parameter group
/// steps in one call of ATen's fused kernel (`ops::adamw::fused_adamw`, as
/// `torch.optim.AdamW(fused=True)`); `fused = false` runs the per-parameter tch ops instead.
pub struct AdamW {
    core: Core,
    pub betas: (f64, f64),
    pub eps: f64,
    /// One fused call per group (the default) or the per-parameter reference ops.
    pub fused: bool,
    steps: Vec<i64>,
    m: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
}

impl AdamW {
    pub fn new(params: Vec<Param>, groups: Vec<Group>, lr: f64, betas: (f64, f64), eps: f64) -> Result<Self> {
        if !(lr.is_finite() && lr >= 0.0)
            || !(0.0..1.0).contains(&betas.0)
            || !(0.0..1.0).contains(&betas.1)
            || eps.is_nan()
            || eps < 0.0
        {
            bail!("AdamW needs lr >= 0, 0 <= betas < 1, eps >= 0; got lr {lr}, betas {betas:?}, eps {eps}");
        }
        let n = params.len();
        Ok(Self {
            core: Core::new(params, groups, lr)?,
            betas,
            eps,
            fused: true,
            steps: vec![0; n],
            m: (0..n).map(|_| None).collect(),
            v: (0..n).map(|_| None).collect(),
        })
    }
}

/// One parameter group's share of an AdamW step: what the fused kernel takes in one call.
#[derive(Default)]
struct GroupStep {
    params: Vec<Tensor>,
    grads: Vec<Tensor>,
    exp_avgs: Vec<Tensor>,
    exp_avg_sqs: Vec<Tensor>,
    steps: Vec<f64>,
}

impl Optimizer for AdamW {
    fn step(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let (beta1, beta2) = self.betas;
        // Per group: the parameters that have a gradient this step, their moments and steps.
        let mut by_group: Vec<GroupStep> = (0..self.core.groups.len()).map(|_| GroupStep::default()).collect();
        for (i, p) in self.core.params.iter().enumerate() {
            let g = p.tensor.grad();
            if !g.defined() {
                continue;
            }
            self.steps[i] += 1;
            let m = self.m[i].get_or_insert_with(|| p.tensor.zeros_like()).shallow_clone();
            let v = self.v[i].get_or_insert_with(|| p.tensor.zeros_like()).shallow_clone();
            let b = &mut by_group[p.group];
            b.params.push(p.tensor.shallow_clone());
            b.grads.push(g);
            b.exp_avgs.push(m);
            b.exp_avg_sqs.push(v);
            b.steps.push(self.steps[i] as f64);
        }
        for (grp, b) in self.core.groups.iter().zip(by_group) {
            let GroupStep { params: ps, grads: gs, exp_avgs: ms, exp_avg_sqs: vs, steps } = b;
            if ps.is_empty() {
                continue;
            }
            let h = AdamWHyper {
                lr: self.core.lr * grp.lr_scale,
                beta1,
                beta2,
                weight_decay: grp.weight_decay,
                eps: self.eps,
            };
            if self.fused {
                fused_adamw(&ps, &gs, &ms, &vs, &steps, h)?;
            } else {
                for k in 0..ps.len() {
                    adamw_reference(&ps[k], &gs[k], &ms[k], &vs[k], steps[k], h)?;
                }
            }
        }
        Ok(())
    }
    fn core(&self) -> &Core {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
    fn state(&self) -> OptimizerState {
        let mut tensors = BTreeMap::new();
        for (i, p) in self.core.params.iter().enumerate() {
            if let (Some(m), Some(v)) = (&self.m[i], &self.v[i]) {
                tensors.insert(format!("{}.exp_avg", p.name), m.copy());
                tensors.insert(format!("{}.exp_avg_sq", p.name), v.copy());
            }
        }
        let steps: BTreeMap<&str, i64> =
            self.core.params.iter().zip(&self.steps).map(|(p, s)| (p.name.as_str(), *s)).collect();
        let json = serde_json::json!({"kind": "adamw", "lr": self.core.lr, "betas": [self.betas.0, self.betas.1], "eps": self.eps, "steps": steps, "groups": self.core.groups});
        OptimizerState { tensors, json }
    }
    fn load_state(&mut self, s: &OptimizerState) -> Result<()> {
        self.core.load_common("adamw", s)?;
        for (i, p) in self.core.params.iter().enumerate() {
            self.steps[i] = s.json["steps"][&p.name].as_i64().unwrap_or(0);
            let get = |k: &str| -> Result<Option<Tensor>> {
                match s.tensors.get(&format!("{}.{k}", p.name)) {
                    Some(t) => {
                        shape_check(k, t, p)?;
                        Ok(Some(t.to_device(p.tensor.device()).to_kind(p.tensor.kind())))
                    }
                    None => Ok(None),
                }
            };
            self.m[i] = get("exp_avg")?;
            self.v[i] = get("exp_avg_sq")?;
            if self.steps[i] > 0 && (self.m[i].is_none() || self.v[i].is_none()) {
                bail!("optimizer state: parameter {} has {} steps but no moment buffers", p.name, self.steps[i]);
            }
        }
        Ok(())
    }
}
