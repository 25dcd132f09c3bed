//! Benchmark (not a test): one LoRA instruction-tuning step of SmolLM2-135M-Instruct — m06
//! `train`'s own step (`train::lm::train_step` with its recipe: r 8, α 16, dropout 0.05 on the
//! seven projections, the base frozen in bf16, the adapter in fp32, AdamW, clipping) — against
//! Hugging Face transformers + peft with the same model (the same GGUF), batch, rank and dtype
//! (benches/lora_sft.py). Both sides train on one fixed batch of 8 examples from identity.json
//! and Alpaca through the chat template, padded to the longest (192 tokens at most), the loss on
//! the assistant's tokens only.
//!
//! `cargo bench --bench lora_sft [-- --rounds N] [-- --steps N] [-- --threads N]`
//!
//! The sides take turns round by round; tokens/s counts batch x length per step (padding
//! included, the same on both sides). Each round also runs our step with tch's dropout in place
//! of the counter-based kernel (`ops::dropout`), the A/B of that kernel.

use anyhow::Result;
mod benchkit;
use benchkit::PyTwin;
use course::data::lm::{BatchSource, Split};
use course::data::sft::{pad_batch, prepare, read_alpaca, SftExample};
use course::infer::ChatModel;
use course::io::peft::{AdapterConfig, TargetModules};
use course::models::llama::LORA_TARGETS;
use course::sys::rng::Rng;
use course::train::hooks::NoHooks;
use course::train::lm::{train_step, LmTrainConfig, StepState};
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The one batch, whatever is asked.
struct Fixed(Tensor, Tensor);
impl BatchSource for Fixed {
    fn batch(&self, _: Split, _: i64, _: i64, _: &mut Rng, _: Device) -> Result<(Tensor, Tensor)> {
        Ok((self.0.shallow_clone(), self.1.shallow_clone()))
    }
}

fn main() -> Result<()> {
    let b = benchkit::BenchArgs::from_env(5);
    let (rounds, steps) = (b.rounds, b.get("--steps").unwrap_or(3));
    let mut m = ChatModel::load(Path::new(MODEL), Kind::BFloat16, Device::Cpu)?;
    // The batch: 4 identity questions (name and author filled) and 4 Alpaca records.
    let mut identity = read_alpaca(&course::data::registry::require("llamafactory", "identity.json")?)?;
    identity.iter_mut().for_each(|r| r.fill(&[("name", "Lumen"), ("author", "the llm-course")]));
    let alpaca = read_alpaca(&course::data::registry::require("llamafactory", "alpaca_en_demo.json")?)?;
    let records: Vec<_> = identity.iter().take(4).chain(alpaca.iter().take(4)).cloned().collect();
    let ex: Vec<SftExample> = records.iter().map(|r| m.encode_for_training(&r.messages())).collect::<Result<_>>()?;
    let ex = prepare(ex, 192, "benchmark batch")?;
    let len = ex.iter().map(|e| e.ids.len()).max().unwrap_or(1) as i64;
    let pad = m.model.cfg.eos_token_id.unwrap_or(0);
    let (x, y) = pad_batch(&ex, len, pad, Device::Cpu);
    let batch_file = std::env::temp_dir().join(format!("course-lora-sft-{}.json", std::process::id()));
    let rows = |t: &Tensor| -> Vec<Vec<i64>> { (0..t.size()[0]).map(|i| Vec::try_from(t.get(i)).unwrap()).collect() };
    std::fs::write(&batch_file, serde_json::to_vec(&serde_json::json!({ "ids": rows(&x), "targets": rows(&y) }))?)?;

    let targets = TargetModules::Names(LORA_TARGETS.iter().map(|s| s.to_string()).collect());
    let cfg = AdapterConfig::lora(8, 16.0, 0.05, targets, false);
    let avs = tch::nn::VarStore::new(Device::Cpu);
    m.model.add_lora(&avs.root(), &cfg)?;
    // m06 train's recipe (see its TrainArgs): batch 8, lr 1e-3, no weight decay, clipping at 1.
    let tc = LmTrainConfig {
        batch_size: x.size()[0],
        block_size: len,
        lr: 1e-3,
        weight_decay: 0.0,
        beta2: 0.999,
        grad_clip: 1.0,
        ..LmTrainConfig::shakespeare_char()
    };
    let mut st = StepState::new(&avs, &tc)?;
    let data = Fixed(x.shallow_clone(), y.shallow_clone());
    let mut rng = Rng::new(0);
    let mut step = 0;
    let mut ours = |n: usize| -> Result<f64> {
        let t = Instant::now();
        for _ in 0..n {
            train_step(&m.model, &data, &mut st, &tc, step, tc.lr, &mut rng, &mut NoHooks, None, None)?;
            step += 1;
        }
        Ok((n as i64 * x.numel() as i64) as f64 / t.elapsed().as_secs_f64())
    };
    let mut py = PyTwin::start("benches/lora_sft.py", b.threads, !b.release, "value")?;
    py.ask("load bf16 8 16")?;
    println!(
        "{} threads; batch {} x {len} tokens ({} trained); LoRA r 8 on the seven projections, base bf16, adapter fp32\n",
        b.threads,
        x.size()[0],
        y.ne(-100).sum(Kind::Int64).int64_value(&[])
    );
    // Warm-up, then the rounds.
    ours(1)?;
    py.ask(&format!("step {} 1", batch_file.display()))?;
    let (mut a, mut p, mut t) = (vec![], vec![], vec![]);
    for r in 0..rounds {
        let (o, q) = if r % 2 == 0 {
            (ours(steps)?, py.ask(&format!("step {} {steps}", batch_file.display()))?)
        } else {
            let q = py.ask(&format!("step {} {steps}", batch_file.display()))?;
            (ours(steps)?, q)
        };
        // Ours again with tch's dropout (a stored Bernoulli mask) in place of the counter-based one.
        course::ops::dropout::set_counter_based(false);
        let od = ours(steps)?;
        course::ops::dropout::set_counter_based(true);
        println!(
            "round {r}: ours {o:.0} tok/s ({od:.0} with tch's dropout), transformers + peft {q:.0} tok/s, {:.2}x ({:.2}x)",
            o / q,
            od / q
        );
        a.push(o);
        p.push(q);
        t.push(od / q);
    }
    let ratios: Vec<f64> = a.iter().zip(&p).map(|(o, q)| o / q).collect();
    let lo = ratios.iter().cloned().fold(f64::MAX, f64::min);
    let hi = ratios.iter().cloned().fold(f64::MIN, f64::max);
    println!(
        "\nmedians of {rounds} rounds of {steps} steps: ours {:.0} tok/s, transformers + peft {:.0} tok/s, {:.2}x ({lo:.2}-{hi:.2})",
        benchkit::median(a),
        benchkit::median(p),
        benchkit::median(ratios.clone())
    );
    println!("with tch's dropout instead of the counter-based one: {:.2}x", benchkit::median(t));
    let _ = std::fs::remove_file(&batch_file);
    Ok(())
}
