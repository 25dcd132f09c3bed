//! torchrun's environment contract ([`DistEnv`]) and a built-in launcher ([`launch`]) that
//! honours it, so a module binary runs the same under `torchrun --no-python` and under ours.
//!
//! The contract: the launcher starts one process per rank and tells each who it is through the
//! environment — `RANK` (0..`WORLD_SIZE`, unique over all nodes), `WORLD_SIZE`, `LOCAL_RANK` (the
//! index on this node, used to pick a GPU), `LOCAL_WORLD_SIZE`, `GROUP_RANK` (the node index) and
//! `MASTER_ADDR:MASTER_PORT`, where the rendezvous TCPStore listens. A process that finds none of
//! these runs alone ([`DistEnv::from_env`] returns `None`).
//!
//! Several nodes work like torchrun's static rendezvous: every node runs the launcher with the
//! same `nnodes`, `nproc_per_node`, `master_addr` and an explicit `master_port`, and its own
//! `node_rank` (0 on the node at `master_addr`, whose rank 0 hosts the store):
//!
//! ```text
//! node A (10.0.0.1):  m05_ddp --nnodes 2 --node-rank 0 --nproc-per-node 4 --master-addr 10.0.0.1 --master-port 29500
//! node B:             m05_ddp --nnodes 2 --node-rank 1 --nproc-per-node 4 --master-addr 10.0.0.1 --master-port 29500
//! ```
//!
//! Unlike torchrun, the children stay in the launcher's process group: Ctrl-C in a terminal
//! reaches every rank directly, with no signal forwarding (which would need `libc`). The cost is
//! that stopping a rank signals that process only, not processes it started itself.

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const CONTRACT: [&str; 5] = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"];
const HINT: &str = "torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; set them all or none";

/// Who this process is in a multi-process run, as torchrun (or [`launch`]) describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The node index (`GROUP_RANK`, or `NODE_RANK`).
    pub group_rank: usize,
    /// `TORCHELASTIC_USE_AGENT_STORE=True`: torchrun's agent already hosts the TCPStore at
    /// `MASTER_ADDR:MASTER_PORT`, so every rank, rank 0 included, connects as a client, and keys
    /// live under [`DistEnv::store_prefix`] (`/worker/attempt_{restart_count}`). Otherwise rank 0
    /// hosts the store. The dist layer acts on this; this module only reads it.
    pub agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT`: how many times torchrun restarted the workers.
    pub restart_count: u64,
}

impl DistEnv {
    /// Reads the process environment; see [`DistEnv::from_vars`].
    pub fn from_env() -> Result<Option<DistEnv>> {
        // Lossy: a non-UTF-8 value then fails to parse with a message naming its variable.
        Self::from_vars(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    /// `None` when none of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is set (empty
    /// counts as unset); otherwise RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are required and
    /// LOCAL_RANK defaults to RANK, LOCAL_WORLD_SIZE to WORLD_SIZE, GROUP_RANK/NODE_RANK to 0.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let var = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let Some(first) = CONTRACT.into_iter().find(|k| var(k).is_some()) else { return Ok(None) };
        let required = |k: &str| var(k).with_context(|| format!("{first} is set but {k} is missing ({HINT})"));
        let int = |k: &str, v: String| v.parse::<usize>().map_err(|_| anyhow!("{k}={v} is not a non-negative integer"));
        let optional = |k: &str| var(k).map(|v| int(k, v)).transpose();

        let rank = int("RANK", required("RANK")?)?;
        let world_size = int("WORLD_SIZE", required("WORLD_SIZE")?)?;
        let master_addr = required("MASTER_ADDR")?;
        let port = required("MASTER_PORT")?;
        let master_port: u16 =
            port.parse().map_err(|_| anyhow!("MASTER_PORT={port} is not a port number (0-65535)"))?;
        if master_port == 0 {
            bail!("MASTER_PORT=0 names no port to connect to; the store's port is 1-65535");
        }
        if world_size == 0 {
            bail!("WORLD_SIZE=0 must be at least 1");
        }
        if rank >= world_size {
            bail!("RANK={rank} must be < WORLD_SIZE={world_size}");
        }
        let local_rank_set = optional("LOCAL_RANK")?;
        let local_rank = local_rank_set.unwrap_or(rank);
        let local_world_size = optional("LOCAL_WORLD_SIZE")?.unwrap_or(world_size);
        if local_world_size == 0 {
            bail!("LOCAL_WORLD_SIZE=0 must be at least 1");
        }
        if local_world_size > world_size {
            bail!("LOCAL_WORLD_SIZE={local_world_size} must be <= WORLD_SIZE={world_size}");
        }
        if local_rank >= local_world_size {
            let note = if local_rank_set.is_none() { " (LOCAL_RANK is unset and defaults to RANK)" } else { "" };
            bail!("LOCAL_RANK={local_rank} must be < LOCAL_WORLD_SIZE={local_world_size}{note}");
        }
        let group_rank = match optional("GROUP_RANK")? {
            Some(g) => g,
            None => optional("NODE_RANK")?.unwrap_or(0),
        };
        let agent_store =
            var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let restart_count = match var("TORCHELASTIC_RESTART_COUNT") {
            Some(v) => {
                v.parse().map_err(|_| anyhow!("TORCHELASTIC_RESTART_COUNT={v} is not a non-negative integer"))?
            }
            None => 0,
        };
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            group_rank,
            agent_store,
            restart_count,
        }))
    }

    /// Rank 0 of 1 on 127.0.0.1 (port 0: no store needed): the single-process run.
    pub fn single() -> DistEnv {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            group_rank: 0,
            agent_store: false,
            restart_count: 0,
        }
    }

    /// Rank 0 logs, saves checkpoints and writes metrics.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The key prefix torchrun's agent store expects, when [`DistEnv::agent_store`] is set.
    pub fn store_prefix(&self) -> Option<String> {
        self.agent_store.then(|| format!("/worker/attempt_{}", self.restart_count))
    }
}

/// A port that was free a moment ago on 127.0.0.1. Racy by nature (another process may take it
/// before rank 0 binds it), which is why torchrun does the same only for single-node runs.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr().context("reading the bound address")?.port())
}

/// Where the ranks' output goes, each line prefixed `[rank{R}]: `.
#[derive(Debug, Clone)]
pub enum Output {
    /// To our stdout and stderr, one whole line at a time.
    Inherit,
    /// Into a shared vector (stdout and stderr lines alike), for tests.
    Capture(Arc<Mutex<Vec<String>>>),
}

/// What [`launch`] starts on this node, like `torchrun --nnodes --node-rank --nproc-per-node`.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// 0 picks a free port (one node only: the other nodes could not know it).
    pub master_port: u16,
    /// OMP_NUM_THREADS per rank; `None` keeps the parent's OMP_NUM_THREADS if set, else splits
    /// the cores: N ranks each running a full-size intra-op pool would oversubscribe the CPU N
    /// times over. (torchrun sets 1, which suits GPU ranks but starves CPU ones.)
    pub threads_per_proc: Option<usize>,
    /// How long the other ranks get to exit after SIGTERM before SIGKILL (torch elastic's
    /// `PContext.close` waits 30 s).
    pub grace: Duration,
    pub output: Output,
}

impl LaunchSpec {
    /// `n` ranks on this machine, rendezvous on 127.0.0.1 at a free port.
    pub fn local(n: usize) -> LaunchSpec {
        LaunchSpec {
            nproc_per_node: n,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            threads_per_proc: None,
            grace: Duration::from_secs(30),
            output: Output::Inherit,
        }
    }
}

/// The launcher's flags, with torchrun's names: flatten them into a module's `Args` beside
/// `CommonArgs` (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct LaunchArgs {
    /// Launch N processes of this command on this node (like torchrun --nproc-per-node N) and
    /// wait for them; each trains as one rank
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub nproc_per_node: Option<usize>,
    /// Nodes taking part (each runs this command with its own --node-rank)
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub nnodes: usize,
    /// This node's index, 0..nnodes
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of rank 0's node (where the rendezvous TCPStore listens)
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of the rendezvous store (0: a free port; with several nodes give one explicitly)
    #[arg(long, default_value_t = 0)]
    pub master_port: u16,
}

impl LaunchArgs {
    /// The flags above, with whether each takes a value: stripped from the ranks' command line.
    pub const FLAGS: &'static [(&'static str, bool)] = &[
        ("--nproc-per-node", true),
        ("--nnodes", true),
        ("--node-rank", true),
        ("--master-addr", true),
        ("--master-port", true),
    ];

    /// The flags are consistent: the node rank is below the node count.
    pub fn check(&self) -> Result<()> {
        if self.node_rank >= self.nnodes {
            bail!("--node-rank {} must be below --nnodes {}", self.node_rank, self.nnodes);
        }
        Ok(())
    }

    /// The launch these flags ask for, `n` processes here with `threads` intra-op threads each
    /// (None: split the cores).
    pub fn spec(&self, n: usize, threads: Option<usize>) -> LaunchSpec {
        LaunchSpec {
            nproc_per_node: n,
            nnodes: self.nnodes,
            node_rank: self.node_rank,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
            threads_per_proc: threads,
            ..LaunchSpec::local(n)
        }
    }
}

/// How each rank on this node ended.
#[derive(Debug, Clone)]
pub struct LaunchReport {
    /// `(rank, status)` in rank order.
    pub statuses: Vec<(usize, ExitStatus)>,
    /// The first rank seen to exit non-zero or by a signal.
    pub first_failure: Option<(usize, ExitStatus)>,
}

/// The error [`launch`] returns when a rank failed; downcast it to read every rank's status.
#[derive(Debug)]
pub struct LaunchFailure {
    pub report: LaunchReport,
    /// Ranks still running when the failure was seen, then stopped.
    pub stopped: usize,
}

impl std::fmt::Display for LaunchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some((rank, status)) = self.report.first_failure else { return write!(f, "no rank failed") };
        write!(f, "rank {rank} {}", describe(status))?;
        match self.stopped {
            0 => Ok(()),
            n => write!(f, "; stopped the other {n} rank(s)"),
        }
    }
}

impl std::error::Error for LaunchFailure {}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    if let Some(sig) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return format!("was killed by signal {sig}");
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("ended with {status}"),
    }
}

struct Rank {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
}

/// Runs `program args` as ranks `node_rank * nproc_per_node ..` of `nnodes * nproc_per_node`,
/// with torchrun's variables set, until all exit. When one fails the others get SIGTERM, then
/// SIGKILL after `spec.grace`, and the result is an `Err` ([`LaunchFailure`]) naming that rank.
pub fn launch(spec: &LaunchSpec, program: &Path, args: &[OsString]) -> Result<LaunchReport> {
    let (nproc, nnodes) = (spec.nproc_per_node, spec.nnodes);
    if nproc == 0 || nnodes == 0 {
        bail!("nproc_per_node={nproc} and nnodes={nnodes} must both be at least 1");
    }
    if spec.node_rank >= nnodes {
        bail!("node_rank={} must be < nnodes={nnodes}", spec.node_rank);
    }
    if spec.master_port == 0 && nnodes > 1 {
        bail!("master_port=0 (pick a free port) works on one node only; give every node the same --master-port");
    }
    if spec.master_addr.trim().is_empty() {
        bail!("master_addr is empty");
    }
    let port = if spec.master_port == 0 { free_port()? } else { spec.master_port };
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let omp = spec
        .threads_per_proc
        .map(|t| t.max(1))
        .or_else(|| std::env::var_os("OMP_NUM_THREADS").is_none().then_some((cores / nproc).max(1)));

    let mut ranks: Vec<Rank> = Vec::new();
    let mut readers = Vec::new();
    for local in 0..nproc {
        let rank = spec.node_rank * nproc + local;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // We host no store (rank 0 does), so a torchrun around us must not leak its agent flag.
        cmd.env_remove("TORCHELASTIC_USE_AGENT_STORE");
        let world = (nnodes * nproc).to_string();
        for (k, v) in [
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", world.clone()),
            ("LOCAL_RANK", local.to_string()),
            ("LOCAL_WORLD_SIZE", nproc.to_string()),
            ("GROUP_RANK", spec.node_rank.to_string()),
            ("NODE_RANK", spec.node_rank.to_string()),
            ("GROUP_WORLD_SIZE", nnodes.to_string()),
            ("ROLE_RANK", rank.to_string()),
            ("ROLE_WORLD_SIZE", world),
            ("MASTER_ADDR", spec.master_addr.clone()),
            ("MASTER_PORT", port.to_string()),
        ] {
            cmd.env(k, v);
        }
        if let Some(t) = omp {
            cmd.env("OMP_NUM_THREADS", t.to_string());
        }
        let started = cmd.spawn().with_context(|| format!("starting rank {rank}: {}", program.display()));
        let started = started.and_then(|mut child| {
            let (out, err) = (child.stdout.take(), child.stderr.take());
            ranks.push(Rank { rank, child, status: None });
            readers.push(pipe(rank, out.context("no stdout pipe")?, false, &spec.output)?);
            readers.push(pipe(rank, err.context("no stderr pipe")?, true, &spec.output)?);
            Ok(())
        });
        if let Err(e) = started {
            stop(&mut ranks, Duration::ZERO);
            drain(readers);
            return Err(e);
        }
    }

    let monitored = monitor(&mut ranks, spec.grace);
    drain(readers);
    let (first_failure, stopped) = monitored?;
    let statuses = ranks.iter().filter_map(|r| r.status.map(|s| (r.rank, s))).collect();
    let report = LaunchReport { statuses, first_failure };
    match first_failure {
        None => Ok(report),
        Some(_) => Err(LaunchFailure { report, stopped }.into()),
    }
}

/// Polls every 50 ms until all ranks exit or one fails; then stops the rest.
fn monitor(ranks: &mut [Rank], grace: Duration) -> Result<(Option<(usize, ExitStatus)>, usize)> {
    loop {
        let mut failure = None;
        for i in 0..ranks.len() {
            let r = &mut ranks[i];
            if r.status.is_some() {
                continue;
            }
            match r.child.try_wait() {
                Ok(status) => r.status = status,
                Err(e) => {
                    let rank = r.rank;
                    stop(ranks, grace);
                    return Err(e).with_context(|| format!("waiting for rank {rank}"));
                }
            }
            if let Some(s) = r.status.filter(|s| !s.success()) {
                failure = failure.or(Some((r.rank, s)));
            }
        }
        let running = ranks.iter().filter(|r| r.status.is_none()).count();
        if failure.is_some() {
            stop(ranks, grace);
            return Ok((failure, running));
        }
        if running == 0 {
            return Ok((None, 0));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM via the `kill` binary (no libc here), up to `grace` to exit, then SIGKILL.
fn stop(ranks: &mut [Rank], grace: Duration) {
    // Only unreaped children are signalled, so their pids cannot have been reused.
    let pids: Vec<String> = ranks.iter().filter(|r| r.status.is_none()).map(|r| r.child.id().to_string()).collect();
    if pids.is_empty() {
        return;
    }
    let termed = !grace.is_zero()
        && Command::new("kill").arg("-TERM").args(&pids).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    let deadline = Instant::now() + if termed { grace } else { Duration::ZERO };
    loop {
        for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
            r.status = r.child.try_wait().ok().flatten();
        }
        if ranks.iter().all(|r| r.status.is_some()) || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
        let _ = r.child.kill();
        r.status = r.child.wait().ok();
    }
}

/// A thread that copies one rank's stream line by line, prefixed, to `output`.
fn pipe(rank: usize, src: impl Read + Send + 'static, stderr: bool, output: &Output) -> Result<JoinHandle<()>> {
    let output = output.clone();
    let name = format!("rank{rank}-{}", if stderr { "stderr" } else { "stdout" });
    let body = move || {
        let mut reader = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            // Read errors end the copy; write errors (closed stdout) are ignored so the child
            // never blocks on a full pipe.
            if !matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                break;
            }
            let text = String::from_utf8_lossy(&buf);
            let line = format!("[rank{rank}]: {}", text.trim_end_matches(['\n', '\r']));
            match &output {
                // The lock is held for the whole line, so lines from different ranks never mix.
                Output::Inherit if stderr => {
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                }
                Output::Inherit => {
                    let _ = writeln!(std::io::stdout().lock(), "{line}");
                }
                Output::Capture(lines) => lines.lock().unwrap_or_else(|e| e.into_inner()).push(line),
            }
        }
    };
    thread::Builder::new().name(name).spawn(body).context("starting an output thread")
}

/// Waits up to 2 s for the output threads; a grandchild still holding a pipe open must not hang
/// the launcher, so the rest are left to finish on their own.
fn drain(readers: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while readers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    for h in readers.into_iter().filter(|h| h.is_finished()) {
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_vars(|k| map.get(k).cloned())
    }

    const FULL: [(&str, &str); 5] = [
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];

    fn with(changes: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = FULL.iter().filter(|(k, _)| !changes.iter().any(|(c, _)| c == k)).copied().collect();
        v.extend(changes.iter().filter(|(_, val)| !val.is_empty()));
        v
    }

    #[test]
    fn nothing_set_is_a_single_process_run() {
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&[("LOCAL_WORLD_SIZE", "2"), ("RANK", "")]).unwrap(), None);
        assert!(DistEnv::single().is_main());
    }

    #[test]
    fn reads_a_torchrun_environment() {
        let mut vars = with(&[("LOCAL_WORLD_SIZE", "2"), ("GROUP_RANK", "1")]);
        vars.extend([("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "2")]);
        let env = parse(&vars).unwrap().unwrap();
        let want = DistEnv {
            rank: 3,
            world_size: 4,
            local_rank: 1,
            local_world_size: 2,
            master_addr: "10.0.0.1".into(),
            master_port: 29500,
            group_rank: 1,
            agent_store: true,
            restart_count: 2,
        };
        assert_eq!(env, want);
        assert!(!env.is_main());
        assert_eq!(env.store_prefix().as_deref(), Some("/worker/attempt_2"));
        // Defaults: LOCAL_RANK = RANK, LOCAL_WORLD_SIZE = WORLD_SIZE, NODE_RANK as the fallback.
        let env = parse(&with(&[("LOCAL_RANK", ""), ("NODE_RANK", "1")])).unwrap().unwrap();
        assert_eq!((env.local_rank, env.local_world_size, env.group_rank, env.agent_store), (3, 4, 1, false));
        assert_eq!(env.store_prefix(), None);
    }

    #[test]
    fn errors_name_the_variable_and_the_problem() {
        let cases: [(&[(&'static str, &'static str)], &str); 11] = [
            (&[("WORLD_SIZE", "")], "RANK is set but WORLD_SIZE is missing (torchrun sets"),
            (&[("RANK", "")], "WORLD_SIZE is set but RANK is missing"),
            (&[("MASTER_ADDR", "")], "RANK is set but MASTER_ADDR is missing"),
            (&[("RANK", "4")], "RANK=4 must be < WORLD_SIZE=4"),
            (&[("RANK", "-1")], "RANK=-1 is not a non-negative integer"),
            (&[("WORLD_SIZE", "0"), ("RANK", "0")], "WORLD_SIZE=0 must be at least 1"),
            (&[("MASTER_PORT", "abc")], "MASTER_PORT=abc is not a port number (0-65535)"),
            (&[("MASTER_PORT", "70000")], "MASTER_PORT=70000 is not a port number"),
            (&[("LOCAL_RANK", "3"), ("LOCAL_WORLD_SIZE", "2")], "LOCAL_RANK=3 must be < LOCAL_WORLD_SIZE=2"),
            (&[("LOCAL_WORLD_SIZE", "8")], "LOCAL_WORLD_SIZE=8 must be <= WORLD_SIZE=4"),
            (&[("GROUP_RANK", "x")], "GROUP_RANK=x is not a non-negative integer"),
        ];
        for (changes, want) in cases {
            let err = parse(&with(changes)).unwrap_err().to_string();
            assert!(err.contains(want), "{changes:?}: got {err:?}, want {want:?}");
        }
        let err = parse(&with(&[("TORCHELASTIC_RESTART_COUNT", "z")])).unwrap_err().to_string();
        assert!(err.contains("TORCHELASTIC_RESTART_COUNT=z"), "{err}");
        let err = parse(&with(&[("MASTER_PORT", "0")])).unwrap_err().to_string();
        assert!(err.contains("MASTER_PORT=0"), "{err}");
    }
}
