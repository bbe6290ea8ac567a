// Programmatic dependent launch (sm_90+): a kernel launched with a LaunchConfig made with `early`
// may start while the kernel before it on the stream is still running, so its launch and its
// set-up overlap that kernel's last blocks instead of following them. Its threads must call
// wait_for_previous_kernel() before they read anything an earlier kernel may write (activations,
// weights, codebooks) or write anything an earlier kernel may still read; after that call every
// earlier kernel has finished and its writes are visible. let_next_kernel_start() lets a kernel
// launched early after this one start. Without an early launch both calls do nothing.
//
// Only code compiled for sm_90+ may be launched early (older code has no wait instruction), so
// the callers use it only for kernels whose launchers already check that (xtable_gemv.cu).
#pragma once

#include <cuda_runtime.h>

namespace tritllm {
namespace cuda {

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void let_next_kernel_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The launch configuration of a kernel on `stream`: launched early (above) or not, and in
// clusters of `cluster_blocks` blocks (1-D; 0: no clusters). For cudaLaunchKernelEx(config.get(),
// kernel, args...); not copyable, because the configuration points at its own attributes.
class LaunchConfig {
 public:
  LaunchConfig(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, bool early,
               int cluster_blocks = 0) {
    config_.gridDim = grid;
    config_.blockDim = block;
    config_.dynamicSmemBytes = shared_bytes;
    config_.stream = stream;
    config_.attrs = attributes_;
    if (early) {
      cudaLaunchAttribute& a = attributes_[config_.numAttrs++];
      a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      a.val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster_blocks > 0) {
      cudaLaunchAttribute& a = attributes_[config_.numAttrs++];
      a.id = cudaLaunchAttributeClusterDimension;
      a.val.clusterDim.x = unsigned(cluster_blocks);
      a.val.clusterDim.y = a.val.clusterDim.z = 1;
    }
  }
  LaunchConfig(const LaunchConfig&) = delete;
  LaunchConfig& operator=(const LaunchConfig&) = delete;
  const cudaLaunchConfig_t* get() const { return &config_; }

 private:
  cudaLaunchAttribute attributes_[2] = {};
  cudaLaunchConfig_t config_ = {};
};

}  // namespace cuda
}  // namespace tritllm
