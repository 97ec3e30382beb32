// The baseline and AVX2 copies of a CPU lane kernel. Define MK_LANES_HEADER as the kernel's header (no include
// guard, no includes; it may use common/philox_lanes.h), then include this file inside an anonymous namespace:
//   #define MK_LANES_HEADER "mafbm/mafbm_cpu_lanes.h"
//   #include "common/lane_copies.h"
// It compiles common/philox_lanes.h and the kernel header twice, as namespace lanes_default and as lanes_avx2
// under #pragma GCC target("avx2"); pick one at run time with cpu_isa() != CpuIsa::kBaseline (common/cpu_isa.h).
// The namespaces keep the copies apart: inline functions of one name built for two targets would be merged by
// the linker, which keeps either one. No include guard: a file includes it once per kernel header.
namespace lanes_default {
#include "common/philox_lanes.h"
#include MK_LANES_HEADER
}  // namespace lanes_default

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace lanes_avx2 {
#include "common/philox_lanes.h"
#include MK_LANES_HEADER
}  // namespace lanes_avx2
#pragma GCC pop_options
#else
namespace lanes_avx2 = lanes_default;  // cpu_isa() is kBaseline off x86-64
#endif

#undef MK_LANES_HEADER
