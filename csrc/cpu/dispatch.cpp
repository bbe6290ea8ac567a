// CPU implementations of torch.ops.tritllm.unpack / matmul: argument and content checks, choice of
// the kernel set (scalar, avx2 or avx512, by CPU feature detection, TRITLLM_CPU_KERNEL or
// torch.ops.tritllm._cpu_kernel), threads, and the tensors around the raw kernels of kernels.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace tritllm::cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernel selection

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
bool cpu_runs_avx2_fma() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool cpu_runs_avx512_vnni() {
  return cpu_runs_avx2_fma() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
#else
bool cpu_runs_avx2_fma() { return false; }
bool cpu_runs_avx512_vnni() { return false; }
#endif

// The kernel sets this build has, best first, and whether this CPU can run each.
struct CompiledKernelSet {
  const KernelSet* kernels;
  bool runs_here;
};

std::vector<CompiledKernelSet> compiled_kernels() {
  std::vector<CompiledKernelSet> sets;
  if (avx512_kernels() != nullptr) sets.push_back({avx512_kernels(), cpu_runs_avx512_vnni()});
  if (avx2_kernels() != nullptr) sets.push_back({avx2_kernels(), cpu_runs_avx2_fma()});
  sets.push_back({&kScalarKernels, true});
  return sets;
}

// The kernel sets this build has and this CPU can run, best first.
std::vector<const KernelSet*> usable_kernels() {
  std::vector<const KernelSet*> sets;
  for (const CompiledKernelSet& c : compiled_kernels()) {
    if (c.runs_here) sets.push_back(c.kernels);
  }
  return sets;
}

std::string usable_names() {
  std::string names;
  for (const KernelSet* k : usable_kernels()) names += std::string(names.empty() ? "" : ", ") + k->name;
  return names;
}

// "auto" picks the best usable set; otherwise the name must be usable here.
const KernelSet* kernel_named(const std::string& name, const char* origin) {
  const std::vector<const KernelSet*> sets = usable_kernels();
  if (name == "auto") return sets.front();
  for (const KernelSet* k : sets) {
    if (name == k->name) return k;
  }
  const bool known = name == "scalar" || name == "avx2" || name == "avx512";
  TORCH_CHECK(false, "tritllm: ", origin, " asks for the CPU kernel '", name, "', which ",
              known ? "this build or this CPU does not support" : "does not exist",
              "; available here: auto, ", usable_names());
}

// nullptr until the first op call or _cpu_kernel() resolves TRITLLM_CPU_KERNEL (default "auto").
// An invalid TRITLLM_CPU_KERNEL therefore raises at every call until _cpu_kernel(...) sets a
// valid choice, instead of being silently ignored.
std::atomic<const KernelSet*> g_active{nullptr};

const KernelSet& active_kernels() {
  const KernelSet* k = g_active.load();
  if (k == nullptr) {
    const char* env = std::getenv("TRITLLM_CPU_KERNEL");
    k = kernel_named(env != nullptr && env[0] != '\0' ? env : "auto",
                     "the environment variable TRITLLM_CPU_KERNEL");
    g_active.store(k);
  }
  return *k;
}

std::string cpu_kernel_op(const std::string& select) {
  if (!select.empty()) g_active.store(kernel_named(select, "_cpu_kernel"));
  return active_kernels().name;
}

std::vector<std::string> cpu_kernels_available_op() {
  std::vector<std::string> names;
  for (const KernelSet* k : usable_kernels()) names.emplace_back(k->name);
  return names;
}

std::vector<std::string> cpu_kernels_compiled_op() {
  std::vector<std::string> names;
  for (const CompiledKernelSet& c : compiled_kernels()) names.emplace_back(c.kernels->name);
  return names;
}

// ---------------------------------------------------------------------------------------------
// Checks

PackedWeight weight_view(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                         int64_t in_features) {
  check_weight_args(packed, codebook, depth, in_features);
  const float* cb = codebook.data_ptr<float>();
  for (int64_t i = 0; i < codebook.numel(); ++i) {
    TORCH_CHECK(std::isfinite(cb[i]), "tritllm: codebook holds a NaN or infinite scale at index ",
                i, " (", cb[i], ")");
  }
  return PackedWeight{packed.data_ptr<uint8_t>(), cb, codebook.numel(), static_cast<int>(depth),
                      packed.size(0), in_features};
}

// Raised from inside at::parallel_for, which rethrows it in the calling thread.
[[noreturn]] void raise_corruption(const PackedWeight& w, int64_t n0, int64_t n1) {
  const Corruption c = find_corruption(w, n0, n1);
  TORCH_CHECK(c.found, "tritllm: internal error: the ", active_kernels().name,
              " CPU kernel reported corrupt bytes in rows ", n0, "..", n1 - 1,
              " that the reference check does not find");
  TORCH_CHECK(!c.bad_index, "tritllm: packed row ", c.row, ", byte ", c.byte, " (value ", c.value,
              ") selects scale index ", group_scale_index(c.value), " but the codebook has only ",
              w.codebook_size, " entries");
  TORCH_CHECK(false, "tritllm: packed holds a corrupt byte at row ", c.row, ", byte ", c.byte,
              ": value ", c.value, " is not below its bound ",
              byte_bound(w.depth, static_cast<int>(c.byte % w.group_bytes())),
              " (the packed format stores at most 3^digits - 1 per byte; was it packed by "
              "tritllm_ext.format.pack?)");
}

// ---------------------------------------------------------------------------------------------
// Ops

template <typename T>
void store_rows(const float* src, int64_t count, T* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<T>(src[i]);
}

at::Tensor unpack_cpu(const at::Tensor& packed, const at::Tensor& codebook, int64_t depth,
                      int64_t in_features, c10::ScalarType dtype) {
  const PackedWeight w = weight_view(packed, codebook, depth, in_features);
  check_output_dtype(dtype);
  const KernelSet& kernels = active_kernels();
  const int64_t n_rows = w.out_features;
  const int64_t k_size = in_features;
  at::Tensor out = at::empty({n_rows, k_size}, packed.options().dtype(dtype));
  // Blocks of about 64K weights: enough work per task, a float buffer that stays in L2.
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 16) / k_size);
  at::parallel_for(0, n_rows, block, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer;
    for (int64_t n0 = begin; n0 < end; n0 += block) {
      const int64_t n1 = std::min(end, n0 + block);
      float* rows = dtype == at::kFloat ? out.data_ptr<float>() + n0 * k_size : nullptr;
      if (rows == nullptr) {
        buffer.resize((n1 - n0) * k_size);
        rows = buffer.data();
      }
      if (!kernels.unpack_rows(w, n0, n1, rows)) raise_corruption(w, n0, n1);
      const int64_t count = (n1 - n0) * k_size;
      if (dtype == at::kHalf) store_rows(rows, count, out.data_ptr<at::Half>() + n0 * k_size);
      if (dtype == at::kBFloat16) store_rows(rows, count, out.data_ptr<at::BFloat16>() + n0 * k_size);
    }
  });
  return out;
}

at::Tensor matmul_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                      int64_t depth, int64_t in_features) {
  const PackedWeight w = weight_view(packed, codebook, depth, in_features);
  check_activation(x, packed, in_features);
  const KernelSet& kernels = active_kernels();
  const int64_t n_size = w.out_features;
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = n_size;

  const at::Tensor x2 = x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  const int64_t m_size = x2.size(0);
  at::Tensor y = at::empty({m_size, n_size}, x2.options());
  if (m_size > 0 && n_size > 0) {
    Activations a{x2.data_ptr<float>(), m_size, in_features, nullptr};
    at::Tensor prepared;
    const int64_t prepared_bytes = kernels.prepared_bytes(m_size, w);
    if (prepared_bytes > 0) {
      prepared = at::empty({prepared_bytes}, x2.options().dtype(at::kByte));
      a.prepared = prepared.data_ptr();
    }
    at::parallel_for(0, m_size, 16, [&](int64_t m0, int64_t m1) {
      kernels.prepare_rows(a, w, m0, m1);
    });

    // Tiles: rows of W split over the threads (a few blocks each, for balance; a multiple of 8
    // rows, the strips the blocked kernels decode); rows of x split too when W has too few rows
    // to keep every thread busy.
    const int64_t threads = at::get_num_threads();
    const int64_t n_block = (std::max<int64_t>(8, (n_size + 4 * threads - 1) / (4 * threads)) + 7) / 8 * 8;
    const int64_t n_tiles = (n_size + n_block - 1) / n_block;
    const int64_t m_tiles = n_tiles >= threads ? 1 : std::min(m_size, threads);
    const int64_t m_block = (m_size + m_tiles - 1) / m_tiles;
    float* y_data = y.data_ptr<float>();
    at::parallel_for(0, n_tiles * m_tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t mi = t / n_tiles;
        const int64_t n0 = (t % n_tiles) * n_block;
        const int64_t n1 = std::min(n_size, n0 + n_block);
        const int64_t m0 = mi * m_block;
        const int64_t m1 = std::min(m_size, m0 + m_block);
        if (m0 >= m1) continue;
        // Exactly one m-tile (the first) checks each row of W.
        if (!kernels.matmul_tile(a, w, m0, m1, n0, n1, mi == 0, y_data)) raise_corruption(w, n0, n1);
      }
    });
  }
  return y.to(x.scalar_type()).view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tritllm, m) {
  // Which CPU kernel set the CPU ops use: select "scalar", "avx2", "avx512" or "auto" (the best
  // this CPU runs), or "" to only ask. Returns the active set's name. Tests use it to force each
  // path.
  m.def("_cpu_kernel(str select=\"\") -> str", &cpu_kernel_op);
  // The kernel sets this build and CPU can run, best first.
  m.def("_cpu_kernels_available() -> str[]", &cpu_kernels_available_op);
  // The kernel sets this build compiled, whether or not this CPU can run them.
  m.def("_cpu_kernels_compiled() -> str[]", &cpu_kernels_compiled_op);
}

TORCH_LIBRARY_IMPL(tritllm, CPU, m) {
  m.impl("unpack", unpack_cpu);
  m.impl("matmul", matmul_cpu);
}

}  // namespace tritllm::cpu
