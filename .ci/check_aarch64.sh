#!/usr/bin/env bash
# Proves that nothing x86-only breaks the build on aarch64: cross-compiles every C++ source an
# aarch64 build compiles (csrc/*.cpp, csrc/cpu/*.cpp and csrc/cpu/avx2/*.cpp, the last without
# -mavx2, as setup.py and CMakeLists.txt compile them there) against the installed torch's
# headers, then checks that every tritllm function those objects call is defined by one of them
# (code that calls an AVX2 kernel the aarch64 build lacks compiles, but would not link).
#
#   bash .ci/check_aarch64.sh            (PYTHON: the interpreter whose torch to use; python3)
#
# Needs aarch64-linux-gnu-g++ (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu); as root,
# the script installs it when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CXX=aarch64-linux-gnu-g++
NM=aarch64-linux-gnu-nm

if ! command -v "$CXX" >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing g++-aarch64-linux-gnu"
    apt-get install -y -q g++-aarch64-linux-gnu >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q g++-aarch64-linux-gnu >/dev/null; }
  else
    echo "error: $CXX not found; install g++-aarch64-linux-gnu" >&2
    exit 1
  fi
fi

# torch's headers are plain C++ and the same for every architecture; so is Python.h (only its
# pyconfig.h is per-platform, and x86-64 and aarch64 Linux agree on what it records).
mapfile -t INCLUDES < <("$PYTHON" -c '
import sysconfig
from torch.utils.cpp_extension import include_paths
for path in include_paths() + [sysconfig.get_paths()["include"]]:
    print("-I" + path)')

shopt -s nullglob
SOURCES=(csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/avx2/*.cpp)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# The flags setup.py's torch BuildExtension uses (torch >= 2.10 compiles extensions as C++20).
for src in "${SOURCES[@]}"; do
  echo "$CXX -c $src"
  "$CXX" -std=c++20 -O1 -fPIC -fopenmp -DTORCH_API_INCLUDE_EXTENSION_H \
    -DTORCH_EXTENSION_NAME=_C "${INCLUDES[@]}" -c "$src" -o "$OUT/$(echo "$src" | tr / _).o"
done

# Mangled names in namespace tritllm contain "7tritllm"; torch's own symbols are not checked.
defined=$("$NM" --defined-only -P "$OUT"/*.o | awk 'NF >= 2 {print $1}' | sort -u)
missing=$("$NM" --undefined-only -P "$OUT"/*.o | awk 'NF >= 2 {print $1}' | grep 7tritllm \
            | sort -u | comm -23 - <(echo "$defined") || true)
if [[ -n $missing ]]; then
  echo "error: tritllm functions used but not defined in an aarch64 build:" >&2
  echo "$missing" | c++filt >&2
  exit 1
fi
echo "ok: ${#SOURCES[@]} sources compile for aarch64 and define every tritllm function they use"
