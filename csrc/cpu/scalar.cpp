// The portable scalar reference kernels: one weight at a time, straight from docs/FORMAT.md. They
// are the specification in C++ (the AVX2 kernels are tested against the same float64 reference),
// so they favour obviousness over speed.
#include <vector>

#include "kernels.h"

namespace tritllm::cpu {
namespace {

// Level of weight j (0..15) of a group: sum over planes p of 3^p * trit, trit = digit - 1.
int weight_level(const uint8_t* group, int depth, int j) {
  int level = 0;
  int pow3 = 1;
  for (int p = 0; p < depth; ++p) {
    int digit;
    if (j < 15) {
      // plane p, byte b = j / 5 holds weights 5b .. 5b+4
      digit = trit_digit(group[3 * p + j / 5], j % 5);
    } else {
      // weight 15 lives in the tail, whose digits are idx0 idx1 idx2 plane0[15] plane1[15] ...
      const int t = 3 + p;
      digit = trit_digit(group[3 * depth + t / kTritsPerByte], t % kTritsPerByte);
    }
    level += pow3 * (static_cast<int>(digit) - 1);
    pow3 *= 3;
  }
  return level;
}

// W[n, 0:K] in float32: float32(codebook[idx]) * float32(level), rounded once (docs/FORMAT.md).
void decode_row(const PackedWeight& w, int64_t n, float* out) {
  const uint8_t* row = w.row(n);
  for (int64_t k = 0; k < w.in_features; ++k) {
    const uint8_t* group = row + (k / kGroupSize) * w.group_bytes();
    const float scale = w.codebook[group_scale_index(group[3 * w.depth])];
    out[k] = scale * static_cast<float>(weight_level(group, w.depth, static_cast<int>(k % kGroupSize)));
  }
}

bool unpack_rows(const PackedWeight& w, int64_t n0, int64_t n1, float* out) {
  if (find_corruption(w, n0, n1).found) return false;
  for (int64_t n = n0; n < n1; ++n) decode_row(w, n, out + (n - n0) * w.in_features);
  return true;
}

int64_t prepared_bytes(int64_t, const PackedWeight&) { return 0; }

void prepare_rows(const Activations&, const PackedWeight&, int64_t, int64_t) {}

bool matmul_tile(const Activations& a, const PackedWeight& w, int64_t m0, int64_t m1, int64_t n0,
                 int64_t n1, bool check_bytes, float* y) {
  if (check_bytes && find_corruption(w, n0, n1).found) return false;
  const int64_t k_size = w.in_features;
  std::vector<float> row(k_size);
  for (int64_t n = n0; n < n1; ++n) {
    decode_row(w, n, row.data());
    for (int64_t m = m0; m < m1; ++m) {
      const float* x = a.x + m * k_size;
      float acc = 0.0f;
      for (int64_t k = 0; k < k_size; ++k) acc += x[k] * row[k];
      y[m * w.out_features + n] = acc;
    }
  }
  return true;
}

}  // namespace

const KernelSet kScalarKernels = {"scalar", unpack_rows, prepared_bytes, prepare_rows, matmul_tile};

}  // namespace tritllm::cpu
