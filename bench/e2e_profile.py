"""Where the GPU time of one decode step goes: kernel time per step, grouped by kernel, of the
Llama-3.1-8B-shaped model of bench/e2e_bench.py, in FP16 and quantized at d = 2.

It runs the decode loop of tritllm_ext.generate (compiled code between the attention ops, one
CUDA graph per step) and records `--steps` graph replays with torch.profiler; kernels are
grouped by the part of their name that says what they are (decode_attention, xtable_gemv,
tile_gemm, sum_splits, triton for the compiled element-wise kernels, cuBLAS's nvjet kernels by
full name, ...). The sum is kernel time only:
the step's wall time also holds the gaps between kernels.

    python bench/e2e_profile.py                  # batch 1 FP16, batch 1 and 8 trit
    python bench/e2e_profile.py --batch 8 --steps 10
"""
import argparse
import collections
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

import e2e_bench  # noqa: E402
from tritllm_ext.demo import build_random_llama, llama_config, rebuild_rotary  # noqa: E402
from tritllm_ext.generate import Generator  # noqa: E402

# Name fragments that group kernels; the first one a kernel's name contains is its group.
GROUPS = ("decode_attention", "xtable_gemv", "tile_gemm", "slot_order", "sum_splits", "lut_gemv",
          "unpack", "gemv", "gemm", "flash", "softmax", "triton", "Memcpy", "Memset", "elementwise",
          "reduce", "cat", "index")


def group_of(kernel_name: str) -> str:
    lower = kernel_name.lower()
    return next((g for g in GROUPS if g.lower() in lower), kernel_name)


def profile_steps(model, batch: int, label: str, steps: int) -> None:
    """Prints the kernel time per decode step of `model` at `batch`, by kernel group."""
    gen = Generator(model, batch, 256, compile=True)
    gen.prefill(torch.randint(0, 1000, (batch, 32), device="cuda"))
    for _ in range(5):  # capture, compile, warm up
        gen.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            gen.step()
        torch.cuda.synchronize()
    time_us, calls = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            group = group_of(event.name)
            time_us[group] += event.device_time_total
            calls[group] += 1
    print(f"== {label}, batch {batch}: kernel time per step {sum(time_us.values()) / steps:.0f} us")
    for group, t in time_us.most_common(14):
        print(f"  {t / steps:8.1f} us  {calls[group] / steps:6.1f} per step  {group[:90]}")
    del gen
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", choices=sorted(e2e_bench.MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                        help="batch sizes of the trit model (FP16 runs the first)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--depth", type=int, default=2, choices=(1, 2, 3, 4))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("e2e_profile.py needs a CUDA device")
    device = torch.device("cuda")
    config = llama_config(**e2e_bench.MODELS[args.model])
    model = build_random_llama(config, dtype=torch.float16, device=device, seed=e2e_bench.SEED)
    rebuild_rotary(model, device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model} shapes")
    profile_steps(model, args.batch[0], "float16", args.steps)
    e2e_bench.quantize_in_place(model, args.depth, 0)
    torch._dynamo.reset()  # drop compiled code that refers to the floating-point layers
    for batch in args.batch:
        profile_steps(model, batch, f"trit d={args.depth}", args.steps)


if __name__ == "__main__":
    main()
