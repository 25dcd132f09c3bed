// Shared declarations for the course's torch extensions: the C ABI that Rust calls (tensor
// pointers are tch's `C_tensor*`, which is a `torch::Tensor*`), and the C++ kernel entry points
// that the .cpp (CPU) and .cu (CUDA) files implement.
//
// Error convention: every extern "C" function returns NULL on success or a malloc'd message
// that Rust copies and frees with course_free_error. No C++ exception crosses the boundary.
#pragma once
#include <cstdint>

#ifdef __cplusplus
#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <tuple>

namespace course {

// The target that marks a row left out of a loss: PyTorch's and Hugging Face's ignore_index.
constexpr int64_t kIgnoreIndex = -100;

// GELU, tanh approximation (Hendrycks & Gimpel 2016, eq. 2): 0.5 x (1 + tanh(k (x + c x^3))).
constexpr double kGeluK = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluC = 0.044715;

// Forward and backward of y = gelu_tanh(x + bias), x of shape (M, N) contiguous, bias (N).
at::Tensor bias_gelu_forward_cpu(const at::Tensor& x, const at::Tensor& bias);
std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& bias);
#ifdef COURSE_CUDA
at::Tensor bias_gelu_forward_cuda(const at::Tensor& x, const at::Tensor& bias);
std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& bias);
#endif

// Fused softmax cross-entropy: logits (N, V), targets (N) int64 with -1 = ignored row. Forward
// returns (mean loss, 0-dim; per-row logsumexp (N)), both fp32 (fp64 for fp64 logits); backward
// takes the loss's 0-dim gradient and returns d loss / d logits in the logits' dtype.
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& targets);
at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                   const at::Tensor& lse);
#ifdef COURSE_CUDA
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& targets);
at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                    const at::Tensor& lse);
#endif

// Returned when even the error message cannot be allocated; course_free_error never frees it.
inline char* out_of_memory_error() {
  static char msg[] = "out of memory while reporting a C++ error";
  return msg;
}

// A malloc'd copy of an exception message for the C ABI, cut before c10's C++ backtrace.
// Never throws and never returns NULL (NULL means success to the caller).
inline char* dup_error(const char* what) noexcept {
  if (!what) what = "unknown C++ exception";
  const char* cut = std::strstr(what, "\nException raised from");
  size_t n = cut ? static_cast<size_t>(cut - what) : std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (!out) return out_of_memory_error();
  std::memcpy(out, what, n);
  out[n] = '\0';
  return out;
}

}  // namespace course

// Body of an extern "C" function: run it, turn any exception into a returned message.
#define COURSE_TRY(...)                                \
  try {                                                \
    __VA_ARGS__;                                       \
    return nullptr;                                    \
  } catch (const std::exception& e) {                  \
    return course::dup_error(e.what());                \
  } catch (...) {                                      \
    return course::dup_error("unknown C++ exception"); \
  }

extern "C" {
#endif

typedef void* course_tensor;  // a torch::Tensor*

// Frees a message or string returned by any course_* function.
void course_free_error(char* msg);

// ---- runtime shim (shim.cpp): what tch does not bind ----
void course_set_deterministic(int enabled, int warn_only);
int course_deterministic(void);
void course_set_cudnn(int benchmark, int deterministic);
// Autocast for device_type 0 = CPU, 1 = CUDA; dtype is a c10::ScalarType code. enter returns the
// previous state so exit can restore it (nesting-safe).
char* course_autocast_enter(int device_type, int enabled, int dtype, int* prev_enabled, int* prev_dtype);
char* course_autocast_exit(int device_type, int prev_enabled, int prev_dtype);
char* course_autocast_state(int device_type, int* enabled, int* dtype);
const char* course_torch_version(void);
const char* course_cpu_capability(void);
char* course_parallel_info(void);  // free with course_free_error
long course_cuda_runtime_version(void);  // 0 when CUDA is absent
long course_cudnn_version(void);         // 0 when cuDNN is absent
int course_cuda_device_count(void);
// Caching-allocator stats of an accelerator device (bytes): allocated now/peak, reserved now/peak.
char* course_accel_memory(int device_index, int64_t* alloc_cur, int64_t* alloc_peak, int64_t* reserved_cur,
                          int64_t* reserved_peak);
char* course_accel_reset_peak(int device_index);
// Default generator state of device_type (0 = CPU, 1 = CUDA) device `index`, as a uint8 tensor.
char* course_generator_get_state(int device_type, int index, course_tensor* out);
char* course_generator_set_state(int device_type, int index, course_tensor state);
// Resets a tensor's gradient to undefined (zero_grad(set_to_none=True)).
// AdamW over n parameters in one call through ATen's fused kernel (kernels/ops/adamw.cpp);
// steps[i] is parameter i's step count after this step's increment.
char* course_fused_adamw(course_tensor* params, course_tensor* grads, course_tensor* exp_avgs,
                         course_tensor* exp_avg_sqs, const double* steps, int n, double lr, double beta1,
                         double beta2, double weight_decay, double eps);
void course_clear_grad(course_tensor t);
// c10::InferenceMode as a guard object: exit on the thread that entered, in LIFO order.
void* course_inference_mode_enter(void);
void course_inference_mode_exit(void* guard);
int course_is_inference(course_tensor t);
int64_t course_peak_rss_bytes(void);
int64_t course_current_rss_bytes(void);

// y = input @ weight^T + bias (bias may be NULL) as an autograd function (kernels/ops/linear.cpp):
// oneDNN for the forward and input-gradient GEMMs on the CPU in fp32, at::linear elsewhere.
char* course_linear(course_tensor input, course_tensor weight, course_tensor bias, course_tensor* out);
// input (..., K) @ weight (N, K)^T through the skinny (few-row) kernel, CPU fp32 or bf16, no autograd.
char* course_skinny_matmul(course_tensor input, course_tensor weight, course_tensor* out);
int course_qmatmul_amx(int enable, char* why, int64_t cap);
int course_qgemv_int8_activations(int format, int64_t K);
// The quantized GEMVs' software prefetch of W's rows: 0 none, 1 non-temporal, 2 into L2; `mode`
// -1 leaves it. Returns the mode in force after the call.
int course_qgemv_prefetch(int mode);
char* course_dropout(course_tensor input, double p, int64_t seed, course_tensor* out);
// 1 when course_linear would run oneDNN for this input, 0 when it runs at::linear.
int course_linear_uses_onednn(course_tensor input);

// The Llama decoder's small ops outside autograd (kernels/ops/llama.cpp), CPU, fp32 or bf16.
// rmsnorm(x) * weight over the last dimension; with residual non-NULL, x += residual first (in
// place: x then holds the sum).
char* course_rms_norm(course_tensor x, course_tensor residual, course_tensor weight, double eps, course_tensor* out);
// gate_up (..., 2F) -> silu(gate_up[..., :F]) * gate_up[..., F:].
char* course_swiglu(course_tensor gate_up, course_tensor* out);
// New tokens' attention over a KV cache: qkv (B, 1, (H + 2 KV) hd) of a packed projection, cos/sin
// (P, hd) rotary tables, caches (S, KV, cap, hd) written at positions (B) int64, out (B, 1, H hd).
// rows (B) int64, distinct, or NULL: sequence b reads and writes cache row rows[b] (with NULL, row
// b, and S must equal B) — continuous batching's slots.
char* course_decode_attention(course_tensor qkv, course_tensor cos, course_tensor sin, course_tensor cache_k,
                              course_tensor cache_v, course_tensor positions, course_tensor rows, int64_t heads,
                              int64_t kv_heads, course_tensor* out);

// Fused bias + GELU as an autograd function: gradients flow to input and bias.
char* course_bias_gelu(course_tensor input, course_tensor bias, course_tensor* out);
// The raw kernels, without autograd (for benchmarks and direct tests).
char* course_bias_gelu_forward(course_tensor input, course_tensor bias, course_tensor* out);
char* course_bias_gelu_backward(course_tensor grad, course_tensor input, course_tensor bias,
                                course_tensor* grad_input, course_tensor* grad_bias);

// ---- profiler (profiler.cpp): torch's Kineto profiler, thread-local like torch's ----
// Starts recording this thread's ATen ops (cuda != 0: also CUDA kernels); record_shapes adds
// input shapes to the trace, profile_memory every allocation and free ("[memory]" events).
char* course_profiler_start(int cuda, int record_shapes, int profile_memory);
// Stops the profiler of this thread; with a non-NULL path, saves the Chrome trace JSON there.
char* course_profiler_stop(const char* path);
// A named range in the trace (torch.profiler.record_function): enter returns a guard (NULL on
// failure), exit (on the same thread, innermost first) ends the range and frees the guard.
void* course_record_function_enter(const char* name);
void course_record_function_exit(void* guard);

// ---- activation recomputation (recompute.cpp) ----
// A closure from the caller: runs on `input` (a new torch::Tensor* that the callee owns and
// frees) and stores a new torch::Tensor* in *out; returns NULL, or a message made with
// course_error_new.
typedef char* (*course_fn)(void* ctx, course_tensor input, course_tensor* out);
// A malloc'd copy of msg[0..len) in the form every course_* error takes.
char* course_error_new(const char* msg, size_t len);
// Gradient checkpointing of out = f(input): forward without keeping activations, recompute in
// backward; gradients flow to input and params[0..n_params). Takes ownership of ctx in every
// case: drop_ctx(ctx) runs once, on error before returning, else when the autograd node that
// holds it is freed (possibly on another thread).
char* course_recompute(course_fn f, void* ctx, void (*drop_ctx)(void*), course_tensor input, course_tensor* params,
                        int n_params, course_tensor* out);

// Fused softmax cross-entropy (mean over the rows whose target is not -1) as an autograd
// function: the gradient flows to logits.
char* course_cross_entropy(course_tensor logits, course_tensor targets, course_tensor* loss);
// The raw kernels, without autograd: forward also returns the per-row logsumexp backward takes.
char* course_cross_entropy_forward(course_tensor logits, course_tensor targets, course_tensor* loss,
                                   course_tensor* lse);
char* course_cross_entropy_backward(course_tensor grad, course_tensor logits, course_tensor targets,
                                    course_tensor lse, course_tensor* grad_logits);

// ---- CUDA graphs (cuda_graph.cu; cuda_graph.cpp without --features cuda returns an error) ----
// A closure from the caller without arguments: returns NULL, or a message made with
// course_error_new.
typedef char* (*course_graph_fn)(void* ctx);
// Captures what f launches on CUDA device `device` (-1: the current one) as a graph
// (torch.cuda.graph): on a side stream, f runs `warmup` times, then once under capture, with
// autocast's weight-cast cache off. Takes ownership of ctx in every case: drop(ctx) runs once,
// on error before returning, else in course_cuda_graph_free. *graph_out receives the handle.
char* course_cuda_graph_capture(course_graph_fn f, void* ctx, void (*drop)(void*), int device, int warmup,
                                void** graph_out);
// Launches the captured graph on the current stream (asynchronous, like a kernel launch).
char* course_cuda_graph_replay(void* graph);
// Waits for the device, frees the graph and its memory pool, then drops the closure.
void course_cuda_graph_free(void* graph);

#ifdef __cplusplus
}
#endif
