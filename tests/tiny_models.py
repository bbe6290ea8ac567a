"""Tiny transformers models built from a config with a fixed seed (no downloads), shared by the
model, checkpoint and transformers-integration tests."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 256
# A quantized model against its dequantized float32 reference (the same function): the AVX2 CPU
# kernel rounds each activation to about 2^-12 of its group's largest |x| (tests/test_cpu_ops.py),
# which leaves logit errors of up to 7e-4 of the largest |logit| in these models (measured over
# seeds; the scalar kernel and float32 CUDA stay under 2e-6). Stated tolerance: 2e-3 of the
# largest |logit|.
LOGIT_TOLERANCE = 2e-3
# hidden 72 and intermediate 136 are not multiples of 16: every matrix has a padded last group.
SHAPES = dict(hidden_size=72, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
              # larger than the default 0.02, so logits are spread out and greedy decoding
              # does not hinge on near-ties
              initializer_range=0.2,
              # no end-of-sequence token: generation always runs its full length
              eos_token_id=None, pad_token_id=0)


def tiny_llama(seed: int = 0, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{**SHAPES, "tie_word_embeddings": False, **overrides})
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_qwen2(seed: int = 0, dtype=torch.float32) -> Qwen2ForCausalLM:
    """Qwen2 has biases on q/k/v_proj and ties its embeddings."""
    torch.manual_seed(seed)
    config = Qwen2Config(**SHAPES, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(dtype).eval()


def token_ids(seed: int = 1, batch: int = 2, length: int = 11) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def assert_logits_close(got: torch.Tensor, reference: torch.Tensor) -> None:
    atol = LOGIT_TOLERANCE * float(reference.abs().max())
    torch.testing.assert_close(got.cpu().float(), reference.cpu().float(), rtol=0, atol=atol)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device)).logits


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int = 32) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                         max_new_tokens=new_tokens, do_sample=False)
    return out[:, ids.shape[1]:].cpu()
