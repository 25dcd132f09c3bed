// ProcessGroupNCCL for c10d.cpp (compiled only with --features cuda; lives in libtorch_cuda).
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "c10d.h"

namespace course {

c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                            std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
}

}  // namespace course
