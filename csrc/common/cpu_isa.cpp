#include "common/cpu_isa.h"

#include <algorithm>
#include <cstdlib>
#include <string>

namespace markovkit {
namespace {

CpuIsa detect() {
  int level = 0;
  // The copies are built by GCC's target pragmas: under clang every copy is baseline code.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    level = __builtin_cpu_supports("avx512f") ? 2 : 1;
  }
#endif
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string cap(env);
    if (cap == "default") level = 0;
    if (cap == "avx2") level = std::min(level, 1);
  }
  return static_cast<CpuIsa>(level);
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

}  // namespace markovkit
