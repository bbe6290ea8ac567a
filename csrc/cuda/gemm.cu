// The product for many tokens: unpack W chunk by chunk into one reused dense buffer and hand each
// chunk to cuBLAS (at::mm_out) on the current stream.
//
// For large M the product is bound by arithmetic, which cuBLAS does best. The chunk is sized to
// stay in L2 (a third of it), so cuBLAS reads the dense weights from L2 rather than from device
// memory, and device memory carries only the packed bytes.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include "launchers.h"

namespace tritllm {
namespace cuda {

namespace {
constexpr int64_t kMinChunkBytes = int64_t(4) << 20;
constexpr int64_t kRowMultiple = 128;  // cuBLAS tile height: no ragged tile except the last
}  // namespace

void unpack_gemm_into(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                      int64_t depth, const at::Tensor& out) {
  const int64_t rows = packed.size(0), in_features = x.size(1);
  if (rows == 0 || x.size(0) == 0) return;
  const int64_t l2_bytes = at::cuda::getCurrentDeviceProperties()->l2CacheSize;
  const int64_t budget = std::max(l2_bytes / 3, kMinChunkBytes);
  int64_t chunk = budget / (in_features * x.element_size()) / kRowMultiple * kRowMultiple;
  chunk = std::min(std::max(chunk, kRowMultiple), rows);

  at::Tensor dense = at::empty({chunk, in_features}, x.options());
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t n = std::min(chunk, rows - first);
    at::Tensor w = dense.narrow(0, 0, n);
    unpack_into(packed.narrow(0, first, n), codebook, depth, in_features, w);
    at::Tensor dst = out.narrow(1, first, n);
    at::mm_out(dst, x, w.t());
  }
}

}  // namespace cuda
}  // namespace tritllm
