// A kernel that does nothing, compiled for the build's CUDA architectures like every other kernel: whether the
// runtime can load it on the current device is whether this build has code that device runs (common/cuda_device.h).
#include "common/cuda_device.h"

namespace markovkit {
namespace {

__global__ void probe_kernel() {}

}  // namespace

cudaError_t probe_kernel_image() {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky: cleared, so no later launch check reports it
  return err;
}

}  // namespace markovkit
