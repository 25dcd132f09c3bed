//! m05_ddp end to end, on CPU with Gloo over 127.0.0.1 and free ports: the lesson's
//! equivalence (N = 2 with batch b ends with N = 1's parameters at batch 2b), the GPT through
//! the m04 trainer under DDP, launching by the real torchrun, two node groups, a killed rank,
//! and bad launch environments.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_m05_ddp");

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("course-m05-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn m05(out: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--quick", "--quiet", "--device", "cpu", "--outputs"]).arg(out);
    // A stray torchrun environment must not leak into the tests.
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
        c.env_remove(v);
    }
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: Output) -> String {
    let t = text(&o);
    assert!(o.status.success(), "m05_ddp failed:\n{t}");
    t
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn free_port() -> u16 {
    course::dist::launch::free_port().unwrap()
}

/// Max |Δ| over the tensors of two safetensors files with the same names.
fn max_diff(a: &Path, b: &Path) -> f64 {
    let mut x = tch::Tensor::read_safetensors(a).unwrap();
    let mut y = tch::Tensor::read_safetensors(b).unwrap();
    x.sort_by(|p, q| p.0.cmp(&q.0));
    y.sort_by(|p, q| p.0.cmp(&q.0));
    assert_eq!(x.len(), y.len());
    let mut worst = 0f64;
    for ((na, ta), (nb, tb)) in x.iter().zip(&y) {
        assert_eq!(na, nb);
        worst = worst.max(f64::try_from((ta - tb).abs().max()).unwrap());
    }
    worst
}

#[test]
fn the_quick_lesson_proves_two_ranks_equal_one_and_draws_its_charts() {
    let out = tmp("lesson");
    // The process set-up flags reach every rank of every job the lesson launches.
    let o = m05(&out).args(["--threads", "1", "--deterministic", "--release-freed-memory"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    ok(o);
    let setups: Vec<&str> = text.lines().filter(|l| l.contains(": rank ") && l.contains(" of ")).collect();
    // bandwidth (2 ranks), equiv_n1 (1), equiv_n2 (2), ddp_train (2)
    assert_eq!(setups.len(), 7, "one set-up line per rank and job:\n{text}");
    for l in &setups {
        assert!(l.contains("1 threads, deterministic on, freed memory released"), "{l}");
    }
    assert_eq!(setups.iter().filter(|l| l.starts_with("[rank1]: rank 1 of 2:")).count(), 3, "{setups:#?}");
    let dir = out.join("m05_ddp");
    let m = json(&dir.join("metrics.json"));
    let t = m["targets"].as_array().unwrap().iter().find(|t| t["name"] == "max_param_diff_n2_vs_n1").unwrap();
    assert_eq!(t["met"], true, "{m}");
    // Independently of the binary's own comparison: the saved parameters really agree, and really
    // are two different runs (one process of batch 128, two of 64).
    let d = max_diff(&dir.join("jobs/equiv_n1.safetensors"), &dir.join("jobs/equiv_n2.safetensors"));
    assert!(d <= 1e-5, "max |Δ| = {d}");
    let n1 = json(&dir.join("jobs/equiv_n1.json"));
    let n2 = json(&dir.join("jobs/equiv_n2.json"));
    assert_eq!((n1["world"].as_u64(), n1["batch_per_rank"].as_u64()), (Some(1), Some(128)));
    assert_eq!((n2["world"].as_u64(), n2["batch_per_rank"].as_u64()), (Some(2), Some(64)));
    // Per-step losses of the global batch agree too.
    for (a, b) in n1["loss_trace"].as_array().unwrap().iter().zip(n2["loss_trace"].as_array().unwrap()) {
        assert!((a[1].as_f64().unwrap() - b[1].as_f64().unwrap()).abs() < 1e-4, "{a} vs {b}");
    }
    for png in ["samples_per_s.png", "loss_n1_vs_n2.png", "allreduce_bandwidth.png", "ddp_train/loss.png"] {
        assert!(std::fs::metadata(dir.join(png)).map(|m| m.len() > 1000).unwrap_or(false), "{png} missing");
    }
    let bw = json(&dir.join("jobs/bandwidth.json"));
    assert_eq!(bw["points"].as_array().unwrap().len(), 6, "1 KB .. 1 MB, x4 apart");
    assert!(json(&dir.join("ddp_train/metrics.json"))["metrics"]["test_accuracy"].as_f64().unwrap() > 0.5);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn every_rank_under_the_launcher_gets_the_same_set_up() {
    // Rank 1 too applies --deterministic, --threads and --release-freed-memory (before, only
    // rank 0 called Run::start and the other ranks ran with libtorch's defaults).
    let out = tmp("setup");
    let o = m05(&out)
        .args(["--nproc-per-node", "2", "--model", "gpt", "--steps", "2", "--batch-size", "2"])
        .args(["--deterministic", "--threads", "1", "--release-freed-memory", "--job", "setup"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    ok(o);
    for r in 0..2 {
        let want = format!("[rank{r}]: rank {r} of 2: device cpu, 1 threads, deterministic on, freed memory released");
        assert!(text.lines().any(|l| l == want), "no line {want:?} in:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_m04_gpt_trainer_under_ddp_equals_one_process() {
    let out = tmp("gpt");
    for n in [1usize, 2] {
        let b = (8 / n).to_string();
        let params = out.join(format!("gpt{n}.safetensors"));
        ok(m05(&out)
            .args(["--nproc-per-node", &n.to_string(), "--model", "gpt", "--steps", "4", "--batch-size", &b])
            // Hooks compose: DDP and the profiler window in one run (rank 0 profiles 2 steps).
            .args(if n == 2 { &["--profile", "2"][..] } else { &[][..] })
            .args(["--job", &format!("gpt{n}"), "--save-params"])
            .arg(&params)
            .output()
            .unwrap());
    }
    let d = max_diff(&out.join("gpt1.safetensors"), &out.join("gpt2.safetensors"));
    assert!(d <= 1e-5, "GPT parameters after 4 AdamW steps, N=2 x 4 vs N=1 x 8: max |Δ| = {d}");
    let m = json(&out.join("m05_ddp/gpt2/metrics.json"));
    assert_eq!(m["metrics"]["world_size"], 2.0);
    let trace = out.join("m05_ddp/gpt2/trace.json");
    let ops = course::sys::profile::top_ops(&trace, 5).unwrap();
    assert!(!ops.is_empty(), "the profiled DDP run left no ops in {}", trace.display());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn real_torchrun_launches_the_ranks() {
    let torchrun = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun");
    assert!(torchrun.exists(), "{} missing: run python3 scripts/setup.py", torchrun.display());
    let out = tmp("torchrun");
    let o = Command::new(&torchrun)
        .args(["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port"])
        .arg(free_port().to_string())
        .args(["--no-python", BIN, "--quick", "--quiet", "--device", "cpu", "--steps", "4", "--outputs"])
        .arg(&out)
        .output()
        .unwrap();
    ok(o);
    let m = json(&out.join("m05_ddp/train/metrics.json"));
    assert_eq!(m["metrics"]["world_size"], 2.0, "{m}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn two_node_groups_on_localhost_form_one_world() {
    let out = tmp("nodes");
    let port = free_port().to_string();
    let node = |rank: &str, dir: &Path| {
        m05(dir)
            .args(["--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "1", "--master-port", &port])
            .args(["--steps", "4"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (d0, d1) = (out.join("n0"), out.join("n1"));
    let a = node("0", &d0);
    let b = node("1", &d1);
    ok(a.wait_with_output().unwrap());
    ok(b.wait_with_output().unwrap());
    // Only global rank 0 (on node 0) writes outputs.
    assert_eq!(json(&d0.join("m05_ddp/train/metrics.json"))["metrics"]["world_size"], 2.0);
    assert!(!d1.join("m05_ddp/train/metrics.json").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_killed_rank_stops_the_launcher_with_an_error() {
    let out = tmp("crash");
    let t0 = Instant::now();
    let o = m05(&out)
        .args([
            "--nproc-per-node",
            "2",
            "--steps",
            "20",
            "--timeout-s",
            "20",
            "--crash-rank",
            "1",
            "--crash-at-step",
            "3",
        ])
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("rank 1 exited with status 17"), "{t}");
    assert!(t0.elapsed() < Duration::from_secs(90), "took {:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_surviving_rank_errors_within_its_timeout_instead_of_hanging() {
    // No launcher to stop it: rank 0 must notice on its own that rank 1 died.
    let out = tmp("survivor");
    let port = free_port().to_string();
    let rank = |r: &str| {
        m05(&out)
            .args([
                "--role",
                "train",
                "--steps",
                "20",
                "--timeout-s",
                "15",
                "--crash-rank",
                "1",
                "--crash-at-step",
                "3",
            ])
            .envs([("RANK", r), ("WORLD_SIZE", "2"), ("LOCAL_RANK", r), ("MASTER_ADDR", "127.0.0.1")])
            .env("MASTER_PORT", &port)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let t0 = Instant::now();
    let r0 = rank("0");
    let r1 = rank("1");
    let o1 = r1.wait_with_output().unwrap();
    assert_eq!(o1.status.code(), Some(17), "{}", text(&o1));
    let o0 = r0.wait_with_output().unwrap();
    let t = text(&o0);
    assert!(!o0.status.success(), "rank 0 should fail:\n{t}");
    assert!(t.contains("rank 0 of 2 (gloo)"), "the error names the collective and rank:\n{t}");
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?}:\n{t}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_launch_environments_name_the_variable() {
    let out = tmp("env");
    let run = |vars: &[(&str, &str)], extra: &[&str]| {
        let t0 = Instant::now();
        let o = m05(&out).args(extra).envs(vars.iter().copied()).output().unwrap();
        assert!(!o.status.success());
        (text(&o), t0.elapsed())
    };
    let (t, _) = run(&[("RANK", "0")], &[]);
    assert!(t.contains("WORLD_SIZE"), "{t}");
    let full = |rank: &'static str, world: &'static str| {
        [("RANK", rank), ("WORLD_SIZE", world), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999")]
    };
    let (t, _) = run(&full("2", "2"), &[]);
    assert!(t.contains("RANK=2") && t.contains("WORLD_SIZE=2"), "{t}");
    let (t, _) = run(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "x")], &[]);
    assert!(t.contains("MASTER_PORT"), "{t}");
    // Nobody listens on the master port: rank 1 gives up at its timeout, naming where it looked.
    let port = free_port().to_string();
    let vars = [("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port.as_str())];
    let (t, took) = run(&vars, &["--timeout-s", "3"]);
    assert!(t.contains(&format!("MASTER_ADDR=127.0.0.1 MASTER_PORT={port}")), "{t}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let _ = std::fs::remove_dir_all(&out);
}
