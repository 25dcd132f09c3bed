//! Benchmark (not a test): `course::ops::linear` (oneDNN's GEMM for the forward and the input
//! gradient, mm for the weight gradient) against tch's `linear` (`linear_reference`, ATen's
//! addmm/mm through MKL) and Python PyTorch eager `F.linear`, on the CPU in float32, at the
//! shapes of m04's GPT step (1024 tokens; 256 wide: qkv 256 -> 768, attention out 256 -> 256,
//! MLP 256 -> 1024 and 1024 -> 256) and one larger layer. Forward without autograd, and
//! forward+backward with input, weight and bias requiring grad (gradients set to None first;
//! tch cannot hand backward an upstream gradient, so every side runs `(y * up).sum().backward()`).
//!
//! `cargo bench --bench linear [-- --rounds N] [-- --threads N] [-- --release-freed-memory]`
//!
//! The three sides take turns round by round (benchkit::rotate3); each cell is a median over
//! rounds, each ratio the median of the per-round ratios. GFLOP/s counts 2 M K N per GEMM
//! (one in the forward, three in forward+backward).

use anyhow::Result;
mod benchkit;
use benchkit::PyTwin;
use course::ops::{linear, linear_reference, linear_uses_onednn};
use course::sys::runtime::clear_grad;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// (M tokens, K in, N out).
const SHAPES: &[(i64, i64, i64)] =
    &[(1024, 256, 768), (1024, 256, 256), (1024, 256, 1024), (1024, 1024, 256), (4096, 1024, 4096)];

fn mean_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    start.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn main() -> Result<()> {
    let b = benchkit::BenchArgs::from_env(7);
    let (threads, rounds) = (b.threads, b.rounds);
    let mut py = PyTwin::start("benches/linear.py", threads, !b.release, "ms")?;
    let probe = Tensor::zeros([1, 1], (Kind::Float, Device::Cpu));
    println!(
        "{threads} threads; glibc {}; ops::linear runs oneDNN here: {}\n",
        b.allocator_note(),
        linear_uses_onednn(&probe)
    );
    println!(
        "{:>16} {:>17} {:>9} {:>9} {:>9} {:>10} {:>7} {:>9}   (ms per call, medians of {rounds} rounds)",
        "M x K -> N", "pass", "ours", "tch", "PyTorch", "ours GF/s", "vs tch", "vs torch"
    );
    tch::manual_seed(0);
    for &(m, k, n) in SHAPES {
        let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * (k as f64).powf(-0.5);
        let bias = Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let up = Tensor::randn([m, n], (Kind::Float, Device::Cpu));
        let (xg, wg, bg) = (x.set_requires_grad(true), w.set_requires_grad(true), bias.set_requires_grad(true));
        // About 4 GFLOP of forward GEMM per timed group, at least 2 calls.
        let reps = ((4e9 / (2.0 * (m * k * n) as f64)) as usize).clamp(2, 200);
        for (pass, gemms) in [("forward", 1.0), ("forward_backward", 3.0)] {
            let fb = pass == "forward_backward";
            let run = |ours: bool| {
                let f = |x: &Tensor| {
                    if ours {
                        linear(x, &wg, Some(&bg)).expect("ops::linear")
                    } else {
                        linear_reference(x, &wg, Some(&bg))
                    }
                };
                if fb {
                    for t in [&xg, &wg, &bg] {
                        clear_grad(t);
                    }
                    (f(&xg) * &up).sum(Kind::Float).backward();
                } else {
                    tch::no_grad(|| drop(f(&xg)));
                }
            };
            let req = format!("{pass} {m} {k} {n} {reps}");
            run(true);
            run(false);
            py.ask(&format!("{pass} {m} {k} {n} 1"))?;
            let ms = benchkit::rotate3(rounds, |side| match side {
                0 => Ok(mean_ms(reps, || run(true))),
                1 => Ok(mean_ms(reps, || run(false))),
                _ => py.ask(&req),
            })?;
            let ratio = |j: usize| benchkit::median(ms[j].iter().zip(&ms[0]).map(|(o, f)| o / f).collect());
            let ours_ms = benchkit::median(ms[0].clone());
            println!(
                "{:>16} {:>17} {:>9.3} {:>9.3} {:>9.3} {:>10.0} {:>6.2}x {:>8.2}x",
                format!("{m}x{k} -> {n}"),
                pass,
                ours_ms,
                benchkit::median(ms[1].clone()),
                benchkit::median(ms[2].clone()),
                gemms * 2.0 * (m * k * n) as f64 / (ours_ms * 1e-3) / 1e9,
                ratio(1),
                ratio(2)
            );
        }
    }
    println!("\n'vs tch' and 'vs torch' are time ratios (other / ours): above 1 means ops::linear is faster.");
    Ok(())
}
