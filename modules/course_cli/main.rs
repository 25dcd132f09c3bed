//! `course`: the course runner.
//!
//! - `course list`   — the modules in order, with their status from `outputs/*/metrics.json`
//! - `course doctor` — libtorch, CUDA, threads, CPU features, data sets (and how to fetch them)
//! - `course tour`   — runs every built module in order, then writes `outputs/index.html`

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use course::data::registry::{data_root, datasets};
use course::run::catalog::MODULES;
use course::run::gallery::{status, write_gallery, Status};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The llm-course runner: lists the modules, checks the machine, and runs the whole course.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the modules in order with their status: not built, not run, ran (k/n targets met), all targets met
    List {
        /// Folder holding <module>/metrics.json
        #[arg(long, default_value = "outputs")]
        outputs: PathBuf,
    },
    /// Report libtorch, CUDA, threads and CPU features, and which data sets are installed
    Doctor,
    /// Run every built module in order and write outputs/index.html, a gallery of their charts and targets
    Tour {
        /// Pass --quick to every module (seconds each; targets not meaningful)
        #[arg(long)]
        quick: bool,
        /// Only these modules (comma-separated names, e.g. m01_basics,m02_data)
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Device passed to every module: auto, cpu, cuda or cuda:N
        #[arg(long, default_value = "auto")]
        device: String,
        /// Folder for the modules' outputs and the gallery
        #[arg(long, default_value = "outputs")]
        outputs: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::List { outputs } => list(&outputs),
        Cmd::Doctor => doctor(),
        Cmd::Tour { quick, only, device, outputs } => tour(quick, &only, &device, &outputs),
    }
}

/// Module binaries are built next to this one (target/release/).
fn module_binary(name: &str) -> Option<PathBuf> {
    let p = std::env::current_exe().ok()?.parent()?.join(name);
    p.exists().then_some(p)
}

fn list(outputs: &Path) -> Result<()> {
    println!("{:<16} {:<32} {:<24} target", "module", "title", "status");
    for m in MODULES {
        let st = match (module_binary(m.name), status(outputs, m.name)) {
            (None, _) => "not built".to_string(),
            (Some(_), Status::NotRun) => "not run".to_string(),
            (Some(_), Status::Invalid(e)) => format!("invalid metrics ({})", e.lines().next().unwrap_or("")),
            (Some(_), Status::Ran(r)) if r.all_targets_met() => {
                format!("all targets met{}", if r.quick { " (quick)" } else { "" })
            }
            (Some(_), Status::Ran(r)) => {
                format!("ran ({}/{} targets met)", r.targets.iter().filter(|t| t.met).count(), r.targets.len())
            }
        };
        println!("{:<16} {:<32} {:<24} {}", m.name, m.title, st, m.target);
    }
    Ok(())
}

fn doctor() -> Result<()> {
    let r = course::run::report::env_report();
    println!("{r}");
    println!(
        "cuda kernels  {}",
        if course::CUDA_KERNELS {
            "compiled in (--features cuda)"
        } else {
            "not compiled (build with --features cuda for the CUDA twins)"
        }
    );
    let info = course::sys::runtime::parallel_info();
    let threads: Vec<&str> = info.lines().map(str::trim).filter(|l| l.contains("threads")).collect();
    println!("threads       {}", threads.join(", "));
    let ok_torch = r.torch.starts_with("2.11.0");
    if !ok_torch {
        println!(
            "PROBLEM       libtorch {} is loaded but tch 0.24 needs 2.11.0: rerun `python3 scripts/setup.py`",
            r.torch
        );
    }
    let root = data_root();
    println!("\ndata sets in {}:", root.display());
    let mut missing = 0;
    for d in datasets() {
        let present = d.present(&root);
        missing += !present as usize;
        println!(
            "  {:<18} {:<8} {:<44} {}",
            d.name,
            if present { "present" } else { "MISSING" },
            d.desc,
            if present { String::new() } else { format!("fetch: {}", d.fetch_command()) }
        );
    }
    if missing > 0 {
        println!("\n{missing} data set(s) missing; `python3 scripts/setup.py` fetches them all");
    }
    if !ok_torch {
        bail!("wrong libtorch version");
    }
    Ok(())
}

fn tour(quick: bool, only: &[String], device: &str, outputs: &Path) -> Result<()> {
    for name in only {
        if course::run::catalog::find(name).is_none() {
            bail!(
                "--only: unknown module '{name}' (known: {})",
                MODULES.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let mut failed = vec![];
    let mut ran = 0;
    for m in MODULES.iter().filter(|m| only.is_empty() || only.iter().any(|o| o == m.name)) {
        if m.target == "planned" {
            println!("== {} — in progress (no targets yet), skipped", m.name);
            continue;
        }
        let Some(bin) = module_binary(m.name) else {
            println!("== {} — not built yet, skipped", m.name);
            continue;
        };
        println!("\n== {} — {}", m.name, m.title);
        let t = Instant::now();
        let mut cmd = Command::new(&bin);
        cmd.arg("--outputs").arg(outputs).arg("--device").arg(device).args(m.tour_args);
        if quick {
            cmd.arg("--quick");
        }
        let st = cmd.status()?;
        ran += 1;
        println!(
            "== {} finished in {:.1} s ({})",
            m.name,
            t.elapsed().as_secs_f64(),
            if st.success() { "ok" } else { "FAILED" }
        );
        if !st.success() {
            failed.push(m.name);
        }
    }
    let page = write_gallery(outputs)?;
    println!("\nran {ran} module(s); gallery: {}", page.display());
    if ran == 0 {
        let dir =
            std::env::current_exe().ok().and_then(|e| e.parent().map(|p| p.display().to_string())).unwrap_or_default();
        bail!("no module binary found in {dir}: build them first with `cargo build --release`");
    }
    if !failed.is_empty() {
        bail!("module(s) failed: {}", failed.join(", "));
    }
    Ok(())
}
