//! Benchmark (not a test): m05's collectives against Python `torch.distributed` on this machine,
//! both on Gloo with 2 ranks. (1) Allreduce (f32 sum) of 1 KiB to 64 MiB: time per op and bus
//! bandwidth as nccl-tests defines it, 2 (N-1)/N bytes / time. (2) A DDP training step of m05's
//! CNN: forward, backward, gradient allreduce, AdamW, batch 64 per rank of random 1x28x28 images,
//! ours through `course::dist::ddp::Ddp` against `torch.nn.parallel.DistributedDataParallel`.
//!
//! `cargo bench --bench m05_allreduce [-- --quick] [-- --rounds N] [-- --threads N] [-- --release-freed-memory]`
//!
//! Run without RANK set, this binary is the driver: each round it launches itself as 2 ranks
//! (`course::dist::launch`, which sets torchrun's variables; a process that finds RANK set is a
//! worker) and then `benches/m05_allreduce.py` as 2 ranks the same way, who goes first
//! rotating; each side's rank 0 writes a JSON result that the driver reads. Each rank gets
//! `--threads` intra-op threads (default 1: OMP_NUM_THREADS, `runtime::set_threads`,
//! `torch.set_num_threads`), so 2 ranks fill this machine's 2 cores without oversubscribing it.
//! Both sides use the same iteration logic: per size one warm-up op and a 2-op probe, then as
//! many ops as take about 0.3 s (at least 5, the ranks' estimates averaged), after 2 more
//! warm-up ops and a barrier. Writes the table to target/bench/m05_allreduce.json.
//!
//! Batch norm: PyTorch's `nn.SyncBatchNorm` rejects CPU tensors ("SyncBatchNorm expected input
//! tensor to be on GPU", and `aten::batch_norm_stats` has no CPU kernel), so the compared step
//! uses plain per-rank batch norm on both sides; our SyncBatchNorm step is shown alone.

use anyhow::{bail, Context, Result};
mod benchkit;
use benchkit::BenchArgs;
use course::dist::c10d::{Backend, ProcessGroup, ReduceOp};
use course::dist::ddp::{batch_norm_over, Ddp, DdpConfig};
use course::dist::launch::{self, DistEnv, LaunchSpec, Output};
use course::models::{CnnConfig, LeNet};
use course::nn::loss::cross_entropy;
use course::train::optim::{decay_groups, AdamW, Optimizer};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

const WORLD: usize = 2;
const BATCH: i64 = 64;
const TWIN: &str = "benches/m05_allreduce.py";
const OUT_DIR: &str = "target/bench";

/// What `--quick` changes; bench_twin.py has the same numbers.
struct Settings {
    max_bytes: usize,
    /// Seconds of allreduces per size.
    target_s: f64,
    /// Timed DDP steps (after 3 warm-up steps).
    steps: usize,
}

impl Settings {
    fn new(quick: bool) -> Self {
        if quick {
            Settings { max_bytes: 256 << 10, target_s: 0.03, steps: 3 }
        } else {
            Settings { max_bytes: 64 << 20, target_s: 0.3, steps: 20 }
        }
    }
}

/// One message size as a side measured it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Point {
    bytes: usize,
    iters: usize,
    /// Seconds per allreduce on rank 0.
    secs: f64,
}

/// What a side's rank 0 writes (bench_twin.py writes the same fields, and a few more).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SideResult {
    side: String,
    world: usize,
    threads: usize,
    allreduce: Vec<Point>,
    step_iters: usize,
    /// Seconds per DDP step with plain batch norm.
    ddp_step_bn: f64,
    /// Seconds per DDP step with SyncBatchNorm (None: PyTorch, which has none on CPU).
    ddp_step_syncbn: Option<f64>,
    #[serde(default)]
    torch: Option<String>,
}

fn has(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| a == flag)
}

fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

fn main() -> Result<()> {
    match DistEnv::from_env()? {
        Some(env) => worker(&env),
        None => driver(),
    }
}

// ---------------------------------------------------------------------------------------------
// Worker: one rank of our side.

fn worker(env: &DistEnv) -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let threads = match value(&args, "--threads") {
        Some(v) => v.parse().with_context(|| format!("--threads {v} is not a number"))?,
        None => 1,
    };
    course::sys::runtime::set_threads(threads);
    if !has(&args, "--release-freed-memory") {
        course::sys::runtime::retain_freed_memory();
    }
    let result = PathBuf::from(value(&args, "--result").context("a worker needs --result PATH")?);
    let s = Settings::new(has(&args, "--quick"));
    let pg = Arc::new(ProcessGroup::init(env, Backend::Gloo, Duration::from_secs(120))?);
    let allreduce = sweep(&pg, &s)?;
    let ddp_step_bn = ddp_step(&pg, false, s.steps)?;
    let ddp_step_syncbn = Some(ddp_step(&pg, true, s.steps)?);
    if pg.is_main() {
        let out = SideResult {
            side: "ours".into(),
            world: pg.size(),
            threads: course::sys::runtime::threads(),
            allreduce,
            step_iters: s.steps,
            ddp_step_bn,
            ddp_step_syncbn,
            torch: Some(course::sys::runtime::versions().torch),
        };
        course::sys::fsutil::write_json_atomic(&result, &out)?;
    }
    pg.barrier()
}

/// Allreduce time for 1 KiB, 4 KiB, ... up to `s.max_bytes`.
fn sweep(pg: &ProcessGroup, s: &Settings) -> Result<Vec<Point>> {
    let mut points = vec![];
    let mut bytes = 1024usize;
    while bytes <= s.max_bytes {
        let (probe, _) = pg.allreduce_bandwidth(bytes, 1, 2, Device::Cpu)?;
        // Every rank's estimate, averaged, so all ranks run the same count.
        let want = (s.target_s / probe.max(1e-6)).clamp(5.0, 20000.0);
        let iters = pg.allreduce_f64(&[want], ReduceOp::Sum)?[0] as usize / pg.size();
        let (secs, _) = pg.allreduce_bandwidth(bytes, 2, iters, Device::Cpu)?;
        points.push(Point { bytes, iters, secs });
        bytes *= 4;
    }
    Ok(points)
}

/// Seconds per DDP step of m05's CNN on rank 0: forward, backward, `sync_gradients` (one
/// bucketed allreduce), AdamW as m05 configures it.
fn ddp_step(pg: &Arc<ProcessGroup>, sync_bn: bool, steps: usize) -> Result<f64> {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let cfg = CnnConfig { channels: (32, 64), hidden: 256, classes: 10, dropout: 0.0, conv_bias: false };
    let model = LeNet::with_norm(&vs.root(), &cfg, &batch_norm_over(sync_bn.then(|| pg.clone())));
    let mut ddp = Ddp::new(pg.clone(), &vs, DdpConfig::default())?;
    let (params, groups) = decay_groups(&vs, 1e-4);
    let mut opt = AdamW::new(params, groups, 1e-3, (0.9, 0.999), 1e-8)?;
    // Each rank its own shard: a different fixed batch.
    tch::manual_seed(1 + pg.rank() as i64);
    let x = Tensor::randn([BATCH, 1, 28, 28], (Kind::Float, Device::Cpu)); // (B, 1, 28, 28)
    let y = Tensor::randint(10, [BATCH], (Kind::Int64, Device::Cpu)); // (B,)
    let mut run = |n: usize| -> Result<()> {
        for _ in 0..n {
            opt.zero_grad();
            cross_entropy(&model.forward_t(&x, true), &y, 0.0).backward();
            ddp.sync_gradients()?;
            opt.step()?;
        }
        Ok(())
    };
    run(3)?; // warm-up: allocations and AdamW's state
    pg.barrier()?;
    let t0 = Instant::now();
    run(steps)?;
    Ok(t0.elapsed().as_secs_f64() / steps as f64)
}

// ---------------------------------------------------------------------------------------------
// Driver: launches both sides round by round and prints the comparison.

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Ours,
    PyTorch,
}

/// Launches one side as `WORLD` ranks and returns its rank 0's result. The ranks' output is
/// captured and shown only when a rank fails, so it does not break up the table.
fn run_side(side: Side, threads: usize, quick: bool, release: bool) -> Result<SideResult> {
    let name = match side {
        Side::Ours => "ours",
        Side::PyTorch => "pytorch",
    };
    let result = Path::new(OUT_DIR).join(format!("m05_allreduce_{name}.json"));
    if result.exists() {
        std::fs::remove_file(&result).with_context(|| format!("removing the old {}", result.display()))?;
    }
    let mut args: Vec<OsString> = vec![];
    let program = match side {
        Side::Ours => std::env::current_exe().context("finding this program's path")?,
        Side::PyTorch => {
            let py = PathBuf::from(".venv/bin/python");
            if !py.exists() {
                bail!("no .venv/bin/python for the PyTorch side (run python3 scripts/setup.py)");
            }
            args.push(TWIN.into());
            if !release {
                args.push("--retain-freed-memory".into());
            }
            py
        }
    };
    args.extend(["--threads".into(), threads.to_string().into(), "--result".into(), result.clone().into()]);
    if quick {
        args.push("--quick".into());
    }
    if release && side == Side::Ours {
        args.push("--release-freed-memory".into());
    }
    let lines = Arc::new(Mutex::new(vec![]));
    let spec = LaunchSpec {
        threads_per_proc: Some(threads),
        output: Output::Capture(lines.clone()),
        ..LaunchSpec::local(WORLD)
    };
    if let Err(e) = launch::launch(&spec, &program, &args) {
        for l in lines.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            eprintln!("{l}");
        }
        return Err(e).with_context(|| format!("running the {name} side ({} {WORLD} ranks)", program.display()));
    }
    let text = std::fs::read_to_string(&result).with_context(|| format!("reading {}", result.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", result.display()))
}

fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

/// nccl-tests' bus bandwidth of an allreduce: 2 (N-1)/N of the message per rank, in GB/s.
fn bus_gbps(bytes: usize, secs: f64) -> f64 {
    let w = WORLD as f64;
    2.0 * (w - 1.0) / w * bytes as f64 / secs / 1e9
}

/// One row of the output: medians over rounds, and the speed ratio's median and range.
#[derive(Debug, Serialize)]
struct Row {
    what: String,
    bytes: Option<usize>,
    /// Seconds per op (allreduce) or per step, every round.
    ours_secs: Vec<f64>,
    pytorch_secs: Vec<f64>,
    ours_median_secs: f64,
    pytorch_median_secs: Option<f64>,
    /// PyTorch time / our time, median of the per-round ratios: above 1 means ours is faster.
    speed_ratio: Option<f64>,
    speed_ratio_range: Option<(f64, f64)>,
    ours_bus_gbps: Option<f64>,
    pytorch_bus_gbps: Option<f64>,
    iters_ours: Vec<usize>,
    iters_pytorch: Vec<usize>,
}

impl Row {
    fn new(what: String, bytes: Option<usize>, ours: Vec<f64>, py: Vec<f64>, iters: (Vec<usize>, Vec<usize>)) -> Self {
        let ratios: Vec<f64> = py.iter().zip(&ours).map(|(p, o)| p / o).collect();
        let range = (!ratios.is_empty()).then(|| {
            (ratios.iter().copied().fold(f64::INFINITY, f64::min), ratios.iter().copied().fold(0.0, f64::max))
        });
        let ours_median_secs = benchkit::median(ours.clone());
        let pytorch_median_secs = (!py.is_empty()).then(|| benchkit::median(py.clone()));
        Row {
            ours_bus_gbps: bytes.map(|b| bus_gbps(b, ours_median_secs)),
            pytorch_bus_gbps: bytes.zip(pytorch_median_secs).map(|(b, s)| bus_gbps(b, s)),
            speed_ratio: (!ratios.is_empty()).then(|| benchkit::median(ratios)),
            speed_ratio_range: range,
            what,
            bytes,
            ours_secs: ours,
            pytorch_secs: py,
            ours_median_secs,
            pytorch_median_secs,
            iters_ours: iters.0,
            iters_pytorch: iters.1,
        }
    }

    /// `scale` turns seconds into the table's unit (1e6 for µs, 1e3 for ms).
    fn print(&self, scale: f64) {
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
        println!(
            "{:<26} {:>10.1} {:>10} {:>7} {:>12} {:>9} {:>9}",
            self.what,
            self.ours_median_secs * scale,
            opt(self.pytorch_median_secs, &|s| format!("{:.1}", s * scale)),
            opt(self.speed_ratio, &|r| format!("{r:.2}x")),
            self.speed_ratio_range.map_or("-".into(), |(lo, hi)| format!("{lo:.2}-{hi:.2}x")),
            opt(self.ours_bus_gbps, &|g| format!("{g:.3}")),
            opt(self.pytorch_bus_gbps, &|g| format!("{g:.3}")),
        );
    }
}

fn header(unit: &str, rounds: usize, gbps: bool) -> String {
    let (a, b) = if gbps { ("ours GB/s", "torch GB/s") } else { ("", "") };
    format!(
        "{:<26} {:>10} {:>10} {:>7} {:>12} {a:>9} {b:>9}   {unit}, medians of {rounds} round(s)",
        "what", "ours", "PyTorch", "speed", "range"
    )
}

fn driver() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let b = BenchArgs::from_env(if quick { 1 } else { 3 });
    let threads = b.get("--threads").unwrap_or(1).max(1);
    let rounds = b.rounds;
    std::fs::create_dir_all(OUT_DIR).with_context(|| format!("creating {OUT_DIR}"))?;
    let s = Settings::new(quick);
    println!(
        "{WORLD} ranks on Gloo over 127.0.0.1, each with {threads} intra-op thread(s) (OMP_NUM_THREADS={threads}, \
         set_threads / torch.set_num_threads({threads})); glibc {} on both sides",
        b.allocator_note()
    );
    println!(
        "ours: course::dist::c10d + course::dist::ddp (c10d's ProcessGroupGloo through our C++ shim); PyTorch: torch.distributed + DDP\n"
    );

    let mut results: Vec<(SideResult, SideResult)> = vec![];
    for round in 0..rounds {
        let t0 = Instant::now();
        let (mut ours, mut py) = (None, None);
        for k in 0..2 {
            // Who goes first rotates, so the machine's drift hits both sides alike.
            if (round + k) % 2 == 0 {
                ours = Some(run_side(Side::Ours, threads, quick, b.release)?);
            } else {
                py = Some(run_side(Side::PyTorch, threads, quick, b.release)?);
            }
        }
        eprintln!("round {}/{rounds} done in {:.1} s", round + 1, t0.elapsed().as_secs_f64());
        results.push((ours.expect("ran above"), py.expect("ran above")));
    }
    let torch_version = results[0].1.torch.clone().unwrap_or_else(|| "?".into());

    // Allreduce rows: sizes both sides measured (they use the same list).
    let mut allreduce_rows = vec![];
    for (i, p) in results[0].0.allreduce.iter().enumerate() {
        let pick = |r: &SideResult| r.allreduce.get(i).filter(|q| q.bytes == p.bytes).cloned();
        let ours: Vec<Point> = results.iter().filter_map(|(o, _)| pick(o)).collect();
        let py: Vec<Point> = results.iter().filter_map(|(_, q)| pick(q)).collect();
        if py.len() != ours.len() {
            bail!("the PyTorch side did not measure {} bytes in every round", p.bytes);
        }
        allreduce_rows.push(Row::new(
            format!("allreduce {}", size_label(p.bytes)),
            Some(p.bytes),
            ours.iter().map(|q| q.secs).collect(),
            py.iter().map(|q| q.secs).collect(),
            (ours.iter().map(|q| q.iters).collect(), py.iter().map(|q| q.iters).collect()),
        ));
    }
    let steps = |f: &dyn Fn(&SideResult) -> Option<f64>, side: usize| -> Vec<f64> {
        results.iter().filter_map(|r| f(if side == 0 { &r.0 } else { &r.1 })).collect()
    };
    let n = (vec![s.steps; rounds], vec![s.steps; rounds]);
    let step_rows = vec![
        Row::new(
            "DDP step, BatchNorm".to_string(),
            None,
            steps(&|r| Some(r.ddp_step_bn), 0),
            steps(&|r| Some(r.ddp_step_bn), 1),
            n.clone(),
        ),
        Row::new(
            "DDP step, SyncBatchNorm".to_string(),
            None,
            steps(&|r| r.ddp_step_syncbn, 0),
            steps(&|r| r.ddp_step_syncbn, 1),
            (n.0, vec![]),
        ),
    ];

    println!("PyTorch {torch_version}; allreduce of f32 (sum), {WORLD} ranks");
    println!("{}", header("us/op", rounds, true));
    for r in &allreduce_rows {
        r.print(1e6);
    }
    println!(
        "\nDDP step of m05's CNN (conv 32/64 without bias, fc 256, 10 classes), batch {BATCH}/rank, AdamW lr 1e-3, \
         {} timed steps after 3",
        s.steps
    );
    println!("{}", header("ms/step", rounds, false));
    for r in &step_rows {
        r.print(1e3);
    }
    println!(
        "\nspeed = PyTorch time / our time (median of the per-round ratios): above 1 means ours is faster;\n\
         range = the lowest and highest per-round ratio. GB/s = bus bandwidth, 2 (N-1)/N x bytes / time.\n\
         PyTorch's nn.SyncBatchNorm rejects CPU tensors, so the compared step uses plain per-rank BatchNorm on\n\
         both sides (PyTorch DDP with broadcast_buffers=False, as ours); our SyncBatchNorm step is shown alone."
    );

    let out = Path::new(OUT_DIR).join("m05_allreduce.json");
    let json = serde_json::json!({
        "bench": "m05_allreduce",
        "machine": course::run::report::env_report(),
        "pytorch": torch_version,
        "world": WORLD,
        "threads_per_rank": threads,
        "rounds": rounds,
        "quick": quick,
        "allocator": b.allocator_note(),
        "speed_ratio": "PyTorch time / our time: above 1 means ours is faster",
        "allreduce": allreduce_rows,
        "steps": step_rows,
        "notes": [
            "PyTorch's nn.SyncBatchNorm rejects CPU tensors: the compared DDP step uses plain BatchNorm on both sides",
            "PyTorch DDP runs with broadcast_buffers=False, as course::dist::ddp::Ddp does not re-broadcast buffers",
        ],
    });
    course::sys::fsutil::write_json_atomic(&out, &json)?;
    println!("\nwrote {}", out.display());
    Ok(())
}
