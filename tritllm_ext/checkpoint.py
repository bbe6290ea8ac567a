"""Packed checkpoints on disk: save, load, streaming conversion, info (docs/CHECKPOINTS.md).

A packed checkpoint is a Hugging Face model directory whose safetensors shards
(tritllm-0000i-of-0000n.safetensors, listed in tritllm.safetensors.index.json) store every
quantized nn.Linear `name` as `name.trit_packed`, `name.trit_codebook`, `name.trit_meta`
(docs/FORMAT.md) and everything else as usual, and whose config.json carries

    "quantization_config": {"quant_method": "tritllm", "format_version": 1, "depth": 2,
                             "group_size": 16, "modules": [...], "skip": [...]}

The shards are deliberately not named model*.safetensors: stock transformers (without
`import tritllm_ext`) then finds no weights and raises, instead of loading a model whose
quantized layers are missing and randomly initialized.

Nothing here unpickles: weights are read with safetensors only, and a directory that only
holds pickle files (.bin, .pt, ...) is refused.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from . import format as fmt
from .adoption import NonConformingWeightError, adopt_with_report
from .codec import TritWeight, quantize
from .model import DEFAULT_SKIP, quantizable_linears, replace_module, tied_weight_keys
from .nn import TRIT_BUFFERS, TritLinear, validate_modules

QUANT_METHOD = "tritllm"
CONFIG_FILE = "config.json"
PACKED_INDEX_FILE = "tritllm.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # plain (unquantized) checkpoints, read by convert
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Files a model directory may carry next to its weights, copied to a converted checkpoint.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
              "merges.txt", "chat_template.jinja", "chat_template.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Weight files a new checkpoint replaces: its own, and a plain one that stock transformers would
# otherwise load in their place.
_WEIGHT_FILE = re.compile(r"(model|tritllm)(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}
_TRIT_DTYPES = {"trit_packed": "U8", "trit_codebook": "F32", "trit_meta": "I64"}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or does not match its config."""


# ---------------------------------------------------------------------------------------------
# Reading a directory: shard files, tensor headers, the quantization config
# ---------------------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _files_from_index(model_dir: str, index_path: str) -> list[str]:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: has no weight_map")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        path = os.path.join(model_dir, name)
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(model_dir):
            raise CheckpointError(f"{index_path}: shard {name!r} is outside the directory")
        if not os.path.isfile(path):
            raise CheckpointError(f"{index_path}: lists shard {name}, which is missing")
        files.append(path)
    return files


def shard_files(model_dir: str) -> list[str]:
    """The safetensors files of a model directory: a packed checkpoint's (from its index) or a
    plain one's (model.safetensors, or from model.safetensors.index.json). A directory with
    pickle weights only is refused: loading them could run arbitrary code."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: not a directory")
    for index_name in (PACKED_INDEX_FILE, INDEX_FILE):
        index_path = os.path.join(model_dir, index_name)
        if os.path.isfile(index_path):
            return _files_from_index(model_dir, index_path)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single_path):
        return [single_path]
    pickles = sorted(f for f in os.listdir(model_dir) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(f"{model_dir}: holds pickle weights only ({', '.join(pickles)}); "
                              "refusing to unpickle them (it can run arbitrary code). Convert "
                              "them to safetensors first, from a source you trust.")
    raise CheckpointError(f"{model_dir}: no {PACKED_INDEX_FILE}, {INDEX_FILE} or {SINGLE_FILE} "
                          "found")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str  # safetensors dtype name: "U8", "F32", "BF16", ...
    shape: tuple[int, ...]


def read_tensor_index(files: Iterable[str]) -> dict[str, TensorInfo]:
    """Name -> (file, dtype, shape) of every tensor in the shards, from their headers only.
    safetensors checks at open that a file's data covers its header, so a truncated shard fails
    here."""
    index: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in index:
                        raise CheckpointError(f"{path}: tensor {name} is also in "
                                              f"{index[name].file}")
                    view = f.get_slice(name)
                    index[name] = TensorInfo(path, view.get_dtype(), tuple(view.get_shape()))
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt "
                                  f"({e})") from None
    return index


def check_quantization_config(qc, where: str) -> dict:
    """Validate a config.json "quantization_config" of quant_method "tritllm"; return it."""
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: config.json has no quantization_config: not a packed "
                              "tritllm checkpoint")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quantization_config.quant_method is "
                              f"{qc.get('quant_method')!r}, not {QUANT_METHOD!r}")
    if qc.get("format_version") != fmt.FORMAT_VERSION:
        raise CheckpointError(f"{where}: unknown tritllm format version "
                              f"{qc.get('format_version')!r} (this tritllm_ext reads version "
                              f"{fmt.FORMAT_VERSION})")
    if qc.get("group_size") != fmt.GROUP_SIZE:
        raise CheckpointError(f"{where}: group_size must be {fmt.GROUP_SIZE}, got "
                              f"{qc.get('group_size')!r}")
    if qc.get("depth") not in fmt.DEPTHS:
        raise CheckpointError(f"{where}: depth must be one of {fmt.DEPTHS}, got "
                              f"{qc.get('depth')!r}")
    modules = qc.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise CheckpointError(f"{where}: quantization_config.modules must be a list of names")
    return qc


def open_shard(path: str):
    """safe_open, reading with pread where safetensors supports it: an mmap would add the whole
    shard's pages to the resident memory while tensors are copied out of it."""
    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.7 has no backend argument
        return safe_open(path, framework="pt")


def _is_trit_key(name: str) -> bool:
    return name.rpartition(".")[2] in _TRIT_DTYPES


def _read_meta(info: TensorInfo, key: str) -> list[int]:
    with open_shard(info.file) as f:
        return [int(v) for v in f.get_tensor(key).tolist()]


def check_packed_matrix(index: dict[str, TensorInfo], name: str, out_features: int,
                        in_features: int, depth: int) -> int:
    """Check the three tensors of packed matrix `name` against an [out, in] Linear at `depth`
    (presence, dtypes, shapes, the recorded version/depth/N/K); return the codebook size. The
    bytes themselves are checked once loaded (TritLinear.validate)."""
    infos = {}
    for suffix in TRIT_BUFFERS:
        key = f"{name}.{suffix}"
        info = index.get(key)
        if info is None:
            raise CheckpointError(f"missing tensor {key} (module {name} is listed as quantized)")
        if info.dtype != _TRIT_DTYPES[suffix]:
            raise CheckpointError(f"{info.file}: {key} has dtype {info.dtype}, expected "
                                  f"{_TRIT_DTYPES[suffix]}")
        infos[suffix] = info
    if infos["trit_meta"].shape != (4,):
        raise CheckpointError(f"{infos['trit_meta'].file}: {name}.trit_meta has shape "
                              f"{infos['trit_meta'].shape}, expected (4,)")
    version, meta_depth, n, k = _read_meta(infos["trit_meta"], f"{name}.trit_meta")
    if version != fmt.FORMAT_VERSION:
        raise CheckpointError(f"{infos['trit_meta'].file}: {name}.trit_meta records unknown "
                              f"format version {version} (this tritllm_ext reads version "
                              f"{fmt.FORMAT_VERSION})")
    if (meta_depth, n, k) != (depth, out_features, in_features):
        raise CheckpointError(f"{infos['trit_meta'].file}: {name}.trit_meta records depth="
                              f"{meta_depth}, N={n}, K={k}; expected depth={depth}, "
                              f"N={out_features}, K={in_features}")
    packed_shape = (out_features, fmt.packed_row_bytes(in_features, depth))
    if infos["trit_packed"].shape != packed_shape:
        raise CheckpointError(f"{infos['trit_packed'].file}: {name}.trit_packed has shape "
                              f"{infos['trit_packed'].shape}, expected {packed_shape}")
    codebook = infos["trit_codebook"].shape
    if len(codebook) != 1 or not 1 <= codebook[0] <= fmt.MAX_CODEBOOK:
        raise CheckpointError(f"{infos['trit_codebook'].file}: {name}.trit_codebook has shape "
                              f"{codebook}, expected (C,) with 1 <= C <= {fmt.MAX_CODEBOOK}")
    return codebook[0]


def swap_in_empty_trit_linears(model: nn.Module, qc: dict, index: dict[str, TensorInfo]) -> None:
    """Replace the nn.Linear modules listed in `qc["modules"]` by empty TritLinear modules on
    the meta device, shaped from the checkpoint (after checking it against each Linear)."""
    for name in qc["modules"]:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantization_config lists module {name}, which "
                                  f"{type(model).__name__} does not have") from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"quantization_config lists module {name}, which is a "
                                  f"{type(linear).__name__}, not an nn.Linear")
        codebook_size = check_packed_matrix(index, name, linear.out_features, linear.in_features,
                                            qc["depth"])
        replace_module(model, name, TritLinear(linear.in_features, linear.out_features,
                                         bias=linear.bias is not None, depth=qc["depth"],
                                         codebook_size=codebook_size, device="meta",
                                         dtype=linear.weight.dtype))


# ---------------------------------------------------------------------------------------------
# Writing: shards, config, side files
# ---------------------------------------------------------------------------------------------

def parse_size(size) -> int:
    """2000000, "2GB" (10^9) or "2GiB" (2^30) -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be an int or like '2GB' / '500MiB', got {size!r}")
    value, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(value) * base ** " KMGT".index(unit.upper() or " "))


class ShardWriter:
    """Writes tensors, in the order given, into safetensors shards of at most `max_shard_bytes`
    (a single larger tensor gets a shard of its own), named tritllm-0000i-of-0000n.safetensors
    and listed in tritllm.safetensors.index.json. Weight files already in `out_dir` are removed
    first, so an older checkpoint cannot mix in."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard_of: dict[str, int] = {}
        self.shards = 0
        self.total_bytes = 0
        for name in os.listdir(out_dir):
            if _WEIGHT_FILE.fullmatch(name) or name.startswith(".tmp-shard-"):
                os.remove(os.path.join(out_dir, name))

    def _tmp_path(self, i: int) -> str:
        return os.path.join(self.out_dir, f".tmp-shard-{i:05d}.safetensors")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, self._tmp_path(self.shards), metadata={"format": "pt"})
        for name in self.pending:
            self.shard_of[name] = self.shards
        self.shards += 1
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give the shards their final names, write the index; return the file names."""
        self.flush()
        if self.shards == 0:
            raise CheckpointError("nothing to save: the model has no tensors")
        names = [f"tritllm-{i + 1:05d}-of-{self.shards:05d}.safetensors"
                 for i in range(self.shards)]
        for i, name in enumerate(names):
            os.replace(self._tmp_path(i), os.path.join(self.out_dir, name))
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {k: names[i] for k, i in self.shard_of.items()}}
        with open(os.path.join(self.out_dir, PACKED_INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        return names + [PACKED_INDEX_FILE]


def copy_side_files(src_dir: str, out_dir: str) -> list[str]:
    """Copy tokenizer and generation files of `src_dir` that exist; return their names."""
    copied = []
    for name in SIDE_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def unique_state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent parameters and buffers of `model`, a tensor shared by several names (tied
    embeddings) listed once, under its first name (the input embedding, as transformers does),
    and the target of a declared tie (lm_head.weight) left out even while it is not yet tied."""
    targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen and name not in targets:
            seen.add(id(tensor))
            tensors[name] = tensor
    return tensors


def quantization_config(model: nn.Module) -> dict:
    """The config.json "quantization_config" describing `model`'s TritLinear layers."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, TritLinear)}
    if not modules:
        raise ValueError("the model has no TritLinear layers: run tritllm_ext.quantize_model "
                         "first")
    depths = sorted({m.depth for m in modules.values()})
    if len(depths) != 1:
        raise ValueError(f"all TritLinear layers must share one depth to be saved, found {depths}")
    skipped = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {"quant_method": QUANT_METHOD, "format_version": fmt.FORMAT_VERSION,
            "depth": depths[0], "group_size": fmt.GROUP_SIZE, "modules": list(modules),
            "skip": skipped}


def save(model: nn.Module, out_dir, max_shard_size="2GB", tokenizer=None) -> list[str]:
    """Write `model` (a transformers model with TritLinear layers) as a packed checkpoint:
    safetensors shards, config.json with its quantization_config, generation_config.json, and
    tokenizer files when `tokenizer` is given (a tokenizer object, or a directory to copy its
    tokenizer files from). Returns the names of the weight files."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError("save() needs a transformers PreTrainedModel (it writes its config.json)")
    qc = quantization_config(model)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(out_dir, parse_size(max_shard_size))
    for name, tensor in unique_state_tensors(model).items():
        writer.add(name, tensor)
    names = writer.finish()
    config = copy.deepcopy(config)
    config.quantization_config = qc
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(out_dir)
    if isinstance(tokenizer, (str, os.PathLike)):
        copy_side_files(os.fspath(tokenizer), out_dir)
    elif tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return names


# ---------------------------------------------------------------------------------------------
# Loading without the Auto classes
# ---------------------------------------------------------------------------------------------

def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("building the model architecture needs transformers: pip install "
                          "'transformers>=5'") from None
    return transformers


def _model_class(transformers, config):
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise CheckpointError(f"config.json names architectures {config.architectures}, none of "
                          f"which transformers {transformers.__version__} provides")


def read_config(model_dir: str):
    """config.json of `model_dir` as a transformers config object."""
    return _require_transformers().AutoConfig.from_pretrained(model_dir)


@contextlib.contextmanager
def parameters_on_meta():
    """Create every nn.Parameter on the meta device (no memory, no init cost) while buffers are
    built for real: non-persistent buffers such as rotary tables are computed in __init__ and
    never stored in a checkpoint, so they must not be meta."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The transformers model of `config` (its `architectures`) with every parameter on the meta
    device, unquantized tensors typed `dtype` (default: the config's dtype)."""
    model_cls = _model_class(_require_transformers(), config)
    with parameters_on_meta():
        return model_cls._from_config(config, dtype=dtype or config.dtype or torch.float32)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _list(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load(model_dir, device="cpu", dtype: torch.dtype | None = None,
         progress: bool = False) -> nn.Module:
    """Load a packed checkpoint into its transformers architecture with TritLinear layers, on
    `device`, unquantized tensors in `dtype` (default: config.json's dtype). Tensors go one by
    one from the shards to `device`; no dense copy of a quantized weight is ever made. Every
    mismatch (missing, unexpected, mis-shaped or corrupt tensor, unknown version) raises
    CheckpointError naming the file and tensor. Returns the model in eval mode, frozen."""
    model_dir = os.fspath(model_dir)
    files = shard_files(model_dir)
    config_dict = _read_json(os.path.join(model_dir, CONFIG_FILE))
    qc = check_quantization_config(config_dict.get("quantization_config"), model_dir)
    index = read_tensor_index(files)
    config = read_config(model_dir)
    dtype = dtype or config.dtype or torch.float32
    model = build_skeleton(config, dtype)
    swap_in_empty_trit_linears(model, qc, index)

    expected = unique_state_tensors(model)
    missing = expected.keys() - index.keys()
    unexpected = index.keys() - expected.keys() - tied_weight_keys(model)
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor(s) {_list(missing)}")
    if unexpected:
        raise CheckpointError(f"{model_dir}: unexpected tensor(s) {_list(unexpected)} (not part "
                              f"of {type(model).__name__})")
    for name, empty in expected.items():
        info = index[name]
        if info.shape != tuple(empty.shape):
            raise CheckpointError(f"{info.file}: {name} has shape {info.shape}, expected "
                                  f"{tuple(empty.shape)}")
        if (empty.is_floating_point() and not _is_trit_key(name)
                and info.dtype not in _FLOAT_DTYPES):
            raise CheckpointError(f"{info.file}: {name} has dtype {info.dtype}, expected a "
                                  "floating-point dtype")

    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(index[name].file, []).append(name)
    with tqdm(total=len(expected), desc="loading", unit="tensor", disable=not progress) as bar:
        for path, names in by_file.items():
            with open_shard(path) as f:
                for name in names:
                    value = f.get_tensor(name)
                    if expected[name].is_floating_point() and not _is_trit_key(name):
                        value = value.to(dtype)
                    _set_tensor(model, name, value.to(device))
                    bar.update()

    model.tie_weights()
    leftover = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if leftover:
        raise CheckpointError(f"{model_dir}: tensor(s) {_list(leftover)} were not loaded")
    model.to(device)  # non-persistent buffers (rotary tables) were built on the CPU
    validate_modules(model)
    if model.can_generate() and os.path.isfile(os.path.join(model_dir, GENERATION_CONFIG_FILE)):
        generation_config = _require_transformers().GenerationConfig
        model.generation_config = generation_config.from_pretrained(model_dir)
    model.config.quantization_config = qc
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Streaming conversion of a plain checkpoint, and info
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MatrixReport:
    name: str
    shape: tuple[int, int]
    bits_per_weight: float
    exact_groups: int | None = None        # adopt: groups reproduced bit-exactly
    requantized_groups: int | None = None  # adopt with requantize: groups quantized afresh


@dataclasses.dataclass
class ConvertReport:
    mode: str
    depth: int
    out_dir: str
    matrices: list[MatrixReport]
    kept: list[str]            # tensors copied unquantized
    source_bytes: int          # the quantized matrices in the source
    packed_bytes: int          # the same matrices packed
    files: list[str]
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        weights = sum(m.shape[0] * m.shape[1] for m in self.matrices)
        return 8.0 * self.packed_bytes / weights if weights else 0.0

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), bits_per_weight=self.bits_per_weight)


def _pack_matrix(name: str, weight: torch.Tensor, mode: str, depth: int, requantize: bool,
                 device) -> tuple[TritWeight, MatrixReport]:
    weight = weight.to(device)
    if mode == "quantize":
        tw = quantize(weight, depth=depth)
        report = MatrixReport(name, tw.shape, tw.bits_per_weight)
    else:
        try:
            tw, adopted = adopt_with_report(weight, depth=depth, strict=not requantize,
                                            name=f"{name}.weight")
        except NonConformingWeightError as e:
            raise CheckpointError(f"adopt: {e} (here: requantize=True, on the command line "
                                  "--requantize; or quantize the model afresh)") from None
        report = MatrixReport(name, tw.shape, tw.bits_per_weight, adopted.exact_groups,
                              adopted.requantized_groups)
    return tw.to("cpu"), report


def convert(src_dir, out_dir, mode: str = "quantize", depth: int = 2, requantize: bool = False,
            skip: Iterable[str] = DEFAULT_SKIP, max_shard_size="2GB", device="cpu",
            progress: bool = True) -> ConvertReport:
    """Convert a plain FP16/BF16/FP32 Hugging Face model directory into a packed checkpoint,
    one source tensor at a time (peak memory: about one output shard plus one matrix).

    mode="quantize" quantizes every quantizable Linear weight with the codec; mode="adopt" packs
    weights that are already trit-dequantized (an Entrit FP16 artifact) bit-exactly, refusing a
    matrix that does not conform unless `requantize`. Which tensors are quantized: the `.weight`
    of every layer `quantize_model` would replace in the model built from config.json (2-D
    nn.Linear, not skipped, not tied to the embedding); everything else is copied as is.
    Tokenizer and generation files are copied. `device` is where matrices are quantized."""
    if mode not in ("quantize", "adopt"):
        raise ValueError(f"mode must be 'quantize' or 'adopt', got {mode!r}")
    if requantize and mode != "adopt":
        raise ValueError("requantize applies to mode='adopt' only")
    fmt.check_depth(depth)
    started = time.perf_counter()
    src_dir, out_dir = os.fspath(src_dir), os.fspath(out_dir)
    files = shard_files(src_dir)
    config_dict = _read_json(os.path.join(src_dir, CONFIG_FILE))
    if config_dict.get("quantization_config") is not None:
        method = config_dict["quantization_config"].get("quant_method")
        raise CheckpointError(f"{src_dir}: already quantized (quant_method {method!r}); convert "
                              "reads FP16/BF16/FP32 checkpoints")
    if os.path.isdir(out_dir) and os.path.samefile(src_dir, out_dir):
        raise ValueError("out_dir must differ from src_dir")
    index = read_tensor_index(files)
    skeleton = build_skeleton(read_config(src_dir))
    modules = quantizable_linears(skeleton, skip)
    for name in modules:
        info = index.get(f"{name}.weight")
        linear = skeleton.get_submodule(name)
        if info is None:
            raise CheckpointError(f"{src_dir}: no tensor {name}.weight for the Linear layer {name} "
                                  f"of {type(skeleton).__name__} (tensor names must match the "
                                  "transformers module names)")
        if info.shape != tuple(linear.weight.shape) or info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: {name}.weight is {info.dtype} {info.shape}, "
                                  f"expected a float tensor of shape {tuple(linear.weight.shape)}")
    to_pack = {f"{name}.weight": name for name in modules}
    skipped = [name for name, m in skeleton.named_modules()
               if isinstance(m, nn.Linear) and name not in modules]
    del skeleton

    os.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(out_dir, parse_size(max_shard_size))
    matrices, kept, source_bytes, packed_bytes = [], [], 0, 0
    with tqdm(total=len(to_pack), desc=mode, unit="matrix", disable=not progress) as bar:
        for path in files:
            with open_shard(path) as f:
                for key in f.keys():
                    value = f.get_tensor(key)
                    if key not in to_pack:
                        writer.add(key, value)
                        kept.append(key)
                        continue
                    tw, report = _pack_matrix(to_pack[key], value, mode, depth, requantize,
                                              device)
                    source_bytes += value.numel() * value.element_size()
                    packed_bytes += tw.nbytes
                    for name, tensor in tw.to_tensors(to_pack[key]).items():
                        writer.add(name, tensor)
                    matrices.append(report)
                    bar.update()
    names = writer.finish()

    qc = {"quant_method": QUANT_METHOD, "format_version": fmt.FORMAT_VERSION, "depth": depth,
          "group_size": fmt.GROUP_SIZE, "modules": [m.name for m in matrices],
          "skip": skipped}
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(dict(config_dict, quantization_config=qc), f, indent=2, sort_keys=True)
    copy_side_files(src_dir, out_dir)
    return ConvertReport(mode, depth, out_dir, matrices, kept, source_bytes, packed_bytes, names,
                         time.perf_counter() - started)


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _nbytes(info: TensorInfo) -> int:
    if info.dtype not in _DTYPE_BYTES:
        raise CheckpointError(f"{info.file}: unsupported tensor dtype {info.dtype}")
    return _DTYPE_BYTES[info.dtype] * int(torch.Size(info.shape).numel())


def info(model_dir) -> dict:
    """Summary of a packed checkpoint from its headers: format version, depth, bits/weight per
    quantized layer and in total, and the size on disk against an FP16 copy of the model."""
    model_dir = os.fspath(model_dir)
    files = shard_files(model_dir)
    qc = check_quantization_config(
        _read_json(os.path.join(model_dir, CONFIG_FILE)).get("quantization_config"), model_dir)
    index = read_tensor_index(files)
    layers, quantized_weights, packed_bytes = {}, 0, 0
    for name in qc["modules"]:
        meta_info = index.get(f"{name}.trit_meta")
        if meta_info is None:
            raise CheckpointError(f"{model_dir}: missing tensor {name}.trit_meta")
        _, depth, n, k = _read_meta(meta_info, f"{name}.trit_meta")
        codebook_size = check_packed_matrix(index, name, n, k, qc["depth"])
        nbytes = index[f"{name}.trit_packed"].shape[1] * n + 4 * codebook_size
        layers[name] = {"shape": [n, k], "depth": depth, "codebook_size": codebook_size,
                        "bytes": nbytes, "bits_per_weight": 8.0 * nbytes / (n * k)}
        quantized_weights += n * k
        packed_bytes += nbytes
    others = [i for key, i in index.items() if not _is_trit_key(key)]
    other_weights = sum(int(torch.Size(i.shape).numel()) for i in others)
    size_on_disk = sum(os.path.getsize(f) for f in files)
    fp16_bytes = 2 * (quantized_weights + other_weights)
    return {"path": model_dir, "format_version": qc["format_version"], "depth": qc["depth"],
            "group_size": qc["group_size"], "layers": layers, "quantized_layers": len(layers),
            "quantized_weights": quantized_weights, "packed_bytes": packed_bytes,
            "bits_per_weight": 8.0 * packed_bytes / quantized_weights if quantized_weights else 0.0,
            "unquantized_tensors": len(others),
            "unquantized_bytes": sum(_nbytes(i) for i in others),
            "size_on_disk": size_on_disk, "fp16_equivalent_bytes": fp16_bytes,
            "compression_vs_fp16": fp16_bytes / size_on_disk}
