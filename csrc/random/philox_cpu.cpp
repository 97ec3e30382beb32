// CPU kernel of the Philox fill: blocks are independent, so threads split them freely.
#include <ATen/Parallel.h>

#include "random/philox_fill.h"

namespace markovkit {
namespace {

template <typename T, bool kNormal>
void fill(const PhiloxFillParams& p) {
  constexpr uint64_t kPer = PhiloxPerBlock<T>::value;
  const uint64_t first = p.offset / kPer;
  const uint64_t last = (p.offset + p.numel + kPer - 1) / kPer;  // exclusive
  at::parallel_for(0, static_cast<int64_t>(last - first), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) philox_fill_block<T, kNormal>(p, first + b);
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
