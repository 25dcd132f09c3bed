//! Distributed training: PyTorch's c10d (stores, process groups, collectives), data parallelism
//! over it (`ddp`), and torchrun's environment contract with a launcher (`launch`).

pub mod c10d;
pub mod ddp;
pub mod launch;
