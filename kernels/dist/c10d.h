// The c10d handles behind the C ABI of c10d.cpp, shared with the other C++ files that talk to
// a process group (sync_batch_norm.cpp, c10d_nccl.cpp).
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <string>

namespace course {

struct StoreHandle {
  c10::intrusive_ptr<c10d::Store> store;
};

struct GroupHandle {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::string name;  // "gloo" or "nccl"
  int rank = 0;
  int size = 1;
  std::chrono::milliseconds timeout{0};
  // Gloo has no ReduceOp::AVG: average = sum, then divide by the group size.
  bool native_avg = false;
};

// Sums (average = false) or averages `t` in place across the group and waits, with the group's
// timeout; throws c10d's error.
void allreduce_blocking(GroupHandle& g, at::Tensor& t, bool average);

#ifdef COURSE_CUDA
// c10d_nccl.cpp: a ProcessGroupNCCL over `store` (libtorch_cuda).
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                            std::chrono::milliseconds timeout);
#endif

}  // namespace course
