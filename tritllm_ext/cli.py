"""The `tritllm` command (also `python -m tritllm_ext`).

    tritllm quantize SRC_DIR OUT_DIR [--depth 2]      FP16/BF16 HF model -> packed checkpoint
    tritllm adopt SRC_DIR OUT_DIR [--requantize]     Entrit dequantized FP16 -> packed, bit-exact
    tritllm info DIR                                 format, depth, bits/weight, size vs FP16
    tritllm generate DIR --prompt "..."              stream tokens, print tokens/s
    tritllm demo                                     build, quantize, reload, generate: no download
    tritllm bench {cpu,gpu,kernels,e2e} [ARGS...]    run a benchmark of bench/

Each subcommand is a thin layer over the library (checkpoint.convert / info, generate.Generator,
demo.run_demo): the work and its checks live there. Errors about the user's input (ValueError,
OSError) are printed as one line, `tritllm CMD: error: ...`, with exit status 1; argparse's usage
errors exit with 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from . import checkpoint
from .generate import Generator, max_len_for, unsupported_reason

BENCH_SCRIPTS = {"cpu": "cpu_bench.py", "gpu": "gpu_bench.py", "kernels": "gpu_kernels.py",
                 "e2e": "e2e_bench.py"}
DTYPES = ("auto", "float16", "bfloat16", "float32")


class UsageError(ValueError):
    """A command line that parses but cannot be run as asked."""


def _existing_dir(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is not a directory")
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """float16 on CUDA and float32 on the CPU unless asked otherwise."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _fmt_bytes(n: float) -> str:
    if n < 1e3:
        return f"{n:.0f} B"
    unit, scale = next((u, s) for u, s in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9))
                       if n < 1e3 * s or u == "GB")
    return f"{n / scale:.2f} {unit}"


# ---- quantize / adopt / info ---------------------------------------------------------------

def _convert(args, mode: str) -> int:
    _existing_dir(args.src_dir, "source model directory")
    if os.path.abspath(args.src_dir) == os.path.abspath(args.out_dir):
        raise UsageError("OUT_DIR must differ from SRC_DIR (the source is read while the "
                         "packed checkpoint is written)")
    kwargs = dict(mode=mode, depth=args.depth, skip=tuple(args.skip), progress=not args.quiet,
                  device=resolve_device(args.device))
    if mode == "adopt":
        kwargs["requantize"] = args.requantize
    t0 = time.perf_counter()
    report = checkpoint.convert(args.src_dir, args.out_dir, **kwargs)
    print(format_convert_report(report))
    print(f"wrote {args.out_dir} in {time.perf_counter() - t0:.1f} s (`tritllm info "
          f"{args.out_dir}` describes it)")
    return 0


def format_convert_report(report) -> str:
    """The end-of-conversion summary (a checkpoint.ConvertReport): one line per matrix with its
    bits/weight (and, for adopt, how many of its groups were exact), then the totals."""
    width = max((len(m.name) for m in report.matrices), default=0)
    lines = [f"{'matrix':<{width}}  {'shape':>13}  bits/weight"
             + ("  groups" if report.mode == "adopt" else "")]
    for m in report.matrices:
        line = f"{m.name:<{width}}  {str(list(m.shape)):>13}  {m.bits_per_weight:11.3f}"
        if report.mode == "adopt":
            total = m.exact_groups + m.requantized_groups
            line += (f"  exact {m.exact_groups}/{total}" if not m.requantized_groups else
                     f"  exact {m.exact_groups}/{total}, requantized {m.requantized_groups}")
        lines.append(line)
    weights = sum(m.shape[0] * m.shape[1] for m in report.matrices)
    lines.append(f"{report.mode}: {len(report.matrices)} matrices ({weights:,} weights) at depth "
                 f"{report.depth}: {_fmt_bytes(report.source_bytes)} -> "
                 f"{_fmt_bytes(report.packed_bytes)}, {report.bits_per_weight:.3f} bits/weight; "
                 f"{len(report.kept)} tensors kept in floating point")
    if report.mode == "adopt":
        requantized = [m for m in report.matrices if m.requantized_groups]
        lines.append("every matrix adopted bit-exactly" if not requantized else
                     f"{len(requantized)} matrices requantized in part "
                     f"({sum(m.requantized_groups for m in requantized):,} groups), the rest "
                     "exact")
    return "\n".join(lines)


def cmd_quantize(args) -> int:
    return _convert(args, "quantize")


def cmd_adopt(args) -> int:
    return _convert(args, "adopt")


def cmd_info(args) -> int:
    _existing_dir(args.dir, "checkpoint directory")
    info = checkpoint.info(args.dir)
    print(json.dumps(info, indent=1, default=str) if args.json else format_info(info))
    return 0


def format_info(info: dict) -> str:
    """checkpoint.info(dir) as text: a header, one line per quantized layer, the totals."""
    layers = info["layers"]
    width = max((len(name) for name in layers), default=5)
    lines = [f"packed trit checkpoint {info['path']}",
             f"format version {info['format_version']}, depth {info['depth']}, groups of "
             f"{info['group_size']} weights",
             f"{'layer':<{width}}  {'shape':>13}  codebook  bits/weight"]
    for name, layer in layers.items():
        lines.append(f"{name:<{width}}  {str(layer['shape']):>13}  {layer['codebook_size']:8d}"
                     f"  {layer['bits_per_weight']:11.3f}")
    lines += [
        f"quantized: {info['quantized_layers']} layers, {info['quantized_weights']:,} weights, "
        f"{_fmt_bytes(info['packed_bytes'])}, {info['bits_per_weight']:.3f} bits/weight",
        f"kept in floating point: {info['unquantized_tensors']} tensors, "
        f"{_fmt_bytes(info['unquantized_bytes'])}",
        f"size on disk {_fmt_bytes(info['size_on_disk'])} vs FP16 "
        f"{_fmt_bytes(info['fp16_equivalent_bytes'])}: {info['compression_vs_fp16']:.2f}x "
        "smaller"]
    return "\n".join(lines)


# ---- generate ------------------------------------------------------------------------------

class TextPrinter:
    """Prints the text of a growing token sequence as it grows. A byte-level token can end in
    the middle of a UTF-8 character: such text is held back until the character is complete."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.printed = 0

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def load_for_generation(model_dir: str, device, dtype):
    """(model, tokenizer) from a packed or plain Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _existing_dir(model_dir, "model directory")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise UsageError(f"{model_dir!r} has no config.json: not a Hugging Face model directory")
    if not any(os.path.exists(os.path.join(model_dir, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UsageError(f"{model_dir!r} has no tokenizer (tokenizer.json or "
                         "tokenizer_config.json): generate needs one to read the prompt")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval(), tokenizer


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        if tokenizer.bos_token_id is None:
            raise UsageError("the prompt is empty and the tokenizer has no BOS token to start "
                             "from")
        ids = torch.tensor([[tokenizer.bos_token_id]])
    return ids


def stream_generation(model, tokenizer, ids, max_new_tokens: int, *, temperature: float = 0.0,
                      top_k: int | None = None, compile: bool = False, out=sys.stdout) -> dict:
    """Streams the continuation of `ids` [1, T] to `out` with generate.Generator and returns
    the new token ids and the timings: prefill_s, decode_tokens and decode_s, setup_s (graph
    capture and compilation, before the first token)."""
    gen = Generator(model, 1, max_len_for(ids.shape[1], max_new_tokens),
                    temperature=temperature, top_k=top_k, compile=compile)
    t0 = time.perf_counter()
    gen.warmup()
    setup_s = time.perf_counter() - t0
    printer = TextPrinter(tokenizer, out)
    times = []
    t0 = time.perf_counter()
    for tokens in gen.stream(ids, max_new_tokens, tokenizer.eos_token_id):
        times.append(time.perf_counter())
        printer.add(tokens[0])
    printer.finish()
    return {"tokens": printer.ids, "prompt_tokens": ids.shape[1], "new_tokens": len(times),
            "setup_s": setup_s,
            "prefill_s": times[0] - t0, "decode_tokens": len(times) - 1,
            "decode_s": times[-1] - times[0], "cuda_graph": gen.use_graph, "compiled": compile}


def _hf_generation(model, tokenizer, ids, max_new_tokens, temperature, top_k, out) -> dict:
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True)
    kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, streamer=streamer)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k or 0)
    ids = ids.to(model.device)
    t0 = time.perf_counter()
    result = model.generate(ids, attention_mask=ids.new_ones(ids.shape), **kwargs)
    elapsed = time.perf_counter() - t0
    new = result.shape[1] - ids.shape[1]
    return {"prompt_tokens": ids.shape[1], "new_tokens": new, "total_s": elapsed}


def format_speed(stats: dict, device, dtype) -> str:
    where = f"{device.type}, {str(dtype).replace('torch.', '')}"
    if "decode_s" not in stats:
        return (f"[{stats['new_tokens']} tokens in {stats['total_s']:.2f} s: "
                f"{stats['new_tokens'] / stats['total_s']:.1f} tokens/s with transformers' "
                f"generate ({where})]")
    how = ", CUDA graph" if stats["cuda_graph"] else ""
    how += ", compiled" if stats["compiled"] else ""
    line = (f"[prefill {stats['prompt_tokens']} tokens: {1000 * stats['prefill_s']:.1f} ms; ")
    if stats["decode_tokens"] and stats["decode_s"] > 0:
        rate = stats["decode_tokens"] / stats["decode_s"]
        line += f"decode {stats['decode_tokens']} tokens: {rate:.1f} tokens/s"
    else:
        line += "decode: no step after the first token"
    return line + f" ({where}{how}; setup {stats['setup_s']:.2f} s)]"


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    model, tokenizer = load_for_generation(args.dir, device, dtype)
    ids = prompt_ids(tokenizer, args.prompt)
    temperature = args.temperature if args.sample else 0.0
    sys.stdout.write(args.prompt)
    reason = unsupported_reason(model, max_len_for(ids.shape[1], args.max_new_tokens))
    if reason:
        print(f"\n[note: {reason}; using transformers' generate]", file=sys.stderr)
        stats = _hf_generation(model, tokenizer, ids, args.max_new_tokens, temperature,
                               args.top_k, sys.stdout)
    else:
        stats = stream_generation(model, tokenizer, ids, args.max_new_tokens,
                                  temperature=temperature, top_k=args.top_k,
                                  compile=args.compile)
    print(format_speed(stats, device, dtype))
    return 0


# ---- demo / bench --------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from .demo import run_demo  # here, not at the top: demo uses this module's helpers

    device = resolve_device(args.device)
    run_demo(out_dir=args.out, device=device, max_new_tokens=args.max_new_tokens,
             prompt=args.prompt)
    return 0


def bench_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def cmd_bench(args) -> int:
    script = os.path.join(bench_dir(), BENCH_SCRIPTS[args.name])
    if not os.path.isfile(script):
        raise UsageError(f"benchmark script {script} not found: the benchmarks live in the "
                         "bench/ folder of a source checkout of tritllm_ext")
    root = os.path.dirname(bench_dir())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, script, *args.bench_args], env=env)


# ---- argument parsing ----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritllm", description="Balanced-ternary (trit) quantized LLMs at their real "
        "bit-width: convert, inspect, run and benchmark packed checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def converter(name, help_, description):
        p = sub.add_parser(name, help=help_, description=description)
        p.add_argument("src_dir", metavar="SRC_DIR", help="Hugging Face model directory "
                       "(config.json + *.safetensors)")
        p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the packed checkpoint")
        p.add_argument("--depth", type=int, default=2, choices=(1, 2, 3, 4),
                       help="trits per weight (default 2: 9 levels, 3.5 bits/weight)")
        p.add_argument("--skip", action="append", default=None, metavar="NAME",
                       help="module name (or name suffix) to keep in floating point; "
                       "repeatable (default: lm_head)")
        p.add_argument("--device", default="cpu", choices=("auto", "cuda", "cpu"),
                       help="where matrices are quantized (default cpu; cuda is much faster "
                       "for large models)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        return p

    p = converter("quantize", "quantize an FP16/BF16 model into a packed checkpoint",
                  "Quantize every linear layer of an FP16/BF16 Hugging Face model with the "
                  "paper's codec, shard by shard (peak memory about one shard), and report "
                  "bits/weight.")
    p.set_defaults(func=cmd_quantize)
    p = converter("adopt", "pack an Entrit-style dequantized model bit-exactly",
                  "Recover the exact trits of a model published as dequantized FP16 (Entrit "
                  "style) and pack them. Matrices that are not exactly representable are "
                  "refused unless --requantize is given.")
    p.add_argument("--requantize", action="store_true",
                   help="quantize non-conforming matrices with the codec instead of refusing")
    p.set_defaults(func=cmd_adopt)

    p = sub.add_parser("info", help="describe a packed checkpoint",
                       description="Format version, depth, bits/weight per layer and in total, "
                       "size on disk against the FP16 equivalent.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the raw information as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text from a (packed) model",
                       description="Stream a continuation of the prompt and print tokens/s. "
                       "Llama-family models run on a static-KV-cache decode loop (CUDA graph on "
                       "GPU); others on transformers' generate.")
    p.add_argument("dir", metavar="DIR", help="packed checkpoint or Hugging Face model directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="activation and non-quantized weight dtype (auto: float16 on CUDA, "
                   "float32 on CPU)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8, help="with --sample (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="with --sample (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder layer (fuses small kernels; slow start)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the whole pipeline on a small model built on the spot",
                       description="Build a small random Llama-architecture model and a byte "
                       "tokenizer (no download), quantize, save, reload through "
                       "from_pretrained, compare with the dequantized reference and generate.")
    p.add_argument("--out", default=None, help="keep the checkpoints here (default: a "
                   "temporary directory, removed at the end)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--prompt", default="The trit is the natural unit of")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run a benchmark of bench/ (table, JSON, plot)",
                       description="Run bench/cpu_bench.py, bench/gpu_bench.py, "
                       "bench/gpu_kernels.py (every CUDA kernel on every product) or "
                       "bench/e2e_bench.py with the arguments that follow (try `tritllm bench "
                       "e2e --help`).")
    p.add_argument("name", choices=sorted(BENCH_SCRIPTS))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "skip", "absent") is None:
        args.skip = ["lm_head"]
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"tritllm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tritllm {args.command}: interrupted", file=sys.stderr)
        return 130
