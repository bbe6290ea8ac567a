// The AVX2+FMA kernel sets, or nullptr where this translation unit was not compiled with -mavx2
// -mfma (setup.py compiles csrc/cpu/avx2/*.cpp with those flags on x86 only).
//
//   avx2    the kernels of this directory
//   avx512  the same, with the blocked matmul's inner product in AVX-512 (F, BW, DQ, VL, VNNI),
//           compiled by a function target attribute (matmul.cpp), so it needs no build flag
//
// Nothing here may run at load time: a static initializer compiled with -mavx2 would execute AVX2
// instructions on every CPU. The tables below are constant-initialized.
#include "../kernels.h"

#if defined(__AVX2__) && defined(__FMA__)

#include "kernels_avx2.h"

namespace tritllm::cpu {

namespace {
const KernelSet kAvx2Kernels = {"avx2", avx2::unpack_rows, avx2::prepared_bytes,
                                avx2::prepare_rows, avx2::matmul_tile};
const KernelSet kAvx512Kernels = {"avx512", avx2::unpack_rows, avx2::prepared_bytes,
                                  avx2::prepare_rows, avx2::matmul_tile_avx512};
}  // namespace

const KernelSet* avx2_kernels() { return &kAvx2Kernels; }
const KernelSet* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace tritllm::cpu

#else

namespace tritllm::cpu {

const KernelSet* avx2_kernels() { return nullptr; }
const KernelSet* avx512_kernels() { return nullptr; }

}  // namespace tritllm::cpu

#endif
