//! The language-model training loop (nanoGPT's `train.py`, as a library that m04, m05 and m06
//! share): AdamW with decay groups, linear warmup then cosine decay, gradient accumulation,
//! mixed precision with a GradScaler, clipping by global norm (the norm is logged), a check
//! for non-finite loss and gradients on every step, periodic evaluation on fixed batches,
//! `last/` checkpoints with everything needed to resume exactly, TensorBoard + JSON-lines
//! logs, tokens/s and peak memory, and an optional profiler window.
//!
//! One optimizer step ("iteration") = `grad_accum` micro-batches of `batch_size` blocks of
//! `block_size` tokens; the micro-batch losses are divided by `grad_accum` so the summed
//! gradients equal those of one batch of `grad_accum · batch_size` blocks.

use crate::data::lm::{BatchSource, Split};
use crate::sys::cudagraph::CudaGraph;
use crate::sys::rng::Rng;
use crate::sys::runtime;
use crate::train::amp::{GradScaler, Precision, ScalerConfig};
use crate::train::checkpoint::{self, TrainingState};
use crate::train::optim::{decay_groups, AdamW, Optimizer};
use crate::train::sched::Schedule;
use crate::train::tensorboard::SummaryWriter;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// What to do when the loss or the gradient norm is inf/NaN (outside the GradScaler's own
/// overflow handling, which skips such fp16 steps by design).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// End training with an error naming the first parameter whose gradient is non-finite.
    #[default]
    Stop,
    /// Drop this step's update, report it, and go on.
    Skip,
}

/// Every knob of the loop; saved in checkpoints and checked on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmTrainConfig {
    /// Optimizer steps in total.
    pub steps: usize,
    pub batch_size: i64,
    pub grad_accum: usize,
    pub block_size: i64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Clip the global gradient norm to this (0: no clipping; the norm is still measured).
    pub grad_clip: f64,
    /// Evaluate every this many steps (and at the end); 0: only at the end.
    pub eval_interval: usize,
    /// Batches per split per evaluation.
    pub eval_iters: usize,
    pub log_interval: usize,
    /// Write `last/` every this many steps (and at the end); 0: only at the end.
    pub checkpoint_interval: usize,
    pub precision: Precision,
    pub on_nonfinite: OnNonFinite,
    /// Fused softmax-cross-entropy kernel for the loss.
    pub fused_loss: bool,
    /// Stop (cleanly, with a checkpoint) once training has run this many seconds.
    pub max_time: Option<f64>,
    /// Seed of the batch sampler.
    pub seed: u64,
    /// Capture a micro-batch's forward and backward as a CUDA graph once, then replay it for
    /// every micro-batch (CUDA only; see [`crate::sys::cudagraph`]). Configs saved before this field
    /// existed read as false.
    #[serde(default)]
    pub cuda_graph: bool,
}

impl LmTrainConfig {
    /// nanoGPT's `train_shakespeare_char.py`, sized for a 2-core CPU (m04's default, and m05's GPT):
    /// AdamW lr 1e-3 warming up over 100 steps then cosine to 1e-4, weight decay 0.1, beta2 0.99
    /// (small data), global-norm clipping at 1, batch 16 of 64 tokens, 2500 steps, evaluation every
    /// 250 steps on 20 batches. Val loss 1.66 with the `cpu` preset (notes/m04_amp.md).
    pub fn shakespeare_char() -> Self {
        LmTrainConfig {
            steps: 2500,
            batch_size: 16,
            grad_accum: 1,
            block_size: 64,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            grad_clip: 1.0,
            eval_interval: 250,
            eval_iters: 20,
            log_interval: 10,
            checkpoint_interval: 500,
            precision: Precision::Fp32,
            on_nonfinite: OnNonFinite::Stop,
            fused_loss: false,
            max_time: None,
            seed: 0,
            cuda_graph: false,
        }
    }

    /// The same recipe cut to seconds (`--quick`): `steps` steps, two evaluations of 4 batches,
    /// a log line every step, no intermediate checkpoints.
    pub fn quick(self, steps: usize) -> Self {
        LmTrainConfig {
            steps,
            warmup: self.warmup.min(steps / 2),
            eval_interval: steps / 2,
            eval_iters: 4,
            log_interval: 1,
            checkpoint_interval: 0,
            ..self
        }
    }

    pub fn check(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size < 1 || self.grad_accum == 0 || self.block_size < 1 {
            bail!("--steps, --batch-size, --grad-accum and the block size must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) || self.min_lr < 0.0 || self.min_lr > self.lr {
            bail!("--lr must be positive and --min-lr between 0 and --lr (got {} and {})", self.lr, self.min_lr);
        }
        if self.grad_clip < 0.0 || self.weight_decay < 0.0 {
            bail!("--grad-clip and --weight-decay must be >= 0");
        }
        if self.eval_iters == 0 || self.log_interval == 0 {
            bail!("--eval-iters and the log interval must be at least 1");
        }
        if let Some(t) = self.max_time {
            if !(t > 0.0) {
                bail!("--max-time must be positive, got {t}");
            }
        }
        Ok(())
    }

    pub fn tokens_per_step(&self) -> i64 {
        self.batch_size * self.block_size * self.grad_accum as i64
    }

    pub fn schedule(&self) -> Schedule {
        Schedule::WarmupCosine { warmup: self.warmup, total: self.steps, min_lr: self.min_lr }
    }
}

pub use crate::models::LanguageModel;
pub use crate::train::hooks::{Hooks, NoHooks};

/// One logged step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping (unscaled).
    pub grad_norm: f64,
    pub scale: f64,
    pub tokens_per_s: f64,
}

/// One evaluation: mean loss over `eval_iters` fixed batches of each split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalLog {
    pub step: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    /// Training seconds so far (evaluation excluded).
    pub seconds: f64,
}

/// A step whose update was dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedStep {
    pub step: usize,
    /// "scaler" (fp16 overflow, expected now and then) or "nonfinite".
    pub reason: String,
    pub detail: String,
}

/// Everything the loop carries from step to step; `last/state.json` holds it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub step: usize,
    pub rng: [u64; 4],
    pub train_seconds: f64,
    pub tokens: i64,
    pub logs: Vec<StepLog>,
    pub evals: Vec<EvalLog>,
    pub skipped: Vec<SkippedStep>,
    pub scaler: serde_json::Value,
    pub peak_memory_bytes: u64,
}

/// The result of [`train`].
#[derive(Debug)]
pub struct LmOutcome {
    pub progress: Progress,
    /// Tokens per second over the training steps of this process (evaluation excluded).
    pub tokens_per_s: f64,
    pub stopped_by_time: bool,
    pub final_val_loss: f64,
    pub final_train_loss: f64,
    /// How peak memory was measured ("cuda allocator peak" or "cpu rss growth").
    pub memory_measure: &'static str,
}

/// Test-only fault injection: after the backward of `step`, the gradient of `param` is filled
/// with `value` (NaN or inf).
#[derive(Debug, Clone)]
pub struct Inject {
    pub step: usize,
    pub param: String,
    pub value: f64,
}

/// Options of one [`train`] call besides the config.
pub struct TrainOptions<'a> {
    /// Checkpoints and logs go here (`last/`, `tb/`).
    pub dir: PathBuf,
    /// Continue from `dir/last` if present.
    pub resume: bool,
    /// The model's config, saved with checkpoints and compared on resume.
    pub model_config: serde_json::Value,
    pub name: &'a str,
    pub inject: Option<Inject>,
    /// Stop after this step count as an interruption would (resume tests).
    pub stop_after: Option<usize>,
}

/// Global L2 norm of the gradients (one host sync), as `clip_grad_norm_` computes it.
pub fn grad_norm(params: &[(String, Tensor)]) -> f64 {
    let norms: Vec<Tensor> = params
        .iter()
        .map(|(_, p)| p.grad())
        .filter(|g| g.defined())
        .map(|g| g.norm_scalaropt_dtype(2, if g.kind() == Kind::Double { Kind::Double } else { Kind::Float }))
        .collect();
    if norms.is_empty() {
        return 0.0;
    }
    Tensor::stack(&norms.iter().map(|n| n.to_kind(Kind::Double)).collect::<Vec<_>>(), 0).norm().double_value(&[])
}

/// Scales every gradient by `max / (norm + 1e-6)` when the norm exceeds `max` (torch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(params: &[(String, Tensor)], max: f64) -> f64 {
    let total = grad_norm(params);
    if max > 0.0 && total.is_finite() {
        let coef = max / (total + 1e-6);
        if coef < 1.0 {
            let _g = tch::no_grad_guard();
            for (_, p) in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
        }
    }
    total
}

/// The first parameter (in name order) whose gradient holds inf or NaN, with what it holds.
pub fn first_nonfinite(params: &[(String, Tensor)]) -> Option<(String, String)> {
    for (name, p) in params {
        let g = p.grad();
        if !g.defined() {
            continue;
        }
        let bad = g.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
        if bad > 0 {
            let nan = g.isnan().sum(Kind::Int64).int64_value(&[]);
            return Some((name.clone(), format!("{bad} of {} values non-finite ({nan} NaN)", g.numel())));
        }
    }
    None
}

/// Mean loss over `eval_iters` batches of `split` drawn with a fixed seed (the same batches at
/// every evaluation, so curves compare across steps and across runs), in eval mode.
pub fn estimate_loss<M: LanguageModel + ?Sized, S: BatchSource + ?Sized>(
    model: &M,
    data: &S,
    split: Split,
    cfg: &LmTrainConfig,
    seed: u64,
    device: Device,
) -> Result<f64> {
    Ok(estimate_loss_sum(model, data, split, cfg, seed, device, (0, 1))? / cfg.eval_iters as f64)
}

/// This process's share of [`estimate_loss`]: the sum of the losses of the eval batches
/// `rank, rank + world, ...` (every process draws all of them, so the batches do not depend on
/// the world size). Summed over processes and divided by `eval_iters`, it is the mean.
pub fn estimate_loss_sum<M: LanguageModel + ?Sized, S: BatchSource + ?Sized>(
    model: &M,
    data: &S,
    split: Split,
    cfg: &LmTrainConfig,
    seed: u64,
    device: Device,
    (rank, world): (usize, usize),
) -> Result<f64> {
    let _g = tch::no_grad_guard();
    let _ac = cfg.precision.autocast(device)?;
    let mut rng = Rng::new(seed);
    let mut sum = 0.0;
    for i in 0..cfg.eval_iters {
        let (x, y) = data.batch(split, cfg.batch_size, cfg.block_size, &mut rng, device)?;
        if i % world == rank {
            sum += model.loss(&x, &y, false, cfg.fused_loss).double_value(&[]);
        }
    }
    Ok(sum)
}

/// This process's rows of a batch of `world · batch` windows drawn from the shared `rng`: with
/// every process drawing the same windows, N processes of batch b see exactly the rows one
/// process of batch N·b would.
fn shard_batch<S: BatchSource + ?Sized>(
    data: &S,
    cfg: &LmTrainConfig,
    rng: &mut Rng,
    device: Device,
    (rank, world): (usize, usize),
) -> Result<(Tensor, Tensor)> {
    let (x, y) = data.batch(Split::Train, cfg.batch_size * world as i64, cfg.block_size, rng, device)?;
    if world == 1 {
        return Ok((x, y));
    }
    let at = cfg.batch_size * rank as i64;
    Ok((x.narrow(0, at, cfg.batch_size), y.narrow(0, at, cfg.batch_size)))
}

fn memory_now(device: Device) -> u64 {
    match device {
        Device::Cuda(i) => runtime::cuda_memory(i).map(|s| s.allocated_peak.max(0) as u64).unwrap_or(0),
        _ => runtime::current_rss_bytes(),
    }
}

/// Zeroes every defined gradient in place (`zero_grad(set_to_none=False)`): a captured CUDA
/// graph adds into the gradients' memory, so they must stay where they are.
fn zero_grads_in_place(params: &[(String, Tensor)]) {
    let _g = tch::no_grad_guard();
    for (_, p) in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// `--cuda-graph`: one micro-batch (forward under autocast, loss / grad_accum, scaled backward)
/// captured as a CUDA graph. Each micro-batch is copied into the static `x`/`y` and the graph
/// replayed; it adds its gradients into the existing `.grad` tensors and writes its loss into
/// `loss`. Unscaling, clipping, the checks and the optimizer step stay eager.
pub struct GraphedMicroBatch<'a> {
    x: Tensor,
    y: Tensor,
    loss: Tensor,
    graph: CudaGraph<'a>,
}

impl<'a> GraphedMicroBatch<'a> {
    /// Warm-up runs before the capture, as `torch.cuda.make_graphed_callables` does (3).
    const WARMUP: usize = 3;

    /// `scale`: the GradScaler's own tensor ([`GradScaler::scale_tensor`]), so replays see its
    /// in-place updates.
    fn capture<M: LanguageModel + ?Sized>(
        model: &'a M,
        cfg: &'a LmTrainConfig,
        scale: Option<Tensor>,
        device: Device,
    ) -> Result<Self> {
        // Token 0 exists in every vocabulary: the warm-up and capture runs read valid ids.
        let x = Tensor::zeros([cfg.batch_size, cfg.block_size], (Kind::Int64, device)); // (B, T)
        let y = Tensor::zeros([cfg.batch_size, cfg.block_size], (Kind::Int64, device)); // (B, T)
        let loss = Tensor::zeros([], (Kind::Double, device));
        let (gx, gy, mut gloss) = (x.shallow_clone(), y.shallow_clone(), loss.shallow_clone());
        let micro_batch = move || -> Result<()> {
            let l = {
                let _ac = cfg.precision.autocast(device)?;
                model.loss(&gx, &gy, true, cfg.fused_loss) / cfg.grad_accum as f64
            };
            // GradScaler::scale, on the scaler's tensor rather than through the scaler, which
            // the loop keeps updating.
            let scaled = match &scale {
                Some(s) => &l * s.to_kind(l.kind()).squeeze(),
                None => l.shallow_clone(),
            };
            scaled.f_backward()?;
            gloss.f_copy_(&l.detach())?;
            Ok(())
        };
        let graph = CudaGraph::capture_on(device, micro_batch, Self::WARMUP)
            .context("capturing a training micro-batch as a CUDA graph")?;
        Ok(Self { x, y, loss, graph })
    }

    /// One micro-batch on `(x, y)`: its loss (divided by grad_accum, fp64, on the device), to be
    /// consumed by ops queued before the next replay overwrites it.
    fn run(&mut self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.x.f_copy_(x)?;
        self.y.f_copy_(y)?;
        self.graph.replay()?;
        Ok(self.loss.shallow_clone())
    }
}

/// The optimizer side of the loop, built once: the trainable parameters by name, AdamW over
/// decay / no-decay groups, and the GradScaler (enabled for fp16 only).
pub struct StepState {
    pub device: Device,
    pub named: Vec<(String, Tensor)>,
    pub opt: AdamW,
    pub scaler: GradScaler,
}

impl StepState {
    pub fn new(vs: &VarStore, cfg: &LmTrainConfig) -> Result<StepState> {
        let (params, groups) = decay_groups(vs, cfg.weight_decay);
        let named: Vec<(String, Tensor)> = params.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect();
        let opt = AdamW::new(params, groups, cfg.lr, (cfg.beta1, cfg.beta2), 1e-8)?;
        let scaler = GradScaler::new(ScalerConfig::default(), cfg.precision.needs_scaler(), vs.device())?;
        Ok(StepState { device: vs.device(), named, opt, scaler })
    }
}

/// What one [`train_step`] did.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Mean loss of the global batch (over processes).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The loss scale the step ran with (1 without a scaler).
    pub scale: f64,
    /// Set when the update was skipped (the scaler backed off, or `OnNonFinite::Skip`).
    pub skipped: Option<SkippedStep>,
}

/// One optimizer step at learning rate `lr`, exactly as [`train`] runs it and the m04 benchmark
/// times it: `grad_accum` micro-batches from `data` (forward under the precision's autocast,
/// loss / grad_accum, scaled backward), `hooks.after_backward` (DDP's allreduce), unscaling,
/// global-norm clipping, the non-finite check (one host sync for the loss and the norm; the
/// per-parameter scan only when something is non-finite), then AdamW or a skipped update, and
/// the gradients zeroed. `graphed` replays captured micro-batches instead (`--cuda-graph`).
#[allow(clippy::too_many_arguments)]
pub fn train_step<M: LanguageModel + ?Sized, S: BatchSource + ?Sized>(
    model: &M,
    data: &S,
    st: &mut StepState,
    cfg: &LmTrainConfig,
    step: usize,
    lr: f64,
    rng: &mut Rng,
    hooks: &mut dyn Hooks,
    inject: Option<&Inject>,
    mut graphed: Option<&mut GraphedMicroBatch>,
) -> Result<StepReport> {
    let device = st.device;
    let shard = hooks.shard();
    let world = shard.1;
    st.opt.set_lr(lr);
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    for _ in 0..cfg.grad_accum {
        let (x, y) = shard_batch(data, cfg, rng, device, shard)?;
        if let Some(g) = graphed.as_deref_mut() {
            loss_sum += g.run(&x, &y)?;
            continue;
        }
        let loss = {
            let _ac = cfg.precision.autocast(device)?;
            model.loss(&x, &y, true, cfg.fused_loss) / cfg.grad_accum as f64
        };
        st.scaler.scale(&loss).backward();
        loss_sum += loss.detach().to_kind(Kind::Double);
    }
    hooks.after_backward(step, &st.named)?;
    if let Some(inj) = inject.filter(|i| i.step == step) {
        let _g = tch::no_grad_guard();
        let (_, t) = st
            .named
            .iter()
            .find(|(n, _)| *n == inj.param)
            .with_context(|| format!("inject: no trainable parameter named '{}'", inj.param))?;
        let mut g = t.grad();
        if g.defined() {
            let _ = g.fill_(inj.value);
        }
    }
    let found_inf = st.scaler.unscale(&st.named.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>())?;
    let norm = clip_grad_norm(&st.named, cfg.grad_clip);
    // The logged loss is the mean over processes (the loss of the whole global batch).
    let loss = loss_sum.double_value(&[]);
    let loss = if world > 1 { hooks.reduce_sum(&[loss])?[0] / world as f64 } else { loss };
    let scale = st.scaler.scale_value();
    let mut skipped = None;
    if found_inf && loss.is_finite() {
        // fp16 overflow: the scaler's business. Skip, back off, go on.
        st.scaler.update()?;
        skipped = Some(SkippedStep {
            step,
            reason: "scaler".into(),
            detail: format!("inf/NaN gradients at scale {scale}; scale now {}", st.scaler.scale_value()),
        });
    } else if !loss.is_finite() || !norm.is_finite() {
        let culprit = first_nonfinite(&st.named)
            .map(|(n, what)| format!("first non-finite gradient in '{n}' ({what})"))
            .unwrap_or_else(|| "all gradients finite: the loss itself overflowed".into());
        let detail = format!("step {step}: loss {loss}, grad norm {norm}; {culprit}");
        match cfg.on_nonfinite {
            OnNonFinite::Stop => {
                bail!("non-finite values at {detail} (lr {lr:.3e}); lower --lr, keep --grad-clip, or pass --on-nonfinite skip");
            }
            OnNonFinite::Skip => {
                if st.scaler.enabled() {
                    st.scaler.update()?;
                }
                skipped = Some(SkippedStep { step, reason: "nonfinite".into(), detail });
            }
        }
    } else {
        st.opt.step()?;
        st.scaler.update()?;
    }
    if !cfg.cuda_graph {
        // (With --cuda-graph the next step zeroes the gradients in place instead.)
        st.opt.zero_grad();
    }
    Ok(StepReport { loss, grad_norm: norm, scale, skipped })
}

/// Trains `model` (variables in `vs`) on `data` with `cfg`.
pub fn train<M: LanguageModel + ?Sized, S: BatchSource + ?Sized>(
    vs: &VarStore,
    model: &M,
    data: &S,
    cfg: &LmTrainConfig,
    opts: &TrainOptions,
    hooks: &mut dyn Hooks,
) -> Result<LmOutcome> {
    cfg.check()?;
    let device = vs.device();
    if cfg.cuda_graph {
        if !device.is_cuda() {
            bail!("CUDA graphs need a CUDA device (--device cuda)");
        }
        if !crate::CUDA_KERNELS {
            bail!("CUDA graphs need a build with --features cuda");
        }
        if cfg.fused_loss {
            bail!("--cuda-graph cannot capture --fused-loss: its CUDA forward copies a target check back to the host, a sync that capture forbids");
        }
    }
    let main = hooks.is_main();
    let mut st = StepState::new(vs, cfg)?;
    if let Some(inj) = &opts.inject {
        if !st.named.iter().any(|(n, _)| *n == inj.param) {
            bail!("inject: no trainable parameter named '{}'", inj.param);
        }
    }
    let schedule = cfg.schedule();
    let mut p = Progress { rng: Rng::new(cfg.seed).state(), ..Default::default() };
    if opts.resume {
        if let Some(saved) = checkpoint::load_last(&opts.dir, vs)? {
            let last = opts.dir.join("last");
            if saved.state["model"] != opts.model_config {
                bail!("{}: the checkpoint holds another model config; start afresh without --resume or use the same flags", last.display());
            }
            let saved_cfg: LmTrainConfig = serde_json::from_value(saved.state["train"].clone())
                .with_context(|| format!("{}/state.json: bad 'train'", last.display()))?;
            if saved_cfg.precision != cfg.precision || saved_cfg.tokens_per_step() != cfg.tokens_per_step() {
                bail!(
                    "{}: saved with precision {} and {} tokens per step, asked for {} and {}",
                    last.display(),
                    saved_cfg.precision.name(),
                    saved_cfg.tokens_per_step(),
                    cfg.precision.name(),
                    cfg.tokens_per_step()
                );
            }
            st.opt.load_state(&saved.optimizer).context("restoring the optimizer")?;
            runtime::set_generator_state(Device::Cpu, &saved.torch_rng).context("restoring torch's generator")?;
            p = serde_json::from_value(saved.state["progress"].clone())
                .with_context(|| format!("{}/state.json: bad 'progress'", last.display()))?;
            if !p.scaler.is_null() {
                st.scaler.load_state(&p.scaler)?;
            }
            if main {
                println!("resumed from {} at step {}", last.display(), p.step);
            }
        }
    }
    let mut rng = Rng::from_state(p.rng);
    let mut tb = if main { Some(SummaryWriter::new(&opts.dir.join("tb"))?) } else { None };
    let eval_seed = cfg.seed ^ 0x5eed_e7a1;
    let shard = hooks.shard();
    let world = shard.1;
    // Each process evaluates its share of the fixed eval batches; the sums are reduced.
    let evaluate = |step: usize, secs: f64, hooks: &mut dyn Hooks| -> Result<EvalLog> {
        let local = [
            estimate_loss_sum(model, data, Split::Train, cfg, eval_seed, device, shard)?,
            estimate_loss_sum(model, data, Split::Val, cfg, eval_seed + 1, device, shard)?,
        ];
        let total = hooks.reduce_sum(&local)?;
        let n = cfg.eval_iters as f64;
        Ok(EvalLog { step, train_loss: total[0] / n, val_loss: total[1] / n, seconds: secs })
    };
    if let Device::Cuda(i) = device {
        runtime::cuda_reset_peak(i)?;
    }
    let mem_base = memory_now(device);
    let end = opts.stop_after.map_or(cfg.steps, |s| s.min(cfg.steps));
    let bar = if main {
        crate::run::progress::bar((end - p.step.min(end)) as u64, opts.name)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let run_start_secs = p.train_seconds;
    let run_start_tokens = p.tokens;
    let mut stopped_by_time = false;
    let mut last_loss = f64::NAN;
    // --cuda-graph: the first step of this process runs eagerly (it allocates every .grad), the
    // next one captures, all later micro-batches replay.
    let first_step = p.step;
    let mut graphed: Option<GraphedMicroBatch> = None;
    while p.step < end {
        let step = p.step;
        if let Some(limit) = cfg.max_time {
            if p.train_seconds - run_start_secs >= limit {
                stopped_by_time = true;
                break;
            }
        }
        if cfg.eval_interval > 0 && step % cfg.eval_interval == 0 && step > 0 {
            let e = evaluate(step, p.train_seconds, hooks)?;
            if let Some(tb) = tb.as_mut() {
                tb.add_scalar("eval/train_loss", e.train_loss, step as i64)?;
                tb.add_scalar("eval/val_loss", e.val_loss, step as i64)?;
            }
            if main {
                say(
                    &bar,
                    format!("{} step {step}: train loss {:.4}, val loss {:.4}", opts.name, e.train_loss, e.val_loss),
                );
            }
            p.evals.push(e);
        }
        hooks.around_step(step, true)?;
        let t0 = Instant::now();
        let lr = schedule.lr(cfg.lr, step);
        if cfg.cuda_graph {
            zero_grads_in_place(&st.named);
            if graphed.is_none() && step > first_step {
                graphed = Some(GraphedMicroBatch::capture(model, cfg, st.scaler.scale_tensor(), device)?);
                // The warm-up and capture runs added gradients of their own.
                zero_grads_in_place(&st.named);
            }
        }
        let r =
            train_step(model, data, &mut st, cfg, step, lr, &mut rng, hooks, opts.inject.as_ref(), graphed.as_mut())
                .inspect_err(|_| bar.finish_and_clear())?;
        let (loss, norm, scale_used) = (r.loss, r.grad_norm, r.scale);
        if let Some(sk) = r.skipped {
            if sk.reason == "nonfinite" {
                say(&bar, format!("skipping the update of {}", sk.detail));
            }
            p.skipped.push(sk);
        }
        last_loss = loss;
        let dt = t0.elapsed().as_secs_f64();
        hooks.around_step(step, false)?;
        p.train_seconds += dt;
        p.tokens += cfg.tokens_per_step() * world as i64;
        p.peak_memory_bytes = p.peak_memory_bytes.max(memory_now(device).saturating_sub(mem_base));
        p.step += 1;
        if step % cfg.log_interval == 0 || p.step == end {
            let log = StepLog {
                step,
                loss,
                lr,
                grad_norm: norm,
                scale: scale_used,
                tokens_per_s: (cfg.tokens_per_step() * world as i64) as f64 / dt.max(1e-9),
            };
            if let Some(tb) = tb.as_mut() {
                tb.add_scalar("train/loss", loss, step as i64)?;
                tb.add_scalar("train/lr", lr, step as i64)?;
                tb.add_scalar("train/grad_norm", norm, step as i64)?;
                tb.add_scalar("train/tokens_per_s", log.tokens_per_s, step as i64)?;
                if st.scaler.enabled() {
                    tb.add_scalar("train/loss_scale", scale_used, step as i64)?;
                }
            }
            p.logs.push(log);
        }
        bar.inc(1);
        bar.set_message(format!("loss {loss:.4}"));
        if cfg.checkpoint_interval > 0 && p.step % cfg.checkpoint_interval == 0 && p.step < end {
            p.rng = rng.state();
            p.scaler = st.scaler.state();
            // Rank 0 writes; the barriers keep the others from racing ahead or reading it early.
            hooks.barrier()?;
            if main {
                save(vs, &st.opt, &p, cfg, opts)?;
            }
            hooks.barrier()?;
        }
    }
    bar.finish_and_clear();
    p.rng = rng.state();
    p.scaler = st.scaler.state();
    let interrupted = opts.stop_after.is_some_and(|s| p.step >= s && p.step < cfg.steps);
    let (final_train_loss, final_val_loss) = if interrupted {
        (last_loss, f64::NAN)
    } else {
        let e = evaluate(p.step, p.train_seconds, hooks)?;
        if let Some(tb) = tb.as_mut() {
            tb.add_scalar("eval/train_loss", e.train_loss, p.step as i64)?;
            tb.add_scalar("eval/val_loss", e.val_loss, p.step as i64)?;
        }
        let r = (e.train_loss, e.val_loss);
        if p.evals.last().map(|l| l.step) != Some(p.step) {
            p.evals.push(e);
        }
        r
    };
    hooks.barrier()?;
    if main {
        save(vs, &st.opt, &p, cfg, opts)?;
    }
    hooks.barrier()?;
    let secs = p.train_seconds - run_start_secs;
    Ok(LmOutcome {
        tokens_per_s: (p.tokens - run_start_tokens) as f64 / secs.max(1e-9),
        stopped_by_time,
        final_val_loss,
        final_train_loss,
        memory_measure: if device.is_cuda() { "cuda allocator peak" } else { "cpu rss growth" },
        progress: p,
    })
}

fn save(vs: &VarStore, opt: &AdamW, p: &Progress, cfg: &LmTrainConfig, opts: &TrainOptions) -> Result<()> {
    let state = TrainingState {
        optimizer: opt.state(),
        torch_rng: runtime::generator_state(Device::Cpu)?,
        state: serde_json::json!({"progress": p, "model": opts.model_config, "train": cfg}),
    };
    checkpoint::save_last(&opts.dir, vs, &state)
}

/// Prints above the progress bar, or plainly when the bar is hidden (`--quiet`, no terminal).
fn say(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}
