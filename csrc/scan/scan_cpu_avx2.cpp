// The CPU scan loops compiled for AVX2 + FMA (x86-64 only); scan_cpu.cpp picks them when the CPU has both.
// Headers come first, outside the target pragma, so their inline functions stay baseline code.
#include <cmath>
#include <cstdint>

#include "scan/scan_cpu_entry.h"
#include "scan/scan_half.h"
#include "scan/scan_params.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SCAN_CPU_ISA avx2
#define SCAN_CPU_VEC_BYTES 32
#define SCAN_CPU_KERNELS scan_cpu_kernels_avx2
#include "scan/scan_cpu_isa.h"
#pragma GCC pop_options
#else
namespace markovkit {
ScanCpuKernels scan_cpu_kernels_avx2(DType) { return {nullptr, nullptr}; }
}  // namespace markovkit
#endif
