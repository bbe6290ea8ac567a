// Device helpers shared by the CUDA kernels: activation-type traits and the generic decoder of
// one packed group (docs/FORMAT.md), written once on top of csrc/format.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../format.h"

namespace tritllm {
namespace cuda {

// Conversions between float and an activation type T (float, __half, __nv_bfloat16).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The 16-bit types as raw bits, and two of them packed in a 32-bit register (low half first),
// which is how the tensor-core instructions and the paired arithmetic take them.
__device__ __forceinline__ uint32_t bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return bits16(from_float<T>(lo)) | (bits16(from_float<T>(hi)) << 16);
}

// 3^p for p = 0..4.
__host__ __device__ constexpr int pow3(int p) { return p == 0 ? 1 : 3 * pow3(p - 1); }

// Reads the group of `DEPTH` starting at `group` (B(DEPTH) bytes) and returns the 16 integer
// levels in [-L, L] and the scale index (0..26). Any byte decodes to digits in {0, 1, 2}
// (format.h), so corrupt bytes give wrong numbers but never an out-of-range index.
template <int DEPTH>
__device__ __forceinline__ void decode_group(const uint8_t* __restrict__ group, int (&level)[16],
                                             int& scale_index) {
  constexpr int kTail = 3 * DEPTH;
#pragma unroll
  for (int j = 0; j < 16; ++j) level[j] = -max_level(DEPTH);
#pragma unroll
  for (int p = 0; p < DEPTH; ++p) {
#pragma unroll
    for (int b = 0; b < 3; ++b) {
      const uint32_t v = __ldg(group + 3 * p + b);
#pragma unroll
      for (int i = 0; i < 5; ++i) level[5 * b + i] += pow3(p) * int(trit_digit(v, i));
    }
  }
  // Tail digits, five per byte: idx0 idx1 idx2, then weight 15 of planes 0..DEPTH-1.
  const uint32_t tail0 = __ldg(group + kTail);
  scale_index = int(group_scale_index(tail0));
#pragma unroll
  for (int p = 0; p < DEPTH; ++p) {
    const int digit = 3 + p;  // position in the tail sequence
    const uint32_t byte = digit < 5 ? tail0 : uint32_t(__ldg(group + kTail + 1));
    level[15] += pow3(p) * int(trit_digit(byte, digit % 5));
  }
}

}  // namespace cuda
}  // namespace tritllm
