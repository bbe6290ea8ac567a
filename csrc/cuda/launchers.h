// Host-side entry points of the CUDA kernels (one .cu file each) used by register.cu.
//
// Every launcher takes tensors already checked by csrc/checks.h (packed uint8 [N, G*B(depth)]
// contiguous, codebook float32 [C] contiguous, all on the current CUDA device), enqueues its work
// on the current stream and never synchronizes with the host, so the ops can be captured in CUDA
// graphs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tritllm {
namespace cuda {

// Dense W rows: out [rows, in_features] (contiguous, float32/float16/bfloat16) from the `rows`
// rows of packed (a row slice is fine: it only has to be contiguous), exactly the format's
// definition (float32 product, rounded once).                                  unpack.cu
void unpack_into(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                 int64_t in_features, const at::Tensor& out);

// out [M, N] = x [M, K] @ W.T for M <= kGenericMaxTokens, any depth and dtype, fp32
// accumulation. Correct everywhere, fast nowhere.                         generic_gemv.cu
constexpr int64_t kGenericMaxTokens = 16;
void generic_gemv_into(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                       int64_t depth, const at::Tensor& out);

// The decode kernel: a byte-to-digits lookup table in shared memory, dequantization in registers
// and tensor-core products, for depth 1 and 2, float16/bfloat16 x and M <= kLutMaxTokens.
// lut_gemv_supports says whether it can run the call (shapes, alignment, device).  lut_gemv.cu
constexpr int64_t kLutMaxTokens = 16;
bool lut_gemv_supports(const at::Tensor& x, const at::Tensor& packed, int64_t depth);
void lut_gemv_into(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                   int64_t depth, const at::Tensor& out);

// Whether t's data starts on a 16-byte boundary: what 16-byte vector loads, asynchronous and
// tensor copies need of a tensor's first element.
inline bool is_16_byte_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The activations of a product: x itself, or computed from other tensors by the product kernel
// as it reads them (the fused inputs; csrc/fused_inputs.h has the math). xtable_gemv_into and
// tile_gemm_into take them.
struct ProductInput {
  enum class Kind {
    kPlain,       // x [M, K]
    kAddRmsNorm,  // x = RMSNorm(h + delta) * norm_weight; h + delta written to h_out
    kSiluMul,     // x = silu(gate) * up from gate_up [M, 2K]
  };
  Kind kind = Kind::kPlain;
  at::Tensor x;            // x, h or gate_up: [M, K] ([M, 2K] for gate_up), contiguous
  at::Tensor delta;        // kAddRmsNorm: [M, K], contiguous, x's dtype
  at::Tensor norm_weight;  // kAddRmsNorm: [K], contiguous, x's dtype
  double eps = 0;          // kAddRmsNorm
  at::Tensor h_out;        // kAddRmsNorm: [M, K], contiguous, written
};
// Whether the kernels can compute this kind of input from these tensors: kAddRmsNorm reads h,
// delta and norm_weight and writes h_out 16 bytes at a time (h_out may be left undefined for this
// question).
inline bool product_input_supported(const ProductInput& input) {
  if (input.kind != ProductInput::Kind::kAddRmsNorm) return true;
  return input.x.size(-1) * input.x.element_size() % 16 == 0 && is_16_byte_aligned(input.x) &&
         is_16_byte_aligned(input.delta) && is_16_byte_aligned(input.norm_weight) &&
         (!input.h_out.defined() || is_16_byte_aligned(input.h_out));
}

// The single-token decode kernel: tables of activation sums in shared memory looked up by the
// packed bytes, for depth 1 and 2, any activation type, M = 1 and whole 512-weight windows.
// xtable_gemv_supports says whether it can run the call for one weight. xtable_gemv_into takes 1
// to kXtableMaxWeights weights of the same depth and K (each one it supports) and writes their
// products side by side: out [1, N_1 + N_2 + ...], in one launch, from an input of one token.
//                                                                                xtable_gemv.cu
constexpr int64_t kXtableMaxWeights = 4;
bool xtable_gemv_supports(const at::Tensor& x, const at::Tensor& packed, int64_t depth);
void xtable_gemv_into(const ProductInput& input, at::TensorList packed, at::TensorList codebooks,
                      int64_t depth, int64_t in_features, const at::Tensor& out);

// The batch kernel: tiles of 256 rows x up to 64 tokens, or 128 x 128 or 128 x 256 (tile_gemm.cu's
// TileShape), weights decoded in registers as in lut_gemv and tensor-core products, for depth 1
// and 2, float16/bfloat16 x, any M (chosen by register.cu for M from 2 to its tile limits).
// tile_gemm_supports says whether it can run the call for one weight (shapes, alignment, up to
// ~221 KB of shared memory per block). tile_gemm_into takes one or more weights sharing an input
// and writes their products side by side, out [M, N_1 + N_2 + ...], with Hopper's wgmma products
// (only where tile_gemm_has_wgmma: an sm_90a build on a compute capability 9.0 GPU) or mma.sync
// ones (any sm_80+ GPU).                                                         tile_gemm.cu
bool tile_gemm_supports(const at::Tensor& x, const at::Tensor& packed, int64_t depth);
bool tile_gemm_has_wgmma(int device);
void tile_gemm_into(const ProductInput& input, at::TensorList packed, at::TensorList codebooks,
                    int64_t depth, int64_t in_features, bool wgmma, const at::Tensor& out);

// out [M, N_1 + N_2 + ...] = x @ [W_1; W_2; ...].T for any M: the weights unpacked into one
// transient dense buffer, then one cuBLAS product (at::mm_out) on the same stream.   gemm.cu
void unpack_gemm_into(const at::Tensor& x, at::TensorList packed, at::TensorList codebooks,
                      int64_t depth, const at::Tensor& out);

}  // namespace cuda
}  // namespace tritllm
