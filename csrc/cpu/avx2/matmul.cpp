// AVX2 matmul: y = x @ W.T with x prepared as integers per group (activations.h) and W decoded to
// quotients (decode.h); a group's dot product is exact in int32, then scaled and summed in float32.
//
// Two kernels:
//  * few rows of x (M < kBlockedMinRows), "row pass": each group of W is decoded once and met by
//    the M rows of x in order; one int16 multiply-add, one conversion and one FMA per group and
//    row, with the scale codebook[idx] * s read from the row's scale table.
//  * more rows, "blocked": 8 groups of a row of W are decoded and transposed so that a 32-bit
//    lane holds one group; 8 multiply-adds then finish 8 groups' dot products in 8 lanes, which
//    are scaled once per 8 groups. W is decoded into a small buffer per chunk of K and reused by
//    all rows of x (4 rows x 2 rows of W per inner step).
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

// Rows of W ahead of the one being computed that the kernels prefetch (no fault past the end).
constexpr int kPrefetchRows = 2;

// ---------------------------------------------------------------------------------------------
// Row pass: rows m0 .. m0 + R - 1 of x against rows [n0, n1) of W.

// One group of W against R rows of x: dot product of its quotients with each row's integers
// (exact in int32), minus L * sum (corr), times codebook[idx] * s (the row's scale table); notes
// the largest scale index seen.
template <int D, int R>
__attribute__((always_inline)) inline void group_step(
    const QuotientDecoder<D>& decode, __m256i bytes, unsigned tail0, int64_t g,
    const uint8_t* index, const int16_t* const (&integers)[R], const int32_t* const (&corr)[R],
    const float* const (&table)[R], __m256 (&acc)[R], unsigned& largest_index) {
  const __m256i q = decode(bytes);
  const unsigned i = index[tail0];
  largest_index = i > largest_index ? i : largest_index;  // checked against the codebook size
  const int64_t entry = kMaxCodebook * g + i;
  for (int r = 0; r < R; ++r) {
    __m256i dot = _mm256_madd_epi16(
        q, _mm256_load_si256(reinterpret_cast<const __m256i*>(integers[r] + kGroupSize * g)));
    dot = _mm256_add_epi32(dot, _mm256_castsi128_si256(_mm_cvtsi32_si128(corr[r][g])));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(&table[r][entry]), acc[r]);
  }
}

template <int D, int R>
bool row_pass(const Context<D>& c, int64_t m0, int64_t n0, int64_t n1, bool check) {
  constexpr int kBytes = bytes_per_group(D);
  const int64_t groups = c.w.groups();
  const int64_t row_bytes = c.w.row_bytes();
  const uint8_t* const end = c.w.bytes + c.w.out_features * row_bytes;
  // local copies: the compiler keeps the decoder's constants in registers instead of reloading
  // them from the shared context at every group
  const QuotientDecoder<D> decode = c.decode;
  const uint8_t* const index = c.tables.index;
  const int16_t* integers[R];
  const int32_t* corr[R];
  const float* table[R];
  for (int r = 0; r < R; ++r) {
    integers[r] = c.layout.integers(c.a.prepared, m0 + r);
    corr[r] = c.layout.corr(c.a.prepared, m0 + r);
    table[r] = c.layout.scale_table(c.a.prepared, m0 + r);
  }
  unsigned largest_index = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = c.w.row(n);
    if (check && !c.checker.ok(row, row_bytes)) return false;
    // groups whose 16-byte load stays inside the buffer (all but the very last ones)
    int64_t direct = groups;
    if (end - row < (groups - 1) * kBytes + 16) {
      direct = end - row >= 16 ? (end - row - 16) / kBytes + 1 : 0;
    }
    // The row check above waits for memory, the groups below do not: fetch the row after next
    // while computing (the hardware prefetcher alone stops running ahead during the compute).
    const char* ahead = reinterpret_cast<const char*>(row + kPrefetchRows * row_bytes);
    // two accumulators per row of x: consecutive groups do not wait for each other's FMA
    __m256 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 1 < direct; g += 2) {
      if (g % 8 == 0) _mm_prefetch(ahead + g * kBytes, _MM_HINT_T0);  // 56 bytes per line
      const uint8_t* group = row + g * kBytes;
      group_step<D, R>(decode, _mm256_broadcastsi128_si256(_mm_loadu_si128(
                           reinterpret_cast<const __m128i*>(group))),
                       group[3 * D], g, index, integers, corr, table, even, largest_index);
      group_step<D, R>(decode, _mm256_broadcastsi128_si256(_mm_loadu_si128(
                           reinterpret_cast<const __m128i*>(group + kBytes))),
                       group[kBytes + 3 * D], g + 1, index, integers, corr, table, odd,
                       largest_index);
    }
    for (; g < groups; ++g) {
      const uint8_t* group = row + g * kBytes;
      group_step<D, R>(decode, c.load(group), group[3 * D], g, index, integers, corr, table, even,
                       largest_index);
    }
    for (int r = 0; r < R; ++r) {
      c.y[(m0 + r) * c.w.out_features + n] = horizontal_sum(_mm256_add_ps(even[r], odd[r]));
    }
  }
  return !(check && largest_index >= c.w.codebook_size);
}

template <int D>
bool row_passes(const Context<D>& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1, bool check) {
  for (int64_t m = m0; m < m1; m += 3) {
    bool ok = true;
    switch (m1 - m) {
      case 1: ok = row_pass<D, 1>(c, m, n0, n1, check); break;
      case 2: ok = row_pass<D, 2>(c, m, n0, n1, check); break;
      default: ok = row_pass<D, 3>(c, m, n0, n1, check); break;
    }
    if (!ok) return false;
    check = false;  // the first pass checked these rows of W
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Blocked kernel.

constexpr int kChunkBlocks = 16;  // blocks of 8 groups (128 weights) per chunk of K

// Rows [n, n + count) of W, blocks [b0, b1) (of 8 groups), decoded and transposed: pair j of
// group 8b + k of row n + i at quotients[((i * kChunkBlocks + b - b0) * 8 + j) * 16 + 2k]; the
// groups' scales at scales[(i * kChunkBlocks + b - b0) * 8 + k].
struct DecodedChunk {
  alignas(32) int16_t quotients[2 * kChunkBlocks * 8 * 16];
  alignas(32) float scales[2 * kChunkBlocks * 8];
};

template <int D>
bool decode_chunk(const Context<D>& c, int64_t n, int count, int64_t b0, int64_t b1, bool check,
                  DecodedChunk& chunk) {
  constexpr int kBytes = bytes_per_group(D);
  const int64_t groups = c.w.groups();
  uint32_t bad_index = 0;
  for (int i = 0; i < count; ++i) {
    const uint8_t* row = c.w.row(n + i);
    if (check) {
      const int64_t first = b0 * 8 * kBytes;
      const int64_t last = b1 * 8 < groups ? b1 * 8 * kBytes : c.w.row_bytes();
      if (!c.checker.ok(row + first, last - first)) return false;
    }
    for (int64_t b = b0; b < b1; ++b) {
      __m256i q[8];
      const int64_t slot = i * kChunkBlocks + (b - b0);
      for (int k = 0; k < 8; ++k) {
        const int64_t g = 8 * b + k;
        if (g >= groups) {
          q[k] = _mm256_setzero_si256();
          chunk.scales[slot * 8 + k] = 0.0f;
          continue;
        }
        const uint8_t* group = row + g * kBytes;
        q[k] = c.decode(c.load(group));
        const unsigned tail0 = group[3 * D];
        bad_index |= c.tables.index_bad[tail0];
        chunk.scales[slot * 8 + k] = c.tables.scale[tail0];
      }
      transpose8x32(q);
      for (int j = 0; j < 8; ++j) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(chunk.quotients + (slot * 8 + j) * 16), q[j]);
      }
    }
  }
  return !(check && bad_index);
}

// Rows [m, m + MR) of x times rows [n, n + NR) of W over blocks [b0, b1); adds into y (or sets y
// when `first`).
template <int D, int MR, int NR>
void block_product(const Context<D>& c, const DecodedChunk& chunk, int64_t m, int64_t n,
                   int64_t b0, int64_t b1, bool first) {
  const int16_t* integers[MR];
  const int32_t* corr[MR];
  const float* step[MR];
  for (int r = 0; r < MR; ++r) {
    integers[r] = c.layout.integers(c.a.prepared, m + r);
    corr[r] = c.layout.corr(c.a.prepared, m + r);
    step[r] = c.layout.step(c.a.prepared, m + r);
  }
  __m256 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < NR; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t b = b0; b < b1; ++b) {
    __m256i dot[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int i = 0; i < NR; ++i) dot[r][i] = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j) {
      __m256i wq[NR];
      for (int i = 0; i < NR; ++i) {
        wq[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(
            chunk.quotients + ((i * kChunkBlocks + (b - b0)) * 8 + j) * 16));
      }
      for (int r = 0; r < MR; ++r) {
        const __m256i xq =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(integers[r] + 128 * b + 16 * j));
        for (int i = 0; i < NR; ++i) dot[r][i] = _mm256_add_epi32(dot[r][i], _mm256_madd_epi16(wq[i], xq));
      }
    }
    for (int r = 0; r < MR; ++r) {
      const __m256i offset = _mm256_load_si256(reinterpret_cast<const __m256i*>(corr[r] + 8 * b));
      const __m256 s = _mm256_load_ps(step[r] + 8 * b);
      for (int i = 0; i < NR; ++i) {
        const __m256 scale = _mm256_mul_ps(s, _mm256_load_ps(chunk.scales + (i * kChunkBlocks + (b - b0)) * 8));
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(dot[r][i], offset)), scale,
                                    acc[r][i]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int i = 0; i < NR; ++i) {
      float& out = c.y[(m + r) * c.w.out_features + n + i];
      const float sum = horizontal_sum(acc[r][i]);
      out = first ? sum : out + sum;
    }
  }
}

template <int D, int NR>
void block_products(const Context<D>& c, const DecodedChunk& chunk, int64_t m0, int64_t m1,
                    int64_t n, int64_t b0, int64_t b1, bool first) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) block_product<D, 4, NR>(c, chunk, m, n, b0, b1, first);
  switch (m1 - m) {
    case 1: block_product<D, 1, NR>(c, chunk, m, n, b0, b1, first); break;
    case 2: block_product<D, 2, NR>(c, chunk, m, n, b0, b1, first); break;
    case 3: block_product<D, 3, NR>(c, chunk, m, n, b0, b1, first); break;
    default: break;
  }
}

template <int D>
bool blocked(const Context<D>& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1, bool check) {
  const int64_t blocks = c.layout.padded_groups / 8;
  DecodedChunk chunk;
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
    const int64_t b1 = b0 + kChunkBlocks < blocks ? b0 + kChunkBlocks : blocks;
    for (int64_t n = n0; n < n1; n += 2) {
      const int count = n + 2 <= n1 ? 2 : 1;
      if (!decode_chunk(c, n, count, b0, b1, check, chunk)) return false;
      if (count == 2) {
        block_products<D, 2>(c, chunk, m0, m1, n, b0, b1, b0 == 0);
      } else {
        block_products<D, 1>(c, chunk, m0, m1, n, b0, b1, b0 == 0);
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
