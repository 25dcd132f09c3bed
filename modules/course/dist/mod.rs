//! Distributed training: PyTorch's c10d (stores, process groups, collectives), data parallelism
//! over it (`ddp`), and torchrun's environment contract with a launcher (`launch`).

pub mod c10d;
pub mod ddp;
pub mod launch;

use anyhow::Result;
use c10d::{Backend, ProcessGroup};
use launch::DistEnv;
use std::sync::Arc;
use std::time::Duration;
use tch::Device;

/// Joins this process's group: torch's `env://` rendezvous when a launcher set `env` (RANK,
/// WORLD_SIZE, ...), else a group of one. `backend` is `auto` (NCCL on CUDA, Gloo on CPU), `gloo`
/// or `nccl`; on CUDA each rank takes the GPU of its LOCAL_RANK. Returns the group and the device
/// this rank computes on.
pub fn join(
    env: Option<&DistEnv>,
    device: Device,
    backend: &str,
    timeout: Duration,
) -> Result<(Arc<ProcessGroup>, Device)> {
    let device = match (device, env) {
        (Device::Cuda(_), Some(e)) => Device::Cuda(e.local_rank),
        (d, _) => d,
    };
    let backend = match backend {
        "auto" => Backend::for_device(device),
        b => b.parse()?,
    };
    let pg = match env {
        Some(e) => ProcessGroup::init(e, backend, timeout)?,
        None => ProcessGroup::single(backend, timeout)?,
    };
    Ok((Arc::new(pg), device))
}
