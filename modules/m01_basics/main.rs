//! m01_basics — PyTorch basics and reproducibility, in Rust on libtorch.
//!
//! Read top to bottom: each section prints what it demonstrates and records what it measured in
//! `outputs/m01_basics/metrics.json`. The lesson is notes/m01_basics.md.

use anyhow::{ensure, Context, Result};
use clap::Parser;
use course::basics::linreg::{self, nan_max};
use course::basics::repro::fingerprint;
use course::run::charts::{LineChart, Series};
use course::run::{relaunch, CommonArgs, Op, Run};
use course::sys::runtime;
use serde::Serialize;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

/// Module 1: tensors, autograd, reproducibility and memory, then linear regression three ways
/// (normal equations, gradient descent with autograd by hand, nn::Linear + SGD) that must all
/// recover the true weights.
///
/// Writes outputs/m01_basics/{metrics.json, manifest.json, loss.png, fit.png}.
#[derive(Parser, Debug, Serialize)]
#[command(version, about, long_about, after_long_help = LESSON)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Samples in the regression problem, 2 to 10,000,000 (default 2000; 200 with --quick)
    #[arg(long, value_parser = clap::value_parser!(i64).range(2..=10_000_000))]
    samples: Option<i64>,
    /// Features in the regression problem, 1 to 1000
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(i64).range(1..=1000))]
    features: i64,
    /// Standard deviation of the label noise (>= 0)
    #[arg(long, default_value_t = 0.1)]
    noise: f64,
    /// Learning rate of both gradient-descent fits (> 0; above 1.0 this problem diverges)
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Steps of both gradient-descent fits, 1 to 1,000,000
    #[arg(long, default_value_t = 300, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    steps: usize,
    /// (internal) print the reproducibility fingerprint for this seed and exit; used to compare
    /// two processes
    #[arg(long, hide = true)]
    probe_fingerprint: Option<u64>,
}

const LESSON: &str = "\
The lesson, section by section (notes/m01_basics.md has the full text):
  1. Tensors      creation, dtypes (1/3 in f64, f32, bf16, f16), broadcasting, views vs copies,
                  in-place ops, CPU <-> CUDA
  2. Autograd     four gradients checked against their analytic forms; no_grad vs inference
                  mode; dropout in train vs eval
  3. Reproduce    the same seed gives the same bits, in this process and in a second one; a
                  float sum differs between 1 and 2 threads; the determinism switch
  4. Memory       tensor sizes, RSS before/after a 256 MiB tensor, CUDA allocator stats
  5. Task         y = Xw + b + noise solved by the normal equations, by gradient descent with
                  autograd, and by nn::Linear + SGD: all within 0.02 of the truth, and of each
                  other within 1e-4

Try: m01_basics --threads 1 --seed 7    m01_basics --lr 1.1 (watch loss.png)    m01_basics --noise 2";

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.noise.is_finite() && args.noise >= 0.0, "--noise must be a finite number >= 0, got {}", args.noise);
    ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr must be a finite number > 0, got {}", args.lr);
    if let Some(seed) = args.probe_fingerprint {
        // The second process of section 3: the same set-up as the parent, then one fingerprint.
        let setup = course::run::Setup::apply(&args.common)?;
        let f = format!("{:016x}", fingerprint(seed, setup.device));
        match &args.common.result {
            Some(p) => relaunch::report(p, &f)?,
            None => println!("{f}"),
        }
        return Ok(());
    }
    let mut run = Run::start("m01_basics", &args.common, &args)?;
    println!("== m01_basics: PyTorch basics and reproducibility ==\n{}\n", course::run::report::env_report());
    tensors(&mut run)?;
    autograd(&mut run)?;
    reproducibility(&mut run, &args)?;
    memory(&mut run)?;
    regression(&mut run, &args)?;
    let m = run.finish()?;
    ensure!(m.quick || m.all_targets_met(), "not every target was met (see the table above)");
    Ok(())
}

fn section(title: &str) {
    println!("\n--- {title} ---");
}

/// 1. Tensors: creation, dtypes, broadcasting, views vs copies, in-place ops, devices.
fn tensors(run: &mut Run) -> Result<()> {
    section("1. Tensors");
    let d = run.device;
    let a = Tensor::arange(6, (Kind::Float, d)).view([2, 3]); // (2, 3)
    println!("arange(6).view(2, 3) = {:?} on {:?}", Vec::<f32>::try_from(a.flatten(0, -1))?, a.device());
    // dtypes: the same number in four of them.
    let third = Tensor::from(1.0f64 / 3.0);
    for k in [Kind::Double, Kind::Float, Kind::BFloat16, Kind::Half] {
        println!(
            "1/3 as {k:?}: {:.10} ({} bytes per element)",
            third.to_kind(k).double_value(&[]),
            k.elt_size_in_bytes()
        );
    }
    // Broadcasting: (3, 1) + (1, 4) -> (3, 4); sizes align from the right, 1s stretch.
    let col = Tensor::arange(3, (Kind::Float, d)).view([3, 1]);
    let row = Tensor::arange(4, (Kind::Float, d)).view([1, 4]) * 10.0;
    let grid = &col + &row; // (3, 4)
    println!("(3,1) + (1,4) -> {:?}; grid[2][3] = {}", grid.size(), grid.double_value(&[2, 3]));
    run.metric("broadcast_ok", (grid.size() == [3, 4] && grid.double_value(&[2, 3]) == 32.0) as u8 as f64);
    // Views share storage; clones do not.
    let base = Tensor::zeros([2, 3], (Kind::Float, d));
    let mut view = base.view([6]);
    let _ = view.fill_(1.0); // in-place (trailing underscore), through the view
    let copy = base.copy(); // an independent copy (clone)
    let _ = base.shallow_clone().fill_(2.0);
    let shares = base.data_ptr() == view.data_ptr();
    println!(
        "view shares storage: {shares}; after base.fill_(2): view[0] = {}, clone[0] = {}",
        view.double_value(&[0]),
        copy.double_value(&[0, 0])
    );
    let t = base.transpose(0, 1); // (3, 2), a strided view: not contiguous
    println!(
        "transpose is contiguous: {}; .contiguous() copies: {}",
        t.is_contiguous(),
        t.contiguous().data_ptr() != t.data_ptr()
    );
    run.metric(
        "view_shares_storage",
        (shares && view.double_value(&[0]) == 2.0 && copy.double_value(&[0, 0]) == 1.0) as u8 as f64,
    );
    // CPU <-> CUDA.
    if tch::Cuda::is_available() {
        let g = a.to_device(Device::Cuda(0));
        println!(
            "moved to {:?} and back: equal = {}",
            g.device(),
            g.to_device(Device::Cpu).equal(&a.to_device(Device::Cpu))
        );
    } else {
        println!("no CUDA device here: `.to_device(Device::Cuda(0))` would fail, so the course runs on the CPU (--device auto picks CUDA when present)");
    }
    Ok(())
}

/// 2. Autograd checked against analytic gradients; no_grad vs inference mode; train vs eval.
fn autograd(run: &mut Run) -> Result<()> {
    section("2. Autograd");
    let opts = (Kind::Double, Device::Cpu);
    let x = Tensor::randn([5], opts);
    let a = Tensor::randn([4, 5], opts);
    let b = Tensor::randn([4], opts);
    let labels = Tensor::from_slice(&[1i64, 0, 3]);
    let logits = Tensor::randn([3, 4], opts);
    // (name, f, analytic gradient of f at its input)
    let cases: Vec<(&str, Tensor, Box<dyn Fn(&Tensor) -> Tensor>, Tensor)> = vec![
        ("sum(x^3)", x.copy(), Box::new(|x: &Tensor| x.pow_tensor_scalar(3).sum(Kind::Double)), x.square() * 3.0),
        (
            "sum(sin(x) exp(x))",
            x.copy(),
            Box::new(|x: &Tensor| (x.sin() * x.exp()).sum(Kind::Double)),
            (x.sin() + x.cos()) * x.exp(),
        ),
        (
            "||A w - b||^2",
            x.copy(),
            Box::new({
                let (a, b) = (a.copy(), b.copy());
                move |w: &Tensor| (a.matmul(w) - &b).square().sum(Kind::Double)
            }),
            a.tr().matmul(&(a.matmul(&x) - &b)) * 2.0,
        ),
        (
            "cross_entropy(logits)",
            logits.copy(),
            Box::new({
                let onehot = labels.one_hot(4).to_kind(Kind::Double);
                // mean over the batch of -log softmax(z)[label], in f64 throughout
                move |z: &Tensor| -(z.log_softmax(-1, Kind::Double) * &onehot).sum(Kind::Double) / 3.0
            }),
            (logits.softmax(-1, Kind::Double) - labels.one_hot(4).to_kind(Kind::Double)) / 3.0,
        ),
    ];
    let mut worst = 0f64;
    for (name, input, f, analytic) in cases {
        let v = input.set_requires_grad(true);
        f(&v).backward();
        let err = (v.grad() - analytic).abs().max().double_value(&[]);
        worst = nan_max(worst, err);
        println!("d/dx {name:<24} max |autograd - analytic| = {err:.2e}");
    }
    run.target("autograd_max_abs_error", worst, Op::Le, 1e-10);

    // no_grad: ops are not recorded. inference mode: also no version counters, and the results
    // are "inference tensors" that autograd refuses to use later.
    let w = Tensor::randn([3], opts).set_requires_grad(true);
    let y_nograd = tch::no_grad(|| &w * 2.0);
    let y_inf = {
        let _guard = runtime::inference_mode();
        &w * 2.0
    };
    let later = y_inf.f_mul(&w).and_then(|p| p.f_sum(Kind::Double)).and_then(|s| s.f_backward());
    println!(
        "no_grad: requires_grad = {}; inference_mode: requires_grad = {}, is_inference = {}; using it in autograd later: {}",
        y_nograd.requires_grad(),
        y_inf.requires_grad(),
        runtime::is_inference(&y_inf),
        if later.is_err() { "error (as expected)" } else { "allowed" }
    );
    run.metric("inference_tensor_flagged", runtime::is_inference(&y_inf) as u8 as f64);

    // train() vs eval(): dropout zeroes p of the activations and scales the rest by 1/(1-p) in
    // training; in evaluation it is the identity.
    let drop = nn::func_t(|x, train| x.dropout(0.5, train));
    let ones = Tensor::ones([100_000], (Kind::Float, run.device));
    let tr = drop.forward_t(&ones, true);
    let zero_frac = tr.eq(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    let kept = tr.max().double_value(&[]);
    let ev_equal = drop.forward_t(&ones, false).equal(&ones);
    println!("dropout(p=0.5) train: {:.3} zeroed, survivors scaled to {kept}; eval: identity = {ev_equal}", zero_frac);
    run.metric("dropout_train_zero_fraction", zero_frac);
    run.metric("dropout_eval_identity", ev_equal as u8 as f64);
    Ok(())
}

/// 3. Reproducibility: same seed -> same bits (same process and a second process); another
/// seed -> different bits; and the determinism switch.
fn reproducibility(run: &mut Run, args: &Args) -> Result<()> {
    section("3. Reproducibility");
    let seed = run.seed();
    let f1 = fingerprint(seed, run.device);
    let f2 = fingerprint(seed, run.device);
    let other_seed = seed.wrapping_add(1);
    let f3 = fingerprint(other_seed, run.device);
    println!("fingerprint(seed {seed}) = {f1:016x}, again = {f2:016x}, seed {other_seed} = {f3:016x}");
    // A second process, started fresh with the same flags (seed, threads, device, ...).
    let mut child_args = args.common.to_args();
    child_args.extend(["--probe-fingerprint".into(), seed.to_string().into()]);
    let other: String = relaunch::Child::new(child_args).run("the probe process")?;
    let other = u64::from_str_radix(&other, 16).context("the probe's fingerprint")?;
    println!("second process: {other:016x} -> {}", if other == f1 { "bit-identical" } else { "DIFFERENT" });
    run.target("repro_same_process", (f1 == f2) as u8 as f64, Op::Eq, 1.0);
    run.target("repro_cross_process", (f1 == other) as u8 as f64, Op::Eq, 1.0);
    run.target("repro_other_seed_differs", (f1 != f3) as u8 as f64, Op::Eq, 1.0);

    // Thread count is part of the recipe: a float sum split over more threads adds in another
    // order, and float addition is not associative.
    let v = Tensor::randn([4_000_000], (Kind::Float, Device::Cpu));
    let threads = runtime::threads();
    runtime::set_threads(1);
    let s1 = v.sum(Kind::Float).double_value(&[]);
    runtime::set_threads(threads.max(2));
    let s2 = v.sum(Kind::Float).double_value(&[]);
    runtime::set_threads(threads);
    println!(
        "sum of 4M floats with 1 thread = {s1:.6}, with {} = {s2:.6} (equal bits: {})",
        threads.max(2),
        s1.to_bits() == s2.to_bits()
    );
    let before = runtime::deterministic();
    runtime::set_deterministic(true, false);
    println!(
        "determinism switch: was {before}, now {} (ops without a deterministic kernel now raise an error)",
        runtime::deterministic()
    );
    runtime::set_deterministic(before, false);
    Ok(())
}

/// 4. Memory: how big tensors are, the process's RSS, and the CUDA allocator where there is one.
fn memory(run: &mut Run) -> Result<()> {
    section("4. Memory");
    let n: i64 = if run.quick { 1 << 22 } else { 1 << 26 }; // 16 MB or 256 MB of f32
    for k in [Kind::Float, Kind::BFloat16, Kind::Int8] {
        println!("{n} elements of {k:?}: {:.1} MiB", (n as usize * k.elt_size_in_bytes()) as f64 / 1048576.0);
    }
    let rss0 = runtime::current_rss_bytes();
    let big = Tensor::ones([n], (Kind::Float, Device::Cpu));
    let rss1 = runtime::current_rss_bytes();
    drop(big);
    let rss2 = runtime::current_rss_bytes();
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "RSS: {:.1} MiB -> {:.1} MiB with the tensor -> {:.1} MiB after drop; peak RSS {:.1} MiB",
        mib(rss0),
        mib(rss1),
        mib(rss2),
        mib(runtime::peak_rss_bytes())
    );
    run.metric("rss_growth_mib_for_tensor", mib(rss1.saturating_sub(rss0)));
    run.metric("tensor_mib", (n * 4) as f64 / 1048576.0);
    run.metric("peak_rss_mib", mib(runtime::peak_rss_bytes()));
    if let Device::Cuda(i) = run.device {
        let t = Tensor::ones([n], (Kind::Float, run.device));
        let s = runtime::cuda_memory(i)?;
        println!(
            "CUDA allocator: allocated {:.1} MiB (peak {:.1}), reserved {:.1} MiB",
            mib(s.allocated as u64),
            mib(s.allocated_peak as u64),
            mib(s.reserved as u64)
        );
        drop(t);
    } else {
        println!("(no CUDA device: the caching-allocator stats would be printed here)");
    }
    Ok(())
}

/// 5. Linear regression three ways; all must recover the true weights.
fn regression(run: &mut Run, args: &Args) -> Result<()> {
    section("5. Linear regression, three ways");
    let n = args.samples.unwrap_or(if run.quick { 200 } else { 2000 });
    ensure!(n > args.features, "--samples ({n}) must exceed --features ({})", args.features);
    let p = linreg::synthetic(n, args.features, args.noise, &mut run.rng, Kind::Float, run.device)?;
    let bar = course::run::progress::bar(3, "regression");
    bar.set_message("closed form");
    let closed = linreg::closed_form(&p.x, &p.y)?;
    bar.inc(1);
    bar.set_message("gradient descent by hand");
    let gd = linreg::gradient_descent(&p.x, &p.y, args.lr, args.steps);
    bar.inc(1);
    bar.set_message("nn::Linear + SGD");
    let lin = linreg::nn_linear_sgd(&p.x, &p.y, args.lr, args.steps)?;
    bar.finish_and_clear();
    println!("true w = {:?}, b = {}", Vec::<f32>::try_from(p.w_true.flatten(0, -1).to_device(Device::Cpu))?, p.b_true);
    let fits = [("closed_form", &closed), ("gradient_descent", &gd), ("nn_linear_sgd", &lin)];
    // With noise sigma and n samples the estimate's standard error is about sigma / sqrt(n);
    // 0.02 is > 6 standard errors for the defaults (0.1 / sqrt(2000) = 0.0022).
    let tol = if run.quick { 0.05 } else { 0.02 };
    for (name, f) in fits {
        let err = f.max_error(&p);
        println!(
            "{name:<17} w = {:?}, b = {:.4}, max |error| = {err:.4}",
            Vec::<f32>::try_from(f.w.flatten(0, -1).to_device(Device::Cpu))?,
            f.b
        );
        run.target(&format!("{name}_param_error"), err, Op::Le, tol);
    }
    let diff =
        |a: &linreg::Fit, b: &linreg::Fit| nan_max((&a.w - &b.w).abs().max().double_value(&[]), (a.b - b.b).abs());
    let disagreement = nan_max(nan_max(diff(&closed, &gd), diff(&closed, &lin)), diff(&gd, &lin));
    println!("largest disagreement between the three: {disagreement:.2e}");
    run.target("methods_max_disagreement", disagreement, Op::Le, 1e-4);
    run.metric("gd_final_loss", *gd.losses.last().unwrap_or(&f64::NAN));
    run.metric("noise_variance", args.noise * args.noise);

    let steps = |l: &[f64]| l.iter().enumerate().map(|(i, v)| (i as f64, *v)).collect::<Vec<_>>();
    let loss_png = run.path("loss.png");
    LineChart::new("Training loss (MSE) by step", "step", "mean squared error (log)")
        .series(Series::line("gradient descent by hand", steps(&gd.losses)))
        .series(Series::dashed("nn::Linear + SGD", steps(&lin.losses)))
        .series(Series::line(
            "noise variance (the floor)",
            vec![(0.0, args.noise * args.noise), (args.steps as f64, args.noise * args.noise)],
        ))
        .log_y(true)
        .save(&loss_png)?;
    run.artifact(&loss_png);
    // Predictions against targets: a perfect fit lies on y = x, spread only by the noise.
    let pred = (p.x.matmul(&closed.w) + closed.b).flatten(0, -1).to_device(Device::Cpu);
    let y = p.y.flatten(0, -1).to_device(Device::Cpu);
    let pts: Vec<(f64, f64)> = Vec::<f32>::try_from(&pred)?
        .into_iter()
        .zip(Vec::<f32>::try_from(&y)?)
        .map(|(a, b)| (a as f64, b as f64))
        .collect();
    let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(l, h), p| (l.min(p.0), h.max(p.0)));
    let fit_png = run.path("fit.png");
    LineChart::new("Closed-form fit: prediction vs target", "prediction (closed form)", "target y")
        .series(Series::points("samples", pts))
        .series(Series::line("y = prediction", vec![(lo, lo), (hi, hi)]))
        .save(&fit_png)?;
    run.artifact(&fit_png);
    Ok(())
}
