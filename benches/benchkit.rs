//! Helpers for the benchmarks that compare the course with Python PyTorch: the Python twin runs
//! as a child process that answers one JSON line per request line on stdin, so a benchmark can
//! take turns with it round by round (this shared machine's speed drifts by 10-20 % from minute
//! to minute, and pairing each of our runs with the Python run beside it cancels that drift).
//!
//! Each benchmark in `benches/` includes this file with `mod benchkit;`; not every one uses all of it.
#![allow(dead_code)]

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};

/// A Python benchmark script kept running: `ask("train_cnn 60")` writes the line and returns
/// the field `key` of the JSON line it answers.
pub struct PyTwin {
    child: Child,
    out: BufReader<ChildStdout>,
    key: &'static str,
}

impl PyTwin {
    /// Starts `.venv/bin/python <script> --threads N [--retain-freed-memory]`.
    pub fn start(script: &str, threads: usize, retain_freed_memory: bool, key: &'static str) -> Result<Self> {
        let mut child = Command::new(".venv/bin/python")
            .args([script, "--threads", &threads.to_string()])
            .args(retain_freed_memory.then_some("--retain-freed-memory"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting .venv/bin/python (run python3 scripts/setup.py)")?;
        let out = BufReader::new(child.stdout.take().context("python stdout")?);
        Ok(Self { child, out, key })
    }

    pub fn ask(&mut self, request: &str) -> Result<f64> {
        let stdin = self.child.stdin.as_mut().context("python stdin")?;
        writeln!(stdin, "{request}")?;
        stdin.flush()?;
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("the Python side answered {line:?} to {request:?}"))?;
        v[self.key].as_f64().with_context(|| format!("no '{}' in {line:?}", self.key))
    }
}

impl Drop for PyTwin {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // EOF ends the script's request loop
        let _ = self.child.wait();
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs `rounds` rounds of three contenders (ours, and two Python twins), the first of each
/// round rotating, and returns each one's results. `run(side)` runs side 0, 1 or 2 once.
pub fn rotate3(rounds: usize, mut run: impl FnMut(usize) -> Result<f64>) -> Result<[Vec<f64>; 3]> {
    let mut v = [vec![], vec![], vec![]];
    for round in 0..rounds {
        for k in 0..3 {
            let side = (round + k) % 3;
            v[side].push(run(side)?);
        }
    }
    Ok(v)
}

/// One table row: ours, twin 1, median ratio, ratio range, twin 2, median ratio.
pub fn row(label: &str, v: &[Vec<f64>; 3]) -> String {
    let ratios = |j: usize| -> Vec<f64> { v[0].iter().zip(&v[j]).map(|(a, b)| a / b).collect() };
    let (r1, r2) = (ratios(1), ratios(2));
    let (lo, hi) = (r1.iter().copied().fold(f64::INFINITY, f64::min), r1.iter().copied().fold(0.0, f64::max));
    format!(
        "{label:<26} {:>9.1} {:>9.1} {:>5.2}x {:>12} {:>9.1} {:>5.2}x",
        median(v[0].clone()),
        median(v[1].clone()),
        median(r1),
        format!("{lo:.2}-{hi:.2}x"),
        median(v[2].clone()),
        median(r2)
    )
}

/// The header matching [`row`], the twins being PyTorch as installed and with our mallopt.
pub fn header(unit: &str, rounds: usize) -> String {
    header_for(unit, rounds, "PyTorch", "+mallopt")
}

/// The header matching [`row`] with the two twins' column names.
pub fn header_for(unit: &str, rounds: usize, twin1: &str, twin2: &str) -> String {
    format!(
        "{:<26} {:>9} {:>9} {:>6} {:>12} {:>9} {:>6}   {unit}, medians of {rounds} rounds",
        "what", "ours", twin1, "ratio", "range", twin2, "ratio"
    )
}

/// The flags every comparison benchmark takes: `--threads N`, `--rounds N`,
/// `--release-freed-memory`, plus any other `--flag N` through [`BenchArgs::get`].
pub struct BenchArgs {
    args: Vec<String>,
    pub threads: usize,
    pub rounds: usize,
    /// glibc defaults instead of the course's retained memory (see `runtime::retain_freed_memory`).
    pub release: bool,
}

impl BenchArgs {
    /// Reads the command line, applies `--threads` and the allocator setting, and prints the
    /// environment report.
    pub fn from_env(default_rounds: usize) -> Self {
        let args: Vec<String> = std::env::args().collect();
        let mut b = Self { args, threads: 0, rounds: 0, release: false };
        if let Some(n) = b.get("--threads") {
            course::sys::runtime::set_threads(n);
        }
        b.threads = course::sys::runtime::threads();
        b.rounds = b.get("--rounds").unwrap_or(default_rounds).max(1);
        b.release = b.args.iter().any(|a| a == "--release-freed-memory");
        if !b.release {
            course::sys::runtime::retain_freed_memory();
        }
        println!("{}\n", course::run::report::env_report());
        b
    }

    /// Whether the bare flag `flag` was given.
    pub fn flag(&self, flag: &str) -> bool {
        self.args.iter().any(|a| a == flag)
    }

    /// The number after `flag`, if given and valid.
    pub fn get(&self, flag: &str) -> Option<usize> {
        let i = self.args.iter().position(|a| a == flag)?;
        self.args.get(i + 1)?.parse().ok()
    }

    /// How ours is set up, for the line above the table.
    pub fn allocator_note(&self) -> &'static str {
        if self.release {
            "defaults (--release-freed-memory)"
        } else {
            "keeping freed memory, as the course's Run does"
        }
    }
}
