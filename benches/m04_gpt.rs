//! Benchmark (not a test): m04's training step against the same GPT written as a plain PyTorch
//! eager loop, on this machine, in fp32 and with bf16 autocast. Ours is the lesson's own step,
//! `train::lm::train_step` with m04's recipe and defaults (`LmTrainConfig::shakespeare_char`,
//! the `cpu` preset, the kernels m04 turns on by default): batch sampling, forward, backward,
//! unscale, clipping, the non-finite check, AdamW. The twins: PyTorch as a user runs it (glibc
//! defaults, torch's own thread count: "plain") and PyTorch with our glibc mallopt and thread
//! count ("matched"); `-- --compile` swaps the matched twin for `torch.compile`. Tokens/s per
//! step, then the validation loss each side reaches after the same steps.
//!
//! `cargo bench --bench m04_gpt [-- --rounds N] [-- --steps N] [-- --threads N] [-- --release-freed-memory] [-- --compile] [-- --unfused] [-- --fused-loss]`
//!
//! The sides take turns round by round. Needs data/lm/shakespeare-char: run m04_amp once (even --quick).

use anyhow::{Context, Result};
mod benchkit;
use benchkit::PyTwin;
use course::data::lm::{self, LmData, Split, TokenizerChoice};
use course::models::gpt::{Gpt, Kernels, Preset};
use course::sys::rng::Rng;
use course::train::amp::Precision;
use course::train::hooks::NoHooks;
use course::train::lm::{train_step, LmTrainConfig, StepState};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Tensor};

struct Ours {
    model: Gpt,
    st: StepState,
    cfg: LmTrainConfig,
    train: Tensor,
    val: Tensor,
    rng: Rng,
    step: usize,
    _vs: VarStore,
}

impl Ours {
    fn train(&mut self, n: usize) -> Result<f64> {
        let data = LmData { train: &self.train, val: &self.val };
        let lr = self.cfg.lr;
        let t = Instant::now();
        for _ in 0..n {
            train_step(
                &self.model,
                &data,
                &mut self.st,
                &self.cfg,
                self.step,
                lr,
                &mut self.rng,
                &mut NoHooks,
                None,
                None,
            )?;
            self.step += 1;
        }
        Ok((n as i64 * self.cfg.tokens_per_step()) as f64 / t.elapsed().as_secs_f64())
    }

    fn eval(&self) -> Result<f64> {
        let _g = tch::no_grad_guard();
        let data = LmData { train: &self.train, val: &self.val };
        let mut rng = Rng::new(1);
        let mut s = 0.0;
        for _ in 0..20 {
            let (x, y) = lm::BatchSource::batch(
                &data,
                Split::Val,
                self.cfg.batch_size,
                self.cfg.block_size,
                &mut rng,
                Device::Cpu,
            )?;
            s += self.model.loss(&x, &y, false, self.cfg.fused_loss).double_value(&[]);
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
    let recipe = LmTrainConfig::shakespeare_char();
    let batch = recipe.batch_size;
    let kernels = if b.flag("--unfused") { Kernels::default() } else { Kernels::lesson_default() };
    let fused_loss = b.flag("--fused-loss") || (!b.flag("--unfused") && recipe.fused_loss);
    let compile = b.flag("--compile");
    let init = format!("{} {} {} {} {batch}", cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size);
    println!(
        "GPT {} layers x {} wide, {} heads, {}-token context, batch {batch}; ours: fused bias+GELU {}, oneDNN linear {}, fused loss {}, glibc {}\n",
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        cfg.block_size,
        kernels.fused_bias_gelu,
        kernels.onednn_linear,
        fused_loss,
        b.allocator_note()
    );
    let script = "benches/m04_gpt.py";
    // As a user runs it: no mallopt, torch's own thread count.
    let mut plain = PyTwin::start(script, 0, false, "value")?;
    let mut matched = PyTwin::start(script, threads, !b.release, "value")?;
    let mode = if compile { "compile" } else { "eager" };
    let (twin1, twin2) = ("plain", if compile { "compile" } else { "matched" });
    println!("{}", benchkit::header_for("tokens/s", rounds, twin1, twin2));
    for p in [Precision::Fp32, Precision::Bf16] {
        // Fresh models on every side, so all three count steps from the same start.
        plain.ask(&format!("init eager {init}"))?;
        matched.ask(&format!("init {mode} {init}"))?;
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let mut model = Gpt::new(&vs.root(), &cfg)?;
        model.kernels = kernels;
        let tc = LmTrainConfig { precision: p, fused_loss, block_size: cfg.block_size, ..recipe.clone() };
        let st = StepState::new(&vs, &tc)?;
        let mut ours = Ours {
            model,
            st,
            cfg: tc,
            train: data.train.shallow_clone(),
            val: data.val.shallow_clone(),
            rng: Rng::new(0),
            step: 0,
            _vs: vs,
        };
        // Warm-up (and torch.compile's compilation) outside the timing.
        let req = format!("train {} {steps}", p.name());
        let warm = format!("train {} 3", p.name());
        ours.train(3)?;
        plain.ask(&warm)?;
        let t = Instant::now();
        matched.ask(&warm).context("the matched twin's warm-up")?;
        let warm_s = t.elapsed().as_secs_f64();
        let v = benchkit::rotate3(rounds, |side| match side {
            0 => ours.train(steps),
            1 => plain.ask(&req),
            _ => matched.ask(&req),
        })?;
        println!("{}", benchkit::row(&format!("train step, {}", p.name()), &v));
        let done = 3 + rounds * steps;
        println!(
            "  val loss after {done} steps: ours {:.4}, {twin1} {:.4}, {twin2} {:.4}{}",
            ours.eval()?,
            plain.ask("eval")?,
            matched.ask("eval")?,
            if compile { format!(" (compiling took {warm_s:.0} s)") } else { String::new() }
        );
    }
    println!("\nratio = ours / PyTorch (median of the per-round ratios): above 1 means faster.");
    Ok(())
}
