"""transformers integration: from_pretrained on packed checkpoints after `import tritllm_ext`, and
what happens without the import."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import assert_logits_close, greedy, logits, tiny_llama, tiny_qwen2, token_ids
from transformers import AutoModelForCausalLM

import tritllm_ext
from tritllm_ext import TritLinear, dequantize_model, quantize_model, save
from tritllm_ext.checkpoint import CheckpointError, shard_files

# Subprocesses import the same tritllm_ext as this process (a source tree or an installed copy).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(tritllm_ext.__file__)))
PROJECTION = "model.layers.1.mlp.up_proj"


def _trit_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, TritLinear)}


def test_from_pretrained_logits_bit_exact(quantized, saved):
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert set(_trit_modules(model)) == set(_trit_modules(quantized))
    assert model.config.quantization_config.quant_method == "tritllm"
    assert not any(p.requires_grad for p in model.parameters())
    ids = token_ids()
    assert torch.equal(logits(model, ids), logits(quantized, ids))
    assert torch.equal(greedy(model, ids), greedy(quantized, ids))


def test_from_pretrained_matches_tritllm_load(saved):
    ids = token_ids()
    a = AutoModelForCausalLM.from_pretrained(saved)
    b = tritllm_ext.load(saved, device="cpu")
    assert torch.equal(logits(a, ids), logits(b, ids))


def test_from_pretrained_dtype(saved):
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    layer = model.get_submodule(PROJECTION)
    assert layer.trit_codebook.dtype == torch.float32 and layer.trit_packed.dtype == torch.uint8
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert logits(model, token_ids()).dtype == torch.bfloat16


def test_tied_embeddings_and_biases(tmp_path):
    model = quantize_model(tiny_qwen2(), progress=False)
    save(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    ids = token_ids()
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_from_pretrained_model_saves_with_tritllm_save(quantized, saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved)
    save(model, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["quantization_config"]["modules"] == list(_trit_modules(quantized))
    ids = token_ids()
    assert torch.equal(logits(tritllm_ext.load(tmp_path), ids), logits(quantized, ids))


def test_save_pretrained_is_refused(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path)


def _rewrite_shard(model_dir, edit):
    (path,) = shard_files(model_dir)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _corrupt_byte(tensors):
    tensors[f"{PROJECTION}.trit_packed"][2, 3] = 243


def _drop_codebook(tensors):
    del tensors[f"{PROJECTION}.trit_codebook"]


def _drop_norm(tensors):
    del tensors["model.norm.weight"]


def _meta_version(tensors):
    tensors[f"{PROJECTION}.trit_meta"][0] = 5


@pytest.mark.parametrize("edit,message", [
    (_corrupt_byte, rf"^{PROJECTION}: 1 corrupt packed byte"),
    (_drop_codebook, rf"missing tensor {PROJECTION}\.trit_codebook"),
    (_drop_norm, r"lacks tensor\(s\) model\.norm\.weight"),
    (_meta_version, r"unknown format version 5"),
])
def test_broken_checkpoints_raise(saved, tmp_path, edit, message):
    shutil.copytree(saved, tmp_path / "broken")
    _rewrite_shard(tmp_path / "broken", edit)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path / "broken")


def test_unknown_format_version_in_config(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "broken")
    path = tmp_path / "broken" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["format_version"] = 2
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown tritllm format version 2"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "broken")


def _python(code):
    env = dict(os.environ,
               PYTHONPATH=PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_without_import_transformers_refuses_to_load(saved):
    """Stock transformers warns that it does not know quant_method "tritllm" and then finds no
    model.safetensors: it raises instead of returning a model with random weights."""
    result = _python("from transformers import AutoModelForCausalLM\n"
                     f"AutoModelForCausalLM.from_pretrained({str(saved)!r})")
    assert result.returncode != 0
    assert "Unknown quantization type, got tritllm" in result.stderr
    assert "OSError: Error no file named model.safetensors" in result.stderr


def test_import_is_cheap_and_registers_lazily():
    result = _python("import sys, tritllm_ext\n"
                     "assert 'transformers' not in sys.modules, 'transformers imported early'\n"
                     "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
                     "assert 'tritllm' in AUTO_QUANTIZER_MAPPING\n"
                     "print('ok')")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map(quantized, saved, device_map):
    pytest.importorskip("accelerate", reason="transformers needs accelerate for a device_map")
    model = AutoModelForCausalLM.from_pretrained(saved, device_map=device_map)
    assert isinstance(model.get_submodule(PROJECTION), TritLinear)
    ids = token_ids()
    out = logits(model, ids)
    if out.is_cuda:  # "auto" with a GPU: other kernels, so the tolerance of tiny_models.py
        reference = dequantize_model(copy.deepcopy(quantized), torch.float32)
        assert_logits_close(out, logits(reference, ids))
    else:
        assert torch.equal(out, logits(quantized, ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_pretrained_on_cuda(quantized, saved):
    model = AutoModelForCausalLM.from_pretrained(saved, device_map="cuda", dtype=torch.float32)
    layer = model.get_submodule(PROJECTION)
    assert layer.trit_packed.is_cuda and layer.trit_codebook.dtype == torch.float32
    ids = token_ids()
    reference = dequantize_model(copy.deepcopy(quantized), torch.float32)
    assert_logits_close(logits(model, ids), logits(reference, ids))
