"""Build of the tritllm_ext._C extension: C++ CPU kernels always, CUDA kernels when possible.

    pip install --no-build-isolation .      (torch must already be installed)

Environment:
  TRITLLM_FORCE_CPU=1     build without CUDA even if nvcc and a CUDA torch are present
  TRITLLM_FORCE_CUDA=1    build the CUDA kernels even without a visible GPU (needs nvcc)
  TORCH_CUDA_ARCH_LIST    CUDA archs; default: the visible GPU, else 8.0;8.6;8.9;9.0
"""
import glob
import json
import os
import platform

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _want_cuda():
    if _flag("TRITLLM_FORCE_CPU"):
        return False
    have_nvcc = cpp_extension.CUDA_HOME is not None
    have_cuda_torch = torch.version.cuda is not None
    if _flag("TRITLLM_FORCE_CUDA"):
        if not (have_nvcc and have_cuda_torch):
            raise RuntimeError("TRITLLM_FORCE_CUDA=1 needs nvcc (CUDA_HOME) and a CUDA build of "
                               f"torch; found CUDA_HOME={cpp_extension.CUDA_HOME}, "
                               f"torch.version.cuda={torch.version.cuda}")
        return True
    return have_nvcc and have_cuda_torch


def _cuda_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}.{minor}"
    else:
        archs = DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch's nvcc flag builder
    return archs


def _is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


class BuildWithSimdUnits(cpp_extension.BuildExtension):
    """torch's BuildExtension gives every C++ file the same flags; the AVX2 translation units
    (csrc/cpu/avx2/*.cpp) alone need -mavx2 -mfma, so they are compiled first, on their own, and
    linked in as objects. The rest of the library never uses AVX2 instructions, so it runs on any
    x86-64 CPU and the choice between the paths is made at run time (csrc/cpu/dispatch.cpp)."""

    def build_extension(self, ext):
        simd = [s for s in ext.sources if os.sep + "avx2" + os.sep in s]
        if simd and _is_x86():
            ext.sources = [s for s in ext.sources if s not in simd]
            args = dict(ext.extra_compile_args)
            args["cxx"] = list(args.get("cxx", [])) + ["-mavx2", "-mfma"]
            objs = self.compiler.compile(simd, output_dir=self.build_temp,
                                         include_dirs=ext.include_dirs,
                                         macros=ext.define_macros, extra_postargs=args)
            ext.extra_objects = list(ext.extra_objects or []) + objs
        super().build_extension(ext)


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")
                     + glob.glob("csrc/cpu/avx2/*.cpp"))
    # at::parallel_for expands to OpenMP pragmas in our own translation units: without
    # -fopenmp they would be ignored and every kernel would run on one thread.
    cxx = ["-O3", "-std=c++17"] + (["-fopenmp"] if platform.system() == "Linux" else [])
    link = ["-fopenmp"] if platform.system() == "Linux" else []
    macros = [("TRITLLM_VERSION", f'"{VERSION}"'),
              ("TRITLLM_TORCH_VERSION", f'"{torch.__version__}"')]
    build = {"version": VERSION, "torch": torch.__version__, "cuda": with_cuda,
             "cuda_archs": _cuda_arch_list() if with_cuda else None,
             "cuda_version": torch.version.cuda if with_cuda else None}
    with open(os.path.join(ROOT, "tritllm_ext", "_build_config.json"), "w") as f:
        json.dump(build, f, indent=1)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("TRITLLM_WITH_CUDA", "1"))
        return cpp_extension.CUDAExtension(
            "tritllm_ext._C", sources, define_macros=macros, extra_link_args=link,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                                                     "-lineinfo"]})
    return cpp_extension.CppExtension("tritllm_ext._C", sources, define_macros=macros,
                                      extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="tritllm_ext",
    version=VERSION,
    description="Balanced-ternary (trit) quantized LLM kernels for PyTorch, CPU and CUDA",
    packages=find_packages(include=["tritllm_ext", "tritllm_ext.*"]),
    package_data={"tritllm_ext": ["_build_config.json"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildWithSimdUnits.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "safetensors>=0.4", "numpy", "tqdm"],
    extras_require={"hf": ["transformers>=4.57"], "bench": ["matplotlib"],
                    "test": ["pytest", "transformers>=4.57", "matplotlib"]},
    entry_points={"console_scripts": ["tritllm=tritllm_ext.cli:main"]},
)
