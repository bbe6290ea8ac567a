// Preparation of the activations for the AVX2 matmul kernels (the format is in activations.h).
#if defined(__AVX2__) && defined(__FMA__)

#include "activations.h"

#include <immintrin.h>

#include <cstring>
#include <limits>

#include "decode.h"
#include "kernels_avx2.h"

namespace tritllm::cpu::avx2 {
namespace {

int64_t align32(int64_t bytes) { return (bytes + 31) / 32 * 32; }

int32_t horizontal_sum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// 16 values of x with the value before them: v[0] = x_{-1}, v[1..16] = x_0..x_15.
struct GroupValues {
  alignas(32) float v[17];
};

// Group g of a row of k_size values, zero-padded, with its predecessor (0 for the first group).
const float* group_with_predecessor(const float* x, int64_t k_size, int64_t g, GroupValues& copy) {
  const int64_t k0 = g * kGroupSize;
  if (g > 0 && k0 + kGroupSize <= k_size) return x + k0;  // in place: x[k0 - 1] exists
  std::memset(copy.v, 0, sizeof(copy.v));
  // (no std::min/max here: their out-of-line copies would be compiled with -mavx2, see decode.h)
  const int64_t begin = k0 > 0 ? k0 - 1 : 0;
  const int64_t end = k0 + kGroupSize < k_size ? k0 + kGroupSize : k_size;
  for (int64_t k = begin; k < end; ++k) {
    copy.v[1 + k - k0] = x[k];
  }
  return copy.v + 1;
}

// The transformed integers (x') of one group as 16 int16 lanes in order; writes s.
__m256i quantize_group(const float* values, float levels, float* step) {
  const __m256 lo = _mm256_loadu_ps(values), hi = _mm256_loadu_ps(values + 8);
  // x * 0 is NaN exactly where x is NaN or infinite
  const __m256 zero = _mm256_setzero_ps();
  const __m256 probe = _mm256_add_ps(_mm256_mul_ps(lo, zero), _mm256_mul_ps(hi, zero));
  if (_mm256_movemask_ps(_mm256_cmp_ps(probe, probe, _CMP_UNORD_Q)) != 0) {
    *step = std::numeric_limits<float>::quiet_NaN();
    return _mm256_setzero_si256();
  }
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 absmax = _mm256_max_ps(_mm256_andnot_ps(sign, lo), _mm256_andnot_ps(sign, hi));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(absmax), _mm256_extractf128_ps(absmax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float largest = _mm_cvtss_f32(m);
  const float scale = levels / largest;
  // all zero, or so tiny (largest < 2^-113) that the scale overflows: the group counts as zero
  // (an error below 2^-113 per activation)
  if (!(scale <= std::numeric_limits<float>::max())) {
    *step = 0.0f;
    return _mm256_setzero_si256();
  }
  *step = largest / levels;
  const __m256 inverse = _mm256_set1_ps(scale);
  // round to nearest (the MXCSR default); the same rounding of x_{j-1} gives i_{j-1}
  const __m256i i_lo = _mm256_cvtps_epi32(_mm256_mul_ps(lo, inverse));
  const __m256i i_hi = _mm256_cvtps_epi32(_mm256_mul_ps(hi, inverse));
  const __m256i prev_lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(values - 1), inverse));
  const __m256i prev_hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(values + 7), inverse));
  // 3 where x'_j = i_j - 3 i_{j-1} (j % 5 != 0, j < 15), else 0
  const __m256i mult_lo = _mm256_setr_epi32(0, 3, 3, 3, 3, 0, 3, 3);
  const __m256i mult_hi = _mm256_setr_epi32(3, 3, 0, 3, 3, 3, 3, 0);
  const __m256i t_lo = _mm256_sub_epi32(i_lo, _mm256_mullo_epi32(prev_lo, mult_lo));
  const __m256i t_hi = _mm256_sub_epi32(i_hi, _mm256_mullo_epi32(prev_hi, mult_hi));
  // packs interleaves 128-bit halves: [lo 0-3, hi 0-3, lo 4-7, hi 4-7] -> reorder the quarters
  return _mm256_permute4x64_epi64(_mm256_packs_epi32(t_lo, t_hi), 0xD8);
}

void prepare_row(const float* x, int64_t k_size, const PackedWeight& w,
                 const PreparedLayout& layout, uint8_t* row) {
  int16_t* integers = reinterpret_cast<int16_t*>(row);
  float* step = reinterpret_cast<float*>(row + layout.step_offset);
  float* table = reinterpret_cast<float*>(row + layout.table_offset);
  float* offset_dot = reinterpret_cast<float*>(row + layout.offset_dot_offset);
  int16_t* unit_integers = reinterpret_cast<int16_t*>(row + layout.unit_offset);
  const __m256i offsets = quotient_offsets(w.depth);
  float codebook[kMaxCodebook];  // zero-padded to 27 entries
  for (int i = 0; i < kMaxCodebook; ++i) codebook[i] = i < w.codebook_size ? w.codebook[i] : 0.0f;
  const float levels = static_cast<float>(activation_levels(w.depth));
  __m256i block[8];
  GroupValues copy;
  for (int64_t g = 0; g < layout.padded_groups; ++g) {
    __m256i q = _mm256_setzero_si256();
    step[g] = 0.0f;
    if (g < layout.groups) q = quantize_group(group_with_predecessor(x, k_size, g, copy), levels, &step[g]);
    if (!layout.blocked) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(integers + 16 * g), q);
      offset_dot[g] = static_cast<float>(horizontal_sum_epi32(_mm256_madd_epi16(q, offsets)));
      // unit order keeps runs of W weights together, 32 integers apart
      int16_t* unit_group = unit_integers + unit_position(w.depth, g, 0);
      if (unit_lane_groups(w.depth) == 2) {
        for (int r = 0; r < 4; ++r) std::memcpy(unit_group + 32 * r, integers + 16 * g + 4 * r, 8);
      } else {
        for (int r = 0; r < 2; ++r) std::memcpy(unit_group + 32 * r, integers + 16 * g + 8 * r, 16);
      }
      if (g < layout.groups) {
        for (int i = 0; i < kMaxCodebook; ++i) {
          table[kMaxCodebook * g + i] = codebook[i] * step[g];
        }
      }
      continue;
    }
    block[g % 8] = q;
    if (g % 8 == 7) {
      transpose8x32(block);
      for (int j = 0; j < 8; ++j) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(integers + 128 * (g / 8) + 16 * j), block[j]);
      }
    }
  }
}

}  // namespace

PreparedLayout::PreparedLayout(int64_t rows, const PackedWeight& w)
    : blocked(rows >= kBlockedMinRows),
      groups(w.groups()),
      padded_groups((w.groups() + 7) / 8 * 8) {
  step_offset = align32(padded_groups * kGroupSize * 2);
  table_offset = step_offset + align32(padded_groups * 4);
  offset_dot_offset = table_offset + (blocked ? 0 : align32(groups * kMaxCodebook * 4));
  unit_offset = offset_dot_offset + (blocked ? 0 : align32(padded_groups * 4));
  row_bytes = unit_offset + (blocked ? 0 : padded_groups * kGroupSize * 2);
  row_bytes = (row_bytes + 63) / 64 * 64;
}

int64_t prepared_bytes(int64_t rows, const PackedWeight& w) {
  return rows * PreparedLayout(rows, w).row_bytes;
}

void prepare_rows(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1) {
  const PreparedLayout layout(a.rows, w);
  for (int64_t m = m0; m < m1; ++m) {
    prepare_row(a.x + m * a.in_features, a.in_features, w, layout,
                static_cast<uint8_t*>(a.prepared) + m * layout.row_bytes);
  }
}

}  // namespace tritllm::cpu::avx2

#endif
