//! Mixed precision: the `--precision` choice, the autocast region it opens (CPU and CUDA, bf16 or
//! fp16, through the runtime shim), and a GradScaler that follows `torch.amp.GradScaler`: the
//! loss is multiplied by a scale before backward so small fp16 gradients do not flush to zero;
//! the gradients are divided back ("unscaled") before clipping and the step; a step whose
//! gradients hold inf/NaN is skipped and the scale backs off; after `growth_interval` clean
//! steps in a row the scale grows. The unscale and the update are PyTorch's own kernels
//! (`_amp_foreach_non_finite_check_and_unscale_`, one tensor at a time, and `_amp_update_scale_`).

use crate::sys::runtime::{self, AutocastGuard};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The dtype of the forward pass's matmuls. Weights, optimizer state and the loss stay fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp16 => Kind::Half,
        }
    }

    /// fp16 has 5 exponent bits: gradients under 6e-8 become zero, so it needs loss scaling.
    /// bf16 keeps fp32's 8 exponent bits and does not.
    pub fn needs_scaler(self) -> bool {
        self == Precision::Fp16
    }

    /// Opens the autocast region for this precision on `device` (none for fp32).
    pub fn autocast(self, device: Device) -> Result<Option<AutocastGuard>> {
        match self {
            Precision::Fp32 => Ok(None),
            p => runtime::autocast(device, p.kind(), true).map(Some),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "fp32" | "float32" => Ok(Precision::Fp32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "fp16" | "float16" | "half" => Ok(Precision::Fp16),
            other => anyhow::bail!("unknown precision '{other}' (fp32, bf16 or fp16)"),
        }
    }
}

/// Parses a comma-separated list like "fp32,bf16,fp16" (no repeats).
pub fn parse_list(s: &str) -> Result<Vec<Precision>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let p: Precision = part.parse()?;
        if out.contains(&p) {
            anyhow::bail!("precision '{}' is listed twice in '{s}'", p.name());
        }
        out.push(p);
    }
    if out.is_empty() {
        anyhow::bail!("the precision list '{s}' is empty (e.g. fp32,bf16,fp16)");
    }
    Ok(out)
}

/// `torch.amp.GradScaler`'s hyper-parameters, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        Self { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

/// Dynamic loss scaling. When disabled every method is the identity and steps always run.
pub struct GradScaler {
    pub cfg: ScalerConfig,
    enabled: bool,
    /// (1,) fp32 on the parameters' device, as PyTorch keeps it (no host sync to scale a loss).
    scale: Tensor,
    /// (1,) int32: consecutive steps without inf/NaN.
    growth_tracker: Tensor,
    /// Set by `unscale`: (1,) fp32, > 0 when some gradient was non-finite.
    found_inf: Option<Tensor>,
}

impl GradScaler {
    pub fn new(cfg: ScalerConfig, enabled: bool, device: Device) -> Result<Self> {
        if !(cfg.init_scale > 0.0 && cfg.growth_factor > 1.0 && cfg.backoff_factor > 0.0 && cfg.backoff_factor < 1.0)
            || cfg.growth_interval < 1
        {
            anyhow::bail!("GradScaler needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and growth_interval >= 1: {cfg:?}");
        }
        Ok(Self {
            cfg,
            enabled,
            scale: Tensor::from_slice(&[cfg.init_scale as f32]).to_device(device),
            growth_tracker: Tensor::from_slice(&[0i32]).to_device(device),
            found_inf: None,
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn scale_value(&self) -> f64 {
        if self.enabled {
            self.scale.double_value(&[0])
        } else {
            1.0
        }
    }

    pub fn growth_tracker(&self) -> i64 {
        self.growth_tracker.int64_value(&[0])
    }

    /// The scale itself, a (1,) fp32 device tensor that [`update`](Self::update) changes in place
    /// (None when disabled): a captured CUDA graph multiplies by it and so sees every update.
    /// [`load_state`](Self::load_state) replaces it; take it after resuming.
    pub fn scale_tensor(&self) -> Option<Tensor> {
        self.enabled.then(|| self.scale.shallow_clone())
    }

    /// `loss * scale` (the loss itself when disabled).
    pub fn scale(&self, loss: &Tensor) -> Tensor {
        if self.enabled {
            loss * self.scale.to_kind(loss.kind()).squeeze()
        } else {
            loss.shallow_clone()
        }
    }

    /// Divides every defined gradient of `params` by the scale in place and records whether
    /// any was inf/NaN; returns that. Call once per step, before clipping. Disabled: checks
    /// nothing and returns false (the trainer's own non-finite check still runs).
    pub fn unscale(&mut self, params: &[Tensor]) -> Result<bool> {
        if !self.enabled {
            return Ok(false);
        }
        let _g = tch::no_grad_guard();
        let mut found = Tensor::zeros([1], (Kind::Float, self.scale.device()));
        let inv = self.scale.to_kind(Kind::Double).reciprocal().to_kind(Kind::Float);
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                g.f_internal_amp_non_finite_check_and_unscale(&mut found, &inv).context("unscaling a gradient")?;
            }
        }
        let any = found.double_value(&[0]) > 0.0;
        self.found_inf = Some(found);
        Ok(any)
    }

    /// Whether the step should run: false when the last `unscale` found inf/NaN.
    pub fn should_step(&self) -> bool {
        match &self.found_inf {
            Some(f) => f.double_value(&[0]) == 0.0,
            None => true,
        }
    }

    /// Adjusts the scale after a step: backoff when inf/NaN was found (and the tracker resets),
    /// else one more clean step, and growth once `growth_interval` of them are in a row.
    pub fn update(&mut self) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let found = self.found_inf.take().context("GradScaler::update without unscale in this step")?;
        let _g = tch::no_grad_guard();
        let mut scale = self.scale.shallow_clone();
        let _ = scale
            .f_internal_amp_update_scale_(
                &self.growth_tracker,
                &found,
                self.cfg.growth_factor,
                self.cfg.backoff_factor,
                self.cfg.growth_interval,
            )
            .context("updating the loss scale")?;
        Ok(())
    }

    /// What a checkpoint keeps (PyTorch's `GradScaler.state_dict()` keys).
    pub fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "enabled": self.enabled,
            "scale": self.scale_value(),
            "growth_factor": self.cfg.growth_factor,
            "backoff_factor": self.cfg.backoff_factor,
            "growth_interval": self.cfg.growth_interval,
            "_growth_tracker": self.growth_tracker(),
        })
    }

    pub fn load_state(&mut self, v: &serde_json::Value) -> Result<()> {
        let f = |k: &str| v[k].as_f64().with_context(|| format!("GradScaler state: missing or non-numeric '{k}'"));
        self.enabled = v["enabled"].as_bool().context("GradScaler state: missing 'enabled'")?;
        self.cfg.growth_factor = f("growth_factor")?;
        self.cfg.backoff_factor = f("backoff_factor")?;
        self.cfg.growth_interval = f("growth_interval")? as i64;
        let scale = f("scale")?;
        if !(scale.is_finite() && scale > 0.0) {
            anyhow::bail!("GradScaler state: scale must be positive and finite, got {scale}");
        }
        let dev = self.scale.device();
        self.scale = Tensor::from_slice(&[scale as f32]).to_device(dev);
        self.growth_tracker = Tensor::from_slice(&[f("_growth_tracker")? as i32]).to_device(dev);
        Ok(())
    }
}
