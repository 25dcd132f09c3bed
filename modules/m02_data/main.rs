//! m02_data: neural networks and the data pipeline — Dataset/DataLoader, initialisation,
//! optimizers, schedulers, early stopping, resumable checkpoints and TensorBoard logs, on MNIST
//! (or Fashion-MNIST) with an MLP and a CNN. The lesson is notes/m02_data.md.

use anyhow::{ensure, Result};
use clap::Parser;
use course::data::loader::DataLoader;
use course::data::vision::{
    collate_images, image_grid, split_indices, ImageBatch, ImageDataset, ImageFolder, Transform,
};
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
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Use Nesterov momentum with SGD
    #[arg(long)]
    nesterov: bool,
    /// Weight decay on weight matrices and kernels (never on biases or norm scales)
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Learning-rate schedule
    #[arg(long, value_enum, default_value_t = SchedKind::WarmupCosine)]
    schedule: SchedKind,
    /// Label smoothing of the cross-entropy target
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Early stopping: stop after this many epochs without a validation-accuracy gain
    #[arg(long)]
    patience: Option<usize>,
    /// MLP weight initialisation
    #[arg(long, value_enum, default_value_t = InitKind::KaimingNormal)]
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
  1. data      IDX files -> ImageFolder (normalise; random crop for the CNN) -> DataLoader with
               worker threads, a seeded shuffle per epoch, and a held-out validation split
  2. models    MLP 784-512-256-10 (dropout 0.2) and LeNet-5-style CNN with batch norm
  3. training  AdamW (or SGD) with decay groups, warmup + cosine (or step/cosine/plateau),
               early stopping, best/ and last/ checkpoints every epoch, TensorBoard logs
  4. test      accuracy, confusion matrix, misclassified examples
  5. resume    2 epochs straight vs 1 epoch + save + load + 1 epoch: identical weights

Try: m02_data --model mlp --optimizer sgd --nesterov     m02_data --dataset fashion --model cnn
     m02_data --model mlp --epochs 3 --stop-after 1 && m02_data --model mlp --epochs 3 --resume";

fn loader(
    set: ImageFolder,
    batch: usize,
    workers: usize,
    shuffle: Option<u64>,
    seed: u64,
) -> Result<DataLoader<ImageFolder, ImageBatch>> {
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
    let full = ds.load(true)?;
    let test_set = ds.load(false)?;
    let (train_idx, val_idx) = split_indices(full.len(), args.val_size.min(full.len() / 2), seed);
    let (train_idx, val_idx, test_idx): (Vec<usize>, Vec<usize>, Vec<usize>) = if quick {
        (train_idx[..3000].to_vec(), val_idx[..500.min(val_idx.len())].to_vec(), (0..1000).collect())
    } else {
        (train_idx, val_idx, (0..test_set.len()).collect())
    };
    println!(
        "train {} / val {} / test {} examples of {}x{}",
        train_idx.len(),
        val_idx.len(),
        test_idx.len(),
        full.image_size().0,
        full.image_size().1
    );
    let (mean, std) = ds.mean_std();
    let plain = Transform { normalize: Some((mean, std)), ..Default::default() };
    // For digits, shifts of up to 2 pixels; for clothes, left-right flips only (with shifts as
    // well, 4 epochs underfit Fashion-MNIST: 89.2 % test, train accuracy below validation).
    let fashion = ds == ImageDataset::FashionMnist;
    let augmented =
        Transform { crop_padding: if fashion { 0 } else { 2 }, hflip: fashion, normalize: Some((mean, std)) };
    let full = Arc::new(full);
    let test_set = Arc::new(test_set);

    let mut trained: Vec<Trained> = vec![];
    let models: Vec<&str> = match args.model.as_str() {
        "both" => vec!["mlp", "cnn"],
        m => vec![m],
    };
    for name in models {
        let (model_cfg, epochs, transform) = match name {
            "mlp" => (
                ModelConfig::Mlp(MlpConfig {
                    input: 784,
                    hidden: vec![512, 256],
                    classes: 10,
                    dropout: 0.2,
                    init: args.init,
                }),
                10,
                plain.clone(),
            ),
            _ => (
                ModelConfig::Cnn(CnnConfig {
                    channels: (32, 64),
                    hidden: 256,
                    classes: 10,
                    dropout: 0.3,
                    conv_bias: true,
                }),
                if fashion { 6 } else { 4 },
                augmented.clone(),
            ),
        };
        let epochs = if quick { args.epochs.unwrap_or(1) } else { args.epochs.unwrap_or(epochs) };
        let lr = args.lr.unwrap_or(if args.optimizer == OptKind::Sgd { 0.05 } else { 1e-3 });
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
            min_delta: 1e-4,
            max_batches: None,
        };
        let set = |idx: &[usize], t: &Transform, from: &Arc<course::data::idx::ImageSet>| {
            ImageFolder::new(from.clone(), t.clone()).with_subset(idx.to_vec())
        };
        let train_l = loader(set(&train_idx, &transform, &full), args.batch_size, args.workers, Some(seed), seed)?;
        let val_l = loader(set(&val_idx, &plain, &full), 1000, args.workers, None, seed)?;
        let test_l = loader(set(&test_idx, &plain, &test_set), 1000, args.workers, None, seed)?;

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
        let mut wrong = vec![];
        let mut caps = vec![];
        let classes = ds.classes();
        for b in test_l.epoch(0) {
            let b = b?;
            let pred = classify::predict(model.as_ref(), &b.images, run.device);
            let p: Vec<i64> = Vec::try_from(&pred)?;
            let l: Vec<i64> = Vec::try_from(&b.labels)?;
            for (k, (p, l)) in p.iter().zip(&l).enumerate() {
                if p != l && wrong.len() < 24 {
                    let img: Vec<f32> = Vec::try_from(b.images.get(k as i64).flatten(0, -1))?;
                    wrong.push(img.iter().map(|v| v * std + mean).collect::<Vec<f32>>());
                    caps.push(format!("pred {} / true {}", classes[*p as usize], classes[*l as usize]));
                }
            }
        }
        if !wrong.is_empty() {
            let p = run.path(&format!("misclassified_{name}.png"));
            image_grid(&p, &wrong, &caps, 28, 28, 8, 4)?;
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
        let equal = resume_check(&run, &full, &train_idx, &val_idx, &plain, seed, args.workers)?;
        run.target("resume_equals_uninterrupted", equal as u8 as f64, Op::Eq, 1.0);
    }
    let m = run.finish()?;
    ensure!(m.quick || m.all_targets_met(), "not every target was met (see the table above)");
    Ok(())
}

/// Trains a small MLP for 2 epochs straight, and again as 1 epoch + save + fresh model and
/// optimizer + load + 1 epoch, through real checkpoint files; true when the final weights are
/// bit-identical.
fn resume_check(
    run: &Run,
    full: &Arc<course::data::idx::ImageSet>,
    train_idx: &[usize],
    val_idx: &[usize],
    t: &Transform,
    seed: u64,
    workers: usize,
) -> Result<bool> {
    println!("\n-- resume check: 2 epochs straight vs 1 + resume + 1 (small MLP, 2000 examples) --");
    let cfg_m = ModelConfig::Mlp(MlpConfig {
        input: 784,
        hidden: vec![64],
        classes: 10,
        dropout: 0.2,
        init: InitKind::KaimingNormal,
    });
    let cfg = TrainConfig {
        epochs: 2,
        lr: 1e-3,
        optimizer: OptKind::Adamw,
        momentum: 0.9,
        nesterov: false,
        weight_decay: 1e-4,
        schedule: SchedKind::WarmupCosine,
        label_smoothing: 0.0,
        patience: None,
        min_delta: 0.0,
        max_batches: None,
    };
    let make = |dir: &std::path::Path, stop: Option<usize>, resume: bool| -> Result<(VarStore, classify::Outcome)> {
        let tl = loader(
            ImageFolder::new(full.clone(), t.clone()).with_subset(train_idx[..2000.min(train_idx.len())].to_vec()),
            64,
            workers,
            Some(seed),
            seed,
        )?;
        let vl = loader(
            ImageFolder::new(full.clone(), t.clone()).with_subset(val_idx[..200.min(val_idx.len())].to_vec()),
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
