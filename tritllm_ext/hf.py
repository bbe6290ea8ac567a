"""Registers quant_method "tritllm" with transformers, without importing transformers early.

`import tritllm_ext` calls `install()`. Importing transformers' quantizer registry takes seconds,
so it is not done here: if transformers has already loaded it, the quantizer is registered at
once; otherwise a one-shot import hook registers it the moment transformers loads it (which
`from_pretrained` always does). Without transformers installed, nothing happens.

The quantizer itself lives in hf_quantizer.py, which imports transformers.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

REGISTRY_MODULE = "transformers.quantizers.auto"


def register() -> None:
    """Register the tritllm quantization config and HfQuantizer (idempotent)."""
    importlib.import_module("tritllm_ext.hf_quantizer").register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers' quantizer registry like the normal import system does, but runs
    `register()` right after the module has executed. Removes itself on first use."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module_then_register(module):
            execute(module)
            register()

        spec.loader.exec_module = exec_module_then_register
        return spec


def install() -> None:
    if REGISTRY_MODULE in sys.modules:
        register()
    elif (importlib.util.find_spec("transformers") is not None
          and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path)):
        sys.meta_path.insert(0, _RegisterAfterImport())
