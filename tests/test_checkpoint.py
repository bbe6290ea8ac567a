"""Packed checkpoints: save / load round trips, sharding, tied embeddings, tokenizer files,
the streaming converter (quantize and adopt), info, and clear errors for every kind of broken
checkpoint. Nothing is ever unpickled."""
import copy
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import assert_logits_close, logits, tiny_llama, tiny_qwen2, token_ids

from tritllm_ext import TritLinear, convert, dequantize_model, info, load, quantize_model, save
from tritllm_ext import format as fmt
from tritllm_ext.checkpoint import CheckpointError, shard_files

PROJECTION = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def broken(saved, tmp_path):
    """A private copy of the saved checkpoint to damage."""
    out = tmp_path / "broken"
    shutil.copytree(saved, out)
    return out


def _edit_tensors(model_dir, edit):
    """Rewrite the (single) shard of `model_dir` with edit(tensors) applied."""
    (path,) = shard_files(model_dir)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def _edit_config(model_dir, edit):
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)


def _trit_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, TritLinear)}


def test_saved_layout(quantized, saved):
    files = sorted(os.listdir(saved))
    assert files == ["config.json", "generation_config.json", "tritllm-00001-of-00001.safetensors",
                     "tritllm.safetensors.index.json"]
    with open(saved / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    assert qc == {"quant_method": "tritllm", "format_version": fmt.FORMAT_VERSION, "depth": 2,
                  "group_size": 16, "modules": list(_trit_modules(quantized)),
                  "skip": ["lm_head"]}
    with safe_open(str(saved / files[2]), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor(f"{PROJECTION}.trit_meta").tolist() == [1, 2, 72, 72]
    assert {f"{PROJECTION}.trit_packed", f"{PROJECTION}.trit_codebook", "lm_head.weight",
            "model.embed_tokens.weight", "model.norm.weight"} <= keys
    assert f"{PROJECTION}.weight" not in keys


def test_save_load_logits_bit_exact(quantized, saved):
    loaded = load(saved)
    assert set(_trit_modules(loaded)) == set(_trit_modules(quantized))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ids = token_ids()
    assert torch.equal(logits(loaded, ids), logits(quantized, ids))


def test_load_dtype(saved):
    loaded = load(saved, dtype=torch.bfloat16)
    layer = loaded.model.layers[1].mlp.down_proj
    assert layer.trit_codebook.dtype == torch.float32 and layer.trit_packed.dtype == torch.uint8
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    assert logits(loaded, token_ids()).dtype == torch.bfloat16


def test_sharded_save(quantized, tmp_path):
    files = save(quantized, tmp_path, max_shard_size="30KB")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"tritllm-00001-of-{len(shards):05d}.safetensors"
    with open(tmp_path / "tritllm.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map.values()) == set(shards)
    ids = token_ids()
    assert torch.equal(logits(load(tmp_path), ids), logits(quantized, ids))


def test_tied_embeddings_saved_once(tmp_path):
    model = quantize_model(tiny_qwen2(), progress=False)
    save(model, tmp_path)
    (path,) = shard_files(tmp_path)
    with safe_open(path, framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert "model.layers.0.self_attn.q_proj.bias" in f.keys()
    loaded = load(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = token_ids()
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_tokenizer_files(quantized, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "trit": 1}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    save(quantized, tmp_path / "a", tokenizer=tokenizer)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "a"))
    save(quantized, tmp_path / "b", tokenizer=tmp_path / "a")  # a directory: copy its files
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "b"))


def test_save_removes_stale_weight_files(quantized, tmp_path):
    tiny_llama().save_pretrained(tmp_path)  # a plain checkpoint stock transformers would load
    assert "model.safetensors" in os.listdir(tmp_path)
    save(quantized, tmp_path)
    assert "model.safetensors" not in os.listdir(tmp_path)


def test_save_needs_trit_layers(tmp_path):
    with pytest.raises(ValueError, match="no TritLinear layers"):
        save(tiny_llama(), tmp_path)


def test_info(saved):
    summary = info(saved)
    assert summary["format_version"] == 1 and summary["depth"] == 2
    assert summary["quantized_layers"] == 14
    layer = summary["layers"]["model.layers.0.mlp.down_proj"]  # K = 136: 9 groups for 136
    assert layer["shape"] == [72, 136] and layer["codebook_size"] <= 27
    assert layer["bytes"] == 72 * 9 * 7 + 4 * layer["codebook_size"]
    assert 3.5 < summary["bits_per_weight"] < 4.5
    files = [f for f in os.listdir(saved) if f.endswith(".safetensors")]
    assert summary["size_on_disk"] == sum(os.path.getsize(saved / f) for f in files)
    assert summary["compression_vs_fp16"] > 1


def _plain_checkpoint(model, path, dtype=torch.float16):
    model.to(dtype).save_pretrained(path)
    return path


def test_convert_quantize_matches_quantize_model(tmp_path):
    src = _plain_checkpoint(tiny_llama(), tmp_path / "src")
    report = convert(src, tmp_path / "out", depth=3, progress=False)
    assert report.mode == "quantize" and len(report.matrices) == 14
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(report.kept)
    assert report.packed_bytes < report.source_bytes / 2
    assert "generation_config.json" in os.listdir(tmp_path / "out")
    expected = quantize_model(tiny_llama().to(torch.float16), depth=3, progress=False)
    loaded = load(tmp_path / "out")
    for name, layer in _trit_modules(expected).items():
        got = loaded.get_submodule(name)
        assert torch.equal(got.trit_packed, layer.trit_packed), name
        assert torch.equal(got.trit_codebook, layer.trit_codebook), name
    assert info(tmp_path / "out")["depth"] == 3


def test_convert_adopt_is_bit_exact(tmp_path):
    """quantize -> dequantize to FP16 -> plain HF checkpoint -> adopt: every weight bit-exact."""
    model = quantize_model(tiny_qwen2(), progress=False)
    dequantized = dequantize_model(copy.deepcopy(model), torch.float16)
    src = _plain_checkpoint(dequantized, tmp_path / "src")
    report = convert(src, tmp_path / "out", mode="adopt", progress=False)
    assert len(report.matrices) == len(_trit_modules(model))
    for matrix in report.matrices:
        groups = matrix.shape[0] * fmt.num_groups(matrix.shape[1])
        assert matrix.exact_groups == groups and matrix.requantized_groups == 0
    loaded = load(tmp_path / "out")
    plain = dict(dequantized.named_parameters())
    for name in _trit_modules(model):
        weight = loaded.get_submodule(name).trit_weight.dequantize(torch.float16)
        assert torch.equal(weight, plain[f"{name}.weight"]), name


def test_convert_adopt_refuses_non_conforming_weights(tmp_path):
    src = _plain_checkpoint(tiny_llama(), tmp_path / "src")
    with pytest.raises(CheckpointError, match=r"adopt: model\.layers\.0\.mlp\.down_proj\.weight: "
                                              r"648 of 648 groups are not the exact.*requantize"):
        convert(src, tmp_path / "out", mode="adopt", progress=False)
    report = convert(src, tmp_path / "out", mode="adopt", requantize=True, progress=False)
    assert all(m.requantized_groups > 0 for m in report.matrices)


def test_convert_refuses_bad_sources(saved, tmp_path):
    with pytest.raises(CheckpointError, match="already quantized"):
        convert(saved, tmp_path / "out", progress=False)
    src = _plain_checkpoint(tiny_llama(), tmp_path / "src")
    with pytest.raises(ValueError, match="must differ"):
        convert(src, src, progress=False)
    with pytest.raises(ValueError, match="mode must be"):
        convert(src, tmp_path / "out", mode="fp8", progress=False)


def _drop(key):
    return lambda tensors: tensors.pop(key)


def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


def _corrupt_byte(tensors):
    tensors[f"{PROJECTION}.trit_packed"][0, 0] = 250


def _meta_version(tensors):
    tensors[f"{PROJECTION}.trit_meta"][0] = 2


BROKEN_TENSORS = {
    "missing packed tensor": (_drop(f"{PROJECTION}.trit_codebook"),
                              rf"missing tensor {PROJECTION}\.trit_codebook"),
    "missing plain tensor": (_drop("model.norm.weight"),
                             r"missing tensor\(s\) model\.norm\.weight"),
    "unexpected tensor": (_set("model.extra.weight", torch.zeros(3)),
                          r"unexpected tensor\(s\) model\.extra\.weight"),
    "wrong packed shape": (_set(f"{PROJECTION}.trit_packed", torch.zeros(72, 30).byte()),
                           rf"{PROJECTION}\.trit_packed has shape \(72, 30\), expected \(72, 35\)"),
    "wrong plain shape": (_set("model.norm.weight", torch.ones(71)),
                          r"model\.norm\.weight has shape \(71,\), expected \(72,\)"),
    "wrong codebook dtype": (_set(f"{PROJECTION}.trit_codebook", torch.ones(27).half()),
                             rf"{PROJECTION}\.trit_codebook has dtype F16, expected F32"),
    "unknown meta version": (_meta_version, r"unknown format version 2"),
    "byte >= 243": (_corrupt_byte, rf"^{PROJECTION}: 1 corrupt packed byte"),
}


@pytest.mark.parametrize("case", BROKEN_TENSORS)
def test_broken_tensors_raise_clear_errors(broken, case):
    edit, message = BROKEN_TENSORS[case]
    _edit_tensors(broken, edit)
    with pytest.raises(ValueError, match=message):
        load(broken)


def test_unknown_format_version_in_config(broken):
    _edit_config(broken, lambda c: c["quantization_config"].update(format_version=2))
    with pytest.raises(CheckpointError, match="unknown tritllm format version 2"):
        load(broken)


def test_module_missing_from_architecture(broken):
    _edit_config(broken, lambda c: c["quantization_config"]["modules"].append("model.layers.9.mlp"))
    with pytest.raises(CheckpointError, match=r"lists module model\.layers\.9\.mlp, which "
                                              "LlamaForCausalLM does not have"):
        load(broken)


def test_not_a_packed_checkpoint(broken):
    _edit_config(broken, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="not a packed tritllm checkpoint"):
        load(broken)


def test_truncated_shard(broken):
    (path,) = shard_files(broken)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match=f"{path}: .*truncated or corrupt"):
        load(broken)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        info(broken)


def test_missing_shard(broken):
    (path,) = shard_files(broken)
    os.remove(path)
    with pytest.raises(CheckpointError, match="lists shard tritllm-00001-of-00001.safetensors, "
                                              "which is missing"):
        load(broken)


def _pickle_only_directory(path):
    """A model directory whose weights are a pickle file, as old checkpoints are."""
    model = tiny_llama()
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # written, never read
    return path


def test_pickle_files_are_refused(tmp_path):
    src = _pickle_only_directory(tmp_path / "bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load(src)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        convert(src, tmp_path / "out", progress=False)


def test_nothing_is_unpickled(saved, tmp_path, monkeypatch):
    def unpickling(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    src = _pickle_only_directory(tmp_path / "bin")
    plain = _plain_checkpoint(tiny_llama(), tmp_path / "plain")
    monkeypatch.setattr(torch, "load", unpickling)
    monkeypatch.setattr(pickle, "load", unpickling)
    monkeypatch.setattr(pickle, "loads", unpickling)
    monkeypatch.setattr(pickle, "Unpickler", unpickling)
    load(saved)
    info(saved)
    convert(plain, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load(src)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_on_cuda(quantized, saved):
    loaded = load(saved, device="cuda")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.trit_packed.is_cuda and layer.trit_codebook.dtype == torch.float32
    assert loaded.model.rotary_emb.inv_freq.is_cuda
    ids = token_ids()
    reference = dequantize_model(copy.deepcopy(quantized), torch.float32)
    assert_logits_close(logits(loaded, ids), logits(reference, ids))
