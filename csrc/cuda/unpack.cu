// unpack: packed trits -> dense W in float32/float16/bfloat16, one thread per group of 16.
//
// W[n, k] = float32(codebook[idx]) * float32(level), rounded once to the output type
// (docs/FORMAT.md). The kernel is bound by its writes (16 outputs per 4..14 bytes read), so the
// digits are decoded with the plain arithmetic of format.h.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "device_common.cuh"
#include "launchers.h"

namespace tritllm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct alignas(16) Vec16B {
  T v[16 / sizeof(T)];
};

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

  T* dst = out + row * in_features + group * kGroupSize;
  if (vector_stores) {  // in_features % 16 == 0: the 16 outputs are one aligned run
    constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
    for (int q = 0; q < 16 / kPerVec; ++q) {
      Vec16B<T> vec;
#pragma unroll
      for (int i = 0; i < kPerVec; ++i) vec.v[i] = from_float<T>(scale * float(level[q * kPerVec + i]));
      reinterpret_cast<Vec16B<T>*>(dst)[q] = vec;
    }
  } else {
    const int64_t left = in_features - group * kGroupSize;  // the last group may be partial
    const int valid = left < kGroupSize ? int(left) : kGroupSize;
#pragma unroll
    for (int j = 0; j < 16; ++j)
      if (j < valid) dst[j] = from_float<T>(scale * float(level[j]));
  }
}

template <typename T>
void launch(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
            int64_t in_features, const at::Tensor& out) {
  const int64_t rows = packed.size(0);
  const int64_t items = rows * num_groups(in_features);
  if (items == 0) return;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  auto stream = at::cuda::getCurrentCUDAStream();
  // Whole groups land on 16-byte boundaries when rows are whole groups and the buffer is aligned.
  const bool vector_stores = in_features % kGroupSize == 0 &&
                             reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
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
