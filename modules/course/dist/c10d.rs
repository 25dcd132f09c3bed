//! PyTorch's own distributed engine, c10d, from Rust: the rendezvous store (`TCPStore`,
//! `PrefixStore`), process groups (Gloo on CPU, NCCL on CUDA with `--features cuda`) and the
//! collectives data parallelism needs — allreduce (sum or average), broadcast, allgather and
//! barrier — each bounded by a timeout. Nothing here moves bytes itself: the C++ shim in
//! `kernels/dist/c10d.cpp` calls the same `c10d::ProcessGroupGloo` that `torch.distributed` uses, and
//! c10d's own error messages come back as `anyhow` errors.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use course::dist::{Backend, ProcessGroup, ReduceOp};
//! // Started by torchrun or `m05_ddp --nproc-per-node 2`: RANK, WORLD_SIZE, MASTER_ADDR, ... set.
//! let pg = ProcessGroup::from_env(Backend::Gloo, std::time::Duration::from_secs(60))?;
//! let t = tch::Tensor::from_slice(&[pg.rank() as f32]);
//! pg.allreduce(&t, ReduceOp::Sum)?; // every rank now holds 0 + 1 + ... + (N - 1)
//! # Ok(()) }
//! ```

use crate::dist::launch::DistEnv;
use crate::sys::ffi;
use anyhow::{anyhow, bail, Context, Result};
use std::ffi::{c_void, CString};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// A c10d key-value store: the rendezvous every process group starts from.
pub struct Store {
    raw: *mut c_void,
}

// SAFETY: c10d stores are thread-safe (TCPStore serialises its socket behind a mutex).
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `raw` came from course_store_tcp/prefix and is freed once.
        unsafe { ffi::course_store_free(self.raw) }
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn cstr(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow!("{what} '{s}' contains a NUL byte"))
}

impl Store {
    /// A `TCPStore` at `host:port` for `world_size` processes. The server (`is_server`, rank 0 by
    /// torch's convention) listens on `port` (0: any free port, see [`Store::port`]) and returns
    /// at once: the process group's rendezvous waits for the others (up to its timeout). A client
    /// retries its connection until `timeout`.
    pub fn tcp(host: &str, port: u16, world_size: usize, is_server: bool, timeout: Duration) -> Result<Store> {
        let h = cstr(host, "store host")?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer.
        ffi::check(unsafe {
            ffi::course_store_tcp(
                h.as_ptr(),
                port as i32,
                world_size as i32,
                is_server as i32,
                0,
                ms(timeout),
                &mut raw,
            )
        })
        .with_context(|| {
            format!(
                "{} the TCPStore at {host}:{port} (timeout {:.0} s)",
                if is_server { "starting" } else { "connecting to" },
                timeout.as_secs_f64()
            )
        })?;
        Ok(Store { raw })
    }

    /// The same store with every key prefixed by `prefix/` (torch's `PrefixStore`).
    pub fn prefixed(&self, prefix: &str) -> Result<Store> {
        let p = cstr(prefix, "store prefix")?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `self.raw` is live; the new handle keeps its own reference to the base store.
        ffi::check(unsafe { ffi::course_store_prefix(p.as_ptr(), self.raw, &mut raw) })?;
        Ok(Store { raw })
    }

    /// The port a TCPStore listens on or connects to (None for a prefix store).
    pub fn port(&self) -> Option<u16> {
        // SAFETY: live handle.
        let p = unsafe { ffi::course_store_port(self.raw) };
        (p >= 0).then_some(p as u16)
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = cstr(key, "store key")?;
        // SAFETY: live handle, valid key and byte slice.
        ffi::check(unsafe { ffi::course_store_set(self.raw, k.as_ptr(), value.as_ptr(), value.len()) })
            .with_context(|| format!("store set '{key}'"))
    }

    /// The value of `key`, waiting up to `timeout` for some process to set it.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let k = cstr(key, "store key")?;
        let (mut data, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: live handle; on success `data` is a malloc'd buffer of `len` bytes.
        ffi::check(unsafe { ffi::course_store_get(self.raw, k.as_ptr(), ms(timeout).max(1), &mut data, &mut len) })
            .with_context(|| format!("store get '{key}'"))?;
        // SAFETY: see above; freed with the shim's free.
        let v = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        unsafe { ffi::course_free_error(data as *mut _) };
        Ok(v)
    }

    /// Atomically adds `delta` to the integer at `key` (created at 0) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = cstr(key, "store key")?;
        let mut out = 0i64;
        // SAFETY: live handle, valid key and out-pointer.
        ffi::check(unsafe { ffi::course_store_add(self.raw, k.as_ptr(), delta, &mut out) })
            .with_context(|| format!("store add '{key}'"))?;
        Ok(out)
    }
}

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Facebook's Gloo over TCP: CPU tensors (and CUDA tensors via host copies).
    Gloo,
    /// NVIDIA's NCCL: CUDA tensors over NVLink / InfiniBand / sockets (`--features cuda`).
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
    /// torch's default: NCCL for CUDA devices, Gloo otherwise.
    pub fn for_device(device: Device) -> Backend {
        if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            _ => bail!("unknown backend '{s}' (gloo or nccl)"),
        }
    }
}

/// The reduction of an allreduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The mean over ranks (NCCL's native AVG; on Gloo a sum divided by the world size).
    Avg,
}

/// A process group: `size` processes, this one being `rank`, joined through a store.
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    size: usize,
    backend: Backend,
    timeout: Duration,
    // The group keeps using its store (c10d holds a reference too; this one names the port).
    store: Store,
}

// SAFETY: c10d backends are thread-safe; collectives are ordered by the caller.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from course_pg_new and is freed once.
        unsafe { ffi::course_pg_free(self.raw) }
    }
}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProcessGroup({} rank {} of {})", self.backend, self.rank, self.size)
    }
}

/// An allreduce in flight ([`ProcessGroup::allreduce_start`]).
pub struct Work {
    raw: *mut c_void,
    what: String,
}

// SAFETY: a c10d Work may be waited on from any thread.
unsafe impl Send for Work {}

impl Work {
    /// Blocks until the collective finished (or failed, or timed out); averages are divided here.
    pub fn wait(mut self) -> Result<()> {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        // SAFETY: `raw` is a live work handle; course_work_wait frees it.
        ffi::check(unsafe { ffi::course_work_wait(raw) }).with_context(|| self.what.clone())
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: not yet waited on (wait nulls it); the handle keeps its tensor alive.
            unsafe { ffi::course_work_free(self.raw) }
        }
    }
}

impl ProcessGroup {
    /// Joins a group over `store`. All `size` processes must call this with the same store.
    pub fn new(store: Store, rank: usize, size: usize, backend: Backend, timeout: Duration) -> Result<Self> {
        if size == 0 || rank >= size {
            bail!("process group: rank {rank} must be below the world size {size}");
        }
        let b = cstr(backend.name(), "backend")?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: live store handle, valid C string and out-pointer.
        ffi::check(unsafe {
            ffi::course_pg_new(store.raw, rank as i32, size as i32, b.as_ptr(), ms(timeout), &mut raw)
        })
        .with_context(|| format!("creating the {backend} process group (rank {rank} of {size})"))?;
        Ok(ProcessGroup { raw, rank, size, backend, timeout, store })
    }

    /// torch.distributed's `env://` rendezvous: a TCPStore at MASTER_ADDR:MASTER_PORT hosted by
    /// rank 0 — or, under torchrun (`TORCHELASTIC_USE_AGENT_STORE=True`), by torchrun's agent,
    /// with keys under `/worker/attempt_<restart count>` as torch does.
    pub fn init(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<Self> {
        let ctx = || {
            format!(
                "rendezvous at MASTER_ADDR={} MASTER_PORT={} as RANK={} of WORLD_SIZE={}",
                env.master_addr, env.master_port, env.rank, env.world_size
            )
        };
        // Under torchrun's agent store every rank is a client and keys live under its prefix.
        let server = env.rank == 0 && !env.agent_store;
        let store = Store::tcp(&env.master_addr, env.master_port, env.world_size, server, timeout).with_context(ctx)?;
        let store = match env.store_prefix() {
            Some(prefix) => store.prefixed(&prefix)?,
            None => store,
        };
        let store = store.prefixed("course_pg")?;
        ProcessGroup::new(store, env.rank, env.world_size, backend, timeout).with_context(ctx)
    }

    /// [`ProcessGroup::init`] from torchrun's variables, or a group of one (its own store on a
    /// free local port) when they are not set.
    pub fn from_env(backend: Backend, timeout: Duration) -> Result<Self> {
        match DistEnv::from_env()? {
            Some(env) => ProcessGroup::init(&env, backend, timeout),
            None => ProcessGroup::single(backend, timeout),
        }
    }

    /// A group of one process: the same code path as N processes, for N = 1 runs.
    pub fn single(backend: Backend, timeout: Duration) -> Result<Self> {
        let store = Store::tcp("127.0.0.1", 0, 1, true, timeout)?;
        ProcessGroup::new(store, 0, 1, backend, timeout)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// The default timeout of every collective.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The shim's handle, for C++ ops that communicate (sync batch norm).
    pub(crate) fn raw_handle(&self) -> *mut c_void {
        self.raw
    }

    fn what(&self, op: &str) -> String {
        format!("{op} on rank {} of {} ({})", self.rank, self.size, self.backend)
    }

    /// In-place allreduce of `t` with the group's timeout.
    pub fn allreduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        self.allreduce_timeout(t, op, self.timeout)
    }

    pub fn allreduce_timeout(&self, t: &Tensor, op: ReduceOp, timeout: Duration) -> Result<()> {
        // SAFETY: live group and tensor.
        ffi::check(unsafe {
            ffi::course_pg_allreduce(self.raw, ffi::ptr(t), (op == ReduceOp::Avg) as i32, ms(timeout))
        })
        .with_context(|| self.what("allreduce"))
    }

    /// Starts an in-place allreduce and returns at once: several buckets can be in flight while
    /// the caller prepares the next one. Gloo runs them on its own threads.
    pub fn allreduce_start(&self, t: &Tensor, op: ReduceOp) -> Result<Work> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: live group and tensor; the work handle holds a reference to the tensor.
        ffi::check(unsafe {
            ffi::course_pg_allreduce_start(
                self.raw,
                ffi::ptr(t),
                (op == ReduceOp::Avg) as i32,
                ms(self.timeout),
                &mut raw,
            )
        })
        .with_context(|| self.what("allreduce"))?;
        Ok(Work { raw, what: self.what("allreduce") })
    }

    /// Overwrites `t` on every rank with rank `root`'s values.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.broadcast_timeout(t, root, self.timeout)
    }

    pub fn broadcast_timeout(&self, t: &Tensor, root: usize, timeout: Duration) -> Result<()> {
        // SAFETY: live group and tensor.
        ffi::check(unsafe { ffi::course_pg_broadcast(self.raw, ffi::ptr(t), root as i32, ms(timeout)) })
            .with_context(|| self.what("broadcast"))
    }

    /// Every rank's `t`, in rank order.
    pub fn allgather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        self.allgather_timeout(t, self.timeout)
    }

    pub fn allgather_timeout(&self, t: &Tensor, timeout: Duration) -> Result<Vec<Tensor>> {
        let mut outs: Vec<ffi::CTensor> = vec![std::ptr::null_mut(); self.size];
        // SAFETY: live group and tensor; `outs` has room for one pointer per rank.
        ffi::check(unsafe { ffi::course_pg_allgather(self.raw, ffi::ptr(t), ms(timeout), outs.as_mut_ptr()) })
            .with_context(|| self.what("allgather"))?;
        Ok(outs.into_iter().map(ffi::take).collect())
    }

    /// Waits until every rank reached the barrier.
    pub fn barrier(&self) -> Result<()> {
        self.barrier_timeout(self.timeout)
    }

    pub fn barrier_timeout(&self, timeout: Duration) -> Result<()> {
        // SAFETY: live group.
        ffi::check(unsafe { ffi::course_pg_barrier(self.raw, ms(timeout)) }).with_context(|| self.what("barrier"))
    }

    /// Sums (or averages) a few numbers across ranks: metrics such as (loss sum, correct, count).
    pub fn allreduce_f64(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>> {
        if self.size == 1 {
            return Ok(values.to_vec());
        }
        let t = Tensor::from_slice(values).to_kind(Kind::Double);
        self.allreduce(&t, op)?;
        Ok(Vec::<f64>::try_from(&t)?)
    }

    /// Measures allreduce bandwidth: `iters` sums of `bytes` of f32 after `warmup`, returning
    /// (seconds per op, bus bandwidth in GB/s as nccl-tests defines it: 2 (N-1)/N bytes / time).
    pub fn allreduce_bandwidth(&self, bytes: usize, warmup: usize, iters: usize, device: Device) -> Result<(f64, f64)> {
        let n = (bytes / 4).max(1) as i64;
        let t = Tensor::ones([n], (Kind::Float, device));
        for _ in 0..warmup {
            self.allreduce(&t, ReduceOp::Sum)?;
        }
        self.barrier()?;
        let t0 = Instant::now();
        for _ in 0..iters.max(1) {
            self.allreduce(&t, ReduceOp::Sum)?;
        }
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let per = t0.elapsed().as_secs_f64() / iters.max(1) as f64;
        let w = self.size as f64;
        let bus = if self.size > 1 { 2.0 * (w - 1.0) / w * (n * 4) as f64 / per / 1e9 } else { 0.0 };
        Ok((per, bus))
    }
}
