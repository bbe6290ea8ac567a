// One decode step of a decoder layer's attention (torch.ops.tritllm.decode_attention): rotate the
// new token's query and key, store its key and value in a static cache, attend over the cache.
//
// Shapes (B sequences, KVH key/value heads, G query heads per key/value head, D = head_dim, L =
// cache length):
//   q [B, KVH*G*D], k and v [B, KVH*D]   the token's projections, any strides (views of one fused
//                                         product are fine); query head h uses key/value head
//                                         h / G, as transformers' repeat_kv;
//   cos, sin [>= L, D], contiguous         rotary tables by position (rotate-half convention);
//   position: int64, one element          the token's position p, the same for every sequence;
//   key_cache, value_cache [B, KVH, L, D] contiguous, written at p;
//   -> out [B, KVH*G*D] in q's dtype.
// All float tensors share one dtype (float32, float16 or bfloat16).
//
// Math: the rotated query and key are computed in float32 and rounded to the dtype (the key as the
// cache stores it); scores scale * q.k over positions 0..p, their softmax and the weighted sum of
// values in float32; the output is rounded once.
//
// A position outside [0, L) is refused with an exception where it can be read without a device
// sync (CPU tensors); on a GPU the call leaves the cache untouched and returns NaN, because a
// captured CUDA graph cannot raise.
#pragma once

#include <ATen/core/Tensor.h>

namespace tritllm {

// Checks what can be checked without reading tensor contents; every failure names the argument.
void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& position, const at::Tensor& key_cache,
                                 const at::Tensor& value_cache, double scale);

// The reference implementation, in ATen operations (any device, no host sync on a GPU). It runs
// the op on the CPU and on CUDA calls the kernel does not cover.
at::Tensor decode_attention_composite(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& position,
                                      const at::Tensor& key_cache, const at::Tensor& value_cache,
                                      double scale);

}  // namespace tritllm
