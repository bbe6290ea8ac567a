"""CUDA implementations of torch.ops.tritllm.unpack / matmul (csrc/cuda).

matmul takes one of five kernels (csrc/cuda/register.cu); "tile" has two forms of its
tensor-core products, wgmma where the build has sm_90a code and the GPU is Hopper, else mma.sync,
which "tile_sync" names wherever it can run (so Hopper runs test both). The kernel tests run the
kernel they name through torch.ops.tritllm._cuda_matmul_with, whatever the heuristic would pick,
and the shapes are chosen so that each kernel meets odd M and N, K not a multiple of 16, several
K-splits and partial row blocks; the heuristic's own choice is what the other tests (3-D inputs,
graphs, streams, compile) run. Where the heuristic sends each kernel:
  * "xtable"   depth 1-2, M = 1, whole 512-weight windows (x-tables, any dtype);
  * "tile"     depth 1-2, float16/bfloat16 x, whole 256-weight runs, 2 <= M <= 128-1024 (by
               the weights' size and the form), on GPUs with ~200 KB of shared memory per block
               (Hopper);
  * "lut"      the same conditions where "tile" cannot run, M <= 48 (slices of 16 tokens);
  * "generic"  any other call with M <= 16;
  * "gemm"     the rest: W unpacked, then cuBLAS.

References are float64, built from the Python codec (tritllm_ext/format.py) by the Weight helper
of tests/test_cpu_ops.py. Two kinds of data:
  * exact data: scales are powers of two and activations small integers, so every product and
    every float32 sum is exact on every path and the output must equal the float64 reference
    rounded to the output type, bit for bit (this also catches any output element a kernel
    forgot to write: outputs are allocated over NaN-poisoned memory);
  * random data: normal activations, random scales; the error, relative to the reference's norm,
    must stay under the rounding of W to the activation type (the fast path multiplies in that
    type): 2e-3 for float16, 1.5e-2 for bfloat16, 1e-5 for float32.
GPU tests skip without CUDA. Shapes stay small so that compute-sanitizer runs them in minutes:
  compute-sanitizer --tool memcheck python -m pytest tests/test_cuda_ops.py -k "not compile"
"""
import pytest
import torch

import tritllm_ext  # noqa: F401  (registers the ops and their fake kernels)
from tritllm_ext import format as fmt
from test_cpu_ops import Weight

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# (path, depth, dtype, M, N, K)
PATH_CASES = [
    ("xtable", 2, torch.float16, 1, 37, 512),
    ("xtable", 2, torch.bfloat16, 1, 300, 4608),   # 9 windows: split sums, whole windows per block
    ("xtable", 2, torch.float16, 1, 9, 68096),     # 133 windows, more than SMs: blocks span windows
    # 28 windows of 512 batches (down of an 8B model): on 132 SMs 4 own blocks a window and 20
    # helpers taking the windows' last 32 batches
    ("xtable", 2, torch.float16, 1, 4093, 14336),
    ("xtable", 2, torch.float16, 1, 3001, 4096),   # 8 windows: clusters of 8, partial last batch
    ("xtable", 1, torch.bfloat16, 1, 1003, 3584),  # 7 windows: clusters of 7 at depth 1
    ("xtable", 2, torch.float32, 1, 65, 4090),     # K % 16 != 0 but whole windows of groups
    ("xtable", 1, torch.float16, 1, 33, 1024),
    ("xtable", 1, torch.bfloat16, 1, 7, 512),      # fewer rows than a batch
    ("xtable", 2, torch.float16, 1, 32003, 512),   # many batches per block, a partial last batch
    ("lut", 2, torch.float16, 1, 37, 256),
    ("lut", 2, torch.bfloat16, 3, 300, 4352),     # 17 runs: two K-splits of 9 and 8 warps
    ("lut", 2, torch.float16, 5, 23, 4090),       # K % 16 != 0 but whole runs of groups
    ("lut", 1, torch.float16, 8, 17, 512),
    ("lut", 1, torch.bfloat16, 9, 64, 768),       # two token tiles
    ("lut", 2, torch.float16, 16, 5, 256),
    ("lut", 2, torch.float16, 2, 32000, 256),     # several tiles per persistent CUDA block
    ("lut", 2, torch.bfloat16, 17, 33, 1024),     # two slices of tokens
    ("lut", 1, torch.float16, 48, 20, 512),
    *((tile, *case) for tile in ("tile", "tile_sync") for case in [
        (2, torch.float16, 1, 300, 4352),
        (1, torch.bfloat16, 5, 64, 768),
        (2, torch.bfloat16, 12, 1000, 1024),   # 16-token tile
        (2, torch.float16, 17, 37, 256),
        (2, torch.bfloat16, 17, 33, 1024),
        (1, torch.float16, 48, 20, 512),
        (2, torch.bfloat16, 33, 300, 4352),    # 17 runs, 3 row tiles (the last partial)
        (2, torch.float16, 64, 129, 4090),     # K % 16 != 0 but whole runs of groups
        (1, torch.bfloat16, 100, 200, 768),    # two token tiles, the second partial
        (2, torch.float16, 40, 64, 8192),      # one tile: K split 32 ways
        (2, torch.bfloat16, 512, 50, 512),     # 8 token tiles
        (2, torch.float16, 24, 32000, 256),    # 250 row tiles: several per persistent block
        (2, torch.float16, 100, 300, 1024),    # wgmma: a 128-token tile, 3 row tiles of 128
        (1, torch.bfloat16, 128, 1000, 512),   # wgmma: a 128-token tile at depth 1
        (2, torch.bfloat16, 70, 50, 8192),     # one 128 x 128 tile: K split 32 ways
        (2, torch.float16, 129, 300, 1024),    # wgmma: a 256-token tile (runs in two stages)
        (1, torch.bfloat16, 256, 1000, 512),   # wgmma: a 256-token tile at depth 1
        (2, torch.float16, 200, 50, 8192),     # one 128 x 256 tile: K split 32 ways
        (2, torch.float16, 300, 4100, 768),    # 2 token tiles x 33 row tiles, the last of 4 rows
        (1, torch.float16, 520, 130, 1024),    # 3 token tiles of 256 (the last of 8 tokens)
    ]),
    ("generic", 3, torch.float16, 1, 37, 333),
    ("generic", 4, torch.bfloat16, 7, 9, 100),
    ("generic", 2, torch.float32, 16, 41, 15),
    ("generic", 2, torch.float16, 3, 65, 4000),   # G % 16 != 0
    ("generic", 1, torch.bfloat16, 2, 5, 17),
    ("gemm", 2, torch.float16, 600, 300, 1024),
    ("gemm", 1, torch.bfloat16, 520, 70, 512),
    ("gemm", 4, torch.bfloat16, 20, 7, 333),
    ("gemm", 1, torch.float32, 33, 65, 100),
    ("gemm", 3, torch.float32, 49, 1000, 8192),
]


class CudaWeight:
    """A Weight (tests/test_cpu_ops.py) kept on the host as `host`, with its bytes and codebook
    copied to the GPU; with `exact`, its scales are powers of two (see above)."""

    def __init__(self, n, k, depth, seed, exact, codebook_size=27):
        self.host = Weight(n, k, depth, codebook_size=codebook_size, seed=seed)
        if exact:
            gen = torch.Generator().manual_seed(seed + 1)
            power = torch.randint(-2, 3, self.host.codebook.shape, generator=gen)
            sign = torch.randint(0, 2, self.host.codebook.shape, generator=gen) * 2 - 1
            self.host.codebook = (sign * 2.0 ** power).float()
        self.packed = self.host.packed.to(DEVICE)
        self.codebook = self.host.codebook.to(DEVICE)
        self.depth, self.shape = depth, self.host.shape


def activations(shape, dtype, seed, exact):
    gen = torch.Generator().manual_seed(seed)
    if exact:
        return torch.randint(-3, 4, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def reference(x, w):
    """float64 x @ W.T from the codec: W = codebook[idx] * level."""
    return x.double().cpu() @ w.host.dense64().T


def poison(shape, dtype):
    """Leave a NaN-filled block of this size in the caching allocator, so that the next tensor of
    this size very likely starts out as NaN."""
    block = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    del block


def matmul(x, w, kernel=None):
    """x @ W.T by the named CUDA kernel, or by the one the heuristic picks, into poisoned memory."""
    poison((*x.shape[:-1], w.shape[0]), x.dtype)
    if kernel is None:
        return torch.ops.tritllm.matmul(x, w.packed, w.codebook, w.depth, w.shape[1])
    return torch.ops.tritllm._cuda_matmul_with(x, w.packed, w.codebook, w.depth, w.shape[1],
                                               kernel)


@pytest.fixture(autouse=True)
def _exact_cublas_sums():
    """cuBLAS may add float16/bfloat16 split-K partial sums in 16 bits; the exact tests need the
    float32 sums the op promises."""
    if not torch.cuda.is_available():
        yield
        return
    flags = torch.backends.cuda.matmul
    saved = (flags.allow_fp16_reduced_precision_reduction,
             flags.allow_bf16_reduced_precision_reduction, flags.allow_tf32)
    flags.allow_fp16_reduced_precision_reduction = False
    flags.allow_bf16_reduced_precision_reduction = False
    flags.allow_tf32 = False
    yield
    (flags.allow_fp16_reduced_precision_reduction,
     flags.allow_bf16_reduced_precision_reduction, flags.allow_tf32) = saved


# ------------------------------------------------------------------------------------------------
# The arithmetic the lookup-table kernel relies on (no GPU needed)


def test_table_address_division():
    """lut_decode.cuh turns a tail byte v into its table address a = v * 256 + (lane % 16) * 8
    and gets v / 27 from a by one multiply-high; the scale entry is at a - 6912 * (v / 27), in the
    first half of one of the scale table's 27 rows (which lie in the digit table's second
    halves, so they never reach another scale table or the digit entries)."""
    div27 = -(-(1 << 32) // 6912)
    assert div27 == 621379  # the constant in lut_decode.cuh
    for v in range(256):
        for copy in range(16):
            a = v * 256 + copy * 8
            n15 = (a * div27) >> 32
            assert n15 == v // 27
            assert a - 6912 * n15 == (v % 27) * 256 + copy * 8
            assert (a - 6912 * n15) % 256 < 128


def _trit_digit(v, i):
    """format.h's trit_digit: digit i of a byte, in {0, 1, 2} even for corrupt bytes >= 243."""
    magic = -(-65536 // 3 ** (i + 1))
    return (((v * magic) & 0xFFFF) * 3) >> 16


@pytest.mark.parametrize("one,two", [(0x3C00, 0x4000), (0x3F80, 0x4000)], ids=["f16", "bf16"])
def test_fifth_digit_in_the_table_entry(one, two):
    """lut_decode.cuh keeps a byte's fifth digit c4 in bits 0-1 of its entry's first word and 3 c4
    in bits 16-18 (the bits of 0, 1 and 2 as float16/bfloat16 have bits 0-6 zero): masking them
    off gives the paired digits back, and e0 + (e1 >> 16) holds c4(v0) + 3 c4(v1) in bits 0-3."""
    bits = [0, one, two]
    first = [(bits[_trit_digit(v, 0)] | _trit_digit(v, 4))
             | (bits[_trit_digit(v, 1)] | 3 * _trit_digit(v, 4)) << 16 for v in range(256)]
    for v in range(243):
        assert _trit_digit(v, 4) == v // 81
    for v0 in range(256):
        assert first[v0] & ~0x00070003 == bits[_trit_digit(v0, 0)] | bits[_trit_digit(v0, 1)] << 16
        for v1 in range(256):
            fifth = (first[v0] + (first[v1] >> 16)) & 0xFFFFFFFF
            assert fifth & 15 == _trit_digit(v0, 4) + 3 * _trit_digit(v1, 4)


def test_xtable_tail_division():
    """xtable_gemv.cu takes weight 15's c_0 + 3 c_1 = T / 27 from the tail byte T by one
    multiply-high."""
    div27 = -(-(1 << 32) // 27)
    assert div27 == 159072863  # the constant in xtable_gemv.cu
    assert all((t * div27) >> 32 == t // 27 for t in range(256))


# ------------------------------------------------------------------------------------------------
# unpack


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", fmt.DEPTHS)
def test_unpack_is_bit_exact(dtype, depth):
    for i, k in enumerate((1, 15, 16, 17, 100, 333, 4096)):
        w = CudaWeight(2 * i + 3, k, depth, seed=k, exact=False)
        poison(w.shape, dtype)
        out = torch.ops.tritllm.unpack(w.packed, w.codebook, depth, k, dtype)
        assert out.dtype == dtype and out.shape == w.shape and out.is_cuda
        assert torch.equal(out.cpu(), w.host.dense(dtype)), f"K={k}"


@cuda_only
@pytest.mark.parametrize("depth,dtype", [(2, torch.float16), (1, torch.bfloat16),
                                         (3, torch.float32), (4, torch.float16)])
def test_unpack_many_blocks_and_row_slices(depth, dtype):
    """Many blocks of 256 groups with a partial last one, and row slices whose bytes do not start
    on a 16-byte boundary (the kernel's staging then loads them byte by byte)."""
    for n, k, first in ((333, 4096, 0), (301, 17, 1), (97, 1000, 3)):
        w = CudaWeight(n, k, depth, seed=n + k, exact=False)
        rows = w.packed[first:]
        poison((n - first, k), dtype)
        out = torch.ops.tritllm.unpack(rows, w.codebook, depth, k, dtype)
        assert torch.equal(out.cpu(), w.host.dense(dtype)[first:]), f"N={n} K={k} rows {first}.."


def format_h_decode(packed, codebook, depth, k):
    """float64 W from any bytes, as csrc/format.h decodes them: the reference decoder
    (format.unpack, which reads every digit by format.h's division-free rule and does not
    validate), with scale indices past the codebook reading zero."""
    levels, idx = fmt.unpack(packed.cpu(), depth, k)
    table = torch.zeros(27, dtype=torch.float64)
    table[:codebook.numel()] = codebook.cpu().double()
    scale = table[idx.long()].repeat_interleave(fmt.GROUP_SIZE, dim=1)[:, :k]
    return scale * levels.double()


@cuda_only
@pytest.mark.parametrize("depth", fmt.DEPTHS)
def test_unpack_decodes_any_bytes_like_format_h(depth):
    """Bytes the format forbids (>= 243, tail bytes past their bound, scale indices past the
    codebook) are not checked on the GPU (docs/FORMAT.md, Validation); they decode by format.h's
    arithmetic, deterministically, as the other CUDA kernels decode them."""
    n, k = 300, 100
    gen = torch.Generator().manual_seed(depth)
    packed = torch.randint(0, 256, (n, fmt.packed_row_bytes(k, depth)), generator=gen,
                           dtype=torch.uint8)
    codebook = torch.linspace(0.5, 2.0, 20)  # 20 entries: indices 20..26 read zero
    out = torch.ops.tritllm.unpack(packed.to(DEVICE), codebook.to(DEVICE), depth, k,
                                   torch.float32)
    # float32(scale) * level, rounded once to float32: the float64 product rounded.
    assert torch.equal(out.cpu(), format_h_decode(packed, codebook, depth, k).float())


# ------------------------------------------------------------------------------------------------
# matmul


@cuda_only
@pytest.mark.parametrize("path,depth,dtype,m,n,k", PATH_CASES)
def test_matmul_exact_data_is_bit_exact(path, depth, dtype, m, n, k):
    w = CudaWeight(n, k, depth, seed=m * 1000 + n, exact=True)
    x = activations((m, k), dtype, seed=m + k, exact=True)
    y = matmul(x.to(DEVICE), w, path)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y.cpu(), reference(x, w).to(dtype)), path


@cuda_only
@pytest.mark.parametrize("path,depth,dtype,m,n,k", PATH_CASES)
def test_matmul_random_data_within_tolerance(path, depth, dtype, m, n, k):
    w = CudaWeight(n, k, depth, seed=m * 1000 + n + 1, exact=False)
    x = activations((m, k), dtype, seed=m + k + 1, exact=False)
    y = matmul(x.to(DEVICE), w, path).cpu()
    ref = reference(x, w)
    assert torch.isfinite(y).all()
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < RELATIVE_TOLERANCE[dtype], f"{path}: relative error {rel:.3g}"


@cuda_only
@pytest.mark.parametrize("depth,dtype", [(2, torch.float16), (1, torch.bfloat16), (3, torch.float32)])
def test_matmul_3d_and_noncontiguous_x(depth, dtype):
    w = CudaWeight(23, 512, depth, seed=3, exact=True)
    base = activations((2, 5, 1024), dtype, seed=4, exact=True).to(DEVICE)
    x = base[..., ::2]  # 3-D and not contiguous
    assert not x.is_contiguous()
    y = matmul(x, w)
    assert y.shape == (2, 5, 23)
    assert torch.equal(y.cpu(), reference(x.reshape(10, 512), w).to(dtype).reshape(2, 5, 23))
    xt = activations((512, 6), dtype, seed=5, exact=True).to(DEVICE).T  # transposed
    assert torch.equal(matmul(xt, w).cpu(), reference(xt, w).to(dtype))


@cuda_only
def test_matmul_nonfinite_x_poisons_only_its_row():
    w = CudaWeight(9, 256, 2, seed=11, exact=False)
    x = torch.randn(3, 256).half().to(DEVICE)
    x[1, 20] = float("inf")
    y = matmul(x, w)
    assert not torch.isfinite(y[1]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


@cuda_only
@pytest.mark.parametrize("depth,dtype,m,k", [(2, torch.float16, 1, 256), (1, torch.bfloat16, 20, 512),
                                             (2, torch.bfloat16, 1, 1024), (1, torch.float16, 1, 512),
                                             (3, torch.float32, 2, 100), (4, torch.float16, 64, 40),
                                             (2, torch.float16, 70, 1024)])
def test_corrupt_bytes_stay_in_bounds(depth, dtype, m, k):
    """The CUDA ops do not read contents to check them (docs/FORMAT.md, Validation): bytes >= 243
    and scale indices past the codebook give wrong numbers, never an out-of-bounds access
    (compute-sanitizer checks the accesses)."""
    n = 40
    packed = torch.full((n, fmt.packed_row_bytes(k, depth)), 255, dtype=torch.uint8, device=DEVICE)
    codebook = torch.ones(1, device=DEVICE)
    x = torch.ones(m, k, dtype=dtype, device=DEVICE)
    assert torch.ops.tritllm.matmul(x, packed, codebook, depth, k).shape == (m, n)
    assert torch.ops.tritllm.unpack(packed, codebook, depth, k, dtype).shape == (n, k)
    torch.cuda.synchronize()


@cuda_only
def test_empty_shapes():
    w = CudaWeight(0, 256, 2, seed=1, exact=False)
    assert torch.ops.tritllm.unpack(w.packed, w.codebook, 2, 256, torch.float16).shape == (0, 256)
    assert matmul(torch.randn(3, 256).half().to(DEVICE), w).shape == (3, 0)
    w = CudaWeight(5, 256, 2, seed=1, exact=False)
    assert matmul(torch.randn(0, 256).half().to(DEVICE), w).shape == (0, 5)


@cuda_only
def test_forcing_a_kernel_that_cannot_run_raises():
    w = CudaWeight(7, 40, 3, seed=1, exact=False)
    x = torch.randn(2, 40, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"the requested CUDA kernel cannot run this product "
                                           r"\(M=2, N=7, K=40, depth 3, Float\)"):
        torch.ops.tritllm._cuda_matmul_with(x, w.packed, w.codebook, 3, 40, "tile")
    with pytest.raises(RuntimeError, match="unknown CUDA kernel 'fast'; the kernels are xtable"):
        torch.ops.tritllm._cuda_matmul_with(x, w.packed, w.codebook, 3, 40, "fast")


@cuda_only
def test_arguments_on_different_devices_raise():
    w = CudaWeight(7, 40, 2, seed=1, exact=False)
    with pytest.raises(RuntimeError, match="x is on cpu but the weight is on cuda"):
        torch.ops.tritllm.matmul(torch.randn(2, 40), w.packed, w.codebook, 2, 40)
    with pytest.raises(RuntimeError, match="codebook is on cpu but packed is on cuda"):
        torch.ops.tritllm.unpack(w.packed, w.codebook.cpu(), 2, 40, torch.float16)


# ------------------------------------------------------------------------------------------------
# matmul_cat: several weights sharing x, through the kernel the heuristic picks for all of them

# (depth, dtype, M, K, the weights' N, their codebook sizes, whether the kernel the heuristic picks
# for the group is the one it picks for each weight alone)
CAT_CASES = [
    (2, torch.float16, 1, 4608, (37, 8, 300), (27, 5, 27), True),   # xtable, one launch, 9 windows
    (1, torch.bfloat16, 1, 512, (7, 33), (3, 27), True),            # xtable depth 1, partial batch
    (2, torch.float32, 1, 1024, (1, 2, 3, 4000), (1, 27, 9, 27), True),  # xtable: 4 weights at most
    (2, torch.float16, 1, 512, (5, 6, 7, 8, 9), (27,) * 5, False),  # more: tile at M = 1
    (2, torch.bfloat16, 3, 1024, (40, 24), (27, 27), True),         # tile, K split: strided sums
    (1, torch.float16, 40, 768, (300, 64), (27, 2), True),          # tile, 8 warps x 2 slabs
    (2, torch.float16, 8, 1024, (300, 40, 513), (27, 5, 27), False),  # tile: partial row tiles
    (2, torch.bfloat16, 16, 512, (5, 260, 7, 8, 9), (27, 3, 27, 1, 27), False),  # two launches
    (2, torch.float16, 5, 4096, (1000, 256, 256), (27,) * 3, False),  # tile, K split 16 ways
    (2, torch.bfloat16, 100, 1024, (200, 64, 64), (27, 9, 27), False),  # tile, 128-token tiles
    (2, torch.float16, 250, 1024, (200, 64, 64), (27, 9, 27), False),   # tile, 256-token tiles
    (2, torch.float16, 600, 512, (70, 33), (27, 27), False),        # unpack + one cuBLAS product
    (2, torch.float32, 5, 1024, (9, 17), (27, 27), True),           # generic, one product each
    (3, torch.float16, 1, 100, (9, 4), (27, 2), True),              # generic at M = 1
]


def matmul_cat(x, ws):
    poison((*x.shape[:-1], sum(w.shape[0] for w in ws)), x.dtype)
    return torch.ops.tritllm.matmul_cat(x, [w.packed for w in ws], [w.codebook for w in ws],
                                        ws[0].depth, ws[0].shape[1])


@cuda_only
@pytest.mark.parametrize("depth,dtype,m,k,ns,sizes,same_kernel", CAT_CASES)
def test_matmul_cat_equals_separate_products(depth, dtype, m, k, ns, sizes, same_kernel):
    """Exact data: the float64 reference, bit for bit, whatever the kernel. Random data: the
    separate products bit for bit where the same kernel runs and splits K the same way (x-table
    and generic compute each row as they do alone; so does tile_gemm when the weights' tiles
    together choose the K split each weight alone would), else the reference within the tolerance
    (one tile_gemm launch or one cuBLAS product over all the weights may split K differently from
    one per weight)."""
    for exact in (True, False):
        ws = [CudaWeight(n, k, depth, seed=n + i, exact=exact, codebook_size=c)
              for i, (n, c) in enumerate(zip(ns, sizes))]
        x = activations((m, k), dtype, seed=k + m, exact=exact)
        y = matmul_cat(x.to(DEVICE), ws)
        assert y.shape == (m, sum(ns)) and y.dtype == dtype
        ref = torch.cat([reference(x, w) for w in ws], -1)
        if exact:
            assert torch.equal(y.cpu(), ref.to(dtype))
        elif same_kernel:
            assert torch.equal(y, torch.cat([matmul(x.to(DEVICE), w) for w in ws], -1))
        else:
            rel = float((y.cpu().double() - ref).norm() / ref.norm())
            assert rel < RELATIVE_TOLERANCE[dtype], f"relative error {rel:.3g}"


@cuda_only
def test_matmul_cat_3d_x_and_graph_replay():
    ws = [CudaWeight(n, 1024, 2, seed=n, exact=False) for n in (64, 16, 16)]
    x = activations((1, 1, 1024), torch.float16, seed=1, exact=False).to(DEVICE)
    eager = matmul_cat(x, ws)
    assert eager.shape == (1, 1, 96)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        matmul_cat(x, ws)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.tritllm.matmul_cat(x, [w.packed for w in ws],
                                                [w.codebook for w in ws], 2, 1024)
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@cuda_only
def test_matmul_cat_bad_arguments_raise():
    a, b = CudaWeight(7, 512, 2, seed=1, exact=False), CudaWeight(5, 1024, 2, seed=2, exact=False)
    x = torch.randn(1, 512, device=DEVICE, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="one codebook per packed weight, got 2 packed and 1"):
        torch.ops.tritllm.matmul_cat(x, [a.packed, a.packed], [a.codebook], 2, 512)
    with pytest.raises(RuntimeError, match=r"packed must have shape \[N, 224\]"):
        torch.ops.tritllm.matmul_cat(x, [a.packed, b.packed], [a.codebook, b.codebook], 2, 512)
    with pytest.raises(RuntimeError, match="x is on cpu but the weight is on cuda"):
        torch.ops.tritllm.matmul_cat(x.cpu(), [a.packed], [a.codebook], 2, 512)


# ------------------------------------------------------------------------------------------------
# Streams, CUDA graphs, torch.compile


@cuda_only
@pytest.mark.parametrize("path,depth,dtype,m,n,k", [
    ("xtable", 2, torch.float16, 1, 300, 4608), ("xtable", 2, torch.bfloat16, 1, 1000, 4096),
    ("lut", 2, torch.float16, 1, 300, 4352), ("generic", 3, torch.bfloat16, 4, 33, 100),
    ("tile", 2, torch.float16, 40, 64, 8192), ("tile", 2, torch.bfloat16, 70, 300, 1024),
    ("tile_sync", 2, torch.float16, 8, 1000, 1024), ("gemm", 2, torch.float16, 600, 65, 512)])
def test_cuda_graph_replay_equals_eager(path, depth, dtype, m, n, k):
    w = CudaWeight(n, k, depth, seed=n, exact=False)
    x = activations((m, k), dtype, seed=k, exact=False).to(DEVICE)
    eager = matmul(x, w, path)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture, as torch.cuda.graphs asks
        matmul(x, w, path)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.tritllm._cuda_matmul_with(x, w.packed, w.codebook, depth, k, path)
    for _ in range(2):
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager), path
    x.copy_(activations((m, k), dtype, seed=k + 1, exact=False))  # replays read the new input
    graph.replay()
    assert torch.equal(captured, matmul(x, w, path)), path


@cuda_only
def test_runs_on_the_current_stream():
    w = CudaWeight(300, 4352, 2, seed=2, exact=True)
    x = activations((2, 4352), torch.float16, seed=3, exact=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the weight's copies to the GPU
    with torch.cuda.stream(stream):
        y = matmul(x.to(DEVICE), w)
        unpacked = torch.ops.tritllm.unpack(w.packed, w.codebook, 2, 4352, torch.float16)
    stream.synchronize()
    assert torch.equal(y.cpu(), reference(x, w).half())
    assert torch.equal(unpacked.cpu(), w.host.dense(torch.float16))


# (M, K): the x-table kernel with cluster sums, with split sums; tile_gemm with K split
@cuda_only
@pytest.mark.parametrize("m,k", [(1, 4096), (1, 4608), (8, 4096)])
def test_inputs_written_by_the_kernel_just_before(m, k):
    """The x-table and tile kernels and their split-sum kernels may start before the kernel ahead
    of them on the stream ends (csrc/cuda/dependent_launch.cuh): they must still see every byte
    that kernel wrote to x, the weight and the codebook, and not write out while it still reads
    it. Each product here follows element-wise kernels that write all three inputs, alternating
    between two weights, in one buffer each; and the next kernel reads out."""
    ws = [CudaWeight(3000, k, 2, seed=s, exact=True) for s in (1, 2)]
    xs = [activations((m, k), torch.float16, seed=s, exact=True).to(DEVICE) for s in (3, 4)]
    refs = [[reference(x.cpu(), w).half().to(DEVICE) for w in ws] for x in xs]
    packed, codebook = torch.empty_like(ws[0].packed), torch.empty_like(ws[0].codebook)
    x = torch.empty_like(xs[0])
    mismatches = torch.zeros((), dtype=torch.int64, device=DEVICE)  # read once: no sync per step
    for step in range(40):
        w, xi = step % 2, (step // 2) % 2
        torch.bitwise_xor(ws[w].packed, 0, out=packed)  # kernels, not copies
        torch.mul(ws[w].codebook, 1.0, out=codebook)
        torch.mul(xs[xi], 1.0, out=x)
        y = torch.ops.tritllm.matmul(x, packed, codebook, 2, k)
        mismatches += (y != refs[xi][w]).sum()
    assert int(mismatches) == 0


class _TritModule(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.register_buffer("packed", w.packed)
        self.register_buffer("codebook", w.codebook)
        self.depth, self.k = w.depth, w.shape[1]

    def forward(self, x):
        y = torch.ops.tritllm.matmul(x, self.packed, self.codebook, self.depth, self.k)
        return torch.relu(y) * 2


@cuda_only
def test_torch_compile_reduce_overhead_matches_eager():
    torch._dynamo.reset()
    w = CudaWeight(64, 512, 2, seed=9, exact=False)
    module = _TritModule(w)
    compiled = torch.compile(module, mode="reduce-overhead")
    for m in (1, 1, 1, 4, 4, 4):  # repeated calls reach the CUDA-graph replays
        x = activations((m, 512), torch.float16, seed=m, exact=False).to(DEVICE)
        assert torch.equal(compiled(x).clone(), module(x))
