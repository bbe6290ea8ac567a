"""`tritllm demo`: the whole pipeline on a model built on the spot, with no download.

1. build a small Llama-architecture model with random weights (fixed seed) and a byte-level
   tokenizer, and save them as an FP16 Hugging Face directory;
2. quantize it into a packed checkpoint with the streaming converter (`tritllm quantize`);
3. reload the packed checkpoint through `AutoModelForCausalLM.from_pretrained`;
4. compare its logits with the dequantized reference (the same trits as dense FP weights);
5. generate with the fast decode loop and print tokens/s.

The builders here (`byte_level_tokenizer`, `build_random_llama`) are also what the tests and
bench/e2e_bench.py use to make models without downloading any.
"""
from __future__ import annotations

import copy
import os
import string
import sys
import tempfile
import time

import torch

from . import checkpoint
from .cli import format_speed, prompt_ids, stream_generation
from .generate import Generator, max_len_for
from .model import dequantize_model

# A small Llama: 4 layers, grouped-query attention (8 query heads over 4 key/value heads).
DEMO_CONFIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
DEMO_SEED = 0
# Standard deviation of the random weights: small enough that activations stay finite through
# many layers in float16, as with a real model's initialisation.
INIT_STD = 0.02
# The demo's weights are a little larger than INIT_STD, so that every layer, not only the last
# token's embedding, sways the next token: the output varies instead of repeating one character.
DEMO_STD = 0.05

BOS, EOS = "<s>", "</s>"


def byte_level_tokenizer():
    """A tokenizer built in code: one token per byte (256) plus BOS and EOS, no merges. Any text
    round-trips through it, and `save_pretrained` writes a tokenizer.json that AutoTokenizer
    reads back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS)


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**overrides)


def build_random_llama(config, dtype: torch.dtype = torch.float32, device="cpu",
                       seed: int = 0, std: float = INIT_STD):
    """A LlamaForCausalLM (or any transformers causal LM class for `config`) with random
    weights, built on the meta device and filled tensor by tensor directly on `device`: no
    full-size float32 copy ever exists, so an 8B model can be built straight on a GPU.

    Weights are N(0, std), norms 1, from a generator seeded with `seed` on `device`: the same
    seed on the same device gives the same model."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if name == "weight" and "norm" in module_name.rsplit(".", 1)[-1]:
                value = torch.ones(param.shape, dtype=dtype, device=device)
            elif name == "bias":
                value = torch.zeros(param.shape, dtype=dtype, device=device)
            else:
                value = torch.randn(param.shape, generator=gen, dtype=dtype, device=device)
                value.mul_(std)
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.get_input_embeddings().weight
    rebuild_rotary(model, device)
    return model.eval()


def rebuild_rotary(model, device) -> None:
    """The rotary inverse frequencies are buffers computed from the config, in float32. The meta
    device left them empty, and `model.to(torch.bfloat16)` rounds them: build them again."""
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)


def printable_output_only(model, tokenizer) -> None:
    """Zero the lm_head rows of every token that is not one printable ASCII character. A random
    model otherwise picks bytes that are not text on their own (half of a UTF-8 character, a
    control code); with zero logits they lose to the printable tokens, whose random logits are
    positive for the largest of them, so the gibberish it generates stays readable."""
    printable = set(string.printable[:95])  # letters, digits, punctuation and space
    keep = torch.tensor([tokenizer.decode([i]) in printable for i in range(len(tokenizer))])
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0


def save_random_llama(out_dir: str, config, dtype: torch.dtype = torch.float16,
                      seed: int = 0, std: float = INIT_STD, printable_output: bool = False) -> None:
    """An FP16/BF16 Hugging Face directory (config, safetensors, byte-level tokenizer) holding a
    random model: the input of `tritllm quantize`."""
    model = build_random_llama(config, dtype=dtype, seed=seed, std=std)
    tokenizer = byte_level_tokenizer()
    if printable_output:
        printable_output_only(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _largest_logit_difference(model, reference, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        got = model(ids).logits.float()
        want = reference(ids).logits.float()
    return float((got - want).abs().max())


def _reference_tokens(reference, ids: torch.Tensor, count: int) -> list[int]:
    gen = Generator(reference, 1, max_len_for(ids.shape[1], count))
    return gen.generate(ids, count)[0, ids.shape[1]:].tolist()


def run_demo(out_dir: str | None = None, device: torch.device | None = None,
             max_new_tokens: int = 48, prompt: str = "The trit is the natural unit of",
             out=sys.stdout) -> dict:
    """Runs the demo, printing as it goes, and returns its numbers."""
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="tritllm-demo-") as tmp:
            return run_demo(tmp, device, max_new_tokens, prompt, out)
    import transformers
    from transformers import AutoModelForCausalLM

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    transformers.utils.logging.disable_progress_bar()  # the model is small: no bars

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    src, packed = os.path.join(out_dir, "fp16"), os.path.join(out_dir, "packed")
    tokenizer = byte_level_tokenizer()
    config = llama_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, **DEMO_CONFIG)
    t_start = time.perf_counter()
    say(f"1. building a random Llama ({config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, vocab {config.vocab_size}, seed {DEMO_SEED}) -> {src}")
    save_random_llama(src, config, dtype=torch.float16, seed=DEMO_SEED, std=DEMO_STD,
                      printable_output=True)

    say(f"2. quantizing at depth 2 -> {packed}")
    checkpoint.convert(src, packed, mode="quantize", depth=2, progress=False)
    info = checkpoint.info(packed)
    say("   " + format_demo_info(info))

    say(f"3. loading the packed checkpoint with AutoModelForCausalLM.from_pretrained "
        f"({device.type}, {str(dtype).replace('torch.', '')})")
    model = AutoModelForCausalLM.from_pretrained(packed, dtype=dtype).to(device).eval()

    ids = prompt_ids(tokenizer, prompt)
    reference = dequantize_model(copy.deepcopy(model), dtype)
    diff = _largest_logit_difference(model, reference, ids.to(device))
    say(f"4. largest |logit difference| from the dequantized reference (the same trits as "
        f"dense {str(dtype).replace('torch.', '')} weights): {diff:.3g}")

    say(f"5. generating {max_new_tokens} tokens, greedy (random weights: expect gibberish)")
    out.write(prompt)
    stats = stream_generation(model, tokenizer, ids, max_new_tokens, out=out)
    say("   " + format_speed(stats, device, dtype))
    produced = stats["tokens"]
    expected = _reference_tokens(reference, ids, len(produced))
    agree = next((i for i, (a, b) in enumerate(zip(produced, expected)) if a != b),
                 len(produced))
    say(f"   greedy tokens identical to the dequantized reference's: {agree} of "
        f"{len(produced)}" + ("" if agree == len(produced) else
                              " (then a near-tie is broken the other way by rounding)"))
    say(f"done in {time.perf_counter() - t_start:.1f} s")
    return {"info": info, "max_logit_difference": diff, "generation": stats,
            "tokens_agreeing_with_reference": agree}


def format_demo_info(info: dict) -> str:
    return (f"{info['quantized_layers']} layers at depth {info['depth']}: "
            f"{info['bits_per_weight']:.3f} bits/weight; checkpoint "
            f"{info['size_on_disk'] / 1e6:.2f} MB on disk vs FP16 "
            f"{info['fp16_equivalent_bytes'] / 1e6:.2f} MB ({info['compression_vs_fp16']:.2f}x "
            "smaller; embeddings, norms and lm_head stay FP16)")
