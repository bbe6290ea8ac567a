// Programmatic dependent launch (sm_90+): a kernel launched with a LaunchConfig made with `early`
// may start while the kernel before it on the stream is still running, so its launch and its
// set-up overlap that kernel's last blocks instead of following them. Its threads must call
// wait_for_previous_kernel() before they read anything an earlier kernel may write (activations,
// weights, codebooks) or write anything an earlier kernel may still read; after that call every
// earlier kernel has finished and its writes are visible. let_next_kernel_start() lets a kernel
// launched early after this one start. Without an early launch both calls do nothing.
//
// Only code compiled for sm_90+ may be launched early (older code has no wait instruction): the
// launchers ask runs_sm90_code first.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>

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

// Whether the code of `kernel` that runs on the current device was compiled for sm_90+. A build
// for older GPUs only runs on a Hopper through the JIT of its PTX, without the sm_90 instructions
// (tensor copies, the wait of an early launch). Every kernel of the extension is compiled for the
// same GPUs (setup.py, CMakeLists.txt), so one kernel's answer holds for all, and it cannot change
// while the process runs: each device is asked once, not on every call.
inline bool runs_sm90_code(const void* kernel) {
  static std::array<std::atomic<int>, 64> answer{};  // per device: 0 not asked, 1 yes, -1 no
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::atomic<int>* known = device < int(answer.size()) ? &answer[device] : nullptr;
  if (known != nullptr && known->load(std::memory_order_relaxed) != 0) return *known > 0;
  cudaFuncAttributes built{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&built, kernel));
  if (known != nullptr) known->store(built.ptxVersion >= 90 ? 1 : -1, std::memory_order_relaxed);
  return built.ptxVersion >= 90;
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
