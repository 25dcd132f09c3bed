//! Points where callers plug into the training loops of [`crate::train::classify`] (classification) and
//! [`crate::train::lm`] (language models) without a second copy of either loop. Data parallelism
//! ([`crate::dist::ddp::Ddp`] implements this trait) all-reduces gradients in `after_backward`, shards
//! batches by `shard`, sums metrics over ranks in `reduce_sum` and fences checkpoint writes with
//! `barrier`; the profiler uses `around_step`. Every method has a single-process default.

use anyhow::Result;
use tch::Tensor;

pub trait Hooks {
    /// After the (micro-)batches' backward passes, before unscaling, clipping and the step.
    /// Gradient accumulation calls it once per optimizer step, so the micro-steps before it run
    /// without synchronisation (DDP's `no_sync`).
    fn after_backward(&mut self, _step: usize, _params: &[(String, Tensor)]) -> Result<()> {
        Ok(())
    }
    /// Whether this process writes logs, checkpoints and progress (rank 0 in DDP).
    fn is_main(&self) -> bool {
        true
    }
    /// Called around each step, for a profiler window: `(step, starting)`.
    fn around_step(&mut self, _step: usize, _starting: bool) -> Result<()> {
        Ok(())
    }
    /// `(rank, world size)`: this process's share of every batch.
    fn shard(&self) -> (usize, usize) {
        (0, 1)
    }
    /// Element-wise sums of `values` over every process (metrics: loss sums, counts).
    fn reduce_sum(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        Ok(values.to_vec())
    }
    /// Waits for every process (around checkpoint writes).
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The default: one process, no hooks.
pub struct NoHooks;
impl Hooks for NoHooks {}
