// The second kernel of a split-K product: out[i] = sum over splits s of partial[s][i], added in
// split order (deterministic, so CUDA-graph replays equal eager calls bit for bit) and rounded
// once to the output type. Used by lut_gemv.cu, tile_gemm.cu and xtable_gemv.cu.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "device_common.cuh"

namespace tritllm {
namespace cuda {

template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ out,
                                  int splits, int64_t count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += partial[s * count + i];
  out[i] = from_float<T>(sum);
}

// The float32 partial products of a product split `splits` ways along K, [splits, out.numel()],
// or an undefined tensor for one split (the product kernel then writes `out` itself).
inline at::Tensor split_partials(int64_t splits, const at::Tensor& out) {
  if (splits <= 1) return at::Tensor();
  return at::empty({splits, out.numel()}, out.options().dtype(at::kFloat));
}

// out = the sum of `partials` in split order (nothing for an undefined tensor), on `stream`.
template <typename T>
void add_split_partials(const at::Tensor& partials, const at::Tensor& out, cudaStream_t stream) {
  if (!partials.defined()) return;
  const int64_t count = out.numel();
  sum_splits_kernel<T><<<(count + 255) / 256, 256, 0, stream>>>(
      partials.data_ptr<float>(), static_cast<T*>(out.data_ptr()), int(partials.size(0)), count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace tritllm
