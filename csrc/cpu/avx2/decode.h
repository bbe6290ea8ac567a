// AVX2 building blocks shared by the AVX2 kernels: loading a group, turning its bytes into
// per-weight numbers in 16-bit lanes, the per-call scale tables and the byte-bound check.
//
// Everything is in an anonymous namespace: this code is compiled with -mavx2 and must not be
// merged by the linker with any other translation unit's copy.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../kernels.h"

namespace tritllm::cpu::avx2 {
namespace {

// ---------------------------------------------------------------------------------------------
// Group loads. A group is at most 14 bytes; it is read as one 16-byte load copied into both
// 128-bit halves, so that a shuffle can route any of its bytes to any 16-bit lane.

// Reads groups as 16 bytes without ever reading past the end of the packed buffer.
class GroupLoader {
 public:
  explicit GroupLoader(const PackedWeight& w) : end_(w.bytes + w.out_features * w.row_bytes()) {}

  __m256i operator()(const uint8_t* group) const {
    if (end_ - group >= 16) {
      return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
    }
    // One of the last groups of the buffer: copy what exists.
    alignas(16) uint8_t copy[16] = {};
    std::memcpy(copy, group, static_cast<size_t>(end_ - group));
    return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(copy)));
  }

 private:
  const uint8_t* end_;
};

// ---------------------------------------------------------------------------------------------
// Digits: lane j of plane p gets the digit c_p of weight j (c = trit + 1), by the division-free
// rule of csrc/format.h: digit i of v = mulhi(mullo(v, M_i), 3).

struct PlaneRoute {
  __m256i shuffle;  // byte -> lane routing (a 16-bit lane is [byte, 0] or [0, byte] or [0, 0])
  __m256i magic;    // per-lane multiplier
};

// Lane j of the returned route holds the byte that carries weight j of plane p, and the multiplier
// of its digit position.
inline PlaneRoute digit_route(int depth, int p) {
  alignas(32) uint8_t shuffle[32];
  alignas(32) uint16_t magic[16];
  for (int j = 0; j < kGroupSize; ++j) {
    int byte, digit;
    if (j < 15) {
      byte = 3 * p + j / 5;
      digit = j % 5;
    } else {  // weight 15: tail digit 3 + p (after the three index digits)
      byte = 3 * depth + (3 + p) / kTritsPerByte;
      digit = (3 + p) % kTritsPerByte;
    }
    shuffle[2 * j] = static_cast<uint8_t>(byte);
    shuffle[2 * j + 1] = 0x80;  // zero
    magic[j] = static_cast<uint16_t>(digit_magic(digit));
  }
  return {_mm256_load_si256(reinterpret_cast<const __m256i*>(shuffle)),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(magic))};
}

// Signed levels of the 16 weights of a group, in [-L, L].
template <int D>
struct LevelDecoder {
  PlaneRoute planes[D];
  LevelDecoder() {
    for (int p = 0; p < D; ++p) planes[p] = digit_route(D, p);
  }
  __m256i operator()(__m256i group) const {
    const __m256i three = _mm256_set1_epi16(3);
    __m256i level = _mm256_setzero_si256();
    for (int p = D - 1; p >= 0; --p) {  // Horner: level + L = sum_p 3^p c_p
      const __m256i bytes = _mm256_shuffle_epi8(group, planes[p].shuffle);
      const __m256i digit = _mm256_mulhi_epu16(_mm256_mullo_epi16(bytes, planes[p].magic), three);
      level = _mm256_add_epi16(_mm256_mullo_epi16(level, three), digit);
    }
    return _mm256_sub_epi16(level, _mm256_set1_epi16(static_cast<int16_t>(max_level(D))));
  }
};

// ---------------------------------------------------------------------------------------------
// Quotients: the matmul kernels never form the levels. For a byte v with digits c_0..c_4,
//     sum_i c_i x_i = q_0 x_0 + sum_{i>=1} q_i (x_i - 3 x_{i-1}),   q_i = floor(v / 3^i),
// (because c_i = q_i - 3 q_{i+1} and q_5 = 0), and q_i = mulhi(v, ceil(2^16 / 3^i)) exactly for
// v < 256 (q_0 = v: the byte sits in the lane's high half and is multiplied by 256). So one
// shuffle and one multiply per plane give Q_j = sum_p 3^p q(plane p byte of weight j), whose dot
// product with the transformed activations x'_j (activations.h) is the dot product of the
// levels + L with the activations. Weight 15 is the exception: its lane gets level + L directly:
// floor(tail0 / 27) = c_0 + 3 c_1 (plane 0's lane) plus 9 * tail1 = 9 c_2 + 27 c_3 (plane 2's
// lane), and its activation is not transformed.
// The "+ L" goes away by subtracting a constant o_j from Q_j: with o = L * (121, 40, 13, 4, 1) in
// the five lanes of a byte (o_i - 3 o_{i+1} = L) and o_15 = L, sum_j o_j x'_j = L sum_j x_j, so
//     sum_j (Q_j - o_j) x'_j = sum_j level_j x_j      exactly, with |Q_j - o_j| <= 121 L.

inline PlaneRoute quotient_route(int depth, int p) {
  alignas(32) uint8_t shuffle[32];
  alignas(32) uint16_t magic[16];
  for (int j = 0; j < kGroupSize; ++j) {
    uint8_t low = 0x80, high = 0x80;  // 0x80: zero
    uint16_t m = 0;
    if (j < 15) {
      const int byte = 3 * p + j / 5, i = j % 5;
      if (i == 0) {
        high = static_cast<uint8_t>(byte);
        m = 256;
      } else {
        low = static_cast<uint8_t>(byte);
        m = static_cast<uint16_t>(digit_magic(i - 1));  // ceil(2^16 / 3^i)
      }
    } else if (p == 0) {
      low = static_cast<uint8_t>(3 * depth);      // tail0 / 27
      m = static_cast<uint16_t>(digit_magic(2));
    } else if (p == 2) {
      high = static_cast<uint8_t>(3 * depth + 1);  // tail1 itself
      m = 256;
    }
    shuffle[2 * j] = low;
    shuffle[2 * j + 1] = high;
    magic[j] = m;
  }
  return {_mm256_load_si256(reinterpret_cast<const __m256i*>(shuffle)),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(magic))};
}

// o_j (see above) of the 16 lanes of a group at depth `depth`.
inline __m256i quotient_offsets(int depth) {
  alignas(32) int16_t offsets[16];
  const int weights[5] = {121, 40, 13, 4, 1};
  for (int j = 0; j < kGroupSize; ++j) {
    offsets[j] = static_cast<int16_t>(max_level(depth) * (j < 15 ? weights[j % 5] : 1));
  }
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(offsets));
}

// Q_j - o_j (see above) of the 16 weights of a group, in [-121 L, 121 L].
template <int D>
struct QuotientDecoder {
  PlaneRoute planes[D];
  __m256i offsets;
  QuotientDecoder() : offsets(quotient_offsets(D)) {
    for (int p = 0; p < D; ++p) planes[p] = quotient_route(D, p);
  }
  __m256i operator()(__m256i group) const {
    const __m256i three = _mm256_set1_epi16(3);
    __m256i q = _mm256_mulhi_epu16(_mm256_shuffle_epi8(group, planes[D - 1].shuffle),
                                   planes[D - 1].magic);
    for (int p = D - 2; p >= 0; --p) {
      const __m256i plane = _mm256_mulhi_epu16(_mm256_shuffle_epi8(group, planes[p].shuffle),
                                               planes[p].magic);
      q = _mm256_add_epi16(_mm256_mullo_epi16(q, three), plane);
    }
    return _mm256_sub_epi16(q, offsets);
  }
};

// ---------------------------------------------------------------------------------------------
// Scales: a group's scale is codebook[tail0 % 27]; these tables map the tail byte straight to it.

struct ScaleTables {
  alignas(32) float scale[256];  // codebook[t % 27], 0 where t % 27 >= codebook_size
  uint8_t index[256];            // t % 27 (the kernels check the largest they meet)

  explicit ScaleTables(const PackedWeight& w) {
    for (int t = 0; t < 256; ++t) {
      const int i = static_cast<int>(group_scale_index(static_cast<uint32_t>(t)));
      index[t] = static_cast<uint8_t>(i);
      scale[t] = i < w.codebook_size ? w.codebook[i] : 0.0f;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Byte bounds: every byte must be below byte_bound(depth, position in its group). A row is
// checked 32 bytes at a time with saturating subtraction of (bound - 1): nonzero iff a byte is
// out of bounds. Rows start at a group boundary, and the pattern of bounds repeats every
// kPeriod 32-byte chunks (lcm(B, 32) bytes), so the loop runs over whole periods with a fixed
// limit vector per chunk (no phase arithmetic in the loop).

template <int D>
class ByteChecker {
 public:
  static constexpr int kBytes = bytes_per_group(D);
  static constexpr int kPeriod = kBytes / (kBytes & -kBytes);  // B / gcd(B, 32): 1, 7, 11, 7

  ByteChecker() {
    for (int pos = 0; pos < kBytes; ++pos) limit_[pos] = static_cast<uint8_t>(byte_bound(D, pos) - 1);
    for (int chunk = 0; chunk < kPeriod; ++chunk) {
      alignas(32) uint8_t lanes[32];
      for (int i = 0; i < 32; ++i) lanes[i] = limit_[(32 * chunk + i) % kBytes];
      limits_[chunk] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    }
  }

  // True if every byte of [bytes, bytes + len) is within bounds; `bytes` starts a group.
  bool ok(const uint8_t* bytes, int64_t len) const {
    __m256i over = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 * kPeriod <= len; i += 32 * kPeriod) {
      for (int chunk = 0; chunk < kPeriod; ++chunk) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + i + 32 * chunk));
        over = _mm256_or_si256(over, _mm256_subs_epu8(v, limits_[chunk]));
      }
    }
    bool good = _mm256_testz_si256(over, over);
    for (; i < len; ++i) good &= bytes[i] <= limit_[i % kBytes];
    return good;
  }

 private:
  uint8_t limit_[kBytes];
  __m256i limits_[kPeriod];
};

// ---------------------------------------------------------------------------------------------
// 8x8 transpose of 32-bit elements: afterwards r[j] holds element j of every input r[0..7].
inline void transpose8x32(__m256i r[8]) {
  const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
  const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
  r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
  r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
  r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
  r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
  r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
  r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
  r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace
}  // namespace tritllm::cpu::avx2
