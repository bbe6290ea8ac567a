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
// The "avx512" kernel set runs the same two kernels with their inner loops in AVX-512. The
// blocked kernel: two rows of W per register and vpdpwssd, strips decoded two blocks at a time
// (decode_strip_avx512). The row pass: by blocks of 16 groups of a row of W, the 16 scales at
// once in vector registers (BlockScales, which also checks the bytes), the groups decoded by
// units of 4 or 8 whose 32-bit lanes each sum one group's products (UnitDecoder), so that one
// conversion and one FMA serve 2 or 4 lanes per group, not 8. Everything else (activations,
// blocks and groups left over at the end of a row) is shared with the "avx2" set.
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

// The "avx512" kernel set's functions: compiled for AVX-512 (F, BW, DQ, VL, VNNI) by this
// attribute, called only on CPUs that have it.
#define TRITLLM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

// GCC 12's AVX-512 intrinsics start from a deliberately undefined register (_mm512_undefined_*),
// which -Wall reports as "used uninitialized" once inlined into a function that has the target
// attribute (a false positive, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// ---------------------------------------------------------------------------------------------
// Row pass: one row of x against rows [n0, n1) of W.

// One group of W: dot product of its quotients with the row's integers (exact in int32), times
// codebook[idx] * s (the row's scale table); notes the largest scale index.
template <int D>
__attribute__((always_inline)) inline void group_step(const QuotientDecoder<D>& decode,
                                                      __m256i bytes, unsigned tail0, int64_t g,
                                                      const uint8_t* index, const int16_t* integers,
                                                      const float* table, __m256& acc,
                                                      unsigned& largest_index) {
  const unsigned i = index[tail0];
  largest_index = i > largest_index ? i : largest_index;  // checked against the codebook size
  const __m256i dot = _mm256_madd_epi16(
      decode(bytes), _mm256_load_si256(reinterpret_cast<const __m256i*>(integers + kGroupSize * g)));
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
                    group[3 * D], g, index, integers, table, even, largest_index);
      group_step<D>(decode, _mm256_broadcastsi128_si256(
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(group + kBytes))),
                    group[kBytes + 3 * D], g + 1, index, integers, table, odd, largest_index);
    }
    for (; g < groups; ++g) {
      const uint8_t* group = row + g * kBytes;
      group_step<D>(decode, c.load(group), group[3 * D], g, index, integers, table, even,
                    largest_index);
    }
    c.y[m * c.w.out_features + n] = horizontal_sum(_mm256_add_ps(even, odd));
  }
  return !(check && largest_index >= c.w.codebook_size);
}

// Two groups per 512-bit register (group g in the low 256 bits, g + kDistance in the high ones),
// so every instruction does the work of two AVX2 ones: the row pass's pairs of groups (for the
// groups left after its blocks of 16, kDistance 1) and the AVX-512 strip decoder (kDistance 8:
// two blocks of 8 groups at once). The routes of the AVX2 decoder serve both halves; at depths 1
// and 2 two adjacent groups fit one 16-byte load, the high half reading B bytes further.
template <int D, int kDistance = 1>
struct WideQuotientDecoder {
  static constexpr int kBytes = bytes_per_group(D);
  static constexpr bool kOneLoad = kDistance == 1 && 2 * kBytes <= 16;
  __m512i shuffle[D], magic[D], offsets;

  TRITLLM_TARGET_AVX512 WideQuotientDecoder() : offsets(_mm512_broadcast_i64x4(quotient_offsets(D))) {
    for (int p = 0; p < D; ++p) {
      const PlaneRoute route = quotient_route(D, p);
      alignas(64) uint8_t lanes[64];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), route.shuffle);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 32), route.shuffle);
      if (kOneLoad) {
        for (int i = 32; i < 64; ++i) lanes[i] = lanes[i] == 0x80 ? 0x80 : lanes[i] + kBytes;
      }
      shuffle[p] = _mm512_load_si512(lanes);
      magic[p] = _mm512_broadcast_i64x4(route.magic);
    }
  }

  // Q (decode.h; without the offsets o, in [0, 242 * (3^D - 1) / 2]) of groups g (low half) and
  // g + kDistance (high half), the first at `group`.
  TRITLLM_TARGET_AVX512 __attribute__((always_inline)) __m512i operator()(const uint8_t* group) const {
    const __m128i first = _mm_loadu_si128(reinterpret_cast<const __m128i*>(group));
    const uint8_t* second = group + kDistance * kBytes;
    const __m512i bytes =
        kOneLoad ? _mm512_broadcast_i32x4(first)
                 : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_broadcastsi128_si256(first)),
                                      _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                          reinterpret_cast<const __m128i*>(second))),
                                      1);
    __m512i q = _mm512_mulhi_epu16(_mm512_shuffle_epi8(bytes, shuffle[D - 1]), magic[D - 1]);
    for (int p = D - 2; p >= 0; --p) {
      // 3q as q + q + q: the multiplier ports are the busiest in this loop
      q = _mm512_add_epi16(_mm512_add_epi16(_mm512_add_epi16(q, q), q),
                           _mm512_mulhi_epu16(_mm512_shuffle_epi8(bytes, shuffle[p]), magic[p]));
    }
    return q;
  }
};

// Groups g and g + 1 of W: as group_step, two at a time.
template <int D>
TRITLLM_TARGET_AVX512 __attribute__((always_inline)) inline void pair_step(
    const WideQuotientDecoder<D>& decode, const uint8_t* group, int64_t g, const uint8_t* index,
    const int16_t* integers, const float* table, __m512& acc, unsigned& largest_index) {
  constexpr int kBytes = bytes_per_group(D);
  const __m512i dot = _mm512_madd_epi16(_mm512_sub_epi16(decode(group), decode.offsets),
                                        _mm512_loadu_si512(integers + kGroupSize * g));
  const unsigned i0 = index[group[3 * D]], i1 = index[group[kBytes + 3 * D]];
  const unsigned larger = i0 > i1 ? i0 : i1;
  largest_index = larger > largest_index ? larger : largest_index;
  const __m512 scale = _mm512_insertf32x8(
      _mm512_castps256_ps512(_mm256_broadcast_ss(&table[kMaxCodebook * g + i0])),
      _mm256_broadcast_ss(&table[kMaxCodebook * (g + 1) + i1]), 1);
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
}

// The scales of 16 consecutive groups at once, in vector registers instead of one scalar lookup
// per group: the 16 tail bytes are moved into 32-bit lanes by one two-register dword permute (a
// window of 128 bytes: all 16 groups at depths 1 and 2, 8 groups at depths 3 and 4, so those
// take two windows) and a byte shuffle that keeps the tail byte of each 32-bit lane;
// t % 27 = t - 27 * mulhi(t, ceil(2^16 / 27)) (exact for t < 256); the codebook, held in two
// registers, is indexed by a two-register float permute.
// The windows hold every byte of the block, so the byte-bound check (ByteChecker) is done on them
// too: saturating subtraction of (bound - 1) per byte, ORed into an accumulator that the row
// pass tests once per row (bytes of the window beyond its groups get the limit 255).
template <int D>
struct BlockScales {
  static constexpr int kBytes = bytes_per_group(D);
  static constexpr int kWindowGroups = 16 * kBytes <= 128 ? 16 : 8;
  // bytes read from the first group of a block
  static constexpr int kReach = (16 / kWindowGroups - 1) * kWindowGroups * kBytes + 128;
  __m512i dword, tail_byte, codebook_low, codebook_high, limit_low, limit_high;

  TRITLLM_TARGET_AVX512 explicit BlockScales(const PackedWeight& w) {
    alignas(64) int32_t dwords[16], tail_bytes[16];
    alignas(64) float codebook[32];
    alignas(64) uint8_t limits[128];
    for (int b = 0; b < 128; ++b) {
      limits[b] = b < kWindowGroups * kBytes
                      ? static_cast<uint8_t>(byte_bound(D, b % kBytes) - 1)
                      : 255;
    }
    limit_low = _mm512_load_si512(limits);
    limit_high = _mm512_load_si512(limits + 64);
    for (int k = 0; k < 16; ++k) {
      const int offset = (k % kWindowGroups) * kBytes + 3 * D;  // in the group's window
      dwords[k] = offset / 4;
      // byte 0 of 32-bit lane k <- byte offset % 4 of the lane, zeros above
      const uint32_t byte = static_cast<uint32_t>(4 * (k % 4) + offset % 4);
      tail_bytes[k] = static_cast<int32_t>(0x80808000u | byte);
    }
    for (int i = 0; i < 32; ++i) codebook[i] = i < w.codebook_size ? w.codebook[i] : 0.0f;
    dword = _mm512_load_si512(dwords);
    tail_byte = _mm512_load_si512(tail_bytes);
    codebook_low = _mm512_castps_si512(_mm512_load_ps(codebook));
    codebook_high = _mm512_castps_si512(_mm512_load_ps(codebook + 16));
  }

  // codebook[t_k % 27] of groups k = 0..15 of the block at `block`; notes the largest scale
  // index in `largest` (per lane) and out-of-bound bytes in `over`.
  TRITLLM_TARGET_AVX512 __attribute__((always_inline)) __m512 operator()(
      const uint8_t* block, __m512i& largest, __m512i& over) const {
    __m512i tails = window(block, over);
    if (kWindowGroups == 8) {
      tails = _mm512_mask_mov_epi32(tails, 0xFF00, window(block + 8 * kBytes, over));
    }
    tails = _mm512_shuffle_epi8(tails, tail_byte);
    const __m512i quotient = _mm512_mulhi_epu16(tails, _mm512_set1_epi32(digit_magic(2)));
    const __m512i index =
        _mm512_sub_epi32(tails, _mm512_mullo_epi16(quotient, _mm512_set1_epi32(27)));
    largest = _mm512_max_epu32(largest, index);
    return _mm512_permutex2var_ps(_mm512_castsi512_ps(codebook_low), index,
                                  _mm512_castsi512_ps(codebook_high));
  }

 private:
  // The dwords holding the tail bytes of the window's groups (lanes beyond the window: junk);
  // checks the window's bytes.
  TRITLLM_TARGET_AVX512 __attribute__((always_inline)) __m512i window(const uint8_t* first,
                                                                    __m512i& over) const {
    const __m512i low = _mm512_loadu_si512(first), high = _mm512_loadu_si512(first + 64);
    over = _mm512_ternarylogic_epi64(over, _mm512_subs_epu8(low, limit_low),
                                     _mm512_subs_epu8(high, limit_high), 0xFE);  // a | b | c
    return _mm512_permutex2var_epi32(low, dword, high);
  }
};

// A unit of 4 L groups (activations.h, unit order) decoded into kRegs registers of quotients Q
// (decode.h, without the offsets o) and multiplied with the unit-order integers: the first
// register by vpmaddwd, the others by vpdpwssd into the same 32-bit lanes, so that each lane
// sums 2 kRegs products of one group (exact in int32: |Q| <= 242 (3^D - 1) / 2, |x'| <= 4 Q_act,
// so at most 8 * 968 * 4 * 8191 at depth 2 and 4 * 9680 * 4 * 6800 at depth 4). A group then
// spans 2 (depths 1, 2) or 4 (depths 3, 4) lanes instead of the 8 of pair_step: a quarter or
// half of its conversions, FMAs and scale permutes, and its multiply-adds accumulate without
// separate adds.
// The unit's bytes come from one 64-byte load: a dword permute moves the bytes of lane k's groups
// (4 L B bytes from the unit's start at most 56) into lane k, where they start at byte
// (k L B) % 4; the quotient routes of decode.h, shifted by that and by h B for group h of the
// lane, pick them.
template <int D>
struct UnitDecoder {
  static constexpr int kBytes = bytes_per_group(D);
  static constexpr int kLaneGroups = unit_lane_groups(D);  // L
  static constexpr int kGroups = 4 * kLaneGroups;          // groups per unit
  static constexpr int kWidth = 8 / kLaneGroups;           // W: weights of a group per register
  static constexpr int kRegs = kGroupSize / kWidth;
  __m512i gather, shuffle[kRegs][D], magic[kRegs][D];
  // unit u of a block of 16 groups reads the scale of its 32-bit lane l from block lane
  // scale_lanes[u][l]
  __m512i scale_lanes[16 / kGroups];

  TRITLLM_TARGET_AVX512 UnitDecoder() {
    alignas(64) int32_t dwords[16];
    int start[4];  // byte of lane k's first group in the lane after the permute
    for (int k = 0; k < 4; ++k) {
      const int first = k * kLaneGroups * kBytes;
      for (int i = 0; i < 4; ++i) dwords[4 * k + i] = first / 4 + i;
      start[k] = first % 4;
    }
    gather = _mm512_load_si512(dwords);
    for (int p = 0; p < D; ++p) {
      const PlaneRoute route = quotient_route(D, p);
      alignas(32) uint8_t group_shuffle[32];
      alignas(32) uint16_t group_magic[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(group_shuffle), route.shuffle);
      _mm256_store_si256(reinterpret_cast<__m256i*>(group_magic), route.magic);
      for (int r = 0; r < kRegs; ++r) {
        alignas(64) uint8_t bytes[64];
        alignas(64) uint16_t magics[32];
        for (int k = 0; k < 4; ++k) {
          for (int h = 0; h < kLaneGroups; ++h) {
            for (int w = 0; w < kWidth; ++w) {
              const int j = r * kWidth + w, lane = 8 * k + kWidth * h + w;
              for (int half = 0; half < 2; ++half) {
                const uint8_t b = group_shuffle[2 * j + half];
                bytes[2 * lane + half] =
                    b == 0x80 ? 0x80 : static_cast<uint8_t>(b + start[k] + h * kBytes);
              }
              magics[lane] = group_magic[j];
            }
          }
        }
        shuffle[r][p] = _mm512_load_si512(bytes);
        magic[r][p] = _mm512_load_si512(magics);
      }
    }
    for (int u = 0; u < 16 / kGroups; ++u) {
      for (int l = 0; l < 16; ++l) {
        // 32-bit lane l: 128-bit lane l / 4, 16-bit lanes 2 (l % 4) and 2 (l % 4) + 1
        dwords[l] = u * kGroups + (l / 4) * kLaneGroups + (2 * (l % 4)) / kWidth;
      }
      scale_lanes[u] = _mm512_load_si512(dwords);
    }
  }

  // sum over products of one group per 32-bit lane, for the unit at `unit` with its unit-order
  // integers at `integers`
  TRITLLM_TARGET_AVX512 __attribute__((always_inline)) __m512i operator()(
      const uint8_t* unit, const int16_t* integers) const {
    const __m512i bytes = _mm512_permutexvar_epi32(gather, _mm512_loadu_si512(unit));
    __m512i dot = _mm512_setzero_si512();
    for (int r = 0; r < kRegs; ++r) {
      __m512i q = plane_quotients(bytes, r, D - 1);
      for (int p = D - 2; p >= 0; --p) {
        // 3q as q + q + q: the multiplier ports are the busiest in this loop
        q = _mm512_add_epi16(_mm512_add_epi16(_mm512_add_epi16(q, q), q),
                             plane_quotients(bytes, r, p));
      }
      const __m512i x = _mm512_loadu_si512(integers + 32 * r);
      dot = r == 0 ? _mm512_madd_epi16(q, x) : _mm512_dpwssd_epi32(dot, q, x);
    }
    return dot;
  }

 private:
  TRITLLM_TARGET_AVX512 __attribute__((always_inline)) __m512i plane_quotients(__m512i bytes, int r,
                                                                             int p) const {
    return _mm512_mulhi_epu16(_mm512_shuffle_epi8(bytes, shuffle[r][p]), magic[r][p]);
  }
};

template <int D>
TRITLLM_TARGET_AVX512 bool row_pass_avx512(const Context<D>& c, int64_t m, int64_t n0, int64_t n1,
                                           bool check) {
  constexpr int kBytes = bytes_per_group(D);
  using Units = UnitDecoder<D>;
  // bytes read from the first group of a block: its tail windows, its last unit's load
  constexpr int kReach = BlockScales<D>::kReach > (16 - Units::kGroups) * kBytes + 64
                             ? BlockScales<D>::kReach
                             : (16 - Units::kGroups) * kBytes + 64;
  const WideQuotientDecoder<D> wide;
  const BlockScales<D> block_scales(c.w);
  const Units units;
  const QuotientDecoder<D> decode = c.decode;  // for a last, odd group
  const int64_t groups = c.w.groups();
  const int64_t row_bytes = c.w.row_bytes();
  const uint8_t* const end = c.w.bytes + c.w.out_features * row_bytes;
  const uint8_t* const index = c.tables.index;
  const int16_t* const integers = c.layout.integers(c.a.prepared, m);
  const float* const step = c.layout.step(c.a.prepared, m);
  const float* const offset_dot = c.layout.offset_dot(c.a.prepared, m);
  const int16_t* const unit_integers = c.layout.unit_integers(c.a.prepared, m);
  const float* const table = c.layout.scale_table(c.a.prepared, m);
  unsigned largest_index = 0;
  __m512i largest = _mm512_setzero_si512();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = c.w.row(n);
    // blocks of 16 groups and then pairs of groups whose loads stay inside the buffer
    int64_t blocks_end = groups / 16 * 16, direct = groups;
    if (end - row < (blocks_end - 16) * kBytes + kReach) {
      blocks_end = end - row >= kReach ? ((end - row - kReach) / kBytes / 16 + 1) * 16 : 0;
      blocks_end = blocks_end < groups / 16 * 16 ? blocks_end : groups / 16 * 16;
    }
    if (end - row < groups * kBytes + 16) {
      direct = end - row >= 16 + kBytes ? (end - row - 16) / kBytes : 0;
    }
    const int64_t later = n + kPrefetchRows < c.w.out_features ? n + kPrefetchRows : n;
    const char* ahead = reinterpret_cast<const char*>(c.w.row(later));
    // two accumulators: consecutive units do not wait for each other's FMA
    __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
    __m512i over = _mm512_setzero_si512();  // nonzero: a byte of the blocks is out of bounds
    int64_t g = 0;
    for (; g < blocks_end; g += 16) {
      const uint8_t* block = row + g * kBytes;
      for (int offset = 0; offset < 16 * kBytes; offset += 64) {
        _mm_prefetch(ahead + g * kBytes + offset, _MM_HINT_T0);
      }
      const __m512 scales =
          _mm512_mul_ps(block_scales(block, largest, over), _mm512_loadu_ps(step + g));
      // the units below decode Q without the offsets o: subtract sum_j o_j x'_j per group here
      odd = _mm512_fnmadd_ps(scales, _mm512_loadu_ps(offset_dot + g), odd);
      for (int u = 0; u < 16 / Units::kGroups; ++u) {
        const int64_t first = g + u * Units::kGroups;
        const __m512i dot = units(row + first * kBytes, unit_integers + kGroupSize * first);
        __m512& acc = u % 2 == 0 ? even : odd;
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                              _mm512_permutexvar_ps(units.scale_lanes[u], scales), acc);
      }
    }
    if (check && !(_mm512_test_epi64_mask(over, over) == 0 &&
                   c.checker.ok(row + g * kBytes, row_bytes - g * kBytes))) {
      return false;
    }
    for (; g + 1 < direct; g += 2) {
      pair_step<D>(wide, row + g * kBytes, g, index, integers, table, even, largest_index);
    }
    __m256 rest = _mm256_setzero_ps();
    for (; g < groups; ++g) {
      const uint8_t* group = row + g * kBytes;
      group_step<D>(decode, c.load(group), group[3 * D], g, index, integers, table, rest,
                    largest_index);
    }
    c.y[m * c.w.out_features + n] =
        _mm512_reduce_add_ps(_mm512_add_ps(even, odd)) + horizontal_sum(rest);
  }
  const unsigned largest_in_blocks = _mm512_reduce_max_epu32(largest);
  if (largest_in_blocks > largest_index) largest_index = largest_in_blocks;
  return !(check && largest_index >= c.w.codebook_size);
}

template <int D, bool kAvx512>
bool row_passes(const Context<D>& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1, bool check) {
  for (int64_t m = m0; m < m1; ++m) {
    if (!(kAvx512 ? row_pass_avx512(c, m, n0, n1, check) : row_pass(c, m, n0, n1, check))) {
      return false;
    }
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
constexpr int kStripRows = 8;  // even: the AVX-512 kernel takes rows in pairs

// Rows [n, n + rows) of W over blocks [b0, b1) (block = b - b0), decoded and transposed: pair j
// (weights 2j, 2j+1) of group 8b + k of row i at quotients(i, block, j)[2k], its scale at
// scales(i, block)[k]. Rows 2p and 2p + 1 are stored side by side (32 quotients, 16 scales), so
// that the AVX-512 kernel reads both with one 512-bit load.
class DecodedStrip {
 public:
  int16_t* quotients(int64_t i, int64_t block, int j) {
    return quotients_ + ((((i / 2) * kChunkBlocks + block) * 8 + j) * 2 + i % 2) * 16;
  }
  const int16_t* quotients(int64_t i, int64_t block, int j) const {
    return const_cast<DecodedStrip*>(this)->quotients(i, block, j);
  }
  float* scales(int64_t i, int64_t block) {
    return scales_ + (((i / 2) * kChunkBlocks + block) * 2 + i % 2) * 8;
  }
  const float* scales(int64_t i, int64_t block) const {
    return const_cast<DecodedStrip*>(this)->scales(i, block);
  }

 private:
  alignas(64) int16_t quotients_[kStripRows * kChunkBlocks * 8 * 16];
  alignas(64) float scales_[kStripRows * kChunkBlocks * 8];
};

// The chunk [first, last) of row i of the strip (row n + i of W): fetches the same chunk of the
// next strip's row (short pieces of many rows, which the hardware prefetcher does not fetch ahead
// by itself) and checks its bytes (if `check`).
template <int D>
__attribute__((always_inline)) inline bool fetch_and_check(const Context<D>& c, int64_t n,
                                                          int64_t i, int64_t first, int64_t last,
                                                          bool check) {
  if (n + kStripRows + i < c.w.out_features) {
    const char* next = reinterpret_cast<const char*>(c.w.row(n + kStripRows + i));
    for (int64_t offset = first; offset < last; offset += 64) {
      _mm_prefetch(next + offset, _MM_HINT_T0);
    }
  }
  return !check || c.checker.ok(c.w.row(n + i) + first, last - first);
}

// Block b of `row` into row i of the strip; notes the largest scale index.
template <int D>
__attribute__((always_inline)) inline void decode_block(const Context<D>& c,
                                                       const QuotientDecoder<D>& decode,
                                                       const uint8_t* row, int64_t i, int64_t b,
                                                       int64_t b0, DecodedStrip& strip,
                                                       unsigned& largest_index) {
  constexpr int kBytes = bytes_per_group(D);
  const int64_t groups = c.w.groups();
  float* scales = strip.scales(i, b - b0);
  __m256i q[8];
  for (int k = 0; k < 8; ++k) {
    const int64_t g = 8 * b + k;
    if (g >= groups) {  // padding groups of the last block
      q[k] = _mm256_setzero_si256();
      scales[k] = 0.0f;
      continue;
    }
    const uint8_t* group = row + g * kBytes;
    q[k] = decode(c.load(group));
    const unsigned tail0 = group[3 * D];
    const unsigned index = c.tables.index[tail0];
    largest_index = index > largest_index ? index : largest_index;
    scales[k] = c.tables.scale[tail0];
  }
  transpose8x32(q);
  for (int j = 0; j < 8; ++j) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(strip.quotients(i, b - b0, j)), q[j]);
  }
}

template <int D>
bool decode_strip(const Context<D>& c, int64_t n, int64_t rows, int64_t b0, int64_t b1,
                  bool check, DecodedStrip& strip) {
  constexpr int kBytes = bytes_per_group(D);
  const QuotientDecoder<D> decode = c.decode;
  unsigned largest_index = 0;
  const int64_t first = b0 * 8 * kBytes;
  const int64_t last = b1 * 8 < c.w.groups() ? b1 * 8 * kBytes : c.w.row_bytes();
  for (int64_t i = 0; i < rows; ++i) {
    if (!fetch_and_check(c, n, i, first, last, check)) return false;
    const uint8_t* row = c.w.row(n + i);
    for (int64_t b = b0; b < b1; ++b) decode_block(c, decode, row, i, b, b0, strip, largest_index);
  }
  return !(check && largest_index >= c.w.codebook_size);
}

// transpose8x32 (decode.h) on both 256-bit halves of eight 512-bit registers at once.
TRITLLM_TARGET_AVX512 __attribute__((always_inline)) inline void transpose8x32_halves(
    __m512i r[8]) {
  __m512i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // per 256-bit half: [low 128 bits of u[j], low 128 bits of u[j + 4]] and the high ones
  const __m512i low = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i high = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_permutex2var_epi64(u[j], low, u[j + 4]);
    r[j + 4] = _mm512_permutex2var_epi64(u[j], high, u[j + 4]);
  }
}

// decode_strip with AVX-512 where two blocks (16 groups) are whole and their bytes lie inside the
// buffer: WideQuotientDecoder<D, 8> puts groups 8b + k and 8(b + 1) + k in one register, one
// 512-bit transpose (two 8x8 transposes side by side) gives both blocks, and BlockScales finds
// their 16 scales at once. Its constants are made once per tile (StripDecoderAvx512), not per
// strip.
template <int D>
struct StripDecoderAvx512 {
  WideQuotientDecoder<D, 8> decode;
  BlockScales<D> scales;
  TRITLLM_TARGET_AVX512 explicit StripDecoderAvx512(const PackedWeight& w) : scales(w) {}
};

template <int D>
TRITLLM_TARGET_AVX512 bool decode_strip_avx512(const Context<D>& c,
                                               const StripDecoderAvx512<D>& constants, int64_t n,
                                               int64_t rows, int64_t b0, int64_t b1, bool check,
                                               DecodedStrip& strip) {
  constexpr int kBytes = bytes_per_group(D);
  // local copies: the compiler keeps them in registers
  const WideQuotientDecoder<D, 8> wide = constants.decode;
  const BlockScales<D> block_scales = constants.scales;
  const QuotientDecoder<D> decode = c.decode;
  const int64_t groups = c.w.groups();
  const uint8_t* const end = c.w.bytes + c.w.out_features * c.w.row_bytes();
  unsigned largest_index = 0;
  __m512i largest = _mm512_setzero_si512();
  __m512i over = _mm512_setzero_si512();  // not needed: the chunk's bytes are checked below
  const int64_t first = b0 * 8 * kBytes;
  const int64_t last = b1 * 8 < groups ? b1 * 8 * kBytes : c.w.row_bytes();
  for (int64_t i = 0; i < rows; ++i) {
    if (!fetch_and_check(c, n, i, first, last, check)) return false;
    const uint8_t* row = c.w.row(n + i);
    int64_t b = b0;
    for (; b + 1 < b1 && 8 * (b + 2) <= groups; b += 2) {
      const uint8_t* block = row + 8 * b * kBytes;
      if (end - block < BlockScales<D>::kReach) break;
      const __m512 scales = block_scales(block, largest, over);
      _mm256_store_ps(strip.scales(i, b - b0), _mm512_castps512_ps256(scales));
      _mm256_store_ps(strip.scales(i, b + 1 - b0), _mm512_extractf32x8_ps(scales, 1));
      __m512i q[8];
      for (int k = 0; k < 8; ++k) q[k] = _mm512_sub_epi16(wide(block + k * kBytes), wide.offsets);
      transpose8x32_halves(q);
      for (int j = 0; j < 8; ++j) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(strip.quotients(i, b - b0, j)),
                           _mm512_castsi512_si256(q[j]));
        _mm256_store_si256(reinterpret_cast<__m256i*>(strip.quotients(i, b + 1 - b0, j)),
                           _mm512_extracti64x4_epi64(q[j], 1));
      }
    }
    for (; b < b1; ++b) decode_block(c, decode, row, i, b, b0, strip, largest_index);
  }
  const unsigned largest_in_pairs = _mm512_reduce_max_epu32(largest);
  if (largest_in_pairs > largest_index) largest_index = largest_in_pairs;
  return !(check && largest_index >= c.w.codebook_size);
}

// Row m of x times rows [i, i + NR) of the strip (rows n + i of W) over blocks [b0, b1); adds
// into y (or sets y when `first`). Per block: 8 steps of one load of x feeding NR int16
// multiply-adds (W straight from the strip in L1) into NR int32 accumulators; then one float
// update per row of W. One row of x against many rows of W
// beats other register blockings here: NR accumulators, x and a temporary fit the 16 AVX2
// registers without spills, and W's loads come from L1.
template <int D, int NR>
void strip_row_product(const Context<D>& c, const DecodedStrip& strip, int64_t i, int64_t m,
                       int64_t n, int64_t b0, int64_t b1, bool first) {
  const int16_t* integers = c.layout.integers(c.a.prepared, m);
  const float* step = c.layout.step(c.a.prepared, m);
  alignas(32) float sums[NR][8] = {};
  for (int64_t b = b0; b < b1; ++b) {
    __m256i dot[NR];
    for (int k = 0; k < NR; ++k) dot[k] = _mm256_setzero_si256();
#pragma GCC unroll 1
    for (int j = 0; j < 8; ++j) {
      const __m256i xj = _mm256_load_si256(reinterpret_cast<const __m256i*>(integers + 128 * b + 16 * j));
      for (int k = 0; k < NR; ++k) {
        const __m256i wj =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(strip.quotients(i + k, b - b0, j)));
        dot[k] = _mm256_add_epi32(dot[k], _mm256_madd_epi16(wj, xj));
      }
    }
    const __m256 s = _mm256_load_ps(step + 8 * b);
    for (int k = 0; k < NR; ++k) {
      const __m256 scale = _mm256_mul_ps(s, _mm256_load_ps(strip.scales(i + k, b - b0)));
      _mm256_store_ps(sums[k], _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[k]), scale, _mm256_load_ps(sums[k])));
    }
  }
  for (int k = 0; k < NR; ++k) {
    float& out = c.y[m * c.w.out_features + n + k];
    const float sum = horizontal_sum(_mm256_load_ps(sums[k]));
    out = first ? sum : out + sum;
  }
}

// ---------------------------------------------------------------------------------------------
// The same product with AVX-512 (F, BW, DQ, VL, VNNI), for the "avx512" kernel set: a 512-bit
// register holds rows 2p and 2p + 1 of the strip, x is broadcast into both halves, and
// vpdpwssd multiplies, adds pairs and accumulates in one instruction (four times the work of
// AVX2's multiply-add + add). MR rows of x share every load of W; each accumulator is split
// over even and odd steps so that consecutive vpdpwssd do not wait for each other.
// Compiled for AVX-512 by a function attribute; called only where the CPU has it.

template <int D, int MR>
TRITLLM_TARGET_AVX512 void strip_product_avx512(const Context<D>& c, const DecodedStrip& strip,
                                                int64_t m, int64_t n, int64_t b0, int64_t b1,
                                                bool first) {
  constexpr int kPairs = kStripRows / 2;
  const int16_t* integers[MR];
  const float* step[MR];
  for (int r = 0; r < MR; ++r) {
    integers[r] = c.layout.integers(c.a.prepared, m + r);
    step[r] = c.layout.step(c.a.prepared, m + r);
  }
  __m512 sums[MR][kPairs];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < kPairs; ++p) sums[r][p] = _mm512_setzero_ps();
  for (int64_t b = b0; b < b1; ++b) {
    __m512i even[MR][kPairs], odd[MR][kPairs];
    for (int r = 0; r < MR; ++r) {
      for (int p = 0; p < kPairs; ++p) even[r][p] = odd[r][p] = _mm512_setzero_si512();
    }
    for (int j = 0; j < 8; ++j) {
      __m512i xj[MR];
      for (int r = 0; r < MR; ++r) {
        xj[r] = _mm512_broadcast_i32x8(
            _mm256_load_si256(reinterpret_cast<const __m256i*>(integers[r] + 128 * b + 16 * j)));
      }
      for (int p = 0; p < kPairs; ++p) {
        const __m512i wj = _mm512_load_si512(strip.quotients(2 * p, b - b0, j));
        for (int r = 0; r < MR; ++r) {
          if (j % 2 == 0) {
            even[r][p] = _mm512_dpwssd_epi32(even[r][p], wj, xj[r]);
          } else {
            odd[r][p] = _mm512_dpwssd_epi32(odd[r][p], wj, xj[r]);
          }
        }
      }
    }
    for (int r = 0; r < MR; ++r) {
      const __m512 s = _mm512_broadcast_f32x8(_mm256_load_ps(step[r] + 8 * b));
      for (int p = 0; p < kPairs; ++p) {
        const __m512 scale = _mm512_mul_ps(s, _mm512_load_ps(strip.scales(2 * p, b - b0)));
        const __m512 value = _mm512_cvtepi32_ps(_mm512_add_epi32(even[r][p], odd[r][p]));
        sums[r][p] = _mm512_fmadd_ps(value, scale, sums[r][p]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int p = 0; p < kPairs; ++p) {
      float* out = c.y + (m + r) * c.w.out_features + n + 2 * p;
      const float low = horizontal_sum(_mm512_castps512_ps256(sums[r][p]));
      const float high = horizontal_sum(_mm512_extractf32x8_ps(sums[r][p], 1));
      out[0] = first ? low : out[0] + low;
      out[1] = first ? high : out[1] + high;
    }
  }
}

// Rows [m0, m1) of x against the strip.
template <int D, bool kAvx512>
void strip_products(const Context<D>& c, const DecodedStrip& strip, int64_t rows, int64_t m0,
                    int64_t m1, int64_t n, int64_t b0, int64_t b1, bool first) {
  if (kAvx512 && rows == kStripRows) {
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) strip_product_avx512<D, 2>(c, strip, m, n, b0, b1, first);
    if (m < m1) strip_product_avx512<D, 1>(c, strip, m, n, b0, b1, first);
    return;
  }
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

// `wide`: the AVX-512 strip decoder's constants (kAvx512), else nullptr.
template <int D, bool kAvx512>
bool blocked_with(const Context<D>& c, const StripDecoderAvx512<D>* wide, int64_t m0, int64_t m1,
                  int64_t n0, int64_t n1, bool check) {
  const int64_t blocks = c.layout.padded_groups / 8;
  DecodedStrip strip;
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
    const int64_t b1 = b0 + kChunkBlocks < blocks ? b0 + kChunkBlocks : blocks;
    for (int64_t n = n0; n < n1; n += kStripRows) {
      const int64_t rows = n + kStripRows <= n1 ? kStripRows : n1 - n;
      bool ok;
      if constexpr (kAvx512) {
        ok = decode_strip_avx512(c, *wide, n, rows, b0, b1, check, strip);
      } else {
        ok = decode_strip(c, n, rows, b0, b1, check, strip);
      }
      if (!ok) return false;
      strip_products<D, kAvx512>(c, strip, rows, m0, m1, n, b0, b1, b0 == 0);
    }
  }
  return true;
}

template <int D, bool kAvx512>
bool blocked(const Context<D>& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1, bool check) {
  if constexpr (kAvx512) {
    const StripDecoderAvx512<D> wide(c.w);
    return blocked_with<D, true>(c, &wide, m0, m1, n0, n1, check);
  } else {
    return blocked_with<D, false>(c, nullptr, m0, m1, n0, n1, check);
  }
}

template <int D, bool kAvx512>
bool matmul_tile_at_depth(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1,
                          int64_t n0, int64_t n1, bool check, float* y) {
  const Context<D> c(a, w, y);
  if (c.layout.blocked) return blocked<D, kAvx512>(c, m0, m1, n0, n1, check);
  return row_passes<D, kAvx512>(c, m0, m1, n0, n1, check);
}

template <bool kAvx512>
bool matmul_tile_with(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1,
                      int64_t n0, int64_t n1, bool check_bytes, float* y) {
  switch (w.depth) {
    case 1: return matmul_tile_at_depth<1, kAvx512>(a, w, m0, m1, n0, n1, check_bytes, y);
    case 2: return matmul_tile_at_depth<2, kAvx512>(a, w, m0, m1, n0, n1, check_bytes, y);
    case 3: return matmul_tile_at_depth<3, kAvx512>(a, w, m0, m1, n0, n1, check_bytes, y);
    default: return matmul_tile_at_depth<4, kAvx512>(a, w, m0, m1, n0, n1, check_bytes, y);
  }
}

}  // namespace

bool matmul_tile(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1, int64_t n0,
                 int64_t n1, bool check_bytes, float* y) {
  return matmul_tile_with<false>(a, w, m0, m1, n0, n1, check_bytes, y);
}

bool matmul_tile_avx512(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1,
                        int64_t n0, int64_t n1, bool check_bytes, float* y) {
  return matmul_tile_with<true>(a, w, m0, m1, n0, n1, check_bytes, y);
}

}  // namespace tritllm::cpu::avx2

#endif
