// The CUDA kernel of torch.ops.tritllm.decode_attention (shapes and math: ../decode_attention.h).
//
// Why a kernel of its own: a decode step's attention in PyTorch operations is a rotary kernel,
// two cache writes, two batched products and a softmax, each a launch of a few microseconds
// over a few hundred kilobytes (a Llama-8B layer at 400 cached positions reads 1.6 MB of keys
// and values). Here it is one launch per layer.
//
// Work split (flash decoding). Block (c, j, b) takes key/value head j of sequence b and the c-th
// of `chunks` equal slices of the positions 0..p (cut at run time from p, so every block has work
// at every position); the chunks of one (j, b) form a thread-block cluster (sm_90+) and add their
// results through distributed shared memory, so there is no second kernel. Without clusters
// (older GPUs, or code built for them) one block takes all positions.
//
// Inside a block:
//  1. each warp requests its first U positions' key and value rows (below), then every thread
//     helps rotate the G query heads of head j and the new key into shared memory (float32
//     arithmetic rounded to the dtype, one rounding per operation as the reference does); the
//     last chunk writes the new key and value into the caches at p. No block reads position p
//     from the caches (each uses the copy in its shared memory), so that write cannot race;
//  2. each warp takes U positions at a time, lane l holding the element pairs 2(l + 32 i) of a
//     head (D / 2 pairs over 32 lanes, P = ceil(D / 64) per lane): the U key rows' and U value
//     rows' loads are issued together (one memory latency per U positions), the G x U scores
//     come from a butterfly of shuffles and fold into a running softmax (running max m, sum l,
//     weighted values acc; exp2 with the scale times log2(e) folded into q);
//  3. the warps' (m, l, acc) are merged in shared memory; then each block of the cluster merges
//     a share of the outputs over all blocks' results, read through distributed shared memory.
// G is padded to 4 or 8 heads (registers are sized at compile time): MHA models (G = 1) spend
// the padding's arithmetic, which is cheap next to the loads.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../decode_attention.h"
#include "cluster.cuh"
#include "dependent_launch.cuh"
#include "device_common.cuh"

namespace tritllm {
namespace cuda {
namespace {

constexpr int kMaxChunks = 8;          // blocks per cluster: the portable maximum
// A full cache gives each block at least this many positions. 48, not 64: with a Llama 8B layer's
// 8 key/value heads and a 384-position cache that is 8 blocks per head instead of 6, and on an
// H200 the qkv product plus the attention took 0.0-1.0 us less per layer at p = 128-383
// (docs/KERNEL_NOTES.md, session 16; not profiled: more blocks spread the key and value loads
// over more SMs, each block with fewer warps loading).
constexpr int kMinChunkPositions = 48;
constexpr int kMaxHeadDim = 256;       // P = 4 pairs per lane
constexpr int kPairsPerRound = 16;     // U * P: the key (and value) pairs a lane loads per round
constexpr double kLog2E = 1.4426950408889634;

// Two consecutive elements of a cache row, loaded as one word.
template <typename T> struct PairOf;
template <> struct PairOf<float> { using type = float2; };
template <> struct PairOf<__half> { using type = __half2; };
template <> struct PairOf<__nv_bfloat16> { using type = __nv_bfloat162; };

__device__ __forceinline__ float2 to_float2(float2 v) { return v; }
__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }

template <typename T>
__device__ __forceinline__ typename PairOf<T>::type make_pair(float a, float b);
template <>
__device__ __forceinline__ float2 make_pair<float>(float a, float b) { return make_float2(a, b); }
template <>
__device__ __forceinline__ __half2 make_pair<__half>(float a, float b) {
  return __floats2half2_rn(a, b);
}
template <>
__device__ __forceinline__ __nv_bfloat162 make_pair<__nv_bfloat16>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}

template <typename T>
struct AttentionParams {
  const T* q;  // element (b, i) at q[b * q_row + i * q_col]; k and v likewise
  const T* k;
  const T* v;
  int64_t q_row, q_col, k_row, k_col, v_row, v_col;
  const T* cos;  // [>= max_len, head_dim]
  const T* sin;
  const int64_t* position;
  T* key_cache;  // [B, kv_heads, max_len, head_dim]
  T* value_cache;
  T* out;  // [B, kv_heads * group * head_dim]
  int kv_heads, group, max_len, head_dim;
  float scale_log2;  // scale * log2(e)
};

// Shared memory of a block, in floats (every block has the same layout: the cluster reads its
// blocks' results at the same offsets).
template <int G_MAX>
struct SharedLayout {
  static constexpr int kWarps = 32 / G_MAX;
  int head_dim;
  __device__ __host__ int staged() const { return G_MAX * head_dim + 2 * head_dim; }
  __device__ __host__ int warp_sums() const { return kWarps * G_MAX * head_dim; }
  // [G_MAX][D] rotated queries, then the new key [D] and value [D]; later overwritten by the
  // warps' weighted sums [kWarps][G_MAX][D].
  __device__ __host__ int queries() const { return 0; }
  __device__ __host__ int warp_max() const { return staged() > warp_sums() ? staged() : warp_sums(); }
  __device__ __host__ int warp_total() const { return warp_max() + kWarps * G_MAX; }
  __device__ __host__ int block_max() const { return warp_total() + kWarps * G_MAX; }
  __device__ __host__ int block_total() const { return block_max() + G_MAX; }
  __device__ __host__ int block_sums() const { return block_total() + G_MAX; }  // [G_MAX][D]
  __device__ __host__ int floats() const { return block_sums() + G_MAX * head_dim; }
};

// Element e of x (D elements, stride `col`) rotated at the row (cos, sin) of its position:
// x[e] cos[e] - x[e + D/2] sin[e] for the first half, x[e] cos[e] + x[e - D/2] sin[e] for the
// second, each product and the sum rounded in float32 (no fused multiply-add: the reference's
// operations), the result rounded to T.
template <typename T>
__device__ __forceinline__ float rotated(const T* x, int64_t col, int e, int half, const T* cos,
                                         const T* sin) {
  const float xe = to_float(x[e * col]);
  const float other = e < half ? -to_float(x[(e + half) * col]) : to_float(x[(e - half) * col]);
  const float r = __fadd_rn(__fmul_rn(xe, to_float(cos[e])), __fmul_rn(other, to_float(sin[e])));
  return to_float(from_float<T>(r));
}

template <typename T, int G_MAX, int P>
__global__ void __launch_bounds__(32 * SharedLayout<G_MAX>::kWarps)
    decode_attention_kernel(const AttentionParams<T> a) {
  using Pair = typename PairOf<T>::type;
  constexpr int kWarps = SharedLayout<G_MAX>::kWarps;
  // Positions per warp and round (U): kPairsPerRound key and value pairs per lane in flight,
  // at most 32 scores.
  constexpr int kRound = kPairsPerRound / P < 32 / G_MAX ? kPairsPerRound / P : 32 / G_MAX;
  extern __shared__ float smem[];
  const SharedLayout<G_MAX> layout{a.head_dim};
  const int D = a.head_dim, G = a.group, half = D / 2;
  const int chunk = blockIdx.x, j = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const queries = smem + layout.queries();
  float* const new_kv = queries + G_MAX * D;  // key [D], value [D]
  float* const warp_sums = smem;
  float* const warp_max = smem + layout.warp_max();
  float* const warp_total = smem + layout.warp_total();
  float* const block_max = smem + layout.block_max();
  float* const block_total = smem + layout.block_total();
  float* const block_sums = smem + layout.block_sums();

  // Everything below reads what the kernels before may write (q, k, v, the caches, position).
  wait_for_previous_kernel();
  let_next_kernel_start();
  const int64_t p = *a.position;
  T* const out = a.out + (int64_t(b) * a.kv_heads + j) * G * D;  // this head's G query heads
  if (p < 0 || p >= a.max_len) {  // every block of the cluster returns here
    if (chunk == 0)
      for (int i = threadIdx.x; i < G * D; i += blockDim.x) out[i] = from_float<T>(NAN);
    return;
  }

  // This block's positions, and its warp's first round of key and value rows, requested before
  // the rotation so that their latency overlaps it (position p comes from shared memory below).
  const int length = int(p) + 1;
  const int per_chunk = (length + int(gridDim.x) - 1) / int(gridDim.x);
  const int first = chunk * per_chunk;
  const int end = min(first + per_chunk, length);
  const int64_t rows = (int64_t(b) * a.kv_heads + j) * a.max_len;  // this head's first row
  const T* const keys = a.key_cache + rows * D;
  const T* const values = a.value_cache + rows * D;
  Pair kp[kRound][P], vp[kRound][P];
  const auto load_round = [&](int base) {
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      const int t = base + u;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int e = 2 * (lane + 32 * i);
        kp[u][i] = vp[u][i] = make_pair<T>(0.f, 0.f);
        if (t < end && t != p && e < D) {
          kp[u][i] = *reinterpret_cast<const Pair*>(keys + int64_t(t) * D + e);
          vp[u][i] = *reinterpret_cast<const Pair*>(values + int64_t(t) * D + e);
        }
      }
    }
  };
  int base = first + warp * kRound;
  if (base < end) load_round(base);

  // 1. Rotated queries and key, the new value; the last chunk stores key and value at p.
  const T* const cos = a.cos + p * D;
  const T* const sin = a.sin + p * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int h = i / D, e = i % D;
    queries[h * D + e] = rotated(a.q + b * a.q_row + int64_t(j * G + h) * D * a.q_col, a.q_col, e,
                                 half, cos, sin);
  }
  for (int e = threadIdx.x; e < D; e += blockDim.x) {
    const float key =
        rotated(a.k + b * a.k_row + int64_t(j) * D * a.k_col, a.k_col, e, half, cos, sin);
    const T value = a.v[b * a.v_row + (int64_t(j) * D + e) * a.v_col];
    new_kv[e] = key;
    new_kv[D + e] = to_float(value);
    if (chunk == int(gridDim.x) - 1) {
      a.key_cache[(rows + p) * D + e] = from_float<T>(key);
      a.value_cache[(rows + p) * D + e] = value;
    }
  }
  __syncthreads();

  // 2. This lane's pairs of the queries, scaled for exp2.
  float q[G_MAX][2 * P];
#pragma unroll
  for (int h = 0; h < G_MAX; ++h)
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int e = 2 * (lane + 32 * i);
      const bool here = h < G && e < D;
      q[h][2 * i] = here ? queries[h * D + e] * a.scale_log2 : 0.f;
      q[h][2 * i + 1] = here ? queries[h * D + e + 1] * a.scale_log2 : 0.f;
    }

  float m[G_MAX], l[G_MAX], acc[G_MAX][2 * P];
#pragma unroll
  for (int h = 0; h < G_MAX; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 2 * P; ++i) acc[h][i] = 0.f;
  }

  while (base < end) {
    if (base + kRound > p) {  // the new token is in this round: exact in T (staged from T)
      const int u = int(p) - base;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int e = 2 * (lane + 32 * i);
#pragma unroll
        for (int w = 0; w < kRound; ++w)
          if (w == u && e < D) {  // constant register indices: no local-memory array
            kp[w][i] = make_pair<T>(new_kv[e], new_kv[e + 1]);
            vp[w][i] = make_pair<T>(new_kv[D + e], new_kv[D + e + 1]);
          }
      }
    }
    float s[G_MAX][kRound];
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      float2 kf[P];
#pragma unroll
      for (int i = 0; i < P; ++i) kf[i] = to_float2(kp[u][i]);
#pragma unroll
      for (int h = 0; h < G_MAX; ++h) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < P; ++i) d += q[h][2 * i] * kf[i].x + q[h][2 * i + 1] * kf[i].y;
        s[h][u] = d;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
#pragma unroll
      for (int h = 0; h < G_MAX; ++h)
#pragma unroll
        for (int u = 0; u < kRound; ++u) s[h][u] += __shfl_xor_sync(0xffffffffu, s[h][u], offset);
#pragma unroll
    for (int h = 0; h < G_MAX; ++h) {
      float round_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < kRound; ++u) {
        if (base + u >= end) s[h][u] = -INFINITY;
        round_max = fmaxf(round_max, s[h][u]);
      }
      const float new_max = fmaxf(m[h], round_max);  // finite: position `base` is in range
      const float rescale = exp2f(m[h] - new_max);
      m[h] = new_max;
      l[h] *= rescale;
#pragma unroll
      for (int i = 0; i < 2 * P; ++i) acc[h][i] *= rescale;
#pragma unroll
      for (int u = 0; u < kRound; ++u) {
        const float w = exp2f(s[h][u] - new_max);
        l[h] += w;
#pragma unroll
        for (int i = 0; i < P; ++i) {
          const float2 vf = to_float2(vp[u][i]);
          acc[h][2 * i] += w * vf.x;
          acc[h][2 * i + 1] += w * vf.y;
        }
      }
    }
    base += kWarps * kRound;
    if (base < end) load_round(base);
  }

  // 3. The warps' results, merged per block (a warp without positions has m = -inf, l = 0).
  __syncthreads();  // every warp is done with the staged key and value: warp_sums overlaps them
#pragma unroll
  for (int h = 0; h < G_MAX; ++h) {
    if (h >= G) break;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int e = 2 * (lane + 32 * i);
      if (e < D) {
        warp_sums[(warp * G_MAX + h) * D + e] = acc[h][2 * i];
        warp_sums[(warp * G_MAX + h) * D + e + 1] = acc[h][2 * i + 1];
      }
    }
    if (lane == 0) {
      warp_max[warp * G_MAX + h] = m[h];
      warp_total[warp * G_MAX + h] = l[h];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int h = i / D, e = i % D;
    float top = -INFINITY;
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, warp_max[w * G_MAX + h]);
    float total = 0.f, sum = 0.f;
    if (top != -INFINITY) {
      for (int w = 0; w < kWarps; ++w) {
        const float c = exp2f(warp_max[w * G_MAX + h] - top);
        total += warp_total[w * G_MAX + h] * c;
        sum += warp_sums[(w * G_MAX + h) * D + e] * c;
      }
    }
    block_sums[i] = sum;
    if (e == 0) {
      block_max[h] = top;
      block_total[h] = total;
    }
  }

  if (gridDim.x == 1) {
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += blockDim.x)
      out[i] = from_float<T>(block_sums[i] / block_total[i / D]);
    return;
  }
  // 4. The cluster's blocks (rank = blockIdx.x: a cluster spans gridDim.x) each take a share of
  // the outputs and add the blocks' results for it in block order (the loads of all blocks issued
  // together); no block leaves while others may still read its shared memory.
  cluster_sync();
  const auto address = [](const float* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
  };
  const int blocks = int(gridDim.x);
  for (int i = chunk * blockDim.x + threadIdx.x; i < G * D; i += blocks * blockDim.x) {
    const int h = i / D;
    float top_r[kMaxChunks], total_r[kMaxChunks], sum_r[kMaxChunks];
#pragma unroll
    for (int r = 0; r < kMaxChunks; ++r) {
      top_r[r] = -INFINITY;
      total_r[r] = sum_r[r] = 0.f;
      if (r < blocks) {
        top_r[r] = load_from_block(address(block_max + h), r);
        total_r[r] = load_from_block(address(block_total + h), r);
        sum_r[r] = load_from_block(address(block_sums + i), r);
      }
    }
    float top = -INFINITY;
#pragma unroll
    for (int r = 0; r < kMaxChunks; ++r) top = fmaxf(top, top_r[r]);
    float total = 0.f, sum = 0.f;
#pragma unroll
    for (int r = 0; r < kMaxChunks; ++r) {
      const float c = top_r[r] == -INFINITY ? 0.f : exp2f(top_r[r] - top);
      total += total_r[r] * c;
      sum += sum_r[r] * c;
    }
    out[i] = from_float<T>(sum / total);
  }
  cluster_wait_for_all();
}

template <typename T, int G_MAX, int P>
void launch(const AttentionParams<T>& a, int batch) {
  auto kernel = decode_attention_kernel<T, G_MAX, P>;
  const bool sm90 = runs_sm90_code(reinterpret_cast<const void*>(kernel));
  int chunks = 1;
  if (sm90) {
    // About two blocks per SM, but at least kMinChunkPositions positions each in a full cache.
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t heads = int64_t(batch) * a.kv_heads;
    const int64_t by_sms = (2 * sms + heads - 1) / heads;
    const int64_t by_length = (a.max_len + kMinChunkPositions - 1) / kMinChunkPositions;
    chunks = int(std::clamp<int64_t>(std::min(by_sms, by_length), 1, kMaxChunks));
  }
  const size_t shared_bytes = size_t(SharedLayout<G_MAX>{a.head_dim}.floats()) * sizeof(float);
  const LaunchConfig config(dim3(chunks, a.kv_heads, batch),
                            dim3(32 * SharedLayout<G_MAX>::kWarps), shared_bytes,
                            at::cuda::getCurrentCUDAStream(), sm90, chunks > 1 ? chunks : 0);
  C10_CUDA_CHECK(cudaLaunchKernelEx(config.get(), kernel, a));
}

template <typename T, int G_MAX>
void launch_pairs(const AttentionParams<T>& a, int batch) {
  if (a.head_dim <= 64) return launch<T, G_MAX, 1>(a, batch);
  if (a.head_dim <= 128) return launch<T, G_MAX, 2>(a, batch);
  return launch<T, G_MAX, 4>(a, batch);
}

template <typename T>
void launch_type(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& position,
                 const at::Tensor& key_cache, const at::Tensor& value_cache, double scale,
                 const at::Tensor& out) {
  AttentionParams<T> a{};
  a.q = static_cast<const T*>(q.data_ptr());
  a.k = static_cast<const T*>(k.data_ptr());
  a.v = static_cast<const T*>(v.data_ptr());
  a.q_row = q.stride(0);
  a.q_col = q.stride(1);
  a.k_row = k.stride(0);
  a.k_col = k.stride(1);
  a.v_row = v.stride(0);
  a.v_col = v.stride(1);
  a.cos = static_cast<const T*>(cos.data_ptr());
  a.sin = static_cast<const T*>(sin.data_ptr());
  a.position = position.data_ptr<int64_t>();
  a.key_cache = static_cast<T*>(key_cache.data_ptr());
  a.value_cache = static_cast<T*>(value_cache.data_ptr());
  a.out = static_cast<T*>(out.data_ptr());
  a.kv_heads = int(key_cache.size(1));
  a.max_len = int(key_cache.size(2));
  a.head_dim = int(key_cache.size(3));
  a.group = int(q.size(1) / (key_cache.size(1) * key_cache.size(3)));
  a.scale_log2 = float(scale * kLog2E);
  const int batch = int(key_cache.size(0));
  if (a.group <= 4) return launch_pairs<T, 4>(a, batch);
  return launch_pairs<T, 8>(a, batch);
}

// Whether the kernel covers the call (the reference covers the rest).
bool kernel_covers(const at::Tensor& q, const at::Tensor& key_cache,
                   const at::Tensor& value_cache) {
  const int64_t batch = key_cache.size(0), kv_heads = key_cache.size(1);
  const int64_t head_dim = key_cache.size(3);
  const int64_t group = q.size(1) / (kv_heads * head_dim);
  const int64_t pair_bytes = 2 * int64_t(key_cache.element_size());
  return head_dim <= kMaxHeadDim && group <= 8 && batch <= 65535 && kv_heads <= 65535 &&
         key_cache.numel() < (int64_t(1) << 40) && key_cache.size(2) < (int64_t(1) << 30) &&
         reinterpret_cast<uintptr_t>(key_cache.data_ptr()) % pair_bytes == 0 &&
         reinterpret_cast<uintptr_t>(value_cache.data_ptr()) % pair_bytes == 0;
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& position, const at::Tensor& key_cache,
                                 const at::Tensor& value_cache, double scale) {
  check_decode_attention_args(q, k, v, cos, sin, position, key_cache, value_cache, scale);
  if (!kernel_covers(q, key_cache, value_cache))
    return decode_attention_composite(q, k, v, cos, sin, position, key_cache, value_cache, scale);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), q.size(1)}, q.options());
  if (q.size(0) == 0) return out;
  switch (q.scalar_type()) {
    case at::kHalf:
      launch_type<__half>(q, k, v, cos, sin, position, key_cache, value_cache, scale, out);
      break;
    case at::kBFloat16:
      launch_type<__nv_bfloat16>(q, k, v, cos, sin, position, key_cache, value_cache, scale, out);
      break;
    default:
      launch_type<float>(q, k, v, cos, sin, position, key_cache, value_cache, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tritllm, CUDA, m) { m.impl("decode_attention", decode_attention_cuda); }

}  // namespace cuda
}  // namespace tritllm
