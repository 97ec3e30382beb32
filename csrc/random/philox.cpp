// Glue for philox_uniform / philox_normal: checks, params, stream; CPU and CUDA registrations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/backend.h"
#include "common/torch_checks.h"
#include "random/philox_fill.h"

namespace markovkit {
namespace {

// like: any tensor; only its shape, dtype (float32/float64) and device are used.
// Returns a new contiguous tensor of that shape whose flat element i is stream element offset + i.
at::Tensor philox_fill(const at::Tensor& like, int64_t seed, int64_t offset, bool normal) {
  check_dtype(like, "like", {at::kFloat, at::kDouble});
  TORCH_CHECK(offset >= 0, "offset: expected a non-negative stream position, got ", offset);
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  PhiloxFillParams p{out.data_ptr(), out.numel(), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                     dtype_of(out, "like"), normal};
  MK_LAUNCH(out, philox_fill_cpu(p), philox_fill_cuda(p, stream));
  return out;
}

at::Tensor philox_uniform(const at::Tensor& like, int64_t seed, int64_t offset) {
  return philox_fill(like, seed, offset, false);
}

at::Tensor philox_normal(const at::Tensor& like, int64_t seed, int64_t offset) {
  return philox_fill(like, seed, offset, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(markovkit, CPU, m) {
  m.impl("philox_uniform", &philox_uniform);
  m.impl("philox_normal", &philox_normal);
}

#ifdef MARKOVKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(markovkit, CUDA, m) {
  m.impl("philox_uniform", &philox_uniform);
  m.impl("philox_normal", &philox_normal);
}
#endif

}  // namespace markovkit
