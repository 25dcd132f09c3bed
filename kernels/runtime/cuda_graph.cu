// CUDA graphs (CUDA 图) of a Rust closure, the way torch.cuda.graph captures them (see
// torch/cuda/graphs.py): every kernel the closure launches is recorded once into a graph, and a
// replay launches the whole graph with one call, so a small model stops paying the CPU cost of
// thousands of kernel launches per step (torch.compile's "reduce-overhead" mode is this).
//
// Capture, in torch's order:
//   1. a side stream from the pool waits for the current stream (capture may not run on the
//      default stream, and must see everything queued before it);
//   2. the closure runs `warmup` times on that stream: first calls do lazy work (cuBLAS handles,
//      autotuning, allocator growth) that must not end up inside the graph;
//   3. the device is synchronised (torch.cuda.graph's __enter__ does the same);
//   4. capture_begin, the closure once, capture_end (which instantiates the graph);
//   5. the current stream waits for the side stream.
// Autocast's cache of casted weights is off for steps 2-4 (torch.autocast(cache_enabled=False)
// inside graphs): a cast cached during capture would be a tensor of the graph's private pool that
// a later, eager forward could read after the graph overwrote it.
//
// Compiled only with --features cuda (by nvcc, for the CUDA headers); cuda_graph.cpp gives the
// same C ABI in CPU-only builds, returning an error.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace course {
namespace {

// The caller's closure, dropped exactly once: with the graph, or when a capture fails.
struct Closure {
  course_graph_fn fn = nullptr;
  void* ctx = nullptr;
  void (*drop)(void*) = nullptr;

  Closure(course_graph_fn f, void* c, void (*d)(void*)) : fn(f), ctx(c), drop(d) {}
  ~Closure() {
    if (drop) drop(ctx);
  }
  Closure(const Closure&) = delete;
  Closure& operator=(const Closure&) = delete;

  void call(const char* phase) const {
    char* err = fn(ctx);
    if (err != nullptr) {
      std::string msg(err);
      course_free_error(err);
      throw std::runtime_error(std::string("cuda graph: the function failed during ") + phase + ": " + msg);
    }
  }
};

// What the handle owns. Members are destroyed in reverse order: the graph (and its memory pool)
// goes before the closure, whose tensors the graph's kernels read.
struct Graph {
  Closure closure;
  std::unique_ptr<at::cuda::CUDAGraph> graph;

  Graph(course_graph_fn f, void* c, void (*d)(void*)) : closure(f, c, d) {}
};

// Turns autocast's weight-cast cache off for a scope and restores the previous setting.
class AutocastCacheOff {
 public:
  AutocastCacheOff() : prev_(at::autocast::is_autocast_cache_enabled()) {
    at::autocast::set_autocast_cache_enabled(false);
  }
  ~AutocastCacheOff() { at::autocast::set_autocast_cache_enabled(prev_); }
  AutocastCacheOff(const AutocastCacheOff&) = delete;
  AutocastCacheOff& operator=(const AutocastCacheOff&) = delete;

 private:
  bool prev_;
};

void capture(Graph& g, int device_index, int warmup) {
  const int n = c10::cuda::device_count();
  TORCH_CHECK(n > 0, "CUDA graphs need a CUDA device, and none is visible");
  TORCH_CHECK(device_index < n, "cuda graph: device cuda:", device_index, " does not exist (", n, " visible)");
  // The side stream, the capture and the closure's own ops must all be on the tensors' device.
  c10::cuda::OptionalCUDAGuard on_device;
  if (device_index >= 0) on_device.set_index(static_cast<c10::DeviceIndex>(device_index));
  const auto device = c10::cuda::current_device();
  auto current = c10::cuda::getCurrentCUDAStream(device);
  auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
  c10::cuda::CUDAEvent ready;
  ready.record(current);
  ready.block(side);
  {
    AutocastCacheOff cache_off;
    c10::cuda::CUDAStreamGuard on_side(side);
    for (int i = 0; i < warmup; ++i) g.closure.call("warm-up");
    c10::cuda::device_synchronize();
    g.graph = std::make_unique<at::cuda::CUDAGraph>();
    g.graph->capture_begin();
    try {
      g.closure.call("capture");
    } catch (...) {
      // End the capture whatever happened, so the stream leaves capture mode; a failed end (the
      // capture was invalidated by an illegal call such as a host sync) adds nothing to the
      // closure's own error.
      try {
        g.graph->capture_end();
      } catch (...) {
      }
      throw;
    }
    g.graph->capture_end();
  }
  c10::cuda::CUDAEvent done;
  done.record(side);
  done.block(current);
}

}  // namespace
}  // namespace course

extern "C" {

char* course_cuda_graph_capture(course_graph_fn f, void* ctx, void (*drop)(void*), int device, int warmup,
                                void** graph_out) {
  // Own the closure first, so every path below (errors included) drops it exactly once.
  std::unique_ptr<course::Graph> g;
  try {
    g = std::make_unique<course::Graph>(f, ctx, drop);
  } catch (...) {
    if (drop) drop(ctx);
    return course::dup_error("cuda graph: out of memory");
  }
  COURSE_TRY({
    TORCH_CHECK(f != nullptr, "cuda graph: null callback");
    TORCH_CHECK(graph_out != nullptr, "cuda graph: null output handle");
    TORCH_CHECK(warmup >= 0, "cuda graph: negative warm-up count ", warmup);
    course::capture(*g, device, warmup);
    *graph_out = g.release();
  })
}

char* course_cuda_graph_replay(void* graph) {
  COURSE_TRY({
    TORCH_CHECK(graph != nullptr, "cuda graph: null handle");
    auto* g = static_cast<course::Graph*>(graph);
    TORCH_CHECK(g->graph != nullptr, "cuda graph: nothing was captured");
    g->graph->replay();
  })
}

void course_cuda_graph_free(void* graph) {
  auto* g = static_cast<course::Graph*>(graph);
  if (g == nullptr) return;
  // A replay may still be running: its memory pool must not go back to the allocator (and the
  // closure's tensors must not be freed) under it.
  try {
    c10::cuda::device_synchronize();
  } catch (...) {
  }
  delete g;
}

}  // extern "C"
