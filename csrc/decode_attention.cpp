// Argument checks and the reference implementation of torch.ops.tritllm.decode_attention
// (decode_attention.h). The CUDA kernel is csrc/cuda/decode_attention.cu.
#include "decode_attention.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace tritllm {

void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& position, const at::Tensor& key_cache,
                                 const at::Tensor& value_cache, double scale) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "tritllm: decode_attention: q must be float32, float16 or bfloat16, got ", dtype);
  const std::pair<const at::Tensor*, const char*> floats[] = {
      {&k, "k"}, {&v, "v"}, {&cos, "cos"}, {&sin, "sin"}, {&key_cache, "key_cache"},
      {&value_cache, "value_cache"}};
  for (const auto& [t, name] : floats) {
    TORCH_CHECK(t->scalar_type() == dtype, "tritllm: decode_attention: ", name,
                " must have q's dtype ", dtype, ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "tritllm: decode_attention: ", name, " is on ",
                t->device(), " but q is on ", q.device());
  }
  TORCH_CHECK(position.device() == q.device(), "tritllm: decode_attention: position is on ",
              position.device(), " but q is on ", q.device());
  TORCH_CHECK(position.scalar_type() == at::kLong && position.numel() == 1,
              "tritllm: decode_attention: position must be an int64 tensor of one element, got ",
              position.scalar_type(), " of shape ", position.sizes());

  TORCH_CHECK(key_cache.dim() == 4, "tritllm: decode_attention: key_cache must have shape "
              "[batch, kv_heads, max_len, head_dim], got ", key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "tritllm: decode_attention: value_cache "
              "must have key_cache's shape ", key_cache.sizes(), ", got ", value_cache.sizes());
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "tritllm: decode_attention: key_cache and value_cache must be contiguous");
  const int64_t batch = key_cache.size(0), kv_heads = key_cache.size(1);
  const int64_t max_len = key_cache.size(2), head_dim = key_cache.size(3);
  TORCH_CHECK(kv_heads >= 1 && max_len >= 1 && head_dim >= 2 && head_dim % 2 == 0,
              "tritllm: decode_attention: the caches need kv_heads >= 1, max_len >= 1 and an even "
              "head_dim, got shape ", key_cache.sizes());

  const int64_t kv_width = kv_heads * head_dim;
  TORCH_CHECK(q.dim() == 2 && q.size(0) == batch && q.size(1) >= kv_width &&
                  q.size(1) % kv_width == 0,
              "tritllm: decode_attention: q must have shape [", batch, ", heads * ", head_dim,
              "] with heads a multiple of the caches' ", kv_heads, " kv_heads, got ", q.sizes());
  TORCH_CHECK(k.dim() == 2 && k.size(0) == batch && k.size(1) == kv_width,
              "tritllm: decode_attention: k must have shape [", batch, ", ", kv_width, "], got ",
              k.sizes());
  TORCH_CHECK(v.dim() == 2 && v.size(0) == batch && v.size(1) == kv_width,
              "tritllm: decode_attention: v must have shape [", batch, ", ", kv_width, "], got ",
              v.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) >= max_len && cos.size(1) == head_dim &&
                  cos.is_contiguous(),
              "tritllm: decode_attention: cos must be contiguous with shape [>= ", max_len, ", ",
              head_dim, "], got ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes() && sin.is_contiguous(), "tritllm: decode_attention: sin "
              "must be contiguous with cos's shape ", cos.sizes(), ", got ", sin.sizes());
  TORCH_CHECK(std::isfinite(scale), "tritllm: decode_attention: scale must be finite, got ",
              scale);
}

namespace {

// x [..., D] rotated by the rows cos_p, sin_p [1, D] (float32): x cos + rotate_half(x) sin with
// rotate_half(x) = (-x[D/2:], x[:D/2]), in float32, rounded to x's dtype.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos_p, const at::Tensor& sin_p) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor rotated = at::cat({-xf.narrow(-1, half, half), xf.narrow(-1, 0, half)}, -1);
  return (xf * cos_p + rotated * sin_p).to(x.scalar_type());
}

}  // namespace

at::Tensor decode_attention_composite(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& position,
                                      const at::Tensor& key_cache, const at::Tensor& value_cache,
                                      double scale) {
  check_decode_attention_args(q, k, v, cos, sin, position, key_cache, value_cache, scale);
  const int64_t batch = key_cache.size(0), kv_heads = key_cache.size(1);
  const int64_t max_len = key_cache.size(2), head_dim = key_cache.size(3);
  const int64_t group = q.size(1) / (kv_heads * head_dim);
  if (position.is_cpu()) {
    const int64_t p = position.item<int64_t>();
    TORCH_CHECK(p >= 0 && p < max_len, "tritllm: decode_attention: position ", p,
                " is outside the cache's ", max_len, " positions");
  }
  // Device tensors are not read on the host: an invalid position writes back what the cache
  // holds and yields NaN.
  const at::Tensor pos = position.reshape({1});
  const at::Tensor valid = pos.ge(0).logical_and(pos.lt(max_len));
  const at::Tensor index = pos.clamp(0, max_len - 1);
  const at::Tensor cos_p = cos.index_select(0, index).to(at::kFloat);
  const at::Tensor sin_p = sin.index_select(0, index).to(at::kFloat);

  const at::Tensor q_rot = rotate(q.reshape({batch, kv_heads * group, head_dim}), cos_p, sin_p);
  const at::Tensor k_rot = rotate(k.reshape({batch, kv_heads, 1, head_dim}), cos_p, sin_p);
  const at::Tensor v_new = v.reshape({batch, kv_heads, 1, head_dim});
  // index_copy_ on the (const) cache handles: the op's schema declares both as written.
  at::Tensor keys = key_cache, values = value_cache;
  keys.index_copy_(2, index, at::where(valid, k_rot, keys.index_select(2, index)));
  values.index_copy_(2, index, at::where(valid, v_new, values.index_select(2, index)));

  at::Tensor scores = at::matmul(q_rot.to(at::kFloat).reshape({batch, kv_heads, group, head_dim}),
                                 keys.to(at::kFloat).transpose(2, 3)) * scale;
  scores.masked_fill_(at::arange(max_len, pos.options()).gt(index),
                      -std::numeric_limits<float>::infinity());
  const at::Tensor out = at::matmul(at::softmax(scores, -1), values.to(at::kFloat))
                             .reshape({batch, kv_heads * group * head_dim});
  return at::where(valid, out, std::numeric_limits<float>::quiet_NaN()).to(q.scalar_type());
}

// Devices with a kernel of their own (CUDA) register it for their key, which takes precedence.
TORCH_LIBRARY_IMPL(tritllm, CompositeExplicitAutograd, m) {
  m.impl("decode_attention", decode_attention_composite);
}

}  // namespace tritllm
