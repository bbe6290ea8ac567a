"""The fast decode loop (tritllm_ext/generate.py) against transformers' own generate."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tritllm_ext.generate import (Generator, _argmax_in_two_steps, argmax_last,  # noqa: E402
                                  generate, max_len_for, select_next_token, unsupported_reason)
from tritllm_ext.model import quantize_model  # noqa: E402
from tritllm_ext.nn import TritLinear  # noqa: E402

from tiny_models import SHAPES, greedy, token_ids, tiny_llama  # noqa: E402


def tiny_model(model_type="llama", seed=0, **overrides):
    """The shared tiny shapes (hidden 72: padded groups; grouped-query attention) in any of the
    architectures the decode loop supports."""
    if model_type == "llama":
        return tiny_llama(seed=seed, **overrides)
    config = transformers.AutoConfig.for_model(model_type, **{**SHAPES, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def prompt(batch=2, length=7, seed=1):
    return token_ids(seed=seed, batch=batch, length=length)


def hf_greedy(model, ids, new_tokens):
    """Prompt and continuation, as generate() returns them."""
    return torch.cat([ids, greedy(model, ids, new_tokens)], dim=1)


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}),
    ("llama", dict(num_key_value_heads=4)),                 # plain multi-head attention
    ("llama", dict(num_key_value_heads=1, head_dim=32)),    # one KV head, head_dim != hidden/heads
    ("mistral", dict(sliding_window=None)),
    ("qwen2", dict(tie_word_embeddings=True)),              # q/k/v biases, tied lm_head
    ("qwen3", dict(head_dim=16)),                           # per-head q/k RMSNorm
])
def test_greedy_tokens_match_transformers(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    ids = prompt()
    want = hf_greedy(model, ids, 24)
    assert torch.equal(generate(model, ids, 24), want)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: biases on the fused q/k/v
def test_quantized_model_matches_transformers_on_the_same_trits(model_type):
    model = quantize_model(tiny_model(model_type), depth=2, progress=False)
    assert any(isinstance(m, TritLinear) for m in model.modules())
    ids = prompt(batch=3, length=5)
    assert torch.equal(generate(model, ids, 16), hf_greedy(model, ids, 16))


def test_prompt_of_one_token_and_batch_one():
    model = tiny_model()
    ids = prompt(batch=1, length=1)
    assert torch.equal(generate(model, ids, 10), hf_greedy(model, ids, 10))


def test_generator_is_reusable_across_prompts():
    model = tiny_model()
    gen = Generator(model, batch_size=2, max_len=64)
    first, second = prompt(seed=1, length=9), prompt(seed=2, length=4)
    gen.generate(first, 20)
    assert torch.equal(gen.generate(second, 12), hf_greedy(model, second, 12))
    assert torch.equal(gen.generate(first, 20), hf_greedy(model, first, 20))


def test_stream_yields_the_same_tokens_and_stops_at_eos():
    model = tiny_model()
    ids = prompt(batch=1)
    want = hf_greedy(model, ids, 12)[0, ids.shape[1]:].tolist()
    gen = Generator(model, 1, 64)
    assert [t[0] for t in gen.stream(ids, 12)] == want
    eos = want[4]
    stopped = [t[0] for t in gen.stream(ids, 12, eos_token_id=eos)]
    assert stopped == want[:want.index(eos) + 1]


def test_stream_of_a_batch_stops_when_every_sequence_has_ended():
    model = tiny_model()
    ids = prompt(batch=2)
    want = hf_greedy(model, ids, 10)[:, ids.shape[1]:]
    eos = int(want[0, 2])
    steps = list(Generator(model, 2, 64).stream(ids, 10, eos_token_id=[eos, 9999]))
    ends = [row.index(eos) if eos in row else len(row) - 1 for row in want.tolist()]
    assert len(steps) == max(ends) + 1
    assert torch.equal(torch.tensor(steps).T, want[:, :len(steps)])


def test_on_token_callback_sees_every_step():
    model = tiny_model()
    ids = prompt(batch=2)
    seen = []
    out = generate(model, ids, 6, on_token=seen.append)
    assert torch.equal(torch.tensor(seen).T, out[:, ids.shape[1]:])


def test_compiled_decode_step_gives_the_same_tokens():
    # TritLinear inside torch.compile: the op's fake kernel lets it trace in one graph.
    model = quantize_model(tiny_model(), depth=2, progress=False)
    ids = prompt()
    assert torch.equal(generate(model, ids, 8, compile=True), hf_greedy(model, ids, 8))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny_model()
    ids = prompt()
    torch.manual_seed(5)
    a = generate(model, ids, 12, temperature=1.0, top_k=20)
    torch.manual_seed(5)
    b = generate(model, ids, 12, temperature=1.0, top_k=20)
    assert torch.equal(a, b)
    top1 = generate(model, ids, 12, temperature=0.7, top_k=1)
    assert torch.equal(top1, hf_greedy(model, ids, 12))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_argmax_in_two_steps_is_argmax(device):
    """The two-step reduction of the greedy choice gives argmax's answer: the first maximum,
    NaN as the maximum, rows of any length (padded to whole chunks with -inf)."""
    gen = torch.Generator().manual_seed(0)
    for b, v, dtype in ((1, 128256, torch.float16), (3, 1000, torch.float32),
                        (2, 256 * 7, torch.bfloat16), (1, 255, torch.float16)):
        x = torch.randn(b, v, generator=gen).to(dtype)
        x[0, v // 3] = x[0, v - 1] = 50.0  # a tie across chunks: the first one wins
        if b > 1:
            x[1, :] = 1.0  # all equal: index 0
        if b > 2:
            x[2, 7] = float("nan")
            x[2, v - 2] = float("nan")
        x = x.to(device)
        assert torch.equal(_argmax_in_two_steps(x), x.argmax(dim=-1)), (b, v, dtype)
        assert torch.equal(argmax_last(x), x.argmax(dim=-1))
    assert torch.equal(_argmax_in_two_steps(torch.full((1, 300), float("-inf"))),
                       torch.zeros(1, dtype=torch.long))


def test_select_next_token_samples_the_softmax_within_top_k():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(40000, 1)
    assert torch.equal(select_next_token(logits), torch.zeros(40000, dtype=torch.long))
    tokens = select_next_token(logits, temperature=1.0, top_k=3)
    assert set(tokens.tolist()) <= {0, 1, 4}
    kept = torch.tensor([2.0, 1.0, 0.5])
    want = torch.softmax(kept, 0)
    got = torch.stack([(tokens == t).float().mean() for t in (0, 1, 4)])
    # 40000 draws: the standard error of each frequency is below 0.0025.
    torch.testing.assert_close(got, want, atol=0.012, rtol=0)
    hot = select_next_token(logits, temperature=2.0)
    assert set(hot.tolist()) == {0, 1, 2, 3, 4}


def test_refuses_bad_requests():
    model = tiny_model()
    gen = Generator(model, batch_size=2, max_len=16)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        gen.prefill(prompt(batch=3))
    with pytest.raises(ValueError, match="exceed max_len=16"):
        gen.generate(prompt(length=10), 7)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        gen.generate(prompt(), 0)
    gen.prefill(prompt(length=14))
    gen.step()
    with pytest.raises(ValueError, match="reached max_len=16"):
        gen.step()
    with pytest.raises(ValueError, match="temperature"):
        Generator(model, 1, 16, temperature=-1.0)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        Generator(model, 1, 16, cuda_graph=True)


def test_corrupt_bytes_loaded_by_hand_are_named_before_decoding():
    """The fused products read the buffers without calling the modules, so the decode loop
    validates every TritLinear when it is built."""
    model = quantize_model(tiny_model(), depth=2, progress=False)
    k_proj = model.model.layers[1].self_attn.k_proj
    state = k_proj.state_dict()
    state["trit_packed"] = state["trit_packed"].clone()
    state["trit_packed"][0, 0] = 250  # >= 243: not a valid byte
    k_proj.load_state_dict(state)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj"):
        Generator(model, 1, 16)


def test_unsupported_models_are_named():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2,
                                                                vocab_size=64))
    assert "gpt2" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="fast generation: model_type 'gpt2'"):
        Generator(gpt2, 1, 16)
    mistral = tiny_model("mistral", sliding_window=32)
    assert unsupported_reason(mistral, 32) is None
    assert "sliding attention window" in unsupported_reason(mistral, 64)


def test_max_len_for_rounds_up():
    assert max_len_for(7, 24) == 64
    assert max_len_for(64, 1) == 128


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decode_matches_eager(compile):
    model = quantize_model(tiny_model().cuda(), depth=2, progress=False)
    ids = prompt().cuda()
    eager = Generator(model, 2, 64, cuda_graph=False).generate(ids, 20)
    graphed = Generator(model, 2, 64, cuda_graph=True, compile=compile)
    assert torch.equal(graphed.generate(ids, 20), eager)
    assert torch.equal(graphed.generate(ids, 20), eager)  # replays of the same graph


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_fused_inputs_wiring_gives_the_same_tokens(model_type):
    """The decode step with the element-wise steps inside the products (fuses_inputs: on CUDA
    where the x-table kernel or tile_gemm runs every product), forced on the CPU, where the fused
    ops run their composite: the same numbers as the separate steps, so transformers' tokens."""
    model = quantize_model(tiny_model(model_type), depth=2, progress=False)
    ids = prompt(batch=1, length=5)
    gen = Generator(model, 1, 64)
    assert not gen.forward.fuses_inputs(1)  # a CPU model keeps the separate steps
    gen.forward.fuses_inputs = lambda batch_size: True
    assert torch.equal(gen.generate(ids, 16), hf_greedy(model, ids, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_fused_projections_match_transformers(batch, compile):
    """On CUDA, q/k/v and gate/up run as one launch each (the x-table kernel at batch 1 in
    float32: whole 512-weight windows, hidden 512; tile_gemm, which takes 16-bit types, at batch 3
    in float16), with the residual adds, norms and SiLU-and-multiply computed inside the products;
    greedy tokens still equal transformers' own generate."""
    dtype = torch.float32 if batch == 1 else torch.float16
    model = quantize_model(tiny_model(hidden_size=512, intermediate_size=1024).to("cuda", dtype),
                           depth=2, progress=False)
    ids = prompt(batch=batch, length=5)
    want = hf_greedy(model, ids, 16)
    gen = Generator(model, batch, 64, compile=compile)
    assert gen.forward.fuses_inputs(batch)
    assert torch.equal(gen.generate(ids.cuda(), 16).cpu(), want)
