// Typed dispatcher handles of the tritllm ops, for C++ code that calls one op from another (the
// autograd guards and the composite implementations): the call goes through the dispatcher, so
// each device's kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace tritllm {

// The handle of op `name` ("tritllm::matmul") with C++ signature `Signature`; look it up once
// (a function-local static) where it is called often.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using MatmulSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   int64_t, int64_t);
using MatmulCatSignature = at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, int64_t,
                                      int64_t);

inline const c10::TypedOperatorHandle<MatmulSignature>& matmul_op() {
  static const auto op = typed_op<MatmulSignature>("tritllm::matmul");
  return op;
}

inline const c10::TypedOperatorHandle<MatmulCatSignature>& matmul_cat_op() {
  static const auto op = typed_op<MatmulCatSignature>("tritllm::matmul_cat");
  return op;
}

}  // namespace tritllm
