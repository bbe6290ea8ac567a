// Operator schemas of the tritllm library, one per op, and the autograd guard.
//
// Device kernels live beside their device (csrc/cpu, csrc/cuda) and register themselves with
// TORCH_LIBRARY_IMPL; the fake (meta) kernels live in tritllm_ext/ops.py next to the Python
// wrappers, as in pytorch/extension-cpp.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

namespace tritllm {

TORCH_LIBRARY(tritllm, m) {
  // Dense W [N, in_features] in `dtype` (float32/float16/bfloat16) from packed trits.
  m.def("unpack(Tensor packed, Tensor codebook, int depth, int in_features, ScalarType dtype)"
        " -> Tensor");
  // x [..., in_features] @ W.T -> [..., N] in x's dtype, accumulated in float32.
  m.def("matmul(Tensor x, Tensor packed, Tensor codebook, int depth, int in_features) -> Tensor");
}

// Inference only. Without an autograd kernel PyTorch would return an output with no grad_fn and
// the gradient would be silently missing, so refuse inputs that need one.
namespace {

at::Tensor matmul_autograd(const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& codebook, int64_t depth, int64_t in_features) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && (x.requires_grad() || codebook.requires_grad())),
              "tritllm.matmul is inference-only: x requires grad under grad mode. Wrap the call "
              "in torch.no_grad() / torch.inference_mode(), or detach x.");
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tritllm::matmul", "")
                       .typed<decltype(matmul_autograd)>();
  return op.call(x, packed, codebook, depth, in_features);
}

at::Tensor unpack_autograd(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                           int64_t in_features, c10::ScalarType dtype) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && codebook.requires_grad()),
              "tritllm.unpack is inference-only: codebook requires grad under grad mode.");
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tritllm::unpack", "")
                       .typed<decltype(unpack_autograd)>();
  return op.call(packed, codebook, depth, in_features, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(tritllm, Autograd, m) {
  m.impl("matmul", matmul_autograd);
  m.impl("unpack", unpack_autograd);
}

}  // namespace tritllm
