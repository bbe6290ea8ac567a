// Operator schemas of the tritllm library, one per op, and the autograd guard.
//
// Device kernels live beside their device (csrc/cpu, csrc/cuda) and register themselves with
// TORCH_LIBRARY_IMPL; the fake (meta) kernels live in tritllm_ext/ops.py next to the Python
// wrappers, as in pytorch/extension-cpp.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "op_handles.h"

namespace tritllm {

TORCH_LIBRARY(tritllm, m) {
  // Dense W [N, in_features] in `dtype` (float32/float16/bfloat16) from packed trits.
  m.def("unpack(Tensor packed, Tensor codebook, int depth, int in_features, ScalarType dtype)"
        " -> Tensor");
  // x [..., in_features] @ W.T -> [..., N] in x's dtype, accumulated in float32.
  m.def("matmul(Tensor x, Tensor packed, Tensor codebook, int depth, int in_features) -> Tensor");
  // The products of several weights that share x, depth and in_features (q, k and v; gate and
  // up), side by side: [..., N_1 + N_2 + ...], the same numbers as cat([matmul(x, W_i)], -1)
  // up to float rounding. A device may run them together (CUDA: one launch at M = 1, one cuBLAS
  // product for many tokens); see csrc/cuda/register.cu.
  m.def("matmul_cat(Tensor x, Tensor[] packed, Tensor[] codebook, int depth, int in_features)"
        " -> Tensor");
  // One decode step of attention over a static cache: rotates the token's q and k by the rotary
  // tables at `position`, writes k and v into the caches there and returns softmax(scale q.K) V
  // over positions 0..position, [B, heads * head_dim]. Shapes and rounding: decode_attention.h.
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor position,"
        " Tensor(a!) key_cache, Tensor(b!) value_cache, float scale) -> Tensor");
  // The residual add and RMSNorm of a decoder layer with the products that read the normed
  // input (q, k and v; gate and up): h_new = h + delta, x = RMSNorm(h_new) * norm_weight as
  // transformers' LlamaRMSNorm rounds it, returns (matmul_cat(x, ...), h_new). A device may
  // compute x inside the product kernel (CUDA at one token). Shapes and rounding:
  // fused_inputs.h.
  m.def("add_rms_norm_matmul_cat(Tensor h, Tensor delta, Tensor norm_weight, float eps,"
        " Tensor[] packed, Tensor[] codebook, int depth, int in_features) -> (Tensor, Tensor)");
  // The down projection of a gated MLP: gate_up [..., 2 * in_features] holds gate then up (the
  // matmul_cat of gate and up), x = silu(gate) * up rounded as torch rounds it, returns
  // matmul(x, ...). A device may compute x inside the product kernel (CUDA at one token).
  m.def("silu_mul_matmul(Tensor gate_up, Tensor packed, Tensor codebook, int depth,"
        " int in_features) -> Tensor");
}

// Inference only. Without an autograd kernel PyTorch would return an output with no grad_fn and
// the gradient would be silently missing, so each op's autograd kernel refuses inputs that need
// one and calls the op's device kernel below the autograd key.
namespace {

bool requires_grad(at::TensorList tensors) {
  for (const at::Tensor& t : tensors)
    if (t.requires_grad()) return true;
  return false;
}

// op(args...) below the autograd key, or an error naming `op_name` and `inputs` if a gradient
// would be needed.
template <typename Signature, typename... Args>
auto call_inference_only(const c10::TypedOperatorHandle<Signature>& op, const char* op_name,
                         bool needs_grad, const char* inputs, const Args&... args) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && needs_grad), "tritllm.", op_name,
              " is inference-only: ", inputs, " requires grad under grad mode. Wrap the call in "
              "torch.no_grad() / torch.inference_mode(), or detach the inputs.");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(args...);
}

at::Tensor matmul_autograd(const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& codebook, int64_t depth, int64_t in_features) {
  static const auto op = typed_op<decltype(matmul_autograd)>("tritllm::matmul");
  return call_inference_only(op, "matmul", requires_grad({x, codebook}), "x or the codebook", x,
                             packed, codebook, depth, in_features);
}

at::Tensor matmul_cat_autograd(const at::Tensor& x, at::TensorList packed,
                               at::TensorList codebook, int64_t depth, int64_t in_features) {
  static const auto op = typed_op<decltype(matmul_cat_autograd)>("tritllm::matmul_cat");
  return call_inference_only(op, "matmul_cat", requires_grad({x}) || requires_grad(codebook),
                             "x or a codebook", x, packed, codebook, depth, in_features);
}

at::Tensor unpack_autograd(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                           int64_t in_features, c10::ScalarType dtype) {
  static const auto op = typed_op<decltype(unpack_autograd)>("tritllm::unpack");
  return call_inference_only(op, "unpack", requires_grad({codebook}), "codebook", packed,
                             codebook, depth, in_features, dtype);
}

at::Tensor decode_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cos, const at::Tensor& sin,
                                     const at::Tensor& position, const at::Tensor& key_cache,
                                     const at::Tensor& value_cache, double scale) {
  static const auto op = typed_op<decltype(decode_attention_autograd)>("tritllm::decode_attention");
  return call_inference_only(op, "decode_attention", requires_grad({q, k, v}), "q, k or v", q, k,
                             v, cos, sin, position, key_cache, value_cache, scale);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_matmul_cat_autograd(
    const at::Tensor& h, const at::Tensor& delta, const at::Tensor& norm_weight, double eps,
    at::TensorList packed, at::TensorList codebook, int64_t depth, int64_t in_features) {
  static const auto op =
      typed_op<decltype(add_rms_norm_matmul_cat_autograd)>("tritllm::add_rms_norm_matmul_cat");
  return call_inference_only(
      op, "add_rms_norm_matmul_cat",
      requires_grad({h, delta, norm_weight}) || requires_grad(codebook),
      "h, delta, norm_weight or a codebook", h, delta, norm_weight, eps, packed, codebook, depth,
      in_features);
}

at::Tensor silu_mul_matmul_autograd(const at::Tensor& gate_up, const at::Tensor& packed,
                                    const at::Tensor& codebook, int64_t depth,
                                    int64_t in_features) {
  static const auto op = typed_op<decltype(silu_mul_matmul_autograd)>("tritllm::silu_mul_matmul");
  return call_inference_only(op, "silu_mul_matmul", requires_grad({gate_up, codebook}),
                             "gate_up or the codebook", gate_up, packed, codebook, depth,
                             in_features);
}

// matmul_cat on any device without a kernel of its own (the CPU): one matmul per weight.
at::Tensor matmul_cat_each(const at::Tensor& x, at::TensorList packed, at::TensorList codebook,
                           int64_t depth, int64_t in_features) {
  check_weight_lists(packed, codebook);
  std::vector<at::Tensor> parts;
  for (size_t i = 0; i < packed.size(); ++i)
    parts.push_back(matmul_op().call(x, packed[i], codebook[i], depth, in_features));
  return at::cat(parts, -1);
}

}  // namespace

// Devices with a matmul_cat kernel of their own (CUDA) register it for their key, which takes
// precedence over this one.
TORCH_LIBRARY_IMPL(tritllm, CompositeExplicitAutograd, m) {
  m.impl("matmul_cat", matmul_cat_each);
}

TORCH_LIBRARY_IMPL(tritllm, Autograd, m) {
  m.impl("matmul", matmul_autograd);
  m.impl("matmul_cat", matmul_cat_autograd);
  m.impl("unpack", unpack_autograd);
  m.impl("decode_attention", decode_attention_autograd);
  m.impl("add_rms_norm_matmul_cat", add_rms_norm_matmul_cat_autograd);
  m.impl("silu_mul_matmul", silu_mul_matmul_autograd);
}

}  // namespace tritllm
