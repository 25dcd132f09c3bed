//! m02_data: neural networks and the data pipeline — Dataset/DataLoader, initialisation,
//! optimizers, schedulers, early stopping, resumable checkpoints and TensorBoard logs, on MNIST
//! (or Fashion-MNIST) with an MLP and a CNN. The lesson is notes/m02_data.md.

use anyhow::{ensure, Result};
use clap::Parser;
use course::data::loader::DataLoader;
use course::data::vision::{collate_images, ImageBatch, ImageDataset, ImageSubset, Splits};
use course::models::{CnnConfig, InitKind, MlpConfig, ModelConfig};
use course::run::charts::{LineChart, Series};
use course::run::{CommonArgs, Op, Run};
use course::train::classify::{self, OptKind, SchedKind, TrainConfig};
use course::train::metrics::Confusion;
use serde::Serialize;
use std::sync::Arc;
use tch::nn::VarStore;

/// Module 2: trains an MLP and a LeNet-5-style CNN on MNIST (or Fashion-MNIST) through the
/// course's DataLoader, optimizers, schedulers, early stopping and checkpoints; then proves that
/// an interrupted and resumed run equals an uninterrupted one.
///
/// Writes outputs/m02_data/: metrics.json, curves.png, lr.png, confusion_<model>.png,
/// misclassified_<model>.png, and per model best/, last/ (checkpoints) and tb/ (TensorBoard:
/// `tensorboard --logdir outputs/m02_data`).
#[derive(Parser, Debug, Serialize)]
#[command(version, about, long_about, after_long_help = LESSON)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Data set: mnist or fashion (Fashion-MNIST)
    #[arg(long, default_value = "mnist", value_parser = ["mnist", "fashion"])]
    dataset: String,
    /// Which models to train
    #[arg(long, default_value = "both", value_parser = ["mlp", "cnn", "both"])]
    model: String,
    /// Epochs (default: 10 for the MLP, 4 for the CNN (6 on Fashion-MNIST); 1 with --quick)
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size
    #[arg(long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    batch_size: usize,
    /// Optimizer
    #[arg(long, value_enum, default_value_t = OptKind::Adamw)]
    optimizer: OptKind,
    /// Peak learning rate (default: 1e-3 for AdamW, 0.05 for SGD)
    #[arg(long)]
    lr: Option<f64>,
    /// SGD momentum (Nesterov with --nesterov)
    #[arg(long, default_value_t = TrainConfig::default().momentum)]
    momentum: f64,
    /// Use Nesterov momentum with SGD
    #[arg(long)]
    nesterov: bool,
    /// Weight decay on weight matrices and kernels (never on biases or norm scales)
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    weight_decay: f64,
    /// Learning-rate schedule
    #[arg(long, value_enum, default_value_t = TrainConfig::default().schedule)]
    schedule: SchedKind,
    /// Label smoothing of the cross-entropy target
    #[arg(long, default_value_t = TrainConfig::default().label_smoothing)]
    label_smoothing: f64,
    /// Early stopping: stop after this many epochs without a validation-accuracy gain
    #[arg(long)]
    patience: Option<usize>,
    /// MLP weight initialisation
    #[arg(long, value_enum, default_value_t = MlpConfig::mnist().init)]
    init: InitKind,
    /// DataLoader worker threads (0 = load in the training thread)
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=64))]
    workers: usize,
    /// Training examples held out for validation
    #[arg(long, default_value_t = 5000)]
    val_size: usize,
    /// Continue from outputs/m02_data/<model>/last if it exists
    #[arg(long)]
    resume: bool,
    /// (testing) stop after this many epochs, as if interrupted
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    /// Skip the in-process resume check (saves a few seconds)
    #[arg(long)]
    skip_resume_check: bool,
}

const LESSON: &str = "\
What happens, in order (notes/m02_data.md has the lesson):
  1. data      IDX files -> ImageSubset (normalise; random crop for the CNN) -> DataLoader with
               worker threads, a seeded shuffle per epoch, and a held-out validation split
  2. models    MLP 784-512-256-10 (dropout 0.2) and LeNet-5-style CNN with batch norm
  3. training  AdamW (or SGD) with decay groups, warmup + cosine (or step/cosine/plateau),
               early stopping, best/ and last/ checkpoints every epoch, TensorBoard logs
  4. test      accuracy, confusion matrix, misclassified examples
  5. resume    2 epochs straight vs 1 epoch + save + load + 1 epoch: identical weights

Try: m02_data --model mlp --optimizer sgd --nesterov     m02_data --dataset fashion --model cnn
     m02_data --model mlp --epochs 3 --stop-after 1 && m02_data --model mlp --epochs 3 --resume";

fn loader(
    set: ImageSubset,
    batch: usize,
    workers: usize,
    shuffle: Option<u64>,
    seed: u64,
) -> Result<DataLoader<ImageSubset, ImageBatch>> {
    let (r, c) = set.set.image_size();
    let l = DataLoader::new(Arc::new(set), batch, collate_images(r, c))?.workers(workers).seed(seed);
    Ok(match shuffle {
        Some(s) => l.shuffle(s),
        None => l,
    })
}

struct Trained {
    name: String,
    out: classify::Outcome,
    test_acc: f64,
    confusion: Confusion,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.lr.is_none_or(|l| l.is_finite() && l > 0.0), "--lr must be a finite number > 0");
    ensure!(args.weight_decay.is_finite() && args.weight_decay >= 0.0, "--weight-decay must be >= 0");
    ensure!((0.0..1.0).contains(&args.label_smoothing), "--label-smoothing must be in [0, 1)");
    ensure!((0.0..1.0).contains(&args.momentum), "--momentum must be in [0, 1)");
    ensure!(args.epochs != Some(0), "--epochs must be at least 1");
    let mut run = Run::start("m02_data", &args.common, &args)?;
    let ds = if args.dataset == "fashion" { ImageDataset::FashionMnist } else { ImageDataset::Mnist };
    let quick = run.quick;
    let seed = run.seed();

    println!("== m02_data: {} ==", ds.name());
    let splits = Splits::load(ds, args.val_size, quick, seed)?;
    println!(
        "train {} / val {} / test {} examples of {}x{}",
        splits.train.len(),
        splits.val.len(),
        splits.test.len(),
        splits.train_set.image_size().0,
        splits.train_set.image_size().1
    );
    let fashion = ds == ImageDataset::FashionMnist;

    let mut trained: Vec<Trained> = vec![];
    let models: Vec<&str> = match args.model.as_str() {
        "both" => vec!["mlp", "cnn"],
        m => vec![m],
    };
    for name in models {
        // The recipes; the flags change what they name (their defaults are the recipes' own).
        let (model_cfg, recipe, augment) = match name {
            "mlp" => {
                (ModelConfig::Mlp(MlpConfig { init: args.init, ..MlpConfig::mnist() }), TrainConfig::mnist_mlp(), false)
            }
            _ => {
                let r = TrainConfig::mnist_cnn();
                // Fashion-MNIST with flips only needs two more epochs.
                (
                    ModelConfig::Cnn(CnnConfig::lenet()),
                    TrainConfig { epochs: r.epochs + if fashion { 2 } else { 0 }, ..r },
                    true,
                )
            }
        };
        let epochs = if quick { args.epochs.unwrap_or(1) } else { args.epochs.unwrap_or(recipe.epochs) };
        let lr = args.lr.unwrap_or(TrainConfig::default_lr(args.optimizer));
        let cfg = TrainConfig {
            epochs,
            lr,
            optimizer: args.optimizer,
            momentum: args.momentum,
            nesterov: args.nesterov,
            weight_decay: args.weight_decay,
            schedule: args.schedule,
            label_smoothing: args.label_smoothing,
            patience: args.patience,
            ..recipe
        };
        let train_l = loader(splits.train_subset(augment), args.batch_size, args.workers, Some(seed), seed)?;
        let val_l = loader(splits.val_subset(), 1000, args.workers, None, seed)?;
        let test_l = loader(splits.test_subset(), 1000, args.workers, None, seed)?;

        let vs = VarStore::new(run.device);
        course::sys::rng::seed_everything(seed); // the same initial weights whatever ran before
        let model = model_cfg.build(&vs.root());
        let params = course::models::param_count(&vs);
        println!(
            "\n-- {name}: {params} parameters, {epochs} epoch(s), {:?} lr {lr}, {:?} --",
            args.optimizer, args.schedule
        );
        let dir = run.path(name);
        let out = classify::fit(
            &dir,
            &info(&model_cfg),
            &vs,
            model.as_ref(),
            &train_l,
            &val_l,
            &cfg,
            args.resume,
            args.stop_after,
        )?;
        if out.interrupted {
            println!(
                "{name}: stopped after epoch {} as asked (--stop-after); rerun with --resume to continue",
                out.history.len()
            );
            continue;
        }
        let mut confusion = Confusion::new(10);
        let (test_loss, test_acc) = classify::evaluate(model.as_ref(), &test_l, run.device, Some(&mut confusion))?;
        println!("{name}: test loss {test_loss:.4}, test accuracy {:.2}%", test_acc * 100.0);
        run.metric(&format!("{name}_test_loss"), test_loss);
        run.metric(&format!("{name}_params"), params as f64);
        if let Some(r) = out.history.last() {
            run.metric(&format!("{name}_train_samples_per_s"), r.samples_per_s);
        }
        run.metric(&format!("{name}_epochs_run"), out.history.len() as f64);
        // Misclassified test examples, with their predicted and true labels.
        let p = run.path(&format!("misclassified_{name}.png"));
        if classify::misclassified_grid(model.as_ref(), &test_l, ds, run.device, 24, &p)? > 0 {
            run.artifact(&p);
        }
        trained.push(Trained { name: name.to_string(), out, test_acc, confusion });
    }
    if trained.is_empty() {
        return Ok(()); // interrupted on purpose; no metrics for an unfinished run
    }

    // Charts: loss and accuracy per epoch (train and validation), the LR schedule, confusion.
    let mut loss = LineChart::new("Loss per epoch", "epoch", "cross-entropy");
    let mut acc = LineChart::new("Accuracy per epoch", "epoch", "accuracy");
    let mut lr = LineChart::new("Learning rate by step", "step", "learning rate");
    for t in &trained {
        (loss, acc) = classify::add_curves(loss, acc, &t.name, &t.out.history);
        lr = lr.series(Series::line(&t.name, t.out.lr_trace.iter().map(|(s, l)| (*s as f64, *l)).collect()));
        let cm = run.path(&format!("confusion_{}.png", t.name));
        t.confusion.heatmap(&format!("{} confusion matrix ({}, test)", t.name, ds.name()), &ds.classes()).save(&cm)?;
        run.artifact(&cm);
    }
    for (chart, file) in [(loss, "loss.png"), (acc, "accuracy.png"), (lr, "lr.png")] {
        let p = run.path(file);
        chart.save(&p)?;
        run.artifact(&p);
    }

    // Targets.
    for t in &trained {
        let goal = match (ds, t.name.as_str()) {
            (ImageDataset::Mnist, "mlp") => 0.975,
            (ImageDataset::Mnist, _) => 0.99,
            (ImageDataset::FashionMnist, "cnn") => 0.90,
            (ImageDataset::FashionMnist, _) => 0.85,
        };
        run.target(&format!("{}_test_accuracy", t.name), t.test_acc, Op::Ge, goal);
    }
    if !args.skip_resume_check {
        let equal = resume_check(&run, &splits, seed, args.workers)?;
        run.target("resume_equals_uninterrupted", equal as u8 as f64, Op::Eq, 1.0);
    }
    let m = run.finish()?;
    ensure!(m.quick || m.all_targets_met(), "not every target was met (see the table above)");
    Ok(())
}

/// Trains a small MLP for 2 epochs straight, and again as 1 epoch + save + fresh model and
/// optimizer + load + 1 epoch, through real checkpoint files; true when the final weights are
/// bit-identical.
fn resume_check(run: &Run, splits: &Splits, seed: u64, workers: usize) -> Result<bool> {
    println!("\n-- resume check: 2 epochs straight vs 1 + resume + 1 (small MLP, 2000 examples) --");
    let cfg_m = ModelConfig::Mlp(MlpConfig { hidden: vec![64], ..MlpConfig::mnist() });
    let cfg = TrainConfig { epochs: 2, min_delta: 0.0, ..TrainConfig::mnist_mlp() };
    let make = |dir: &std::path::Path, stop: Option<usize>, resume: bool| -> Result<(VarStore, classify::Outcome)> {
        let tl = loader(
            ImageSubset::new(splits.train_set.clone(), splits.plain.clone())
                .with_subset(splits.train[..2000.min(splits.train.len())].to_vec()),
            64,
            workers,
            Some(seed),
            seed,
        )?;
        let vl = loader(
            ImageSubset::new(splits.train_set.clone(), splits.plain.clone())
                .with_subset(splits.val[..200.min(splits.val.len())].to_vec()),
            200,
            workers,
            None,
            seed,
        )?;
        let vs = VarStore::new(run.device);
        course::sys::rng::seed_everything(seed);
        let m = cfg_m.build(&vs.root());
        let out = classify::fit(dir, &info(&cfg_m), &vs, m.as_ref(), &tl, &vl, &cfg, resume, stop)?;
        Ok((vs, out))
    };
    let a = run.path("resume_check/straight");
    let b = run.path("resume_check/interrupted");
    for d in [&a, &b] {
        let _ = std::fs::remove_dir_all(d);
    }
    let (vs_a, out_a) = make(&a, None, false)?;
    let _ = make(&b, Some(1), false)?;
    let (vs_b, out_b) = make(&b, None, true)?;
    let same_weights = course::io::safetensors::named_tensors(&vs_a)
        .iter()
        .zip(course::io::safetensors::named_tensors(&vs_b))
        .all(|((n1, t1), (n2, t2))| n1 == &n2 && t1.equal(&t2));
    let same_losses = out_a.history.iter().map(|r| r.train_loss).eq(out_b.history.iter().map(|r| r.train_loss));
    println!("resume check: weights identical = {same_weights}, epoch losses identical = {same_losses}");
    Ok(same_weights && same_losses)
}

/// The trainer's record of one of m02's models.
fn info(cfg: &ModelConfig) -> classify::ModelInfo<'_> {
    classify::ModelInfo {
        name: cfg.name(),
        config: serde_json::to_value(cfg).expect("model configs serialise"),
        extra_files: None,
    }
}
