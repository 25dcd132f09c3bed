//! Training: optimizers, schedules, mixed precision, checkpoints, TensorBoard logs, the hooks
//! that distributed training and the profiler plug into, metrics, and the two loops —
//! classification (`classify`, m02-m03) and language modelling (`lm`, m04-m06).

pub mod amp;
pub mod checkpoint;
pub mod classify;
pub mod hooks;
pub mod lm;
pub mod metrics;
pub mod optim;
pub mod sched;
pub mod tensorboard;
