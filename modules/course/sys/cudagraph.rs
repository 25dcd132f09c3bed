//! CUDA graphs (CUDA 图): record every kernel a closure launches once, then launch them all again
//! with one call. A small model's step is thousands of short kernels, and the CPU's launch cost
//! (a few µs each, more through tch and autograd) can exceed their GPU time; a replay pays it
//! once per graph. This is `torch.cuda.graph`, and what torch.compile's "reduce-overhead" mode
//! does for PyTorch users. `kernels/runtime/cuda_graph.cu` holds the capture (a side stream, warm-up
//! runs, autocast's weight cache off); here is the safe API, [`CudaGraph`].
//!
//! # The rules of a captured function
//! A replay runs the recorded kernels on the recorded memory. Nothing of the Rust code runs
//! again, so:
//!
//! - **Static inputs.** The function must read its inputs from tensors it captured (made before
//!   the capture, moved into the closure). To run on new data, `copy_` it into them before
//!   [`CudaGraph::replay`]; a new tensor would have another address and be ignored.
//! - **Static outputs.** Results must be written into tensors made before the capture (`copy_`
//!   into them inside the function). Read them after the replay; the next replay overwrites
//!   them. Tensors created inside the function live in the graph's private memory pool.
//! - **No host syncs.** No `double_value`, `int64_value`, `Vec::try_from`, `.to_device(Cpu)`
//!   or anything else that waits for the GPU: capture forbids it (the capture fails). Shapes
//!   and every branch must be the same on every replay, since the branch taken at capture is
//!   the one recorded.
//! - **CUDA tensors only**, all on one device. CPU work inside the function runs during the
//!   capture only.
//! - **Gradients must already exist.** With backward inside the function, run one eager step
//!   first so every `.grad` is allocated; the graph then adds into them on each replay
//!   (accumulation). Zero them in place (`zero_()`), never set them to None, between steps: a
//!   new `.grad` would have another address. A gradient that did not exist at capture is made
//!   inside the graph's pool and overwritten, not accumulated, on each replay.
//! - **Parameters updated in place.** The optimizer step can stay outside the graph, but it
//!   must write into the same tensors (AdamW in [`crate::train::optim`] does).
//! - Dropout works (torch's generator hands each replay fresh random offsets), but its masks
//!   differ from an eager run with the same seed.
//!
//! The function runs `warmup` times on a side stream before the capture (first calls do lazy
//! work, such as cuBLAS handle creation, that must not be recorded) and once under capture:
//! its side effects (gradients accumulated, outputs written) happen `warmup + 1` times during
//! [`CudaGraph::capture`].

use crate::sys::ffi;
use anyhow::{Context, Result};
use std::ffi::{c_char, c_int, c_void};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::Device;

/// A captured CUDA graph and the closure it was captured from. The closure (and the static
/// tensors it holds) lives as long as the graph; dropping the graph waits for the device, then
/// frees both. Neither `Send` nor `Sync`: replay and drop it on the thread that captured it.
pub struct CudaGraph<'a> {
    handle: *mut c_void,
    /// The C++ side owns the closure; this ties the graph to what the closure borrows.
    _closure: PhantomData<Box<dyn FnMut() -> Result<()> + 'a>>,
}

/// `course_graph_fn`: runs the closure. Nothing may unwind into C++, so panics (tch's failing
/// ops panic) become errors.
unsafe extern "C" fn call_fn<F: FnMut() -> Result<()>>(ctx: *mut c_void) -> *mut c_char {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: ctx is the Box<F> given to course_cuda_graph_capture, alive until drop_fn;
        // C++ calls it only from inside that call, on this thread, never reentrantly.
        let f = unsafe { &mut *(ctx as *mut F) };
        f().map_err(|e| format!("{e:#}"))
    }));
    match r {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(msg)) => ffi::c_error(&msg),
        Err(p) => ffi::c_error(&format!("the function panicked: {}", ffi::panic_message(p.as_ref()))),
    }
}

/// Frees the closure, once, when the graph goes or its capture fails.
unsafe extern "C" fn drop_fn<F>(ctx: *mut c_void) {
    // SAFETY: the Box<F> leaked by `capture`; the C++ side drops it exactly once.
    let f = unsafe { Box::from_raw(ctx as *mut F) };
    // A panicking Drop in the closure's captures must not unwind into C++.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(f)));
}

impl<'a> CudaGraph<'a> {
    /// Captures what `f` launches on the current CUDA device (cuda:0 unless changed): `f` runs
    /// `warmup` times on a side stream, then once under capture (see the module's rules). An
    /// error or panic of `f`, or an operation that capture forbids, is returned here. Errors
    /// without a CUDA device, and in a build without `--features cuda`.
    pub fn capture<F: FnMut() -> Result<()> + 'a>(f: F, warmup: usize) -> Result<CudaGraph<'a>> {
        Self::run_capture(-1, f, warmup)
    }

    /// [`capture`](Self::capture) on `device`, which must be the device of `f`'s tensors.
    pub fn capture_on<F: FnMut() -> Result<()> + 'a>(device: Device, f: F, warmup: usize) -> Result<CudaGraph<'a>> {
        match device {
            Device::Cuda(i) => Self::run_capture(c_int::try_from(i).context("cuda graph: device index")?, f, warmup),
            other => anyhow::bail!("CUDA graphs need a CUDA device, got {other:?}"),
        }
    }

    fn run_capture<F: FnMut() -> Result<()> + 'a>(device: c_int, f: F, warmup: usize) -> Result<CudaGraph<'a>> {
        let warmup = c_int::try_from(warmup).context("cuda graph: too many warm-up runs")?;
        let ctx = Box::into_raw(Box::new(f)) as *mut c_void;
        let mut handle = std::ptr::null_mut();
        // SAFETY: from here on course_cuda_graph_capture owns ctx and frees it through
        // drop_fn::<F> exactly once, on every path; call_fn::<F> matches ctx's type.
        ffi::check(unsafe {
            ffi::course_cuda_graph_capture(call_fn::<F>, ctx, drop_fn::<F>, device, warmup, &mut handle)
        })?;
        Ok(CudaGraph { handle, _closure: PhantomData })
    }

    /// Launches the graph on the current stream. Asynchronous like any kernel launch: work
    /// queued after it on the same stream (reading the static outputs, the next `copy_` into
    /// the static inputs) is ordered after it.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: a live handle from a successful capture.
        ffi::check(unsafe { ffi::course_cuda_graph_replay(self.handle) })
    }
}

impl Drop for CudaGraph<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle is freed once, here.
        unsafe { ffi::course_cuda_graph_free(self.handle) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// Records when it is dropped.
    struct DropFlag(Rc<Cell<usize>>);
    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn without_a_gpu_capture_fails_and_frees_the_closure_once() {
        if tch::Cuda::is_available() && crate::CUDA_KERNELS {
            return; // a GPU build on a GPU machine captures; tests/lmtrain.rs covers that
        }
        let (calls, drops) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        let flag = DropFlag(drops.clone());
        let c = calls.clone();
        let e = CudaGraph::capture(
            move || {
                let _keep = &flag;
                c.set(c.get() + 1);
                Ok(())
            },
            2,
        )
        .err()
        .expect("no CUDA here")
        .to_string();
        let want = if crate::CUDA_KERNELS { "need a CUDA device" } else { "need a build with --features cuda" };
        assert!(e.contains(want), "{e}");
        assert_eq!((calls.get(), drops.get()), (0, 1));
    }
}
