#include "checks.h"

#include <c10/util/Exception.h>

#include "format.h"

namespace tritllm {

void check_weight_args(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                       int64_t in_features) {
  TORCH_CHECK(depth >= 1 && depth <= 4, "tritllm: depth must be 1, 2, 3 or 4, got ", depth);
  TORCH_CHECK(in_features >= 1, "tritllm: in_features must be >= 1, got ", in_features);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "tritllm: packed must be uint8, got ",
              packed.scalar_type());
  const int64_t row = num_groups(in_features) * bytes_per_group(static_cast<int>(depth));
  TORCH_CHECK(packed.dim() == 2 && packed.size(1) == row, "tritllm: packed must have shape [N, ",
              row, "] for in_features=", in_features, " at depth ", depth, ", got ",
              packed.sizes());
  TORCH_CHECK(packed.is_contiguous(), "tritllm: packed must be contiguous");
  TORCH_CHECK(codebook.scalar_type() == at::kFloat, "tritllm: codebook must be float32, got ",
              codebook.scalar_type());
  TORCH_CHECK(codebook.dim() == 1 && codebook.size(0) >= 1 && codebook.size(0) <= kMaxCodebook,
              "tritllm: codebook must be 1-D with 1 to 27 entries, got shape ", codebook.sizes());
  TORCH_CHECK(codebook.is_contiguous(), "tritllm: codebook must be contiguous");
  TORCH_CHECK(codebook.device() == packed.device(), "tritllm: codebook is on ", codebook.device(),
              " but packed is on ", packed.device());
}

void check_weight_lists(at::TensorList packed, at::TensorList codebook) {
  TORCH_CHECK(!packed.empty(), "tritllm: matmul_cat needs at least one weight, got none");
  TORCH_CHECK(codebook.size() == packed.size(), "tritllm: matmul_cat needs one codebook per "
              "packed weight, got ", packed.size(), " packed and ", codebook.size(), " codebooks");
}

void check_output_dtype(c10::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "tritllm: dtype must be float32, float16 or bfloat16, got ", dtype);
}

void check_activation(const at::Tensor& x, const at::Tensor& packed, int64_t in_features) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "tritllm: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "tritllm: x must have shape [..., ",
              in_features, "], got ", x.sizes());
  TORCH_CHECK(x.device() == packed.device(), "tritllm: x is on ", x.device(),
              " but the weight is on ", packed.device());
}

}  // namespace tritllm
