// The AVX2+FMA kernel set, or nullptr where this translation unit was not compiled with -mavx2
// -mfma (setup.py compiles csrc/cpu/avx2/*.cpp with those flags on x86 only).
//
// Nothing here may run at load time: a static initializer compiled with -mavx2 would execute AVX2
// instructions on every CPU. The table below is constant-initialized.
#include "../kernels.h"

#if defined(__AVX2__) && defined(__FMA__)

#include "kernels_avx2.h"

namespace tritllm::cpu {

namespace {
const KernelSet kAvx2Kernels = {"avx2", avx2::unpack_rows, avx2::prepared_bytes,
                                avx2::prepare_rows, avx2::matmul_tile};
}  // namespace

const KernelSet* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace tritllm::cpu

#else

namespace tritllm::cpu {

const KernelSet* avx2_kernels() { return nullptr; }

}  // namespace tritllm::cpu

#endif
