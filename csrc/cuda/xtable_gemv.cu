// The single-token decode kernel: y [1, N] = x [1, K] @ W.T at depth 1 and 2, with lookup tables
// of activation sums ("x-tables") instead of decoded weights. Design notes and measurements:
// docs/KERNEL_NOTES.md.
//
// Why tables of x. With one token there is nothing for a tensor core to share, and decoding a
// weight byte into numbers costs more instructions than the GPU can spend at memory speed
// (lut_gemv.cu: ~58 per group of 16). But a plane byte v holds the digits c_0..c_4 of five
// consecutive weights, and its contribution to the dot product, sum_i c_i(v) x_i, depends only on
// v and on those five activations. So tabulate it: for each 5-weight slot of K and each byte
// value v, T[slot][v] = sum_i c_i(v) x_i. A group (d = 2: plane bytes P0b0..2, P1b0..2, tail T)
// then costs six table loads:
//     sum_j level_j x_j = sum_b (T'[b][P0b] + 3 T'[b][P1b]) + (T / 27) x_15,
// where T' = T - (the slot's sum of x) - [b = 0] x_15 takes care of the "- L" of every level
// (L = 4 = 1 + 3 at d = 2, L = 1 at d = 1, where only P0 exists), and T / 27 = c_0 + 3 c_1 of
// weight 15 (the tail byte's two high digits). The group's scale is codebook[T % 27], and
// T % 27 = T - 27 (T / 27) comes from the same multiply-high. The codebook (27 floats, zero past
// its length) sits in shared memory once, not once per lane: distinct indices fall in distinct
// banks and equal ones are broadcast, so this load is conflict-free as well.
//
// Work split. K is cut into windows of 32 groups (512 weights): lane l of every warp owns group
// l of the window, so a row's 224 window bytes (d = 2) hold the groups of all 32 lanes, and each
// lane needs the tables of its own group only. A block builds the tables of one window in shared
// memory and its warps take batches of 8 rows in turn (warp w: the window's batches w, w + 24,
// ...); each lane computes scale * dot of its group for the 8 rows, and a butterfly of shuffles
// adds the 32 groups of each row. One block per SM (the tables take 128 KB). The windows' partial
// sums of a row are added in window order (deterministic, so CUDA-graph replays equal eager
// calls), in one of two ways:
//
// * Cluster sums, for K of at most 8 windows (4096 weights; q, k, v, o, gate and up of a Llama
//   8B layer): the grid is cut into clusters of one block per window (cluster.cuh), and cluster q
//   takes the q-th share of the rows. Block w of a cluster builds the tables of window w once and
//   streams its window of the cluster's rows, keeping each row's sum in its shared memory; after
//   a cluster barrier each block adds its slice of the rows over the cluster's blocks (reading
//   their shared memory) and writes `out`. One launch, one table build per block and no partial
//   buffer in global memory. The grid has as many clusters as the GPU runs at once; a cluster's
//   blocks must share one processing cluster of SMs, so on an H100 (132 SMs) 15 clusters of 8
//   run, on 120 SMs. Even so 28672x4096 takes 27 us instead of 31 (docs/KERNEL_NOTES.md, x8).
// * Split sums, for longer K (down: 28 windows): one block per SM, and each window has some of the
//   blocks and cuts its batches among them (split_share), so a block builds one window's tables
//   per call, or two if it is a helper (on 132 SMs: 4 blocks per window taking 5 rounds of
//   batches each, and 20 helpers taking the windows' last 32 batches, one or two windows each);
//   window partial sums go to a float32 buffer [windows, N] that a second kernel adds in window
//   order (split_sums.cuh). Only K past blocks x 512 weights makes every block take a contiguous
//   range of (window, batch) items across windows. With 28 windows a cluster (at most 8 blocks)
//   would hold 4 windows per block of a few dozen batches each, and every window change waits for
//   the block's slowest warp.
//
// Weight bytes arrive by tensor copy (bulk_copy.cuh): each warp has two batch slots in shared
// memory, and lane 0 asks the copy engine for a batch as one box (8 rows x the window's bytes;
// rows past the weight's end land as zeros), counted on the slot's mbarrier. When a batch has
// landed the lanes read their words into registers, the slot is refilled at once with the batch
// after next, and the batch is computed: two batches per warp are in flight while one is
// computed, one instruction asks for a batch (instead of 16 loads per lane), and no register
// holds bytes in flight, so a block runs 24 warps of at most 80 registers. Measured
// (docs/KERNEL_NOTES.md, x7): on an H100 the warps' loop then streams the weights at about the
// memory's speed; on an H200, whose memory is faster, it is bound by instruction issue at about
// 72% of the copy bandwidth (session 14). The rest of a call's time is the start of a window and
// the end of the call, about 4.5 us.
//
// The start of a window is the fixed cost of a block: the activations must arrive and the tables be
// built (0.6 us on an H200) before any batch is computed. A block reads the window's 512
// activations, one per thread, into shared memory and fills the tables from there: a build waits
// for one global load instead of one per table unit. Each warp requests its first two batches of a
// window before the block stages the window's activations: at a block's first window just after the
// loads of the activations are issued (before, as x4-x6 did, the block's own requests delayed them;
// after their arrival, as x7-x8 did, the requests waited 1 us for them), at a later window before
// the block waits for its slowest warp (the activations were read during the last window). The
// batches land while the tables are built. The kernel is launched early
// (dependent_launch.cuh): its blocks set up their barriers while the kernel before it ends, and
// wait for it before they read anything.
//
// Several matrices that share x and K (q, k and v; gate and up) run as one call: they are the
// "segments" of one output, out [1, N_1 + N_2 + ...], each with its own bytes and codebook. The
// batches of 8 rows are numbered across the segments (none straddles two), so the work split and
// the tables are those of one matrix of N_1 + N_2 + ... rows: one launch and one table build per
// block instead of one of each per matrix.
//
// Fused inputs (ProductInput in launchers.h; the math in csrc/fused_inputs.h, its device code in
// fused_inputs.cuh). In a decode step the products' inputs come from small element-wise steps:
// the residual add and RMSNorm before q, k, v and before gate, up; SiLU(gate) * up before down.
// Each would be a kernel of its own, a launch and a round trip through memory on the step's
// critical path, so the kernel can compute its activations itself where it reads them
// (window_activation): silu(gate) * up needs only the window's elements; RMSNorm needs the sum of
// squares over all of K first, which every block computes from h and delta (16 KB at K = 4096 in
// float16, from L2) before its first window, and each block writes its slice of h + delta, the
// residual stream the next layer reads.
//
// Table layout: bank-conflict free and one instruction per address. Every table row (one byte
// value) has one 4-byte entry per lane, so whatever the bytes, lane l reads bank l. Rows are 256
// bytes apart and hold two tables side by side (lanes' entries at +0 and +128), in two 64 KB
// regions that start on a 64 KB boundary of the shared window:
//     region A: v * 256 +   0 + 4 l : slot b = 0         region B: v * 256 +   0 + 4 l : b = 2
//               v * 256 + 128 + 4 l : slot b = 1                   v * 256 + 128 + 4 l : sums
// The shared address of an entry is then  region | v << 8 | (slot * 128 + 4 l): one byte_perm
// puts the packed byte v next to the lane's constant bytes (no add of a table base: the
// regions' alignment makes the base part of those constant bytes). The batch slots fill the
// shared memory below region A (the alignment slack) and above region B. The second halves of
// region B's rows hold the row sums of the cluster sums: 256 x 32 floats, so a cluster takes at
// most 8192 rows (1024 batches); more rows get more clusters than fit on the GPU at once.
//
// Bytes the format forbids (>= 243, or a scale index past the codebook) read table rows that
// exist (all 256 are filled, with finite values) and codebook entries that are zero, so corrupt
// data gives wrong numbers but never an out-of-bounds access, as in the other CUDA kernels
// (docs/FORMAT.md, Validation).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <array>
#include <atomic>
#include <limits>

#include "bulk_copy.cuh"
#include "cluster.cuh"
#include "dependent_launch.cuh"
#include "device_common.cuh"
#include "fused_inputs.cuh"
#include "launchers.h"
#include "split_sums.cuh"

namespace tritllm {
namespace cuda {
namespace {

constexpr int kWindowGroups = 32;  // groups of a window: one per lane
constexpr int kWindowWeights = kWindowGroups * kGroupSize;
constexpr int kBatchRows = 8;      // rows a warp takes at a time
constexpr int kWarps = 24;
constexpr int kThreads = kWarps * 32;
static_assert(kThreads >= kWindowWeights, "one thread stages one activation of a window");
constexpr int kSlots = 2;          // batch slots per warp
constexpr uint32_t kRegionBytes = 1u << 16;
constexpr uint32_t kTableBytes = 2 * kRegionBytes;
constexpr int kTableRow = 256;  // bytes between table rows
constexpr int kSlotBytes = 128;  // bytes of one table's entries in a row (32 lanes x 4)
// A batch slot holds 8 rows of one window: 8 x 224 bytes at d = 2, 8 x 128 at d = 1.
constexpr uint32_t window_bytes(int depth) { return kWindowGroups * bytes_per_group(depth); }
constexpr uint32_t batch_bytes(int depth) { return kBatchRows * window_bytes(depth); }
// The dynamic shared memory: the two 64 KB-aligned table regions and the warps' batch slots,
// wherever the window starts. The slack below region A and the space above region B add up to
// kSharedBytes - 128 KB; cut into whole slots (128-byte aligned, as the copy engine wants them),
// that loses less than one slot at each end and the alignment of the first.
constexpr int kSharedBytes = int(kTableBytes + (kWarps * kSlots + 3) * batch_bytes(2));
static_assert(kSharedBytes + 4096 <= 232448, "fits Hopper's 227 KB of shared memory per block");
// The staged activations of a window, group g's 16 at g * kXStride: with 17 floats per group,
// lanes reading the same position of their own groups hit 32 different banks.
constexpr int kXStride = kGroupSize + 1;
constexpr int kCodebookStride = 32;  // floats per segment's codebook in shared memory (27 used)
constexpr int kMaxSegments = int(kXtableMaxWeights);
// floor(t / 27) = umulhi(t, kDiv27) for every byte t.
constexpr uint32_t kDiv27 = 159072863u;  // ceil(2^32 / 27)
// Cluster sums: one block per window, so at most 8 windows (the portable cluster size), and at
// most 8192 rows per cluster (the row sums' space in region B, above).
constexpr int kMaxClusterBlocks = 8;
constexpr int kClusterSumRows = int(kRegionBytes / kTableRow) * (kSlotBytes / 4);
constexpr int kClusterMaxBatches = kClusterSumRows / kBatchRows;

// One matrix of a call (see "segments" at the top).
struct Segment {
  CUtensorMap rows_map;   // packed [rows, G * B] in boxes of one batch's window bytes
  const float* codebook;
  int codebook_size;
  int rows;
  int first_row;    // of its rows in out (and in the partial sums)
  int first_batch;  // its first batch; past the last batch for unused segments
};

struct XTableParams {
  InputPointers input;  // x [K], or what it is computed from (see "Fused inputs" at the top)
  void* out;          // [rows], written by the cluster sums
  float* partial;     // [windows, rows], for the split sums
  int64_t in_features;
  int rows;           // of all segments
  int windows;
  int batches;        // per window, of all segments
  int own_batches;    // of each window's batches, those its own blocks take (see "Items")
  int items;          // windows * batches (< 2^31: xtable_gemv_supports)
  int segments;
  Segment segment[kMaxSegments];
};

__device__ __forceinline__ float lds(uint32_t address) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(address));
  return v;
}
__device__ __forceinline__ void sts(uint32_t address, float v) {
  asm volatile("st.shared.f32 [%0], %1;" ::"r"(address), "f"(v));
}

// Byte k of `word` as the table row of a lane entry whose other bytes (region, slot and lane)
// are in `lane_bytes`: bytes 0, 2, 3 from lane_bytes, byte 1 from word.
template <int k>
__device__ __forceinline__ uint32_t entry(uint32_t word, uint32_t lane_bytes) {
  return __byte_perm(word, lane_bytes, 0x7604 | (k << 4));
}

// The lane's constant address bytes of its three tables.
struct LaneTables {
  uint32_t slot0, slot1, slot2;
  __device__ LaneTables(uint32_t region_a, int lane)
      : slot0(region_a + 4 * lane),
        slot1(region_a + kSlotBytes + 4 * lane),
        slot2(region_a + kRegionBytes + 4 * lane) {}
};

// Cluster sums: the shared address of row sum e (of the cluster's rows), in the unused second
// halves of region B's rows.
__device__ __forceinline__ uint32_t row_sum_address(uint32_t region_a, int e) {
  return region_a + kRegionBytes + (e / 32) * kTableRow + kSlotBytes + 4 * (e % 32);
}

// The segment that batch `batch` (numbered across segments) belongs to.
__device__ __forceinline__ int segment_of(const XTableParams& p, int batch) {
  int s = 0;
#pragma unroll
  for (int i = 1; i < kMaxSegments; ++i) s += batch >= p.segment[i].first_batch;
  return s;
}

// Where part `part` of `total` things cut into `parts` even shares starts (shares differ by at
// most one, the larger first): one 32-bit division, where total * part / parts would take a
// 64-bit one, a subroutine call on the GPU that sits on a block's way to its first loads.
__device__ __forceinline__ int share_start(int total, int parts, int part) {
  const int quotient = total / parts, remainder = total % parts;
  return part * quotient + min(part, remainder);
}

// Items. A block takes a contiguous range of items, each one batch of one window. Split sums may
// cut each window's batches in two (split_share): its first S = own_batches go to the window's own
// blocks, the rest to "helper" blocks. Items number the first parts of all windows, then the rests:
// item i < W S is batch i % S of window i / S, item W S + j is batch S + j % (B - S) of window
// j / (B - S) (W windows, B batches each). Where S = B (cluster sums, and split sums without
// helpers) item i is batch i % B of window i / B.
struct ItemRun {
  int window, begin, end;  // batches [begin, end) of the window
  int next;                // the item after them
};

// The run of items from `item` (< last) that lie in one window.
// 32-bit arithmetic throughout: a 64-bit division would be a subroutine call on every block's
// way to its first loads.
__device__ __forceinline__ ItemRun item_run(const XTableParams& p, int item, int last) {
  const int own_items = p.windows * p.own_batches;
  const bool rest = item >= own_items;
  const int base = rest ? own_items : 0;
  const int per_window = rest ? p.batches - p.own_batches : p.own_batches;
  const int offset = rest ? p.own_batches : 0;
  ItemRun run;
  run.window = (item - base) / per_window;
  const int window_first = base + run.window * per_window;
  run.next = min(last, window_first + per_window);
  run.begin = offset + item - window_first;
  run.end = offset + run.next - window_first;
  return run;
}

// Split sums: this block's items [first, last). Where there are at least as many blocks as
// windows, whole windows: window w has blocks ceil(w G / W) .. ceil((w + 1) G / W) - 1 (G blocks)
// and cuts its batches evenly among them, so no block builds the tables of a second window or
// waits for its slowest warp in between. But warps take a window's batches in rounds of kWarps,
// and where G / W is not whole, the windows with fewer blocks can need a round more (down of an
// 8B model on 132 SMs: 128 batches a block, 6 rounds, against 102-103 and 5 on the 5-block
// windows). So where the launch set own_batches < B (own_batches, below), every window has
// floor(G / W) own blocks, taking own_batches (whole rounds) evenly, and the G mod W blocks left
// over are helpers, each taking the rests of whole consecutive windows. Otherwise a contiguous
// share of all items.
__device__ __forceinline__ void split_share(const XTableParams& p, int& first, int& last) {
  const int blocks = gridDim.x, windows = p.windows, b = blockIdx.x;
  if (blocks < windows) {
    first = share_start(p.items, blocks, b);
    last = share_start(p.items, blocks, b + 1);
    return;
  }
  // From here windows <= blocks <= the SMs.
  if (p.own_batches < p.batches) {
    const int per_window = blocks / windows, own_blocks = per_window * windows;
    if (b < own_blocks) {
      const int window = b / per_window, rank = b % per_window;
      const int window_first = window * p.own_batches;
      first = window_first + share_start(p.own_batches, per_window, rank);
      last = window_first + share_start(p.own_batches, per_window, rank + 1);
    } else {
      const int helper = b - own_blocks, helpers = blocks - own_blocks;
      const int rest = p.batches - p.own_batches, own_items = windows * p.own_batches;
      first = own_items + rest * share_start(windows, helpers, helper);
      last = own_items + rest * share_start(windows, helpers, helper + 1);
    }
    return;
  }
  const int window = b * windows / blocks;
  const int window_first = (window * blocks + windows - 1) / windows;
  const int window_blocks = ((window + 1) * blocks + windows - 1) / windows - window_first;
  const int rank = b - window_first;
  first = window * p.batches + share_start(p.batches, window_blocks, rank);
  last = window * p.batches + share_start(p.batches, window_blocks, rank + 1);
}

// Thread t's entry of the codebooks in shared memory: entry t % 32 of segment t / 32's codebook,
// zero past its 27 entries and its length (corrupt indices read those), or of none (t >= 128).
__device__ __forceinline__ float codebook_entry(const XTableParams& p) {
  const int s = threadIdx.x / kCodebookStride, i = threadIdx.x % kCodebookStride;
  if (s >= p.segments) return 0.f;
  const Segment& seg = p.segment[s];
  return i < seg.codebook_size ? seg.codebook[i] : 0.f;
}

// kAddRmsNorm: the row's RMSNorm factor (add_and_rms_factor in fused_inputs.cuh), computed alike
// by every block, each of which writes an even share of h + delta's 16-byte vectors. One round of
// loads per thread at K = 4096 in 16-bit types, from L2, where the kernel before has just written
// h and delta.
template <typename T>
__device__ float rms_factor_of(const XTableParams& p, float (&warp_sums)[kWarps]) {
  // (vectors < 2^31: K < 2^33 / 7 by xtable_gemv_supports)
  const int vectors = int(p.in_features / (16 / sizeof(T)));
  return add_and_rms_factor<T, kWarps>(
      static_cast<const T*>(p.input.x), static_cast<const T*>(p.input.delta),
      static_cast<T*>(p.input.h_out), p.in_features, p.input.eps, share_start(vectors, gridDim.x, blockIdx.x),
      share_start(vectors, gridDim.x, blockIdx.x + 1), warp_sums);
}

// Thread t's activation of a window (t < 512) as float, zero past K; staged at
// window_x[(t / 16) * kXStride + t % 16] (group g's 16 at g * kXStride). x[k] itself, or computed
// as csrc/fused_inputs.h rounds it: RMSNorm(h + delta) * norm_weight with the block's
// `rms_factor` (kAddRmsNorm), silu(gate) * up with torch's silu, x / (1 + exp(-x)) in float
// (kSiluMul).
template <typename T>
__device__ __forceinline__ float window_activation(const XTableParams& p, int window,
                                                   float rms_factor) {
  const int64_t k = int64_t(window) * kWindowWeights + threadIdx.x;
  if (threadIdx.x >= kWindowWeights || k >= p.in_features) return 0.f;
  const T* x = static_cast<const T*>(p.input.x);
  switch (p.input.kind) {
    case ProductInput::Kind::kAddRmsNorm: {
      const float h = rounded<T>(to_float(x[k]) + to_float(static_cast<const T*>(p.input.delta)[k]));
      return rms_normed<T>(h, to_float(static_cast<const T*>(p.input.norm_weight)[k]), rms_factor);
    }
    case ProductInput::Kind::kSiluMul:
      return silu_mul<T>(to_float(x[k]), to_float(x[p.in_features + k]));
    default:
      return to_float(x[k]);
  }
}

// The x-tables of one window: for lane l's group and slot b (weights 5b..5b+4 of the group), row v
// holds T'[v] = sum_i c_i(v) x_i - sum_i x_i - [b = 0] x_15 (see the top). A unit of work is one
// (slot, lane) and 27 consecutive rows v = 27 m + a: the digits of a (c_0..c_2) are compile-time
// constants of the unrolled loop and the high digits of m (c_3, c_4) give one runtime term, so a
// row costs two or three additions and a store.
__device__ void build_x_tables(const float* window_x, uint32_t region_a) {
  constexpr int kCombos = 3 * kWindowGroups;  // (slot, lane)
  constexpr int kChunks = 10;                 // 27 m for m = 0..9 covers rows 0..255
  for (int unit = threadIdx.x; unit < kCombos * kChunks; unit += blockDim.x) {
    const int combo = unit % kCombos, m = unit / kCombos;
    const int slot = combo / kWindowGroups, lane = combo % kWindowGroups;
    const float* group_x = window_x + lane * kXStride;
    float x[5];
#pragma unroll
    for (int i = 0; i < 5; ++i) x[i] = group_x[5 * slot + i];
    float offset = -(((x[0] + x[1]) + (x[2] + x[3])) + x[4]);
    if (slot == 0) offset -= group_x[15];
    // m's digits are c_3 = m % 3 and c_4 = m / 3 (m = 9 gives c_4 = 3: rows >= 243, corrupt).
    const float high = offset + float(m % 3) * x[3] + float(m / 3) * x[4];
    const uint32_t base = (slot == 2 ? region_a + kRegionBytes : region_a) +
                          (slot == 1 ? kSlotBytes : 0) + 4 * lane + 27 * m * kTableRow;
#pragma unroll
    for (int a = 0; a < 27; ++a) {
      if (m == 9 && a >= 256 - 243) break;
      float sum = high;
      if (a % 3) sum += float(a % 3) * x[0];
      if ((a / 3) % 3) sum += float((a / 3) % 3) * x[1];
      if (a / 9) sum += float(a / 9) * x[2];
      sts(base + a * kTableRow, sum);
    }
  }
}

// One row's window bytes of this lane's group, as read from its batch slot: 8 bytes at an 8-byte
// boundary and (d = 2, when the group runs past them) the next 8.
struct GroupBytes {
  uint2 lo, hi;
};

// The shared address of slot `slot` of warp `warp`: slots fill the slack below the tables (from
// `start`, the dynamic shared memory's first byte) and then the space above them.
template <int DEPTH>
__device__ __forceinline__ uint32_t slot_address(uint32_t start, uint32_t region_a, int warp,
                                                 int slot) {
  const int index = warp * kSlots + slot;
  const int below = int((region_a - start) / batch_bytes(DEPTH));
  return index < below ? start + index * batch_bytes(DEPTH)
                       : region_a + kTableBytes + (index - below) * batch_bytes(DEPTH);
}

// The lane's bytes of the 8 rows of a landed batch (rows past the weight's end are zeros: their
// sums are computed and dropped). `hi_offset`: 8 where the lane's group runs into the next 8-byte
// word (d = 2, 7 l mod 8 >= 2), else 0: the lane then reads its first word twice, an unused copy,
// rather than a word past the row (lane 31) or a predicated load and zeros (an instruction more).
template <int DEPTH>
__device__ __forceinline__ void read_batch(uint32_t slot, int lane, uint32_t hi_offset,
                                           GroupBytes (&g)[kBatchRows]) {
  const uint32_t at = slot + ((bytes_per_group(DEPTH) * lane) & ~7);
#pragma unroll
  for (int r = 0; r < kBatchRows; ++r) {
    const uint32_t word = at + r * window_bytes(DEPTH);
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(g[r].lo.x), "=r"(g[r].lo.y) : "r"(word));
    if (DEPTH == 2)
      asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
                   : "=r"(g[r].hi.x), "=r"(g[r].hi.y)
                   : "r"(word + hi_offset));
    else
      g[r].hi = make_uint2(0u, 0u);
  }
}

// scale * (sum over the group of level_j x_j) for this lane's group of one row; `codebook` is the
// shared address of the row's segment's codebook.
template <int DEPTH>
__device__ __forceinline__ float group_value(const GroupBytes& g, int lane, const LaneTables& t,
                                             uint32_t codebook, float x15) {
  uint32_t w0, w1;  // the group's bytes 0-3 and 4-7
  if (DEPTH == 1) {
    w0 = (lane & 1) ? g.lo.y : g.lo.x;  // 4 bytes per group: 4-byte aligned
    w1 = 0u;
  } else {
    // 7 bytes from byte o = 7 l mod 8 of the 16 loaded ones.
    const int o = (7 * lane) & 7;
    const uint32_t a = o < 4 ? g.lo.x : g.lo.y;
    const uint32_t b = o < 4 ? g.lo.y : g.hi.x;
    const uint32_t c = o < 4 ? g.hi.x : g.hi.y;
    const uint32_t select = 0x3210u + 0x1111u * uint32_t(o & 3);
    w0 = __byte_perm(a, b, select);
    w1 = __byte_perm(b, c, select);
  }
  float dot = lds(entry<0>(w0, t.slot0)) + lds(entry<1>(w0, t.slot1)) + lds(entry<2>(w0, t.slot2));
  uint32_t tail;
  if (DEPTH == 1) {
    tail = w0 >> 24;
  } else {
    const float plane1 =
        lds(entry<3>(w0, t.slot0)) + lds(entry<0>(w1, t.slot1)) + lds(entry<1>(w1, t.slot2));
    dot = fmaf(3.f, plane1, dot);
    tail = __byte_perm(w1, 0u, 0x4442);
  }
  const uint32_t high = __umulhi(tail, kDiv27);                // T / 27
  const float scale = lds(codebook + 4 * (tail - 27 * high));  // codebook[T % 27]
  return scale * fmaf(float(high), x15, dot);
}

// v[r] (one value per row r of a batch, in every lane) -> the sum over the 32 lanes of v[r] for
// r = (lane >> 2) & 7, in every lane: a butterfly that halves the rows at each of the first
// three steps (each lane keeps the half its lane bit names and sends the other).
__device__ __forceinline__ float sum_rows_over_lanes(float (&v)[kBatchRows], int lane) {
#pragma unroll
  for (int step = 16, n = kBatchRows / 2; step >= 4; step /= 2, n /= 2) {
    const bool upper = lane & step;
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const float send = upper ? v[i] : v[i + n];
      const float keep = upper ? v[i + n] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, step);
    }
  }
  float s = v[0];
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  return s;
}

// Cluster sums, after the cluster's blocks have streamed their windows of the cluster's batches
// [begin, end): each block adds its slice of the rows over the blocks, in window order, and
// writes them to out.
template <typename T>
__device__ void add_cluster_sums(const XTableParams& p, uint32_t region_a, int begin, int end) {
  cluster_sync();  // every block's row sums are in its shared memory
  const ClusterPlace place = cluster_place();
  const int rows = (end - begin) * kBatchRows, blocks = place.blocks;
  const int last = share_start(rows, blocks, place.rank + 1);
  for (int e = share_start(rows, blocks, place.rank) + threadIdx.x; e < last; e += blockDim.x) {
    const int batch = begin + e / kBatchRows;
    const Segment& seg = p.segment[segment_of(p, batch)];
    const int row = (batch - seg.first_batch) * kBatchRows + e % kBatchRows;
    if (row >= seg.rows) continue;  // the zero rows of a segment's partial last batch
    // All the loads first, then the sum: one remote latency per row, not one per block.
    float part[kMaxClusterBlocks];
#pragma unroll
    for (int b = 0; b < kMaxClusterBlocks; ++b)
      part[b] = b < blocks ? load_from_block(row_sum_address(region_a, e), b) : 0.f;
    float sum = 0.f;
#pragma unroll
    for (int b = 0; b < kMaxClusterBlocks; ++b)
      if (b < blocks) sum += part[b];
    static_cast<T*>(p.out)[seg.first_row + row] = from_float<T>(sum);
  }
  cluster_wait_for_all();  // no block leaves while another reads its shared memory
}

// CLUSTER_SUMS: see "Cluster sums" and "Split sums" at the top.
template <int DEPTH, typename T, bool CLUSTER_SUMS>
__global__ void __launch_bounds__(kThreads, 1)
    xtable_gemv_kernel(const __grid_constant__ XTableParams p) {
  extern __shared__ __align__(128) unsigned char shared[];
  __shared__ float window_x[kWindowGroups * kXStride];
  __shared__ float codebooks[kMaxSegments * kCodebookStride];
  __shared__ __align__(8) uint64_t landed[kWarps * kSlots];  // one mbarrier per batch slot
  __shared__ float warp_sums[kWarps];  // kAddRmsNorm's sum of squares
  const uint32_t start = (static_cast<uint32_t>(__cvta_generic_to_shared(shared)) + 127) & ~127u;
  const uint32_t region_a = (start + kRegionBytes - 1) & ~(kRegionBytes - 1);
  const uint32_t codebooks_at = static_cast<uint32_t>(__cvta_generic_to_shared(codebooks));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const LaneTables tables(region_a, lane);
  const uint32_t hi_offset = DEPTH == 2 && ((bytes_per_group(DEPTH) * lane) & 7) >= 2 ? 8 : 0;
  static_assert(kSlots == 2, "slots 0 and 1 are picked by a select, not an array index");
  const uint32_t slot0 = slot_address<DEPTH>(start, region_a, warp, 0);
  const uint32_t slot1 = slot_address<DEPTH>(start, region_a, warp, 1);
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(&landed[warp * kSlots]));
  const uint32_t bar1 = bar0 + 8;
  if (lane == 0) {
    mbarrier_init(bar0);
    mbarrier_init(bar1);
  }
  uint32_t parity = 0;  // bit i: the parity of slot i's next phase
  // The weights' tensor maps are kernel parameters, which no kernel writes: fetched early.
  if (threadIdx.x < p.segments) prefetch_tensor_map(&p.segment[threadIdx.x].rows_map);
  // Launched early (dependent_launch.cuh): the set-up above overlaps the end of the kernel before;
  // everything below reads its inputs or writes outputs.
  wait_for_previous_kernel();
  let_next_kernel_start();
  const float my_codebook_entry = codebook_entry(p);
  const float rms_factor = p.input.kind == ProductInput::Kind::kAddRmsNorm
                               ? rms_factor_of<T>(p, warp_sums)
                               : 1.f;

  // This block's items (see "Items"). Cluster sums: the cluster's share of the batches in the
  // block's window, its rank (one run, found without item_run's divisions); split sums:
  // split_share.
  ItemRun cluster_run{};
  int first, last;
  if (CLUSTER_SUMS) {
    const ClusterPlace place = cluster_place();
    cluster_run.window = place.rank;
    cluster_run.begin = share_start(p.batches, place.count, place.index);
    cluster_run.end = share_start(p.batches, place.count, place.index + 1);
    first = place.rank * p.batches + cluster_run.begin;
    last = place.rank * p.batches + cluster_run.end;
    cluster_run.next = last;
  } else {
    split_share(p, first, last);
  }
  const auto run_from = [&](int item) {
    return CLUSTER_SUMS ? cluster_run : item_run(p, item, last);
  };
  // The activations of the block's next window, read one window ahead (below).
  const int first_window =
      CLUSTER_SUMS ? cluster_run.window : first < last ? item_run(p, first, last).window : 0;
  float next_activation = window_activation<T>(p, first_window, rms_factor);

  for (int item = first; item < last;) {
    const ItemRun run = run_from(item);
    const int window = run.window, begin = run.begin, end = run.end;
    const int next_item = run.next;

    // Batch `batch` of the window into slot i (nothing past the block's share): lane 0 asks the
    // copy engine for the box of 8 rows x the window's bytes.
    auto request = [&](int batch, int i) {
      if (lane != 0 || batch >= end) return;
      const Segment& seg = p.segment[segment_of(p, batch)];
      const uint32_t bar = i ? bar1 : bar0;
      mbarrier_expect_bytes(bar, batch_bytes(DEPTH));
      copy_box_to_shared(i ? slot1 : slot0, &seg.rows_map, window * window_bytes(DEPTH),
                         (batch - seg.first_batch) * kBatchRows, bar);
    };
    // The warp's batches of the window are begin + warp + kWarps j, batch j in slot j % 2; its
    // slots are free (its requests of the last window have all been consumed). Why the first two
    // are requested here: see "The start of a window" at the top.
#pragma unroll
    for (int i = 0; i < kSlots; ++i) request(begin + warp + i * kWarps, i);
    __syncthreads();  // the last window's batches are done with the tables and x
    if (threadIdx.x < kWindowWeights)
      window_x[(threadIdx.x / kGroupSize) * kXStride + threadIdx.x % kGroupSize] = next_activation;
    __syncthreads();
    if (next_item < last) next_activation = window_activation<T>(p, window + 1, rms_factor);
    build_x_tables(window_x, region_a);
    // Read at the kernel's start; needed from the first batch on.
    if (threadIdx.x < kMaxSegments * kCodebookStride) codebooks[threadIdx.x] = my_codebook_entry;
    __syncthreads();
    const float x15 = window_x[lane * kXStride + 15];
    int i = 0;
    for (int batch = begin + warp; batch < end; batch += kWarps, i ^= 1) {
      mbarrier_wait(i ? bar1 : bar0, (parity >> i) & 1);
      parity ^= 1u << i;
      GroupBytes g[kBatchRows];
      read_batch<DEPTH>(i ? slot1 : slot0, lane, hi_offset, g);
      __syncwarp();  // every lane has its words: the slot may be refilled
      request(batch + kSlots * kWarps, i);

      const int s = segment_of(p, batch);
      const Segment& seg = p.segment[s];
      const uint32_t codebook = codebooks_at + 4 * kCodebookStride * s;
      float v[kBatchRows];
#pragma unroll
      for (int r = 0; r < kBatchRows; ++r)
        v[r] = group_value<DEPTH>(g[r], lane, tables, codebook, x15);
      const float sum = sum_rows_over_lanes(v, lane);
      const int r = (lane >> 2) & 7, row = (batch - seg.first_batch) * kBatchRows + r;
      if ((lane & 3) == 0) {  // the lanes that hold a row's sum
        if (CLUSTER_SUMS)
          sts(row_sum_address(region_a, (batch - cluster_run.begin) * kBatchRows + r), sum);
        else if (row < seg.rows)
          p.partial[int64_t(window) * p.rows + seg.first_row + row] = sum;
      }
    }
    item = next_item;
  }
  if (CLUSTER_SUMS) add_cluster_sums<T>(p, region_a, cluster_run.begin, cluster_run.end);
}

// How many clusters of `blocks` blocks of `kernel` the current device runs at once (0 if none),
// asked once per device and cluster size: every instantiation of the kernel runs one block per SM
// (its shared memory), so they share the answer.
int max_active_clusters(const void* kernel, int blocks) {
  static std::array<std::atomic<int>, 64 * (kMaxClusterBlocks + 1)> answer{};  // 0: not asked
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::atomic<int>* known =
      device < 64 ? &answer[device * (kMaxClusterBlocks + 1) + blocks] : nullptr;
  if (known != nullptr && known->load(std::memory_order_relaxed) != 0) return *known - 1;
  const LaunchConfig config(dim3(blocks), dim3(kThreads), kSharedBytes, nullptr, false, blocks);
  int clusters = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, config.get()));
  if (known != nullptr) known->store(clusters + 1, std::memory_order_relaxed);
  return clusters;
}

// Split sums on `grid` blocks: how many of each window's batches its own blocks take
// (split_share). Helpers pay off where the floor(G / W) own blocks of a window can take whole
// rounds of the balanced count, ceil(items / (G kWarps)), leaving rests to the G mod W helpers, and
// no helper takes longer than an own block: its windows' rounds plus a table build each (counted
// as a round) against the own blocks' rounds and build.
int own_batches(const XTableParams& p, int grid) {
  if (grid < p.windows) return p.batches;
  const int per_window = grid / p.windows, helpers = grid - per_window * p.windows;
  const int64_t round_items = int64_t(grid) * kWarps;
  const int64_t rounds = (p.items + round_items - 1) / round_items;
  const int64_t own = per_window * rounds * kWarps;
  if (helpers == 0 || own >= p.batches) return p.batches;
  const int64_t rest_rounds = (p.batches - own + kWarps - 1) / kWarps;
  const int64_t helper_windows = (p.windows + helpers - 1) / helpers;
  return helper_windows * (rest_rounds + 1) <= rounds + 1 ? int(own) : p.batches;
}

template <int DEPTH, typename T>
void launch(const XTableParams& p_in, const at::Tensor& out) {
  XTableParams p = p_in;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (p.windows <= kMaxClusterBlocks) {
    auto kernel = xtable_gemv_kernel<DEPTH, T, true>;
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes));
    const int active = max_active_clusters(reinterpret_cast<const void*>(kernel), p.windows);
    if (active > 0) {
      // As many clusters as run at once, or more where a cluster would get more rows than its
      // blocks' shared memory holds sums for; none without a batch.
      const int clusters = int(std::min<int64_t>(
          p.batches, std::max<int64_t>(active, (p.batches + kClusterMaxBatches - 1) /
                                                   kClusterMaxBatches)));
      p.out = out.data_ptr();
      const LaunchConfig config(dim3(clusters * p.windows), dim3(kThreads), kSharedBytes, stream,
                                true, p.windows);
      C10_CUDA_CHECK(cudaLaunchKernelEx(config.get(), kernel, p));
      return;
    }
  }
  auto kernel = xtable_gemv_kernel<DEPTH, T, false>;
  // Window partials, even for one window: this kernel never writes `out`.
  const at::Tensor partial = at::empty({p.windows, p.rows}, out.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int grid = int(std::min<int64_t>(p.items, sms));
  p.own_batches = own_batches(p, grid);
  const LaunchConfig config(dim3(grid), dim3(kThreads), kSharedBytes, stream, true);
  C10_CUDA_CHECK(cudaLaunchKernelEx(config.get(), kernel, p));
  add_split_partials<T>(partial, out, stream, /*early=*/true);
}

template <int DEPTH>
void launch_type(const XTableParams& p, const at::Tensor& x, const at::Tensor& out) {
  switch (x.scalar_type()) {
    case at::kHalf: return launch<DEPTH, __half>(p, out);
    case at::kBFloat16: return launch<DEPTH, __nv_bfloat16>(p, out);
    default: return launch<DEPTH, float>(p, out);
  }
}

}  // namespace

bool xtable_gemv_supports(const at::Tensor& x, const at::Tensor& packed, int64_t depth) {
  if (depth != 1 && depth != 2) return false;
  if (x.size(0) != 1) return false;
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(packed.device().index());
  // The tables and batch slots plus the staged activations, codebooks and barriers; tensor
  // copies (sm_90+), with the kernel built for them.
  if (props->sharedMemPerBlockOptin < size_t(kSharedBytes) + 4096 || props->major < 9 ||
      !runs_sm90_code(reinterpret_cast<const void*>(xtable_gemv_kernel<2, __half, true>)))
    return false;
  const int64_t groups = packed.size(1) / bytes_per_group(int(depth));
  // Whole windows, and rows on 16-byte boundaries for the bulk copies (every row is, when the
  // first is: a row of whole windows is a multiple of 32 * B bytes).
  // Rows, batch and item numbers in int, also for a call of kMaxSegments such weights.
  const int64_t items = groups / kWindowGroups * ((packed.size(0) + kBatchRows - 1) / kBatchRows);
  return groups % kWindowGroups == 0 && is_16_byte_aligned(packed) &&
         packed.size(0) < (int64_t(1) << 30) && packed.size(1) < (int64_t(1) << 31) &&
         items < (int64_t(1) << 31) / kMaxSegments;
}

void xtable_gemv_into(const ProductInput& input, at::TensorList packed, at::TensorList codebooks,
                      int64_t depth, int64_t in_features, const at::Tensor& out) {
  const at::Tensor& x = input.x;
  const int64_t x_width = input.kind == ProductInput::Kind::kSiluMul ? 2 * in_features
                                                                    : in_features;
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.size(1) == x_width && x.is_contiguous() &&
                  out.is_contiguous() && out.dim() == 2 && out.size(0) == 1,
              "tritllm: internal error: xtable_gemv needs contiguous x [1, K], out [1, N]");
  TORCH_CHECK(product_input_supported(input),
              "tritllm: internal error: xtable_gemv cannot read this input");
  TORCH_CHECK(!packed.empty() && packed.size() <= size_t(kMaxSegments) &&
                  codebooks.size() == packed.size(),
              "tritllm: internal error: xtable_gemv takes 1 to ", kMaxSegments, " weights");
  XTableParams p{};
  p.input = input_pointers(input);
  p.in_features = in_features;
  p.windows = int(num_groups(p.in_features) / kWindowGroups);
  p.segments = int(packed.size());
  int64_t rows = 0, batches = 0;
  for (int s = 0; s < kMaxSegments; ++s) {
    Segment& seg = p.segment[s];
    if (s >= p.segments) {
      seg.first_batch = std::numeric_limits<int>::max();
      continue;
    }
    TORCH_CHECK(packed[s].size(1) == packed[0].size(1),
                "tritllm: internal error: xtable_gemv weights of different K");
    seg.rows_map = byte_box_map(packed[s], kBatchRows, window_bytes(int(depth)));
    seg.codebook = codebooks[s].data_ptr<float>();
    seg.codebook_size = int(codebooks[s].numel());
    seg.rows = int(packed[s].size(0));
    seg.first_row = int(rows);
    seg.first_batch = int(batches);
    rows += seg.rows;
    batches += (seg.rows + kBatchRows - 1) / kBatchRows;
  }
  TORCH_CHECK(rows == out.size(1) && rows < (int64_t(1) << 30),
              "tritllm: internal error: xtable_gemv output of ", out.size(1), " columns for ",
              rows, " rows");
  if (rows == 0) return;
  p.rows = int(rows);
  p.batches = int(batches);
  p.own_batches = p.batches;  // no helpers (split sums may set fewer: launch)
  TORCH_CHECK(int64_t(p.windows) * p.batches < (int64_t(1) << 31),
              "tritllm: internal error: xtable_gemv takes fewer than 2^31 (window, batch) items");
  p.items = p.windows * p.batches;
  if (depth == 1)
    launch_type<1>(p, x, out);
  else
    launch_type<2>(p, x, out);
}

}  // namespace cuda
}  // namespace tritllm
