//! Benchmark (not a test): m04's default GPT (the `cpu` preset) trained on the Shakespeare
//! characters by the course (libtorch through tch, our AdamW) and by Python PyTorch on the same
//! machine, eager and under `torch.compile`, in fp32 and with bf16 autocast. Tokens/s per
//! training step (batch sampling, forward, backward, clipping, AdamW), then the validation loss
//! each side reaches after the same number of steps.
//!
//! `cargo bench --bench m04_gpt [-- --rounds N] [-- --steps N] [-- --threads N] [-- --release-freed-memory]`
//!
//! Both Python twins run with the same glibc mallopt as ours (benches/pytwin.py) and take turns
//! with ours round by round. Needs data/lm/shakespeare-char: run m04_amp once (even --quick).

use anyhow::{Context, Result};
use course::train::amp::Precision;
mod benchkit;
use benchkit::PyTwin;
use course::data::lm::{self, TokenizerChoice};
use course::models::gpt::{Gpt, Preset};
use course::sys::rng::Rng;
use course::train::lm::clip_grad_norm;
use course::train::optim::{decay_groups, AdamW, Optimizer};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Tensor};

struct Ours {
    model: Gpt,
    opt: AdamW,
    named: Vec<(String, Tensor)>,
    train: Tensor,
    val: Tensor,
    rng: Rng,
    batch: i64,
    _vs: VarStore,
}

impl Ours {
    fn train(&mut self, p: Precision, n: usize) -> Result<f64> {
        let block = self.model.cfg.block_size;
        let t = Instant::now();
        for _ in 0..n {
            let (x, y) = lm::sample_batch(&self.train, self.batch, block, &mut self.rng, Device::Cpu)?;
            let loss = {
                let _ac = p.autocast(Device::Cpu)?;
                self.model.loss(&x, &y, true, false)
            };
            loss.backward();
            clip_grad_norm(&self.named, 1.0);
            self.opt.step()?;
            self.opt.zero_grad();
        }
        Ok((n as i64 * self.batch * block) as f64 / t.elapsed().as_secs_f64())
    }

    fn eval(&self) -> Result<f64> {
        let _g = tch::no_grad_guard();
        let mut rng = Rng::new(1);
        let mut s = 0.0;
        for _ in 0..20 {
            let (x, y) = lm::sample_batch(&self.val, self.batch, self.model.cfg.block_size, &mut rng, Device::Cpu)?;
            s += self.model.loss(&x, &y, false, false).double_value(&[]);
        }
        Ok(s / 20.0)
    }
}

fn main() -> Result<()> {
    let b = benchkit::BenchArgs::from_env(5);
    let (threads, rounds) = (b.threads, b.rounds);
    let steps = b.get("--steps").unwrap_or(30);
    let data = lm::prepare(
        &course::data::registry::data_root().join("lm"),
        "shakespeare",
        &lm::shakespeare_text()?,
        TokenizerChoice::Char,
        0,
    )?;
    let cfg = Preset::Cpu.config(data.meta.vocab_size);
    let batch = 16;
    let init = format!("{} {} {} {} {batch}", cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size);
    println!(
        "GPT {} layers x {} wide, {} heads, {}-token context, batch {batch}; glibc {} on every side\n",
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        cfg.block_size,
        b.allocator_note()
    );
    let script = "benches/m04_gpt.py";
    let mut eager = PyTwin::start(script, threads, !b.release, "value")?;
    let mut compiled = PyTwin::start(script, threads, !b.release, "value")?;
    eager.ask(&format!("init eager {init}"))?;
    compiled.ask(&format!("init compile {init}"))?;
    println!("{}", benchkit::header_for("tokens/s", rounds, "eager", "compile"));
    for p in [Precision::Fp32, Precision::Bf16] {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let model = Gpt::new(&vs.root(), &cfg)?;
        let (params, groups) = decay_groups(&vs, 0.1);
        let named = params.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect();
        let opt = AdamW::new(params, groups, 1e-3, (0.9, 0.99), 1e-8)?;
        let mut ours = Ours {
            model,
            opt,
            named,
            train: data.train.shallow_clone(),
            val: data.val.shallow_clone(),
            rng: Rng::new(0),
            batch,
            _vs: vs,
        };
        if p == Precision::Bf16 {
            // Fresh Python models too, so all three sides count steps from the same start.
            eager.ask(&format!("init eager {init}"))?;
            compiled.ask(&format!("init compile {init}"))?;
        }
        // Warm-up (and torch.compile's compilation) outside the timing.
        let req = format!("train {} {steps}", p.name());
        let warm = format!("train {} 3", p.name());
        ours.train(p, 3)?;
        eager.ask(&warm)?;
        let t = Instant::now();
        compiled.ask(&warm).context("torch.compile on this CPU")?;
        let compile_s = t.elapsed().as_secs_f64();
        let v = benchkit::rotate3(rounds, |side| match side {
            0 => ours.train(p, steps),
            1 => eager.ask(&req),
            _ => compiled.ask(&req),
        })?;
        println!("{}", benchkit::row(&format!("train step, {}", p.name()), &v));
        let done = 3 + rounds * steps;
        println!(
            "  val loss after {done} steps: ours {:.4}, eager {:.4}, compile {:.4} (compiling took {compile_s:.0} s)",
            ours.eval()?,
            eager.ask("eval")?,
            compiled.ask("eval")?
        );
    }
    println!("\nratio = ours / PyTorch (median of the per-round ratios): above 1 means faster.");
    Ok(())
}
