//! Benchmark (not a test): the fused softmax cross-entropy (`course::ops::cross_entropy`) against
//! the unfused tch ops (`cross_entropy_reference`: log_softmax, then nll_loss) and against Python
//! PyTorch eager `F.cross_entropy`, on the CPU in float32: forward without autograd, and
//! forward+backward through each side's autograd engine (gradient set to None before each step).
//! Prints achieved GB/s beside the machine's measured copy bandwidth.
//!
//! `cargo bench --bench cross_entropy [-- --rounds N] [-- --threads N] [-- --size I] [-- --release-freed-memory]`
//! (`--size I` runs only the I-th of SIZES, counting from 0)
//!
//! The three sides take turns round by round (benchkit::rotate3), so the drift of this shared
//! machine's speed falls on all of them alike; each cell is a median over rounds, each ratio the
//! median of the per-round ratios. The PyTorch twin runs with the same mallopt as ours.
//!
//! Bytes counted are the minimum traffic of the fused op: forward reads the logits once (4 N V
//! bytes); forward+backward also reads them again in backward and writes their gradient
//! (12 N V bytes). The targets and the per-row logsumexp (N values each) are left out. The same
//! count is used for every column, so GB/s ratios are time ratios. The unfused path moves more:
//! log_softmax writes an (N, V) tensor and its backward reads it back.

use anyhow::Result;
mod benchkit;
use benchkit::PyTwin;
use course::ops::{cross_entropy, cross_entropy_reference};
use course::sys::runtime::clear_grad;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// (N rows, V classes): a character-level GPT step (batch 64 x 128 tokens, 65 characters, as
/// m04), a mid-size vocabulary, and GPT-2's padded vocabulary of 50304 at 1024 tokens.
const SIZES: &[(i64, i64)] = &[(8192, 65), (4096, 8192), (1024, 50304)];

/// Mean milliseconds per call over `reps` calls.
fn mean_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    start.elapsed().as_secs_f64() * 1e3 / reps as f64
}

/// Read + write bandwidth of a 256 MiB f32 copy, in GB/s: the roof of a memory-bound kernel.
fn copy_roof() -> f64 {
    let src = Tensor::randn([1 << 26], (Kind::Float, Device::Cpu));
    let mut dst = src.empty_like();
    dst.copy_(&src);
    let ms = benchkit::median((0..5).map(|_| mean_ms(1, || dst.copy_(&src))).collect());
    2.0 * (1u64 << 26) as f64 * 4.0 / (ms * 1e-3) / 1e9
}

fn main() -> Result<()> {
    let b = benchkit::BenchArgs::from_env(5);
    let (threads, rounds) = (b.threads, b.rounds);
    let roof = tch::no_grad(copy_roof);
    let mut py = PyTwin::start("benches/cross_entropy.py", threads, !b.release, "ms")?;
    println!(
        "memory copy roof: {roof:.1} GB/s (256 MiB f32 copy, read + write); {threads} threads; glibc {}\n",
        b.allocator_note()
    );
    println!(
        "{:>12} {:>17} {:>9} {:>9} {:>9} {:>10} {:>8} {:>7} {:>9}   (ms per call, medians of {rounds} rounds)",
        "size", "pass", "ours", "tch", "PyTorch", "ours GB/s", "of roof", "vs tch", "vs torch"
    );
    tch::manual_seed(0);
    let sizes = match b.get("--size") {
        Some(i) => &SIZES[i.min(SIZES.len() - 1)..=i.min(SIZES.len() - 1)],
        None => SIZES,
    };
    for &(n, v) in sizes {
        let x = Tensor::randn([n, v], (Kind::Float, Device::Cpu));
        let t = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
        let xg = x.detach().set_requires_grad(true);
        // About 64 Mi elements of logits per timed call group, at least one call.
        let reps = ((1i64 << 26) / (n * v)).clamp(1, 100) as usize;
        for (pass, bytes) in [("forward", 4.0), ("forward_backward", 12.0)] {
            let fb = pass == "forward_backward";
            let mut ours = || {
                if fb {
                    clear_grad(&xg);
                    cross_entropy(&xg, &t).unwrap().backward();
                } else {
                    tch::no_grad(|| drop(cross_entropy(&x, &t).unwrap()));
                }
            };
            let mut unfused = || {
                if fb {
                    clear_grad(&xg);
                    cross_entropy_reference(&xg, &t).backward();
                } else {
                    tch::no_grad(|| drop(cross_entropy_reference(&x, &t)));
                }
            };
            let req = format!("{pass} {n} {v} {reps}");
            // Warm-up: first-touch of the allocations, the Python side's inputs.
            ours();
            unfused();
            py.ask(&format!("{pass} {n} {v} 1"))?;
            let ms = benchkit::rotate3(rounds, |side| match side {
                0 => Ok(mean_ms(reps, &mut ours)),
                1 => Ok(mean_ms(reps, &mut unfused)),
                _ => py.ask(&req),
            })?;
            let ratio = |j: usize| benchkit::median(ms[j].iter().zip(&ms[0]).map(|(o, f)| o / f).collect());
            let ours_ms = benchkit::median(ms[0].clone());
            let gbs = bytes * (n * v) as f64 / (ours_ms * 1e-3) / 1e9;
            println!(
                "{:>12} {:>17} {:>9.3} {:>9.3} {:>9.3} {:>10.1} {:>7.0}% {:>6.2}x {:>8.2}x",
                format!("{n}x{v}"),
                pass,
                ours_ms,
                benchkit::median(ms[1].clone()),
                benchkit::median(ms[2].clone()),
                gbs,
                100.0 * gbs / roof,
                ratio(1),
                ratio(2)
            );
        }
    }
    println!("\n'vs tch' and 'vs torch' are time ratios (other / ours): above 1 means the fused op is faster.");
    println!("f32 logits: 8192x65 = 2 MiB (fits L2/L3); 4096x8192 = 128 MiB; 1024x50304 = 197 MiB (beyond L3).");
    Ok(())
}
