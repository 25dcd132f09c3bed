//! Distributed data parallelism (torch.nn.parallel.DistributedDataParallel) over a
//! [`ProcessGroup`]: every rank holds the whole model, trains on its own shard of each batch,
//! and averages gradients before the optimizer step, so N ranks of batch b follow the same
//! trajectory as one process of batch N·b.
//!
//! - [`Ddp::new`] broadcasts every parameter and buffer from rank 0 in sorted-name order
//!   (`VarStore::variables()` is a HashMap whose order differs between processes).
//! - [`Ddp::sync_gradients`] averages gradients in buckets: gradients are packed into flat
//!   buffers of about `bucket_cap_mb` (in reverse name order, as DDP fills buckets in backward
//!   order), every bucket's allreduce is started before the first is waited on, then the
//!   averages are copied back. tch has no per-tensor backward hooks, so the allreduce runs
//!   after backward instead of overlapping it (see notes/m05_ddp.md).
//! - [`Ddp::no_sync`] skips the allreduce for gradient-accumulation micro-steps.
//! - [`DistributedSampler`] shards each epoch's order; [`SyncBatchNorm`] normalises with the
//!   statistics of every rank's samples.

use crate::data::loader::{RandomSampler, Sampler};
use crate::dist::c10d::{ProcessGroup, ReduceOp};
use crate::sys::ffi;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Kind, Tensor};

/// DDP's knobs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DdpConfig {
    /// Gradient bucket size in MiB (PyTorch's default is 25).
    pub bucket_cap_mb: f64,
}

impl Default for DdpConfig {
    fn default() -> Self {
        DdpConfig { bucket_cap_mb: 25.0 }
    }
}

/// A group of parameters whose gradients travel in one flat buffer.
struct Bucket {
    names: Vec<String>,
    params: Vec<Tensor>,
    numel: i64,
    kind: Kind,
}

/// Communication counters, for the metrics and the bandwidth chart.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CommStats {
    pub allreduces: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Data parallelism over a process group for the variables of one `VarStore`.
pub struct Ddp {
    pg: Arc<ProcessGroup>,
    buckets: Vec<Bucket>,
    sync: bool,
    pub stats: CommStats,
}

/// Every tensor of `vs` (parameters and buffers) by name, in sorted order.
pub fn sorted_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let map: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    map.into_iter().collect()
}

/// Copies rank `root`'s values of `tensors` to every rank, one flat broadcast per dtype and
/// device (torch's `_broadcast_coalesced`). Every rank must pass the same names in the same order.
pub fn broadcast_coalesced(pg: &ProcessGroup, tensors: &[(String, Tensor)], root: usize) -> Result<()> {
    if pg.size() == 1 {
        return Ok(());
    }
    let mut groups: BTreeMap<String, Vec<&Tensor>> = BTreeMap::new();
    for (_, t) in tensors {
        groups.entry(format!("{:?}/{:?}", t.kind(), t.device())).or_default().push(t);
    }
    let _g = tch::no_grad_guard();
    for ts in groups.values() {
        let flat = Tensor::cat(&ts.iter().map(|t| t.detach().reshape([-1])).collect::<Vec<_>>(), 0);
        pg.broadcast(&flat, root)?;
        let mut off = 0;
        for t in ts {
            let n = t.numel() as i64;
            t.detach().copy_(&flat.narrow(0, off, n).view_as(t));
            off += n;
        }
    }
    Ok(())
}

impl Ddp {
    /// Wraps the trainable variables of `vs` and makes every rank start from rank 0's weights
    /// and buffers. Collective: every rank must call it.
    pub fn new(pg: Arc<ProcessGroup>, vs: &nn::VarStore, cfg: DdpConfig) -> Result<Self> {
        if cfg.bucket_cap_mb.is_nan() || cfg.bucket_cap_mb <= 0.0 {
            bail!("--bucket-cap-mb must be positive, got {}", cfg.bucket_cap_mb);
        }
        let all = sorted_variables(vs);
        broadcast_coalesced(&pg, &all, 0).context("broadcasting the initial weights from rank 0")?;
        let cap = (cfg.bucket_cap_mb * 1024.0 * 1024.0) as i64;
        let mut buckets: Vec<Bucket> = vec![];
        // Reverse name order: the output layers' gradients are ready first in backward.
        for (name, t) in all.into_iter().rev().filter(|(_, t)| t.requires_grad()) {
            let bytes = t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
            let fits = buckets.last().is_some_and(|b| {
                b.kind == t.kind()
                    && b.params[0].device() == t.device()
                    && (b.numel * b.kind.elt_size_in_bytes() as i64 + bytes) <= cap
            });
            if !fits {
                buckets.push(Bucket { names: vec![], params: vec![], numel: 0, kind: t.kind() });
            }
            let b = buckets.last_mut().expect("pushed above");
            b.numel += t.numel() as i64;
            b.names.push(name);
            b.params.push(t);
        }
        Ok(Ddp { pg, buckets, sync: true, stats: CommStats::default() })
    }

    pub fn group(&self) -> &Arc<ProcessGroup> {
        &self.pg
    }

    /// The parameter names in each bucket (for logs and tests).
    pub fn bucket_names(&self) -> Vec<Vec<String>> {
        self.buckets.iter().map(|b| b.names.clone()).collect()
    }

    /// Whether the next [`Ddp::sync_gradients`] communicates.
    pub fn require_sync(&self) -> bool {
        self.sync
    }

    /// Runs `f` (forward and backward of a micro-batch) without gradient synchronisation: local
    /// gradients accumulate, and the next synchronised step averages the sum (DDP's `no_sync`).
    pub fn no_sync<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let prev = std::mem::replace(&mut self.sync, false);
        let r = f(self);
        self.sync = prev;
        r
    }

    /// Averages every parameter's gradient across ranks (a no-op inside [`Ddp::no_sync`] and for a
    /// group of one). Collective: every rank must call it after the same backward passes.
    pub fn sync_gradients(&mut self) -> Result<()> {
        if !self.sync || self.pg.size() == 1 {
            return Ok(());
        }
        let t0 = Instant::now();
        let _g = tch::no_grad_guard();
        let mut flats = Vec::with_capacity(self.buckets.len());
        for b in &self.buckets {
            let mut parts = Vec::with_capacity(b.params.len());
            for (name, p) in b.names.iter().zip(&b.params) {
                let g = p.grad();
                if !g.defined() {
                    bail!(
                        "DDP: parameter '{name}' has no gradient on rank {}: every parameter must take part in the loss on every rank",
                        self.pg.rank()
                    );
                }
                parts.push(g.reshape([-1]));
            }
            let flat = Tensor::cat(&parts, 0);
            let work = self.pg.allreduce_start(&flat, ReduceOp::Avg)?;
            flats.push((flat, work));
        }
        for (b, (flat, work)) in self.buckets.iter().zip(flats) {
            work.wait()
                .with_context(|| format!("averaging the gradients of {} and the rest of its bucket", b.names[0]))?;
            let mut off = 0;
            for p in &b.params {
                let n = p.numel() as i64;
                p.grad().copy_(&flat.narrow(0, off, n).view_as(p));
                off += n;
            }
            self.stats.allreduces += 1;
            self.stats.bytes += (b.numel * b.kind.elt_size_in_bytes() as i64) as u64;
        }
        self.stats.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }
}

/// DDP plugs into both training loops through their hooks: gradients are averaged after
/// backward, batches and evaluations are sharded by rank, metrics summed, saves fenced.
impl crate::train::hooks::Hooks for Ddp {
    fn after_backward(&mut self, _step: usize, _params: &[(String, Tensor)]) -> Result<()> {
        self.sync_gradients()
    }
    fn is_main(&self) -> bool {
        self.pg.is_main()
    }
    fn shard(&self) -> (usize, usize) {
        (self.pg.rank(), self.pg.size())
    }
    fn reduce_sum(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        self.pg.allreduce_f64(values, ReduceOp::Sum)
    }
    fn barrier(&mut self) -> Result<()> {
        self.pg.barrier()
    }
}

/// Each rank's share of an epoch (torch.utils.data.DistributedSampler): the epoch's order
/// (shuffled from `(seed, epoch)` or sequential) cut to a multiple of the world size — padded by
/// repeating its start, or with `drop_last` trimmed — then every `world`-th index from `rank`.
/// All ranks get the same count, so they run the same number of steps and no collective waits
/// forever. With batch b per rank, step s of the N ranks covers exactly the examples of step s of
/// one process with batch N·b.
#[derive(Debug, Clone)]
pub struct DistributedSampler {
    pub rank: usize,
    pub world: usize,
    pub shuffle: Option<u64>,
    pub drop_last: bool,
    /// Neither pad nor drop: shards differ by at most one example. For evaluation, whose sums
    /// are reduced once at the end, so every example counts exactly once.
    pub uneven: bool,
}

impl DistributedSampler {
    pub fn new(rank: usize, world: usize, shuffle: Option<u64>, drop_last: bool) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("DistributedSampler: rank {rank} must be below the world size {world}");
        }
        Ok(DistributedSampler { rank, world, shuffle, drop_last, uneven: false })
    }

    /// In-order shards for evaluation: every example exactly once over all ranks.
    pub fn for_eval(rank: usize, world: usize) -> Result<Self> {
        Ok(DistributedSampler { uneven: true, ..Self::new(rank, world, None, false)? })
    }

    /// Examples per rank for a data set of `len`.
    pub fn per_rank(&self, len: usize) -> usize {
        if self.drop_last {
            len / self.world
        } else {
            len.div_ceil(self.world)
        }
    }
}

impl Sampler for DistributedSampler {
    fn indices(&self, epoch: u64, len: usize) -> Vec<usize> {
        let mut order = match self.shuffle {
            Some(seed) => RandomSampler { seed }.indices(epoch, len),
            None => (0..len).collect(),
        };
        if self.uneven {
            return order.into_iter().skip(self.rank).step_by(self.world).collect();
        }
        let total = self.per_rank(len) * self.world;
        if order.is_empty() {
            return order;
        }
        let mut i = 0;
        while order.len() < total {
            order.push(order[i]);
            i += 1;
        }
        order.truncate(total);
        order.into_iter().skip(self.rank).step_by(self.world).collect()
    }
}

/// Batch norm whose training statistics cover every rank's samples (torch.nn.SyncBatchNorm),
/// with the variable names of `tch::nn::BatchNorm` (weight, bias, running_mean, running_var) so
/// checkpoints load into either. Without a group, or in eval mode, it is plain batch norm.
#[derive(Debug)]
pub struct SyncBatchNorm {
    pub ws: Tensor,
    pub bs: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    momentum: f64,
    eps: f64,
    group: Option<Arc<ProcessGroup>>,
}

impl SyncBatchNorm {
    /// `channels` features with tch's batch-norm defaults (momentum 0.1, eps 1e-5, affine, the
    /// same initialisation), so a model builds identically with or without a group.
    pub fn new(vs: &nn::Path, channels: i64, group: Option<Arc<ProcessGroup>>) -> Self {
        let cfg = nn::BatchNormConfig::default();
        let bn = nn::batch_norm2d(vs, channels, cfg);
        let (Some(ws), Some(bs)) = (bn.ws, bn.bs) else { unreachable!("affine batch norm has weight and bias") };
        SyncBatchNorm {
            ws,
            bs,
            running_mean: bn.running_mean,
            running_var: bn.running_var,
            momentum: cfg.momentum,
            eps: cfg.eps,
            group,
        }
    }
}

/// The batch-norm factory for `models::LeNet::with_norm`: [`SyncBatchNorm`] over `group`, or
/// plain batch norm without one (torch's `SyncBatchNorm.convert_sync_batchnorm`, done at build time).
pub fn batch_norm_over(group: Option<Arc<ProcessGroup>>) -> impl Fn(nn::Path, i64) -> Box<dyn nn::ModuleT> {
    move |p, c| match &group {
        Some(g) => Box::new(SyncBatchNorm::new(&p, c, Some(g.clone()))),
        None => crate::models::lenet::batch_norm(p, c),
    }
}

/// Training-mode batch norm over every rank of `group` (the raw op behind [`SyncBatchNorm`]).
#[allow(clippy::too_many_arguments)]
pub fn sync_batch_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    running_mean: Option<&Tensor>,
    running_var: Option<&Tensor>,
    momentum: f64,
    eps: f64,
    group: &ProcessGroup,
) -> Result<Tensor> {
    let p = |t: Option<&Tensor>| t.map_or(std::ptr::null_mut(), ffi::ptr);
    let mut out = std::ptr::null_mut();
    // SAFETY: live tensors (or NULL) and group handle; the op holds the group only during
    // forward and the backward that follows, both while `group` is borrowed by the caller's model.
    ffi::check(unsafe {
        ffi::course_sync_batch_norm(
            ffi::ptr(x),
            p(weight),
            p(bias),
            p(running_mean),
            p(running_var),
            momentum,
            eps,
            group.raw_handle(),
            &mut out,
        )
    })
    .with_context(|| format!("sync batch norm on rank {} of {}", group.rank(), group.size()))?;
    Ok(ffi::take(out))
}

impl nn::ModuleT for SyncBatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match (&self.group, train) {
            (Some(g), true) if g.size() > 1 => sync_batch_norm(
                xs,
                Some(&self.ws),
                Some(&self.bs),
                Some(&self.running_mean),
                Some(&self.running_var),
                self.momentum,
                self.eps,
                g,
            )
            // ModuleT cannot return an error; a failed collective is fatal for the step anyway.
            .unwrap_or_else(|e| panic!("{e:#}")),
            _ => Tensor::batch_norm(
                xs,
                Some(&self.ws),
                Some(&self.bs),
                Some(&self.running_mean),
                Some(&self.running_var),
                train,
                self.momentum,
                self.eps,
                false,
            ),
        }
    }
}
