"""Every CUDA kernel of torch.ops.tritllm.matmul on every product it can run: the measurements
behind the kernel choice in csrc/cuda/register.cu.

For each Llama-3.1-8B shape (N x K) and M it times, by the method of bench/gpu_bench.py (CUDA
graphs over rotating weight copies, medians), each kernel forced with
torch.ops.tritllm._cuda_matmul_with, and the kernel the heuristic picks; it prints one table
(microseconds, fastest kernel marked) and writes JSON.

    python bench/gpu_kernels.py                        # M = 1..16, 24, 32, 48, 64 ... 1024
    python bench/gpu_kernels.py --tokens 8 16 --json k.json
"""
import argparse
import datetime
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from gpu_bench import DEPTH, SHAPES, Implementations, capture, median_replay_ms  # noqa: E402

KERNELS = ("xtable", "lut", "tile", "tile_sync", "generic", "gemm")
TOKENS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024]


def time_kernel(impl, x, kernel):
    """Median microseconds of one product by `kernel`, or None if it cannot run it."""
    def call(p, kernel=kernel):
        if kernel == "auto":
            return torch.ops.tritllm.matmul(x, p, impl.codebook, DEPTH, impl.k)
        return torch.ops.tritllm._cuda_matmul_with(x, p, impl.codebook, DEPTH, impl.k, kernel)
    try:
        call(impl.packed[0])
    except RuntimeError as e:
        if "cannot run" in str(e):
            return None
        raise
    calls = [lambda p=p: call(p) for p in impl.packed]
    return median_replay_ms(capture(calls), len(calls)) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--json", default=os.path.join(HERE, "gpu_kernels.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA device")
    import tritllm_ext  # noqa: F401  (registers torch.ops.tritllm)

    props = torch.cuda.get_device_properties(0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    names = list(args.kernels) + ["auto"]
    print(f"{props.name}, torch {torch.__version__}, depth {DEPTH}, float16 x; microseconds")
    print("| N x K | M | " + " | ".join(names) + " | fastest |")
    print("|---|---|" + "---|" * (len(names) + 1))
    rows = []
    for n, k in SHAPES:
        impl = Implementations(n, k, props.L2_cache_size, generator, dense=False)
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            times = {name: time_kernel(impl, x, name) for name in names}
            ran = {name: t for name, t in times.items() if t is not None and name != "auto"}
            best = min(ran, key=ran.get)
            rows.append({"N": n, "K": k, "M": m, "us": times, "fastest": best})
            cells = " | ".join("" if times[name] is None else
                               (f"**{times[name]:.1f}**" if name == best else f"{times[name]:.1f}")
                               for name in names)
            print(f"| {n}x{k} | {m} | {cells} | {best} |", flush=True)
        del impl
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"device": props.name, "date": datetime.date.today().isoformat(),
                   "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
                   "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
