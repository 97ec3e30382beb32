// Body of one instruction-set copy of the CPU kernels: include after defining SWA_CPU_ISA (namespace) and
// SWA_CPU_KERNELS (the getter's name) and SWA_CPU_VEC_BYTES (SIMD width). No include guard: each copy is its own translation unit.
#include "attention/swa_cpu_entry.h"
#include "attention/swa_cpu_tiles.h"

namespace markovkit {
namespace SWA_CPU_ISA {
namespace {

static_assert(kBM == kSwaCpuBM && kBN == kSwaCpuBN, "tile sizes of swa_cpu_entry.h and swa_cpu_tiles.h");

template <typename T>
void fwd_tiles(const SwaFwdParams& p, int64_t begin, int64_t end, void* work) {
  for (int64_t t = begin; t < end; ++t) fwd_query_tile<T>(p, t, static_cast<T*>(work));
}

template <typename T>
void bwd_dkdv_tiles(const SwaBwdParams& p, int64_t begin, int64_t end, void* work) {
  const int64_t n_tiles = (p.s.seqlen + kBN - 1) / kBN;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t bk = t / n_tiles;
    bwd_dkdv_tile<T>(p, bk / p.s.kv_heads, bk % p.s.kv_heads, t % n_tiles, static_cast<T*>(work));
  }
}

template <typename T>
void bwd_dq_tiles(const SwaBwdParams& p, int64_t begin, int64_t end, void* work) {
  const int64_t n_tiles = (p.s.seqlen + kBM - 1) / kBM;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t bh = t / n_tiles;
    bwd_dq_tile<T>(p, bh / p.s.heads, bh % p.s.heads, t % n_tiles, static_cast<T*>(work));
  }
}

}  // namespace
}  // namespace SWA_CPU_ISA

SwaCpuKernels SWA_CPU_KERNELS(bool is_double) {
  using namespace SWA_CPU_ISA;
  if (is_double) return {&fwd_tiles<double>, &bwd_dkdv_tiles<double>, &bwd_dq_tiles<double>};
  return {&fwd_tiles<float>, &bwd_dkdv_tiles<float>, &bwd_dq_tiles<float>};
}

}  // namespace markovkit
