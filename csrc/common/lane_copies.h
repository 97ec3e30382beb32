// The baseline, AVX2 and AVX-512 copies of a CPU lane kernel. Include <cstdint>, <cstring> and, on x86-64,
// <immintrin.h> first; define MK_LANES_HEADER as the kernel's header (no include guard, no includes; it may use
// common/philox_lanes.h), then include this file inside an anonymous namespace:
//   #define MK_LANES_HEADER "mafbm/mafbm_cpu_lanes.h"
//   #include "common/lane_copies.h"
// It compiles common/philox_lanes.h and the kernel header three times, as namespaces lanes_default, lanes_avx2
// (#pragma GCC target("avx2")) and lanes_avx512 (target("avx512f")); MK_LANES_PICK(name<args>) is the copy of
// a function for this CPU (common/cpu_isa.h). No copy contracts a·b + c (contraction is off around all three:
// AVX-512F has FMA instructions, so do builds with -march=native): the copies give bitwise-equal results. The
// namespaces keep the copies apart: inline functions of one name built for several targets would be merged by
// the linker, which keeps any one. No include guard: a file includes it once per kernel header. Inside a copy,
// MK_LANES_BITS is its vector width (128, 256, 512).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
namespace lanes_default {
#define MK_LANES_BITS 128
#include "common/philox_lanes.h"
#include MK_LANES_HEADER
#undef MK_LANES_BITS
}  // namespace lanes_default

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace lanes_avx2 {
#define MK_LANES_BITS 256
#include "common/philox_lanes.h"
#include MK_LANES_HEADER
#undef MK_LANES_BITS
}  // namespace lanes_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace lanes_avx512 {
#define MK_LANES_BITS 512
#include "common/philox_lanes.h"
#include MK_LANES_HEADER
#undef MK_LANES_BITS
}  // namespace lanes_avx512
#pragma GCC pop_options
#else
namespace lanes_avx2 = lanes_default;  // no target pragmas: every copy is the baseline (cpu_isa() says so)
namespace lanes_avx512 = lanes_default;
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options  // fp-contract
#endif

#ifndef MK_LANES_PICK
#define MK_LANES_PICK(...)                                   \
  (cpu_isa() == CpuIsa::kAvx512 ? &lanes_avx512::__VA_ARGS__ \
   : cpu_isa() == CpuIsa::kAvx2 ? &lanes_avx2::__VA_ARGS__   \
                                : &lanes_default::__VA_ARGS__)
#endif

#undef MK_LANES_HEADER
