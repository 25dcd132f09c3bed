//! Running this program again as a child that reports a typed JSON result: m01's second-process
//! probe, m04's one-process-per-precision `--compare`, m05's lesson jobs (N ranks each), and
//! later m06's per-format memory runs and m07's server tests.
//!
//! The parent builds the child's argv from [`CommonArgs::to_args`] (so every child gets the same
//! process set-up: device, seed, threads, determinism, allocator, quiet, outputs) or from its own
//! argv minus some flags ([`args_without`]), adds `--result <file>`, and reads the file back once
//! the child (or every rank of a child job) has exited. The child writes it with [`report`].

use crate::run::CommonArgs;
use crate::sys::fsutil::write_json_atomic;
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

impl CommonArgs {
    /// These flags back as an argument list, every one spelled out, so a child process parses
    /// exactly this `CommonArgs` (`--result` is the child's own and is never copied).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<String> = vec![
            "--device".into(),
            self.device.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--outputs".into(),
            self.outputs.display().to_string(),
        ];
        if let Some(n) = self.threads {
            a.extend(["--threads".into(), n.to_string()]);
        }
        for (on, flag) in [
            (self.quick, "--quick"),
            (self.deterministic, "--deterministic"),
            (self.quiet, "--quiet"),
            (self.release_freed_memory, "--release-freed-memory"),
        ] {
            if on {
                a.push(flag.into());
            }
        }
        a.into_iter().map(OsString::from).collect()
    }
}

/// `args` without each of `flags` (name, whether it takes a value), in both the `--flag value`
/// and the `--flag=value` form.
pub fn strip_flags(args: &[OsString], flags: &[(&str, bool)]) -> Vec<OsString> {
    let mut out = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        match flags.iter().find(|(f, _)| s == *f || s.starts_with(&format!("{f}="))) {
            Some((f, true)) if s == *f => {
                it.next();
            }
            Some(_) => {}
            None => out.push(a.clone()),
        }
    }
    out
}

/// This process's arguments (after the program name) without `flags`: what a child that should
/// run "the same command, but ..." starts from.
pub fn args_without(flags: &[(&str, bool)]) -> Vec<OsString> {
    strip_flags(&std::env::args_os().skip(1).collect::<Vec<_>>(), flags)
}

/// The child side: writes `value` as JSON to the `--result` path, atomically (a parent never
/// reads half a file).
pub fn report<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_json_atomic(path, value)
}

/// A child run of this program: its arguments and the file its result comes back in.
#[derive(Debug)]
pub struct Child {
    args: Vec<OsString>,
    result: PathBuf,
}

impl Child {
    /// A child with `args`, to which `--result <fresh file>` is appended.
    pub fn new(args: Vec<OsString>) -> Child {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("course-child-{}-{}.json", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        Child { args, result: std::env::temp_dir().join(name) }
    }

    /// The full argument list, `--result` included.
    pub fn args(&self) -> Vec<OsString> {
        let mut a = self.args.clone();
        a.push("--result".into());
        a.push(self.result.clone().into_os_string());
        a
    }

    /// Runs this program as the child (stdout and stderr shared with ours), waits, and reads its
    /// result. `what` names the child in errors.
    pub fn run<T: DeserializeOwned>(self, what: &str) -> Result<T> {
        self.run_with(what, |exe, args| {
            let status = std::process::Command::new(exe)
                .args(args)
                .status()
                .with_context(|| format!("{what}: starting {}", exe.display()))?;
            if !status.success() {
                bail!("{what}: the child process failed ({status}); its output is above");
            }
            Ok(())
        })
    }

    /// Like [`Child::run`], with the process start left to `start(exe, args)` — m05 starts N ranks
    /// of it through `dist::launch` — and the result read once `start` returns.
    pub fn run_with<T: DeserializeOwned>(
        self,
        what: &str,
        start: impl FnOnce(&Path, &[OsString]) -> Result<()>,
    ) -> Result<T> {
        let exe = std::env::current_exe().context("finding this program's path")?;
        let _ = std::fs::remove_file(&self.result);
        let outcome = start(&exe, &self.args());
        let read = || -> Result<T> {
            let text = std::fs::read_to_string(&self.result)
                .with_context(|| format!("{what}: reading its result {}", self.result.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{what}: {} does not hold the expected result", self.result.display()))
        };
        let value = outcome.and_then(|_| read());
        let _ = std::fs::remove_file(&self.result);
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn flags_are_stripped_in_both_forms() {
        let a = os(&["--compare", "fp32,bf16", "--steps", "3", "--precision=bf16", "--quick", "--nproc-per-node", "2"]);
        let got = strip_flags(&a, &[("--compare", true), ("--precision", true), ("--quick", false)]);
        assert_eq!(got, os(&["--steps", "3", "--nproc-per-node", "2"]));
    }

    #[test]
    fn common_args_round_trip_through_argv() {
        use clap::Parser;
        #[derive(Parser)]
        struct A {
            #[command(flatten)]
            common: CommonArgs,
        }
        let c = A::parse_from(os(&[
            "x",
            "--seed",
            "7",
            "--threads",
            "3",
            "--deterministic",
            "--release-freed-memory",
            "--quiet",
            "--outputs",
            "/tmp/o",
        ]))
        .common;
        let mut argv = os(&["x"]);
        argv.extend(c.to_args());
        let d = A::parse_from(argv).common;
        assert_eq!(serde_json::to_value(&c).unwrap(), serde_json::to_value(&d).unwrap());
        assert_eq!(
            (d.seed, d.threads, d.deterministic, d.release_freed_memory, d.quiet),
            (7, Some(3), true, true, true)
        );
    }
}
