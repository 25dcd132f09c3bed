//! The classification trainer used by m02: optimizer and schedule from a config, per-epoch
//! validation, early stopping that restores the best weights, `best/` and `last/` checkpoints
//! after every epoch, exact resume, TensorBoard + JSON-lines logs, and progress bars.
//!
//! Exact resume rests on four things saved in `last/`: the weights and buffers, the optimizer's
//! moments, torch's generator (dropout), and the epoch/step counters. The data order needs no
//! saving: the loader draws it from `(seed, epoch)`, and augmentation from `(seed, epoch, index)`.

use crate::data::loader::{Batch, DataLoader, Dataset};
use crate::data::vision::{image_grid, ImageBatch, ImageDataset, ImageSubset};
use crate::models::Classifier;
use crate::nn::loss::cross_entropy;
use crate::train::checkpoint::{self, TrainingState};
use crate::train::hooks::{Hooks, NoHooks};
use crate::train::metrics::{self, Confusion};
use crate::train::optim::{decay_groups, AdamW, Optimizer, Sgd};
use crate::train::sched::{EarlyStopping, Mode, ReduceLrOnPlateau, Schedule, Verdict};
use crate::train::tensorboard::SummaryWriter;
use crate::{run::progress, sys::runtime};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OptKind {
    Sgd,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SchedKind {
    /// Constant learning rate.
    Constant,
    /// x0.1 after each third of training (StepLR).
    Step,
    /// Cosine from lr to lr/100 over all steps (CosineAnnealingLR).
    Cosine,
    /// Linear warmup over the first epoch, then cosine to lr/100.
    WarmupCosine,
    /// x0.5 when validation loss stalls for an epoch (ReduceLROnPlateau).
    Plateau,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub lr: f64,
    pub optimizer: OptKind,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub schedule: SchedKind,
    pub label_smoothing: f64,
    /// Early stopping patience in epochs (None: off).
    pub patience: Option<usize>,
    pub min_delta: f64,
    /// Stop each epoch after this many batches (--quick).
    pub max_batches: Option<usize>,
}

impl Default for TrainConfig {
    /// AdamW at 1e-3 with weight decay 1e-4 on matrices, warmup + cosine, no label smoothing,
    /// no early stopping: the recipe every course classifier starts from.
    fn default() -> Self {
        TrainConfig {
            epochs: 4,
            lr: 1e-3,
            optimizer: OptKind::Adamw,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            schedule: SchedKind::WarmupCosine,
            label_smoothing: 0.0,
            patience: None,
            min_delta: 1e-4,
            max_batches: None,
        }
    }
}

impl TrainConfig {
    /// m02's MLP on MNIST: 10 epochs of the default recipe (98.5 % test accuracy).
    pub fn mnist_mlp() -> Self {
        TrainConfig { epochs: 10, ..Self::default() }
    }

    /// m02's LeNet on MNIST: 4 epochs of the default recipe (99.3 %); m05 trains it under DDP.
    pub fn mnist_cnn() -> Self {
        TrainConfig { epochs: 4, ..Self::default() }
    }

    /// The peak learning rate the course uses for an optimizer: 1e-3 for AdamW, 0.05 for SGD.
    pub fn default_lr(optimizer: OptKind) -> f64 {
        match optimizer {
            OptKind::Adamw => 1e-3,
            OptKind::Sgd => 0.05,
        }
    }
}

/// One epoch's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub val_loss: f64,
    pub val_acc: f64,
    pub lr: f64,
    pub seconds: f64,
    pub samples_per_s: f64,
}

pub struct Outcome {
    pub history: Vec<EpochRecord>,
    /// (global step, learning rate) at every step.
    pub lr_trace: Vec<(usize, f64)>,
    /// (global step, training loss of the whole global batch) at every step.
    pub loss_trace: Vec<(usize, f64)>,
    pub best_epoch: Option<usize>,
    pub stopped_early: bool,
    /// True when training stopped at `stop_after` (a simulated interruption).
    pub interrupted: bool,
}

/// Trainer counters and the pieces of state that live in `last/state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Progress {
    next_epoch: usize,
    step: usize,
    history: Vec<EpochRecord>,
    lr_trace: Vec<(usize, f64)>,
    #[serde(default)]
    loss_trace: Vec<(usize, f64)>,
    plateau: Option<ReduceLrOnPlateau>,
    early: Option<EarlyStopping>,
}

/// What the trainer records about the model: a short name for logs, the config that rebuilds
/// it (tagged with its `model_type`, `io::hf::tagged_config`; saved as `best/config.json` and
/// checked on resume), and any extra files `best/` needs (m03 puts its `tokenizer.json` there).
pub struct ModelInfo<'a> {
    pub name: &'a str,
    pub config: serde_json::Value,
    pub extra_files: Option<&'a dyn Fn(&Path) -> Result<()>>,
}

/// Loss and accuracy of `model` over a loader, in eval mode without autograd.
pub fn evaluate<D: Dataset, B: Batch, M: Classifier<B> + ?Sized>(
    model: &M,
    data: &DataLoader<D, B>,
    device: Device,
    confusion: Option<&mut Confusion>,
) -> Result<(f64, f64)> {
    let [loss_sum, correct, n] = evaluate_sums(model, data, device, confusion)?;
    if n == 0.0 {
        bail!("evaluation data is empty");
    }
    Ok((loss_sum / n, correct / n))
}

/// [`evaluate`]'s sums `[loss sum, correct, count]`, to be added up over processes when each
/// evaluates its shard (DDP).
pub fn evaluate_sums<D: Dataset, B: Batch, M: Classifier<B> + ?Sized>(
    model: &M,
    data: &DataLoader<D, B>,
    device: Device,
    confusion: Option<&mut Confusion>,
) -> Result<[f64; 3]> {
    let _g = tch::no_grad_guard();
    let (mut loss_sum, mut correct, mut n) = (0.0, 0i64, 0i64);
    let mut conf = confusion;
    for b in data.epoch(0) {
        let b = b?;
        let logits = model.logits(&b, device, false);
        let labels = b.labels().to_device(device);
        let bs = labels.size()[0];
        loss_sum += cross_entropy(&logits, &labels, 0.0).double_value(&[]) * bs as f64;
        correct += metrics::correct(&logits, &labels);
        n += bs;
        if let Some(c) = conf.as_deref_mut() {
            c.add(&logits.argmax(-1, false), &labels);
        }
    }
    Ok([loss_sum, correct as f64, n as f64])
}

fn global_grad_norm(vs: &VarStore) -> f64 {
    let mut s = 0.0;
    for t in vs.trainable_variables() {
        let g = t.grad();
        if g.defined() {
            s += g.square().sum(Kind::Double).double_value(&[]);
        }
    }
    s.sqrt()
}

/// Trains `model` (whose variables live in `vs`) and writes checkpoints under `dir`.
/// With `resume`, continues from `dir/last` if it exists. `stop_after` ends training after that
/// many epochs in total, as an interruption would (used to test resume).
#[allow(clippy::too_many_arguments)]
pub fn fit<D: Dataset, B: Batch, M: Classifier<B> + ?Sized>(
    dir: &Path,
    info: &ModelInfo,
    vs: &VarStore,
    model: &M,
    train: &DataLoader<D, B>,
    val: &DataLoader<D, B>,
    cfg: &TrainConfig,
    resume: bool,
    stop_after: Option<usize>,
) -> Result<Outcome> {
    fit_with(dir, info, vs, model, train, val, cfg, resume, stop_after, &mut NoHooks)
}

/// [`fit`] with hooks: under DDP ([`crate::dist::ddp::Ddp`]) every rank runs this loop on loaders
/// with a `DistributedSampler`; gradients are averaged after backward, the epoch's train and
/// validation sums are added up over ranks, and only rank 0 prints, logs and writes
/// checkpoints (between barriers).
#[allow(clippy::too_many_arguments)]
pub fn fit_with<D: Dataset, B: Batch, M: Classifier<B> + ?Sized>(
    dir: &Path,
    info: &ModelInfo,
    vs: &VarStore,
    model: &M,
    train: &DataLoader<D, B>,
    val: &DataLoader<D, B>,
    cfg: &TrainConfig,
    resume: bool,
    stop_after: Option<usize>,
    hooks: &mut dyn Hooks,
) -> Result<Outcome> {
    let main = hooks.is_main();
    if cfg.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    let device = vs.device();
    let (params, groups) = decay_groups(vs, cfg.weight_decay);
    let mut opt: Box<dyn Optimizer> = match cfg.optimizer {
        OptKind::Sgd => Box::new(Sgd::new(params, groups, cfg.lr, cfg.momentum, cfg.nesterov)?),
        OptKind::Adamw => Box::new(AdamW::new(params, groups, cfg.lr, (0.9, 0.999), 1e-8)?),
    };
    let per_epoch = cfg.max_batches.map_or(train.num_batches(0), |m| m.min(train.num_batches(0)));
    let total = per_epoch * cfg.epochs;
    let schedule = match cfg.schedule {
        SchedKind::Constant | SchedKind::Plateau => Schedule::Constant,
        SchedKind::Step => Schedule::Step { step_size: (total / 3).max(1), gamma: 0.1 },
        SchedKind::Cosine => Schedule::Cosine { t_max: total, eta_min: cfg.lr / 100.0 },
        SchedKind::WarmupCosine => {
            Schedule::WarmupCosine { warmup: per_epoch.min(total / 2), total, min_lr: cfg.lr / 100.0 }
        }
    };
    let mut p = Progress {
        plateau: (cfg.schedule == SchedKind::Plateau)
            .then(|| ReduceLrOnPlateau::new(cfg.lr, Mode::Min, 0.5, 0, 1e-3, 0, cfg.lr / 100.0)),
        early: cfg.patience.map(|pat| EarlyStopping::new(Mode::Max, pat, cfg.min_delta)),
        ..Default::default()
    };
    if resume {
        if let Some(saved) = checkpoint::load_last(dir, vs)? {
            opt.load_state(&saved.optimizer).context("restoring the optimizer")?;
            runtime::set_generator_state(Device::Cpu, &saved.torch_rng).context("restoring torch's generator")?;
            p = serde_json::from_value(saved.state["progress"].clone()).context("last/state.json: bad 'progress'")?;
            if saved.state["model"] != info.config {
                bail!("{}: the checkpoint was trained with another model config; start afresh without --resume or use the same flags", dir.join("last").display());
            }
            if main {
                println!("resumed from {} at epoch {}", dir.join("last").display(), p.next_epoch + 1);
            }
        }
    }
    let mut tb = if main { Some(SummaryWriter::new(&dir.join("tb"))?) } else { None };
    let mut stopped_early = false;
    let end = stop_after.map_or(cfg.epochs, |s| s.min(cfg.epochs));
    while p.next_epoch < end {
        let epoch = p.next_epoch;
        let t0 = Instant::now();
        let bar = if main {
            progress::bar(per_epoch as u64, &format!("{} ep {}", info.name, epoch + 1))
        } else {
            indicatif::ProgressBar::hidden()
        };
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0i64, 0i64);
        for (i, batch) in train.epoch(epoch as u64).take(per_epoch).enumerate() {
            let b = batch?;
            hooks.around_step(p.step, true)?;
            let lr = match &p.plateau {
                Some(pl) => pl.lr,
                None => schedule.lr(cfg.lr, p.step),
            };
            opt.set_lr(lr);
            let y = b.labels().to_device(device);
            let logits = model.logits(&b, device, true);
            let loss = cross_entropy(&logits, &y, cfg.label_smoothing);
            opt.zero_grad();
            loss.backward();
            hooks.after_backward(p.step, &[])?;
            // Measured only on logged steps: it is a reduction over every gradient plus a sync.
            let gnorm = (p.step % 20 == 0).then(|| global_grad_norm(vs));
            opt.step()?;
            let l = loss.double_value(&[]);
            let world = hooks.shard().1;
            let l_all = if world > 1 { hooks.reduce_sum(&[l])?[0] / world as f64 } else { l };
            p.loss_trace.push((p.step, l_all));
            if !l_all.is_finite() {
                bail!("epoch {} step {}: the loss is {l} (lr {lr}); try a smaller --lr", epoch + 1, i + 1);
            }
            let bs = y.size()[0];
            loss_sum += l * bs as f64;
            correct += metrics::correct(&logits, &y);
            seen += bs;
            p.lr_trace.push((p.step, lr));
            if let Some(tb) = tb.as_mut().filter(|_| p.step % 20 == 0) {
                tb.add_scalar("train/loss", l, p.step as i64)?;
                tb.add_scalar("train/lr", lr, p.step as i64)?;
                tb.add_scalar("train/grad_norm", gnorm.unwrap_or(f64::NAN), p.step as i64)?;
            }
            hooks.around_step(p.step, false)?;
            p.step += 1;
            bar.inc(1);
            bar.set_message(format!("loss {l:.4}"));
        }
        bar.finish_and_clear();
        let train_secs = t0.elapsed().as_secs_f64();
        let [loss_sum, correct, seen] = hooks.reduce_sum(&[loss_sum, correct as f64, seen as f64])?[..] else {
            bail!("reduce_sum returned the wrong number of values")
        };
        let [vl, vc, vn] = hooks.reduce_sum(&evaluate_sums(model, val, device, None)?)?[..] else {
            bail!("reduce_sum returned the wrong number of values")
        };
        if vn == 0.0 {
            bail!("evaluation data is empty");
        }
        let (val_loss, val_acc) = (vl / vn, vc / vn);
        let lr_now = opt.lr();
        if let Some(pl) = &mut p.plateau {
            pl.step(val_loss);
        }
        let rec = EpochRecord {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1.0),
            train_acc: correct / seen.max(1.0),
            val_loss,
            val_acc,
            lr: lr_now,
            seconds: t0.elapsed().as_secs_f64(),
            samples_per_s: seen as f64 / train_secs.max(1e-9),
        };
        if main {
            println!(
                "{} epoch {:>2}: train loss {:.4} acc {:.4} | val loss {:.4} acc {:.4} | lr {:.2e} | {:.0} samples/s",
                info.name, rec.epoch, rec.train_loss, rec.train_acc, val_loss, val_acc, lr_now, rec.samples_per_s
            );
        }
        for (tag, v) in [
            ("epoch/train_loss", rec.train_loss),
            ("epoch/train_acc", rec.train_acc),
            ("epoch/val_loss", val_loss),
            ("epoch/val_acc", val_acc),
        ] {
            if let Some(tb) = tb.as_mut() {
                tb.add_scalar(tag, v, rec.epoch as i64)?;
            }
        }
        p.history.push(rec);
        p.next_epoch += 1;
        let verdict = match &mut p.early {
            Some(es) => es.update(epoch + 1, val_acc),
            None => Verdict::Improved,
        };
        let best_so_far = p.history.iter().map(|r| r.val_acc).fold(f64::NEG_INFINITY, f64::max);
        // Rank 0 writes; the barriers keep the others from racing ahead or reading it early.
        hooks.barrier()?;
        if main && (verdict == Verdict::Improved || (p.early.is_none() && val_acc >= best_so_far)) {
            let files =
                checkpoint::ModelFiles { config: info.config.clone(), generation: None, extra: info.extra_files };
            let state = serde_json::json!({"epoch": epoch + 1, "val_acc": val_acc, "val_loss": val_loss});
            checkpoint::save_best(dir, vs, &files, Some(&state))?;
        }
        let state = TrainingState {
            optimizer: opt.state(),
            torch_rng: runtime::generator_state(Device::Cpu)?,
            state: serde_json::json!({"progress": p, "model": info.config, "train": cfg}),
        };
        if main {
            checkpoint::save_last(dir, vs, &state)?;
        }
        hooks.barrier()?;
        if verdict == Verdict::Stop {
            println!(
                "early stopping after epoch {}: no val-accuracy gain in {} epochs",
                epoch + 1,
                cfg.patience.unwrap_or(0)
            );
            stopped_early = true;
            break;
        }
    }
    let interrupted = p.next_epoch < cfg.epochs && !stopped_early;
    if stopped_early {
        crate::io::safetensors::load_into(vs, &best_dir(dir).join("model.safetensors"))
            .context("restoring the best weights")?;
    }
    let best_epoch = p.early.as_ref().and_then(|e| e.best_epoch).or_else(|| {
        p.history
            .iter()
            .max_by(|a, b| a.val_acc.partial_cmp(&b.val_acc).unwrap_or(std::cmp::Ordering::Equal))
            .map(|r| r.epoch)
    });
    Ok(Outcome {
        history: p.history,
        lr_trace: p.lr_trace,
        loss_trace: p.loss_trace,
        best_epoch,
        stopped_early,
        interrupted,
    })
}

/// Adds one run's per-epoch train (solid) and validation (dashed) loss and accuracy to a loss
/// chart and an accuracy chart.
pub fn add_curves(
    loss: crate::run::charts::LineChart,
    acc: crate::run::charts::LineChart,
    name: &str,
    history: &[EpochRecord],
) -> (crate::run::charts::LineChart, crate::run::charts::LineChart) {
    use crate::run::charts::Series;
    let pts = |f: fn(&EpochRecord) -> f64| history.iter().map(|r| (r.epoch as f64, f(r))).collect::<Vec<_>>();
    (
        loss.series(Series::line(&format!("{name} train"), pts(|r| r.train_loss)))
            .series(Series::dashed(&format!("{name} val"), pts(|r| r.val_loss))),
        acc.series(Series::line(&format!("{name} train"), pts(|r| r.train_acc)))
            .series(Series::dashed(&format!("{name} val"), pts(|r| r.val_acc))),
    )
}

pub fn best_dir(dir: &Path) -> PathBuf {
    checkpoint::resolve(&dir.join("best")).unwrap_or_else(|| dir.join("best"))
}

/// Predictions `(B)` of `model` for a batch of images.
pub fn predict(model: &dyn ModuleT, images: &Tensor, device: Device) -> Tensor {
    tch::no_grad(|| model.forward_t(&images.to_device(device), false).argmax(-1, false).to_device(Device::Cpu))
}

/// Draws up to `max` misclassified test images of `loader` in a captioned grid ("pred X / true Y",
/// pixels mapped back through the data set's normalisation) at `path`. Returns how many it drew;
/// with none, no file is written.
pub fn misclassified_grid(
    model: &dyn ModuleT,
    loader: &DataLoader<ImageSubset, ImageBatch>,
    dataset: ImageDataset,
    device: Device,
    max: usize,
    path: &Path,
) -> Result<usize> {
    let (mean, std) = dataset.mean_std();
    let classes = dataset.classes();
    let (mut wrong, mut caps) = (vec![], vec![]);
    for b in loader.epoch(0) {
        let b = b?;
        let pred: Vec<i64> = Vec::try_from(&predict(model, &b.images, device))?;
        let labels: Vec<i64> = Vec::try_from(&b.labels)?;
        for (k, (p, l)) in pred.iter().zip(&labels).enumerate() {
            if p != l && wrong.len() < max {
                let img: Vec<f32> = Vec::try_from(b.images.get(k as i64).flatten(0, -1))?;
                wrong.push(img.iter().map(|v| v * std + mean).collect::<Vec<f32>>());
                caps.push(format!("pred {} / true {}", classes[*p as usize], classes[*l as usize]));
            }
        }
        if wrong.len() >= max {
            break;
        }
    }
    if !wrong.is_empty() {
        let (r, c) = loader.dataset().set.image_size();
        image_grid(path, &wrong, &caps, r, c, 8, 4)?;
    }
    Ok(wrong.len())
}
