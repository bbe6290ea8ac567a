// The lookup-table decoder of depth-1 and depth-2 groups used by the products that decode
// weights in registers (tile_gemm.cu, lut_gemv.cu). docs/KERNEL_NOTES.md explains the design.
//
// Decoding one group (d = 2: plane bytes P0b0 P0b1 P0b2 P1b0 P1b1 P1b2, tail T; d = 1 has no
// P1 bytes):
//  * A byte v is looked up in a shared-memory table of 256 rows of 256 bytes: half2(c0, c1),
//    half2(c2, c3), its first four digits as float16/bfloat16, in copies of 8 bytes, one per
//    lane (Layout below: 32 copies, or 16, lanes l and l + 16 sharing one, where a kernel needs
//    the room). One byte_perm turns the byte straight into its row offset v * 256 + copy * 8.
//  * The fifth digit rides in bits that are zero in the float16/bfloat16 encodings of 0, 1 and 2
//    (bits 0-6 of each half): c4 in bits 0-1 of the entry's first word and 3 c4 in bits 16-18.
//    One AND clears them for the paired arithmetic, and a P0 entry's first word plus a P1
//    entry's first word shifted down by 16 holds c4(P0b) + 3 c4(P1b) in its low bits: the level
//    of weight 5b + 4 from one shift-add on the integer pipe (it was a multiply-high per byte on
//    the pipe that also runs the paired arithmetic; docs/KERNEL_NOTES.md, session 12).
//  * The levels plus L of weights 5b..5b+3 are c(P0b) + 3 c(P1b): one paired FMA per pair.
//  * The tail holds n15 = T / 27 and idx = T % 27: one multiply-high of the row offset (exact
//    for every byte and lane; tests/test_cuda_ops.py checks the identity), and
//    idx * 256 + copy * 8 is the offset of the scale entry {pair(s, s), pair(-L s, -L s)} in
//    the scale table, 27 rows of 256 bytes laid out like the digit table's.
//  * Each pair of levels n becomes n * s - L * s in one paired FMA, rounded once.
#pragma once

#include "device_common.cuh"

namespace tritllm {
namespace cuda {
namespace lut {

constexpr int kTableRow = 256;  // bytes between table rows (a byte_perm makes v * 256)
constexpr int kDigitTableBytes = 256 * kTableRow;
constexpr int kScaleTableBytes = kMaxCodebook * kTableRow;

// Where the tables lie in shared memory, by the copies of an entry in a row.
//  * 32 copies fill each row, so no two lanes of a warp's lookup share a bank; the scale tables
//    follow the digit table (64 KB + 6.75 KB per codebook).
//  * 16 copies (lanes l and l + 16 share one) fill each row's first half, and the scale tables
//    sit in the digit table's second halves: 64 KB for up to 9 codebooks, which leaves room for
//    tile_gemm's stages of 128 tokens. A warp's 8-byte loads are served in two halves of 128
//    bytes, so a bank is still asked for at most two words per lookup (lanes l and l + 16 reading
//    one copy of two rows), as with 32 copies.
constexpr int kMaxScaleTablesInRows = 256 / kMaxCodebook;  // 9, with 16 copies (below)
template <int kLaneCopies>
struct Layout {
  static_assert(kLaneCopies == 16 || kLaneCopies == 32, "16 or 32 copies");
  static constexpr int kCopiesBytes = kLaneCopies * 8;
  // Bytes of the digit table and `scale_tables` scale tables.
  static constexpr size_t bytes(int scale_tables) {
    return kLaneCopies == 32 ? size_t(kDigitTableBytes) + size_t(scale_tables) * kScaleTableBytes
                             : size_t(kDigitTableBytes);
  }
  // Offset of scale table s from the digit table's start.
  __host__ __device__ static constexpr uint32_t scale_table_offset(int s) {
    return (kLaneCopies == 32 ? kDigitTableBytes : kCopiesBytes) + uint32_t(s) * kScaleTableBytes;
  }
  // Offset of lane `lane`'s copy within a row (< 256, see table_address).
  __device__ static uint32_t lane_offset(int lane) { return (lane % kLaneCopies) * 8; }
};

// floor(a / (27 * 256)) for a row offset a = v * 256 + copy * 8: it equals v / 27 for every
// byte v and copy (tests/test_cuda_ops.py).
constexpr uint32_t kDiv27Rows = 621379;  // ceil(2^32 / 6912)
// The bits of an entry's first word that hold the byte's fifth digit c4 (bits 0-1) and 3 c4
// (bits 16-18); see the top.
constexpr uint32_t kFifthDigitBits = 0x00070003u;

// Paired 16-bit arithmetic and the tensor-core product for each activation type, on pairs held
// in 32-bit registers. A level n (0..12) becomes a number by writing it into the mantissa of
// kMagic (n + kMagicValue exactly) and subtracting kMagicValue.
template <typename T>
struct Pair;

template <>
struct Pair<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024)
  static constexpr float kMagicValue = 1024.f;
  static constexpr uint32_t kOne = 0x3C00u, kTwo = 0x4000u;  // 1 and 2 as bits
  __device__ static __forceinline__ __half2 as(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }
  __device__ static __forceinline__ uint32_t bits(__half2 v) { return *reinterpret_cast<uint32_t*>(&v); }
  __device__ static __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    return bits(__hfma2(as(a), as(b), as(c)));
  }
  __device__ static __forceinline__ uint32_t fma(uint32_t a, float b, uint32_t c) {
    return bits(__hfma2(as(a), __float2half2_rn(b), as(c)));
  }
  __device__ static __forceinline__ uint32_t add(uint32_t a, float b) {
    return bits(__hadd2(as(a), __float2half2_rn(b)));
  }
  __device__ static __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
  }
};

template <>
struct Pair<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bfloat162(128, 128)
  static constexpr float kMagicValue = 128.f;
  static constexpr uint32_t kOne = 0x3F80u, kTwo = 0x4000u;
  __device__ static __forceinline__ __nv_bfloat162 as(uint32_t v) {
    return *reinterpret_cast<__nv_bfloat162*>(&v);
  }
  __device__ static __forceinline__ uint32_t bits(__nv_bfloat162 v) {
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    return bits(__hfma2(as(a), as(b), as(c)));
  }
  __device__ static __forceinline__ uint32_t fma(uint32_t a, float b, uint32_t c) {
    return bits(__hfma2(as(a), __float2bfloat162_rn(b), as(c)));
  }
  __device__ static __forceinline__ uint32_t add(uint32_t a, float b) {
    return bits(__hadd2(as(a), __float2bfloat162_rn(b)));
  }
  __device__ static __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
  }
};

// Fills the digit table at `table` (Layout<kLaneCopies>); all threads of the block take part,
// and the caller synchronizes before use. The fifth digit goes into the first word (see the top).
template <typename T, int kLaneCopies>
__device__ __forceinline__ void build_digit_table(uint8_t* table) {
  using P = Pair<T>;
  constexpr int kStores = Layout<kLaneCopies>::kCopiesBytes / 16;  // per row, two copies each
  auto bits = [](uint32_t digit) { return digit == 0 ? 0u : digit == 1 ? P::kOne : P::kTwo; };
  for (int e = threadIdx.x; e < 256 * kStores; e += blockDim.x) {
    const uint32_t v = e / kStores;
    const uint32_t c4 = trit_digit(v, 4);
    const uint32_t lo = (bits(trit_digit(v, 0)) | c4) | (bits(trit_digit(v, 1)) | 3 * c4) << 16;
    const uint32_t hi = bits(trit_digit(v, 2)) | bits(trit_digit(v, 3)) << 16;
    reinterpret_cast<uint4*>(table + v * kTableRow)[e % kStores] = make_uint4(lo, hi, lo, hi);
  }
}

// Fills scale table `s` of the tables at `table` with one codebook, as build_digit_table.
template <int DEPTH, typename T, int kLaneCopies>
__device__ __forceinline__ void build_scale_table(uint8_t* table, int s,
                                                  const float* __restrict__ codebook,
                                                  int codebook_size) {
  constexpr int kStores = Layout<kLaneCopies>::kCopiesBytes / 16;
  uint8_t* scales = table + Layout<kLaneCopies>::scale_table_offset(s);
  for (int e = threadIdx.x; e < kMaxCodebook * kStores; e += blockDim.x) {
    const int idx = e / kStores;
    // Indices >= codebook_size occur only in corrupt data: any finite scale will do.
    const float scale = to_float(from_float<T>(idx < codebook_size ? codebook[idx] : 0.f));
    const float minus_ls = -max_level(DEPTH) * scale;  // exact: L is 1 or 4
    const uint32_t s2 = pack2<T>(scale, scale), o2 = pack2<T>(minus_ls, minus_ls);
    reinterpret_cast<uint4*>(scales + idx * kTableRow)[e % kStores] = make_uint4(s2, o2, s2, o2);
  }
}

// Byte `byte` of a lane's bytes (held in 32-bit words) -> its table address byte * 256 +
// lane_offset (< 256).
// Called from fully unrolled loops, so `byte` is a constant and this is one PRMT.
template <int kWords>
__device__ __forceinline__ uint32_t table_address(const uint32_t (&word)[kWords], int byte,
                                                  uint32_t lane_offset) {
  return __byte_perm(word[byte / 4], lane_offset, 0x5504u | ((byte % 4) << 4));
}

// 8-byte entry at `offset` of a table whose shared-space address is `table` (the sum folds into
// the load's addressing when `table` is warp-uniform).
__device__ __forceinline__ uint2 load_entry(uint32_t table, uint32_t offset) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(table + offset));
  return v;
}

// Sixteen values of one group as pairs in natural order, (x0 x1) (x2 x3) ... (x14 x15) -> the
// same values in the pair order of decode_group_pairs below, so that slot i of the decoded
// weights meets slot i of the activations in a tensor-core product.
__device__ __forceinline__ void slot_order(const uint32_t (&natural)[8], uint32_t (&slot)[8]) {
  slot[0] = natural[0];                                   // x0 x1
  slot[1] = natural[1];                                   // x2 x3
  slot[2] = __byte_perm(natural[2], natural[3], 0x5432);  // x5 x6
  slot[3] = __byte_perm(natural[3], natural[4], 0x5432);  // x7 x8
  slot[4] = natural[5];                                   // x10 x11
  slot[5] = natural[6];                                   // x12 x13
  slot[6] = __byte_perm(natural[2], natural[4], 0x7610);  // x4 x9
  slot[7] = natural[7];                                   // x14 x15
}

// The group starting at byte `group * B` of a lane's bytes -> its 16 dequantized weights as 8
// pairs, in the order (0,1) (2,3) (5,6) (7,8) (10,11) (12,13) (4,9) (14,15). `digits` and
// `scales` are the shared-space addresses of the digit table and of the weight's scale table,
// `lane_offset` the lane's copy (Layout).
template <int DEPTH, typename T, int kWords>
__device__ __forceinline__ void decode_group_pairs(const uint32_t (&word)[kWords], int group,
                                                   uint32_t lane_offset, uint32_t digits,
                                                   uint32_t scales, uint32_t (&w)[8]) {
  using P = Pair<T>;
  const int first = group * bytes_per_group(DEPTH);
  uint32_t pair[6], fifth[3];  // fifth[b]: the level of weight 5b + 4 in its low bits
#pragma unroll
  for (int b = 0; b < 3; ++b) {  // weights 5b..5b+4
    const uint2 e0 = load_entry(digits, table_address(word, first + b, lane_offset));  // plane 0
    fifth[b] = e0.x;
    pair[2 * b] = e0.x & ~kFifthDigitBits;
    pair[2 * b + 1] = e0.y;
    if (DEPTH == 2) {
      const uint2 e1 = load_entry(digits, table_address(word, first + 3 + b, lane_offset));
      fifth[b] += e1.x >> 16;  // low bits: c4(P0b) + 3 c4(P1b) <= 8
      pair[2 * b] = P::fma(e1.x & ~kFifthDigitBits, 3.f, pair[2 * b]);
      pair[2 * b + 1] = P::fma(e1.y, 3.f, e0.y);
    }
  }
  const uint32_t tail = table_address(word, first + 3 * DEPTH, lane_offset);
  const uint32_t n15 = __umulhi(tail, kDiv27Rows);
  const uint2 scale = load_entry(scales, tail - 27u * 256u * n15);  // {s2, -L*s2}
  // Levels of weights (4, 9) and (14, 15) as numbers: the low bits of two words side by side
  // (one byte_perm) in the mantissas of kMagic, minus kMagicValue.
  auto levels = [](uint32_t lo, uint32_t hi) {
    return P::add((__byte_perm(lo, hi, 0x5410) & 0x000F000Fu) | P::kMagic, -P::kMagicValue);
  };
  const uint32_t q1 = levels(fifth[0], fifth[1]);
  const uint32_t q2 = levels(fifth[2], n15);
#pragma unroll
  for (int i = 0; i < 6; ++i) w[i] = P::fma(pair[i], scale.x, scale.y);
  w[6] = P::fma(q1, scale.x, scale.y);
  w[7] = P::fma(q2, scale.x, scale.y);
}

}  // namespace lut
}  // namespace cuda
}  // namespace tritllm
