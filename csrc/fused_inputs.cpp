// Argument checks and the composite implementations of add_rms_norm_matmul_cat and
// silu_mul_matmul (fused_inputs.h). On CUDA the product kernels compute the input themselves
// (csrc/cuda/fused_inputs.cuh), where csrc/cuda/register.cu chooses them.
#include "fused_inputs.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "op_handles.h"

namespace tritllm {
namespace {

bool is_float_dtype(c10::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

}  // namespace

void check_add_rms_norm_args(const at::Tensor& h, const at::Tensor& delta,
                             const at::Tensor& norm_weight, double eps, int64_t in_features) {
  const auto dtype = h.scalar_type();
  TORCH_CHECK(is_float_dtype(dtype),
              "tritllm: add_rms_norm_matmul_cat: h must be float32, float16 or bfloat16, got ",
              dtype);
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) == in_features,
              "tritllm: add_rms_norm_matmul_cat: h must have shape [..., ", in_features,
              "], got ", h.sizes());
  TORCH_CHECK(delta.sizes() == h.sizes(), "tritllm: add_rms_norm_matmul_cat: delta must have h's "
              "shape ", h.sizes(), ", got ", delta.sizes());
  // RMSNorm multiplies in its weight's dtype; one dtype for all keeps that the activations'.
  const std::pair<const at::Tensor*, const char*> others[] = {{&delta, "delta"},
                                                             {&norm_weight, "norm_weight"}};
  for (const auto& [t, name] : others) {
    TORCH_CHECK(t->scalar_type() == dtype, "tritllm: add_rms_norm_matmul_cat: ", name,
                " must have h's dtype ", dtype, ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == h.device(), "tritllm: add_rms_norm_matmul_cat: ", name,
                " is on ", t->device(), " but h is on ", h.device());
  }
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == in_features,
              "tritllm: add_rms_norm_matmul_cat: norm_weight must have shape [", in_features,
              "], got ", norm_weight.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0,
              "tritllm: add_rms_norm_matmul_cat: eps must be finite and >= 0, got ", eps);
}

void check_silu_mul_args(const at::Tensor& gate_up, int64_t in_features) {
  TORCH_CHECK(is_float_dtype(gate_up.scalar_type()),
              "tritllm: silu_mul_matmul: gate_up must be float32, float16 or bfloat16, got ",
              gate_up.scalar_type());
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) == 2 * in_features,
              "tritllm: silu_mul_matmul: gate_up must have shape [..., 2 * in_features = ",
              2 * in_features, "] (gate, then up), got ", gate_up.sizes());
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_matmul_cat_composite(
    const at::Tensor& h, const at::Tensor& delta, const at::Tensor& norm_weight, double eps,
    at::TensorList packed, at::TensorList codebook, int64_t depth, int64_t in_features) {
  check_add_rms_norm_args(h, delta, norm_weight, eps, in_features);
  const at::Tensor h_new = (h + delta).contiguous();
  // LlamaRMSNorm.forward, step by step.
  const at::Tensor h32 = h_new.to(at::kFloat);
  const at::Tensor variance = h32.pow(2).mean(-1, /*keepdim=*/true);
  const at::Tensor x = norm_weight * (h32 * at::rsqrt(variance + eps)).to(h.scalar_type());
  return {matmul_cat_op().call(x, packed, codebook, depth, in_features), h_new};
}

at::Tensor silu_mul_matmul_composite(const at::Tensor& gate_up, const at::Tensor& packed,
                                     const at::Tensor& codebook, int64_t depth,
                                     int64_t in_features) {
  check_silu_mul_args(gate_up, in_features);
  const at::Tensor x =
      at::silu(gate_up.narrow(-1, 0, in_features)) * gate_up.narrow(-1, in_features, in_features);
  return matmul_op().call(x, packed, codebook, depth, in_features);
}

// Devices with a kernel of their own (CUDA) register it for their key, which takes precedence.
TORCH_LIBRARY_IMPL(tritllm, CompositeExplicitAutograd, m) {
  m.impl("add_rms_norm_matmul_cat", add_rms_norm_matmul_cat_composite);
  m.impl("silu_mul_matmul", silu_mul_matmul_composite);
}

}  // namespace tritllm
