"""CPU implementations of torch.ops.tritllm.unpack / matmul, every kernel set forced in turn.

References are float64, built from the Python codec (tritllm_ext/format.py): random levels and
scale indices are packed by format.pack, and W = codebook[idx] * level.

Tolerances (elementwise, for y = x @ W.T; S = |x| @ |W|.T, Gx = the same with each activation
replaced by the largest |x| of its group of 16):
  * float32 arithmetic: (K + 2) * 2^-24 * S (a worst-case bound for rounding W to float32, the
    products and a sum of K terms);
  * the AVX2 and AVX-512 kernels quantize every group of 16 activations to integers on a
    per-group scale; they promise an error of at most 2^-12 of the group's largest |x| per
    activation (their actual step gives 2^-14 at depths 1-3, 1.5e-4 at depth 4), hence
    2^-12 * Gx; the scalar kernel uses x as is;
  * a float16 / bfloat16 output adds its rounding: half an ulp, |y| * 2^-11 or |y| * 2^-8.
unpack is compared bit for bit (which also catches output memory a kernel forgot to write).
"""
import os
import subprocess
import sys

import pytest
import torch

import tritllm_ext  # noqa: F401
from tritllm_ext import format as fmt
from tritllm_ext import ops

KERNELS = ("scalar", "avx2", "avx512")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATION_ERROR = {"scalar": 0.0, "avx2": 2.0 ** -12, "avx512": 2.0 ** -12}
OUTPUT_ULP = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}

# (M, N, K): every M of interest, odd N, K not a multiple of 16 (and a few that are), a group
# count that is not a multiple of 8, enough rows of W for several threads.
MATMUL_SHAPES = [
    (1, 37, 333), (2, 5, 17), (3, 65, 100), (7, 3, 1), (16, 41, 15), (33, 9, 333),
    (128, 17, 100), (4, 301, 272), (5, 2, 4097), (1, 1, 16), (1, 19, 1000),
]
UNPACK_K = (1, 15, 16, 17, 100, 333)


@pytest.fixture(autouse=True)
def _restore_kernel():
    before = ops.cpu_kernel()
    yield
    ops.set_cpu_kernel(before)


def use_kernel(name):
    if name not in ops.cpu_kernels_available():
        pytest.skip(f"the {name} CPU kernel is not available on this build/CPU "
                    f"(available: {ops.cpu_kernels_available()})")
    assert ops.set_cpu_kernel(name) == name


class Weight:
    """A random packed matrix with its float64 reference; duck-types TritWeight."""

    def __init__(self, n, k, depth, codebook_size=27, seed=0):
        gen = torch.Generator().manual_seed(seed)
        lmax = fmt.max_level(depth)
        self.levels = torch.randint(-lmax, lmax + 1, (n, k), generator=gen)
        self.idx = torch.randint(0, codebook_size, (n, fmt.num_groups(k)), generator=gen)
        self.codebook = (torch.rand(codebook_size, generator=gen) * 2 + 0.01).float()
        self.codebook[0] = -self.codebook[0]  # the format allows any finite scale
        self.packed = fmt.pack(self.levels, self.idx, depth)
        self.depth = depth
        self.shape = (n, k)

    def scales(self):
        """codebook[idx] per weight, float32 [N, K]."""
        return self.codebook[self.idx].repeat_interleave(fmt.GROUP_SIZE, 1)[:, :self.shape[1]]

    def dense64(self):
        return self.scales().double() * self.levels.double()

    def dense(self, dtype):
        """The format's definition: float32 product, rounded once to dtype."""
        return (self.scales() * self.levels.float()).to(dtype)


def group_max(x):
    """|x| with each value replaced by the largest |x| of its group of 16 along the last dim."""
    k = x.shape[-1]
    pad = fmt.num_groups(k) * fmt.GROUP_SIZE - k
    a = torch.nn.functional.pad(x.abs(), (0, pad)).reshape(*x.shape[:-1], -1, fmt.GROUP_SIZE)
    return a.amax(-1, keepdim=True).expand_as(a).reshape(*x.shape[:-1], -1)[..., :k]


def check_matmul(x, w, kernel):
    y = ops.matmul(x, w)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    x64 = x.double()
    w64 = w.dense64()
    ref = x64 @ w64.T
    k = w.shape[1]
    bound = ((k + 2) * 2.0 ** -24 * (x64.abs() @ w64.abs().T)
             + ACTIVATION_ERROR[kernel] * (group_max(x64) @ w64.abs().T)
             + OUTPUT_ULP[x.dtype] * ref.abs() + 2.0 ** -24)
    err = (y.double() - ref).abs()
    assert not torch.isnan(y).any()
    worst = (err - bound).max()
    assert worst <= 0, f"error exceeds its bound by {float(worst):.3g} (max err {float(err.max()):.3g})"
    return y, ref


# ------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", fmt.DEPTHS)
def test_unpack_is_bit_exact(kernel, dtype, depth):
    use_kernel(kernel)
    for i, k in enumerate(UNPACK_K):
        w = Weight(2 * i + 3, k, depth, seed=k)
        out = ops.unpack(w, dtype)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out, w.dense(dtype)), f"K={k}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", fmt.DEPTHS)
def test_matmul_matches_float64(kernel, dtype, depth):
    use_kernel(kernel)
    for m, n, k in MATMUL_SHAPES:
        w = Weight(n, k, depth, seed=m * 1000 + k)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)
        check_matmul(x, w, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_matmul_float32_relative_error(kernel):
    """The norm-relative error on float32: about 1e-7 for the scalar kernel, about 1e-4 for the
    AVX2 kernel (its integer activations carry 13 bits per group of 16)."""
    use_kernel(kernel)
    w = Weight(64, 1000, 2, seed=7)
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(8))
    y, ref = check_matmul(x, w, kernel)
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < {"scalar": 1e-6, "avx2": 2e-4, "avx512": 2e-4}[kernel]


@pytest.mark.parametrize("kernel", KERNELS)
def test_matmul_3d_and_noncontiguous_x(kernel):
    use_kernel(kernel)
    w = Weight(23, 100, 2, seed=3)
    base = torch.randn(2, 5, 200, generator=torch.Generator().manual_seed(4))
    x = base[..., ::2]  # 3-D and not contiguous
    assert not x.is_contiguous()
    y, _ = check_matmul(x, w, kernel)
    assert torch.equal(y, ops.matmul(x.contiguous(), w))
    xt = torch.randn(100, 6, generator=torch.Generator().manual_seed(5)).T  # transposed
    check_matmul(xt, w, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_matmul_activation_outliers_and_zeros(kernel):
    """Groups with one huge activation, all-zero groups and tiny values keep their own scale."""
    use_kernel(kernel)
    w = Weight(31, 160, 2, seed=9)
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(10))
    x[0, 5] = 1e4
    x[1, 16:32] = 0.0
    x[2, 32:48] *= 1e-6
    check_matmul(x, w, kernel)
    x[1, 48:64] = 1e-42  # subnormal: a group this small counts as zero in the integer kernels
    y = ops.matmul(x, w)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_matmul_nonfinite_x_poisons_only_its_row(kernel):
    use_kernel(kernel)
    w = Weight(9, 40, 2, seed=11)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(12))
    x[1, 20] = float("inf")
    y = ops.matmul(x, w)
    assert not torch.isfinite(y[1]).any()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_small_codebooks(kernel):
    """A BitNet-style weight: depth 1, one scale."""
    use_kernel(kernel)
    w = Weight(33, 70, 1, codebook_size=1, seed=13)
    assert torch.equal(ops.unpack(w, torch.float32), w.dense(torch.float32))
    check_matmul(torch.randn(4, 70), w, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_shapes(kernel):
    use_kernel(kernel)
    w = Weight(0, 20, 2)
    assert ops.unpack(w, torch.float32).shape == (0, 20)
    assert ops.matmul(torch.randn(3, 20), w).shape == (3, 0)
    w = Weight(5, 20, 2)
    assert ops.matmul(torch.randn(0, 20), w).shape == (0, 5)


# ------------------------------------------------------------------------------------------------
# Bad content: caught as the kernels decode, raised as a clear error from inside at::parallel_for


def corrupt(w, row, byte, value):
    w.packed = w.packed.clone()
    w.packed[row, byte] = value
    return w


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("depth,pos,value", [
    (2, 0, 243), (2, 5, 255), (2, 6, 250), (1, 3, 81), (1, 0, 243), (3, 10, 3), (4, 13, 9),
    (3, 2, 244),
])
def test_corrupt_byte_raises(kernel, depth, pos, value):
    use_kernel(kernel)
    # many rows, the bad byte in the last one: it is found by another thread than the first
    w = Weight(301, 100, depth, seed=depth)
    g = 5
    w = corrupt(w, 300, g * fmt.bytes_per_group(depth) + pos, value)
    msg = rf"corrupt byte at row 300, byte {g * fmt.bytes_per_group(depth) + pos}: value {value}"
    with pytest.raises(RuntimeError, match=msg):
        ops.unpack(w, torch.float16)
    for m in (1, 16):
        with pytest.raises(RuntimeError, match=msg):
            ops.matmul(torch.randn(m, 100), w)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("depth", fmt.DEPTHS)
@pytest.mark.parametrize("row,group,pos", [(0, 0, 0), (0, 9, -1), (2, 15, 1), (2, 16, -1),
                                           (6, 36, 0), (6, 31, -1)])
def test_corrupt_byte_raises_long_rows(kernel, depth, row, group, pos):
    """Rows of 38 groups, which the AVX-512 kernels take 16 groups at a time (the row pass for one
    row of x checks their bytes itself): a byte out of bounds in either half of 16 groups, in a
    later 16, in the last row of the buffer and in the last groups of a row (left over)."""
    use_kernel(kernel)
    w = Weight(7, 600, depth, seed=depth)
    byte = group * fmt.bytes_per_group(depth) + pos % fmt.bytes_per_group(depth)
    value = fmt.byte_bounds(depth)[pos % fmt.bytes_per_group(depth)]
    w = corrupt(w, row, byte, value)
    msg = rf"corrupt byte at row {row}, byte {byte}: value {value}"
    for m in (1, 3):
        with pytest.raises(RuntimeError, match=msg):
            ops.matmul(torch.randn(m, 600), w)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("depth", (1, 2))
def test_scale_index_beyond_codebook_raises(kernel, depth):
    use_kernel(kernel)
    w = Weight(50, 64, depth, codebook_size=3, seed=2)
    tail = 3 * depth
    w = corrupt(w, 49, 2 * fmt.bytes_per_group(depth) + tail, 5)  # idx = 5 % 27
    with pytest.raises(RuntimeError, match="selects scale index 5 but the codebook has only 3"):
        ops.unpack(w, torch.float32)
    with pytest.raises(RuntimeError, match="selects scale index 5"):
        ops.matmul(torch.randn(2, 64), w)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("depth", fmt.DEPTHS)
@pytest.mark.parametrize("row,group", [(0, 3), (0, 10), (0, 31), (6, 20), (6, 36)])
def test_scale_index_beyond_codebook_raises_long_rows(kernel, depth, row, group):
    """Rows of 38 groups, whose scales the AVX-512 kernels look up 16 groups at a time: the bad
    index in either half of 16 groups, in a later 16, in the last row of the buffer, and in the
    last groups of a row (left over)."""
    use_kernel(kernel)
    w = Weight(7, 600, depth, codebook_size=3, seed=depth)
    w = corrupt(w, row, group * fmt.bytes_per_group(depth) + 3 * depth, 27 + 4)  # idx = 4
    for m in (1, 3):
        with pytest.raises(RuntimeError, match=rf"packed row {row}, byte .* selects scale index 4 "
                                               "but the codebook has only 3"):
            ops.matmul(torch.randn(m, 600), w)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bad", (float("nan"), float("inf"), float("-inf")))
def test_nonfinite_codebook_raises(kernel, bad):
    use_kernel(kernel)
    w = Weight(4, 32, 2)
    w.codebook = w.codebook.clone()
    w.codebook[3] = bad
    with pytest.raises(RuntimeError, match="codebook holds a NaN or infinite scale at index 3"):
        ops.unpack(w, torch.float32)
    with pytest.raises(RuntimeError, match="codebook holds a NaN or infinite scale"):
        ops.matmul(torch.randn(1, 32), w)


# ------------------------------------------------------------------------------------------------
# Bad arguments


def good_args(depth=2, n=7, k=40):
    w = Weight(n, k, depth)
    return torch.randn(3, k), w.packed, w.codebook, depth, k


@pytest.mark.parametrize("mutate,match", [
    (lambda a: (a[0].double(),) + a[1:], "x must be float32, float16 or bfloat16, got Double"),
    (lambda a: (a[0].int(),) + a[1:], "x must be float32, float16 or bfloat16, got Int"),
    (lambda a: (a[0][:, :39],) + a[1:], r"x must have shape \[\.\.\., 40\]"),
    (lambda a: (a[0], a[1].to(torch.int8)) + a[2:], "packed must be uint8"),
    (lambda a: (a[0], a[1][:, :-1]) + a[2:], r"packed must have shape \[N, 21\]"),
    (lambda a: (a[0], a[1].reshape(-1)) + a[2:], r"packed must have shape \[N, 21\]"),
    (lambda a: (a[0], torch.empty(21, 7, dtype=torch.uint8).T) + a[2:],
     "packed must be contiguous"),
    (lambda a: (a[0], a[1], a[2].double(), 2, 40), "codebook must be float32"),
    (lambda a: (a[0], a[1], torch.ones(28), 2, 40), "codebook must be 1-D with 1 to 27 entries"),
    (lambda a: (a[0], a[1], torch.ones(3, 3), 2, 40), "codebook must be 1-D"),
    (lambda a: (a[0], a[1], torch.ones(0), 2, 40), "codebook must be 1-D"),
    (lambda a: (a[0], a[1], torch.ones(6)[::2], 2, 40), "codebook must be contiguous"),
    (lambda a: (a[0], a[1], a[2], 5, 40), "depth must be 1, 2, 3 or 4, got 5"),
    (lambda a: (a[0], a[1], a[2], 0, 40), "depth must be 1, 2, 3 or 4, got 0"),
    (lambda a: (a[0][:, :0], a[1], a[2], 2, 0), "in_features must be >= 1"),
    (lambda a: (a[0][:, :30], a[1], a[2], 2, 30), r"packed must have shape \[N, 14\]"),
    (lambda a: (a[0].to("meta"),) + a[1:], "x is on meta but the weight is on cpu"),
    (lambda a: (a[0], a[1], a[2].to("meta"), 2, 40), "codebook is on meta but packed is on cpu"),
])
@pytest.mark.parametrize("kernel", KERNELS)
def test_bad_matmul_arguments_raise(kernel, mutate, match):
    use_kernel(kernel)
    args = mutate(good_args())
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tritllm.matmul(*args)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bad_unpack_arguments_raise(kernel):
    use_kernel(kernel)
    _, packed, codebook, depth, k = good_args()
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        torch.ops.tritllm.unpack(packed, codebook, depth, k, torch.float64)
    with pytest.raises(RuntimeError, match="depth must be 1, 2, 3 or 4, got 5"):
        torch.ops.tritllm.unpack(packed, codebook, 5, k, torch.float32)
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        torch.ops.tritllm.unpack(packed.float(), codebook, depth, k, torch.float32)
    with pytest.raises(RuntimeError, match=r"packed must have shape \[N, 28\]"):
        torch.ops.tritllm.unpack(packed, codebook, depth, 50, torch.float32)


# ------------------------------------------------------------------------------------------------
# The op contract: autograd guard, fake kernels, torch.compile


def test_inputs_requiring_grad_raise_under_grad_mode():
    x, packed, codebook, depth, k = good_args()
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        torch.ops.tritllm.matmul(x, packed, codebook, depth, k)
    cb = codebook.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        torch.ops.tritllm.unpack(packed, cb, depth, k, torch.float32)
    with torch.no_grad():
        y = torch.ops.tritllm.matmul(x, packed, codebook, depth, k)
        w = torch.ops.tritllm.unpack(packed, cb, depth, k, torch.float32)
    assert y.shape == (3, 7) and w.shape == (7, 40) and not y.requires_grad


def test_meta_tensors_give_shapes():
    x, packed, codebook, depth, k = good_args()
    y = torch.ops.tritllm.matmul(x.to("meta").reshape(1, 3, k).bfloat16(), packed.to("meta"),
                                 codebook.to("meta"), depth, k)
    assert y.device.type == "meta" and y.shape == (1, 3, 7) and y.dtype == torch.bfloat16
    w = torch.ops.tritllm.unpack(packed.to("meta"), codebook.to("meta"), depth, k, torch.float16)
    assert w.shape == (7, 40) and w.dtype == torch.float16
    with pytest.raises(RuntimeError, match=r"packed must have shape \[N, 28\]"):
        torch.ops.tritllm.unpack(packed.to("meta"), codebook.to("meta"), depth, 50, torch.float16)


@pytest.mark.parametrize("kernel", KERNELS)
def test_opcheck(kernel):
    use_kernel(kernel)
    x, packed, codebook, depth, k = good_args(n=9, k=37)
    for xs in (x, x.bfloat16().reshape(1, 3, k), x.half()[:1]):
        torch.library.opcheck(torch.ops.tritllm.matmul, (xs, packed, codebook, depth, k))
    for dtype in DTYPES:
        torch.library.opcheck(torch.ops.tritllm.unpack, (packed, codebook, depth, k, dtype))


@pytest.mark.parametrize("kernel", KERNELS)
def test_matmul_cat_equals_separate_products(kernel):
    use_kernel(kernel)
    ws = [Weight(n, 37, 2, codebook_size=c, seed=n) for n, c in ((9, 27), (4, 3), (1, 27))]
    x = torch.randn(2, 3, 37).bfloat16()
    y = ops.matmul_cat(x, ws)
    assert y.shape == (2, 3, 14) and y.dtype == torch.bfloat16
    assert torch.equal(y, torch.cat([ops.matmul(x, w) for w in ws], -1))
    torch.library.opcheck(torch.ops.tritllm.matmul_cat,
                          (x[0], [w.packed for w in ws], [w.codebook for w in ws], 2, 37))
    meta = torch.ops.tritllm.matmul_cat(x.to("meta"), [w.packed.to("meta") for w in ws],
                                        [w.codebook.to("meta") for w in ws], 2, 37)
    assert meta.shape == (2, 3, 14)


def test_matmul_cat_bad_arguments_raise():
    a, b = Weight(7, 40, 2, seed=1), Weight(5, 50, 2, seed=2)
    x = torch.randn(1, 40)
    with pytest.raises(RuntimeError, match="needs at least one weight"):
        torch.ops.tritllm.matmul_cat(x, [], [], 2, 40)
    with pytest.raises(RuntimeError, match="one codebook per packed weight, got 2 packed and 1"):
        torch.ops.tritllm.matmul_cat(x, [a.packed, a.packed], [a.codebook], 2, 40)
    with pytest.raises(RuntimeError, match=r"packed must have shape \[N, 21\]"):
        torch.ops.tritllm.matmul_cat(x, [a.packed, b.packed], [a.codebook, b.codebook], 2, 40)
    with pytest.raises(RuntimeError, match="inference-only"):
        torch.ops.tritllm.matmul_cat(x.requires_grad_(), [a.packed], [a.codebook], 2, 40)
    with pytest.raises(ValueError, match="must share depth and in_features"):
        ops.matmul_cat(x, [a, b])


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    w = Weight(21, 50, 2, seed=21)

    def f(x):
        return torch.relu(ops.matmul(x, w)) * 2 + 1

    compiled = torch.compile(f, fullgraph=True)
    for m in (1, 5):  # a second shape exercises recompilation / dynamic shapes
        x = torch.randn(m, 50)
        assert torch.equal(compiled(x), f(x))


# ------------------------------------------------------------------------------------------------
# Kernel selection


def test_kernel_selection():
    available = ops.cpu_kernels_available()
    assert available[-1] == "scalar"
    assert ops.set_cpu_kernel("auto") == available[0] == ops.cpu_kernel()
    assert ops.set_cpu_kernel("scalar") == "scalar" == ops.cpu_kernel()
    with pytest.raises(RuntimeError, match="'sse9', which does not exist; available here: auto"):
        ops.set_cpu_kernel("sse9")
    assert ops.cpu_kernel() == "scalar"  # a failed choice keeps the previous one
    for name in set(KERNELS) - set(available):
        with pytest.raises(RuntimeError, match="does not support"):
            ops.set_cpu_kernel(name)


def run_python(code, **env):
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                              full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_environment_variable_selects_kernel():
    code = "from tritllm_ext import ops; print(ops.cpu_kernel())"
    ok = run_python(code, TRITLLM_CPU_KERNEL="scalar")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "scalar"
    bad = run_python(code, TRITLLM_CPU_KERNEL="sse9")
    assert bad.returncode != 0 and "TRITLLM_CPU_KERNEL asks for the CPU kernel 'sse9'" in bad.stderr
