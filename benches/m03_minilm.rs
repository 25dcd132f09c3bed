//! Benchmark (not a test): all-MiniLM-L6-v2 through the course's BERT against Hugging Face
//! transformers' BertModel (both through torch's fused scaled_dot_product_attention; fp32) on this machine. Forward: mean-pooled,
//! normalised embeddings of a (32, 128) batch without autograd, in sentences/s. Fine-tuning
//! step: BERT + dropout + linear head on mean pooling, AdamW, batch (16, 128), in sentences/s.
//!
//! `cargo bench --bench m03_minilm [-- --rounds N] [-- --threads N] [-- --release-freed-memory]`
//!
//! The PyTorch twins (as installed, and with the same mallopt as ours) run as child processes
//! taking requests on stdin, so the sides take turns round by round; each row reports medians.

use anyhow::Result;
mod benchkit;
use benchkit::PyTwin;
use course::models::bert::{self, BertClassifier, Pretrained};
use course::train::optim::{decay_groups, AdamW, Optimizer};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

struct Ours {
    model: BertClassifier,
    opt: AdamW,
    fx: Tensor,
    tx: Tensor,
    ty: Tensor,
    _vs: VarStore,
}

impl Ours {
    fn new() -> Result<Self> {
        tch::manual_seed(0);
        let p = Pretrained::at(&course::data::registry::require("minilm", "")?)?;
        let vs = VarStore::new(Device::Cpu);
        let model = BertClassifier::new(&vs.root(), &p.cfg, 5)?;
        bert::load_hf(&vs, &p.weights, &p.cfg, &[bert::HEAD])?;
        let (params, groups) = decay_groups(&vs, 0.01);
        let opt = AdamW::new(params, groups, 5e-5, (0.9, 0.999), 1e-8)?;
        let fx = Tensor::randint_low(1000, 30000, [32, 128], (Kind::Int64, Device::Cpu));
        let tx = Tensor::randint_low(1000, 30000, [16, 128], (Kind::Int64, Device::Cpu));
        let ty = Tensor::randint(5, [16], (Kind::Int64, Device::Cpu));
        Ok(Self { model, opt, fx, tx, ty, _vs: vs })
    }

    fn run(&mut self, what: &str, n: usize) -> Result<f64> {
        let t = Instant::now();
        if what == "forward" {
            let m = self.fx.ones_like();
            for _ in 0..n {
                let _e = tch::no_grad(|| self.model.bert.embed(&self.fx, &m));
            }
            Ok((n * 32) as f64 / t.elapsed().as_secs_f64())
        } else {
            let m = self.tx.ones_like();
            for _ in 0..n {
                self.opt.zero_grad();
                self.model.logits(&self.tx, &m, true).cross_entropy_for_logits(&self.ty).backward();
                self.opt.step()?;
            }
            Ok((n * 16) as f64 / t.elapsed().as_secs_f64())
        }
    }
}

fn main() -> Result<()> {
    let b = benchkit::BenchArgs::from_env(5);
    let (threads, rounds) = (b.threads, b.rounds);
    let mut ours = Ours::new()?;
    let script = "benches/m03_minilm.py";
    let mut py = PyTwin::start(script, threads, false, "per_s")?;
    let mut py_retain = PyTwin::start(script, threads, true, "per_s")?;
    println!(
        "ours: glibc {}; PyTorch + transformers as installed, and with the same mallopt as ours\n",
        b.allocator_note()
    );
    println!("{}", benchkit::header("sentences/s", rounds));
    for (what, label, n) in [("forward", "forward (32 x 128)", 4), ("train", "fine-tune step (16 x 128)", 3)] {
        let req = format!("{what} {n}");
        ours.run(what, 1)?;
        py.ask(&format!("{what} 1"))?;
        py_retain.ask(&format!("{what} 1"))?;
        let v = benchkit::rotate3(rounds, |side| match side {
            0 => ours.run(what, n),
            1 => py.ask(&req),
            _ => py_retain.ask(&req),
        })?;
        println!("{}", benchkit::row(label, &v));
    }
    println!("\nratio = ours / PyTorch (median of the per-round ratios): above 1 means faster.");
    Ok(())
}
