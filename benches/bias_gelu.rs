//! Benchmark (not a test): fused bias+GELU against the unfused tch ops (`(x + b).gelu("tanh")`)
//! and against Python PyTorch eager running the same ops, on the CPU, f32, forward and
//! forward+backward. Prints achieved GB/s beside the machine's measured copy bandwidth.
//!
//! `cargo bench --bench bias_gelu [-- --quick] [-- --threads N] [-- --no-python] [-- --default-malloc]`
//!
//! Allocator: every op here returns a fresh 1-128 MiB tensor. With glibc's defaults such blocks
//! are mmap'd or trimmed back to the OS on free, so each call also pays ~4k page faults per
//! 16 MiB, for both implementations alike, which hides the kernels. By default both this process
//! and the Python one therefore keep freed memory (mallopt: no mmap, no trim), the effect
//! PyTorch's CPU tuning guides get from jemalloc/tcmalloc. `--default-malloc` measures glibc as is.
//!
//! Bytes counted are the minimum traffic of the fused op: forward reads x and writes y (2 N
//! floats); forward+backward adds reading the upstream gradient and x, and writing the input
//! gradient (5 N floats). The same byte count is used for every implementation, so GB/s ratios
//! are time ratios. The PyTorch column runs `F.gelu(x + b).backward(g)` through its autograd
//! engine, which adds a small fixed cost per call (visible only at the smallest size).

use course::ops::{bias_gelu, bias_gelu_backward, bias_gelu_forward, bias_gelu_reference};
use std::collections::HashMap;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const SIZES: &[(i64, i64)] = &[(256, 1024), (2048, 2048), (4096, 4096), (8192, 4096)];

extern "C" {
    fn mallopt(param: i32, value: i32) -> i32;
}

/// glibc: M_TRIM_THRESHOLD = -1, M_MMAP_MAX = -4. Keep freed memory for reuse.
fn retain_freed_memory() {
    unsafe {
        mallopt(-4, 0);
        mallopt(-1, i32::MAX);
    }
}

fn median_ms(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

fn python_numbers(threads: usize, quick: bool, retain: bool) -> HashMap<(i64, i64, String), f64> {
    let mut out = HashMap::new();
    let py = std::path::Path::new(".venv/bin/python");
    if !py.exists() {
        eprintln!("(no .venv/bin/python: skipping the PyTorch column; run `python3 scripts/setup.py`)");
        return out;
    }
    let mut cmd = std::process::Command::new(py);
    cmd.args(["benches/bias_gelu.py", "--threads", &threads.to_string()]);
    if quick {
        cmd.arg("--quick");
    }
    if retain {
        cmd.arg("--retain-freed-memory");
    }
    match cmd.output() {
        Ok(o) if o.status.success() => {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    let key = (
                        v["rows"].as_i64().unwrap_or(0),
                        v["cols"].as_i64().unwrap_or(0),
                        v["pass"].as_str().unwrap_or("").to_string(),
                    );
                    out.insert(key, v["ms"].as_f64().unwrap_or(f64::NAN));
                }
            }
        }
        Ok(o) => eprintln!("(python benchmark failed: {})", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("(python benchmark could not start: {e})"),
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let no_python = args.iter().any(|a| a == "--no-python");
    let retain = !args.iter().any(|a| a == "--default-malloc");
    if retain {
        retain_freed_memory();
    }
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n: usize =
            args.get(i + 1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow::anyhow!("--threads needs a number"))?;
        course::sys::runtime::set_threads(n);
    }
    let threads = course::sys::runtime::threads();
    let _guard = tch::no_grad_guard();
    // Roof: a 256 MiB copy, counting the read and the write.
    let src = Tensor::randn([1 << 26], (Kind::Float, Device::Cpu));
    let mut dst = src.empty_like();
    let copy_ms = median_ms(|| dst.copy_(&src), 5);
    let roof = 2.0 * (1u64 << 26) as f64 * 4.0 / (copy_ms * 1e-3) / 1e9;
    drop((src, dst));
    println!("{}", course::run::report::env_report());
    println!(
        "memory copy roof: {roof:.1} GB/s (256 MiB copy, read + write), {threads} threads, allocator: {}\n",
        if retain { "glibc keeping freed memory (both processes)" } else { "glibc defaults" }
    );
    let py = if no_python { HashMap::new() } else { python_numbers(threads, quick, retain) };
    drop(_guard);

    println!(
        "{:>11} {:>16} {:>10} {:>10} {:>10} {:>9} {:>9} {:>11} {:>9}",
        "size", "pass", "fused ms", "tch ms", "torch.py ms", "fused GB/s", "of roof", "vs tch", "vs torch"
    );
    let sizes = if quick { &SIZES[..2] } else { SIZES };
    for &(rows, cols) in sizes {
        tch::manual_seed(0);
        let n = (rows * cols) as f64;
        let reps = if rows * cols >= 1 << 24 { 5 } else { 20 };
        let x = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([cols], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu));
        // Forward, no autograd.
        let fused = median_ms(|| tch::no_grad(|| drop(bias_gelu(&x, &b).unwrap())), reps);
        let unfused = median_ms(|| tch::no_grad(|| drop(bias_gelu_reference(&x, &b))), reps);
        // Forward + backward with an upstream gradient g. tch cannot pass a gradient to
        // backward(), so both Rust columns run the kernels autograd would run, without the
        // engine: fused = our forward and backward kernels; unfused = add, gelu, gelu_backward
        // and the bias reduction (what PyTorch executes for the unfused pair).
        let fused_fb = median_ms(
            || {
                let _y = bias_gelu_forward(&x, &b).unwrap();
                let _grads = bias_gelu_backward(&g, &x, &b).unwrap();
            },
            reps,
        );
        let unfused_fb = median_ms(
            || {
                let u = &x + &b;
                let _y = u.gelu("tanh");
                let gu = g.gelu_backward(&u, "tanh");
                let _gb = gu.sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
            },
            reps,
        );
        for (pass, f, u, bytes) in
            [("forward", fused, unfused, 2.0 * n * 4.0), ("forward_backward", fused_fb, unfused_fb, 5.0 * n * 4.0)]
        {
            let p = py.get(&(rows, cols, pass.to_string())).copied();
            let gbs = bytes / (f * 1e-3) / 1e9;
            println!(
                "{:>11} {:>16} {:>10.3} {:>10.3} {:>10} {:>10.1} {:>8.0}% {:>10.2}x {:>9}",
                format!("{rows}x{cols}"),
                pass,
                f,
                u,
                p.map(|p| format!("{p:.3}")).unwrap_or_else(|| "-".into()),
                gbs,
                100.0 * gbs / roof,
                u / f,
                p.map(|p| format!("{:.2}x", p / f)).unwrap_or_else(|| "-".into())
            );
        }
    }
    println!("\n'vs tch' and 'vs torch' are time ratios (other / fused): above 1 means the fused op is faster.");
    println!("Sizes: 256x1024 f32 = 1 MiB (fits L2); 2048x2048 = 16 MiB; 4096x4096 = 64 MiB; 8192x4096 = 128 MiB (beyond L3).");
    Ok(())
}
