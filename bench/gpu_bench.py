"""GPU benchmark of torch.ops.tritllm.matmul on Llama-3.1-8B shapes, against cuBLAS and tinygemm.

For every shape (N x K) and M in 1 .. 4096 it times, in one process:
  * tritllm   depth 2 (3.5 bits/weight), float16 activations;
  * cuBLAS    F.linear with a dense float16 weight;
  * tinygemm  torch.ops.aten._weight_int4pack_mm, int4 weights in groups of 128 (the kernel takes
              bfloat16 activations only);
  * unpack + cuBLAS, for M > 16: the tritllm unpack op into a float16 W, then F.linear: the
              path matmul takes above its fused kernels (csrc/cuda/register.cu), timed here so
              that the table shows where the fused kernels stop paying.
Method: each implementation runs C times back to back inside one captured CUDA graph, each call
on its own copy of the weight (C copies together are at least twice the L2 cache, so no call
finds its weight in L2, and the graph removes launch gaps); a replay's time divided by C is one
sample; the median of the samples is reported. The device-to-device copy bandwidth is measured
first (bytes read plus bytes written); the tritllm row reports its effective bandwidth, counting
the bytes that must move (packed weight, activations, output), and its share of the copy
bandwidth. The last measurements replay one decoder layer in one graph: at M = 1 its four
products with q/k/v and gate/up concatenated, against the same graph with float16 weights; and
at M = 1 and M = 8 (batch-1 and batch-8 decoding) its seven matrices as a model holds them, one
product each or (tritllm) with q/k/v and gate/up each in one matmul_cat, against one F.linear
each.

    python bench/gpu_bench.py                      # full table, bench/gpu_bench.json, .png
    python bench/gpu_bench.py --quick              # fewer M, for a smoke test
    python bench/gpu_bench.py --plot-only F.json   # redraw the plot from a saved run
    python bench/gpu_bench.py --profile N K M      # a few plain calls, for ncu / nsys
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate+up, down
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
QUICK_TOKENS = [1, 16, 64, 256]
DEPTH = 2
TINYGEMM_GROUP = 128
TARGET_SECONDS = 0.25  # time spent replaying each configuration


def median_replay_ms(graph, calls, target_seconds=TARGET_SECONDS):
    """Median over replays of (replay time / calls), in milliseconds."""
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    stop.record()
    stop.synchronize()
    first = start.elapsed_time(stop)
    replays = max(5, min(100, int(target_seconds * 1e3 / max(first, 1e-3))))
    samples = []
    for _ in range(replays):
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / calls)
    return statistics.median(samples)


def capture(calls):
    """A CUDA graph running every callable once, after a warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def copies_for(weight_bytes, l2_bytes, most=16):
    return max(2, min(most, math.ceil(2 * l2_bytes / weight_bytes)))


def copy_bandwidth_gbs(l2_bytes):
    """Device-to-device copy of a buffer far larger than L2, (read + write) bytes / time: the
    better of a memcpy and an elementwise copy kernel."""
    n = max(1 << 30, 8 * l2_bytes)
    src = torch.empty(n // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    memcpy_ms = median_replay_ms(capture([lambda: dst.copy_(src)]), 1)
    kernel_ms = median_replay_ms(capture([lambda: torch.mul(src, 1.0, out=dst)]), 1)
    return 2 * n / min(memcpy_ms, kernel_ms) / 1e6


def random_trit_weight(n, k, generator):
    """Valid depth-2 bytes: any byte < 243 is a valid plane byte and, with a 27-entry codebook, a
    valid tail byte."""
    from tritllm_ext import format as fmt
    packed = torch.randint(0, 243, (n, fmt.packed_row_bytes(k, DEPTH)), dtype=torch.uint8,
                           device="cuda", generator=generator)
    codebook = torch.logspace(-3, -1, 27, device="cuda")
    return packed, codebook


class Implementations:
    """The three products for one shape, each with C copies of its weight."""

    def __init__(self, n, k, l2_bytes, generator, dense=True):
        """dense=False: the packed copies only (no cuBLAS or tinygemm weights)."""
        self.n, self.k = n, k
        packed, codebook = random_trit_weight(n, k, generator)
        self.codebook = codebook
        self.packed = [packed] + [packed.clone() for _ in range(copies_for(packed.nbytes, l2_bytes) - 1)]
        if dense:
            w = torch.ops.tritllm.unpack(packed, codebook, DEPTH, k, torch.float16)
            self.dense = [w] + [w.clone() for _ in range(copies_for(w.nbytes, l2_bytes) - 1)]
            self.int4 = self._tinygemm_weights(l2_bytes, generator)

    def _tinygemm_weights(self, l2_bytes, generator):
        n, k = self.n, self.k
        try:
            nibbles = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda",
                                    generator=generator)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, 8)
            scales = torch.rand(k // TINYGEMM_GROUP, n, 2, device="cuda",
                                generator=generator).to(torch.bfloat16)
            copies = copies_for(packed.nbytes + scales.nbytes, l2_bytes)
            return [(packed.clone(), scales.clone()) for _ in range(copies)]
        except (RuntimeError, AttributeError) as e:  # not built into this torch, or not this GPU
            print(f"tinygemm unavailable for {n}x{k}: {e}", file=sys.stderr)
            return None

    def time_tritllm(self, x):
        calls = [lambda p=p: torch.ops.tritllm.matmul(x, p, self.codebook, DEPTH, self.k)
                 for p in self.packed]
        return median_replay_ms(capture(calls), len(calls))

    def time_unpack(self):
        """The unpack op (exact, to float16) on every copy."""
        calls = [lambda p=p: torch.ops.tritllm.unpack(p, self.codebook, DEPTH, self.k, torch.float16)
                 for p in self.packed]
        return median_replay_ms(capture(calls), len(calls))

    def time_unpack_cublas(self, x):
        calls = [lambda p=p: F.linear(x, torch.ops.tritllm.unpack(p, self.codebook, DEPTH, self.k,
                                                                   torch.float16))
                 for p in self.packed]
        return median_replay_ms(capture(calls), len(calls))

    def time_cublas(self, x):
        calls = [lambda w=w: F.linear(x, w) for w in self.dense]
        return median_replay_ms(capture(calls), len(calls))

    def time_tinygemm(self, x):
        if self.int4 is None:
            return None
        xb = x.to(torch.bfloat16)
        calls = [lambda w=w, s=s: torch.ops.aten._weight_int4pack_mm(xb, w, TINYGEMM_GROUP, s)
                 for w, s in self.int4]
        return median_replay_ms(capture(calls), len(calls))


def layer_graph_speedup(l2_bytes, generator):
    """The four products of one decoder layer at M = 1, back to back in one graph."""
    layers = max(2, math.ceil(2 * l2_bytes / sum(n * k * 7 // 16 for n, k in SHAPES)))
    trit = [[random_trit_weight(n, k, generator) + (k,) for n, k in SHAPES] for _ in range(layers)]
    dense = [[torch.ops.tritllm.unpack(p, c, DEPTH, k, torch.float16) for p, c, k in layer]
             for layer in trit]
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.float16) for _, k in SHAPES}
    trit_calls = [lambda p=p, c=c, k=k: torch.ops.tritllm.matmul(xs[k], p, c, DEPTH, k)
                  for layer in trit for p, c, k in layer]
    dense_calls = [lambda w=w: F.linear(xs[w.shape[1]], w) for layer in dense for w in layer]
    trit_ms = median_replay_ms(capture(trit_calls), layers)
    dense_ms = median_replay_ms(capture(dense_calls), layers)
    return {"tritllm_us": trit_ms * 1e3, "cublas_fp16_us": dense_ms * 1e3,
            "speedup": dense_ms / trit_ms}


# The seven matrices of a Llama-3.1-8B decoder layer as the model holds them: q, k, v, o, gate, up,
# down (SHAPES above are the same products with q/k/v and gate/up concatenated).
MODEL_LAYER = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
               "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}
SHARED_INPUT = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
LAYER_TOKENS = (1, 8)


def model_layer_graph(l2_bytes, generator, m):
    """One decoder layer's seven products at M = m in one graph: tritllm one matmul per matrix,
    tritllm as the decode loop runs them (q/k/v and gate/up each one matmul_cat), and cuBLAS
    fp16 one F.linear per matrix."""
    weights = sum(n * k * 7 // 16 for n, k in MODEL_LAYER.values())
    layers = max(2, math.ceil(2 * l2_bytes / weights))
    trit = [{name: random_trit_weight(n, k, generator) for name, (n, k) in MODEL_LAYER.items()}
            for _ in range(layers)]
    dense = [{name: torch.ops.tritllm.unpack(p, c, DEPTH, MODEL_LAYER[name][1], torch.float16)
              for name, (p, c) in layer.items()} for layer in trit]
    xs = {k: torch.randn(m, k, device="cuda", dtype=torch.float16) for _, k in MODEL_LAYER.values()}

    def separate(layer):
        return [lambda p=p, c=c, k=MODEL_LAYER[name][1]:
                torch.ops.tritllm.matmul(xs[k], p, c, DEPTH, k) for name, (p, c) in layer.items()]

    def grouped(layer):
        calls = []
        for names in SHARED_INPUT:
            k = MODEL_LAYER[names[0]][1]
            packed, codebooks = [layer[n][0] for n in names], [layer[n][1] for n in names]
            calls.append(lambda p=packed, c=codebooks, k=k:
                         torch.ops.tritllm.matmul_cat(xs[k], p, c, DEPTH, k))
        return calls

    times = {
        "tritllm_separate_us": [c for layer in trit for c in separate(layer)],
        "tritllm_matmul_cat_us": [c for layer in trit for c in grouped(layer)],
        "cublas_fp16_separate_us": [lambda w=w: F.linear(xs[w.shape[1]], w)
                                    for layer in dense for w in layer.values()],
    }
    return {name: median_replay_ms(capture(calls), layers) * 1e3 for name, calls in times.items()}


def run(tokens):
    import tritllm_ext  # noqa: F401  (registers torch.ops.tritllm)

    torch.manual_seed(0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2_bytes = props.L2_cache_size
    copy_gbs = copy_bandwidth_gbs(l2_bytes)
    print(f"{props.name}: copy bandwidth {copy_gbs:.0f} GB/s (read + write), L2 {l2_bytes >> 20} MB")
    rows, unpacks = [], []
    for n, k in SHAPES:
        impl = Implementations(n, k, l2_bytes, generator)
        u = impl.time_unpack()
        unpacks.append({"N": n, "K": k, "unpack_us": u * 1e3,
                        "gbs": (impl.packed[0].nbytes + n * k * 2) / u / 1e6})
        print(f"unpack {n}x{k} to float16: {u * 1e3:.1f} us, {unpacks[-1]['gbs']:.0f} GB/s", flush=True)
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t = impl.time_tritllm(x)
            c = impl.time_cublas(x)
            g = impl.time_tinygemm(x)
            u = impl.time_unpack_cublas(x) if m > 16 else None
            moved = impl.packed[0].nbytes + x.nbytes + m * n * 2
            row = {"N": n, "K": k, "M": m, "tritllm_us": t * 1e3, "cublas_fp16_us": c * 1e3,
                   "tinygemm_int4_us": None if g is None else g * 1e3,
                   "unpack_cublas_us": None if u is None else u * 1e3,
                   "gbs": moved / t / 1e6, "copy_pct": 100 * moved / t / 1e6 / copy_gbs,
                   "vs_cublas": c / t, "vs_tinygemm": None if g is None else g / t}
            rows.append(row)
            print(format_row(row), flush=True)
        del impl
        torch.cuda.empty_cache()
    layer = layer_graph_speedup(l2_bytes, generator)
    print(f"decoder layer at M=1 in one graph: tritllm {layer['tritllm_us']:.1f} us, "
          f"cuBLAS fp16 {layer['cublas_fp16_us']:.1f} us, {layer['speedup']:.2f}x")
    model_layers = {}
    for m in LAYER_TOKENS:  # batch-1 and batch-8 decoding
        model_layers[m] = model_layer = model_layer_graph(l2_bytes, generator, m)
        print(f"decoder layer of 7 matrices at M={m} in one graph: tritllm one matmul each "
              f"{model_layer['tritllm_separate_us']:.1f} us, with matmul_cat for q/k/v and "
              f"gate/up {model_layer['tritllm_matmul_cat_us']:.1f} us, cuBLAS fp16 one F.linear "
              f"each {model_layer['cublas_fp16_separate_us']:.1f} us")
    return {"device": props.name, "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "copy_gbs": copy_gbs, "depth": DEPTH,
            "command": " ".join(["python"] + sys.argv), "rows": rows, "layer_m1": layer,
            **{f"model_layer_m{m}": t for m, t in model_layers.items()},
            "unpack": unpacks}


HEADER = ("| N x K | M | tritllm us | GB/s | % copy | cuBLAS fp16 us | tinygemm int4 us "
          "| unpack + cuBLAS us | x cuBLAS | x tinygemm |")


def format_row(r):
    tiny = "n/a" if r["tinygemm_int4_us"] is None else f"{r['tinygemm_int4_us']:.1f}"
    vs_tiny = "n/a" if r["vs_tinygemm"] is None else f"{r['vs_tinygemm']:.2f}"
    unpacked = "" if r.get("unpack_cublas_us") is None else f"{r['unpack_cublas_us']:.1f}"
    return (f"| {r['N']}x{r['K']} | {r['M']} | {r['tritllm_us']:.1f} | {r['gbs']:.0f} | "
            f"{r['copy_pct']:.0f} | {r['cublas_fp16_us']:.1f} | {tiny} | {unpacked} "
            f"| {r['vs_cublas']:.2f} | {vs_tiny} |")


def profile(n, k, m):
    import tritllm_ext  # noqa: F401

    packed, codebook = random_trit_weight(n, k, torch.Generator(device="cuda").manual_seed(0))
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    for _ in range(3):
        torch.ops.tritllm.matmul(x, packed, codebook, DEPTH, k)
    torch.cuda.synchronize()


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (redraw later with --plot-only)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, k in SHAPES:
        rows = [r for r in result["rows"] if (r["N"], r["K"]) == (n, k)]
        ms = [r["M"] for r in rows]
        line, = ax.plot(ms, [r["vs_cublas"] for r in rows], marker="o", label=f"{n}x{k} vs cuBLAS fp16")
        tiny = [(r["M"], r["vs_tinygemm"]) for r in rows if r["vs_tinygemm"] is not None]
        if tiny:
            ax.plot(*zip(*tiny), linestyle="--", color=line.get_color(), alpha=0.6,
                    label=f"{n}x{k} vs tinygemm int4")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speed-up of tritllm (d=2)")
    ax.set_title(f"{result['device']}, {result['date']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"M in {QUICK_TOKENS} only")
    parser.add_argument("--tokens", type=int, nargs="+", help="these values of M only")
    parser.add_argument("--json", default=os.path.join(HERE, "gpu_bench.json"))
    parser.add_argument("--plot", default=os.path.join(HERE, "gpu_bench.png"))
    parser.add_argument("--plot-only", metavar="JSON", help="redraw the plot of a saved run")
    parser.add_argument("--profile", nargs=3, type=int, metavar=("N", "K", "M"),
                        help="run the tritllm product and unpack a few times, nothing else")
    args = parser.parse_args()
    if args.profile:
        profile(*args.profile)
        return
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), args.plot)
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device")
    result = run(args.tokens or (QUICK_TOKENS if args.quick else TOKENS))
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(format_row(r))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    plot(result, args.plot)


if __name__ == "__main__":
    main()
