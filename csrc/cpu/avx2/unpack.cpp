// AVX2 unpack: one group of 16 weights per step, decoded to levels in 16-bit lanes, multiplied by
// the group's scale in float32 (the same single rounding as the format's definition).
#if defined(__AVX2__) && defined(__FMA__)

#include <immintrin.h>

#include <cstring>

#include "decode.h"
#include "kernels_avx2.h"

namespace tritllm::cpu::avx2 {
namespace {

template <int D>
bool unpack_rows_at_depth(const PackedWeight& w, int64_t n0, int64_t n1, float* out) {
  const LevelDecoder<D> decode;
  const GroupLoader load(w);
  const ScaleTables tables(w);
  const ByteChecker<D> checker;
  const int64_t k_size = w.in_features;
  const int64_t full_groups = k_size / kGroupSize;
  const int64_t groups = w.groups();
  constexpr int kBytes = bytes_per_group(D);
  unsigned largest_index = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.row(n);
    if (!checker.ok(row, w.row_bytes())) return false;
    float* dst = out + (n - n0) * k_size;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* group = row + g * kBytes;
      const __m256i level = decode(load(group));
      const unsigned tail0 = group[3 * D];
      const unsigned index = tables.index[tail0];
      largest_index = index > largest_index ? index : largest_index;
      const __m256 scale = _mm256_broadcast_ss(&tables.scale[tail0]);
      const __m256 lo = _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(level))), scale);
      const __m256 hi = _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(level, 1))), scale);
      if (g < full_groups) {
        _mm256_storeu_ps(dst + g * kGroupSize, lo);
        _mm256_storeu_ps(dst + g * kGroupSize + 8, hi);
      } else {  // the last, partial group: only in_features % 16 values exist
        alignas(32) float values[kGroupSize];
        _mm256_store_ps(values, lo);
        _mm256_store_ps(values + 8, hi);
        std::memcpy(dst + g * kGroupSize, values, sizeof(float) * (k_size - g * kGroupSize));
      }
    }
  }
  return largest_index < w.codebook_size;
}

}  // namespace

bool unpack_rows(const PackedWeight& w, int64_t n0, int64_t n1, float* out) {
  switch (w.depth) {
    case 1: return unpack_rows_at_depth<1>(w, n0, n1, out);
    case 2: return unpack_rows_at_depth<2>(w, n0, n1, out);
    case 3: return unpack_rows_at_depth<3>(w, n0, n1, out);
    default: return unpack_rows_at_depth<4>(w, n0, n1, out);
  }
}

}  // namespace tritllm::cpu::avx2

#endif
