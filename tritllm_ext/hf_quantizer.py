"""transformers integration: `AutoModelForCausalLM.from_pretrained(packed_dir)` builds TritLinear
layers and fills them from a packed checkpoint (docs/CHECKPOINTS.md).

How loading goes (transformers 5.x):
1. config.json's quantization_config {"quant_method": "tritllm", ...} selects TritLLMConfig and
   TritLLMHfQuantizer (registered by hf.py on `import tritllm_ext`).
2. A config hook points transformers at tritllm.safetensors.index.json: the shards are named
   so that stock transformers, without this quantizer, finds no weights.
3. Before weights load, the model (on the meta device) gets an empty TritLinear for each module
   of quantization_config.modules, shaped and checked against the shard headers.
4. transformers copies trit_packed / trit_codebook / trit_meta into the buffers, tensor by
   tensor, on the device_map's devices, never building a dense weight.
5. After loading, every TritLinear validates its bytes (an error names the module) and the
   model is frozen: TritLinear is inference-only.

This module imports transformers; import it only through hf.register().
"""
from __future__ import annotations

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import format as fmt
from .checkpoint import (
    PACKED_INDEX_FILE,
    QUANT_METHOD,
    CheckpointError,
    check_quantization_config,
    read_tensor_index,
    swap_in_empty_trit_linears,
    unique_state_tensors,
)
from .model import tied_weight_keys
from .nn import validate_modules

logger = logging.get_logger(__name__)


class TritLLMConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a packed checkpoint (written by tritllm_ext.save and
    tritllm_ext.convert, never by hand)."""

    def __init__(self, format_version: int = fmt.FORMAT_VERSION, depth: int = 2,
                 group_size: int = fmt.GROUP_SIZE, modules: list[str] | None = None,
                 skip: list[str] | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.depth = depth
        self.group_size = group_size
        self.modules = list(modules or [])
        self.skip = list(skip or [])
        check_quantization_config(self.to_dict(), "quantization_config")


class TritLLMHfQuantizer(HfQuantizer):
    """Loads packed tritllm checkpoints. It does not quantize on the fly: use
    tritllm_ext.quantize_model or tritllm_ext.convert, then load the result."""

    requires_calibration = True  # only pre-quantized checkpoints

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("tritllm checkpoints cannot be offloaded to disk; use devices only")

    # transformers looks the weight files up right after the quantizer has seen the model config
    # through one hook, whose name changed within 5.x: update_tp_plan (e.g. 5.17),
    # update_attn_implementation (e.g. 5.24). Both point it at the packed index.
    def update_tp_plan(self, config):
        config.transformers_weights = PACKED_INDEX_FILE
        return config

    def update_attn_implementation(self, config):
        config.transformers_weights = PACKED_INDEX_FILE
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise CheckpointError("tritllm: transformers found no checkpoint files to load")
        pickles = [f for f in checkpoint_files if not str(f).endswith(".safetensors")]
        if pickles:
            raise CheckpointError(f"tritllm: refusing to unpickle {pickles}; packed checkpoints "
                                  "are safetensors only")
        qc = check_quantization_config(self.quantization_config.to_dict(), "quantization_config")
        index = read_tensor_index(checkpoint_files)
        swap_in_empty_trit_linears(model, qc, index)
        # transformers only warns about missing tensors and initializes them randomly; for the
        # architecture the checkpoint was saved from, names match exactly, so insist.
        if type(model).__name__ in (getattr(model.config, "architectures", None) or []):
            missing = unique_state_tensors(model).keys() - index.keys() - tied_weight_keys(model)
            if missing:
                raise CheckpointError(f"tritllm: checkpoint lacks tensor(s) "
                                      f"{', '.join(sorted(missing)[:5])}"
                                      f"{' and more' if len(missing) > 5 else ''}")

    def _process_model_after_weight_loading(self, model, **kwargs):
        validate_modules(model)
        model.requires_grad_(False)
        return model

    def is_serializable(self):
        logger.warning("save a tritllm model with tritllm_ext.save(model, out_dir): "
                       "save_pretrained would write shards that stock transformers loads wrongly")
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(TritLLMConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(TritLLMHfQuantizer)
