// Argument checks shared by the CPU and CUDA implementations of every op.
//
// They check what can be checked without reading tensor contents on the device (dtype, device,
// shape, contiguity, depth); every failure is a c10::Error whose message names the argument, and
// reaches Python as a RuntimeError.
#pragma once

#include <ATen/core/Tensor.h>

namespace tritllm {

// packed: uint8 [N, G*B(depth)], contiguous; codebook: float32 [1..27], contiguous, same device;
// depth in 1..4; in_features >= 1.
void check_weight_args(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                       int64_t in_features);

// x: float32/float16/bfloat16 [..., in_features] on packed's device.
void check_activation(const at::Tensor& x, const at::Tensor& packed, int64_t in_features);

// The weight lists of matmul_cat: as many codebooks as packed weights, at least one.
void check_weight_lists(at::TensorList packed, at::TensorList codebook);

// dtype of a dense output: float32, float16 or bfloat16.
void check_output_dtype(c10::ScalarType dtype);

}  // namespace tritllm
