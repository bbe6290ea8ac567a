// The packed trit format, version 1 (docs/FORMAT.md; Python reference: tritllm_ext/format.py).
//
// Shared by the CPU and CUDA kernels, so everything here is constexpr or host+device inline.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TRITLLM_HD __host__ __device__ __forceinline__
#else
#define TRITLLM_HD inline
#endif

namespace tritllm {

constexpr int kFormatVersion = 1;
constexpr int kGroupSize = 16;      // weights per scale group
constexpr int kMaxCodebook = 27;    // 3 index trits
constexpr int kTritsPerByte = 5;    // 3^5 = 243 <= 256

// Bytes of one group: d planes of 3 bytes (weights 0..14), then the tail bytes holding
// idx0, idx1, idx2, plane0[15], ..., plane{d-1}[15], five digits per byte. 4, 7, 11, 14 for d=1..4.
TRITLLM_HD constexpr int bytes_per_group(int depth) { return 3 * depth + (depth + 3 + 4) / 5; }

// Levels run from -L to L, L = (3^d - 1) / 2: 1, 4, 13, 40.
TRITLLM_HD constexpr int max_level(int depth) {
  return depth == 1 ? 1 : depth == 2 ? 4 : depth == 3 ? 13 : 40;
}

TRITLLM_HD constexpr int64_t num_groups(int64_t in_features) {
  return (in_features + kGroupSize - 1) / kGroupSize;
}

// Digit i (0..4) of a base-3 byte v < 243, with no division:
//   digit = ((v * M_i) mod 2^16) * 3 >> 16,   M_i = ceil(2^16 / 3^(i+1)).
// (v * M_i mod 2^16) / 2^16 is frac(v / 3^(i+1)) plus an error below 242/2^16, smaller than the
// 1/243 gap between the fractions a byte can have, so 3 * frac rounds down to the digit. Exhaustively checked in tests/test_format.py. A corrupt byte (>= 243) still yields a
// digit in {0, 1, 2}.
TRITLLM_HD constexpr uint32_t digit_magic(int i) {
  uint32_t p = 3;
  for (int j = 0; j < i; ++j) p *= 3;
  return (65536u + p - 1) / p;  // 21846, 7282, 2428, 810, 270
}

TRITLLM_HD constexpr uint32_t trit_digit(uint32_t v, int i) {
  return (((v * digit_magic(i)) & 0xFFFFu) * 3u) >> 16;
}

// The scale index of a group is its first tail byte mod 27.
TRITLLM_HD constexpr uint32_t group_scale_index(uint32_t tail0) { return tail0 % 27u; }

}  // namespace tritllm
