#pragma once
// The warpgroup-wide Hopper tensor-core primitives of the sm_90a attention kernels (inline PTX: wgmma, its fences,
// the async-proxy fence), apart from the kernel logic so that the CPU emulator (tests/cuda_emu/include/attention/
// swa_wgmma.cuh) can stand in for them. Only the sm_90a pass emits them; any other device pass traps (the host
// never launches those kernels there: swa_sm90_applies).
//
// Shared-memory operands are 128-byte-swizzled tiles: a tile of R rows x D 16-bit columns is D / 64 panels of
// R rows x 128 bytes (panel p holds columns [64 p, 64 p + 64)), 16-byte chunk c of row r stored at chunk c ^ (r % 8)
// of its row; every panel starts at a multiple of 1024 bytes. The descriptors:
//   K-major operand (rows are M or N, the 16 k of one instruction are 32 contiguous bytes of a panel row):
//     start = panel + 32 (k0 % 64 / 16) bytes, SBO = 1024 (8 rows to the next 8), LBO unused;
//   MN-major B operand (rows are k, N contiguous; imm-trans-b = 1): start = row k0 of panel 0,
//     SBO = 1024 (k rows 8 apart), LBO = panel stride (N columns 64 apart).
// The accumulator of m64nNk16 (float) is, for warp w of the warpgroup and lane 4 g + t, N / 8 fragments of four:
// fragment i element e is row 16 w + g + 8 (e / 2), col 8 i + 2 t + e % 2, the C layout of mma.sync m16n8k16 per
// 8 columns; the register A operand (16-bit) is four registers per lane in the A layout of mma.sync m16n8k16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace markovkit {

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MK_WGMMA_ASM(...) __trap()
#else
#define MK_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
#endif

// A shared-memory matrix descriptor with 128-byte swizzling; lbo, sbo in bytes (multiples of 16).
__device__ __forceinline__ uint64_t smem_desc(const void* start, uint32_t lbo, uint32_t sbo) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(start));
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | static_cast<uint64_t>(lbo >> 4) << 16 |
         static_cast<uint64_t>(sbo >> 4) << 32 | uint64_t{1} << 62;
}

// Orders this thread's register writes (accumulators, A fragments) before the next wgmma reads them.
__device__ __forceinline__ void wgmma_fence() { MK_WGMMA_ASM("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { MK_WGMMA_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most N of the warpgroup's committed wgmma groups (the newest) are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  MK_WGMMA_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Shared memory this thread wrote by ordinary stores or cp.async, ordered before the tensor cores' reads (which go
// through the async proxy); then a barrier.
__device__ __forceinline__ void fence_proxy_async() { MK_WGMMA_ASM("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of the accumulators across the wgmma that owns them.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
  }
}

#define MK_F4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define MK_F32 MK_F4(0), MK_F4(1), MK_F4(2), MK_F4(3), MK_F4(4), MK_F4(5), MK_F4(6), MK_F4(7)
#define MK_F64 MK_F32, MK_F4(8), MK_F4(9), MK_F4(10), MK_F4(11), MK_F4(12), MK_F4(13), MK_F4(14), MK_F4(15)
#define MK_D32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"
#define MK_D64                                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d (64 x N) = A B (+ d if accumulate), A (64 x 16) K-major and B (16 x N) in shared memory, MN-major (kMnMajorB:
// imm-trans-b = 1) or K-major; N = 64 or 128.
template <typename T, int N, bool kMnMajorB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t a, uint64_t b, bool accumulate);

// F: the accumulator operand list, D its placeholders, A, B and ACC those of a, b and accumulate; TR the
// imm-trans-b of MN.
#define MK_WGMMA_SS(T, TY, N, MN, TR, F, D, A, B, ACC)                                                                 \
  template <>                                                                                                          \
  __device__ __forceinline__ void wgmma_ss<T, N, MN>(float (&d)[N / 8][4], uint64_t a, uint64_t b, bool accumulate) {  \
    MK_WGMMA_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, " ACC ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY    \
                 "." TY " " D ", " A ", " B ", p, 1, 1, 0, " TR ";\n}\n"                                               \
                 : F                                                                                                   \
                 : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));                                                 \
  }
MK_WGMMA_SS(__half, "f16", 64, false, "0", MK_F32, MK_D32, "%32", "%33", "%34")
MK_WGMMA_SS(__nv_bfloat16, "bf16", 64, false, "0", MK_F32, MK_D32, "%32", "%33", "%34")
MK_WGMMA_SS(__half, "f16", 64, true, "1", MK_F32, MK_D32, "%32", "%33", "%34")
MK_WGMMA_SS(__nv_bfloat16, "bf16", 64, true, "1", MK_F32, MK_D32, "%32", "%33", "%34")
MK_WGMMA_SS(__half, "f16", 128, true, "1", MK_F64, MK_D64, "%64", "%65", "%66")
MK_WGMMA_SS(__nv_bfloat16, "bf16", 128, true, "1", MK_F64, MK_D64, "%64", "%65", "%66")

// d (64 x N) = A B (+ d if accumulate), A (64 x 16) in registers (a), B (16 x N) in shared memory, MN-major
// (kMnMajorB: imm-trans-b = 1) or K-major; N = 64 or 128.
template <typename T, int N, bool kMnMajorB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b, bool accumulate);

// F: the accumulator operand list, D its placeholders, A, B and ACC those of a[0..3], b and accumulate; TR the
// imm-trans-b of MN.
#define MK_WGMMA_RS(T, TY, N, MN, TR, F, D, A, B, ACC)                                                               \
  template <>                                                                                                      \
  __device__ __forceinline__ void wgmma_rs<T, N, MN>(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b,     \
                                                     bool accumulate) {                                            \
    MK_WGMMA_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, " ACC ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY \
                 "." TY " " D ", " A ", " B ", p, 1, 1, " TR ";\n}\n"                                              \
                 : F                                                                                               \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(static_cast<int>(accumulate)));         \
  }
MK_WGMMA_RS(__half, "f16", 64, true, "1", MK_F32, MK_D32, "{%32, %33, %34, %35}", "%36", "%37")
MK_WGMMA_RS(__nv_bfloat16, "bf16", 64, true, "1", MK_F32, MK_D32, "{%32, %33, %34, %35}", "%36", "%37")
MK_WGMMA_RS(__half, "f16", 128, true, "1", MK_F64, MK_D64, "{%64, %65, %66, %67}", "%68", "%69")
MK_WGMMA_RS(__nv_bfloat16, "bf16", 128, true, "1", MK_F64, MK_D64, "{%64, %65, %66, %67}", "%68", "%69")
MK_WGMMA_RS(__half, "f16", 64, false, "0", MK_F32, MK_D32, "{%32, %33, %34, %35}", "%36", "%37")
MK_WGMMA_RS(__nv_bfloat16, "bf16", 64, false, "0", MK_F32, MK_D32, "{%32, %33, %34, %35}", "%36", "%37")
MK_WGMMA_RS(__half, "f16", 128, false, "0", MK_F64, MK_D64, "{%64, %65, %66, %67}", "%68", "%69")
MK_WGMMA_RS(__nv_bfloat16, "bf16", 128, false, "0", MK_F64, MK_D64, "{%64, %65, %66, %67}", "%68", "%69")

#undef MK_WGMMA_RS
#undef MK_WGMMA_SS
#undef MK_D64
#undef MK_D32
#undef MK_F64
#undef MK_F32
#undef MK_F4
#undef MK_WGMMA_ASM

}  // namespace markovkit
