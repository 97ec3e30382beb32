#pragma once
// Which kernel an op runs for its tensors: the CPU kernel for CPU tensors, the CUDA kernel otherwise. In the
// CUDA-emulation test build (MARKOVKIT_CUDA=EMULATE, tests/cuda_emu) a switch sends CPU tensors through the CUDA
// kernels, run on the host.
#include <ATen/ATen.h>

#ifdef MARKOVKIT_CUDA_EMULATION
namespace mk_emu {
bool enabled();
}
#endif

namespace markovkit {

inline bool runs_cpu_kernel(const at::Tensor& t) {
#ifdef MARKOVKIT_CUDA_EMULATION
  return t.is_cpu() && !mk_emu::enabled();
#else
  return t.is_cpu();
#endif
}

}  // namespace markovkit
