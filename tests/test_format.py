"""The packed format v1 (docs/FORMAT.md) against a plain-Python reading of the spec."""
import pytest
import torch

from tritllm_ext import format as fmt

DEPTHS = (1, 2, 3, 4)


def spec_pack_group(levels, idx, depth):
    """One group of 16 levels + its scale index -> bytes, written from docs/FORMAT.md alone."""
    lmax = (3 ** depth - 1) // 2
    digits = [[((lv + lmax) // 3 ** p) % 3 for lv in levels] for p in range(depth)]  # [plane][j]
    out = []
    for p in range(depth):
        for b in range(3):
            out.append(sum(digits[p][5 * b + i] * 3 ** i for i in range(5)))
    tail = [idx % 3, idx // 3 % 3, idx // 9 % 3] + [digits[p][15] for p in range(depth)]
    tail += [0] * (-len(tail) % 5)
    for t in range(0, len(tail), 5):
        out.append(sum(tail[t + i] * 3 ** i for i in range(5)))
    return out


def spec_pack(levels, idx, depth):
    n, k = levels.shape
    g = -(-k // 16)
    rows = []
    for r in range(n):
        row = []
        for gi in range(g):
            lv = levels[r, 16 * gi:16 * gi + 16].tolist()
            row += spec_pack_group(lv + [0] * (16 - len(lv)), int(idx[r, gi]), depth)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.uint8)


def random_matrix(n, k, depth, gen):
    lmax = fmt.max_level(depth)
    levels = torch.randint(-lmax, lmax + 1, (n, k), generator=gen, dtype=torch.int8)
    idx = torch.randint(0, 27, (n, fmt.num_groups(k)), generator=gen, dtype=torch.uint8)
    return levels, idx


# --- digits -----------------------------------------------------------------------------------

def test_digit_magic_constants():
    assert fmt.DIGIT_MAGIC == (21846, 7282, 2428, 810, 270)
    assert all(m == -(-2 ** 16 // 3 ** (i + 1)) for i, m in enumerate(fmt.DIGIT_MAGIC))


def test_digit_magic_exhaustive():
    """csrc/format.h trit_digit: exact for all 243 valid bytes, in {0, 1, 2} for all 256."""
    for v in range(256):
        magic = [((v * m) & 0xFFFF) * 3 >> 16 for m in fmt.DIGIT_MAGIC]
        assert all(d in (0, 1, 2) for d in magic), v
        if v < 243:
            assert magic == [v // 3 ** i % 3 for i in range(5)], v
        else:  # a corrupt byte reads as v - 243 (so its index digits agree with v mod 27)
            assert magic == [(v - 243) // 3 ** i % 3 for i in range(5)], v
    torch_digits = fmt.trit_digits(torch.arange(256, dtype=torch.uint8))
    expected = [[((v * m) & 0xFFFF) * 3 >> 16 for m in fmt.DIGIT_MAGIC] for v in range(256)]
    assert torch_digits.tolist() == expected


# --- sizes ------------------------------------------------------------------------------------

def test_sizes_and_bounds():
    assert [fmt.bytes_per_group(d) for d in DEPTHS] == [4, 7, 11, 14]
    assert [fmt.max_level(d) for d in DEPTHS] == [1, 4, 13, 40]
    assert [fmt.stored_bits_per_weight(d) for d in DEPTHS] == [2.0, 3.5, 5.5, 7.0]
    assert fmt.byte_bounds(1) == [243] * 3 + [81]
    assert fmt.byte_bounds(2) == [243] * 6 + [243]
    assert fmt.byte_bounds(3) == [243] * 9 + [243, 3]
    assert fmt.byte_bounds(4) == [243] * 12 + [243, 9]
    for d in DEPTHS:
        assert fmt.bytes_per_group(d) == -(-(16 * d + 3) // 5)  # the minimum at 5 trits/byte
    assert fmt.packed_row_bytes(33, 2) == 3 * 7


@pytest.mark.parametrize("bad", [0, 5, 2.0, True, "2"])
def test_bad_depth(bad):
    with pytest.raises(ValueError, match="depth"):
        fmt.check_depth(bad)


# --- pack / unpack ----------------------------------------------------------------------------

@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 16), (3, 15), (5, 17), (2, 33), (7, 100),
                                   (4, 256), (3, 255)])
def test_pack_matches_spec_and_round_trips(depth, shape):
    gen = torch.Generator().manual_seed(depth * 1000 + shape[0] * 37 + shape[1])
    levels, idx = random_matrix(*shape, depth, gen)
    packed = fmt.pack(levels, idx, depth)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (shape[0], fmt.packed_row_bytes(shape[1], depth))
    assert torch.equal(packed, spec_pack(levels, idx, depth))
    back, back_idx = fmt.unpack(packed, depth, shape[1])
    assert back.dtype == torch.int8 and back_idx.dtype == torch.uint8
    assert torch.equal(back, levels) and torch.equal(back_idx, idx)
    fmt.validate(packed, torch.ones(27), depth, shape[1])


@pytest.mark.parametrize("depth", DEPTHS)
def test_pack_extremes(depth):
    """Every level and index value, including both ends, in one matrix."""
    lmax = fmt.max_level(depth)
    levels = torch.arange(-lmax, lmax + 1, dtype=torch.int8).repeat(27, 1)
    idx = torch.arange(27, dtype=torch.uint8).unsqueeze(1).expand(27, fmt.num_groups(2 * lmax + 1))
    packed = fmt.pack(levels, idx.contiguous(), depth)
    assert torch.equal(packed, spec_pack(levels, idx, depth))
    back, back_idx = fmt.unpack(packed, depth, 2 * lmax + 1)
    assert torch.equal(back, levels) and torch.equal(back_idx, idx)


def test_pack_chunking_matches_spec(monkeypatch):
    """Rows split across several chunks give the same bytes."""
    monkeypatch.setattr(fmt, "_CHUNK_WEIGHTS", 64)
    gen = torch.Generator().manual_seed(5)
    levels, idx = random_matrix(9, 40, 3, gen)
    packed = fmt.pack(levels, idx, 3)
    assert torch.equal(packed, spec_pack(levels, idx, 3))
    assert torch.equal(fmt.unpack(packed, 3, 40)[0], levels)


@pytest.mark.parametrize("depth", DEPTHS)
def test_unpack_of_any_bytes_stays_in_range(depth):
    """Unvalidated (corrupt) bytes decode to valid levels and indices, never out of range."""
    gen = torch.Generator().manual_seed(depth)
    packed = torch.randint(0, 256, (64, 5 * fmt.bytes_per_group(depth)), generator=gen,
                           dtype=torch.uint8)
    levels, idx = fmt.unpack(packed, depth, 80)
    lmax = fmt.max_level(depth)
    assert int(levels.abs().max()) <= lmax and int(idx.max()) < 27


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="levels must lie"):
        fmt.pack(torch.full((1, 16), 5, dtype=torch.int8), torch.zeros(1, 1, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="idx must lie"):
        fmt.pack(torch.zeros(1, 16, dtype=torch.int8), torch.full((1, 1), 27), 2)
    with pytest.raises(ValueError, match="idx must have shape"):
        fmt.pack(torch.zeros(1, 17, dtype=torch.int8), torch.zeros(1, 1, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="2-D"):
        fmt.pack(torch.zeros(16, dtype=torch.int8), torch.zeros(1, dtype=torch.uint8), 2)


# --- validate ---------------------------------------------------------------------------------

def good(depth=2, n=3, k=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    levels, idx = random_matrix(n, k, depth, gen)
    return fmt.pack(levels, idx, depth), torch.linspace(0.1, 1.0, 27)


def test_validate_accepts_good_data():
    for d in DEPTHS:
        packed, cb = good(d)
        fmt.validate(packed, cb, d, 40)


def test_validate_wrong_dtype_and_shape():
    packed, cb = good()
    with pytest.raises(ValueError, match="layer0: packed bytes must be torch.uint8"):
        fmt.validate(packed.to(torch.int16), cb, 2, 40, name="layer0")
    with pytest.raises(ValueError, match="must have shape"):
        fmt.validate(packed[:, :-1], cb, 2, 40)
    with pytest.raises(ValueError, match="must have shape"):
        fmt.validate(packed.reshape(-1), cb, 2, 40)
    with pytest.raises(ValueError, match="must have shape"):
        fmt.validate(packed, cb, 2, 41 + 16)
    with pytest.raises(ValueError, match="codebook must be a 1-D float32"):
        fmt.validate(packed, cb.double(), 2, 40)
    with pytest.raises(ValueError, match="codebook must be a 1-D float32"):
        fmt.validate(packed, cb.reshape(1, -1), 2, 40)
    with pytest.raises(ValueError, match="depth"):
        fmt.validate(packed, cb, 5, 40)
    with pytest.raises(ValueError, match="in_features"):
        fmt.validate(packed, cb, 2, 0)
    with pytest.raises(TypeError):
        fmt.validate(packed.numpy(), cb, 2, 40)


@pytest.mark.parametrize("depth", DEPTHS)
def test_validate_rejects_corrupt_plane_byte(depth):
    for value in (243, 250, 255):
        packed, cb = good(depth)
        packed[1, fmt.bytes_per_group(depth) + 2] = value  # a plane byte of group 1, row 1
        with pytest.raises(ValueError, match=r"w: 1 corrupt packed byte.*row 1, byte "
                                             rf"{fmt.bytes_per_group(depth) + 2} \(value {value}"):
            fmt.validate(packed, cb, depth, 40, name="w")


@pytest.mark.parametrize("depth,offset,value", [(1, 3, 81), (1, 3, 200), (2, 6, 243), (3, 10, 3),
                                                (3, 9, 243), (4, 13, 9), (4, 13, 100)])
def test_validate_rejects_corrupt_tail_byte(depth, offset, value):
    packed, cb = good(depth)
    packed[0, offset] = value
    with pytest.raises(ValueError, match="1 corrupt packed byte"):
        fmt.validate(packed, cb, depth, 40)
    packed[0, offset] = fmt.byte_bounds(depth)[offset] - 1  # the largest legal value passes
    fmt.validate(packed, cb, depth, 40)


def test_validate_counts_corrupt_bytes():
    packed, cb = good()
    packed[0, 0] = packed[2, 5] = packed[2, 6] = 255
    with pytest.raises(ValueError, match="3 corrupt packed byte"):
        fmt.validate(packed, cb, 2, 40)


def test_validate_index_beyond_codebook():
    levels = torch.zeros(2, 32, dtype=torch.int8)
    idx = torch.tensor([[0, 4], [5, 1]], dtype=torch.uint8)
    packed = fmt.pack(levels, idx, 2)
    fmt.validate(packed, torch.ones(6), 2, 32)
    with pytest.raises(ValueError, match="1 group.*scale index >= the codebook size 5"):
        fmt.validate(packed, torch.ones(5), 2, 32)


def test_validate_bad_codebook():
    packed, _ = good()
    for cb, msg in ((torch.tensor([1.0, float("nan")]), "NaN or infinite"),
                    (torch.tensor([float("inf")] * 27), "NaN or infinite"),
                    (torch.tensor([-float("inf")]), "NaN or infinite"),
                    (torch.ones(0), "1 to 27 entries"),
                    (torch.ones(28), "1 to 27 entries")):
        with pytest.raises(ValueError, match=msg):
            fmt.validate(packed, cb, 2, 40)


def test_validate_padding_must_be_zero():
    levels = torch.zeros(2, 32, dtype=torch.int8)
    levels[1, 25] = 1  # a padding weight once in_features is 20
    packed = fmt.pack(levels, torch.zeros(2, 2, dtype=torch.uint8), 2)
    fmt.validate(packed, torch.ones(1), 2, 32)
    fmt.validate(packed, torch.ones(1), 2, 26)
    with pytest.raises(ValueError, match="the 12 padding weight.*in_features=20 must be 0"):
        fmt.validate(packed, torch.ones(1), 2, 20)


def test_validate_empty_rows():
    fmt.validate(torch.zeros(0, 7, dtype=torch.uint8), torch.ones(1), 2, 16)
