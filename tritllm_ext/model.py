"""Whole-model conversion: nn.Linear -> TritLinear (quantize_model) and back (dequantize_model).

Which layers are quantized: every nn.Linear with a 2-D weight, except
  * layers whose name matches a `skip` pattern (see `matches_skip`), `lm_head` by default, and
  * layers whose weight is tied to another module's (a tied lm_head shares the input embedding:
    quantizing it would untie the two), whether the tie is already made (one shared Parameter)
    or only declared (transformers' `all_tied_weights_keys`, before `tie_weights()` runs).
Embeddings and norms are not nn.Linear, so they always stay as they are.
"""
from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn
from tqdm.auto import tqdm

from .nn import TritLinear

DEFAULT_SKIP = ("lm_head",)


def matches_skip(name: str, skip: Iterable[str]) -> bool:
    """True if a module name matches a skip pattern. A pattern is an fnmatch glob compared with
    the full dotted name and with each of its dotted suffixes, so "lm_head" matches "lm_head",
    "mlp.gate" matches "model.layers.3.mlp.gate" (not "mlp.gate_proj"), and "model.layers.0.*"
    matches everything in layer 0."""
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatchcase(s, pattern) for pattern in skip for s in suffixes)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters reachable from more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def tied_weight_keys(model: nn.Module) -> set[str]:
    """Both names of every pair of tied parameters declared by a transformers model
    (`all_tied_weights_keys`, e.g. lm_head.weight and model.embed_tokens.weight)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values())


def quantizable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the nn.Linear modules `quantize_model` would replace (see the module docstring)."""
    skip = tuple(skip)
    shared = _shared_parameter_ids(model)
    tied = tied_weight_keys(model)
    # type() rather than isinstance: subclasses such as MultiheadAttention's out_proj are read
    # by their owner through .weight, never called, so they must stay nn.Linear.
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and module.weight.dim() == 2
            and not matches_skip(name, skip) and id(module.weight) not in shared
            and f"{name}.weight" not in tied]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, depth: int = 2, skip: Iterable[str] = DEFAULT_SKIP,
                   progress: bool = True) -> nn.Module:
    """Replace every quantizable nn.Linear of `model` by a TritLinear at `depth`, in place, on the
    device each weight lives on, and return the model. A quantized model is inference-only, so
    its remaining parameters are frozen (requires_grad=False): TritLinear refuses inputs that
    need a gradient."""
    names = quantizable_linears(model, skip)
    for name in tqdm(names, desc="quantizing", unit="layer", disable=not progress):
        linear = model.get_submodule(name)
        replace_module(model, name, TritLinear.from_linear(linear, depth=depth))
    model.requires_grad_(False)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype, progress: bool = False) -> nn.Module:
    """Replace every TritLinear of `model` by a plain nn.Linear holding the dequantized weight in
    `dtype` (the codec's reference decoder: float32 codebook * level, rounded once), in place,
    and return the model. The result is a stock model, e.g. for `save_pretrained`."""
    names = [name for name, module in model.named_modules() if isinstance(module, TritLinear)]
    for name in tqdm(names, desc="dequantizing", unit="layer", disable=not progress):
        layer = model.get_submodule(name)
        weight = layer.trit_weight.dequantize(dtype)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device="meta", dtype=dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        replace_module(model, name, linear)
    return model
