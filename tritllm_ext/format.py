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


# Digit i of a byte v < 243 is ((v * M_i) mod 2^16) * 3 >> 16 (csrc/format.h, trit_digit): the
# kernels decode without division, and so does the reference, so that both read even a corrupt
# byte (>= 243) the same way (as digits in {0, 1, 2}).
DIGIT_MAGIC = tuple(-(-65536 // 3 ** (i + 1)) for i in range(TRITS_PER_BYTE))  # 21846 ... 270


def trit_digits(b: torch.Tensor) -> torch.Tensor:
    """Bytes (any integer dtype, any shape) -> their five base-3 digits, int32 [..., 5], by the
    division-free rule of csrc/format.h. Exact for bytes < 243; always in {0, 1, 2}."""
    magic = torch.tensor(DIGIT_MAGIC, dtype=torch.int32, device=b.device)
    return (((b.to(torch.int32).unsqueeze(-1) * magic) & 0xFFFF) * 3) >> 16


# The packer and unpacker work on whole 5-weight blocks at once by moving digits in 8-bit fields
# of one integer: a weight's d plane digits sit in bits 8p.., a byte's five digits in bits 8i...
# No field ever exceeds 242, so sums of such words never carry from one field into the next.

def _plane_spread_table(depth: int, device) -> torch.Tensor:
    """int32 [3^d]: for u = level + L, sum over planes p of digit_p(u) << 8p."""
    u = torch.arange(3 ** depth, dtype=torch.int32, device=device)
    word = torch.zeros_like(u)
    for p in range(depth):
        word += ((u // 3 ** p) % 3) << (8 * p)
    return word


def _byte_digits_table(device) -> torch.Tensor:
    """int64 [256]: for a byte, sum over its digits i of digit_i << 8i."""
    digits = trit_digits(torch.arange(256, device=device)).to(torch.int64)  # [256, 5]
    shifts = torch.arange(0, 8 * TRITS_PER_BYTE, 8, dtype=torch.int64, device=device)
    return (digits << shifts).sum(-1)


def _pack_rows(levels: torch.Tensor, idx: torch.Tensor, depth: int) -> torch.Tensor:
    n, kp = levels.shape
    g = kp // GROUP_SIZE
    u = levels.to(torch.int32).reshape(-1) + max_level(depth)  # digits of u are the plane digits
    spread = _plane_spread_table(depth, levels.device).index_select(0, u).reshape(n, g, GROUP_SIZE)
    blocks = spread[..., :15].reshape(n, g, 3, TRITS_PER_BYTE)
    # words[..., b] holds in field p the byte of plane p for weights 5b..5b+4.
    words = blocks[..., 0] + 3 * blocks[..., 1] + 9 * blocks[..., 2] + 27 * blocks[..., 3] \
        + 81 * blocks[..., 4]
    body = torch.stack([(words >> (8 * p)) & 0xFF for p in range(depth)], dim=2)  # [n, g, d, 3]
    # Tail digits idx0 idx1 idx2 plane0[15] plane1[15] | plane2[15] plane3[15]: the digits of
    # weight 15's u, low planes first, continue the base-3 number after the index.
    u15 = u.reshape(n, g, GROUP_SIZE)[..., 15]
    tail = [idx.to(torch.int32) + 27 * (u15 % 9)]
    if tail_bytes(depth) == 2:
        tail.append(u15 // 9)
    out = torch.cat([body.reshape(n, g, 3 * depth), torch.stack(tail, dim=-1)], dim=-1)
    return out.to(torch.uint8).reshape(n, g * bytes_per_group(depth))


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
    body = grp[..., :3 * depth].reshape(-1).to(torch.int32)
    words = _byte_digits_table(packed.device).index_select(0, body).reshape(n, g, depth, 3)
    # Field i of u_words[..., b] is u = level + L of weight 5b+i: sum_p 3^p digit_p <= 80.
    u_words = words[:, :, 0]
    for p in range(1, depth):
        u_words = u_words + 3 ** p * words[:, :, p]
    shifts = torch.arange(0, 8 * TRITS_PER_BYTE, 8, dtype=torch.int64, device=packed.device)
    u_body = ((u_words.unsqueeze(-1) >> shifts) & 0xFF).reshape(n, g, 15)
    # Tail digits idx0 idx1 idx2 u15_0 u15_1 | u15_2 u15_3 (see _pack_rows).
    tail = trit_digits(grp[..., 3 * depth:]).flatten(-2)  # [n, g, 5 * tail bytes]
    idx = tail[..., 0] + 3 * tail[..., 1] + 9 * tail[..., 2]
    u15 = sum(3 ** p * tail[..., INDEX_TRITS + p] for p in range(depth))
    levels = torch.cat([u_body, u15.unsqueeze(-1).to(torch.int64)], dim=-1) - max_level(depth)
    return levels.reshape(n, g * GROUP_SIZE).to(torch.int8), idx.to(torch.uint8)


def unpack(packed: torch.Tensor, depth: int, in_features: int):
    """Packed uint8 [N, G*B(d)] -> (levels int8 [N, K], idx uint8 [N, G]). The reference decoder:
    it does not validate (call `validate` first), and returns exactly what `pack` was given.
    Unvalidated bytes still decode to levels in [-L, L] and indices in [0, 27): every digit is
    read with the division-free rule, which keeps it in {0, 1, 2}."""
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
    # One cheap pass (the largest value of each byte position) decides; the counts for the
    # message are computed only when something is wrong.
    if bool((grp.amax(dim=(0, 1)).to(torch.int16) >= bound).any()):
        bad = grp.to(torch.int16) >= bound
        first = int(bad.reshape(-1).nonzero()[0])
        r, col = divmod(first, packed.shape[1])
        raise ValueError(f"{name}: {int(bad.sum())} corrupt packed byte(s) (a byte at or above "
                         f"its bound, e.g. >= 243); first at row {r}, byte {col} "
                         f"(value {int(packed[r, col])})")
    if c < MAX_CODEBOOK:
        idx = grp[..., 3 * depth] % 27
        if int(idx.max()) >= c:
            raise ValueError(f"{name}: {int((idx >= c).sum())} group(s) use a scale index >= the "
                             f"codebook size {c} (largest index {int(idx.max())})")
    pad = num_groups(in_features) * GROUP_SIZE - in_features
    if pad:
        last, _ = _unpack_rows(grp[:, -1:, :].reshape(n, bpg), depth)
        if bool((last[:, GROUP_SIZE - pad:] != 0).any()):
            raise ValueError(f"{name}: the {pad} padding weight(s) past in_features={in_features} "
                             "must be 0")
