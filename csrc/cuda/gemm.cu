// The product for many tokens: unpack W into a dense buffer of x's type, then one cuBLAS product
// (at::mm_out) on the current stream.
//
// For large M the product is bound by arithmetic, which cuBLAS does best. Unpacking into chunks
// small enough to stay in L2 was measured first and lost: the many narrow products it needs ran
// well below one full-width product (docs/KERNEL_NOTES.md), so the whole of W is unpacked once.
// The dense buffer is transient (N x K elements, from the caching allocator). Several weights
// (matmul_cat) are unpacked one under the other into one buffer, for one wider product.
#include <ATen/ATen.h>

#include "launchers.h"

namespace tritllm {
namespace cuda {

void unpack_gemm_into(const at::Tensor& x, at::TensorList packed, at::TensorList codebooks,
                      int64_t depth, const at::Tensor& out) {
  if (out.size(1) == 0 || x.size(0) == 0) return;
  at::Tensor dense = at::empty({out.size(1), x.size(1)}, x.options());
  int64_t first_row = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    const int64_t rows = packed[i].size(0);
    if (rows > 0)
      unpack_into(packed[i], codebooks[i], depth, x.size(1), dense.narrow(0, first_row, rows));
    first_row += rows;
  }
  at::Tensor result = out;
  at::mm_out(result, x, dense.t());
}

}  // namespace cuda
}  // namespace tritllm
