// The entry points of the AVX2+FMA kernel set (see KernelSet in ../kernels.h for their contracts).
// Defined in this directory's translation units, which setup.py compiles with -mavx2 -mfma.
#pragma once

#include <cstdint>

#include "../kernels.h"

namespace tritllm::cpu::avx2 {

bool unpack_rows(const PackedWeight& w, int64_t n0, int64_t n1, float* out);
int64_t prepared_bytes(int64_t rows, const PackedWeight& w);
void prepare_rows(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1);
bool matmul_tile(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1, int64_t n0,
                 int64_t n1, bool check_bytes, float* y);
// The same with the blocked kernel's inner product in AVX-512 (F, BW, DQ, VL, VNNI); only for
// CPUs that have those (the "avx512" kernel set).
bool matmul_tile_avx512(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1,
                        int64_t n0, int64_t n1, bool check_bytes, float* y);

}  // namespace tritllm::cpu::avx2
