"""Loads the CMake-built operator library with torch.ops.load_library and runs one matmul.

    python .ci/check_cmake_library.py BUILD_DIR/libtritllm.so

The tritllm_ext package is not imported: its _C registers the same ops, and a second
registration of the tritllm library fails. The reference codec (tritllm_ext/format.py, plain
PyTorch) is loaded straight from its file instead.
"""
import importlib.util
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_reference_codec():
    spec = importlib.util.spec_from_file_location("tritllm_format",
                                                  ROOT / "tritllm_ext" / "format.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_matmul(fmt, kernel):
    """One small matmul (odd sizes, K not a multiple of 16) on the CPU kernel set `kernel`,
    against a float64 reference. A smoke check of the library, not of the kernels' precision
    (tests/test_cpu_ops.py checks that): the error bound, 1e-3 of |x| @ |W|.T, allows the AVX2
    kernel's quantized activations, and a wrong kernel misses it by orders of magnitude."""
    gen = torch.Generator().manual_seed(0)
    n, k, m, depth = 5, 37, 3, 2
    lmax = fmt.max_level(depth)
    levels = torch.randint(-lmax, lmax + 1, (n, k), generator=gen, dtype=torch.int8)
    idx = torch.randint(0, fmt.MAX_CODEBOOK, (n, fmt.num_groups(k)), generator=gen,
                        dtype=torch.uint8)
    codebook = torch.rand(fmt.MAX_CODEBOOK, generator=gen) + 0.1
    x = torch.randn(m, k, generator=gen)
    packed = fmt.pack(levels, idx, depth)

    scales = codebook[idx.long()].repeat_interleave(fmt.GROUP_SIZE, dim=1)[:, :k]
    weight = scales.double() * levels.double()
    expected = x.double() @ weight.T
    bound = 1e-3 * (x.double().abs() @ weight.abs().T)
    torch.ops.tritllm._cpu_kernel(kernel)
    with torch.no_grad():
        got = torch.ops.tritllm.matmul(x, packed, codebook, depth, k)
    error = (got.double() - expected).abs()
    if not (error <= bound).all():
        sys.exit(f"torch.ops.tritllm.matmul with the {kernel} CPU kernels is off by "
                 f"{error.max().item():.3g} (allowed {bound.min().item():.3g} and more)")


def main():
    library = pathlib.Path(sys.argv[1]).resolve()
    torch.ops.load_library(str(library))
    for op in ("matmul", "unpack"):
        if not hasattr(torch.ops.tritllm, op):
            sys.exit(f"{library} does not define torch.ops.tritllm.{op}")
    fmt = load_reference_codec()
    kernels = list(torch.ops.tritllm._cpu_kernels_available())
    for kernel in kernels:
        check_matmul(fmt, kernel)
    print(f"ok: {library.name} loads with torch {torch.__version__}; torch.ops.tritllm.matmul "
          f"matches the Python reference with the CPU kernels {kernels}")


if __name__ == "__main__":
    main()
