// The batch kernel: out [M, N] = x [M, K] @ W.T for 2 to a few hundred tokens at depth 1 and 2,
// a tiled tensor-core product that decodes the packed bytes in registers and never materializes
// W. Measurements and the choice against the other paths: docs/KERNEL_NOTES.md, docs/PERF.md.
//
// Why another kernel. The decode kernel (lut_gemv.cu) keeps each warp's activations in registers
// and re-reads the packed bytes once per 16 tokens; unpack + cuBLAS (gemm.cu) writes and re-reads
// a dense copy of W (16 bits per weight). Here a block decodes each weight once per tile of up
// to 64 tokens (256 on Hopper) and meets it with all of them, so the bytes moved stay near the
// packed 3.5 bits per weight and the work is the tensor cores'.
//
// Tiles. A block owns a tile of 256 rows of W x 64 tokens (8, 16 or 32 when M is that small; all
// sizes: TileShape below) and walks over K in runs of 256 weights (16 groups). For each run it
// stages, with cp.async, the tile's packed bytes (256 x 112 bytes at d = 2) and the tokens' 256
// activations (already put in slot order by slot_order_kernel below) in one of two shared-memory
// buffers, one run ahead. Blocks are persistent (one per SM: the decode tables and the stages
// take 135-221 KB) and take tiles blockIdx.x, + gridDim.x, ...; the token tile is the fastest
// index, so the blocks that share a row tile run at the same time and read its bytes from L2, not
// DRAM. When the tiles alone would leave SMs idle (N small, K large), K is also split, and a
// second kernel adds the float32 partial products in split order (split_sums.cuh), so results
// are deterministic; the split is chosen by an estimate of its time that counts the partials'
// traffic (plan_split).
//
// Warps (mma.sync). Each of the 8 warps owns 32 rows of the tile: two 16-row slabs, the A operand
// of mma.m16n8k16, decoded exactly as in lut_gemv.cu (lane 4g + t decodes groups 4t..4t+3 of rows g
// and g + 8 of a slab with lut::decode_group_pairs; one k-step holds 4 groups). The B operand, 8
// tokens x 16 slots, comes from the staged activations: lane 4g + t needs token g's values of its
// own group, 32 bytes, which is why the activations are stored group by group in slot order, group
// 4t + c of a run at position 4c + t (two 16-byte loads per lane and k-step quarter, from 128
// consecutive bytes for the four lanes of a token). A token's run is padded from 512 to 528 bytes
// so that the 8 lanes of each quarter-warp load hit 32 different banks.
//
// Hopper (an sm_90a build on a compute capability 9.0 GPU; "tile_sync" forces the form above) runs
// the same decoder and tiles with three changes, which make it 1.2-1.6x faster at M = 8-192
// (docs/KERNEL_NOTES.md, session 13):
//  * The products are wgmma (wgmma.cuh): a warpgroup of four warps multiplies its 64 rows (warp
//    w % 4 holds rows 16 (w % 4).. of the slab, in the same A fragments) by all the tile's tokens
//    at once, reading the activations from shared memory itself: no B loads, one instruction per
//    k-step. Group c's products run while group c + 1 decodes into a second register set.
//  * The stages arrive by tensor copy (bulk_copy.cuh), not cp.async: thread 0 asks for one box of
//    the tile's bytes (256 rows x one run; rows past the weight land as zeros) and four boxes of
//    activations (the tile's tokens x 128 bytes; tokens past M land as zeros), counted on the
//    stage's mbarrier `landed`. The activations are stored in k-step order (slot_order_kernel)
//    and land 128-byte swizzled, the layout wgmma reads. This removed ~15 cp.async per thread and
//    run whose queued source registers were the first stall at M = 64 (ncu).
//  * No block barrier per run: each warp waits for its stage's `landed` and, when its products
//    of the run are done, arrives on the stage's `consumed`, which thread 0 waits for before it
//    refills the stage; warps drift apart by up to a stage, so one warp's decode overlaps
//    another's products (three stages up to 32 tokens, where they fit: 2-7% faster on the large
//    matrices). 16 warps of one slab up to 64 tokens (the accumulators of 64 tokens fit in 127
//    registers).
//  * From 65 tokens on, tiles of 128 rows x 128 tokens (session 19): 8 warps, two warpgroups of
//    one slab, so the 64 accumulators per lane fit (151 registers), and each weight is decoded
//    once per 128 tokens instead of 64 (28672x4096 at M = 128: 73 against 93 us). A stage of 128
//    tokens is 78 KB; two fit beside the tables only with 16 copies of each table entry (64 KB
//    for the digit and scale tables together, lut::Layout).
//  * From 129 tokens on, tiles of 128 rows x 256 tokens where they are estimated cheaper than
//    twice as many tiles of 128 tokens (session 20; run()): each weight is decoded once per 256
//    tokens, and the accumulators take 128 registers per lane (229 in all). A run's activations
//    (128 KB) would not fit twice, so a run takes two stages, each with half of them (two boxes)
//    and the first with the run's bytes; the lanes keep their bytes in registers for the second.
//    The run's two stages are one loop iteration, so that the first stage's last products still
//    run while the second's first group decodes (the first stage is released and refilled only
//    then); a run drains once, at the loop's end (ptxas waits for all products at a loop's back
//    edge anyway, session 19). 28672x4096 at M = 256: 123 against 145 us, M = 1024: 439 against
//    533 (docs/KERNEL_NOTES.md, session 20).
//
// Why these sizes for mma.sync (bench/gpu_kernels.py, docs/KERNEL_NOTES.md): two slabs per warp let
// each activation load feed two products; 8 warps (2 per scheduler) hide more latency than 4 with
// three stages (28672x4096 at M = 64: 84 against 104 us); the registers (~220 per thread) allow no
// more. The decode dominates at M <= 64 (ncu at M = 8, 28672x4096: tensor pipe 8% busy; the
// FMA-heavy pipe, which runs both the paired 16-bit arithmetic and the integer multiplies, 57%, and
// waits for it the first stall; so lut_decode.cuh takes the fifth digits from its table, not from
// multiplies), and a tile re-decodes its weights for every 64 tokens (256 on Hopper), so from
// about M = 192 on (256-1024 on Hopper, by the weight's size), unpack + cuBLAS is about as fast
// or faster.
//
// The slot-order pass can compute x itself (fused inputs, SlotOrderParams below): a decode step's
// residual add and RMSNorm before q, k, v and gate, up, or SiLU(gate) * up before down, then cost
// no kernel of their own (add_rms_norm_matmul_cat and silu_mul_matmul, csrc/fused_inputs.h).
//
// Several weights that share x (matmul_cat: q, k and v; gate and up) share one slot-order pass and
// one launch, up to kMaxSegments weights per launch. Each weight is a "segment" with its own bytes
// and scale table; the row tiles are numbered across the segments (a segment's last tile may be
// partial, none holds rows of two), so the work split sees one matrix of all their rows, and each
// tile writes its own columns of the output (rows out_stride apart). One launch instead of one per
// weight saves a launch and a split-sum kernel per weight at small M, and lets the tiles of all
// the weights fill the SMs together (gate and up need no K split; 1024-row k and v alone would).
//
// Where the code was built for sm_90+, these kernels and their split sums are launched early
// (dependent_launch.cuh): a launch overlaps the end of the kernel before it, and waits for it
// before reading anything.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <iterator>
#include <limits>

#include "bulk_copy.cuh"
#include "cp_async.cuh"
#include "dependent_launch.cuh"
#include "fused_inputs.cuh"
#include "launchers.h"
#include "lut_decode.cuh"
#include "split_sums.cuh"
#include "wgmma.cuh"

namespace tritllm {
namespace cuda {
namespace {

constexpr int kRunGroups = 16;                       // groups of one K-step of a tile
constexpr int kRunWeights = kRunGroups * kGroupSize;  // 256
constexpr int kGroupsPerLane = 4;                    // lane 4g+t decodes groups 4t..4t+3

// A tile's shape: its tokens, its rows as warps of 16-row slabs, the copies of each lookup table
// entry (lut::Layout), and the stages a run of 256 weights takes. The smallest shape that holds a
// call's tokens runs it, the last one any larger call; why these: the top of the file. A kernel is
// compiled per shape (its index). The copies: 16 where the large stages need the room, and at 32
// and 64 tokens, where they measured 0-4% faster than 32 (session 19, H200); at 16 tokens they
// were 2-3% slower. Two stages per run (half its activations each) where a whole run's would not
// fit twice: 256 tokens x 512 bytes is 128 KB.
// stage_nanos, a stage's time on a busy H200, prices the K split and the choice between 128 and
// 256 tokens (plan_split): measured for 128 and 256 tokens (sessions 19-20), and the 128-token
// figure assumed for the others, where the split's partial sums are small anyway.
struct TileShape {
  int tokens, warps, slabs_per_warp, table_copies, run_parts, stage_nanos;
  constexpr int rows() const { return warps * 16 * slabs_per_warp; }
};
constexpr TileShape kSyncShapes[] = {{8, 16, 1, 32, 1, 2500},
                                     {16, 16, 1, 32, 1, 2500},
                                     {32, 16, 1, 32, 1, 2500},
                                     {64, 8, 2, 32, 1, 2500}};
constexpr TileShape kWgmmaShapes[] = {{8, 16, 1, 32, 1, 2500},  {16, 16, 1, 32, 1, 2500},
                                      {32, 16, 1, 16, 1, 2500}, {64, 16, 1, 16, 1, 2500},
                                      {128, 8, 1, 16, 1, 2500}, {256, 8, 1, 16, 2, 2100}};
constexpr int shape_count(bool wgmma) {
  return wgmma ? int(std::size(kWgmmaShapes)) : int(std::size(kSyncShapes));
}
constexpr TileShape shape_at(bool wgmma, int index) {
  return wgmma ? kWgmmaShapes[index] : kSyncShapes[index];
}
// The index of the shape that runs `tokens` tokens.
constexpr int shape_index(int64_t tokens, bool wgmma) {
  int i = 0;
  while (i + 1 < shape_count(wgmma) && tokens > shape_at(wgmma, i).tokens) ++i;
  return i;
}
// The most rows of any shape (tile_gemm_supports bounds the copy offsets by it).
constexpr int max_tile_rows() {
  int most = 0;
  for (const bool wgmma : {false, true})
    for (int i = 0; i < shape_count(wgmma); ++i) most = std::max(most, shape_at(wgmma, i).rows());
  return most;
}
// Shared-memory stages: two for mma.sync; for wgmma three up to 32 tokens (a stage is smaller
// there, and more of them let the warps drift further apart), else two.
__host__ __device__ constexpr int stages_for(bool wgmma, int tile_tokens) {
  return wgmma && tile_tokens <= 32 ? 3 : 2;
}
constexpr int kMaxSegments = 4;  // weights per launch
constexpr int kXRunBytes = kRunWeights * 2;     // one token's run of 16-bit activations
constexpr int kXRowStride = kXRunBytes + 16;    // padded: conflict-free B loads (see above)
constexpr int kXBoxBytes = 128;                 // wgmma: a token's run lands in 4 boxes of 128
constexpr int kSwizzleAtom = 1024;              // ... as 1024-byte-aligned 128-byte swizzle atoms

__host__ __device__ constexpr int run_bytes(int depth) {
  return kRunGroups * bytes_per_group(depth);
}
// A stage: the tile's packed bytes of one run and its tokens' activations of that run (of a part
// of it, where a run takes several stages: then only the first part's stage holds the bytes).
// mma.sync: the bytes, then the tokens' padded runs. wgmma: the activations first (whole swizzle
// atoms), then the bytes (a tile's rows x run bytes is a multiple of 1024 too).
__host__ __device__ constexpr int x_stage_bytes(TileShape shape, bool wgmma) {
  return shape.tokens * (wgmma ? kXRunBytes / shape.run_parts : kXRowStride);
}
__host__ __device__ constexpr int stage_bytes(int depth, TileShape shape, bool wgmma) {
  return shape.rows() * run_bytes(depth) + x_stage_bytes(shape, wgmma);
}
// The lookup tables (the digit table and one scale table per segment), then the stages (for
// wgmma from the next 1024-byte boundary, which costs at most 1024 bytes more).
static_assert(kMaxSegments <= lut::kMaxScaleTablesInRows, "16 copies: a scale table per segment");
constexpr size_t tables_bytes(TileShape shape, int segments) {
  return shape.table_copies == 16 ? lut::Layout<16>::bytes(segments)
                                  : lut::Layout<32>::bytes(segments);
}
constexpr size_t shared_bytes(int depth, TileShape shape, int segments, bool wgmma) {
  return tables_bytes(shape, segments) +
         size_t(stages_for(wgmma, shape.tokens)) * stage_bytes(depth, shape, wgmma) +
         (wgmma ? kSwizzleAtom : 0);
}

// The slot-order pass's input (ProductInput in launchers.h): x itself, or computed from other
// tensors as the pass reads them (the fused inputs, fused_inputs.cuh), so that a decode step's
// residual add and RMSNorm, or SiLU-and-multiply, cost no kernel of their own.
struct SlotOrderParams {
  InputPointers input;      // x [tokens, K], or what it is computed from
  void* slots;              // [tokens, groups * 16]
  int64_t in_features;
  int groups;
  bool vector_loads;  // every tensor read is 16-byte aligned, and so is each row (K % 8 == 0)
};
constexpr int kSlotOrderThreads = 256;

// The 16 values of the group at k0 of a row as float: two 16-byte loads where `vector` and the
// group is whole, else one by one, zeros past in_features.
template <typename T>
__device__ __forceinline__ void load_group(const T* __restrict__ row, int64_t k0,
                                           int64_t in_features, bool vector, float (&v)[16]) {
  if (vector && k0 + kGroupSize <= in_features) {
    uint4 raw[2];
    raw[0] = reinterpret_cast<const uint4*>(row + k0)[0];
    raw[1] = reinterpret_cast<const uint4*>(row + k0)[1];
    const T* values = reinterpret_cast<const T*>(raw);
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = to_float(values[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = k0 + i < in_features ? to_float(row[k0 + i]) : 0.f;
  }
}

// input [tokens, in_features] -> slots [tokens, groups * 16]: each group's 16 activations in the
// pair order of lut::decode_group_pairs, zeros past in_features, placed within their run of 16
// groups for the B operand (see the top): for mma.sync, group 4t + c at position 4c + t; for
// wgmma, pair i of group 4t + c is 32-bit word t of half i % 2 of k-step 4c + i / 2. One thread
// per (token, group): block (x, y) takes groups [256 x, 256 x + 256) of token y, so that no
// thread divides its index by the group count (a 64-bit division is a subroutine call on the
// GPU). kAddRmsNorm: every block of a token first computes the token's RMSNorm factor over its
// whole row (the same in each: add_and_rms_factor) and writes h + delta for its own groups; at
// K = 4096 a token is one block.
template <typename T, bool kWgmma>
__global__ void __launch_bounds__(kSlotOrderThreads)
    slot_order_kernel(const __grid_constant__ SlotOrderParams p) {
  constexpr int kWarps = kSlotOrderThreads / 32;
  constexpr int kGroupVectors = kGroupSize * sizeof(T) / 16;  // 16-byte vectors of a group
  __shared__ float warp_sums[kWarps];
  const int group = blockIdx.x * kSlotOrderThreads + threadIdx.x;
  const int64_t m = blockIdx.y;
  const int64_t k0 = int64_t(group) * kGroupSize;
  wait_for_previous_kernel();  // launched early: the input may come from the kernel before
  let_next_kernel_start();
  float x[16];
  if (p.input.kind == ProductInput::Kind::kAddRmsNorm) {
    const int64_t row = m * p.in_features;
    const T* h = static_cast<const T*>(p.input.x) + row;
    const T* delta = static_cast<const T*>(p.input.delta) + row;
    // (vectors < 2^31: groups < 2^31 by put_in_slot_order)
    const int vectors = int(p.in_features / (16 / sizeof(T)));
    const int share = blockIdx.x * kSlotOrderThreads * kGroupVectors;
    const float rms_factor = add_and_rms_factor<T, kWarps>(
        h, delta, static_cast<T*>(p.input.h_out) + row, p.in_features, p.input.eps, share,
        min(share + kSlotOrderThreads * kGroupVectors, vectors), warp_sums);
    if (group >= p.groups) return;
    float a[16], b[16], weight[16];
    load_group(h, k0, p.in_features, p.vector_loads, a);
    load_group(delta, k0, p.in_features, p.vector_loads, b);
    load_group(static_cast<const T*>(p.input.norm_weight), k0, p.in_features, p.vector_loads, weight);
#pragma unroll
    for (int i = 0; i < 16; ++i)
      x[i] = rms_normed<T>(rounded<T>(a[i] + b[i]), weight[i], rms_factor);
  } else if (p.input.kind == ProductInput::Kind::kSiluMul) {
    if (group >= p.groups) return;
    const T* gate = static_cast<const T*>(p.input.x) + m * 2 * p.in_features;
    float up[16];
    load_group(gate, k0, p.in_features, p.vector_loads, x);
    load_group(gate + p.in_features, k0, p.in_features, p.vector_loads, up);
#pragma unroll
    for (int i = 0; i < 16; ++i) x[i] = silu_mul<T>(x[i], up[i]);
  } else {
    if (group >= p.groups) return;
    load_group(static_cast<const T*>(p.input.x) + m * p.in_features, k0, p.in_features, p.vector_loads,
               x);
  }
  uint32_t natural[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) natural[i] = pack2<T>(x[2 * i], x[2 * i + 1]);
  uint32_t slot[8];
  lut::slot_order(natural, slot);
  const int within = group % kRunGroups;
  T* slots = static_cast<T*>(p.slots);
  if constexpr (kWgmma) {
    const int t = within / 4, c = within % 4;
    uint32_t* run =
        reinterpret_cast<uint32_t*>(slots + (m * p.groups + group - within) * kGroupSize);
#pragma unroll
    for (int i = 0; i < 8; ++i) run[(4 * c + i / 2) * 8 + (i % 2) * 4 + t] = slot[i];
  } else {
    const int position = group - within + (within % 4) * 4 + within / 4;
    uint4* dst = reinterpret_cast<uint4*>(slots + (m * p.groups + position) * kGroupSize);
    dst[0] = make_uint4(slot[0], slot[1], slot[2], slot[3]);
    dst[1] = make_uint4(slot[4], slot[5], slot[6], slot[7]);
  }
}

// One weight of a launch (see "segments" at the top).
struct TileSegment {
  const uint8_t* packed;  // [rows, runs * 16 * B]
  const float* codebook;
  int codebook_size;
  int rows;
  int first_row;       // its first column of out (and of the partial sums)
  int first_row_tile;  // its first row tile, numbered across the segments; INT_MAX if unused
};

// Where a tile sits: its token tile (the fastest index), its row tile (numbered across the
// segments) and its K split.
struct TilePlace {
  int token_tile, row_tile, split;
};

struct TileParams {
  // wgmma only: tensor maps of each segment's packed bytes (boxes of a tile's rows x one run)
  // and of x_slots as bytes (boxes of the tile's tokens x kXBoxBytes, 128-byte swizzle).
  CUtensorMap w_map[kMaxSegments];
  CUtensorMap x_map;
  const void* x_slots;       // [tokens, runs * 256] in slot order
  void* out;                 // [tokens, rows], rows out_stride elements apart
  int64_t out_stride;
  float* split_sums;         // [splits, tokens, rows] when splits > 1
  TileSegment segment[kMaxSegments];
  int segments;
  int tokens;
  int64_t rows;              // of all segments
  int runs;
  int runs_per_split;
  int token_tiles;
  int row_tiles;             // of all segments
  int tiles;                 // token_tiles * row_tiles * splits
  int splits;
  TilePlace step;            // the place of tile gridDim.x: how far a block's next tile is
};

// The place of tile `tile` (token tile fastest, then row tile, then split).
__host__ __device__ inline TilePlace place_of(int tile, int token_tiles, int row_tiles) {
  const int rest = tile / token_tiles;
  return {tile % token_tiles, rest % row_tiles, rest / row_tiles};
}

// The place of the tile `step` tiles after `at`, added digit by digit with carries (each digit of
// `step` is below its base, so one subtraction per digit suffices): no division.
__device__ __forceinline__ TilePlace place_after(TilePlace at, TilePlace step, int token_tiles,
                                                 int row_tiles) {
  at.token_tile += step.token_tile;
  at.row_tile += step.row_tile;
  at.split += step.split;
  if (at.token_tile >= token_tiles) {
    at.token_tile -= token_tiles;
    ++at.row_tile;
  }
  if (at.row_tile >= row_tiles) {
    at.row_tile -= row_tiles;
    ++at.split;
  }
  return at;
}

// The segment that holds row tile `row_tile`: the last one whose first row tile is at or below
// it (unused segments start at INT_MAX). Only the first row tiles are compared; the caller reads
// the one segment it needs.
__device__ __forceinline__ int segment_of(const TileParams& p, int row_tile) {
  int index = 0;
#pragma unroll
  for (int i = 1; i < kMaxSegments; ++i) index += row_tile >= p.segment[i].first_row_tile;
  return index;
}

template <int DEPTH, typename T, bool kWgmma, int kShapeIndex>
__global__ void __launch_bounds__(shape_at(kWgmma, kShapeIndex).warps * 32, 1)
    tile_gemm_kernel(const __grid_constant__ TileParams p) {
  using P = lut::Pair<T>;
  constexpr TileShape kShape = shape_at(kWgmma, kShapeIndex);
  using Tables = lut::Layout<kShape.table_copies>;
  constexpr int kTileTokens = kShape.tokens;
  constexpr int kWarps = kShape.warps;
  constexpr int kSlabsPerWarp = kShape.slabs_per_warp;
  constexpr int kThreads = kWarps * 32;
  constexpr int kWarpRows = 16 * kSlabsPerWarp;
  constexpr int kTileRows = kShape.rows();
  constexpr int kB = bytes_per_group(DEPTH);
  constexpr int kRunBytes = run_bytes(DEPTH);
  constexpr int kTokenTiles = kTileTokens / 8;  // 8-token column blocks of the accumulators
  constexpr int kWBytes = kTileRows * kRunBytes;
  constexpr int kStages = stages_for(kWgmma, kTileTokens);
  constexpr int kStageBytes = stage_bytes(DEPTH, kShape, kWgmma);
  constexpr int kXStageBytes = x_stage_bytes(kShape, kWgmma);
  constexpr int kParts = kShape.run_parts;              // stages per run
  constexpr int kPartGroups = kGroupsPerLane / kParts;  // a lane's groups of a stage (and boxes)
  static_assert(kParts == 1 || kWgmma, "runs in several stages: wgmma only");
  constexpr int kLaneBytes = kGroupsPerLane * kB;  // 28 (d=2) or 16 (d=1) bytes per row
  constexpr int kWords = kLaneBytes / 4;
  constexpr int kWChunks = kWBytes / 16;
  constexpr int kWRounds = (kWChunks + kThreads - 1) / kThreads;
  constexpr int kXChunksPerToken = kXRunBytes / 16;
  constexpr int kXRounds = (kTileTokens * kXChunksPerToken + kThreads - 1) / kThreads;
  static_assert(kWBytes % 16 == 0, "whole 16-byte chunks");

  extern __shared__ __align__(16) uint8_t smem[];
  const uint32_t digits = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  // mma.sync: cp.async copies, each thread waits for its own and a barrier for everyone's.
  // wgmma: tensor copies into 1024-byte-aligned stages, announced by the mbarrier landed[stage];
  // each warp arrives on consumed[stage] when it is done with a stage (see the loop).
  const uint32_t tables_end = digits + uint32_t(Tables::bytes(p.segments));
  const uint32_t stages_at =
      kWgmma ? (tables_end + kSwizzleAtom - 1) & ~uint32_t(kSwizzleAtom - 1) : tables_end;
  uint8_t* stages = smem + (stages_at - digits);
  __shared__ __align__(8) uint64_t landed[kStages], consumed[kStages];
  const uint32_t landed_at = static_cast<uint32_t>(__cvta_generic_to_shared(landed));
  const uint32_t consumed_at = static_cast<uint32_t>(__cvta_generic_to_shared(consumed));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row_stride = int64_t(p.runs) * kRunBytes;
  // wgmma: warp w holds rows 16 (w % 4).. of its warpgroup's 64, which with one slab per warp
  // are the rows 16 w.. that mma.sync gives it too.
  static_assert(!kWgmma || kSlabsPerWarp == 1, "wgmma: one 16-row slab per warp");
  static_assert(!kWgmma || (kWBytes % kSwizzleAtom == 0 && kXStageBytes % kSwizzleAtom == 0),
                "wgmma: stages of whole swizzle atoms");

  // The block's work is a list of items (tile, run, part): tiles blockIdx.x, + gridDim.x, ...,
  // in each tile the runs of its split, and each run in kParts stages. Two cursors walk it: the
  // consumer, and the copy issuer kStages - 1 items ahead. A cursor finds its next tile's place
  // by adding p.step (place_after) and reads that tile's segment when it enters it: no division,
  // one segment read per tile.
  struct Item {
    int tile, first_run, items, i;  // i of the tile's items (runs of its split x kParts)
    TilePlace place;
    int count;              // items before this one (of the block): stage count % kStages
    int stage;
    int segment;
    int segment_row;        // the tile's first row in its segment
    const uint8_t* w_tile;  // the packed bytes of the tile's first row
    int rows;               // rows of the tile that exist (fewer in a segment's last tile)
    int first_row;          // the tile's first column of out
    uint32_t scales;        // shared address of its segment's scale table
  };
  auto enter_tile = [&](Item& it) {  // it.tile and it.place name the tile
    it.i = 0;
    if (it.tile >= p.tiles) return;
    it.first_run = it.place.split * p.runs_per_split;
    it.items = min(p.runs_per_split, p.runs - it.first_run) * kParts;
    const int index = segment_of(p, it.place.row_tile);
    const TileSegment& seg = p.segment[index];
    const int first = (it.place.row_tile - seg.first_row_tile) * kTileRows;  // of the segment
    it.segment = index;
    it.segment_row = first;
    it.w_tile = seg.packed + first * row_stride;
    it.rows = min(seg.rows - first, kTileRows);
    it.first_row = seg.first_row + first;
    it.scales = digits + Tables::scale_table_offset(index);
  };
  auto advance = [&](Item& it) {
    ++it.count;
    it.stage = it.stage == kStages - 1 ? 0 : it.stage + 1;
    if (++it.i == it.items) {
      it.tile += gridDim.x;
      it.place = place_after(it.place, p.step, p.token_tiles, p.row_tiles);
      enter_tile(it);
    }
  };

  // Copy geometry, the same for every item: thread chunk c = threadIdx.x + kThreads * q.
  const int64_t x_stride = int64_t(p.runs) * kXRunBytes;
  int w_row[kWRounds];
  uint32_t w_src[kWRounds];  // < 2^31: tile_gemm_supports bounds the row length
#pragma unroll
  for (int q = 0; q < kWRounds; ++q) {
    const int c = threadIdx.x + kThreads * q;
    const int r = c / (kRunBytes / 16), col = c % (kRunBytes / 16);
    w_row[q] = c < kWChunks ? r : kTileRows;  // kTileRows: no chunk
    w_src[q] = uint32_t(r * row_stride + col * 16);
  }
  // Activation chunk c = threadIdx.x + kThreads * q is 16-byte column `lane` of token
  // warp + kWarps * q (a token's run is 32 chunks, one per lane).
  static_assert(kXChunksPerToken == 32, "one activation chunk per lane");
  const int x_dst0 = kWBytes + warp * kXRowStride + lane * 16;
  const int64_t x_src0 = warp * x_stride + lane * 16;
  const uint8_t* x_bytes = static_cast<const uint8_t*>(p.x_slots);
  auto issue = [&](const Item& it) {
    if constexpr (kWgmma) {
      // One thread asks the copy engine for the run's bytes (one box, in a run's first stage;
      // rows past the segment land as zeros) and the tokens' activations of the stage (four
      // boxes per run; tokens past M land as zeros), once every warp is done with the stage's
      // previous contents.
      if (threadIdx.x != 0 || it.tile >= p.tiles) return;
      const uint32_t stage = stages_at + it.stage * kStageBytes;
      const uint32_t bar = landed_at + 8 * it.stage;
      if (it.count >= kStages)
        mbarrier_wait(consumed_at + 8 * it.stage, (it.count / kStages - 1) & 1);
      const int run = it.first_run + it.i / kParts, part = it.i % kParts;
      mbarrier_expect_bytes(bar, part == 0 ? kStageBytes : kXStageBytes);
      if (part == 0)
        copy_box_to_shared(stage + kXStageBytes, &p.w_map[it.segment], run * kRunBytes,
                           it.segment_row, bar);
#pragma unroll
      for (int a = 0; a < kPartGroups; ++a)
        copy_box_to_shared(stage + a * kTileTokens * kXBoxBytes, &p.x_map,
                           run * kXRunBytes + (part * kPartGroups + a) * kXBoxBytes,
                           it.place.token_tile * kTileTokens, bar);
      return;
    }
    if (it.tile < p.tiles) {
      const int run = it.first_run + it.i;  // (one stage per run)
      uint8_t* dst = stages + it.stage * kStageBytes;
      const uint8_t* w_base = it.w_tile + int64_t(run) * kRunBytes;
#pragma unroll
      for (int q = 0; q < kWRounds; ++q) {
        if (w_row[q] < kTileRows) {
          const bool valid = w_row[q] < it.rows;
          cp_async_16(dst + 16 * (threadIdx.x + kThreads * q), valid ? w_base + w_src[q] : w_base,
                      valid);
        }
      }
      const uint8_t* x_base = x_bytes + int64_t(it.place.token_tile) * kTileTokens * x_stride +
                              int64_t(run) * kXRunBytes;
      const int tokens_left = p.tokens - it.place.token_tile * kTileTokens;
#pragma unroll
      for (int q = 0; q < kXRounds; ++q) {
        const int token = warp + kWarps * q;  // of the tile
        if (kXRounds * kWarps > kTileTokens && token >= kTileTokens) break;
        const bool valid = token < tokens_left;
        cp_async_16(dst + x_dst0 + q * kWarps * kXRowStride,
                    valid ? x_base + x_src0 + q * kWarps * x_stride : x_bytes, valid);
      }
    }
    cp_async_commit();  // one group per item, empty or not, so the wait count below holds
  };

  if (kWgmma && threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(landed_at + 8 * s);
      mbarrier_init(consumed_at + 8 * s, kWarps);
    }
    for (int s = 0; s < p.segments; ++s) prefetch_tensor_map(&p.w_map[s]);
    prefetch_tensor_map(&p.x_map);
  }
  // Launched early: what follows reads the inputs and writes the outputs.
  wait_for_previous_kernel();
  let_next_kernel_start();
  Item ahead{}, item{};
  ahead.tile = item.tile = blockIdx.x;
  ahead.place = item.place = place_of(blockIdx.x, p.token_tiles, p.row_tiles);
  enter_tile(ahead);
  enter_tile(item);
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    issue(ahead);
    advance(ahead);
  }
  // The tables are built while the first copies are in flight.
  lut::build_digit_table<T, kShape.table_copies>(smem);
#pragma unroll
  for (int s = 0; s < kMaxSegments; ++s)
    if (s < p.segments)
      lut::build_scale_table<DEPTH, T, kShape.table_copies>(smem, s, p.segment[s].codebook,
                                                            p.segment[s].codebook_size);
  if constexpr (kWgmma) __syncthreads();  // the tables and mbarriers, before any use
  const uint32_t lane_offset = Tables::lane_offset(lane);

  // acc[s][q]: rows (g, g, g+8, g+8) of slab s x tokens (2t, 2t+1, 2t, 2t+1) + 8q.
  float acc[kSlabsPerWarp][kTokenTiles][4];
#pragma unroll
  for (int s = 0; s < kSlabsPerWarp; ++s)
#pragma unroll
    for (int q = 0; q < kTokenTiles; ++q)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[s][q][r] = 0.f;

  // One iteration per run; a run of kParts stages is unrolled, so that a lane's group of each
  // stage is a constant (its bytes' registers are picked at compile time), and so that wgmma's
  // products of one stage can still run while the next stage's first group decodes: a run's
  // stages after the first release the one before only then, and refill it (the refill waits
  // for every warp's release, so it must not come before this warp's own).
  for (; item.tile < p.tiles;) {
    uint32_t word[kSlabsPerWarp][2][kWords];  // this lane's bytes of rows g and g + 8 per slab
    uint32_t pairs[2][kSlabsPerWarp][2][8];   // wgmma: group c decoded, in pairs[c % 2]
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      if constexpr (kWgmma) {
        mbarrier_wait(landed_at + 8 * item.stage, (item.count / kStages) & 1);
      } else {
        cp_async_wait<kStages - 2>();  // this thread's copies of `item` have landed
        __syncthreads();  // everyone's have; and everyone is done with the stage refilled next
      }
      if (part == 0) {
        issue(ahead);
        advance(ahead);
      }

      const uint8_t* stage = stages + item.stage * kStageBytes;
      if (part == 0) {  // the run's bytes, in its first stage
        const uint8_t* w_stage = stage + (kWgmma ? kXStageBytes : 0);
#pragma unroll
        for (int s = 0; s < kSlabsPerWarp; ++s)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint8_t* mine =
                w_stage + (warp * kWarpRows + s * 16 + g + 8 * h) * kRunBytes + t * kLaneBytes;
            if constexpr (kLaneBytes % 16 == 0) {
#pragma unroll
              for (int q = 0; q < kWords / 4; ++q) {
                const uint4 v = reinterpret_cast<const uint4*>(mine)[q];
                word[s][h][4 * q] = v.x, word[s][h][4 * q + 1] = v.y;
                word[s][h][4 * q + 2] = v.z, word[s][h][4 * q + 3] = v.w;
              }
            } else {
#pragma unroll
              for (int q = 0; q < kWords; ++q)
                word[s][h][q] = reinterpret_cast<const uint32_t*>(mine)[q];
            }
          }
      }
      if constexpr (kWgmma) {
        // Group c's pairs feed the k-steps 4c..4c+3 (the stage's activation box c % kPartGroups);
        // its products run while group c + 1 decodes into the other register set (wait<1>: group
        // c - 1's products are done with theirs).
        static_assert(kXRunBytes / kXBoxBytes == kGroupsPerLane, "a box of activations per group");
        const uint64_t x_desc =
            wgmma::descriptor_128b_swizzle(stages_at + uint32_t(item.stage * kStageBytes));
#pragma unroll
        for (int b = 0; b < kPartGroups; ++b) {
          const int c = part * kPartGroups + b;
#pragma unroll
          for (int s = 0; s < kSlabsPerWarp; ++s)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              lut::decode_group_pairs<DEPTH, T>(word[s][h], c, lane_offset, digits, item.scales,
                                                pairs[c % 2][s][h]);
          wgmma::fence();
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int s = 0; s < kSlabsPerWarp; ++s) {
              const uint32_t(&ws)[2][8] = pairs[c % 2][s];
              const uint32_t a[4] = {ws[0][2 * j], ws[1][2 * j], ws[0][2 * j + 1],
                                     ws[1][2 * j + 1]};
              // k-step 4c + j: box b, 32 j bytes into its rows (the descriptor counts 16 bytes)
              wgmma::mma<T, kTileTokens>(acc[s], a,
                                         x_desc + (b * kTileTokens * kXBoxBytes + 32 * j) / 16);
            }
          wgmma::commit();
          wgmma::wait<1>();
          if (part > 0 && b == 0) {  // the previous stage's last products are done: release it
            __syncwarp();
            if (lane == 0)
              mbarrier_arrive(consumed_at + 8 * (item.stage == 0 ? kStages - 1 : item.stage - 1));
            issue(ahead);
            advance(ahead);
          }
        }
        // Done with the run's last stage once its last products have read it (the bytes were
        // read above).
        if (part == kParts - 1) {
          wgmma::wait<0>();
          __syncwarp();
          if (lane == 0) mbarrier_arrive(consumed_at + 8 * item.stage);
        }
      } else {
        const uint8_t* x_lane = stage + kWBytes + g * kXRowStride + t * 32;
#pragma unroll
        for (int c = 0; c < kGroupsPerLane; ++c) {
          uint32_t w[kSlabsPerWarp][2][8];  // decoded pairs of group 4t + c, rows g and g + 8
#pragma unroll
          for (int s = 0; s < kSlabsPerWarp; ++s)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              lut::decode_group_pairs<DEPTH, T>(word[s][h], c, lane_offset, digits, item.scales,
                                                w[s][h]);
#pragma unroll
          for (int q = 0; q < kTokenTiles; ++q) {
            const uint4* src =
                reinterpret_cast<const uint4*>(x_lane + q * 8 * kXRowStride + c * 128);
            const uint4 lo = src[0], hi = src[1];
            const uint32_t xb[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
              for (int s = 0; s < kSlabsPerWarp; ++s)
                P::mma(acc[s][q], w[s][0][2 * j], w[s][1][2 * j], w[s][0][2 * j + 1],
                       w[s][1][2 * j + 1], xb[2 * j], xb[2 * j + 1]);
          }
        }
      }

      if (part == kParts - 1 && item.i == item.items - 1) {  // the tile's last: write it
        if constexpr (kWgmma) {  // (their wait<0> is above)
#pragma unroll
          for (int s = 0; s < kSlabsPerWarp; ++s)
#pragma unroll
            for (int q = 0; q < kTokenTiles; ++q)
#pragma unroll
              for (int r = 0; r < 4; ++r) wgmma::touch(acc[s][q][r]);
        }
        const int token0 = item.place.token_tile * kTileTokens;
#pragma unroll
        for (int s = 0; s < kSlabsPerWarp; ++s)
#pragma unroll
          for (int q = 0; q < kTokenTiles; ++q)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const int row = warp * kWarpRows + s * 16 + g + 8 * (r / 2);  // of the tile
              const int token = token0 + 8 * q + 2 * t + r % 2;
              if (row < item.rows && token < p.tokens) {
                const int64_t column = int64_t(item.first_row) + row;
                if (p.splits == 1)
                  static_cast<T*>(p.out)[token * p.out_stride + column] =
                      from_float<T>(acc[s][q][r]);
                else
                  p.split_sums[(int64_t(item.place.split) * p.tokens + token) * p.rows + column] =
                      acc[s][q][r];
              }
              acc[s][q][r] = 0.f;
            }
      }
      advance(item);
    }
  }
  if constexpr (!kWgmma) cp_async_wait<0>();
}

// How a call splits K over tiles of `shape`, and its estimated time: the split with the least
// estimated time, the busiest block's stages (ceil(tiles / SMs) x runs per split x stages per run,
// stage_nanos each) plus, when K is split, the float32 partial sums written and read back (at
// ~3 TB/s); ties go to fewer splits. The partials are negligible for a few tokens but not for
// many (session 19: 28672x4096 at M = 256 in two splits took 197 us against ~147 without).
struct SplitPlan {
  int64_t nanos;
  int runs_per_split, splits;
};
SplitPlan plan_split(TileShape shape, int tokens, int row_tiles, int runs, int64_t rows, int sms) {
  constexpr int64_t kPartialBytesPerNano = 3000;
  const int64_t base = int64_t((tokens + shape.tokens - 1) / shape.tokens) * row_tiles;
  SplitPlan best{INT64_MAX, runs, 1};
  for (int splits = 1; splits <= runs; ++splits) {
    const int per_split = (runs + splits - 1) / splits;
    const int used = (runs + per_split - 1) / per_split;
    const int64_t tiles = base * used;
    const int64_t partial_bytes = used > 1 ? int64_t(used) * tokens * rows * 8 : 0;
    const int64_t stages = (tiles + sms - 1) / sms * per_split * shape.run_parts;
    const int64_t nanos = stages * shape.stage_nanos + partial_bytes / kPartialBytesPerNano;
    if (nanos < best.nanos) best = {nanos, per_split, used};
    if (tiles >= 4 * sms) break;  // more splits only add partial sums
  }
  return best;
}

// `slots`: x in slot order (wgmma: the source of p.x_map, made here for this tile size).
template <int DEPTH, typename T, bool kWgmma, int kShapeIndex>
void launch(TileParams p, const at::Tensor& slots, const at::Tensor& out) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  auto kernel = tile_gemm_kernel<DEPTH, T, kWgmma, kShapeIndex>;
  constexpr TileShape kShape = shape_at(kWgmma, kShapeIndex);
  constexpr int kTileTokens = kShape.tokens;
  constexpr int kThreads = kShape.warps * 32;
  const size_t smem = shared_bytes(DEPTH, kShape, p.segments, kWgmma);
  const int sms = props->multiProcessorCount;
  if (kWgmma)
    p.x_map = byte_box_map(slots.view(at::kByte), kTileTokens, kXBoxBytes,
                           CU_TENSOR_MAP_SWIZZLE_128B);

  p.token_tiles = (p.tokens + kTileTokens - 1) / kTileTokens;
  p.tiles = p.token_tiles * p.row_tiles * p.splits;  // (the split: run())
  const int blocks = std::min(p.tiles, sms);
  p.step = place_of(blocks, p.token_tiles, p.row_tiles);

  const at::Tensor partials = split_partials(p.splits, out);
  if (partials.defined()) p.split_sums = partials.data_ptr<float>();
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool early = runs_sm90_code(reinterpret_cast<const void*>(kernel));
  const LaunchConfig config(dim3(blocks), dim3(kThreads), smem, stream, early);
  C10_CUDA_CHECK(cudaLaunchKernelEx(config.get(), kernel, p));
  add_split_partials<T>(partials, out, stream, early);
}

template <typename T, bool kWgmma>
void put_in_slot_order(const ProductInput& input, int64_t in_features, const at::Tensor& slots,
                       int64_t groups) {
  const int64_t tokens = input.x.size(0);
  TORCH_CHECK(tokens <= 65535 && groups < (int64_t(1) << 31),
              "tritllm: internal error: slot order of ", tokens, " tokens x ", groups, " groups");
  SlotOrderParams p{};
  p.input = input_pointers(input);
  // (kAddRmsNorm's other tensors are aligned too: product_input_supported)
  p.vector_loads = in_features % 8 == 0 && is_16_byte_aligned(input.x);
  p.slots = slots.data_ptr();
  p.in_features = in_features;
  p.groups = int(groups);
  auto kernel = slot_order_kernel<T, kWgmma>;
  const LaunchConfig config(
      dim3(unsigned((groups + kSlotOrderThreads - 1) / kSlotOrderThreads), unsigned(tokens)),
      dim3(kSlotOrderThreads), 0, at::cuda::getCurrentCUDAStream(),
      runs_sm90_code(reinterpret_cast<const void*>(kernel)));
  C10_CUDA_CHECK(cudaLaunchKernelEx(config.get(), kernel, p));
}

// The launch of shape `index` (shape_index), found among the compiled ones from kIndex on.
template <int DEPTH, typename T, bool kWgmma, int kIndex = 0>
void launch_shape(int index, const TileParams& p, const at::Tensor& slots, const at::Tensor& out) {
  if constexpr (kIndex + 1 < shape_count(kWgmma)) {
    if (index != kIndex) return launch_shape<DEPTH, T, kWgmma, kIndex + 1>(index, p, slots, out);
  }
  launch<DEPTH, T, kWgmma, kIndex>(p, slots, out);
}

// The input in slot order once, then one launch per kMaxSegments weights, each weight into its
// own columns of out.
template <int DEPTH, typename T, bool kWgmma>
void run(const ProductInput& input, int64_t in_features, at::TensorList packed,
         at::TensorList codebooks, const at::Tensor& out) {
  const int64_t tokens = input.x.size(0);
  const int64_t groups = packed[0].size(1) / bytes_per_group(DEPTH);
  at::Tensor slots = at::empty({tokens, groups * kGroupSize}, input.x.options());
  put_in_slot_order<T, kWgmma>(input, in_features, slots, groups);
  const int fits = shape_index(tokens, kWgmma);  // the smallest shape that holds the tokens
  const int tile_rows = shape_at(kWgmma, fits).rows();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t first_column = 0;  // of this launch's weights in out
  for (size_t first = 0; first < packed.size(); first += kMaxSegments) {
    TileParams p{};
    for (size_t i = first; i < std::min(packed.size(), first + kMaxSegments); ++i) {
      const int64_t rows = packed[i].size(0);
      if (rows == 0) continue;
      TileSegment& seg = p.segment[p.segments++];
      seg.packed = packed[i].data_ptr<uint8_t>();
      if (kWgmma) p.w_map[p.segments - 1] = byte_box_map(packed[i], tile_rows, run_bytes(DEPTH));
      seg.codebook = codebooks[i].data_ptr<float>();
      seg.codebook_size = int(codebooks[i].numel());
      seg.rows = int(rows);
      seg.first_row = int(p.rows);
      seg.first_row_tile = p.row_tiles;
      p.rows += rows;
      p.row_tiles += int((rows + tile_rows - 1) / tile_rows);
    }
    for (int s = p.segments; s < kMaxSegments; ++s)
      p.segment[s].first_row_tile = std::numeric_limits<int>::max();
    const at::Tensor part = out.narrow(1, first_column, p.rows);
    first_column += p.rows;
    if (p.rows == 0) continue;
    p.x_slots = slots.data_ptr();
    p.out = part.data_ptr();
    p.out_stride = out.stride(0);
    p.tokens = int(tokens);
    p.runs = int(groups / kRunGroups);
    // K is split when there are too few tiles for the SMs (plan_split). From 129 tokens on
    // (wgmma), tiles of 128 tokens may be cheaper than tiles of 256 (both of 128 rows): twice as
    // many tiles fill more SMs or need less K split, but each weight is decoded twice as often;
    // the smaller estimate wins.
    const auto plan_for = [&](int index) {
      return plan_split(shape_at(kWgmma, index), p.tokens, p.row_tiles, p.runs, p.rows, sms);
    };
    int shape = fits;
    SplitPlan plan = plan_for(fits);
    if (kWgmma && fits == shape_count(true) - 1) {
      static_assert(kWgmmaShapes[std::size(kWgmmaShapes) - 2].rows() ==
                        kWgmmaShapes[std::size(kWgmmaShapes) - 1].rows(),
                    "the last two shapes share the weights' tensor maps");
      const SplitPlan smaller = plan_for(fits - 1);
      if (smaller.nanos < plan.nanos) shape = fits - 1, plan = smaller;
    }
    p.runs_per_split = plan.runs_per_split;
    p.splits = plan.splits;
    launch_shape<DEPTH, T, kWgmma>(shape, p, slots, part);
  }
}

template <int DEPTH, typename T>
void run_with(bool wgmma, const ProductInput& input, int64_t in_features, at::TensorList packed,
              at::TensorList codebooks, const at::Tensor& out) {
  if (wgmma)
    run<DEPTH, T, true>(input, in_features, packed, codebooks, out);
  else
    run<DEPTH, T, false>(input, in_features, packed, codebooks, out);
}

}  // namespace

bool tile_gemm_has_wgmma(int device) {
#if defined(TRITLLM_SM90A)
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  return props->major == 9 && props->minor == 0;
#else
  (void)device;
  return false;
#endif
}

bool tile_gemm_supports(const at::Tensor& x, const at::Tensor& packed, int64_t depth) {
  if (depth != 1 && depth != 2) return false;
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return false;
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(packed.device().index());
  if (props->major < 8) return false;
  size_t most = 0;  // of any launch of either form
  for (const bool wgmma : {false, true})
    for (int i = 0; i < shape_count(wgmma); ++i)
      most = std::max(most, shared_bytes(int(depth), shape_at(wgmma, i), kMaxSegments, wgmma));
  if (most > props->sharedMemPerBlockOptin) return false;
  const int64_t groups = packed.size(1) / bytes_per_group(int(depth));
  // Whole runs, 16-byte aligned rows for the asynchronous copies, and copy offsets within a row
  // tile that fit 32 bits.
  return groups % kRunGroups == 0 && is_16_byte_aligned(packed) &&
         packed.size(1) * max_tile_rows() < (int64_t(1) << 31);
}

void tile_gemm_into(const ProductInput& input, at::TensorList packed, at::TensorList codebooks,
                    int64_t depth, int64_t in_features, bool wgmma, const at::Tensor& out) {
  const at::Tensor& x = input.x;
  const int64_t x_width =
      input.kind == ProductInput::Kind::kSiluMul ? 2 * in_features : in_features;
  int64_t rows = 0;
  for (const at::Tensor& w : packed) rows += w.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == x_width && x.is_contiguous() && out.is_contiguous() &&
                  out.size(0) == x.size(0) && out.size(1) == rows && !packed.empty() &&
                  codebooks.size() == packed.size(),
              "tritllm: internal error: tile_gemm needs a contiguous input [M, K], out [M, N]");
  TORCH_CHECK(product_input_supported(input),
              "tritllm: internal error: tile_gemm cannot read this input");
  TORCH_CHECK(!wgmma || tile_gemm_has_wgmma(x.device().index()),
              "tritllm: internal error: tile_gemm's wgmma products need an sm_90a build on Hopper");
  TORCH_CHECK(rows > 0 || input.kind != ProductInput::Kind::kAddRmsNorm,
              "tritllm: internal error: tile_gemm computes h + delta only with a product");
  if (x.size(0) == 0 || rows == 0) return;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (depth == 1)
    bf16 ? run_with<1, __nv_bfloat16>(wgmma, input, in_features, packed, codebooks, out)
         : run_with<1, __half>(wgmma, input, in_features, packed, codebooks, out);
  else
    bf16 ? run_with<2, __nv_bfloat16>(wgmma, input, in_features, packed, codebooks, out)
         : run_with<2, __half>(wgmma, input, in_features, packed, codebooks, out);
}

}  // namespace cuda
}  // namespace tritllm
