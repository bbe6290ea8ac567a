"""tritllm_ext: balanced-ternary (trit) quantized LLM weights at their real bit-width."""
import torch  # noqa: F401  (loads libtorch before our library)

from . import _loader  # noqa: F401  (checks the torch version, imports _C: torch.ops.tritllm.*)
from .build_info import build_info
from .format import FORMAT_VERSION
