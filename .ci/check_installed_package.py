"""Checks a non-editable install of tritllm_ext: run it from outside the source tree.

    cd /somewhere/else && python SOURCE/.ci/check_installed_package.py SOURCE [--cuda-archs 9.0]

It must import the installed copy (not SOURCE), which must hold every module of SOURCE's package
plus the compiled library and the build record, and build_info() must describe that build.
"""
import argparse
import importlib.util
import json
import pathlib
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=pathlib.Path)
    parser.add_argument("--cuda-archs", help="expect a CUDA build for these archs (a;b;c)")
    args = parser.parse_args()
    source_package = (args.source / "tritllm_ext").resolve()

    # Find the installed copy without importing it, so the checks below see it as installed.
    spec = importlib.util.find_spec("tritllm_ext")
    if spec is None:
        sys.exit("tritllm_ext is not installed")
    installed = pathlib.Path(spec.origin).parent.resolve()
    if installed == source_package:
        sys.exit(f"imported the source tree {installed}, not an installed copy: run from "
                 "another directory")

    missing = sorted(p.name for p in source_package.glob("*.py")
                     if not (installed / p.name).exists())
    if not list(installed.glob("_C*.so")):
        missing.append("_C*.so")
    if not (installed / "_build_config.json").exists():
        missing.append("_build_config.json")
    if missing:
        sys.exit(f"the installed package {installed} lacks {missing}")

    import tritllm_ext
    info = tritllm_ext.build_info()
    print(f"installed at {installed}:\n{json.dumps(info, indent=1)}")
    if info["torch_built"] != info["torch_running"]:
        sys.exit("build_info: torch_built != torch_running")
    if args.cuda_archs is not None:
        if not info["cuda"] or info["cuda_archs"] != args.cuda_archs.split(";"):
            sys.exit(f"expected a CUDA build for {args.cuda_archs}")
        import torch
        if not torch._C._dispatch_has_kernel_for_dispatch_key("tritllm::matmul", "CUDA"):
            sys.exit("the CUDA build registered no CUDA kernel for tritllm::matmul")
    print("ok: the installed package is complete")


if __name__ == "__main__":
    main()
