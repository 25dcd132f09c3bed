//! `course`: the library under the llm-course modules — what tch-rs does not ship and course
//! users keep asking for. Each file holds one concern; the module binaries in `modules/mNN_*/`
//! are thin lessons over it.
//!
//! - [`ops`]: custom kernels from `kernels/` (C++/ATen and CUDA), each beside a reference.
//! - [`runtime`]: the C++ shim — determinism, CPU/CUDA autocast, inference mode, versions, memory.
//! - [`run`]: shared flags, seeding, `outputs/<module>/metrics.json` and the run manifest.
//! - [`charts`], [`progress`]: PNG charts and progress bars.
//! - [`device`], [`rng`], [`report`], [`fsutil`]: device choice, seeded RNG, environment report,
//!   atomic writes.
//! - [`catalog`], [`gallery`], [`data`]: the module list, the tour's HTML gallery, data set paths.
//! - [`idx`]: the IDX reader (MNIST, Fashion-MNIST), plain or gzipped.
//! - [`loader`]: `Dataset`, samplers and the multi-worker `DataLoader`.
//! - [`vision`]: MNIST/Fashion-MNIST data sets, transforms, collate, image grids.
//! - [`optim`]: SGD and AdamW with saveable state and parameter groups.
//! - [`sched`]: learning-rate schedules and early stopping.
//! - [`tensorboard`]: TensorBoard event files (and the same scalars as JSON lines).
//! - [`models`], [`classify`]: m02's MLP and CNN, losses; accuracy, top-k, confusion matrix.
//! - [`checkpoint`]: `best/` and `last/` checkpoint directories, replaced atomically.
//! - [`train`]: the classification trainer (schedules, early stopping, checkpoints, resume, logs).
//! - [`attention`]: attention from scratch, masks, positional encodings, encoder blocks and classifier.
//! - [`bert`]: a BERT encoder with Hugging Face names (MiniLM), sentence embeddings, classifier.
//! - [`text`], [`tokenize`]: BBC News and SpamAssassin with fixed stratified splits; tokenizers.
//! - [`benchkit`]: the Python-twin harness of the benchmarks.
//! - [`gpt`]: the decoder-only GPT (nanoGPT's names), presets, seeded sampling.
//! - [`lmdata`], [`lmtrain`]: memory-mapped token files and the LM training loop (m04-m06).
//! - [`hooks`]: where DDP and the profiler plug into both training loops.
//! - [`amp`]: precisions, autocast per precision, and the GradScaler.
//! - [`profile`]: torch's profiler (Chrome traces, named ranges) and a per-op self-time table.
//! - [`recompute`]: gradient checkpointing (activation recomputation) of a closure.
//! - [`cudagraph`]: CUDA graph capture and replay of a closure.
//! - [`launch`]: torchrun's environment contract (`RANK`, `WORLD_SIZE`, ...) and a multi-process
//!   launcher (m05).
//! - [`dist`], [`ddp`]: PyTorch's c10d (TCPStore, Gloo, NCCL, collectives) and data
//!   parallelism over it (bucketed gradient allreduce, DistributedSampler, SyncBatchNorm).
//! - [`linreg`], [`repro`]: module m01's regressions and reproducibility probes.

pub mod amp;
pub mod attention;
pub mod benchkit;
pub mod bert;
pub mod catalog;
pub mod charts;
pub mod checkpoint;
pub mod classify;
pub mod cudagraph;
pub mod data;
pub mod ddp;
pub mod device;
pub mod dist;
mod ffi;
pub mod fsutil;
pub mod gallery;
pub mod gpt;
pub mod hooks;
pub mod idx;
pub mod launch;
pub mod linreg;
pub mod lmdata;
pub mod lmtrain;
pub mod loader;
pub mod models;
pub mod ops;
pub mod optim;
pub mod profile;
pub mod progress;
pub mod recompute;
pub mod report;
pub mod repro;
pub mod rng;
pub mod run;
pub mod runtime;
pub mod sched;
pub mod tensorboard;
pub mod text;
pub mod tokenize;
pub mod train;
pub mod vision;

pub use device::DeviceChoice;

/// Whether this build carries the CUDA kernels (`--features cuda`).
pub const CUDA_KERNELS: bool = cfg!(feature = "cuda");
pub use run::{CommonArgs, Metrics, Op, Run};
