#pragma once
// Entry points of one instruction-set copy of the CPU scan loops (see scan_cpu_isa.h). Each runs a range
// of independent work items on caller-provided scratch, so no allocation or torch code is compiled with
// the wider instruction set.
#include <cstdint>

#include "scan/scan_params.h"

namespace markovkit {

// Forward of channels [begin, end) of the flattened (batch, dim) grid.
using ScanFwdRange = void (*)(const ScanParams& p, int64_t begin, int64_t end, void* work);
// Backward of tasks [begin, end) of the flattened (batch, groups, nblk) grid (see ScanBwdParams).
using ScanBwdRange = void (*)(const ScanBwdParams& q, int64_t begin, int64_t end, void* work);

struct ScanCpuKernels {
  ScanFwdRange fwd;
  ScanBwdRange bwd;
};

// The loops run over dstate in vectors: dstate padded to a multiple of 32 bytes (whole vectors in each copy).
inline int64_t scan_cpu_padded(int64_t dstate, int64_t elem_size) {
  const int64_t w = 32 / elem_size;
  return (dstate + w - 1) / w * w;
}

// Scratch bytes of one thread (32-byte alignment slack included); elem_size: of the weight type.
inline int64_t scan_cpu_fwd_work_bytes(int64_t seqlen, int64_t dstate, int64_t elem_size) {
  const int64_t Np = scan_cpu_padded(dstate, elem_size);
  return (2 * seqlen * Np + 4 * Np + 2 * kScanChunk) * elem_size + 32;
}
inline int64_t scan_cpu_bwd_work_bytes(int64_t seqlen, int64_t dstate, int64_t elem_size) {
  const int64_t Np = scan_cpu_padded(dstate, elem_size);
  return (4 * seqlen * Np + 8 * Np + 2 * kScanChunk * Np + 4 * kScanChunk) * elem_size + 32;
}

// Kernels for activation type `itype`, built for the baseline instruction set or (where compiled in and
// the CPU has it) AVX2 + FMA; nullptr members where absent.
ScanCpuKernels scan_cpu_kernels_base(DType itype);
ScanCpuKernels scan_cpu_kernels_avx2(DType itype);

}  // namespace markovkit
