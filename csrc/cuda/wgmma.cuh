// Hopper's warpgroup matrix product (wgmma, sm_90a) with the A operand in registers, as
// tile_gemm.cu uses it: A is a 64-row slab of decoded weights held by the four warps of a
// warpgroup (warp w of the group holds rows 16w..16w+15, each warp in the m16n8k16 A-fragment
// layout of mma.sync), B is a K = 16 x N slice of activations in shared memory, named by a
// descriptor, and D, 64 x N float32, stays in registers in the mma.sync accumulator layout
// repeated N / 8 times. The instruction is asynchronous: a warpgroup issues several, commits them
// as a group and waits for the group before it reads D or rewrites the A registers it gave.
//
// Only code compiled for sm_90a has these instructions (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere the
// functions are empty and must not be called (tile_gemm.cu chooses them only on Hopper builds).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tritllm {
namespace cuda {
namespace wgmma {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TRITLLM_WGMMA_DEVICE 1
#endif

// The shared-memory descriptor of a B slice [16 x N] in the 128-byte swizzled K-major layout (as a
// tensor copy with CU_TENSOR_MAP_SWIZZLE_128B lands it, bulk_copy.cuh): row n (of N) holds 64
// values along K in 128 bytes, its 16-byte chunks permuted by XOR with n % 8, and 8 such rows make
// a 1024-byte atom (1024-byte aligned); atoms of successive 8-row groups follow each other. The
// k16 slice starting 2k bytes into the rows is named by `shared_address` = atom base + 2k (the
// hardware applies the XOR to the final address). Fields (16-byte units, 14 bits): start address,
// "leading" offset (unused with this swizzle: 1), stride between 8-row atoms (1024 bytes), and
// the layout type in bits 62-63 (1: 128-byte swizzle).
__device__ __forceinline__ uint64_t descriptor_128b_swizzle(uint32_t shared_address) {
  return uint64_t((shared_address >> 4) & 0x3FFF) | uint64_t(1) << 16 |
         uint64_t(1024 >> 4) << 32 | uint64_t(1) << 62;
}

// Orders this thread's earlier register writes (the decoded A, a zeroed D) before the wgmma
// instructions that follow.
__device__ __forceinline__ void fence() {
#ifdef TRITLLM_WGMMA_DEVICE
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}

// Closes the group of wgmma instructions issued since the last commit.
__device__ __forceinline__ void commit() {
#ifdef TRITLLM_WGMMA_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}

// Waits until at most kPending committed groups of this warpgroup are still running.
template <int kPending>
__device__ __forceinline__ void wait() {
#ifdef TRITLLM_WGMMA_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
#endif
}

// Tells the compiler that `v` may have changed here, so that no read of an accumulator moves
// above the wait that makes it valid (the compiler does not know wgmma writes it late).
__device__ __forceinline__ void touch(float& v) { asm volatile("" : "+f"(v)::"memory"); }

// D[64 x N] += A[64 x 16] (registers a) x B[16 x N] (descriptor b), float32 accumulation. d[i]
// holds the lane's four values of columns 8i..8i+7 in the mma.sync order (rows g, g, g+8, g+8 of
// its warp's 16; columns 2t, 2t+1, 2t, 2t+1), a is the lane's A fragment as for mma.m16n8k16.
template <typename T, int N>
__device__ __forceinline__ void mma(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b);

// The six shapes tile_gemm uses, each for float16 and bfloat16 (TYPE: the PTX type name).
#ifdef TRITLLM_WGMMA_DEVICE
#define TRITLLM_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define TRITLLM_WGMMA_ASM(...)
#endif

#define TRITLLM_WGMMA_MMA_N8(T, TYPE)                                               \
  template <>                                                                       \
  __device__ __forceinline__ void mma<T, 8>(float(&d)[1][4], const uint32_t(&a)[4], \
                                             uint64_t b) {                          \
    TRITLLM_WGMMA_ASM(                                                              \
        "wgmma.mma_async.sync.aligned.m64n8k16.f32." TYPE "." TYPE " "              \
        "{%0, %1, %2, %3}, "                                                        \
        "{%4, %5, %6, %7}, %8, 1, 1, 1, 0;"                                         \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])                \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                      \
  }
TRITLLM_WGMMA_MMA_N8(__half, "f16")
TRITLLM_WGMMA_MMA_N8(__nv_bfloat16, "bf16")
#undef TRITLLM_WGMMA_MMA_N8

#define TRITLLM_WGMMA_MMA_N16(T, TYPE)                                               \
  template <>                                                                        \
  __device__ __forceinline__ void mma<T, 16>(float(&d)[2][4], const uint32_t(&a)[4], \
                                             uint64_t b) {                           \
    TRITLLM_WGMMA_ASM(                                                               \
        "wgmma.mma_async.sync.aligned.m64n16k16.f32." TYPE "." TYPE " "              \
        "{%0, %1, %2, %3, %4, %5, %6, %7}, "                                         \
        "{%8, %9, %10, %11}, %12, 1, 1, 1, 0;"                                       \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), \
          "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3])                                \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                       \
  }
TRITLLM_WGMMA_MMA_N16(__half, "f16")
TRITLLM_WGMMA_MMA_N16(__nv_bfloat16, "bf16")
#undef TRITLLM_WGMMA_MMA_N16

#define TRITLLM_WGMMA_MMA_N32(T, TYPE)                                               \
  template <>                                                                        \
  __device__ __forceinline__ void mma<T, 32>(float(&d)[4][4], const uint32_t(&a)[4], \
                                             uint64_t b) {                           \
    TRITLLM_WGMMA_ASM(                                                               \
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " "              \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "   \
        "{%16, %17, %18, %19}, %20, 1, 1, 1, 0;"                                     \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), \
          "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), \
          "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), \
          "+f"(d[3][3])                                                              \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                       \
  }
TRITLLM_WGMMA_MMA_N32(__half, "f16")
TRITLLM_WGMMA_MMA_N32(__nv_bfloat16, "bf16")
#undef TRITLLM_WGMMA_MMA_N32

#define TRITLLM_WGMMA_MMA_N64(T, TYPE)                                                      \
  template <>                                                                               \
  __device__ __forceinline__ void mma<T, 64>(float(&d)[8][4], const uint32_t(&a)[4],        \
                                             uint64_t b) {                                  \
    TRITLLM_WGMMA_ASM(                                                                      \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                     \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
        "{%32, %33, %34, %35}, %36, 1, 1, 1, 0;"                                            \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),        \
          "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]),        \
          "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]),        \
          "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),        \
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]),        \
          "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),        \
          "+f"(d[7][2]), "+f"(d[7][3])                                                      \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                              \
  }
TRITLLM_WGMMA_MMA_N64(__half, "f16")
TRITLLM_WGMMA_MMA_N64(__nv_bfloat16, "bf16")
#undef TRITLLM_WGMMA_MMA_N64

#define TRITLLM_WGMMA_MMA_N128(T, TYPE)                                                     \
  template <>                                                                               \
  __device__ __forceinline__ void mma<T, 128>(float(&d)[16][4], const uint32_t(&a)[4],      \
                                              uint64_t b) {                                 \
    TRITLLM_WGMMA_ASM(                                                                      \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                    \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
        "{%64, %65, %66, %67}, %68, 1, 1, 1, 0;"                                            \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                       \
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                       \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                       \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                       \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                       \
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                       \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                       \
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),                       \
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                       \
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),                       \
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),                   \
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),                   \
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),                   \
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),                   \
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),                   \
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])                    \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                              \
  }
TRITLLM_WGMMA_MMA_N128(__half, "f16")
TRITLLM_WGMMA_MMA_N128(__nv_bfloat16, "bf16")
#undef TRITLLM_WGMMA_MMA_N128

#define TRITLLM_WGMMA_MMA_N256(T, TYPE)                                                      \
  template <>                                                                                \
  __device__ __forceinline__ void mma<T, 256>(float(&d)[32][4], const uint32_t(&a)[4],       \
                                              uint64_t b) {                                  \
    TRITLLM_WGMMA_ASM(                                                                       \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " "                     \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "            \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "   \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "   \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "   \
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "   \
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "   \
        "%96, %97, %98, %99, %100, %101, %102, %103, "                                       \
        "%104, %105, %106, %107, %108, %109, %110, %111, "                                   \
        "%112, %113, %114, %115, %116, %117, %118, %119, "                                   \
        "%120, %121, %122, %123, %124, %125, %126, %127}, "                                  \
        "{%128, %129, %130, %131}, %132, 1, 1, 1, 0;"                                        \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                        \
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                        \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                        \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                        \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                        \
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                        \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                        \
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),                        \
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                        \
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),                        \
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),                    \
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),                    \
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),                    \
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),                    \
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),                    \
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]),                    \
          "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]),                    \
          "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]),                    \
          "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]),                    \
          "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]),                    \
          "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]),                    \
          "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]),                    \
          "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]),                    \
          "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3]),                    \
          "+f"(d[24][0]), "+f"(d[24][1]), "+f"(d[24][2]), "+f"(d[24][3]),                    \
          "+f"(d[25][0]), "+f"(d[25][1]), "+f"(d[25][2]), "+f"(d[25][3]),                    \
          "+f"(d[26][0]), "+f"(d[26][1]), "+f"(d[26][2]), "+f"(d[26][3]),                    \
          "+f"(d[27][0]), "+f"(d[27][1]), "+f"(d[27][2]), "+f"(d[27][3]),                    \
          "+f"(d[28][0]), "+f"(d[28][1]), "+f"(d[28][2]), "+f"(d[28][3]),                    \
          "+f"(d[29][0]), "+f"(d[29][1]), "+f"(d[29][2]), "+f"(d[29][3]),                    \
          "+f"(d[30][0]), "+f"(d[30][1]), "+f"(d[30][2]), "+f"(d[30][3]),                    \
          "+f"(d[31][0]), "+f"(d[31][1]), "+f"(d[31][2]), "+f"(d[31][3])                     \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                               \
  }
TRITLLM_WGMMA_MMA_N256(__half, "f16")
TRITLLM_WGMMA_MMA_N256(__nv_bfloat16, "bf16")
#undef TRITLLM_WGMMA_MMA_N256

#undef TRITLLM_WGMMA_ASM
#undef TRITLLM_WGMMA_DEVICE

}  // namespace wgmma
}  // namespace cuda
}  // namespace tritllm
