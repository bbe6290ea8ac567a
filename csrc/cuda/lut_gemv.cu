// The decode kernel: out [M, N] = x [M, K] @ W.T for M <= 16 at depth 1 and 2, reading the
// canonical packed bytes once and never materializing W. Design notes and measurements:
// docs/KERNEL_NOTES.md.
//
// Work split. K is cut into runs of 16 groups (256 weights). A warp owns one run and walks over
// blocks of 16 rows; the warps of a block own consecutive runs (a "split" of K) and add their
// partial products in shared memory in a fixed order, so results are deterministic. When K has
// more runs than a block has warps, splits write float32 partials that a second kernel adds.
// Blocks are persistent: each builds its tables once and then takes tiles (split, R row
// blocks).
//
// Inside a warp (lane = 4g + t) the tensor-core product mma.m16n8k16 does the arithmetic:
//   A (16 x 16) = dequantized weights: rows g and g + 8 of the warp's 16-row block,
//   B (16 x 8)  = activations: column g is token g (a second product for tokens 8..15),
//   C (16 x 8)  = float32 partial sums.
// The 16 K-slots of a k-step are not 16 consecutive weights: lane t contributes 4 weights of
// "its" group (groups 4t..4t+3 of the run, one per k-step quarter), so every lane decodes whole
// groups and needs one scale per group. The activations are loaded once per run in the matching
// order.
//
// The decoding of a group is in lut_decode.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cp_async.cuh"
#include "launchers.h"
#include "lut_decode.cuh"
#include "split_sums.cuh"

namespace tritllm {
namespace cuda {
namespace {

constexpr int kRunGroups = 16;       // groups of one warp's K-run (256 weights)
constexpr int kGroupsPerLane = 4;    // lane 4g+t decodes groups 4t..4t+3 of rows g and g+8
constexpr int kRowsPerSlab = 16;     // rows of W one warp multiplies at a time (a slab)
constexpr int kMaxWarps = 16;        // warps per block: the runs of one split
constexpr int kStages = 3;           // cp.async pipeline depth per warp
constexpr int kWarpTileFloats = 2 * 16 * 8;  // one warp's C: 2 token tiles x 16 rows x 8 tokens
constexpr int kTileBuffers = 2;  // partial sums of tile j and j + 1: one barrier per tile
constexpr int kMaxSlabsPerTile = 4;
constexpr int kTableCopies = 32;  // of each lookup-table entry (lut::Layout)

constexpr int row_bytes(int depth) { return kRunGroups * bytes_per_group(depth); }
constexpr int stage_bytes(int depth) { return kRowsPerSlab * row_bytes(depth); }

size_t shared_bytes(int depth, int warps, int blocks_per_tile) {
  return lut::Layout<kTableCopies>::bytes(1) +
         size_t(warps) * kStages * stage_bytes(depth) +
         size_t(kTileBuffers) * blocks_per_tile * warps * kWarpTileFloats * sizeof(float);
}

struct LutParams {
  const void* x;              // [tokens, in_features]
  const uint8_t* packed;      // [rows, groups * B]
  const float* codebook;
  void* out;                  // [tokens, rows]
  float* split_sums;          // [splits, tokens, rows] when splits > 1
  int codebook_size;
  bool x_vector_loads;        // x rows start on 16-byte boundaries (in_features % 8 == 0)
  int tokens;
  int64_t rows;
  int64_t in_features;
  int64_t groups;
  int runs;
  int splits;
  int warps;                  // runs per split = warps per block
  int slabs;                  // 16-row blocks of W
  int slabs_per_tile;
  int slab_tiles;
  int tiles;                  // splits * slab_tiles
};

// Activations of this lane for one run: token g (xa) and token g + 8 (xb), groups 4t..4t+3 of
// the run, in the slot order of lut::decode_group_pairs. Rows of x are read with 16-byte loads
// when they are whole and aligned.
template <typename T, bool kTwoTokenTiles>
__device__ __forceinline__ void load_activations(const LutParams& p, int run, int g, int t,
                                                 uint32_t (&xa)[kGroupsPerLane][8],
                                                 uint32_t (&xb)[kGroupsPerLane][8]) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t k0 = (int64_t(run) * kRunGroups + t * kGroupsPerLane) * kGroupSize;
  constexpr int kLaneValues = kGroupsPerLane * kGroupSize;  // 64
#pragma unroll
  for (int half = 0; half < (kTwoTokenTiles ? 2 : 1); ++half) {
    const int m = g + 8 * half;
    uint32_t lin[kGroupsPerLane][8];  // pairs of x in natural order
    if (m >= p.tokens) {
#pragma unroll
      for (int c = 0; c < kGroupsPerLane; ++c)
#pragma unroll
        for (int i = 0; i < 8; ++i) lin[c][i] = 0u;
    } else if (p.x_vector_loads && k0 + kLaneValues <= p.in_features) {
      const uint4* src = reinterpret_cast<const uint4*>(x + m * p.in_features + k0);
#pragma unroll
      for (int q = 0; q < kLaneValues * int(sizeof(T)) / 16; ++q) {
        const uint4 v = src[q];
        uint32_t* d = &lin[0][0] + 4 * q;
        d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
      }
    } else {
#pragma unroll
      for (int c = 0; c < kGroupsPerLane; ++c)
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t k = k0 + c * kGroupSize + 2 * i;
          const float lo = k < p.in_features ? to_float(x[m * p.in_features + k]) : 0.f;
          const float hi = k + 1 < p.in_features ? to_float(x[m * p.in_features + k + 1]) : 0.f;
          lin[c][i] = pack2<T>(lo, hi);
        }
    }
#pragma unroll
    for (int c = 0; c < kGroupsPerLane; ++c) {
      uint32_t(&dst)[8] = half == 0 ? xa[c] : xb[c];
      lut::slot_order(lin[c], dst);
    }
  }
}

template <int DEPTH, typename T, bool kTwoTokenTiles>
__global__ void __launch_bounds__(kMaxWarps * 32, 1) lut_gemv_kernel(const LutParams p) {
  using P = lut::Pair<T>;
  constexpr int kB = bytes_per_group(DEPTH);
  constexpr int kRowBytes = row_bytes(DEPTH);
  constexpr int kStageBytes = stage_bytes(DEPTH);
  constexpr int kChunks = kStageBytes / 16;
  constexpr int kLaneBytes = kGroupsPerLane * kB;  // 28 (d=2) or 16 (d=1) bytes per row
  constexpr int kWords = kLaneBytes / 4;

  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* stages = smem + lut::Layout<kTableCopies>::bytes(1);
  float* tile_sums = reinterpret_cast<float*>(stages + size_t(p.warps) * kStages * kStageBytes);
  lut::build_digit_table<T, kTableCopies>(smem);
  lut::build_scale_table<DEPTH, T, kTableCopies>(smem, 0, p.codebook, p.codebook_size);
  const uint32_t digits = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t scales = digits + lut::Layout<kTableCopies>::scale_table_offset(0);
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const uint32_t lane_offset = lut::Layout<kTableCopies>::lane_offset(lane);
  uint8_t* my_stages = stages + size_t(warp) * kStages * kStageBytes;
  const int R = p.slabs_per_tile;

  // This block's work is a list of items (tile, o): tiles blockIdx.x, +gridDim.x, ..., and in
  // each tile its R slabs. Two cursors walk it: the consumer, and the copy issuer kStages - 1
  // items ahead. A cursor divides only when it enters a new tile.
  struct Item {
    int tile, o, split, slab;  // slab: the 16-row block this item multiplies
    int stage;                 // its buffer, 0..kStages-1
  };
  auto enter_tile = [&](Item& it, int tile) {
    it.tile = tile;
    it.o = 0;
    it.split = tile / p.slab_tiles;
    it.slab = (tile - it.split * p.slab_tiles) * R;
  };
  auto advance = [&](Item& it) {
    it.stage = it.stage == kStages - 1 ? 0 : it.stage + 1;
    if (++it.o < R) {
      ++it.slab;
    } else {
      enter_tile(it, it.tile + gridDim.x);
    }
  };

  // The copies of one item: 16 rows x kRowBytes, in 16-byte chunks; chunk c = lane + 32q is
  // row c / (kRowBytes / 16) of every item, at byte 16c of the stage, so its source offset is
  // computed once.
  constexpr int kChunkRounds = (kChunks + 31) / 32;
  int chunk_row[kChunkRounds];
  uint32_t chunk_src[kChunkRounds];
  const int64_t row_stride = p.groups * kB;
#pragma unroll
  for (int q = 0; q < kChunkRounds; ++q) {
    const int c = lane + 32 * q;
    const int r = c / (kRowBytes / 16), col = c % (kRowBytes / 16);
    chunk_row[q] = c < kChunks ? r : kRowsPerSlab;  // kRowsPerSlab: no chunk
    chunk_src[q] = uint32_t(r * row_stride + col * 16);
  }
  auto issue = [&](const Item& it) {
    const int run = it.split * p.warps + warp;
    if (it.tile < p.tiles && run < p.runs) {
      const uint8_t* base = p.packed + int64_t(it.slab) * kRowsPerSlab * row_stride +
                            int64_t(run) * kRunGroups * kB;
      const int64_t rows_left = p.rows - int64_t(it.slab) * kRowsPerSlab;
      uint8_t* dst = my_stages + it.stage * kStageBytes;
#pragma unroll
      for (int q = 0; q < kChunkRounds; ++q) {
        if (chunk_row[q] < kRowsPerSlab) {
          const bool valid = chunk_row[q] < rows_left;
          cp_async_16(dst + 16 * (lane + 32 * q), valid ? base + chunk_src[q] : p.packed, valid);
        }
      }
    }
    cp_async_commit();  // one group per item, empty or not, so the wait count below holds
  };

  Item ahead{}, item{};
  enter_tile(ahead, blockIdx.x);
  enter_tile(item, blockIdx.x);
  ahead.stage = item.stage = 0;
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    issue(ahead);
    advance(ahead);
  }

  uint32_t xa[kGroupsPerLane][8], xb[kGroupsPerLane][8];
  int loaded_run = -1;
  int tile_parity = 0;
  for (; item.tile < p.tiles; advance(item)) {
    issue(ahead);
    advance(ahead);
    cp_async_wait<kStages - 1>();
    __syncwarp();

    const int o = item.o, split = item.split;
    const int run = split * p.warps + warp;
    // acc[q] = C of token tile q: rows (g, g, g+8, g+8) x tokens (2t, 2t+1, 2t, 2t+1) + 8q.
    // With one token tile, odd k-steps go to a second chain so that consecutive products do not
    // wait on each other (two token tiles already interleave two chains).
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float acc_odd[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    if (run < p.runs) {
      if (run != loaded_run) {
        load_activations<T, kTwoTokenTiles>(p, run, g, t, xa, xb);
        loaded_run = run;
      }
      const uint8_t* stage = my_stages + item.stage * kStageBytes + t * kLaneBytes;
      uint32_t word[2][kWords];  // this lane's bytes of rows g and g + 8
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint8_t* mine = stage + (g + 8 * h) * kRowBytes;
        if constexpr (kLaneBytes % 16 == 0) {
#pragma unroll
          for (int q = 0; q < kWords / 4; ++q) {
            const uint4 v = reinterpret_cast<const uint4*>(mine)[q];
            word[h][4 * q] = v.x, word[h][4 * q + 1] = v.y;
            word[h][4 * q + 2] = v.z, word[h][4 * q + 3] = v.w;
          }
        } else {
#pragma unroll
          for (int q = 0; q < kWords; ++q) word[h][q] = reinterpret_cast<const uint32_t*>(mine)[q];
        }
      }
#pragma unroll
      for (int c = 0; c < kGroupsPerLane; ++c) {
        uint32_t wa[8], wb[8];  // rows g and g + 8
        lut::decode_group_pairs<DEPTH, T>(word[0], c, lane_offset, digits, scales, wa);
        lut::decode_group_pairs<DEPTH, T>(word[1], c, lane_offset, digits, scales, wb);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float(&chain)[2][4] = (!kTwoTokenTiles && j % 2 == 1) ? acc_odd : acc;
          P::mma(chain[0], wa[2 * j], wb[2 * j], wa[2 * j + 1], wb[2 * j + 1], xa[c][2 * j],
                 xa[c][2 * j + 1]);
          if (kTwoTokenTiles)
            P::mma(chain[1], wa[2 * j], wb[2 * j], wa[2 * j + 1], wb[2 * j + 1], xb[c][2 * j],
                   xb[c][2 * j + 1]);
        }
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[0][r] += acc_odd[0][r];
    }
    __syncwarp();  // every lane has read this item's stage before it is refilled

    // This warp's C, laid out [token tile][row 0..15][token 0..7] (conflict-free float2 stores),
    // in the buffer of this tile. Tiles alternate between two buffers: the barrier before a
    // tile's sum also tells that every thread is done reading the buffer's previous tile.
    float* buffer = tile_sums + tile_parity * R * p.warps * kWarpTileFloats;
    float* mine_c = buffer + (o * p.warps + warp) * kWarpTileFloats;
#pragma unroll
    for (int q = 0; q < (kTwoTokenTiles ? 2 : 1); ++q) {
      *reinterpret_cast<float2*>(mine_c + q * 128 + g * 8 + 2 * t) = make_float2(acc[q][0], acc[q][1]);
      *reinterpret_cast<float2*>(mine_c + q * 128 + (g + 8) * 8 + 2 * t) =
          make_float2(acc[q][2], acc[q][3]);
    }

    if (o == R - 1) {  // the tile is done: add the warps' partial products in warp order
      __syncthreads();
      const int active = min(p.warps, p.runs - split * p.warps);
      const int per_slab = p.tokens * kRowsPerSlab;
      for (int e = threadIdx.x; e < R * per_slab; e += blockDim.x) {
        const int oo = e / per_slab, m = (e % per_slab) / kRowsPerSlab, n = e % kRowsPerSlab;
        const int64_t row = (int64_t(item.slab) - o + oo) * kRowsPerSlab + n;
        if (row >= p.rows) continue;
        const int at = (m / 8) * 128 + n * 8 + m % 8;
        float sum = 0.f;
        for (int w2 = 0; w2 < active; ++w2) sum += buffer[(oo * p.warps + w2) * kWarpTileFloats + at];
        if (p.splits == 1)
          static_cast<T*>(p.out)[m * p.rows + row] = from_float<T>(sum);
        else
          p.split_sums[(int64_t(split) * p.tokens + m) * p.rows + row] = sum;
      }
      tile_parity ^= 1;
    }
  }
  cp_async_wait<0>();
}

template <int DEPTH, typename T, bool kTwoTokenTiles>
void launch(LutParams p, const at::Tensor& out) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  auto kernel = lut_gemv_kernel<DEPTH, T, kTwoTokenTiles>;

  // Split K so that a split has at most kMaxWarps runs and its shared memory fits.
  p.splits = (p.runs + kMaxWarps - 1) / kMaxWarps;
  p.warps = (p.runs + p.splits - 1) / p.splits;
  while (shared_bytes(DEPTH, p.warps, 1) > props->sharedMemPerBlockOptin) {
    ++p.splits;
    p.warps = (p.runs + p.splits - 1) / p.splits;
  }
  p.slabs = int((p.rows + kRowsPerSlab - 1) / kRowsPerSlab);

  // Resident blocks per SM with one slab per tile (more slabs per tile add a few KB only).
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int threads = p.warps * 32;
  const int by_threads = props->maxThreadsPerMultiProcessor / threads;
  const int by_regs = props->regsPerMultiprocessor / (std::max(attr.numRegs, 1) * threads);
  const int by_smem = int(props->sharedMemPerMultiprocessor /
                          (shared_bytes(DEPTH, p.warps, 1) + props->reservedSharedMemPerBlock));
  const int capacity =
      props->multiProcessorCount * std::max(1, std::min({by_threads, by_regs, by_smem}));

  // Slabs per tile: the fewest tile rounds per block, counted in slabs; ties go to larger tiles
  // (fewer block-wide reductions).
  int best_r = 1;
  int64_t best_cost = INT64_MAX;
  for (int r = 1; r <= kMaxSlabsPerTile; ++r) {
    if (shared_bytes(DEPTH, p.warps, r) > props->sharedMemPerBlockOptin) break;
    const int64_t tiles = int64_t(p.splits) * ((p.slabs + r - 1) / r);
    const int64_t cost = (tiles + capacity - 1) / capacity * r;
    if (cost <= best_cost) {
      best_cost = cost;
      best_r = r;
    }
  }
  p.slabs_per_tile = best_r;
  p.slab_tiles = (p.slabs + best_r - 1) / best_r;
  p.tiles = p.splits * p.slab_tiles;
  const int grid = int(std::min<int64_t>(p.tiles, capacity));
  const size_t smem = shared_bytes(DEPTH, p.warps, best_r);

  const at::Tensor partials = split_partials(p.splits, out);
  if (partials.defined()) p.split_sums = partials.data_ptr<float>();
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  auto stream = at::cuda::getCurrentCUDAStream();
  kernel<<<grid, threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  add_split_partials<T>(partials, out, stream);
}

template <int DEPTH, typename T>
void launch_tokens(const LutParams& p, const at::Tensor& out) {
  if (p.tokens <= 8)
    launch<DEPTH, T, false>(p, out);
  else
    launch<DEPTH, T, true>(p, out);
}

}  // namespace

bool lut_gemv_supports(const at::Tensor& x, const at::Tensor& packed, int64_t depth) {
  if (depth != 1 && depth != 2) return false;
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return false;
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(packed.device().index());
  if (props->major < 8) return false;
  if (shared_bytes(int(depth), 1, 1) > props->sharedMemPerBlockOptin) return false;
  const int64_t groups = packed.size(1) / bytes_per_group(int(depth));
  // Whole runs, and 16-byte aligned rows for the asynchronous copies.
  return groups % kRunGroups == 0 && is_16_byte_aligned(packed);
}

void lut_gemv_into(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                   int64_t depth, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(0) <= kLutMaxTokens &&
                  out.is_contiguous() && out.size(0) == x.size(0) && out.size(1) == packed.size(0),
              "tritllm: internal error: lut_gemv needs contiguous x [M <= 16, K], out [M, N]");
  if (x.size(0) == 0 || packed.size(0) == 0) return;
  LutParams p{};
  p.x = x.data_ptr();
  p.packed = packed.data_ptr<uint8_t>();
  p.codebook = codebook.data_ptr<float>();
  p.out = out.data_ptr();
  p.codebook_size = int(codebook.numel());
  p.x_vector_loads = x.size(1) % 8 == 0 && is_16_byte_aligned(x);
  p.tokens = int(x.size(0));
  p.rows = packed.size(0);
  p.in_features = x.size(1);
  p.groups = num_groups(p.in_features);
  p.runs = int(p.groups / kRunGroups);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (depth == 1)
    bf16 ? launch_tokens<1, __nv_bfloat16>(p, out) : launch_tokens<1, __half>(p, out);
  else
    bf16 ? launch_tokens<2, __nv_bfloat16>(p, out) : launch_tokens<2, __half>(p, out);
}

}  // namespace cuda
}  // namespace tritllm
