//! Benchmark (not a test): SmolLM2-135M-Instruct's prefill and decode speed, batch 1, ours
//! (`course::infer::generate_cached` over `models::llama`, the lesson's path) against Hugging
//! Face transformers on the same GGUF, in fp32 and bf16, the sides taking turns round by round.
//!
//! `cargo bench --bench smollm2 [-- --rounds N] [-- --threads N] [-- --new-tokens N] [-- --release-freed-memory]`
//!
//! Prefill: one forward over a ~100-token chat prompt with a fresh KV cache (prompt tokens/s).
//! Decode: greedy tokens after the first, one at a time through the cache (tokens/s); ours
//! includes the sampler and the streaming detokenizer, the twin runs a bare argmax loop.

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
        "{:<22} {:>9} {:>13} {:>6} {:>12}   tokens/s, medians of {rounds} rounds",
        "what", "ours", "transformers", "ratio", "range"
    );
    for (dtype, kind) in [("f32", Kind::Float), ("bf16", Kind::BFloat16)] {
        let m = ChatModel::load(Path::new(MODEL), kind, Device::Cpu)?;
        py.ask(&format!("load {dtype}"))?;
        let question = "Explain in a few sentences why the sky is blue, and what changes at sunset. \
                        Mention Rayleigh scattering, the wavelength of light and the length of the path through the air.";
        let prompt = m.encode(&m.template.render(&[Message::user(question)], true)?)?;
        let csv = prompt.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
        let run = |n: usize| -> Result<(f64, f64)> {
            let cfg = GenerateConfig { max_new_tokens: n, ..Default::default() };
            let g = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |_| Ok(()))?;
            Ok((g.prefill_tokens_per_sec(), g.decode_tokens_per_sec()))
        };
        // Warm-up: first-call kernel selection and allocation on both sides.
        run(4)?;
        py.ask(&format!("decode {csv} 4"))?;
        let (mut ours_p, mut ours_d, mut py_p, mut py_d) = (vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            for side in [round % 2, 1 - round % 2] {
                if side == 0 {
                    let (p, d) = run(new_tokens)?;
                    ours_p.push(p);
                    ours_d.push(d);
                } else {
                    py_p.push(py.ask(&format!("prefill {csv}"))?);
                    py_d.push(py.ask(&format!("decode {csv} {new_tokens}"))?);
                }
            }
        }
        for (what, o, t) in [("prefill", &ours_p, &py_p), ("decode", &ours_d, &py_d)] {
            let r: Vec<f64> = o.iter().zip(t.iter()).map(|(a, b)| a / b).collect();
            let (lo, hi) = (r.iter().copied().fold(f64::INFINITY, f64::min), r.iter().copied().fold(0.0, f64::max));
            println!(
                "{:<22} {:>9.1} {:>13.1} {:>5.2}x {:>12}",
                format!("{what} {dtype} ({} tok)", if what == "prefill" { prompt.len() } else { new_tokens }),
                benchkit::median(o.clone()),
                benchkit::median(t.clone()),
                benchkit::median(r),
                format!("{lo:.2}-{hi:.2}x")
            );
        }
    }
    println!("\nratio = ours / transformers (median of the per-round ratios): above 1 means faster.");
    Ok(())
}
