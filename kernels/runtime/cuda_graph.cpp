// The CUDA-graph C ABI of a CPU-only build: the same symbols as cuda_graph.cu, each returning
// an error, so the Rust side links and reports the missing feature instead of failing to link.
// With --features cuda (COURSE_CUDA defined) this file is empty and cuda_graph.cu provides them.
#include "ops.h"

#ifndef COURSE_CUDA

namespace {
constexpr const char* kNeedsCuda = "CUDA graphs need a build with --features cuda";
}

extern "C" {

char* course_cuda_graph_capture(course_graph_fn f, void* ctx, void (*drop)(void*), int device, int warmup,
                                void** graph_out) {
  (void)f;
  (void)device;
  (void)warmup;
  // Takes ownership of ctx in every case, as the CUDA build does.
  if (drop) drop(ctx);
  if (graph_out) *graph_out = nullptr;
  return course::dup_error(kNeedsCuda);
}

char* course_cuda_graph_replay(void* graph) {
  (void)graph;
  return course::dup_error(kNeedsCuda);
}

void course_cuda_graph_free(void* graph) { (void)graph; }

}  // extern "C"

#endif  // COURSE_CUDA
