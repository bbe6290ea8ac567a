"""Exact adoption of dequantized weights (tritllm_ext/adoption.py)."""
import pytest
import torch

from tritllm_ext import codec
from tritllm_ext import format as fmt
from tritllm_ext import adoption as adopt_module
from tritllm_ext.adoption import AdoptReport, NonConformingWeightError, adopt, adopt_with_report

DEPTHS = (1, 2, 3, 4)
HALF_DTYPES = (torch.float16, torch.bfloat16)
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


# log10 of the weight magnitudes to try, per output dtype: ordinary, tiny (subnormal outputs,
# underflow to +-0.0) and huge (kept clear of overflow).
MAGNITUDES = {
    torch.float16: [(-3, 0), (-9, -5), (1, 3.5)],
    torch.bfloat16: [(-3, 0), (-41, -36), (20, 35)],
    torch.float32: [(-3, 0), (-44, -38), (20, 35)],
}


def bits(t):
    return t.view(BITS[t.dtype])


def random_weight(gen, dtype):
    """A small random matrix from one of several distributions and magnitudes."""
    n = int(torch.randint(1, 10, (), generator=gen))
    k = int(torch.randint(1, 81, (), generator=gen))
    kind = int(torch.randint(0, 5, (), generator=gen))
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    if kind == 1:  # heavy tails
        w = w / torch.rand(n, k, generator=gen, dtype=torch.float64).clamp(min=1e-4)
    elif kind == 2:  # mostly zeros
        w = w * (torch.rand(n, k, generator=gen) < 0.25)
    elif kind == 3:  # rows of very different scales
        w = w * torch.logspace(-2, 2, n, dtype=torch.float64).unsqueeze(1)
    elif kind == 4:  # few distinct values
        w = torch.randint(-3, 4, (n, k), generator=gen).to(torch.float64)
    lo, hi = MAGNITUDES[dtype][int(torch.randint(0, 3, (), generator=gen))]
    scale = 10 ** (lo + (hi - lo) * float(torch.rand((), generator=gen)))
    return (w * scale / max(float(w.abs().max()), 1e-300)).to(torch.float32)


def publisher_weight(gen, depth, dtype, product_dtype):
    """What another codec of the family would publish: its own log-spaced codebook (float64 or
    float32), random scale indices and levels, products in `product_dtype` rounded to `dtype`."""
    lmax = fmt.max_level(depth)
    n = int(torch.randint(1, 10, (), generator=gen))
    k = int(torch.randint(1, 81, (), generator=gen))
    lo, hi = MAGNITUDES[dtype][int(torch.randint(0, 3, (), generator=gen))]
    log_lo = lo + (hi - lo) * float(torch.rand((), generator=gen)) - 1.5
    span = 3 * float(torch.rand((), generator=gen))
    codebook = torch.logspace(log_lo, log_lo + span, 27, dtype=torch.float64).to(product_dtype)
    g = fmt.num_groups(k)
    idx = torch.randint(0, 27, (n, g), generator=gen)
    levels = torch.randint(-lmax, lmax + 1, (n, g * 16), generator=gen)
    if int(torch.randint(0, 3, (), generator=gen)) == 0:  # sparse levels: many alternatives
        levels = levels * (torch.rand(n, g * 16, generator=gen) < 0.2)
    scale = codebook[idx].repeat_interleave(16, dim=1)
    return (scale * levels.to(product_dtype))[:, :k].to(dtype)


def assert_adopts_exactly(w, depth):
    tw, report = adopt_with_report(w, depth)
    assert torch.equal(bits(codec.dequantize(tw, w.dtype)), bits(w))
    assert report.exact_groups == report.groups == w.shape[0] * fmt.num_groups(w.shape[1])
    assert report.requantized_groups == 0
    assert report.codebook_size == tw.codebook.numel() <= 27
    return tw


# --- bit-exact round trips of many random matrices -----------------------------------------------

@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_quantized_matrices_adopt_exactly(depth, dtype):
    """quantize -> dequantize -> adopt -> dequantize is bit-exact (150 matrices per case)."""
    gen = torch.Generator().manual_seed(depth * 10 + HALF_DTYPES.index(dtype))
    done = 0
    while done < 150:
        w = codec.dequantize(codec.quantize(random_weight(gen, dtype), depth), dtype)
        if not bool(w.isfinite().all()):  # snapping a huge scale up overflowed: not a weight
            continue
        assert_adopts_exactly(w, depth)
        done += 1


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("product_dtype", (torch.float64, torch.float32))
def test_publisher_matrices_adopt_exactly(depth, dtype, product_dtype):
    """Another codec's output, multiplied in float64 or float32 (40 matrices per case)."""
    gen = torch.Generator().manual_seed(100 + depth * 10 + HALF_DTYPES.index(dtype))
    done = 0
    while done < 40:
        w = publisher_weight(gen, depth, dtype, product_dtype)
        if not bool(w.isfinite().all()):
            continue
        assert_adopts_exactly(w, depth)
        done += 1


@pytest.mark.parametrize("depth", DEPTHS)
def test_float32_outputs_adopt_exactly(depth):
    """A float32 dequantized weight adopts exactly when its products were float32 (ours)."""
    gen = torch.Generator().manual_seed(200 + depth)
    for _ in range(25):
        w = codec.dequantize(codec.quantize(random_weight(gen, torch.float32), depth),
                             torch.float32)
        assert_adopts_exactly(w, depth)
        assert_adopts_exactly(publisher_weight(gen, depth, torch.float32, torch.float32), depth)


def test_chunked_search_agrees(monkeypatch):
    """Matrices spread over many chunks of the search give the same (exact) result."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(24, 300, generator=gen) * torch.logspace(-3, 0, 24).unsqueeze(1)
    for depth, dtype in ((2, torch.float16), (4, torch.bfloat16)):
        q = codec.quantize(w, depth).dequantize(dtype)
        whole = assert_adopts_exactly(q, depth)
        with monkeypatch.context() as patch:
            patch.setattr(adopt_module, "_CHUNK_ELEMENTS", 16 * 40 * 7)
            patch.setattr(adopt_module, "_CHUNK_GROUPS", 5)
            chunked = assert_adopts_exactly(q, depth)
        assert torch.equal(chunked.packed, whole.packed)
        assert torch.equal(chunked.codebook, whole.codebook)


def test_subnormal_group_needs_the_exhaustive_search():
    """A float16 group whose scale is near the subnormal spacing: rounding moved some weights by
    a large part of a level, so the quick search (levels from max|w| / m) finds nothing."""
    scale = torch.tensor(1.1453384160995483 * 2.0 ** -24)
    levels = torch.tensor([0, 2, 0, 1, 2, 4, -4, 3, 1, -1, -1, 1, 4, 0, 2, 2])
    w = (scale * levels).to(torch.float16).reshape(1, 16)
    a, b, constrained = adopt_module._weight_bounds(w)
    rows, _, _, survived = adopt_module._fast_alternatives(
        w.abs().float(), a, b, constrained, fmt.max_level(2), 2.0 ** -11, 2.0 ** -25)
    assert rows.numel() == 0 and bool(survived.all())
    assert_adopts_exactly(w, 2)


def test_signed_zeros():
    """-0.0 comes only from a negative level whose product underflows; +0.0 is level 0."""
    w = torch.tensor([[-0.0, 0.0] * 8, [0.0] * 16], dtype=torch.float16)
    tw = assert_adopts_exactly(w, 2)
    levels, _ = fmt.unpack(tw.packed, 2, 16)
    assert levels[0, 0] < 0 and levels[0, 1] == 0 and bool((levels[1] == 0).all())
    assert_adopts_exactly(torch.zeros(3, 20, dtype=torch.bfloat16), 3)
    mixed = torch.tensor([[-0.0] + [1.0] * 15], dtype=torch.float16)
    with pytest.raises(NonConformingWeightError, match="1 of 1 groups"):
        adopt(mixed, 2)


def test_all_zero_matrix():
    tw = assert_adopts_exactly(torch.zeros(4, 33, dtype=torch.float16), 2)
    assert tw.codebook.tolist() == [0.0]


# --- product intervals ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_product_bounds_are_exact(dtype):
    """[A, B] are the real products that round (via float32) to each value: A and B do, and
    products 2^-30 (relative) outside do not. Every finite 16-bit value; a float32 sample."""
    if dtype == torch.float32:
        gen = torch.Generator().manual_seed(1)
        raw = torch.randint(0, 0x7F800000, (1 << 16,), generator=gen, dtype=torch.int32)
        values = torch.cat([raw, torch.tensor([0, 1, 2, 0x7F7FFFFF], dtype=torch.int32)])
        values = values.view(torch.float32)
    else:
        values = torch.arange(1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        values = values[values.isfinite()]
    a, b = adopt_module._product_bounds(values)

    def rounds_to(x):  # the real x (float64) through our arithmetic: float32, then dtype
        return bits(x.to(torch.float32).to(dtype)) == bits(values)

    assert bool(rounds_to(a).all()) and bool(rounds_to(b).all())
    positive = a > 0
    assert not bool(rounds_to(a * (1 - 2.0 ** -30))[positive].any())
    assert not bool(rounds_to(b * (1 + 2.0 ** -30)).any())


# --- non-conforming weights ---------------------------------------------------------------------

def test_random_matrix_is_rejected_and_requantized_like_quantize():
    gen = torch.Generator().manual_seed(11)
    w = (torch.randn(6, 64, generator=gen) * 0.02).to(torch.float16)
    with pytest.raises(NonConformingWeightError, match="w: 24 of 24 groups") as info:
        adopt(w, 2)
    assert isinstance(info.value, ValueError)
    assert (info.value.failed, info.value.groups, info.value.no_levels) == (24, 24, 24)
    with pytest.raises(NonConformingWeightError, match="layers.3.q_proj: 24 of 24"):
        adopt_with_report(w, 2, name="layers.3.q_proj")
    tw, report = adopt_with_report(w, 2, strict=False)
    assert report == AdoptReport(groups=24, exact_groups=0, requantized_groups=24,
                                 codebook_size=27)
    reference = codec.quantize(w, 2)  # no exact group: the quantizer's rule on every group
    assert torch.equal(tw.packed, reference.packed)
    assert torch.equal(tw.codebook, reference.codebook)
    assert str(report) == "0/24 groups exact, 24 requantized, codebook of 27 scales"


@pytest.mark.parametrize("depth", DEPTHS)
def test_damaged_groups_are_counted_and_repaired(depth):
    gen = torch.Generator().manual_seed(12 + depth)
    w = codec.quantize(torch.randn(8, 96, generator=gen), depth).dequantize(torch.float16)
    damaged = w.clone()
    rows = torch.tensor([0, 3, 3, 7])
    cols = torch.tensor([5, 17, 90, 40])  # groups (0,0), (3,1), (3,5), (7,2)
    damaged[rows, cols] = (damaged[rows, cols].float() * 1.37 + 0.011).to(torch.float16)
    with pytest.raises(NonConformingWeightError, match="w: 4 of 48 groups"):
        adopt(damaged, depth)
    tw, report = adopt_with_report(damaged, depth, strict=False)
    assert (report.groups, report.exact_groups, report.requantized_groups) == (48, 44, 4)
    out = tw.dequantize(torch.float16)
    bad_group = torch.zeros(8, 6, dtype=torch.bool)
    bad_group[rows, cols // 16] = True
    exact = ~bad_group.repeat_interleave(16, dim=1)
    assert torch.equal(bits(out)[exact], bits(damaged)[exact])
    # The repaired groups are requantized, not copied: close, within their group's range.
    err = (out.float() - damaged.float()).abs()[~exact]
    assert float(err.max()) <= 0.5 * float(damaged.float().abs().max())


def test_more_than_27_scales():
    gen = torch.Generator().manual_seed(13)
    top = codec.quantize(torch.randn(8, 64, generator=gen), 2).dequantize(torch.float16)
    bottom = codec.quantize(torch.randn(8, 64, generator=gen) * 3, 2).dequantize(torch.float16)
    w = torch.cat([top, bottom])
    with pytest.raises(NonConformingWeightError, match="need a scale beyond the 27") as info:
        adopt(w, 2)
    assert info.value.no_scale == info.value.failed > 0 and info.value.no_levels == 0
    tw, report = adopt_with_report(w, 2, strict=False)
    assert report.requantized_groups == info.value.failed
    assert report.codebook_size == 27 and report.exact_groups == 64 - info.value.failed
    same = (bits(tw.dequantize(torch.float16)) == bits(w)).reshape(16, 4, 16).all(-1)
    assert int(same.sum()) >= report.exact_groups


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        adopt(torch.tensor([[1.0, float("nan")]], dtype=torch.float16))
    with pytest.raises(ValueError, match="2 NaN or infinite"):
        adopt(torch.tensor([[float("inf"), -float("inf")]], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        adopt(torch.ones(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        adopt(torch.ones(16, dtype=torch.float16))
    with pytest.raises(ValueError, match="group_size must be 16"):
        adopt(torch.ones(2, 16, dtype=torch.float16), group_size=8)
    with pytest.raises(ValueError, match="depth"):
        adopt(torch.ones(2, 16, dtype=torch.float16), depth=0)


def test_non_contiguous_input():
    w = codec.quantize(torch.randn(40, 70), 3).dequantize(torch.float16)
    for view in (torch.cat([w, w], 1)[:, :70], w.t().contiguous().t()):
        assert not view.is_contiguous()
        assert torch.equal(adopt(view, 3).packed, adopt(w, 3).packed)


def test_adopt_returns_the_weight_of_the_report():
    w = codec.quantize(torch.randn(3, 40)).dequantize(torch.bfloat16)
    tw = adopt(w)
    tw2, _ = adopt_with_report(w)
    assert torch.equal(tw.packed, tw2.packed) and torch.equal(tw.codebook, tw2.codebook)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(14)
    for depth in DEPTHS:
        w = codec.quantize(torch.randn(17, 100, generator=gen), depth).dequantize(torch.float16)
        cpu = adopt(w, depth)
        gpu = adopt(w.cuda(), depth)
        assert torch.equal(gpu.packed.cpu(), cpu.packed)
        assert torch.equal(gpu.codebook.cpu(), cpu.codebook)
