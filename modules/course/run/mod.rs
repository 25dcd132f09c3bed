//! A module run: the flags every module shares, seeding and device set-up, the output folder
//! `outputs/<module>/`, and the two files every run leaves there:
//!
//! - `metrics.json`, the contract read by `course list`, the tour's gallery, later modules and
//!   reviewers: `{"module", "quick", "seed", "device", "metrics": {name: number},
//!   "targets": [{"name", "value", "goal", "op", "met"}], "artifacts": [relative paths]}`;
//! - `manifest.json`: command line, config, seed, device, git commit, versions, wall time.

//!
//! Beside it: `catalog` (the module table), `gallery` (the tour's HTML page), `charts` (PNG
//! charts), `progress` (bars) and `report` (the environment report).

pub mod catalog;
pub mod charts;
pub mod gallery;
pub mod progress;
pub mod relaunch;
pub mod report;

use crate::sys::device::{device_name, DeviceChoice};
use crate::sys::fsutil::write_json_atomic;
use crate::sys::rng::{seed_everything, Rng};
use crate::sys::runtime;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

/// Flags shared by every module binary (`#[command(flatten)]` them).
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct CommonArgs {
    /// Where tensors live: auto (the first GPU if there is one), cpu, cuda or cuda:N
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    #[serde(serialize_with = "ser_display")]
    pub device: DeviceChoice,
    /// Seed for every random generator (torch CPU and CUDA, the course's Rust RNG)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tiny sizes that finish in seconds; used by the tests (targets are then not meaningful)
    #[arg(long)]
    pub quick: bool,
    /// Allow only deterministic algorithms (torch.use_deterministic_algorithms); ops that have
    /// none then fail loudly
    #[arg(long)]
    pub deterministic: bool,
    /// Intra-op CPU threads, 1 to 1024 (default: libtorch's choice, one per core)
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub threads: Option<usize>,
    /// No progress bars (they are also hidden when stderr is not a terminal)
    #[arg(long)]
    pub quiet: bool,
    /// Root folder of run outputs; this module writes to <OUTPUTS>/<module>/
    #[arg(long, default_value = "outputs")]
    pub outputs: PathBuf,
    /// Let glibc hand freed memory back to the OS at once (its default). Without this flag the
    /// process keeps it for reuse, which spares every training step its page faults (up to a
    /// fifth of a CPU step); see course::runtime::retain_freed_memory
    #[arg(long)]
    pub release_freed_memory: bool,
    /// (internal) where a child run of this program writes its JSON result for its parent
    /// (`run::relaunch`)
    #[arg(long, hide = true)]
    pub result: Option<PathBuf>,
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
}

fn ser_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "==")]
    Eq,
}

impl Op {
    pub fn holds(self, value: f64, goal: f64) -> bool {
        match self {
            Op::Ge => value >= goal,
            Op::Le => value <= goal,
            Op::Eq => value == goal,
        }
    }
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Ge => ">=",
            Op::Le => "<=",
            Op::Eq => "==",
        }
    }
}

/// JSON has no NaN or infinity: a non-finite value (a diverged loss, say) is written as `null`
/// and read back as NaN, which meets no target.
mod nullable {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub fn ser<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }
    pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
    pub fn ser_map<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k, v.is_finite().then_some(*v))))
    }
    pub fn de_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        let m = BTreeMap::<String, Option<f64>>::deserialize(d)?;
        Ok(m.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    #[serde(serialize_with = "nullable::ser", deserialize_with = "nullable::de")]
    pub value: f64,
    #[serde(serialize_with = "nullable::ser", deserialize_with = "nullable::de")]
    pub goal: f64,
    pub op: Op,
    pub met: bool,
}

/// The contents of `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub module: String,
    pub quick: bool,
    pub seed: u64,
    pub device: String,
    #[serde(serialize_with = "nullable::ser_map", deserialize_with = "nullable::de_map")]
    pub metrics: BTreeMap<String, f64>,
    pub targets: Vec<Target>,
    pub artifacts: Vec<String>,
}

impl Metrics {
    /// Reads and checks a metrics.json; errors name the file and the field that is wrong.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let m: Metrics =
            serde_json::from_str(&text).with_context(|| format!("{} is not a valid metrics.json", path.display()))?;
        for t in &m.targets {
            if t.met != t.op.holds(t.value, t.goal) && !(t.value.is_nan() && !t.met) {
                bail!(
                    "{}: target '{}' says met = {} but {} {} {} is {}",
                    path.display(),
                    t.name,
                    t.met,
                    t.value,
                    t.op.symbol(),
                    t.goal,
                    !t.met
                );
            }
        }
        Ok(m)
    }

    pub fn all_targets_met(&self) -> bool {
        !self.targets.is_empty() && self.targets.iter().all(|t| t.met)
    }
}

/// One run of a module. Create with [`Run::start`], record metrics, targets and artifacts, and
/// end with [`Run::finish`], which writes `metrics.json` and `manifest.json` atomically.
pub struct Run {
    pub module: String,
    pub dir: PathBuf,
    pub device: Device,
    pub rng: Rng,
    pub quick: bool,
    pub quiet: bool,
    seed: u64,
    /// Whether glibc keeps freed memory for this run (see `runtime::retain_freed_memory`).
    retains_freed_memory: bool,
    config: serde_json::Value,
    started: Instant,
    started_unix: u64,
    metrics: BTreeMap<String, f64>,
    targets: Vec<Target>,
    artifacts: Vec<String>,
}

/// The process-wide set-up that every process of a module applies, the main one and every other
/// rank alike: device, threads, determinism, the allocator setting, seeds and progress bars.
#[derive(Debug)]
pub struct Setup {
    pub device: Device,
    pub rng: Rng,
    /// Whether glibc keeps freed memory for this process (see `runtime::retain_freed_memory`).
    pub retains_freed_memory: bool,
}

impl Setup {
    /// Applies `common` to this process.
    pub fn apply(common: &CommonArgs) -> Result<Setup> {
        let device = common.device.resolve()?;
        if let Some(n) = common.threads {
            if !(1..=1024).contains(&n) {
                bail!("--threads must be between 1 and 1024, got {n}");
            }
            runtime::set_threads(n);
        }
        runtime::set_deterministic(common.deterministic, false);
        let retains_freed_memory = !common.release_freed_memory && runtime::retain_freed_memory();
        let rng = seed_everything(common.seed);
        crate::run::progress::set_quiet(common.quiet);
        Ok(Setup { device, rng, retains_freed_memory })
    }

    /// One line naming what this process runs with, as read back from libtorch and glibc.
    pub fn summary(&self) -> String {
        format!(
            "device {}, {} threads, deterministic {}, freed memory {}",
            device_name(self.device),
            runtime::threads(),
            if runtime::deterministic() { "on" } else { "off" },
            if self.retains_freed_memory { "kept" } else { "released" }
        )
    }
}

impl Run {
    /// Applies the process set-up ([`Setup::apply`]) and creates `<outputs>/<module>/`.
    /// `config` is the module's own parsed arguments, saved in the manifest.
    pub fn start<C: Serialize>(module: &str, common: &CommonArgs, config: &C) -> Result<Run> {
        Run::start_with(Setup::apply(common)?, module, common, config)
    }

    /// [`Run::start`] for a process whose set-up is already applied (m05's rank 0, which joined
    /// its process group first).
    pub fn start_with<C: Serialize>(setup: Setup, module: &str, common: &CommonArgs, config: &C) -> Result<Run> {
        let Setup { device, rng, retains_freed_memory } = setup;
        let dir = common.outputs.join(module);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating output folder {}", dir.display()))?;
        // A run that fails must not leave the previous run's metrics looking current.
        let stale = dir.join("metrics.json");
        if stale.exists() {
            std::fs::remove_file(&stale).with_context(|| format!("removing the previous {}", stale.display()))?;
        }
        Ok(Run {
            module: module.to_string(),
            dir,
            device,
            rng,
            quick: common.quick,
            quiet: common.quiet,
            retains_freed_memory,
            seed: common.seed,
            config: serde_json::to_value(config).context("serialising the run config")?,
            started: Instant::now(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            metrics: BTreeMap::new(),
            targets: vec![],
            artifacts: vec![],
        })
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A path inside this run's output folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn metric(&mut self, name: &str, value: f64) {
        self.metrics.insert(name.to_string(), value);
    }

    /// Records a target and returns whether it is met. NaN never meets a target.
    pub fn target(&mut self, name: &str, value: f64, op: Op, goal: f64) -> bool {
        let met = op.holds(value, goal);
        self.targets.retain(|t| t.name != name);
        self.targets.push(Target { name: name.to_string(), value, goal, op, met });
        met
    }

    /// Records a file (inside the output folder) for the gallery.
    pub fn artifact(&mut self, path: &Path) {
        let rel = path.strip_prefix(&self.dir).unwrap_or(path).to_string_lossy().into_owned();
        if !self.artifacts.contains(&rel) {
            self.artifacts.push(rel);
        }
    }

    pub fn metrics(&self) -> Metrics {
        Metrics {
            module: self.module.clone(),
            quick: self.quick,
            seed: self.seed,
            device: device_name(self.device),
            metrics: self.metrics.clone(),
            targets: self.targets.clone(),
            artifacts: self.artifacts.clone(),
        }
    }

    /// Writes metrics.json and manifest.json, prints the targets, returns the metrics.
    pub fn finish(self) -> Result<Metrics> {
        let m = self.metrics();
        let wall = self.started.elapsed().as_secs_f64();
        let (commit, dirty) = git_commit();
        let manifest = serde_json::json!({
            "module": self.module,
            "command_line": std::env::args().collect::<Vec<_>>(),
            "config": self.config,
            "seed": self.seed,
            "device": device_name(self.device),
            "quick": self.quick,
            "deterministic": runtime::deterministic(),
            "threads": runtime::threads(),
            "retains_freed_memory": self.retains_freed_memory,
            "git_commit": commit,
            "git_dirty": dirty,
            "versions": runtime::versions(),
            "crate_version": env!("CARGO_PKG_VERSION"),
            "started_unix": self.started_unix,
            "wall_time_s": wall,
            "peak_rss_bytes": runtime::peak_rss_bytes(),
        });
        write_json_atomic(&self.path("manifest.json"), &manifest)?;
        // metrics.json last: its presence means the run finished and its manifest is current.
        write_json_atomic(&self.path("metrics.json"), &m)?;
        println!("\n{}", targets_table(&m));
        println!("wrote {} and manifest.json ({wall:.1} s)", self.dir.join("metrics.json").display());
        Ok(m)
    }
}

/// The targets as an aligned text table.
pub fn targets_table(m: &Metrics) -> String {
    let w = m.targets.iter().map(|t| t.name.len()).max().unwrap_or(6).max(6);
    let mut s = format!("{:<w$}  {:>12}  {:>2}  {:>10}  met\n", "target", "value", "op", "goal");
    // Plain decimals for ordinary values, scientific for tiny or huge ones (a diverged loss).
    let num = |v: f64| {
        let a = v.abs();
        if a != 0.0 && (a >= 1e6 || a < 1e-3) {
            format!("{v:.3e}")
        } else {
            format!("{v:.6}")
        }
    };
    for t in &m.targets {
        let met = if t.met { "yes" } else { "NO" };
        s += &format!("{:<w$}  {:>12}  {:>2}  {:>10}  {met}\n", t.name, num(t.value), t.op.symbol(), num(t.goal));
    }
    let met = m.targets.iter().filter(|t| t.met).count();
    s += &format!(
        "{met}/{} targets met{}",
        m.targets.len(),
        if m.quick { " (--quick: sizes too small for the targets to mean much)" } else { "" }
    );
    s
}

/// The current git commit and whether the work tree has changes; "unknown" outside a checkout.
pub fn git_commit() -> (String, bool) {
    let run = |args: &[&str]| std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success());
    let commit = run(&["rev-parse", "HEAD"])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).map(|o| !o.stdout.is_empty()).unwrap_or(false);
    (commit, dirty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_and_nan() {
        assert!(Op::Ge.holds(0.98, 0.975) && !Op::Ge.holds(0.97, 0.975));
        assert!(Op::Le.holds(1.0, 1.0) && !Op::Le.holds(f64::NAN, 1.0) && !Op::Ge.holds(f64::NAN, 1.0));
        assert!(Op::Eq.holds(1.0, 1.0) && !Op::Eq.holds(0.0, 1.0));
    }

    #[test]
    fn metrics_json_has_exactly_the_contract_shape() {
        let m = Metrics {
            module: "m01_basics".into(),
            quick: false,
            seed: 0,
            device: "cpu".into(),
            metrics: BTreeMap::from([("a".to_string(), 1.5)]),
            targets: vec![Target { name: "t".into(), value: 2.0, goal: 1.0, op: Op::Ge, met: true }],
            artifacts: vec!["loss.png".into()],
        };
        let v = serde_json::to_value(&m).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["artifacts", "device", "metrics", "module", "quick", "seed", "targets"]);
        assert_eq!(v["targets"][0]["op"], ">=");
        let tkeys: Vec<_> = v["targets"][0].as_object().unwrap().keys().cloned().collect();
        assert_eq!(tkeys, ["goal", "met", "name", "op", "value"]);
        let back: Metrics = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn non_finite_values_round_trip_as_null_and_never_meet() {
        let m = Metrics {
            module: "m".into(),
            quick: true,
            seed: 1,
            device: "cpu".into(),
            metrics: BTreeMap::from([("loss".to_string(), f64::NAN), ("ok".to_string(), 2.0)]),
            targets: vec![Target { name: "loss".into(), value: f64::INFINITY, goal: 1.0, op: Op::Le, met: false }],
            artifacts: vec![],
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains(r#""loss":null"#) && text.contains(r#""value":null"#), "{text}");
        let back: Metrics = serde_json::from_str(&text).unwrap();
        assert!(back.metrics["loss"].is_nan() && back.metrics["ok"] == 2.0);
        assert!(back.targets[0].value.is_nan() && !back.targets[0].met);
    }

    #[test]
    fn load_rejects_inconsistent_targets_and_names_the_file() {
        let dir = std::env::temp_dir().join(format!("course-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("metrics.json");
        std::fs::write(&p, r#"{"module":"m","quick":false,"seed":0,"device":"cpu","metrics":{},"targets":[{"name":"acc","value":0.5,"goal":0.9,"op":">=","met":true}],"artifacts":[]}"#).unwrap();
        let err = format!("{:#}", Metrics::load(&p).unwrap_err());
        assert!(err.contains("metrics.json") && err.contains("'acc'"), "{err}");
        std::fs::write(&p, r#"{"module":"m","quick":false}"#).unwrap();
        let err = format!("{:#}", Metrics::load(&p).unwrap_err());
        assert!(err.contains("missing field"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
