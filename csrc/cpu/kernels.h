// The CPU kernel interface: what every instruction-set variant (scalar, AVX2) implements, and the
// portable helpers they share.
//
// Plain C++ with no ATen: the AVX2 translation units include this header, and code compiled with
// -mavx2 must not instantiate inline library code that the rest of the library also uses (the
// linker keeps one copy of such code and could keep the AVX2 one, which would then crash a CPU
// without AVX2). dispatch.cpp owns everything ATen: argument checks, threads, errors, tensors.
#pragma once

#include <cstdint>

#include "../format.h"

namespace tritllm::cpu {

// A packed matrix (docs/FORMAT.md) whose dtypes, shapes and contiguity have been checked and whose
// codebook holds only finite values. The bytes themselves are checked by the kernels.
struct PackedWeight {
  const uint8_t* bytes;    // [out_features, groups() * group_bytes()]
  const float* codebook;   // [codebook_size]
  int64_t codebook_size;   // 1 .. 27
  int depth;               // 1 .. 4
  int64_t out_features;    // N
  int64_t in_features;     // K

  int64_t groups() const { return num_groups(in_features); }
  int group_bytes() const { return bytes_per_group(depth); }
  int64_t row_bytes() const { return groups() * group_bytes(); }
  const uint8_t* row(int64_t n) const { return bytes + n * row_bytes(); }
};

// Exclusive upper bound of byte `pos` (0 .. B(d)-1) of a group: 3^(digits the byte holds), as in
// tritllm_ext.format.byte_bounds. Plane bytes hold 5 digits; the tail holds 3 + depth digits.
constexpr int byte_bound(int depth, int pos) {
  if (pos < 3 * depth) return 243;
  const int first_digit = (pos - 3 * depth) * kTritsPerByte;
  const int held = 3 + depth - first_digit;
  int bound = 1;
  for (int i = 0; i < (held < kTritsPerByte ? held : kTritsPerByte); ++i) bound *= 3;
  return bound;
}

// The first corrupt place in rows [n0, n1), in row-major order: a byte at or above its bound, or
// a group whose scale index is >= codebook_size.
struct Corruption {
  bool found = false;
  bool bad_index = false;  // false: a byte out of bounds; true: a scale index too large
  int64_t row = 0;
  int64_t byte = 0;        // column of the offending byte in the row (the tail byte for an index)
  int value = 0;           // the byte's value
};
Corruption find_corruption(const PackedWeight& w, int64_t n0, int64_t n1);

// Activations of a matmul: x as float32 rows, plus whatever a kernel prepares from them once per
// call (the AVX2 kernel quantizes them, see avx2/activations.h); `prepared` holds
// `prepared_bytes(...)` bytes, 64-byte aligned.
struct Activations {
  const float* x;          // [rows, in_features], contiguous
  int64_t rows;            // M
  int64_t in_features;     // K
  void* prepared;
};

// One instruction-set variant of the CPU kernels. Every function works on a block of rows so that
// dispatch.cpp can spread the blocks over threads; a kernel returns false when it met corrupt
// bytes in its rows (dispatch.cpp then calls find_corruption for the message), true otherwise.
struct KernelSet {
  const char* name;
  // out[(n - n0) * K + k] = W[n, k] in float32 for n in [n0, n1).
  bool (*unpack_rows)(const PackedWeight& w, int64_t n0, int64_t n1, float* out);
  // Bytes of prepared activations for `rows` rows of x against w (0 if the kernel needs none).
  int64_t (*prepared_bytes)(int64_t rows, const PackedWeight& w);
  // Prepares rows [m0, m1) of a.x into a.prepared.
  void (*prepare_rows)(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1);
  // y[m * N + n] = sum_k x[m, k] * W[n, k] for m in [m0, m1), n in [n0, n1), accumulated in
  // float32. Rows of W are content-checked only when check_bytes is set (dispatch.cpp sets it
  // for exactly one m-block per row of W).
  bool (*matmul_tile)(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1,
                      int64_t n0, int64_t n1, bool check_bytes, float* y);
};

// The portable reference kernels (scalar.cpp): always compiled, always correct, the spec in C++.
extern const KernelSet kScalarKernels;

// The AVX2+FMA kernels (avx2/*.cpp), and the same with an AVX-512 (F, BW, DQ, VL, VNNI) inner
// product for the blocked matmul; nullptr when this build did not compile them (a non-x86 build,
// or a compiler without -mavx2 -mfma for those files). Whether the running CPU supports them is
// dispatch.cpp's question.
const KernelSet* avx2_kernels();
const KernelSet* avx512_kernels();

}  // namespace tritllm::cpu
