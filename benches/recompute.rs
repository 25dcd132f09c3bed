//! Benchmark (not a test): peak memory and step time of a stack of transformer-style MLP blocks,
//! `x + proj(dropout(gelu(fc(ln(x)))))` with C -> 4C -> C, trained plainly and with every
//! block checkpointed (`course::sys::recompute`), on the CPU in f32.
//!
//! `cargo bench --bench recompute [-- --quick] [-- --tokens N] [-- --embd C] [-- --layers L] [-- --steps S] [-- --default-malloc] [-- --trace DIR]`
//!
//! `--trace DIR` profiles one more step of each mode with `course::sys::profile`, saves the Chrome
//! traces in DIR and prints their top ops by self time.
//!
//! Memory is measured two ways. Exactly: one extra step runs under torch's profiler with
//! `profile_memory`, and `course::sys::profile::memory_peaks` gives the most bytes the step had
//! allocated at once ("step alloc"): activations kept for backward, gradients, temporaries.
//! And as the OS sees it: peak RSS is a process-wide high-water mark, so each mode runs in its
//! own child process (this
//! binary again, with `--child plain|recompute`), which reports its RSS after building the
//! model and data (the baseline) and its peak over the steps. The difference is what the
//! training steps held at their peak: activations, gradients and temporaries. Like a training
//! run (`Run::start`), the children keep freed memory for reuse (see
//! `runtime::retain_freed_memory`), so the peak is that of live memory plus allocator slack;
//! `--default-malloc` leaves glibc as is, which returns large blocks to the OS on free, so the
//! peak follows live memory more closely.
//!
//! What to expect: each plain block keeps about 14 N C floats (4-byte) plus an N x 4C byte
//! dropout mask until backward (LayerNorm input and output, fc output, GELU output, dropout
//! output, residual), checkpointed only its N x C input; the recompute costs one more forward
//! per block, about a third more compute per step.

use course::sys::profile::{format_table, memory_peaks, top_ops, Profiler, ProfilerOptions};
use course::sys::recompute::recompute_local;
use course::sys::rng::Rng;
use course::sys::runtime;
use std::process::Command;
use std::rc::Rc;
use std::time::Instant;
use tch::{nn, nn::Module, Device, Kind, Tensor};

struct Args {
    tokens: i64,
    embd: i64,
    layers: i64,
    steps: usize,
    default_malloc: bool,
    trace: Option<String>,
    child: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args { tokens: 8192, embd: 256, layers: 4, steps: 5, default_malloc: false, trace: None, child: None };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let num = |argv: &[String], i: usize, flag: &str| -> i64 {
        argv.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{flag} needs a positive integer"))
    };
    while i < argv.len() {
        match argv[i].as_str() {
            "--quick" => {
                a.tokens = 2048;
                a.steps = 3;
            }
            "--tokens" => {
                a.tokens = num(&argv, i, "--tokens");
                i += 1;
            }
            "--embd" => {
                a.embd = num(&argv, i, "--embd");
                i += 1;
            }
            "--layers" => {
                a.layers = num(&argv, i, "--layers");
                i += 1;
            }
            "--steps" => {
                a.steps = num(&argv, i, "--steps") as usize;
                i += 1;
            }
            "--default-malloc" => a.default_malloc = true,
            "--trace" => {
                a.trace = argv.get(i + 1).cloned();
                i += 1;
            }
            "--child" => {
                a.child = argv.get(i + 1).cloned();
                i += 1;
            }
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    a
}

/// One pre-norm MLP block with its residual.
struct Block {
    ln: nn::LayerNorm,
    fc: nn::Linear,
    proj: nn::Linear,
}

impl Block {
    fn new(vs: nn::Path, c: i64) -> Self {
        Self {
            ln: nn::layer_norm(&vs / "ln", vec![c], Default::default()),
            fc: nn::linear(&vs / "c_fc", c, 4 * c, Default::default()),
            proj: nn::linear(&vs / "c_proj", 4 * c, c, Default::default()),
        }
    }

    /// # Shapes
    /// `x`: `(N, C)` -> `(N, C)`
    fn forward(&self, x: &Tensor) -> Tensor {
        x + self.proj.forward(&self.fc.forward(&self.ln.forward(x)).gelu("tanh").dropout(0.1, true))
    }
}

fn child(a: &Args, mode: &str) {
    if !a.default_malloc {
        runtime::retain_freed_memory();
    }
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let blocks: Vec<Rc<Block>> = (0..a.layers).map(|i| Rc::new(Block::new(vs.root() / "h" / i, a.embd))).collect();
    let block_params: Vec<Vec<Tensor>> = (0..a.layers)
        .map(|i| {
            let prefix = format!("h.{i}.");
            let mut v: Vec<(String, Tensor)> =
                vs.variables().into_iter().filter(|(n, _)| n.starts_with(&prefix)).collect();
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v.into_iter().map(|(_, t)| t).collect()
        })
        .collect();
    let mut rng = Rng::new(1);
    let x = rng.normal_tensor(&[a.tokens, a.embd]).set_requires_grad(true);
    let w = rng.normal_tensor(&[a.tokens, a.embd]);
    let ckpt = mode == "recompute";

    let step = || {
        let mut h = x.shallow_clone();
        for (b, ps) in blocks.iter().zip(&block_params) {
            h = if ckpt {
                let b = Rc::clone(b);
                recompute_local(move |x| Ok(b.forward(x)), &h, ps).expect("checkpointed block")
            } else {
                b.forward(&h)
            };
        }
        (h * &w).mean(Kind::Float).backward();
        for (_, t) in vs.variables() {
            runtime::clear_grad(&t);
        }
        runtime::clear_grad(&x);
    };

    let baseline = runtime::current_rss_bytes();
    step(); // warm-up: thread pools, allocator
    let mut ms: Vec<f64> = (0..a.steps)
        .map(|_| {
            let t = Instant::now();
            step();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(|p, q| p.total_cmp(q));
    // One more step under torch's profiler with memory recording: its peak of bytes allocated
    // by the step is exact, unlike RSS, which also holds the allocator's slack.
    let path = match &a.trace {
        Some(dir) => std::path::Path::new(dir).join(format!("recompute-{mode}.json")),
        None => std::env::temp_dir().join(format!("recompute-{mode}-{}.json", std::process::id())),
    };
    let prof = Profiler::start_with(ProfilerOptions { profile_memory: true, ..Default::default() })
        .expect("starting the profiler");
    step();
    prof.stop_and_save(&path).expect("saving the trace");
    let step_alloc_peak = memory_peaks(&path).expect("reading the trace back").first().map(|p| p.peak_bytes);
    if a.trace.is_some() {
        let rows = top_ops(&path, 12).expect("reading the trace back");
        eprintln!("{mode}: one step, trace in {}\n{}", path.display(), format_table(&rows));
    } else {
        let _ = std::fs::remove_file(&path);
    }
    let out = serde_json::json!({
        "mode": mode,
        "baseline_rss": baseline,
        "peak_rss": runtime::peak_rss_bytes(),
        "step_ms_median": ms[ms.len() / 2],
        "step_ms_min": ms[0],
        "step_alloc_peak": step_alloc_peak,
    });
    println!("{out}");
}

fn main() {
    let a = parse_args();
    if let Some(mode) = &a.child {
        return child(&a, mode);
    }
    let exe = std::env::current_exe().expect("path of this benchmark");
    let (n, c, l) = (a.tokens, a.embd, a.layers);
    let mib = |b: f64| b / (1u64 << 20) as f64;
    println!(
        "recompute: {l} blocks of x + MLP(LN(x)), C = {c} -> {} -> {c}, {n} tokens (B x T), f32, CPU, {} threads, median of {} steps",
        4 * c,
        runtime::threads(),
        a.steps
    );
    // Per plain block, kept for backward: LN in/out, fc out, GELU out, dropout out (4 B each),
    // dropout mask (1 B), the residual's output: (1 + 1 + 4 + 4 + 4) N C floats + 4 N C bytes.
    let per_block = (14 * n * c * 4 + 4 * n * c) as f64;
    println!(
        "  estimated activations kept: plain {:.0} MiB ({:.0} per block), checkpointed {:.0} MiB (inputs) + one block's {:.0} MiB while it recomputes; parameters {:.1} MiB",
        mib(per_block * l as f64),
        mib(per_block),
        mib((n * c * 4 * l) as f64),
        mib(per_block),
        mib((l * (8 * c * c + 7 * c) * 4) as f64)
    );
    println!(
        "{:<12} {:>15} {:>13} {:>9} {:>18} {:>14} {:>14}",
        "mode", "step alloc MiB", "baseline MiB", "peak MiB", "peak-baseline MiB", "step ms (med)", "step ms (min)"
    );
    let mut rows = vec![];
    for mode in ["plain", "recompute"] {
        let out = Command::new(&exe)
            .args([
                "--child",
                mode,
                "--tokens",
                &n.to_string(),
                "--embd",
                &c.to_string(),
                "--layers",
                &l.to_string(),
                "--steps",
                &a.steps.to_string(),
            ])
            .args(a.default_malloc.then_some("--default-malloc"))
            .args(a.trace.iter().flat_map(|d| ["--trace", d.as_str()]))
            .output()
            .expect("running the benchmark child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if a.trace.is_some() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let Some(v) = stdout.lines().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) else {
            eprintln!("{mode}: child failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
            continue;
        };
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let (base, peak) = (mib(f("baseline_rss")), mib(f("peak_rss")));
        println!(
            "{:<12} {:>15.0} {:>13.0} {:>9.0} {:>18.0} {:>14.1} {:>14.1}",
            mode,
            mib(f("step_alloc_peak")),
            base,
            peak,
            peak - base,
            f("step_ms_median"),
            f("step_ms_min")
        );
        rows.push((f("step_alloc_peak"), peak - base, f("step_ms_median")));
    }
    if let [(a0, r0, t0), (a1, r1, t1)] = rows[..] {
        println!(
            "checkpointing: {:.2}x the step's allocated peak, {:.2}x its RSS growth, {:.2}x the step time",
            a1 / a0,
            r1 / r0,
            t1 / t0
        );
    }
}
