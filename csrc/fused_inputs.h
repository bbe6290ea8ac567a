// Products whose input is computed from other tensors: the element-wise steps of a Llama-family
// decoder layer that sit between its products, fused into them.
//
//   add_rms_norm_matmul_cat(h, delta, norm_weight, eps, packed[], codebook[], depth, K)
//       h, delta [..., K] (one float dtype), norm_weight [K] (the same dtype)
//       h_new = h + delta                                    rounded to the dtype
//       x     = norm_weight * (h_new * rsqrt(mean(h_new^2) + eps))
//               the mean and rsqrt in float32, the normalized value rounded to the dtype, then
//               the product rounded: transformers' LlamaRMSNorm (also Mistral's, Qwen2's, Qwen3's)
//       -> (matmul_cat(x, packed, codebook), h_new)               h_new contiguous
//     The residual stream of a decode step: the o projection's output is added to the layer's
//     input and normed for gate and up; the down projection's output is added and normed for the
//     next layer's q, k and v.
//
//   silu_mul_matmul(gate_up, packed, codebook, depth, K)
//       gate_up [..., 2K]: gate in the first K columns, up in the next K (matmul_cat's output)
//       x = silu(gate) * up                                  silu rounded to the dtype, then the
//                                                            product rounded, as torch's
//                                                            F.silu(gate) * up
//       -> matmul(x, packed, codebook)
//     The down projection of a gated MLP.
//
// The composite implementations below run the steps as ATen operations and then the product op,
// so on any device they give the separate steps' numbers bit for bit. The CUDA product kernels
// compute x as they read it instead (csrc/cuda/fused_inputs.cuh: the x-table kernel's prologue at
// one token, tile_gemm's slot-order pass from two): h_new and silu's x bit for bit, RMSNorm's sum
// of squares in their own order (so x may differ from the composite's by a rounding of the dtype
// where mean(h_new^2) does in its last bit).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace tritllm {

// The checks that need no tensor contents; every failure names the argument. The product's own
// arguments (packed, codebook, depth) are checked by the product op.
void check_add_rms_norm_args(const at::Tensor& h, const at::Tensor& delta,
                             const at::Tensor& norm_weight, double eps, int64_t in_features);
void check_silu_mul_args(const at::Tensor& gate_up, int64_t in_features);

std::tuple<at::Tensor, at::Tensor> add_rms_norm_matmul_cat_composite(
    const at::Tensor& h, const at::Tensor& delta, const at::Tensor& norm_weight, double eps,
    at::TensorList packed, at::TensorList codebook, int64_t depth, int64_t in_features);

at::Tensor silu_mul_matmul_composite(const at::Tensor& gate_up, const at::Tensor& packed,
                                     const at::Tensor& codebook, int64_t depth,
                                     int64_t in_features);

}  // namespace tritllm
