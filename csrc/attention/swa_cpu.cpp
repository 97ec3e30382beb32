// CPU sliding-window attention: threads over (batch, head, query tile) forward, and backward over the rows
// for delta = rowsum(dout * out) - dlse, then (batch, kv head, key tile) for dK, dV, then (batch, head, query
// tile) for dQ. The copy of the tile loops is the widest the CPU runs (AVX-512F, AVX2 + FMA, or the baseline),
// lowered as ATen's own kernels are by ATEN_CPU_CAPABILITY=default|avx2.
#include <ATen/Parallel.h>

#include <vector>

#include "attention/swa_cpu_entry.h"
#include "attention/swa_params.h"
#include "common/cpu_isa.h"

#define SWA_CPU_ISA base
#define SWA_CPU_VEC_BYTES 16
#define SWA_CPU_KERNELS swa_cpu_kernels_base
#include "attention/swa_cpu_isa.h"

namespace markovkit {
namespace {

SwaCpuKernels pick(DType dtype) {
  const bool is_double = dtype == DType::kFloat64;
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return swa_cpu_kernels_avx512(is_double);
    case CpuIsa::kAvx2: return swa_cpu_kernels_avx2(is_double);
    default: return swa_cpu_kernels_base(is_double);
  }
}

int64_t element_size(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

// delta = rowsum(dout * out) - dlse of every row (b, i, h).
template <typename T>
void fill_delta(const SwaBwdParams& p) {
  const SwaShape& s = p.s;
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
  const T* dlse = static_cast<const T*>(p.dlse);
  T* delta = static_cast<T*>(p.delta);
  at::parallel_for(0, s.batch * s.seqlen * s.heads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T acc = 0;
      for (int64_t d = 0; d < s.headdim; ++d) acc += out[row * s.headdim + d] * dout[row * s.headdim + d];
      const int64_t at = swa_stat_index(row, s.seqlen, s.heads);
      delta[at] = dlse == nullptr ? acc : acc - dlse[at];
    }
  });
}

}  // namespace

void swa_forward_cpu(const SwaFwdParams& p) {
  const SwaShape& s = p.s;
  const int64_t n_tiles = s.batch * s.heads * ((s.seqlen + kSwaCpuBM - 1) / kSwaCpuBM);
  const SwaFwdTiles fwd = pick(s.dtype).fwd;
  const int64_t work_bytes = swa_fwd_work_size(s.headdim) * element_size(s.dtype);
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> work((work_bytes + 7) / 8);
    fwd(p, begin, end, work.data());
  });
}

void swa_backward_cpu(const SwaBwdParams& p) {
  const SwaShape& s = p.s;
  const SwaCpuKernels kernels = pick(s.dtype);
  const int64_t work_bytes = swa_bwd_work_size(s.headdim) * element_size(s.dtype);
  const int64_t n_key_tiles = (s.seqlen + kSwaCpuBN - 1) / kSwaCpuBN;
  const int64_t n_query_tiles = (s.seqlen + kSwaCpuBM - 1) / kSwaCpuBM;
  const auto run = [&](SwaBwdTiles pass, int64_t n_items) {
    at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> work((work_bytes + 7) / 8);
      pass(p, begin, end, work.data());
    });
  };
  if (s.dtype == DType::kFloat64) {
    fill_delta<double>(p);
  } else {
    fill_delta<float>(p);
  }
  run(kernels.bwd_dkdv, s.batch * s.kv_heads * n_key_tiles);
  run(kernels.bwd_dq, s.batch * s.heads * n_query_tiles);
}

}  // namespace markovkit
