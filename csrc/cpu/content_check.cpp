// find_corruption: the content check every CPU kernel applies to the bytes it decodes (the same
// rules as tritllm_ext.format.validate, minus the padding rule, which does not affect results).
#include "kernels.h"

namespace tritllm::cpu {

Corruption find_corruption(const PackedWeight& w, int64_t n0, int64_t n1) {
  const int bpg = w.group_bytes();
  int bounds[16];
  for (int pos = 0; pos < bpg; ++pos) bounds[pos] = byte_bound(w.depth, pos);
  Corruption c;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.row(n);
    for (int64_t g = 0; g < w.groups(); ++g) {
      const uint8_t* group = row + g * bpg;
      for (int pos = 0; pos < bpg; ++pos) {
        if (group[pos] >= bounds[pos]) {
          c.found = true;
          c.row = n;
          c.byte = g * bpg + pos;
          c.value = group[pos];
          return c;
        }
      }
      const int tail0 = group[3 * w.depth];
      if (static_cast<int64_t>(group_scale_index(tail0)) >= w.codebook_size) {
        c.found = c.bad_index = true;
        c.row = n;
        c.byte = g * bpg + 3 * w.depth;
        c.value = tail0;
        return c;
      }
    }
  }
  return c;
}

}  // namespace tritllm::cpu
