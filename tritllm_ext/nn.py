"""TritLinear: a drop-in nn.Linear whose weight is stored as packed trits (docs/FORMAT.md).

The module holds the packed matrix as three buffers named like the checkpoint keys of
docs/FORMAT.md ("Checkpoints"), so `state_dict()` *is* the on-disk layout:

    trit_packed    uint8 [N, G * B(d)]    the packed trits and scale indices
    trit_codebook  float32 [C]            the per-matrix scale table, always float32
    trit_meta      int64 [4]              format version, depth, N, K
    bias           [N] (optional)         a frozen Parameter in the model's dtype

Buffers are checked once (`validate`) before the first forward; every loader in this package
validates eagerly, so a corrupt checkpoint fails while loading, naming the module.
"""
from __future__ import annotations

import torch
from torch import nn

from . import format as fmt
from . import ops  # noqa: F401  (registers the fake kernels torch.compile needs)
from .codec import TritWeight, quantize

# The buffers of a TritLinear, which are also the key suffixes of a packed matrix on disk.
TRIT_BUFFERS = ("trit_packed", "trit_codebook", "trit_meta")


class TritLinear(nn.Module):
    """y = x @ W.T + bias with W stored as packed balanced trits. Inference only.

    `TritLinear(in_features, out_features, bias, depth, codebook_size)` builds an *empty* module
    (on any device, including "meta") whose buffers a checkpoint fills; `from_linear` and
    `from_trit_weight` build a filled one.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, depth: int = 2,
                 codebook_size: int = fmt.MAX_CODEBOOK, device=None, dtype=None):
        super().__init__()
        fmt.check_depth(depth)
        if not 1 <= codebook_size <= fmt.MAX_CODEBOOK:
            raise ValueError(f"codebook_size must be in [1, {fmt.MAX_CODEBOOK}], got "
                             f"{codebook_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.depth = depth
        row = fmt.packed_row_bytes(in_features, depth)
        self.register_buffer("trit_packed", torch.empty(out_features, row, dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("trit_codebook", torch.empty(codebook_size, dtype=torch.float32,
                                                          device=device))
        # All zeros until loaded: version 0 makes `validate` report "never loaded".
        self.register_buffer("trit_meta", torch.zeros(4, dtype=torch.int64, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._validated = False

    @classmethod
    def from_trit_weight(cls, tw: TritWeight, bias: torch.Tensor | None = None) -> TritLinear:
        n, k = tw.shape
        layer = cls(k, n, bias=bias is not None, depth=tw.depth,
                    codebook_size=tw.codebook.numel(), device="meta")
        tensors = tw.to_tensors("w")
        for key in TRIT_BUFFERS:
            layer._buffers[key] = tensors["w." + key].to(tw.packed.device)
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        layer._validated = True  # a TritWeight is validated when it is built
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, depth: int = 2) -> TritLinear:
        """Quantize `linear.weight` with the codec (on the weight's device); keep its bias."""
        tw = quantize(linear.weight.detach(), depth=depth)
        return cls.from_trit_weight(tw, linear.bias)

    @property
    def trit_weight(self) -> TritWeight:
        return TritWeight(self.trit_packed, self.trit_codebook,
                          (self.out_features, self.in_features), self.depth)

    def validate(self, name: str = "TritLinear") -> None:
        """Check the buffers against this module's shape and depth and the packed format; raise
        ValueError naming `name` (the module's name in its model) on the first problem."""
        for key in TRIT_BUFFERS:
            if self._buffers[key].is_meta:
                raise ValueError(f"{name}: buffer {key} was never loaded (still on the meta "
                                 "device)")
        meta = self.trit_meta
        if tuple(meta.shape) == (4,) and not bool(meta.any()):
            raise ValueError(f"{name}: the module holds no weights (its buffers were never loaded)")
        tw = TritWeight.from_tensors({f"{name}.{key}": self._buffers[key] for key in TRIT_BUFFERS},
                                     name)  # checks the version, the meta and every byte
        expected = (self.depth, self.out_features, self.in_features)
        if (tw.depth, *tw.shape) != expected:
            raise ValueError(f"{name}.trit_meta: records depth={tw.depth}, N={tw.shape[0]}, "
                             f"K={tw.shape[1]} but the module is depth={expected[0]}, "
                             f"out_features={expected[1]}, in_features={expected[2]}")
        if self.bias is not None and tuple(self.bias.shape) != (self.out_features,):
            raise ValueError(f"{name}.bias: expected shape ({self.out_features},), got "
                             f"{tuple(self.bias.shape)}")
        self._validated = True

    def validate_once(self, name: str = "TritLinear") -> None:
        """`validate` unless the buffers were validated since they last changed. Code that reads
        the buffers without calling the module (a fused product of several modules) calls this
        first."""
        if self._validated:
            return
        if torch.compiler.is_compiling():  # validation reads tensor values: not traceable
            raise RuntimeError("TritLinear: call validate() (every tritllm_ext loader does) "
                               "before compiling a module whose buffers were filled by hand")
        self.validate(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.validate_once()
        y = torch.ops.tritllm.matmul(x, self.trit_packed, self.trit_codebook, self.depth,
                                     self.in_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _apply(self, fn, recurse=True):
        # model.half() / model.to(torch.bfloat16) cast every floating buffer; the codebook must
        # stay float32 (FORMAT.md), so it follows the device change only, from its exact values.
        codebook = self.trit_codebook
        super()._apply(fn, recurse)
        moved = self._buffers["trit_codebook"]
        if moved.dtype != torch.float32:
            self._buffers["trit_codebook"] = codebook.to(moved.device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        # load_state_dict() replaces the bytes: check them again before the next forward.
        super()._load_from_state_dict(*args, **kwargs)
        self._validated = False

    def extra_repr(self) -> str:
        bits = 8.0 * fmt.packed_row_bytes(self.in_features, self.depth) / self.in_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, depth={self.depth}, "
                f"codebook_size={self.trit_codebook.numel()}, bits_per_weight={bits:.2f}")


def validate_modules(model: nn.Module) -> int:
    """Validate every TritLinear of `model`, naming it in any error; return how many there are."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, TritLinear):
            module.validate(name)
            count += 1
    return count
