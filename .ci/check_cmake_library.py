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


def check_matmul(fmt):
    """One small matmul (odd sizes, K not a multiple of 16) against the float64 reference."""
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
    expected = x.double() @ (scales.double() * levels.double()).T
    with torch.no_grad():
        got = torch.ops.tritllm.matmul(x, packed, codebook, depth, k)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def main():
    library = pathlib.Path(sys.argv[1]).resolve()
    torch.ops.load_library(str(library))
    for op in ("matmul", "unpack"):
        if not hasattr(torch.ops.tritllm, op):
            sys.exit(f"{library} does not define torch.ops.tritllm.{op}")
    check_matmul(load_reference_codec())
    print(f"ok: {library.name} loads with torch {torch.__version__}; "
          "torch.ops.tritllm.matmul matches the Python reference")


if __name__ == "__main__":
    main()
