// CUDA implementations of the tritllm ops (schemas: csrc/ops.cpp) and the choice of kernel.
//
// matmul picks one of five kernels (bench/gpu_kernels.py times each on every product it can run;
// docs/PERF.md, "GPU", has the table behind these rules):
//   * xtable_gemv depth 1-2, one token, whole 512-weight windows (G % 32 == 0): lookup tables
//                 of activation sums, the fastest per weight at M = 1 (docs/KERNEL_NOTES.md);
//   * tile_gemm   depth 1-2, float16/bfloat16 x, whole 256-weight runs (G % 16 == 0), GPUs
//                 with ~200 KB of shared memory per block (Hopper): weights decoded in registers
//                 once per tile of up to 256 tokens (wgmma on Hopper builds for sm_90a) or 64
//                 (mma.sync; "tile_sync" names these wherever they can run), tensor-core
//                 products. Faster than lut_gemv from M = 2-4 on (up to 2x on 4096x14336) and
//                 than unpack + cuBLAS up to M = 128-192 (mma.sync) or 256-1024 (wgmma; the
//                 limits below);
//   * lut_gemv    the same conditions on GPUs where tile_gemm cannot run, up to
//                 kLutFusedMaxTokens tokens in slices of 16 (time grows with ceil(M / 16));
//   * generic     any other call with M <= 16: fused, never materializes W, slow per weight;
//   * unpack+gemm everything else: W unpacked into a transient dense buffer, then cuBLAS.
// matmul_cat (several weights sharing x) takes the same choice for all its weights together (N is
// their total): xtable and tile_gemm run them in one launch (up to four weights; tile_gemm more in
// launches of four), unpack+gemm as one cuBLAS product over all of them; lut and generic run one
// product per weight.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../fused_inputs.h"
#include "launchers.h"

namespace tritllm {
namespace cuda {
namespace {

// Above these many tokens cuBLAS on an unpacked W beats decoding the packed bytes once per tile of
// tokens (tile_gemm) or once per slice of 16 tokens (lut_gemv). tile_gemm's limit grows with the
// matrix, whose unpacking costs cuBLAS more the larger it is (docs/PERF.md):
//  * mma.sync form (tiles of 64 tokens): cuBLAS wins at M = 192 on 6144x4096 and 4096x4096 (25M
//    and 17M weights), tile_gemm up to M = 192 on 28672x4096 and up to 256 on 4096x14336 (117M
//    and 59M);
//  * wgmma form (tiles of 128 or 256 tokens from M = 65 on, session 20, H200): tile_gemm ahead up
//    to M = 256 on 6144x4096 (40 against 46 us) and 4096x4096 (even), up to 512 on 4096x14336
//    (128 against 132 us), up to 1024 on 28672x4096 (443 against 485 us, 439 against 456 in
//    gpu_bench.py's run); cuBLAS after.
constexpr int64_t kTileLargeWeights = int64_t(32) << 20;
constexpr int64_t kTileHugeWeights = int64_t(96) << 20;
constexpr int64_t kTileSyncMaxTokensSmall = 128;
constexpr int64_t kTileSyncMaxTokens = 192;
constexpr int64_t kTileWgmmaMaxTokensSmall = 256;
constexpr int64_t kTileWgmmaMaxTokens = 512;
constexpr int64_t kTileWgmmaMaxTokensHuge = 1024;
constexpr int64_t kLutFusedMaxTokens = 48;

at::Tensor unpack_cuda(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                       int64_t in_features, c10::ScalarType dtype) {
  check_weight_args(packed, codebook, depth, in_features);
  check_output_dtype(dtype);
  c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({packed.size(0), in_features}, packed.options().dtype(dtype));
  unpack_into(packed, codebook, depth, in_features, out);
  return out;
}

// out [M, N] from slices of at most `slice` tokens.
template <typename Product>
void by_token_slices(const at::Tensor& x, const at::Tensor& out, int64_t slice, Product product) {
  for (int64_t first = 0; first < x.size(0); first += slice) {
    const int64_t n = std::min(slice, x.size(0) - first);
    product(x.narrow(0, first, n), out.narrow(0, first, n));
  }
}

// The kernels a product can take, by the names the tests and benchmarks use.
enum class Kernel { kXtable, kLut, kTile, kTileSync, kGeneric, kGemm };

bool can_run_one(Kernel kernel, const at::Tensor& x, const at::Tensor& packed, int64_t depth) {
  switch (kernel) {
    case Kernel::kXtable: return x.size(0) == 1 && xtable_gemv_supports(x, packed, depth);
    case Kernel::kLut: return lut_gemv_supports(x, packed, depth);
    case Kernel::kTile:
    case Kernel::kTileSync: return tile_gemm_supports(x, packed, depth);
    case Kernel::kGeneric: return x.size(0) <= kGenericMaxTokens;
    case Kernel::kGemm: return true;
  }
  return false;
}

// Whether `kernel` can run the products of every weight of `packed` (one, or several sharing x).
bool can_run(Kernel kernel, const at::Tensor& x, at::TensorList packed, int64_t depth) {
  if (kernel == Kernel::kXtable && int64_t(packed.size()) > kXtableMaxWeights) return false;
  for (const at::Tensor& p : packed)
    if (!can_run_one(kernel, x, p, depth)) return false;
  return true;
}

// The heuristic (measurements: docs/PERF.md, "GPU"); `rows` is the weights' total N.
Kernel choose(const at::Tensor& x, at::TensorList packed, int64_t rows, int64_t depth) {
  const int64_t tokens = x.size(0);
  const int64_t weights = rows * x.size(1);
  const bool large = weights >= kTileLargeWeights;
  const int64_t tile_max_tokens =
      tile_gemm_has_wgmma(x.device().index())
          ? (weights >= kTileHugeWeights ? kTileWgmmaMaxTokensHuge
             : large                     ? kTileWgmmaMaxTokens
                                         : kTileWgmmaMaxTokensSmall)
          : (large ? kTileSyncMaxTokens : kTileSyncMaxTokensSmall);
  if (tokens == 1 && can_run(Kernel::kXtable, x, packed, depth)) return Kernel::kXtable;
  if (tokens <= tile_max_tokens && can_run(Kernel::kTile, x, packed, depth)) return Kernel::kTile;
  if (tokens <= kLutFusedMaxTokens && can_run(Kernel::kLut, x, packed, depth)) return Kernel::kLut;
  if (tokens <= kGenericMaxTokens) return Kernel::kGeneric;
  return Kernel::kGemm;
}

// For the kernels that take one weight: each product into its own columns of out (through a
// temporary when there are several, since these kernels write contiguous outputs).
template <typename Product>
void each_weight(const at::Tensor& x, at::TensorList packed, at::TensorList codebooks,
                 const at::Tensor& out, Product product) {
  if (packed.size() == 1) return product(x, packed[0], codebooks[0], out);
  int64_t first_row = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    const int64_t rows = packed[i].size(0);
    at::Tensor part = at::empty({x.size(0), rows}, out.options());
    if (rows > 0) product(x, packed[i], codebooks[i], part);
    out.narrow(1, first_row, rows).copy_(part);
    first_row += rows;
  }
}

void run(Kernel kernel, const at::Tensor& x, at::TensorList packed, at::TensorList codebooks,
         int64_t depth, const at::Tensor& out) {
  switch (kernel) {
    case Kernel::kXtable:
      return xtable_gemv_into(ProductInput{ProductInput::Kind::kPlain, x}, packed, codebooks,
                              depth, x.size(1), out);
    case Kernel::kLut:
      return each_weight(x, packed, codebooks, out,
                         [&](const at::Tensor& x1, const at::Tensor& p, const at::Tensor& c,
                             const at::Tensor& o) {
                           by_token_slices(x1, o, kLutMaxTokens,
                                           [&](const at::Tensor& xs, const at::Tensor& os) {
                                             lut_gemv_into(xs, p, c, depth, os);
                                           });
                         });
    case Kernel::kTile:
    case Kernel::kTileSync:
      return tile_gemm_into(ProductInput{ProductInput::Kind::kPlain, x}, packed, codebooks, depth,
                            x.size(1),
                            kernel == Kernel::kTile && tile_gemm_has_wgmma(x.device().index()),
                            out);
    case Kernel::kGeneric:
      return each_weight(x, packed, codebooks, out,
                         [&](const at::Tensor& x1, const at::Tensor& p, const at::Tensor& c,
                             const at::Tensor& o) { generic_gemv_into(x1, p, c, depth, o); });
    case Kernel::kGemm: return unpack_gemm_into(x, packed, codebooks, depth, out);
  }
}

// Checks the arguments of x @ [W_1; W_2; ...].T and returns N_1 + N_2 + ...
int64_t check_product(const at::Tensor& x, at::TensorList packed, at::TensorList codebooks,
                      int64_t depth, int64_t in_features) {
  check_weight_lists(packed, codebooks);
  int64_t rows = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    check_weight_args(packed[i], codebooks[i], depth, in_features);
    check_activation(x, packed[i], in_features);
    rows += packed[i].size(0);
  }
  return rows;
}

// `sizes` with the last one replaced by `last`: the output shape [..., N] of an input [..., K].
std::vector<int64_t> with_last_size(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape.back() = last;
  return shape;
}

// x [..., K] @ [W_1; W_2; ...].T -> [..., N_1 + N_2 + ...] by `kernel`, or by the heuristic's
// choice when it is empty. One weight for matmul, several sharing x for matmul_cat.
at::Tensor product(const at::Tensor& x, at::TensorList packed, at::TensorList codebooks,
                   int64_t depth, int64_t in_features, const std::optional<Kernel> kernel) {
  const int64_t rows = check_product(x, packed, codebooks, depth, in_features);
  c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor x2 = x.reshape({-1, in_features}).contiguous();
  const std::vector<int64_t> out_shape = with_last_size(x.sizes(), rows);
  at::Tensor out = at::empty({x2.size(0), rows}, x.options());
  if (x2.size(0) == 0 || rows == 0) return out.view(out_shape);
  TORCH_CHECK(!kernel || can_run(*kernel, x2, packed, depth),
              "tritllm: the requested CUDA kernel cannot run this product (M=", x2.size(0),
              ", N=", rows, ", K=", in_features, ", depth ", depth, ", ", x.scalar_type(), ")");
  run(kernel ? *kernel : choose(x2, packed, rows, depth), x2, packed, codebooks, depth, out);
  return out.view(out_shape);
}

at::Tensor matmul_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                       int64_t depth, int64_t in_features) {
  return product(x, packed, codebook, depth, in_features, std::nullopt);
}

at::Tensor matmul_cat_cuda(const at::Tensor& x, at::TensorList packed, at::TensorList codebook,
                           int64_t depth, int64_t in_features) {
  return product(x, packed, codebook, depth, in_features, std::nullopt);
}

// add_rms_norm_matmul_cat and silu_mul_matmul (csrc/fused_inputs.h): where the heuristic picks a
// kernel that computes its input itself (the x-table kernel at one token, tile_gemm from two),
// that kernel runs the call; every other call runs the composite (the element-wise steps as ATen
// operations, then the product op, which picks its kernel as usual).

// The kernel for a fused call whose activations would be x_rows [M, K] (only its sizes, dtype
// and device are read: for silu_mul, a view of gate_up's first K columns), if it is one that
// computes the input itself.
std::optional<Kernel> fused_kernel(const at::Tensor& x_rows, at::TensorList packed, int64_t rows,
                                   int64_t depth) {
  if (x_rows.size(0) == 0 || rows == 0) return std::nullopt;
  const Kernel kernel = choose(x_rows, packed, rows, depth);
  if (kernel == Kernel::kXtable || kernel == Kernel::kTile) return kernel;
  return std::nullopt;
}

void run_fused(Kernel kernel, const ProductInput& input, at::TensorList packed,
               at::TensorList codebooks, int64_t depth, int64_t in_features,
               const at::Tensor& out) {
  if (kernel == Kernel::kXtable)
    xtable_gemv_into(input, packed, codebooks, depth, in_features, out);
  else
    tile_gemm_into(input, packed, codebooks, depth, in_features,
                   tile_gemm_has_wgmma(input.x.device().index()), out);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_matmul_cat_cuda(
    const at::Tensor& h, const at::Tensor& delta, const at::Tensor& norm_weight, double eps,
    at::TensorList packed, at::TensorList codebooks, int64_t depth, int64_t in_features) {
  check_add_rms_norm_args(h, delta, norm_weight, eps, in_features);
  for (size_t i = 0; i < packed.size(); ++i)
    TORCH_CHECK(packed[i].device() == h.device(), "tritllm: add_rms_norm_matmul_cat: packed[", i,
                "] is on ", packed[i].device(), " but h is on ", h.device());
  const int64_t rows = check_product(h, packed, codebooks, depth, in_features);
  c10::cuda::CUDAGuard guard(h.device());
  ProductInput input;
  input.kind = ProductInput::Kind::kAddRmsNorm;
  input.x = h.reshape({-1, in_features}).contiguous();
  input.delta = delta.reshape({-1, in_features}).contiguous();
  input.norm_weight = norm_weight.contiguous();
  input.eps = eps;
  const std::optional<Kernel> kernel = fused_kernel(input.x, packed, rows, depth);
  if (!kernel || !product_input_supported(input))
    return add_rms_norm_matmul_cat_composite(h, delta, norm_weight, eps, packed, codebooks, depth,
                                             in_features);
  const at::Tensor out = at::empty({input.x.size(0), rows}, h.options());
  input.h_out = at::empty(h.sizes(), h.options());
  run_fused(*kernel, input, packed, codebooks, depth, in_features, out);
  return {out.view(with_last_size(h.sizes(), rows)), input.h_out};
}

at::Tensor silu_mul_matmul_cuda(const at::Tensor& gate_up, const at::Tensor& packed,
                                const at::Tensor& codebook, int64_t depth, int64_t in_features) {
  check_silu_mul_args(gate_up, in_features);
  check_weight_args(packed, codebook, depth, in_features);
  TORCH_CHECK(gate_up.device() == packed.device(), "tritllm: silu_mul_matmul: gate_up is on ",
              gate_up.device(), " but the weight is on ", packed.device());
  c10::cuda::CUDAGuard guard(gate_up.device());
  ProductInput input;
  input.kind = ProductInput::Kind::kSiluMul;
  input.x = gate_up.reshape({-1, 2 * in_features}).contiguous();
  const int64_t rows = packed.size(0);
  const std::optional<Kernel> kernel =
      fused_kernel(input.x.narrow(1, 0, in_features), packed, rows, depth);
  if (!kernel) return silu_mul_matmul_composite(gate_up, packed, codebook, depth, in_features);
  const at::Tensor out = at::empty({input.x.size(0), rows}, gate_up.options());
  run_fused(*kernel, input, packed, codebook, depth, in_features, out);
  return out.view(with_last_size(gate_up.sizes(), rows));
}

// The kernels by the names the tests and benchmarks use.
constexpr std::pair<const char*, Kernel> kNames[] = {
    {"xtable", Kernel::kXtable},       {"lut", Kernel::kLut},
    {"tile", Kernel::kTile},           {"tile_sync", Kernel::kTileSync},
    {"generic", Kernel::kGeneric},     {"gemm", Kernel::kGemm}};

// For callers that plan around the kernels (generate.py fuses its element-wise steps into the
// products where the x-table kernel runs them) and for tests: the name of the kernel the
// heuristic picks for x [..., K] and these weights.
std::string matmul_kernel_cuda(const at::Tensor& x, at::TensorList packed, int64_t depth) {
  TORCH_CHECK(x.dim() >= 1 && !packed.empty(),
              "tritllm: _cuda_matmul_kernel needs x [..., K] and at least one weight");
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  int64_t rows = 0;
  for (const at::Tensor& p : packed) rows += p.size(0);
  const Kernel chosen = choose(x2, packed, rows, depth);
  for (const auto& [name, kernel] : kNames)
    if (kernel == chosen) return name;
  TORCH_CHECK(false, "tritllm: internal error: a kernel without a name");
}

// For tests and benchmarks: the product by one named kernel, whatever the heuristic would pick.
at::Tensor matmul_with_cuda(const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& codebook, int64_t depth, int64_t in_features,
                            const std::string& name) {
  for (const auto& [known, kernel] : kNames)
    if (name == known) return product(x, packed, codebook, depth, in_features, kernel);
  TORCH_CHECK(false, "tritllm: unknown CUDA kernel '", name,
              "'; the kernels are xtable, lut, tile, tile_sync, generic and gemm");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tritllm, m) {
  // matmul by a named CUDA kernel (xtable, lut, tile, tile_sync, generic, gemm), for tests and
  // benchmarks; raises if that kernel cannot run the call. CUDA only, inference only, no fake
  // kernel.
  m.def("_cuda_matmul_with(Tensor x, Tensor packed, Tensor codebook, int depth, int in_features,"
        " str kernel) -> Tensor");
  // The name of the CUDA kernel the heuristic picks for x [..., K] (its rows, dtype and device)
  // and these weights (packed bytes of one depth, on x's device).
  m.def("_cuda_matmul_kernel(Tensor x, Tensor[] packed, int depth) -> str");
}

TORCH_LIBRARY_IMPL(tritllm, CUDA, m) {
  m.impl("unpack", unpack_cuda);
  m.impl("matmul", matmul_cuda);
  m.impl("matmul_cat", matmul_cat_cuda);
  m.impl("_cuda_matmul_with", matmul_with_cuda);
  m.impl("_cuda_matmul_kernel", matmul_kernel_cuda);
  m.impl("add_rms_norm_matmul_cat", add_rms_norm_matmul_cat_cuda);
  m.impl("silu_mul_matmul", silu_mul_matmul_cuda);
}

}  // namespace cuda
}  // namespace tritllm
