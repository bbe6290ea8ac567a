// The arrival counters of the in-kernel split sums (split_sums.cuh): one zeroed buffer per
// (device, stream), grown on demand outside CUDA graph captures and never freed.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <map>
#include <mutex>
#include <utility>

#include "split_sums.cuh"

namespace tritllm {
namespace cuda {

unsigned* arrival_counters(int64_t count) {
  struct Counters {
    unsigned* data = nullptr;
    int64_t size = 0;
  };
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, Counters> by_stream;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const int device = at::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  Counters& c = by_stream[{device, stream}];
  if (c.size >= count) return c.data;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return nullptr;
  // Grow: a new zeroed buffer; the old one stays allocated for graphs that captured it.
  const int64_t size = std::max<int64_t>(count, 2 * c.size);
  unsigned* data = nullptr;
  C10_CUDA_CHECK(cudaMalloc(&data, size * sizeof(unsigned)));
  C10_CUDA_CHECK(cudaMemsetAsync(data, 0, size * sizeof(unsigned), stream));
  c.data = data;
  c.size = size;
  return data;
}

}  // namespace cuda
}  // namespace tritllm
