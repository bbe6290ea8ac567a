"""quantize_model / dequantize_model on tiny transformers models: which layers, logits against
the dequantized reference, greedy generation."""
import copy

import pytest
import torch
from tiny_models import (
    LOGIT_TOLERANCE,
    assert_logits_close,
    greedy,
    logits,
    tiny_llama,
    tiny_qwen2,
    token_ids,
)
from torch import nn

from tritllm_ext import TritLinear, dequantize_model, quantize_model
from tritllm_ext.model import matches_skip, quantizable_linears

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantized_and_reference(model, depth=2):
    quantize_model(model, depth=depth, progress=False)
    reference = dequantize_model(copy.deepcopy(model), torch.float32).float()
    return model, reference


def test_matches_skip():
    assert matches_skip("lm_head", ["lm_head"])
    assert matches_skip("model.layers.3.mlp.gate", ["mlp.gate"])
    assert not matches_skip("model.layers.3.mlp.gate_proj", ["mlp.gate"])
    assert matches_skip("model.layers.0.self_attn.q_proj", ["model.layers.0.*"])
    assert not matches_skip("model.layers.10.self_attn.q_proj", ["model.layers.1.*"])
    assert matches_skip("model.layers.7.self_attn.k_proj", ["*k_proj"])
    assert not matches_skip("model.layers.7.self_attn.k_proj", [])


def test_replaces_every_projection_but_not_lm_head():
    model = tiny_llama()
    quantize_model(model, progress=False)
    quantized = {n for n, m in model.named_modules() if isinstance(m, TritLinear)}
    assert quantized == {f"model.layers.{i}.{part}.{p}" for i in range(2)
                         for part, names in (("self_attn", PROJECTIONS[:4]),
                                             ("mlp", PROJECTIONS[4:])) for p in names}
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert not any(p.requires_grad for p in model.parameters())


def test_skip_patterns():
    model = tiny_llama()
    quantize_model(model, skip=("lm_head", "mlp.*", "model.layers.1.*"), progress=False)
    quantized = {n for n, m in model.named_modules() if isinstance(m, TritLinear)}
    assert quantized == {f"model.layers.0.self_attn.{p}" for p in PROJECTIONS[:4]}


def test_tied_lm_head_is_never_quantized():
    model = tiny_qwen2()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" not in quantizable_linears(model, skip=())
    quantize_model(model, skip=(), progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].self_attn.q_proj, TritLinear)
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_multihead_attention_out_proj_is_left_alone():
    # MultiheadAttention reads out_proj.weight directly; its out_proj is a Linear subclass.
    model = nn.Sequential(nn.MultiheadAttention(32, 4), nn.Linear(32, 8))
    assert quantizable_linears(model, skip=()) == ["1"]


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_logits_match_dequantized_reference(depth):
    model, reference = _quantized_and_reference(tiny_llama(), depth)
    ids = token_ids()
    assert_logits_close(logits(model, ids), logits(reference, ids))


def test_qwen2_with_biases_matches_reference():
    model, reference = _quantized_and_reference(tiny_qwen2())
    ids = token_ids()
    assert_logits_close(logits(model, ids), logits(reference, ids))


def _assert_greedy_identical(model, reference):
    ids = token_ids(batch=1)
    tokens = greedy(reference, ids)
    # Why identical tokens are a fair demand: at every step of the reference the best token
    # leads the second by more than twice the logit tolerance, so errors within the tolerance
    # cannot change any choice. (Seed 3 is a model where this holds.)
    steps = logits(reference, torch.cat([ids, tokens], 1))[:, ids.shape[1] - 1:-1]
    top2 = steps.topk(2, dim=-1).values
    margin = float((top2[..., 0] - top2[..., 1]).min())
    assert margin > 2 * LOGIT_TOLERANCE * float(logits(reference, ids).abs().max())
    assert torch.equal(greedy(model, ids), tokens)


def test_greedy_generation_identical():
    _assert_greedy_identical(*_quantized_and_reference(tiny_llama(seed=3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(dtype):
    model, reference = _quantized_and_reference(tiny_llama(dtype=dtype))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.trit_codebook.dtype == torch.float32
    ids = token_ids()
    out = logits(model, ids)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # The reference runs in float32 while the model keeps half-precision activations.
    scale = logits(reference, ids).abs().max()
    assert (out.float() - logits(reference, ids)).abs().max() < 0.1 * scale


def test_dequantize_model_restores_plain_linears():
    model = tiny_qwen2()
    quantize_model(model, progress=False)
    layer = model.model.layers[1].self_attn.k_proj
    expected_weight = layer.trit_weight.dequantize(torch.float16)
    expected_bias = layer.bias.detach().to(torch.float16)
    dequantize_model(model, torch.float16)
    assert not any(isinstance(m, TritLinear) for m in model.modules())
    linear = model.model.layers[1].self_attn.k_proj
    assert type(linear) is nn.Linear and linear.weight.dtype == torch.float16
    assert torch.equal(linear.weight, expected_weight) and torch.equal(linear.bias, expected_bias)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_logits_and_generation_match_reference():
    model = tiny_llama(seed=3).to("cuda")
    quantize_model(model, progress=False)  # quantizes on the GPU
    assert model.model.layers[0].self_attn.q_proj.trit_packed.is_cuda
    reference = dequantize_model(copy.deepcopy(model).cpu(), torch.float32)
    assert_logits_close(logits(model, token_ids()), logits(reference, token_ids()))
    _assert_greedy_identical(model, reference)
