// CUDA implementations of the tritllm ops (schemas: csrc/ops.cpp) and the choice of kernel.
//
// matmul picks one of four paths (docs/PERF.md, "GPU", has the measurements behind it):
//   * xtable_gemv depth 1-2, one token, whole 512-weight windows (G % 32 == 0): lookup tables
//                 of activation sums, the fastest per weight (docs/KERNEL_NOTES.md);
//   * lut_gemv    depth 1-2, float16/bfloat16 x, whole 256-weight runs (G % 16 == 0), and at
//                 most kLutFusedMaxTokens tokens (run in slices of 16): reads the packed bytes
//                 once per slice, so its time grows with ceil(M / 16);
//   * generic     any other call with M <= 16: fused, never materializes W, slow per weight;
//   * unpack+gemm everything else: W unpacked into a transient dense buffer, then cuBLAS.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "launchers.h"

namespace tritllm {
namespace cuda {
namespace {

// Above this many tokens the chunked cuBLAS product beats re-reading the packed bytes.
constexpr int64_t kLutFusedMaxTokens = 48;

at::Tensor unpack_cuda(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                       int64_t in_features, c10::ScalarType dtype) {
  check_weight_args(packed, codebook, depth, in_features);
  check_output_dtype(dtype);
  c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({packed.size(0), in_features}, packed.options().dtype(dtype));
  unpack_into(packed, codebook, depth, in_features, out);
  return out;
}

// out [M, N] from slices of at most `slice` tokens.
template <typename Product>
void by_token_slices(const at::Tensor& x, const at::Tensor& out, int64_t slice, Product product) {
  for (int64_t first = 0; first < x.size(0); first += slice) {
    const int64_t n = std::min(slice, x.size(0) - first);
    product(x.narrow(0, first, n), out.narrow(0, first, n));
  }
}

at::Tensor matmul_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                       int64_t depth, int64_t in_features) {
  check_weight_args(packed, codebook, depth, in_features);
  check_activation(x, packed, in_features);
  c10::cuda::CUDAGuard guard(packed.device());

  const int64_t rows = packed.size(0);
  const at::Tensor x2 = x.reshape({-1, in_features}).contiguous();
  const int64_t tokens = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = rows;
  at::Tensor out = at::empty({tokens, rows}, x.options());
  if (tokens == 0 || rows == 0) return out.view(out_shape);

  if (tokens == 1 && xtable_gemv_supports(x2, packed, depth)) {
    xtable_gemv_into(x2, packed, codebook, depth, out);
  } else if (tokens <= kLutFusedMaxTokens && lut_gemv_supports(x2, packed, depth)) {
    by_token_slices(x2, out, kLutMaxTokens, [&](const at::Tensor& xs, const at::Tensor& os) {
      lut_gemv_into(xs, packed, codebook, depth, os);
    });
  } else if (tokens <= kGenericMaxTokens) {
    generic_gemv_into(x2, packed, codebook, depth, out);
  } else {
    unpack_gemm_into(x2, packed, codebook, depth, out);
  }
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tritllm, CUDA, m) {
  m.impl("unpack", unpack_cuda);
  m.impl("matmul", matmul_cuda);
}

}  // namespace cuda
}  // namespace tritllm
