// Hopper's thread-block clusters (sm_90+): blocks launched together as a cluster run at the same
// time on one GPU processing cluster, can wait for each other at a cluster barrier and read each
// other's shared memory. Used by xtable_gemv.cu to add the partial sums of a cluster's blocks
// without a second kernel. A kernel launched without a cluster size is a cluster of one block.
#pragma once

#include <cstdint>

#include "bulk_copy.cuh"

namespace tritllm {
namespace cuda {

// Where a block stands among the clusters of a 1-D grid of 1-D clusters.
struct ClusterPlace {
  int rank;    // of the block in its cluster, 0 .. blocks - 1
  int blocks;  // of a cluster
  int index;   // of the cluster in the grid
  int count;   // clusters in the grid
};

__device__ __forceinline__ ClusterPlace cluster_place() {
  uint32_t rank = 0, blocks = 1, index = 0, count = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "mov.u32 %0, %%cluster_ctarank;\n"
      "mov.u32 %1, %%cluster_nctarank;\n"
      "mov.u32 %2, %%clusterid.x;\n"
      "mov.u32 %3, %%nclusterid.x;"
      : "=r"(rank), "=r"(blocks), "=r"(index), "=r"(count));
#else
  bulk_copy_unsupported();
#endif
  return {int(rank), int(blocks), int(index), int(count)};
}

// Every thread of every block of the cluster waits here; what each wrote to shared memory before
// is then visible to all of them (release on arrival, acquire on the wait).
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;" ::
          : "memory");
#else
  bulk_copy_unsupported();
#endif
}

// Every thread of every block of the cluster waits here, with no promise about memory: for a
// block that must not leave while others may still read its shared memory.
__device__ __forceinline__ void cluster_wait_for_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "barrier.cluster.arrive.relaxed.aligned;\n"
      "barrier.cluster.wait.aligned;" ::
          : "memory");
#else
  bulk_copy_unsupported();
#endif
}

// The float at shared address `address` (as this block sees its own shared memory) of the
// cluster's block `rank`: every block of a kernel has the same shared-memory layout.
__device__ __forceinline__ float load_from_block(uint32_t address, int rank) {
  float v = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote));
#else
  bulk_copy_unsupported();
#endif
  return v;
}

}  // namespace cuda
}  // namespace tritllm
