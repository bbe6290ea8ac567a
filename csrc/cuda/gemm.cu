// The product for many tokens: unpack W into a dense buffer of x's type, then one cuBLAS product
// (at::mm_out) on the current stream.
//
// For large M the product is bound by arithmetic, which cuBLAS does best. Unpacking into chunks
// small enough to stay in L2 was measured first and lost: the many narrow products it needs ran
// well below one full-width product (docs/KERNEL_NOTES.md), so the whole of W is unpacked once.
// The dense buffer is transient (N x K elements, from the caching allocator).
#include <ATen/ATen.h>

#include "launchers.h"

namespace tritllm {
namespace cuda {

void unpack_gemm_into(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                      int64_t depth, const at::Tensor& out) {
  if (packed.size(0) == 0 || x.size(0) == 0) return;
  at::Tensor dense = at::empty({packed.size(0), x.size(1)}, x.options());
  unpack_into(packed, codebook, depth, x.size(1), dense);
  at::Tensor result = out;
  at::mm_out(result, x, dense.t());
}

}  // namespace cuda
}  // namespace tritllm
