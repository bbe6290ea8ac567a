// AVX2 matmul: y = x @ W.T with x prepared as integers per group (activations.h) and W decoded to
// quotients (decode.h); a group's dot product is exact in int32, then scaled and summed in float32.
//
// Two kernels:
//  * one row of x (M < kBlockedMinRows), "row pass": each group of W is decoded and met by the
//    row at once; one int16 multiply-add, one conversion and one FMA per group, with the scale
//    codebook[idx] * s read from the row's scale table.
//  * more rows, "blocked": 8 groups of a row of W are decoded and transposed so that a 32-bit
//    lane holds one group; 8 multiply-adds then finish 8 groups' dot products in 8 lanes, which
//    are scaled once per 8 groups. A strip of rows of W is decoded per chunk of K into an
//    L1-sized buffer and reused by every row of x.
#if defined(__AVX2__) && defined(__FMA__)

#include <immintrin.h>

#include "activations.h"
#include "decode.h"
#include "kernels_avx2.h"

namespace tritllm::cpu::avx2 {
namespace {

// What every kernel of a matmul_tile call shares.
template <int D>
struct Context {
  const Activations& a;
  const PackedWeight& w;
  const PreparedLayout layout;
  const QuotientDecoder<D> decode;
  const GroupLoader load;
  const ScaleTables tables;
  const ByteChecker<D> checker;
  float* y;

  Context(const Activations& a_, const PackedWeight& w_, float* y_)
      : a(a_), w(w_), layout(a_.rows, w_), load(w_), tables(w_), y(y_) {}
};

// How many rows of W ahead of the one being computed the row pass prefetches.
constexpr int kPrefetchRows = 2;

// ---------------------------------------------------------------------------------------------
// Row pass: one row of x against rows [n0, n1) of W.

// One group of W: dot product of its quotients with the row's integers (exact in int32), minus
// L * sum (corr), times codebook[idx] * s (the row's scale table); notes the largest scale index.
template <int D>
__attribute__((always_inline)) inline void group_step(const QuotientDecoder<D>& decode,
                                                      __m256i bytes, unsigned tail0, int64_t g,
                                                      const uint8_t* index, const int16_t* integers,
                                                      const int32_t* corr, const float* table,
                                                      __m256& acc, unsigned& largest_index) {
  const unsigned i = index[tail0];
  largest_index = i > largest_index ? i : largest_index;  // checked against the codebook size
  __m256i dot = _mm256_madd_epi16(
      decode(bytes), _mm256_load_si256(reinterpret_cast<const __m256i*>(integers + kGroupSize * g)));
  dot = _mm256_add_epi32(dot, _mm256_castsi128_si256(_mm_cvtsi32_si128(corr[g])));
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(&table[kMaxCodebook * g + i]),
                        acc);
}

template <int D>
bool row_pass(const Context<D>& c, int64_t m, int64_t n0, int64_t n1, bool check) {
  constexpr int kBytes = bytes_per_group(D);
  const int64_t groups = c.w.groups();
  const int64_t row_bytes = c.w.row_bytes();
  const uint8_t* const end = c.w.bytes + c.w.out_features * row_bytes;
  // local copy: the compiler keeps the decoder's constants in registers instead of reloading
  // them from the shared context at every group
  const QuotientDecoder<D> decode = c.decode;
  const uint8_t* const index = c.tables.index;
  const int16_t* const integers = c.layout.integers(c.a.prepared, m);
  const int32_t* const corr = c.layout.corr(c.a.prepared, m);
  const float* const table = c.layout.scale_table(c.a.prepared, m);
  unsigned largest_index = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = c.w.row(n);
    if (check && !c.checker.ok(row, row_bytes)) return false;
    // groups whose 16-byte load stays inside the buffer (all but the very last ones)
    int64_t direct = groups;
    if (end - row < (groups - 1) * kBytes + 16) {
      direct = end - row >= 16 ? (end - row - 16) / kBytes + 1 : 0;
    }
    // The row check above waits for memory, the groups below do not: fetch a later row while
    // computing (the hardware prefetcher alone stops running ahead during the compute).
    const int64_t later = n + kPrefetchRows < c.w.out_features ? n + kPrefetchRows : n;
    const char* ahead = reinterpret_cast<const char*>(c.w.row(later));
    // two accumulators: consecutive groups do not wait for each other's FMA
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 1 < direct; g += 2) {
      if (g % 8 == 0) _mm_prefetch(ahead + g * kBytes, _MM_HINT_T0);  // 56 bytes per line
      const uint8_t* group = row + g * kBytes;
      group_step<D>(decode, _mm256_broadcastsi128_si256(
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(group))),
                    group[3 * D], g, index, integers, corr, table, even, largest_index);
      group_step<D>(decode, _mm256_broadcastsi128_si256(
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(group + kBytes))),
                    group[kBytes + 3 * D], g + 1, index, integers, corr, table, odd, largest_index);
    }
    for (; g < groups; ++g) {
      const uint8_t* group = row + g * kBytes;
      group_step<D>(decode, c.load(group), group[3 * D], g, index, integers, corr, table, even,
                    largest_index);
    }
    c.y[m * c.w.out_features + n] = horizontal_sum(_mm256_add_ps(even, odd));
  }
  return !(check && largest_index >= c.w.codebook_size);
}

template <int D>
bool row_passes(const Context<D>& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1, bool check) {
  for (int64_t m = m0; m < m1; ++m) {
    if (!row_pass(c, m, n0, n1, check)) return false;
    check = false;  // the first pass checked these rows of W
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Blocked kernel.

// Cache blocking: a strip of kStripRows rows of W is decoded over a chunk of K of kChunkBlocks
// blocks (8 groups each): 32 KB of quotients that stay in L1 while every row of x (4 KB of
// integers for the chunk) meets them.
constexpr int kChunkBlocks = 16;
constexpr int kStripRows = 8;

// Rows [n, n + rows) of W over blocks [b0, b1), decoded and transposed: pair j (weights 2j, 2j+1)
// of group 8b + k of row n + i at quotients[(slot(i, b) * 8 + j) * 16 + 2k], its scale at
// scales[slot(i, b) * 8 + k], slot(i, b) = i * kChunkBlocks + b - b0.
struct DecodedStrip {
  alignas(32) int16_t quotients[kStripRows * kChunkBlocks * 8 * 16];
  alignas(32) float scales[kStripRows * kChunkBlocks * 8];
};

template <int D>
bool decode_strip(const Context<D>& c, int64_t n, int64_t rows, int64_t b0, int64_t b1,
                  bool check, DecodedStrip& strip) {
  constexpr int kBytes = bytes_per_group(D);
  const QuotientDecoder<D> decode = c.decode;
  const int64_t groups = c.w.groups();
  unsigned largest_index = 0;
  const int64_t first = b0 * 8 * kBytes;
  const int64_t last = b1 * 8 < groups ? b1 * 8 * kBytes : c.w.row_bytes();
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* row = c.w.row(n + i);
    // The same chunk of the next strip's rows: short pieces of many rows, which the hardware
    // prefetcher does not fetch ahead by itself.
    if (n + kStripRows + i < c.w.out_features) {
      const char* next = reinterpret_cast<const char*>(c.w.row(n + kStripRows + i));
      for (int64_t offset = first; offset < last; offset += 64) _mm_prefetch(next + offset, _MM_HINT_T0);
    }
    if (check && !c.checker.ok(row + first, last - first)) return false;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t slot = i * kChunkBlocks + (b - b0);
      __m256i q[8];
      for (int k = 0; k < 8; ++k) {
        const int64_t g = 8 * b + k;
        if (g >= groups) {  // padding groups of the last block
          q[k] = _mm256_setzero_si256();
          strip.scales[slot * 8 + k] = 0.0f;
          continue;
        }
        const uint8_t* group = row + g * kBytes;
        q[k] = decode(c.load(group));
        const unsigned tail0 = group[3 * D];
        const unsigned index = c.tables.index[tail0];
        largest_index = index > largest_index ? index : largest_index;
        strip.scales[slot * 8 + k] = c.tables.scale[tail0];
      }
      transpose8x32(q);
      for (int j = 0; j < 8; ++j) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(strip.quotients + (slot * 8 + j) * 16), q[j]);
      }
    }
  }
  return !(check && largest_index >= c.w.codebook_size);
}

// Row m of x times rows [i, i + NR) of the strip (rows n + i of W) over blocks [b0, b1); adds
// into y (or sets y when `first`). Per block: 8 steps of one load of x feeding NR int16
// multiply-adds (W straight from the strip in L1) into NR int32 accumulators, which start at
// the row's corr; then one float update per row of W. One row of x against many rows of W
// beats other register blockings here: NR accumulators, x and a temporary fit the 16 AVX2
// registers without spills, and W's loads come from L1.
template <int D, int NR>
void strip_row_product(const Context<D>& c, const DecodedStrip& strip, int64_t i, int64_t m,
                       int64_t n, int64_t b0, int64_t b1, bool first) {
  const int16_t* integers = c.layout.integers(c.a.prepared, m);
  const int32_t* corr = c.layout.corr(c.a.prepared, m);
  const float* step = c.layout.step(c.a.prepared, m);
  alignas(32) float sums[NR][8] = {};
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t slot = i * kChunkBlocks + (b - b0);
    const int16_t* wq = strip.quotients + slot * 8 * 16;
    const __m256i offset = _mm256_load_si256(reinterpret_cast<const __m256i*>(corr + 8 * b));
    __m256i dot[NR];
    for (int k = 0; k < NR; ++k) dot[k] = offset;
#pragma GCC unroll 1
    for (int j = 0; j < 8; ++j) {
      const __m256i xj = _mm256_load_si256(reinterpret_cast<const __m256i*>(integers + 128 * b + 16 * j));
      for (int k = 0; k < NR; ++k) {
        const __m256i wj = _mm256_load_si256(
            reinterpret_cast<const __m256i*>(wq + (k * kChunkBlocks * 8 + j) * 16));
        dot[k] = _mm256_add_epi32(dot[k], _mm256_madd_epi16(wj, xj));
      }
    }
    const __m256 s = _mm256_load_ps(step + 8 * b);
    for (int k = 0; k < NR; ++k) {
      const __m256 scale = _mm256_mul_ps(s, _mm256_load_ps(strip.scales + (slot + k * kChunkBlocks) * 8));
      _mm256_store_ps(sums[k], _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[k]), scale, _mm256_load_ps(sums[k])));
    }
  }
  for (int k = 0; k < NR; ++k) {
    float& out = c.y[m * c.w.out_features + n + k];
    const float sum = horizontal_sum(_mm256_load_ps(sums[k]));
    out = first ? sum : out + sum;
  }
}

template <int D>
bool blocked(const Context<D>& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1, bool check) {
  const int64_t blocks = c.layout.padded_groups / 8;
  DecodedStrip strip;
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
    const int64_t b1 = b0 + kChunkBlocks < blocks ? b0 + kChunkBlocks : blocks;
    const bool first = b0 == 0;
    for (int64_t n = n0; n < n1; n += kStripRows) {
      const int64_t rows = n + kStripRows <= n1 ? kStripRows : n1 - n;
      if (!decode_strip(c, n, rows, b0, b1, check, strip)) return false;
      for (int64_t m = m0; m < m1; ++m) {
        if (rows == kStripRows) {
          strip_row_product<D, kStripRows>(c, strip, 0, m, n, b0, b1, first);
          continue;
        }
        int64_t i = 0;  // a last, partial strip
        for (; i + 4 <= rows; i += 4) strip_row_product<D, 4>(c, strip, i, m, n + i, b0, b1, first);
        for (; i + 2 <= rows; i += 2) strip_row_product<D, 2>(c, strip, i, m, n + i, b0, b1, first);
        for (; i < rows; ++i) strip_row_product<D, 1>(c, strip, i, m, n + i, b0, b1, first);
      }
    }
  }
  return true;
}

template <int D>
bool matmul_tile_at_depth(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1,
                          int64_t n0, int64_t n1, bool check, float* y) {
  const Context<D> c(a, w, y);
  return c.layout.blocked ? blocked(c, m0, m1, n0, n1, check) : row_passes(c, m0, m1, n0, n1, check);
}

}  // namespace

bool matmul_tile(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1, int64_t n0,
                 int64_t n1, bool check_bytes, float* y) {
  switch (w.depth) {
    case 1: return matmul_tile_at_depth<1>(a, w, m0, m1, n0, n1, check_bytes, y);
    case 2: return matmul_tile_at_depth<2>(a, w, m0, m1, n0, n1, check_bytes, y);
    case 3: return matmul_tile_at_depth<3>(a, w, m0, m1, n0, n1, check_bytes, y);
    default: return matmul_tile_at_depth<4>(a, w, m0, m1, n0, n1, check_bytes, y);
  }
}

}  // namespace tritllm::cpu::avx2

#endif
