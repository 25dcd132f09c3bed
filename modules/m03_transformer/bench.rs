//! Benchmark (not a test): all-MiniLM-L6-v2 through the course's BERT against Hugging Face
//! transformers' BertModel (both through torch's fused scaled_dot_product_attention; fp32) on this machine. Forward: mean-pooled,
//! normalised embeddings of a (32, 128) batch without autograd, in sentences/s. Fine-tuning
//! step: BERT + dropout + linear head on mean pooling, AdamW, batch (16, 128), in sentences/s.
//!
//! `cargo bench --bench m03_minilm [-- --rounds N] [-- --threads N] [-- --release-freed-memory]`
//!
//! The PyTorch twins (as installed, and with the same mallopt as ours) run as child processes
//! taking requests on stdin, so the sides take turns round by round; each row reports medians.

use anyhow::{Context, Result};
use course::bert::{self, BertClassifier, Pretrained};
use course::optim::{decay_groups, AdamW, Optimizer};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

struct Python {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Python {
    fn start(threads: usize, retain: bool) -> Result<Self> {
        let mut child = Command::new(".venv/bin/python")
            .args(["modules/m03_transformer/bench_minilm.py", "--threads", &threads.to_string()])
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
        v["per_s"].as_f64().with_context(|| format!("no per_s in {line:?}"))
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
        let p = Pretrained::at(&course::data::require("minilm", "")?)?;
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
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<usize>().ok())
    };
    if let Some(n) = get("--threads") {
        course::runtime::set_threads(n);
    }
    let rounds = get("--rounds").unwrap_or(5).max(1);
    let release = args.iter().any(|a| a == "--release-freed-memory");
    if !release {
        course::runtime::retain_freed_memory();
    }
    let threads = course::runtime::threads();
    println!("{}\n", course::report::env_report());
    let mut ours = Ours::new()?;
    let mut py = Python::start(threads, false)?;
    let mut py_retain = Python::start(threads, true)?;
    println!(
        "ours: glibc {}; PyTorch + transformers as installed, and with the same mallopt as ours\n",
        if release { "defaults (--release-freed-memory)" } else { "keeping freed memory, as the course's Run does" }
    );
    println!(
        "{:<26} {:>8} {:>9} {:>6} {:>12} {:>9} {:>6}   sentences/s, medians of {rounds} rounds",
        "what", "ours", "PyTorch", "ratio", "range", "+mallopt", "ratio"
    );
    for (what, label, n) in [("forward", "forward (32 x 128)", 4), ("train", "fine-tune step (16 x 128)", 3)] {
        ours.run(what, 1)?;
        py.ask(what, 1)?;
        py_retain.ask(what, 1)?;
        let mut v = [vec![], vec![], vec![]];
        for round in 0..rounds {
            for k in 0..3 {
                let side = (round + k) % 3;
                let x = match side {
                    0 => ours.run(what, n)?,
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
            "{label:<26} {:>8.1} {:>9.1} {:>5.2}x {:>12} {:>9.1} {:>5.2}x",
            median(v[0].clone()),
            median(v[1].clone()),
            median(r1),
            format!("{lo:.2}-{hi:.2}x"),
            median(v[2].clone()),
            median(r2)
        );
    }
    println!("\nratio = ours / PyTorch (median of the per-round ratios): above 1 means faster.");
    Ok(())
}
