"""Fake (meta) kernels and Python wrappers of the torch.ops.tritllm operators.

The device kernels are C++ (csrc/cpu, csrc/cuda); the schemas are in csrc/ops.cpp. The fake
kernels below let torch.compile, meta tensors and CUDA graphs reason about the ops without data:
they run every check that needs no tensor contents, with the same messages as csrc/checks.cpp.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (defines torch.ops.tritllm.* before the fakes are registered)
from .format import DEPTHS, MAX_CODEBOOK, packed_row_bytes

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_weight(packed: torch.Tensor, codebook: torch.Tensor, depth: int,
                  in_features: int) -> None:
    torch._check(depth in DEPTHS, lambda: f"tritllm: depth must be 1, 2, 3 or 4, got {depth}")
    torch._check(in_features >= 1, lambda: f"tritllm: in_features must be >= 1, got {in_features}")
    torch._check(packed.dtype == torch.uint8,
                 lambda: f"tritllm: packed must be uint8, got {packed.dtype}")
    row = packed_row_bytes(in_features, depth)
    torch._check(packed.dim() == 2 and packed.shape[1] == row,
                 lambda: f"tritllm: packed must have shape [N, {row}] for in_features="
                         f"{in_features} at depth {depth}, got {tuple(packed.shape)}")
    torch._check(packed.is_contiguous(), lambda: "tritllm: packed must be contiguous")
    torch._check(codebook.dtype == torch.float32,
                 lambda: f"tritllm: codebook must be float32, got {codebook.dtype}")
    torch._check(codebook.dim() == 1 and 1 <= codebook.shape[0] <= MAX_CODEBOOK,
                 lambda: "tritllm: codebook must be 1-D with 1 to 27 entries, got shape "
                         f"{tuple(codebook.shape)}")
    torch._check(codebook.is_contiguous(), lambda: "tritllm: codebook must be contiguous")
    torch._check(codebook.device == packed.device,
                 lambda: f"tritllm: codebook is on {codebook.device} but packed is on "
                         f"{packed.device}")


def _check_float_dtype(dtype: torch.dtype, what: str) -> None:
    torch._check(dtype in _FLOAT_DTYPES,
                 lambda: f"tritllm: {what} must be float32, float16 or bfloat16, got {dtype}")


@torch.library.register_fake("tritllm::unpack")
def _unpack_fake(packed, codebook, depth, in_features, dtype):
    _check_weight(packed, codebook, depth, in_features)
    _check_float_dtype(dtype, "dtype")
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


@torch.library.register_fake("tritllm::matmul")
def _matmul_fake(x, packed, codebook, depth, in_features):
    _check_weight(packed, codebook, depth, in_features)
    _check_float_dtype(x.dtype, "x")
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features,
                 lambda: f"tritllm: x must have shape [..., {in_features}], got {tuple(x.shape)}")
    torch._check(x.device == packed.device,
                 lambda: f"tritllm: x is on {x.device} but the weight is on {packed.device}")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.register_fake("tritllm::matmul_cat")
def _matmul_cat_fake(x, packed, codebook, depth, in_features):
    torch._check(len(packed) >= 1,
                 lambda: "tritllm: matmul_cat needs at least one weight, got none")
    torch._check(len(codebook) == len(packed),
                 lambda: f"tritllm: matmul_cat needs one codebook per packed weight, got "
                         f"{len(packed)} packed and {len(codebook)} codebooks")
    outs = [_matmul_fake(x, p, c, depth, in_features) for p, c in zip(packed, codebook)]
    return x.new_empty((*x.shape[:-1], sum(o.shape[-1] for o in outs)))


@torch.library.register_fake("tritllm::decode_attention")
def _decode_attention_fake(q, k, v, cos, sin, position, key_cache, value_cache, scale):
    # The shape rules of csrc/decode_attention.cpp (check_decode_attention_args), same messages.
    for name, t in (("k", k), ("v", v), ("cos", cos), ("sin", sin), ("key_cache", key_cache),
                    ("value_cache", value_cache)):
        torch._check(t.dtype == q.dtype, lambda: f"tritllm: decode_attention: {name} must have "
                     f"q's dtype {q.dtype}, got {t.dtype}")
    torch._check(key_cache.dim() == 4 and value_cache.shape == key_cache.shape,
                 lambda: "tritllm: decode_attention: key_cache and value_cache must have one "
                         f"shape [batch, kv_heads, max_len, head_dim], got "
                         f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    batch, kv_heads, max_len, head_dim = key_cache.shape
    width = kv_heads * head_dim
    torch._check(q.dim() == 2 and q.shape[0] == batch and q.shape[1] >= width
                 and q.shape[1] % width == 0,
                 lambda: f"tritllm: decode_attention: q must have shape [{batch}, heads * "
                         f"{head_dim}] with heads a multiple of the caches' {kv_heads} kv_heads, "
                         f"got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        torch._check(tuple(t.shape) == (batch, width), lambda: f"tritllm: decode_attention: "
                     f"{name} must have shape [{batch}, {width}], got {tuple(t.shape)}")
    return q.new_empty(q.shape)


@torch.library.register_fake("tritllm::add_rms_norm_matmul_cat")
def _add_rms_norm_matmul_cat_fake(h, delta, norm_weight, eps, packed, codebook, depth,
                                  in_features):
    # The rules of csrc/fused_inputs.cpp (check_add_rms_norm_args), same messages.
    what = "tritllm: add_rms_norm_matmul_cat:"
    _check_float_dtype(h.dtype, "add_rms_norm_matmul_cat: h")
    torch._check(h.dim() >= 1 and h.shape[-1] == in_features,
                 lambda: f"{what} h must have shape [..., {in_features}], got {tuple(h.shape)}")
    torch._check(delta.shape == h.shape, lambda: f"{what} delta must have h's shape "
                 f"{tuple(h.shape)}, got {tuple(delta.shape)}")
    for name, t in (("delta", delta), ("norm_weight", norm_weight)):
        torch._check(t.dtype == h.dtype,
                     lambda: f"{what} {name} must have h's dtype {h.dtype}, got {t.dtype}")
        torch._check(t.device == h.device,
                     lambda: f"{what} {name} is on {t.device} but h is on {h.device}")
    torch._check(tuple(norm_weight.shape) == (in_features,), lambda: f"{what} norm_weight must "
                 f"have shape [{in_features}], got {tuple(norm_weight.shape)}")
    torch._check(eps >= 0 and eps != float("inf"),
                 lambda: f"{what} eps must be finite and >= 0, got {eps}")
    return _matmul_cat_fake(h, packed, codebook, depth, in_features), h.new_empty(h.shape)


@torch.library.register_fake("tritllm::silu_mul_matmul")
def _silu_mul_matmul_fake(gate_up, packed, codebook, depth, in_features):
    _check_float_dtype(gate_up.dtype, "silu_mul_matmul: gate_up")
    torch._check(gate_up.dim() >= 1 and gate_up.shape[-1] == 2 * in_features,
                 lambda: "tritllm: silu_mul_matmul: gate_up must have shape [..., 2 * "
                         f"in_features = {2 * in_features}] (gate, then up), got "
                         f"{tuple(gate_up.shape)}")
    return _matmul_fake(gate_up[..., :in_features], packed, codebook, depth, in_features)


def matmul(x: torch.Tensor, tw) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] in x's dtype, for a TritWeight-like `tw` (attributes packed,
    codebook, depth, shape = (N, K))."""
    return torch.ops.tritllm.matmul(x, tw.packed, tw.codebook, tw.depth, tw.shape[1])


def matmul_cat(x: torch.Tensor, tws) -> torch.Tensor:
    """x @ [W_1; W_2; ...].T -> [..., N_1 + N_2 + ...] for TritWeight-likes `tws` of one depth and
    in_features (e.g. q, k and v): torch.cat([matmul(x, w) for w in tws], -1) up to float
    rounding (bit for bit on the CPU and in CUDA's fused kernels), with fewer launches on CUDA:
    one for every weight at one token, one cuBLAS product for all of them at many."""
    tws = list(tws)
    depth, k = tws[0].depth, tws[0].shape[1]
    if any(tw.depth != depth or tw.shape[1] != k for tw in tws):
        raise ValueError("matmul_cat: the weights must share depth and in_features, got "
                         f"{[(tw.depth, tw.shape[1]) for tw in tws]}")
    return torch.ops.tritllm.matmul_cat(x, [tw.packed for tw in tws],
                                        [tw.codebook for tw in tws], depth, k)


def unpack(tw, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense weight W [N, K] of a TritWeight-like `tw` in `dtype`, bit-exact with
    float32(codebook[idx]) * float32(level) rounded once to dtype."""
    return torch.ops.tritllm.unpack(tw.packed, tw.codebook, tw.depth, tw.shape[1], dtype)


def set_cpu_kernel(name: str) -> str:
    """Make the CPU ops use the kernel set `name` ("scalar", "avx2", "avx512" or "auto" for the
    best this CPU runs); raises RuntimeError if it is not available. Returns the active set's
    name. The environment variable TRITLLM_CPU_KERNEL sets the initial choice."""
    if not name:
        raise ValueError("set_cpu_kernel: name must be 'scalar', 'avx2', 'avx512' or 'auto'")
    return torch.ops.tritllm._cpu_kernel(name)


def cpu_kernel() -> str:
    """The name of the CPU kernel set the ops use now."""
    return torch.ops.tritllm._cpu_kernel("")


def cpu_kernels_available() -> list[str]:
    """The CPU kernel sets this build and CPU can run, best first."""
    return list(torch.ops.tritllm._cpu_kernels_available())


def cpu_kernels_compiled() -> list[str]:
    """The CPU kernel sets this build compiled, best first, whether or not this CPU runs them."""
    return list(torch.ops.tritllm._cpu_kernels_compiled())
