// The check of common/cuda_device.h: once per device, the probe kernel's image, and on failure an error a user can
// act on.
#ifdef MARKOVKIT_WITH_CUDA
#include "common/cuda_device.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "build_facts.h"
#include "common/backend.h"

namespace markovkit {
namespace {

// The MARKOVKIT_CUDA_ARCHS entry for compute capability `cc` (10 major + minor): 90a at 9.0 (the attention's wgmma
// kernels), else the plain number.
std::string arch_of(int cc) { return cc == 90 ? "90a" : std::to_string(cc); }

}  // namespace

void check_kernel_image() {
  static std::atomic<uint64_t> runs{0};  // bit d: device d runs this build's kernels (devices 0-63 remembered)
  const int device = c10::cuda::current_device();
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if ((runs.load(std::memory_order_relaxed) & bit) != 0) return;
  const cudaError_t err = probe_kernel_image();
  if (err == cudaSuccess) {
    runs.fetch_or(bit, std::memory_order_relaxed);
    return;
  }
  if (err != cudaErrorNoKernelImageForDevice && err != cudaErrorInvalidDeviceFunction) C10_CUDA_CHECK(err);
  const int cc = 10 * device_attribute(cudaDevAttrComputeCapabilityMajor) +
                 device_attribute(cudaDevAttrComputeCapabilityMinor);
  TORCH_CHECK(cc >= 80, "markovkit's CUDA kernels need compute capability 8.0 or newer; cuda:", device, " has ",
              cc / 10, ".", cc % 10);
  TORCH_CHECK(false, "markovkit was built without code for cuda:", device, " (compute capability ", cc / 10, ".",
              cc % 10, "): its CUDA architectures are '", MARKOVKIT_CUDA_ARCHS, "' (CUDA: ", cudaGetErrorString(err),
              "). Rebuild it for this GPU: MARKOVKIT_CUDA_ARCHS='", arch_of(cc),
              "' pip install --no-build-isolation <markovkit source> (a list such as '80;90a' serves several GPUs; "
              "the default, auto, builds for the GPUs visible at build time)");
}

}  // namespace markovkit
#endif
