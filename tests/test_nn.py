"""TritLinear: construction, forward against a float64 reference, validation, dtype and device
moves, torch.compile."""
import pytest
import torch
from test_cpu_ops import group_max
from torch import nn

from tritllm_ext import format as fmt
from tritllm_ext.codec import quantize
from tritllm_ext.nn import TRIT_BUFFERS, TritLinear, validate_modules

SHAPES = [(1, 1), (33, 70), (16, 16), (7, 300), (64, 129)]  # (out N, in K); odd N, K % 16 != 0
# Rounding of one output (and of the bias addition) to the output dtype: half an ulp each.
OUTPUT_ULP = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# Rounding of W to the activation dtype, which a CUDA fast path multiplies in.
WEIGHT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _layer(n, k, bias=True, depth=2, seed=0):
    torch.manual_seed(seed)
    return TritLinear.from_linear(nn.Linear(k, n, bias=bias), depth=depth)


def _assert_close_to_reference(layer, x, y):
    """y against x @ W.T (+ bias) in float64 from the codec's dense W, within the error the ops
    promise (tests/test_cpu_ops.py, tests/test_cuda_ops.py): float32 accumulation, activations
    rounded to 2^-12 of their group's largest |x| (the AVX2 kernel), W rounded to the activation
    dtype (CUDA fast paths), and the output and bias additions rounded to the output dtype."""
    x64 = x.detach().cpu().double()
    w64 = layer.trit_weight.dequantize(torch.float32).cpu().double()
    ref = x64 @ w64.T
    if layer.bias is not None:
        ref = ref + layer.bias.detach().cpu().double()
    magnitude = x64.abs() @ w64.abs().T
    bound = ((x.shape[-1] + 2) * 2.0 ** -24 * magnitude
             + WEIGHT_ROUNDING[x.dtype] * magnitude
             + 2.0 ** -12 * (group_max(x64) @ w64.abs().T)
             + 2 * OUTPUT_ULP[x.dtype] * ref.abs() + 2.0 ** -24)
    error = (y.detach().cpu().double() - ref).abs()
    assert (error <= bound).all(), f"error exceeds its bound by {float((error - bound).max()):.3g}"


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("depth", fmt.DEPTHS)
def test_forward_matches_float64_reference(n, k, depth):
    layer = _layer(n, k, depth=depth)
    x = torch.randn(3, 5, k)  # extra batch dimensions pass through
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (3, 5, n) and y.dtype == torch.float32
    _assert_close_to_reference(layer, x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_dtypes(dtype, bias):
    layer = _layer(33, 70, bias=bias).to(dtype)
    x = torch.randn(4, 70).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype
    _assert_close_to_reference(layer, x, y)


def test_from_trit_weight_and_state_dict_keys():
    torch.manual_seed(0)
    tw = quantize(torch.randn(9, 40), depth=3)
    bias = torch.randn(9)
    layer = TritLinear.from_trit_weight(tw, bias)
    assert set(layer.state_dict()) == {*TRIT_BUFFERS, "bias"}
    assert torch.equal(layer.trit_packed, tw.packed)
    assert torch.equal(layer.trit_codebook, tw.codebook)
    assert layer.trit_meta.tolist() == [fmt.FORMAT_VERSION, 3, 9, 40]
    assert (layer.in_features, layer.out_features, layer.depth) == (40, 9, 3)
    back = layer.trit_weight
    assert back.shape == (9, 40) and back.depth == 3 and torch.equal(back.packed, tw.packed)
    assert not layer.bias.requires_grad
    with pytest.raises(ValueError, match="bias must have shape"):
        TritLinear.from_trit_weight(tw, torch.zeros(8))


def test_extra_repr():
    text = repr(_layer(33, 64, depth=2))
    assert "in_features=64, out_features=33" in text and "depth=2" in text
    assert "bits_per_weight=3.50" in text


def test_empty_module_on_meta_and_unloaded():
    meta = TritLinear(70, 33, bias=True, depth=2, codebook_size=5, device="meta")
    assert meta.trit_packed.shape == (33, fmt.packed_row_bytes(70, 2))
    assert meta.trit_codebook.shape == (5,) and meta.trit_meta.is_meta
    with pytest.raises(ValueError, match="never loaded"):
        meta.validate("blk.q")
    empty = TritLinear(70, 33)
    with pytest.raises(ValueError, match="holds no weights"), torch.no_grad():
        empty(torch.randn(2, 70))


def test_load_state_dict_validates_before_next_forward():
    source = _layer(33, 70)
    target = TritLinear(70, 33, codebook_size=source.trit_codebook.numel())
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 70)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    corrupt = {k: v.clone() for k, v in source.state_dict().items()}
    corrupt["trit_packed"][3, 5] = 250
    target.load_state_dict(corrupt)
    with pytest.raises(ValueError, match="corrupt packed byte"), torch.no_grad():
        target(x)


def test_validate_names_the_module():
    layer = _layer(33, 70)
    layer.trit_packed[0, 0] = 243
    with pytest.raises(ValueError, match=r"^block\.mlp: .*corrupt"):
        layer.validate("block.mlp")
    model = nn.Sequential(nn.Linear(4, 4), _layer(8, 20))
    assert validate_modules(model) == 1
    model[1].trit_meta[0] = 7
    with pytest.raises(ValueError, match="^1: .*version 7"):
        validate_modules(model)


def test_meta_disagreeing_with_module_is_refused():
    layer = _layer(33, 70, depth=2)
    other = _layer(33, 70, depth=3)
    for key in TRIT_BUFFERS:
        layer._buffers[key] = other._buffers[key]
    with pytest.raises(ValueError, match="records depth=3"):
        layer.validate("x")


def test_dtype_casts_keep_the_codebook_float32():
    layer = _layer(33, 70)
    codebook = layer.trit_codebook.clone()
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()):
        cast(layer)
        assert layer.trit_codebook.dtype == torch.float32
        assert torch.equal(layer.trit_codebook, codebook)
        assert layer.trit_packed.dtype == torch.uint8 and layer.trit_meta.dtype == torch.int64
    assert layer.bias.dtype == torch.float64


def test_inference_only():
    layer = _layer(8, 32)
    x = torch.randn(2, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x)
    with torch.no_grad():
        assert layer(x).shape == (2, 8)


def _check_compiled(backend, device):
    torch._dynamo.reset()
    model = nn.Sequential(_layer(40, 70), nn.SiLU(), _layer(9, 40, bias=False)).to(device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fails on any graph break
    x = torch.randn(3, 70, device=device)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    _check_compiled(backend, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_compile_fullgraph_cuda():
    _check_compiled("inductor", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_forward(dtype):
    layer = _layer(33, 70)
    codebook = layer.trit_codebook.clone()
    layer = layer.to("cuda", dtype)
    assert layer.trit_codebook.dtype == torch.float32 and layer.trit_codebook.is_cuda
    assert torch.equal(layer.trit_codebook.cpu(), codebook)
    x = torch.randn(4, 70).to(dtype)
    with torch.no_grad():
        y = layer(x.cuda())
    assert y.is_cuda and y.dtype == dtype
    _assert_close_to_reference(layer, x, y)
