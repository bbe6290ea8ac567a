// The AVX2+FMA kernel set: not written yet, so this build has none.
#include "../kernels.h"

namespace tritllm::cpu {

const KernelSet* avx2_kernels() { return nullptr; }

}  // namespace tritllm::cpu
