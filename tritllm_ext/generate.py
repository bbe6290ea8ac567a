"""Fast greedy/sampled generation for Llama-family Hugging Face models, packed or not.

transformers' `generate` spends most of a decode step in Python and in many tiny kernels. This
module runs its own decode loop over the model's modules (so TritLinear and nn.Linear layers
alike) with:

* a static KV cache: one preallocated [B, kv_heads, max_len, head_dim] tensor per layer for keys
  and for values, written in place at the current position;
* rotary cos/sin tables computed once, with the model's own rotary module, for every position;
* in a decode step, projections that read the same input computed together when they are packed
  trit layers of one depth and width: q, k and v in one `torch.ops.tritllm.matmul_cat`, gate and
  up in another (on CUDA one kernel launch each instead of three and two; the gain is in
  docs/PERF.md). A prefill runs them one by one: its products are compute-bound, and fused
  they measured 1% slower. Dense layers always run one by one;
* in a decode step, the rotation of q and k, the cache write and the attention over the cache as
  one op, `torch.ops.tritllm.decode_attention` (on CUDA one kernel instead of about six);
* on CUDA, where every layer's products run on a kernel that computes its own input (the x-table
  kernel at batch 1, tile_gemm from batch 2), the element-wise steps between them computed inside
  the products: the residual add and RMSNorm before q, k, v and before gate, up
  (`torch.ops.tritllm.add_rms_norm_matmul_cat`), SiLU(gate) * up before down
  (`silu_mul_matmul`), so a layer is four product kernels and the attention;
* on CUDA, one decode step (model forward, token choice, cache and position update) captured as
  a CUDA graph and replayed; optionally (`compile=True`) the code between two attention ops runs
  through a torch.compile'd function, which fuses the small element-wise kernels between the
  matmuls (a layer's last residual add with the next layer's norm, too).
  The host only launches replays; it reads a token back (a sync) only when the caller asks for
  tokens one by one (streaming, or stopping at an end-of-sequence token).

Architectures: llama, mistral, qwen2 and qwen3 (their decoder layers share one structure).
`unsupported_reason` says why another model cannot take this path; `tritllm generate` then falls
back to transformers' `generate`.

The math follows transformers' eager implementation (RMSNorm, the activation and every linear layer
are the model's own modules or their operations step by step; a fused product gives the separate
ones' numbers, bit for bit on the CPU and at decode batch sizes on CUDA; the decode attention
computes in float32 where transformers rounds its scores and weights to the model's dtype; the
RMSNorm inside a fused CUDA product adds its squares in its own order), so greedy tokens agree
with `model.generate(do_sample=False)` (tests/test_generate.py).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .nn import TritLinear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Rotary variants whose cos/sin depend only on the position (not on the sequence length seen).
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Warm-up runs before a CUDA graph capture: they let cuBLAS, the caching allocator and
# torch.compile settle on the buffers they will use during capture.
_WARMUP_STEPS = 3


def _compile_options() -> dict:
    """Inductor options of the compiled decode code. Its kernels are launched early where the
    GPU can (programmatic dependent launch, Hopper+; inductor's `triton.enable_pdl`, as the
    extension's own kernels are): each starts while the kernel before it ends and waits for it
    inside, instead of being launched only after it (~1-2 us a launch, three a layer)."""
    from torch._inductor import config

    return {"triton.enable_pdl": True} if hasattr(config.triton, "enable_pdl") else {}


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(params, dict):
        return params.get("rope_type", params.get("type", "default"))
    return "default"


def unsupported_reason(model, max_len: int | None = None) -> str | None:
    """None if `model` can run on this module's decode loop (for sequences up to `max_len`
    tokens), else a sentence saying why not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES} supported by "
                "the fast decode loop")
    rope = _rope_type(config)
    if rope not in _STATIC_ROPE_TYPES:
        return f"rotary embedding type {rope!r} depends on the sequence length"
    window = getattr(config, "sliding_window", None)
    if window is not None and max_len is not None and max_len > window:
        return (f"sequences of {max_len} tokens exceed the sliding attention window ({window}), "
                "which the fast decode loop does not implement")
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(model, "lm_head"):
        return "the model does not have the .model.layers / .lm_head structure of a causal LM"
    return None


# Rows at least this long are reduced in two steps on CUDA (`argmax_last`).
_TWO_STEP_ARGMAX_MIN = 1 << 14
_ARGMAX_CHUNKS = 256


def _argmax_in_two_steps(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(dim=-1) of [B, V] as the first index of the maximum of each of 256 chunks,
    then the first best chunk: the same answer (the first maximum; a NaN counts as the maximum)."""
    b, v = scores.shape
    pad = -v % _ARGMAX_CHUNKS  # the padding is -inf at the end: it never wins a tie
    padded = F.pad(scores, (0, pad), value=float("-inf")) if pad else scores
    best, where = padded.view(b, _ARGMAX_CHUNKS, -1).max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return (chunk * ((v + pad) // _ARGMAX_CHUNKS) + where.gather(-1, chunk))[:, 0]


def argmax_last(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(dim=-1) for [B, V]. On CUDA a long row goes through _argmax_in_two_steps:
    torch's argmax reduces a row in one block, 27 us a step for a 128k vocabulary on an H100 in a
    CUDA graph, the two steps 13 us (docs/KERNEL_NOTES.md, session 9)."""
    if scores.is_cuda and scores.shape[-1] >= _TWO_STEP_ARGMAX_MIN:
        return _argmax_in_two_steps(scores)
    return scores.argmax(dim=-1)


def select_next_token(logits: torch.Tensor, temperature: float = 0.0,
                      top_k: int | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]: argmax when temperature is 0, else a
    sample from softmax(logits / temperature) restricted to the top_k most likely tokens.

    The sample uses the exponential-race form argmax(p / E), E ~ Exp(1), which is a draw from p
    without torch.multinomial's host synchronisation, so it can live inside a CUDA graph."""
    if temperature <= 0:
        return argmax_last(logits)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0)
    return argmax_last(probs / race)


def _fusable(linears) -> bool:
    """True if `linears` are TritLinear layers of one depth and in_features, whose products can
    run as one matmul_cat."""
    first = linears[0]
    return all(isinstance(m, TritLinear) and m.depth == first.depth
               and m.in_features == first.in_features for m in linears)


def project(x: torch.Tensor, linears, fuse: bool = True) -> list[torch.Tensor]:
    """[m(x) for m in linears], as one fused product when `fuse` and `_fusable(linears)`. The
    modules must have been validated (TritLinear.validate_once) before a fused call: it reads
    their buffers."""
    if not (fuse and _fusable(linears)):
        return [m(x) for m in linears]
    first = linears[0]
    y = torch.ops.tritllm.matmul_cat(x, [m.trit_packed for m in linears],
                                     [m.trit_codebook for m in linears], first.depth,
                                     first.in_features)
    return _split_outputs(y, linears)


def _split_outputs(y: torch.Tensor, linears) -> list[torch.Tensor]:
    """The outputs of `linears` (with their biases) from their fused product y."""
    outs = y.split([m.out_features for m in linears], dim=-1)
    return [o if m.bias is None else o + m.bias.to(o.dtype) for o, m in zip(outs, linears)]


def _is_rms_norm(norm, dtype: torch.dtype) -> bool:
    """True for the RMSNorm of these architectures (weight * normalized, weight in the model's
    dtype), which add_rms_norm_matmul_cat computes."""
    weight = getattr(norm, "weight", None)
    return (type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")
            and isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.dtype == dtype)


def add_norm_project(h: torch.Tensor, delta: torch.Tensor, norm, linears) -> tuple:
    """(the fused product of `linears` on norm(h + delta), h + delta): the residual add, the
    layer's RMSNorm and the products in one op, which on CUDA at one token computes the add and
    the norm inside the product kernel (torch.ops.tritllm.add_rms_norm_matmul_cat)."""
    first = linears[0]
    return torch.ops.tritllm.add_rms_norm_matmul_cat(
        h, delta, norm.weight, norm.variance_epsilon, [m.trit_packed for m in linears],
        [m.trit_codebook for m in linears], first.depth, first.in_features)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticKVCache:
    """Per layer, keys and values of every position of `batch_size` sequences of up to
    `max_len` tokens: tensors [B, kv_heads, max_len, head_dim] that never move (a CUDA graph
    holds their addresses)."""

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size = batch_size
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class LlamaFamilyForward:
    """The forward pass of a Llama-family causal LM over a StaticKVCache, returning the logits
    of the last position only. It reads the modules of a transformers model and owns nothing
    but the rotary tables.

    With `compile_decode`, a decode step runs the code between two attention ops (a layer's
    output projection and MLP, the next layer's norm and q, k, v) through torch.compile'd
    functions (the layers share their structure, so each compiles once, not once per layer),
    which fuse RMSNorm, SiLU-and-multiply and the residual adds into a few kernels."""

    def __init__(self, model, max_len: int, compile_decode: bool = False):
        reason = unsupported_reason(model, max_len)
        if reason:
            raise ValueError(f"fast generation: {reason}")
        config = model.config
        base = model.model
        self.embed = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.lm_head = model.lm_head
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = self.layers[0].self_attn.scaling
        self.config = config
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.max_len = max_len
        # cos/sin of every position, from the model's own rotary module so that any rope
        # scaling (llama3, yarn, ...) is applied exactly as transformers does.
        positions = torch.arange(max_len, device=self.device).unsqueeze(0)
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = base.rotary_emb(probe, position_ids=positions)
        self.cos = cos[0].contiguous()  # [max_len, head_dim]
        self.sin = sin[0].contiguous()
        for i, layer in enumerate(self.layers):  # fused products read buffers without forward()
            for name, m in layer.named_modules():
                if isinstance(m, TritLinear):
                    m.validate_once(f"model.layers.{i}.{name}")
        compiled = ((lambda f: torch.compile(f, fullgraph=True, dynamic=False,
                                             options=_compile_options()))
                    if compile_decode else (lambda f: f))
        self._first_qkv = compiled(self._decode_qkv)
        self._between = compiled(self._decode_between)
        self._last = compiled(self._decode_last)
        # The element-wise steps inside the products, at the batch sizes where they can be.
        self._fuses_inputs_at: dict[int, bool] = {}
        self._between_fused = compiled(self._decode_between_fused)
        self._last_fused = compiled(self._decode_last_fused)

    def fuses_inputs(self, batch_size: int) -> bool:
        """True if a decode step of `batch_size` sequences computes the residual adds, the norms
        and SiLU-and-multiply inside the products (decided once per batch size)."""
        if batch_size not in self._fuses_inputs_at:
            self._fuses_inputs_at[batch_size] = self._can_fuse_inputs(batch_size)
        return self._fuses_inputs_at[batch_size]

    def _can_fuse_inputs(self, batch_size: int) -> bool:
        """True for a CUDA model whose layers have these architectures' RMSNorms, a SiLU gated MLP
        without biases on gate and up, and trit products that a kernel computing its own input
        runs at this batch size: the x-table kernel at one token, tile_gemm from two (elsewhere
        the fused ops would run their steps one by one, slower than the compiled code they
        replace)."""
        if self.device.type != "cuda" or self.config.hidden_act not in ("silu", "swish"):
            return False
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
            if not (_is_rms_norm(layer.input_layernorm, self.dtype)
                    and _is_rms_norm(layer.post_attention_layernorm, self.dtype)
                    and _fusable(qkv) and _fusable(gate_up) and _fusable([mlp.down_proj])
                    and mlp.gate_proj.bias is None and mlp.up_proj.bias is None
                    and mlp.gate_proj.out_features == mlp.down_proj.in_features):
                return False
            for linears in (qkv, gate_up, [mlp.down_proj]):
                x = torch.empty(batch_size, linears[0].in_features, dtype=self.dtype,
                                device=self.device)
                kernel = torch.ops.tritllm._cuda_matmul_kernel(
                    x, [m.trit_packed for m in linears], linears[0].depth)
                if kernel not in ("xtable", "tile"):
                    return False
        return True

    def new_cache(self, batch_size: int) -> StaticKVCache:
        return StaticKVCache(len(self.layers), batch_size, self.kv_heads, self.max_len,
                             self.head_dim, self.dtype, self.device)

    def _prefill_attention(self, attn, x: torch.Tensor, positions: torch.Tensor,
                           keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Causal attention of a prompt [B, T, hidden] starting at position 0, which also fills
        the cache's first T positions."""
        b, t, _ = x.shape
        q, k, v = project(x, [attn.q_proj, attn.k_proj, attn.v_proj], fuse=False)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.kv_heads, self.head_dim)
        v = v.reshape(b, t, self.kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos = self.cos[positions]  # [t, head_dim], broadcast over batch and heads
        sin = self.sin[positions]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                             enable_gqa=self.kv_heads != self.num_heads)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return attn.o_proj(out)

    def _prefill_layer(self, layer, h: torch.Tensor, positions: torch.Tensor,
                       keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        h = h + self._prefill_attention(layer.self_attn, layer.input_layernorm(h), positions,
                                        keys, values)
        return h + self._mlp(layer.mlp, layer.post_attention_layernorm(h), fuse=False)

    def _decode_qkv(self, layer, h: torch.Tensor):
        """A decode step's q [B, heads * head_dim], k and v [B, kv_heads * head_dim] (not yet
        rotated) from the layer's input h [B, 1, hidden]."""
        attn = layer.self_attn
        q, k, v = project(layer.input_layernorm(h), [attn.q_proj, attn.k_proj, attn.v_proj])
        return self._heads(attn, q, k, v)

    def _heads(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q, k, v [B, 1, width] of a decode step as the attention op takes them, [B, width],
        after qwen3's per-head norms."""
        b = q.shape[0]
        if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head before the rotation
            q = attn.q_norm(q.reshape(b, 1, self.num_heads, self.head_dim))
            k = attn.k_norm(k.reshape(b, 1, self.kv_heads, self.head_dim))
        return q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1)

    def _decode_after_attention(self, layer, h: torch.Tensor,
                                attended: torch.Tensor) -> torch.Tensor:
        """The rest of a decode step's layer: output projection, residual, MLP, residual."""
        h = h + layer.self_attn.o_proj(attended.unsqueeze(1))
        return h + self._mlp(layer.mlp, layer.post_attention_layernorm(h), fuse=True)

    def _decode_between(self, layer, next_layer, h: torch.Tensor, attended: torch.Tensor):
        """From one layer's attention output to the next layer's q, k, v: in one compiled graph
        the last residual add of a layer and the next layer's input norm share a kernel."""
        h = self._decode_after_attention(layer, h, attended)
        return (h, *self._decode_qkv(next_layer, h))

    def _decode_last(self, layer, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The last layer after its attention, then the final norm."""
        return self.norm(self._decode_after_attention(layer, h, attended))

    # The same three steps with fused inputs (`fuses_inputs`). The residual stream travels as h
    # and the delta not yet added to it: each product that norms the stream adds the delta first
    # and returns the sum.

    @staticmethod
    def _fused_after_attention(layer, h: torch.Tensor, attended: torch.Tensor):
        """(h + o(attended), the MLP's output on it, not yet added)."""
        mlp = layer.mlp
        o = layer.self_attn.o_proj(attended.unsqueeze(1))
        gate_up, h = add_norm_project(h, o, layer.post_attention_layernorm,
                                      [mlp.gate_proj, mlp.up_proj])
        down = mlp.down_proj
        delta = torch.ops.tritllm.silu_mul_matmul(gate_up, down.trit_packed, down.trit_codebook,
                                                  down.depth, down.in_features)
        return h, delta if down.bias is None else delta + down.bias.to(delta.dtype)

    def _decode_between_fused(self, layer, next_layer, h: torch.Tensor, attended: torch.Tensor):
        """_decode_between with fused inputs."""
        h, delta = self._fused_after_attention(layer, h, attended)
        attn = next_layer.self_attn
        linears = [attn.q_proj, attn.k_proj, attn.v_proj]
        qkv, h = add_norm_project(h, delta, next_layer.input_layernorm, linears)
        return (h, *self._heads(attn, *_split_outputs(qkv, linears)))

    def _decode_last_fused(self, layer, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """_decode_last with fused inputs."""
        h, delta = self._fused_after_attention(layer, h, attended)
        return self.norm(h + delta)

    def _decode(self, tokens: torch.Tensor, position: torch.Tensor,
                cache: StaticKVCache) -> torch.Tensor:
        """One token per sequence at `position` [1]. In each layer the rotation, the cache write
        and the attention over the cache are one op (torch.ops.tritllm.decode_attention; on CUDA
        one kernel); the code between two of them is one function, which torch.compile may fuse
        (compiled graphs stop at the op, which writes the cache: outside them no
        functionalization can turn that write into a copy of the cache)."""
        fused = self.fuses_inputs(tokens.shape[0])
        between = self._between_fused if fused else self._between
        h = self.embed(tokens)
        q, k, v = self._first_qkv(self.layers[0], h)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            attended = torch.ops.tritllm.decode_attention(q, k, v, self.cos, self.sin, position,
                                                          cache.keys[i], cache.values[i],
                                                          self.scaling)
            if i < last:
                h, q, k, v = between(layer, self.layers[i + 1], h, attended)
            else:
                h = (self._last_fused if fused else self._last)(layer, h, attended)
        return self.lm_head(h)[:, 0]

    @staticmethod
    def _mlp(mlp, x: torch.Tensor, fuse: bool) -> torch.Tensor:
        """The gated MLP of these architectures (their MLP modules' forward), down(act(gate(x)) *
        up(x)), with gate and up as one product when `fuse` and they can be fused."""
        gate, up = project(x, [mlp.gate_proj, mlp.up_proj], fuse)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                 prefill: bool) -> torch.Tensor:
        """tokens [B, T] at `positions` [T] -> logits [B, V] of the last position. A prefill
        (T >= 1 tokens from position 0) attends causally among its tokens; a decode step
        (T = 1) attends to the cache."""
        if not prefill:
            return self._decode(tokens, positions, cache)
        h = self.embed(tokens)
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            h = self._prefill_layer(layer, h, positions, keys, values)
        h = self.norm(h[:, -1:])
        return self.lm_head(h)[:, 0]


class Generator:
    """Generation for a fixed batch size and maximum length, reusable across prompts.

        gen = Generator(model, batch_size=1, max_len=512)
        ids = gen.generate(input_ids, max_new_tokens=100)              # [B, T + 100]
        for tok in gen.stream(input_ids, 100, eos_token_id=2): ...    # tok: list of B ints

    `cuda_graph` (default: on for CUDA models) captures one decode step; `compile` runs the
    forward through torch.compile first (fused element-wise kernels; slower to start).
    """

    def __init__(self, model, batch_size: int, max_len: int, *, temperature: float = 0.0,
                 top_k: int | None = None, cuda_graph: bool | None = None,
                 compile: bool = False):
        if batch_size < 1 or max_len < 2:
            raise ValueError(f"batch_size must be >= 1 and max_len >= 2, got {batch_size}, "
                             f"{max_len}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.forward = LlamaFamilyForward(model, max_len, compile_decode=compile)
        self.device = self.forward.device
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA model, this one is on {self.device}")
        self.use_graph = cuda_graph
        self.temperature = temperature
        self.top_k = top_k
        self.batch_size = batch_size
        self.max_len = max_len
        self.cache = self.forward.new_cache(batch_size)
        # The decode step's inputs and outputs live at fixed addresses for the CUDA graph.
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.compiled = compile
        self._graph = None
        self._warm = False
        # Host copy of `position` (the position of the token fed to the next step), to refuse
        # growing a sequence past max_len tokens.
        self._next_position = 0

    def _decode_step(self) -> None:
        logits = self.forward(self.tokens, self.position, self.cache, False)
        self.tokens.copy_(select_next_token(logits, self.temperature, self.top_k)[:, None])
        self.position.add_(1)

    def _run_warmup_steps(self) -> None:
        """A few decode steps whose results are thrown away: they compile the forward (with
        `compile`) and let cuBLAS and the caching allocator settle before a graph capture.
        They write cache entries at the current positions; those are rewritten before any
        query can see them (the mask hides positions after the current one)."""
        saved_tokens, saved_position = self.tokens.clone(), self.position.clone()
        if self.use_graph:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(_WARMUP_STEPS):
                    self._decode_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            for _ in range(_WARMUP_STEPS):
                self._decode_step()
        self.tokens.copy_(saved_tokens)
        self.position.copy_(saved_position)

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compiles and captures the decode step now (both happen once per Generator), so that
        the first timed step does not pay for them. Optional: `step` does it when needed."""
        if self.use_graph:
            if self._graph is None:
                self._run_warmup_steps()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._decode_step()
                self._graph = graph
        elif self.compiled and not self._warm:
            self._run_warmup_steps()
        self._warm = True

    def _check_request(self, input_ids: torch.Tensor, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if input_ids.shape[-1] + max_new_tokens > self.max_len:
            raise ValueError(f"{input_ids.shape[-1]} prompt + {max_new_tokens} new tokens "
                             f"exceed max_len={self.max_len}")

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Runs the prompt [B, T] through the model, fills the cache and returns the first new
        token of each sequence, [B] on the model's device (no host sync)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids must have shape [{self.batch_size}, T], got "
                             f"{tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if not 1 <= t < self.max_len:
            raise ValueError(f"a prompt of {t} tokens does not fit max_len={self.max_len} with "
                             "room for a new token")
        input_ids = input_ids.to(self.device)
        positions = torch.arange(t, device=self.device)
        logits = self.forward(input_ids, positions, self.cache, True)
        first = select_next_token(logits, self.temperature, self.top_k)
        self.tokens.copy_(first[:, None])
        self.position.fill_(t)
        self._next_position = t
        return first

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Feeds the last token and returns the next ones: the [B, 1] token buffer, which the
        next step overwrites (copy it to keep it). No host sync."""
        if self._next_position + 1 >= self.max_len:  # the sequence would outgrow max_len
            raise ValueError(f"generation reached max_len={self.max_len}; build the Generator "
                             "with a larger max_len")
        if self.use_graph:
            self.warmup()
            self._graph.replay()
        else:
            self._decode_step()
        self._next_position += 1
        return self.tokens

    @torch.inference_mode()
    def decode(self, num_tokens: int) -> torch.Tensor:
        """`num_tokens` decode steps after `prefill`: their tokens [B, num_tokens] on the
        model's device, without any host sync."""
        out = torch.empty(self.batch_size, num_tokens, dtype=torch.long, device=self.device)
        for i in range(num_tokens):
            out[:, i:i + 1] = self.step()
        return out

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Prompt [B, T] -> [B, T + max_new_tokens] on the model's device, without reading
        anything back (no stop at an end-of-sequence token: use `stream` for that)."""
        self._check_request(input_ids, max_new_tokens)
        first = self.prefill(input_ids)
        rest = self.decode(max_new_tokens - 1)
        return torch.cat([input_ids.to(self.device), first[:, None], rest], dim=1)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int,
               eos_token_id: int | list[int] | None = None) -> Iterator[list[int]]:
        """Yields each new token of every sequence as a list of B ints (one host sync per
        token), stopping early once every sequence has produced an end-of-sequence token."""
        self._check_request(input_ids, max_new_tokens)
        stop = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        finished = [False] * self.batch_size
        tokens = self.prefill(input_ids).tolist()
        for i in range(max_new_tokens):
            if i:
                tokens = self.step()[:, 0].tolist()
            yield tokens
            finished = [f or tok in stop for f, tok in zip(finished, tokens)]
            if all(finished):
                return


def max_len_for(prompt_len: int, max_new_tokens: int, multiple: int = 64) -> int:
    """A cache length that fits the request, rounded up so that nearby requests share one
    Generator (and its CUDA graph)."""
    return int(math.ceil((prompt_len + max_new_tokens) / multiple) * multiple)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None,
             eos_token_id: int | list[int] | None = None,
             on_token: Callable[[list[int]], None] | None = None,
             compile: bool = False) -> torch.Tensor:
    """One-shot convenience: prompt [B, T] -> tokens [B, T + n] (n <= max_new_tokens when an
    end-of-sequence token stops every sequence early). `on_token` sees each step's tokens."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    gen = Generator(model, input_ids.shape[0], max_len_for(input_ids.shape[1], max_new_tokens),
                    temperature=temperature, top_k=top_k, compile=compile)
    if on_token is None and eos_token_id is None:
        return gen.generate(input_ids, max_new_tokens).cpu()
    steps = []
    for tokens in gen.stream(input_ids, max_new_tokens, eos_token_id):
        steps.append(tokens)
        if on_token is not None:
            on_token(tokens)
    new = torch.tensor(steps, dtype=torch.long).T
    return torch.cat([input_ids.cpu(), new], dim=1)
