"""build_info(): what this install of tritllm_ext was built with and what it runs with."""
import torch

from . import ops
from ._loader import read_build_config


def build_info() -> dict:
    """A dict for bug reports and for checking an install:

    version                package version
    torch_built            torch version the compiled library was built against
    torch_running          torch version running now (always equal, or import would have failed)
    cuda                   whether the CUDA kernels were compiled
    cuda_version           CUDA version of the torch they were compiled for, or None
    cuda_archs             CUDA archs compiled (TORCH_CUDA_ARCH_LIST entries), [] without CUDA
    cpu_kernels_compiled   CPU kernel sets compiled: "scalar" always, "avx2" and "avx512" on
                           x86-64
    cpu_kernels_available  CPU kernel sets this machine can run
    cpu_kernel             the CPU kernel set in use
    """
    config = read_build_config()
    return {
        "version": config["version"],
        "torch_built": config["torch"],
        "torch_running": torch.__version__,
        "cuda": config["cuda"],
        "cuda_version": config["cuda_version"],
        "cuda_archs": config["cuda_archs"],
        "cpu_kernels_compiled": ops.cpu_kernels_compiled(),
        "cpu_kernels_available": ops.cpu_kernels_available(),
        "cpu_kernel": ops.cpu_kernel(),
    }
