//! Benchmark (not a test): SmolLM2-135M-Instruct's prefill and decode speed, batch 1, ours
//! (`course::infer::generate_cached` over `models::llama`, the lesson's path) against Hugging
//! Face transformers on the same GGUF, in fp32 and bf16, the sides taking turns round by round.
//!
//! `cargo bench --bench smollm2 [-- --rounds N] [-- --threads N] [-- --new-tokens N] [-- --release-freed-memory]`
//!
//! Prefill: one forward over a ~100-token chat prompt with a fresh KV cache (prompt tokens/s).
//! Decode: greedy tokens after the first, one at a time through the cache (tokens/s); ours
//! includes the sampler and the streaming detokenizer, the twin runs a bare argmax loop.
//! A third side runs ours with `Llama::set_fused(false)`: the plain tch ops that the fused CPU
//! kernels of `ops::llama` replace, so the table also gives what those kernels are worth.

use anyhow::Result;
mod benchkit;
use benchkit::PyTwin;
use course::infer::generate::{generate_cached, GenerateConfig};
use course::infer::{ChatModel, Message};
use std::path::Path;
use tch::{Device, Kind};

const MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn main() -> Result<()> {
    let b = benchkit::BenchArgs::from_env(3);
    let rounds = b.rounds;
    let new_tokens = b.get("--new-tokens").unwrap_or(64).max(2);
    let mut py = PyTwin::start("benches/smollm2.py", b.threads, !b.release, "value")?;
    println!("batch 1, {} threads, {new_tokens} new tokens per decode, glibc {}\n", b.threads, b.allocator_note());
    println!(
        "{:<22} {:>9} {:>13} {:>6} {:>12} {:>10} {:>12}   tokens/s, medians of {rounds} rounds",
        "what", "ours", "transformers", "ratio", "range", "plain ops", "fused/plain"
    );
    for (dtype, kind) in [("f32", Kind::Float), ("bf16", Kind::BFloat16)] {
        let mut m = ChatModel::load(Path::new(MODEL), kind, Device::Cpu)?;
        py.ask(&format!("load {dtype}"))?;
        let question = "Explain in a few sentences why the sky is blue, and what changes at sunset. \
                        Mention Rayleigh scattering, the wavelength of light and the length of the path through the air.";
        let prompt = m.encode(&m.template.render(&[Message::user(question)], true)?)?;
        let csv = prompt.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
        let run = |m: &ChatModel, n: usize| -> Result<(f64, f64)> {
            let cfg = GenerateConfig { max_new_tokens: n, ..Default::default() };
            let g = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |_| Ok(()))?;
            Ok((g.prefill_tokens_per_sec(), g.decode_tokens_per_sec()))
        };
        // Warm-up: first-call kernel selection and allocation on all sides.
        run(&m, 4)?;
        m.model.set_fused(false);
        run(&m, 4)?;
        m.model.set_fused(true);
        py.ask(&format!("decode {csv} 4"))?;
        // Per side: prefill and decode tokens/s of each round. Side 0 ours (fused CPU ops), 1 ours
        // with the plain tch ops they replace (ops::llama's references), 2 transformers.
        let mut got: [[Vec<f64>; 2]; 3] = Default::default();
        for round in 0..rounds {
            for k in 0..3 {
                let side = (round + k) % 3;
                let (p, d) = match side {
                    0 | 1 => {
                        m.model.set_fused(side == 0);
                        let r = run(&m, new_tokens)?;
                        m.model.set_fused(true);
                        r
                    }
                    _ => (py.ask(&format!("prefill {csv}"))?, py.ask(&format!("decode {csv} {new_tokens}"))?),
                };
                got[side][0].push(p);
                got[side][1].push(d);
            }
        }
        for (i, what) in ["prefill", "decode"].into_iter().enumerate() {
            let (o, plain, t) = (&got[0][i], &got[1][i], &got[2][i]);
            let ratios = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(a, b)| a / b).collect() };
            let r = ratios(o, t);
            let (lo, hi) = (r.iter().copied().fold(f64::INFINITY, f64::min), r.iter().copied().fold(0.0, f64::max));
            println!(
                "{:<22} {:>9.1} {:>13.1} {:>5.2}x {:>12} {:>10.1} {:>11.2}x",
                format!("{what} {dtype} ({} tok)", if what == "prefill" { prompt.len() } else { new_tokens }),
                benchkit::median(o.clone()),
                benchkit::median(t.clone()),
                benchkit::median(r),
                format!("{lo:.2}-{hi:.2}x"),
                benchkit::median(plain.clone()),
                benchkit::median(ratios(o, plain)),
            );
        }
    }
    println!("\nratio = ours / transformers (median of the per-round ratios): above 1 means faster.");
    println!("plain ops = ours with Llama::set_fused(false): the tch ops that ops::llama's kernels replace.");
    Ok(())
}
