"""TritWeight (a validated packed matrix), the paper's uniform post-training quantizer, and the
reference dequantizer.

The quantizer (Entrit's "uniform" codec, see /work/shared/KERNEL-NOTES.md and docs/FORMAT.md):

1. Split every row into groups of 16 consecutive weights (the last group of a row is padded with
   zeros when K % 16 != 0; padding never influences a scale and is stored as level 0).
2. Group scale: of the four candidates  sorted|w|[i] / L  for i = 10, 12, 14, 15 (ascending sort
   of the 16 magnitudes, i.e. gs-6, gs-4, gs-2, gs-1), keep the one with the smallest squared
   error  sum (w - s * clamp(round(w / s), -L, L))^2.  Ties go to the earlier candidate.
3. Per-matrix codebook: 27 float32 scales spaced geometrically from the smallest to the largest
   non-zero group scale (both ends included; the top is the plain max, not a percentile).
4. Every group takes the codebook entry nearest its scale in the log domain (a tie goes to the
   smaller entry), and its weights round (half to even) to the nearest level at that float32
   scale, clamped to [-L, L].

Degenerate cases:
* All group scales equal (this includes a matrix of one group): a 1-entry codebook.
* All-zero matrix: codebook [0.0], every level 0 (dequantizes to +0.0).
* An all-zero group in a non-zero matrix: scale index 0, every level 0.
* A group whose candidate order statistic is 0 (mostly zeros): that candidate is replaced by the
  group's largest magnitude / L, so a group is never given scale 0 unless it is all zero.
* A padded last group of k < 16 real weights uses the order statistics of its k weights, with the
  positions k-6, k-4, k-2, k-1 clamped at 0.
* d = 1 (L = 1) follows the same rule: ternary levels -1, 0, +1.

All of it is vectorized PyTorch on the input's device, in float32, in row chunks so that the
temporaries stay small (and cache-resident on the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import safetensors.torch
import torch

from . import format as fmt

QUANTIZABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEQUANTIZED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Positions (ascending, 0-based) of the candidate magnitudes in a sorted group of 16, and the
# same positions counted from the top, which is what topk returns.
_CANDIDATE_POSITIONS = (10, 12, 14, 15)
_CANDIDATE_FROM_TOP = tuple(fmt.GROUP_SIZE - 1 - i for i in _CANDIDATE_POSITIONS)  # 5, 3, 1, 0
_TOPK = max(_CANDIDATE_FROM_TOP) + 1

# Weights per chunk of rows: about 1 MB of float32, so a chunk's elementwise passes stay in cache.
_CHUNK_WEIGHTS = 1 << 18

# The codebook of a matrix that is zero everywhere.
ZERO_MATRIX_CODEBOOK = (0.0,)


@dataclass(frozen=True, eq=False, repr=False)
class TritWeight:
    """One packed linear weight W [N, K] (docs/FORMAT.md):

    * ``packed``: uint8 [N, G * B(depth)], G = ceil(K / 16), the canonical byte layout;
    * ``codebook``: float32 [C], 1 <= C <= 27, the per-matrix scales;
    * ``shape``: (N, K) = (out_features, in_features);
    * ``depth``: trits per weight, 1 to 4.

    The constructor validates everything (``format.validate``: dtypes, shapes, corrupt bytes,
    scale indices, padding, NaN/inf in the codebook), so a TritWeight always holds a well-formed
    matrix. Both tensors are made contiguous and must be on the same device. (Internal code that
    copies an already validated TritWeight, e.g. ``to``, uses ``_unchecked`` instead.)
    """
    packed: torch.Tensor
    codebook: torch.Tensor
    shape: tuple
    depth: int

    def __post_init__(self):
        shape = _check_shape(self.shape, "TritWeight")
        _check_same_device(self.packed, self.codebook, "TritWeight")
        if self.packed.dim() != 2 or self.packed.shape[0] != shape[0]:
            raise ValueError(f"TritWeight: packed bytes must have {shape[0]} rows (out_features),"
                             f" got shape {tuple(self.packed.shape)}")
        fmt.validate(self.packed, self.codebook, self.depth, shape[1], name="TritWeight")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "packed", self.packed.contiguous())
        object.__setattr__(self, "codebook", self.codebook.contiguous())

    @classmethod
    def _unchecked(cls, packed, codebook, shape, depth) -> TritWeight:
        """Build without validation, for data known to be good: a copy of a validated TritWeight
        (``to``) or tensors that ``from_tensors`` has just validated."""
        tw = object.__new__(cls)
        for field, value in (("packed", packed.contiguous()), ("codebook", codebook.contiguous()),
                             ("shape", (int(shape[0]), int(shape[1]))), ("depth", int(depth))):
            object.__setattr__(tw, field, value)
        return tw

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed trits plus the float32 codebook."""
        return self.packed.numel() + 4 * self.codebook.numel()

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def to(self, device) -> TritWeight:
        return TritWeight._unchecked(self.packed.to(device), self.codebook.to(device),
                                     self.shape, self.depth)

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return dequantize(self, dtype)

    def to_tensors(self, prefix: str) -> dict:
        """The three checkpoint tensors of docs/FORMAT.md "Checkpoints": prefix + ".trit_*"."""
        meta = torch.tensor([fmt.FORMAT_VERSION, self.depth, *self.shape], dtype=torch.int64)
        return {f"{prefix}.trit_packed": self.packed,
                f"{prefix}.trit_codebook": self.codebook,
                f"{prefix}.trit_meta": meta.to(self.device)}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str) -> TritWeight:
        """Inverse of ``to_tensors``: checks that the three keys exist, the format version, that
        the meta agrees with the tensor shapes, then validates the bytes. Errors name `prefix`."""
        keys = {part: f"{prefix}.trit_{part}" for part in ("packed", "codebook", "meta")}
        missing = [k for k in keys.values() if k not in tensors]
        if missing:
            raise ValueError(f"{prefix}: missing checkpoint tensor(s) {missing}")
        packed, codebook, meta = (tensors[keys[p]] for p in ("packed", "codebook", "meta"))
        for part, t in (("packed", packed), ("codebook", codebook), ("meta", meta)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{prefix}: {keys[part]} must be a tensor, got {type(t).__name__}")
        if meta.dtype != torch.int64 or tuple(meta.shape) != (4,):
            raise ValueError(f"{prefix}: {keys['meta']} must be int64 [4] (version, depth, N, K), "
                             f"got {meta.dtype} of shape {tuple(meta.shape)}")
        version, depth, n, k = (int(v) for v in meta.tolist())
        if version != fmt.FORMAT_VERSION:
            raise ValueError(f"{prefix}: packed format version {version} is not supported (this "
                             f"tritllm_ext reads version {fmt.FORMAT_VERSION}); upgrade "
                             "tritllm_ext")
        if depth not in fmt.DEPTHS:
            raise ValueError(f"{prefix}: {keys['meta']} gives depth {depth}, must be one of "
                             f"{fmt.DEPTHS}")
        if n < 1 or k < 1:
            raise ValueError(f"{prefix}: {keys['meta']} gives shape ({n}, {k}); both must be >= 1")
        row = fmt.packed_row_bytes(k, depth)
        if tuple(packed.shape) != (n, row):
            raise ValueError(f"{prefix}: {keys['packed']} has shape {tuple(packed.shape)}, but the "
                             f"meta (depth {depth}, N={n}, K={k}) needs {(n, row)}")
        _check_same_device(packed, codebook, prefix)
        fmt.validate(packed, codebook, depth, k, name=prefix)
        return cls._unchecked(packed, codebook, (n, k), depth)

    def __repr__(self) -> str:
        return (f"TritWeight(shape={self.shape}, depth={self.depth}, "
                f"codebook={self.codebook.numel()} scales, device={self.device}, "
                f"{self.bits_per_weight:.3f} bits/weight)")


def _check_shape(shape, name: str) -> tuple:
    ok = (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape))
    if not ok:
        raise ValueError(f"{name}: shape must be two positive ints (N, K), got {shape!r}")
    return (int(shape[0]), int(shape[1]))


def _check_same_device(packed, codebook, name: str) -> None:
    if not isinstance(packed, torch.Tensor) or not isinstance(codebook, torch.Tensor):
        raise TypeError(f"{name}: packed and codebook must be tensors")
    if packed.device != codebook.device:
        raise ValueError(f"{name}: packed is on {packed.device} but codebook is on "
                         f"{codebook.device}")


def save_trit_weight(tw: TritWeight, path, prefix: str = "weight") -> None:
    """Write one TritWeight to a safetensors file (keys of ``TritWeight.to_tensors``)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tw.to_tensors(prefix).items()}
    safetensors.torch.save_file(tensors, str(path))


def load_trit_weight(path, prefix: str = "weight", device="cpu") -> TritWeight:
    """Read a TritWeight written by ``save_trit_weight``. A truncated or corrupted file raises
    ValueError naming the file."""
    try:
        tensors = safetensors.torch.load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types (header, truncation, IO)
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    try:
        return TritWeight.from_tensors(tensors, prefix)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# The quantizer's pieces, shared with adoption.py (which requantizes groups with the same rule).

def _sum_last_pairwise(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension (a power of two) by halving it: every addition is fixed, so
    the float32 result is the same on every device. (A library reduction may add in another
    order on the GPU, and a near-tie between two candidate scales would then break differently.)"""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x.squeeze(-1)


def _divide_exactly(x: torch.Tensor, d: int) -> torch.Tensor:
    """float32 x / d correctly rounded on every device. (CUDA divides a tensor by a Python number
    as a multiplication by its reciprocal, which can differ from the CPU's division in the last
    bit. In float64 that error is far below float32's rounding, and x / d for an integer d is
    never a float32 tie, so rounding the float64 quotient gives the exact float32 quotient.)"""
    return (x.double() / d).float()


def best_group_scales(groups: torch.Tensor, depth: int,
                      valid_in_last: int = fmt.GROUP_SIZE) -> torch.Tensor:
    """float32 groups [R, G, 16] -> the MSE-best candidate scale of every group, float32 [R, G].

    `valid_in_last` is the number of real weights in the last group of each row (the rest is
    zero padding): the candidates of that group are order statistics of its real weights only.
    """
    lmax = fmt.max_level(depth)
    mag = groups.abs()
    if valid_in_last < fmt.GROUP_SIZE:
        # Padding takes the smallest real magnitude: it sorts below every real weight, and a
        # position below 0 among the real weights reads the smallest one (clamped at 0).
        real = mag[:, -1, :valid_in_last]
        mag[:, -1, valid_in_last:] = real.min(-1, keepdim=True).values
    top = mag.topk(_TOPK, dim=-1).values  # descending
    cands = _divide_exactly(top[..., list(_CANDIDATE_FROM_TOP)], lmax)  # [R, G, 4], ascending
    cands = torch.where(cands > 0, cands, _divide_exactly(top[..., :1], lmax))
    best_err = best = None
    for c in range(len(_CANDIDATE_POSITIONS)):
        s = cands[..., c:c + 1]
        safe = torch.where(s > 0, s, torch.ones_like(s))  # all-zero group: any scale, error 0
        q = torch.div(groups, safe).round_().clamp_(-lmax, lmax).mul_(safe)
        err = _sum_last_pairwise(torch.sub(groups, q, out=q).square_())
        if best is None:
            best_err, best = err, torch.zeros_like(err, dtype=torch.int64)
        else:
            better = err < best_err  # strict: a tie keeps the earlier candidate
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, c, best)
    return cands.gather(-1, best.unsqueeze(-1)).squeeze(-1)


def log_codebook(scales: torch.Tensor, entries: int = fmt.MAX_CODEBOOK) -> torch.Tensor:
    """float32 [entries] geometric from the smallest to the largest positive scale (exact ends);
    a 1-entry codebook when they are equal, ZERO_MATRIX_CODEBOOK when no scale is positive."""
    pos = scales[scales > 0]
    if pos.numel() == 0:
        return torch.tensor(ZERO_MATRIX_CODEBOOK, dtype=torch.float32, device=scales.device)
    lo, hi = pos.min(), pos.max()
    if lo == hi or entries == 1:
        return lo.reshape(1).to(torch.float32)
    # 27 numbers: computed on the CPU, so that exp and log round the same whatever the device.
    lo, hi = lo.double().cpu(), hi.double().cpu()
    t = torch.linspace(0, 1, entries, dtype=torch.float64)
    cb = torch.exp(lo.log() + t * (hi.log() - lo.log())).to(torch.float32)
    cb[0], cb[-1] = lo, hi
    return cb.to(scales.device)


def nearest_codebook_index(scales: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (int64, scales' shape) of the entry of an ascending positive codebook nearest each
    scale in the log domain; a tie goes to the smaller entry, scale 0 to entry 0."""
    cb = codebook.double()
    geometric_mids = (cb[:-1] * cb[1:]).sqrt()
    return torch.bucketize(scales.double(), geometric_mids)


def round_levels(groups: torch.Tensor, scales: torch.Tensor, depth: int) -> torch.Tensor:
    """float32 groups [..., 16] and their float32 scales [...] -> int8 levels
    clamp(round(w / s), -L, L) (round half to even); 0 where the scale is 0."""
    lmax = fmt.max_level(depth)
    s = scales.unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    levels = torch.div(groups, safe).round_().clamp_(-lmax, lmax)
    return torch.where(s > 0, levels, torch.zeros_like(levels)).to(torch.int8)


def _row_chunks(n_rows: int, k: int):
    step = max(1, _CHUNK_WEIGHTS // max(1, k))
    for r in range(0, n_rows, step):
        yield slice(r, min(n_rows, r + step))


def as_groups(w: torch.Tensor) -> torch.Tensor:
    """Rows of w [n, K] as float32 groups [n, G, 16], the last group zero-padded."""
    n, k = w.shape
    g = fmt.num_groups(k)
    x = w.to(torch.float32)
    if g * fmt.GROUP_SIZE != k:
        x = torch.nn.functional.pad(x, (0, g * fmt.GROUP_SIZE - k))
    return x.reshape(n, g, fmt.GROUP_SIZE)


def valid_in_last_group(k: int) -> int:
    return k - (fmt.num_groups(k) - 1) * fmt.GROUP_SIZE


def check_weight_input(w, name: str = "w") -> None:
    """A 2-D, non-empty, finite float16/bfloat16/float32 tensor, or a ValueError naming `name`."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {w.dtype}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [out_features, in_features] tensor, "
                         f"got shape {tuple(w.shape)}")
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ValueError(f"{name} holds {bad} NaN or infinite value(s); they cannot be quantized")


def check_group_size(group_size) -> None:
    if group_size != fmt.GROUP_SIZE:
        raise ValueError(f"group_size must be {fmt.GROUP_SIZE} (the only group size of packed "
                         f"format v{fmt.FORMAT_VERSION}), got {group_size!r}")


def quantize(w: torch.Tensor, depth: int = 2, group_size: int = fmt.GROUP_SIZE) -> TritWeight:
    """The paper's uniform post-training quantization of a 2-D weight (see the module docstring)
    into a TritWeight on w's device."""
    check_weight_input(w)
    fmt.check_depth(depth)
    check_group_size(group_size)
    n, k = w.shape
    g = fmt.num_groups(k)
    valid = valid_in_last_group(k)
    with torch.no_grad():
        scales = torch.empty(n, g, dtype=torch.float32, device=w.device)
        for rows in _row_chunks(n, k):
            scales[rows] = best_group_scales(as_groups(w[rows]), depth, valid)
        codebook = log_codebook(scales)
        idx = nearest_codebook_index(scales, codebook)
        levels = torch.empty(n, g * fmt.GROUP_SIZE, dtype=torch.int8, device=w.device)
        for rows in _row_chunks(n, k):
            chunk_scales = codebook[idx[rows]]
            levels[rows] = round_levels(as_groups(w[rows]), chunk_scales, depth).flatten(1)
        packed = fmt.pack(levels[:, :k], idx.to(torch.uint8), depth)
    return TritWeight(packed, codebook, (n, k), depth)


def dequantize(tw: TritWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The reference dense W [N, K]: float32(codebook[idx]) * float32(level), rounded once to
    `dtype` (float32, float16 or bfloat16), decoded with format.unpack."""
    if not isinstance(tw, TritWeight):
        raise TypeError(f"dequantize expects a TritWeight, got {type(tw).__name__}")
    if dtype not in DEQUANTIZED_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    n, k = tw.shape
    out = torch.empty(n, k, dtype=dtype, device=tw.device)
    for rows in _row_chunks(n, k):
        levels, idx = fmt.unpack(tw.packed[rows], tw.depth, k)
        scales = tw.codebook[idx.long()].repeat_interleave(fmt.GROUP_SIZE, dim=1)[:, :k]
        out[rows] = (scales * levels.to(torch.float32)).to(dtype)
    return out
