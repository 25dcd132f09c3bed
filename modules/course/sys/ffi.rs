//! Raw declarations of the C ABI in `kernels/ops.h` (compiled by build.rs). Use the safe
//! wrappers in [`crate::ops`] and [`crate::sys::runtime`]; nothing else should touch these.
#![allow(dead_code)]

use std::ffi::{c_char, c_int, c_long, c_void, CStr};
use tch::Tensor;

pub type CTensor = *mut c_void;

extern "C" {
    pub fn course_free_error(msg: *mut c_char);

    pub fn course_bias_gelu(input: CTensor, bias: CTensor, out: *mut CTensor) -> *mut c_char;
    pub fn course_bias_gelu_forward(input: CTensor, bias: CTensor, out: *mut CTensor) -> *mut c_char;
    pub fn course_bias_gelu_backward(
        grad: CTensor,
        input: CTensor,
        bias: CTensor,
        grad_input: *mut CTensor,
        grad_bias: *mut CTensor,
    ) -> *mut c_char;

    pub fn course_cross_entropy(logits: CTensor, targets: CTensor, loss: *mut CTensor) -> *mut c_char;
    pub fn course_cross_entropy_forward(
        logits: CTensor,
        targets: CTensor,
        loss: *mut CTensor,
        lse: *mut CTensor,
    ) -> *mut c_char;
    pub fn course_cross_entropy_backward(
        grad: CTensor,
        logits: CTensor,
        targets: CTensor,
        lse: CTensor,
        grad_logits: *mut CTensor,
    ) -> *mut c_char;

    pub fn course_set_deterministic(enabled: c_int, warn_only: c_int);
    pub fn course_deterministic() -> c_int;
    pub fn course_set_cudnn(benchmark: c_int, deterministic: c_int);
    pub fn course_autocast_enter(
        device_type: c_int,
        enabled: c_int,
        dtype: c_int,
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
    ) -> *mut c_char;
    pub fn course_autocast_exit(device_type: c_int, prev_enabled: c_int, prev_dtype: c_int) -> *mut c_char;
    pub fn course_autocast_state(device_type: c_int, enabled: *mut c_int, dtype: *mut c_int) -> *mut c_char;
    pub fn course_torch_version() -> *const c_char;
    pub fn course_cpu_capability() -> *const c_char;
    pub fn course_parallel_info() -> *mut c_char;
    pub fn course_cuda_runtime_version() -> c_long;
    pub fn course_cudnn_version() -> c_long;
    pub fn course_cuda_device_count() -> c_int;
    pub fn course_accel_memory(
        device_index: c_int,
        alloc_cur: *mut i64,
        alloc_peak: *mut i64,
        reserved_cur: *mut i64,
        reserved_peak: *mut i64,
    ) -> *mut c_char;
    pub fn course_accel_reset_peak(device_index: c_int) -> *mut c_char;
    pub fn course_generator_get_state(device_type: c_int, index: c_int, out: *mut CTensor) -> *mut c_char;
    pub fn course_generator_set_state(device_type: c_int, index: c_int, state: CTensor) -> *mut c_char;
    pub fn course_clear_grad(t: CTensor);
    pub fn course_linear(input: CTensor, weight: CTensor, bias: CTensor, out: *mut CTensor) -> *mut c_char;
    pub fn course_linear_uses_onednn(input: CTensor) -> c_int;
    pub fn course_skinny_matmul(input: CTensor, weight: CTensor, out: *mut CTensor) -> *mut c_char;

    /// The blocks of `tensors[0]` (Q4_1 or Q8_0) repacked into row-interleaved tiles.
    pub fn course_qtiles(format: c_int, tensors: *const CTensor, n: i64, k: i64, out: *mut CTensor) -> *mut c_char;
    /// `tensors`: data, scale, absmax_q, code8, code16, tiles (null where the format has none).
    pub fn course_qlinear(
        format: c_int,
        input: CTensor,
        tensors: *const CTensor,
        offset: f64,
        n: i64,
        k: i64,
        out: *mut CTensor,
    ) -> *mut c_char;
    /// `enable`: 1 on, 0 off, -1 leave; returns whether the bf16 GEMM runs on AMX tiles and
    /// writes why into `why` (NUL-terminated, at most `cap` bytes).
    pub fn course_qmatmul_amx(enable: c_int, why: *mut c_char, cap: i64) -> c_int;
    /// 1 where the GEMV of a weight of this format id and in_features takes the int8-activation path.
    pub fn course_qgemv_int8_activations(format: c_int, k: i64) -> c_int;
    /// The quantized GEMVs' software prefetch: `mode` 0 none, 1 non-temporal, 2 streamed in the row loops, -1
    /// leave; returns the mode in force.
    pub fn course_qgemv_prefetch(mode: c_int) -> c_int;
    pub fn course_dropout(input: CTensor, p: f64, seed: i64, out: *mut CTensor) -> *mut c_char;
    pub fn course_qdequantize(
        format: c_int,
        tensors: *const CTensor,
        offset: f64,
        n: i64,
        k: i64,
        kind: c_int,
        out: *mut CTensor,
    ) -> *mut c_char;
    pub fn course_rms_norm(x: CTensor, residual: CTensor, weight: CTensor, eps: f64, out: *mut CTensor) -> *mut c_char;
    pub fn course_swiglu(gate_up: CTensor, out: *mut CTensor) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub fn course_decode_attention(
        qkv: CTensor,
        cos: CTensor,
        sin: CTensor,
        cache_k: CTensor,
        cache_v: CTensor,
        positions: CTensor,
        rows: CTensor,
        heads: i64,
        kv_heads: i64,
        out: *mut CTensor,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub fn course_fused_adamw(
        params: *const CTensor,
        grads: *const CTensor,
        exp_avgs: *const CTensor,
        exp_avg_sqs: *const CTensor,
        steps: *const f64,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    pub fn course_inference_mode_enter() -> *mut c_void;
    pub fn course_inference_mode_exit(guard: *mut c_void);
    pub fn course_is_inference(t: CTensor) -> c_int;
    pub fn course_peak_rss_bytes() -> i64;
    pub fn course_current_rss_bytes() -> i64;

    // profiler.cpp
    pub fn course_profiler_start(cuda: c_int, record_shapes: c_int, profile_memory: c_int) -> *mut c_char;
    pub fn course_profiler_stop(path: *const c_char) -> *mut c_char;
    pub fn course_record_function_enter(name: *const c_char) -> *mut c_void;
    pub fn course_record_function_exit(guard: *mut c_void);

    // recompute.cpp
    pub fn course_error_new(msg: *const c_char, len: usize) -> *mut c_char;
    pub fn course_recompute(
        f: CourseFn,
        ctx: *mut c_void,
        drop_ctx: unsafe extern "C" fn(*mut c_void),
        input: CTensor,
        params: *const CTensor,
        n_params: c_int,
        out: *mut CTensor,
    ) -> *mut c_char;

    // cuda_graph.cu (cuda_graph.cpp without the `cuda` feature)
    pub fn course_cuda_graph_capture(
        f: CourseGraphFn,
        ctx: *mut c_void,
        drop_ctx: unsafe extern "C" fn(*mut c_void),
        device: c_int,
        warmup: c_int,
        graph_out: *mut *mut c_void,
    ) -> *mut c_char;
    pub fn course_cuda_graph_replay(graph: *mut c_void) -> *mut c_char;
    pub fn course_cuda_graph_free(graph: *mut c_void);

    // c10d.cpp: stores, process groups and collectives (see kernels/dist/c10d.cpp).
    pub fn course_store_tcp(
        host: *const c_char,
        port: c_int,
        world_size: c_int,
        is_server: c_int,
        wait_workers: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub fn course_store_port(store: *mut c_void) -> c_int;
    pub fn course_store_prefix(prefix: *const c_char, base: *mut c_void, out: *mut *mut c_void) -> *mut c_char;
    pub fn course_store_set(store: *mut c_void, key: *const c_char, data: *const u8, len: usize) -> *mut c_char;
    pub fn course_store_get(
        store: *mut c_void,
        key: *const c_char,
        timeout_ms: i64,
        data: *mut *mut u8,
        len: *mut usize,
    ) -> *mut c_char;
    pub fn course_store_add(store: *mut c_void, key: *const c_char, delta: i64, out: *mut i64) -> *mut c_char;
    pub fn course_store_free(store: *mut c_void);
    pub fn course_pg_new(
        store: *mut c_void,
        rank: c_int,
        size: c_int,
        backend: *const c_char,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub fn course_pg_free(pg: *mut c_void);
    pub fn course_pg_allreduce_start(
        pg: *mut c_void,
        t: CTensor,
        average: c_int,
        timeout_ms: i64,
        work: *mut *mut c_void,
    ) -> *mut c_char;
    pub fn course_work_wait(work: *mut c_void) -> *mut c_char;
    pub fn course_work_free(work: *mut c_void);
    pub fn course_pg_allreduce(pg: *mut c_void, t: CTensor, average: c_int, timeout_ms: i64) -> *mut c_char;
    pub fn course_pg_broadcast(pg: *mut c_void, t: CTensor, root: c_int, timeout_ms: i64) -> *mut c_char;
    pub fn course_pg_allgather(pg: *mut c_void, t: CTensor, timeout_ms: i64, outs: *mut CTensor) -> *mut c_char;
    pub fn course_pg_barrier(pg: *mut c_void, timeout_ms: i64) -> *mut c_char;

    // sync_batch_norm.cpp
    #[allow(clippy::too_many_arguments)]
    pub fn course_sync_batch_norm(
        x: CTensor,
        weight: CTensor,
        bias: CTensor,
        running_mean: CTensor,
        running_var: CTensor,
        momentum: f64,
        eps: f64,
        group: *mut c_void,
        out: *mut CTensor,
    ) -> *mut c_char;
}

/// `course_fn` in ops.h: a closure called from C++ (see recompute.rs).
pub type CourseFn = unsafe extern "C" fn(ctx: *mut c_void, input: CTensor, out: *mut CTensor) -> *mut c_char;

/// `course_graph_fn` in ops.h: a closure without arguments called from C++ (see cudagraph.rs).
pub type CourseGraphFn = unsafe extern "C" fn(ctx: *mut c_void) -> *mut c_char;

/// Turns the C ABI's error convention (NULL = ok, else a malloc'd message) into a `Result`.
pub(crate) fn check(err: *mut c_char) -> anyhow::Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by ops.h's dup_error.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { course_free_error(err) };
    Err(anyhow::anyhow!(msg))
}

/// The `torch::Tensor*` behind a tch tensor, as the C ABI takes it.
pub(crate) fn ptr(t: &Tensor) -> CTensor {
    t.as_ptr() as CTensor
}

/// Takes ownership of a `new at::Tensor(...)` returned through the C ABI.
pub(crate) fn take(p: CTensor) -> Tensor {
    assert!(!p.is_null(), "C ABI returned success with a null tensor");
    // SAFETY: the pointer is a heap `at::Tensor` that nobody else owns; tch frees it on drop.
    unsafe { Tensor::from_ptr(p as *mut torch_sys::C_tensor) }
}

/// A malloc'd copy of `msg` for a Rust callback to return to C++ as its error.
pub(crate) fn c_error(msg: &str) -> *mut c_char {
    // SAFETY: a live byte slice; the C side copies it into a malloc'd string.
    unsafe { course_error_new(msg.as_ptr() as *const c_char, msg.len()) }
}

/// The message of a caught panic (callbacks from C++ must not unwind into it).
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".into())
}

/// A static C string from the shim.
pub(crate) fn static_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the shim returns pointers to static NUL-terminated strings.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
