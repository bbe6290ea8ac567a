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
// l of the window, so a warp reads one row's 224 window bytes (d = 2) in one coalesced sweep, and
// each lane needs the tables of its own group only. A block builds the tables of one window in
// shared memory and its warps take batches of 8 rows from a shared counter; each lane computes
// scale * dot of its group for the 8 rows, and a butterfly of shuffles adds the 32 groups of
// each row. Window partial sums go to a float32 buffer [windows, N] that a second kernel adds
// in window order (split_sums.cuh): deterministic, so CUDA-graph replays equal eager calls.
// Blocks are persistent (one per SM: the tables take 128 KB) and own a contiguous range of
// (window, batch) items, so a block rebuilds its tables once or twice per call.
//
// The table build is the fixed cost of a call; on the 1024- and 4096-row matrices of a Llama
// layer it rivals the time spent streaming the weights. So a block first copies the window's 512
// activations into shared memory, one coalesced load per thread, and fills the tables from
// there: a build waits for one global load instead of one per table unit. Each warp's first
// batch of weight bytes is requested before the build, so it arrives while the tables are made.
//
// Several matrices that share x and K (q, k and v; gate and up) run as one call: they are the
// "segments" of one output, out [1, N_1 + N_2 + ...], each with its own bytes and codebook. The
// batches of 8 rows are numbered across the segments (none straddles two), so the work split and
// the tables are those of one matrix of N_1 + N_2 + ... rows: one launch, one table build per
// block and one split sum instead of one of each per matrix.
//
// Table layout: bank-conflict free and one instruction per address. Every table row (one byte
// value) has one 4-byte entry per lane, so whatever the bytes, lane l reads bank l. Rows are 256
// bytes apart and hold two tables side by side (lanes' entries at +0 and +128), in two 64 KB
// regions that start on a 64 KB boundary of the shared window:
//     region A: v * 256 +   0 + 4 l : slot b = 0         region B: v * 256 +   0 + 4 l : b = 2
//               v * 256 + 128 + 4 l : slot b = 1                   (second half unused)
// The shared address of an entry is then  region | v << 8 | (slot * 128 + 4 l): one byte_perm
// puts the packed byte v next to the lane's constant bytes (no add of a table base: the
// regions' alignment makes the base part of those constant bytes).
//
// Bytes the format forbids (>= 243, or a scale index past the codebook) read table rows that
// exist (all 256 are filled, with finite values) and codebook entries that are zero, so corrupt
// data gives wrong numbers but never an out-of-bounds access, as in the other CUDA kernels
// (docs/FORMAT.md, Validation).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <limits>

#include "device_common.cuh"
#include "launchers.h"
#include "split_sums.cuh"

namespace tritllm {
namespace cuda {
namespace {

constexpr int kWindowGroups = 32;  // groups of a window: one per lane
constexpr int kWindowWeights = kWindowGroups * kGroupSize;
constexpr int kBatchRows = 8;      // rows a warp takes at a time
constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
static_assert(kThreads == kWindowWeights, "one thread stages one activation of a window");
constexpr uint32_t kRegionBytes = 1u << 16;
// Two 64 KB regions on a 64 KB boundary fit in 192 KB wherever the dynamic shared memory starts.
constexpr int kSharedBytes = 3 * kRegionBytes;
constexpr int kTableRow = 256;  // bytes between table rows
constexpr int kSlotBytes = 128;  // bytes of one table's entries in a row (32 lanes x 4)
// The staged activations of a window, group g's 16 at g * kXStride: with 17 floats per group,
// lanes reading the same position of their own groups hit 32 different banks.
constexpr int kXStride = kGroupSize + 1;
constexpr int kCodebookStride = 32;  // floats per segment's codebook in shared memory (27 used)
constexpr int kMaxSegments = int(kXtableMaxWeights);
// floor(t / 27) = umulhi(t, kDiv27) for every byte t.
constexpr uint32_t kDiv27 = 159072863u;  // ceil(2^32 / 27)

// One matrix of a call (see "segments" at the top).
struct Segment {
  const uint8_t* packed;  // [rows, G * B], 8-byte aligned
  const float* codebook;
  int codebook_size;
  int rows;
  int first_row;    // of its rows in out (and in the partial sums)
  int first_batch;  // its first batch; past the last batch for unused segments
};

struct XTableParams {
  const void* x;      // [K]
  float* partial;     // [windows, rows]
  int64_t in_features;
  int64_t row_bytes;  // of every segment
  int rows;           // of all segments
  int windows;
  int batches;        // per window, of all segments
  int64_t items;      // windows * batches
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

// The segment that batch `batch` (numbered across segments) belongs to.
__device__ __forceinline__ int segment_of(const XTableParams& p, int batch) {
  int s = 0;
#pragma unroll
  for (int i = 1; i < kMaxSegments; ++i) s += batch >= p.segment[i].first_batch;
  return s;
}

// Segment s's codebook in shared memory, 27 entries, zero past its length (corrupt indices).
__device__ void stage_codebooks(const XTableParams& p, float* codebooks) {
  for (int e = threadIdx.x; e < p.segments * kCodebookStride; e += blockDim.x) {
    const Segment& seg = p.segment[e / kCodebookStride];
    const int i = e % kCodebookStride;
    codebooks[e] = i < seg.codebook_size ? seg.codebook[i] : 0.f;
  }
}

// The window's 512 activations as float, group g's at window_x[g * kXStride ...].
template <typename T>
__device__ void stage_window_x(const XTableParams& p, int window, float* window_x) {
  const int64_t k = int64_t(window) * kWindowWeights + threadIdx.x;
  window_x[(threadIdx.x / kGroupSize) * kXStride + threadIdx.x % kGroupSize] =
      k < p.in_features ? to_float(static_cast<const T*>(p.x)[k]) : 0.f;
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

// One row's window bytes of this lane's group, as loaded: 8 bytes at an 8-byte boundary and
// (d = 2, when the group runs past them) the next 8.
struct GroupBytes {
  uint2 lo, hi;
};

// The lane's bytes of the rows of one batch, of which the first `valid` exist (kFull: all 8, no
// checks). `at` points at the lane's 8-byte word in the batch's first row; `two_words` says
// whether its group runs into the next word (d = 2, 7 l mod 8 >= 2).
template <int DEPTH, bool kFull>
__device__ __forceinline__ void load_batch(const uint8_t* at, int row_bytes, int valid,
                                           bool two_words, GroupBytes (&g)[kBatchRows]) {
#pragma unroll
  for (int r = 0; r < kBatchRows; ++r) {
    const uint2* word = reinterpret_cast<const uint2*>(at);
    const bool here = kFull || r < valid;
    g[r].lo = here ? __ldg(word) : make_uint2(0u, 0u);
    g[r].hi = DEPTH == 2 && two_words && here ? __ldg(word + 1) : make_uint2(0u, 0u);
    at += row_bytes;
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

template <int DEPTH, typename T>
__global__ void __launch_bounds__(kThreads, 1)
    xtable_gemv_kernel(const __grid_constant__ XTableParams p) {
  extern __shared__ __align__(16) unsigned char shared[];
  __shared__ float window_x[kWindowGroups * kXStride];
  __shared__ float codebooks[kMaxSegments * kCodebookStride];
  __shared__ int next_batch;  // of the block's current window
  const uint32_t start = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  const uint32_t region_a = (start + kRegionBytes - 1) & ~(kRegionBytes - 1);
  const uint32_t codebooks_at = static_cast<uint32_t>(__cvta_generic_to_shared(codebooks));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const LaneTables tables(region_a, lane);
  constexpr int kGroupBytes = bytes_per_group(DEPTH);
  const bool two_words = DEPTH == 2 && ((kGroupBytes * lane) & 7) >= 2;
  stage_codebooks(p, codebooks);  // read after the first barrier below

  // This block's items (window * batches + batch): a contiguous share of all of them.
  const int64_t first = p.items * blockIdx.x / gridDim.x;
  const int64_t last = p.items * (blockIdx.x + 1) / gridDim.x;

  for (int64_t item = first; item < last;) {
    const int window = int(item / p.batches);
    const int begin = int(item - int64_t(window) * p.batches);
    const int end = int(min(last, int64_t(window + 1) * p.batches) - int64_t(window) * p.batches);
    const int64_t window_offset =
        int64_t(window) * kWindowGroups * kGroupBytes + ((kGroupBytes * lane) & ~7);
    float* window_out = p.partial + int64_t(window) * p.rows;

    // Batches until the window's share is done, taken from the shared counter one ahead, so the
    // loads of the next batch are in flight while this one is computed. Two buffers used in turn
    // (a loop unrolled twice) keep the registers in place.
    auto take = [&]() {
      int b = 0;
      if (lane == 0) b = atomicAdd(&next_batch, 1);
      return __shfl_sync(0xffffffffu, b, 0);
    };
    auto load = [&](int batch, GroupBytes (&g)[kBatchRows]) {
      if (batch >= end) return;
      const Segment& seg = p.segment[segment_of(p, batch)];
      const int row = (batch - seg.first_batch) * kBatchRows;
      const uint8_t* at = seg.packed + window_offset + int64_t(row) * p.row_bytes;
      if (row + kBatchRows <= seg.rows)
        load_batch<DEPTH, true>(at, int(p.row_bytes), kBatchRows, two_words, g);
      else
        load_batch<DEPTH, false>(at, int(p.row_bytes), seg.rows - row, two_words, g);
    };
    auto compute = [&](int batch, const GroupBytes (&g)[kBatchRows], float x15) {
      const int s = segment_of(p, batch);
      const Segment& seg = p.segment[s];
      const uint32_t codebook = codebooks_at + 4 * kCodebookStride * s;
      float v[kBatchRows];
#pragma unroll
      for (int r = 0; r < kBatchRows; ++r)
        v[r] = group_value<DEPTH>(g[r], lane, tables, codebook, x15);
      const float sum = sum_rows_over_lanes(v, lane);
      const int row = (batch - seg.first_batch) * kBatchRows + ((lane >> 2) & 7);
      if ((lane & 3) == 0 && row < seg.rows) window_out[seg.first_row + row] = sum;
    };
    // Each warp's first batch of the window is fixed (begin + warp), so that its bytes are in
    // flight while the tables are built; the others come from the shared counter.
    GroupBytes a[kBatchRows], b[kBatchRows];
    int batch = begin + warp;
    __syncthreads();  // the last window's batches are done with the tables, x and the counter
    load(batch, a);
    stage_window_x<T>(p, window, window_x);
    if (threadIdx.x == 0) next_batch = begin + kWarps;
    __syncthreads();
    build_x_tables(window_x, region_a);
    __syncthreads();
    const float x15 = window_x[lane * kXStride + 15];
    while (batch < end) {
      int following = take();
      load(following, b);
      compute(batch, a, x15);
      batch = following;
      if (batch >= end) break;
      following = take();
      load(following, a);
      compute(batch, b, x15);
      batch = following;
    }
    item = int64_t(window) * p.batches + end;
  }
}

template <int DEPTH, typename T>
void launch(const XTableParams& p_in, const at::Tensor& out) {
  XTableParams p = p_in;
  auto kernel = xtable_gemv_kernel<DEPTH, T>;
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  // Window partials, even for one window: the kernel never writes `out`.
  const at::Tensor partial = at::empty({p.windows, p.rows}, out.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes));
  const int grid = int(std::min<int64_t>(p.items, props->multiProcessorCount));
  auto stream = at::cuda::getCurrentCUDAStream();
  kernel<<<grid, kThreads, kSharedBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  add_split_partials<T>(partial, out, stream);
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
  // The 192 KB of tables plus the staged activations and codebooks.
  if (props->sharedMemPerBlockOptin < size_t(kSharedBytes) + 4096) return false;
  const int64_t groups = packed.size(1) / bytes_per_group(int(depth));
  // Whole windows, and rows on 8-byte boundaries for the 8-byte loads (every row is, when the
  // first is: a row of whole windows is a multiple of 32 * B bytes).
  // Rows and batch numbers in int.
  return groups % kWindowGroups == 0 && reinterpret_cast<uintptr_t>(packed.data_ptr()) % 8 == 0 &&
         packed.size(0) < (int64_t(1) << 30) && packed.size(1) < (int64_t(1) << 31);
}

void xtable_gemv_into(const at::Tensor& x, at::TensorList packed, at::TensorList codebooks,
                      int64_t depth, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.is_contiguous() && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) == 1,
              "tritllm: internal error: xtable_gemv needs contiguous x [1, K], out [1, N]");
  TORCH_CHECK(!packed.empty() && packed.size() <= size_t(kMaxSegments) &&
                  codebooks.size() == packed.size(),
              "tritllm: internal error: xtable_gemv takes 1 to ", kMaxSegments, " weights");
  XTableParams p{};
  p.x = x.data_ptr();
  p.in_features = x.size(1);
  p.row_bytes = packed[0].size(1);
  p.windows = int(num_groups(p.in_features) / kWindowGroups);
  p.segments = int(packed.size());
  int64_t rows = 0, batches = 0;
  for (int s = 0; s < kMaxSegments; ++s) {
    Segment& seg = p.segment[s];
    if (s >= p.segments) {
      seg.first_batch = std::numeric_limits<int>::max();
      continue;
    }
    TORCH_CHECK(packed[s].size(1) == p.row_bytes,
                "tritllm: internal error: xtable_gemv weights of different K");
    seg.packed = packed[s].data_ptr<uint8_t>();
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
  p.items = int64_t(p.windows) * p.batches;
  if (depth == 1)
    launch_type<1>(p, x, out);
  else
    launch_type<2>(p, x, out);
}

}  // namespace cuda
}  // namespace tritllm
