//! Learning-rate schedules and early stopping, with state that serialises to JSON for
//! checkpoints. The formulas follow PyTorch (StepLR, CosineAnnealingLR's closed form,
//! ReduceLROnPlateau) and nanoGPT (linear warmup then cosine); tests/sched.rs checks them
//! against a PyTorch fixture.

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// A schedule that is a function of the step (or epoch) count alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// lr = base * gamma^(floor(t / step_size))
    Step {
        step_size: usize,
        gamma: f64,
    },
    /// lr = eta_min + (base - eta_min) (1 + cos(pi t / t_max)) / 2
    Cosine {
        t_max: usize,
        eta_min: f64,
    },
    /// base (t + 1) / (warmup + 1) while t < warmup; then cosine from base down to min_lr at t = total;
    /// min_lr after.
    WarmupCosine {
        warmup: usize,
        total: usize,
        min_lr: f64,
    },
}

impl Schedule {
    /// The learning rate at step `t` for base rate `base`.
    pub fn lr(&self, base: f64, t: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Step { step_size, gamma } => base * gamma.powi((t / step_size.max(1)) as i32),
            Schedule::Cosine { t_max, eta_min } => {
                eta_min + (base - eta_min) * (1.0 + (PI * t as f64 / t_max.max(1) as f64).cos()) / 2.0
            }
            Schedule::WarmupCosine { warmup, total, min_lr } => {
                if t < warmup {
                    base * (t + 1) as f64 / (warmup + 1) as f64
                } else if t > total {
                    min_lr
                } else {
                    let ratio = (t - warmup) as f64 / (total - warmup).max(1) as f64;
                    min_lr + 0.5 * (1.0 + (PI * ratio).cos()) * (base - min_lr)
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (an accuracy).
    Max,
}

/// torch.optim.lr_scheduler.ReduceLROnPlateau with threshold_mode "rel": multiply the rate by
/// `factor` when the metric has not improved by a relative `threshold` for more than `patience`
/// epochs; then wait `cooldown` epochs; never below `min_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReduceLrOnPlateau {
    pub mode: Mode,
    pub factor: f64,
    pub patience: usize,
    pub threshold: f64,
    pub cooldown: usize,
    pub min_lr: f64,
    pub lr: f64,
    best: Option<f64>,
    num_bad: usize,
    cooldown_counter: usize,
}

impl ReduceLrOnPlateau {
    pub fn new(
        lr: f64,
        mode: Mode,
        factor: f64,
        patience: usize,
        threshold: f64,
        cooldown: usize,
        min_lr: f64,
    ) -> Self {
        Self { mode, factor, patience, threshold, cooldown, min_lr, lr, best: None, num_bad: 0, cooldown_counter: 0 }
    }

    fn better(&self, a: f64) -> bool {
        match (self.best, self.mode) {
            (None, _) => !a.is_nan(),
            (Some(b), Mode::Min) => a < b * (1.0 - self.threshold),
            (Some(b), Mode::Max) => a > b * (1.0 + self.threshold),
        }
    }

    /// Feeds one epoch's metric; returns the (possibly reduced) learning rate.
    pub fn step(&mut self, metric: f64) -> f64 {
        if self.better(metric) {
            self.best = Some(metric);
            self.num_bad = 0;
        } else {
            self.num_bad += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad = 0;
        }
        if self.num_bad > self.patience {
            let new = (self.lr * self.factor).max(self.min_lr);
            if self.lr - new > 1e-8 {
                self.lr = new;
            }
            self.cooldown_counter = self.cooldown;
            self.num_bad = 0;
        }
        self.lr
    }
}

/// What early stopping says after an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A new best: save it (it is what `stop` restores).
    Improved,
    Continue,
    /// No improvement for `patience` epochs: stop and restore the best weights.
    Stop,
}

/// Early stopping on a validation metric: improvement means beating the best by more than
/// `min_delta` in the direction of `mode`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    pub mode: Mode,
    pub patience: usize,
    pub min_delta: f64,
    pub best: Option<f64>,
    pub best_epoch: Option<usize>,
    pub bad_epochs: usize,
}

impl EarlyStopping {
    pub fn new(mode: Mode, patience: usize, min_delta: f64) -> Self {
        Self { mode, patience, min_delta, best: None, best_epoch: None, bad_epochs: 0 }
    }

    pub fn update(&mut self, epoch: usize, metric: f64) -> Verdict {
        let improved = match (self.best, self.mode) {
            _ if metric.is_nan() => false,
            (None, _) => true,
            (Some(b), Mode::Min) => metric < b - self.min_delta,
            (Some(b), Mode::Max) => metric > b + self.min_delta,
        };
        if improved {
            self.best = Some(metric);
            self.best_epoch = Some(epoch);
            self.bad_epochs = 0;
            Verdict::Improved
        } else {
            self.bad_epochs += 1;
            if self.bad_epochs >= self.patience {
                Verdict::Stop
            } else {
                Verdict::Continue
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_stopping_counts_patience_and_respects_min_delta() {
        let mut es = EarlyStopping::new(Mode::Max, 2, 0.01);
        assert_eq!(es.update(0, 0.90), Verdict::Improved);
        assert_eq!(es.update(1, 0.905), Verdict::Continue); // +0.005 < min_delta
        assert_eq!(es.update(2, 0.95), Verdict::Improved);
        assert_eq!(es.update(3, f64::NAN), Verdict::Continue);
        assert_eq!(es.update(4, 0.94), Verdict::Stop);
        assert_eq!((es.best, es.best_epoch), (Some(0.95), Some(2)));
        let mut lo = EarlyStopping::new(Mode::Min, 1, 0.0);
        assert_eq!(lo.update(0, 1.0), Verdict::Improved);
        assert_eq!(lo.update(1, 1.0), Verdict::Stop);
        let json = serde_json::to_string(&es).unwrap();
        assert_eq!(serde_json::from_str::<EarlyStopping>(&json).unwrap(), es);
    }
}
