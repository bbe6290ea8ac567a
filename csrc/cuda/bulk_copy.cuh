// Hopper's tensor copies (sm_90+): the copy engine moves a box of a 2-D array in global memory
// (here: some rows x a run of bytes of a packed weight) into shared memory and reports to an
// mbarrier in shared memory when the bytes have landed. One instruction per box instead of one
// load per thread and word; rows past the array's end land as zeros; no registers hold the bytes
// in flight. The array's shape and the box are described by a 128-byte CUtensorMap that the host
// encodes (byte_box_map) and the kernel receives among its parameters. Used by xtable_gemv.cu and
// tile_gemm.cu.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tritllm {
namespace cuda {

// The kernels that use these helpers run only where they were compiled for sm_90 or newer (their
// launchers check); code built for an older GPU traps rather than read bytes that never came.
__device__ __forceinline__ void bulk_copy_unsupported() {
#if defined(__CUDA_ARCH__)
  __trap();
#endif
}

// An mbarrier at shared address `bar` that completes a phase after `arrivals` arrivals (and the
// bytes they expect, below), made visible to the copy engine. Must be visible to the block (a
// barrier) before any use.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals = 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "mbarrier.init.shared::cta.b64 [%0], %1;\n"
      "fence.mbarrier_init.release.cluster;" ::"r"(bar),
      "r"(arrivals)
      : "memory");
#else
  bulk_copy_unsupported();
#endif
}

// Arrives on `bar` expecting `bytes` more from tensor copies: the phase completes once they land.
__device__ __forceinline__ void mbarrier_expect_bytes(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
#else
  bulk_copy_unsupported();
#endif
}

// One arrival on `bar`, with no bytes expected.
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
#else
  bulk_copy_unsupported();
#endif
}

// Waits until the phase of `bar` with parity `parity` (0, 1, 0, ... for its 1st, 2nd, 3rd...
// phase) has completed; the landed bytes are then visible to the waiting thread.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#else
  bulk_copy_unsupported();
#endif
}

// The box of `map` whose first byte is at column `column`, row `row` into shared address `dst`
// (128-byte aligned; 1024 with the 128-byte swizzle); the landed bytes (always the whole box)
// are counted on `bar`.
__device__ __forceinline__ void copy_box_to_shared(uint32_t dst, const CUtensorMap* map,
                                                   int column, int row, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(column), "r"(row), "r"(bar)
      : "memory");
#else
  bulk_copy_unsupported();
#endif
}

// Brings the tensor map at generic address `map` (a __grid_constant__ kernel parameter) into the
// copy engine's descriptor cache ahead of the first copy that uses it.
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#else
  bulk_copy_unsupported();
#endif
}

// The map of `array`, a contiguous uint8 matrix [rows, columns] (16-byte aligned, columns a
// multiple of 16), for boxes of `box_rows` x `box_columns` bytes (box_columns a multiple of 16,
// both at most 256). A box lands as box_rows rows of box_columns bytes, or, with
// CU_TENSOR_MAP_SWIZZLE_128B (box_columns = 128), with the 16-byte chunks of row r permuted by
// XOR with r % 8: the layout Hopper's wgmma reads as "128-byte swizzled, K-major". Host code; the
// driver function comes through the runtime, so the extension does not link libcuda.
inline CUtensorMap byte_box_map(const at::Tensor& array, uint32_t box_rows, uint32_t box_columns,
                                CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_NONE) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                    cudaEnableDefault, &found));
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
                "tritllm: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t size[2] = {cuuint64_t(array.size(1)), cuuint64_t(array.size(0))};
  const cuuint64_t row_stride[1] = {cuuint64_t(array.size(1))};
  const cuuint32_t box[2] = {box_columns, box_rows};
  const cuuint32_t unit_steps[2] = {1, 1};
  const CUresult status = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, array.data_ptr(), size,
                                 row_stride, box, unit_steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 swizzle, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(status == CUDA_SUCCESS, "tritllm: internal error: cuTensorMapEncodeTiled failed (",
              int(status), ") for a [", array.size(0), ", ", array.size(1), "] byte array");
  return map;
}

}  // namespace cuda
}  // namespace tritllm
