// CUDA twin of bias_gelu_cpu.cpp: y = gelu_tanh(x + bias) and its backward (same sigmoid form),
// one thread per element in a grid-stride loop, computed in fp32 for bf16 (at::opmath_type),
// launched on the current torch CUDA stream so it orders with the surrounding torch ops. The bias gradient is a
// column sum of the input gradient, done by ATen's reduction (fp32 accumulation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"

namespace course {
namespace {

// The sigmoid form of GELU-tanh used by the CPU kernel (see bias_gelu_cpu.cpp): no cancellation
// in either tail. v is clamped so exp(-v) stays finite.
template <typename A>
__device__ __forceinline__ A exp_neg_clamped(A v) {
  const A lim = sizeof(A) == 4 ? A(87) : A(700);
  return exp(fmin(fmax(-v, -lim), lim));
}

template <typename A>
__device__ __forceinline__ A gelu_fwd(A u) {
  const A k2 = static_cast<A>(2 * kGeluK), kc2 = static_cast<A>(2 * kGeluK * kGeluC);
  return u / (A(1) + exp_neg_clamped(u * (k2 + kc2 * u * u)));
}

template <typename A>
__device__ __forceinline__ A gelu_grad(A u) {
  const A k2 = static_cast<A>(2 * kGeluK), kc2 = static_cast<A>(2 * kGeluK * kGeluC),
          kc6 = static_cast<A>(6 * kGeluK * kGeluC);
  A u2 = u * u;
  A e = exp_neg_clamped(u * (k2 + kc2 * u2));
  A s = A(1) / (A(1) + e);
  return s + u * (k2 + kc6 * u2) * (e * s) * s;
}

template <typename T>
__global__ void fwd_kernel(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y, int64_t total,
                           int64_t N) {
  using A = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    A u = static_cast<A>(x[i]) + static_cast<A>(b[i % N]);
    y[i] = static_cast<T>(gelu_fwd(u));
  }
}

template <typename T>
__global__ void bwd_kernel(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ b,
                           T* __restrict__ gx, int64_t total, int64_t N) {
  using A = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    A u = static_cast<A>(x[i]) + static_cast<A>(b[i % N]);
    gx[i] = static_cast<T>(static_cast<A>(g[i]) * gelu_grad(u));
  }
}

inline int blocks_for(int64_t total, int threads) {
  int64_t want = (total + threads - 1) / threads;
  int64_t cap = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

}  // namespace

at::Tensor bias_gelu_forward_cuda(const at::Tensor& x_in, const at::Tensor& b_in) {
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto b = b_in.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t total = x.numel(), N = x.size(-1);
  if (total == 0) return y;
  constexpr int threads = 256;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_gelu_forward_cuda", [&] {
    fwd_kernel<scalar_t><<<blocks_for(total, threads), threads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), total, N);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cuda(const at::Tensor& g_in, const at::Tensor& x_in,
                                                           const at::Tensor& b_in) {
  c10::cuda::CUDAGuard guard(x_in.device());
  auto g = g_in.contiguous();
  auto x = x_in.contiguous();
  auto b = b_in.contiguous();
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t total = x.numel(), N = x.size(-1);
  if (total == 0) return {gx, at::zeros_like(b)};
  constexpr int threads = 256;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_gelu_backward_cuda", [&] {
    bwd_kernel<scalar_t><<<blocks_for(total, threads), threads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        gx.mutable_data_ptr<scalar_t>(), total, N);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto gb = gx.reshape({-1, N}).sum(0, /*keepdim=*/false, acc).to(x.scalar_type());
  return {gx, gb};
}

}  // namespace course
