"""Fixtures shared by the checkpoint and transformers tests: one quantized tiny Llama per test
module, and its packed checkpoint."""
import pytest
from tiny_models import tiny_llama

from tritllm_ext import quantize_model, save


@pytest.fixture(scope="module")
def quantized():
    return quantize_model(tiny_llama(), progress=False)


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    save(quantized, out)
    return out
