#pragma once
// Stand-ins for the c10/cuda headers the glue includes, in the emulation build (tests/cuda_emu): there is no device
// and no stream; kernels run on the host, synchronously, when the glue calls their launchers.
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <optional>

namespace c10::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline c10::DeviceIndex current_device() { return 0; }

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};

}  // namespace c10::cuda

namespace mk_emu {
// The limits the emulator enforces (those of an H100); its compute capability 9.0, or the one in MK_EMU_CC
// (10 major + minor, e.g. 80), which picks the kernels the glue launches.
inline int compute_capability() {
  const char* cc = std::getenv("MK_EMU_CC");
  return cc == nullptr ? 90 : std::atoi(cc);
}

// 132 multiprocessors, or MK_EMU_SMS (kernels that size their launch by them take their other paths).
inline int multiprocessors() {
  const char* n = std::getenv("MK_EMU_SMS");
  return n == nullptr ? 132 : std::atoi(n);
}

// The opt-in limit of dynamic shared memory per block: 227 KB, or MK_EMU_SMEM bytes (cuda_emu.cpp; e.g. 101376,
// the 99 KB of sm_86 / sm_89).
size_t max_dynamic_smem();

inline cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(max_dynamic_smem()); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = multiprocessors(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = compute_capability() / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = compute_capability() % 10; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

inline const char* error_string(cudaError_t err) {
  return err == cudaErrorNoKernelImageForDevice ? "no kernel image is available for execution on the device"
                                                : "an error of the CUDA emulator";
}
}  // namespace mk_emu
// no libcudart behind the emulation build
#define cudaDeviceGetAttribute ::mk_emu::device_attribute
#define cudaGetErrorString ::mk_emu::error_string

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, #expr, " failed in the CUDA emulator")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
