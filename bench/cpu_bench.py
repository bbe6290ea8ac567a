"""CPU benchmark: torch.ops.tritllm.matmul (depth 2, 3.5 bits/weight) against torch's F.linear on
dense float32 / bfloat16 weights, side by side in one process, on the Llama-3.1-8B linear shapes.

    PYTHONPATH=. python bench/cpu_bench.py                 # full run (a few minutes)
    PYTHONPATH=. python bench/cpu_bench.py --quick         # one shape, fewer repeats
    PYTHONPATH=. python bench/cpu_bench.py --json out.json --plot out.png
    PYTHONPATH=. python bench/cpu_bench.py --threads 1 --clock cpu   # on a busy, shared machine

Times are medians over repeats. Every repeat uses the next of several copies of the weights, so
that a weight is never served from the last-level cache of the previous repeat (the copies
together are at least twice the L3 size). Effective bandwidth = weight bytes read per call /
time, compared with the machine's copy bandwidth, measured here on a large tensor copy.

--clock cpu times with the process's CPU time instead of the wall clock: on a machine shared
with other jobs, a single-threaded run (--threads 1) then measures the work itself, not the time
spent waiting for a core (with several threads it would also count OpenMP's spin-waiting).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from tritllm_ext import format as fmt
from tritllm_ext import ops

# (name, N = out_features, K = in_features) of Llama-3.1-8B's linear layers
SHAPES = [("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096),
          ("down_proj", 4096, 14336)]
BATCHES = (1, 4, 16, 128)
DEPTH = 2
# Weight copies rotate until they span this many bytes (2x a 32 MB L3).
ROTATION_BYTES = 64 << 20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


CLOCK = time.perf_counter  # or time.process_time (--clock cpu)


def median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbs(repeats: int) -> float:
    """Read + write bandwidth of a 512 MB tensor copy, GB/s."""
    src = torch.ones(128 << 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats, 1)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(ROTATION_BYTES / nbytes))


class Rotation:
    """Calls fn(copy) on the next copy every time."""

    def __init__(self, copies, fn):
        self.copies, self.fn, self.i = copies, fn, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.fn(self.copies[self.i])


def random_packed(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Valid random depth-2 bytes: every byte of a depth-2 group is < 243 and any tail byte is a
    valid scale index for a 27-entry codebook."""
    return torch.randint(0, 243, (n, fmt.packed_row_bytes(k, DEPTH)), dtype=torch.uint8,
                         generator=gen)


def run(args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    codebook = torch.logspace(-3, -1, fmt.MAX_CODEBOOK)
    rows = []
    for name, n, k in [s for s in SHAPES if s[0] in args.shapes]:
        packed_bytes = n * fmt.packed_row_bytes(k, DEPTH)
        packed = [random_packed(n, k, gen) for _ in range(copies_for(packed_bytes))]
        dense = {}
        for dtype in args.dtypes:
            size = n * k * dtype.itemsize
            dense[dtype] = [torch.randn(n, k, generator=gen).to(dtype)
                            for _ in range(copies_for(size))]
        for m in args.batches:
            repeats = max(3, args.repeats // (1 + m // 16))
            for dtype in args.dtypes:
                x = torch.randn(m, k, generator=gen).to(dtype)
                torch_ms = median_ms(Rotation(dense[dtype], lambda w: F.linear(x, w)), repeats,
                                     args.warmup)
                trit_ms = median_ms(Rotation(packed, lambda p: torch.ops.tritllm.matmul(
                    x, p, codebook, DEPTH, k)), repeats, args.warmup)
                rows.append({
                    "shape": name, "N": n, "K": k, "M": m, "dtype": str(dtype).split(".")[-1],
                    "torch_ms": torch_ms, "tritllm_ms": trit_ms, "speedup": torch_ms / trit_ms,
                    "tritllm_gbs": packed_bytes / (trit_ms * 1e-3) / 1e9,
                    "torch_gbs": n * k * dtype.itemsize / (torch_ms * 1e-3) / 1e9,
                })
                print_row(rows[-1], args.copy_gbs)
        del packed, dense
    return rows


HEADER = (f"{'shape':<13}{'N x K':>13}{'M':>5}{'dtype':>10}{'F.linear ms':>13}{'tritllm ms':>12}"
          f"{'speedup':>9}{'trit GB/s':>11}{'% copy BW':>11}")


def print_row(r: dict, copy_gbs: float) -> None:
    print(f"{r['shape']:<13}{r['N']:>6}x{r['K']:<6}{r['M']:>5}{r['dtype']:>10}"
          f"{r['torch_ms']:>13.3f}{r['tritllm_ms']:>12.3f}{r['speedup']:>8.2f}x"
          f"{r['tritllm_gbs']:>11.1f}{100 * r['tritllm_gbs'] / copy_gbs:>10.0f}%", flush=True)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            sel = [r for r in rows if r["shape"] == shape and r["dtype"] == dtype]
            ax.plot([r["M"] for r in sel], [r["speedup"] for r in sel], marker="o", label=dtype)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} {sel[0]['N']}x{sel[0]['K']}")
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("F.linear time / tritllm time")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="down_proj only, M = 1 and 16, 5 repeats")
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES],
                        choices=[s[0] for s in SHAPES])
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed calls at M <= 16 (fewer at larger M)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kernel", default="auto", help="CPU kernel set: auto, avx2, scalar")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall clock, or the process's CPU time (see above)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG of the speedups here (needs matplotlib)")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.batches, args.repeats = ["down_proj"], [1, 16], 5
    args.dtypes = [getattr(torch, d) for d in args.dtypes]
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    kernel = ops.set_cpu_kernel(args.kernel)

    args.copy_gbs = copy_bandwidth_gbs(5)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  CPU: {cpu_model()}  threads: "
          f"{torch.get_num_threads()}  torch {torch.__version__}  tritllm kernel: {kernel}  "
          f"clock: {args.clock}  load average: {os.getloadavg()[0]:.1f}")
    print(f"# copy bandwidth (read + write): {args.copy_gbs:.1f} GB/s; tritllm depth {DEPTH} "
          f"({fmt.stored_bits_per_weight(DEPTH)} bits/weight); medians")
    print(HEADER)
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "threads": torch.get_num_threads(), "clock": args.clock,
                       "torch": torch.__version__, "kernel": kernel,
                       "copy_gbs": args.copy_gbs, "date": time.strftime("%Y-%m-%d %H:%M"),
                       "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
