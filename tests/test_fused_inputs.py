"""torch.ops.tritllm.add_rms_norm_matmul_cat and silu_mul_matmul (csrc/fused_inputs.h): a decoder
layer's element-wise steps (residual add and RMSNorm; SiLU-and-multiply) with the products that
read their result, on the CPU (the composite: the steps as ATen operations, then the product op)
and on CUDA (the x-table kernel computes them in its prologue at one token, tile_gemm in its
slot-order pass from two; the composite elsewhere).

References:
  * h + delta, bit for bit, on every path;
  * the composite's output equals the separate steps' output bit for bit (the same operations);
  * SiLU-and-multiply in the CUDA kernels equals the separate steps bit for bit (the same float32
    formula as torch's silu, rounded alike), so the fused output equals matmul of the separate
    steps' x bit for bit;
  * RMSNorm in the CUDA kernels adds its squares in its own order: the output is compared with a
    float64 product of the separate steps' x and the codec's W, within RELATIVE_TOLERANCE of
    tests/test_cuda_ops.py (the norm's last-bit differences are far below it).
CUDA outputs are allocated over NaN-poisoned memory.
"""
import pytest
import torch
import torch.nn.functional as F

import tritllm_ext  # noqa: F401  (registers the ops and their fake kernels)
from test_cpu_ops import Weight
from test_cuda_ops import RELATIVE_TOLERANCE, poison

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
EPS = 1e-5

# (dtype, depth, M, K, N of each weight). On CUDA at depth 1-2 the kernel that computes the input
# (fused_kernel below) is the x-table kernel at M = 1 with whole windows of 32 groups (cluster sums
# up to 8 windows, split sums past), tile_gemm from M = 2 to its limit (128-512 by the weights'
# size and the GPU, csrc/cuda/register.cu) in 16-bit types with whole runs of 16 groups (its
# slot-order pass: one block per token at K <= 4096, several past it).
# K = 4090 (whole windows and runs of groups, K % 8 != 0) leaves RMSNorm to the composite and
# SiLU to the kernel; depth 3, float32 at M > 1 and M past tile_gemm's limit take the composite.
CASES = [
    (torch.float16, 2, 1, 4096, (96, 24, 24)),    # q, k, v of a small Llama: clusters of 8
    (torch.bfloat16, 2, 1, 512, (37,)),           # one window
    (torch.float32, 1, 1, 1536, (300, 7)),        # three windows at depth 1
    (torch.float16, 2, 1, 4608, (65, 130)),       # nine windows: split sums
    (torch.bfloat16, 2, 1, 14336, (33,)),         # 28 windows, a Llama down projection's K
    (torch.float16, 2, 1, 4090, (41,)),           # K % 8 != 0
    (torch.float16, 3, 1, 100, (9, 5)),           # depth 3: composite
    (torch.bfloat16, 2, 3, 1024, (17, 8)),        # tile_gemm, three tokens
    (torch.float16, 2, 8, 4096, (300, 24, 24)),   # tile_gemm, batch 8 of a small Llama
    (torch.bfloat16, 1, 17, 512, (41,)),          # tile_gemm at depth 1, 17 tokens
    (torch.float16, 2, 5, 4608, (65, 130)),       # tile_gemm, two slot-order blocks per token
    (torch.bfloat16, 2, 40, 14336, (33,)),        # tile_gemm, K of a down projection
    (torch.float16, 2, 2, 4090, (41,)),           # tile_gemm, K % 8 != 0
    (torch.bfloat16, 2, 100, 4096, (300, 24, 24)),  # tile_gemm (Hopper: a 128-token tile)
    (torch.float32, 2, 2, 72, (5,)),              # K % 16 != 0: composite
    (torch.float16, 2, 1100, 512, (70,)),         # past tile_gemm's tokens: composite
]


def weights(ns, k, depth, seed):
    return [Weight(n, k, depth, seed=seed + i) for i, n in enumerate(ns)]


def on(device, ws):
    return [w.packed.to(device) for w in ws], [w.codebook.to(device) for w in ws]


def rms_norm(h, weight):
    """transformers' LlamaRMSNorm.forward."""
    h32 = h.float()
    return weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)


def reference(x, ws):
    """float64 x @ [W_1; W_2; ...].T from the codec."""
    return x.double().cpu().reshape(-1, x.shape[-1]) @ torch.cat([w.dense64() for w in ws]).T


def fused_kernel(device, dtype, depth, m, k):
    """The CUDA kernel that computes the fused input itself in these cases, else None."""
    if device != "cuda" or depth > 2:
        return None
    groups = -(-k // 16)
    if m == 1:
        return "xtable" if groups % 32 == 0 else None  # whole windows of 32 groups
    # tile_gemm takes up to 128 tokens on every GPU and weight, and from 129 to 1024 on some
    # (csrc/cuda/register.cu), which CASES avoid
    assert m <= 128 or m > 1024
    return "tile" if m <= 128 and dtype != torch.float32 and groups % 16 == 0 else None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,depth,m,k,ns", CASES)
def test_add_rms_norm_matmul_cat(device, dtype, depth, m, k, ns):
    gen = torch.Generator().manual_seed(k + m)
    h = torch.randn(m, 1, k, generator=gen).to(dtype).to(device)  # 3-D, as in a decode step
    delta = torch.randn(m, 1, k, generator=gen).to(dtype).to(device)
    weight = (torch.rand(k, generator=gen) + 0.5).to(dtype).to(device)
    ws = weights(ns, k, depth, seed=k)
    packed, codebooks = on(device, ws)
    if device == "cuda":
        poison((m, 1, sum(ns)), dtype)
    out, h_new = torch.ops.tritllm.add_rms_norm_matmul_cat(h, delta, weight, EPS, packed,
                                                          codebooks, depth, k)
    assert out.shape == (m, 1, sum(ns)) and out.dtype == dtype and h_new.shape == h.shape
    assert torch.equal(h_new, h + delta)
    x = rms_norm(h + delta, weight)
    separate = torch.ops.tritllm.matmul_cat(x, packed, codebooks, depth, k)
    kernel = fused_kernel(device, dtype, depth, m, k)
    if device == "cuda":
        chosen = torch.ops.tritllm._cuda_matmul_kernel(h[:, 0], packed, depth)
        assert (chosen if chosen in ("xtable", "tile") else None) == kernel
    if kernel is None or k % 8:
        assert torch.equal(out, separate)  # the composite
        return
    ref = reference(x, ws)
    y = out.double().cpu().reshape(m, -1)
    assert torch.isfinite(y).all()
    rel = float((y - ref).norm() / ref.norm())
    assert rel < RELATIVE_TOLERANCE[dtype], f"relative error {rel:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,depth,m,k,ns", CASES)
def test_silu_mul_matmul(device, dtype, depth, m, k, ns):
    gen = torch.Generator().manual_seed(k + m + 1)
    gate_up = (3 * torch.randn(m, 1, 2 * k, generator=gen)).to(dtype).to(device)
    w = Weight(ns[0], k, depth, seed=k + 1)
    packed, codebook = w.packed.to(device), w.codebook.to(device)
    if device == "cuda":
        poison((m, 1, ns[0]), dtype)
    out = torch.ops.tritllm.silu_mul_matmul(gate_up, packed, codebook, depth, k)
    assert out.shape == (m, 1, ns[0]) and out.dtype == dtype
    x = F.silu(gate_up[..., :k]) * gate_up[..., k:]
    assert torch.equal(out, torch.ops.tritllm.matmul(x, packed, codebook, depth, k))
    if device == "cuda":  # the kernel of the separate product, which computed x itself
        chosen = torch.ops.tritllm._cuda_matmul_kernel(x[:, 0], [packed], depth)
        assert (chosen if chosen in ("xtable", "tile") else None) == fused_kernel(
            device, dtype, depth, m, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 3])
def test_strided_inputs(device, m):
    """Views that are not contiguous (a column slice of a wider tensor) give the numbers of
    their contiguous copies."""
    k = 1024
    ws = weights((40, 8), k, 2, seed=5)
    packed, codebooks = on(device, ws)
    wide = torch.randn(m, 3 * k).half().to(device)
    h, delta = wide[:, :k], wide[:, k:2 * k]
    weight = torch.rand(2 * k).half().to(device)[::2]
    out, h_new = torch.ops.tritllm.add_rms_norm_matmul_cat(h, delta, weight, EPS, packed,
                                                          codebooks, 2, k)
    want, want_h = torch.ops.tritllm.add_rms_norm_matmul_cat(
        h.contiguous(), delta.contiguous(), weight.contiguous(), EPS, packed, codebooks, 2, k)
    assert torch.equal(out, want) and torch.equal(h_new, want_h)
    gate_up = torch.randn(m, 4 * k).half().to(device)[:, ::2]
    got = torch.ops.tritllm.silu_mul_matmul(gate_up, packed[0], codebooks[0], 2, k)
    assert torch.equal(got, torch.ops.tritllm.silu_mul_matmul(gate_up.contiguous(), packed[0],
                                                               codebooks[0], 2, k))


@cuda_only
def test_tensors_on_other_devices_are_named():
    w = Weight(8, 512, 2, seed=1)
    h = torch.randn(1, 512).half().cuda()
    weight = torch.ones(512).half().cuda()
    with pytest.raises(RuntimeError, match=r"packed\[0\] is on cpu but h is on cuda"):
        torch.ops.tritllm.add_rms_norm_matmul_cat(h, h, weight, EPS, [w.packed], [w.codebook], 2,
                                                  512)
    with pytest.raises(RuntimeError, match="norm_weight is on cpu but h is on cuda"):
        torch.ops.tritllm.add_rms_norm_matmul_cat(h, h, weight.cpu(), EPS, [w.packed.cuda()],
                                                  [w.codebook.cuda()], 2, 512)
    with pytest.raises(RuntimeError, match="gate_up is on cuda:0 but the weight is on cpu"):
        torch.ops.tritllm.silu_mul_matmul(torch.cat([h, h], -1), w.packed, w.codebook, 2, 512)


@cuda_only
@pytest.mark.parametrize("m", [1, 4])
def test_cuda_graph_replay_equals_eager(m):
    k = 4096
    ws = weights((300, 64), k, 2, seed=9)
    packed, codebooks = on("cuda", ws)
    h, delta = torch.randn(2, m, k).half().cuda().unbind(0)
    weight = torch.rand(k).half().cuda()
    gate_up = torch.randn(m, 2 * k).half().cuda()

    def step():
        out, h_new = torch.ops.tritllm.add_rms_norm_matmul_cat(h, delta, weight, EPS, packed,
                                                              codebooks, 2, k)
        return out, h_new, torch.ops.tritllm.silu_mul_matmul(gate_up, packed[0], codebooks[0],
                                                             2, k)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = step()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(graphed, eager):
            assert torch.equal(a, b)


def test_bad_arguments_name_the_tensor():
    k = 64
    w = Weight(8, k, 2, seed=1)
    h = torch.randn(1, k).half()
    weight = torch.ones(k).half()

    def call(h=h, delta=h, weight=weight, eps=EPS, k=k):
        return torch.ops.tritllm.add_rms_norm_matmul_cat(h, delta, weight, eps, [w.packed],
                                                         [w.codebook], 2, k)

    with pytest.raises(RuntimeError, match=r"delta must have h's shape \[1, 64\], got \[2, 64\]"):
        call(delta=torch.randn(2, k).half())
    with pytest.raises(RuntimeError, match="norm_weight must have h's dtype Half, got Float"):
        call(weight=torch.ones(k))
    with pytest.raises(RuntimeError, match=r"norm_weight must have shape \[64\], got \[1, 64\]"):
        call(weight=weight[None])
    with pytest.raises(RuntimeError, match="eps must be finite and >= 0, got -1"):
        call(eps=-1.0)
    with pytest.raises(RuntimeError, match=r"h must have shape \[..., 64\], got \[1, 63\]"):
        call(h=h[:, :63], delta=h[:, :63])
    with pytest.raises(RuntimeError, match="h must be float32, float16 or bfloat16, got Int"):
        call(h=h.int(), delta=h.int())
    with pytest.raises(RuntimeError, match=r"packed must have shape \[N, 28\]"):
        torch.ops.tritllm.add_rms_norm_matmul_cat(h, h, weight, EPS, [w.packed[:, :20]],
                                                  [w.codebook], 2, k)
    with pytest.raises(RuntimeError, match=r"gate_up must have shape \[..., 2 \* in_features = "
                                           r"128\] \(gate, then up\), got \[1, 64\]"):
        torch.ops.tritllm.silu_mul_matmul(h, w.packed, w.codebook, 2, k)
    with pytest.raises(RuntimeError, match="add_rms_norm_matmul_cat is inference-only"):
        call(h=h.float().requires_grad_(), delta=h.float(), weight=weight.float())


def test_fake_kernels_give_the_shapes():
    """torch.compile and CUDA graphs trace the ops through their fake kernels (tritllm_ext/ops.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = Weight(8, 64, 2, seed=1)
    with FakeTensorMode() as mode:
        packed, codebook = mode.from_tensor(w.packed), mode.from_tensor(w.codebook)
        h = torch.empty(1, 1, 64, dtype=torch.float16)
        out, h_new = torch.ops.tritllm.add_rms_norm_matmul_cat(
            h, h, torch.empty(64, dtype=torch.float16), EPS, [packed, packed],
            [codebook, codebook], 2, 64)
        assert out.shape == (1, 1, 16) and h_new.shape == (1, 1, 64)
        y = torch.ops.tritllm.silu_mul_matmul(torch.empty(3, 128, dtype=torch.bfloat16), packed,
                                              codebook, 2, 64)
        assert y.shape == (3, 8) and y.dtype == torch.bfloat16
        with pytest.raises(Exception, match="norm_weight must have h's dtype"):
            torch.ops.tritllm.add_rms_norm_matmul_cat(h, h, torch.empty(64), EPS, [packed],
                                                      [codebook], 2, 64)
