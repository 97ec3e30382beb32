#pragma once
// Whether this build has CUDA code the current device runs: a build for sm_90a has none an A100 runs, and without
// this check its first launch would fail with CUDA's "no kernel image is available" and no hint of the fix.
#include <cuda_runtime_api.h>

namespace markovkit {

// cudaSuccess where the current device can load this build's kernels, else the runtime's error (probe_kernel.cu).
cudaError_t probe_kernel_image();

// Fails with the device's compute capability, the build's architectures and the rebuild that fixes it where the
// current device cannot run this build's kernels; the answer is kept per device (cuda_device.cpp).
void check_kernel_image();

}  // namespace markovkit
