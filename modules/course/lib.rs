//! `course`: the library under the llm-course modules — what tch-rs does not ship and course
//! users keep asking for. Its folders are its layers, lowest first; a folder imports only the
//! folders its row in ARCHITECTURE.md allows (`tests/layers.rs` checks it). The module binaries in
//! `modules/mNN_*/` are thin lessons over it.

/// Module m01's regressions and reproducibility probes.
pub mod basics;
/// Data sets, readers, the `DataLoader`, tokenizers and LM token files.
pub mod data;
/// c10d process groups, DDP, the torchrun contract and launcher.
pub mod dist;
/// Sampling and generation (m07: the engine and the server).
pub mod infer;
/// Formats people already use, no training knowledge: safetensors, Hugging Face model directories.
pub mod io;
/// Models: MLP and CNN, the Transformer encoder, BERT, GPT.
pub mod models;
/// Layers: attention, positional encodings, pooling, norms, losses.
pub mod nn;
/// Custom kernels from `kernels/`, one file per op, each beside its plain-tch `*_reference`.
pub mod ops;
/// What every binary shares: `Run`, `CommonArgs`, `Metrics`, child runs, charts, progress, report, catalog, gallery.
pub mod run;
/// libtorch under tch, the only `unsafe`: ffi, runtime switches, device, RNG, atomic files, profiler, recomputation, CUDA graphs.
pub mod sys;
/// Optimizers, schedules, AMP, checkpoints, logs, hooks, metrics and the training loops.
pub mod train;

pub use run::{CommonArgs, Metrics, Op, Run};
pub use sys::device::DeviceChoice;

/// Whether this build carries the CUDA kernels (`--features cuda`).
pub const CUDA_KERNELS: bool = cfg!(feature = "cuda");
