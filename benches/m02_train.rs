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
//! (`course::sys::runtime::retain_freed_memory`), so the table shows what the setting buys and what
//! remains once both sides have it.

use anyhow::Result;
mod benchkit;
use benchkit::PyTwin;
use course::data::loader::DataLoader;
use course::data::vision::{collate_images, ImageDataset, ImageSubset, Transform};
use course::models::{CnnConfig, InitKind, MlpConfig, ModelConfig};
use course::nn::loss::cross_entropy;
use course::train::optim::{decay_groups, AdamW, Optimizer};
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

fn loader_speed(workers: usize, batches: usize) -> Result<f64> {
    let set = Arc::new(ImageDataset::Mnist.load(true)?);
    let ds = ImageSubset::new(set, Transform { normalize: Some((0.1307, 0.3081)), ..Default::default() });
    let l = DataLoader::new(Arc::new(ds), 128, collate_images(28, 28))?.shuffle(0).workers(workers);
    let t = Instant::now();
    let mut n = 0;
    for b in l.epoch(0).take(batches) {
        n += b?.labels.size()[0];
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let b = benchkit::BenchArgs::from_env(7);
    let (threads, rounds) = (b.threads, b.rounds);
    let steps = b.get("--steps").unwrap_or(60);
    let script = "benches/m02_train.py";
    let mut py = PyTwin::start(script, threads, false, "samples_per_s")?;
    let mut py_retain = PyTwin::start(script, threads, true, "samples_per_s")?;
    let mlp = ModelConfig::Mlp(MlpConfig {
        input: 784,
        hidden: vec![512, 256],
        classes: 10,
        dropout: 0.2,
        init: InitKind::Default,
    });
    let cnn =
        ModelConfig::Cnn(CnnConfig { channels: (32, 64), hidden: 256, classes: 10, dropout: 0.3, conv_bias: true });
    println!(
        "ours: glibc {}; PyTorch as installed (glibc defaults), and with the same mallopt as ours\n",
        b.allocator_note()
    );
    println!("{}", benchkit::header("samples/s", rounds));
    // The three take turns, round after round, who goes first rotating, after one untimed
    // warm-up round.
    for (what, cfg, n) in [("train_mlp", &mlp, steps * 4), ("train_cnn", &cnn, steps)] {
        let mut ours = Trainer::new(cfg)?;
        let req = format!("{what} {n}");
        ours.run(n)?;
        py.ask(&req)?;
        py_retain.ask(&req)?;
        let v = benchkit::rotate3(rounds, |side| match side {
            0 => ours.run(n),
            1 => py.ask(&req),
            _ => py_retain.ask(&req),
        })?;
        println!("{}", benchkit::row(what, &v));
    }
    for workers in [0, 2] {
        let what = format!("loader_workers{workers}");
        let (x, y) = (loader_speed(workers, 200)?, py.ask(&format!("{what} 200"))?);
        println!("{what:<26} {x:>9.0} {y:>9.0} {:>5.2}x", x / y);
    }
    println!(
        "\nratio = ours / PyTorch (median of the per-round ratios): above 1 means faster than Python PyTorch eager\n\
         on the same machine; range = the lowest and highest per-round ratio against PyTorch as installed."
    );
    Ok(())
}
