"""tritllm_ext: balanced-ternary (trit) quantized LLM weights at their real bit-width."""
import torch  # noqa: F401  (loads libtorch before our library)

from . import _C  # noqa: F401  (registers torch.ops.tritllm.*)
from .format import FORMAT_VERSION
