"""End-to-end generation benchmark: a packed trit model against floating point, same harness.

    python bench/e2e_bench.py --device cuda            # Llama-3.1-8B shapes, FP16 baseline
    python bench/e2e_bench.py --device cpu             # Llama-3.2-1B shapes, FP32/BF16 baselines
    python bench/e2e_bench.py --device cuda --quick    # a few tokens: checks the run works
    tritllm bench e2e ...                              # the same

One process builds a model with the real architecture's shapes and random weights (fixed seed;
nothing is downloaded), straight on the device, and measures it in floating point first; then
it quantizes the same weights in place at depth d (lm_head stays floating point, as in the
paper) and measures again. Every variant runs through tritllm_ext.generate.Generator (static KV
cache, one attention op per layer; on CUDA one captured CUDA graph per decode step over
torch.compile'd code between the attention ops), so the ratios compare weights, not harnesses.

Measured per variant:
  decode tokens/s at each batch size: a prompt of --prompt-len random tokens, then
      --new-tokens greedy tokens; decode time runs from the first new token to the last, so
      tokens/s = batch * (new_tokens - 1) / time, median over --runs runs;
  prefill: time to run --prefill-len tokens (batch 1) up to the first new token, median;
  memory: bytes of the model's tensors and, on CUDA, the memory allocated once it is built
      (the KV cache and the decode peak are reported beside it);
  logits: largest and mean |difference| from the floating-point model on one prompt, and how
      often their top-1 tokens agree.
--quantize-lm-head adds a variant with lm_head quantized too, reported separately.

--distinct-layers N gives only the first N decoder layers their own random values; the others
repeat them (each layer keeps its own memory, so a decode step still streams the bytes of the
full model) and are quantized by copying packed bytes. It shortens the quantization, which on a
busy 2-core machine can take many minutes for a billion weights.

It prints a Markdown table and writes e2e_<device>.json and e2e_<device>.png to --out.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tritllm_ext.demo import build_random_llama, llama_config, rebuild_rotary  # noqa: E402
from tritllm_ext.generate import Generator  # noqa: E402
from tritllm_ext.model import quantizable_linears  # noqa: E402
from tritllm_ext.nn import TritLinear  # noqa: E402

# The published configurations (config.json of meta-llama/Llama-3.1-8B and Llama-3.2-1B).
MODELS = {
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # For tests of this script: the shapes of the unit tests.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                 max_position_embeddings=4096),
}
DEFAULTS = {
    "cuda": dict(model="llama-3.1-8b", baselines=["float16"], trit_dtypes=["float16"],
                 batch=[1, 8], prompt_len=128, new_tokens=256, prefill_len=2048, runs=5,
                 compile=True, distinct_layers=0),
    "cpu": dict(model="llama-3.2-1b", baselines=["float32", "bfloat16"],
                trit_dtypes=["float32", "bfloat16"], batch=[1], prompt_len=128, new_tokens=32,
                prefill_len=0, runs=3, compile=False, distinct_layers=0),
}
QUICK = {"cuda": dict(new_tokens=16, prefill_len=256, runs=2),
         "cpu": dict(prompt_len=16, new_tokens=8, prefill_len=0, runs=1)}
# Decode steps of the untimed run before the timed ones (graph capture, compile, caches).
WARM_STEPS = 8
SEED = 0
# Targets of issue 5, checked in the printed summary.
TARGETS = {"cuda": {"decode_b1_tokens_per_s": 400, "decode_speedup": 2.5,
                    "prefill_slowdown": 1.2, "quantized_bits_per_weight": 3.5,
                    "model_memory_gb": 5.5},
           "cpu": {"decode_speedup_vs_float32": 3.0}}


def repeat_layers(model, distinct: int) -> None:
    """Copy the weights of decoder layers 0..distinct-1 over the others, cyclically. Every layer
    keeps its own memory, so a decode step streams exactly the bytes of the full model; only
    the values repeat, and quantization takes `distinct`/num_layers as long."""
    layers = model.model.layers
    with torch.no_grad():
        for i in range(distinct, len(layers)):
            for target, source in zip(layers[i].parameters(), layers[i % distinct].parameters()):
                target.copy_(source)


def quantize_in_place(model, depth: int, distinct: int) -> None:
    """quantize_model's replacement of every nn.Linear but lm_head by a TritLinear, except that
    with `distinct` > 0 only layers 0..distinct-1 go through the codec and the later layers,
    which repeat them (repeat_layers), get their own copies of the packed bytes."""
    by_name = {}
    for name in quantizable_linears(model, skip=("lm_head",)):
        parts = name.split(".")
        source = name
        if distinct and parts[:2] == ["model", "layers"]:
            parts[2] = str(int(parts[2]) % distinct)
            source = ".".join(parts)
        if source in by_name:
            layer = copy.deepcopy(by_name[source])
        else:
            layer = TritLinear.from_linear(model.get_submodule(name), depth=depth)
        by_name[name] = layer
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.requires_grad_(False)


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantized_layers(model) -> dict:
    """Weights held by TritLinear layers and their stored bits/weight (packed bytes, codebook
    and meta all counted)."""
    weights = stored = 0
    for module in model.modules():
        if isinstance(module, TritLinear):
            weights += module.in_features * module.out_features
            stored += sum(b.numel() * b.element_size() for b in
                          (module.trit_packed, module.trit_codebook, module.trit_meta))
    return {"weights": weights, "bytes": stored,
            "bits_per_weight": 8.0 * stored / weights if weights else None}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def random_prompt(batch: int, length: int, vocab: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + batch * 1000 + length)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def make_generator(model, batch: int, max_len: int, compile: bool, log) -> Generator:
    """A warmed-up Generator. If torch.compile fails, says so and falls back to the eager
    decoder layer (the result records which one ran)."""
    gen = Generator(model, batch, max_len, compile=compile)
    try:
        gen.warmup()
    except Exception as e:  # noqa: BLE001  (any compiler failure: report it and go on)
        if not compile:
            raise
        log(f"  ! torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "measuring the eager decoder layer instead")
        torch._dynamo.reset()
        gen = Generator(model, batch, max_len, compile=False)
        gen.warmup()
    return gen


def measure_decode(model, batch: int, args, device, vocab: int, log) -> dict:
    max_len = args.prompt_len + args.new_tokens
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    gen = make_generator(model, batch, max_len, args.compile, log)
    prompt = random_prompt(batch, args.prompt_len, vocab, device)
    gen.prefill(prompt)
    gen.decode(min(WARM_STEPS, args.new_tokens - 1))
    synchronize(device)
    setup_s = time.perf_counter() - t0
    prefill_s, decode_s = [], []
    for _ in range(args.runs):
        synchronize(device)
        t0 = time.perf_counter()
        gen.prefill(prompt)
        synchronize(device)
        t1 = time.perf_counter()
        tokens = gen.decode(args.new_tokens - 1)
        synchronize(device)
        t2 = time.perf_counter()
        prefill_s.append(t1 - t0)
        decode_s.append(t2 - t1)
    steps = args.new_tokens - 1
    median = statistics.median(decode_s)
    result = {"batch": batch, "tokens_per_s": batch * steps / median,
              "ms_per_step": 1000 * median / steps,
              "decode_s_runs": decode_s, "prompt_prefill_ms": 1000 * statistics.median(prefill_s),
              "kv_cache_bytes": gen.cache.nbytes, "compiled": gen.compiled,
              "cuda_graph": gen.use_graph, "setup_s": setup_s,
              "first_tokens": tokens[0, :8].tolist()}
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del gen, tokens
    free_memory(device)
    return result


def measure_prefill(model, args, device, vocab: int) -> dict:
    gen = Generator(model, 1, args.prefill_len + 1, cuda_graph=False)
    prompt = random_prompt(1, args.prefill_len, vocab, device)
    gen.prefill(prompt)
    times = []
    for _ in range(args.runs):
        synchronize(device)
        t0 = time.perf_counter()
        gen.prefill(prompt)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    del gen
    free_memory(device)
    return {"tokens": args.prefill_len, "ms": 1000 * statistics.median(times),
            "ms_runs": [1000 * t for t in times]}


@torch.inference_mode()
def prompt_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits[0].float().cpu()


def compare_logits(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got - want).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
            "reference_abs_mean": float(want.abs().mean())}


def measure_variant(name: str, model, args, device, vocab, reference_logits, logit_ids, log):
    log(f"== {name}")
    free_memory(device)
    variant = {"name": name, "dtype": str(model.dtype).replace("torch.", ""),
               "weight_bytes": tensor_bytes(model), "quantized": quantized_layers(model)}
    if device.type == "cuda":
        variant["model_memory_bytes"] = torch.cuda.memory_allocated(device)
    logits = prompt_logits(model, logit_ids)
    if reference_logits is not None:
        variant["logits_vs_reference"] = compare_logits(logits, reference_logits)
    variant["decode"] = {}
    for batch in args.batch:
        r = measure_decode(model, batch, args, device, vocab, log)
        variant["decode"][str(batch)] = r
        log(f"  batch {batch}: {r['tokens_per_s']:.1f} tokens/s ({r['ms_per_step']:.2f} ms/step"
            f", setup {r['setup_s']:.1f} s, compiled={r['compiled']})")
    if args.prefill_len:
        variant["prefill"] = measure_prefill(model, args, device, vocab)
        log(f"  prefill {args.prefill_len} tokens: {variant['prefill']['ms']:.1f} ms")
    return variant, logits


def run(args, log=print, save=lambda result: None) -> dict:
    """Builds, measures and returns the result; `save(result)` is called after each variant,
    so that a run cut short still leaves what it measured."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = llama_config(**MODELS[args.model])
    if args.layers:
        config.num_hidden_layers = args.layers
    vocab = config.vocab_size
    variants = []
    result = {"benchmark": "e2e", "date": datetime.date.today().isoformat(),
              "device": device_name(device), "device_type": device.type,
              "torch": torch.__version__, "model": args.model,
              "config": {k: getattr(config, k) for k in (
                  "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "vocab_size")},
              "depth": args.depth, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "prefill_len": args.prefill_len,
              "runs": args.runs, "quick": args.quick,
              "distinct_layers": args.distinct_layers or config.num_hidden_layers,
              "command": " ".join(sys.argv), "load_average_at_start": os.getloadavg(),
              "variants": variants}
    torch.manual_seed(SEED)
    log(f"building {args.model} ({config.num_hidden_layers} layers) with random weights in "
        f"{args.baselines[0]} on {device_name(device)}")
    t0 = time.perf_counter()
    model = build_random_llama(config, dtype=dtype_of(args.baselines[0]), device=device,
                               seed=SEED)
    if args.distinct_layers and args.distinct_layers < config.num_hidden_layers:
        repeat_layers(model, args.distinct_layers)
        log(f"  layers repeat the first {args.distinct_layers} (each with its own memory)")
    log(f"  built in {time.perf_counter() - t0:.1f} s")
    logit_ids = random_prompt(1, min(args.prompt_len, 128), vocab, device)
    reference = None
    for dtype in args.baselines:
        model = model.to(dtype_of(dtype))
        rebuild_rotary(model, device)
        v, logits = measure_variant(dtype, model, args, device, vocab, reference, logit_ids, log)
        reference = logits if reference is None else reference
        variants.append(v)
        save(result)
    t0 = time.perf_counter()
    quantize_in_place(model, args.depth, args.distinct_layers)
    if device.type == "cuda":
        torch._dynamo.reset()  # drop compiled code that refers to the floating-point layers
    log(f"quantized at depth {args.depth} in {time.perf_counter() - t0:.1f} s")
    trit_logits = {}
    for dtype in args.trit_dtypes:
        model = model.to(dtype_of(dtype))
        rebuild_rotary(model, device)
        v, trit_logits[dtype] = measure_variant(f"trit d={args.depth} ({dtype})", model, args,
                                                device, vocab, reference, logit_ids, log)
        variants.append(v)
        save(result)
    if args.quantize_lm_head:
        model.lm_head = TritLinear.from_linear(model.lm_head, depth=args.depth)
        dtype = args.trit_dtypes[-1]
        v, logits = measure_variant(f"trit d={args.depth} + lm_head ({dtype})", model, args,
                                    device, vocab, reference, logit_ids, log)
        v["logits_vs_trit_fp_lm_head"] = compare_logits(logits, trit_logits[dtype])
        v["optional"] = True
        variants.append(v)
        save(result)
    # The load of the machine during the run (1-minute average): on a shared 2-core machine any
    # load above ~2 means the timings include waiting for a core.
    result["load_average_at_end"] = os.getloadavg()
    save(result)
    return result


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def table(result: dict) -> str:
    variants = result["variants"]
    base = variants[0]
    batches = list(base["decode"])
    head = ["variant", "weights GB", "bits/w (quantized)"]
    if result["device_type"] == "cuda":
        head.append("GPU mem GB")
    head += [f"tok/s B={b}" for b in batches]
    if result["prefill_len"]:
        head.append(f"prefill {result['prefill_len']} ms")
    head += ["max abs dlogit", "top-1 agree"]
    rows = []
    for v in variants:
        q = v["quantized"]["bits_per_weight"]
        row = [v["name"], _gb(v["weight_bytes"]), "-" if q is None else f"{q:.3f}"]
        if result["device_type"] == "cuda":
            row.append(_gb(v["model_memory_bytes"]))
        for b in batches:
            tps, ref = v["decode"][b]["tokens_per_s"], base["decode"][b]["tokens_per_s"]
            row.append(f"{tps:.1f}" + ("" if v is base else f" ({tps / ref:.2f}x)"))
        if result["prefill_len"]:
            ms, ref = v["prefill"]["ms"], base["prefill"]["ms"]
            row.append(f"{ms:.1f}" + ("" if v is base else f" ({ms / ref:.2f}x)"))
        lg = v.get("logits_vs_reference")
        row += ["-", "-"] if lg is None else [f"{lg['max_abs_diff']:.3g}",
                                              f"{lg['top1_agreement']:.2f}"]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def target_report(result: dict) -> list[str]:
    """One line per target of issue 5: the measured value and whether it is met."""
    variants = result["variants"]
    base = variants[0]
    trit = next(v for v in variants if v["quantized"]["weights"] and not v.get("optional"))
    t = TARGETS[result["device_type"]]
    lines = []

    def check(label, value, ok):
        lines.append(f"{'met    ' if ok else 'NOT met'} {label}: {value}")

    def speedup(b):
        return trit["decode"][b]["tokens_per_s"] / base["decode"][b]["tokens_per_s"]

    if result["device_type"] == "cuda":
        if "1" in trit["decode"]:
            tps = trit["decode"]["1"]["tokens_per_s"]
            check(f"batch 1 decode >= {t['decode_b1_tokens_per_s']} tokens/s", f"{tps:.1f}",
                  tps >= t["decode_b1_tokens_per_s"])
        for b in trit["decode"]:
            check(f"batch {b} decode >= {t['decode_speedup']}x {base['name']}",
                  f"{speedup(b):.2f}x", speedup(b) >= t["decode_speedup"])
        if result["prefill_len"]:
            r = trit["prefill"]["ms"] / base["prefill"]["ms"]
            check(f"prefill {result['prefill_len']} tokens <= {t['prefill_slowdown']}x "
                  f"{base['name']}", f"{r:.2f}x", r <= t["prefill_slowdown"])
        q = trit["quantized"]["bits_per_weight"]
        check(f"quantized layers <= {t['quantized_bits_per_weight']} bits/weight", f"{q:.3f}",
              q <= t["quantized_bits_per_weight"] + 0.01)
        gb = trit["model_memory_bytes"] / 1e9
        check(f"model memory < {t['model_memory_gb']} GB (KV cache apart)", f"{gb:.2f} GB",
              gb < t["model_memory_gb"])
    else:
        fp32 = next((v for v in variants if v["name"] == "float32"), None)
        if fp32 is not None and "1" in fp32["decode"]:
            best = max((v for v in variants if v["quantized"]["weights"]
                        and not v.get("optional")),
                       key=lambda v: v["decode"]["1"]["tokens_per_s"])
            r = best["decode"]["1"]["tokens_per_s"] / fp32["decode"]["1"]["tokens_per_s"]
            check(f"batch 1 decode >= {t['decode_speedup_vs_float32']}x float32 "
                  f"({best['name']})", f"{r:.2f}x", r >= t["decode_speedup_vs_float32"])
    return lines


def plot(result: dict, path: str) -> bool:
    """A PNG of decode tokens/s, prefill time and memory per variant; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = result["variants"]
    names = [v["name"] for v in variants]
    batches = list(variants[0]["decode"])
    panels = ["decode"] + (["prefill"] if result["prefill_len"] else []) + ["memory"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    colors = [f"C{i}" for i in range(len(variants))]
    for ax, panel in zip(axes, panels):
        if panel == "decode":
            width = 0.8 / len(variants)
            for i, v in enumerate(variants):
                xs = [j + i * width for j in range(len(batches))]
                ax.bar(xs, [v["decode"][b]["tokens_per_s"] for b in batches], width,
                       label=v["name"], color=colors[i])
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))])
            ax.set_xticklabels([f"batch {b}" for b in batches])
            ax.set_ylabel("decode tokens/s (higher is better)")
            ax.legend(fontsize=8)
        elif panel == "prefill":
            ax.bar(range(len(variants)), [v["prefill"]["ms"] for v in variants], color=colors)
            ax.set_ylabel(f"prefill {result['prefill_len']} tokens, ms (lower is better)")
        else:
            key = "model_memory_bytes" if result["device_type"] == "cuda" else "weight_bytes"
            ax.bar(range(len(variants)), [v[key] / 1e9 for v in variants], color=colors)
            ax.set_ylabel("GPU memory of the model, GB" if key == "model_memory_bytes"
                          else "model weights, GB")
        if panel != "decode":
            ax.set_xticks(range(len(variants)))
            ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    fig.suptitle(f"{result['model']} shapes, random weights - {result['device']} - "
                 f"{result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cuda", "cpu"))
    p.add_argument("--model", choices=sorted(MODELS), help="shapes to build (default: "
                   "llama-3.1-8b on CUDA, llama-3.2-1b on CPU)")
    p.add_argument("--layers", type=int, default=0, help="keep only this many decoder layers")
    p.add_argument("--distinct-layers", type=int, help="decoder layers with their own random "
                   "values; the others repeat them and are quantized by copy (default: all)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 8 on CUDA, "
                   "1 on CPU)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--prefill-len", type=int, help="0 skips the prefill measurement")
    p.add_argument("--runs", type=int)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--depth", type=int, default=2, choices=(1, 2, 3, 4))
    p.add_argument("--baselines", nargs="+", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--trit-dtypes", nargs="+", choices=("float32", "float16", "bfloat16"),
                   help="activation / non-quantized dtypes of the trit model")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the decoder layer (default on CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also measure a variant with lm_head quantized (reported separately)")
    p.add_argument("--quick", action="store_true", help="few tokens and runs: a smoke test")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"),
                   help="folder for e2e_<device>.json and .png")
    p.add_argument("--from-json", metavar="JSON", help="print the table of an earlier (or "
                   "interrupted) run and redraw its plot; measures nothing")
    args = p.parse_args(argv)
    settings = dict(DEFAULTS[args.device])
    if args.quick:
        settings.update(QUICK[args.device])
    for key, value in settings.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the first token comes from the prefill)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    return args


def report(result: dict, stem: str) -> None:
    """Prints the table and the targets of `result`, and draws stem.png."""
    print(f"{result['model']} shapes, d={result['depth']}, prompt {result['prompt_len']}, "
          f"{result['new_tokens']} new tokens, median of {result['runs']} runs, "
          f"{result['device']}, torch {result['torch']}, {result['date']}")
    if "load_average_at_end" in result:
        print(f"machine load (1/5/15-min averages) at start {result['load_average_at_start']}, "
              f"at end {result['load_average_at_end']}")
    print(table(result))
    print("(logit columns: against the floating-point model on one prompt; with random weights "
          "they show quantization noise, not model quality)")
    modes = {f"{v['name']} B={b}": ("compiled" if r["compiled"] else "eager") + ", "
             + ("CUDA graph" if r["cuda_graph"] else "no graph")
             for v in result["variants"] for b, r in v["decode"].items()}
    if len(set(modes.values())) > 1:
        print("decode ran differently across variants: "
              + "; ".join(f"{k}: {m}" for k, m in modes.items()))
    else:
        print(f"decode: {next(iter(modes.values()))} for every variant")
    for v in result["variants"]:
        d = v.get("logits_vs_trit_fp_lm_head")
        if d:
            print(f"{v['name']}: logits vs the same model with a floating-point lm_head: "
                  f"max |d| {d['max_abs_diff']:.3g}, mean |d| {d['mean_abs_diff']:.3g}, "
                  f"top-1 agreement {d['top1_agreement']:.2f}")
    if any(v["quantized"]["weights"] for v in result["variants"]):
        for line in target_report(result):
            print(line)
    print(f"plot: {stem}.png" if plot(result, stem + ".png")
          else "no plot: matplotlib is not installed")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            report(json.load(f), os.path.splitext(args.from_json)[0])
        return 0
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"e2e_{args.device}{'_quick' if args.quick else ''}")

    def save(result):
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)

    started = time.perf_counter()
    result = run(args, log=lambda line: print(f"[{time.perf_counter() - started:6.0f} s] {line}",
                                              flush=True), save=save)
    print(f"\nwrote {stem}.json")
    report(result, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
