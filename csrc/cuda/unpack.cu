// unpack: packed trits -> dense W in float32/float16/bfloat16.
//
// W[n, k] = float32(codebook[idx]) * float32(level), rounded once to the output type
// (docs/FORMAT.md). The prefill path (gemm.cu) unpacks every weight before its cuBLAS product, so
// this kernel should run at the speed of its writes (2 bytes per weight at float16 against 3.5/8
// read). Decoding the digits with the arithmetic of format.h (two multiplies per digit, ~22
// instructions per weight) held it to 1.6 TB/s, so here the digits come from a table and the
// arithmetic per weight is three instructions (docs/KERNEL_NOTES.md, "The unpack kernel"):
//
// * One thread per group of 16 weights. A block's groups are consecutive in memory (rows are
//   contiguous), so the block first copies their bytes into shared memory with 16-byte loads:
//   whole lines from global memory instead of B(d) byte loads per thread.
// * Digit table: row v (every byte value, 256 rows) holds the five digits c_0..c_4 of v, one per
//   byte, in 8 bytes: one 8-byte shared load per packed byte. Each block fills it with
//   trit_digit (format.h), so bytes the format forbids decode exactly as decode_group decodes
//   them (device_common.cuh) in the other CUDA kernels.
// * Planes combined in byte lanes: n = sum_p 3^p c_p <= 80 never carries into the next byte, so
//   one multiply-add per plane combines four weights; level = n - L.
// * A byte lane becomes a float without a conversion instruction: byte_perm puts n under the
//   exponent of 2^23 (the bits 0x4B0000nn are exactly 2^23 + n), and subtracting 2^23 + L gives
//   the level, exactly. Then one float32 multiply by the scale, and one instruction rounds two
//   values to the output type.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "device_common.cuh"
#include "launchers.h"

namespace tritllm {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // groups per block
constexpr int kMaxGroupBytes = bytes_per_group(4);
// A block's staged bytes, plus slack: a thread reads the two or three aligned 8-byte words around
// its group, and the last thread's last word runs up to 8 bytes past the block's bytes.
constexpr int kStagedBytes = kThreads * kMaxGroupBytes + 16;

// 16 bytes holding consecutive outputs: pairs of 16-bit values, or two floats per 8 bytes.
template <typename T>
__device__ __forceinline__ uint4 pack_outputs(const float (&v)[16], int first) {
  return make_uint4(pack2<T>(v[first], v[first + 1]), pack2<T>(v[first + 2], v[first + 3]),
                    pack2<T>(v[first + 4], v[first + 5]), pack2<T>(v[first + 6], v[first + 7]));
}
template <>
__device__ __forceinline__ uint4 pack_outputs<float>(const float (&v)[16], int first) {
  return make_uint4(__float_as_uint(v[first]), __float_as_uint(v[first + 1]),
                    __float_as_uint(v[first + 2]), __float_as_uint(v[first + 3]));
}

// The digits of byte v, c_i in byte i (c_0..c_3 in .x, c_4 in .y).
__device__ __forceinline__ uint2 digit_row(uint32_t v) {
  uint32_t lo = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) lo |= trit_digit(v, i) << (8 * i);
  return make_uint2(lo, trit_digit(v, 4));
}

// Byte `k` of a word as the float 2^23 + byte.
template <int k>
__device__ __forceinline__ float byte_as_float(uint32_t word) {
  return __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7650u + k));
}

// Byte j of the staged group bytes g[0..15] (held as four words).
__device__ __forceinline__ uint32_t group_byte(const uint32_t (&g)[4], int j) {
  return (g[j / 4] >> (8 * (j % 4))) & 0xFFu;
}

template <int DEPTH, typename T>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ codebook,
                  int codebook_size, T* __restrict__ out, int64_t rows, int64_t in_features,
                  bool aligned_bytes, bool vector_stores) {
  constexpr int B = bytes_per_group(DEPTH);
  constexpr int L = max_level(DEPTH);
  __shared__ float scales[kMaxCodebook];
  __shared__ uint2 digits[256];
  __shared__ __align__(16) uint8_t staged[kStagedBytes];

  const int64_t groups = num_groups(in_features);
  const int64_t items = rows * groups;
  const int64_t first_item = int64_t(blockIdx.x) * kThreads;
  const int block_items = items - first_item < kThreads ? int(items - first_item) : kThreads;

  // The block's bytes into shared memory: 16-byte loads where the source allows, the last
  // partial block's odd bytes one by one.
  const uint8_t* src = packed + first_item * B;
  const int bytes = block_items * B;
  const int vector_bytes = aligned_bytes ? bytes & ~15 : 0;
  for (int i = threadIdx.x; i < vector_bytes / 16; i += kThreads)
    reinterpret_cast<uint4*>(staged)[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
  for (int i = vector_bytes + threadIdx.x; i < bytes; i += kThreads) staged[i] = __ldg(src + i);
  for (int i = threadIdx.x; i < 256; i += kThreads) digits[i] = digit_row(uint32_t(i));
  for (int i = threadIdx.x; i < kMaxCodebook; i += kThreads)
    scales[i] = i < codebook_size ? codebook[i] : 0.f;  // indices >= size exist only in corrupt
  __syncthreads();                                       // data: any finite value will do
  if (int(threadIdx.x) >= block_items) return;

  // The thread's B bytes (B <= 14) as four words g: the three aligned 8-byte words around them,
  // realigned by selects and byte_perms (no runtime index into a register array).
  const int at = int(threadIdx.x) * B;
  const uint8_t* words = staged + (at & ~7);
  const uint2 w0 = *reinterpret_cast<const uint2*>(words);
  const uint2 w1 = *reinterpret_cast<const uint2*>(words + 8);
  const uint2 w2 = B > 7 ? *reinterpret_cast<const uint2*>(words + 16) : make_uint2(0u, 0u);
  const uint32_t raw[6] = {w0.x, w0.y, w1.x, w1.y, w2.x, w2.y};
  const bool odd_word = at & 4;
  const uint32_t select = 0x3210u + 0x1111u * uint32_t(at & 3);
  uint32_t g[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t a = odd_word ? raw[i + 1] : raw[i];
    const uint32_t b = odd_word ? raw[i + 2] : raw[i + 1];
    g[i] = __byte_perm(a, b, select);
  }

  // n = sum_p 3^p c_p of weights 0..14, four per word (slot b: weights 5b..5b+4, lo = the first
  // four, hi byte 0 = the fifth).
  uint32_t lo[3] = {0u, 0u, 0u}, hi[3] = {0u, 0u, 0u};
#pragma unroll
  for (int p = 0; p < DEPTH; ++p) {
#pragma unroll
    for (int b = 0; b < 3; ++b) {
      const uint2 d = digits[group_byte(g, 3 * p + b)];
      lo[b] += uint32_t(pow3(p)) * d.x;
      hi[b] += uint32_t(pow3(p)) * d.y;
    }
  }
  // Weight 15 and the scale index from the tail: idx0 idx1 idx2, then weight 15 of planes
  // 0..DEPTH-1, five digits per byte.
  const uint32_t tail0 = group_byte(g, 3 * DEPTH);
  const uint2 t0 = digits[tail0];
  uint32_t n15 = (t0.x >> 24) + (DEPTH > 1 ? 3u * t0.y : 0u);
  if (DEPTH > 2) {
    const uint2 t1 = digits[group_byte(g, 3 * DEPTH + 1)];
    n15 += 9u * (t1.x & 0xFFu) + (DEPTH > 3 ? 27u * ((t1.x >> 8) & 0xFFu) : 0u);
  }
  const float scale = scales[group_scale_index(tail0)];

  constexpr float kOffset = 8388608.f + float(L);  // 2^23 + L
  float value[16];
#pragma unroll
  for (int b = 0; b < 3; ++b) {
    value[5 * b + 0] = scale * (byte_as_float<0>(lo[b]) - kOffset);
    value[5 * b + 1] = scale * (byte_as_float<1>(lo[b]) - kOffset);
    value[5 * b + 2] = scale * (byte_as_float<2>(lo[b]) - kOffset);
    value[5 * b + 3] = scale * (byte_as_float<3>(lo[b]) - kOffset);
    value[5 * b + 4] = scale * (byte_as_float<0>(hi[b]) - kOffset);
  }
  value[15] = scale * (byte_as_float<0>(n15) - kOffset);

  const int64_t item = first_item + threadIdx.x;
  const int64_t row = item / groups, group = item % groups;
  T* dst = out + row * in_features + group * kGroupSize;
  if (vector_stores) {  // in_features % 16 == 0: the 16 outputs are one aligned run
    constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
    for (int q = 0; q < 16 / kPerVec; ++q)
      reinterpret_cast<uint4*>(dst)[q] = pack_outputs<T>(value, q * kPerVec);
  } else {
    const int64_t left = in_features - group * kGroupSize;  // the last group may be partial
    const int valid = left < kGroupSize ? int(left) : kGroupSize;
#pragma unroll
    for (int j = 0; j < 16; ++j)
      if (j < valid) dst[j] = from_float<T>(value[j]);
  }
}

template <typename T>
void launch(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
            int64_t in_features, const at::Tensor& out) {
  const int64_t rows = packed.size(0);
  const int64_t items = rows * num_groups(in_features);
  if (items == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  // A block's bytes start at a multiple of 256 B(d) bytes, a multiple of 16: 16-byte loads
  // wherever the packed tensor itself starts on a 16-byte boundary (a row slice may not).
  const bool aligned_bytes = is_16_byte_aligned(packed);
  // Whole groups land on 16-byte boundaries when rows are whole groups and the buffer is aligned.
  const bool vector_stores = in_features % kGroupSize == 0 && is_16_byte_aligned(out);
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  const auto* p = packed.data_ptr<uint8_t>();
  const auto* cb = codebook.data_ptr<float>();
  const int cb_size = int(codebook.numel());
  T* o = reinterpret_cast<T*>(out.data_ptr());
  auto run = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(p, cb, cb_size, o, rows, in_features, aligned_bytes,
                                            vector_stores);
  };
  switch (depth) {
    case 1: run(unpack_kernel<1, T>); break;
    case 2: run(unpack_kernel<2, T>); break;
    case 3: run(unpack_kernel<3, T>); break;
    default: run(unpack_kernel<4, T>); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void unpack_into(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                 int64_t in_features, const at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == packed.size(0) &&
                  out.size(1) == in_features,
              "tritllm: internal error: unpack output must be a contiguous [N, in_features]");
  switch (out.scalar_type()) {
    case at::kFloat: launch<float>(packed, codebook, depth, in_features, out); break;
    case at::kHalf: launch<__half>(packed, codebook, depth, in_features, out); break;
    case at::kBFloat16: launch<__nv_bfloat16>(packed, codebook, depth, in_features, out); break;
    default: TORCH_CHECK(false, "tritllm: unpack: unsupported output dtype ", out.scalar_type());
  }
}

}  // namespace cuda
}  // namespace tritllm
