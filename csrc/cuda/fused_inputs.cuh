// Device side of the fused inputs (ProductInput in launchers.h; the math and its roundings are
// stated in csrc/fused_inputs.h): the element-wise steps a product kernel runs as it reads its
// activations, written once for the kernels that take them (xtable_gemv.cu at one token,
// tile_gemm.cu's slot-order pass at 2 to a few hundred).
#pragma once

#include <cstdint>

#include "device_common.cuh"
#include "launchers.h"

namespace tritllm {
namespace cuda {

// A ProductInput as a kernel parameter: its kind and its tensors' data (the others null for
// kPlain and kSiluMul).
struct InputPointers {
  ProductInput::Kind kind;
  const void* x;            // x; h for kAddRmsNorm; gate_up for kSiluMul
  const void* delta;        // kAddRmsNorm
  const void* norm_weight;  // kAddRmsNorm
  void* h_out;              // kAddRmsNorm: h + delta, written
  float eps;                // kAddRmsNorm
};

inline InputPointers input_pointers(const ProductInput& input) {
  InputPointers p{input.kind, input.x.data_ptr(), nullptr, nullptr, nullptr, 0.f};
  if (input.kind == ProductInput::Kind::kAddRmsNorm) {
    p.delta = input.delta.data_ptr();
    p.norm_weight = input.norm_weight.data_ptr();
    p.h_out = input.h_out.data_ptr();
    p.eps = float(input.eps);
  }
  return p;
}

// v rounded to the activation type T, as float.
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return to_float(from_float<T>(v));
}

// RMSNorm's output from h + delta (already rounded), the norm's weight and the row's factor
// rsqrt(mean((h + delta)^2) + eps): the normed value rounded, then the weight product rounded, as
// LlamaRMSNorm rounds them.
template <typename T>
__device__ __forceinline__ float rms_normed(float h_new, float weight, float rms_factor) {
  return rounded<T>(weight * rounded<T>(h_new * rms_factor));
}

// silu(gate) * up with torch's float32 silu, x / (1 + exp(-x)), rounded, then the product rounded.
template <typename T>
__device__ __forceinline__ float silu_mul(float gate, float up) {
  return rounded<T>(rounded<T>(gate / (1.f + expf(-gate))) * up);
}

// One row's RMSNorm factor, rsqrt(mean((h + delta)^2) + eps) over its K values, computed by the
// whole block (kWarps warps; every thread must call it): each thread adds the squares of the
// 16-byte vectors threadIdx.x, + blockDim.x, ... in order, then the warps' sums are added in warp
// order, so every block that calls it on the same row gets the same factor. The block also writes
// h + delta (rounded to T) for the vectors [share_first, share_last) to h_out. h, delta and h_out
// are 16-byte aligned and K * sizeof(T) is a multiple of 16 (product_input_supported).
template <typename T, int kWarps>
__device__ float add_and_rms_factor(const T* __restrict__ h, const T* __restrict__ delta,
                                    T* __restrict__ h_out, int64_t in_features, float eps,
                                    int share_first, int share_last,
                                    float (&warp_sums)[kWarps]) {
  constexpr int kVector = 16 / sizeof(T);
  const int64_t vectors = in_features / kVector;
  float sum = 0.f;
#pragma unroll 2
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    const uint4 a = reinterpret_cast<const uint4*>(h)[v];
    const uint4 b = reinterpret_cast<const uint4*>(delta)[v];
    uint4 c;
    const T* av = reinterpret_cast<const T*>(&a);
    const T* bv = reinterpret_cast<const T*>(&b);
    T* cv = reinterpret_cast<T*>(&c);
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      cv[i] = from_float<T>(to_float(av[i]) + to_float(bv[i]));
      const float f = to_float(cv[i]);
      sum = fmaf(f, f, sum);
    }
    if (v >= share_first && v < share_last) reinterpret_cast<uint4*>(h_out)[v] = c;
  }
#pragma unroll
  for (int step = 16; step >= 1; step /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, step);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  return rsqrtf(total / float(in_features) + eps);
}

}  // namespace cuda
}  // namespace tritllm
