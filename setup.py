"""Build of the tritllm_ext._C extension: C++ CPU kernels always, CUDA kernels when possible.

    pip install torch                          (first: the build compiles against it)
    pip install --no-build-isolation .         (build isolation would build against another torch)
    python setup.py build_ext --inplace        (development build inside the source tree)

Package metadata lives in pyproject.toml; this file only describes the compiled library.

Environment:
  TRITLLM_FORCE_CPU=1     build without CUDA even if nvcc and a CUDA torch are present
  TRITLLM_FORCE_CUDA=1    build the CUDA kernels even without a visible GPU (needs nvcc)
  TORCH_CUDA_ARCH_LIST    CUDA archs; default: the visible GPUs, else 8.0;8.6;8.9;9.0. Hopper
                          (9.0) is compiled as 9.0a, whose wgmma instructions the batch kernel
                          uses (csrc/cuda/tile_gemm.cu); 9.0+PTX keeps its PTX as well
  MAX_JOBS                parallel compile jobs (read by torch's ninja build)
"""
import glob
import importlib.util
import json
import os
import platform
import re

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ModuleNotFoundError as e:
    raise SystemExit("tritllm_ext compiles against the installed torch: install torch first, "
                     "then `pip install --no-build-isolation .`") from e

DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"
# The file the build writes next to _C; tritllm_ext/_loader.py reads it before importing _C.
BUILD_CONFIG_NAME = "_build_config.json"

# Instruction-set units: csrc/cpu/<name>/*.cpp. On x86 they alone are compiled with these flags,
# so the rest of the library runs on any x86-64 CPU and csrc/cpu/dispatch.cpp picks a unit at
# run time. Elsewhere they are compiled without the flags, and their `#if defined(__AVX2__)`
# guards leave only a stub that tells dispatch.cpp the unit is absent.
X86_SIMD_UNITS = {"avx2": ["-mavx2", "-mfma"]}


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _sources(pattern):
    return sorted(glob.glob(pattern))


def _simd_unit_sources():
    """{unit name: its sources}, for the units that have sources."""
    units = {name: _sources(f"csrc/cpu/{name}/*.cpp") for name in X86_SIMD_UNITS}
    return {name: sources for name, sources in units.items() if sources}


def _want_cuda(cuda_sources):
    if _flag("TRITLLM_FORCE_CPU"):
        return False
    have_nvcc = cpp_extension.CUDA_HOME is not None
    have_cuda_torch = torch.version.cuda is not None
    if _flag("TRITLLM_FORCE_CUDA"):
        if not (have_nvcc and have_cuda_torch and cuda_sources):
            raise RuntimeError(
                "TRITLLM_FORCE_CUDA=1 needs nvcc (CUDA_HOME), a CUDA build of torch and CUDA "
                f"sources; found CUDA_HOME={cpp_extension.CUDA_HOME}, torch.version.cuda="
                f"{torch.version.cuda}, {len(cuda_sources)} csrc/cuda/*.cu files")
        return True
    return have_nvcc and have_cuda_torch and bool(cuda_sources)


def _check_cuda_home():
    """torch takes the toolkit from CUDA_HOME, else two levels above the nvcc on PATH: a wrapper
    script there (e.g. /usr/local/bin/nvcc) points it at a directory with no toolkit, and the
    build would fail at link time with `cannot find -lcudart`."""
    home = cpp_extension.CUDA_HOME
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        raise RuntimeError(f"CUDA_HOME={home} holds no CUDA toolkit (no include/cuda_runtime.h): "
                           "set CUDA_HOME to the toolkit's root (e.g. /usr/local/cuda), or build "
                           "without CUDA with TRITLLM_FORCE_CPU=1")


def _cuda_library_include_dirs():
    """ATen's CUDA headers include cuBLAS, cuSPARSE and cuSOLVER headers. A compiler-only CUDA
    toolkit (as on the CI image) lacks them; then take them from the pip packages torch installs
    its CUDA libraries from (nvidia/<package>/include), the headers of the very libraries torch
    runs with."""
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = spec.submodule_search_locations if spec is not None else []
    return sorted(d for root in roots for d in glob.glob(os.path.join(root, "*", "include")))


def _hopper_as_sm90a(archs):
    """9.0 -> 9.0a (sm_90a code runs only on compute capability 9.0, as sm_90 code does, and adds
    wgmma); 9.0+PTX -> 9.0a;9.0+PTX, keeping the portable PTX for newer GPUs."""
    out = []
    for arch in re.split(r"[;\s]+", archs.strip()):
        if arch == "9.0":
            arch = "9.0a"
        elif arch == "9.0+PTX":
            out.append("9.0a")
        if arch and arch not in out:
            out.append(arch)
    return ";".join(out)


def _cuda_arch_list():
    """The archs nvcc compiles for; also exported for torch's nvcc flag builder, which reads
    TORCH_CUDA_ARCH_LIST (without it torch would compile for every arch it knows)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        visible = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        archs = ";".join(f"{major}.{minor}" for major, minor in sorted(visible))
        archs = archs or DEFAULT_CUDA_ARCHS
    archs = _hopper_as_sm90a(archs)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus what it cannot do on its own:

    * torch gives every C++ file of an extension the same flags; on x86 the instruction-set
      units (X86_SIMD_UNITS) alone need theirs, so they are compiled first, on their own, and
      linked in as extra objects. Extra objects come last on the link line, so where an inline
      function (from a header) is emitted by both kinds of unit, the linker keeps the portable
      copy (.ci/check_simd_isolation.py checks the result).
    * it writes BUILD_CONFIG_NAME next to _C: the torch the library was compiled against, CUDA
      and its archs. Both `pip install` and `build_ext --inplace` pass here.
    * it leaves the built library in the source tree as well (see run).
    """

    def build_extension(self, ext):
        for name, sources in (_simd_unit_sources().items() if _is_x86() else ()):
            ext.sources = [s for s in ext.sources if s not in sources]
            args = {lang: list(a) for lang, a in ext.extra_compile_args.items()}
            args["cxx"] += X86_SIMD_UNITS[name]
            ext.extra_objects = list(ext.extra_objects) + self.compiler.compile(
                sources, output_dir=self.build_temp, include_dirs=ext.include_dirs,
                macros=ext.define_macros, extra_postargs=args)
        super().build_extension(ext)

    def run(self):
        super().run()  # builds into build_lib; with --inplace, also copies _C into the sources
        # Every build, `pip install .` included, leaves _C in the source tree too, as --inplace
        # does: `python -m pytest` run in the checkout puts the checkout first on sys.path, and
        # the tests must then find a built package there.
        if not self.inplace:
            self.copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            config = json.dumps({"version": self.distribution.get_version(), **ext.build_config},
                                indent=1)
            package = ext.name.rpartition(".")[0]
            for package_dir in (os.path.join(self.build_lib, *package.split(".")),
                                build_py.get_package_dir(package)):
                with open(os.path.join(package_dir, BUILD_CONFIG_NAME), "w") as f:
                    f.write(config)


def _shared_libstdcxx():
    """Link flags that make the extension use the process's shared libstdc++.

    Some toolchains link libstdc++ statically by default: the lent GPU machine's g++ wrapper
    puts a directory holding only libstdc++.a first in the search path, and others pass
    -static-libstdc++. The extension then carries its own copy of the C++ library, and where
    Python's link flags add -Bsymbolic-functions (Debian and Ubuntu builds of Python do) its calls
    bind to that copy, whose stream and locale state the process never initialized: formatting
    the first error message (std::ostringstream << a number) crashed with a segmentation fault.
    Naming the shared library's file before the driver's own libraries makes the linker resolve
    the C++ library from it, as torch does. By file name: the g++ driver rewrites a plain
    -lstdc++ into the static archive when it links libstdc++ statically."""
    if platform.system() != "Linux":
        return []
    return ["-Wl,--push-state,--no-as-needed", "-l:libstdc++.so.6", "-Wl,--pop-state"]


def _extension():
    cuda_sources = _sources("csrc/cuda/*.cu")
    with_cuda = _want_cuda(cuda_sources)
    simd_units = _simd_unit_sources()
    sources = (_sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
               + [s for unit_sources in simd_units.values() for s in unit_sources])
    # at::parallel_for expands to OpenMP pragmas in our own translation units: without
    # -fopenmp they would be ignored and every kernel would run on one thread.
    openmp = ["-fopenmp"] if platform.system() == "Linux" else []
    cxx = ["-O3"] + openmp
    link = openmp + _shared_libstdcxx()
    cuda_archs = _cuda_arch_list().split(";") if with_cuda else []
    build_config = {
        "torch": torch.__version__,
        "cuda": with_cuda,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cuda_archs": cuda_archs,
    }
    if with_cuda:
        _check_cuda_home()
        # No --use_fast_math: it flushes float32 denormals to zero, and the format defines a
        # weight as the exactly rounded float32 product codebook * level (docs/FORMAT.md).
        # TRITLLM_SM90A tells the host code that Hopper GPUs run sm_90a code (with wgmma).
        sm90a = ["-DTRITLLM_SM90A"] if "9.0a" in cuda_archs else []
        ext = cpp_extension.CUDAExtension(
            "tritllm_ext._C", sources + cuda_sources, include_dirs=_cuda_library_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"] + sm90a},
            extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension("tritllm_ext._C", sources,
                                         extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)
    ext.build_config = build_config
    return ext


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
