//! Gradient checkpointing, also called activation recomputation (激活重计算): trade compute for
//! memory by not keeping a block's activations during the forward pass and recomputing them in
//! the backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost";
//! `torch.utils.checkpoint`).
//!
//! A transformer block keeps about a dozen activations of shape (B, T, C) or (B, T, 4C) alive
//! until backward; checkpointed, it keeps only its input. The price is one more forward pass of
//! the block per step (roughly +1/3 of the step's compute). `kernels/runtime/recompute.cpp` holds the
//! autograd function; here are the closure plumbing and the safe API:
//!
//! - [`recompute`]: the block as a closure returning a `Tensor` (tch's panicking ops).
//! - [`try_recompute`]: the same with a closure returning `Result<Tensor>`.
//! - [`recompute_local`]: for closures that are not `Send` (an `Rc`/`Arc` of a tch module),
//!   CPU only.
//!
//! Dropout and other randomness repeat exactly: the forward saves the default CPU generator's
//! state (and the input's CUDA device's), the recompute runs from it and then puts back the
//! state it found, so the rest of the program draws the same numbers as without checkpointing.
//! Autocast repeats too: the recompute re-enters the CPU and CUDA autocast state (on/off, dtype)
//! of the forward, even though backward itself usually runs outside autocast.
//!
//! # Why the closure must be `Send` (and need not be `Sync`)
//! The closure is stored in the autograd node and called again when backward reaches it. For a
//! CUDA graph, torch's autograd engine runs the node on its own per-device thread, and the node
//! (with the closure) is freed by whichever thread drops the graph's last reference: so the
//! closure moves between threads, hence `Send`. It is never called concurrently: once by the
//! forward before the graph exists, then only under the node's own mutex (torch's
//! `CppNode::apply` locks it), hence no `Sync`.
//!
//! `tch::Tensor` is `Send` but not `Sync`, so an `Arc<Block>` of tch modules is not `Send`.
//! Either capture the block by value, with tensors from `Tensor::shallow_clone` (same storage
//! and same autograd identity as the `VarStore`'s, so gradients land in the same `.grad`), or
//! use [`recompute_local`], which checks at run time that the closure is used and freed only
//! on the thread that made it (true for CPU training) instead of demanding `Send`.

use crate::sys::ffi;
use anyhow::{Context, Result};
use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::{self, ThreadId};
use tch::Tensor;

/// A checkpointed block, as the C++ node stores it.
type BlockFn = dyn Fn(&Tensor) -> Result<Tensor>;

/// What the C++ node holds as `ctx`: the closure, and for [`recompute_local`] the thread it
/// belongs to.
struct Ctx {
    f: Box<BlockFn>,
    owner: Option<ThreadId>,
}

fn current_thread() -> Option<ThreadId> {
    // thread::current() can panic while a thread's locals are being torn down.
    catch_unwind(|| thread::current().id()).ok()
}

/// `course_fn`: runs the closure on `input` (owned here) and hands the result's ownership to
/// C++. Nothing may unwind into C++, so panics (tch's failing ops panic) become errors.
unsafe extern "C" fn call_block(ctx: *mut c_void, input: ffi::CTensor, out: *mut ffi::CTensor) -> *mut c_char {
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<*mut c_void, String> {
        // SAFETY: ctx is the Box<Ctx> that course_recompute was given; input a new at::Tensor.
        let ctx = unsafe { &*(ctx as *const Ctx) };
        let x = ffi::take(input);
        if let Some(owner) = ctx.owner {
            if current_thread() != Some(owner) {
                return Err("recompute_local: autograd ran the recompute on another thread than the one that \
                            made the closure (CUDA backward runs on a device thread); use checkpoint or \
                            try_recompute with a Send closure"
                    .into());
            }
        }
        let mut y = (ctx.f)(&x).map_err(|e| format!("{e:#}"))?;
        let p = y.as_mut_ptr() as *mut c_void;
        // C++ takes the at::Tensor* (and deletes it); tch must not free it too.
        std::mem::forget(y);
        Ok(p)
    }));
    match r {
        Ok(Ok(p)) => {
            unsafe { *out = p };
            std::ptr::null_mut()
        }
        Ok(Err(msg)) => ffi::c_error(&msg),
        Err(p) => ffi::c_error(&format!("the block panicked: {}", ffi::panic_message(p.as_ref()))),
    }
}

/// Frees the closure when the autograd node goes. A `recompute_local` closure freed on a
/// foreign thread is leaked instead: dropping it there could race with its owner thread.
unsafe extern "C" fn drop_block(ctx: *mut c_void) {
    // SAFETY: the Box<Ctx> leaked by `run`, freed exactly once (the C++ side guarantees it).
    let ctx = unsafe { Box::from_raw(ctx as *mut Ctx) };
    if let Some(owner) = ctx.owner {
        if current_thread() != Some(owner) {
            std::mem::forget(ctx);
            return;
        }
    }
    // A panicking Drop in the closure's captures must not unwind into C++.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(ctx)));
}

fn run(ctx: Ctx, input: &Tensor, params: &[Tensor]) -> Result<Tensor> {
    let n = c_int::try_from(params.len()).context("recompute: too many parameters")?;
    let ps: Vec<ffi::CTensor> = params.iter().map(ffi::ptr).collect();
    let ctx = Box::into_raw(Box::new(ctx)) as *mut c_void;
    let mut out = std::ptr::null_mut();
    // SAFETY: live tensors for the call's duration; course_recompute owns ctx from here on and
    // frees it through drop_block exactly once, on every path.
    ffi::check(unsafe {
        ffi::course_recompute(call_block, ctx, drop_block, ffi::ptr(input), ps.as_ptr(), n, &mut out)
    })?;
    Ok(ffi::take(out))
}

/// `f(input)` with gradient checkpointing: the forward keeps none of `f`'s activations; backward
/// runs `f` again (same dropout masks, same autocast) and sends gradients to `input` and to
/// every tensor in `params`.
///
/// `params` must list every tensor that requires grad and that `f` reads besides `input` (the
/// block's weights): backward returns an error naming the shape of one that is missing, rather
/// than let its gradient silently vanish. A tensor listed twice is an error too. Frozen
/// tensors (no grad) may be left out. An error or panic in `f` during the forward is returned
/// here; during the recompute, it is returned by `loss.f_backward()` (`backward()` panics with
/// it). Under `no_grad`/inference mode, or when nothing requires grad, `f` simply runs.
///
/// Changing `input` or a parameter in place between forward and backward (an optimizer step)
/// makes backward fail, as autograd does for any saved tensor. Double backward
/// (`create_graph`) is not supported.
///
/// # Shapes
/// - `input`: any; `f` must return a tensor of the same shape every time it runs on it
/// - returns: what `f` returns
pub fn recompute<F>(f: F, input: &Tensor, params: &[Tensor]) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Tensor + Send + 'static,
{
    try_recompute(move |x| Ok(f(x)), input, params)
}

/// [`recompute`] for a closure that returns its own errors.
pub fn try_recompute<F>(f: F, input: &Tensor, params: &[Tensor]) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + 'static,
{
    run(Ctx { f: Box::new(f), owner: None }, input, params)
}

/// [`try_recompute`] for a closure that is not `Send`, such as one holding an `Rc` or `Arc`
/// of a tch module. It is only ever called and freed on the calling thread: a recompute on
/// another thread (the autograd engine runs CUDA graphs on a device thread) fails with an
/// error, and if the graph is freed on another thread the closure is leaked, not dropped. Use it
/// for CPU training; use [`recompute`] on GPUs.
pub fn recompute_local<F>(f: F, input: &Tensor, params: &[Tensor]) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + 'static,
{
    let owner = current_thread().context("recompute_local: the current thread is shutting down")?;
    run(Ctx { f: Box::new(f), owner: Some(owner) }, input, params)
}
