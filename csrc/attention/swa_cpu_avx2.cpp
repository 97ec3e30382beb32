// The CPU kernels compiled for AVX2 + FMA (x86-64 only); swa_cpu.cpp picks them when the CPU has both.
// Standard headers come first, outside the target pragma, so their inline functions stay baseline code.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention/swa_cpu_entry.h"
#include "attention/swa_params.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SWA_CPU_ISA avx2
#define SWA_CPU_VEC_BYTES 32
#define SWA_CPU_KERNELS swa_cpu_kernels_avx2
#include "attention/swa_cpu_isa.h"
#pragma GCC pop_options
#else
namespace markovkit {
SwaCpuKernels swa_cpu_kernels_avx2(bool) { return {nullptr, nullptr, nullptr}; }
}  // namespace markovkit
#endif
