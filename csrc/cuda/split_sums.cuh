// Adding the partial products of a split-K product: out[i] = sum over splits s of partial[s][i],
// added in split order (deterministic, so CUDA-graph replays equal eager calls bit for bit) and
// rounded once to the output type. Used by lut_gemv.cu, tile_gemm.cu and xtable_gemv.cu.
//
// Two ways, with the same arithmetic:
//  * in the product kernel itself: the work unit (warp or block) that writes the last split of
//    an output tile adds all of them. Units count their arrivals per tile in a buffer of
//    counters that the last one resets to zero, so the buffer stays zero between calls and no
//    launch is needed to clear it. This saves the second kernel of every product (a few
//    microseconds each, ~7 per decoder layer and token). The counters belong to one CUDA
//    stream: products on one stream run one after another, products on different streams get
//    different counters.
//  * a second kernel (sum_splits_kernel), when no counters are available: during a CUDA graph
//    capture on a stream that has not yet run a product needing that many counters (allocating
//    them would break the capture).
#pragma once

#include <cuda_runtime.h>

#include "device_common.cuh"

namespace tritllm {
namespace cuda {

// At least `count` zeroed arrival counters for products on the current stream of the current
// device, or nullptr if they cannot be had now (see above). Never freed: a captured graph may hold
// their address.                                                              split_sums.cu
unsigned* arrival_counters(int64_t count);

template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ out,
                                  int splits, int64_t count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += partial[s * count + i];
  out[i] = from_float<T>(sum);
}

// Called by one thread after the partial products of its unit are written and fenced
// (__threadfence by every writer, then a barrier of the unit): counts this unit's arrival at
// `counter` and returns true for the last of `arrivals` units, after resetting the counter and
// fencing so that the other units' partials can be read (with __ldcg: not through L1).
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned arrivals) {
  const unsigned before = atomicAdd(counter, 1u);
  if (before != arrivals - 1) return false;
  *counter = 0u;  // this was the last arrival: ready for the next product on the stream
  __threadfence();
  return true;
}

// out = sum over splits of partial[s * count + i], in split order, for the last arriving unit.
template <typename T>
__device__ __forceinline__ void sum_splits_at(const float* partial, T* out, int splits,
                                              int64_t count, int64_t i) {
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += __ldcg(partial + s * count + i);
  out[i] = from_float<T>(sum);
}

}  // namespace cuda
}  // namespace tritllm
