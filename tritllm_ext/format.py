"""The packed trit format, version 1: constants, a reference packer/unpacker and validation.

docs/FORMAT.md is the prose version of this file. Everything here is plain vectorized PyTorch
and works on any device; the C++/CUDA kernels must agree with it byte for byte.

Layout of one group of 16 weights at depth d (B(d) = 3d + ceil((d+3)/5) bytes):
  bytes 3p..3p+2   plane p, weights 0-4, 5-9, 10-14 (digit i of byte b is weight 5b+i)
  tail bytes       digits idx0, idx1, idx2, plane0[15], ..., plane{d-1}[15], five per byte
A digit is trit + 1, five digits make a little-endian base-3 byte.
"""
from __future__ import annotations

import torch

FORMAT_VERSION = 1
GROUP_SIZE = 16
MAX_CODEBOOK = 27
DEPTHS = (1, 2, 3, 4)
TRITS_PER_BYTE = 5
INDEX_TRITS = 3

# Row chunk for the reference packer: bounds the temporaries to a few hundred MB.
_CHUNK_WEIGHTS = 1 << 22


def check_depth(depth: int) -> int:
    if not isinstance(depth, int) or isinstance(depth, bool) or depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}")
    return depth


def max_level(depth: int) -> int:
    """L = (3^d - 1) / 2: levels run from -L to L."""
    return (3 ** check_depth(depth) - 1) // 2


def tail_trits(depth: int) -> int:
    return INDEX_TRITS + depth


def tail_bytes(depth: int) -> int:
    return -(-tail_trits(depth) // TRITS_PER_BYTE)


def bytes_per_group(depth: int) -> int:
    """B(d): 4, 7, 11, 14 bytes for d = 1..4."""
    return 3 * check_depth(depth) + tail_bytes(depth)


def num_groups(in_features: int) -> int:
    return -(-in_features // GROUP_SIZE)


def packed_row_bytes(in_features: int, depth: int) -> int:
    return num_groups(in_features) * bytes_per_group(depth)


def stored_bits_per_weight(depth: int) -> float:
    """Bits per weight of the stored bytes when K is a multiple of 16 (2.0, 3.5, 5.5, 7.0)."""
    return 8.0 * bytes_per_group(depth) / GROUP_SIZE


def byte_bounds(depth: int) -> list[int]:
    """Exclusive upper bound of every byte of a group: 3^(digits the byte holds)."""
    bounds = [243] * (3 * depth)
    left = tail_trits(depth)
    for _ in range(tail_bytes(depth)):
        bounds.append(3 ** min(left, TRITS_PER_BYTE))
        left -= TRITS_PER_BYTE
    return bounds


_POW3 = [1, 3, 9, 27, 81]


def _digits_to_bytes(digits: torch.Tensor) -> torch.Tensor:
    """[..., n*5] digits in {0,1,2} -> [..., n] bytes (little-endian base 3)."""
    d = digits.reshape(*digits.shape[:-1], -1, TRITS_PER_BYTE).to(torch.int32)
    w = torch.tensor(_POW3, dtype=torch.int32, device=digits.device)
    return (d * w).sum(-1).to(torch.uint8)


def _bytes_to_digits(b: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., n*5] digits (int16). Bytes >= 243 give meaningless digits."""
    w = torch.tensor(_POW3, dtype=torch.int16, device=b.device)
    d = (b.to(torch.int16).unsqueeze(-1) // w) % 3
    return d.reshape(*b.shape[:-1], -1)


def _pack_rows(levels: torch.Tensor, idx: torch.Tensor, depth: int) -> torch.Tensor:
    n, kp = levels.shape
    g = kp // GROUP_SIZE
    lv = levels.to(torch.int32).reshape(n, g, GROUP_SIZE) + max_level(depth)
    # planes[..., p, j] = digit of weight j in plane p
    planes = torch.stack([(lv // 3 ** p) % 3 for p in range(depth)], dim=2)  # [n, g, d, 16]
    body = _digits_to_bytes(planes[..., :15]).reshape(n, g, 3 * depth)
    i = idx.to(torch.int32).reshape(n, g)
    idx_digits = torch.stack([(i // 3 ** t) % 3 for t in range(INDEX_TRITS)], dim=-1)
    tail = torch.cat([idx_digits, planes[..., 15]], dim=-1)  # [n, g, 3 + d]
    pad = tail_bytes(depth) * TRITS_PER_BYTE - tail.shape[-1]
    tail = torch.nn.functional.pad(tail, (0, pad))
    tail = _digits_to_bytes(tail)
    return torch.cat([body, tail], dim=-1).reshape(n, g * bytes_per_group(depth))


def pack(levels: torch.Tensor, idx: torch.Tensor, depth: int) -> torch.Tensor:
    """Integer levels [N, K] in [-L, L] and scale indices [N, ceil(K/16)] in [0, 27) -> packed
    uint8 [N, G*B(d)]. K need not be a multiple of 16 (the last group is padded with zeros)."""
    check_depth(depth)
    if levels.dim() != 2:
        raise ValueError(f"levels must be 2-D [N, K], got shape {tuple(levels.shape)}")
    n, k = levels.shape
    g = num_groups(k)
    if tuple(idx.shape) != (n, g):
        raise ValueError(f"idx must have shape {(n, g)} for levels of shape {(n, k)}, "
                         f"got {tuple(idx.shape)}")
    lmax = max_level(depth)
    if levels.numel() and int(levels.abs().max()) > lmax:
        raise ValueError(f"levels must lie in [-{lmax}, {lmax}] at depth {depth}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= MAX_CODEBOOK):
        raise ValueError(f"idx must lie in [0, {MAX_CODEBOOK})")
    if k != g * GROUP_SIZE:
        levels = torch.nn.functional.pad(levels, (0, g * GROUP_SIZE - k))
    out = torch.empty(n, g * bytes_per_group(depth), dtype=torch.uint8, device=levels.device)
    step = max(1, _CHUNK_WEIGHTS // max(1, g * GROUP_SIZE))
    for r in range(0, n, step):
        out[r:r + step] = _pack_rows(levels[r:r + step], idx[r:r + step], depth)
    return out


def _unpack_rows(packed: torch.Tensor, depth: int):
    n = packed.shape[0]
    bpg = bytes_per_group(depth)
    grp = packed.reshape(n, -1, bpg)
    g = grp.shape[1]
    body = _bytes_to_digits(grp[..., :3 * depth]).reshape(n, g, depth, 15)
    tail = _bytes_to_digits(grp[..., 3 * depth:])
    planes = torch.cat([body, tail[..., INDEX_TRITS:INDEX_TRITS + depth].unsqueeze(-1)], -1)
    pow3 = torch.tensor([3 ** p for p in range(depth)], dtype=torch.int16, device=packed.device)
    levels = (planes * pow3.view(depth, 1)).sum(2) - max_level(depth)  # [n, g, 16]
    idx = tail[..., 0] + 3 * tail[..., 1] + 9 * tail[..., 2]
    return levels.reshape(n, g * GROUP_SIZE).to(torch.int8), idx.to(torch.uint8)


def unpack(packed: torch.Tensor, depth: int, in_features: int):
    """Packed uint8 [N, G*B(d)] -> (levels int8 [N, K], idx uint8 [N, G]). The reference decoder:
    it does not validate (call `validate` first), and returns exactly what `pack` was given."""
    check_depth(depth)
    g = num_groups(in_features)
    n = packed.shape[0]
    levels = torch.empty(n, g * GROUP_SIZE, dtype=torch.int8, device=packed.device)
    idx = torch.empty(n, g, dtype=torch.uint8, device=packed.device)
    step = max(1, _CHUNK_WEIGHTS // max(1, g * GROUP_SIZE))
    for r in range(0, n, step):
        levels[r:r + step], idx[r:r + step] = _unpack_rows(packed[r:r + step], depth)
    return levels[:, :in_features], idx


def validate(packed: torch.Tensor, codebook: torch.Tensor, depth: int, in_features: int,
             name: str = "weight") -> None:
    """Raise ValueError, naming `name`, unless (packed, codebook) is a well-formed version-1
    matrix of `in_features` columns at `depth`."""
    if not isinstance(packed, torch.Tensor) or not isinstance(codebook, torch.Tensor):
        raise TypeError(f"{name}: packed and codebook must be tensors")
    try:
        check_depth(depth)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"{name}: in_features must be a positive int, got {in_features!r}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"{name}: packed bytes must be torch.uint8, got {packed.dtype}")
    row = packed_row_bytes(in_features, depth)
    if packed.dim() != 2 or packed.shape[1] != row:
        raise ValueError(f"{name}: packed bytes must have shape [N, {row}] for in_features="
                         f"{in_features} at depth {depth}, got {tuple(packed.shape)}")
    if codebook.dtype != torch.float32 or codebook.dim() != 1:
        raise ValueError(f"{name}: codebook must be a 1-D float32 tensor, got "
                         f"{codebook.dtype} of shape {tuple(codebook.shape)}")
    c = codebook.numel()
    if not 1 <= c <= MAX_CODEBOOK:
        raise ValueError(f"{name}: codebook must have 1 to {MAX_CODEBOOK} entries, got {c}")
    if not bool(torch.isfinite(codebook).all()):
        raise ValueError(f"{name}: codebook holds NaN or infinite scales: {codebook.tolist()}")
    if packed.numel() == 0:
        return
    n = packed.shape[0]
    bpg = bytes_per_group(depth)
    grp = packed.reshape(n, -1, bpg)
    bound = torch.tensor(byte_bounds(depth), dtype=torch.int16, device=packed.device)
    bad = grp.to(torch.int16) >= bound
    nbad = int(bad.sum())
    if nbad:
        first = int(bad.reshape(-1).nonzero()[0])
        r, col = divmod(first, packed.shape[1])
        raise ValueError(f"{name}: {nbad} corrupt packed byte(s) (a byte at or above its bound, "
                         f"e.g. >= 243); first at row {r}, byte {col} (value {int(packed[r, col])})")
    tail0 = grp[..., 3 * depth].to(torch.int16)
    idx = tail0 % 27
    nidx = int((idx >= c).sum())
    if nidx:
        raise ValueError(f"{name}: {nidx} group(s) use a scale index >= the codebook size {c} "
                         f"(largest index {int(idx.max())})")
    pad = num_groups(in_features) * GROUP_SIZE - in_features
    if pad:
        last, _ = _unpack_rows(grp[:, -1:, :].reshape(n, bpg), depth)
        if bool((last[:, GROUP_SIZE - pad:] != 0).any()):
            raise ValueError(f"{name}: the {pad} padding weight(s) past in_features={in_features} "
                             "must be 0")
