// The fallback fused product for few tokens: out [M, N] = x [M, K] @ W.T, M <= 16, any depth,
// any K, float32/float16/bfloat16 x, float32 accumulation. W is never materialized.
//
// One warp per output row; lane l decodes groups l, l+32, ... of the row and multiplies each
// dequantized weight (float32(scale) * level, as in docs/FORMAT.md) with the M activations. It
// reads the packed bytes once, but spends tens of instructions per weight, so it is used only
// where the lookup-table kernel (lut_gemv.cu) does not apply.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "device_common.cuh"
#include "launchers.h"

namespace tritllm {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kMaxTokens = int(kGenericMaxTokens);

template <int DEPTH, typename T>
__global__ void __launch_bounds__(kWarps * 32)
    generic_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                        const float* __restrict__ codebook, int codebook_size, T* __restrict__ out,
                        int tokens, int64_t rows, int64_t in_features) {
  __shared__ float scales[kMaxCodebook];
  for (int i = threadIdx.x; i < kMaxCodebook; i += blockDim.x)
    scales[i] = i < codebook_size ? codebook[i] : 0.f;  // see unpack.cu
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int64_t groups = num_groups(in_features);
  const uint8_t* row_bytes = packed + row * groups * bytes_per_group(DEPTH);

  float acc[kMaxTokens];
#pragma unroll
  for (int m = 0; m < kMaxTokens; ++m) acc[m] = 0.f;

  for (int64_t g = lane; g < groups; g += 32) {
    int level[16], scale_index;
    decode_group<DEPTH>(row_bytes + g * bytes_per_group(DEPTH), level, scale_index);
    const float scale = scales[scale_index];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int64_t k = g * kGroupSize + j;
      if (k >= in_features) break;
      const float w = scale * float(level[j]);
#pragma unroll
      for (int m = 0; m < kMaxTokens; ++m)
        if (m < tokens) acc[m] = fmaf(w, to_float(x[m * in_features + k]), acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxTokens; ++m) {
    if (m >= tokens) break;
    float v = acc[m];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) out[m * rows + row] = from_float<T>(v);
  }
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
            int64_t depth, const at::Tensor& out) {
  const int64_t rows = packed.size(0), in_features = x.size(1);
  const int tokens = int(x.size(0));
  if (rows == 0 || tokens == 0) return;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const auto* p = packed.data_ptr<uint8_t>();
  const auto* cb = codebook.data_ptr<float>();
  const int cb_size = int(codebook.numel());
  T* o = reinterpret_cast<T*>(out.data_ptr());
  switch (depth) {
    case 1: generic_gemv_kernel<1, T><<<blocks, kWarps * 32, 0, stream>>>(xp, p, cb, cb_size, o, tokens, rows, in_features); break;
    case 2: generic_gemv_kernel<2, T><<<blocks, kWarps * 32, 0, stream>>>(xp, p, cb, cb_size, o, tokens, rows, in_features); break;
    case 3: generic_gemv_kernel<3, T><<<blocks, kWarps * 32, 0, stream>>>(xp, p, cb, cb_size, o, tokens, rows, in_features); break;
    default: generic_gemv_kernel<4, T><<<blocks, kWarps * 32, 0, stream>>>(xp, p, cb, cb_size, o, tokens, rows, in_features); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void generic_gemv_into(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                       int64_t depth, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(0) <= kGenericMaxTokens &&
                  out.is_contiguous() && out.size(0) == x.size(0) && out.size(1) == packed.size(0),
              "tritllm: internal error: generic_gemv needs contiguous x [M <= 16, K], out [M, N]");
  switch (x.scalar_type()) {
    case at::kFloat: launch<float>(x, packed, codebook, depth, out); break;
    case at::kHalf: launch<__half>(x, packed, codebook, depth, out); break;
    case at::kBFloat16: launch<__nv_bfloat16>(x, packed, codebook, depth, out); break;
    default: TORCH_CHECK(false, "tritllm: matmul: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace cuda
}  // namespace tritllm
