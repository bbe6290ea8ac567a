"""torch.ops.tritllm.decode_attention: one decode step of attention over a static cache
(csrc/decode_attention.h), on the CPU (the ATen reference, csrc/decode_attention.cpp) and on CUDA
(the kernel, csrc/cuda/decode_attention.cu, and the reference where the kernel does not reach).

References: the rotated key written to the cache must equal a float32 rotation rounded to the
dtype bit for bit (both devices do the same float32 operations); every other cache entry must be
untouched; the output is compared with a float64 softmax over the rounded rotated query and the
cache, within the output's rounding: 1e-5 (float32), 1e-3 (float16), 8e-3 (bfloat16) of the
largest |value|. CUDA outputs are allocated over NaN-poisoned memory, so an element the kernel
forgot to write shows up.
"""
import math

import pytest
import torch

import tritllm_ext  # noqa: F401  (registers the ops and their fake kernels)
from test_cuda_ops import poison

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (dtype, batch, kv_heads, group, head_dim, max_len, position, layout of q/k/v)
# On CUDA: clusters of 1 to 8 blocks (max_len, batch * kv_heads), 1, 2 and 4 element pairs per
# lane (head_dim <= 64, 128, 256), groups padded to 4 and to 8; group 9 and head_dim 258 take the
# reference.
CASES = [
    (torch.float16, 1, 8, 4, 128, 384, 383, "fused"),     # a Llama-3.1-8B layer, full cache
    (torch.float16, 1, 8, 4, 128, 384, 130, "fused"),     # ... partly filled
    (torch.bfloat16, 3, 2, 3, 18, 7, 0, "contiguous"),    # first position, one block each
    (torch.float32, 2, 1, 8, 64, 1000, 777, "strided"),   # 8 blocks per head
    (torch.float16, 1, 3, 5, 130, 300, 299, "fused"),     # group 5 (padded to 8), 3 pairs a lane
    (torch.bfloat16, 2, 4, 1, 256, 129, 64, "strided"),   # multi-head attention
    (torch.float32, 1, 2, 2, 2, 65, 64, "contiguous"),    # head_dim 2
    (torch.float32, 5, 2, 4, 72, 200, 150, "fused"),
    (torch.float16, 1, 8, 4, 128, 8192, 5000, "fused"),   # a long context
    (torch.float16, 1, 1, 9, 64, 50, 20, "fused"),        # group 9: reference on CUDA
    (torch.bfloat16, 1, 2, 2, 258, 40, 39, "contiguous"),  # head_dim 258: reference on CUDA
]


def rotate(x, cos_row, sin_row):
    """x [..., D] rotated by one row of the tables, in float32, rounded to x's dtype: the op's
    definition (x cos + rotate_half(x) sin)."""
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos_row.float() + rotated * sin_row.float()).to(x.dtype)


class Step:
    """Random inputs of one decode step, on the CPU; `run` calls the op on a device."""

    def __init__(self, dtype, batch, kv_heads, group, head_dim, max_len, position, layout,
                 seed=0):
        g = torch.Generator().manual_seed(seed)
        self.dtype, self.position, self.group = dtype, position, group
        heads = kv_heads * group
        self.shape = (batch, kv_heads, max_len, head_dim)
        width = (heads + 2 * kv_heads) * head_dim
        fused = torch.randn(batch, width, generator=g).to(dtype)
        if layout == "strided":  # every other column of a wider buffer
            wide = torch.randn(batch, 2 * width, generator=g).to(dtype)
            wide[:, ::2] = fused
            fused = wide[:, ::2]
        q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
        self.q, self.k, self.v = fused[:, :q_end], fused[:, q_end:k_end], fused[:, k_end:]
        if layout == "contiguous":
            self.q, self.k, self.v = (t.contiguous() for t in (self.q, self.k, self.v))
        angles = torch.rand(max_len + 3, head_dim // 2, generator=g, dtype=torch.float64) * 6.3
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self.keys = torch.randn(self.shape, generator=g).to(dtype)
        self.values = torch.randn(self.shape, generator=g).to(dtype)
        self.scale = 1 / math.sqrt(head_dim)

    def run(self, device, position=None):
        """The op on `device`: (output, key cache, value cache) on the CPU."""
        keys, values = self.keys.to(device, copy=True), self.values.to(device, copy=True)
        q, k, v = self._inputs(device)
        pos = torch.tensor([self.position if position is None else position], device=device)
        if device == "cuda":
            poison((q.shape[0], q.shape[1]), self.dtype)
        out = torch.ops.tritllm.decode_attention(q, k, v, self.cos.to(device),
                                                 self.sin.to(device), pos, keys, values,
                                                 self.scale)
        return out.cpu(), keys.cpu(), values.cpu()

    def _inputs(self, device):
        if device == "cpu":
            return self.q, self.k, self.v
        # The same strides on the device: copy the buffer the views share.
        base = self.q._base if self.q._base is not None else None
        if base is None or self.k._base is not base:
            return self.q.to(device), self.k.to(device), self.v.to(device)
        moved = base.to(device)
        return tuple(moved.as_strided(t.shape, t.stride(), t.storage_offset())
                     for t in (self.q, self.k, self.v))

    def expected_caches(self):
        b, kvh, _, d = self.shape
        p = self.position
        keys, values = self.keys.clone(), self.values.clone()
        keys[:, :, p] = rotate(self.k.reshape(b, kvh, d), self.cos[p], self.sin[p])
        values[:, :, p] = self.v.reshape(b, kvh, d)
        return keys, values

    def expected_output(self):
        """float64 softmax(scale q.K) V over positions 0..p, from the rounded rotated query."""
        b, kvh, _, d = self.shape
        p = self.position
        keys, values = self.expected_caches()
        q = rotate(self.q.reshape(b, kvh * self.group, d), self.cos[p], self.sin[p]).double()
        q = q.reshape(b, kvh, self.group, d)
        scores = q @ keys[:, :, :p + 1].double().transpose(2, 3) * self.scale
        out = torch.softmax(scores, dim=-1) @ values[:, :, :p + 1].double()
        return out.reshape(b, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_matches_the_float64_reference(device, case):
    step = Step(*case)
    out, keys, values = step.run(device)
    want_keys, want_values = step.expected_caches()
    assert torch.equal(keys, want_keys), "key cache: position p must hold the rotated key"
    assert torch.equal(values, want_values), "value cache"
    want = step.expected_output()
    assert out.dtype == step.dtype and out.shape == want.shape
    atol = TOLERANCE[step.dtype] * float(step.values.abs().max())
    torch.testing.assert_close(out.double(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_every_position_of_a_sequence(device):
    """A cache filled one step at a time: each step sees exactly the positions before it."""
    dtype = torch.float16
    step = Step(dtype, 2, 2, 4, 64, 150, 0, "fused", seed=3)
    keys, values = step.keys.to(device), step.values.to(device)
    for p in range(0, 150, 7):
        step.position = p
        step.keys, step.values = keys.cpu(), values.cpu()
        want = step.expected_output()
        q, k, v = step._inputs(device)
        out = torch.ops.tritllm.decode_attention(q, k, v, step.cos.to(device),
                                                 step.sin.to(device),
                                                 torch.tensor([p], device=device), keys, values,
                                                 step.scale)
        atol = TOLERANCE[dtype] * float(step.values.abs().max())
        torch.testing.assert_close(out.cpu().double(), want, rtol=0, atol=atol)


def test_a_position_outside_the_cache_raises_on_the_cpu():
    step = Step(torch.float32, 1, 2, 2, 16, 5, 0, "fused")
    for p in (5, -1):
        with pytest.raises(RuntimeError, match=f"position {p} is outside the cache's 5 positions"):
            step.run("cpu", position=p)


@cuda_only
def test_a_position_outside_the_cache_gives_nan_on_cuda_and_writes_nothing():
    for case in (CASES[2], CASES[9]):  # the kernel and the reference
        step = Step(*case)
        for p in (step.shape[2], -1):
            out, keys, values = step.run("cuda", position=p)
            assert out.isnan().all()
            assert torch.equal(keys, step.keys) and torch.equal(values, step.values)


def bad_call(device="cpu", **changes):
    step = Step(torch.float16, 2, 2, 2, 16, 10, 3, "fused")
    args = dict(q=step.q, k=step.k, v=step.v, cos=step.cos, sin=step.sin,
                position=torch.tensor([3]), key_cache=step.keys, value_cache=step.values,
                scale=0.25)
    args = {name: (t.to(device) if isinstance(t, torch.Tensor) else t)
            for name, t in args.items()}
    args.update(changes)
    return torch.ops.tritllm.decode_attention(*args.values())


@pytest.mark.parametrize("changes,message", [
    (dict(q=torch.zeros(2, 64, dtype=torch.int32)), "q must be float32, float16 or bfloat16"),
    (dict(k=torch.zeros(2, 32)), "k must have q's dtype Half, got Float"),
    (dict(q=torch.zeros(2, 48, dtype=torch.float16)),
     r"q must have shape \[2, heads \* 16\] with heads a multiple of the caches' 2 kv_heads"),
    (dict(v=torch.zeros(1, 32, dtype=torch.float16)), r"v must have shape \[2, 32\]"),
    (dict(position=torch.tensor([3.0])), "position must be an int64 tensor of one element"),
    (dict(position=torch.tensor([1, 2])), "position must be an int64 tensor of one element"),
    (dict(cos=torch.zeros(9, 16, dtype=torch.float16)), r"cos must be contiguous with shape"),
    (dict(key_cache=torch.zeros(2, 2, 10, 16, dtype=torch.float16).transpose(2, 3)),
     "value_cache must have key_cache's shape"),
    (dict(key_cache=torch.zeros(2, 2, 16, 10, dtype=torch.float16).transpose(2, 3),
          value_cache=torch.zeros(2, 2, 10, 16, dtype=torch.float16)),
     "key_cache and value_cache must be contiguous"),
    (dict(key_cache=torch.zeros(2, 2, 10, 15, dtype=torch.float16),
          value_cache=torch.zeros(2, 2, 10, 15, dtype=torch.float16)), "an even head_dim"),
    (dict(scale=float("nan")), "scale must be finite"),
])
def test_bad_arguments_raise_naming_the_tensor(changes, message):
    with pytest.raises(RuntimeError, match=message):
        bad_call(**changes)


@cuda_only
def test_bad_devices_raise():
    with pytest.raises(RuntimeError, match="position is on cpu but q is on cuda"):
        bad_call("cuda", position=torch.tensor([3]))
    with pytest.raises(RuntimeError, match="key_cache is on cpu but q is on cuda"):
        bad_call("cuda", key_cache=torch.zeros(2, 2, 10, 16, dtype=torch.float16))


def test_inference_only():
    step = Step(torch.float32, 1, 1, 1, 4, 3, 1, "contiguous")
    q = step.q.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="decode_attention is inference-only"):
        torch.ops.tritllm.decode_attention(q, step.k, step.v, step.cos, step.sin,
                                           torch.tensor([1]), step.keys, step.values, 0.5)


def test_compiled_call_writes_the_cache():
    """Through torch.compile (the fake kernel, and the functionalized cache writes)."""
    step = Step(torch.float32, 2, 2, 2, 16, 12, 5, "fused")
    want, want_keys, want_values = step.run("cpu")

    def attend(q, k, v, position, keys, values):
        return torch.ops.tritllm.decode_attention(q, k, v, step.cos, step.sin, position, keys,
                                                  values, step.scale) * 2

    keys, values = step.keys.clone(), step.values.clone()
    out = torch.compile(attend, backend="aot_eager", fullgraph=True)(
        step.q, step.k, step.v, torch.tensor([5]), keys, values)
    assert torch.equal(out, want * 2)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


@cuda_only
def test_cuda_graph_replays_follow_the_position():
    step = Step(torch.float16, 1, 8, 4, 128, 384, 0, "fused", seed=5)
    q, k, v = step._inputs("cuda")
    cos, sin = step.cos.cuda(), step.sin.cuda()
    keys, values = step.keys.cuda(), step.values.cuda()
    position = torch.tensor([100], device="cuda")

    def call():
        return torch.ops.tritllm.decode_attention(q, k, v, cos, sin, position, keys, values,
                                                  step.scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    for p in (101, 250, 383):
        position.fill_(p)
        eager = call()
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager), p
