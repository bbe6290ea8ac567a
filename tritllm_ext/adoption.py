"""Exact adoption of a weight that a trit codec already dequantized (what Entrit publishes: FP16 or
BF16 safetensors).

Such a weight is  w = round_dtype(scale[group] * level)  with integer levels in [-L, L] and at most
27 distinct group scales. `adopt` recovers a codebook, scale indices and levels such that our
reference arithmetic, dequantize(adopt(w), w.dtype) = round_dtype(float32(float32 scale * level)),
reproduces w bit for bit. The publisher may have multiplied in float32 or float64 and kept its
codebook in either: the codebook recovered here is float32 and need not equal the publisher's.

How (all vectorized, in chunks of groups):

1. Exact product intervals. For every weight magnitude v, the real products x >= 0 with
   round_dtype(round_f32(x)) == v form an interval [A, B] (two roundings, ties to even, found
   from the bit patterns of v and its neighbours; all these bounds are exact in float64).
   A level l > 0 and a float32 scale s reproduce v iff A <= s * l <= B, i.e. s in [A/l, B/l].
   (Dividing in float64 decides every comparison with a float32 s exactly: s * l needs at most
   30 bits, so it is never within float64 rounding of A or B without being equal to it; open
   ends, where a tie rounds away, are moved inward by 2^-40 relative, far below that gap.)
   +0.0 is level 0 and constrains nothing; -0.0 can only be a negative level whose product
   underflows: level -1 with A = 0.
2. The scales that fit a group, as float32 intervals ("alternatives"). For each top level
   m = 1..L: s0 = max|w| / m, level magnitudes round(|w| / s0) (at least 1 for a non-zero
   weight), and the scales that fit those levels: [ceil_f32(max A/l), floor_f32(min B/l)], if
   not empty. (A float32 prefilter first drops the m that some weight rules out by more than
   rounding can explain, so the exact test runs about once per group.) This finds every fitting
   scale unless rounding errors reach a quarter of the scale (subnormal outputs of tiny scales);
   a group with a subnormal weight and no fit is searched exhaustively (each interval of fitting
   scales starts at some ceil_f32(A_j / l)). Usually one interval fits; when the levels share a
   factor, several do. A group of +0.0 fits any scale.
3. The codebook: an interval point cover, on float32 intervals, so every point is exact.
   a) Groups with one alternative: greedy cover (p = the smallest right end among uncovered
      groups; every uncovered interval starting at or before p contains p; their common part
      [max left, p] becomes one cluster). This needs the fewest points.
   b) Groups with several alternatives join the first cluster one of their alternatives
      overlaps, narrowing its interval (joiners of a cluster that contradict each other do not
      join); then the point inside the most remaining alternatives starts a new cluster; repeat.
   At most 27 clusters are kept (those holding most groups); groups of the others do not
   conform. Each cluster's scale is the float32 nearest the middle of its common interval.
   The levels follow from the scale s: the smallest magnitude that fits, ceil(A / s).
4. Verification: the matrix is packed, dequantized by `codec.dequantize` and compared with w bit
   for bit, group by group; a group that differs does not conform (this never happened in the
   tests: it is the safety net of steps 1-3).

A float32 w adopts exactly when its publisher multiplied in float32; a float64 product rounded to
float32 leaves intervals one float32 wide, which a float32 scale rarely hits for every level.

Non-conforming groups raise NonConformingWeightError (strict=True) or are requantized with the
quantizer's rule (codec.best_group_scales, nearest entry in the log domain) on the recovered
codebook, which first gains log-spaced entries for them if it has fewer than 27.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import codec
from . import format as fmt

# Chunks: the scale search holds [groups, L, 4] float32 temporaries, at most 2^20 elements;
# computing levels holds [groups, 16]; the exhaustive search [groups, 16, 16 L].
_CHUNK_ELEMENTS = 1 << 20
_CHUNK_GROUPS = 1 << 14
_CHUNK_HARD_GROUPS = 64

# Weights per group that the first pass of the scale search's prefilter looks at.
_PREFILTER_WEIGHTS = 4

# The cover never builds more than this many clusters: beyond 27 the matrix does not conform
# anyway, and the bound keeps a hopeless matrix from looping over every group.
_MAX_CLUSTERS = 4 * fmt.MAX_CODEBOOK

# Relative inward move of an open interval end (see the module docstring, step 1).
_OPEN_END_NUDGE = 2.0 ** -40

_SMALLEST_F32 = 2.0 ** -149  # the smallest positive float32: scales are kept positive
_BITS_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


class NonConformingWeightError(ValueError):
    """A weight that is not exactly the dequantized output of a trit codec of the given depth.
    `failed` of `groups` groups do not fit; `no_levels` of them have no consistent integer levels,
    `no_scale` fit no one of at most 27 float32 scales, `mismatch` failed the final check."""

    def __init__(self, name: str, depth: int, failed: int, groups: int, no_levels: int,
                 no_scale: int, mismatch: int):
        self.failed, self.groups = failed, groups
        self.no_levels, self.no_scale, self.mismatch = no_levels, no_scale, mismatch
        super().__init__(
            f"{name}: {failed} of {groups} groups are not the exact output of a depth-{depth} trit "
            f"codec (levels in [-{fmt.max_level(depth)}, {fmt.max_level(depth)}] times one of at "
            f"most {fmt.MAX_CODEBOOK} scales): {no_levels} have no consistent integer levels, "
            f"{no_scale} need a scale beyond the {fmt.MAX_CODEBOOK} that cover the others, "
            f"{mismatch} failed the bit-exact check. Pass strict=False to requantize them.")


@dataclass(frozen=True)
class AdoptReport:
    """What `adopt_with_report` did to a matrix."""
    groups: int              # groups of 16 weights in the matrix
    exact_groups: int        # groups reproduced bit for bit
    requantized_groups: int  # non-conforming groups requantized (strict=False only)
    codebook_size: int       # entries of the recovered codebook

    def __str__(self) -> str:
        return (f"{self.exact_groups}/{self.groups} groups exact, {self.requantized_groups} "
                f"requantized, codebook of {self.codebook_size} scales")


def adopt(w: torch.Tensor, depth: int = 2, group_size: int = fmt.GROUP_SIZE,
          strict: bool = True, name: str = "w") -> codec.TritWeight:
    """`adopt_with_report` without the report."""
    return adopt_with_report(w, depth, group_size, strict, name)[0]


def adopt_with_report(w: torch.Tensor, depth: int = 2, group_size: int = fmt.GROUP_SIZE,
                      strict: bool = True, name: str = "w"):
    """Recover the packed form of an already-dequantized weight w (float16, bfloat16 or float32,
    2-D, finite) -> (TritWeight, AdoptReport). dequantize(result, w.dtype) equals w bit for bit
    for every group counted exact. Non-conforming groups raise NonConformingWeightError (a
    ValueError) naming `name` when `strict`, else they are requantized and counted."""
    codec.check_weight_input(w, name)  # float16, bfloat16 or float32, 2-D, finite
    fmt.check_depth(depth)
    codec.check_group_size(group_size)
    with torch.no_grad():
        return _adopt(w, depth, strict, name)


def _adopt(w, depth, strict, name):
    n, k = w.shape
    groups = _padded_groups(w).reshape(-1, fmt.GROUP_SIZE)  # w.dtype, +0.0 padding
    n_groups = groups.shape[0]

    items, all_plus_zero = _scale_alternatives(groups, depth)
    no_levels = (torch.bincount(items.group, minlength=n_groups) == 0) & ~all_plus_zero

    cover = _Cover(items, n_groups)
    codebook, group_index = cover.codebook()
    no_scale = (group_index < 0) & ~all_plus_zero & ~no_levels

    idx = group_index.clamp(min=0)  # groups of +0.0 (and failed ones, for now) take entry 0
    levels = _levels_at(groups, codebook[idx], depth)
    tw = _pack(levels, idx, codebook, (n, k), depth)
    mismatch = _differing_groups(tw, w) & ~no_levels & ~no_scale

    failed = no_levels | no_scale | mismatch
    n_failed = int(failed.sum())
    if n_failed and strict:
        raise NonConformingWeightError(name, depth, n_failed, n_groups, int(no_levels.sum()),
                                       int(no_scale.sum()), int(mismatch.sum()))
    if n_failed:
        codebook, idx, levels = _requantize(groups, failed, group_index >= 0, codebook, idx,
                                            levels, k, depth)
        tw = _pack(levels, idx, codebook, (n, k), depth)
    report = AdoptReport(groups=n_groups, exact_groups=n_groups - n_failed,
                         requantized_groups=n_failed, codebook_size=codebook.numel())
    return tw, report


def _padded_groups(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    pad = fmt.num_groups(k) * fmt.GROUP_SIZE - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))  # +0.0: level 0, no constraint on the scale
    return w.reshape(n, -1, fmt.GROUP_SIZE)


# --- 1. exact product intervals ---------------------------------------------------------------

def _from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 bit patterns of non-negative `dtype` values -> those values in float64."""
    return bits.to(_BITS_DTYPE[dtype]).view(dtype).to(torch.float64)


def _f32_step(x: torch.Tensor, step: int) -> torch.Tensor:
    """The float32 `step` places above (or below) non-negative float32 values x."""
    return (x.view(torch.int32) + step).view(torch.float32)


def _f32_of_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def _is_odd_f32(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) & 1) == 1


def _product_bounds(mag: torch.Tensor):
    """Magnitudes (|w| in w's dtype) -> float64 (A, B): a real x >= 0 satisfies
    round_dtype(round_f32(x)) == mag iff A <= x <= B (open ends already moved inward)."""
    dtype = mag.dtype
    bits = mag.view(_BITS_DTYPE[dtype]).to(torch.int64)
    zero = bits == 0
    # y_lo..y_hi: the float32 values that round to mag in its dtype (ties to even).
    if dtype == torch.float32:
        y_lo = y_hi = mag
    else:
        val = mag.to(torch.float64)
        below = _from_bits(bits - 1, dtype)  # meaningless where mag == 0 (masked below)
        above = _from_bits(bits + 1, dtype)
        above = torch.where(torch.isinf(above), 2 * val - below, above)  # past the largest finite
        mid_lo = ((below + val) / 2).to(torch.float32)  # exact: one bit more than the dtype
        mid_hi = ((val + above) / 2).to(torch.float32)
        even = (bits & 1) == 0
        y_lo = torch.where(even, mid_lo, _f32_step(mid_lo, 1))
        y_lo = torch.where(zero, torch.zeros_like(y_lo), y_lo)
        y_hi = torch.where(even, mid_hi, _f32_step(mid_hi, -1))
    # A..B: the reals whose float32 rounding lies in [y_lo, y_hi] (ties to even).
    lo64, hi64 = y_lo.to(torch.float64), y_hi.to(torch.float64)
    a = (_f32_step(y_lo, -1).to(torch.float64) + lo64) / 2
    a = torch.where(_is_odd_f32(y_lo), a * (1 + _OPEN_END_NUDGE), a)
    a = torch.where(zero, torch.zeros_like(a), a)
    hi_next = _f32_step(y_hi, 1).to(torch.float64)
    hi_next = torch.where(torch.isinf(hi_next), 2 * hi64 - _f32_step(y_hi, -1).to(torch.float64),
                          hi_next)
    b = (hi64 + hi_next) / 2
    b = torch.where(_is_odd_f32(y_hi), b * (1 - _OPEN_END_NUDGE), b)
    return a, b


def _ceil_f32(x: torch.Tensor) -> torch.Tensor:
    """The smallest float32 >= each float64 x."""
    c = x.to(torch.float32)
    return torch.where(c.to(torch.float64) < x, torch.nextafter(c, torch.full_like(c, torch.inf)),
                       c)


def _floor_f32(x: torch.Tensor) -> torch.Tensor:
    """The largest float32 <= each float64 x."""
    c = x.to(torch.float32)
    return torch.where(c.to(torch.float64) > x, torch.nextafter(c, torch.full_like(c, -torch.inf)),
                       c)


# --- 2. the scales that fit a group ------------------------------------------------------------

_BOUNDS_TABLES = {}


def _bounds_table(dtype, device):
    """float64 [2, 2^15]: (A, B) of every non-negative 16-bit value of `dtype` (index = bits)."""
    key = (dtype, str(device))
    if key not in _BOUNDS_TABLES:
        bits = torch.arange(1 << 15, dtype=torch.int32, device=device)
        finite = bits.to(torch.int16).view(dtype).isfinite()
        a, b = _product_bounds(torch.where(finite, bits, 0).to(torch.int16).view(dtype))
        _BOUNDS_TABLES[key] = torch.stack([a, b])  # inf/NaN rows: never looked up (w is finite)
    return _BOUNDS_TABLES[key]


def _weight_bounds(chunk):
    """Groups [g, 16] -> float64 (A, B) of every |w| and which weights constrain the scale: all
    but +0.0 (level 0). A -0.0 needs a negative level whose product underflows: level -1 fits
    whenever any does, with A = 0."""
    mag = chunk.abs()
    if chunk.dtype == torch.float32:
        a, b = _product_bounds(mag)
    else:  # 16-bit dtypes: look the bounds up
        table = _bounds_table(chunk.dtype, chunk.device)
        bits = mag.view(torch.int16).to(torch.int32).reshape(-1)
        a = table[0].index_select(0, bits).reshape(mag.shape)
        b = table[1].index_select(0, bits).reshape(mag.shape)
    return a, b, (chunk != 0) | torch.signbit(chunk)


def _interval_of(a, b, constrained, levels, dim):
    """The float32 scales [lo, hi] that reproduce every weight at these level magnitudes:
    [ceil_f32(max A / l), floor_f32(min B / l)] over the constraining weights along `dim`."""
    lo = torch.where(constrained, a / levels, -torch.inf).amax(dim)
    hi = torch.where(constrained, b / levels, torch.inf).amin(dim)
    return _ceil_f32(lo).clamp(min=_SMALLEST_F32), _floor_f32(hi)


@dataclass
class _Items:
    """The alternatives: float32 scale intervals [lo, hi] that fit a group (as a whole)."""
    group: torch.Tensor  # int64
    lo: torch.Tensor     # float32
    hi: torch.Tensor     # float32


def _fast_alternatives(mag32, a, b, constrained, lmax, unit_roundoff, half_spacing):
    """For each top level m = 1..L: level magnitudes round(|w| / (max|w| / m)), at least 1 for a
    constraining weight, and the float32 interval they allow. Returns (row, lo, hi) of the m
    that fit, and which groups passed the prefilter. This finds every fitting scale when each
    weight's rounding error is at most `unit_roundoff` relative (all weights normal numbers of
    their dtype), and usually beyond.

    A float32 prefilter first drops the m for which some weight lies farther from its level
    than rounding can explain. If the true levels are l with top level m, each |w| is within
    u * s * l + h of s * l (u the unit roundoff of the two roundings, h half the subnormal
    spacing), so m |w| / max|w| is within about 2u l + 2h m / max|w| of l. The prefilter
    looks at the first _PREFILTER_WEIGHTS weights of every (group, m) pair, then at all 16 of
    the few pairs left; only the survivors (about one per group) get the exact float64 test. A
    group that no m survives fits no scale at all."""
    group_max = mag32.amax(-1, keepdim=True)  # [g, 1]
    positive = group_max > 0
    ratio = torch.where(positive, mag32 / group_max, torch.zeros_like(mag32))
    spacing = torch.where(positive, 2.5 * half_spacing / group_max, torch.zeros_like(group_max))
    m = torch.arange(1, lmax + 1, dtype=torch.float32, device=mag32.device)
    alive = _near_levels(ratio[:, :_PREFILTER_WEIGHTS].unsqueeze(1), m.view(1, -1, 1),
                         spacing.unsqueeze(1), unit_roundoff)  # [g, L]
    alive[~positive.squeeze(-1), 1:] = False  # zeros only: the same levels for every m
    rows, cols = alive.nonzero(as_tuple=True)
    m = m[cols].unsqueeze(-1)
    keep = _near_levels(ratio[rows], m, spacing[rows], unit_roundoff).nonzero().squeeze(-1)
    rows, m = rows[keep], m[keep].to(torch.float64)
    survived = torch.zeros(mag32.shape[0], dtype=torch.bool, device=mag32.device)
    survived[rows] = True
    # The exact test, in float64 (s0 must not round, as it would in float32 subnormals).
    mag = mag32[rows].to(torch.float64)
    top = group_max[rows].to(torch.float64)
    s0 = torch.where(top > 0, top / m, torch.ones_like(top))
    levels = torch.div(mag, s0).round_().clamp_(min=1)  # at most m, since |w| <= max|w|
    lo, hi = _interval_of(a[rows], b[rows], constrained[rows], levels, dim=-1)
    fits = lo <= hi
    return rows[fits], lo[fits], hi[fits], survived


def _near_levels(ratio, m, spacing, unit_roundoff):
    """Whether every x = m * ratio (ratio = |w| / max|w|, float32) lies within rounding error
    of an integer level >= 1 (zeros are left to the exact test); reduced over the last dim.
    `spacing` is 2.5 h / max|w|, the share of subnormal rounding."""
    x = ratio * m
    miss = (x - x.round().clamp_(min=1)).abs_()
    tolerance = (x + 1).mul_(2.5 * unit_roundoff).add_(spacing * m).add_(2.0 ** -12)
    return ((miss <= tolerance) | (ratio == 0)).all(-1)


def _exhaustive_alternatives(a, b, constrained, lmax):
    """Every alternative of groups [g, 16], by testing each float32 point ceil_f32(A_j / l): the
    fitting scales form intervals, each starting at such a point. At a candidate c the smallest
    level that can reproduce weight j is ceil(A_j / c). Returns (row, lo, hi) of the fits."""
    level_range = torch.arange(1, lmax + 1, dtype=torch.float64, device=a.device)
    cands = _ceil_f32(a.unsqueeze(-1) / level_range).clamp(min=_SMALLEST_F32).flatten(1)  # [g, C]
    c = cands.to(torch.float64).unsqueeze(1)  # [g, 1, C]
    levels = (a.unsqueeze(-1) / c).ceil_().clamp_(min=1)  # [g, 16, C]
    con = constrained.unsqueeze(-1)
    fits = ((levels <= lmax) & (levels * c <= b.unsqueeze(-1)) | ~con).all(1)  # [g, C]
    lo, hi = _interval_of(a.unsqueeze(-1), b.unsqueeze(-1), con, levels, dim=1)
    rows, cols = fits.nonzero(as_tuple=True)
    # Many candidates share an interval: keep one (row, lo, hi) of each.
    key = torch.stack([rows, lo[rows, cols].view(torch.int32).long(),
                       hi[rows, cols].view(torch.int32).long()], dim=1).unique(dim=0)
    return key[:, 0], _f32_of_bits(key[:, 1]), _f32_of_bits(key[:, 2])


def _scale_alternatives(groups, depth):
    """-> (_Items: every alternative found, one or more per fitting group; bool [groups]: the
    group is all +0.0 and fits any scale)."""
    lmax = fmt.max_level(depth)
    finfo = torch.finfo(groups.dtype)
    # Relative error of round_dtype(round_f32(x)) for a normal result (both roundings), and
    # the absolute error of a subnormal one.
    unit_roundoff = finfo.eps / 2 + 2.0 ** -24 + finfo.eps * 2.0 ** -25
    half_spacing = finfo.tiny * finfo.eps / 2 + 2.0 ** -150
    out_group, out_lo, out_hi, plus_zero = [], [], [], []
    step = max(1, _CHUNK_ELEMENTS // (_PREFILTER_WEIGHTS * lmax))  # [step, L, 4] prefilter
    for start in range(0, groups.shape[0], step):
        chunk = groups[start:start + step]
        mag32 = chunk.abs().to(torch.float32)
        a, b, constrained = _weight_bounds(chunk)
        unconstrained = ~constrained.any(-1)
        rows, lo, hi, survived = _fast_alternatives(mag32, a, b, constrained, lmax,
                                                    unit_roundoff, half_spacing)
        keep = ~unconstrained[rows]
        out_group.append(rows[keep] + start)
        out_lo.append(lo[keep])
        out_hi.append(hi[keep])
        plus_zero.append(unconstrained)
        found = torch.zeros_like(unconstrained)
        found[rows] = True
        # Subnormal weights carry large relative errors: where the exact test after the
        # prefilter found nothing, search exhaustively.
        subnormal = ((mag32 > 0) & (mag32 < finfo.tiny)).any(-1)
        hard_groups = (subnormal & survived & ~found).nonzero().squeeze(-1)
        for part in hard_groups.split(_CHUNK_HARD_GROUPS):
            r, lo, hi = _exhaustive_alternatives(a[part], b[part], constrained[part], lmax)
            out_group.append(part[r] + start)
            out_lo.append(lo)
            out_hi.append(hi)
    items = _Items(torch.cat(out_group), torch.cat(out_lo), torch.cat(out_hi))
    return items, torch.cat(plus_zero)


def _levels_at(groups, group_scale, depth):
    """int8 levels [groups, 16] reproducing each weight at its group's float32 scale: the
    smallest magnitude that fits, ceil(A / scale), with the weight's sign; 0 for +0.0."""
    lmax = fmt.max_level(depth)
    out = torch.empty(groups.shape, dtype=torch.int8, device=groups.device)
    for start in range(0, groups.shape[0], _CHUNK_GROUPS):
        chunk = groups[start:start + _CHUNK_GROUPS]
        a, _, constrained = _weight_bounds(chunk)
        scale = group_scale[start:start + _CHUNK_GROUPS].to(torch.float64).unsqueeze(-1)
        lv = (a / scale).ceil_().clamp_(min=1, max=lmax)  # fits: the cover checked it
        lv = torch.where(constrained, lv, torch.zeros_like(lv))
        out[start:start + _CHUNK_GROUPS] = torch.where(torch.signbit(chunk), -lv, lv).to(torch.int8)
    return out


# --- 3. the point cover -------------------------------------------------------------------------

def _first_per_group(group, mask, n_groups):
    """Positions of the first True of `mask` in each group that has one."""
    position = torch.arange(group.numel(), device=group.device)
    first = torch.full((n_groups,), group.numel(), dtype=torch.int64, device=group.device)
    first.scatter_reduce_(0, group[mask], position[mask], reduce="amin")
    return first[first < group.numel()]


class _Cover:
    """Clusters of alternatives sharing one float32 scale, built as in the module docstring
    (step 3); each cluster keeps the common interval [lo, hi] of its members."""

    def __init__(self, items: _Items, n_groups: int):
        self.items, self.n_groups = items, n_groups
        self.lo, self.hi = [], []  # python floats (exact float32 values)
        self.item_cluster = torch.full_like(items.group, -1)
        ids = torch.arange(items.group.numel(), device=items.group.device)
        several = torch.bincount(items.group, minlength=n_groups)[items.group] > 1
        self._cover_single(ids[~several])
        left = ids[several]
        while left.numel() and len(self.lo) < _MAX_CLUSTERS:
            left = self._join(left)
            if left.numel():
                left = self._cover_deepest(left)

    def _new_cluster(self, chosen, lo, hi):
        self.item_cluster[chosen] = len(self.lo)
        self.lo.append(float(lo))
        self.hi.append(float(hi))

    def _uncovered(self, ids, covered_items):
        covered = torch.zeros(self.n_groups, dtype=torch.bool, device=ids.device)
        covered[self.items.group[covered_items]] = True
        return ids[~covered[self.items.group[ids]]]

    def _cover_single(self, ids):
        """Greedy cover of groups with one alternative: the fewest points."""
        lo, hi = self.items.lo[ids], self.items.hi[ids]
        while ids.numel() and len(self.lo) < _MAX_CLUSTERS:
            p = hi.min()
            hit = lo <= p  # every interval ends at or after p: these contain p
            self._new_cluster(ids[hit], lo[hit].max(), p)
            ids, lo, hi = ids[~hit], lo[~hit], hi[~hit]

    def _join(self, ids):
        """Groups with alternatives join the first cluster one of their alternatives overlaps,
        narrowing its interval; returns the items of groups that did not join."""
        if not self.lo:
            return ids
        device = ids.device
        c_lo = torch.tensor(self.lo, dtype=torch.float32, device=device)
        c_hi = torch.tensor(self.hi, dtype=torch.float32, device=device)
        order = torch.argsort(c_hi)
        c_lo, c_hi = c_lo[order], c_hi[order]
        lo, hi, group = self.items.lo[ids], self.items.hi[ids], self.items.group[ids]
        k = torch.searchsorted(c_hi, lo).clamp(max=c_hi.numel() - 1)  # first ending at/after lo
        overlaps = (c_hi[k] >= lo) & (c_lo[k] <= hi)
        chosen = _first_per_group(group, overlaps, self.n_groups)
        target = k[chosen]
        new_lo = c_lo.scatter_reduce(0, target, lo[chosen], reduce="amax")
        new_hi = c_hi.scatter_reduce(0, target, hi[chosen], reduce="amin")
        agree = new_lo <= new_hi  # joiners that contradict each other join nobody
        joined = chosen[agree[target]]
        self.item_cluster[ids[joined]] = order[k[joined]]
        for rank in agree.nonzero().squeeze(-1).tolist():
            cluster = int(order[rank])
            self.lo[cluster], self.hi[cluster] = float(new_lo[rank]), float(new_hi[rank])
        return self._uncovered(ids, ids[joined])

    def _cover_deepest(self, ids):
        """A new cluster at the point inside the most remaining alternatives."""
        lo, hi, group = self.items.lo[ids], self.items.hi[ids], self.items.group[ids]
        values = torch.cat([lo, hi])
        step = torch.cat([torch.ones_like(group), -torch.ones_like(group)])  # enter, leave
        # Sorted by value, entries before exits at equal values (the intervals are closed).
        by_kind = torch.argsort(-step, stable=True)
        order = by_kind[torch.argsort(values[by_kind], stable=True)]
        depth = step[order].cumsum(0)
        p = values[order[int(depth.argmax())]]  # an entry: inside every interval open there
        chosen = _first_per_group(group, (lo <= p) & (hi >= p), self.n_groups)
        self._new_cluster(ids[chosen], lo[chosen].max(), hi[chosen].min())
        return self._uncovered(ids, ids[chosen])

    def codebook(self):
        """-> (codebook float32 ascending, codebook index of every group or -1). At most 27
        clusters are kept, those that hold the most groups; each gives the float32 nearest the
        middle of its interval (inside it: both ends are float32)."""
        device = self.item_cluster.device
        group_index = torch.full((self.n_groups,), -1, dtype=torch.int64, device=device)
        member = self.item_cluster >= 0
        count = torch.bincount(self.item_cluster[member], minlength=len(self.lo))
        keep = torch.sort(count, descending=True, stable=True).indices[:fmt.MAX_CODEBOOK]
        keep = keep[count[keep] > 0]
        if keep.numel() == 0:
            codebook = torch.tensor(codec.ZERO_MATRIX_CODEBOOK, dtype=torch.float32, device=device)
            return codebook, group_index
        lo = torch.tensor(self.lo, dtype=torch.float64, device=device)[keep]
        hi = torch.tensor(self.hi, dtype=torch.float64, device=device)[keep]
        codebook, rank = ((lo + hi) / 2).to(torch.float32).sort()
        index_of_cluster = torch.full((len(self.lo),), -1, dtype=torch.int64, device=device)
        index_of_cluster[keep[rank]] = torch.arange(keep.numel(), device=device)
        group_index[self.items.group[member]] = index_of_cluster[self.item_cluster[member]]
        return codebook, group_index


# --- 4. packing, verification, repair -----------------------------------------------------------

def _pack(levels, idx, codebook, shape, depth):
    n, k = shape
    lv = levels.reshape(n, -1)[:, :k]
    packed = fmt.pack(lv, idx.reshape(n, -1).to(torch.uint8), depth)
    return codec.TritWeight(packed, codebook, shape, depth)


def _differing_groups(tw, w) -> torch.Tensor:
    """bool [groups]: the group of dequantize(tw, w.dtype) differs from w in some bit."""
    bits = _BITS_DTYPE[w.dtype]
    differ = (codec.dequantize(tw, w.dtype).view(bits) != w.view(bits)).to(torch.uint8)
    return _padded_groups(differ).amax(-1).reshape(-1) > 0


def _requantize(groups, failed, assigned, codebook, idx, levels, k, depth):
    """Requantize the failed groups with the quantizer's rule on the recovered codebook (the
    entries used by exact groups, extended with log-spaced entries for the failed groups while
    there are fewer than 27). `assigned`: groups that hold a recovered scale."""
    g = fmt.num_groups(k)
    rows = failed.nonzero().squeeze(-1)
    x = groups[rows].to(torch.float32).unsqueeze(1)  # [F, 1, 16]
    in_last = (rows % g) == g - 1
    scales = torch.empty(rows.numel(), dtype=torch.float32, device=groups.device)
    for last, valid in ((False, fmt.GROUP_SIZE), (True, codec.valid_in_last_group(k))):
        sel = in_last == last
        if bool(sel.any()):
            scales[sel] = codec.best_group_scales(x[sel], depth, valid).squeeze(-1)
    used = torch.zeros(codebook.numel(), dtype=torch.bool, device=codebook.device)
    used[idx[assigned & ~failed]] = True
    kept = codebook[used]
    free = fmt.MAX_CODEBOOK - kept.numel()
    extra = codec.log_codebook(scales, free) if free and bool((scales > 0).any()) else kept[:0]
    new_codebook = torch.cat([kept, extra]).sort().values
    if new_codebook.numel() == 0:  # nothing to keep and only zero groups to requantize
        new_codebook = torch.tensor(codec.ZERO_MATRIX_CODEBOOK, dtype=torch.float32,
                                    device=codebook.device)
    # Exact groups keep their float32 scale under its new index; groups of zeros take index 0.
    remap = torch.zeros(codebook.numel(), dtype=torch.int64, device=codebook.device)
    remap[used] = torch.searchsorted(new_codebook, kept)
    new_idx = torch.where(assigned, remap[idx], 0)
    fail_idx = codec.nearest_codebook_index(scales, new_codebook)
    new_idx[rows] = fail_idx
    new_levels = levels.clone()
    new_levels[rows] = codec.round_levels(x.squeeze(1), new_codebook[fail_idx], depth)
    return new_codebook, new_idx, new_levels
