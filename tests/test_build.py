"""The build record, build_info(), and the refusal to load _C into another torch.

The CMake library and the cross-compiles are checked by .ci/run, not here: they need builds.
"""
import importlib.abc
import pathlib
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import tritllm_ext
from tritllm_ext import _loader


def test_build_info_keys_and_types():
    info = tritllm_ext.build_info()
    assert set(info) == {"version", "torch_built", "torch_running", "cuda", "cuda_version",
                         "cuda_archs", "cpu_kernels_compiled", "cpu_kernels_available",
                         "cpu_kernel"}
    assert isinstance(info["version"], str) and info["version"]
    assert info["torch_built"] == info["torch_running"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert all(isinstance(arch, str) and arch for arch in info["cuda_archs"])
    if info["cuda"]:
        assert info["cuda_version"] == torch.version.cuda and info["cuda_archs"]
    else:
        assert info["cuda_version"] is None and info["cuda_archs"] == []
    assert isinstance(info["cpu_kernel"], str)
    assert all(isinstance(k, str) for k in info["cpu_kernels_available"])
    assert info["cpu_kernel"] in info["cpu_kernels_available"]
    assert "scalar" in info["cpu_kernels_compiled"]
    assert set(info["cpu_kernels_available"]) <= set(info["cpu_kernels_compiled"])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the AVX2 kernels are compiled on x86-64 only")
def test_x86_build_compiles_avx2_kernels():
    assert "avx2" in tritllm_ext.build_info()["cpu_kernels_compiled"]


def test_build_info_matches_registered_kernels():
    """What the build recorded is what the dispatcher holds."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has_kernel("tritllm::matmul", "CPU")
    assert has_kernel("tritllm::matmul", "CUDA") == tritllm_ext.build_info()["cuda"]


def test_same_torch_version_passes():
    _loader.check_torch_version("2.13.0+cpu", "2.13.0+cpu")


@pytest.mark.parametrize("built, running", [("2.13.0+cpu", "2.14.1+cu130"),
                                            ("2.13.0+cu130", "2.13.0+cpu"),
                                            ("2.14.0.dev20250101", "2.14.0.dev20250102")])
def test_other_torch_version_raises_clear_import_error(built, running):
    with pytest.raises(ImportError) as error:
        _loader.check_torch_version(built, running)
    message = str(error.value)
    assert f"built against torch {built}" in message
    assert f"torch {running} is running" in message
    assert "pip install --no-build-isolation" in message


@pytest.fixture
def unimported_extension(monkeypatch):
    """Makes the next `from . import _C` in tritllm_ext import afresh; undone after the test."""
    monkeypatch.delattr(tritllm_ext, "_C")
    monkeypatch.delitem(sys.modules, "tritllm_ext._C")


def test_version_mismatch_is_caught_before_importing_extension(monkeypatch,
                                                               unimported_extension):
    monkeypatch.setattr(_loader, "read_build_config", lambda: {"torch": "1.0.0"})
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0"):
        _loader.load_library()
    assert "tritllm_ext._C" not in sys.modules


class _FailingExtensionFinder(importlib.abc.MetaPathFinder):
    """Makes importing tritllm_ext._C fail the way a torch ABI mismatch does."""

    def find_spec(self, name, path=None, target=None):
        if name == "tritllm_ext._C":
            raise ImportError("/site-packages/tritllm_ext/_C.so: undefined symbol: "
                              "_ZN3c1015SmallVectorBaseIjE8grow_podEPKvmm")
        return None


def test_undefined_symbol_becomes_clear_import_error(monkeypatch, unimported_extension):
    monkeypatch.setattr(sys, "meta_path", [_FailingExtensionFinder()] + sys.meta_path)
    with pytest.raises(ImportError) as error:
        _loader.load_library()
    message = str(error.value)
    assert f"running {torch.__version__}" in message
    assert "undefined symbol" in message
    assert "pip install --no-build-isolation" in message


def test_missing_build_record_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(_loader, "BUILD_CONFIG_PATH", str(tmp_path / "_build_config.json"))
    with pytest.raises(ImportError, match="tritllm_ext is not built"):
        _loader.read_build_config()


def test_ci_runs_the_readme_test_command():
    """.ci/run runs README.md's test command verbatim; the two copies must not drift apart."""
    root = pathlib.Path(__file__).resolve().parents[1]
    match = re.search(r"^README_TEST_COMMAND='(.+)'$", (root / ".ci" / "run").read_text(),
                      re.MULTILINE)
    assert match, ".ci/run defines no README_TEST_COMMAND"
    assert match.group(1) in (root / "README.md").read_text()


@pytest.mark.skipif(platform.system() != "Linux", reason="ELF shared libraries only")
def test_extension_uses_the_shared_cpp_library():
    """A statically linked copy of libstdc++ inside _C crashed formatting error messages on a
    machine whose g++ links it statically (setup.py, _shared_libstdcxx)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    library = pathlib.Path(tritllm_ext._C.__file__)
    dynamic = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True,
                             check=True).stdout
    assert re.search(r"NEEDED.*\[libstdc\+\+\.so", dynamic), dynamic


def test_error_messages_format_numbers():
    """The symptom of that crash where it does not crash: numbers missing from messages."""
    with pytest.raises(RuntimeError, match="depth must be 1, 2, 3 or 4, got 5$"):
        torch.ops.tritllm.unpack(torch.zeros(3, 7, dtype=torch.uint8), torch.ones(3), 5, 16,
                                 torch.float32)
