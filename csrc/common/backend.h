#pragma once
// Which kernel an op runs for its tensors: the CPU kernel for CPU tensors, the CUDA kernel otherwise. In the
// CUDA-emulation test build (MARKOVKIT_CUDA=EMULATE, tests/cuda_emu) a switch sends CPU tensors through the CUDA
// kernels, run on the host.
#include <ATen/ATen.h>
#ifdef MARKOVKIT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/cuda_device.h"
#endif

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

#ifdef MARKOVKIT_WITH_CUDA
// An attribute of the current CUDA device (compute capability, multiprocessors, shared-memory limit).
inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}
#endif

}  // namespace markovkit

// MK_LAUNCH(t, cpu_call, cuda_call): cpu_call where t takes the CPU kernel, else cuda_call on t's device (once the
// build is known to have code for it: check_kernel_image) with `stream` the current CUDA stream, then the launch
// check. Without CUDA only cpu_call is compiled (the CUDA launchers are declared in CUDA builds only).
#ifdef MARKOVKIT_WITH_CUDA
#define MK_LAUNCH(t, cpu_call, cuda_call)                                          \
  do {                                                                             \
    if (::markovkit::runs_cpu_kernel(t)) {                                         \
      cpu_call;                                                                    \
    } else {                                                                       \
      const c10::cuda::CUDAGuard mk_launch_guard((t).device());                    \
      ::markovkit::check_kernel_image();                                           \
      [[maybe_unused]] const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(); \
      cuda_call;                                                                   \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                              \
    }                                                                              \
  } while (0)
#else
#define MK_LAUNCH(t, cpu_call, cuda_call) cpu_call
#endif
