// The second kernel of a split-K product: out[i] = sum over splits s of partial[s][i], added in
// split order (deterministic, so CUDA-graph replays equal eager calls bit for bit) and rounded
// once to the output type. Used by lut_gemv.cu, tile_gemm.cu and xtable_gemv.cu (the last two
// launch it early: dependent_launch.cuh).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "dependent_launch.cuh"
#include "device_common.cuh"

namespace tritllm {
namespace cuda {

template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ out,
                                  int splits, int64_t count, int64_t rows, int64_t out_stride) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  wait_for_previous_kernel();  // the partials are complete
  let_next_kernel_start();
  if (i >= count) return;
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += partial[s * count + i];
  const int64_t token = i / rows;
  out[token * out_stride + (i - token * rows)] = from_float<T>(sum);
}

// The float32 partial products of a product split `splits` ways along K, [splits, out.numel()],
// or an undefined tensor for one split (the product kernel then writes `out` itself).
inline at::Tensor split_partials(int64_t splits, const at::Tensor& out) {
  if (splits <= 1) return at::Tensor();
  return at::empty({splits, out.numel()}, out.options().dtype(at::kFloat));
}

// out = the sum of `partials` in split order (nothing for an undefined tensor), on `stream`.
// out is [M, N] with unit column stride; it may be a column slice of a wider matrix (matmul_cat
// writes each weight's product into its own columns of one output). `early`: launched before the
// product kernel ends (dependent_launch.cuh), for product kernels built for sm_90+ only.
template <typename T>
void add_split_partials(const at::Tensor& partials, const at::Tensor& out, cudaStream_t stream,
                        bool early = false) {
  if (!partials.defined()) return;
  const int64_t count = out.numel();
  if (count == 0) return;
  const int64_t rows = out.size(-1);
  const int64_t out_stride = out.dim() == 2 ? out.stride(0) : rows;
  const LaunchConfig config(dim3(unsigned((count + 255) / 256)), dim3(256), 0, stream, early);
  C10_CUDA_CHECK(cudaLaunchKernelEx(config.get(), sum_splits_kernel<T>,
                                    partials.data_ptr<float>(), static_cast<T*>(out.data_ptr()),
                                    int(partials.size(0)), count, rows, out_stride));
}

}  // namespace cuda
}  // namespace tritllm
