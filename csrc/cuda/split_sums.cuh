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

// How many partials a thread loads before its first add: all of them up to 32 splits (the
// x-table down projection of an 8B model has 28), so that the sum waits for one memory latency.
// A plain loop let the compiler issue 16 loads, add them, and only then issue the rest.
constexpr int kSplitsInFlight = 32;

// Block (x, y) adds columns [256 x, 256 x + 256) of row y of out: a 2-D grid, so that no thread
// divides its index by the row length (a 64-bit division is a subroutine call on the GPU).
template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ out,
                                  int splits, int64_t count, int rows, int64_t out_stride) {
  const int column = blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t i = int64_t(blockIdx.y) * rows + column;
  wait_for_previous_kernel();  // the partials are complete
  let_next_kernel_start();
  if (column >= rows) return;
  float sum = 0.f;
  for (int first = 0; first < splits; first += kSplitsInFlight) {
    float part[kSplitsInFlight];
    const float* next = partial + first * count + i;  // walked by one add per split
#pragma unroll
    for (int s = 0; s < kSplitsInFlight; ++s, next += count)
      if (first + s < splits) part[s] = *next;
#pragma unroll
    for (int s = 0; s < kSplitsInFlight; ++s)
      if (first + s < splits) sum += part[s];  // in split order, as a plain loop adds them
  }
  out[int64_t(blockIdx.y) * out_stride + column] = from_float<T>(sum);
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
  const int64_t rows = out.size(-1), tokens = count / rows;
  const int64_t out_stride = out.dim() == 2 ? out.stride(0) : rows;
  TORCH_CHECK(rows < (int64_t(1) << 31) && tokens <= 65535,
              "tritllm: internal error: split sums of ", tokens, " x ", rows, " outputs");
  const LaunchConfig config(dim3(unsigned((rows + 255) / 256), unsigned(tokens)), dim3(256), 0,
                            stream, early);
  C10_CUDA_CHECK(cudaLaunchKernelEx(config.get(), sum_splits_kernel<T>,
                                    partials.data_ptr<float>(), static_cast<T*>(out.data_ptr()),
                                    int(partials.size(0)), count, int(rows), out_stride));
}

}  // namespace cuda
}  // namespace tritllm
