// The second kernel of a split-K product: out[i] = sum over splits s of partial[s][i], added in
// split order (deterministic, so CUDA-graph replays equal eager calls bit for bit) and rounded
// once to the output type. Used by lut_gemv.cu and xtable_gemv.cu.
#pragma once

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

}  // namespace cuda
}  // namespace tritllm
