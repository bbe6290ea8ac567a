"""Peak memory while loading a packed checkpoint of about 1 GB (docs/CHECKPOINTS.md).

    PYTHONPATH=. python bench/load_memory.py --out /tmp/tritllm_1gb [--device cuda]

1. Builds a Llama-shaped model (hidden 2048, intermediate 5632, 37 layers, vocab 32000, FP16
   embeddings and lm_head) without ever holding its FP16 weights: the architecture is built on
   the meta device and each Linear becomes a TritLinear holding a depth-2 quantization of a
   random matrix. The codec quantizes one random matrix per distinct shape and every layer gets
   a copy of those bytes (quantizing 1.7 billion weights would take long and change nothing
   about loading). The checkpoint is saved with tritllm_ext.save.
2. In a fresh process per loader, loads it with tritllm_ext.load and with
   AutoModelForCausalLM.from_pretrained, and reports the growth of the peak resident memory
   during loading (Linux /proc/self/status VmHWM, reset just before loading; getrusage's
   ru_maxrss would include the parent's peak, which survives fork and exec) and, on CUDA, the
   peak allocated GPU memory, against the bound 1.5 x (packed matrices + unquantized tensors).
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from torch import nn

import tritllm_ext
from tritllm_ext import checkpoint
from tritllm_ext.codec import quantize
from tritllm_ext.model import quantizable_linears, replace_module
from tritllm_ext.nn import TritLinear

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=37,
              num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
              max_position_embeddings=2048, tie_word_embeddings=False)

MEASURE = r"""
import json, re, sys, torch
import tritllm_ext
from transformers import AutoModelForCausalLM

def status_kib(field):  # this process's own memory (getrusage's peak would include the parent's)
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))

loader, path, device = sys.argv[1:4]
cuda = device.startswith("cuda")
if cuda:
    torch.zeros(1, device=device)  # CUDA context before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
before = status_kib("VmRSS")
if loader == "load":
    model = tritllm_ext.load(path, device=device)
else:
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device)
peak = status_kib("VmHWM")
with torch.no_grad():
    ids = torch.tensor([[1, 2, 3]], device=device)
    assert torch.isfinite(model(ids).logits).all()
print(json.dumps({"rss_before_load": before * 1024, "peak_rss": peak * 1024,
                  "peak_cuda_allocated": torch.cuda.max_memory_allocated() if cuda else None}))
"""


def build(out_dir: str) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(**CONFIG, dtype=torch.float16, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = checkpoint.build_skeleton(config)
    by_shape = {}
    for name in quantizable_linears(model):
        linear = model.get_submodule(name)
        shape = tuple(linear.weight.shape)
        if shape not in by_shape:
            by_shape[shape] = quantize(torch.randn(shape, dtype=torch.float16) * 0.02, depth=2)
        tw = by_shape[shape]
        layer = TritLinear.from_trit_weight(type(tw)(tw.packed.clone(), tw.codebook.clone(),
                                                     tw.shape, tw.depth))
        replace_module(model, name, layer)
    for module in model.modules():  # embeddings, norms, lm_head: real FP16 tensors
        for key, param in module._parameters.items():
            if param is not None and param.is_meta:
                value = torch.randn(param.shape, dtype=torch.float16) * 0.02
                module._parameters[key] = nn.Parameter(value, requires_grad=False)
    tritllm_ext.save(model, out_dir)


def sizes(out_dir: str) -> dict:
    summary = tritllm_ext.info(out_dir)
    return {"packed_bytes": summary["packed_bytes"],
            "unquantized_bytes": summary["unquantized_bytes"],
            "size_on_disk": summary["size_on_disk"]}


def measure(loader: str, out_dir: str, device: str) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, loader, out_dir, device],
                            capture_output=True, text=True, env=dict(os.environ))
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the ~1 GB checkpoint")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.out, checkpoint.PACKED_INDEX_FILE)):
        build(args.out)
    size = sizes(args.out)
    bound = 1.5 * (size["packed_bytes"] + size["unquantized_bytes"])
    print(f"packed matrices {size['packed_bytes'] / 1e9:.3f} GB, unquantized tensors "
          f"{size['unquantized_bytes'] / 1e9:.3f} GB, on disk {size['size_on_disk'] / 1e9:.3f} GB;"
          f" bound 1.5 x (packed + unquantized) = {bound / 1e9:.3f} GB")
    for loader in ("load", "from_pretrained"):
        m = measure(loader, args.out, args.device)
        if m["peak_cuda_allocated"] is not None:
            peak = m["peak_cuda_allocated"]
            print(f"{loader:16s} peak CUDA allocated {peak / 1e9:.3f} GB "
                  f"({peak / bound:.2f} of the bound)")
        growth = m["peak_rss"] - m["rss_before_load"]
        print(f"{loader:16s} peak RSS {m['peak_rss'] / 1e9:.3f} GB = "
              f"{m['rss_before_load'] / 1e9:.3f} GB before loading (Python, torch, "
              f"transformers) + {growth / 1e9:.3f} GB while loading = {growth / bound:.2f} x "
              "the bound")


if __name__ == "__main__":
    main()
