// The CPU kernels compiled for AVX-512F (x86-64 only); swa_cpu.cpp picks them when the CPU has it.
// Standard headers come first, outside the target pragma, so their inline functions stay baseline code.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention/swa_cpu_entry.h"
#include "attention/swa_params.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define SWA_CPU_ISA avx512
#define SWA_CPU_VEC_BYTES 64
#define SWA_CPU_KERNELS swa_cpu_kernels_avx512
#include "attention/swa_cpu_isa.h"
#pragma GCC pop_options
#else
namespace markovkit {
SwaCpuKernels swa_cpu_kernels_avx512(bool) { return {nullptr, nullptr, nullptr}; }
}  // namespace markovkit
#endif
