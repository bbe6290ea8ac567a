// Activations as the AVX2 matmul kernels read them: every group of 16 values of a row of x is
// quantized to integers on its own scale, then transformed to pair with the quotients of
// decode.h. Prepared once per call (prepare_rows), read by every tile of W.
//
// A row x_0..x_15 of a group with s = max|x| / Q (Q = activation_levels(depth)):
//   integer   i_j = round(x_j / s), |i_j| <= Q, so |x_j - s i_j| <= s / 2 (2^-14 max|x| for Q = 8191)
//   x'_j      i_j - 3 i_{j-1} for j % 5 != 0 and j < 15, else i_j  (|x'| <= 4 Q, fits int16)
// A group holding a NaN or an infinity gets s = NaN (and integers 0): the rows of y that use it
// come out NaN. A group whose largest |x| is 0 or below 2^-113 gets s = 0 and integers 0.
//
// Only AVX2 translation units include this header (its inline code is compiled with -mavx2).
#pragma once

#include <cstdint>

#include "../kernels.h"

namespace tritllm::cpu::avx2 {

// The blocked (several rows of x) kernel reads each block of 8 groups transposed; below this many
// rows of x the row-pass kernel, which reads groups in order, is faster (measured: from 2 rows
// on, the blocked kernel wins).
constexpr int64_t kBlockedMinRows = 2;

// Q: the largest |integer|. 4Q must fit int16 (the x' transform), and the blocked kernel sums
// 16 products (Q_j - o_j) x'_j (|Q_j - o_j| <= 121 L, decode.h) in int32 before converting to
// float, which at depth 4 needs a smaller Q: 16 * 121 * 40 * 4 * 6800 < 2^31.
constexpr int activation_levels(int depth) { return depth <= 3 ? 8191 : 6800; }

// Unit order, for the AVX-512 row pass (matmul.cpp): groups are taken in units of 4 L groups
// (L = unit_lane_groups(depth): as many groups as fit one 16-byte load with their byte offset,
// 2 at depths 1 and 2, 1 at depths 3 and 4), one unit per 512-bit register set: 128-bit lane k
// of the set holds groups 4u L + k L + h (h < L), and register r of the set weights
// [r W, r W + W) of each, W = 8 / L, so that every 32-bit lane of the multiply-adds sums
// products of one group only. Weight j of group g is at unit_position(depth, g, j).
constexpr int unit_lane_groups(int depth) { return depth <= 2 ? 2 : 1; }

constexpr int64_t unit_position(int depth, int64_t g, int j) {
  const int lane_groups = unit_lane_groups(depth);
  const int width = 8 / lane_groups;                   // W: weights of a group per register
  const int64_t unit = g / (4 * lane_groups);
  const int k = static_cast<int>(g % (4 * lane_groups)) / lane_groups;
  const int h = static_cast<int>(g % lane_groups);
  const int r = j / width;
  return ((unit * (kGroupSize / width) + r) * 4 + k) * 8 + h * width + j % width;
}

// Where the parts of row m of prepared activations are: row m starts at m * row_bytes, the parts
// at their offsets from there (all 32-byte aligned).
struct PreparedLayout {
  bool blocked;          // integers in blocked (transposed) order, no group scale table
  int64_t groups;        // G
  int64_t padded_groups; // G rounded up to a multiple of 8; the extra groups are zeros
  int64_t step_offset;   // float [padded_groups]: s of each group
  int64_t table_offset;  // float [groups * 27]: codebook[i] * s of group g at 27 g + i (if !blocked)
  // float [padded_groups]: sum_j o_j x'_j of each group, with o the quotient offsets of decode.h
  // (= L sum_j i_j, an integer below 2^23: exact), subtracted once per group by a kernel that
  // decodes Q without them (if !blocked)
  int64_t offset_dot_offset;
  int64_t unit_offset;   // int16 [padded_groups * 16]: the integers in unit order (if !blocked)
  int64_t row_bytes;

  // Integers: natural order puts group g at 16 g; blocked order puts pair j (values 2j, 2j+1)
  // of group 8b + k at 128 b + 16 j + 2 k, so that a 32-byte load gives pair j of 8 groups.
  PreparedLayout(int64_t rows, const PackedWeight& w);

  const int16_t* integers(const void* prepared, int64_t m) const {
    return reinterpret_cast<const int16_t*>(row(prepared, m));
  }
  const float* step(const void* prepared, int64_t m) const {
    return reinterpret_cast<const float*>(row(prepared, m) + step_offset);
  }
  const float* scale_table(const void* prepared, int64_t m) const {
    return reinterpret_cast<const float*>(row(prepared, m) + table_offset);
  }
  const float* offset_dot(const void* prepared, int64_t m) const {
    return reinterpret_cast<const float*>(row(prepared, m) + offset_dot_offset);
  }
  const int16_t* unit_integers(const void* prepared, int64_t m) const {
    return reinterpret_cast<const int16_t*>(row(prepared, m) + unit_offset);
  }

 private:
  const uint8_t* row(const void* prepared, int64_t m) const {
    return static_cast<const uint8_t*>(prepared) + m * row_bytes;
  }
};

}  // namespace tritllm::cpu::avx2
