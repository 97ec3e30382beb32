#pragma once
// Entry points of one instruction-set copy of the CPU tile loops (see swa_cpu_tiles.h): each runs a range
// of independent work items on caller-provided scratch, so no allocation or torch code is compiled with
// the wider instruction set.
#include <cstdint>

#include "attention/swa_params.h"

namespace markovkit {

// Forward query tiles [begin, end) of the flattened (batch, heads, query tile) grid.
// work: swa_fwd_work_size(headdim) elements of the element type.
using SwaFwdTiles = void (*)(const SwaFwdParams& p, int64_t begin, int64_t end, void* work);
// Backward passes over items [begin, end) of a flattened grid; work: swa_bwd_work_size(headdim) elements.
// dK, dV: grid (batch, kv_heads, key tile); dQ: grid (batch, heads, query tile).
using SwaBwdTiles = void (*)(const SwaBwdParams& p, int64_t begin, int64_t end, void* work);

struct SwaCpuKernels {
  SwaFwdTiles fwd;
  SwaBwdTiles bwd_dkdv;
  SwaBwdTiles bwd_dq;
};

constexpr int64_t kSwaCpuBM = 64;  // query rows per tile
constexpr int64_t kSwaCpuBN = 64;  // keys per tile

inline int64_t swa_fwd_work_size(int64_t headdim) {
  return headdim * kSwaCpuBN + 2 * kSwaCpuBM * headdim + kSwaCpuBM * kSwaCpuBN;
}
inline int64_t swa_bwd_work_size(int64_t headdim) {
  return 4 * headdim * kSwaCpuBN + 2 * kSwaCpuBM * headdim + 2 * kSwaCpuBM * kSwaCpuBN;
}

// Kernels for element type float (is_double false) or double, built for the baseline instruction set or
// (where compiled in and the CPU has it) AVX2 + FMA or AVX-512F; nullptr members where absent.
SwaCpuKernels swa_cpu_kernels_base(bool is_double);
SwaCpuKernels swa_cpu_kernels_avx2(bool is_double);
SwaCpuKernels swa_cpu_kernels_avx512(bool is_double);

}  // namespace markovkit
