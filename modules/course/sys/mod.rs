//! The system layer: libtorch under tch. The only `unsafe` in the library lives here (`ffi`),
//! wrapped in safe functions: runtime switches, devices, seeded RNG, atomic file writes, the
//! profiler, activation recomputation and CUDA graphs. Imports nothing of ours.

pub mod cudagraph;
pub mod device;
pub(crate) mod ffi;
pub mod fsutil;
pub mod profile;
pub mod recompute;
pub mod rng;
pub mod runtime;
pub mod simd;
