// unpack: packed trits -> dense W in float32/float16/bfloat16.
//
// W[n, k] = float32(codebook[idx]) * float32(level), rounded once to the output type
// (docs/FORMAT.md). Two kernels:
//  * unpack_kernel: one thread per group, the plain arithmetic of format.h; exactly the
//    definition. The unpack op uses it.
//  * lut_unpack_kernel, depth 1-2 to float16/bfloat16 with in_features % 64 == 0: the
//    lookup-table decoder of lut_decode.cuh, four groups (one aligned run of 4 * B bytes) per
//    thread. It multiplies in the output type with the scale rounded to it first (one rounding
//    of s_T * level), which can differ from the definition by one unit in the last place when s
//    is not representable in the output type. The large-M matmul path unpacks through it.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "device_common.cuh"
#include "launchers.h"
#include "lut_decode.cuh"

namespace tritllm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLutThreads = 1024;  // few, large blocks: each builds the 72 KB of tables once
constexpr int kLutGroupsPerThread = 4;

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

// Persistent: each block builds the decoder's tables once, then walks over runs of 4 groups.
template <int DEPTH, typename T>
__global__ void __launch_bounds__(kLutThreads)
    lut_unpack_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ codebook,
                      int codebook_size, T* __restrict__ out, int64_t rows, int64_t in_features) {
  constexpr int kB = bytes_per_group(DEPTH);
  constexpr int kWords = kLutGroupsPerThread * kB / 4;  // 7 (d=2) or 4 (d=1) words
  extern __shared__ __align__(16) uint8_t smem[];
  lut::build_tables<DEPTH, T>(smem, codebook, codebook_size);
  const uint32_t tables = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  __syncthreads();

  const uint32_t lane_offset = (threadIdx.x % 32) * 8;
  const int64_t runs_per_row = in_features / (kLutGroupsPerThread * kGroupSize);
  const int64_t runs = rows * runs_per_row;
  for (int64_t run = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; run < runs;
       run += int64_t(gridDim.x) * blockDim.x) {
    // Rows are whole runs, so run r starts at byte r * 4B (4-byte aligned) and output r * 64.
    const uint32_t* src = reinterpret_cast<const uint32_t*>(packed + run * kLutGroupsPerThread * kB);
    uint32_t word[kWords];
#pragma unroll
    for (int q = 0; q < kWords; ++q) word[q] = __ldg(src + q);
    uint4* dst = reinterpret_cast<uint4*>(out + run * kLutGroupsPerThread * kGroupSize);
#pragma unroll
    for (int c = 0; c < kLutGroupsPerThread; ++c) {
      uint32_t w[8];  // pairs (0,1) (2,3) (5,6) (7,8) (10,11) (12,13) (4,9) (14,15)
      lut::decode_group_pairs<DEPTH, T>(word, c, lane_offset, tables, w);
      dst[2 * c] = make_uint4(w[0], w[1], __byte_perm(w[6], w[2], 0x5410),   // 0-3, 4 5
                              __byte_perm(w[2], w[3], 0x5432));              // 6 7
      dst[2 * c + 1] = make_uint4(__byte_perm(w[3], w[6], 0x7632), w[4], w[5], w[7]);  // 8-15
    }
  }
}

template <int DEPTH, typename T>
void launch_lut(const at::Tensor& packed, const at::Tensor& codebook, int64_t in_features,
                const at::Tensor& out) {
  auto kernel = lut_unpack_kernel<DEPTH, T>;
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      lut::kTableBytes));
  const int per_sm = std::max<int>(1, std::min<int>(
      props->maxThreadsPerMultiProcessor / kLutThreads,
      props->sharedMemPerMultiprocessor / (lut::kTableBytes + props->reservedSharedMemPerBlock)));
  const int64_t runs = packed.size(0) * (in_features / (kLutGroupsPerThread * kGroupSize));
  const int64_t blocks = std::min<int64_t>((runs + kLutThreads - 1) / kLutThreads,
                                           int64_t(props->multiProcessorCount) * per_sm);
  kernel<<<blocks, kLutThreads, lut::kTableBytes, at::cuda::getCurrentCUDAStream()>>>(
      packed.data_ptr<uint8_t>(), codebook.data_ptr<float>(), int(codebook.numel()),
      reinterpret_cast<T*>(out.data_ptr()), packed.size(0), in_features);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
            int64_t in_features, const at::Tensor& out, bool scale_rounded_first) {
  const int64_t rows = packed.size(0);
  const int64_t items = rows * num_groups(in_features);
  if (items == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  // Whole groups land on 16-byte boundaries when rows are whole groups and the buffer is aligned.
  const bool aligned = reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 == 0;
  if constexpr (!std::is_same_v<T, float>) {
    const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
    if (scale_rounded_first && (depth == 1 || depth == 2) &&
        in_features % (kLutGroupsPerThread * kGroupSize) == 0 && aligned &&
        size_t(lut::kTableBytes) <= props->sharedMemPerBlockOptin) {
      depth == 1 ? launch_lut<1, T>(packed, codebook, in_features, out)
                 : launch_lut<2, T>(packed, codebook, in_features, out);
      return;
    }
  }
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

void dispatch(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
              int64_t in_features, const at::Tensor& out, bool scale_rounded_first) {
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == packed.size(0) &&
                  out.size(1) == in_features,
              "tritllm: internal error: unpack output must be a contiguous [N, in_features]");
  switch (out.scalar_type()) {
    case at::kFloat: launch<float>(packed, codebook, depth, in_features, out, scale_rounded_first); break;
    case at::kHalf: launch<__half>(packed, codebook, depth, in_features, out, scale_rounded_first); break;
    case at::kBFloat16: launch<__nv_bfloat16>(packed, codebook, depth, in_features, out, scale_rounded_first); break;
    default: TORCH_CHECK(false, "tritllm: unpack: unsupported output dtype ", out.scalar_type());
  }
}

}  // namespace

void unpack_into(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                 int64_t in_features, const at::Tensor& out) {
  dispatch(packed, codebook, depth, in_features, out, /*scale_rounded_first=*/false);
}

void unpack_scale_rounded_into(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                               int64_t in_features, const at::Tensor& out) {
  dispatch(packed, codebook, depth, in_features, out, /*scale_rounded_first=*/true);
}

}  // namespace cuda
}  // namespace tritllm
