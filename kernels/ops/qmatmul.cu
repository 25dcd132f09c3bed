// CUDA twin of qmatmul_cpu.cpp: y = x W^T over a quantized W (int8 per row, NF4 with
// double-quantized absmaxes, ggml Q4_1 and Q8_0), on the current torch CUDA stream.
//
// - qgemv_cuda: at most 4 rows of x (decoding). One warp per row of W: its 32 lanes stride over
//   the row, decode each weight in registers (weight_at, the formats' definitions), multiply by
//   x in fp32 and reduce with shuffles. W is read once and never written out.
// - qdequant_cuda: W decoded into a dense (N, K) tensor in fp32 or bf16, one thread per number;
//   qmatmul.cpp then multiplies by it with cuBLAS (prefill, training, the backward).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dispatch.h"
#include "ops.h"

namespace course {
namespace {

__device__ __forceinline__ float half_at(const uint8_t* p) {
  const uint16_t bits = static_cast<uint16_t>(p[0]) | (static_cast<uint16_t>(p[1]) << 8);
  return __half2float(__ushort_as_half(bits));
}

// W[n, k] as the format defines it.
__device__ __forceinline__ float weight_at(const QWeight& w, int64_t n, int64_t k) {
  switch (w.format) {
    case QFormat::Int8:
      return static_cast<float>(reinterpret_cast<const int8_t*>(w.data)[n * w.K + k]) * w.scale[n];
    case QFormat::Nf4: {
      const int64_t e = n * w.K + k;
      const uint8_t byte = w.data[e / 2];
      const int nib = (e % 2 == 0) ? (byte >> 4) : (byte & 15);
      const int64_t b = e / kNf4Block;
      const float absmax = w.code8[w.absmax_q[b]] * w.scale[b / kNf4NestedBlock] + w.offset;
      return w.code16[nib] * absmax;
    }
    case QFormat::Q4_1: {
      const uint8_t* r = w.data + (n * (w.K / 32) + k / 32) * 20;
      const int j = static_cast<int>(k % 32);
      const int q = j < 16 ? (r[4 + j] & 15) : (r[4 + j - 16] >> 4);
      return static_cast<float>(q) * half_at(r) + half_at(r + 2);
    }
    case QFormat::Q8_0: {
      const uint8_t* r = w.data + (n * (w.K / 32) + k / 32) * 34;
      return static_cast<float>(reinterpret_cast<const int8_t*>(r + 2)[k % 32]) * half_at(r);
    }
  }
  return 0.f;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T, int M>
__global__ void qgemv_kernel(QWeight w, const T* __restrict__ x, T* __restrict__ y) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= w.N) return;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int64_t k = lane; k < w.K; k += 32) {
    const float v = weight_at(w, n, k);
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] += v * to_float(x[m * w.K + k]);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float s = acc[m];
    for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) y[m * w.N + n] = static_cast<T>(s);
  }
}

template <typename T>
__global__ void qdequant_kernel(QWeight w, T* __restrict__ out) {
  const int64_t total = w.N * w.K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<T>(weight_at(w, i / w.K, i % w.K));
  }
}

template <typename T>
void launch_gemv(const QWeight& w, const T* x, T* y, int64_t M, cudaStream_t stream) {
  constexpr int kWarps = 8;
  const dim3 grid(static_cast<unsigned>((w.N + kWarps - 1) / kWarps));
  const dim3 block(32 * kWarps);
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t mm = std::min<int64_t>(4, M - m0);
    const T* xm = x + m0 * w.K;
    T* ym = y + m0 * w.N;
    switch (mm) {
      case 1: qgemv_kernel<T, 1><<<grid, block, 0, stream>>>(w, xm, ym); break;
      case 2: qgemv_kernel<T, 2><<<grid, block, 0, stream>>>(w, xm, ym); break;
      case 3: qgemv_kernel<T, 3><<<grid, block, 0, stream>>>(w, xm, ym); break;
      default: qgemv_kernel<T, 4><<<grid, block, 0, stream>>>(w, xm, ym); break;
    }
  }
}

}  // namespace

void qgemv_cuda(const QWeight& w, const at::Tensor& x, at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t M = x.numel() / w.K;
  if (x.scalar_type() == at::kFloat) {
    launch_gemv<float>(w, x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), M, stream);
  } else {
    launch_gemv<c10::BFloat16>(w, x.const_data_ptr<c10::BFloat16>(), y.mutable_data_ptr<c10::BFloat16>(), M, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void qdequant_cuda(const QWeight& w, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((w.N * w.K + threads - 1) / threads, 65535);
  if (out.scalar_type() == at::kFloat) {
    qdequant_kernel<float><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(w, out.mutable_data_ptr<float>());
  } else {
    qdequant_kernel<c10::BFloat16>
        <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(w, out.mutable_data_ptr<c10::BFloat16>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace course
