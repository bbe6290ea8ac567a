// Asynchronous global-to-shared copies (sm_80+), used by the kernels that stage packed weights
// and activations in shared memory ahead of their use (lut_gemv.cu, tile_gemm.cu).
#pragma once

#include <cstdint>

namespace tritllm {
namespace cuda {

// 16 bytes from `global_src` to `shared_dst`, both 16-byte aligned. With valid == false nothing is
// read (the source size is 0) and the 16 bytes are zero-filled; `global_src` must still be a
// mapped address, so callers pass the tensor's base pointer then.
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(global_src),
               "r"(valid ? 16 : 0));
#endif
}

// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;");
#endif
}

// Waits until at most kPending committed groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
#endif
}

}  // namespace cuda
}  // namespace tritllm
