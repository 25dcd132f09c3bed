//! Points where callers plug into the training loops of [`crate::train::classify`] (classification) and
//! [`crate::train::lm`] (language models) without a second copy of either loop. Data parallelism
//! ([`crate::dist::ddp::Ddp`] implements this trait) all-reduces gradients in `after_backward`, shards
//! batches by `shard`, sums metrics over ranks in `reduce_sum` and fences checkpoint writes with
//! `barrier`; the profiler uses `around_step`. Every method has a single-process default.

use crate::sys::profile::Profiler;
use anyhow::Result;
use std::path::PathBuf;
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

/// Hooks compose: `(a, b)` runs both. Calls go to `a` first, except that a step's end reaches
/// `b` first (so `b`'s window nests inside `a`'s). The process is the main one when both say so;
/// the shard is the first one that is not the whole batch; metric sums go through `a` then `b`
/// (only one of them is expected to reduce across processes). Nest pairs for more.
impl<A: Hooks, B: Hooks> Hooks for (A, B) {
    fn after_backward(&mut self, step: usize, params: &[(String, Tensor)]) -> Result<()> {
        self.0.after_backward(step, params)?;
        self.1.after_backward(step, params)
    }
    fn is_main(&self) -> bool {
        self.0.is_main() && self.1.is_main()
    }
    fn around_step(&mut self, step: usize, starting: bool) -> Result<()> {
        if starting {
            self.0.around_step(step, true)?;
            self.1.around_step(step, true)
        } else {
            self.1.around_step(step, false)?;
            self.0.around_step(step, false)
        }
    }
    fn shard(&self) -> (usize, usize) {
        match self.0.shard() {
            (0, 1) => self.1.shard(),
            s => s,
        }
    }
    fn reduce_sum(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        let v = self.0.reduce_sum(values)?;
        self.1.reduce_sum(&v)
    }
    fn barrier(&mut self) -> Result<()> {
        self.0.barrier()?;
        self.1.barrier()
    }
}

/// An optional hook: `None` does nothing.
impl<H: Hooks> Hooks for Option<H> {
    fn after_backward(&mut self, step: usize, params: &[(String, Tensor)]) -> Result<()> {
        self.as_mut().map_or(Ok(()), |h| h.after_backward(step, params))
    }
    fn is_main(&self) -> bool {
        self.as_ref().is_none_or(|h| h.is_main())
    }
    fn around_step(&mut self, step: usize, starting: bool) -> Result<()> {
        self.as_mut().map_or(Ok(()), |h| h.around_step(step, starting))
    }
    fn shard(&self) -> (usize, usize) {
        self.as_ref().map_or((0, 1), |h| h.shard())
    }
    fn reduce_sum(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        self.as_mut().map_or(Ok(values.to_vec()), |h| h.reduce_sum(values))
    }
    fn barrier(&mut self) -> Result<()> {
        self.as_mut().map_or(Ok(()), |h| h.barrier())
    }
}

impl<H: Hooks + ?Sized> Hooks for &mut H {
    fn after_backward(&mut self, step: usize, params: &[(String, Tensor)]) -> Result<()> {
        (**self).after_backward(step, params)
    }
    fn is_main(&self) -> bool {
        (**self).is_main()
    }
    fn around_step(&mut self, step: usize, starting: bool) -> Result<()> {
        (**self).around_step(step, starting)
    }
    fn shard(&self) -> (usize, usize) {
        (**self).shard()
    }
    fn reduce_sum(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        (**self).reduce_sum(values)
    }
    fn barrier(&mut self) -> Result<()> {
        (**self).barrier()
    }
}

/// torch's profiler over a window of steps: it starts before step `from` and saves a Chrome
/// trace to `trace` after `n` steps (`--profile N` in m04 and m05).
pub struct ProfileWindow {
    pub from: usize,
    pub n: usize,
    pub trace: PathBuf,
    /// Record CUDA kernels too.
    pub cuda: bool,
    active: Option<Profiler>,
}

impl ProfileWindow {
    pub fn new(from: usize, n: usize, trace: PathBuf, cuda: bool) -> Self {
        ProfileWindow { from, n, trace, cuda, active: None }
    }
}

impl Hooks for ProfileWindow {
    fn around_step(&mut self, step: usize, starting: bool) -> Result<()> {
        if starting && step == self.from {
            self.active = Some(Profiler::start(self.cuda)?);
        }
        if !starting && step + 1 == self.from + self.n {
            if let Some(p) = self.active.take() {
                p.stop_and_save(&self.trace)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every call, to check the composition order.
    struct Log(&'static str, std::rc::Rc<std::cell::RefCell<Vec<String>>>, (usize, usize), f64);
    impl Hooks for Log {
        fn around_step(&mut self, step: usize, starting: bool) -> Result<()> {
            self.1.borrow_mut().push(format!("{} {step} {starting}", self.0));
            Ok(())
        }
        fn shard(&self) -> (usize, usize) {
            self.2
        }
        fn reduce_sum(&mut self, v: &[f64]) -> Result<Vec<f64>> {
            Ok(v.iter().map(|x| x * self.3).collect())
        }
        fn is_main(&self) -> bool {
            self.2 .0 == 0
        }
    }

    #[test]
    fn pairs_call_both_and_nest_step_windows() {
        let log = std::rc::Rc::new(std::cell::RefCell::new(vec![]));
        let mut h = (Log("ddp", log.clone(), (1, 2), 2.0), Some(Log("prof", log.clone(), (0, 1), 1.0)));
        h.around_step(3, true).unwrap();
        h.around_step(3, false).unwrap();
        assert_eq!(*log.borrow(), ["ddp 3 true", "prof 3 true", "prof 3 false", "ddp 3 false"]);
        assert_eq!(h.shard(), (1, 2));
        assert!(!h.is_main());
        assert_eq!(h.reduce_sum(&[1.5]).unwrap(), [3.0]);
        let mut none: (NoHooks, Option<Log>) = (NoHooks, None);
        assert_eq!((none.shard(), none.is_main(), none.reduce_sum(&[4.0]).unwrap()), ((0, 1), true, vec![4.0]));
    }
}
