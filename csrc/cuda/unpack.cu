// unpack: packed trits -> dense W in float32/float16/bfloat16.
//
// W[n, k] = float32(codebook[idx]) * float32(level), rounded once to the output type
// (docs/FORMAT.md). One thread per group, the plain arithmetic of format.h. (The lookup-table
// decoder of lut_decode.cuh was tried here and was slower: its 72 KB of tables per block cost
// more than the arithmetic; docs/KERNEL_NOTES.md.)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "device_common.cuh"
#include "launchers.h"

namespace tritllm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// float(level) without the conversion unit: the integer goes into the mantissa of 1.5 * 2^23.
__device__ __forceinline__ float small_int_to_float(int v) {
  return __int_as_float(0x4B400000 + v) - 12582912.f;
}

// 16 bytes holding consecutive outputs: two floats per 8 bytes, or pairs of 16-bit values.
template <typename T>
__device__ __forceinline__ uint4 pack_outputs(const float (&v)[16], int first);
template <>
__device__ __forceinline__ uint4 pack_outputs<float>(const float (&v)[16], int first) {
  return make_uint4(__float_as_uint(v[first]), __float_as_uint(v[first + 1]),
                    __float_as_uint(v[first + 2]), __float_as_uint(v[first + 3]));
}
template <>
__device__ __forceinline__ uint4 pack_outputs<__half>(const float (&v)[16], int first) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h = __floats2half2_rn(v[first + 2 * i], v[first + 2 * i + 1]);
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}
template <>
__device__ __forceinline__ uint4 pack_outputs<__nv_bfloat16>(const float (&v)[16], int first) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[first + 2 * i], v[first + 2 * i + 1]);
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <int DEPTH, typename T>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ codebook,
                  int codebook_size, T* __restrict__ out, int64_t rows, int64_t in_features,
                  bool vector_stores) {
  __shared__ float scales[kMaxCodebook];
  for (int i = threadIdx.x; i < kMaxCodebook; i += blockDim.x)
    scales[i] = i < codebook_size ? codebook[i] : 0.f;  // indices >= size exist only in corrupt
  __syncthreads();                                        // data: any finite value will do

  const int64_t groups = num_groups(in_features);
  const int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= rows * groups) return;
  const int64_t row = item / groups, group = item % groups;

  int level[16], scale_index;
  decode_group<DEPTH>(packed + item * bytes_per_group(DEPTH), level, scale_index);
  const float scale = scales[scale_index];
  float value[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) value[j] = scale * small_int_to_float(level[j]);

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
  // Whole groups land on 16-byte boundaries when rows are whole groups and the buffer is aligned.
  const bool aligned = reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  const bool vector_stores = in_features % kGroupSize == 0 && aligned;
  const auto* p = packed.data_ptr<uint8_t>();
  const auto* cb = codebook.data_ptr<float>();
  const int cb_size = int(codebook.numel());
  T* o = reinterpret_cast<T*>(out.data_ptr());
  switch (depth) {
    case 1: unpack_kernel<1, T><<<blocks, kThreads, 0, stream>>>(p, cb, cb_size, o, rows, in_features, vector_stores); break;
    case 2: unpack_kernel<2, T><<<blocks, kThreads, 0, stream>>>(p, cb, cb_size, o, rows, in_features, vector_stores); break;
    case 3: unpack_kernel<3, T><<<blocks, kThreads, 0, stream>>>(p, cb, cb_size, o, rows, in_features, vector_stores); break;
    default: unpack_kernel<4, T><<<blocks, kThreads, 0, stream>>>(p, cb, cb_size, o, rows, in_features, vector_stores); break;
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
