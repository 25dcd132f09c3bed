//! m05_ddp: data-parallel training over PyTorch's own c10d — Gloo on CPU, NCCL on GPUs — with a
//! torchrun-compatible launcher, bucketed gradient allreduce, a DistributedSampler and
//! synchronised batch norm, proven equal to single-process training. The lesson is
//! notes/m05_ddp.md.

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use course::data::lm as lmdata;
use course::data::loader::DataLoader;
use course::data::vision::{collate_images, mnist_splits, ImageBatch, ImageSubset};
use course::dist;
use course::dist::c10d::{ProcessGroup, ReduceOp};
use course::dist::ddp::{self, Ddp, DdpConfig, DistributedSampler};
use course::dist::launch::{self, DistEnv, LaunchArgs, LaunchSpec};
use course::models::gpt::{Gpt, Preset};
use course::models::{CnnConfig, LeNet, ModelConfig};
use course::run::charts::{self, LineChart, Series};
use course::run::{relaunch, CommonArgs, Op, Run, Setup};
use course::train::classify::{self, OptKind, TrainConfig};
use course::train::hooks::{Hooks, ProfileWindow};
use course::train::lm::{self as lmtrain, LmTrainConfig, TrainOptions};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::nn::VarStore;
use tch::Tensor;

/// Module 5: distributed data parallel. Every process holds the whole model, trains on its own
/// shard of each batch and averages gradients with an allreduce, so N processes of batch b
/// follow one process of batch N·b step for step.
///
/// Without a launcher this runs the lesson: it launches itself (1) as 2 processes to measure
/// allreduce bandwidth from 1 KB to 64 MB, (2) as 1 process with batch 2b and as 2 processes
/// with batch b for the same steps, and checks that both end with the same parameters
/// (max |Δ| ≤ 1e-5), and (3) as 2 processes training the m02 CNN on MNIST to 99% test accuracy.
///
/// With --nproc-per-node N it is its own torchrun: it starts N copies of this command with
/// RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, prefixes their output with
/// the rank, and stops them all if one fails. Started by torchrun itself
/// (`torchrun --nproc-per-node 2 --no-python m05_ddp`) it trains as one of the ranks.
///
/// Writes outputs/m05_ddp/: metrics.json, samples_per_s.png, loss_n1_vs_n2.png,
/// allreduce_bandwidth.png, and one folder per launched job (equiv_n1/, equiv_n2/, ddp_train/
/// with its own metrics.json, loss.png and checkpoints). A training job started with
/// --nproc-per-node or torchrun writes outputs/m05_ddp/<--job>/ (default train/).
#[derive(Parser, Debug, Serialize, Clone)]
#[command(version, about, long_about, after_long_help = LESSON)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    launch: LaunchArgs,
    /// What to train: cnn (m02's LeNet on MNIST) or gpt (m04's GPT on Shakespeare)
    #[arg(long, value_enum, default_value_t = ModelKind::Cnn)]
    model: ModelKind,
    /// c10d backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl
    #[arg(long, default_value = "auto", value_parser = ["auto", "gloo", "nccl"])]
    backend: String,
    /// Gradient bucket size in MiB: gradients travel in flat buffers of about this size
    #[arg(long, default_value_t = 25.0)]
    bucket_cap_mb: f64,
    /// Seconds any collective (and the rendezvous) may take before this rank gives up with an
    /// error instead of hanging
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout_s: u64,
    /// Batch size per rank (default: cnn 64, gpt 16; the global batch is N times this)
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    batch_size: Option<usize>,
    /// CNN epochs (default 4; 1 with --quick)
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    epochs: Option<usize>,
    /// Optimizer steps: for the GPT its training length (default 600; 30 with --quick), for
    /// the CNN a cap on steps per epoch
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    steps: Option<usize>,
    /// CNN optimizer. The lesson's equivalence runs use sgd: AdamW divides by sqrt(v), which
    /// turns the last-bit rounding differences of gradients that are almost exactly zero into
    /// steps of a sizeable fraction of the learning rate (see notes/m05_ddp.md)
    #[arg(long, value_enum, default_value_t = OptKind::Adamw)]
    optimizer: OptKind,
    /// Peak learning rate (default: 1e-3 for AdamW, 0.05 for SGD)
    #[arg(long)]
    lr: Option<f64>,
    /// CNN dropout before the last layer (default 0.3). Dropout draws its masks per process, so
    /// the lesson's equivalence runs use 0
    #[arg(long)]
    dropout: Option<f64>,
    /// Plain per-rank batch norm instead of SyncBatchNorm (then N ranks of batch b no longer
    /// match one process of batch N·b)
    #[arg(long)]
    no_sync_bn: bool,
    /// GPT micro-batches per step; only the last one's backward is followed by the allreduce
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    grad_accum: usize,
    /// Lesson: steps of the 1-process vs 2-process comparison (default 20; 6 with --quick).
    /// Rounding differences of ~1e-7 grow as training amplifies them: at lr 0.02 they stay
    /// below 1e-5 for about 20 steps
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    equiv_steps: Option<usize>,
    /// Folder name of a training job under outputs/m05_ddp/
    #[arg(long, default_value = "train")]
    job: String,
    /// Simulate a crash: this rank exits abruptly at --crash-at-step (for fault-tolerance tests)
    #[arg(long, requires = "crash_at_step")]
    crash_rank: Option<usize>,
    /// The step at which --crash-rank exits
    #[arg(long, requires = "crash_rank")]
    crash_at_step: Option<usize>,
    /// Profile N training steps (from step 1) on rank 0 with torch's profiler, beside DDP:
    /// writes <job>/trace.json (open it in chrome://tracing or Perfetto)
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    profile: Option<usize>,
    /// Internal: what this process does (lesson, train or bandwidth); set by the lesson
    #[arg(long, value_enum, hide = true)]
    role: Option<Role>,
    /// Internal: rank 0 saves the final parameters here (safetensors)
    #[arg(long, hide = true)]
    save_params: Option<PathBuf>,
    /// Internal: largest allreduce message of the bandwidth role, in bytes
    #[arg(long, hide = true, default_value_t = 64 << 20)]
    max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
enum ModelKind {
    Cnn,
    Gpt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
enum Role {
    Lesson,
    Train,
    Bandwidth,
}

const LESSON: &str = "\
The lesson (notes/m05_ddp.md):
  1. Data parallelism: N replicas, N shards of each batch, one averaged gradient. Averaging is
     exact, so N processes of batch b compute the same update as one of batch N*b; this module
     proves it to 1e-5 on the parameters.
  2. c10d is PyTorch's own engine: a TCPStore for the rendezvous, ProcessGroupGloo on CPU,
     ProcessGroupNCCL on GPUs. Ring allreduce moves 2(N-1)/N of the data per rank.
  3. Buckets: gradients travel in ~25 MiB flat buffers, several in flight at once.
  4. DistributedSampler: equal shards (padded or dropped) so every rank runs the same steps;
     SyncBatchNorm: statistics over all ranks' samples.
  5. Launching: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
     this binary is its own launcher, and runs under the real torchrun.
  6. Failure: a dead rank turns every collective into an error within --timeout-s, never a hang.

Try: m05_ddp --nproc-per-node 2 --epochs 1          m05_ddp --model gpt --quick
     .venv/bin/torchrun --nproc-per-node 2 --no-python target/release/m05_ddp --epochs 1
     m05_ddp --nnodes 2 --node-rank 0 --master-port 29500 --nproc-per-node 1 &
     m05_ddp --nnodes 2 --node-rank 1 --master-port 29500 --nproc-per-node 1";

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.lr.is_none_or(|l| l.is_finite() && l > 0.0), "--lr must be a finite number > 0");
    ensure!(args.dropout.is_none_or(|d| (0.0..1.0).contains(&d)), "--dropout must be in [0, 1)");
    ensure!(args.bucket_cap_mb.is_finite() && args.bucket_cap_mb > 0.0, "--bucket-cap-mb must be > 0");
    args.launch.check()?;
    ensure!(
        !args.job.is_empty() && args.job.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "--job must be a folder name of letters, digits, _ and -, got {:?}",
        args.job
    );
    if let Some(n) = args.launch.nproc_per_node {
        if DistEnv::from_env()?.is_some() {
            bail!("--nproc-per-node was given to a process that a launcher already started (RANK is set); drop one of the two launchers");
        }
        return launcher(&args, n);
    }
    let env = DistEnv::from_env()?;
    match args.role.unwrap_or(if env.is_some() { Role::Train } else { Role::Lesson }) {
        Role::Lesson => lesson(&args),
        Role::Train => train_job(&args, env),
        Role::Bandwidth => bandwidth_job(&args, env),
    }
}

fn launcher(args: &Args, n: usize) -> Result<()> {
    let exe = std::env::current_exe().context("finding this program's path")?;
    let t0 = Instant::now();
    launch::launch(&args.launch.spec(n, args.common.threads), &exe, &relaunch::args_without(LaunchArgs::FLAGS))?;
    println!("all {} rank(s) of this node finished in {:.1} s", n, t0.elapsed().as_secs_f64());
    Ok(())
}

/// Launches `n` ranks of this program as one of the lesson's jobs, with every common flag
/// (threads, determinism, allocator, ...) and `extra`, and reads the result rank 0 reports.
fn launch_job<T: serde::de::DeserializeOwned>(args: &Args, n: usize, extra: &[String], what: &str) -> Result<T> {
    let mut a = args.common.to_args();
    for (k, v) in [
        ("--timeout-s", args.timeout_s.to_string()),
        ("--bucket-cap-mb", args.bucket_cap_mb.to_string()),
        ("--backend", args.backend.clone()),
    ] {
        a.extend([OsString::from(k), v.into()]);
    }
    a.extend(extra.iter().map(OsString::from));
    relaunch::Child::new(a).run_with(what, |exe, argv| launch::launch(&LaunchSpec::local(n), exe, argv).map(|_| ()))
}

/// What a training job reports to the lesson (rank 0 writes it).
#[derive(Debug, Serialize, Deserialize)]
struct JobResult {
    world: usize,
    batch_per_rank: usize,
    steps: usize,
    samples_per_s: f64,
    loss_trace: Vec<(usize, f64)>,
    test_accuracy: Option<f64>,
    final_val_loss: Option<f64>,
    allreduce_seconds: f64,
    allreduce_bytes: u64,
    train_seconds: f64,
}

/// A simulated crash (`--crash-rank R --crash-at-step S`): rank R exits abruptly with status 17
/// after the backward of step S, as a killed process would.
struct CrashAt {
    rank: usize,
    step: usize,
    this_rank: usize,
}

impl Hooks for CrashAt {
    fn after_backward(&mut self, step: usize, _params: &[(String, Tensor)]) -> Result<()> {
        if self.this_rank == self.rank && step == self.step {
            eprintln!("rank {}: simulating a crash at step {step} (--crash-rank/--crash-at-step)", self.rank);
            std::process::exit(17);
        }
        Ok(())
    }
}

/// The hooks of a training job: the crash simulation (if asked), DDP, and on rank 0 the profiler
/// window (`--profile N`), composed.
fn job_hooks<'a>(args: &Args, ddp: &'a mut Ddp, dir: &Path) -> impl Hooks + 'a {
    let rank = ddp.group().rank();
    let crash = args.crash_rank.zip(args.crash_at_step).map(|(r, s)| CrashAt { rank: r, step: s, this_rank: rank });
    let profile = args.profile.filter(|_| rank == 0).map(|n| {
        ProfileWindow::new(
            1,
            n,
            dir.join("trace.json"),
            matches!(ddp.group().backend(), course::dist::c10d::Backend::Nccl),
        )
    });
    (crash, (ddp, profile))
}

/// Every rank applies the same set-up (threads, determinism, allocator, seed), says so, and joins
/// the process group.
fn setup_rank(args: &Args, env: &Option<DistEnv>) -> Result<(Setup, Arc<ProcessGroup>, tch::Device)> {
    let mut setup = Setup::apply(&args.common)?;
    let timeout = Duration::from_secs(args.timeout_s);
    let (pg, device) = dist::join(env.as_ref(), setup.device, &args.backend, timeout)?;
    setup.device = device;
    println!("rank {} of {}: {}", pg.rank(), pg.size(), setup.summary());
    Ok((setup, pg, device))
}

fn train_job(args: &Args, env: Option<DistEnv>) -> Result<()> {
    let (setup, pg, device) = setup_rank(args, &env)?;
    let main = pg.is_main();
    // Only rank 0 owns the output folder and draws progress bars.
    course::run::progress::set_quiet(args.common.quiet || !main);
    let mut run =
        if main { Some(Run::start_with(setup, &format!("m05_ddp/{}", args.job), &args.common, args)?) } else { None };
    let dir = args.common.outputs.join("m05_ddp").join(&args.job);
    if main {
        println!(
            "== m05_ddp: {:?} on {} rank(s) ({} backend, {device:?}), batch {} per rank ==",
            args.model,
            pg.size(),
            pg.backend(),
            batch_size(args)
        );
    }
    let ddp_cfg = DdpConfig { bucket_cap_mb: args.bucket_cap_mb };
    let (result, vs) = match args.model {
        ModelKind::Cnn => train_cnn(args, &pg, device, &dir, ddp_cfg, run.as_mut())?,
        ModelKind::Gpt => train_gpt(args, &pg, device, &dir, ddp_cfg, run.as_mut())?,
    };
    pg.barrier()?;
    if let Some(mut run) = run {
        if let Some(p) = &args.save_params {
            course::sys::fsutil::write_via_temp(p, |tmp| {
                // Parameters only (what the optimizer updates); buffers such as batch-norm running
                // statistics are derived from them.
                let params: Vec<(String, Tensor)> =
                    course::dist::ddp::sorted_variables(&vs).into_iter().filter(|(_, t)| t.requires_grad()).collect();
                Tensor::write_safetensors(&params, tmp)
                    .with_context(|| format!("saving the parameters to {}", p.display()))
            })?;
        }
        if let Some(p) = &args.common.result {
            relaunch::report(p, &result)?;
        }
        run.metric("world_size", pg.size() as f64);
        run.metric("samples_per_s", result.samples_per_s);
        run.metric("allreduce_seconds", result.allreduce_seconds);
        run.metric("train_seconds", result.train_seconds);
        let m = run.finish()?;
        ensure!(
            m.quick || m.targets.is_empty() || m.all_targets_met(),
            "not every target was met (see the table above)"
        );
    }
    Ok(())
}

fn batch_size(args: &Args) -> usize {
    args.batch_size.unwrap_or(match args.model {
        ModelKind::Cnn => 64,
        ModelKind::Gpt => 16,
    })
}

fn mnist_loader(
    set: ImageSubset,
    batch: usize,
    sampler: DistributedSampler,
    seed: u64,
    drop_last: bool,
) -> Result<DataLoader<ImageSubset, ImageBatch>> {
    let (r, c) = set.set.image_size();
    Ok(DataLoader::new(Arc::new(set), batch, collate_images(r, c))?.sampler(sampler).seed(seed).drop_last(drop_last))
}

fn train_cnn(
    args: &Args,
    pg: &Arc<ProcessGroup>,
    device: tch::Device,
    dir: &Path,
    ddp_cfg: DdpConfig,
    run: Option<&mut Run>,
) -> Result<(JobResult, VarStore)> {
    let quick = args.common.quick;
    let seed = args.common.seed;
    let (rank, world) = (pg.rank(), pg.size());
    let splits = mnist_splits(quick, seed)?;
    let b = batch_size(args);
    // Equal shards and whole batches on every rank: a partial batch would weight its examples
    // differently from one process's global batch.
    let train_l = mnist_loader(
        splits.train_subset(true),
        b,
        DistributedSampler::new(rank, world, Some(seed), true)?,
        seed,
        true,
    )?;
    let val_l = mnist_loader(splits.val_subset(), 1000, DistributedSampler::for_eval(rank, world)?, seed, false)?;
    let test_l = mnist_loader(splits.test_subset(), 1000, DistributedSampler::for_eval(rank, world)?, seed, false)?;
    // m02's CNN, without the convolution biases that batch norm cancels (see CnnConfig).
    let lenet = CnnConfig::lenet();
    let cfg_m = CnnConfig { dropout: args.dropout.unwrap_or(lenet.dropout), conv_bias: false, ..lenet };
    let vs = VarStore::new(device);
    course::sys::rng::seed_everything(seed);
    let group = (world > 1 && !args.no_sync_bn).then(|| pg.clone());
    let model = LeNet::with_norm(&vs.root(), &cfg_m, &ddp::batch_norm_over(group));
    let mut ddp = Ddp::new(pg.clone(), &vs, ddp_cfg)?;
    if rank == 0 {
        println!(
            "train {} / val {} / test {} MNIST images; {} per rank and step, {} buckets, SyncBatchNorm {}",
            splits.train.len(),
            splits.val.len(),
            splits.test.len(),
            b,
            ddp.bucket_names().len(),
            if world > 1 && !args.no_sync_bn { "on" } else { "off" }
        );
    }
    // m02's CNN recipe; the lesson's equivalence runs change the optimizer and cap the steps.
    let recipe = TrainConfig::mnist_cnn();
    let cfg = TrainConfig {
        epochs: args.epochs.unwrap_or(if quick { 1 } else { recipe.epochs }),
        lr: args.lr.unwrap_or(TrainConfig::default_lr(args.optimizer)),
        optimizer: args.optimizer,
        max_batches: args.steps.or(quick.then_some(30)),
        ..recipe
    };
    let info = classify::ModelInfo {
        name: "cnn",
        config: serde_json::to_value(ModelConfig::Cnn(cfg_m.clone()))?,
        extra_files: None,
    };
    let mut hooks = job_hooks(args, &mut ddp, dir);
    let t0 = Instant::now();
    let out = classify::fit_with(dir, &info, &vs, &model, &train_l, &val_l, &cfg, false, None, &mut hooks)?;
    drop(hooks);
    let train_seconds = t0.elapsed().as_secs_f64();
    let sums = classify::evaluate_sums(&model, &test_l, device, None)?;
    let [_, correct, n] = pg.allreduce_f64(&sums, ReduceOp::Sum)?[..] else {
        bail!("allreduce returned the wrong count")
    };
    let test_acc = correct / n;
    if let Some(run) = run {
        println!("cnn: test accuracy {:.2}% on {n} images ({} rank(s))", test_acc * 100.0, world);
        let mut loss = LineChart::new(&format!("CNN training loss, {world} rank(s)"), "step", "cross-entropy");
        loss = loss
            .series(Series::line("train (global batch)", out.loss_trace.iter().map(|&(s, l)| (s as f64, l)).collect()));
        let p = run.path("loss.png");
        loss.save(&p)?;
        run.artifact(&p);
        // m02's target, for a full-length run.
        if !quick && args.steps.is_none() && args.epochs.is_none_or(|e| e >= 4) {
            run.target("test_accuracy", test_acc, Op::Ge, 0.99);
        } else {
            run.metric("test_accuracy", test_acc);
        }
    }
    let result = JobResult {
        world,
        batch_per_rank: b,
        steps: out.loss_trace.len(),
        samples_per_s: out.history.last().map_or(0.0, |r| r.samples_per_s),
        loss_trace: out.loss_trace,
        test_accuracy: Some(test_acc),
        final_val_loss: out.history.last().map(|r| r.val_loss),
        allreduce_seconds: ddp.stats.seconds,
        allreduce_bytes: ddp.stats.bytes,
        train_seconds,
    };
    Ok((result, vs))
}

fn train_gpt(
    args: &Args,
    pg: &Arc<ProcessGroup>,
    device: tch::Device,
    dir: &Path,
    ddp_cfg: DdpConfig,
    run: Option<&mut Run>,
) -> Result<(JobResult, VarStore)> {
    let quick = args.common.quick;
    // Rank 0 writes the token files once; the others wait, then only read them.
    let prepare = || -> Result<lmdata::TokenData> {
        let text = lmdata::shakespeare_text()?;
        lmdata::prepare(
            &course::data::registry::data_root().join("lm"),
            "shakespeare",
            &text,
            lmdata::TokenizerChoice::Char,
            2048,
        )
    };
    let data = if pg.is_main() {
        let d = prepare()?;
        pg.barrier()?;
        d
    } else {
        pg.barrier()?;
        prepare()?
    };
    let preset = if quick { Preset::Tiny } else { Preset::Cpu };
    let gcfg = preset.config(data.tokenizer.vocab_size());
    // m04's recipe, shorter (600 steps) and logged every step for the loss chart.
    let steps = args.steps.unwrap_or(if quick { 30 } else { 600 });
    let recipe = LmTrainConfig::shakespeare_char();
    let tc = LmTrainConfig {
        steps,
        batch_size: batch_size(args) as i64,
        grad_accum: args.grad_accum,
        block_size: gcfg.block_size,
        lr: args.lr.unwrap_or(recipe.lr),
        warmup: recipe.warmup.min(steps / 2),
        eval_interval: if quick { 0 } else { 200 },
        eval_iters: if quick { 4 } else { recipe.eval_iters },
        log_interval: 1,
        checkpoint_interval: 0,
        seed: args.common.seed,
        ..recipe
    };
    let vs = VarStore::new(device);
    course::sys::rng::seed_everything(args.common.seed);
    let mut model = Gpt::new(&vs.root(), &gcfg)?;
    model.kernels = course::models::gpt::Kernels::lesson_default(); // as m04 trains it
    let mut ddp = Ddp::new(pg.clone(), &vs, ddp_cfg)?;
    let opts = TrainOptions {
        dir: dir.join("run"),
        resume: false,
        model_config: course::io::hf::tagged_config(course::models::gpt::GptConfig::MODEL_TYPE, &gcfg)?,
        name: "gpt",
        inject: None,
        stop_after: None,
    };
    let mut hooks = job_hooks(args, &mut ddp, dir);
    let out =
        lmtrain::train(&vs, &model, &lmdata::LmData { train: &data.train, val: &data.val }, &tc, &opts, &mut hooks)?;
    drop(hooks);
    let p = &out.progress;
    let loss_trace: Vec<(usize, f64)> = p.logs.iter().map(|l| (l.step, l.loss)).collect();
    let global_batch = tc.batch_size as usize * pg.size() * tc.grad_accum;
    // Sequences (blocks of block_size tokens) per second.
    let samples_per_s = out.tokens_per_s / tc.block_size as f64;
    if let Some(run) = run {
        println!("gpt: val loss {:.4} after {} steps of {} sequences", out.final_val_loss, p.step, global_batch);
        let mut loss = LineChart::new(&format!("GPT training loss, {} rank(s)", pg.size()), "step", "cross-entropy");
        loss =
            loss.series(Series::line("train (global batch)", loss_trace.iter().map(|&(s, l)| (s as f64, l)).collect()));
        let path = run.path("loss.png");
        loss.save(&path)?;
        run.artifact(&path);
        run.metric("final_val_loss", out.final_val_loss);
        run.metric("tokens_per_s", out.tokens_per_s);
    }
    let result = JobResult {
        world: pg.size(),
        batch_per_rank: tc.batch_size as usize,
        steps: p.step,
        samples_per_s,
        loss_trace,
        test_accuracy: None,
        final_val_loss: Some(out.final_val_loss),
        allreduce_seconds: ddp.stats.seconds,
        allreduce_bytes: ddp.stats.bytes,
        train_seconds: p.train_seconds,
    };
    Ok((result, vs))
}

/// Allreduce bandwidth for message sizes 1 KB ..= max_bytes (x4 apart).
#[derive(Debug, Serialize, Deserialize)]
struct BandwidthResult {
    world: usize,
    backend: String,
    /// (bytes, seconds per allreduce, bus bandwidth GB/s)
    points: Vec<(usize, f64, f64)>,
}

fn bandwidth_job(args: &Args, env: Option<DistEnv>) -> Result<()> {
    let (_setup, pg, device) = setup_rank(args, &env)?;
    let mut points = vec![];
    let mut bytes = 1024usize;
    while bytes <= args.max_bytes {
        // About 0.2 s per size (at least 3 ops), the same count on every rank.
        let (probe, _) = pg.allreduce_bandwidth(bytes, 1, 2, device)?;
        let iters =
            pg.allreduce_f64(&[(0.2 / probe.max(1e-6)).clamp(3.0, 200.0)], ReduceOp::Sum)?[0] as usize / pg.size();
        let (per, bus) = pg.allreduce_bandwidth(bytes, 0, iters, device)?;
        if pg.is_main() {
            println!("allreduce {:>10} B: {:>9.1} us, bus bandwidth {:.2} GB/s", bytes, per * 1e6, bus);
        }
        points.push((bytes, per, bus));
        bytes *= 4;
    }
    if let (true, Some(p)) = (pg.is_main(), &args.common.result) {
        relaunch::report(p, &BandwidthResult { world: pg.size(), backend: pg.backend().to_string(), points })?;
    }
    pg.barrier()
}

fn lesson(args: &Args) -> Result<()> {
    let mut run = Run::start("m05_ddp", &args.common, args)?;
    let quick = run.quick;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("== m05_ddp: data-parallel training over c10d ({cores} CPU core(s)) ==");
    let jobs = run.path("jobs");
    std::fs::create_dir_all(&jobs).with_context(|| format!("creating {}", jobs.display()))?;
    let model = match args.model {
        ModelKind::Cnn => "cnn",
        ModelKind::Gpt => "gpt",
    };

    // 1. Allreduce bandwidth against message size, 2 ranks.
    println!("\n-- 1. allreduce bandwidth, 2 ranks --");
    let max_bytes = if quick { 1 << 20 } else { args.max_bytes };
    let bw: BandwidthResult = launch_job(
        args,
        2,
        &["--role", "bandwidth", "--max-bytes", &max_bytes.to_string()].map(String::from),
        "the bandwidth job",
    )?;
    relaunch::report(&jobs.join("bandwidth.json"), &bw)?;
    let mut chart = LineChart::new(
        &format!("Allreduce bus bandwidth, {} ranks ({})", bw.world, bw.backend),
        "message size (log2 bytes)",
        "GB/s",
    );
    chart = chart
        .series(Series::line("allreduce (sum, f32)", bw.points.iter().map(|p| ((p.0 as f64).log2(), p.2)).collect()));
    let p = run.path("allreduce_bandwidth.png");
    chart.save(&p)?;
    run.artifact(&p);
    if let Some(last) = bw.points.last() {
        run.metric("allreduce_bus_gb_per_s_largest", last.2);
        run.metric("allreduce_largest_bytes", last.0 as f64);
    }
    if let Some(first) = bw.points.first() {
        run.metric("allreduce_latency_us_1kb", first.1 * 1e6);
    }

    // 2. N = 1 with batch 2b against N = 2 with batch b: the same steps, the same parameters.
    let k = args.equiv_steps.unwrap_or(if quick { 6 } else { 20 });
    let b = batch_size(args);
    println!("\n-- 2. equivalence and throughput: 1 rank x batch {} vs 2 ranks x batch {b}, {k} steps --", 2 * b);
    let mut results = vec![];
    for n in [1usize, 2] {
        let job = format!("equiv_n{n}");
        let params = jobs.join(format!("{job}.safetensors"));
        let mut extra: Vec<String> = [
            "--role",
            "train",
            "--model",
            model,
            "--job",
            &job,
            "--steps",
            &k.to_string(),
            "--batch-size",
            &(2 * b / n).to_string(),
            "--save-params",
            &params.display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        if args.model == ModelKind::Cnn {
            extra.extend(["--epochs", "1", "--dropout", "0", "--optimizer", "sgd", "--lr", "0.02"].map(String::from));
        }
        let r: JobResult = launch_job(args, n, &extra, &format!("the {job} job"))?;
        relaunch::report(&jobs.join(format!("{job}.json")), &r)?;
        results.push((n, r, params));
    }
    let load = |p: &Path| -> Result<Vec<(String, Tensor)>> {
        let mut v = Tensor::read_safetensors(p).with_context(|| format!("reading {}", p.display()))?;
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    };
    let (a, bb) = (load(&results[0].2)?, load(&results[1].2)?);
    ensure!(a.len() == bb.len(), "the two runs saved different parameter sets");
    let mut max_diff = 0f64;
    for ((na, ta), (nb, tb)) in a.iter().zip(&bb) {
        ensure!(na == nb, "parameter names differ: {na} vs {nb}");
        max_diff = max_diff.max((ta - tb).abs().max().double_value(&[]));
    }
    println!("max |Δ| between the parameters of N=1 and N=2 after {k} steps: {max_diff:.3e}");
    run.target("max_param_diff_n2_vs_n1", max_diff, Op::Le, 1e-5);
    run.metric("equivalence_steps", k as f64);
    let mut loss = LineChart::new(&format!("Training loss: 1 rank x {} vs 2 ranks x {b}", 2 * b), "step", "loss");
    for (n, r, _) in &results {
        let pts: Vec<(f64, f64)> = r.loss_trace.iter().map(|&(s, l)| (s as f64, l)).collect();
        loss = loss.series(if *n == 1 { Series::line("N = 1", pts) } else { Series::dashed("N = 2", pts) });
        run.metric(&format!("samples_per_s_n{n}"), r.samples_per_s);
    }
    let p = run.path("loss_n1_vs_n2.png");
    loss.save(&p)?;
    run.artifact(&p);
    let bars: Vec<(String, f64)> = results.iter().map(|(n, r, _)| (format!("N = {n}"), r.samples_per_s)).collect();
    let p = run.path("samples_per_s.png");
    charts::bar_chart(
        &p,
        &format!("Training samples/s on {cores} core(s), global batch {}", 2 * b),
        "samples/s",
        &bars,
    )?;
    run.artifact(&p);
    let speedup = results[1].1.samples_per_s / results[0].1.samples_per_s.max(1e-9);
    run.metric("speedup_n2_over_n1", speedup);
    println!(
        "samples/s: N=1 {:.0}, N=2 {:.0} ({speedup:.2}x; the {cores} core(s) are shared by the ranks, so N=2 cannot beat N=1 by much here)",
        results[0].1.samples_per_s, results[1].1.samples_per_s
    );

    // 3. A full DDP training run on 2 ranks.
    println!("\n-- 3. training on 2 ranks --");
    let r: JobResult = launch_job(
        args,
        2,
        &["--role", "train", "--model", model, "--job", "ddp_train"].map(String::from),
        "the ddp_train job",
    )?;
    relaunch::report(&jobs.join("ddp_train.json"), &r)?;
    if let Some(acc) = r.test_accuracy {
        if quick {
            run.metric("ddp_test_accuracy", acc);
        } else {
            run.target("ddp_test_accuracy", acc, Op::Ge, 0.99);
        }
    }
    if let Some(v) = r.final_val_loss {
        run.metric("ddp_final_val_loss", v);
    }
    run.metric("ddp_train_seconds", r.train_seconds);
    run.metric("ddp_allreduce_share", r.allreduce_seconds / r.train_seconds.max(1e-9));
    let p = args.common.outputs.join("m05_ddp/ddp_train/loss.png");
    if p.exists() {
        run.artifact(&p);
    }
    let m = run.finish()?;
    ensure!(m.quick || m.all_targets_met(), "not every target was met (see the table above)");
    Ok(())
}
