// CUDA twin of cross_entropy_cpu.cpp: fused softmax cross-entropy forward and backward. Each row
// of the logits is handled by a group of threads: one warp when V <= 1024 (a character-level
// vocabulary of 65 would leave most of a 512-thread block idle), else one 512-thread block
// (GPT-2's 50304 classes: ~100 elements per thread). Computed in fp32 for bf16/fp16
// (at::opmath_type), launched on the current torch CUDA stream so it orders with the
// surrounding torch ops.
//
// Loads are plain coalesced scalar loads: 128-bit vector loads (llm.c's Packed128) need every
// row to start 16-byte aligned, which V = 65 breaks; the kernels are memory-bound either way.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "ops.h"

namespace course {
namespace {

constexpr int kWarp = 32;
// Rows of at most this many classes get one warp each, four rows per 128-thread block.
constexpr int64_t kWarpMaxV = 1024;
constexpr int kSmallBlock = 128;
constexpr int kLargeBlock = 512;

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// Merges the running softmax state (m, s) = (max, sum of exp(x - max)) with another one. Either
// side may be empty (m = -inf, s = 0); -inf - -inf (NaN) is never formed.
template <typename A>
__device__ __forceinline__ void combine(A& m, A& s, A m2, A s2) {
  if (m2 > m) {
    s = s * exp(m - m2) + s2;
    m = m2;
  } else if (m2 > neg_inf<A>()) {
    s += s2 * exp(m2 - m);
  }
}

// Online softmax over one row's elements lane, lane + kRowThreads, ... (Milakov & Gimelshein
// 2018): one read of the logits and one exp per element, then a tree merge of the (m, s) pairs.
// The merged state is exact in thread 0 of the row group.
template <typename T, typename A, int kRowThreads>
__device__ __forceinline__ void row_state(const T* __restrict__ xr, int64_t V, int lane, A& m, A& s) {
  m = neg_inf<A>();
  s = A(0);
  for (int64_t j = lane; j < V; j += kRowThreads) {
    const A v = static_cast<A>(xr[j]);
    if (v > m) {
      s = s * exp(m - v) + A(1);
      m = v;
    } else if (m > neg_inf<A>()) {  // skip -inf against -inf; a NaN v falls here and propagates
      s += exp(v - m);
    }
  }
  for (int off = kWarp / 2; off > 0; off /= 2) {
    combine(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  }
  if constexpr (kRowThreads > kWarp) {
    // A block per row: the warps' states meet in shared memory and warp 0 merges them.
    constexpr int kWarps = kRowThreads / kWarp;
    __shared__ A sm[kWarps], ss[kWarps];
    const int warp = threadIdx.x / kWarp, wl = threadIdx.x % kWarp;
    if (wl == 0) {
      sm[warp] = m;
      ss[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
      m = wl < kWarps ? sm[wl] : neg_inf<A>();
      s = wl < kWarps ? ss[wl] : A(0);
      for (int off = kWarp / 2; off > 0; off /= 2) {
        combine(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
      }
    }
  }
}

// Writes lse[row] and the row's loss (0 when ignored); a target outside [0, V) and not -100 puts
// the smallest such row into *bad (initialised to N) for the host to report.
template <typename T, typename A, int kRowThreads, int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads)
    fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ t, A* __restrict__ lse, A* __restrict__ loss,
               unsigned long long* __restrict__ bad, int64_t N, int64_t V) {
  constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / kRowThreads;
  if (row >= N) return;  // whole row groups only: the shuffles below keep full warps
  const int lane = threadIdx.x % kRowThreads;
  const T* xr = x + row * V;
  A m, s;
  row_state<T, A, kRowThreads>(xr, V, lane, m, s);
  if (lane == 0) {
    const A log_s = log(s);
    lse[row] = m + log_s;
    const int64_t tr = t[row];
    if (tr == kIgnoreIndex) {
      loss[row] = A(0);
    } else if (tr < 0 || tr >= V) {
      loss[row] = A(0);
      atomicMin(bad, static_cast<unsigned long long>(row));
    } else {
      loss[row] = (m - static_cast<A>(xr[tr])) + log_s;  // not lse - x_t: see cross_entropy_cpu.cpp
    }
  }
}

// gx = (exp(x - lse) - onehot(target)) * grad / count, zero on ignored rows. grad and count are
// device scalars, read here so that the host never waits for them.
template <typename T, typename A, int kRowThreads, int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads)
    bwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ t, const A* __restrict__ lse,
               const A* __restrict__ grad, const int64_t* __restrict__ count, T* __restrict__ gx, int64_t N, int64_t V) {
  constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / kRowThreads;
  if (row >= N) return;
  const int lane = threadIdx.x % kRowThreads;
  const T* xr = x + row * V;
  T* gr = gx + row * V;
  const int64_t tr = t[row];
  if (tr < 0 || tr >= V) {  // -100 (forward rejected every other value outside [0, V))
    for (int64_t j = lane; j < V; j += kRowThreads) gr[j] = T(0);
    return;
  }
  const A scale = *count > 0 ? *grad / static_cast<A>(*count) : A(0);
  const A l = lse[row];
  for (int64_t j = lane; j < V; j += kRowThreads) {
    const A p = exp(static_cast<A>(xr[j]) - l);
    gr[j] = static_cast<T>((p - (j == tr ? A(1) : A(0))) * scale);
  }
}

// Grid and block for N rows of V classes; the kernel template is picked to match.
template <typename T, typename A>
void launch_fwd(const T* x, const int64_t* t, A* lse, A* loss, unsigned long long* bad, int64_t N, int64_t V,
                cudaStream_t stream) {
  if (V <= kWarpMaxV) {
    constexpr int rows = kSmallBlock / kWarp;
    const auto blocks = static_cast<unsigned>((N + rows - 1) / rows);
    fwd_kernel<T, A, kWarp, kSmallBlock><<<blocks, kSmallBlock, 0, stream>>>(x, t, lse, loss, bad, N, V);
  } else {
    fwd_kernel<T, A, kLargeBlock, kLargeBlock><<<static_cast<unsigned>(N), kLargeBlock, 0, stream>>>(x, t, lse, loss, bad,
                                                                                                    N, V);
  }
}

template <typename T, typename A>
void launch_bwd(const T* x, const int64_t* t, const A* lse, const A* grad, const int64_t* count, T* gx, int64_t N,
                int64_t V, cudaStream_t stream) {
  if (V <= kWarpMaxV) {
    constexpr int rows = kSmallBlock / kWarp;
    const auto blocks = static_cast<unsigned>((N + rows - 1) / rows);
    bwd_kernel<T, A, kWarp, kSmallBlock><<<blocks, kSmallBlock, 0, stream>>>(x, t, lse, grad, count, gx, N, V);
  } else {
    bwd_kernel<T, A, kLargeBlock, kLargeBlock><<<static_cast<unsigned>(N), kLargeBlock, 0, stream>>>(x, t, lse, grad,
                                                                                                    count, gx, N, V);
  }
}

at::ScalarType acc_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& targets) {
  c10::cuda::CUDAGuard guard(logits.device());
  auto x = logits.contiguous();
  auto t = targets.contiguous();
  const int64_t N = x.size(0), V = x.size(1);
  TORCH_CHECK(N <= std::numeric_limits<int>::max(), "cross_entropy: ", N, " rows exceed the CUDA grid limit");
  const auto acc = acc_dtype(x.scalar_type());
  auto lse = at::empty({N}, x.options().dtype(acc));
  auto row_loss = at::empty({N}, x.options().dtype(acc));
  if (N > 0) {
    auto bad = at::full({1}, N, t.options());
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cross_entropy_forward_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      launch_fwd<scalar_t, A>(x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(), lse.mutable_data_ptr<A>(),
                              row_loss.mutable_data_ptr<A>(),
                              reinterpret_cast<unsigned long long*>(bad.mutable_data_ptr<int64_t>()), N, V, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // The range check costs one host sync per forward (8 bytes back). PyTorch's nll_loss uses a
    // device-side assert instead, which poisons the CUDA context for the rest of the process;
    // the course prefers an error the caller can handle and that names the row.
    const int64_t b = bad.item<int64_t>();
    if (b < N) {
      const int64_t v = t[b].item<int64_t>();
      TORCH_CHECK(false, "cross_entropy: targets[", b, "] = ", v, " is out of range [0, ", V,
                  ") (-100 marks a row to ignore)");
    }
  }
  // The mean over counted rows, as device ops (no sync); 0 / 0 = NaN when every row is ignored,
  // as F.cross_entropy gives.
  auto count = t.ne(kIgnoreIndex).sum();
  auto loss = (row_loss.sum(at::kDouble) / count).to(acc);
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                    const at::Tensor& lse_in) {
  c10::cuda::CUDAGuard guard(logits.device());
  auto x = logits.contiguous();
  auto t = targets.contiguous();
  auto lse = lse_in.contiguous();
  const int64_t N = x.size(0), V = x.size(1);
  TORCH_CHECK(N <= std::numeric_limits<int>::max(), "cross_entropy: ", N, " rows exceed the CUDA grid limit");
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (N == 0) return gx;
  const auto acc = acc_dtype(x.scalar_type());
  auto g = grad.reshape({}).to(acc).contiguous();
  // Out-of-range targets were rejected by forward (the raw backward trusts its caller here: a
  // second check would cost a second sync); -100 rows are not counted.
  auto count = t.ne(kIgnoreIndex).sum();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cross_entropy_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    launch_bwd<scalar_t, A>(x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(), lse.const_data_ptr<A>(),
                            g.const_data_ptr<A>(), count.const_data_ptr<int64_t>(), gx.mutable_data_ptr<scalar_t>(), N,
                            V, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

}  // namespace course
