"""TritWeight, quantize and dequantize (tritllm_ext/codec.py) against plain references."""
import dataclasses
import json
import math

import pytest
import torch

from tritllm_ext import codec
from tritllm_ext import format as fmt
from tritllm_ext.codec import TritWeight, dequantize, load_trit_weight, quantize, save_trit_weight

DEPTHS = (1, 2, 3, 4)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- a plain reference of the paper's quantizer -----------------------------------------------

def reference_group_scales(weights, lmax):
    """The candidate scales of one group of k <= 16 real weights (float32 tensor) whose float64
    squared error is within 1e-6 of the best: the quantizer must pick one of them (it works in
    float32, so near ties may go either way; exact ties go to the earliest candidate)."""
    mags = weights.abs().sort().values  # ascending
    k = mags.numel()
    cands = []
    for pos in (10, 12, 14, 15):  # gs-6, gs-4, gs-2, gs-1 of a full group; shifted for k < 16
        s = mags[max(pos - (16 - k), 0)] / lmax
        cands.append(s if s > 0 else mags[-1] / lmax)
    if cands[-1] == 0:
        return {0.0}
    errors = []
    for s in cands:
        q = torch.clamp(torch.round(weights / s), -lmax, lmax)
        errors.append(float(((weights.double() - s.double() * q.double()) ** 2).sum()))
    best = min(errors)
    return {float(s) for s, e in zip(cands, errors) if e <= best * (1 + 1e-6)}


def reference_codebook(scales):
    """27 log-spaced float32 entries between the smallest and largest positive scale."""
    pos = scales[scales > 0]
    if pos.numel() == 0:
        return torch.tensor([0.0])
    if pos.min() == pos.max():
        return pos.min().reshape(1)
    lo, hi = math.log(float(pos.min())), math.log(float(pos.max()))
    codebook = torch.tensor([math.exp(lo + i / 26 * (hi - lo)) for i in range(27)]).float()
    codebook[0], codebook[-1] = pos.min(), pos.max()
    return codebook


def nearest_in_log(scales, codebook):
    """Brute force: index of the entry nearest in log scale, ties to the smaller entry."""
    if codebook.numel() == 1:
        return torch.zeros_like(scales, dtype=torch.int64)
    ls = scales.double().clamp(min=1e-300).log().unsqueeze(-1)
    dist = (ls - codebook.double().log()).abs()
    return dist.argmin(-1)  # the first minimum: the smaller entry


def random_weight(n, k, gen, kind="normal", dtype=torch.float32):
    w = torch.randn(n, k, generator=gen)
    if kind == "heavy":
        w = w / torch.rand(n, k, generator=gen).clamp(min=1e-3)
    elif kind == "sparse":
        w = w * (torch.rand(n, k, generator=gen) < 0.2)
    elif kind == "rows":
        w = w * torch.logspace(-3, 1, n).unsqueeze(1)
    return (w * 0.02).to(dtype)


# --- quantize -----------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape,kind", [((4, 64), "normal"), ((3, 37), "heavy"),
                                        ((5, 20), "sparse"), ((6, 48), "rows"), ((1, 5), "normal"),
                                        ((2, 16), "heavy"), ((3, 19), "normal")])
def test_quantize_matches_reference(depth, shape, kind):
    gen = torch.Generator().manual_seed(depth * 100 + shape[1])
    w = random_weight(*shape, gen, kind)
    n, k = shape
    lmax = fmt.max_level(depth)
    # 1. group scales: the MSE-best candidate of each group's real weights
    scales = codec.best_group_scales(codec.as_groups(w), depth, codec.valid_in_last_group(k))
    for r in range(n):
        for g in range(fmt.num_groups(k)):
            allowed = reference_group_scales(w[r, 16 * g:16 * g + 16], lmax)
            assert float(scales[r, g]) in allowed, (r, g)
    # 2. the codebook, 3. nearest entries, 4. levels
    tw = quantize(w, depth)
    assert tw.codebook.dtype == torch.float32
    expected_cb = reference_codebook(scales)
    torch.testing.assert_close(tw.codebook, expected_cb, rtol=1e-6, atol=0)
    assert tw.codebook[0] == expected_cb[0] and tw.codebook[-1] == expected_cb[-1]  # exact ends
    levels, idx = fmt.unpack(tw.packed, depth, k)
    assert torch.equal(idx.long(), nearest_in_log(scales, tw.codebook))
    group_scale = tw.codebook[idx.long()].repeat_interleave(16, 1)[:, :k]
    expected = torch.clamp(torch.round(w.float() / group_scale), -lmax, lmax)
    assert torch.equal(levels.float(), expected)


def test_codebook_is_log_spaced():
    gen = torch.Generator().manual_seed(3)
    tw = quantize(random_weight(32, 160, gen, "rows"), 2)
    cb = tw.codebook.double()
    assert cb.numel() == 27 and bool((cb[1:] >= cb[:-1]).all())
    ratios = cb[1:] / cb[:-1]
    torch.testing.assert_close(ratios, ratios.mean().expand(26), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_input_dtypes_agree(dtype):
    gen = torch.Generator().manual_seed(4)
    w = random_weight(8, 40, gen).to(dtype)
    a, b = quantize(w, 3), quantize(w.float(), 3)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.codebook, b.codebook)
    c = quantize(w.t().contiguous().t(), 3)  # a non-contiguous view of the same values
    assert torch.equal(a.packed, c.packed)


def test_short_last_group_candidates():
    """A last group of k < 16 real weights takes its candidates at positions k-6, k-4, k-2, k-1
    (clamped at 0) of its own sorted magnitudes; padding is stored as level 0."""
    w = torch.tensor([[0.1] * 16 + [9.0, 9.0, 9.0, 9.0, 10.0]])  # last group: k = 5
    scales = codec.best_group_scales(codec.as_groups(w), 2, codec.valid_in_last_group(21))
    assert float(scales[0, 1]) == 2.25  # 9 / L: error 1, where 10 / L would give 4
    padded, _ = fmt.unpack(quantize(w, 2).packed, 2, 32)
    assert bool((padded[:, 21:] == 0).all())


def test_all_zero_matrix():
    for depth in DEPTHS:
        tw = quantize(torch.zeros(3, 21), depth)
        assert tw.codebook.tolist() == [0.0]
        out = tw.dequantize(torch.float16)
        assert bool((out == 0).all()) and not bool(torch.signbit(out).any())


def test_all_groups_same_scale_gives_one_entry():
    w = torch.tensor([0.5, -0.5] * 32).reshape(2, 32)
    tw = quantize(w, 2)
    assert tw.codebook.tolist() == [0.125]  # 0.5 / L
    assert torch.equal(tw.dequantize(torch.float32), w)


def test_single_group_and_zero_groups():
    tw = quantize(torch.tensor([[0.0] * 15 + [3.0]]), 2)  # zero candidates fall back to max / L
    assert tw.codebook.tolist() == [0.75]
    assert tw.dequantize(torch.float32).tolist() == [[0.0] * 15 + [3.0]]
    w = torch.zeros(2, 32)
    w[0, :16] = torch.linspace(-1, 1, 16)
    tw = quantize(w, 2)  # the all-zero groups take index 0 and levels 0
    levels, idx = fmt.unpack(tw.packed, 2, 32)
    assert bool((levels[0, 16:] == 0).all()) and bool((levels[1] == 0).all())
    assert idx[0, 1] == 0 and bool((idx[1] == 0).all())


def test_ternary_levels():
    gen = torch.Generator().manual_seed(6)
    tw = quantize(random_weight(7, 50, gen), 1)
    levels, _ = fmt.unpack(tw.packed, 1, 50)
    assert set(levels.unique().tolist()) <= {-1, 0, 1}
    assert tw.bits_per_weight == pytest.approx((7 * 4 * 4 * 8 + 32 * 27) / (7 * 50))


def test_quantize_error_is_bounded():
    """Inside the clamp range every weight is off by at most half its group's scale."""
    gen = torch.Generator().manual_seed(8)
    w = random_weight(16, 96, gen)
    for depth in DEPTHS:
        tw = quantize(w, depth)
        levels, idx = fmt.unpack(tw.packed, depth, 96)
        s = tw.codebook[idx.long()].repeat_interleave(16, 1)
        inside = levels.abs() < fmt.max_level(depth)
        err = (tw.dequantize(torch.float32) - w).abs()
        assert bool((err[inside] <= s[inside] * 0.5 * (1 + 1e-6)).all())


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1.0, float("nan")]]), "1 NaN or infinite"),
    (torch.tensor([[float("inf"), -float("inf"), 0.0]]), "2 NaN or infinite"),
    (torch.ones(2, 3, dtype=torch.float64), "float16, bfloat16 or float32"),
    (torch.ones(2, 3, dtype=torch.int32), "float16, bfloat16 or float32"),
    (torch.ones(16), "2-D"),
    (torch.ones(0, 16), "non-empty"),
])
def test_quantize_rejects_bad_weights(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize(bad)


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="group_size must be 16"):
        quantize(torch.ones(2, 32), group_size=32)
    with pytest.raises(ValueError, match="depth"):
        quantize(torch.ones(2, 32), depth=5)
    with pytest.raises(TypeError):
        quantize([[1.0]])


# --- dequantize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_dequantize_is_float32_product_rounded_once(dtype, depth):
    gen = torch.Generator().manual_seed(depth)
    tw = quantize(random_weight(9, 45, gen, "heavy"), depth)
    levels, idx = fmt.unpack(tw.packed, depth, 45)
    scale = tw.codebook[idx.long()].repeat_interleave(16, 1)[:, :45]
    exact = scale.double() * levels.double()  # exact: float32 times a small integer
    expected = exact.to(torch.float32).to(dtype)  # the float32 product, then one rounding
    out = dequantize(tw, dtype)
    assert out.dtype == dtype and out.shape == (9, 45)
    assert torch.equal(out, expected)


def test_dequantize_rejects():
    tw = quantize(torch.ones(1, 16))
    with pytest.raises(ValueError, match="dtype"):
        dequantize(tw, torch.float64)
    with pytest.raises(TypeError):
        dequantize(torch.ones(1, 16))


def test_dequantize_chunked_rows(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    tw = quantize(random_weight(11, 70, gen), 2)
    whole = dequantize(tw)
    monkeypatch.setattr(codec, "_CHUNK_WEIGHTS", 100)
    assert torch.equal(dequantize(tw), whole)


# --- TritWeight ---------------------------------------------------------------------------------

def sample(depth=2, n=5, k=40, seed=0):
    return quantize(random_weight(n, k, torch.Generator().manual_seed(seed)), depth)


def test_tritweight_properties():
    tw = sample(2, 6, 64)
    assert (tw.out_features, tw.in_features, tw.shape, tw.depth) == (6, 64, (6, 64), 2)
    assert tw.device == torch.device("cpu")
    assert tw.nbytes == 6 * 4 * 7 + 4 * 27
    assert tw.bits_per_weight == pytest.approx(3.5 + 32 * 27 / (6 * 64))
    assert "shape=(6, 64)" in repr(tw) and "depth=2" in repr(tw)
    moved = tw.to("cpu")
    assert isinstance(moved, TritWeight) and torch.equal(moved.packed, tw.packed)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tw.depth = 3


def test_tritweight_validates():
    tw = sample()
    TritWeight(tw.packed.clone(), tw.codebook.clone(), (5, 40), 2)
    bad = tw.packed.clone()
    bad[2, 3] = 250
    with pytest.raises(ValueError, match="TritWeight: 1 corrupt packed byte"):
        TritWeight(bad, tw.codebook, (5, 40), 2)
    with pytest.raises(ValueError, match="5 rows"):
        TritWeight(tw.packed[:4], tw.codebook, (5, 40), 2)
    with pytest.raises(ValueError, match="shape must be two positive ints"):
        TritWeight(tw.packed, tw.codebook, (5, 40, 1), 2)
    with pytest.raises(ValueError, match="NaN"):
        TritWeight(tw.packed, torch.full((27,), float("nan")), (5, 40), 2)
    with pytest.raises(ValueError, match="scale index >= the codebook size"):
        TritWeight(tw.packed, tw.codebook[:1], (5, 40), 2)
    with pytest.raises(ValueError, match="depth"):
        TritWeight(tw.packed, tw.codebook, (5, 40), 7)
    with pytest.raises(TypeError):
        TritWeight(tw.packed.numpy(), tw.codebook, (5, 40), 2)
    noncontig = torch.cat([tw.packed, tw.packed], 1)[:, :tw.packed.shape[1]]
    assert not noncontig.is_contiguous()
    made = TritWeight(noncontig, tw.codebook, (5, 40), 2)
    assert made.packed.is_contiguous()


def test_to_tensors_and_back():
    tw = sample(3, 4, 33)
    tensors = tw.to_tensors("model.layers.0.mlp.up_proj")
    assert set(tensors) == {"model.layers.0.mlp.up_proj.trit_" + s
                            for s in ("packed", "codebook", "meta")}
    meta = tensors["model.layers.0.mlp.up_proj.trit_meta"]
    assert meta.dtype == torch.int64 and meta.tolist() == [1, 3, 4, 33]
    back = TritWeight.from_tensors(tensors, "model.layers.0.mlp.up_proj")
    assert torch.equal(back.packed, tw.packed) and torch.equal(back.codebook, tw.codebook)
    assert (back.shape, back.depth) == (tw.shape, tw.depth)


def test_from_tensors_errors_name_the_prefix():
    tw = sample()
    good = tw.to_tensors("p")

    def edited(**changes):
        t = dict(good)
        for key, value in changes.items():
            if value is None:
                del t["p." + key]
            else:
                t["p." + key] = value
        return t

    cases = [
        (edited(trit_codebook=None), r"p: missing checkpoint tensor\(s\) \['p.trit_codebook'\]"),
        (edited(trit_meta=torch.tensor([2, 2, 5, 40])), "p: packed format version 2 is not supp"),
        (edited(trit_meta=torch.tensor([1, 2, 5, 40], dtype=torch.int32)), "p: p.trit_meta must"),
        (edited(trit_meta=torch.tensor([1, 2, 5])), "p: p.trit_meta must be int64"),
        (edited(trit_meta=torch.tensor([1, 9, 5, 40])), "p: p.trit_meta gives depth 9"),
        (edited(trit_meta=torch.tensor([1, 2, 6, 40])), r"p: p.trit_packed has shape \(5, 21\)"),
        (edited(trit_meta=torch.tensor([1, 2, 5, 0])), r"p: p.trit_meta gives shape \(5, 0\)"),
        (edited(trit_meta=torch.tensor([1, 3, 5, 40])), "needs"),
        (edited(trit_codebook=torch.ones(27, dtype=torch.float16)), "p: codebook must be"),
        (edited(trit_packed=[1, 2]), "p: p.trit_packed must be a tensor"),
    ]
    corrupt = good["p.trit_packed"].clone()
    corrupt[0, 0] = 255
    cases.append((edited(trit_packed=corrupt), "p: 1 corrupt packed byte"))
    for tensors, match in cases:
        with pytest.raises(ValueError, match=match):
            TritWeight.from_tensors(tensors, "p")


def test_save_and_load(tmp_path):
    tw = sample(4, 3, 50)
    path = tmp_path / "w.safetensors"
    save_trit_weight(tw, path)
    back = load_trit_weight(path)
    assert torch.equal(back.packed, tw.packed) and torch.equal(back.codebook, tw.codebook)
    assert torch.equal(back.dequantize(), tw.dequantize())
    with pytest.raises(ValueError, match="missing checkpoint tensor"):
        load_trit_weight(path, prefix="other")


def test_load_rejects_damaged_files(tmp_path):
    tw = sample(2, 4, 64)
    path = tmp_path / "w.safetensors"
    save_trit_weight(tw, path)
    raw = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors: not a readable safetensors"):
        load_trit_weight(truncated)

    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(raw[:20])
    with pytest.raises(ValueError, match="header_cut.safetensors: not a readable"):
        load_trit_weight(header_cut)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors: not a readable"):
        load_trit_weight(garbage)

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.safetensors: not a readable"):
        load_trit_weight(empty)

    # A corrupt trit byte inside an intact file: caught by validation, naming the file.
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    start = 8 + header_len + header["weight.trit_packed"]["data_offsets"][0]
    damaged = bytearray(raw)
    damaged[start + 3] = 0xF7
    bad_bytes = tmp_path / "bad_bytes.safetensors"
    bad_bytes.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="bad_bytes.safetensors: weight: 1 corrupt packed byte"):
        load_trit_weight(bad_bytes)

    with pytest.raises(ValueError, match="missing.safetensors: not a readable"):
        load_trit_weight(tmp_path / "missing.safetensors")


# --- CUDA -----------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(10)
    w = random_weight(33, 100, gen, "heavy", torch.bfloat16)
    for depth in DEPTHS:
        cpu = quantize(w, depth)
        gpu = quantize(w.cuda(), depth)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.packed.cpu(), cpu.packed)
        assert torch.equal(gpu.codebook.cpu(), cpu.codebook)
        for dtype in DTYPES:
            assert torch.equal(gpu.dequantize(dtype).cpu(), cpu.dequantize(dtype))
        assert torch.equal(cpu.to("cuda").packed.cpu(), cpu.packed)
