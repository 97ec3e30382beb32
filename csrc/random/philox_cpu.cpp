// CPU kernel of the Philox fill: blocks are independent, so threads split them freely. float32 runs
// kFillLanes blocks at a time through the vectorised generator of common/philox_lanes.h (baseline and AVX2
// builds, picked at run time); float64 is scalar.
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#include "common/cpu_isa.h"
#include "random/philox_fill.h"

namespace markovkit {
namespace {

constexpr int kFillLanes = 64;

namespace lanes_default {
#include "common/philox_lanes.h"
#include "random/philox_cpu_lanes.h"
}  // namespace lanes_default

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace lanes_avx2 {
#include "common/philox_lanes.h"
#include "random/philox_cpu_lanes.h"
}  // namespace lanes_avx2
#pragma GCC pop_options
#else
namespace lanes_avx2 = lanes_default;  // cpu_isa() is kBaseline off x86-64
#endif

// Blocks [first, last) of the stream that out[0, numel) covers, PhiloxPerBlock<T> values each.
template <typename T>
void block_range(const PhiloxFillParams& p, uint64_t* first, uint64_t* last) {
  constexpr uint64_t kPer = PhiloxPerBlock<T>::value;
  *first = p.offset / kPer;
  *last = (p.offset + p.numel + kPer - 1) / kPer;
}

template <bool kNormal>
void fill_f64(const PhiloxFillParams& p) {
  uint64_t first, last;
  block_range<double>(p, &first, &last);
  at::parallel_for(0, static_cast<int64_t>(last - first), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) philox_fill_block<double, kNormal>(p, first + b);
  });
}

// Groups of kFillLanes blocks; the last group's blocks past `last` are computed and not stored.
template <bool kNormal>
void fill_f32(const PhiloxFillParams& p) {
  uint64_t first, last;
  block_range<float>(p, &first, &last);
  const auto group = cpu_isa() != CpuIsa::kBaseline ? &lanes_avx2::fill_f32_blocks<kNormal>
                                                    : &lanes_default::fill_f32_blocks<kNormal>;
  const int64_t groups = static_cast<int64_t>((last - first + kFillLanes - 1) / kFillLanes);
  at::parallel_for(0, groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) group(p, first + static_cast<uint64_t>(g) * kFillLanes);
  });
}

}  // namespace

void philox_fill_cpu(const PhiloxFillParams& p) {
  if (p.numel == 0) return;
  if (p.dtype == DType::kFloat64) {
    p.normal ? fill_f64<true>(p) : fill_f64<false>(p);
  } else {
    p.normal ? fill_f32<true>(p) : fill_f32<false>(p);
  }
}

}  // namespace markovkit
