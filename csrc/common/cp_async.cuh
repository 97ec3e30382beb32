#pragma once
// Asynchronous 16-byte copies global -> shared (cp.async, sm_80+), apart from the kernels so that the CPU emulator
// (tests/cuda_emu/include/common/cp_async.cuh) can stand in for them.
#include <cstdint>

namespace markovkit {

// Asynchronous 16-byte copy global -> shared (both 16-byte aligned), bypassing L1; complete (and visible to
// this thread) after cp_async_wait_all, to the block after a following __syncthreads.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
}

// As cp_async_16, or 16 zero bytes into smem where !copy (gmem must still be a valid address; it is not read).
__device__ __forceinline__ void cp_async_16_or_zero(void* smem, const void* gmem, bool copy) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(copy ? 16 : 0));
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

}  // namespace markovkit
