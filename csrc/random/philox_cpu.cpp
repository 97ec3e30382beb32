// CPU kernel of the Philox fill: blocks are independent, so threads split them freely, kFillLanes blocks at a
// time through the vectorised generator of common/philox_lanes.h (baseline, AVX2 and AVX-512 builds, picked at
// run time).
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>  // the lane copies' intrinsics (common/lane_copies.h)
#endif

#include "common/cpu_isa.h"
#include "random/philox_fill.h"

namespace markovkit {
namespace {

constexpr int kFillLanes = 64;

#define MK_LANES_HEADER "random/philox_cpu_lanes.h"
#include "common/lane_copies.h"

// Blocks [first, last) of the stream that out[0, numel) covers, PhiloxPerBlock<T> values each.
template <typename T>
void block_range(const PhiloxFillParams& p, uint64_t* first, uint64_t* last) {
  constexpr uint64_t kPer = PhiloxPerBlock<T>::value;
  *first = p.offset / kPer;
  *last = (p.offset + p.numel + kPer - 1) / kPer;
}

// Groups of kFillLanes blocks; the last group's blocks past `last` are computed and not stored.
template <typename T, bool kNormal>
void fill(const PhiloxFillParams& p) {
  uint64_t first, last;
  block_range<T>(p, &first, &last);
  const auto group = MK_LANES_PICK(fill_blocks<T, kNormal>);
  const int64_t groups = static_cast<int64_t>((last - first + kFillLanes - 1) / kFillLanes);
  at::parallel_for(0, groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) group(p, first + static_cast<uint64_t>(g) * kFillLanes);
  });
}

}  // namespace

void philox_fill_cpu(const PhiloxFillParams& p) {
  if (p.numel == 0) return;
  if (p.dtype == DType::kFloat64) {
    p.normal ? fill<double, true>(p) : fill<double, false>(p);
  } else {
    p.normal ? fill<float, true>(p) : fill<float, false>(p);
  }
}

}  // namespace markovkit
