"""Checks that AVX instructions appear only in code compiled from the instruction-set units.

Only csrc/cpu/avx2/*.cpp is compiled with -mavx2 -mfma; everything else must run on any x86-64
CPU. The risk is an inline function (from a header, e.g. a std::vector or at::Tensor method)
emitted by both kinds of translation unit: the linker keeps one copy, and if it keeps the AVX2
one, the "portable" code crashes with SIGILL on a CPU without AVX2 (bitnet.cpp's most reported
bug). This script disassembles the built library and fails if a function that uses VEX/EVEX
instructions is not defined exclusively by the SIMD units' object files, or is a static
initializer (those run when the library loads, on every CPU, whichever unit they come from).

    python .ci/check_simd_isolation.py LIBRARY.so OBJECT_DIR [--simd-dir avx2 ...]
"""
import argparse
import pathlib
import re
import subprocess
import sys

FUNCTION_HEADER = re.compile(r"^[0-9a-f]+ <(.+)>:$")
# objdump -d --no-show-raw-insn line: "  address:\tmnemonic operands"
INSTRUCTION = re.compile(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$")
NON_VEX_V_MNEMONICS = {"verr", "verw"}  # the only x86 mnemonics starting with v that are not AVX
STATIC_INITIALIZER_PREFIXES = ("_GLOBAL__sub_I_", "__cxx_global_var_init")  # GCC, Clang


def defined_symbols(objects):
    """Mangled names of the symbols the object files define (any binding)."""
    if not objects:
        return set()
    out = subprocess.run(["nm", "--defined-only", "--format=posix", *map(str, objects)],
                         check=True, capture_output=True, text=True).stdout
    # posix format: "name type value size"; object headers end with ':'
    return {line.split()[0] for line in out.splitlines()
            if line.strip() and not line.endswith(":")}


def avx_functions(library):
    """Names of the library's functions that contain an AVX (VEX or EVEX encoded) instruction."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)],
                         check=True, capture_output=True, text=True).stdout
    found, function = set(), None
    for line in out.splitlines():
        header = FUNCTION_HEADER.match(line)
        if header:
            function = header.group(1)
            continue
        insn = INSTRUCTION.match(line)
        if function and insn:
            mnemonic, operands = insn.groups()
            if ((mnemonic.startswith("v") and mnemonic not in NON_VEX_V_MNEMONICS)
                    or "%ymm" in operands or "%zmm" in operands):
                found.add(function)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", type=pathlib.Path)
    parser.add_argument("object_dir", type=pathlib.Path)
    parser.add_argument("--simd-dir", action="append", default=None,
                        help="directory name of a SIMD unit's sources (default: avx2)")
    args = parser.parse_args()
    simd_dirs = set(args.simd_dir or ["avx2"])

    objects = sorted(args.object_dir.rglob("*.o"))
    if not objects:
        sys.exit(f"no object files under {args.object_dir}")
    simd_objects = [o for o in objects if simd_dirs & set(o.parts)]
    portable_objects = [o for o in objects if o not in simd_objects]
    simd_only = defined_symbols(simd_objects) - defined_symbols(portable_objects)

    avx = avx_functions(args.library)
    leaked = sorted(avx - simd_only | {f for f in avx if f.startswith(STATIC_INITIALIZER_PREFIXES)})
    print(f"{len(simd_objects)} SIMD and {len(portable_objects)} portable objects; "
          f"{len(simd_only)} symbols defined only by SIMD units")
    if leaked:
        demangled = subprocess.run(["c++filt"], input="\n".join(leaked), check=True,
                                   capture_output=True, text=True).stdout
        sys.exit("AVX instructions outside the SIMD units or in a static initializer (they "
                 f"would crash a CPU without AVX2):\n{demangled}")
    print("ok: AVX instructions only in functions defined exclusively by the SIMD units")


if __name__ == "__main__":
    main()
