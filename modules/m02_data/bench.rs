//! Benchmark (not a test): m02's training step and DataLoader against Python PyTorch on this
//! machine. The same MLP and CNN, AdamW, batch 128 on fixed random batches (so only the
//! model, autograd and optimizer are timed); and the loader over MNIST's 60k training images
//! with the same per-example work (bytes -> normalised floats), 0 and 2 workers.
//!
//! `cargo bench --bench m02_train [-- --steps N] [-- --rounds N] [-- --threads N] [-- --release-freed-memory]`
//!
//! The PyTorch twins run as child processes that take requests on stdin, so the sides take turns
//! round by round; each row reports the medians over the rounds. Two twins: PyTorch as installed
//! (glibc's malloc defaults) and PyTorch with the same mallopt the course's runtime applies
//! (`course::runtime::retain_freed_memory`), so the table shows what the setting buys and what
//! remains once both sides have it.

use anyhow::{Context, Result};
use course::loader::DataLoader;
use course::models::{cross_entropy, CnnConfig, InitKind, MlpConfig, ModelConfig};
use course::optim::{decay_groups, AdamW, Optimizer};
use course::vision::{collate_images, ImageDataset, ImageFolder, Transform};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// One model, its AdamW and a fixed batch; `run(steps)` times that many training steps.
struct Trainer {
    model: Box<dyn tch::nn::ModuleT + Send>,
    opt: AdamW,
    x: Tensor,
    y: Tensor,
    _vs: VarStore,
}

impl Trainer {
    fn new(cfg: &ModelConfig) -> Result<Self> {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let model = cfg.build(&vs.root());
        let (p, g) = decay_groups(&vs, 1e-4);
        let opt = AdamW::new(p, g, 1e-3, (0.9, 0.999), 1e-8)?;
        let x = Tensor::randn([128, 1, 28, 28], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [128], (Kind::Int64, Device::Cpu));
        Ok(Self { model, opt, x, y, _vs: vs })
    }

    fn run(&mut self, steps: usize) -> Result<f64> {
        let t = Instant::now();
        for _ in 0..steps {
            self.opt.zero_grad();
            cross_entropy(&self.model.forward_t(&self.x, true), &self.y, 0.0).backward();
            self.opt.step()?;
        }
        Ok((steps * 128) as f64 / t.elapsed().as_secs_f64())
    }
}

/// The PyTorch twin, kept running: one request line in, one JSON line out.
struct Python {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Python {
    fn start(threads: usize, retain: bool) -> Result<Self> {
        let mut child = Command::new(".venv/bin/python")
            .args(["modules/m02_data/bench_train.py", "--threads", &threads.to_string()])
            .args(retain.then_some("--retain-freed-memory"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting .venv/bin/python (run python3 scripts/setup.py)")?;
        let out = BufReader::new(child.stdout.take().context("python stdout")?);
        Ok(Self { child, out })
    }

    fn ask(&mut self, what: &str, n: usize) -> Result<f64> {
        let stdin = self.child.stdin.as_mut().context("python stdin")?;
        writeln!(stdin, "{what} {n}")?;
        stdin.flush()?;
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("python side answered {line:?} to {what}"))?;
        v["samples_per_s"].as_f64().with_context(|| format!("no samples_per_s in {line:?}"))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn loader_speed(workers: usize, batches: usize) -> Result<f64> {
    let set = Arc::new(ImageDataset::Mnist.load(true)?);
    let ds = ImageFolder::new(set, Transform { normalize: Some((0.1307, 0.3081)), ..Default::default() });
    let l = DataLoader::new(Arc::new(ds), 128, collate_images(28, 28))?.shuffle(0).workers(workers);
    let t = Instant::now();
    let mut n = 0;
    for b in l.epoch(0).take(batches) {
        n += b?.labels.size()[0];
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<usize>().ok())
    };
    if let Some(n) = get("--threads") {
        course::runtime::set_threads(n);
    }
    let steps = get("--steps").unwrap_or(60);
    let threads = course::runtime::threads();
    println!("{}\n", course::report::env_report());
    let rounds = get("--rounds").unwrap_or(7).max(1);
    let release = args.iter().any(|a| a == "--release-freed-memory");
    if !release {
        course::runtime::retain_freed_memory();
    }
    let mut py = Python::start(threads, false)?;
    let mut py_retain = Python::start(threads, true)?;
    let mlp = ModelConfig::Mlp(MlpConfig {
        input: 784,
        hidden: vec![512, 256],
        classes: 10,
        dropout: 0.2,
        init: InitKind::Default,
    });
    let cnn = ModelConfig::Cnn(CnnConfig { channels: (32, 64), hidden: 256, classes: 10, dropout: 0.3 });
    println!(
        "ours: glibc {}; PyTorch as installed (glibc defaults), and with the same mallopt as ours\n",
        if release { "defaults (--release-freed-memory)" } else { "keeping freed memory, as the course's Run does" }
    );
    println!(
        "{:<16} {:>8} {:>9} {:>6} {:>12} {:>9} {:>6}   samples/s, medians of {rounds} rounds",
        "what", "ours", "PyTorch", "ratio", "range", "+mallopt", "ratio"
    );
    // The three take turns, round after round, who goes first rotating, after one untimed
    // warm-up round: this shared machine's speed drifts by 10-20 % from minute to minute, and
    // pairing each of our runs with the PyTorch runs beside it cancels that drift.
    for (what, cfg, n) in [("train_mlp", &mlp, steps * 4), ("train_cnn", &cnn, steps)] {
        let mut ours = Trainer::new(cfg)?;
        ours.run(n)?;
        py.ask(what, n)?;
        py_retain.ask(what, n)?;
        let mut v = [vec![], vec![], vec![]];
        for round in 0..rounds {
            for k in 0..3 {
                let side = (round + k) % 3;
                let x = match side {
                    0 => ours.run(n)?,
                    1 => py.ask(what, n)?,
                    _ => py_retain.ask(what, n)?,
                };
                v[side].push(x);
            }
        }
        let ratios = |j: usize| -> Vec<f64> { v[0].iter().zip(&v[j]).map(|(a, b)| a / b).collect() };
        let (r1, r2) = (ratios(1), ratios(2));
        let (lo, hi) = (r1.iter().copied().fold(f64::INFINITY, f64::min), r1.iter().copied().fold(0.0, f64::max));
        println!(
            "{what:<16} {:>8.0} {:>9.0} {:>5.2}x {:>12} {:>9.0} {:>5.2}x",
            median(v[0].clone()),
            median(v[1].clone()),
            median(r1),
            format!("{lo:.2}-{hi:.2}x"),
            median(v[2].clone()),
            median(r2)
        );
    }
    for workers in [0, 2] {
        let what = format!("loader_workers{workers}");
        let (x, y) = (loader_speed(workers, 200)?, py.ask(&what, 200)?);
        println!("{what:<16} {x:>8.0} {y:>9.0} {:>5.2}x", x / y);
    }
    println!(
        "\nratio = ours / PyTorch (median of the per-round ratios): above 1 means faster than Python PyTorch eager\n\
         on the same machine; range = the lowest and highest per-round ratio against PyTorch as installed."
    );
    Ok(())
}
