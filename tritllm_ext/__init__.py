"""tritllm_ext: balanced-ternary (trit) quantized LLM weights at their real bit-width."""
import torch  # noqa: F401  (loads libtorch before our library)

from . import _loader  # noqa: F401  (checks the torch version, imports _C: torch.ops.tritllm.*)
from . import hf
from .adoption import AdoptReport, NonConformingWeightError, adopt, adopt_with_report
from .build_info import build_info
from .checkpoint import convert, info, load, save
from .codec import TritWeight, dequantize, quantize
from .format import FORMAT_VERSION
from .model import dequantize_model, quantize_model
from .nn import TritLinear
from .ops import cpu_kernel, cpu_kernels_available, matmul, set_cpu_kernel, unpack

hf.install()  # quant_method "tritllm" for transformers' from_pretrained, if it is installed
