#pragma once
// Runs CUDA kernel sources on the CPU, for tests of the CUDA kernels' logic on machines without a GPU.
// rewrite.py turns a .cu file into C++ that includes this header: each `kernel<<<grid, block, smem, stream>>>(
// args)` becomes mk_emu::launch(...), each `extern __shared__ T name[]` a pointer to the block's dynamic shared
// memory. A launch runs its blocks one after another; the threads of a block are fibers that a scheduler runs warp
// by warp: a warp's threads in turn up to their next barrier, through the warp's warp-wide operations (such as
// __shfl_xor_sync), until they wait at __syncthreads, then the next warp; in forward or, with
// MK_EMU_ORDER=reverse, backward order: a missing barrier shows up as a difference between the two.
// Asynchronous copies and products complete at their wait, or with MK_EMU_ORDER=reverse when issued.
// A barrier that some threads never reach (or a warp op inside a divergent branch) raises an error. Dynamic
// shared memory starts filled with 0xff bytes (NaN as floats) in every block. Math uses the host's libm: results
// agree with the GPU's to rounding, not bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#undef __shared__
#define __shared__ static  // blocks run one at a time, so a static is the block's shared variable
#define __launch_bounds__(...)
#define threadIdx (::mk_emu::thread_idx())
#define blockIdx (::mk_emu::block_idx())
#define blockDim (::mk_emu::block_dim())
#define gridDim (::mk_emu::grid_dim())

namespace mk_emu {

bool enabled();  // whether the glue sends CPU tensors through the CUDA kernels (markovkit.cuda_emulation)
void set_enabled(bool on);
// MK_EMU_ORDER=reverse: threads run in reverse order, and asynchronous operations (cp.async, wgmma) complete when
// issued rather than at their wait: the two extremes a kernel must be correct between.
bool reverse_order();

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned lane();  // linear thread index % 32
void* dynamic_smem();

// Runs body once per CUDA thread of every block of grid; throws std::runtime_error where the GPU would refuse the
// launch (block or grid size, dynamic shared memory over 48 KB without cudaFuncSetAttribute raising the kernel's
// limit, or over the device's 227 KB) and on a barrier deadlock.
void launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);
inline void launch(const void* kernel, dim3 grid, dim3 block, const std::function<void()>& body) {
  launch(kernel, grid, block, 0, body);
}
inline void launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                   const std::function<void()>& body) {
  launch(kernel, grid, block, smem_bytes, body);
}

template <typename F>
const void* kernel_id(F* kernel) {
  return reinterpret_cast<const void*>(kernel);
}

// As kernel_id(kernel), naming the kernel as its launch spells it (rewrite.py) in the launch log.
void name_kernel(const void* kernel, const char* name);
template <typename F>
const void* kernel_id(F* kernel, const char* name) {
  name_kernel(kernel_id(kernel), name);
  return kernel_id(kernel);
}

// The kernels launched since the last call, in order, as (name, blocks) (markovkit.cuda_emulation.launched).
std::vector<std::pair<std::string, unsigned>> take_launches();

// The device's opt-in limit of dynamic shared memory per block: 227 KB (an H100's), or MK_EMU_SMEM bytes.
size_t max_dynamic_smem();

// cudaFuncAttributeMaxDynamicSharedMemorySize of a kernel; false (the attribute unchanged) over the device limit.
bool set_max_dynamic_smem(const void* kernel, int bytes);

void sync_block();
void sync_warp();

// Once registered (again: ignored), fn(completed) runs in every thread as it exits: a thread's asynchronous copies
// still pending are done then, as the GPU completes them before a block retires (completed: the thread ran to its
// end; false after an error, when they are dropped).
void at_thread_exit(void (*fn)(bool completed));

constexpr size_t kSlotBytes = 64;  // the largest value a lane can publish to its warp

// All lanes of the calling warp publish `mine`; returns the warp's 32 slots, kSlotBytes apart, readable until the
// lane's next exchange. One warp barrier: the warp has two sets of slots, used in turn, and a set is written again
// only at the exchange after next, which no lane starts before every lane has come to the next one.
const unsigned char* warp_exchange(const void* mine, size_t bytes);

template <typename T>
struct WarpView {
  const unsigned char* slots;
  T operator[](unsigned l) const {
    T v;
    std::memcpy(&v, slots + kSlotBytes * l, sizeof(T));
    return v;
  }
};

template <typename T>
WarpView<T> warp_gather(const T& mine) {
  static_assert(sizeof(T) <= kSlotBytes, "warp_gather: value too large");
  return {warp_exchange(&mine, sizeof(T))};
}

template <typename T>
T shfl_from(T v, unsigned src) {
  const WarpView<T> all = warp_gather(v);
  return all[src];
}

}  // namespace mk_emu

inline void __syncthreads() { mk_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { mk_emu::sync_warp(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  const unsigned l = mk_emu::lane(), base = l & ~static_cast<unsigned>(width - 1);
  const unsigned src = base + ((l - base) ^ static_cast<unsigned>(lane_mask)) % static_cast<unsigned>(width);
  return mk_emu::shfl_from(v, src);
}

template <typename T>
T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
  const unsigned l = mk_emu::lane(), base = l & ~static_cast<unsigned>(width - 1);
  return mk_emu::shfl_from(v, base + static_cast<unsigned>(src_lane) % static_cast<unsigned>(width));
}

template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const unsigned l = mk_emu::lane(), base = l & ~static_cast<unsigned>(width - 1);
  const unsigned src = l - base + delta < static_cast<unsigned>(width) ? l + delta : l;
  return mk_emu::shfl_from(v, src);
}

template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const unsigned l = mk_emu::lane(), base = l & ~static_cast<unsigned>(width - 1);
  return mk_emu::shfl_from(v, l - base >= delta ? l - delta : l);
}

// CUDA's global min / max overloads
#define MK_EMU_MINMAX(T)                             \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
MK_EMU_MINMAX(int)
MK_EMU_MINMAX(unsigned)
MK_EMU_MINMAX(long)
MK_EMU_MINMAX(unsigned long)
MK_EMU_MINMAX(long long)
MK_EMU_MINMAX(unsigned long long)
MK_EMU_MINMAX(float)
MK_EMU_MINMAX(double)
#undef MK_EMU_MINMAX

inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }
template <typename T>
T __ldg(const T* p) { return *p; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }

// The emulated build has code for the device, unless MK_EMU_NO_KERNEL_IMAGE is set: then it has none, as a build for
// other architectures (what the glue's device check, common/cuda_device.h, reports).
template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, T*) {
  *attributes = {};
  return std::getenv("MK_EMU_NO_KERNEL_IMAGE") == nullptr ? cudaSuccess : cudaErrorNoKernelImageForDevice;
}
namespace mk_emu {
inline cudaError_t last_error() { return cudaSuccess; }  // the emulator raises where CUDA would record an error
}  // namespace mk_emu
#define cudaGetLastError ::mk_emu::last_error  // no libcudart behind the emulation build

template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorNotSupported;
  return mk_emu::set_max_dynamic_smem(mk_emu::kernel_id(kernel), value) ? cudaSuccess : cudaErrorInvalidValue;
}
