//! Safe wrappers over the runtime shim (`kernels/runtime/shim.cpp`): determinism, CPU and CUDA
//! autocast with any dtype, inference mode, thread count, versions and memory statistics.

use crate::sys::ffi;
use anyhow::Result;
use std::ffi::c_int;
use tch::{Device, Kind};

/// `torch.use_deterministic_algorithms(enabled, warn_only)`; enabling also switches cuDNN to its
/// deterministic algorithms. The cuDNN autotuner (`cudnn.benchmark`, which picks kernels by
/// timing them) stays off either way, PyTorch's default; turn it on with [`set_cudnn_benchmark`].
pub fn set_deterministic(enabled: bool, warn_only: bool) {
    unsafe {
        ffi::course_set_deterministic(enabled as c_int, warn_only as c_int);
        ffi::course_set_cudnn(0, enabled as c_int);
    }
}

/// `torch.backends.cudnn.benchmark`: faster convolutions on GPUs, chosen by timing, so runs may
/// differ. Leaves cuDNN's determinism flag as [`set_deterministic`] set it.
pub fn set_cudnn_benchmark(on: bool) {
    unsafe { ffi::course_set_cudnn(on as c_int, ffi::course_deterministic()) }
}

pub fn deterministic() -> bool {
    unsafe { ffi::course_deterministic() != 0 }
}

fn device_code(device: Device) -> c_int {
    match device {
        Device::Cuda(_) => 1,
        _ => 0,
    }
}

/// c10::ScalarType codes (c10/core/ScalarType.h) of the dtypes autocast takes.
fn kind_code(kind: Kind) -> c_int {
    match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::BFloat16 => 15,
        _ => -1,
    }
}

fn kind_from_code(code: c_int) -> Kind {
    match code {
        5 => Kind::Half,
        15 => Kind::BFloat16,
        6 => Kind::Float,
        _ => Kind::Float,
    }
}

/// An autocast region on one device type, like `with torch.autocast(device, dtype)`: ops that
/// autocast lists run in `dtype` (matmuls, convolutions, linear), the rest in fp32. Dropping the
/// guard restores the previous state, so regions nest. Works on CPU (bf16, fp16) and CUDA.
#[must_use = "autocast ends when the guard is dropped"]
pub struct AutocastGuard {
    device: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
    /// Autocast state is thread-local in ATen: the guard must drop on the thread that made it.
    _not_send: std::marker::PhantomData<*const ()>,
}

/// Enters autocast for `device`'s type with `dtype` (Kind::BFloat16 or Kind::Half); with
/// `enabled = false` it is a region where autocast is off (like `torch.autocast(enabled=False)`).
pub fn autocast(device: Device, dtype: Kind, enabled: bool) -> Result<AutocastGuard> {
    let (mut prev_enabled, mut prev_dtype) = (0, 0);
    let code = device_code(device);
    if enabled && !matches!(dtype, Kind::BFloat16 | Kind::Half) {
        anyhow::bail!("autocast on {device:?} supports float16 and bfloat16, got {dtype:?}");
    }
    ffi::check(unsafe {
        ffi::course_autocast_enter(code, enabled as c_int, kind_code(dtype), &mut prev_enabled, &mut prev_dtype)
    })?;
    Ok(AutocastGuard { device: code, prev_enabled, prev_dtype, _not_send: std::marker::PhantomData })
}

/// Whether autocast is on for `device`'s type, and its dtype.
pub fn autocast_state(device: Device) -> Result<(bool, Kind)> {
    let (mut en, mut dt) = (0, 0);
    ffi::check(unsafe { ffi::course_autocast_state(device_code(device), &mut en, &mut dt) })?;
    Ok((en != 0, kind_from_code(dt)))
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // Restoring can only fail for an invalid device code, which enter already rejected.
        let _ = ffi::check(unsafe { ffi::course_autocast_exit(self.device, self.prev_enabled, self.prev_dtype) });
    }
}

/// `torch.inference_mode()`: no autograd recording and no version counters; tensors made inside
/// are "inference tensors" that autograd refuses later. Cheaper than `no_grad`. The guard must be
/// dropped on the thread that created it.
#[must_use = "inference mode ends when the guard is dropped"]
pub struct InferenceMode {
    guard: *mut std::ffi::c_void,
}

pub fn inference_mode() -> InferenceMode {
    InferenceMode { guard: unsafe { ffi::course_inference_mode_enter() } }
}

impl Drop for InferenceMode {
    fn drop(&mut self) {
        unsafe { ffi::course_inference_mode_exit(self.guard) }
    }
}

/// Whether `t` was created under inference mode.
pub fn is_inference(t: &tch::Tensor) -> bool {
    unsafe { ffi::course_is_inference(ffi::ptr(t)) != 0 }
}

/// The state of `device`'s default torch generator (what `torch.get_rng_state()` returns for the
/// CPU), as a uint8 tensor.
pub fn generator_state(device: Device) -> Result<tch::Tensor> {
    let (code, idx) = match device {
        Device::Cuda(i) => (1, i as c_int),
        _ => (0, 0),
    };
    let mut out = std::ptr::null_mut();
    ffi::check(unsafe { ffi::course_generator_get_state(code, idx, &mut out) })?;
    Ok(ffi::take(out))
}

/// Restores a state from [`generator_state`]; an error names what libtorch rejected.
pub fn set_generator_state(device: Device, state: &tch::Tensor) -> Result<()> {
    let (code, idx) = match device {
        Device::Cuda(i) => (1, i as c_int),
        _ => (0, 0),
    };
    ffi::check(unsafe { ffi::course_generator_set_state(code, idx, ffi::ptr(state)) })
}

/// Drops `t`'s gradient (PyTorch's `zero_grad(set_to_none=True)`, its default since 2.0).
pub fn clear_grad(t: &tch::Tensor) {
    unsafe { ffi::course_clear_grad(ffi::ptr(t)) }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn mallopt(param: i32, value: i32) -> i32;
    fn malloc_trim(pad: usize) -> i32;
}

/// Hands freed heap memory back to the OS now (glibc's `malloc_trim(0)`), so that the resident
/// set size shows what is still in use; returns whether anything was released. A no-op
/// elsewhere. (Under [`retain_freed_memory`] glibc keeps freed blocks until this is called.)
pub fn trim_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe { malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Makes glibc keep freed host memory for reuse instead of handing it back to the OS, and
/// returns whether that was applied (only on Linux with glibc).
///
/// libtorch's CPU allocator is plain `malloc`. With glibc's defaults, blocks of more than a few
/// MiB (every activation of a training step) are `mmap`'d and returned on free, so each step
/// faults every page of them in again: about 14,000 page faults and a fifth of the step time
/// for m02's CNN. Keeping freed memory (no mmap, no trim: `M_MMAP_MAX = 0`,
/// `M_TRIM_THRESHOLD = max`) removes that, the effect PyTorch's CPU tuning guides get by
/// preloading jemalloc or tcmalloc. The cost is that the process keeps its peak heap until it
/// exits, which is what a training run wants. (In threads other than the main one, glibc still
/// maps blocks larger than its 64 MiB per-arena heaps.) `Run::start` applies it unless
/// `--release-freed-memory` is given.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // M_MMAP_MAX = -4, M_TRIM_THRESHOLD = -1; mallopt returns 1 on success.
        unsafe { mallopt(-4, 0) == 1 && mallopt(-1, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Runs `f` on a new thread, waits for it to exit, and returns what it returned (a panic in `f`
/// goes on in the caller).
///
/// Why: libgomp, the OpenMP behind ATen's `parallel_for` and our kernels, gives every thread that
/// runs a parallel region a pool of worker threads, kept until that thread exits. When more pool
/// threads are alive than there are CPUs, it stops spinning between regions and puts the workers
/// to sleep after each one, so every region pays a futex wake: on 2 cores, a decode step with
/// ~450 regions ran 3x slower on an engine thread once the main thread had a pool of its own.
/// Work done before an engine thread starts (loading, quantizing, a solo benchmark) goes here, so
/// the engine's pool is the only one alive while it serves.
pub fn on_fresh_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join()).unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Intra-op threads used by ATen (`torch.set_num_threads`).
pub fn set_threads(n: usize) {
    tch::set_num_threads(n.clamp(1, 1024) as i32);
}

pub fn threads() -> usize {
    tch::get_num_threads().max(1) as usize
}

/// Versions of the libraries actually loaded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Versions {
    pub torch: String,
    /// e.g. 13000 for CUDA 13.0; 0 when no CUDA device is visible.
    pub cuda_runtime: i64,
    /// e.g. 91900 for cuDNN 9.19.0; 0 when no CUDA device is visible or cuDNN is absent.
    pub cudnn: i64,
    pub cuda_devices: usize,
    /// The CPU instruction set ATen dispatches its kernels (and ours) to.
    pub cpu_capability: String,
}

pub fn versions() -> Versions {
    unsafe {
        let devices = ffi::course_cuda_device_count().max(0) as usize;
        Versions {
            torch: ffi::static_str(ffi::course_torch_version()),
            cuda_runtime: if devices > 0 { ffi::course_cuda_runtime_version() as i64 } else { 0 },
            cudnn: if devices > 0 { ffi::course_cudnn_version() as i64 } else { 0 },
            cuda_devices: devices,
            cpu_capability: ffi::static_str(ffi::course_cpu_capability()),
        }
    }
}

/// ATen's description of its thread pools and parallel backends.
pub fn parallel_info() -> String {
    let p = unsafe { ffi::course_parallel_info() };
    if p.is_null() {
        return String::new();
    }
    let s = unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned();
    unsafe { ffi::course_free_error(p) };
    s
}

/// CUDA caching-allocator statistics in bytes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct AllocatorStats {
    pub allocated: i64,
    pub allocated_peak: i64,
    pub reserved: i64,
    pub reserved_peak: i64,
}

/// Allocator stats of CUDA device `index`; an error when there is no such device.
pub fn cuda_memory(index: usize) -> Result<AllocatorStats> {
    let mut s = AllocatorStats::default();
    ffi::check(unsafe {
        ffi::course_accel_memory(
            index as c_int,
            &mut s.allocated,
            &mut s.allocated_peak,
            &mut s.reserved,
            &mut s.reserved_peak,
        )
    })?;
    Ok(s)
}

pub fn cuda_reset_peak(index: usize) -> Result<()> {
    ffi::check(unsafe { ffi::course_accel_reset_peak(index as c_int) })
}

/// Peak resident set size of this process so far, in bytes: Linux's `VmHWM` (the high-water
/// mark of this program's own address space), else getrusage's `ru_maxrss`. The difference
/// matters for a child started by a large parent: Linux carries `ru_maxrss` across `execve`, so
/// a child of m06's training run would report the parent's 8.5 GB as its own peak.
pub fn peak_rss_bytes() -> u64 {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().strip_suffix("kB").and_then(|n| n.trim().parse::<u64>().ok()));
        if let Some(kb) = hwm {
            return kb * 1024;
        }
    }
    unsafe { ffi::course_peak_rss_bytes() }.max(0) as u64
}

/// Current resident set size (/proc/self/statm), in bytes.
pub fn current_rss_bytes() -> u64 {
    unsafe { ffi::course_current_rss_bytes() }.max(0) as u64
}
