"""Loads the compiled library tritllm_ext._C, refusing a torch it was not built against.

A C++ extension is tied to the exact torch it was compiled with: loaded into another one it fails
with an undefined symbol or, worse, loads and crashes later. So the build records its torch
version in _build_config.json (setup.py writes it next to _C), and importing this module (the
package's __init__ does) compares it with the running torch before _C is ever imported.
"""
import json
import os

import torch

BUILD_CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_config.json")
REINSTALL_HINT = ("Rebuild tritllm_ext against the running torch: `pip install "
                  "--no-build-isolation .` in the tritllm_ext source tree (or `python setup.py "
                  "build_ext --inplace` in a development checkout). Without --no-build-isolation "
                  "pip would build against a different, temporary torch.")


def read_build_config() -> dict:
    """What the build recorded: version, torch, cuda, cuda_version, cuda_archs."""
    try:
        with open(BUILD_CONFIG_PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ImportError(f"tritllm_ext is not built: {BUILD_CONFIG_PATH} is missing. Install it "
                          "with `pip install --no-build-isolation .`, or run `python setup.py "
                          "build_ext --inplace` in a development checkout.") from None


def check_torch_version(built: str, running: str) -> None:
    """Raises ImportError unless the running torch is exactly the one _C was compiled against."""
    if built != running:
        raise ImportError(f"tritllm_ext was built against torch {built}, but torch {running} is "
                          f"running; its compiled library may fail to load or crash later. "
                          f"{REINSTALL_HINT}")


def load_library() -> None:
    """Imports tritllm_ext._C, which registers torch.ops.tritllm.*, after the version check."""
    built = read_build_config()["torch"]
    check_torch_version(built, torch.__version__)
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        if "undefined symbol" not in str(e):
            raise
        # Same version string but another build of torch (or a stale _C from an earlier build).
        raise ImportError(f"tritllm_ext's compiled library does not match the running torch "
                          f"(recorded: built against torch {built}, running {torch.__version__}): "
                          f"{e}. {REINSTALL_HINT}") from e


load_library()
